"""Table-driven: every target, fed structure-aware mutations of its corpus.

The corpus (valid inputs from the contract vectors, the simulators' encoders and the
example config, plus what fuzzing found) is the seed set; each example applies up to six
byte-level edits (bit flips, format-significant bytes, little-endian length fields set to
edge values, runs, splices of two seeds, truncation).  Each input must keep its target's
contract (see ``tests/fuzz/targets.py``) within the per-input time bound.
"""

from __future__ import annotations

import pytest
from hypothesis import given

from tests.fuzz.support import fuzz_settings, mutated
from tests.fuzz.targets import TARGETS, check, corpus_files

# costly targets (a thread and an event loop per input, a file write) get fewer examples
_SCALE = {"consent_api": 0.5, "consent_push": 0.7, "config_toml": 0.7}


def _property(name: str):  # type: ignore[no-untyped-def]
    seeds = [p.read_bytes() for p in corpus_files(name)]

    @fuzz_settings(_SCALE.get(name, 1.0))
    @given(data=mutated(seeds))
    def prop(data: bytes) -> None:
        check(TARGETS[name], data, strict=False)

    return prop


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_mutated_corpus_keeps_the_contract(name: str) -> None:
    _property(name)()
