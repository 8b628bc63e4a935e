"""The soak (tests/soak/soak_run.py): a short smoke run in ``make test``, the week behind
the ``soak`` marker (``make soak``), and the checks shown to fail on a leak."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from tests.soak.analysis import (
    check,
    find_raw,
    flat,
    map_growth,
    silent_sources,
    write_outputs,
)
from tests.soak.soak_run import SoakPlan, machine, run_soak
from tests.waiting import SLOWDOWN


def _series(n: int, days: float, rss: Any, maps: Any) -> list[dict[str, Any]]:
    return [{"sim_days": days * i / (n - 1), "rss_mib": rss(i), "maps": maps(i)} for i in range(n)]


def test_flat_fails_on_a_leak_and_passes_a_level_series() -> None:
    level = _series(100, 7, lambda i: 60.0 + (i % 3), lambda i: {})
    leak = _series(100, 7, lambda i: 60.0 + 0.2 * i, lambda i: {})
    assert flat(level, "rss_mib", 1.5)[0]
    ok, detail, fig = flat(leak, "rss_mib", 1.5)
    assert not ok, detail
    assert fig["growth_pct"] > 10


def test_map_growth_flags_an_unbounded_map_but_not_a_bounded_one() -> None:
    samples = _series(
        100, 7, lambda i: 60.0, lambda i: {"grows": i, "cycles": i % 7, "capped": min(i, 90)}
    )
    rows, bad = map_growth(samples, {"capped": 90})
    verdicts = {r["map"]: r["verdict"] for r in rows}
    assert verdicts == {"capped": "within bound", "cycles": "flat", "grows": "GROWING"}
    assert bad == ["grows 49 -> 99"]


def test_silent_sources_names_a_source_that_stopped_half_way() -> None:
    samples = [
        {"sim_days": d / 10, "sources": {"cam": min(d, 30), "cards": 5 * d}} for d in range(71)
    ]
    assert silent_sources(samples, ["cam", "cards"]) == (
        ["cam (second half)", "cam (last day)"],
        "second half and last day",
    )


def test_find_raw_sees_identifiers_in_any_case(tmp_path: Path) -> None:
    f = tmp_path / "f.bin"
    f.write_bytes(b'x{"subject":"k1:abc"}\x00 2600000000042 ... 0a1b2c3d4e')
    found = find_raw([f], ["2600000000042", "2600000000043", "0A1B2C3D4E", "app-user-1001"])
    assert found == ["0a1b2c3d4e in f.bin", "2600000000042 in f.bin"]


def test_find_raw_sees_identifiers_across_read_boundaries(tmp_path: Path) -> None:
    """The files are read in pieces: an identifier split by any boundary is still found,
    and a file shorter than the longest identifier is searched whole."""
    raws = ["2600000000042", "APP-USER-1001"]
    for offset in range(20):
        f = tmp_path / f"f{offset}.bin"
        f.write_bytes(b"." * offset + b"app-user-1001 " + b"-" * offset + b"x2600000000042y")
        for chunk in (1, 3, 7, 13, 64):
            assert find_raw([f], raws, chunk=chunk) == [
                f"2600000000042 in {f.name}",
                f"app-user-1001 in {f.name}",
            ], (offset, chunk)
    short = tmp_path / "short.bin"
    short.write_bytes(b"2600")
    assert find_raw([short], raws, chunk=2) == []
    assert find_raw([short], ["2600"], chunk=1) == ["2600 in short.bin"]


def _run_and_check(plan: SoakPlan, tmp_path: Path, *, flat_checks: bool) -> None:
    run = run_soak(plan, tmp_path / "work")
    verdict = check(run, flat_checks=flat_checks)
    out = Path(os.environ.get("TOUCHPOINT_SOAK_OUT", tmp_path / "out"))
    write_outputs(run, verdict, out, machine())
    assert (out / "soak.png").stat().st_size > 10_000
    assert (out / "samples.csv").read_text().count("\n") == len(run.samples) + 1
    assert verdict.ok, "\n".join(verdict.failures())


@pytest.mark.slow
@pytest.mark.timeout(300 * SLOWDOWN)
def test_soak_smoke_half_a_day(tmp_path: Path) -> None:
    """Half a simulated day in ~45 s with one broker outage: the same harness and checks
    as the week, except RSS / fd flatness (a 45 s run has no steady state to judge).
    Under emulation the same half day takes ``SLOWDOWN`` times as long: at 45 s, the
    kiosk camera's decoding, starved, fell silent for its second half."""
    plan = SoakPlan.smoke()
    plan = dataclasses.replace(plan, real_s=plan.real_s * SLOWDOWN)
    _run_and_check(plan, tmp_path, flat_checks=False)


@pytest.mark.soak
@pytest.mark.timeout(3600)
def test_soak_seven_days(tmp_path: Path) -> None:
    """A busy store's week in ~10 real minutes: RSS and fds flat, maps bounded."""
    days = float(os.environ.get("TOUCHPOINT_SOAK_DAYS", "7"))
    minutes = float(os.environ.get("TOUCHPOINT_SOAK_MINUTES", "10"))
    _run_and_check(SoakPlan(days=days, real_s=minutes * 60), tmp_path, flat_checks=True)
