"""The benchmarks by name: each module is imported only when its benchmark runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from tests.bench.goals import emulated


def _benchmarks() -> dict[
    str, tuple[Callable[..., dict[str, Any]], Callable[[dict[str, Any]], None]]
]:
    from tests.bench.ble import bench_ble, print_ble
    from tests.bench.drain import bench_drain, print_drain
    from tests.bench.footprint import bench_footprint, print_footprint
    from tests.bench.journal import bench_journal, print_journal
    from tests.bench.memory import bench_memory, print_memory
    from tests.bench.pipeline import bench_pipeline, print_pipeline
    from tests.bench.qr import bench_qr, print_qr
    from tests.bench.wear import bench_wear, print_wear

    return {
        "pipeline": (bench_pipeline, print_pipeline),
        "drain": (bench_drain, print_drain),
        "ble": (bench_ble, print_ble),
        "qr": (bench_qr, print_qr),
        "memory": (bench_memory, print_memory),
        "wear": (bench_wear, print_wear),
        "journal": (bench_journal, print_journal),
        "footprint": (bench_footprint, print_footprint),
    }


# the report's order
BENCHMARKS = ("pipeline", "drain", "ble", "qr", "memory", "wear", "journal", "footprint")


def run_bench(which: str, *, as_json: bool, quick: bool) -> int:
    """Run one benchmark; print its figures (one JSON object with ``as_json``)."""
    measure, show = _benchmarks()[which]
    figures = measure(quick=quick)
    figures.setdefault("emulated", emulated())  # its goals are then not judged
    if as_json:
        print(json.dumps(figures, sort_keys=True))
    else:
        show(figures)
    return 0
