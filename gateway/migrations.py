"""Named schema migrations for the buffer database, recorded in ``_migrations``.

Each migration runs once, in order, inside a transaction; sqlite-utils builds the tables
so a technician can read the same schema with ``sqlite-utils tables buffer.db``.

sqlite-utils is imported only when a migration is pending: it costs ~250 ms and ~5 MiB
to import (with click and its other CLI dependencies), which a daemon restarting on an
up-to-date database need not pay.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlite_utils


def _m001_outbox(db: sqlite_utils.Database) -> None:
    db.table("meta").create({"key": str, "value": str}, pk="key")
    # One row per chunk of consecutive events (seq lo..hi), body = the events' JSON
    # objects joined by ","; subjects = the chunk's distinct pseudonyms, space-separated.
    db.table("chunks").create(
        {"lo": int, "hi": int, "n": int, "created": float, "subjects": str, "body": str},
        pk="lo",
        not_null={"hi", "n", "created", "body"},
    )
    db.table("dead_letters").create(
        {
            "lo": int,
            "hi": int,
            "n": int,
            "created": float,
            "subjects": str,
            "body": str,
            "reason_code": int,
            "reason": str,
            "failed_at": float,
        },
        pk="lo",
    )


def _m002_consent(db: sqlite_utils.Database) -> None:
    db.table("consent").create(
        {"subject": str, "purposes": str, "expires": float, "source": str, "updated_at": float},
        pk="subject",
    )


def _m003_consent_policy(db: sqlite_utils.Database) -> None:
    # Readings held for consent (policy "hold"); no index on subject, so a deleted row
    # leaves no copy of the pseudonym in an index page.
    db.table("held").create(
        {
            "id": int,
            "subject": str,
            "type": str,
            "source": str,
            "at": float,
            "attrs": str,
            "expires": float,
        },
        pk="id",
        not_null={"subject", "type", "source", "at", "attrs", "expires"},
    )
    # One row per erased pseudonym: the pseudonym and the time of its last erasure, only.
    # A rowid table without an index: the log's row is the pseudonym's one copy on disk.
    db.table("erasure_log").create(
        {"id": int, "subject": str, "erased_at": float},
        pk="id",
        not_null={"subject", "erased_at"},
    )


def _m004_token_replay(db: sqlite_utils.Database) -> None:
    # The daemon's one app-token replay set (contract §6): a keyed digest of (sub, nonce),
    # never the subject, and the token's exp; pruned once the token has expired.
    db.execute(
        "CREATE TABLE token_replay (key TEXT PRIMARY KEY, exp INTEGER NOT NULL) WITHOUT ROWID"
    )
    # The erasure log keyed by pseudonym: a lookup was a scan of the whole log for each
    # subject (re-erasing 16,000 logged withdrawals took seconds, growing quadratically).
    # WITHOUT ROWID keeps the pseudonym's one copy on disk: the table is its own index.
    db.execute(
        "CREATE TABLE erasure_log_new (subject TEXT PRIMARY KEY, erased_at REAL NOT NULL)"
        " WITHOUT ROWID"
    )
    db.execute(
        "INSERT INTO erasure_log_new(subject, erased_at)"
        " SELECT subject, max(erased_at) FROM erasure_log GROUP BY subject"
    )
    db.execute("DROP TABLE erasure_log")  # secure_delete (set by the caller) zeroes its pages
    db.execute("ALTER TABLE erasure_log_new RENAME TO erasure_log")


MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None]]] = [
    ("001_outbox", _m001_outbox),
    ("002_consent", _m002_consent),
    ("003_consent_policy", _m003_consent_policy),
    ("004_token_replay", _m004_token_replay),
]


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply the migrations not yet recorded; return the names applied."""
    conn.execute("CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL)")
    done = {row[0] for row in conn.execute("SELECT name FROM _migrations")}
    pending = [(name, fn) for name, fn in MIGRATIONS if name not in done]
    if not pending:
        return []
    import sqlite_utils  # noqa: PLC0415 - see the module docstring

    db = sqlite_utils.Database(conn)
    applied = []
    for name, fn in pending:
        conn.execute("BEGIN IMMEDIATE")
        try:
            fn(db)
            conn.execute(
                "INSERT INTO _migrations(name, applied_at) VALUES (?, ?)", (name, time.time())
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        applied.append(name)
    return applied
