"""A bounded coverage-guided run over every atheris target (skipped without atheris).

CI (``ci`` profile): one process running the multiplexed ``all`` target on the whole kept
corpus (each file prefixed with its target's byte), so every target replays its corpus and
is mutated under coverage guidance, at the cost of one start-up.  ``deep``: every target in
its own process, two at a time (``atheris.Fuzz`` exits its process).  Runs work on copies:
``tests/fuzz/corpus`` is never written.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.fuzz.atheris_targets import prefixed_corpus
from tests.fuzz.support import profile_name
from tests.fuzz.targets import CORPUS, ROOT, TARGETS

SCRIPT = Path(__file__).with_name("atheris_targets.py")
CI_RUNS = 3000  # over all targets: about 200 per target, beyond the corpus replay
DEEP_RUNS = 50_000  # per target

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("atheris") is None,
    reason="atheris is not installed (pip install atheris; x86_64 Linux wheels only)",
)


def _fuzz(target: str, runs: int, corpus: Path, workdir: Path) -> tuple[str, int, str]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), target, f"-atheris_runs={runs}", "-rss_limit_mb=1024",
         "-max_len=16384", str(corpus)],
        cwd=workdir, capture_output=True, text=True, timeout=1800, check=False,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    return target, proc.returncode, proc.stderr[-3000:]


def test_atheris_targets_run_clean(tmp_path: Path) -> None:
    if profile_name() == "deep":
        for name in TARGETS:
            shutil.copytree(CORPUS / name, tmp_path / name)
        with ThreadPoolExecutor(max_workers=2) as pool:
            results = list(
                pool.map(lambda n: _fuzz(n, DEEP_RUNS, tmp_path / n, tmp_path), sorted(TARGETS))
            )
    else:
        assert prefixed_corpus(tmp_path / "all") > len(TARGETS)
        results = [_fuzz("all", CI_RUNS, tmp_path / "all", tmp_path)]
    failed = [f"{name} (exit {rc}):\n{err}" for name, rc, err in results if rc != 0]
    assert not failed, "\n\n".join(failed)
