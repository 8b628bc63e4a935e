"""The consent registry's rows (table ``consent``) and the consent sync cursor (``meta``).

The registry (gateway/consent/registry.py) lives in memory; this is its copy for
restarts.  A row is (subject, purposes as a JSON list, expires, source, updated_at).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.buffer.store import Store

ConsentRow = tuple[str, str, float | None, str, float]
CURSOR_KEY = "consent_cursor"  # meta: the registry's opaque cursor, as it sent it


@dataclass(frozen=True, slots=True)
class ConsentSnapshot:
    """What a start reads back: the consent rows, and the erasure log's (subject,
    erased_at) from which the registry rebuilds its tombstones."""

    rows: list[ConsentRow]
    erasures: list[tuple[str, float]]


def save_rows(
    conn: sqlite3.Connection, rows: Sequence[ConsentRow], removed: Sequence[str] = ()
) -> None:
    """Insert or replace ``rows``, delete the rows of ``removed`` (in the caller's
    transaction)."""
    conn.executemany(
        "INSERT OR REPLACE INTO consent(subject, purposes, expires, source, updated_at)"
        " VALUES (?, ?, ?, ?, ?)",
        rows,
    )
    delete_rows(conn, removed)


def delete_rows(conn: sqlite3.Connection, subjects: Sequence[str]) -> None:
    conn.executemany("DELETE FROM consent WHERE subject = ?", [(s,) for s in subjects])


def delete_row(conn: sqlite3.Connection, subject: str) -> bool:
    """Delete one subject's row; True if it had one (erasure counts them)."""
    return bool(conn.execute("DELETE FROM consent WHERE subject = ?", (subject,)).rowcount)


def load_rows(conn: sqlite3.Connection) -> ConsentSnapshot:
    rows: list[ConsentRow] = conn.execute(
        "SELECT subject, purposes, expires, source, updated_at FROM consent"
    ).fetchall()
    has_log = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'erasure_log'"
    ).fetchone()
    erasures: list[tuple[str, float]] = (
        conn.execute("SELECT subject, erased_at FROM erasure_log").fetchall() if has_log else []
    )
    return ConsentSnapshot(rows, erasures)


def read_cursor(conn: sqlite3.Connection) -> object | None:
    """The stored cursor as stored (the caller decides whether it is usable)."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (CURSOR_KEY,)).fetchone()
    return None if row is None else row[0]


class ConsentStore(Store):
    def load(self) -> asyncio.Future[ConsentSnapshot]:
        return self._read(load_rows)

    def save(self, rows: Sequence[ConsentRow], removed: Sequence[str] = ()) -> asyncio.Future[None]:
        """One write: ``rows`` stored, the rows of ``removed`` deleted."""
        rows, removed = list(rows), list(removed)
        return self._write(lambda c: save_rows(c, rows, removed), invalidates=False)

    def delete(self, subjects: Sequence[str]) -> asyncio.Future[None]:
        subjects = list(subjects)
        return self._write(lambda c: delete_rows(c, subjects), invalidates=False)

    def cursor(self) -> asyncio.Future[object | None]:
        return self._read(read_cursor)

    def set_cursor(self, cursor: str) -> asyncio.Future[None]:
        def fn(c: sqlite3.Connection) -> None:
            c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (CURSOR_KEY, cursor))

        return self._write(fn, invalidates=False)

    def clear_cursor(self) -> asyncio.Future[None]:
        def fn(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM meta WHERE key = ?", (CURSOR_KEY,))

        return self._write(fn, invalidates=False)
