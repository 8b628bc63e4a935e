"""The durability window (``buffer.durability_window_ms``, gateway/buffer/stage.py).

Crashes are real: a child process runs the outbox, reports what it was told was
committed and what it acknowledged, and is killed with SIGKILL.  A power cut is that,
plus what a reboot takes: the page cache (the stage's unsynced bytes) and the RAM
marker beside it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.buffer.outbox import SKIPPED_MAX, Outbox, Pending
from gateway.buffer.stage import marker_path, stage_path
from gateway.config.sections import BufferConfig, MqttConfig
from gateway.contract.events import event_tail
from gateway.observe.metrics import Metrics
from gateway.uplink.forwarder import Forwarder
from gateway.uplink.mqtt import PahoPublisher
from simulators.central.service import Central
from simulators.infra.broker import Mosquitto

CHILD = r"""
import asyncio, json, sys, time
from pathlib import Path
from gateway.config.sections import BufferConfig
from gateway.observe.metrics import Metrics
from gateway.buffer.outbox import Outbox, Pending

path, n, acked = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])

async def main():
    box = Outbox(BufferConfig(path=path, durability_window_ms=10_000), Metrics(),
                 chunk_events=10)
    box.open()
    seqs = []
    for i in range(n // 10):
        seqs += await box.submit_many(
            [Pending(time.time(), "card.read", None, f'"i":{i * 10 + j}}}') for j in range(10)])
    sent = 0
    for batch in await box.fetch(0, 100, 10, 1 << 20):
        if sent >= acked:
            break
        await box.ack(batch)
        sent += batch.count
    print(json.dumps({"committed": seqs, "acked": sent}), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def pending(i: int) -> Pending:
    return Pending(time.time(), "card.read", None, f'"i":{i}}}')


def crash(path: Path, n: int, acked: int = 0) -> dict[str, list[int] | int]:
    """Run the outbox in a child, let it commit ``n`` events, then SIGKILL it."""
    report: dict[str, list[int] | int] = _killed_after_first_line(
        CHILD, str(path), str(n), str(acked)
    )
    return report


def _killed_after_first_line(child_code: str, *args: str) -> Any:
    """Run ``child_code`` in a child, SIGKILL it once it prints a line; that line's JSON."""
    child = subprocess.Popen(
        [sys.executable, "-c", child_code, *args], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout is not None
    with child.stdout:
        line = child.stdout.readline()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    assert line, "the child died before it committed"
    return json.loads(line)


def power_cut(path: Path, keep_stage_bytes: int = 0) -> None:
    """What a reboot takes after the crash: unsynced stage bytes and the RAM marker."""
    stage = stage_path(path)
    with stage.open("r+b") as f:
        f.truncate(keep_stage_bytes)
    marker = marker_path(path)
    if keep_stage_bytes == 0 and marker is not None:
        marker.unlink(missing_ok=True)


def reopen(path: Path, window_ms: float = 500.0) -> tuple[list[int], int]:
    """Open the buffer again: (the seqs it holds, the seq the next event gets)."""

    async def run() -> tuple[list[int], int]:
        box = Outbox(BufferConfig(path=path, durability_window_ms=window_ms), Metrics())
        box.open()
        held: list[int] = []
        after = 0
        while batches := await box.fetch(after, 10, 1000, 1 << 22):
            for b in batches:
                held += list(range(b.lo, b.hi + 1))
                after = b.hi
        (nxt,) = await box.submit_many([pending(-1)])
        box.close()
        return held, nxt

    return asyncio.run(run())


def db_last_seq(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
        return int(row[0]) if row else 0
    finally:
        conn.close()


def test_the_window_is_a_setting_with_a_default() -> None:
    assert BufferConfig(path=Path("b.db")).durability_window_ms == 500
    assert BufferConfig(path=Path("b.db"), durability_window_ms=0).durability_window_ms == 0
    with pytest.raises(ValidationError):
        BufferConfig(path=Path("b.db"), durability_window_ms=-1)


@pytest.mark.parametrize("window_ms", [0, 300])
def test_events_reach_the_database_once_per_window(tmp_path: Path, window_ms: float) -> None:
    """With a window the database gets the events when it ends, not per commit; with 0
    every group commit is in the database when its future resolves."""
    path = tmp_path / "b.db"

    async def run() -> None:
        box = Outbox(BufferConfig(path=path, durability_window_ms=window_ms), Metrics())
        box.open()
        seqs = await box.submit_many([pending(i) for i in range(5)])
        stored_at_once = db_last_seq(path)
        assert (await box.stats())["last_seq"] == seqs[-1]  # status counts the window
        deadline = time.monotonic() + 10
        while db_last_seq(path) < seqs[-1] and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert db_last_seq(path) == seqs[-1], "the window ended and nothing was stored"
        box.close()
        if window_ms:
            assert stored_at_once == 0, "a window commits once, at its end"
        else:
            assert stored_at_once == seqs[-1]
        assert not stage_path(path).exists(), "a clean close leaves no stage"

    asyncio.run(run())


def test_kill_9_loses_no_committed_event_and_skips_no_seq(tmp_path: Path) -> None:
    path = tmp_path / "b.db"
    report = crash(path, 200, acked=50)
    committed, acked = report["committed"], report["acked"]
    assert isinstance(committed, list) and isinstance(acked, int)
    assert db_last_seq(path) == 0, "the window (10 s) had not ended: only the stage held them"
    held, nxt = reopen(path)
    assert held == committed[acked:], "an acknowledged event came back, or one was lost"
    assert nxt == committed[-1] + 1, "numbering goes on without a gap after a crash"


def test_a_power_cut_never_reuses_a_seq(tmp_path: Path) -> None:
    """The stage went with the page cache: its events are the documented loss, and the
    next seq is past every seq handed out (the broker may have seen them)."""
    path = tmp_path / "b.db"
    committed = crash(path, 200)["committed"]
    assert isinstance(committed, list)
    power_cut(path)
    held, nxt = reopen(path)
    assert held == []
    assert nxt > committed[-1], f"seq {nxt} was handed out before the cut, for other content"
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


def test_a_stage_that_lost_pages_is_not_trusted(tmp_path: Path) -> None:
    """Unsynced pages lost without a reboot (the marker survived): what is whole is
    replayed, and numbering still jumps past every seq that may have been sent."""
    path = tmp_path / "b.db"
    committed = crash(path, 200)["committed"]
    assert isinstance(committed, list)
    power_cut(path, keep_stage_bytes=stage_path(path).stat().st_size // 2)
    held, nxt = reopen(path)
    assert held == committed[: len(held)] and 0 < len(held) < len(committed)
    assert nxt > committed[-1]


def test_with_no_window_a_crash_is_replayed_as_before(tmp_path: Path) -> None:
    """A stage left by a crash is replayed even if the window was since set to 0."""
    path = tmp_path / "b.db"
    committed = crash(path, 100)["committed"]
    held, nxt = reopen(path, window_ms=0)
    assert held == committed
    assert isinstance(committed, list) and nxt == committed[-1] + 1
    assert not stage_path(path).exists()


CHILD_KEPT = r"""
import asyncio, json, sys, time
from pathlib import Path
from gateway.config.sections import BufferConfig
from gateway.observe.metrics import Metrics
from gateway.buffer.outbox import Outbox, Pending

path = Path(sys.argv[1])

def events(k):
    return [Pending(time.time(), "card.read", None, f'"i":{k * 10 + j}}}') for j in range(10)]

async def main():
    box = Outbox(BufferConfig(path=path, durability_window_ms=1000), Metrics(),
                 chunk_events=10)
    box.open()
    a = await box.submit_many(events(0))
    await asyncio.sleep(0.6)
    b = await box.submit_many(events(1))
    await asyncio.sleep(0.1)
    c = await box.submit_many(events(2))
    [batch] = await box.fetch(b[-1], 1, 10, 1 << 20)
    await box.ack(batch)  # c delivered; b waits
    await asyncio.sleep(0.5)  # a's window ends: a is stored, b is kept staged
    print(json.dumps({"committed": a + b + c, "acked": len(c)}), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_rows_kept_staged_across_a_commit_survive_kill_9(tmp_path: Path) -> None:
    """A window's timer stores only rows a whole window old; younger ones stay staged.
    After kill -9 they come back, and numbering goes on past the delivered ones."""
    path = tmp_path / "b.db"
    child = subprocess.Popen([sys.executable, "-c", CHILD_KEPT, str(path)], stdout=subprocess.PIPE)
    assert child.stdout is not None
    with child.stdout:
        line = child.stdout.readline()
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=10)
    committed = json.loads(line)["committed"]
    held, nxt = reopen(path)
    assert held == committed[:20], "a kept row was lost, or a delivered one came back"
    assert nxt == committed[-1] + 1, "a delivered seq would be reused"


# -- skipped seqs are declared (contract README, "Delivery semantics") ---------------------


def stored_skipped(path: Path) -> list[list[int]] | None:
    """The declaration as stored (meta ``skipped_seqs``), read from the file."""
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'skipped_seqs'").fetchone()
        return json.loads(row[0]) if row else None
    finally:
        conn.close()


def skipped_after_reopen(path: Path) -> list[tuple[int, int]]:
    async def run() -> list[tuple[int, int]]:
        box = Outbox(BufferConfig(path=path), Metrics())
        box.open()
        try:
            return box.skipped
        finally:
            box.close()

    return asyncio.run(run())


def footfall(i: int) -> Pending:
    """An event the fake central accepts (it validates against the contract's schemas)."""
    attrs = {"zone": "entrance", "window_start": "2026-11-22T10:00:00Z", "window_s": 900,
             "count": i + 1}  # fmt: skip
    tail = event_tail(
        type_="footfall", at=time.time(), source="door-cam", subject=None, purposes=[],
        attrs=attrs,
    )  # fmt: skip
    return Pending(time.time(), "footfall", None, tail)


CHILD_VALID = r"""
import asyncio, json, sys, time
from pathlib import Path
from gateway.config.sections import BufferConfig
from gateway.observe.metrics import Metrics
from gateway.buffer.outbox import Outbox
from tests.gateway.buffer.test_outbox_window import footfall

path, n = Path(sys.argv[1]), int(sys.argv[2])

async def main():
    box = Outbox(BufferConfig(path=path, durability_window_ms=10_000), Metrics())
    box.open()
    seqs = []
    for i in range(n // 10):
        seqs += await box.submit_many([footfall(i * 10 + j) for j in range(10)])
    print(json.dumps({"committed": seqs}), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def crash_valid(path: Path, n: int) -> list[int]:
    """Like ``crash``, with events the fake central accepts, and nothing fetched (a
    backlog fetch would commit the staged rows)."""
    committed: list[int] = _killed_after_first_line(CHILD_VALID, str(path), str(n))["committed"]
    return committed


def test_a_power_cuts_skipped_seqs_are_declared_until_a_puback(tmp_path: Path) -> None:
    """Each cut's skipped range is stored at the restart, kept across a restart and a
    further cut, sent through a real broker to the fake central in a batch with no
    events, and forgotten only after its PUBACK; the central's seqs are then gapless but
    for the declared ranges."""
    path = tmp_path / "b.db"
    first = crash_valid(path, 200)
    power_cut(path)
    skipped = skipped_after_reopen(path)
    assert len(skipped) == 1 and skipped[0][0] == 1 and skipped[0][1] >= first[-1], skipped
    assert stored_skipped(path) == [list(skipped[0])], "stored with the recovery"
    assert skipped_after_reopen(path) == skipped, "a clean restart keeps the declaration"
    second = crash_valid(path, 100)  # a further cut before anything was sent
    power_cut(path)
    assert second[0] == skipped[0][1] + 1
    skipped = skipped_after_reopen(path)
    assert len(skipped) == 2 and skipped[1][0] == second[0] and skipped[1][1] >= second[-1]

    async def run(broker: Mosquitto, central: Central) -> None:
        metrics = Metrics()
        box = Outbox(BufferConfig(path=path), metrics)
        box.open()
        pub = PahoPublisher(
            MqttConfig(host="127.0.0.1", port=broker.port), client_id="gw-skipped",
            will_topic="touchpoint/v1/nl-ams-001/gw-01/status", will_payload=b"{}",
            metrics=metrics,
        )  # fmt: skip
        fwd = Forwarder(
            box, pub, MqttConfig(), store="nl-ams-001", device="gw-01",
            topic="touchpoint/v1/nl-ams-001/gw-01/events", metrics=metrics,
        )  # fmt: skip
        await pub.start()
        task = asyncio.create_task(fwd.run())
        try:
            seqs = await box.submit_many([footfall(i) for i in range(20)])
            assert seqs[0] == skipped[1][1] + 1
            name = f"nl-ams-001/gw-01/{box.stream}"
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and (
                box.skipped or stored_skipped(path) is not None or central.stats()["accepted"] < 20
            ):
                await asyncio.sleep(0.05)
            assert central.skipped(name) == skipped, central.stats()
            assert box.skipped == [] and stored_skipped(path) is None, "not forgotten"
            assert central.stats()["declarations"] == 1 and central.stats()["invalid_total"] == 0
            assert central.gaps() == {}, "every seq received or declared"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await pub.close()
            box.close()

    with Mosquitto(tmp_path / "mosquitto") as broker:
        central = Central("127.0.0.1", broker.port)
        central.start()
        try:
            assert central.wait_subscribed(10)
            asyncio.run(run(broker, central))
        finally:
            central.stop()
    assert skipped_after_reopen(path) == [], "a confirmed declaration is not sent again"


def test_the_declarations_kept_are_bounded(tmp_path: Path) -> None:
    """A box cut again and again while offline keeps the newest SKIPPED_MAX ranges."""
    path = tmp_path / "b.db"
    crash(path, 10)
    power_cut(path)
    skipped_after_reopen(path)
    old = [[i * 10 + 1, i * 10 + 5] for i in range(SKIPPED_MAX)]
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'skipped_seqs'", (json.dumps(old),))
    conn.commit()
    conn.close()
    crash(path, 10)
    power_cut(path)
    skipped = skipped_after_reopen(path)
    assert len(skipped) == SKIPPED_MAX
    assert [list(r) for r in skipped[:-1]] == old[1:], "the oldest goes first"
    assert skipped[-1][0] > old[-1][1]


def test_a_quiet_box_stores_its_bookkeeping_without_a_next_event(tmp_path: Path) -> None:
    """An event delivered within its window leaves only bookkeeping (last_seq, the last
    publish) for the database, stored at most once a second; when its window ends
    sooner than that, the writer must still wake up for it: a quiet box must not keep
    last_seq and last_publish_at stale in the file until its next event comes."""
    path = tmp_path / "b.db"

    async def run() -> None:
        box = Outbox(BufferConfig(path=path, durability_window_ms=200), Metrics())
        box.open()
        try:
            first = await box.submit_many([pending(0)])
            deadline = time.monotonic() + 5
            while db_last_seq(path) < first[-1] and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert db_last_seq(path) == first[-1]  # a window's commit: bookkeeping due in 1 s
            second = await box.submit_many([pending(1)])
            (batch,) = await box.fetch(first[-1], 10, 100, 1 << 20)
            await box.ack(batch)  # delivered within its window: only bookkeeping is left
            deadline = time.monotonic() + 5
            while db_last_seq(path) < second[-1] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert db_last_seq(path) == second[-1], "no next event: the bookkeeping waited"
        finally:
            box.close()

    asyncio.run(run())


@pytest.mark.slow
def test_a_near_full_buffer_keeps_a_group_whose_window_commit_failed(tmp_path: Path) -> None:
    """Over half full, each group goes to the database after the window's rows; when that
    window commit fails (here another process holds the write lock past the busy timeout),
    the group is kept staged, like any other, and stored by a later window.  Before, it
    was neither stored nor refused: its future resolved with no seqs and it was gone,
    uncounted."""
    path = tmp_path / "b.db"

    async def run() -> None:
        cfg = BufferConfig(path=path, max_bytes=1 << 20, durability_window_ms=200)
        box = Outbox(cfg, Metrics())
        box.open()
        try:
            big = "x" * 2000
            await box.submit_many(
                [Pending(time.time(), "card.read", None, f'"i":{i},"p":"{big}"}}')
                for i in range(400)]
            )  # fmt: skip
            assert box._near_full, "the buffer should be over half of max_bytes"
            (batch, *_) = await box.fetch(0, 1, 10, 1 << 20)
            await box.ack(batch)  # the window now holds work: an ack to store
            other = sqlite3.connect(path, isolation_level=None)
            other.execute("BEGIN IMMEDIATE")  # a sqlite3 shell holding the write lock
            try:
                seqs = await box.submit_many([pending(i) for i in range(3)])
            finally:
                other.execute("ROLLBACK")
                other.close()
            assert isinstance(seqs, list) and len(seqs) == 3, f"the group was lost: {seqs!r}"
            deadline = time.monotonic() + 10
            while db_last_seq(path) < seqs[-1] and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert db_last_seq(path) == seqs[-1]
            held = await box.fetch(seqs[0] - 1, 10, 100, 1 << 20)
            assert [s for b in held for s in range(b.lo, b.hi + 1)] == seqs
        finally:
            box.close()

    asyncio.run(run())
