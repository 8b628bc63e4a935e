"""Provisioning: template + store -> a validated config and 0400 key files, or nothing."""

from __future__ import annotations

import argparse
import base64
import os
import stat
import tomllib
from pathlib import Path
from typing import Any

import pytest

from gateway.app.provision import (
    UNIT_CREDENTIALS,
    add_parser,
    check_rows,
    dumps_toml,
    merge,
    provision,
    read_store_row,
    read_store_rows,
)
from gateway.config.credentials import expand_credentials_in
from gateway.config.loading import Config, parse_config
from gateway.config.sources import ReceiptTapSourceConfig
from gateway.errors import ConfigError
from gateway.identity.pseudonyms import Keyring

FIRMWARE = Path(__file__).resolve().parents[3] / "firmware-config"
TEMPLATE = FIRMWARE / "store-template.toml"
STORE_FILE = FIRMWARE / "store.example.toml"
CSV = FIRMWARE / "stores.example.csv"


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    src = tmp_path / "usb"
    src.mkdir()
    (src / "k1").write_text(base64.b64encode(bytes(range(64, 96))).decode() + "\n")
    (src / "pw").write_text("s3cret\n")
    return {"k1.key": src / "k1", "mqtt.password": src / "pw"}


def load_as_the_service(path: Path) -> Config:
    """What the daemon does under systemd: expand ${CREDENTIALS_DIRECTORY}, validate."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    expanded, problems = expand_credentials_in(data, str(path.parent / "credstore"))
    assert problems == []
    return parse_config(expanded, str(path), path.parent)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_round_trip_with_a_store_file(tmp_path: Path, keys: dict[str, Path]) -> None:
    out = tmp_path / "etc"
    path = provision(TEMPLATE, STORE_FILE, out, keys)
    assert path == out / "gateway.toml"
    cfg = load_as_the_service(path)
    assert (cfg.gateway.store, cfg.gateway.device) == ("nl-rtm-004", "gw-01")
    assert cfg.mqtt.username == "nl-rtm-004-gw-01"
    assert cfg.mqtt.password_file == out / "credstore" / "mqtt.password"
    names = [s.name for s in cfg.sources]
    assert names == ["entrance", "till-1-card", "till-1-printer", "till-2-card"]  # kiosk omitted
    printer = cfg.sources[2]
    assert printer.kind == "receipt_tap"
    assert printer.printer_host == "203.0.113.10"
    assert printer.url_prefix == "HTTPS://R.EXAMPLE.COM/R/"  # kept from the template
    # the keyring loads from the credstore, with the bytes that were given
    ring = Keyring.from_files(cfg.keyring.keys, cfg.keyring.active)
    assert ring.active_key == bytes(range(64, 96))
    # secrets stay out of the config; key files are 0400 in a 0700 directory
    text = path.read_text()
    assert "s3cret" not in text
    assert "${CREDENTIALS_DIRECTORY}/k1.key" in text
    assert mode(out / "credstore") == 0o700
    assert mode(out / "credstore" / "k1.key") == 0o400
    assert mode(out / "credstore" / "mqtt.password") == 0o400
    assert (out / "credstore" / "mqtt.password").read_text() == "s3cret\n"
    assert mode(path) == 0o644
    assert sorted(p.name for p in out.iterdir()) == ["credstore", "gateway.toml"]  # no temps


@pytest.mark.parametrize("row", read_store_rows(CSV), ids=lambda r: r["gateway.store"])
def test_every_csv_row_provisions(
    row: dict[str, str], tmp_path: Path, keys: dict[str, Path]
) -> None:
    cfg = load_as_the_service(provision(TEMPLATE, row, tmp_path / "etc", keys))
    assert cfg.gateway.store == row["gateway.store"]
    assert cfg.mqtt.username == row["mqtt.username"]
    assert cfg.mqtt.port == 8883  # typed from the template
    printer = next(s for s in cfg.sources if s.name == "till-1-printer")
    assert isinstance(printer, ReceiptTapSourceConfig)
    assert printer.printer_host == row["sources.till-1-printer.printer_host"]
    want_inject = row["sources.till-1-printer.inject"] or "native"  # empty: template's
    assert printer.inject == want_inject


def test_csv_row_selection(tmp_path: Path) -> None:
    assert read_store_row(CSV, "nl-utr-002")["sources.till-1-printer.inject"] == "raster"
    with pytest.raises(ConfigError, match="no row for xx-none"):
        read_store_row(CSV, "xx-none")
    dup = tmp_path / "dup.csv"
    dup.write_text("gateway.store,gateway.device\ns1,gw-01\ns1,gw-02\n")
    with pytest.raises(ConfigError, match="2 rows"):
        read_store_row(dup, "s1")
    assert read_store_row(dup, "s1", "gw-02")["gateway.device"] == "gw-02"


def test_invalid_store_is_refused_listing_every_problem_and_writing_nothing(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    short = tmp_path / "short.key"
    short.write_text(base64.b64encode(b"too short").decode())
    row = {
        "gateway.store": "Not A Store",
        "gateway.device": "gw-01",
        "mqtt.port": "eighty",
        "mqtt.usrname": "typo",
        "sources.till-1-printer.listen_port": "70000",
    }  # mqtt.username and printer_host left as <per-store>
    out = tmp_path / "etc"
    with pytest.raises(ConfigError) as info:
        provision(TEMPLATE, row, out, {"k1.key": short})
    problems = {(key, why) for _, key, why in info.value.problems}
    keys_named = {key for key, _ in problems}
    assert "mqtt.port" in keys_named  # cannot be an int
    assert "mqtt.usrname" in keys_named  # not a template key
    assert "gateway.store" in keys_named  # pattern
    assert "mqtt.username" in keys_named  # placeholder left
    assert "sources[3].printer_host" in keys_named
    assert "sources[3].listen_port" in keys_named  # > 65535
    assert "mqtt.password" in keys_named  # credential not given
    assert any("needs at least 32" in why for _, why in problems)  # the short key
    assert not out.exists()


def test_refusal_leaves_an_existing_config_untouched(tmp_path: Path, keys: dict[str, Path]) -> None:
    out = tmp_path / "etc"
    path = provision(TEMPLATE, STORE_FILE, out, keys)
    before = path.read_bytes()
    bad = tmp_path / "bad.toml"
    bad.write_text('[[sources]]\nname = "till-2-card"\nprotocol = "wiegand"\n')
    with pytest.raises(ConfigError) as info:
        provision(TEMPLATE, bad, out, keys)
    assert [(key, why.split(" (")[0]) for _, key, why in info.value.problems] == [
        ("gateway.store", "the template requires a per-store value"),
        ("mqtt.username", "the template requires a per-store value"),
        ("sources[3].printer_host", "the template requires a per-store value"),
        ("sources[4]", "Unable to extract tag using discriminator 'kind'"),  # a new source
    ]
    assert path.read_bytes() == before


def test_reprovision_reuses_credentials_in_the_credstore(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    out = tmp_path / "etc"
    provision(TEMPLATE, STORE_FILE, out, keys)
    load_as_the_service(provision(TEMPLATE, read_store_row(CSV, "nl-ams-001"), out))
    with pytest.raises(ConfigError, match="never names this credential"):
        provision(TEMPLATE, STORE_FILE, out, {"client.key": keys["k1.key"]})


def test_dry_run_writes_nothing(tmp_path: Path, keys: dict[str, Path]) -> None:
    out = tmp_path / "etc"
    assert provision(TEMPLATE, STORE_FILE, out, keys, dry_run=True) == out / "gateway.toml"
    assert not out.exists()


def test_merge_rules() -> None:
    tmpl: dict[str, Any] = {
        "a": {"x": 1, "y": [1, 2]},
        "sources": [{"name": "s1", "k": 1}, {"name": "s2", "k": 2}],
    }
    store = {
        "a": {"y": [3]},
        "sources": [{"name": "s2", "k": 20}, {"name": "s1", "omit": True}, {"name": "s3"}],
    }
    assert merge(tmpl, store) == {
        "a": {"x": 1, "y": [3]},
        "sources": [{"name": "s2", "k": 20}, {"name": "s3"}],
    }
    assert tmpl["sources"][0] == {"name": "s1", "k": 1}  # inputs untouched


def test_toml_writer_round_trips() -> None:
    data: dict[str, Any] = {
        "top": 'quote " backslash \\ newline \n tab \t é',
        "n": -3,
        "f": 0.1,
        "big": 2**40,
        "flag": False,
        "empty": [],
        "inline": [{"a": 1}, 2],
        "t": {"dotted.key": ["x", "y"], "sub": {"deep": 1.5}, "empty": {}},
        "sources": [
            {"name": "a", "nested": {"k": 1}, "items": [{"z": 1}, {"z": 2}]},
            {"name": "b"},
        ],
    }
    assert tomllib.loads(dumps_toml(data)) == data


def test_cli_command(
    tmp_path: Path, keys: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="touchpoint-gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    p = add_parser(sub)
    assert p.description and "0400" in p.description
    help_text = p.format_help()
    for option in ("--template", "--store-file", "--csv", "--store", "--key", "--out"):
        assert option in help_text
    out = tmp_path / "etc"
    args = parser.parse_args(
        [
            "provision",
            "--template",
            str(TEMPLATE),
            "--csv",
            str(CSV),
            "--store",
            "be-ant-003",
            "--key",
            f"k1.key={keys['k1.key']}",
            "--key",
            f"mqtt.password={keys['mqtt.password']}",
            "--out",
            str(out),
            "--dropin-dir",
            str(tmp_path / "touchpoint-gateway.service.d"),
        ]
    )
    assert args.fn(args) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'gateway.toml'}" in printed
    assert load_as_the_service(out / "gateway.toml").gateway.store == "be-ant-003"
    assert os.access(out / "credstore" / "k1.key", os.R_OK)
    with pytest.raises(SystemExit):
        parser.parse_args(["provision", "--template", "t", "--csv", "c", "--key", "nokey"])


def test_the_drop_in_loads_every_credential_the_unit_does_not(
    tmp_path: Path, keys: dict[str, Path]
) -> None:
    """A store whose config names a credential beyond the unit's own (a TLS client key
    here) gets a drop-in with its LoadCredential=, so no per-box `systemctl edit`."""
    store = tmp_path / "store.toml"
    store.write_text(
        'gateway.store = "nl-ams-001"\n'
        'mqtt.username = "nl-ams-001-gw-01"\n'
        "[mqtt.tls]\n"
        'cert_file = "/etc/touchpoint-gateway/tls/client.pem"\n'
        'key_file = "${CREDENTIALS_DIRECTORY}/mqtt-client.key"\n'
        '[[sources]]\nname = "till-1-printer"\nprinter_host = "192.0.2.50"\n',
        encoding="utf-8",
    )
    client_key = tmp_path / "usb" / "client.key"
    client_key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    dropins = tmp_path / "touchpoint-gateway.service.d"
    provision(
        TEMPLATE,
        store,
        tmp_path / "etc",
        {**keys, "mqtt-client.key": client_key},
        dropin_dir=dropins,
    )
    text = (dropins / "credentials.conf").read_text(encoding="utf-8")
    assert "[Service]" in text
    assert (
        "LoadCredential=mqtt-client.key:/etc/touchpoint-gateway/credstore/mqtt-client.key" in text
    )
    assert "k1.key" not in text.split("[Service]")[1]  # the unit loads it already


def test_unit_credentials_match_the_unit_file() -> None:
    unit = (FIRMWARE.parent / "systemd" / "touchpoint-gateway.service").read_text()
    loaded = {
        line.split("=", 1)[1].split(":", 1)[0]
        for line in unit.splitlines()
        if line.startswith("LoadCredential=")
    }
    assert loaded == UNIT_CREDENTIALS


def test_the_template_turns_health_on() -> None:
    template = tomllib.loads(TEMPLATE.read_text(encoding="utf-8"))
    assert "health" in template, "a provisioned box must have /healthz and /metrics"


def test_every_row_of_the_chain_csv_checks_offline_without_secrets(tmp_path: Path) -> None:
    """`check-config --offline --template T --csv C`: every row is merged and validated
    with no secret at hand; bad rows name their line and problem."""
    results = check_rows(TEMPLATE, CSV)
    assert len(results) == len(read_store_rows(CSV))
    assert all(problems == [] for _, problems in results), results
    bad = tmp_path / "stores.csv"
    lines = CSV.read_text(encoding="utf-8").splitlines()
    bad.write_text(
        "\n".join([lines[0], lines[1], lines[2].replace("raster", "laser"), ""]),
        encoding="utf-8",
    )
    results = check_rows(TEMPLATE, bad)
    assert results[0][1] == []
    label, problems = results[1]
    assert label.endswith(":3 nl-utr-002/gw-01")
    assert any("inject" in key for _, key, _ in problems), problems


def test_check_config_offline_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.app.cli import main

    assert main(["check-config", "--offline", "--template", str(TEMPLATE), "--csv", str(CSV)]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok") == len(read_store_rows(CSV)), out
