"""The one transaction helper: a COMMIT that fails is rolled back, not left open."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from gateway.buffer.transaction import transaction


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("CREATE TABLE IF NOT EXISTS parent (id INTEGER PRIMARY KEY)")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS child (parent INTEGER"
        " REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)"
    )
    return conn


def test_a_failed_commit_is_rolled_back(tmp_path: Path) -> None:
    """A deferred constraint fails at the COMMIT itself: the statement went through, the
    COMMIT did not, and SQLite leaves the transaction open for the caller to decide."""
    conn = connect(tmp_path / "t.db")
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"), transaction(conn):
        conn.execute("INSERT INTO child VALUES (7)")  # no parent 7: refused at COMMIT
    assert not conn.in_transaction
    with transaction(conn):  # the next transaction starts cleanly
        conn.execute("INSERT INTO parent VALUES (7)")
        conn.execute("INSERT INTO child VALUES (7)")
    assert conn.execute("SELECT count(*) FROM child").fetchone() == (1,)


def test_the_body_failing_rolls_back_and_tells_the_first_error(tmp_path: Path) -> None:
    conn = connect(tmp_path / "t.db")
    with pytest.raises(ZeroDivisionError), transaction(conn):
        conn.execute("INSERT INTO parent VALUES (1)")
        _ = 1 / 0
    assert not conn.in_transaction
    assert conn.execute("SELECT count(*) FROM parent").fetchone() == (0,)


def test_the_old_hand_written_pattern_left_the_transaction_open(tmp_path: Path) -> None:
    """What the helper replaces (BEGIN; body; COMMIT with the ROLLBACK only around the
    body): after a failed COMMIT the connection stays inside the transaction, and the
    next BEGIN fails."""
    conn = connect(tmp_path / "t.db")
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute("INSERT INTO child VALUES (7)")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute("COMMIT")
    assert conn.in_transaction
    with pytest.raises(sqlite3.OperationalError, match="within a transaction"):
        conn.execute("BEGIN IMMEDIATE")
