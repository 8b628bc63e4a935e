"""What the gateway knows about its own wall clock.

A Raspberry Pi has no real-time clock: it boots near 1970 (or at the last saved time) and
NTP steps the clock later, forwards or backwards, by seconds or by decades.  Whatever
measures a duration uses ``time.monotonic``; the wall clock only stamps events and judges
tokens' validity windows, and before NTP has set it, it cannot judge anything.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from typing import Any

# Wall-clock readings before this instant (2024-01-01T00:00:00Z) come from an unset clock.
CLOCK_FLOOR = 1_704_067_200.0


def clock_is_set(now: float) -> bool:
    """False while the wall clock reads before ``CLOCK_FLOOR`` (no RTC, NTP not yet synced)."""
    return now >= CLOCK_FLOOR


# adjtimex(2): the kernel's view of NTP.  A read (modes 0) needs no privilege.
_TIME_ERROR = 5  # the clock is not synchronised (STA_UNSYNC), per timex.h


class _Timex(ctypes.Structure):
    # struct timex: modes, then fields this module never reads; the kernel writes the
    # whole struct, so it is sized generously (glibc's is 208 bytes on 64-bit).
    _fields_ = [("modes", ctypes.c_uint), ("_rest", ctypes.c_byte * 252)]


@functools.cache
def _adjtimex() -> Callable[[Any], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn: Callable[[Any], int] = libc.adjtimex
    except (OSError, AttributeError):
        return None
    return fn


def clock_state(now: float) -> str:
    """``unset`` (reads before ``CLOCK_FLOOR``), ``synchronized`` (the kernel's NTP state
    says so), ``unsynchronized`` (the kernel says it is not), or ``unknown``."""
    if not clock_is_set(now):
        return "unset"
    fn = _adjtimex()
    if fn is None:
        return "unknown"
    tx = _Timex()
    state = fn(ctypes.byref(tx))
    if state < 0:
        return "unknown"
    return "unsynchronized" if state == _TIME_ERROR else "synchronized"
