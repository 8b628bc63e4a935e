from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config.loading import json_schema, load_config
from gateway.errors import ConfigError

ROOT = Path(__file__).resolve().parents[3]

MINIMAL = """
[gateway]
store = "nl-ams-001"
device = "gw-01"
[keyring]
active = "k1"
[keyring.keys]
k1 = "k1.key"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path


def problems(tmp_path: Path, text: str) -> list[tuple[str, str, str]]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def test_minimal_config_gets_sane_defaults_and_resolves_paths(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.keyring.keys["k1"] == tmp_path / "k1.key"
    assert cfg.buffer.when_full == "evict_oldest"
    assert cfg.mqtt.protocol == "5"
    assert cfg.consent.required["card.read"] == ("linking",)


def test_every_problem_names_file_key_and_why(tmp_path: Path) -> None:
    text = (
        MINIMAL.replace('store = "nl-ams-001"', 'store = "NL AMS"')
        + """
[mqtt]
port = 70000
inflight_windw = 3
[[sources]]
kind = "serial_card"
name = "till-1"
device = "/dev/x"
protocol = "wiegand"
lane = "till-1"
"""
    )
    found = problems(tmp_path, text)
    keys = {key for _, key, _ in found}
    assert {"gateway.store", "mqtt.port", "mqtt.inflight_windw", "sources[0].protocol"} <= keys
    for file, _key, why in found:
        assert file.endswith("gateway.toml")
        assert why
    assert any("unknown key" in why for _, key, why in found if key == "mqtt.inflight_windw")


def test_broken_toml_names_the_line(tmp_path: Path) -> None:
    [(file, _key, why)] = problems(tmp_path, "[gateway\nstore=1")
    assert file.endswith("gateway.toml") and "line 1" in why


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def test_active_key_must_be_loaded(tmp_path: Path) -> None:
    [(_, key, why)] = problems(tmp_path, MINIMAL.replace('active = "k1"', 'active = "k2"'))
    assert key == "keyring" and "active key 'k2'" in why


def test_source_names_are_unique(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + """
[[sources]]
kind = "synthetic"
name = "a"
[[sources]]
kind = "synthetic"
name = "a"
"""
    )
    [(_, _key, why)] = problems(tmp_path, text)
    assert "used twice" in why


def test_shipped_example_config_is_valid() -> None:
    cfg = load_config(ROOT / "firmware-config" / "gateway.example.toml")
    assert cfg.sources


def test_shipped_schema_is_current() -> None:
    shipped = (ROOT / "firmware-config" / "gateway.schema.json").read_text(encoding="utf-8")
    assert shipped == json_schema(), (
        "run: touchpoint-gateway config-schema --write firmware-config/gateway.schema.json"
    )
