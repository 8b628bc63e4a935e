"""In-process fakes of the core's ports, for unit tests of the core only."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from gateway.ports import Verdict


class FakePublisher:
    """Records publishes; the test settles each one with a verdict, in any order."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, asyncio.Future[Verdict]]] = []
        self.max_outstanding = 0
        self.receive_maximum: int | None = None
        self.subscriptions: dict[str, Callable[[bytes], None]] = {}
        self._hooks: list[Callable[[], object]] = []
        self._connected = asyncio.Event()
        self._connected.set()

    async def start(self) -> None:
        for hook in self._hooks:
            hook()

    def subscribe(self, topic: str, callback: Callable[[bytes], None]) -> None:
        self.subscriptions[topic] = callback

    def on_connect(self, hook: Callable[[], object]) -> None:
        self._hooks.append(hook)

    def deliver(self, topic: str, payload: bytes) -> None:
        """A message from the broker on a subscribed topic."""
        self.subscriptions[topic](payload)

    @property
    def in_flight(self) -> int:
        return self.outstanding

    def max_payload(self, topic: str) -> int | None:
        return None

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False
    ) -> asyncio.Future[Verdict]:
        fut: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self.sent.append((topic, payload, fut))
        self.max_outstanding = max(self.max_outstanding, self.outstanding)
        return fut

    def settle_all(self, verdict: Verdict | None = None) -> None:
        """Settle every publish still waiting, with ``verdict`` (a success by default)."""
        for _, _, f in self.sent:
            if not f.done():
                f.set_result(verdict or Verdict(ok=True))

    @property
    def outstanding(self) -> int:
        return sum(1 for _, _, f in self.sent if not f.done())

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    async def close(self, *, graceful: bool = True) -> None:
        return None
