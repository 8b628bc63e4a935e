"""Presence per (subject, zone): smoothed RSSI in, presence.enter / presence.exit out.

Pure and clock-free: every call takes ``now``, so timeouts are tested without sleeping.
Subjects are opaque strings (the driver passes pseudonyms), so this state never holds a
raw identifier.

Two clocks: ``now`` is a **monotonic** reading (``time.monotonic()``) and drives every
window, silence, dwell and blind spell; ``wall`` (optional) is the wall clock at the same
instant and only dates the events (``at = wall - (now - t)`` for a moment ``t``).  A
wall-clock step (NTP correcting a Pi that booted without an RTC) therefore neither ends
nor freezes a presence, and ``dwell_s`` is the real elapsed time.  Without ``wall`` one
clock serves both (the unit tests, the benchmark).

Smoothing is a **sliding median** over the samples of the last ``window_s`` seconds
(at most ``window_samples`` of them).  RSSI from a phone or beacon is heavy-tailed:
body shadowing and multipath make single readings 10-20 dB off.  A median ignores such
outliers outright, where an EWMA lets every spike pull the value and depends on the
(irregular, coalesced-by-BlueZ) sample rate; the time window is our own, so a burst of
duplicate adverts or a gap in BlueZ's delivery does not stretch or shrink it.

Per track::

    absent --smoothed >= enter_rssi--> candidate --held for min_dwell_s--> present
      ^                                   |                                   |
      +--- below exit_rssi or silent -----+        (passer-by: nothing sent)  |
      +--- below exit_rssi (hysteresis) or silent for silence_s: exit --------+

The enter event is dated when the subject first qualified (``at`` = arrival) and sent
once it has stayed ``min_dwell_s``; ``dwell_s`` on exit counts from that arrival.  A
fresh tracker knows nobody, so a restart never invents an exit: exits only follow
enters this instance emitted.  ``blind``/``resume`` bracket times the radio was not
listening (scanner restart), so that gap is not mistaken for silence.
"""

from __future__ import annotations

import math
from bisect import insort
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

ENTER = "presence.enter"
EXIT = "presence.exit"
_NONE: tuple[Decision, ...] = ()  # what most sightings decide (shared: no list per call)


@dataclass(frozen=True, slots=True)
class PresenceParams:
    """Thresholds and timings; see the module docstring for what each one does."""

    enter_rssi: int = -75
    exit_rssi: int = -85
    silence_s: float = 30.0
    min_dwell_s: float = 10.0
    window_s: float = 10.0
    window_samples: int = 7
    min_samples: int = 3
    max_tracks: int = 10_000

    def __post_init__(self) -> None:
        if self.exit_rssi >= self.enter_rssi:
            raise ValueError("exit_rssi must be below enter_rssi (hysteresis)")
        if self.window_samples < 1 or self.min_samples < 1 or self.max_tracks < 1:
            raise ValueError("window_samples, min_samples and max_tracks must be >= 1")
        if self.min_samples > self.window_samples:
            raise ValueError("min_samples cannot exceed window_samples")


@dataclass(frozen=True, slots=True)
class Decision:
    """One presence event to emit: contract §3 type and attrs."""

    type: str
    subject: str
    zone: str
    at: float
    attrs: dict[str, Any]


@dataclass(slots=True)
class _Track:
    times: deque[float]  # the window's sample times and RSSI values, oldest first
    values: deque[int]
    ordered: list[int]  # the same values, sorted: the median is an index, not a sort
    last_seen: float
    arrived: float | None = None  # set while candidate or present
    present: bool = False
    smoothed: float = field(default=-127.0)


class PresenceTracker:
    """Tracks (subject, zone) pairs within a bounded number of tracks (LRU eviction)."""

    def __init__(self, params: PresenceParams) -> None:
        self.params = params
        self._tracks: OrderedDict[tuple[str, str], _Track] = OrderedDict()
        # no track falls silent before this (a lower bound: observe() calls tick() past it)
        self._expiry = math.inf
        self._blind_since: float | None = None
        self.stats: dict[str, int] = {"passers_by": 0, "evicted": 0, "evicted_present": 0}

    def forget(self, subject: str) -> int:
        """Drop every track of ``subject`` without an exit event (an erasure: the subject
        leaves no trace, not even a departure).  Returns how many tracks went."""
        keys = [k for k in self._tracks if k[0] == subject]
        for k in keys:
            del self._tracks[k]
        return len(keys)

    def __len__(self) -> int:
        return len(self._tracks)

    @property
    def present_count(self) -> int:
        return sum(1 for t in self._tracks.values() if t.present)

    def observe(
        self, subject: str, zone: str, rssi: int, now: float, wall: float | None = None
    ) -> Sequence[Decision]:
        """Record one sighting at monotonic ``now`` (``wall``: the wall clock then, to date
        events); returns the decisions it (and expiries due by now) cause."""
        key = (subject, zone)
        track = self._tracks.get(key)
        if track is None or now >= self._expiry:  # a new track, or some track went silent
            return self._observe_slow(key, rssi, now, wall)
        self._tracks.move_to_end(key)
        if now > track.last_seen:  # noqa: PLR1730 (max() costs a call on the hot path)
            track.last_seen = now
        return self._sample(key, track, rssi, now, wall)

    def _observe_slow(
        self, key: tuple[str, str], rssi: int, now: float, wall: float | None
    ) -> list[Decision]:
        """``observe`` when a track is new or an expiry is due: expire silent tracks
        first, make room, then the sighting."""
        p = self.params
        out = self.tick(now=now, wall=wall) if now >= self._expiry else []
        track = self._tracks.get(key)
        if track is None:
            out.extend(self._make_room(0.0 if wall is None else wall - now))
            size = p.window_samples
            track = _Track(deque(maxlen=size), deque(maxlen=size), [], now)
            self._tracks[key] = track
            self._expiry = min(self._expiry, now + p.silence_s)
        else:
            self._tracks.move_to_end(key)
            track.last_seen = max(track.last_seen, now)
        out.extend(self._sample(key, track, rssi, now, wall))
        return out

    def _sample(
        self, key: tuple[str, str], track: _Track, rssi: int, now: float, wall: float | None
    ) -> Sequence[Decision]:
        """Add one sample to the track's window, smooth, and decide."""
        p = self.params
        times, values, ordered = track.times, track.values, track.ordered
        if len(values) == p.window_samples:
            ordered.remove(values[0])  # the deque drops its oldest value on append
        times.append(now)
        values.append(rssi)
        insort(ordered, rssi)
        horizon = now - p.window_s  # keep the window, and always the newest sample
        while times[0] < horizon and len(times) > 1:
            times.popleft()
            ordered.remove(values.popleft())
        n = len(ordered)
        mid = n >> 1
        smoothed = ordered[mid] if n & 1 else (ordered[mid - 1] + ordered[mid]) / 2
        track.smoothed = smoothed
        # the common cases, decided here: present and staying; absent and not qualifying
        if track.present:
            if smoothed >= p.exit_rssi:
                return _NONE
        elif track.arrived is None and (n < p.min_samples or smoothed < p.enter_rssi):
            return _NONE
        return self._step(key, track, now, 0.0 if wall is None else wall - now)

    def tick(self, *, now: float, wall: float | None = None) -> list[Decision]:
        """Expire silent tracks and emit what that causes; call this every second or so.

        ``now`` is monotonic, ``wall`` the wall clock then (see ``observe``)."""
        if self._blind_since is not None:
            return []
        out: list[Decision] = []
        silence = self.params.silence_s
        shift = 0.0 if wall is None else wall - now
        # tracks are in last-seen order: stop at the first one that is not yet silent
        self._expiry = math.inf
        while self._tracks:
            key, track = next(iter(self._tracks.items()))
            if now - track.last_seen < silence:
                self._expiry = track.last_seen + silence
                break
            del self._tracks[key]
            out.extend(self._leave(key, track, track.last_seen, shift))
        return out

    def blind(self, *, now: float) -> None:
        """The radio stopped listening (scanner restarting): silence proves nothing now."""
        if self._blind_since is None:
            self._blind_since = now

    def resume(self, *, now: float) -> None:
        """The radio listens again: every track gets a full silence period from now."""
        if self._blind_since is None:
            return
        self._blind_since = None
        for track in self._tracks.values():
            track.last_seen = max(track.last_seen, now)

    def _step(
        self, key: tuple[str, str], track: _Track, now: float, shift: float
    ) -> list[Decision]:
        """The state machine for one track; ``shift`` turns a monotonic time into wall."""
        p = self.params
        enough = len(track.values) >= p.min_samples
        if track.present:
            if track.smoothed < p.exit_rssi:
                return self._leave(key, track, now, shift)
            return []
        if track.arrived is None:
            if enough and track.smoothed >= p.enter_rssi:
                track.arrived = now
            else:
                return []
        elif track.smoothed < p.exit_rssi:
            self.stats["passers_by"] += 1
            track.arrived = None
            return []
        if now - track.arrived >= p.min_dwell_s:
            track.present = True
            attrs = {"zone": key[1], "rssi": round(track.smoothed)}
            return [Decision(ENTER, key[0], key[1], track.arrived + shift, attrs)]
        return []

    def _leave(
        self, key: tuple[str, str], track: _Track, at: float, shift: float
    ) -> list[Decision]:
        """End a track at monotonic ``at``: an exit if it was present (dated ``at + shift``)."""
        arrived, was_present = track.arrived, track.present
        track.arrived, track.present = None, False
        if not was_present or arrived is None:
            if arrived is not None:
                self.stats["passers_by"] += 1
            return []
        dwell = max(0, round(at - arrived))
        attrs = {"zone": key[1], "dwell_s": dwell}
        return [Decision(EXIT, key[0], key[1], at + shift, attrs)]

    def _make_room(self, shift: float) -> list[Decision]:
        out: list[Decision] = []
        while len(self._tracks) >= self.params.max_tracks:
            key, track = self._tracks.popitem(last=False)
            self.stats["evicted"] += 1
            if track.present:
                self.stats["evicted_present"] += 1
            out.extend(self._leave(key, track, track.last_seen, shift))
        return out


class PseudonymCache:
    """Bounded LRU from (namespace, canonical) to pseudonym: one HMAC per subject, not
    per advert.  Holds raw identifiers in memory only, never logs them."""

    def __init__(self, pseudonymise: Callable[[str, str], str], maxsize: int = 4096) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self._fn = pseudonymise
        self._maxsize = maxsize
        self._cache: OrderedDict[tuple[str, str], str] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._cache)

    def forget(self, subject: str) -> int:
        """Drop the entries that map to ``subject`` (an erasure); returns how many."""
        keys = [k for k, v in self._cache.items() if v == subject]
        for k in keys:
            del self._cache[k]
        return len(keys)

    def get(self, namespace: str, canonical: str) -> str:
        key = (namespace, canonical)
        value = self._cache.get(key)
        if value is not None:
            self.hits += 1
            self._cache.move_to_end(key)
            return value
        self.misses += 1
        value = self._fn(namespace, canonical)
        self._cache[key] = value
        if len(self._cache) > self._maxsize:
            self._cache.popitem(last=False)
        return value
