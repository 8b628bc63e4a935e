"""The forwarder's window, batching and verdict handling, against an in-process publisher."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.buffer.outbox import Outbox, Pending
from gateway.config.sections import BufferConfig, MqttConfig
from gateway.observe.metrics import Metrics
from gateway.ports import Verdict
from gateway.uplink.forwarder import Forwarder
from tests.fakes import FakePublisher
from tests.waiting import until


@dataclass
class Forwarding:
    box: Outbox
    fwd: Forwarder
    metrics: Metrics
    task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self.fwd.run())


@asynccontextmanager
async def forwarding(
    path: Path,
    pub: FakePublisher,
    cfg: MqttConfig | None = None,
    *,
    topic: str = "t",
    start: bool = True,
    chunk_events: int = 500,
    chunk_bytes: int = 255 * 1024,
) -> AsyncIterator[Forwarding]:
    """An outbox at ``path`` and a forwarder from it to ``pub`` (running, unless ``start``
    is False: then ``.start()`` it); stopped and closed on the way out."""
    metrics = Metrics()
    box = Outbox(
        BufferConfig(path=path), metrics, chunk_events=chunk_events, chunk_bytes=chunk_bytes
    )
    box.open()
    fwd = Forwarder(
        box, pub, cfg or MqttConfig(), store="s1", device="d1", topic=topic, metrics=metrics
    )
    f = Forwarding(box, fwd, metrics)
    if start:
        f.start()
    try:
        yield f
    finally:
        if f.task is not None:
            f.task.cancel()
            await asyncio.gather(f.task, return_exceptions=True)
        box.close()


def test_window_batches_and_verdicts(tmp_path: Path) -> None:
    async def run() -> None:
        cfg = MqttConfig(inflight_window=3, batch_max_events=10, batch_max_bytes=1024 * 1024)
        pub = FakePublisher()
        async with forwarding(tmp_path / "b.db", pub, cfg, topic="t/events", chunk_events=10) as f:
            box, metrics = f.box, f.metrics
            await box.submit_many(
                [
                    Pending(time.time(), "card.read", "k1:x", f'"type":"card.read","i":{i}}}')
                    for i in range(95)
                ]
            )
            await until(lambda: len(pub.sent) == 3)
            await asyncio.sleep(0.05)
            assert pub.outstanding == 3, "never more than the window in flight"
            # Settle out of order: the third succeeds, the first is refused (not authorized).
            pub.sent[2][2].set_result(Verdict(ok=True))
            pub.sent[0][2].set_result(Verdict(ok=False, reason_code=0x87, reason="Not authorized"))
            await until(lambda: len(pub.sent) == 5)
            while pub.outstanding:
                pub.settle_all()
                await asyncio.sleep(0.01)
            await until(lambda: metrics.get("events_forwarded_total") == 85)
            assert pub.max_outstanding == 3
            stats = await box.stats()
            assert stats["depth"] == 0 and stats["dead_letters"] == 10
            assert metrics.get("events_dead_lettered_total") == 10
            seqs = []
            for topic, payload, _ in pub.sent:
                batch = json.loads(payload)
                assert topic == "t/events"
                assert (batch["v"], batch["store"], batch["device"], batch["stream"]) == (
                    1,
                    "s1",
                    "d1",
                    box.stream,
                )
                s = [e["seq"] for e in batch["events"]]
                assert s == sorted(s) and 1 <= len(s) <= 10
                seqs += s
            assert sorted(seqs) == list(range(1, 96)), "each event published exactly once"

    asyncio.run(run())


def test_batches_respect_the_byte_limit(tmp_path: Path) -> None:
    async def run() -> None:
        cfg = MqttConfig(inflight_window=50, batch_max_events=500, batch_max_bytes=4096)
        pub = FakePublisher()
        async with forwarding(tmp_path / "b.db", pub, cfg, chunk_bytes=4096 - 1024) as f:
            pad = "p" * 300
            await f.box.submit_many(
                [Pending(time.time(), "card.read", None, f'"pad":"{pad}"}}') for _ in range(100)]
            )
            await until(lambda: sum(len(json.loads(p)["events"]) for _, p, _ in pub.sent) == 100)
            assert all(len(p) <= 4096 for _, p, _ in pub.sent)

    asyncio.run(run())


class LimitedPublisher(FakePublisher):
    """A fake publisher whose broker announced a Maximum Packet Size and Receive Maximum."""

    def __init__(self, max_payload: int | None = None, receive_maximum: int | None = None):
        super().__init__()
        self.limit, self.receive_maximum = max_payload, receive_maximum

    def max_payload(self, topic: str) -> int | None:
        return self.limit

    def abandon_all(self) -> None:
        """The link drops: no verdict comes for what waits."""
        self._connected.clear()
        self.settle_all(Verdict(ok=False, abandoned=True))


def _events(payloads: list[bytes]) -> list[dict[str, object]]:
    return [e for p in payloads for e in json.loads(p)["events"]]


def test_abandoned_batches_are_read_again_from_the_outbox_without_the_erased(
    tmp_path: Path,
) -> None:
    from gateway.buffer.erasure_store import ErasureStore

    async def run() -> None:
        cfg = MqttConfig(inflight_window=2, batch_max_events=10, batch_max_bytes=1024 * 1024)
        pub = LimitedPublisher()
        async with forwarding(tmp_path / "b.db", pub, cfg, chunk_events=10) as f:
            box, fwd, metrics = f.box, f.fwd, f.metrics
            await box.submit_many(
                [
                    Pending(time.time(), "card.read", f"k1:s{i % 2}", f'"subject":"k1:s{i % 2}"}}')
                    for i in range(40)
                ]
            )
            await until(lambda: len(pub.sent) == 2)
            pub.abandon_all()  # both batches on the wire come back without a verdict
            await asyncio.sleep(0.05)
            assert len(pub.sent) == 2, "nothing is handed to the client while the link is down"
            fwd.withdrawn("k1:s1")  # a withdrawal during the outage
            await ErasureStore(box).erase(["k1:s1"], time.time())
            pub._connected.set()  # the link is back
            while metrics.get("events_forwarded_total") < 20:
                pub.settle_all()
                await asyncio.sleep(0.01)
            after = _events([p for _, p, _ in pub.sent[2:]])
            assert {e["subject"] for e in after} == {"k1:s0"}, "none of the leaver's"
            assert sorted(int(str(e["seq"])) for e in after) == list(range(1, 41, 2))
            assert (await box.stats())["depth"] == 0

    asyncio.run(run())


def test_batches_fit_the_brokers_limits(tmp_path: Path) -> None:
    """Stored chunks larger than the broker's maximum go in parts; the window keeps to
    its Receive Maximum; the rows go when every part is acknowledged."""

    async def run() -> None:
        cfg = MqttConfig(inflight_window=10, batch_max_events=500, batch_max_bytes=1024 * 1024)
        pub = LimitedPublisher(max_payload=2048, receive_maximum=3)
        async with forwarding(tmp_path / "b.db", pub, cfg, start=False, chunk_events=500) as f:
            box, fwd, metrics = f.box, f.fwd, f.metrics
            await box.submit_many(
                [
                    Pending(time.time(), "card.read", "k1:x", f'"type":"card.read","i":{i}}}')
                    for i in range(300)
                ]
            )
            f.start()
            while metrics.get("events_forwarded_total") < 300:
                await asyncio.sleep(0.01)
                assert pub.outstanding <= 3
                pub.settle_all()
            assert max(len(p) for _, p, _ in pub.sent) <= 2048
            assert sorted(int(str(e["seq"])) for e in _events([p for _, p, _ in pub.sent])) == list(
                range(1, 301)
            )
            assert pub.max_outstanding <= 3 and fwd.window == 3
            assert metrics.get("batches_split_total") >= 1

    asyncio.run(run())


def test_a_declaration_of_skipped_seqs_is_sent_until_a_success_puback(tmp_path: Path) -> None:
    """The outbox's skipped ranges go first, in a batch with no events, even with nothing
    else to send; an abandoned or refused declaration keeps them and is sent again; only
    a success PUBACK makes the outbox forget them (stored)."""
    from gateway.uplink import forwarder as forwarder_module
    from tests.gateway.buffer.test_outbox_window import crash_valid, power_cut, stored_skipped

    path = tmp_path / "b.db"
    crash_valid(path, 20)
    power_cut(path)

    async def run() -> None:
        pub = FakePublisher()
        async with forwarding(path, pub, start=False) as f:
            box = f.box
            ranges = box.skipped
            assert len(ranges) == 1
            f.start()
            try:
                await until(lambda: len(pub.sent) == 1)
                doc = json.loads(pub.sent[0][1])
                assert doc["events"] == [] and doc["skipped"] == [list(r) for r in ranges]
                pub.sent[0][2].set_result(Verdict(ok=False, reason="link lost", abandoned=True))
                await until(lambda: len(pub.sent) == 2)  # again, with no event to wake it
                assert json.loads(pub.sent[1][1]) == doc
                forwarder_module.DECLARE_RETRY_S = 0.2
                pub.sent[1][2].set_result(
                    Verdict(ok=False, reason_code=0x87, reason="Not authorized")
                )
                await asyncio.sleep(0.1)
                assert len(pub.sent) == 2, "a refused declaration is not sent again at once"
                assert box.skipped == ranges and stored_skipped(path) == [list(r) for r in ranges]
                await until(lambda: len(pub.sent) == 3)
                pub.sent[2][2].set_result(Verdict(ok=True))
                await until(lambda: stored_skipped(path) is None)
                assert box.skipped == []
                seqs = await box.submit_many([Pending(time.time(), "x", None, '"i":1}')])
                await until(lambda: len(pub.sent) == 4)
                doc = json.loads(pub.sent[3][1])
                assert "skipped" not in doc and [e["seq"] for e in doc["events"]] == seqs
            finally:
                forwarder_module.DECLARE_RETRY_S = 60.0

    asyncio.run(run())


def test_an_abandoned_batch_is_sent_again_on_a_quiet_box(tmp_path: Path) -> None:
    """A batch abandoned with the link (no PUBACK) is sent again once connected, even when
    no new event comes to wake the loop: a quiet store at night must not hold its last
    events until the morning's first one."""

    async def run() -> None:
        pub = FakePublisher()
        async with forwarding(tmp_path / "b.db", pub) as f:
            box = f.box
            seqs = await box.submit_many(
                [Pending(time.time(), "x", None, f'"i":{i}}}') for i in range(3)]
            )
            await until(lambda: len(pub.sent) == 1)
            first = json.loads(pub.sent[0][1])
            assert [e["seq"] for e in first["events"]] == seqs
            pub.sent[0][2].set_result(Verdict(ok=False, reason="link lost", abandoned=True))
            await until(lambda: len(pub.sent) == 2)  # no new event: nothing else wakes it
            assert json.loads(pub.sent[1][1]) == first
            pub.sent[1][2].set_result(Verdict(ok=True))
            deadline = time.monotonic() + 5
            while (await box.stats())["depth"] and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert (await box.stats())["depth"] == 0

    asyncio.run(run())


@pytest.mark.slow
def test_rows_a_failed_backlog_read_left_staged_are_sent_once_stored(tmp_path: Path) -> None:
    """A read from the database commits the durability window's rows first; when that
    commit fails (here another process holds the write lock past the busy timeout) the
    rows stay staged and the read does not see them.  On a quiet box the forwarder then
    waits for new events; a later window that stores them must wake it.  Before, nothing
    did: they waited for the next event."""

    async def run() -> None:
        metrics = Metrics()
        path = tmp_path / "b.db"
        box = Outbox(BufferConfig(path=path, durability_window_ms=2000), metrics)
        box.open()
        pub = FakePublisher()
        fwd = Forwarder(box, pub, MqttConfig(), store="s1", device="d1", topic="t", metrics=metrics)
        task = asyncio.create_task(fwd.run())
        other = sqlite3.connect(path, isolation_level=None)
        try:
            seqs = await box.submit_many(
                [Pending(time.time(), "x", None, f'"i":{i}}}') for i in range(3)]
            )
            await until(lambda: len(pub.sent) == 1)  # from memory: staged, not yet stored
            other.execute("BEGIN IMMEDIATE")  # a sqlite3 shell holding the write lock
            # the link drops: the forwarder reads the outbox again, from the database
            pub.sent[0][2].set_result(Verdict(ok=False, reason="link lost", abandoned=True))
            await until(lambda: metrics.get("buffer_write_ok") == 0, timeout=15)
            other.execute("ROLLBACK")  # the shell is gone: the next window stores them
            await until(lambda: len(pub.sent) == 2, timeout=10)
            assert [e["seq"] for e in json.loads(pub.sent[1][1])["events"]] == seqs
        finally:
            other.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            box.close()

    asyncio.run(run())
