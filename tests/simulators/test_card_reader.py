"""The card reader simulator: scenario parsing, its pty, its CLI."""

from __future__ import annotations

import dataclasses
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from simulators.devices.card_reader import (
    CardReaderSim,
    ScenarioError,
    load_scenario,
    parse_scenario,
    play,
    rdm6300_frame,
    track2,
)

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = sorted((ROOT / "simulators" / "scenarios").glob("*.toml"))
CARD_SCENARIOS = [p for p in SCENARIOS if p.name.startswith("card-")]


def read_all(fd: int, want: int, timeout: float = 2.0) -> bytes:
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < want and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            data += os.read(fd, 4096)
    return data


def open_reader(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)


def test_there_are_example_card_scenarios() -> None:
    names = {p.name for p in CARD_SCENARIOS}
    assert {"card-demo.toml", "card-scanner-faults.toml"} <= names


@pytest.mark.parametrize("path", CARD_SCENARIOS, ids=lambda p: p.name)
def test_example_scenarios_are_valid(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.steps
    assert scenario.name == path.stem


def test_the_demo_scenario_loops_for_about_half_a_minute_or_more() -> None:
    scenario = load_scenario(ROOT / "simulators" / "scenarios" / "card-demo.toml")
    slept: list[float] = []
    assert scenario.loops == 0
    with CardReaderSim() as sim:
        play(sim, dataclasses.replace(scenario, loops=1), sleep=slept.append)
    assert 30 <= sum(slept) <= 60
    actions = {s.action for s in scenario.steps}
    assert {"tap", "noise", "bad_frame"} <= actions


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"steps": []}, "at least one"),
        ({"steps": [{"action": "dance"}]}, "steps[0].action: unknown action"),
        ({"steps": [{"action": "tap", "card": "13005D1DA5", "colour": 1}]}, "key(s) colour"),
        ({"steps": [{"action": "tap", "card": "13005D1DA"}]}, "steps[0].card"),
        ({"steps": [{"action": "tap", "card": "12ab", "protocol": "magstripe"}]}, ".card"),
        ({"steps": [{"action": "tap", "card": "13005D1DA5", "repeats": 0}]}, "steps[0].repeats"),
        ({"steps": [{"action": "pause"}]}, "needs 'seconds'"),
        ({"steps": [{"action": "pause", "seconds": -1}]}, "steps[0].seconds"),
        ({"steps": [{"action": "noise", "count": 2, "hex": "00"}]}, "exactly one"),
        ({"steps": [{"action": "noise", "hex": "zz"}]}, "steps[0].hex"),
        ({"steps": [{"action": "tap", "card": "1", "aim": "E0", "protocol": "scanner"}]}, ".aim"),
        (
            {"scenario": {"protocol": "morse"}, "steps": [{"action": "pause", "seconds": 1}]},
            "scenario.protocol",
        ),
        ({"scenario": {"loop": True}, "steps": [{"action": "pause", "seconds": 1}]}, "[scenario]"),
        ({"step": []}, "unknown top-level"),
    ],
)
def test_bad_scenarios_are_rejected_with_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ScenarioError) as info:
        parse_scenario(data, "x.toml")
    assert message in str(info.value)


def test_load_scenario_reports_bad_toml(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[scenario\n", encoding="utf-8")
    with pytest.raises(ScenarioError, match=r"bad\.toml"):
        load_scenario(bad)


def test_the_pty_is_raw_so_etx_and_cr_pass_through() -> None:
    every_byte = bytes(range(256)) * 2
    with CardReaderSim() as sim:
        fd = open_reader(sim.path)
        try:
            assert sim.write(every_byte) == len(every_byte)
            assert read_all(fd, len(every_byte)) == every_byte
        finally:
            os.close(fd)


def test_playing_steps_writes_the_frames() -> None:
    scenario = parse_scenario(
        {
            "scenario": {"protocol": "rdm6300", "seed": 3},
            "steps": [
                {"action": "tap", "card": "13005d1da5", "repeats": 3, "interval_s": 0.2},
                {"action": "noise", "hex": "00ff"},
                {"action": "bad_frame", "card": "13005D1DA5"},
                {"action": "partial", "card": "13005D1DA5", "keep": 4},
                {"action": "tap", "card": "0001234567890", "protocol": "magstripe", "lrc": False},
            ],
        }
    )
    frame = b"\x0213005D1DA5F6\x03"
    expected = (
        frame * 3
        + b"\x00\xff"
        + b"\x0213005D1DA509\x03"
        + frame[:4]
        + track2("0001234567890", lrc=False)
    )
    slept: list[float] = []
    with CardReaderSim() as sim:
        fd = open_reader(sim.path)
        try:
            play(sim, scenario, rate_scale=2, sleep=slept.append)
            assert read_all(fd, len(expected)) == expected
        finally:
            os.close(fd)
    assert slept == [0.1, 0.1]
    assert rdm6300_frame("13005d1da5") == frame


def test_unplug_removes_the_link_and_replug_relinks(tmp_path: Path) -> None:
    link = tmp_path / "card0"
    with CardReaderSim(link=link) as sim:
        first = sim.path
        assert link.resolve() == Path(first).resolve()
        fd = open_reader(first)
        try:
            sim.unplug()
            assert not link.exists()
            assert not sim.plugged
            assert sim.write(b"lost") == 0
            try:
                data: bytes | None = os.read(fd, 10)
            except OSError:
                data = None  # EIO
            assert not data  # the reader sees the hang-up: EIO or EOF
        finally:
            os.close(fd)
        second = sim.open()
        assert link.resolve() == Path(second).resolve()
    assert not link.exists()


def test_cli_prints_the_pty_path_first_and_plays(tmp_path: Path) -> None:
    scenario = tmp_path / "two.toml"
    scenario.write_text(
        '[scenario]\nloops = 0\n[[steps]]\naction = "tap"\ncard = "13005D1DA5"\n'
        '[[steps]]\naction = "pause"\nseconds = 0.5\n',
        encoding="utf-8",
    )
    link = tmp_path / "card0"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulators.devices.card_reader",
            str(scenario),
            "--link",
            str(link),
            "--rate-scale",
            "10",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        path = proc.stdout.readline().strip()
        assert path.startswith("/dev/")
        fd = open_reader(str(link))
        try:
            assert b"\x0213005D1DA5F6\x03" in read_all(fd, 28)
        finally:
            os.close(fd)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=5)
    assert proc.returncode == 0, err
    assert not link.exists()
