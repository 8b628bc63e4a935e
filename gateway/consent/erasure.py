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

``erase_rows`` takes a plain sqlite3 connection, so erasure also works without the
daemon (``erase_offline``); running it twice changes nothing more (idempotent).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.buffer.outbox import ERASED_IN_WAL_KEY
from gateway.buffer.transaction import transaction
from gateway.consent.registry import ConsentRegistry
from gateway.identity.clock import clock_is_set
from gateway.identity.tokens import APP_CLOCK_SKEW_S, MAX_APP_TOKEN_LIFETIME_S
from gateway.observe.metrics import Metrics

if TYPE_CHECKING:
    from gateway.buffer.outbox import Outbox
    from gateway.consent.policy import HoldQueue

log = logging.getLogger(__name__)

_decoder = json.JSONDecoder()


@dataclass(slots=True)
class Erased:
    """What one erasure removed from the database."""

    events: int = 0
    rows_rewritten: int = 0
    rows_deleted: int = 0
    held: int = 0
    consent: int = 0
    erased_in_wal: bool = False  # a reader blocked the checkpoint: old pages still wait


def split_body(body: str) -> list[tuple[str, object]]:
    """A chunk body (event objects joined by ",") as (exact text, parsed) per event."""
    out: list[tuple[str, object]] = []
    i, end = 0, len(body)
    while i < end:
        obj, j = _decoder.raw_decode(body, i)
        out.append((body[i:j], obj))
        if j < end and body[j] != ",":
            raise ValueError(f"chunk body: expected ',' at {j}")
        i = j + 1
    return out


def _subject_of(event: object) -> str | None:
    if isinstance(event, dict):
        subject = event.get("subject")
        return subject if isinstance(subject, str) else None
    return None


def _erase_from(
    conn: sqlite3.Connection, table: str, subjects: frozenset[str], out: Erased
) -> set[str]:
    """Cut the subjects' events out of ``table`` in one pass; returns the subjects found.

    One scan of the (small) ``subjects`` column per erasure, whatever the number of
    subjects: a query per subject made a snapshot of thousands of withdrawals quadratic.
    """
    found: set[str] = set()
    doomed = [
        int(lo)
        for lo, names in conn.execute(
            f"SELECT lo, subjects FROM {table} WHERE subjects != ''"  # noqa: S608
        )
        if not subjects.isdisjoint(str(names).split(" "))
    ]
    for lo in doomed:
        (body,) = conn.execute(f"SELECT body FROM {table} WHERE lo = ?", (lo,)).fetchone()  # noqa: S608
        try:
            events = split_body(body)
        except ValueError:
            # Unreadable: the row names a subject, so none of it may stay.
            log.error("erasure: %s row %d is not a list of events; deleted whole", table, lo)
            conn.execute(f"DELETE FROM {table} WHERE lo = ?", (lo,))  # noqa: S608
            out.rows_deleted += 1
            found.update(subjects)  # which of them it held is unknown: all count as found
            continue
        kept = []
        for text, ev in events:
            subject = _subject_of(ev)
            if subject in subjects:
                found.add(subject)
            else:
                kept.append((text, ev))
        out.events += len(events) - len(kept)
        if not kept:
            conn.execute(f"DELETE FROM {table} WHERE lo = ?", (lo,))  # noqa: S608
            out.rows_deleted += 1
            continue
        remaining = dict.fromkeys(s for _, ev in kept if (s := _subject_of(ev)) is not None)
        conn.execute(
            f"UPDATE {table} SET n = ?, subjects = ?, body = ? WHERE lo = ?",  # noqa: S608
            (len(kept), " ".join(remaining), ",".join(text for text, _ in kept), lo),
        )
        out.rows_rewritten += 1
    return found


def erase_rows(conn: sqlite3.Connection, subjects: Sequence[str], now: float) -> Erased:
    """Remove the subjects' events, held readings and consent rows; log the erasure.

    Runs inside the caller's transaction (an outbox write).  Idempotent: a second run
    finds nothing and leaves the erasure log's time as it was.  Each table is read once
    per call, and the log and consent rows are found by key: linear in the subjects.
    """
    out = Erased()
    batch = frozenset(subjects)
    if not batch:
        return out
    found: set[str] = set()
    for table in ("chunks", "dead_letters"):
        found |= _erase_from(conn, table, batch, out)
    held = [
        (int(row_id), str(subject))
        for row_id, subject in conn.execute("SELECT id, subject FROM held")
        if subject in batch
    ]
    conn.executemany("DELETE FROM held WHERE id = ?", [(row_id,) for row_id, _ in held])
    out.held = len(held)
    found.update(subject for _, subject in held)
    for subject in sorted(batch):
        if conn.execute("DELETE FROM consent WHERE subject = ?", (subject,)).rowcount:
            out.consent += 1
            found.add(subject)
        if subject in found:
            conn.execute(
                "INSERT INTO erasure_log(subject, erased_at) VALUES (?, ?)"
                " ON CONFLICT(subject) DO UPDATE SET erased_at = excluded.erased_at",
                (subject, now),
            )
        else:  # nothing held: a first erasure is logged, a repeated one changes nothing
            conn.execute(
                "INSERT OR IGNORE INTO erasure_log(subject, erased_at) VALUES (?, ?)",
                (subject, now),
            )
    return out


def prune_erasure_log(conn: sqlite3.Connection, before: float) -> int:
    """Delete the log rows of erasures older than ``before`` (see ``Eraser.prune``)."""
    return conn.execute("DELETE FROM erasure_log WHERE erased_at < ?", (before,)).rowcount


WAL_WAIT_WHY = (
    "another process holds a read transaction on the buffer (a sqlite3 shell, a backup): "
    "the old page images of the erased rows stay in the WAL and database file until it "
    "ends; the checkpoint is retried in the background"
)
RETRY_MIN_S, RETRY_MAX_S = 0.5, 5.0


def checkpoint(conn: sqlite3.Connection) -> bool:
    """Copy the WAL into the database and truncate it; False if a reader blocked it.

    Never waits: ``busy_timeout`` is 0 for the call (a reader's snapshot would otherwise
    hold the caller, the writer thread, for the whole timeout).
    """
    (timeout,) = conn.execute("PRAGMA busy_timeout").fetchone()
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        busy, _log_frames, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(timeout)}")
    return int(busy) == 0


def mark_erased_in_wal(conn: sqlite3.Connection, since: float | None) -> None:
    """Record (or, with None, clear) that erased bytes wait for a checkpoint."""
    if since is None:
        conn.execute("DELETE FROM meta WHERE key = ?", (ERASED_IN_WAL_KEY,))
    else:
        conn.execute(
            "INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)", (ERASED_IN_WAL_KEY, str(since))
        )


def _erased_in_wal_since(conn: sqlite3.Connection) -> float | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (ERASED_IN_WAL_KEY,)).fetchone()
    return float(row[0]) if row else None


def erase_offline(db_path: Path, subjects: Sequence[str], now: float | None = None) -> Erased:
    """Erase subjects from a buffer database with the daemon stopped (one transaction)."""
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=30)
    try:
        conn.execute("PRAGMA secure_delete = ON")
        with transaction(conn):
            out = erase_rows(conn, subjects, time.time() if now is None else now)
        if not checkpoint(conn):  # a reader: the daemon retries it at its next start
            with transaction(conn):
                mark_erased_in_wal(conn, time.time() if now is None else now)
            out.erased_in_wal = True
        return out
    finally:
        conn.close()


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
        since = await self.outbox.read(_erased_in_wal_since)
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
        await self.outbox.write(
            lambda c: mark_erased_in_wal(c, self.erased_in_wal_since), invalidates=False
        )

    async def retry_checkpoint(self) -> bool:
        """Housekeeping: retry a blocked checkpoint, with backoff; True once it is done."""
        if self.erased_in_wal_since is None or time.monotonic() < self._retry_at:
            return False
        if not await self.outbox.read(checkpoint):
            self._retry_delay = min(RETRY_MAX_S, self._retry_delay * 2)
            self._retry_at = time.monotonic() + self._retry_delay
            return False
        waited = self.now() - self.erased_in_wal_since
        self.erased_in_wal_since = None
        self.metrics.set("erased_in_wal_since", 0)
        await self.outbox.write(lambda c: mark_erased_in_wal(c, None), invalidates=False)
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
        return await self.outbox.write(lambda c: prune_erasure_log(c, cutoff), invalidates=False)

    async def erase(self, subjects: Iterable[str]) -> Erased:
        """Erase the subjects; returns once the bytes are gone from the files."""
        batch = sorted(set(subjects))
        if not batch:
            return Erased()
        now = self.now()
        self.forget_in_memory(batch, now)
        result = await self.outbox.write(lambda c: erase_rows(c, batch, now))
        for callback in self.after_commit:
            try:
                callback()
            except Exception:
                log.exception("erasure callback %r failed", callback)
        if not await self.outbox.read(checkpoint):
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
