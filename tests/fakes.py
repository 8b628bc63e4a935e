"""In-process fakes of the core's ports, for unit tests of the core only."""

from __future__ import annotations

import asyncio

from gateway.ports import Verdict


class FakePublisher:
    """Records publishes; the test settles each one with a verdict, in any order."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, asyncio.Future[Verdict]]] = []
        self.max_outstanding = 0
        self._connected = asyncio.Event()
        self._connected.set()

    async def start(self) -> None:
        return None

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False
    ) -> asyncio.Future[Verdict]:
        fut: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
        self.sent.append((topic, payload, fut))
        self.max_outstanding = max(self.max_outstanding, self.outstanding)
        return fut

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
