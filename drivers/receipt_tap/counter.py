"""The receipt counters: one per (store, lane) in a small database of their own, each value
reserved (committed and fsynced) before a token carrying it is printed, so none is printed twice."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.buffer.migrations import Migration, migrate
from gateway.buffer.transaction import transaction
from gateway.config.credentials import private_database
from gateway.errors import SourceError, UnknownMigrations

if TYPE_CHECKING:
    import sqlite_utils

log = logging.getLogger(__name__)

COUNTER_MAX = 0xFFFFFFFF


def _m001_receipt_counter(db: sqlite_utils.Database) -> None:
    # IF NOT EXISTS: a database from before the shared mechanism has the table already
    # (and its own ``migrations`` table, kept as it is so that version can still run).
    db.execute(
        "CREATE TABLE IF NOT EXISTS receipt_counter ("
        " store TEXT NOT NULL, lane INTEGER NOT NULL, last INTEGER NOT NULL,"
        " PRIMARY KEY (store, lane))"
    )


# (name, the migration, whether binaries without it can still use the database)
COUNTER_MIGRATIONS: list[Migration] = [
    ("001_receipt_counter", _m001_receipt_counter, True),
]


class CounterStore:
    """Receipt counters per (store, lane number) in SQLite; a reserved value is never reused.

    ``reserve`` commits with ``synchronous=FULL`` (fsync) before it returns.  Blocking:
    the tap calls it from its single worker thread, which owns the connection.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            private_database(self.path)  # 0600 whatever the umask
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            migrate(self._db, f"the receipt counters' database {self.path}", COUNTER_MIGRATIONS)
        except (sqlite3.Error, OSError, UnknownMigrations) as exc:
            raise SourceError(f"{self.path}: cannot open the receipt counter store: {exc}") from exc

    def reserve(self, store: str, lane: int) -> int:
        """The next counter for (store, lane), durably recorded as used (first is 1)."""
        with transaction(self._db) as db:
            row = db.execute(
                "INSERT INTO receipt_counter VALUES (?, ?, 1)"
                " ON CONFLICT (store, lane) DO UPDATE SET last = last + 1 RETURNING last",
                (store, lane),
            ).fetchone()
            value = int(row[0])
            if value > COUNTER_MAX:
                raise OverflowError(f"receipt counter of lane {lane} is exhausted")
        return value

    def last(self, store: str, lane: int) -> int:
        """The last reserved counter (0 if none)."""
        row = self._db.execute(
            "SELECT last FROM receipt_counter WHERE store = ? AND lane = ?", (store, lane)
        ).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self._db.close()
