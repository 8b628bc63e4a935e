"""When to send systemd's WATCHDOG=1: only while the pipeline makes progress.

The housekeeping loop asks once per tick (every half ``WatchdogSec`` at most); systemd
kills and restarts the daemon when the pings stop for ``WatchdogSec``.  A tick counts as
progress when the loop ran and the buffer answered, and

- the buffer's last write did not fail (a failed write: no ping, whatever else), and
- the buffer is empty, or events were forwarded since the last tick, or the broker is
  disconnected (a store offline for hours is normal: readings still reach the buffer,
  and a restart would not bring the broker back).

So the pings stop only when the buffer cannot be written, or when the broker is
connected, events are waiting and none has been acknowledged for ``stall_after_s``
(choose it above paho's hung-broker detection, about 1.5 x ``keepalive_s``, so a hung
broker is handled by a reconnect rather than a restart).
"""

from __future__ import annotations


class ProgressWatch:
    def __init__(self, stall_after_s: float) -> None:
        self.stall_after_s = stall_after_s
        self._last_forwarded: float | None = None
        self._last_progress: float | None = None
        self.stalled_for = 0.0

    def progressing(
        self,
        *,
        mono: float,
        buffer_ok: bool,
        connected: bool,
        depth: int,
        forwarded: float,
    ) -> bool:
        """Record one tick; True when WATCHDOG=1 should be sent for it."""
        moved = self._last_forwarded is not None and forwarded != self._last_forwarded
        self._last_forwarded = forwarded
        if self._last_progress is None or depth == 0 or moved or not connected:
            self._last_progress = mono
        self.stalled_for = mono - self._last_progress
        return buffer_ok and self.stalled_for <= self.stall_after_s
