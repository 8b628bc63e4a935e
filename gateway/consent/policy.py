"""What happens to a reading whose subject has no consent for what its type needs.

    drop       counted and forgotten (the default)
    hold       quarantined in the ``held`` table for up to ``hold_ttl_s``: released into
               the pipeline if consent arrives in time, erased at the TTL
    aggregate  the subject is discarded at once; a ``presence.enter`` with a zone is
               counted into ``footfall`` per (source, zone) and window; a window whose
               count is below ``k`` is suppressed, not sent

A withdrawn subject is never held (its withdrawal is an explicit no).  Time is passed
in; ``ConsentPolicy.tick(now)`` expires held readings and closes footfall windows and the
daemon calls it about once a second.  Outcomes are counted as
``consent_policy_total{policy, outcome}``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from gateway.buffer.held_store import HeldStore
from gateway.consent.registry import ConsentRegistry
from gateway.contract.events import rfc3339
from gateway.observe.metrics import Metrics
from gateway.ports import Reading

if TYPE_CHECKING:
    import asyncio

    from gateway.buffer.outbox import Outbox
    from gateway.config.sections import ConsentConfig

log = logging.getLogger(__name__)

FOOTFALL = "footfall"
COUNTED_TYPE = "presence.enter"


def _log_failure(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.error("held readings: buffer write failed: %s", fut.exception())


@dataclass(slots=True)
class Held:
    id: int
    reading: Reading
    expires: float


class HoldQueue:
    """Readings waiting for consent, in memory and in the ``held`` table (restarts)."""

    def __init__(
        self, outbox: Outbox, metrics: Metrics, ttl_s: float, *, max_entries: int = 100_000
    ) -> None:
        self.outbox = outbox
        self.store = HeldStore(outbox)
        self.metrics = metrics
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._by_subject: dict[str, list[Held]] = {}
        self._count = 0
        self._next_id = 1

    def __len__(self) -> int:
        return self._count

    def subjects(self) -> set[str]:
        return set(self._by_subject)

    async def load(self) -> int:
        """Read the held rows back after a restart."""
        for id_, subject, type_, source, at, attrs, expires in await self.store.load():
            reading = Reading(type_, source, at, subject, json.loads(attrs))
            self._by_subject.setdefault(subject, []).append(Held(id_, reading, expires))
            self._count += 1
            self._next_id = max(self._next_id, id_ + 1)
        return self._count

    def add(self, reading: Reading, now: float) -> bool:
        """Hold one reading (it must have a subject); False when the queue is full."""
        subject = reading.subject
        assert subject is not None
        if self._count >= self.max_entries:
            return False
        held = Held(self._next_id, Reading(*_fields(reading)), now + self.ttl_s)
        self._next_id += 1
        self._by_subject.setdefault(subject, []).append(held)
        self._count += 1
        row = (
            held.id,
            subject,
            reading.type,
            reading.source,
            reading.at,
            json.dumps(dict(reading.attrs), separators=(",", ":")),
            held.expires,
        )
        fut = self.store.add(row)
        fut.add_done_callback(_log_failure)
        return True

    def release(self, subjects: Iterable[str], passes: Callable[[Reading], bool]) -> list[Reading]:
        """Take out the held readings of these subjects that pass now, oldest first."""
        out: list[Held] = []
        for subject in subjects:
            entries = self._by_subject.get(subject)
            if not entries:
                continue
            keep: list[Held] = []
            for h in entries:
                (out if passes(h.reading) else keep).append(h)
            if keep:
                self._by_subject[subject] = keep
            else:
                del self._by_subject[subject]
        if not out:
            return []
        self._count -= len(out)
        fut = self.store.delete([h.id for h in out])
        fut.add_done_callback(_log_failure)
        out.sort(key=lambda h: (h.reading.at, h.id))
        return [h.reading for h in out]

    def forget(self, subject: str) -> int:
        """Drop a subject's held readings from memory (the eraser deletes the rows)."""
        entries = self._by_subject.pop(subject, [])
        self._count -= len(entries)
        return len(entries)

    def expire(self, now: float) -> int:
        """Erase held readings whose TTL has passed."""
        n = 0
        for subject in list(self._by_subject):
            entries = self._by_subject[subject]
            keep = [h for h in entries if h.expires > now]
            n += len(entries) - len(keep)
            if keep:
                self._by_subject[subject] = keep
            else:
                del self._by_subject[subject]
        if n:
            self._count -= n
            fut = self.store.expire(now)
            fut.add_done_callback(_log_failure)
        return n


def _fields(r: Reading) -> tuple[str, str, float, str | None, dict[str, Any]]:
    """A reading's fields without its consent evidence (already applied)."""
    return r.type, r.source, r.at, r.subject, dict(r.attrs)


class FootfallAggregator:
    """Counts per (source, zone) and window; closed windows below ``k`` are suppressed.

    Windows are aligned to multiples of ``window_s`` (unix time).  A reading dated in a
    window already closed counts into the first open one, so a window is sent once.
    """

    def __init__(self, metrics: Metrics, *, k: int = 5, window_s: int = 900) -> None:
        if k < 1 or window_s < 1:
            raise ValueError("k and window_s must be at least 1")
        self.metrics = metrics
        self.k = k
        self.window_s = window_s
        self._counts: dict[tuple[str, str, int], int] = {}
        self._closed_until = 0

    def __len__(self) -> int:
        """Open (source, zone, window) counts."""
        return len(self._counts)

    def add(self, source: str, zone: str, at: float) -> None:
        start = max(int(at) // self.window_s * self.window_s, self._closed_until)
        key = (source, zone, start)
        self._counts[key] = self._counts.get(key, 0) + 1

    def flush(self, now: float) -> list[Reading]:
        """Close every window that ended by ``now``: footfall readings for counts >= k."""
        edge = int(now) // self.window_s * self.window_s
        if edge <= self._closed_until and not self._counts:
            return []
        out = []
        for key in sorted(k for k in self._counts if k[2] + self.window_s <= now):
            source, zone, start = key
            count = self._counts.pop(key)
            if count < self.k:
                self.metrics.inc("footfall_windows_total", outcome="suppressed")
                continue
            self.metrics.inc("footfall_windows_total", outcome="sent")
            attrs = {
                "zone": zone,
                "window_start": rfc3339(start),
                "window_s": self.window_s,
                "count": count,
            }
            out.append(Reading(FOOTFALL, source, float(start + self.window_s), None, attrs))
        self._closed_until = max(self._closed_until, edge)
        return out


class Outcome(StrEnum):
    """What the policy did with a reading the consent gate refused (the value is the
    ``outcome`` label of ``consent_policy_total``)."""

    DROPPED = "dropped"
    DROPPED_WITHDRAWN = "dropped_withdrawn"
    DROPPED_HOLD_FULL = "dropped_hold_full"
    HELD = "held"
    AGGREGATED = "aggregated"

    @property
    def dropped(self) -> bool:
        """The reading is gone (the daemon counts it as dropped for consent)."""
        return self in (Outcome.DROPPED, Outcome.DROPPED_WITHDRAWN, Outcome.DROPPED_HOLD_FULL)


class ConsentPolicy:
    """The configured policy for readings the consent gate refused."""

    def __init__(
        self,
        policy: str,
        registry: ConsentRegistry,
        metrics: Metrics,
        *,
        hold: HoldQueue | None = None,
        footfall: FootfallAggregator | None = None,
    ) -> None:
        if policy == "hold" and hold is None:
            raise ValueError("policy hold needs a HoldQueue")
        if policy == "aggregate" and footfall is None:
            raise ValueError("policy aggregate needs a FootfallAggregator")
        self.policy = policy
        self.registry = registry
        self.metrics = metrics
        self.hold = hold
        self.footfall = footfall

    @classmethod
    def from_config(
        cls, cfg: ConsentConfig, registry: ConsentRegistry, outbox: Outbox, metrics: Metrics
    ) -> ConsentPolicy:
        hold = HoldQueue(outbox, metrics, cfg.hold_ttl_s) if cfg.policy == "hold" else None
        footfall = (
            FootfallAggregator(metrics, k=cfg.footfall_k, window_s=cfg.footfall_window_s)
            if cfg.policy == "aggregate"
            else None
        )
        return cls(cfg.policy, registry, metrics, hold=hold, footfall=footfall)

    def _count(self, outcome: str) -> None:
        self.metrics.inc("consent_policy_total", policy=self.policy, outcome=outcome)

    def denied(self, reading: Reading, now: float) -> Outcome:
        """Apply the policy to a reading the gate refused; returns the outcome."""
        outcome = Outcome.DROPPED
        subject = reading.subject
        if subject is None:
            outcome = Outcome.DROPPED
        elif self.hold is not None:
            if subject in self.registry.withdrawn:
                outcome = Outcome.DROPPED_WITHDRAWN
            elif self.hold.add(reading, now):
                outcome = Outcome.HELD
            else:
                outcome = Outcome.DROPPED_HOLD_FULL
        elif self.footfall is not None:
            zone = reading.attrs.get("zone")
            if reading.type == COUNTED_TYPE and isinstance(zone, str):
                self.footfall.add(reading.source, zone, reading.at)
                outcome = Outcome.AGGREGATED
        self._count(outcome)
        return outcome

    def on_consent(self, subjects: Iterable[str], now: float) -> list[Reading]:
        """Consent arrived for these subjects: the held readings that now pass."""
        if self.hold is None:
            return []
        released = self.hold.release(
            subjects,
            lambda r: r.subject is not None and self.registry.allows(r.type, r.subject, now),
        )
        if released:
            self.metrics.inc(
                "consent_policy_total", len(released), policy=self.policy, outcome="released"
            )
        return released

    def tick(self, now: float) -> list[Reading]:
        """Expire held readings; close footfall windows (readings to submit)."""
        if self.hold is not None:
            n = self.hold.expire(now)
            if n:
                self.metrics.inc(
                    "consent_policy_total", n, policy=self.policy, outcome="hold_expired"
                )
        if self.footfall is not None:
            return self.footfall.flush(now)
        return []
