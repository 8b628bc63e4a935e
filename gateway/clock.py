"""What the gateway knows about its own wall clock.

A Raspberry Pi has no real-time clock: it boots near 1970 (or at the last saved time) and
NTP steps the clock later, forwards or backwards, by seconds or by decades.  Whatever
measures a duration uses ``time.monotonic``; the wall clock only stamps events and judges
tokens' validity windows, and before NTP has set it, it cannot judge anything.
"""

from __future__ import annotations

# Wall-clock readings before this instant (2024-01-01T00:00:00Z) come from an unset clock.
CLOCK_FLOOR = 1_704_067_200.0


def clock_is_set(now: float) -> bool:
    """False while the wall clock reads before ``CLOCK_FLOOR`` (no RTC, NTP not yet synced)."""
    return now >= CLOCK_FLOOR
