"""Presence state machine with an injected clock: no sleeping anywhere."""

from __future__ import annotations

import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.ble.presence import (
    ENTER,
    EXIT,
    Decision,
    PresenceParams,
    PresenceTracker,
    PseudonymCache,
)
from gateway.identity.pseudonyms import Keyring
from tests.bench.ble import bench_adverts

P = PresenceParams(
    enter_rssi=-70,
    exit_rssi=-80,
    silence_s=10,
    min_dwell_s=5,
    window_s=5,
    window_samples=5,
    min_samples=3,
    max_tracks=100,
)


def feed(
    tracker: PresenceTracker, subject: str, curve: list[tuple[float, int]], zone: str = "z1"
) -> list[Decision]:
    out: list[Decision] = []
    for t, rssi in curve:
        out.extend(tracker.observe(subject, zone, rssi, now=t))
    return out


def steady(start: float, end: float, rssi: int, step: float = 1.0) -> list[tuple[float, int]]:
    n = int((end - start) / step)
    return [(start + i * step, rssi) for i in range(n + 1)]


def test_enter_after_min_dwell_then_exit_on_silence() -> None:
    tracker = PresenceTracker(P)
    out = feed(tracker, "s1", steady(100, 104, -60))
    assert out == []  # qualified at t=102 (3 samples), not yet held 5 s
    out = feed(tracker, "s1", steady(105, 120, -60))
    assert out == [Decision(ENTER, "s1", "z1", 102, {"zone": "z1", "rssi": -60})]
    assert tracker.tick(now=129) == []
    out = tracker.tick(now=130)
    assert out == [Decision(EXIT, "s1", "z1", 120, {"zone": "z1", "dwell_s": 18})]
    assert len(tracker) == 0


def test_median_ignores_spikes() -> None:
    tracker = PresenceTracker(P)
    # a far-away subject with two lucky spikes never enters
    curve = [(t, -90) for t in range(0, 30)]
    curve[5] = (5, -40)
    curve[6] = (6, -45)
    assert feed(tracker, "s1", curve) == []
    # and a present subject with one deep fade does not leave
    out = feed(tracker, "s2", steady(0, 10, -60))
    assert [d.type for d in out] == [ENTER]
    curve = [*steady(11, 20, -60)]
    curve[3] = (14, -99)
    assert feed(tracker, "s2", curve) == []


def test_hysteresis_band_keeps_presence() -> None:
    tracker = PresenceTracker(P)
    out = feed(tracker, "s1", steady(0, 10, -65))
    assert [d.type for d in out] == [ENTER]
    # between exit (-80) and enter (-70): stays present
    assert feed(tracker, "s1", steady(11, 40, -75)) == []
    out = feed(tracker, "s1", steady(41, 50, -85))
    assert [(d.type, d.attrs) for d in out] == [(EXIT, {"zone": "z1", "dwell_s": 41})]
    # still visible but weak: no re-entry inside the band either
    assert feed(tracker, "s1", steady(51, 70, -75)) == []
    out = feed(tracker, "s1", steady(71, 90, -60))
    assert [d.type for d in out] == [ENTER]


def test_entering_needs_enter_threshold_not_exit_threshold() -> None:
    tracker = PresenceTracker(P)
    assert feed(tracker, "s1", steady(0, 60, -72)) == []


def test_passer_by_is_suppressed() -> None:
    tracker = PresenceTracker(P)
    curve = steady(0, 4, -60) + steady(5, 12, -95)
    assert feed(tracker, "s1", curve) == []
    assert tracker.tick(now=100) == []
    assert tracker.stats["passers_by"] == 1


def test_passer_by_that_goes_silent_is_suppressed() -> None:
    tracker = PresenceTracker(P)
    assert feed(tracker, "s1", steady(0, 4, -60)) == []
    assert tracker.tick(now=50) == []
    assert len(tracker) == 0
    assert tracker.stats["passers_by"] == 1


def test_zero_min_dwell_enters_on_qualifying() -> None:
    tracker = PresenceTracker(PresenceParams(min_dwell_s=0, min_samples=1, window_samples=1))
    out = tracker.observe("s", "z", -50, now=1.0)
    assert out == [Decision(ENTER, "s", "z", 1.0, {"zone": "z", "rssi": -50})]


def test_zones_are_separate_tracks() -> None:
    tracker = PresenceTracker(P)
    feed(tracker, "s1", steady(0, 10, -60), zone="entrance")
    out = feed(tracker, "s1", steady(11, 19, -60), zone="checkout")
    assert [(d.type, d.zone) for d in out] == [(ENTER, "checkout")]
    out = tracker.tick(now=31)
    assert sorted((d.type, d.zone) for d in out) == [(EXIT, "checkout"), (EXIT, "entrance")]


def test_samples_outside_the_window_are_forgotten() -> None:
    tracker = PresenceTracker(P)
    # three strong samples long ago, then sparse weak ones: the old ones do not count
    feed(tracker, "s1", [(0, -50), (1, -50), (2, -50)])
    out = feed(tracker, "s1", [(8, -90), (9.5, -90), (18, -60)])
    assert out == []


def test_restart_never_invents_exits() -> None:
    before = PresenceTracker(P)
    assert [d.type for d in feed(before, "s1", steady(0, 10, -60))] == [ENTER]
    after = PresenceTracker(P)  # the daemon restarted: nothing is known
    assert after.tick(now=1000) == []
    out = feed(after, "s1", steady(11, 20, -95))  # seen weak, then gone
    out += after.tick(now=1000)
    assert out == []


def test_blind_period_is_not_silence() -> None:
    tracker = PresenceTracker(P)
    feed(tracker, "s1", steady(0, 10, -60))
    tracker.blind(now=11)
    assert tracker.tick(now=40) == []
    tracker.resume(now=40)
    assert tracker.tick(now=49) == []
    out = tracker.tick(now=50)
    assert [(d.type, d.at) for d in out] == [(EXIT, 40)]


def test_bounded_memory_evicts_least_recently_seen() -> None:
    params = PresenceParams(
        min_dwell_s=0, min_samples=1, window_samples=1, max_tracks=3, silence_s=1000
    )
    tracker = PresenceTracker(params)
    out: list[Decision] = []
    for i in range(10):
        out += tracker.observe(f"s{i}", "z", -50, now=float(i))
        assert len(tracker) <= 3
    assert tracker.stats["evicted"] == 7
    # every evicted present subject got its exit: enters and exits pair up
    assert sum(d.type == ENTER for d in out) == 10
    assert sum(d.type == EXIT for d in out) == 7
    assert {d.subject for d in out if d.type == EXIT} == {f"s{i}" for i in range(7)}


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.integers(-100, -30), st.floats(0, 20)),
        max_size=200,
    )
)
def test_exits_always_follow_enters(events: list[tuple[str, int, float]]) -> None:
    tracker = PresenceTracker(PresenceParams(max_tracks=3, silence_s=15, min_dwell_s=3))
    now = 0.0
    present: set[str] = set()
    for subject, rssi, gap in events:
        now += gap
        for d in tracker.observe(subject, "z", rssi, now=now):
            if d.type == ENTER:
                assert d.subject not in present
                present.add(d.subject)
            else:
                assert d.subject in present
                assert d.attrs["dwell_s"] >= 0
                present.remove(d.subject)
        assert len(tracker) <= 3
    for d in tracker.tick(now=now + 1000):
        present.remove(d.subject)
    assert present == set()


@pytest.mark.parametrize(
    "kwargs",
    [{"enter_rssi": -80, "exit_rssi": -80}, {"max_tracks": 0}, {"min_samples": 9}],
)
def test_params_are_checked(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        PresenceParams(**kwargs)  # type: ignore[arg-type]


def test_pseudonym_cache_hashes_once_per_subject(keyring: Keyring) -> None:
    calls: list[tuple[str, str]] = []

    def counting(namespace: str, canonical: str) -> str:
        calls.append((namespace, canonical))
        return keyring.pseudonym_of_canonical(namespace, canonical)

    cache = PseudonymCache(counting, maxsize=2)
    canon = "83256b74-78d0-43a4-8269-05f9dc8a44ba:16:32"
    for _ in range(100):
        assert cache.get("ibeacon", canon) == "k1:eP6urfab4yzJ9mpD9_RcmQ"
    assert len(calls) == 1
    assert (cache.hits, cache.misses) == (99, 1)
    cache.get("altbeacon", "aa" * 20)
    cache.get("altbeacon", "bb" * 20)  # evicts the ibeacon entry (least recently used)
    assert len(cache) == 2
    cache.get("ibeacon", canon)
    assert len(calls) == 4


def test_bench_runs_and_hashes_once_per_subject() -> None:
    result = bench_adverts(adverts=5000, subjects=50)
    assert result["adverts_per_s"] > 0
    assert result["events"] > 0
    assert result["hmac_computed"] <= 50
    assert result["tracked_at_end"] == 0


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.tuples(st.integers(-100, -30), st.floats(0, 4)), min_size=1, max_size=60),
    st.integers(1, 9),
)
def test_smoothed_is_the_median_of_the_window(samples: list[tuple[int, float]], size: int) -> None:
    """The incrementally kept median equals statistics.median of the window's samples."""
    params = PresenceParams(window_s=5, window_samples=size, min_samples=1, silence_s=1000)
    tracker = PresenceTracker(params)
    now, seen = 0.0, []
    for rssi, gap in samples:
        now += gap
        tracker.observe("s", "z", rssi, now=now)
        seen.append((now, rssi))
        window = [r for t, r in seen[-size:] if t >= now - 5] or [rssi]
        assert tracker._tracks[("s", "z")].smoothed == statistics.median(window)


def test_forget_erases_a_subject_without_an_exit() -> None:
    tracker = PresenceTracker(P)
    feed(tracker, "leaver", steady(100, 120, -60), zone="z1")
    feed(tracker, "leaver", steady(100, 120, -60), zone="z2")
    feed(tracker, "stayer", steady(100, 120, -60))
    assert tracker.forget("leaver") == 2
    out = tracker.tick(now=200)
    assert [(d.type, d.subject) for d in out] == [(EXIT, "stayer")], "no exit for the leaver"
    assert len(tracker) == 0


def test_pseudonym_cache_forget() -> None:
    cache = PseudonymCache(lambda ns, c: f"k1:{c}", maxsize=10)
    cache.get("ibeacon", "a")
    cache.get("eddystone", "b")
    assert cache.forget("k1:a") == 1 and len(cache) == 1
