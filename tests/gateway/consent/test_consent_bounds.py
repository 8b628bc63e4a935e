"""Hostile and broken registry answers against the real poller over real HTTP (issue 14).

The fake central's consent API (``simulators.central.consent_api``) serves them: a 100 MB body,
a body trickled a byte at a time, a 70,000-character cursor, subjects outside the
pseudonym grammar (a lone surrogate among them).  Each is cut or refused, counted and
logged; the registry and the cursor stay as they were; nothing ends the poller.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import tracemalloc
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.buffer.consent_store import CURSOR_KEY, ConsentStore
from gateway.consent.registry import is_pseudonym, parse_records
from gateway.consent.sync import MAX_CURSOR_CHARS, ConsentSync
from simulators.central.consent_api import ConsentAPI
from tests.gateway.consent_helpers import STORE, Rig, opened, polling

A, B = "k1:" + "A" * 22, "k1:" + "B" * 22
MiB = 1024 * 1024


def bounded(
    path: Path, api: ConsentAPI, token_file: Path, **kw: Any
) -> AbstractAsyncContextManager[tuple[Rig, ConsentSync, httpx.AsyncClient]]:
    """``polling`` with this file's jitter seed and a 5 s per-phase timeout."""
    return polling(path, api, token_file, seed=3, **{"timeout_s": 5, **kw})


def polls(rig: Rig, outcome: str) -> float:
    return rig.metrics.get("consent_sync_polls_total", outcome=outcome)


def body(cursor: str, records: list[dict[str, Any]], reset: bool = False) -> bytes:
    return json.dumps({"cursor": cursor, "reset": reset, "records": records}).encode()


async def refused_then_applied(
    api: ConsentAPI, rig: Rig, sync: ConsentSync, client: httpx.AsyncClient, answers: list[bytes]
) -> None:
    """A granted and synced; each of ``answers`` served and refused, nothing of it applied
    and the last good cursor kept (also stored); then B granted, asked for from that
    cursor, and applied."""
    api.grant(STORE, A, ["linking"])
    await sync.step(client)
    cursor = sync.cursor
    assert cursor is not None
    outcomes = []
    for answer in answers:
        api.hostile("body", body=answer)
        await sync.step(client)
        outcomes.append(str(sync.last_error))
        assert sync.cursor == cursor, outcomes[-1]
    assert polls(rig, "bad_response") == len(answers), outcomes
    assert set(rig.registry.records) == {A}, "nothing of a refused answer applied"
    assert await ConsentStore(rig.outbox).cursor() == cursor
    api.grant(STORE, B, ["linking"])
    await sync.step(client)  # the last good cursor still works
    assert api.requests[-1].since == cursor
    assert sync.failures == 0 and set(rig.registry.records) == {A, B}


@pytest.mark.parametrize("announce", [False, True], ids=["streamed", "content-length"])
def test_a_100_mb_answer_is_cut_at_the_cap_and_refused(
    tmp_path: Path, api: ConsentAPI, token_file: Path, announce: bool
) -> None:
    """Without a Content-Length the body is read up to the cap and cut; with one that
    says more than the cap, it is refused before a byte of it is read."""

    async def run() -> None:
        db = tmp_path / "b.db"
        async with bounded(db, api, token_file, max_body_bytes=MiB) as (rig, sync, client):
            api.grant(STORE, A, ["linking"])
            await sync.step(client)
            cursor = sync.cursor
            api.hostile("flood", size=100 * MiB, announce=announce)
            tracemalloc.start()
            try:
                await sync.step(client)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert polls(rig, "too_large") == 1
            assert sync.failures == 1 and "max_body_bytes" in str(sync.last_error)
            assert peak < 8 * MiB, f"the poll held {peak / MiB:.1f} MiB for a 1 MiB cap"
            # The server was cut off: it wrote the cap and what the sockets buffer, not 100 MB.
            assert api.sent_bytes < 16 * MiB, api.sent_bytes
            assert set(rig.registry.records) == {A}, "the registry is kept"
            assert sync.cursor == cursor and await ConsentStore(rig.outbox).cursor() == cursor
            api.grant(STORE, B, ["linking"])
            await sync.step(client)  # the next answer is fine again
            assert set(rig.registry.records) == {A, B} and sync.failures == 0

    asyncio.run(run())


def test_an_announced_oversized_answer_is_refused_unread(
    tmp_path: Path, api: ConsentAPI, token_file: Path
) -> None:
    async def run() -> None:
        db = tmp_path / "b.db"
        async with bounded(db, api, token_file, max_body_bytes=64 * 1024) as (rig, sync, client):
            api.hostile("body", body=body("c1", []) + b" " * (128 * 1024))
            await sync.step(client)
            assert polls(rig, "too_large") == 1 and sync.cursor is None

    asyncio.run(run())


def test_a_trickled_answer_ends_at_the_total_deadline(
    tmp_path: Path, api: ConsentAPI, token_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One byte every half second never trips the 5 s read timeout; the 2 s deadline
    for the whole request ends it, and the next poll is tried again with backoff."""

    async def run() -> None:
        db = tmp_path / "b.db"
        async with bounded(db, api, token_file, timeout_s=5, deadline_s=2) as (rig, sync, client):
            api.grant(STORE, A, ["linking"])
            api.hostile("trickle", interval_s=0.5)
            delay = await sync.step(client)
            assert 0 < delay <= 8
            assert polls(rig, "deadline") == 1
            assert "deadline_s" in str(sync.last_error)
            assert rig.metrics.get("consent_sync_up") == 0
            assert "deadline_s" in rig.metrics.last_error["consent_sync"]
            assert api.sent_bytes < 20, "cut after a few bytes"
            assert not rig.registry.records and sync.cursor is None

    with caplog.at_level("WARNING"):
        asyncio.run(run())
    assert "consent sync failed" in caplog.text and "deadline_s" in caplog.text


def test_a_70000_character_cursor_is_refused_and_the_last_good_one_kept(
    tmp_path: Path, api: ConsentAPI, token_file: Path
) -> None:
    async def run() -> None:
        grant_b = [{"subject": B, "purposes": ["linking"], "expires": None}]
        bad_cursors = ("x" * 70_000, "", "a b", "c\u00e9", "c\n", "x" * (MAX_CURSOR_CHARS + 1))
        async with bounded(tmp_path / "b.db", api, token_file) as (rig, sync, client):
            await refused_then_applied(
                api, rig, sync, client, [body(bad, grant_b) for bad in bad_cursors]
            )

    asyncio.run(run())


def test_a_bad_cursor_stored_by_an_older_version_gives_a_snapshot(
    tmp_path: Path, api: ConsentAPI, token_file: Path
) -> None:
    async def run() -> None:
        async with bounded(tmp_path / "b.db", api, token_file) as (rig, sync, client):
            await rig.outbox._submit_write(
                lambda c: c.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                    (CURSOR_KEY, "x" * 70_000),
                )
            )
            api.grant(STORE, A, ["linking"])
            await sync.step(client)
            assert sync.failures == 0 and api.requests[-1].since is None, "a full snapshot"
            assert set(rig.registry.records) == {A}
            assert sync.cursor is not None and len(sync.cursor) < 100

    asyncio.run(run())


BAD_SUBJECTS = [
    "k1:\ud800",  # a lone surrogate: valid JSON, not encodable
    "k1:\ud800" + "A" * 18,
    "k1:abc",
    "k1:" + "A" * 70_000,
    "K1:" + "A" * 22,
    "k1:" + "A" * 21 + "=",
    "k1:" + "A" * 21 + "\u00c5",
    "toolongkeyidentifier:" + "A" * 22,
    ":" + "A" * 22,
    "k1:" + "A" * 22 + "\n",
]


def test_subjects_outside_the_pseudonym_grammar_are_refused(
    tmp_path: Path, api: ConsentAPI, token_file: Path
) -> None:
    async def run() -> None:
        answers = [
            body(
                "c9",
                [
                    {"subject": B, "purposes": ["linking"], "expires": None},
                    {"subject": bad, "purposes": ["linking"], "expires": None},
                ],
            )
            for bad in BAD_SUBJECTS
        ]
        async with bounded(tmp_path / "b.db", api, token_file) as (rig, sync, client):
            # and the buffer's writer is alive and well: the next answer is written
            await refused_then_applied(api, rig, sync, client, answers)

    asyncio.run(run())


def test_pushed_subjects_outside_the_grammar_are_counted_invalid(tmp_path: Path) -> None:
    async def run() -> None:
        async with opened(tmp_path / "b.db") as rig:
            for bad in BAD_SUBJECTS:
                doc = {
                    "v": 1,
                    "records": [{"subject": bad, "purposes": ["linking"], "expires": None}],
                }
                rig.updater.on_push(json.dumps(doc).encode())
            rig.updater.on_push(b'{"v":1,"records":[]}' + b" " * (2 * MiB))
            await rig.updater.drain()
            assert rig.metrics.get("consent_push_total", outcome="invalid") == len(BAD_SUBJECTS) + 1
            assert not rig.registry.records
            ok = {"v": 1, "records": [{"subject": A, "purposes": ["linking"], "expires": None}]}
            rig.updater.on_push(json.dumps(ok).encode())
            await rig.updater.drain()
            assert set(rig.registry.records) == {A}
            assert await rig.outbox._submit_read(
                lambda c: c.execute("SELECT count(*) FROM consent").fetchone()
            )

    asyncio.run(run())


def test_the_grammar_is_the_contracts() -> None:
    vectors = json.loads(
        (Path(__file__).parents[3] / "gateway/contract/vectors.json").read_text("utf-8")
    )
    for case in vectors["pseudonyms"]:
        assert is_pseudonym(case["pseudonym"])
    assert not any(is_pseudonym(s) for s in BAD_SUBJECTS)
    with pytest.raises(ValueError, match="not a pseudonym"):
        parse_records({"records": [{"subject": "k1:\ud800", "purposes": []}]})


def test_a_buffer_failure_during_a_poll_is_a_failed_poll_not_the_end(
    tmp_path: Path, api: ConsentAPI, token_file: Path
) -> None:
    """The cursor's table is gone (the database changed under the daemon): the poll
    fails, is counted and retried; the poller does not raise."""

    async def run() -> None:
        async with bounded(tmp_path / "b.db", api, token_file) as (rig, sync, client):
            api.grant(STORE, A, ["linking"])
            await sync.step(client)
            other = sqlite3.connect(tmp_path / "b.db")
            other.execute("ALTER TABLE meta RENAME TO meta_gone")
            other.commit()
            api.grant(STORE, B, ["linking"])
            delay = await sync.step(client)
            assert delay > 0 and sync.failures == 1
            assert polls(rig, "error") == 1
            other.execute("ALTER TABLE meta_gone RENAME TO meta")
            other.commit()
            other.close()
            await sync.step(client)
            assert sync.failures == 0

    asyncio.run(run())
