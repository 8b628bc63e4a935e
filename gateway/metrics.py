"""Counters and gauges, labelled, kept in memory and read by status, health and the demo.

Single-threaded by design: only the event loop thread updates them (callbacks from
library threads enqueue to the loop first).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

LabelKey = tuple[str, tuple[tuple[str, str], ...]]


def _key(name: str, labels: dict[str, str]) -> LabelKey:
    return name, tuple(sorted(labels.items()))


class Metrics:
    def __init__(self) -> None:
        self._counters: defaultdict[LabelKey, float] = defaultdict(float)
        self._gauges: dict[LabelKey, float] = {}
        self.sources: dict[str, dict[str, Any]] = {}
        self.last_error: dict[str, str] = {}

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        self._counters[_key(name, labels)] += amount

    def set(self, name: str, value: float, **labels: str) -> None:
        self._gauges[_key(name, labels)] = value

    def get(self, name: str, **labels: str) -> float:
        key = _key(name, labels)
        if key in self._gauges:
            return self._gauges[key]
        return self._counters.get(key, 0.0)

    def total(self, name: str, **labels: str) -> float:
        """Sum of a counter over every label set that includes ``labels``."""
        want = set(labels.items())
        return sum(v for (n, lab), v in self._counters.items() if n == name and want <= set(lab))

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: defaultdict[str, float] = defaultdict(float)
        for (n, lab), v in self._counters.items():
            if n == name:
                out[dict(lab).get(label, "")] += v
        return dict(out)

    def set_source_state(self, source: str, state: str, detail: str = "") -> None:
        self.sources[source] = {"state": state, "detail": detail, "since": time.time()}

    def error(self, component: str, message: str) -> None:
        self.last_error[component] = message

    def counters(self) -> Iterator[tuple[str, dict[str, str], float]]:
        for (name, labels), value in sorted(self._counters.items()):
            yield name, dict(labels), value

    def gauges(self) -> Iterator[tuple[str, dict[str, str], float]]:
        for (name, labels), value in sorted(self._gauges.items()):
            yield name, dict(labels), value
