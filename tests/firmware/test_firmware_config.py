"""Every file in firmware-config/ is parsed and validated; a new file needs a check here."""

from __future__ import annotations

import base64
import configparser
import json
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest
from jsonschema.validators import validator_for

from gateway.app.provision import provision, read_store_rows, row_overrides
from gateway.config.loading import load_config

FIRMWARE = Path(__file__).resolve().parents[2] / "firmware-config"
TEMPLATE = FIRMWARE / "store-template.toml"
CSV = FIRMWARE / "stores.example.csv"


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "k1").write_text(base64.b64encode(bytes(range(64, 96))).decode())
    (tmp_path / "pw").write_text("pw\n")
    return {"k1.key": tmp_path / "k1", "mqtt.password": tmp_path / "pw"}


def check_gateway_config(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # a config may name credentials; give it a credentials directory as systemd would
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = load_config(path)
    assert cfg.sources, f"{path.name}: an example with no sources shows little"
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    schema = json.loads((FIRMWARE / "gateway.schema.json").read_text(encoding="utf-8"))
    validator_for(schema)(schema).validate(data)


def check_schema(path: Path) -> None:
    schema = json.loads(path.read_text(encoding="utf-8"))
    validator_for(schema).check_schema(schema)
    assert schema["title"] == "Touchpoint Gateway config"


def check_template(path: Path, tmp_path: Path, keys: dict[str, Path]) -> None:
    rows = read_store_rows(CSV)
    assert rows
    for row in rows:
        out = tmp_path / row["gateway.store"]
        provision(path, row, out, keys, dry_run=True)


def check_store_file(path: Path, tmp_path: Path, keys: dict[str, Path]) -> None:
    provision(TEMPLATE, path, tmp_path / "out", keys, dry_run=True)


def check_csv(path: Path) -> None:
    template = tomllib.loads(TEMPLATE.read_text(encoding="utf-8"))
    rows = read_store_rows(path)
    header = list(rows[0])
    assert header[:2] == ["gateway.store", "gateway.device"]
    for row in rows:
        assert list(row) == header
        _, problems = row_overrides(row, template, path.name)
        assert problems == []  # every column is a key of the template, every cell fits
    pairs = [(r["gateway.store"], r["gateway.device"]) for r in rows]
    assert len(pairs) == len(set(pairs))


UDEV_PAIR = re.compile(r'\s*([A-Z_]+(?:\{[^}]+\})?)\s*(==|!=|\+=|-=|:=|=)\s*"([^"]*)"\s*(?:,|$)')


def udev_rules(path: Path) -> list[dict[str, tuple[str, str]]]:
    rules = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        pos, pairs = 0, {}
        while pos < len(raw):
            m = UDEV_PAIR.match(raw, pos)
            assert m, f"{path.name}: cannot parse at column {pos}: {raw!r}"
            pairs[m.group(1)] = (m.group(2), m.group(3))
            pos = m.end()
        rules.append(pairs)
    return rules


def check_udev(path: Path) -> None:
    rules = udev_rules(path)
    assert rules
    links = []
    for rule in rules:
        assert rule["SUBSYSTEM"] == ("==", "tty")
        assert rule["GROUP"] == ("=", "dialout")  # the service user's group
        assert rule["MODE"] == ("=", "0660")
        op, link = rule["SYMLINK"]
        assert op == "+="
        assert link.startswith("touchpoint-")
        links.append(link)
    assert len(links) == len(set(links))


def check_bluez_dropin(path: Path, tmp_path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    ini = configparser.ConfigParser(strict=False, interpolation=None)
    ini.optionxform = str  # type: ignore[assignment,method-assign]
    ini.read_string(text)
    assert ini.sections() == ["Service"]
    exec_lines = [ln for ln in text.splitlines() if ln.startswith("ExecStart=")]
    assert exec_lines[0] == "ExecStart="  # resets the packaged command first
    assert exec_lines[-1].endswith("bluetoothd --experimental")
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    # systemd's own check, against a stand-in bluetooth.service in a scratch root
    root = tmp_path / "root"
    daemon = root / exec_lines[-1].split("=", 1)[1].split()[0].lstrip("/")
    daemon.parent.mkdir(parents=True)
    daemon.write_text("#!/bin/sh\n")
    daemon.chmod(0o755)
    units = root / "etc/systemd/system"
    (units / "bluetooth.service.d").mkdir(parents=True)
    (units / "bluetooth.service").write_text(
        f"[Unit]\nDescription=stand-in\n[Service]\nExecStart=/{daemon.relative_to(root)}\n"
    )
    shutil.copy(path, units / "bluetooth.service.d" / path.name)
    for system_units in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if system_units.is_dir():
            shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
            break
    res = subprocess.run(
        [analyze, "verify", "--man=no", f"--root={root}", "bluetooth.service"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""


def check_markdown(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# ")
    assert len(text.splitlines()) > 10


def check_mosquitto_acl(path: Path) -> None:
    user = None
    rules = 0
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        if words[0] == "user":
            assert len(words) == 2, f"line {n}: user NAME"
            user = words[1]
        elif words[0] in ("topic", "pattern"):
            assert len(words) == 3 and words[1] in ("read", "write", "readwrite", "deny"), n
            assert user is not None or words[0] == "pattern", f"line {n}: topic before any user"
            rules += 1
        else:
            raise AssertionError(f"line {n}: unknown ACL keyword {words[0]!r}")
    assert rules > 0


def check_mosquitto_conf(path: Path) -> None:
    known = {
        "listener",
        "allow_anonymous",
        "password_file",
        "acl_file",
        "persistence",
        "persistence_location",
        "max_queued_messages",
        "max_inflight_messages",
        "cafile",
        "certfile",
        "keyfile",
        "require_certificate",
        "use_identity_as_username",
        "use_username_as_clientid",
        "log_dest",
        "log_type",
        "max_packet_size",
        "per_listener_settings",
        "max_connections",
        "message_size_limit",
        "autosave_interval",
        "set_tcp_nodelay",
        "max_keepalive",
        "persistent_client_expiration",
        "tls_version",
        "connection_messages",
        "log_timestamp",
        "log_timestamp_format",
        "sys_interval",
        "retain_available",
        "protocol",
    }
    keys = set()
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key = line.split()[0]
        assert key in known, f"line {n}: {key!r} is not a mosquitto option this test knows"
        keys.add(key)
    assert {"listener", "acl_file", "allow_anonymous"} <= keys


def check_python_tool(path: Path) -> None:
    res = subprocess.run(
        [sys.executable, str(path), "--help"], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0 and "usage" in res.stdout, res.stderr


def checker(path: Path) -> Callable[..., None]:
    rel = path.relative_to(FIRMWARE).as_posix()
    if rel.startswith("gateway") and rel.endswith(".toml"):
        return check_gateway_config
    table: dict[str, Callable[..., None]] = {
        "gateway.schema.json": check_schema,
        "store-template.toml": check_template,
        "stores.example.csv": check_csv,
    }
    if rel in table:
        return table[rel]
    if rel.startswith("store") and rel.endswith(".toml"):
        return check_store_file
    if rel.startswith("udev/") and rel.endswith(".rules"):
        return check_udev
    if rel.startswith("bluez/bluetooth.service.d/") and rel.endswith(".conf"):
        return check_bluez_dropin
    if rel.endswith(".md"):
        return check_markdown
    if rel.startswith("mosquitto/acl") and not rel.endswith(".py"):
        return check_mosquitto_acl
    if rel.startswith("mosquitto/") and rel.endswith(".conf"):
        return check_mosquitto_conf
    if rel.endswith(".py"):
        return check_python_tool
    raise AssertionError(f"firmware-config/{rel} has no check: add one to {__file__}")


FILES = sorted(p for p in FIRMWARE.rglob("*") if p.is_file())


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(FIRMWARE).as_posix())
def test_file_is_valid(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, keys: dict[str, Path]
) -> None:
    check = checker(path)
    wanted = check.__code__.co_varnames[: check.__code__.co_argcount]
    available = {"path": path, "tmp_path": tmp_path, "monkeypatch": monkeypatch, "keys": keys}
    check(**{name: available[name] for name in wanted})


def test_expected_files_are_present() -> None:
    names = {p.relative_to(FIRMWARE).as_posix() for p in FILES}
    for name in (
        "gateway.example.toml",
        "gateway.schema.json",
        "store-template.toml",
        "store.example.toml",
        "stores.example.csv",
        "RASPBERRY-PI.md",
        "bluez/bluetooth.service.d/experimental.conf",
    ):
        assert name in names
    assert any(n.startswith("udev/") and n.endswith(".rules") for n in names)


def test_serial_devices_in_configs_have_udev_symlinks() -> None:
    links = {
        "/dev/" + rule["SYMLINK"][1]
        for rules in FIRMWARE.glob("udev/*.rules")
        for rule in udev_rules(rules)
    }
    for toml_file in FIRMWARE.glob("*.toml"):
        for src in tomllib.loads(toml_file.read_text(encoding="utf-8")).get("sources", []):
            if src.get("kind", "serial_card") == "serial_card" and "device" in src:
                assert src["device"] in links, f"{toml_file.name}: {src['device']}"
            for key in ("till_device", "printer_device"):  # a serial receipt tap
                if key in src:
                    assert src[key] in links, f"{toml_file.name}: {key} {src[key]}"
