"""The outbox's single writer thread cannot die unnoticed (issue 14, item 3).

An exception the writer does not expect (not a SQLite error) used to end the thread
silently: later events were lost, ``buffer_write_ok`` stayed 1 and every awaiting caller
hung.  Now it is counted and logged, health turns red at once, every pending and later
command fails with ``WriterDied``, and ``failed`` resolves (the daemon exits on it).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.buffer.consent_store import ConsentStore
from gateway.buffer.outbox import Outbox, Pending
from gateway.config.sections import BufferConfig
from gateway.errors import WriterDied
from gateway.observe.health import HealthMonitor
from gateway.observe.metrics import Metrics


@dataclass
class Subject:
    """What the health monitor reads (the daemon's attributes), without a daemon."""

    metrics: Metrics
    last_stats: dict[str, Any] = field(default_factory=dict)
    publisher: None = None


def event(i: int) -> Pending:
    return Pending(time.time(), "card.read", "k1:" + "A" * 22, f'"type":"card.read","i":{i}}}')


def test_a_lone_surrogate_in_a_consent_row_fails_loudly_not_silently(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The original bug, on the real writer: a subject that cannot be encoded."""

    async def run() -> None:
        metrics = Metrics()
        outbox = Outbox(BufferConfig(path=tmp_path / "b.db"), metrics)
        outbox.open()
        monitor = HealthMonitor(Subject(metrics))
        assert monitor.report()[0]
        row = ("k1:\ud800", '["linking"]', None, "sync", 0.0)
        with pytest.raises(WriterDied):
            await asyncio.wait_for(ConsentStore(outbox).save([row]), 10)
        assert isinstance(await asyncio.wait_for(outbox.failed, 10), WriterDied)
        assert metrics.get("buffer_writer_failures_total") == 1
        assert metrics.get("buffer_write_ok") == 0
        healthy, doc = monitor.report()
        assert not healthy and not doc["buffer"]["last_write_ok"]
        assert any("buffer writer stopped" in p for p in doc["problems"])
        # Everything later fails at once: events are counted lost, reads do not hang.
        fut, _ = outbox.submit(event(1))
        with pytest.raises(WriterDied):
            await asyncio.wait_for(fut, 10)
        with pytest.raises(WriterDied):
            await asyncio.wait_for(outbox.stats(), 10)
        assert metrics.get("events_dropped_total", reason="buffer_error") == 1
        assert outbox.outstanding == 0
        outbox.close()  # does not hang

    with caplog.at_level("CRITICAL"):
        asyncio.run(run())
    assert "buffer writer stopped" in caplog.text
    assert "\ud800" not in caplog.text


def test_a_database_changed_under_the_writer_fails_every_queued_command(tmp_path: Path) -> None:
    """A value the writer's own read cannot parse (written by another process) ends
    the thread; the commands queued behind it fail instead of hanging."""

    async def run() -> None:
        metrics = Metrics()
        outbox = Outbox(BufferConfig(path=tmp_path / "b.db"), metrics)
        outbox.open()
        await outbox.submit(event(1))[0]
        other = sqlite3.connect(tmp_path / "b.db")
        other.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('last_publish_at', 'x')")
        other.commit()
        other.close()
        futures: list[asyncio.Future[Any]] = [outbox.stats()]
        futures += [outbox.submit_many([event(i)]) for i in range(2, 5)]
        futures.append(outbox._submit_read(lambda c: 1))
        results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 10)
        assert all(isinstance(r, WriterDied) for r in results), results
        assert outbox.failed.done()
        assert metrics.get("events_dropped_total", reason="buffer_error") == 3
        outbox.close()

    asyncio.run(run())
