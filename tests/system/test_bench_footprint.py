"""``python -m tests.bench footprint``: the package sizes, RSS and start -> READY of
issue 17 in the one benchmark report, beside their goals (figures, not timed asserts)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from simulators.rig.store import StoreRig
from tests.bench.footprint import HOST_ARCH
from tests.bench.headline import headline_rows
from tests.bench.memory import without_camera


def test_the_store_config_without_the_camera_keeps_every_other_source(tmp_path: Path) -> None:
    text = StoreRig(tmp_path).config_text()
    kept = without_camera(text)
    assert 'kind = "camera"' in text and 'kind = "camera"' not in kept
    for kind in ("serial_card", "ble", "receipt_tap"):
        assert f'kind = "{kind}"' in kept, kind
    assert kept.count("[[sources]]") == text.count("[[sources]]") - 1
    with pytest.raises(ValueError, match="camera"):
        without_camera(kept)


def _figures(**sizes: object) -> dict[str, object]:
    return {
        "sizes": sizes, "goal_base_mb": 60.0, "goal_base_camera_mb": 300.0,
        "goal_rss_mib": 64.0, "goal_ready_s": 0.5, "rss_peak_mib": 64.1,
        "reference_rss_peak_mib": 48.0, "start_to_ready_s": 0.5,
        "start_to_ready_max_s": 0.7, "start_to_ready_runs": [0.4, 0.5, 0.7],
        "start_to_ready_cpu_s": 0.3, "reference_python_start_s": 0.04,
    }  # fmt: skip


def test_headline_judges_each_figure_against_its_goal() -> None:
    arm64 = {"base_mb": 61.0, "base_camera_mb": 299.9, "base_installed_size_mb": 27.0,
             "base_camera_installed_size_mb": 200.0}  # fmt: skip
    rows = headline_rows("footprint", _figures(arches=["arm64"], arm64=arm64))
    met = {r.figure: (r.ours, r.goal, r.met) for r in rows}
    assert met == {
        "installed size, base package (arm64, on disk with bytecode)": (61.0, "≤ 60 MB", False),
        "installed size, base + camera (arm64, on disk with bytecode)": (299.9, "≤ 300 MB", True),
        "packaged daemon RSS, every source but the camera at load (peak)":
            (64.1, "≤ 64 MiB", False),
        "start → READY, every source but the camera (median)": (0.5, "≤ 0.5 s", True),
    }  # fmt: skip
    assert rows[0].note == "dpkg Installed-Size 27.0 MB"
    assert rows[2].reference == 48.0 and rows[3].reference == 0.04


def test_packages_that_could_not_be_built_are_a_row_that_says_why() -> None:
    rows = headline_rows("footprint", _figures(size_error="dpkg-deb not found (apt-get ...)"))
    assert rows[0].figure == "installed size (packages not built)" and rows[0].ours is None
    assert rows[0].note == "dpkg-deb not found (apt-get ...)" and rows[0].met is None
    assert len(rows) == 3


@pytest.mark.slow
def test_quick_report_has_sizes_rss_and_ready_beside_goals(tmp_path: Path) -> None:
    out = tmp_path / "report"
    done = subprocess.run(
        [sys.executable, "-m", "tests.bench", "--quick", "--only", "footprint",
         "--out", str(out)],
        capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    result = report["benchmarks"]["footprint"]
    assert result["status"] == "ok", result
    f = result["figures"]
    rows = {r["figure"]: r for r in report["headline"] if r["benchmark"] == "footprint"}

    if shutil.which("dpkg-deb") is not None:
        sizes = f["sizes"]
        assert "size_error" not in sizes, sizes
        arch = HOST_ARCH
        assert sizes["arches"] == [arch]  # the full profile builds amd64 and arm64
        s = sizes[arch]
        base = rows[f"installed size, base package ({arch}, on disk with bytecode)"]
        assert base["ours"] == s["base_mb"] and base["goal"] == "≤ 60 MB"
        assert base["met"] == (s["base_mb"] <= 60)
        both = rows[f"installed size, base + camera ({arch}, on disk with bytecode)"]
        assert both["ours"] == s["base_camera_mb"] > s["base_mb"]
        assert both["goal"] == "≤ 300 MB" and both["met"] == (s["base_camera_mb"] <= 300)
        # on disk (blocks, bytecode) is never less than dpkg's sum of file sizes
        assert s["base_mb"] >= s["base_installed_size_mb"] > 1
        assert "package's launcher" in f["daemon"]
    else:
        assert rows["installed size (packages not built)"]["note"].startswith("dpkg-deb")

    rss = rows["packaged daemon RSS, every source but the camera at load (peak)"]
    assert 10 < rss["ours"] == f["rss_peak_mib"]
    assert 10 < rss["reference"] == f["reference_rss_peak_mib"]
    assert rss["goal"] == "≤ 64 MiB" and rss["met"] == (rss["ours"] <= 64)
    # every source but the camera really ran while RSS was sampled, and the window began
    # once each had reached the central (as bench memory's), not at exec
    assert f["silent_sources"] == [], f["events_by_source"]
    assert 0 < f["load_s"] <= f["samples"][-1][0] - f["seconds"] + 0.5, f["load_s"]  # 1 interval
    assert f["camera_events"] == 0
    ready = rows["start → READY, every source but the camera (median)"]
    assert 0 < ready["ours"] == f["start_to_ready_s"] and len(f["start_to_ready_runs"]) == 3
    assert 0 < ready["reference"] == f["reference_python_start_s"]
    assert ready["goal"] == "≤ 0.5 s" and ready["met"] == (ready["ours"] <= 0.5)

    md = (out / "report.md").read_text(encoding="utf-8")
    assert "| footprint | installed size, base package" in md or "size_error" in f["sizes"]
    assert "| footprint | packaged daemon RSS" in md and "≤ 64 MiB" in md
