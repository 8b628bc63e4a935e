"""The one retry pacing of the gateway, and the wording of device errors.

Every retry loop uses ``Backoff``: the drivers reopening lost hardware, the source
supervisor, the BLE recovery ladder, the consent poll, and the MQTT reconnect.
"""

from __future__ import annotations

import os
import random


class Backoff:
    """Exponential delays with jitter, from ``low`` up to ``high`` seconds.

    Attempt n waits a random time in [c/2, c], c = min(high, low * 2**n): a fleet of
    gateways that lost the same thing at once (a broker restart, the central's outage)
    does not retry in step, not even the first time, and no wait is shorter than half
    the current step.  ``reset`` after a success starts again from ``low``.
    """

    def __init__(self, low: float, high: float, *, rng: random.Random | None = None) -> None:
        if low <= 0:
            raise ValueError(f"a backoff needs a positive low bound, not {low}")
        self.low = low
        self.high = max(low, high)
        self.rng = rng or random.Random()
        self.attempts = 0

    def reset(self) -> None:
        self.attempts = 0

    def next(self) -> float:
        ceiling = min(self.high, self.low * 2 ** min(self.attempts, 32))
        self.attempts += 1
        return self.rng.uniform(ceiling / 2, ceiling)


def device_error(exc: BaseException) -> str:
    """A short reason for a device or connection error (errno text, never data)."""
    if isinstance(exc, OSError) and isinstance(exc.errno, int):
        return os.strerror(exc.errno)
    return str(exc) or exc.__class__.__name__
