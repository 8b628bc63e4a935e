"""Wall-clock steps through the real driver: presence on the monotonic clock.

NTP stepping the clock of a Pi that booted without an RTC must not end (step forward)
or freeze (step back) a presence; events keep the wall clock as it is when they are made.
"""

from __future__ import annotations

import asyncio
import time

from gateway.identity.pseudonyms import Keyring
from simulators.devices.fake_bluez import DBusDaemon
from tests.drivers.test_ble_driver import B, Collector, fake_bluez, hold, make, until

HOURS = 3600.0


def test_wall_clock_steps_neither_end_nor_freeze_presence(
    bus: DBusDaemon, keyring: Keyring
) -> None:
    source, ctx = make(keyring)  # silence_s 0.8, min_dwell_s 0.5
    offset = [0.0]
    ctx.now = lambda: time.time() + offset[0]  # the wall clock NTP steps

    async def main() -> None:
        async with fake_bluez(bus) as fake:
            fake.add_adapter("hci0")
            async with Collector(source) as got:
                await until(lambda: fake.scanning("hci0"))
                arrived = time.time()
                await hold(fake, 1.0)
                assert [r.type for r in got.readings] == ["presence.enter"]
                offset[0] = 3 * HOURS  # NTP's first sync: hours forward
                await hold(fake, 0.5)
                offset[0] = -2 * HOURS  # and back, past the original time
                await hold(fake, 0.5)
                assert [r.type for r in got.readings] == ["presence.enter"]  # no exit
                left = time.time()
                await until(lambda: len(got.readings) == 2, timeout=3)  # silence: exit
            enter, leave = got.readings
            assert (enter.type, enter.subject, leave.type, leave.subject) == (
                "presence.enter", B, "presence.exit", B,
            )  # fmt: skip
            assert arrived - 0.5 <= enter.at <= arrived + 1.0
            assert left - 2 * HOURS - 0.5 <= leave.at <= left - 2 * HOURS + 0.5
            assert 1 <= leave.attrs["dwell_s"] <= 3  # the real elapsed time, not hours

    asyncio.run(main())
