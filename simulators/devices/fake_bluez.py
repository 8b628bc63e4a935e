"""A fake BlueZ on a private system bus, for the unmodified bleak to scan.

    with DBusDaemon() as daemon:                 # dbus-daemon with its own config file
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = daemon.address
        bluez = FakeBlueZ(daemon.address)
        await bluez.start()
        bluez.add_adapter("hci0")
        bluez.advert("hci0", "C0:FF:EE:00:00:01", rssi=-60, manufacturer_data={0x4C: ...})
        await bluez.close()

It speaks enough of ``org.bluez`` for bleak's BlueZ backend: the ObjectManager at ``/``
(GetManagedObjects, InterfacesAdded/Removed), ``Adapter1`` (Start/StopDiscovery with
per-client sessions, SetDiscoveryFilter, Powered), ``AdvertisementMonitorManager1``
(passive scanning with or-patterns; only on adapters marked ``passive``), ``Device1``
(RSSI ``n``, ManufacturerData ``a{qv}`` and ServiceData ``a{sv}`` holding ``ay``) and
PropertiesChanged.  Like bluetoothd it caches manufacturer data per company id, emits a
property only when its value changes, answers errors by their BlueZ names, drops a
client's discovery sessions when it leaves the bus, and forgets devices not heard for
``device_timeout_s``.  Messages are hand-built with dbus-fast's low-level API so every
D-Bus type is exactly BlueZ's (python-dbusmock's template gets several wrong).

Independent of drivers/ and gateway/: advert payloads come in as bytes here (see
``simulators.devices.ble_scenario`` for the encoders).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulators.deps import missing
from simulators.infra.service import Service

try:
    from dbus_fast import Message, MessageType, Variant
    from dbus_fast.aio import MessageBus
except ModuleNotFoundError as exc:
    raise missing(exc, "the fake BlueZ") from exc

log = logging.getLogger(__name__)

BLUEZ = "org.bluez"
ADAPTER = "org.bluez.Adapter1"
DEVICE = "org.bluez.Device1"
MONITOR_MANAGER = "org.bluez.AdvertisementMonitorManager1"
MONITOR = "org.bluez.AdvertisementMonitor1"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
PROPERTIES = "org.freedesktop.DBus.Properties"
ERR_NOT_READY = "org.bluez.Error.NotReady"
ERR_IN_PROGRESS = "org.bluez.Error.InProgress"
ERR_FAILED = "org.bluez.Error.Failed"
ERR_INVALID = "org.bluez.Error.InvalidArguments"
ERR_UNKNOWN_OBJECT = "org.freedesktop.DBus.Error.UnknownObject"
ERR_UNKNOWN_METHOD = "org.freedesktop.DBus.Error.UnknownMethod"

_BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:dir={dir}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""


class DBusDaemon(Service):
    """A private dbus-daemon (system-bus type) with its own config file in a temp dir."""

    def __init__(self) -> None:
        self.address = ""
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        exe = shutil.which("dbus-daemon") or "/usr/bin/dbus-daemon"
        self._dir = Path(tempfile.mkdtemp(prefix="tpbus-"))
        conf = self._dir / "bus.conf"
        conf.write_text(_BUS_CONF.format(dir=self._dir), encoding="utf-8")
        self._proc = subprocess.Popen(
            [exe, f"--config-file={conf}", "--nofork", "--nopidfile", "--print-address=1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline().decode().strip()
        self._proc.stdout.close()
        if not line:
            self.stop()
            raise RuntimeError("dbus-daemon did not start; is the dbus package installed?")
        self.address = line
        return line

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


@dataclass
class _Adapter:
    name: str
    address: str
    powered: bool
    passive: bool
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)  # sender -> filter
    filters: dict[str, dict[str, Any]] = field(default_factory=dict)  # sender -> next filter
    monitors: dict[tuple[str, str], list[tuple[int, int, bytes]] | None] = field(
        default_factory=dict
    )
    fail_next: list[str] = field(default_factory=list)

    @property
    def path(self) -> str:
        return f"/org/bluez/{self.name}"

    def props(self) -> dict[str, Variant]:
        return {
            "Address": Variant("s", self.address),
            "AddressType": Variant("s", "public"),
            "Name": Variant("s", f"fake-{self.name}"),
            "Alias": Variant("s", f"fake-{self.name}"),
            "Class": Variant("u", 0),
            "Powered": Variant("b", self.powered),
            "Discoverable": Variant("b", False),
            "Pairable": Variant("b", False),
            "PairableTimeout": Variant("u", 0),
            "DiscoverableTimeout": Variant("u", 180),
            "Discovering": Variant("b", bool(self.sessions)),
            "UUIDs": Variant("as", []),
            "Modalias": Variant("s", "usb:v1D6Bp0246d0548"),
            "Roles": Variant("as", ["central", "peripheral"]),
        }

    def monitor_props(self) -> dict[str, Variant]:
        return {
            "SupportedMonitorTypes": Variant("as", ["or_patterns"]),
            "SupportedFeatures": Variant("as", []),
        }


@dataclass
class _Device:
    adapter: str
    address: str
    address_type: str
    props: dict[str, Variant]
    last_seen: float


def _bytes_dict(data: dict[Any, bytes]) -> dict[Any, Variant]:
    return {k: Variant("ay", v) for k, v in data.items()}


def _device_path(adapter: str, address: str) -> str:
    return f"/org/bluez/{adapter}/dev_{address.upper().replace(':', '_')}"


def _ad_structures(manufacturer: dict[int, bytes], service: dict[str, bytes]) -> list[bytes]:
    """AD structures (type byte + value) as on air, for or-pattern matching."""
    out = [bytes([0xFF]) + company.to_bytes(2, "little") + d for company, d in manufacturer.items()]
    for uuid, d in service.items():
        if uuid.endswith("-0000-1000-8000-00805f9b34fb") and uuid.startswith("0000"):
            out.append(bytes([0x16]) + int(uuid[4:8], 16).to_bytes(2, "little") + d)
    return out


def _matches(patterns: list[tuple[int, int, bytes]], ads: list[bytes]) -> bool:
    for start, ad_type, content in patterns:
        for ad in ads:
            if ad[0] == ad_type and ad[1 + start : 1 + start + len(content)] == content:
                return True
    return False


class FakeBlueZ:
    """The fake ``org.bluez`` service on one bus connection.  See the module docstring."""

    def __init__(self, address: str, *, device_timeout_s: float = 30.0) -> None:
        self._address = address
        self.device_timeout_s = device_timeout_s
        self.bus: MessageBus | None = None
        self.adapters: dict[str, _Adapter] = {}
        self.devices: dict[str, _Device] = {}
        self.silent = False  # a hung bluetoothd: accepts calls, reports nothing
        self.adverts_sent = 0
        self.calls: list[tuple[str, str]] = []  # (adapter, method) for tests
        self._reaper: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_send: asyncio.Future[Any] | None = None

    async def start(self) -> None:
        bus = await MessageBus(bus_address=self._address).connect()
        self.bus = bus
        bus.add_message_handler(self._handle)
        await bus.request_name(BLUEZ)
        await bus.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=["type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged'"],
            )
        )
        self._reaper = asyncio.create_task(self._reap(), name="fake-bluez-reaper")

    async def close(self) -> None:
        for task in [self._reaper, *self._tasks]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.bus is not None:
            self.bus.disconnect()
            with contextlib.suppress(Exception):
                await self.bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
            self.bus = None

    # -- state changes driven by tests and scenarios ----------------------------------

    def add_adapter(
        self, name: str, address: str = "00:1A:7D:DA:71:00", *, powered: bool = True,
        passive: bool = False,
    ) -> None:  # fmt: skip
        adapter = _Adapter(name, address, powered, passive)
        self.adapters[name] = adapter
        ifaces = {ADAPTER: adapter.props()}
        if passive:
            ifaces[MONITOR_MANAGER] = adapter.monitor_props()
        self._signal("/", OBJECT_MANAGER, "InterfacesAdded", "oa{sa{sv}}", [adapter.path, ifaces])

    def remove_adapter(self, name: str) -> None:
        adapter = self.adapters.pop(name, None)
        if adapter is None:
            return
        for path in [p for p, d in self.devices.items() if d.adapter == name]:
            self._remove_device(path)
        ifaces = [ADAPTER] + ([MONITOR_MANAGER] if adapter.passive else [])
        self._signal("/", OBJECT_MANAGER, "InterfacesRemoved", "oas", [adapter.path, ifaces])

    def set_powered(self, name: str, powered: bool) -> None:
        adapter = self.adapters[name]
        if adapter.powered == powered:
            return
        adapter.powered = powered
        changed = {"Powered": Variant("b", powered)}
        if not powered:
            adapter.sessions.clear()
            changed["Discovering"] = Variant("b", False)
            for path in [p for p, d in self.devices.items() if d.adapter == name]:
                self._remove_device(path)
        self._signal(adapter.path, PROPERTIES, "PropertiesChanged", "sa{sv}as",
                     [ADAPTER, changed, []])  # fmt: skip

    def fail_next_start(self, name: str, *errors: str) -> None:
        """Answer the next StartDiscovery calls on ``name`` with these BlueZ errors."""
        self.adapters[name].fail_next.extend(errors)

    def scanning(self, name: str) -> bool:
        adapter = self.adapters.get(name)
        return bool(adapter and adapter.powered and (adapter.sessions or adapter.monitors))

    def advert(
        self,
        adapter_name: str,
        address: str,
        *,
        rssi: int,
        manufacturer_data: dict[int, bytes] | None = None,
        service_data: dict[str, bytes] | None = None,
        address_type: str = "random",
        tx_power: int | None = None,
    ) -> bool:
        """One advert heard by an adapter; True if it was reported to any client."""
        adapter = self.adapters.get(adapter_name)
        if adapter is None or not adapter.powered or self.silent:
            return False
        manufacturer = manufacturer_data or {}
        service = service_data or {}
        if not adapter.sessions:
            patterns = [p for ps in adapter.monitors.values() for p in (ps or [])]
            ads = _ad_structures(manufacturer, service)
            if not adapter.monitors or not _matches(patterns, ads):
                return False
        path = _device_path(adapter_name, address)
        device = self.devices.get(path)
        now = time.monotonic()
        if device is None:
            props = {
                "Address": Variant("s", address),
                "AddressType": Variant("s", address_type),
                "Alias": Variant("s", address.replace(":", "-")),
                "Paired": Variant("b", False),
                "Bonded": Variant("b", False),
                "Trusted": Variant("b", False),
                "Blocked": Variant("b", False),
                "LegacyPairing": Variant("b", False),
                "Connected": Variant("b", False),
                "ServicesResolved": Variant("b", False),
                "UUIDs": Variant("as", sorted(service)),
                "Adapter": Variant("o", adapter.path),
                "RSSI": Variant("n", rssi),
                "ManufacturerData": Variant("a{qv}", _bytes_dict(manufacturer)),
                "ServiceData": Variant("a{sv}", _bytes_dict(service)),
            }  # fmt: skip
            if tx_power is not None:
                props["TxPower"] = Variant("n", tx_power)
            self.devices[path] = _Device(adapter_name, address, address_type, props, now)
            body = [path, {DEVICE: props}]
            self._signal("/", OBJECT_MANAGER, "InterfacesAdded", "oa{sa{sv}}", body)
            self.adverts_sent += 1
            return True
        device.last_seen = now
        changed: dict[str, Variant] = {}
        if device.props["RSSI"].value != rssi:
            changed["RSSI"] = Variant("n", rssi)
        cached_m = dict(device.props["ManufacturerData"].value)  # cached per company id
        cached_s = dict(device.props["ServiceData"].value)
        new_m = {**cached_m, **_bytes_dict(manufacturer)}
        new_s = {**cached_s, **_bytes_dict(service)}
        if {k: v.value for k, v in new_m.items()} != {k: v.value for k, v in cached_m.items()}:
            changed["ManufacturerData"] = Variant("a{qv}", new_m)
        if {k: v.value for k, v in new_s.items()} != {k: v.value for k, v in cached_s.items()}:
            changed["ServiceData"] = Variant("a{sv}", new_s)
            changed["UUIDs"] = Variant("as", sorted(new_s))
        if not changed:
            return False  # bluetoothd emits nothing when nothing changed
        device.props.update(changed)
        self._signal(path, PROPERTIES, "PropertiesChanged", "sa{sv}as", [DEVICE, changed, []])
        self.adverts_sent += 1
        return True

    async def drain(self) -> None:
        """Wait until dbus-daemon has read everything sent so far (pacing a flood).

        dbus-fast writes a message straight to the socket when its own queue is empty and
        drops the connection if that write would block, so a flood must never fill the
        socket.  Waiting for the last write is not enough (the socket may still be full):
        this also makes a round trip to dbus-daemon, which answers only after reading
        every message sent before the call.
        """
        if self._last_send is not None:
            with contextlib.suppress(Exception):
                await self._last_send
        if self.bus is not None and self.bus.connected:
            bus = "org.freedesktop.DBus"
            with contextlib.suppress(Exception):
                await self.bus.call(Message(destination=bus, path="/org/freedesktop/DBus",
                                            interface=bus, member="GetId"))  # fmt: skip

    # -- D-Bus plumbing ---------------------------------------------------------------

    def _signal(self, path: str, iface: str, member: str, sig: str, body: list[Any]) -> None:
        if self.bus is not None and self.bus.connected:
            self._last_send = self.bus.send(Message.new_signal(path, iface, member, sig, body))

    def _remove_device(self, path: str) -> None:
        if self.devices.pop(path, None) is not None:
            self._signal("/", OBJECT_MANAGER, "InterfacesRemoved", "oas", [path, [DEVICE]])

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.device_timeout_s / 4))
            horizon = time.monotonic() - self.device_timeout_s
            for path in [p for p, d in self.devices.items() if d.last_seen < horizon]:
                self._remove_device(path)

    def _managed_objects(self) -> dict[str, dict[str, dict[str, Variant]]]:
        objects: dict[str, dict[str, dict[str, Variant]]] = {}
        for adapter in self.adapters.values():
            objects[adapter.path] = {ADAPTER: adapter.props()}
            if adapter.passive:
                objects[adapter.path][MONITOR_MANAGER] = adapter.monitor_props()
        for path, device in self.devices.items():
            objects[path] = {DEVICE: dict(device.props)}
        return objects

    def _props_of(self, path: str, iface: str) -> dict[str, Variant] | None:
        for adapter in self.adapters.values():
            if path == adapter.path:
                if iface == ADAPTER:
                    return adapter.props()
                if iface == MONITOR_MANAGER and adapter.passive:
                    return adapter.monitor_props()
        device = self.devices.get(path)
        if device is not None and iface == DEVICE:
            return dict(device.props)
        return None

    def _handle(self, msg: Message) -> Message | bool | None:
        if msg.message_type == MessageType.SIGNAL:
            if msg.member == "NameOwnerChanged" and msg.body[2] == "":
                self._client_left(msg.body[0])
            return None
        if msg.message_type != MessageType.METHOD_CALL or msg.destination != BLUEZ:
            return None
        try:
            return self._dispatch(msg)
        except Exception:  # a bug in the fake must not kill the bus connection
            log.exception("fake bluez: error handling %s.%s", msg.interface, msg.member)
            return Message.new_error(msg, ERR_FAILED, "fake bluez internal error")

    def _dispatch(self, msg: Message) -> Message:
        path, iface, member = msg.path or "", msg.interface, msg.member
        if iface == OBJECT_MANAGER and member == "GetManagedObjects" and path == "/":
            return Message.new_method_return(msg, "a{oa{sa{sv}}}", [self._managed_objects()])
        if iface == PROPERTIES:
            return self._properties(msg)
        adapter = next((a for a in self.adapters.values() if a.path == path), None)
        if adapter is None:
            return Message.new_error(msg, ERR_UNKNOWN_OBJECT, f"no object at {path}")
        self.calls.append((adapter.name, member or ""))
        if iface == ADAPTER:
            return self._adapter_call(msg, adapter)
        if iface == MONITOR_MANAGER and adapter.passive:
            return self._monitor_call(msg, adapter)
        return Message.new_error(msg, ERR_UNKNOWN_METHOD, f"no method {iface}.{member}")

    def _properties(self, msg: Message) -> Message:
        path = msg.path or ""
        iface = msg.body[0]
        props = self._props_of(path, iface)
        if props is None:
            return Message.new_error(msg, ERR_UNKNOWN_OBJECT, f"no {iface} at {path}")
        if msg.member == "GetAll":
            return Message.new_method_return(msg, "a{sv}", [props])
        if msg.member == "Get":
            if msg.body[1] not in props:
                return Message.new_error(msg, ERR_INVALID, "no such property")
            return Message.new_method_return(msg, "v", [props[msg.body[1]]])
        if msg.member == "Set" and iface == ADAPTER and msg.body[1] == "Powered":
            name = path.rsplit("/", 1)[-1]
            self.calls.append((name, f"Powered={msg.body[2].value}"))
            self.set_powered(name, bool(msg.body[2].value))
            return Message.new_method_return(msg)
        return Message.new_error(msg, "org.bluez.Error.NotSupported", "read-only property")

    def _adapter_call(self, msg: Message, adapter: _Adapter) -> Message:
        sender = msg.sender or ""
        member = msg.member
        if member == "SetDiscoveryFilter":
            filters = {k: v.value for k, v in msg.body[0].items()}
            if filters.get("Transport", "le") not in ("auto", "bredr", "le"):
                return Message.new_error(msg, ERR_INVALID, "Invalid Arguments in method call")
            adapter.filters[sender] = filters
            if sender in adapter.sessions:
                adapter.sessions[sender] = filters
            return Message.new_method_return(msg)
        if member == "GetDiscoveryFilters":
            return Message.new_method_return(msg, "as", [["UUIDs", "RSSI", "Pathloss",
                "Transport", "DuplicateData", "Discoverable", "Pattern"]])  # fmt: skip
        if member not in ("StartDiscovery", "StopDiscovery"):
            return Message.new_error(msg, ERR_UNKNOWN_METHOD, f"no method {member}")
        return self._discovery_call(msg, adapter, sender)

    def _discovery_call(self, msg: Message, adapter: _Adapter, sender: str) -> Message:
        """StartDiscovery / StopDiscovery with bluetoothd's per-client sessions."""
        member = msg.member
        if not adapter.powered:
            return Message.new_error(msg, ERR_NOT_READY, "Resource Not Ready")
        if member == "StartDiscovery":
            if adapter.fail_next:
                error = adapter.fail_next.pop(0)
                return Message.new_error(msg, error, "injected failure")
            if sender in adapter.sessions:
                return Message.new_error(msg, ERR_IN_PROGRESS, "Operation already in progress")
            first = not adapter.sessions
            adapter.sessions[sender] = adapter.filters.get(sender, {})
            if first:
                self._discovering(adapter, True)
            return Message.new_method_return(msg)
        if sender not in adapter.sessions:
            return Message.new_error(msg, ERR_FAILED, "No discovery started")
        del adapter.sessions[sender]
        if not adapter.sessions:
            self._discovering(adapter, False)
        return Message.new_method_return(msg)

    def _discovering(self, adapter: _Adapter, on: bool) -> None:
        self._signal(adapter.path, PROPERTIES, "PropertiesChanged", "sa{sv}as",
                     [ADAPTER, {"Discovering": Variant("b", on)}, []])  # fmt: skip

    def _monitor_call(self, msg: Message, adapter: _Adapter) -> Message:
        key = (msg.sender or "", msg.body[0] if msg.body else "")
        if msg.member == "RegisterMonitor":
            if key in adapter.monitors:
                return Message.new_error(msg, "org.bluez.Error.AlreadyExists", "Already Exists")
            adapter.monitors[key] = None  # patterns are read once the client exports them
            task = asyncio.create_task(self._read_patterns(adapter, key), name="fake-bluez-monitor")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return Message.new_method_return(msg)
        if msg.member == "UnregisterMonitor":
            adapter.monitors.pop(key, None)
            return Message.new_method_return(msg)
        return Message.new_error(msg, ERR_UNKNOWN_METHOD, f"no method {msg.member}")

    async def _read_patterns(self, adapter: _Adapter, key: tuple[str, str]) -> None:
        assert self.bus is not None
        for _ in range(50):
            reply = await self.bus.call(Message(destination=key[0], path=key[1],
                interface=PROPERTIES, member="Get", signature="ss",
                body=[MONITOR, "Patterns"]))  # fmt: skip
            if reply.message_type == MessageType.METHOD_RETURN:
                if key in adapter.monitors:
                    adapter.monitors[key] = [(s, t, bytes(c)) for s, t, c in reply.body[0].value]
                    await self.bus.call(Message(destination=key[0], path=key[1],
                        interface=MONITOR, member="Activate"))  # fmt: skip
                return
            await asyncio.sleep(0.02)

    def _client_left(self, name: str) -> None:
        for adapter in self.adapters.values():
            had = bool(adapter.sessions)
            adapter.sessions.pop(name, None)
            for key in [k for k in adapter.monitors if k[0] == name]:
                del adapter.monitors[key]
            if had and not adapter.sessions:
                self._discovering(adapter, False)
