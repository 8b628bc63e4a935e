"""Replay the kept corpus on every run: seeds, and every input a fuzzer found.

Inputs that reproduce an open bug are named ``bug-*`` and listed in ``KNOWN_BUGS``; they
run strictly as ``xfail(strict=True)``: when the parser is fixed the XPASS fails the run,
and the entry (and the target's ``known_bugs`` tolerance) should then be removed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzz.seeds import SEEDS
from tests.fuzz.targets import CORPUS, TARGETS, check, corpus_files

# Open bugs: (target, corpus file) -> reason; each runs as xfail(strict=True) until fixed.
# Fixed ones are kept as regression-* inputs (the five the fuzzers found first: unhashable
# purposes and deep nesting in consent bodies, huge ints and deep arrays in TOML configs,
# non-ASCII and huge digit runs in iBeacon majors).
KNOWN_BUGS: dict[tuple[str, str], str] = {}


def _cases() -> list[object]:
    cases: list[object] = []
    for name in TARGETS:
        for path in corpus_files(name):
            reason = KNOWN_BUGS.get((name, path.name))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            cases.append(pytest.param(name, path, marks=marks, id=f"{name}/{path.name}"))
    return cases


@pytest.mark.parametrize(("target", "path"), _cases())
def test_corpus_input_keeps_the_contract(target: str, path: Path) -> None:
    check(TARGETS[target], path.read_bytes(), strict=True)


def test_every_target_has_a_small_corpus() -> None:
    assert sorted(p.name for p in CORPUS.iterdir() if p.is_dir()) == sorted(TARGETS)
    for name in TARGETS:
        files = corpus_files(name)
        assert any(p.name.startswith("seed-") for p in files), name
        assert all(p.stat().st_size <= 16 * 1024 for p in files), name


def test_known_bugs_are_in_the_corpus_and_named_bug() -> None:
    for name, file in KNOWN_BUGS:
        assert (CORPUS / name / file).is_file(), (name, file)
    bug_files = {(n, p.name) for n in TARGETS for p in corpus_files(n) if p.name.startswith("bug-")}
    assert bug_files == set(KNOWN_BUGS)


def test_every_seed_seeds_py_makes_is_kept() -> None:
    # names only: seeds made from files others edit (the example config) may drift
    for name, make in SEEDS.items():
        want = {f"seed-{label}" for label in make()}
        have = {p.name for p in corpus_files(name) if p.name.startswith("seed-")}
        assert have == want, f"run `python -m tests.fuzz.seeds` to refresh corpus/{name}"
