"""Erasure in the buffer database: a subject's rows cut out of every table in one
transaction, the erasure log (``erasure_log``), and the WAL checkpoint that clears the
old page images (the why and the order: gateway/consent/erasure.py).

``erase_rows`` takes a plain sqlite3 connection, so erasure also works without the
daemon (``erase_offline``); running it twice changes nothing more (idempotent).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.buffer.consent_store import delete_row
from gateway.buffer.held_store import erase_subjects
from gateway.buffer.outbox import ERASED_IN_WAL_KEY
from gateway.buffer.store import Store
from gateway.buffer.transaction import transaction

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
    held = erase_subjects(conn, batch)
    out.held = len(held)
    found.update(held)
    for subject in sorted(batch):
        if delete_row(conn, subject):
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
    """Delete the log rows of erasures older than ``before``."""
    return int(conn.execute("DELETE FROM erasure_log WHERE erased_at < ?", (before,)).rowcount)


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


def erased_in_wal_since(conn: sqlite3.Connection) -> float | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (ERASED_IN_WAL_KEY,)).fetchone()
    return float(row[0]) if row else None


def count_events(conn: sqlite3.Connection, subject: str) -> int:
    """The subject's events in the buffer, dead letters aside (chunks name their subjects)."""
    n = 0
    for names, body in conn.execute("SELECT subjects, body FROM chunks WHERE subjects != ''"):
        if subject in str(names).split(" "):
            n += sum(
                1
                for _, event in split_body(str(body))
                if isinstance(event, dict) and event.get("subject") == subject
            )
    return n


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


class ErasureStore(Store):
    def erase(self, subjects: Sequence[str], now: float) -> asyncio.Future[Erased]:
        """One write that may delete events not yet fetched: the tail cache is emptied."""
        batch = list(subjects)
        return self._write(lambda c: erase_rows(c, batch, now), invalidates=True)

    def prune_log(self, before: float) -> asyncio.Future[int]:
        return self._write(lambda c: prune_erasure_log(c, before), invalidates=False)

    def checkpoint(self) -> asyncio.Future[bool]:
        """``PRAGMA wal_checkpoint(TRUNCATE)`` after the window's rows are in the
        database; False if a reader blocked it."""
        return self._read(checkpoint)

    def mark_erased_in_wal(self, since: float | None) -> asyncio.Future[None]:
        return self._write(lambda c: mark_erased_in_wal(c, since), invalidates=False)

    def erased_in_wal_since(self) -> asyncio.Future[float | None]:
        return self._read(erased_in_wal_since)

    def count_events(self, subject: str) -> asyncio.Future[int]:
        return self._read(lambda c: count_events(c, subject))
