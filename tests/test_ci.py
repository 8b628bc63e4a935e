"""CI's split (.ci/run): the whole suite runs in .ci/fresh-root's root, and the tests
marked ``host`` (which need the machine itself) run on the host.  Inside the root they
must skip, named as such, not fail or silently pass."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pytest(*args: str, fresh_root: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TOUCHPOINT_FRESH_ROOT"}
    if fresh_root:
        env["TOUCHPOINT_FRESH_ROOT"] = "1"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    return done.stdout + done.stderr


def test_host_tests_skip_inside_the_fresh_root_with_the_reason() -> None:
    out = _pytest("-m", "host", "tests/powercut/test_cutfs.py", fresh_root=True)
    assert " passed" not in out and " failed" not in out, out
    assert "skipped" in out and "marker `host`" in out, out


def test_ci_runs_the_host_tests_on_the_host() -> None:
    run = (ROOT / ".ci" / "run").read_text()
    assert ".ci/fresh-root --arch amd64" in run
    assert 'make test PYTEST_ARGS="-p no:cacheprovider -m host"' in run


def test_the_host_marker_selects_the_power_cuts_and_the_package_install() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-m", "host", "tests/powercut", "tests/systemd"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    files = {line.split("::")[0] for line in done.stdout.splitlines() if "::" in line}
    assert "tests/powercut/test_powercut.py" in files, done.stdout + done.stderr
    assert "tests/powercut/test_cutfs.py" in files
    assert "tests/systemd/test_units.py" not in files
