"""The forwarder: committed events from the outbox to the broker, in batches.

The outbox is the only queue.  The forwarder hands a batch to the client only while the
link is up, and never more than its window (``inflight_window``, capped by the broker's
Receive Maximum) at once; it settles each batch on the broker's verdict: a success PUBACK
deletes the rows, a failure reason code moves them to the dead-letter table.  When the
link drops, the client abandons whatever waits for a PUBACK (its rows stay); after the
reconnect the forwarder reads the outbox again from its start and sends what is there.
So a withdrawal reaches every event that has not left the gateway: erasure deletes the
rows, and a batch fetched before it was applied is never sent after it.  Delivery is at
least once, and duplicates are bounded by the window.

Batches fit the broker: at most ``batch_max_events`` events and ``batch_max_bytes``
bytes, and no larger than the broker's announced Maximum Packet Size.  A stored chunk
larger than that (stored under larger limits, or for a broker with a larger maximum) is
sent in parts; its rows go when every part is acknowledged.

Seqs a power cut skipped (``Outbox.skipped``, declared at the restart) go to the central
as a batch of their own, with no events and ``skipped`` (contract README, "Delivery
semantics"), sent first after each connect while the outbox holds a declaration, whatever
the traffic, so a quiet box declares too.  The outbox forgets the ranges only when such a
batch got a success PUBACK; an abandoned one is sent again after the reconnect, a refused
one a minute later (``DECLARE_RETRY_S``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gateway.buffer.erasure_store import split_body
from gateway.buffer.outbox import Batch, Outbox
from gateway.config.sections import MqttConfig
from gateway.contract.events import batch_payload, batch_prefix, skipped_payload
from gateway.observe.metrics import Metrics
from gateway.ports import PACKET_TOO_LARGE, Publisher, Verdict

log = logging.getLogger(__name__)

ENVELOPE = 128  # bytes of a batch around its events (store, device, stream)
DECLARE_RETRY_S = 60.0  # a refused declaration of skipped seqs is sent again after this


async def _abandoned() -> Verdict:
    return Verdict(ok=False, reason="a withdrawal made the rest of the batch stale", abandoned=True)


@dataclass(slots=True)
class _Sending:
    """One batch on its way: the verdicts of its parts, as they come."""

    batch: Batch
    parts: int
    verdicts: list[Verdict] = field(default_factory=list)


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
        self._wire = 0  # messages handed to the client without a verdict yet
        self._freed = asyncio.Event()
        self._settling: set[asyncio.Task[None]] = set()
        self._queued: deque[Batch] = deque()  # fetched, not yet handed to the client
        self._cursor = 0  # the highest seq fetched
        self._published = 0  # the highest seq handed to the client
        self._generation = 0  # bumped by every withdrawal: older fetches are stale
        self._resend = False  # a batch came back abandoned: read the outbox again
        self._withdrawals = 0  # applied since the last log line
        self._declaring = False  # a declaration of skipped seqs waits for its verdict
        self._declare_at = 0.0  # monotonic: not before (after a refusal)

    # -- limits ------------------------------------------------------------------------

    @property
    def window(self) -> int:
        """Messages on the wire at most: ours, capped by the broker's Receive Maximum."""
        receive_max = self.publisher.receive_maximum
        return min(self.cfg.inflight_window, receive_max or self.cfg.inflight_window)

    @property
    def max_bytes(self) -> int:
        """The largest batch payload: ours, capped by the broker's Maximum Packet Size."""
        broker = self.publisher.max_payload(self.topic)
        if broker is None:
            return self.cfg.batch_max_bytes
        return min(self.cfg.batch_max_bytes, broker)

    # -- erasure -------------------------------------------------------------------------

    def withdrawn(self, subject: str) -> None:
        """An erasure hook, called as a withdrawal is applied (before the rows go): what
        was fetched before now is never sent."""
        if not self._withdrawals:  # one line per erasure, however many subjects
            asyncio.get_running_loop().call_soon(self._log_withdrawals)
        self._withdrawals += 1
        self._generation += 1
        self.discard_prefetched()

    def _log_withdrawals(self) -> None:
        log.info(
            "withdrawal applied (%d subject(s)): batches fetched before it are dropped",
            self._withdrawals,
        )
        self._withdrawals = 0

    def discard_prefetched(self) -> None:
        """Forget fetched batches not yet published (after an erasure rewrote the rows):
        the next fetch reads them again from the database."""
        self._queued.clear()
        self._cursor = self._published

    # -- the loop ----------------------------------------------------------------------

    async def run(self) -> None:
        prefix = batch_prefix(self.store, self.device, self.outbox.stream)
        queued = self._queued
        while True:
            await self.publisher.wait_connected()
            self.metrics.set("forwarder_window", self.window)
            self.metrics.set("forwarder_batch_max_bytes", self.max_bytes)
            if self._resend:
                await self._restart()
                continue
            await self._slot()
            if self._should_declare():
                self._declare(prefix)
                continue
            while not queued and not self._should_declare() and not self._resend:
                self.outbox.new_data.clear()
                after, generation = self._cursor, self._generation
                batches = await self.outbox.fetch(
                    after, self.window, self.cfg.batch_max_events, self.max_bytes
                )
                if self._cursor != after or self._generation != generation:
                    continue  # a withdrawal or a restart meanwhile: fetch again
                if batches:
                    queued.extend(batches)
                    self._cursor = batches[-1].hi
                    break
                await self.outbox.new_data.wait()
            if self._resend or not self.publisher.connected or not queued:
                continue  # (no batch: a declaration is due, sent above)
            await self._send(prefix, queued.popleft())

    async def _slot(self) -> None:
        """Wait until the window has room for one more message."""
        while self._wire >= self.window:
            self._freed.clear()
            await self._freed.wait()

    async def _send(self, prefix: bytes, batch: Batch) -> None:
        self._published = batch.hi
        parts = self._parts(batch)
        sending = _Sending(batch, len(parts))
        generation = self._generation
        for i, bodies in enumerate(parts):
            if i:
                await self._slot()
            if self._generation != generation:
                # A withdrawal came while the batch went out in parts: the rest is stale.
                # The batch counts as abandoned; the outbox is read again once it settles.
                for _ in parts[i:]:
                    self._spawn(sending, _abandoned())
                return
            self._spawn(sending, self.publisher.publish(self.topic, batch_payload(prefix, bodies)))

    def _should_declare(self) -> bool:
        return (
            not self._declaring
            and bool(self.outbox.skipped)
            and time.monotonic() >= self._declare_at
        )

    def _declare(self, prefix: bytes) -> None:
        """Publish the outbox's skipped seq ranges in a batch with no events."""
        ranges = self.outbox.skipped
        self._declaring = True
        self._wire += 1
        verdict = self.publisher.publish(self.topic, skipped_payload(prefix, ranges))
        task = asyncio.create_task(self._settle_declaration(ranges, verdict), name="settle:skipped")
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle_declaration(
        self, ranges: list[tuple[int, int]], verdict_fut: Awaitable[Verdict]
    ) -> None:
        try:
            verdict = await verdict_fut
        finally:
            self._wire -= 1
            self._freed.set()
            self._declaring = False
        if verdict.ok:
            log.info("declared %d skipped seq range(s) to the central: %s", len(ranges), ranges)
            await self.outbox.skipped_sent(ranges)
            return
        # the loop may wait for new events: wake it to send the declaration again, once
        # connected again (abandoned) or after DECLARE_RETRY_S (refused)
        wake = self.outbox.new_data.set
        if verdict.abandoned:
            wake()
        else:
            self._declare_at = time.monotonic() + DECLARE_RETRY_S
            asyncio.get_running_loop().call_later(DECLARE_RETRY_S, wake)
            log.error(
                "broker refused the declaration of skipped seqs %s: %s (reason code %d); "
                "sent again in %.0f s",
                ranges,
                verdict.reason,
                verdict.reason_code,
                DECLARE_RETRY_S,
            )

    def _spawn(self, sending: _Sending, verdict: Awaitable[Verdict]) -> None:
        self._wire += 1
        name = f"settle:{sending.batch.lo}"
        task = asyncio.create_task(self._settle(sending, verdict), name=name)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    def _parts(self, batch: Batch) -> list[list[str]]:
        """The batch's events in payloads that fit the limits in force now."""
        max_events, max_bytes = self.cfg.batch_max_events, self.max_bytes - ENVELOPE
        if batch.count <= max_events and batch.nbytes <= max_bytes:
            return [batch.bodies]
        self.metrics.inc("batches_split_total")
        parts: list[list[str]] = []
        part: list[str] = []
        size = 0
        for body in batch.bodies:
            for text, _event in split_body(body):
                n = len(text.encode()) + 1
                if part and (len(part) >= max_events or size + n > max_bytes):
                    parts.append(part)
                    part, size = [], 0
                part.append(text)
                size += n
        if part:
            parts.append(part)
        return parts

    async def _restart(self) -> None:
        """After an abandoned batch: let every verdict come in (the rest are abandoned
        with the link, or acknowledged), then read the outbox again from its start."""
        while self._settling:
            await asyncio.gather(*list(self._settling), return_exceptions=True)
        self._resend = False
        self._queued.clear()
        self._cursor = self._published = 0

    async def _settle(self, sending: _Sending, verdict_fut: Awaitable[Verdict]) -> None:
        try:
            verdict = await verdict_fut
        finally:
            self._wire -= 1
            self._freed.set()
        self.last_progress = time.monotonic()
        sending.verdicts.append(verdict)
        if len(sending.verdicts) < sending.parts:
            return
        batch = sending.batch
        if any(v.abandoned for v in sending.verdicts):
            self._resend = True  # its rows stay; sent again after the reconnect
            self.metrics.inc("batches_abandoned_total")
            # the loop may wait for new events: wake it, or a quiet box holds the batch
            # until its next event (it waits for the link first, then reads again)
            self.outbox.new_data.set()
            return
        failed = [v for v in sending.verdicts if not v.ok]
        if not failed:
            now = self.now()
            if self.on_latency is not None:
                self.on_latency([now - c for c in batch.created])
            self.metrics.inc("events_forwarded_total", batch.count)
            self.metrics.inc("batches_published_total")
            self.metrics.set("last_publish_at", now)
            await self.outbox.ack(batch)
            return
        verdict = failed[0]
        log.error(
            "broker refused batch seq %d-%d (%d events): %s (reason code %d); "
            "moved to dead letters",
            batch.lo,
            batch.hi,
            batch.count,
            verdict.reason,
            verdict.reason_code,
        )
        if verdict.reason_code == PACKET_TOO_LARGE:
            self.metrics.inc("batches_too_large_total")
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
