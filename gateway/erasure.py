"""Erasure: a withdrawal removes every trace of a subject the gateway still holds.

    Eraser.erase(subjects)
      1. in memory, at once: the registry record (a tombstone stays), held readings,
         then every ``hooks`` callback (sources clear presence and debounce state)
      2. one outbox write (``erase_rows``): the subject's events are cut out of every
         chunk and dead-letter row (a row left empty is deleted), its held rows and its
         consent row are deleted, and ``erasure_log`` records (pseudonym, time) only
      3. after that commit: every ``after_commit`` callback (the forwarder drops the
         batches it prefetched), then ``PRAGMA wal_checkpoint(TRUNCATE)``

The outbox runs with ``secure_delete = ON``, so deleted cells and freed pages are
zeroed; the checkpoint copies those pages into the database file and truncates the WAL,
which still held the old page images.  After it, the pseudonym's bytes are gone from both
files except the erasure log's own row.

``erase_rows`` takes a plain sqlite3 connection, so erasure also works without the
daemon (``erase_offline``); running it twice changes nothing more (idempotent).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.consent import ConsentRegistry
from gateway.metrics import Metrics

if TYPE_CHECKING:
    from gateway.outbox import Outbox
    from gateway.policy import HoldQueue

log = logging.getLogger(__name__)

_decoder = json.JSONDecoder()
CHECKPOINT_ATTEMPTS = 5


@dataclass(slots=True)
class Erased:
    """What one erasure removed from the database."""

    events: int = 0
    rows_rewritten: int = 0
    rows_deleted: int = 0
    held: int = 0
    consent: int = 0


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


def _erase_from(conn: sqlite3.Connection, table: str, subject: str, out: Erased) -> None:
    rows = conn.execute(
        f"SELECT lo, subjects, body FROM {table} WHERE instr(subjects, ?) > 0",  # noqa: S608
        (subject,),
    ).fetchall()
    for lo, subjects, body in rows:
        if subject not in str(subjects).split(" "):
            continue  # a longer pseudonym containing this one
        try:
            events = split_body(body)
        except ValueError:
            # Unreadable: the row names the subject, so none of it may stay.
            log.error("erasure: %s row %d is not a list of events; deleted whole", table, lo)
            conn.execute(f"DELETE FROM {table} WHERE lo = ?", (lo,))  # noqa: S608
            out.rows_deleted += 1
            continue
        kept = [(text, ev) for text, ev in events if _subject_of(ev) != subject]
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


def erase_rows(conn: sqlite3.Connection, subjects: Sequence[str], now: float) -> Erased:
    """Remove the subjects' events, held readings and consent rows; log the erasure.

    Runs inside the caller's transaction (an outbox write).  Idempotent: a second run
    finds nothing and leaves the erasure log's time as it was.
    """
    out = Erased()
    for subject in subjects:
        before = out.events + out.rows_deleted
        for table in ("chunks", "dead_letters"):
            _erase_from(conn, table, subject, out)
        held = conn.execute("DELETE FROM held WHERE subject = ?", (subject,)).rowcount
        consent = conn.execute("DELETE FROM consent WHERE subject = ?", (subject,)).rowcount
        out.held += held
        out.consent += consent
        found = out.events + out.rows_deleted > before or held or consent
        logged = conn.execute("SELECT 1 FROM erasure_log WHERE subject = ?", (subject,)).fetchone()
        if found or not logged:
            conn.execute("DELETE FROM erasure_log WHERE subject = ?", (subject,))
            conn.execute(
                "INSERT INTO erasure_log(subject, erased_at) VALUES (?, ?)", (subject, now)
            )
    return out


def checkpoint(conn: sqlite3.Connection) -> bool:
    """Copy the WAL into the database and truncate it; False if a reader blocked it."""
    busy, _log_frames, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    return int(busy) == 0


def erase_offline(db_path: Path, subjects: Sequence[str], now: float | None = None) -> Erased:
    """Erase subjects from a buffer database with the daemon stopped (one transaction)."""
    conn = sqlite3.connect(db_path, isolation_level=None, timeout=30)
    try:
        conn.execute("PRAGMA secure_delete = ON")
        conn.execute("BEGIN IMMEDIATE")
        try:
            out = erase_rows(conn, subjects, time.time() if now is None else now)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        checkpoint(conn)
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
        for attempt in range(CHECKPOINT_ATTEMPTS):
            if await self.outbox.read(checkpoint):
                break
            await asyncio.sleep(0.05 * (attempt + 1))
        else:
            log.error(
                "erasure: WAL checkpoint blocked by a reader %d times; the old pages stay "
                "in the WAL until the next checkpoint (stop other readers of the buffer)",
                CHECKPOINT_ATTEMPTS,
            )
            self.metrics.inc("erasure_checkpoint_blocked_total")
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
