"""The buffer's typed stores (gateway/buffer/*_store.py) through a real Outbox on a real
SQLite file: each store's round trip, and that a store's write joins the writer's group
commit exactly as any outbox write does (issue 15: the outbox owns its tables)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.buffer.consent_store import ConsentSnapshot, ConsentStore
from gateway.buffer.erasure_store import ErasureStore
from gateway.buffer.held_store import HeldStore
from gateway.buffer.outbox import Outbox, Pending
from gateway.buffer.token_store import TokenStore
from gateway.config.sections import BufferConfig
from gateway.observe.metrics import Metrics

A, B = "k1:AAAAAAAAAAAAAAAAAAAAAA", "k1:BBBBBBBBBBBBBBBBBBBBBB"
WINDOWS = pytest.mark.parametrize("window_ms", [0, 500], ids=["no-window", "window"])


def event(subject: str | None, i: int) -> Pending:
    who = f',"subject":"{subject}"' if subject else ""
    return Pending(time.time(), "card.read", subject, f'"type":"card.read"{who},"n":{i}}}')


def run(path: Path, window_ms: int, body: Callable[[Outbox], Awaitable[None]]) -> None:
    async def main() -> None:
        box = Outbox(BufferConfig(path=path, durability_window_ms=window_ms), Metrics())
        box.open()
        try:
            await body(box)
        finally:
            box.close()

    asyncio.run(main())


@WINDOWS
def test_consent_store_round_trip(tmp_path: Path, window_ms: int) -> None:
    db = tmp_path / "buffer.db"

    async def first(box: Outbox) -> None:
        store = ConsentStore(box)
        rows = [(A, '["linking"]', None, "sync", 1.0), (B, '["analytics"]', 9e9, "token", 2.0)]
        await store.save(rows)
        await store.save([(A, '["marketing"]', 5.0, "sync", 3.0)], removed=[B])
        assert await store.cursor() is None
        await store.set_cursor("c-1")
        await store.set_cursor("c-2")
        assert await store.cursor() == "c-2"
        await ErasureStore(box).erase([B], 4.0)  # logged: the registry's tombstone

    async def restarted(box: Outbox) -> None:
        store = ConsentStore(box)
        assert await store.load() == ConsentSnapshot(
            [(A, '["marketing"]', 5.0, "sync", 3.0)], [(B, 4.0)]
        )
        assert await store.cursor() == "c-2"
        await store.clear_cursor()
        await store.delete([A])
        assert await store.cursor() is None
        assert (await store.load()).rows == []

    run(db, window_ms, first)
    run(db, window_ms, restarted)


@WINDOWS
def test_held_store_round_trip(tmp_path: Path, window_ms: int) -> None:
    db = tmp_path / "buffer.db"
    rows = [
        (i, A if i % 2 else B, "qr.scan", "cam", float(i), '{"k":1}', 100.0 + i)
        for i in (1, 2, 3, 4)
    ]

    async def first(box: Outbox) -> None:
        store = HeldStore(box)
        for row in reversed(rows):
            await store.add(row)
        await store.delete([2])
        await store.expire(101.0)  # row 1 only

    async def restarted(box: Outbox) -> None:
        assert await HeldStore(box).load() == [rows[2], rows[3]]  # in id order

    run(db, window_ms, first)
    run(db, window_ms, restarted)


@WINDOWS
def test_token_store_round_trip(tmp_path: Path, window_ms: int) -> None:
    db = tmp_path / "buffer.db"
    salts: list[bytes] = []

    async def first(box: Outbox) -> None:
        store = TokenStore(box)
        salt, rows = await store.load(now=1000.0)
        assert len(salt) == 16 and rows == []
        salts.append(salt)
        await store.add("key-old", 1500)
        await store.add("key-new", 3000)
        await store.add("key-new", 9999)  # a pair is recorded once
        assert await store.prune(now=2000.0) == 1

    async def restarted(box: Outbox) -> None:
        salt, rows = await TokenStore(box).load(now=2000.0)
        assert salt == salts[0], "the salt is made once, with the database"
        assert rows == [("key-new", 3000)]
        _, rows = await TokenStore(box).load(now=3000.0)  # expired ones go at load too
        assert rows == []

    run(db, window_ms, first)
    run(db, window_ms, restarted)


@WINDOWS
def test_erasure_store_round_trip(tmp_path: Path, window_ms: int) -> None:
    async def body(box: Outbox) -> None:
        store = ErasureStore(box)
        await box.submit_many([event(A, 0), event(B, 1), event(A, 2), event(None, 3)])
        await HeldStore(box).add((1, A, "qr.scan", "cam", 1.0, "{}", 9e9))
        await ConsentStore(box).save([(A, '["linking"]', None, "sync", 1.0)])
        assert await store.count_events(A) == 2
        erased = await store.erase([A], now=50.0)
        assert (erased.events, erased.held, erased.consent) == (2, 1, 1)
        assert (erased.rows_rewritten, erased.rows_deleted) == (1, 0)
        assert await store.count_events(A) == 0 and await store.count_events(B) == 1
        assert (await store.erase([A], now=60.0)).events == 0  # idempotent
        assert (await ConsentStore(box).load()).erasures == [(A, 50.0)], "a repeat keeps the time"
        assert await store.checkpoint() is True
        assert await store.erased_in_wal_since() is None
        await store.mark_erased_in_wal(70.0)
        await store.mark_erased_in_wal(80.0)  # the first time stays
        assert await store.erased_in_wal_since() == 70.0
        assert (await box.stats())["erased_in_wal_since"] == 70.0
        await store.mark_erased_in_wal(None)
        assert await store.erased_in_wal_since() is None
        assert await store.prune_log(before=51.0) == 1
        assert (await ConsentStore(box).load()).erasures == []

    run(tmp_path / "buffer.db", window_ms, body)


@WINDOWS
def test_store_writes_queued_during_a_commit_share_one_transaction(
    tmp_path: Path, window_ms: int
) -> None:
    """Writes queued while the writer is inside a commit are grouped into the next one:
    every store's write goes through the same submission path as the outbox's own, so
    five stores' writes cost one BEGIN .. COMMIT, run in the order they were queued."""

    async def body(box: Outbox) -> None:
        statements: list[str] = []
        assert box._conn is not None
        box._conn.set_trace_callback(statements.append)  # the writer's own connection
        inside, release = threading.Event(), threading.Event()

        def blocker(conn: Any) -> str:
            inside.set()
            assert release.wait(10)
            return "first"

        first = box._submit_write(blocker, invalidates=False)
        assert await asyncio.to_thread(inside.wait, 10)
        queued: list[asyncio.Future[Any]] = [  # while the writer is in the blocker's commit
            ConsentStore(box).save([(A, '["linking"]', None, "sync", 1.0)]),
            HeldStore(box).add((7, A, "qr.scan", "cam", 1.0, "{}", 9e9)),
            TokenStore(box).add("key-1", 4000),
            ErasureStore(box).prune_log(before=0.0),
            ConsentStore(box).set_cursor("c-9"),
        ]
        release.set()
        assert await first == "first"
        await asyncio.gather(*queued)
        box._conn.set_trace_callback(None)

        marks = ["INTO consent", "INTO held", "INTO token_replay", "FROM erasure_log", "c-9"]
        at = [next(i for i, s in enumerate(statements) if m in s) for m in marks]
        assert at == sorted(at), "run in the order queued"
        span = statements[at[0] : at[-1] + 1]
        assert not [s for s in span if s.startswith(("BEGIN", "COMMIT"))], span
        begins = [i for i, s in enumerate(statements) if s.startswith("BEGIN")]
        commits = [i for i, s in enumerate(statements) if s == "COMMIT"]
        assert len(begins) == len(commits) == 2, statements  # the blocker's, then theirs
        assert begins[1] < at[0] and at[-1] < commits[1]

    run(tmp_path / "buffer.db", window_ms, body)


@WINDOWS
def test_only_erasure_empties_the_tail_cache(tmp_path: Path, window_ms: int) -> None:
    """``invalidates``: erasure may delete events the forwarder has not fetched, so the
    cache of recently committed events goes; the other stores' writes keep it."""

    async def body(box: Outbox) -> None:
        await box.submit_many([event(A, i) for i in range(5)])
        assert box.cached_chunks > 0
        await ConsentStore(box).save([(B, '["linking"]', None, "sync", 1.0)])
        await HeldStore(box).add((1, B, "qr.scan", "cam", 1.0, "{}", 9e9))
        await TokenStore(box).add("key", 4000)
        await ConsentStore(box).set_cursor("c")
        await ErasureStore(box).mark_erased_in_wal(None)
        await ErasureStore(box).prune_log(before=0.0)
        assert box.cached_chunks > 0
        await ErasureStore(box).erase([A], now=1.0)
        assert box.cached_chunks == 0
        assert await box.fetch(0, 10, 100, 1 << 20) == []  # nothing erased is served

    run(tmp_path / "buffer.db", window_ms, body)
