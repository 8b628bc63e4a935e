"""BLE presence source: one long-lived bleak scanner on one BlueZ adapter, one zone.

    BleSource(config, ctx).readings()  ->  Reading(presence.enter / presence.exit)

    bleak callback --enqueue only--> queue --> parse (drivers.ble_adverts)
        --> allow-list --> pseudonym (LRU cache) --> PresenceTracker --> Readings

The scanner is started once and left running (never duty-cycled): active scanning with
BlueZ's duplicate filter off so RSSI updates keep coming, or passive scanning with
or-patterns for the three beacon formats (BlueZ >= 5.56 with --experimental).

Recovery ladder (after Home Assistant's habluetooth), run by one named task:

    adapter absent / powered off / BlueZ not on the bus -> state "absent", retry w/ backoff
    StartDiscovery fails InProgress or Failed -> stop our scanner (StopDiscovery), retry;
                                                 twice in a row -> power-cycle the adapter
    StartDiscovery fails NotReady            -> power-cycle the adapter (if it is powered)
    no advert for watchdog_s                 -> stop and restart the scanner
    still none for another watchdog_s        -> power-cycle the adapter, then restart

Library errors are mapped here, once, by D-Bus error name (never by message text).
Nothing here logs a beacon id or a MAC address: adverts are reduced to a pseudonym
before they reach any state, and the device address is never read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from bleak import BleakScanner
from bleak.args.bluez import OrPattern, OrPatternLike
from bleak.assigned_numbers import AdvertisementDataType
from bleak.exc import BleakDBusError, BleakError
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from drivers.ble_adverts import AdvertResolver, AllowList
from gateway.metrics import Cell
from gateway.ports import Reading, SourceContext
from gateway.presence import Decision, PresenceParams, PresenceTracker, PseudonymCache

if TYPE_CHECKING:
    from bleak.backends.device import BLEDevice
    from bleak.backends.scanner import AdvertisementData

    from gateway.config import BleSourceConfig

log = logging.getLogger(__name__)

_BLUEZ = "org.bluez"
_ADAPTER = "org.bluez.Adapter1"
_PROPS = "org.freedesktop.DBus.Properties"
_NO_BLUEZ = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
}
# StartDiscovery errors -> what the ladder does about them
_RECOVERY = {
    "org.bluez.Error.InProgress": "retry",
    "org.bluez.Error.Failed": "retry",
    "org.bluez.Error.NotReady": "reset",
}
_STOP_TIMEOUT_S = 5.0
_BATCH_S = 0.05  # adverts wait at most this long: handled in batches, not one wake-up per
# D-Bus read (presence works in seconds: 50 ms of latency costs nothing, and saves ~40 %
# of the CPU at store rates of a few hundred adverts/s)
_BATCH_N = 256  # ...or as soon as this many wait
_MALFORMED = {"ibeacon_malformed", "altbeacon_malformed", "eddystone_malformed", "ad_malformed"}
PASSIVE_PATTERNS: list[OrPatternLike] = [
    OrPattern(0, AdvertisementDataType.MANUFACTURER_SPECIFIC_DATA, b"\x4c\x00\x02\x15"),
    OrPattern(0, AdvertisementDataType.SERVICE_DATA_UUID16, b"\xaa\xfe"),
    OrPattern(2, AdvertisementDataType.MANUFACTURER_SPECIFIC_DATA, b"\xbe\xac"),
]


class AdapterControl:
    """Our own small D-Bus connection to BlueZ: adapter presence and power-cycling."""

    def __init__(self, adapter: str, power_cycle_pause_s: float = 0.5) -> None:
        self.path = f"/org/bluez/{adapter}"
        self.pause_s = power_cycle_pause_s
        self._bus: MessageBus | None = None

    async def _call(self, member: str, signature: str, body: list[Any]) -> Message:
        if self._bus is None or not self._bus.connected:
            self.close()
            self._bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        return await self._bus.call(Message(destination=_BLUEZ, path=self.path,
            interface=_PROPS, member=member, signature=signature, body=body))  # fmt: skip

    async def state(self) -> tuple[str, str]:
        """(``ok`` | ``absent`` | ``error``, detail) for the adapter, never raising."""
        try:
            reply = await self._call("Get", "ss", [_ADAPTER, "Powered"])
        except (OSError, EOFError) as exc:  # no system bus at all
            self.close()
            return "absent", f"system D-Bus unavailable ({exc.__class__.__name__})"
        if reply.message_type == MessageType.ERROR:
            if reply.error_name in _NO_BLUEZ:
                return "absent", "bluetoothd is not running"
            return "absent", "adapter not present"
        if not reply.body[0].value:
            return "absent", "adapter powered off"
        return "ok", ""

    async def power_cycle(self) -> bool:
        """Power the adapter off and on again; True if both steps were accepted."""
        ok = True
        for powered in (False, True):
            try:
                reply = await self._call("Set", "ssv", [_ADAPTER, "Powered", Variant("b", powered)])
            except (OSError, EOFError):
                return False
            ok = ok and reply.message_type == MessageType.METHOD_RETURN
            if not powered:
                await asyncio.sleep(self.pause_s)
        return ok

    def close(self) -> None:
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None


class BleSource:
    """A configured BLE adapter; ``readings`` yields presence events until cancelled."""

    def __init__(self, config: BleSourceConfig, ctx: SourceContext) -> None:
        self.name = ctx.name
        self.config = config
        self.ctx = ctx
        self.allow = AllowList.build(config.allow_ibeacon_uuids,
            config.allow_eddystone_namespaces, config.allow_altbeacon_prefixes)  # fmt: skip
        self.tracker = PresenceTracker(PresenceParams(
            enter_rssi=config.enter_rssi, exit_rssi=config.exit_rssi,
            silence_s=config.silence_s, min_dwell_s=config.min_dwell_s,
            window_s=config.smoothing_window_s, window_samples=config.smoothing_samples,
            min_samples=config.min_samples, max_tracks=config.max_tracked_subjects,
        ))  # fmt: skip
        self.pseudonyms = PseudonymCache(ctx.keyring.pseudonym_of_canonical,
                                         config.pseudonym_cache_size)  # fmt: skip
        self.resolver = AdvertResolver(self.allow, self.pseudonyms.get,
                                       config.pseudonym_cache_size)  # fmt: skip
        self._counted: dict[str, Cell] = {}  # result -> its ble_adverts_total cell
        self.control = AdapterControl(config.adapter)
        self._pending: deque[AdvertisementData] = deque()  # the callback's queue (bounded)
        self._waiter: asyncio.Future[None] | None = None  # set while readings() waits
        self._ticker: asyncio.TimerHandle | None = None
        self._scanner: BleakScanner | None = None
        self._last_advert = time.monotonic()  # updated by the watchdog from _heard
        self._heard = 0  # adverts bleak reported (the callback counts; no clock read)
        self._queue_size = config.queue_size
        self._tick_s = max(0.05, min(1.0, config.silence_s / 4))

    # -- the bleak callback: enqueue only ---------------------------------------------

    def _on_advert(self, device: BLEDevice, adv: AdvertisementData) -> None:
        self._heard += 1
        pending = self._pending
        if len(pending) >= self._queue_size:
            self.ctx.metrics.inc("ble_adverts_dropped_total", source=self.name)
            return
        pending.append(adv)  # as bleak made it: no copy, no clock read per advert
        waiting = len(pending)
        if waiting == 1:  # the first of a batch: drain them all a moment from now
            asyncio.get_running_loop().call_later(_BATCH_S, self._wake)
        elif waiting == _BATCH_N:  # a flood: drain now, long before the queue fills
            self._wake()

    def _wake(self, *_: object) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_tick(self) -> None:
        self._wake()
        self._ticker = asyncio.get_running_loop().call_later(self._tick_s, self._on_tick)

    # -- the pipeline -----------------------------------------------------------------

    def _drain(self) -> list[Reading]:
        """Every waiting advert through resolve -> count -> presence, dated now.

        One call and one clock read per batch; a batch waited at most ``_BATCH_S``
        (longer only under a backlog, where the bus already delayed it as much).
        """
        out: list[Reading] = []
        pending, resolve, observe = self._pending, self.resolver.resolve, self.tracker.observe
        counted, zone, at = self._counted, self.config.zone, self.ctx.now()
        while pending:
            adv = pending.popleft()
            result, subject = resolve(adv.manufacturer_data, adv.service_data)
            cell = counted.get(result)
            if cell is None:
                cell = counted[result] = self.ctx.metrics.counter(
                    "ble_adverts_total", source=self.name, result=result
                )
            cell.value += 1
            if subject is None:
                if result in _MALFORMED:
                    self.ctx.reject(result)
                continue
            decisions = observe(subject, zone, adv.rssi, now=at)
            if decisions:
                out.extend(self._readings(decisions))
        return out

    def _readings(self, decisions: list[Decision]) -> list[Reading]:
        return [Reading(type=d.type, source=self.name, at=d.at, subject=d.subject,
                        attrs=d.attrs) for d in decisions]  # fmt: skip

    def forget(self, subject: str) -> None:
        """An erasure: drop the subject's presence tracks (no exit is sent) and the
        cached payloads and pseudonyms that resolve to it (called by the daemon)."""
        self.tracker.forget(subject)
        self.resolver.forget(subject)
        self.pseudonyms.forget(subject)

    async def readings(self) -> AsyncIterator[Reading]:
        """Run the scanner and yield presence readings until cancelled or closed.

        The callback appends to a deque; the first advert of a batch wakes this loop
        ``_BATCH_S`` later (the ``_BATCH_N``th at once), and it drains every advert
        waiting before it yields.  A
        repeating timer wakes it every tick for expiries.  No future or timer per advert.
        """
        loop = asyncio.get_running_loop()
        scan = asyncio.create_task(self._scan_loop(), name=f"ble-scan-{self.name}")
        scan.add_done_callback(self._wake)
        self._ticker = loop.call_later(self._tick_s, self._on_tick)
        pending = self._pending
        next_tick = 0.0
        try:
            while True:
                if scan.done():
                    scan.result()  # a bug in the ladder ends the source loudly
                if not pending:
                    self._waiter = loop.create_future()
                    await self._waiter
                out = self._drain()
                now = self.ctx.now()
                if now >= next_tick:
                    next_tick = now + self._tick_s
                    out.extend(self._readings(self.tracker.tick(now=now)))
                    self.ctx.metrics.set(
                        "ble_tracked_subjects", len(self.tracker), source=self.name
                    )
                for reading in out:
                    yield reading
        finally:
            self._waiter = None
            if self._ticker is not None:
                self._ticker.cancel()
            scan.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scan

    # -- scanner lifecycle and recovery ladder ----------------------------------------

    def _new_scanner(self) -> BleakScanner:
        adapter = self.config.adapter
        if self.config.scanning_mode == "passive":
            return BleakScanner(
                self._on_advert,
                scanning_mode="passive",
                bluez={"adapter": adapter, "or_patterns": PASSIVE_PATTERNS},
            )
        return BleakScanner(
            self._on_advert,
            scanning_mode="active",
            bluez={"adapter": adapter, "filters": {"DuplicateData": False}},
        )

    async def _stop_scanner(self) -> None:
        scanner, self._scanner = self._scanner, None
        if scanner is None:
            return
        try:
            async with asyncio.timeout(_STOP_TIMEOUT_S):  # a hung bluetoothd must not hang us
                await scanner.stop()  # StopDiscovery / UnregisterMonitor on bleak's connection
        except (BleakError, OSError, EOFError, TimeoutError) as exc:
            # the adapter or the bus is already gone: nothing left to stop
            log.debug("%s: stopping the scanner failed: %s", self.name, exc.__class__.__name__)

    async def _start_scanner(self) -> str:
        """Start a fresh scanner; returns "" or the recovery action its failure calls for."""
        await self._stop_scanner()
        scanner = self._new_scanner()
        try:
            await scanner.start()
        except BleakDBusError as exc:
            log.warning("%s: starting the scan on %s failed: %s", self.name,
                        self.config.adapter, exc.dbus_error)  # fmt: skip
            self.ctx.metrics.inc("ble_scan_start_errors_total", source=self.name,
                                 error=exc.dbus_error.rsplit(".", 1)[-1])  # fmt: skip
            return _RECOVERY.get(exc.dbus_error, "retry")
        except BleakError as exc:  # adapter vanished between check and start, no passive
            log.warning("%s: starting the scan failed: %s", self.name, exc)
            self.ctx.set_state("error", str(exc))
            return "backoff"
        except (OSError, EOFError) as exc:
            self.ctx.set_state("absent", f"system D-Bus unavailable ({exc.__class__.__name__})")
            return "backoff"
        self._scanner = scanner
        self.ctx.metrics.inc("ble_scanner_starts_total", source=self.name)
        return ""

    async def _watch(self) -> str:
        """Wait while the scan is healthy; returns "absent" or "silent"."""
        check_s = min(1.0, self.config.watchdog_s / 4)
        heard = self._heard
        while True:
            await asyncio.sleep(check_s)
            if self._heard != heard:  # the last advert was heard within this check_s
                heard, self._last_advert = self._heard, time.monotonic()
            state, detail = await self.control.state()
            if state != "ok":
                log.warning("%s: adapter %s lost: %s", self.name, self.config.adapter, detail)
                self.ctx.set_state(state, detail)
                return "absent"
            if time.monotonic() - self._last_advert >= self.config.watchdog_s:
                return "silent"

    async def _scan_loop(self) -> None:
        cfg = self.config
        backoff = cfg.retry_min_s
        failures = strikes = 0
        try:
            while True:
                state, detail = await self.control.state()
                if state != "ok":
                    self.tracker.blind(now=self.ctx.now())
                    self.ctx.set_state(state, detail)
                    await self._stop_scanner()
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, cfg.retry_max_s)
                    continue
                self.ctx.set_state("connecting", f"starting scan on {cfg.adapter}")
                action = await self._start_scanner()
                if action:
                    self.tracker.blind(now=self.ctx.now())
                    failures += 1
                    if action == "reset" or (action == "retry" and failures >= 2):
                        await self._reset_adapter("starting the scan kept failing")
                        failures = 0
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, cfg.retry_max_s)
                    continue
                failures, backoff = 0, cfg.retry_min_s
                started = self._last_advert = time.monotonic()
                self.tracker.resume(now=self.ctx.now())
                self.ctx.set_state("ok", f"scanning {cfg.adapter} ({cfg.scanning_mode})")
                outcome = await self._watch()
                self.tracker.blind(now=self.ctx.now())
                if outcome != "silent":
                    strikes = 0
                    continue
                strikes = 1 if self._last_advert > started else strikes + 1
                if strikes == 1:
                    log.warning("%s: no advert for %.0f s; restarting the scanner",
                                self.name, cfg.watchdog_s)  # fmt: skip
                    self.ctx.metrics.inc("ble_watchdog_total", source=self.name, action="restart")
                else:
                    await self._reset_adapter("still no advert after a scanner restart")
                    strikes = 0
        finally:
            await self._stop_scanner()
            self.control.close()

    async def _reset_adapter(self, why: str) -> None:
        log.warning("%s: power-cycling adapter %s: %s", self.name, self.config.adapter, why)
        self.ctx.metrics.inc("ble_watchdog_total", source=self.name, action="reset")
        self.ctx.set_state("connecting", f"resetting {self.config.adapter}: {why}")
        await self._stop_scanner()
        if not await self.control.power_cycle():
            log.warning("%s: adapter %s refused the power cycle", self.name, self.config.adapter)
