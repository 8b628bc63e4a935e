"""Counters and gauges, labelled, kept in memory and read by status, health and the demo.

Single-threaded by design: only the event loop thread updates them (callbacks from
library threads enqueue to the loop first).  Hot paths take a ``Cell`` once with
``counter(name, **labels)`` and bump ``cell.value``; everything else calls ``inc``.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

LabelKey = tuple[str, tuple[tuple[str, str], ...]]


def _key(name: str, labels: dict[str, str]) -> LabelKey:
    return name, tuple(sorted(labels.items()))


class Cell:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


class Metrics:
    def __init__(self) -> None:
        self._counters: dict[LabelKey, Cell] = {}
        self._gauges: dict[LabelKey, float] = {}
        self.sources: dict[str, dict[str, Any]] = {}
        self.last_error: dict[str, str] = {}

    def counter(self, name: str, **labels: str) -> Cell:
        key = _key(name, labels)
        cell = self._counters.get(key)
        if cell is None:
            cell = self._counters[key] = Cell()
        return cell

    def inc(self, name: str, amount: float = 1, **labels: str) -> None:
        self.counter(name, **labels).value += amount

    def set(self, name: str, value: float, **labels: str) -> None:
        self._gauges[_key(name, labels)] = value

    def get(self, name: str, **labels: str) -> float:
        key = _key(name, labels)
        if key in self._gauges:
            return self._gauges[key]
        cell = self._counters.get(key)
        return cell.value if cell is not None else 0.0

    def total(self, name: str, **labels: str) -> float:
        """Sum of a counter over every label set that includes ``labels``."""
        want = set(labels.items())
        return sum(
            c.value for (n, lab), c in self._counters.items() if n == name and want <= set(lab)
        )

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out: defaultdict[str, float] = defaultdict(float)
        for (n, lab), c in self._counters.items():
            if n == name:
                out[dict(lab).get(label, "")] += c.value
        return dict(out)

    def set_source_state(self, source: str, state: str, detail: str = "") -> None:
        self.sources[source] = {"state": state, "detail": detail, "since": time.time()}

    def error(self, component: str, message: str) -> None:
        self.last_error[component] = message

    def label_sets(self) -> int:
        """How many (name, labels) series are kept: counters and gauges."""
        return len(self._counters) + len(self._gauges)

    def counters(self) -> Iterator[tuple[str, dict[str, str], float]]:
        for (name, labels), cell in sorted(self._counters.items()):
            yield name, dict(labels), cell.value

    def gauges(self) -> Iterator[tuple[str, dict[str, str], float]]:
        for (name, labels), value in sorted(self._gauges.items()):
            yield name, dict(labels), value
