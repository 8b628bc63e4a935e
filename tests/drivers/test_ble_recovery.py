"""The BLE driver's watchdog and passive-scanning fallback, real bleak on the fake BlueZ.

The watchdog ladder runs on the ``ble-silent-bluez`` scenario (bluetoothd hangs: calls
answered, adverts never reported); sparse adverts must never look like that.  Passive
scanning falls back to active, with a clear status, when BlueZ offers no
AdvertisementMonitorManager1 (bluetoothd without --experimental), and comes back once
BlueZ offers it.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from gateway.identity.pseudonyms import Keyring
from simulators.devices.ble_scenario import Scenario
from simulators.devices.fake_bluez import DBusDaemon
from tests.drivers.test_ble_driver import (
    B_PAYLOAD,
    SCENARIOS,
    B,
    Collector,
    fake_bluez,
    hold,
    make,
    playing,
    until,
)


def test_silent_bluez_restarts_the_scanner_then_resets_the_adapter(
    bus: DBusDaemon, keyring: Keyring, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="drivers.ble.source")
    scenario = Scenario.load(SCENARIOS / "ble-silent-bluez.toml")  # silent from 1 s to 6 s
    source, ctx = make(keyring, watchdog_s=1.0, silence_s=10.0)

    async def main() -> None:
        async with playing(bus, source, scenario) as (fake, got):
            await hold(fake, 0.5)  # bluetoothd answers again: adverts flow
            assert ctx.state["state"] == "ok"
        assert [(r.type, r.subject) for r in got.readings] == [("presence.enter", B)]

    asyncio.run(main())
    restarts = ctx.metrics.total("ble_watchdog_total", action="restart")
    resets = ctx.metrics.total("ble_watchdog_total", action="reset")
    assert restarts >= 1 and resets >= 1
    messages = [r.getMessage() for r in caplog.records]
    first_restart = next(i for i, m in enumerate(messages) if "restarting the scanner" in m)
    first_reset = next(i for i, m in enumerate(messages) if "power-cycling" in m)
    assert first_restart < first_reset  # the ladder: restart first, reset only after


def test_sparse_adverts_never_trip_the_watchdog(bus: DBusDaemon, keyring: Keyring) -> None:
    source, ctx = make(keyring, watchdog_s=1.0, silence_s=10.0)

    async def main() -> None:
        async with fake_bluez(bus) as fake, Collector(source):
            fake.add_adapter("hci0")
            await until(lambda: fake.scanning("hci0"))
            for i in range(8):  # one advert every 0.6 watchdog periods for 4.8 s
                fake.advert("hci0", "C4:00:00:00:00:0B", rssi=-62 - i % 2,
                            manufacturer_data=B_PAYLOAD[0], service_data=B_PAYLOAD[1])  # fmt: skip
                await asyncio.sleep(0.6)
            assert ctx.metrics.total("ble_watchdog_total") == 0
            assert ctx.metrics.total("ble_scanner_starts_total") == 1
            await asyncio.sleep(1.6)  # a real silence longer than watchdog_s: it fires
            assert ctx.metrics.total("ble_watchdog_total", action="restart") >= 1

    asyncio.run(main())


def test_passive_without_monitor_manager_falls_back_to_active(
    bus: DBusDaemon, keyring: Keyring, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="drivers.ble.source")
    source, ctx = make(keyring, scanning_mode="passive")

    async def main() -> None:
        async with fake_bluez(bus) as fake, Collector(source) as got:
            fake.add_adapter("hci0", passive=False)  # bluetoothd without --experimental
            await until(lambda: ctx.state.get("state") == "ok")
            detail = ctx.state["detail"]
            assert detail.startswith("scanning hci0 (active, as BlueZ offers no ")
            assert "AdvertisementMonitorManager1" in detail and "--experimental" in detail
            assert ctx.metrics.get("ble_passive_unavailable", source="entrance-ble") == 1
            assert ("hci0", "StartDiscovery") in fake.calls
            await hold(fake, 1.2)
            assert got.of("presence.enter", B)  # presence keeps working, actively
            # bluetoothd restarted with --experimental: the adapter comes back passive
            fake.remove_adapter("hci0")
            await until(lambda: ctx.state.get("state") == "absent")
            fake.add_adapter("hci0", passive=True)
            await until(lambda: ctx.state.get("detail") == "scanning hci0 (passive)")
            await until(lambda: ("hci0", "RegisterMonitor") in fake.calls)
            assert ctx.metrics.get("ble_passive_unavailable", source="entrance-ble") == 0

    asyncio.run(main())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("scanning actively instead" in m for m in warnings) == 1  # said once
    assert any("passive scanning available" in r.getMessage() for r in caplog.records)
    assert "error" not in ctx.state["history"]
