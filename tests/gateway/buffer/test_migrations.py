"""The buffer database guards itself against a binary older than its migrations (a
rollback): it refuses to start, says which version wrote what and what to do, unless
every unknown migration is marked readable by older versions."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import __version__
from gateway.buffer.migrations import MIGRATIONS, migrate
from simulators.infra.broker import Mosquitto
from tests.system.harness import GatewayProc, synthetic

pytestmark = pytest.mark.slow


def _future(db: Path, *, older_can_read: bool) -> None:
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            "INSERT INTO _migrations(name, applied_at, version, older_can_read)"
            " VALUES ('900_future_table', 0, '9.9.9', ?)",
            (int(older_can_read),),
        )
    conn.close()


def _dump(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def migrated(tmp_path: Path, broker: Mosquitto) -> GatewayProc:
    """A daemon (stopped) whose buffer this version has migrated."""
    gw = GatewayProc(tmp_path / "gw", broker.port, sources=synthetic(5))
    gw.start()
    gw.wait_ready()
    assert gw.stop() == 0
    return gw


def test_a_rollback_onto_newer_migrations_refuses_to_start(
    tmp_path: Path, broker: Mosquitto
) -> None:
    gw = migrated(tmp_path, broker)
    rows = dict(sqlite3.connect(gw.db).execute("SELECT name, version FROM _migrations"))
    assert set(rows) == {name for name, *_ in MIGRATIONS}
    assert set(rows.values()) == {__version__}  # every migration says who applied it

    _future(gw.db, older_can_read=False)
    before = _dump(gw.db)
    gw.start()
    assert gw.proc is not None
    rc = gw.proc.wait(timeout=30)
    gw.proc = None
    assert rc == 78  # EX_CONFIG: the unit does not restart it every 5 s
    log = gw.log.read_text()
    assert "9.9.9" in log and "900_future_table" in log and __version__ in log
    assert "Install touchpoint-gateway 9.9.9 or newer again" in log  # what to do
    assert _dump(gw.db) == before  # nothing written by the older binary

    # check-config says so too: the package's postinst does not restart onto it
    check = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(gw.config)],
        capture_output=True, text=True, check=False, env=gw.env,
    )  # fmt: skip
    assert check.returncode == 1 and "9.9.9" in check.stdout, check.stdout + check.stderr


def test_migrations_marked_readable_by_older_versions_do_not_block(
    tmp_path: Path, broker: Mosquitto
) -> None:
    gw = migrated(tmp_path, broker)
    _future(gw.db, older_can_read=True)
    gw.start()
    gw.wait_log("connected to broker")
    assert "900_future_table" in gw.log.read_text()  # a warning, not a refusal
    assert gw.stop() == 0


def test_a_database_from_before_the_guard_gains_its_columns(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("CREATE TABLE _migrations (name TEXT PRIMARY KEY, applied_at REAL)")
    migrate(conn)
    cols = [r[1] for r in conn.execute("PRAGMA table_info(_migrations)")]
    assert cols == ["name", "applied_at", "version", "older_can_read"]
    assert conn.execute("SELECT count(*) FROM _migrations").fetchone()[0] == len(MIGRATIONS)
    conn.close()
