"""Erasure on a real outbox: the pseudonym's bytes are gone from the database and its WAL.

A withdrawal cuts the subject's events out of shared chunks (the others' events stay,
byte for byte), deletes its held readings and consent row, clears in-memory state through
the hooks, logs (pseudonym, time) only, and checkpoints the WAL; idempotent; also offline.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from gateway.buffer.erasure_store import erase_offline, erase_rows, split_body
from gateway.buffer.migrations import migrate
from gateway.buffer.outbox import buffer_stats
from gateway.identity.clock import CLOCK_FLOOR
from gateway.identity.tokens import MAX_APP_TOKEN_LIFETIME_S
from gateway.ports import Reading
from tests.gateway.consent_helpers import Clock, Rig, card, opened

X = "k1:XXXXXXXXXXXXXXXXXXXXXX"  # the subject who withdraws
Y = "k1:YYYYYYYYYYYYYYYYYYYYYY"
Z = "k1:ZZZZZZZZZZZZZZZZZZZZZZ"  # never consented: held
SECRET_LANE = "lane-only-x-uses"
READER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN")
conn.execute("SELECT count(*) FROM chunks").fetchone()
print("reading", flush=True)
sys.stdin.read()
"""
T_SET = 1_790_000_000.0  # a set wall clock (gateway.identity.clock)


def occurrences(path: Path, needle: str) -> int:
    if not path.exists():
        return 0
    return path.read_bytes().count(needle.encode())


def files(db: Path) -> list[Path]:
    return [db, Path(f"{db}-wal")]


async def fill(rig: Rig) -> None:
    for s in (X, Y):
        rig.registry.apply([(s, frozenset({"linking", "analytics"}), None)], "sync", rig.clock())
        await rig.outbox._submit_write(
            lambda c, s=s: c.execute(
                "INSERT INTO consent VALUES (?, '[\"linking\"]', NULL, 'sync', 0)", (s,)
            )
        )
    t = rig.clock()
    for i in range(60):  # interleaved: every chunk (5 events) mixes X and Y
        subject = X if i % 3 == 0 else Y
        lane = SECRET_LANE if subject == X else "till-1"
        assert rig.accept(card(subject, t + i, lane=lane))
    assert not rig.accept(card(Z, t))  # held (policy hold)
    # Some of X's events also sit in the dead letters.
    await rig.outbox._submit_read(lambda c: None)
    await rig.outbox._submit_write(
        lambda c: c.execute(
            "INSERT INTO dead_letters SELECT lo, hi, n, created, subjects, body, 135, 'x', 0"
            " FROM chunks WHERE lo = (SELECT min(lo) FROM chunks)"
        )
    )


def fill_offline(db: Path) -> None:
    """``fill`` a buffer and close it, as the daemon leaves it when it stops."""

    async def run() -> None:
        async with opened(db, policy_name="hold") as rig:
            await fill(rig)

    asyncio.run(run())


def test_withdrawal_erases_every_byte_of_the_subject(tmp_path: Path) -> None:
    db = tmp_path / "buffer.db"

    async def run() -> None:
        rig = Rig(db, Clock(), policy_name="hold")
        await rig.open()
        await fill(rig)
        forgotten: list[str] = []
        committed: list[int] = []
        rig.eraser.hooks.append(forgotten.append)
        rig.eraser.after_commit.append(lambda: committed.append(len(forgotten)))
        before = [e for e in rig.events() if e["subject"] == Y]
        assert sum(occurrences(p, X) for p in files(db)) > 20
        assert len(rig.policy.hold or []) == 1

        started = time.monotonic()
        await rig.updater.apply_records([(X, frozenset(), None), (Z, frozenset(), None)])
        took = time.monotonic() - started
        assert took < 1.0, f"erasure took {took:.2f}s"

        # In memory: registry, hold, hooks (sources), then the forwarder's callback.
        assert X not in rig.registry.records and X in rig.registry.withdrawn
        assert len(rig.policy.hold or []) == 0
        assert forgotten == [X, Z] and committed == [2]
        assert not rig.accept(card(X, rig.clock()))
        assert rig.policy.denied(card(X, rig.clock()), rig.clock()) == "dropped_withdrawn"

        # The files, while the daemon still has them open: only the erasure log's row.
        assert occurrences(db, X) == 1 and occurrences(db, Z) == 1
        assert occurrences(Path(f"{db}-wal"), X) == 0
        assert sum(occurrences(p, SECRET_LANE) for p in files(db)) == 0
        rows = await rig.outbox._submit_read(
            lambda c: c.execute("SELECT subject FROM erasure_log ORDER BY 1").fetchall()
        )
        assert rows == [(X,), (Z,)]
        # Y's events are untouched and the rows stay consistent.
        after = rig.events()
        assert after == before
        check = await rig.outbox._submit_read(
            lambda c: c.execute("SELECT n, subjects, body FROM chunks").fetchall()
        )
        for n, subjects, body in check:
            assert n == len(split_body(body)) and subjects == Y
        # The forwarder path (tail cache invalidated) serves no event of X either.
        batches = await rig.outbox.fetch(0, 100, 1000, 1 << 20)
        served = json.loads("[" + ",".join(b for bt in batches for b in bt.bodies) + "]")
        assert served == before
        dead = await rig.outbox._submit_read(
            lambda c: c.execute("SELECT n, subjects FROM dead_letters").fetchall()
        )
        assert all(X not in s for _, s in dead)
        assert rig.metrics.get("erasures_total") == 2
        rig.close()

    asyncio.run(run())


def test_erasure_is_idempotent_and_survives_restart(tmp_path: Path) -> None:
    db = tmp_path / "buffer.db"

    async def run() -> None:
        clock = Clock()
        rig = Rig(db, clock, policy_name="hold")
        await rig.open()
        await fill(rig)
        first = await rig.eraser.erase([X])
        assert first.events == 22 and first.consent == 1  # 20 + 2 dead-lettered
        image = db.read_bytes()
        clock.t += 50
        again = await rig.eraser.erase([X])
        assert again.events == again.held == again.consent == again.rows_deleted == 0
        logged = await rig.outbox._submit_read(
            lambda c: c.execute("SELECT erased_at FROM erasure_log").fetchall()
        )
        assert logged == [(clock.t - 50,)], "a repeat finds nothing and logs nothing new"
        assert occurrences(db, X) == 1
        rig.close()
        assert len(db.read_bytes()) == len(image)

        rig = Rig(db, clock, policy_name="hold")
        await rig.open()
        assert X in rig.registry.withdrawn and X not in rig.registry.records
        assert len(rig.policy.hold or []) == 1  # Z is still held across the restart
        rig.close()

    asyncio.run(run())


def test_offline_erasure_with_the_daemon_stopped(tmp_path: Path) -> None:
    db = tmp_path / "buffer.db"

    fill_offline(db)
    out = erase_offline(db, [Y, Z])
    assert out.events == 43 and out.held == 1  # 40 + 3 dead-lettered
    assert occurrences(db, Y) == 1 and occurrences(db, Z) == 1
    assert occurrences(Path(f"{db}-wal"), Y) == 0
    conn = sqlite3.connect(db)
    try:
        left = conn.execute("SELECT group_concat(subjects, ' ') FROM chunks").fetchone()[0]
    finally:
        conn.close()
    assert set(left.split()) == {X}
    assert erase_offline(db, [Y]).events == 0


def test_erasure_of_a_big_buffer_within_one_second(tmp_path: Path) -> None:
    db = tmp_path / "buffer.db"

    async def run() -> None:
        rig = Rig(db, Clock())
        rig.outbox.chunk_events = 200
        await rig.open()
        subjects = [f"k1:{i:022d}" for i in range(50)]
        rig.registry.apply(
            [(s, frozenset({"linking"}), None) for s in subjects], "sync", rig.clock()
        )
        for i in range(20_000):
            rig.accept(card(subjects[i % 50], rig.clock() + i))
            if i % 2000 == 0:
                await asyncio.sleep(0)
        await rig.outbox._submit_read(lambda c: None)
        started = time.monotonic()
        result = await rig.eraser.erase([subjects[7]])
        assert time.monotonic() - started < 1.0
        assert result.events == 400
        assert occurrences(db, subjects[7]) == 1
        rig.close()

    asyncio.run(run())


def test_split_body_keeps_the_exact_text() -> None:
    body = '{"seq":1,"a":"x,y"},{"seq":2,"b":{"c":[1,2]}}'
    parts = split_body(body)
    assert [t for t, _ in parts] == ['{"seq":1,"a":"x,y"}', '{"seq":2,"b":{"c":[1,2]}}']
    assert split_body("") == []


def test_hook_failure_does_not_stop_erasure(tmp_path: Path) -> None:
    async def run() -> None:
        rig = Rig(tmp_path / "b.db", Clock())
        await rig.open()

        def broken(subject: str) -> None:
            raise RuntimeError("source gone")

        rig.eraser.hooks.append(broken)
        rig.registry.apply([(X, frozenset({"linking"}), None)], "sync", rig.clock())
        assert rig.accept(Reading("card.read", "t", rig.clock(), X, {"lane": "l"}))
        result = await rig.eraser.erase([X])
        assert result.events == 1 and X not in rig.registry.records
        rig.close()

    asyncio.run(run())


def test_tombstones_older_than_the_longest_token_lifetime_are_pruned(tmp_path: Path) -> None:
    db = tmp_path / "buffer.db"
    clock = Clock(T_SET)

    async def run() -> None:
        rig = Rig(db, clock)
        await rig.open()
        await rig.eraser.erase([X])
        clock.t += MAX_APP_TOKEN_LIFETIME_S
        await rig.eraser.erase([Y])
        assert await rig.eraser.prune_tombstones(clock()) == 0  # skew: X is kept a minute more
        clock.t += 61
        assert await rig.eraser.prune_tombstones(clock()) == 1
        assert X not in rig.registry.withdrawn and Y in rig.registry.withdrawn
        rows = await rig.outbox._submit_read(
            lambda c: c.execute("SELECT subject FROM erasure_log").fetchall()
        )
        assert rows == [(Y,)]
        rig.close()
        rig = Rig(db, clock)
        await rig.open()  # the tombstones are rebuilt from the log: X's stays gone
        assert X not in rig.registry.withdrawn and Y in rig.registry.withdrawn
        assert await rig.eraser.prune_tombstones(CLOCK_FLOOR - 1) == 0  # unset clock: nothing
        rig.close()

    asyncio.run(run())
    assert occurrences(db, X) == 0


def _erasure_steps(tmp_path: Path, n: int) -> int:
    """SQLite VM steps to re-erase ``n`` withdrawals that are already in the log."""
    conn = sqlite3.connect(tmp_path / f"log-{n}.db", isolation_level=None)
    try:
        migrate(conn)
        subjects = [f"k1:{i:022d}" for i in range(n)]
        erase_rows(conn, subjects, 1.0)
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0

        conn.set_progress_handler(count, 100)
        erase_rows(conn, subjects, 2.0)
        return steps[0]
    finally:
        conn.close()


def test_re_erasing_logged_withdrawals_is_linear_in_their_number(tmp_path: Path) -> None:
    """A registry snapshot re-applies every withdrawal it lists; with the erasure log
    scanned once per subject, 16,000 of them took seconds on the writer thread (and four
    times as long for twice as many).  Counted in SQLite VM steps, not time."""
    small, big = _erasure_steps(tmp_path, 2000), _erasure_steps(tmp_path, 4000)
    assert big < 2.5 * small, (small, big)


def test_offline_erasure_does_not_wait_for_a_reader_and_records_what_waits(
    tmp_path: Path,
) -> None:
    """A second process holds a read transaction: the erasure commits at once, the
    checkpoint does not wait (5 s of busy_timeout per try, before), and the buffer records
    that erased bytes wait in the WAL, for status and the daemon's retry."""
    db = tmp_path / "buffer.db"

    fill_offline(db)
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(db)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == b"reading"
        started = time.monotonic()
        out = erase_offline(db, [Y])
        assert time.monotonic() - started < 4.0  # no busy_timeout wait (5 s)
        assert out.events == 43 and out.erased_in_wal
        conn = sqlite3.connect(db)
        try:
            stats = buffer_stats(conn, time.time())
            assert stats["erased_in_wal_since"] is not None
            assert (
                conn.execute(
                    "SELECT count(*) FROM chunks WHERE instr(subjects, ?)", (Y,)
                ).fetchone()[0]
                == 0
            )
        finally:
            conn.close()
    finally:
        reader.communicate(b"", timeout=10)
