"""Policies for subjects without consent, with an injected clock and a real outbox.

hold: released to the outbox when consent arrives within the TTL, erased at the TTL,
persisted across restarts; aggregate: footfall per zone and window, counts below k
suppressed; every outcome counted.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from gateway.consent.policy import ConsentPolicy, FootfallAggregator, Outcome
from gateway.contract.events import EventEncoder
from gateway.observe.metrics import Metrics
from simulators.central.contract_schemas import contract_schemas
from tests.gateway.consent_helpers import Clock, Rig, card, enter

A, B = "k1:" + "a" * 22, "k1:" + "b" * 22
LINKING = frozenset({"linking"})


def test_hold_is_released_when_consent_arrives_in_time(tmp_path: Path) -> None:
    async def run() -> None:
        clock = Clock()
        rig = Rig(tmp_path / "b.db", clock, policy_name="hold", hold_ttl_s=60)
        await rig.open()
        t0 = clock()
        assert not rig.accept(card(A, t0))
        assert not rig.accept(enter(A, t0 + 1))
        assert not rig.accept(card(B, t0 + 2))
        hold = rig.policy.hold
        assert hold is not None and len(hold) == 3
        clock.t += 30
        rig.tick()
        assert len(hold) == 3
        # Consent for linking only: the card read goes out, the presence event waits.
        applied = await rig.updater.apply_records([(A, LINKING, None)])
        assert applied.released == 1
        await rig.outbox._submit_read(lambda c: None)
        events = rig.events()
        assert [(e["type"], e["subject"], e["purposes"]) for e in events] == [
            ("card.read", A, ["linking"])
        ]
        assert events[0]["ts"] == "2023-11-14T22:13:20Z", "the capture time is kept"
        assert len(hold) == 2
        held = await rig.outbox._submit_read(
            lambda c: c.execute("SELECT subject, type FROM held ORDER BY id").fetchall()
        )
        assert held == [(A, "presence.enter"), (B, "card.read")]
        m = rig.metrics
        assert m.get("consent_policy_total", policy="hold", outcome="held") == 3
        assert m.get("consent_policy_total", policy="hold", outcome="released") == 1
        rig.close()

    asyncio.run(run())


def test_hold_expires_at_the_ttl_and_survives_restart(tmp_path: Path) -> None:
    async def run() -> None:
        clock = Clock()
        rig = Rig(tmp_path / "b.db", clock, policy_name="hold", hold_ttl_s=60)
        await rig.open()
        assert not rig.accept(card(A, clock()))
        clock.t += 40
        assert not rig.accept(card(B, clock()))
        rig.close()

        rig = Rig(tmp_path / "b.db", clock, policy_name="hold", hold_ttl_s=60)
        await rig.open()
        hold = rig.policy.hold
        assert hold is not None and len(hold) == 2, "held readings survive a restart"
        clock.t += 21  # A is 61 s old, B 21 s
        rig.tick()
        assert len(hold) == 1 and hold.subjects() == {B}
        assert rig.metrics.get("consent_policy_total", policy="hold", outcome="hold_expired") == 1
        # Consent for A arrives too late: nothing is released.
        applied = await rig.updater.apply_records([(A, LINKING, None), (B, LINKING, None)])
        assert applied.released == 1
        await rig.outbox._submit_read(lambda c: None)
        assert [e["subject"] for e in rig.events()] == [B]
        rows = await rig.outbox._submit_read(
            lambda c: c.execute("SELECT count(*) FROM held").fetchone()
        )
        assert rows == (0,)
        rig.close()
        # The expired held row is gone: what remains is the consent row and its key index.
        assert (tmp_path / "b.db").read_bytes().count(A.encode()) == 2

    asyncio.run(run())


def test_hold_is_bounded(tmp_path: Path) -> None:
    async def run() -> None:
        rig = Rig(tmp_path / "b.db", Clock(), policy_name="hold")
        await rig.open()
        assert rig.policy.hold is not None
        rig.policy.hold.max_entries = 2
        outcomes = [rig.policy.denied(card(A, rig.clock()), rig.clock()) for _ in range(3)]
        assert outcomes == ["held", "held", "dropped_hold_full"]
        rig.close()

    asyncio.run(run())


def test_footfall_counts_per_zone_and_window_and_suppresses_below_k(tmp_path: Path) -> None:
    async def run() -> None:
        clock = Clock(1_700_000_400.0)  # window_s 60: windows start at multiples of 60
        rig = Rig(tmp_path / "b.db", clock, policy_name="aggregate", k=5, window_s=60)
        await rig.open()
        start = int(clock()) // 60 * 60
        for i in range(5):
            assert not rig.accept(enter(f"k1:{i:022d}", start + i, zone="entrance"))
        for i in range(4):
            assert not rig.accept(enter(f"k1:{i:022d}", start + i, zone="fitting"))
        assert not rig.accept(card(A, start + 1))  # no zone: nothing to count
        clock.t = start + 59
        rig.tick()
        assert rig.accepted == [], "a window is sent once it has ended"
        clock.t = start + 60
        rig.tick()
        assert [(r.type, r.subject, dict(r.attrs)) for r in rig.accepted] == [
            (
                "footfall",
                None,
                {
                    "zone": "entrance",
                    "window_start": "2023-11-14T22:20:00Z",
                    "window_s": 60,
                    "count": 5,
                },
            )
        ]
        m = rig.metrics
        assert m.get("footfall_windows_total", outcome="suppressed") == 1
        assert m.get("consent_policy_total", policy="aggregate", outcome="aggregated") == 9
        assert m.get("consent_policy_total", policy="aggregate", outcome="dropped") == 1
        await rig.outbox._submit_read(lambda c: None)
        (event,) = rig.events()
        assert "subject" not in event and event["purposes"] == []
        contract_schemas().check("event.json", event)
        raw = (tmp_path / "b.db").read_bytes() + (tmp_path / "b.db-wal").read_bytes()
        assert b"k1:000000" not in raw, "no subject is stored under aggregate"
        rig.close()

    asyncio.run(run())


def test_late_reading_counts_into_the_open_window() -> None:
    agg = FootfallAggregator(Metrics(), k=1, window_s=10)
    agg.add("s", "z", 100)
    assert [r.attrs["count"] for r in agg.flush(110)] == [1]
    agg.add("s", "z", 105)  # its window was sent already
    agg.add("s", "z", 112)
    (late,) = agg.flush(120)
    assert late.attrs["window_start"] == "1970-01-01T00:01:50Z" and late.attrs["count"] == 2
    assert agg.flush(1000) == []


def test_footfall_event_encodes_to_the_contract() -> None:
    agg = FootfallAggregator(Metrics(), k=2, window_s=900)
    agg.add("entrance-ble", "entrance", 1_700_000_000)
    agg.add("entrance-ble", "entrance", 1_700_000_001)
    (r,) = agg.flush(1_700_100_000)
    tail = EventEncoder(r.type, r.source).tail(r.at, None, "[]", r.attrs)
    contract_schemas().check("event.json", json.loads('{"seq":1,' + tail))


def test_policy_needs_its_parts() -> None:
    from gateway.consent.registry import ConsentRegistry

    reg = ConsentRegistry({}, Metrics())
    with pytest.raises(ValueError, match="HoldQueue"):
        ConsentPolicy("hold", reg, Metrics())
    with pytest.raises(ValueError, match="FootfallAggregator"):
        ConsentPolicy("aggregate", reg, Metrics())
    drop = ConsentPolicy("drop", reg, Metrics())
    outcome = drop.denied(card(A, 0), 0)
    assert outcome is Outcome.DROPPED and outcome.dropped and outcome == "dropped"
    assert drop.on_consent([A], 0) == [] and drop.tick(0) == []


def test_outcomes_are_values_that_say_whether_the_reading_is_gone() -> None:
    gone = {o for o in Outcome if o.dropped}
    assert gone == {Outcome.DROPPED, Outcome.DROPPED_WITHDRAWN, Outcome.DROPPED_HOLD_FULL}
    assert not Outcome.HELD.dropped and not Outcome.AGGREGATED.dropped


def test_decisions_are_counted_by_reason(tmp_path: Path) -> None:
    async def run() -> None:
        clock = Clock()
        rig = Rig(tmp_path / "b.db", clock)
        await rig.open()
        rig.registry.apply([(A, frozenset({"analytics"}), clock() + 5)], "sync", clock())
        assert rig.accept(enter(A, clock()))
        assert not rig.accept(card(A, clock()))  # purpose_missing
        assert not rig.accept(card(B, clock()))  # unknown_subject
        assert not rig.accept(type(card(A, 0))("receipt.scan", "x", clock(), A, {}))  # no_policy
        clock.t += 6
        assert not rig.accept(enter(A, clock()))  # expired
        await rig.eraser.erase([B])
        assert not rig.accept(card(B, clock()))  # withdrawn
        got = {
            (d["decision"], d["reason"]): v
            for name, d, v in rig.metrics.counters()
            if name == "consent_decisions_total"
        }
        assert got == {
            ("pass", "consented"): 1,
            ("drop", "purpose_missing"): 1,
            ("drop", "unknown_subject"): 1,
            ("drop", "no_policy"): 1,
            ("drop", "expired"): 1,
            ("drop", "withdrawn"): 1,
        }
        rig.close()

    asyncio.run(run())
