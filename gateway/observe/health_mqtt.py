"""Health over MQTT: the gateway's ``/healthz`` judgement, published retained for the fleet.

    touchpoint/v1/<store>/<device>/health   retained, QoS 1, schema contract/schemas/health.json

The message is built from the same ``HealthMonitor`` report as ``/healthz`` (one set of
rules), cut to what central needs to see a store's trouble without logging in: the
verdict and its problems, each source's state and last reading age, broker, buffer
(depth, oldest pending age, evictions and losses by reason, dead letters), consent sync
age, clock state, certificate expiry, active key id, version, uptime and RSS.

When: at every change of state (verdict, a source's state, the buffer's write state, the
clock), at most once per ``health_min_interval_s``; at least every
``health_interval_s``; and at once after every (re)connect, since the broker may have
lost the retained copy (the connect wakes the loop: a link back between two ticks
counts).  Only while connected: the message is not an event, nothing about it is
buffered, and the newest one replaces the last.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from gateway import __version__
from gateway.contract.events import rfc3339
from gateway.identity.clock import clock_state
from gateway.observe.health import HealthMonitor, rss_bytes
from gateway.observe.logs import redact

log = logging.getLogger(__name__)

MAX_PROBLEMS = 16  # a bound on the message: problems beyond it are counted, not listed
MAX_PROBLEM_CHARS = 200


class _Publishing(Protocol):
    @property
    def connected(self) -> bool: ...

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> Any: ...

    def on_connect(self, hook: Callable[[], object]) -> None: ...


def _round(value: Any) -> float | None:
    return None if value is None else round(float(value), 1)


def health_message(
    ok: bool,
    doc: Mapping[str, Any],
    *,
    now: float,
    key_id: str,
    certificates: Mapping[str, float | None] | None = None,
    rss: int | None = None,
) -> dict[str, Any]:
    """The health message for one ``HealthMonitor.report()`` (see the module docstring)."""
    m_buffer = doc.get("buffer", {})
    problems = [redact(p)[:MAX_PROBLEM_CHARS] for p in doc.get("problems", [])]
    return {
        "v": 1,
        "ts": rfc3339(now),
        "status": "ok" if ok else "unhealthy",
        "problems": problems[:MAX_PROBLEMS],
        "problems_total": len(problems),
        "version": __version__,
        "uptime_s": _round(doc.get("uptime_s")),
        "rss_bytes": rss,
        "key_id": key_id,
        "clock": {"state": clock_state(now)},
        "broker": {
            "connected": bool(doc.get("broker", {}).get("connected")),
            "reconnects": int(doc.get("broker", {}).get("reconnects") or 0),
        },
        "buffer": {
            "depth": int(m_buffer.get("depth") or 0),
            "oldest_age_s": _round(m_buffer.get("oldest_age_s")),
            "dead_letters": int(m_buffer.get("dead_letters") or 0),
            "evicted": int(m_buffer.get("evicted") or 0),
            "expired": int(m_buffer.get("expired") or 0),
            "lost": {k: int(v) for k, v in sorted(m_buffer.get("lost", {}).items())},
            "last_write_ok": bool(m_buffer.get("last_write_ok", True)),
        },
        "sources": {
            name: {
                "state": str(s.get("state", "unknown")),
                "last_reading_age_s": _round(s.get("last_reading_age_s")),
            }
            for name, s in sorted(doc.get("sources", {}).items())
        },
        "consent": {"sync_age_s": _round(doc.get("consent", {}).get("sync_age_s"))},
        "certificates": {
            name: (None if at is None else rfc3339(at))
            for name, at in sorted((certificates or {}).items())
        },
    }


def _signature(msg: Mapping[str, Any]) -> tuple[Any, ...]:
    """What counts as a change of state: not ages or counts, which change all the time."""
    return (
        msg["status"],
        msg["clock"]["state"],
        msg["buffer"]["last_write_ok"],
        tuple((n, s["state"]) for n, s in msg["sources"].items()),
        tuple(sorted(msg["buffer"]["lost"].items())),
        msg["buffer"]["evicted"] > 0,
    )


class HealthPublisher:
    """Publishes the retained health message (see the module docstring)."""

    def __init__(
        self,
        monitor: HealthMonitor,
        publisher: _Publishing,
        topic: str,
        *,
        key_id: str,
        interval_s: float,
        min_interval_s: float,
        certificates: Callable[[], Mapping[str, float | None]] | None = None,
        now: Callable[[], float] = time.time,
        tick_s: float = 1.0,
    ) -> None:
        self.monitor = monitor
        self.publisher = publisher
        self.topic = topic
        self.key_id = key_id
        self.interval_s = interval_s
        self.min_interval_s = min(min_interval_s, interval_s)
        self.certificates = certificates
        self.now = now
        self.tick_s = tick_s
        self.published = 0
        self._last_at: float | None = None  # monotonic time of the last publish
        self._last_sig: tuple[Any, ...] | None = None
        self._reconnected = True
        # Every connect wakes the loop: a link back before the next tick saw it down (a
        # quick reconnect, a broker restarted without its retained copy, a health message
        # abandoned with the old link) is published again now, not a whole interval later.
        self._wake = asyncio.Event()
        publisher.on_connect(self._connected)

    def _connected(self) -> None:
        self._reconnected = True
        if self._last_at is not None:  # a reconnect: now.  The first connect waits for
            self._wake.set()  # the next tick, when the sources have said their state

    def message(self) -> dict[str, Any]:
        ok, doc = self.monitor.report()
        certs = self.certificates() if self.certificates is not None else None
        return health_message(
            ok, doc, now=self.now(), key_id=self.key_id, certificates=certs, rss=rss_bytes()
        )

    def tick(self) -> bool:
        """Publish if due; True when it did."""
        if not self.publisher.connected:
            self._reconnected = True  # publish at once when the link is back
            return False
        msg = self.message()
        sig = _signature(msg)
        mono = time.monotonic()
        since = None if self._last_at is None else mono - self._last_at
        due = (
            self._reconnected
            or since is None
            or since >= self.interval_s
            or (sig != self._last_sig and since >= self.min_interval_s)
        )
        if not due:
            return False
        payload = json.dumps(msg, separators=(",", ":")).encode()
        self.publisher.publish(self.topic, payload, retain=True)
        self._last_at, self._last_sig, self._reconnected = mono, sig, False
        self.published += 1
        return True

    async def run(self) -> None:
        while True:
            self._wake.clear()
            try:
                self.tick()
            except Exception:  # health must never take the daemon down; say so, retry
                log.exception("health message failed; trying again")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.tick_s):
                    await self._wake.wait()  # the next tick, or a connect
