"""The one way to write a transaction by hand on a connection in autocommit mode
(``isolation_level=None``): the migrations, the outbox's group commits and evictions, the
offline erasure, the receipt counters.

    with transaction(conn):
        conn.execute(...)

Whatever fails, the body or the COMMIT itself (a deferred constraint, a full disk, an I/O
error, a busy database), the transaction is rolled back before the error goes on: the
connection is never left inside a transaction that the next BEGIN would trip over.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from typing import Literal


@contextlib.contextmanager
def transaction(
    conn: sqlite3.Connection, mode: Literal["DEFERRED", "IMMEDIATE", "EXCLUSIVE"] = "IMMEDIATE"
) -> Iterator[sqlite3.Connection]:
    conn.execute(f"BEGIN {mode}")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):  # the first error is the one to tell
                conn.execute("ROLLBACK")
        raise
