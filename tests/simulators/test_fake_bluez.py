"""The fake BlueZ and the BLE scenario engine, checked on their own.

Encoders against the issue's vectors; scenarios load and replay deterministically; the
fake speaks BlueZ's exact D-Bus types and discovery semantics to a raw dbus-fast client
and to the unmodified bleak.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from bleak import BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from simulators.devices.ble_scenario import (
    Scenario,
    build_timeline,
    encode_altbeacon,
    encode_eddystone_tlm,
    encode_eddystone_uid,
    encode_eddystone_url,
    encode_ibeacon,
    main,
    rssi_at,
)
from simulators.devices.fake_bluez import DBusDaemon, FakeBlueZ

SCENARIOS = Path(__file__).resolve().parents[2] / "simulators" / "scenarios"
IBEACON_RAW = bytes.fromhex(
    "02 01 1A 1A FF 4C 00 02 15 83 25 6B 74 78 D0 43 A4 82 69 05 F9 DC 8A 44 BA 00 10 00 20 C6"
)
EDDYSTONE_UID = bytes.fromhex("00 F8 E1 57 BD 5D F9 0A AD 1D C2 FB 00 00 00 00 00 01 00 00")
FEAA = "0000feaa-0000-1000-8000-00805f9b34fb"


def test_encoders_reproduce_the_issue_vectors() -> None:
    manufacturer, _ = encode_ibeacon("83256b74-78d0-43a4-8269-05f9dc8a44ba", 16, 32, -58)
    assert IBEACON_RAW[5:7] == b"\x4c\x00"
    assert manufacturer == {0x004C: IBEACON_RAW[7:]}
    assert encode_eddystone_uid("e157bd5df90aad1dc2fb", "000000000001", -8) == (
        {},
        {FEAA: EDDYSTONE_UID},
    )


def test_other_encoders() -> None:
    _, service = encode_eddystone_url("https://www.example.org/x", -20)
    assert service[FEAA] == bytes([0x10, 0xEC, 0x01]) + b"example" + bytes([0x01]) + b"x"
    _, service = encode_eddystone_tlm(3000, 24.5, 42, 123.4)
    assert service[FEAA].hex() == "2000" + "0bb8" + "1880" + "0000002a" + "000004d2"
    manufacturer, _ = encode_altbeacon("2f234454cf6d4a0fadf2f4911ba9ffa600010002", 0x0118, -59)
    assert manufacturer[0x0118].hex() == "beac2f234454cf6d4a0fadf2f4911ba9ffa600010002c500"


def test_rssi_curve() -> None:
    curve = [(0.0, -90.0), (2.0, -60.0), (4.0, -60.0)]
    assert rssi_at(curve, 1.0) == -75.0
    assert rssi_at(curve, 3.0) == -60.0
    assert rssi_at(curve, 4.5) is None
    assert rssi_at(curve, -0.1) is None


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("ble-*.toml")), ids=lambda p: p.stem)
def test_every_scenario_loads_and_is_deterministic(path: Path) -> None:
    scenario = Scenario.load(path)
    first, second = build_timeline(scenario), build_timeline(scenario)
    assert first == second
    assert first
    assert all(a.at <= b.at for a, b in itertools.pairwise(first))
    assert all(s.action == "advert" or s.extra is not None for s in first)


def test_scenario_errors_are_named() -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        Scenario.from_dict({"duration_s": 1, "advertisers": [{"kind": "nope"}]})
    with pytest.raises(ValueError, match="unknown action"):
        Scenario.from_dict({"duration_s": 1, "events": [{"at": 0, "action": "explode"}]})


def test_rotating_addresses_rotate() -> None:
    scenario = Scenario.load(SCENARIOS / "ble-two-zones.toml")
    addresses = {s.address for s in build_timeline(scenario) if s.action == "advert"}
    assert len(addresses) >= 3
    assert all(int(a[:2], 16) >> 6 == 0b01 for a in addresses)  # resolvable private


@contextlib.asynccontextmanager
async def running(bus: DBusDaemon) -> AsyncIterator[tuple[FakeBlueZ, MessageBus]]:
    fake = FakeBlueZ(bus.address, device_timeout_s=0.4)
    await fake.start()
    client = await MessageBus(bus_address=bus.address).connect()
    try:
        yield fake, client
    finally:
        client.disconnect()
        await fake.close()
        bus.stop()
        await asyncio.sleep(0.1)


async def call(client: MessageBus, path: str, iface: str, member: str, sig: str = "",
               body: list[object] | None = None) -> Message:  # fmt: skip
    return await client.call(Message(destination="org.bluez", path=path, interface=iface,
                                     member=member, signature=sig, body=body or []))  # fmt: skip


def test_dbus_types_are_bluez_types(bus: DBusDaemon) -> None:
    async def main() -> None:
        async with running(bus) as (fake, client):
            fake.add_adapter("hci0")
            reply = await call(client, "/org/bluez/hci0", "org.bluez.Adapter1", "StartDiscovery")
            assert reply.message_type == MessageType.METHOD_RETURN
            fake.advert("hci0", "C4:00:00:00:00:01", rssi=-61, manufacturer_data={0x4C: b"\x02"},
                        service_data={FEAA: b"\x00"}, tx_power=-8)  # fmt: skip
            reply = await call(client, "/", "org.freedesktop.DBus.ObjectManager",
                               "GetManagedObjects")  # fmt: skip
            assert reply.signature == "a{oa{sa{sv}}}"
            objects = reply.body[0]
            device = objects["/org/bluez/hci0/dev_C4_00_00_00_00_01"]["org.bluez.Device1"]
            assert device["RSSI"].signature == "n"
            assert device["ManufacturerData"].signature == "a{qv}"
            assert device["ManufacturerData"].value[0x4C].signature == "ay"
            assert device["ServiceData"].signature == "a{sv}"
            assert device["ServiceData"].value[FEAA].signature == "ay"
            assert device["Adapter"].signature == "o"
            adapter = objects["/org/bluez/hci0"]["org.bluez.Adapter1"]
            assert adapter["Powered"].signature == "b"
            assert adapter["Discovering"].value is True

    asyncio.run(main())


def test_discovery_sessions_like_bluetoothd(bus: DBusDaemon) -> None:
    async def main() -> None:
        async with running(bus) as (fake, client):
            path, iface = "/org/bluez/hci0", "org.bluez.Adapter1"
            fake.add_adapter("hci0", powered=False)
            reply = await call(client, path, iface, "StartDiscovery")
            assert reply.error_name == "org.bluez.Error.NotReady"
            fake.set_powered("hci0", True)
            reply = await call(client, path, iface, "StopDiscovery")
            assert reply.error_name == "org.bluez.Error.Failed"
            assert (await call(client, path, iface, "StartDiscovery")).error_name is None
            reply = await call(client, path, iface, "StartDiscovery")
            assert reply.error_name == "org.bluez.Error.InProgress"
            assert fake.scanning("hci0")
            client.disconnect()  # a client that leaves the bus loses its session
            await asyncio.sleep(0.2)
            assert not fake.scanning("hci0")
            reply = await call(fake.bus, "/org/bluez/hci9", iface, "StartDiscovery")  # type: ignore[arg-type]
            assert reply.error_name == "org.freedesktop.DBus.Error.UnknownObject"

    asyncio.run(main())


def test_unmodified_bleak_scans_the_fake(bus: DBusDaemon) -> None:
    seen: list[tuple[int, dict[int, bytes], dict[str, bytes]]] = []

    def on_advert(device: BLEDevice, adv: AdvertisementData) -> None:
        seen.append((adv.rssi, adv.manufacturer_data, adv.service_data))

    async def main() -> None:
        async with running(bus) as (fake, _):
            fake.add_adapter("hci0")
            scanner = BleakScanner(on_advert, bluez={"adapter": "hci0"})
            await scanner.start()
            try:
                ibeacon = encode_ibeacon("83256b74-78d0-43a4-8269-05f9dc8a44ba", 16, 32, -58)
                for rssi in (-60, -61, -61, -62):  # the repeat is coalesced, like bluetoothd
                    fake.advert("hci0", "C4:00:00:00:00:01", rssi=rssi,
                                manufacturer_data=ibeacon[0])  # fmt: skip
                fake.advert("hci0", "C4:00:00:00:00:01", rssi=-62,
                            manufacturer_data={0x0059: b"\x01"})  # fmt: skip
                for i in range(2000):  # a flood, paced: bleak's connection must survive
                    fake.advert("hci0", "C4:00:00:00:00:02", rssi=-70 - i % 20,
                                manufacturer_data={0x004C: b"\x10\x05"})  # fmt: skip
                    if fake.adverts_sent % 50 == 0:
                        await fake.drain()
                        await asyncio.sleep(0)
                await asyncio.sleep(0.3)
                assert [s[0] for s in seen[:3]] == [-60, -61, -62]
                # manufacturer data is cached per company id: the old iBeacon payload stays
                assert seen[3][1] == {0x004C: ibeacon[0][0x004C], 0x0059: b"\x01"}
                assert len(seen) > 1000
                await asyncio.sleep(0.6)  # devices unheard for device_timeout_s are removed
                assert fake.devices == {}
            finally:
                await scanner.stop()

    asyncio.run(main())


def test_cli_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "DBUS_SYSTEM_BUS_ADDRESS" in capsys.readouterr().out
