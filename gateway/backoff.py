"""Retry pacing and error wording shared by the drivers that reopen lost hardware."""

from __future__ import annotations

import os
import random


class Backoff:
    """Jittered exponential delays from ``low`` up to ``high`` seconds.

    Each delay is drawn from the upper half of the current step, so a fleet of gateways
    that lost the same thing at once does not retry in step.
    """

    def __init__(self, low: float, high: float) -> None:
        self.low = low
        self.high = max(low, high)
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    def next(self) -> float:
        ceiling = min(self.high, self.low * 2 ** min(self._attempt, 32))
        self._attempt += 1
        return random.uniform(max(self.low, ceiling / 2), ceiling)


def device_error(exc: BaseException) -> str:
    """A short reason for a device or connection error (errno text, never data)."""
    if isinstance(exc, OSError) and isinstance(exc.errno, int):
        return os.strerror(exc.errno)
    return str(exc) or exc.__class__.__name__
