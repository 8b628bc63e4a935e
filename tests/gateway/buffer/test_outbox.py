"""The outbox against random interleavings of append, publish, ack, refusal and crash."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.buffer.outbox import Batch, Outbox, Pending
from gateway.config.sections import BufferConfig
from gateway.errors import BufferFull
from gateway.observe.metrics import Metrics

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 40)),
        st.tuples(st.just("fetch"), st.integers(1, 4)),
        st.tuples(st.just("ack"), st.integers(0, 10)),
        st.tuples(st.just("refuse"), st.integers(0, 10)),
        st.tuples(st.just("crash"), st.just(0)),
    ),
    max_size=40,
)


def seqs_of(b: Batch) -> list[int]:
    return [e["seq"] for e in json.loads("[" + ",".join(b.bodies) + "]")]


def pending(i: int) -> Pending:
    return Pending(time.time(), "card.read", f"k1:s{i}", f'"type":"card.read","n":{i}}}')


def small_box(cfg: BufferConfig, metrics: Metrics) -> Outbox:
    return Outbox(cfg, metrics, chunk_events=5, chunk_bytes=4096)


async def scenario(path: Path, ops: list[tuple[str, int]]) -> None:
    metrics = Metrics()
    cfg = BufferConfig(path=path)
    box = small_box(cfg, metrics)
    box.open()
    committed: list[int] = []
    delivered: set[int] = set()
    refused: set[int] = set()
    in_flight: list[Batch] = []
    cursor = 0
    n = 0
    for op, arg in ops:
        if op == "append":
            seqs = await box.submit_many([pending(n + i) for i in range(arg)])
            n += arg
            assert seqs == sorted(seqs) and (not committed or seqs[0] > committed[-1])
            committed.extend(seqs)
        elif op == "fetch":
            batches = await box.fetch(cursor, arg, 7, 4096)
            for b in batches:
                assert b.lo > cursor and b.hi >= b.lo
                got = seqs_of(b)
                assert got == sorted(got) and got[0] == b.lo and got[-1] == b.hi
                cursor = b.hi
            in_flight.extend(batches)
        elif op in ("ack", "refuse") and in_flight:
            b = in_flight.pop(arg % len(in_flight))
            if op == "ack":
                await box.ack(b)
                delivered.update(seqs_of(b))
            else:
                await box.dead_letter(b, 0x87, "Not authorized")
                refused.update(seqs_of(b))
        elif op == "crash":
            box.close(checkpoint=False)
            box = small_box(cfg, metrics)
            box.open()
            in_flight, cursor = [], 0  # the forwarder's memory is gone; the database is not
    # Settle what is in flight, then drain: everything left must come out, in order.
    for b in in_flight:
        await box.ack(b)
        delivered.update(seqs_of(b))
    while True:
        batches = await box.fetch(cursor, 10, 50, 1 << 20)
        if not batches:
            break
        for b in batches:
            cursor = b.hi
            await box.ack(b)
            delivered.update(seqs_of(b))
    stream = box.stream
    box.close()
    assert delivered | refused == set(committed), "a committed event was lost or invented"
    assert not delivered & refused
    conn = sqlite3.connect(path)
    dead: set[int] = set()
    for body in conn.execute("SELECT body FROM dead_letters"):
        dead.update(e["seq"] for e in json.loads("[" + body[0] + "]"))
    assert dead == refused
    assert conn.execute("SELECT count(*) FROM chunks").fetchone()[0] == 0
    assert conn.execute("SELECT value FROM meta WHERE key='stream'").fetchone()[0] == stream
    conn.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(OPS)
def test_nothing_committed_is_lost_and_order_is_kept(ops: list[tuple[str, int]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        asyncio.run(scenario(Path(d) / "buffer.db", ops))


def test_seq_is_never_reused_after_delete_and_restart(tmp_path: Path) -> None:
    async def run() -> None:
        cfg = BufferConfig(path=tmp_path / "b.db")
        box = Outbox(cfg, Metrics())
        box.open()
        seqs = await box.submit_many([pending(i) for i in range(5)])
        [batch] = await box.fetch(0, 1, 100, 1 << 20)
        await box.ack(batch)
        stream = box.stream
        box.close()
        box = Outbox(cfg, Metrics())
        box.open()
        again = await box.submit_many([pending(9)])
        assert again == [seqs[-1] + 1]
        assert box.stream == stream
        box.close()

    asyncio.run(run())


@pytest.mark.parametrize("policy", ["evict_oldest", "drop_new"])
def test_full_buffer_applies_the_policy_and_counts_it(tmp_path: Path, policy: str) -> None:
    async def run() -> None:
        metrics = Metrics()
        cfg = BufferConfig(path=tmp_path / "b.db", max_bytes=1024 * 1024, when_full=policy)
        box = Outbox(cfg, metrics)
        box.open()
        big = "x" * 2000
        accepted = dropped = 0
        for round_ in range(60):
            try:
                await box.submit_many(
                    [
                        Pending(time.time(), "card.read", None, f'"pad":"{big}{round_}-{i}"}}')
                        for i in range(20)
                    ]
                )
                accepted += 20
            except BufferFull:
                dropped += 20
        stats = await box.stats()
        box.close()
        assert stats["db_bytes"] <= cfg.max_bytes
        if policy == "evict_oldest":
            assert dropped == 0
            assert metrics.get("events_evicted_total") > 0
            assert stats["depth"] + metrics.get("events_evicted_total") == accepted
        else:
            assert dropped > 0
            assert metrics.total("events_dropped_total", reason="buffer_full") == dropped
            assert stats["depth"] == accepted

    asyncio.run(run())


def test_expiry_deletes_only_old_rows(tmp_path: Path) -> None:
    async def run() -> None:
        clock = [1_795_000_000.0]
        metrics = Metrics()
        box = Outbox(
            BufferConfig(path=tmp_path / "b.db", max_age_s=3600), metrics, now=lambda: clock[0]
        )
        box.open()
        await box.submit_many(
            [Pending(clock[0] - 7200, "card.read", None, '"a":1}') for _ in range(3)]
        )
        await box.submit_many(
            [Pending(clock[0] - 60, "card.read", None, '"a":2}') for _ in range(2)]
        )
        assert await box.expire() == 3
        assert (await box.stats())["depth"] == 2
        box.close()

    asyncio.run(run())


def test_pragmas(tmp_path: Path) -> None:
    async def run() -> None:
        box = Outbox(BufferConfig(path=tmp_path / "b.db"), Metrics())
        box.open()
        mode = await box._submit_read(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0])
        sync = await box._submit_read(lambda c: c.execute("PRAGMA synchronous").fetchone()[0])
        secure = await box._submit_read(lambda c: c.execute("PRAGMA secure_delete").fetchone()[0])
        limit = await box._submit_read(
            lambda c: c.execute("PRAGMA journal_size_limit").fetchone()[0]
        )
        box.close()
        assert (mode, sync, secure) == ("wal", 2, 1) and limit > 0

    asyncio.run(run())


def test_expiry_survives_clock_steps(tmp_path: Path) -> None:
    """A Pi that booted without RTC stamped events near 1970; NTP then steps the clock to
    now.  Age cannot be known for those events: they are kept (the size cap bounds them),
    while really old events behind them still expire.  A clock still unset expires nothing;
    a clock stepped backwards keeps everything until it catches up."""

    async def run() -> None:
        clock = [1_795_000_000.0]  # 2026
        box = Outbox(
            BufferConfig(path=tmp_path / "b.db", max_age_s=3600),
            Metrics(),
            now=lambda: clock[0],
            chunk_events=1,
        )
        box.open()
        await box.submit_many([Pending(86_400.0 * 2, "card.read", None, '"boot":1}')])  # 1970
        await box.submit_many([Pending(clock[0] - 7200, "card.read", None, '"old":1}')])
        await box.submit_many([Pending(clock[0] - 60, "card.read", None, '"new":1}')])
        assert await box.expire(now=100_000.0) == 0, "an unset clock expires nothing"
        assert await box.expire(now=clock[0] - 86_400) == 0, "a clock stepped back keeps all"
        assert await box.expire() == 1, "only the event known to be 2 h old goes"
        stats = await box.stats()
        assert stats["depth"] == 2
        body = await box._submit_read(
            lambda c: [r[0] for r in c.execute("SELECT body FROM chunks")]
        )
        assert any('"boot":1' in b for b in body) and any('"new":1' in b for b in body)
        box.close()

    asyncio.run(run())
