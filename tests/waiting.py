"""Waiting in async tests for something to become true."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(cond: Callable[[], object], timeout: float = 5.0, poll_s: float = 0.01) -> None:
    """Return once ``cond()`` is true; TimeoutError after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(poll_s)
