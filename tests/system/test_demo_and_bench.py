"""The README's demo command and the benchmark command run and report."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_the_daemon_against_the_simulators(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulators.rig.demo",
            "--seconds",
            "34",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,  # a hang guard: on a slow box the story ends first (STORY_PATIENCE_S)
        check=True,
    ).stdout
    # the story, in its order, each step after what it needs (simulators.rig.demo._Story)
    story = [
        "demo: the broker goes down: events stay in the buffer",
        "demo: the iBeacon shopper withdraws consent (",
        "demo: the withdrawal is applied: ",
        "demo: the broker is back: the buffer drains, none of the leaver's",
    ]
    at = [out.find(line) for line in story]
    assert -1 not in at and at == sorted(at), out
    assert "stopped before the story ended" not in out, out
    buffered = re.search(r"withdraws consent \((\d+) of their events in the buffer\)", out)
    assert buffered and int(buffered[1]) > 0, out
    last = [line for line in out.splitlines() if " forwarded " in line][-1]
    assert "demo: consent decisions: " in out and "consented" in out
    fields = dict(re.findall(r"([a-z()]+(?: accepted)?) (\d+)", last))
    assert int(fields["forwarded"]) > 0, out
    assert int(fields["central accepted"]) == int(fields["forwarded"]), out
    assert int(fields["dropped(consent)"]) > 0, "the demo shows a shopper without consent"
    assert int(fields["erased"]) > 0, "the withdrawing shopper's buffered events are erased"
    assert "the broker is back" in out
    for source in ("cards", "presence", "kiosk", "receipts"):
        assert int(fields[source]) > 0, (source, out)
    events = [json.loads(x) for x in (tmp_path / "central-events.jsonl").read_text().splitlines()]
    assert {e["type"] for e in events} >= {
        "card.read",
        "presence.enter",
        "qr.scan",
        "receipt.printed",
    }, "every simulated source reaches the central"
    stats = json.loads((tmp_path / "central-stats.json").read_text())
    assert stats["invalid_total"] == 0, stats


def test_bench_pipeline_prints_its_figures_as_json() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tests.bench", "pipeline", "--quick", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    figures = json.loads(out)
    for key in ("events_per_s", "reference_events_per_s", "ratio", "p99_ms", "wan_events_per_s"):
        assert figures[key] > 0, key
    assert figures["ratio"] == pytest.approx(
        figures["events_per_s"] / figures["reference_events_per_s"], rel=0.01
    )
