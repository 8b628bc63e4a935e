"""Waiting in async tests for something to become true."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tests.bench.goals import emulated

# Under qemu-user (.ci/fresh-root's arm64 root, TOUCHPOINT_EMULATED=1) everything runs ten
# to twenty times slower: the daemon's start alone outlasted a native 15 s wait (17 s to
# its ready line), and a starved process pauses for seconds.  Waits, and the patience a
# test gives a driver's timing (a silence period), scale by this; what they wait for does not.
SLOWDOWN = 6.0 if emulated() else 1.0


async def until(cond: Callable[[], object], timeout: float = 5.0, poll_s: float = 0.01) -> None:
    """Return once ``cond()`` is true; TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(poll_s)
