"""Wall-clock steps under load: a Pi that booted without RTC, then NTP, then a correction.

The real daemon object (as ``touchpoint-gateway run`` builds it) runs a synthetic card
source against a real mosquitto and the fake central, with its wall clock injected: it
starts in 1970, NTP steps it forward ~56 years, then a correction steps it back an hour.
Events are stamped with whatever the clock says (that is when they happened, as far as
the box knows); ``seq`` alone orders them, so nothing is lost, duplicated or refused.
Presence timing (monotonic) and token validity under steps are tested with the BLE
driver and the tokens; retention under an unset clock with the outbox.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.app.daemon import Gateway
from gateway.buffer.outbox import buffer_stats, connect
from gateway.config.loading import load_config
from gateway.identity.clock import clock_state
from simulators.central.service import Central
from simulators.infra.broker import Mosquitto
from tests.fleet.fleet_harness import consented_subjects, write_gateway_dir

pytestmark = pytest.mark.slow


class SteppedClock:
    """time.time() plus an offset the test changes: what NTP does to a running box."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def __call__(self) -> float:
        return time.time() + self.offset


def _year(ts: str) -> int:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).year


def test_clock_steps_forward_and_back_under_load(tmp_path: Path, broker: Mosquitto) -> None:
    config = write_gateway_dir(
        tmp_path / "gw",
        store="nl-ams-001",
        device="gw-clock",
        port=broker.port,
        rate=100,
        reconnect_min=0.2,
        reconnect_max=1,
        subjects=consented_subjects(),
    )
    central = Central("127.0.0.1", broker.port, out=tmp_path / "events.jsonl")
    central.start()
    assert central.wait_subscribed()
    clock = SteppedClock(offset=1_000.0 - time.time())  # booted without RTC: 1970
    gw = Gateway(load_config(config), now=clock, config_path=config)

    async def scenario() -> None:
        task = asyncio.create_task(gw.run(install_signals=False))
        await asyncio.wait_for(gw.ready.wait(), 30)
        await asyncio.sleep(1.5)
        clock.offset = 0.0  # NTP: the real time, ~56 years later
        await asyncio.sleep(1.5)
        clock.offset = -3_600.0  # a correction: one hour back
        await asyncio.sleep(1.5)
        gw.stop_event.set()  # a normal stop drains the buffer first
        await asyncio.wait_for(task, 60)

    try:
        asyncio.run(scenario())
        conn = connect(tmp_path / "gw" / "buffer.db", readonly=True)
        try:
            buffered = buffer_stats(conn, time.time())
        finally:
            conn.close()
        assert buffered["depth"] == 0 and buffered["dead_letters"] == 0, buffered
        central.wait_for(lambda s: s["accepted"] >= buffered["last_seq"], timeout=30)
    finally:
        central.stop()
    stats = central.stats()
    assert stats["invalid_total"] == 0 and stats["duplicates"] == 0, stats
    lines = (tmp_path / "events.jsonl").read_text(encoding="utf-8").splitlines()
    events = [json.loads(line) for line in lines]
    assert {e["type"] for e in events} == {"card.read"}
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), "every event, once, in seq order"
    years = [_year(e["ts"]) for e in events]
    now_year = datetime.now(UTC).year
    assert 1970 in years and now_year in years, sorted(set(years))
    # seq order is creation order, whatever the clock said: the 1970 events come first,
    # and the hour-back correction makes ts go backwards while seq keeps increasing.
    first_real = years.index(now_year)
    assert set(years[:first_real]) == {1970} and set(years[first_real:]) == {now_year}
    # the clock flag: never a silent 1970; real-time events carry it exactly when the
    # kernel says the clock is not synchronised (a container or a Pi before NTP)
    assert all(e.get("clock") == "unsynced" for e in events[:first_real])
    kernel_unsynced = clock_state(time.time()) != "synchronized"
    later = [e.get("clock") for e in events[first_real:]][25:]  # past the 1 s refresh
    assert later and set(later) == ({"unsynced"} if kernel_unsynced else {None}), set(later)
    stamps = [
        datetime.strptime(e["ts"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
        for e in events[first_real:]
    ]
    assert any(b < a - 3_000 for a, b in itertools.pairwise(stamps)), (
        "the correction shows as ts stepping back an hour between consecutive seqs"
    )
