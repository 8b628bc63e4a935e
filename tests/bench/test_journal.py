"""``bench journal``: what journald writes, with the daemon's log at a busy store's load."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.headline import headline_rows
from tests.bench.journal import (
    SYSLOG_LEVELS,
    VARIANTS,
    JournalUnavailable,
    bench_journal,
    check_available,
    priority_matches,
)
from tests.bench.registry import BENCHMARKS
from tests.bench.wear import WearUnavailable


def figures(volatile_bytes: int) -> dict[str, object]:
    variants = {
        n: {"bytes_per_hour": b, "device_bytes": b}
        for n, b in (("idle", 4096), ("defaults", 8192), ("volatile", volatile_bytes),
                     ("persistent", 8192))
    }  # fmt: skip
    return {
        "seconds": 60.0,
        "daemon_lines_per_hour": 60,
        "daemon_text_bytes_per_hour": 8000,
        "variants": variants,
    }


def test_journal_is_in_the_one_report() -> None:
    assert "journal" in BENCHMARKS


def test_the_volatile_setting_is_judged_against_zero_bytes() -> None:
    met = {r.figure: r.met for r in headline_rows("journal", figures(0))}
    assert met["journald Storage=volatile (recommended): bytes to the card per hour"] is True
    rows = headline_rows("journal", figures(4096))
    assert [r.met for r in rows if "volatile" in r.figure] == [False]
    defaults = next(r for r in rows if r.figure.startswith("journald defaults"))
    assert (defaults.ours, defaults.reference) == (8192, 4096)  # idle journald beside it


def test_a_priority_matches_the_level_the_line_names() -> None:
    assert priority_matches({"PRIORITY": "4", "MESSAGE": "WARNING gateway.x: slow"})
    # the daemon wrote no <N> prefix: journald kept the stream's default priority
    assert not priority_matches({"PRIORITY": "6", "MESSAGE": "<4>WARNING gateway.x: slow"})
    assert not priority_matches({"PRIORITY": "6", "MESSAGE": "2026-12-08 01:00:00,000 INFO x"})
    assert SYSLOG_LEVELS[3] == "ERROR"


@pytest.mark.slow
@pytest.mark.host
def test_the_daemons_lines_reach_the_journal_and_volatile_writes_nothing() -> None:
    """A short run: the daemon's lines are in the journal at their priority, the volatile
    setting writes 0 bytes to its loop device, and the idle reference was measured."""
    try:
        check_available()
        f = bench_journal(quick=True, seconds=15.0)
    except WearUnavailable as exc:  # not root, no journald, unshare or loop devices
        pytest.skip(str(exc))
    for variant in ("defaults", "volatile"):
        assert f["daemon_lines_since_start"][variant] >= 5, f
        assert f["daemon_lines_priority_mismatch"][variant] == 0, f["daemon_sample_lines"]
    assert f["variants"]["volatile"]["device_bytes"] == 0
    assert f["variants"]["volatile"]["journal_files_bytes"] == 0
    assert f["variants"]["defaults"]["journal_files_bytes"] > 0  # persistent: on the card
    assert f["variants"]["idle"]["device_bytes"] >= 0
    assert f["goal_met"] is True
    assert isinstance(JournalUnavailable("x"), WearUnavailable)


def _settings(lines: list[str]) -> set[str]:
    return {line.split("#")[0].strip() for line in lines if "=" in line.split("#")[0]}


def test_the_settings_measured_are_the_ones_systemd_readme_recommends() -> None:
    """The drop-in in systemd/README.md (volatile; the persistent alternative commented
    out) is the one the bench measures: a change to either shows here."""
    text = (Path(__file__).parents[2] / "systemd" / "README.md").read_text(encoding="utf-8")
    block = text.split("# /etc/systemd/journald.conf.d/touchpoint.conf\n", 1)[1]
    lines = [line.strip() for line in block.split("```", 1)[0].splitlines()]
    volatile = _settings([x for x in lines if not x.startswith("#")])
    alternative = _settings([x[1:] for x in lines if x.startswith("# ") and "=" in x])
    common = volatile - {x for x in volatile if x.startswith(("Storage=", "RuntimeMaxUse="))}
    assert volatile == _settings(VARIANTS["volatile"][0].splitlines())
    assert alternative | common == _settings(VARIANTS["persistent"][0].splitlines())
