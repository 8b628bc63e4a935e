"""Presence runs on a monotonic clock; the wall clock only dates the events.

A Pi without an RTC boots with a wrong wall clock and NTP steps it by hours: presence
must neither end early (forward step) nor freeze (backward step), and ``dwell_s`` is the
real time spent.
"""

from __future__ import annotations

from drivers.ble.presence import ENTER, EXIT, Decision, PresenceParams, PresenceTracker

P = PresenceParams(
    enter_rssi=-70, exit_rssi=-80, silence_s=10, min_dwell_s=5, window_s=5,
    window_samples=5, min_samples=3, max_tracks=100,
)  # fmt: skip
MONO = 5_000.0  # monotonic seconds since boot
WALL = 1_795_000_000.0  # the wall clock at MONO, before any step
HOURS = 3600.0


def run(tracker: PresenceTracker, steps: dict[int, float], seconds: int) -> list[Decision]:
    """Subject s1 seen once a second; the wall clock jumps by ``steps[i]`` at second i."""
    out: list[Decision] = []
    offset = 0.0
    for i in range(seconds + 1):
        offset += steps.get(i, 0.0)
        now, wall = MONO + i, WALL + i + offset
        out += tracker.observe("s1", "z1", -60, now, wall)
        out += tracker.tick(now=now, wall=wall)
    return out


def test_steps_forward_and_back_neither_end_nor_freeze_presence() -> None:
    tracker = PresenceTracker(P)
    # +3 h at second 20 (NTP's first sync), -5 h at second 40 (a bad server, corrected)
    out = run(tracker, {20: 3 * HOURS, 40: -5 * HOURS}, seconds=60)
    assert out == [Decision(ENTER, "s1", "z1", WALL + 2, {"zone": "z1", "rssi": -60})]
    offset = -2 * HOURS
    # silent from second 60: nothing before the silence period has passed on the
    # monotonic clock, although the wall clock is hours behind...
    assert tracker.tick(now=MONO + 69.5, wall=WALL + 69.5 + offset) == []
    # ...and the exit exactly then, dated on the wall clock as it is now, with the real dwell
    out = tracker.tick(now=MONO + 70, wall=WALL + 70 + offset)
    assert out == [Decision(EXIT, "s1", "z1", WALL + 60 + offset, {"zone": "z1", "dwell_s": 58})]


def test_a_forward_step_alone_invents_no_exit() -> None:
    tracker = PresenceTracker(P)
    out = run(tracker, {15: 10 * HOURS}, seconds=30)
    assert [d.type for d in out] == [ENTER]
    assert len(tracker) == 1 and tracker.present_count == 1


def test_without_a_wall_clock_one_clock_dates_and_times() -> None:
    tracker = PresenceTracker(P)
    out = [d for i in range(11) for d in tracker.observe("s1", "z1", -60, float(i))]
    assert [(d.type, d.at) for d in out] == [(ENTER, 2.0)]
    assert [(d.type, d.at) for d in tracker.tick(now=20.0)] == [(EXIT, 10.0)]
