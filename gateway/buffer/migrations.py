"""Named schema migrations, recorded in ``_migrations``: the buffer database's, and the one
mechanism every database of the gateway uses (the receipt counters' too).

Each migration runs once, in order, inside a transaction; sqlite-utils builds the tables
so a technician can read the same schema with ``sqlite-utils tables buffer.db``.

sqlite-utils is imported only when a migration is pending: it costs ~250 ms and ~5 MiB
to import (with click and its other CLI dependencies), which a daemon restarting on an
up-to-date database need not pay.

Rollback.  Each applied migration is recorded with the version that applied it and
whether versions without it can still use the database (``older_can_read``: it only adds
what they ignore, a table or an index).  A binary that meets a recorded migration it does
not know refuses to start (``UnknownMigrations``, exit 78) unless every such migration is
marked readable, and says which version wrote it and what to do.  The rule for releases:
within one minor version, migrations are readable by older binaries, so installing the
previous package of the same minor version always rolls back; a migration that is not
(004 rewrote the erasure log) starts a new minor version, and rolling back over it needs
the newer package again or an emptied buffer.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from gateway import __version__
from gateway.buffer.transaction import transaction
from gateway.errors import UnknownMigrations

if TYPE_CHECKING:
    import sqlite_utils

log = logging.getLogger(__name__)


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


# (name, the migration, whether binaries without it can still use the database)
MIGRATIONS: list[tuple[str, Callable[[sqlite_utils.Database], None], bool]] = [
    ("001_outbox", _m001_outbox, False),
    ("002_consent", _m002_consent, False),
    ("003_consent_policy", _m003_consent_policy, False),
    ("004_token_replay", _m004_token_replay, False),
]
_COLUMNS = (("version", "TEXT"), ("older_can_read", "INTEGER"))


Migration = tuple[str, "Callable[[sqlite_utils.Database], None]", bool]


def unknown_migrations(
    conn: sqlite3.Connection, migrations: Sequence[Migration] = ()
) -> list[tuple[str, str, bool]]:
    """Recorded migrations this binary does not know: (name, version, older_can_read).
    ``migrations``: the database's list (the buffer's ``MIGRATIONS`` unless given)."""
    if (
        conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '_migrations'"
        ).fetchone()
        is None
    ):
        return []
    cols = {row[1] for row in conn.execute("PRAGMA table_info(_migrations)")}
    version = "version" if "version" in cols else "NULL"
    readable = "older_can_read" if "older_can_read" in cols else "NULL"
    known = {name for name, *_ in (migrations or MIGRATIONS)}
    query = f"SELECT name, {version}, {readable} FROM _migrations ORDER BY name"  # noqa: S608
    rows = conn.execute(query)
    return [(n, v or "an unknown version", bool(r)) for n, v, r in rows if n not in known]


def check_known(conn: sqlite3.Connection, where: str, migrations: Sequence[Migration] = ()) -> None:
    """Raise ``UnknownMigrations`` when a migration this binary does not know, and that
    older binaries cannot read, is recorded; warn for readable ones."""
    unknown = unknown_migrations(conn, migrations)
    blocking = [(n, v) for n, v, readable in unknown if not readable]
    if blocking:
        names = ", ".join(f"{n} (by {v})" for n, v in blocking)
        newest = max(v for _, v in blocking)
        raise UnknownMigrations(
            f"{where} was migrated by touchpoint-gateway {newest} ({names}), which this "
            f"version ({__version__}) does not know and cannot read safely. Install "
            f"touchpoint-gateway {newest} or newer again; or stop the service and move the "
            f"database away to start with an empty buffer (its unsent events are lost)."
        )
    for name, version, _ in unknown:
        log.warning(
            "%s: migration %s (by %s) is newer than this version (%s); it is marked "
            "readable by older versions, so the buffer is used as it is",
            where, name, version, __version__,
        )  # fmt: skip


def database_problem(path: Path) -> str | None:
    """Why this version cannot use the buffer database at ``path`` (a rollback onto newer
    migrations, or an unreadable file), or None; a database not made yet is fine.
    Read-only (``check-config``)."""
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=5)
        try:
            check_known(conn, str(path))
        finally:
            conn.close()
    except UnknownMigrations as exc:
        return str(exc)
    except sqlite3.Error as exc:
        return f"cannot read the buffer database: {exc}"
    return None


def migrate(
    conn: sqlite3.Connection,
    where: str = "the buffer database",
    migrations: Sequence[Migration] = (),
) -> list[str]:
    """Refuse a database with migrations this binary cannot read (``check_known``), then
    apply the migrations not yet recorded; return the names applied.  ``migrations``: the
    database's own list (the buffer's ``MIGRATIONS`` unless given; the receipt counters'
    database has its own)."""
    migrations = migrations or MIGRATIONS
    check_known(conn, where, migrations)
    conn.execute(
        "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL, "
        "version TEXT, older_can_read INTEGER)"
    )
    cols = {row[1] for row in conn.execute("PRAGMA table_info(_migrations)")}
    for col, kind in _COLUMNS:  # a database from before the guard
        if col not in cols:
            conn.execute(f"ALTER TABLE _migrations ADD COLUMN {col} {kind}")
    done = {row[0] for row in conn.execute("SELECT name FROM _migrations")}
    pending = [(name, fn, ok) for name, fn, ok in migrations if name not in done]
    if not pending:
        return []
    import sqlite_utils  # noqa: PLC0415 - see the module docstring

    db = sqlite_utils.Database(conn)
    applied = []
    for name, fn, older_can_read in pending:
        with transaction(conn):
            fn(db)
            conn.execute(
                "INSERT INTO _migrations(name, applied_at, version, older_can_read)"
                " VALUES (?, ?, ?, ?)",
                (name, time.time(), __version__, int(older_can_read)),
            )
        applied.append(name)
    return applied
