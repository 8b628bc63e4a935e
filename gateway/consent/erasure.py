"""Erasure: a withdrawal removes every trace of a subject the gateway still holds.

    Eraser.erase(subjects)
      1. in memory, at once: the registry record (a tombstone stays), held readings,
         then every ``hooks`` callback (sources clear presence and debounce state)
      2. one outbox write (``erase_rows``): the subject's events are cut out of every
         chunk and dead-letter row (a row left empty is deleted), its held rows and its
         consent row are deleted, and ``erasure_log`` records (pseudonym, time) only
      3. after that commit: every ``after_commit`` callback (the forwarder drops the
         batches it prefetched), then ``PRAGMA wal_checkpoint(TRUNCATE)``, which never
         waits for a reader (``busy_timeout`` 0 for the call)

The outbox runs with ``secure_delete = ON``, so deleted cells and freed pages are
zeroed; the checkpoint copies those pages into the database file and truncates the WAL,
which still held the old page images.  After it, the pseudonym's bytes are gone from both
files except the erasure log's own row.

Another process reading the buffer (a technician's sqlite3 shell, a backup) holds a
snapshot: the checkpoint cannot copy past it nor truncate the WAL until it ends.  The
rows are gone at once for everyone else, and the writer does not wait (waiting was 5 s
of ``busy_timeout`` per attempt, with every commit stuck behind it); the old page images
stay until the reader leaves.  That is recorded (``meta.erased_in_wal_since``, shown by
``status`` and /healthz with the reason) and the checkpoint is retried from the daemon's
housekeeping with backoff until it gets through.

The SQL (``erase_rows``, the erasure log, the checkpoint, ``erase_offline`` for erasure
without the daemon) is the buffer's: gateway/buffer/erasure_store.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from gateway.buffer.erasure_store import Erased, ErasureStore
from gateway.consent.registry import ConsentRegistry
from gateway.identity.clock import clock_is_set
from gateway.identity.tokens import APP_CLOCK_SKEW_S, MAX_APP_TOKEN_LIFETIME_S
from gateway.observe.metrics import Metrics

if TYPE_CHECKING:
    from gateway.buffer.outbox import Outbox
    from gateway.consent.policy import HoldQueue

log = logging.getLogger(__name__)

WAL_WAIT_WHY = (
    "another process holds a read transaction on the buffer (a sqlite3 shell, a backup): "
    "the old page images of the erased rows stay in the WAL and database file until it "
    "ends; the checkpoint is retried in the background"
)
RETRY_MIN_S, RETRY_MAX_S = 0.5, 5.0


class Eraser:
    """Erases subjects everywhere the gateway holds them (see the module docstring).

    ``hooks``: called with each erased subject before the database write, on the event
    loop; sources append their "forget this subject" method.  ``after_commit``: called
    once after the write commits (the forwarder's ``discard_prefetched``).
    """

    def __init__(
        self,
        outbox: Outbox,
        registry: ConsentRegistry,
        metrics: Metrics,
        *,
        hold: HoldQueue | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.outbox = outbox
        self.store = ErasureStore(outbox)
        self.registry = registry
        self.metrics = metrics
        self.hold = hold
        self.now = now
        self.hooks: list[Callable[[str], None]] = []
        self.after_commit: list[Callable[[], None]] = []
        self.erased_in_wal_since: float | None = None  # see the module docstring
        self._retry_at = 0.0
        self._retry_delay = RETRY_MIN_S

    def forget_in_memory(self, subjects: Iterable[str], now: float) -> None:
        """Step 1, synchronous: from here on the gate refuses the subjects."""
        for subject in subjects:
            self.registry.erase(subject, now)
            if self.hold is not None:
                self.hold.forget(subject)
            for hook in self.hooks:
                try:
                    hook(subject)
                except Exception:
                    log.exception("erasure hook %r failed", hook)

    async def load_pending(self) -> None:
        """At start: an erasure whose checkpoint a reader blocked before the restart."""
        since = await self.store.erased_in_wal_since()
        if since is not None:
            await self._wait_for_checkpoint(since)

    async def _wait_for_checkpoint(self, since: float) -> None:
        if self.erased_in_wal_since is None:
            log.warning("erasure: %s", WAL_WAIT_WHY)
            self.metrics.inc("erasure_checkpoint_blocked_total")
        self.erased_in_wal_since = min(since, self.erased_in_wal_since or since)
        self.metrics.set("erased_in_wal_since", self.erased_in_wal_since)
        self._retry_delay = RETRY_MIN_S
        self._retry_at = time.monotonic() + self._retry_delay
        await self.store.mark_erased_in_wal(self.erased_in_wal_since)

    async def retry_checkpoint(self) -> bool:
        """Housekeeping: retry a blocked checkpoint, with backoff; True once it is done."""
        if self.erased_in_wal_since is None or time.monotonic() < self._retry_at:
            return False
        if not await self.store.checkpoint():
            self._retry_delay = min(RETRY_MAX_S, self._retry_delay * 2)
            self._retry_at = time.monotonic() + self._retry_delay
            return False
        waited = self.now() - self.erased_in_wal_since
        self.erased_in_wal_since = None
        self.metrics.set("erased_in_wal_since", 0)
        await self.store.mark_erased_in_wal(None)
        log.info("erasure: WAL checkpoint done after %.0f s; the erased bytes are gone", waited)
        return True

    async def prune_tombstones(self, now: float) -> int:
        """Forget withdrawals older than the longest an app token lives (contract §6).

        A tombstone stops token evidence from reviving a withdrawn subject; a token made
        before the withdrawal has expired once ``MAX_APP_TOKEN_LIFETIME_S`` (and the
        clock skew allowed) has passed, so the tombstone and its erasure-log row go then:
        the log stays as long as the withdrawals of one token lifetime, not for ever.
        Nothing is pruned while the clock is unset.  Returns the log rows deleted.
        """
        if not clock_is_set(now):
            return 0
        cutoff = now - MAX_APP_TOKEN_LIFETIME_S - APP_CLOCK_SKEW_S
        withdrawn = self.registry.withdrawn
        for subject in [s for s, at in withdrawn.items() if at < cutoff]:
            del withdrawn[subject]
        return await self.store.prune_log(cutoff)

    async def erase(self, subjects: Iterable[str]) -> Erased:
        """Erase the subjects; returns once the bytes are gone from the files."""
        batch = sorted(set(subjects))
        if not batch:
            return Erased()
        now = self.now()
        self.forget_in_memory(batch, now)
        result = await self.store.erase(batch, now)
        for callback in self.after_commit:
            try:
                callback()
            except Exception:
                log.exception("erasure callback %r failed", callback)
        if not await self.store.checkpoint():
            await self._wait_for_checkpoint(now)
        self.metrics.inc("erasures_total", len(batch))
        self.metrics.inc("erased_events_total", result.events + result.held)
        log.info(
            "erased %d subject(s): %d buffered event(s), %d held, %d consent record(s)",
            len(batch),
            result.events,
            result.held,
            result.consent,
        )
        return result
