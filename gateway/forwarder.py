"""The forwarder: committed events from the outbox to the broker, in batches.

It keeps its own in-flight window of batches (never more than ``inflight_window`` handed
to the client), publishes each batch once per process, and settles it on the broker's
verdict: a success PUBACK deletes the rows; a failure reason code moves them to the
dead-letter table.  A batch without a verdict stays in the database and is sent again by
the next process: delivery is at least once, and duplicates are bounded by the window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

from gateway.config import MqttConfig
from gateway.events import batch_payload, batch_prefix
from gateway.metrics import Metrics
from gateway.outbox import Batch, Outbox
from gateway.ports import Publisher, Verdict

log = logging.getLogger(__name__)


class Forwarder:
    def __init__(
        self,
        outbox: Outbox,
        publisher: Publisher,
        cfg: MqttConfig,
        *,
        store: str,
        device: str,
        topic: str,
        metrics: Metrics,
        now: Callable[[], float] = time.time,
        on_latency: Callable[[list[float]], None] | None = None,
    ) -> None:
        self.outbox = outbox
        self.publisher = publisher
        self.cfg = cfg
        self.store = store
        self.device = device
        self.topic = topic
        self.metrics = metrics
        self.now = now
        self.on_latency = on_latency
        self.last_progress = time.monotonic()
        self._window = asyncio.Semaphore(cfg.inflight_window)
        self._settling: set[asyncio.Task[None]] = set()
        self._queued: deque[Batch] = deque()  # fetched, not yet handed to the client
        self._cursor = 0  # the highest seq fetched
        self._published = 0  # the highest seq handed to the client

    def discard_prefetched(self) -> None:
        """Forget fetched batches not yet published (after an erasure rewrote the rows):
        the next fetch reads them again from the database."""
        self._queued.clear()
        self._cursor = self._published

    async def run(self) -> None:
        prefix = batch_prefix(self.store, self.device, self.outbox.stream)
        queued = self._queued
        while True:
            await self._window.acquire()
            while not queued:
                self.outbox.new_data.clear()
                after = self._cursor
                batches = await self.outbox.fetch(
                    after,
                    self.cfg.inflight_window,
                    self.cfg.batch_max_events,
                    self.cfg.batch_max_bytes,
                )
                if self._cursor != after:
                    continue  # discarded while fetching: fetch again
                if batches:
                    queued.extend(batches)
                    self._cursor = batches[-1].hi
                    break
                await self.outbox.new_data.wait()
            batch = queued.popleft()
            self._published = batch.hi
            verdict = self.publisher.publish(self.topic, batch_payload(prefix, batch.bodies))
            task = asyncio.create_task(self._settle(batch, verdict), name=f"settle:{batch.lo}")
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    async def _settle(self, batch: Batch, verdict_fut: Awaitable[Verdict]) -> None:
        try:
            verdict = await verdict_fut
        except asyncio.CancelledError:
            self._window.release()
            raise
        self._window.release()
        self.last_progress = time.monotonic()
        if verdict.ok:
            now = self.now()
            if self.on_latency is not None:
                self.on_latency([now - c for c in batch.created])
            self.metrics.inc("events_forwarded_total", batch.count)
            self.metrics.inc("batches_published_total")
            self.metrics.set("last_publish_at", now)
            await self.outbox.ack(batch)
            return
        log.error(
            "broker refused batch seq %d-%d (%d events): %s (reason code %d); "
            "moved to dead letters",
            batch.lo,
            batch.hi,
            batch.count,
            verdict.reason,
            verdict.reason_code,
        )
        self.metrics.inc("events_dead_lettered_total", batch.count)
        self.metrics.error("forwarder", f"publish refused: {verdict.reason}")
        await self.outbox.dead_letter(batch, verdict.reason_code, verdict.reason)

    @property
    def in_flight(self) -> int:
        return len(self._settling)

    @property
    def queued(self) -> int:
        """Batches fetched and not yet handed to the client."""
        return len(self._queued)

    async def drain(self, within: float) -> bool:
        """Wait up to ``within`` seconds for in-flight batches to settle (shutdown)."""
        if not self._settling:
            return True
        _done, pending = await asyncio.wait(set(self._settling), timeout=within)
        return not pending

    async def cancel(self) -> None:
        for task in list(self._settling):
            task.cancel()
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
