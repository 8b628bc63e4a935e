"""Readings held for consent (policy ``hold``, gateway/consent/policy.py): table ``held``.

A row is (id, subject, type, source, at, attrs as JSON, expires).  No index on subject,
so a deleted row leaves no copy of the pseudonym in an index page.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterable, Sequence

from gateway.buffer.store import Store

HeldRow = tuple[int, str, str, str, float, str, float]


def erase_subjects(conn: sqlite3.Connection, subjects: frozenset[str]) -> list[str]:
    """Delete the subjects' rows (in the caller's transaction); the subject of each
    row deleted.  One scan of the table, whatever the number of subjects."""
    held = [
        (int(row_id), str(subject))
        for row_id, subject in conn.execute("SELECT id, subject FROM held")
        if subject in subjects
    ]
    conn.executemany("DELETE FROM held WHERE id = ?", [(row_id,) for row_id, _ in held])
    return [subject for _, subject in held]


class HeldStore(Store):
    def load(self) -> asyncio.Future[list[HeldRow]]:
        """Every held row, in id order (a restart reads them back)."""

        def fn(c: sqlite3.Connection) -> list[HeldRow]:
            return c.execute(
                "SELECT id, subject, type, source, at, attrs, expires FROM held ORDER BY id"
            ).fetchall()

        return self._read(fn)

    def add(self, row: HeldRow) -> asyncio.Future[None]:
        def fn(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT OR REPLACE INTO held(id, subject, type, source, at, attrs, expires)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                row,
            )

        return self._write(fn, invalidates=False)

    def delete(self, ids: Iterable[int]) -> asyncio.Future[None]:
        """Delete released rows by id."""
        params: Sequence[tuple[int]] = [(i,) for i in ids]

        def fn(c: sqlite3.Connection) -> None:
            c.executemany("DELETE FROM held WHERE id = ?", params)

        return self._write(fn, invalidates=False)

    def expire(self, now: float) -> asyncio.Future[None]:
        """Delete the rows whose TTL has passed at ``now``."""

        def fn(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM held WHERE expires <= ?", (now,))

        return self._write(fn, invalidates=False)
