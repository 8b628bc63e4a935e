"""Config files: the shipped example and a minimal config, broken as TOML and as data.

At the data level (what ``tomllib`` hands ``parse_config``) keys are dropped, values
replaced by any TOML-shaped value, unknown keys added and source tables swapped between
kinds: only ConfigError may escape, every problem names the file, and a config that
loads has every path resolved.  At the text level the TOML itself is mutated and loaded
from a file with ``load_config``.

Known bugs (see test_corpus.KNOWN_BUGS), tolerated here by type: ``load_config`` leaks
tomllib's plain ValueError (integers over 4300 digits) and RecursionError (deep arrays).
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.config.loading import parse_config
from gateway.errors import ConfigError
from tests.fuzz.seeds import MINIMAL_CONFIG
from tests.fuzz.support import bounded, fuzz_settings, json_values, mutated
from tests.fuzz.targets import ROOT, TARGETS, check_config, run_config_toml

_EXAMPLE = (ROOT / "firmware-config" / "gateway.example.toml").read_bytes()
_DOCS = [tomllib.loads(_EXAMPLE.decode()), tomllib.loads(MINIMAL_CONFIG.decode())]
_toml_values = st.one_of(
    json_values(8).filter(lambda v: v is not None),
    st.datetimes(),
    st.dates(),
    st.times(),
    st.floats(),  # nan and inf are TOML too
    st.sampled_from(["", "../../etc/passwd", "/dev/null", "hci9999", "k1", "rdm6300"]),
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def _config_docs(draw: st.DrawFn) -> Any:
    doc = copy.deepcopy(draw(st.sampled_from(_DOCS)))
    for _ in range(draw(st.integers(1, 5))):
        path = draw(st.sampled_from(_paths(doc)))
        if not path:
            continue
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(("replace", "drop", "unknown", "kind")))
        if action == "replace":
            parent[path[-1]] = draw(_toml_values)
        elif action == "drop" and isinstance(parent, dict):
            parent.pop(path[-1], None)
        elif action == "unknown" and isinstance(parent, dict):
            parent[draw(st.text(max_size=8))] = draw(_toml_values)
        elif action == "kind" and isinstance(parent, dict) and "kind" in parent:
            parent["kind"] = draw(
                st.sampled_from(
                    ["serial_card", "synthetic", "ble", "receipt_tap", "camera", "nope"]
                )
            )
    return doc


@fuzz_settings()
@given(doc=_config_docs())
def test_broken_config_data_gives_config_error_or_a_resolved_config(doc: Any) -> None:
    try:
        cfg = bounded(parse_config, doc, "fuzz.toml", Path("/etc/touchpoint-gateway"))
    except ConfigError as exc:
        assert exc.problems and all(file == "fuzz.toml" for file, _, _ in exc.problems)
        assert all(why for _, _, why in exc.problems)
    else:
        check_config(cfg)


@fuzz_settings(0.7)
@given(text=mutated([_EXAMPLE, MINIMAL_CONFIG], max_ops=4))
def test_mutated_config_files_give_config_error_or_load(text: bytes) -> None:
    try:
        bounded(run_config_toml, text)
    except TARGETS["config_toml"].known_bugs:
        pass
