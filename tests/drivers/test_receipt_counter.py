"""The receipt counters' database on the gateway's one migration mechanism and one
transaction helper (issue 15): an old database is taken as it is, a future one is refused
by name, and a COMMIT that fails (a full disk) is rolled back, so the next reservation
works and no value is ever handed out twice."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.receipt_tap.counter import CounterStore
from gateway.errors import SourceError


def old_database(path: Path) -> None:
    """A counter database as the version before the shared mechanism wrote it."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE migrations (name TEXT PRIMARY KEY, at REAL)")
    conn.execute(
        "CREATE TABLE receipt_counter (store TEXT NOT NULL, lane INTEGER NOT NULL,"
        " last INTEGER NOT NULL, PRIMARY KEY (store, lane))"
    )
    conn.execute("INSERT INTO migrations VALUES ('001_receipt_counter', 0)")
    conn.execute("INSERT INTO receipt_counter VALUES ('nl-ams-001', 3, 41)")
    conn.close()


def test_an_old_counter_database_is_taken_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "counters.db"
    old_database(path)
    store = CounterStore(path)
    assert store.reserve("nl-ams-001", 3) == 42, "the old counters go on"
    store.close()
    conn = sqlite3.connect(path)
    rows = conn.execute("SELECT name, version, older_can_read FROM _migrations").fetchall()
    old = conn.execute("SELECT name FROM migrations").fetchall()
    conn.close()
    assert [(n, r) for n, _, r in rows] == [("001_receipt_counter", 1)] and rows[0][1]
    assert old == [("001_receipt_counter",)], "the old table stays, for a rollback"


def test_a_counter_database_from_a_newer_version_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "counters.db"
    CounterStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(
        "INSERT INTO _migrations VALUES ('099_future', 0, '9.9.0', 0)"
    )  # unreadable by this version
    conn.commit()
    conn.close()
    with pytest.raises(SourceError, match=r"9\.9\.0.*099_future|099_future.*9\.9\.0"):
        CounterStore(path)


@contextlib.contextmanager
def tiny_filesystem(where: Path, size_kib: int) -> Iterator[Path]:
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (the disk that fills up)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(where)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_commit_that_fails_on_a_full_disk_is_rolled_back(tmp_path: Path) -> None:
    with tiny_filesystem(tmp_path / "small", 256) as disk:
        store = CounterStore(disk / "counters.db")
        assert store.reserve("nl-ams-001", 1) == 1
        filler = disk / "filler"
        with contextlib.suppress(OSError), filler.open("wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        failed = 0
        for lane in range(2, 400):  # fill the WAL's last pages; then every COMMIT fails
            try:
                store.reserve("nl-ams-001", lane)
            except sqlite3.Error:
                failed += 1
                break
        assert failed, "the disk never filled"
        filler.unlink()
        # The failed COMMIT was rolled back: the connection is not stuck in a transaction.
        assert store.reserve("nl-ams-001", 1) == 2
        assert store.last("nl-ams-001", 1) == 2
        store.close()
