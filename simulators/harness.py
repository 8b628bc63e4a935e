"""The asynchronous simulators (fake BlueZ, printer, till) driven from synchronous code.

Each runs on an asyncio loop of its own in a thread, so a plain (non-async) test or script
drives it with blocking calls while its own code, or the gateway under test, runs its own
loop.  The pytest plugin (``simulators.pytest_plugin``) yields these::

    bluez = BlueZOnThread(bus.address)          # a fake org.bluez with adapter hci0
    bluez.call(lambda fake: fake.advert("hci0", "C4:00:00:00:00:01", rssi=-60,
                                        manufacturer_data={0x004C: payload}))
    bluez.play(Scenario.load(path), speed=4.0)  # blocking replay
    bluez.close()

    pair = TillPrinter()                        # a fake printer on a loopback port
    pair.print(receipt(qr_data=b"..."), port=tap_port)  # the till prints through your tap
    pair.jobs(1)                                # what the printer received, once complete
    pair.close()
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from simulators.devices.ble_scenario import Scenario, play
from simulators.devices.fake_bluez import FakeBlueZ
from simulators.devices.printer import FakePrinter
from simulators.devices.till import receipt, send_job

T = TypeVar("T")


class LoopThread:
    """An asyncio event loop running in a daemon thread; ``run`` blocks for a coroutine."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self.loop.close()


class BlueZOnThread:
    """A started ``FakeBlueZ`` on the bus at ``address``, with ``adapters`` added."""

    def __init__(self, address: str, adapters: tuple[str, ...] = ("hci0",)) -> None:
        self.address = address
        self._loop = LoopThread("fake-bluez")
        self.fake = FakeBlueZ(address)
        try:
            self._loop.run(self.fake.start())
            self.call(lambda fake: self._add_adapters(fake, adapters))
        except BaseException:
            self._loop.close()
            raise

    @staticmethod
    def _add_adapters(fake: FakeBlueZ, names: tuple[str, ...]) -> None:
        for n, name in enumerate(names):
            fake.add_adapter(name, f"00:1A:7D:DA:71:{n:02X}")

    def call(self, fn: Callable[[FakeBlueZ], T]) -> T:
        """Run ``fn(fake)`` on the fake's loop (its bus is not thread-safe), then drain."""

        async def on_loop() -> T:
            result = fn(self.fake)
            await self.fake.drain()
            return result

        return self._loop.run(on_loop())

    def play(self, scenario: Scenario | str | Path, *, speed: float = 1.0) -> int:
        """Replay a BLE scenario (``simulators/scenarios/ble-*.toml``); blocks until done."""
        if not isinstance(scenario, Scenario):
            scenario = Scenario.load(Path(scenario))
        return self._loop.run(play(self.fake, scenario, speed=speed), timeout=None)

    def close(self) -> None:
        try:
            self._loop.run(self.fake.close())
        finally:
            self._loop.close()


class TillPrinter:
    """A fake network printer on a loopback port and a till that prints to any port."""

    def __init__(self) -> None:
        self._loop = LoopThread("till-printer")
        self.printer = FakePrinter()
        try:
            self.port: int = self._loop.run(self.printer.start())
        except BaseException:
            self._loop.close()
            raise

    def print(
        self, data: bytes | None = None, *, port: int | None = None, timeout: float = 10.0
    ) -> bytes:
        """The till sends one job (default: a receipt) to ``port`` (default: the printer).

        Returns the bytes the other side answered (status replies).
        """

        async def job() -> bytes:
            async with asyncio.timeout(timeout):
                return await send_job("127.0.0.1", port or self.port, data or receipt())

        return self._loop.run(job(), timeout=None)

    def jobs(self, count: int, timeout: float = 10.0) -> list[bytes]:
        """Wait until the printer has ``count`` complete jobs; all its jobs, in order."""

        async def wait() -> list[bytes]:
            async with asyncio.timeout(timeout):
                return await self.printer.wait_jobs(count)

        return self._loop.run(wait(), timeout=None)

    def close(self) -> None:
        try:
            self._loop.run(self.printer.close())
        finally:
            self._loop.close()
