"""Plaintext transports: consent sync over http:// (a bearer token), MQTT without TLS to a
host that is not loopback, and credentials in a URL are refused by check-config, at start
and on reload, unless the section opts in with ``allow_plaintext = true`` (then a warning
at start and a line in /healthz).  Credentials in a URL are refused always.  Loopback
(127.0.0.0/8, ::1, localhost) is not the network: the demo and the tests use it bare."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.app.cli import main
from gateway.config.credentials import write_secret
from simulators.infra.broker import free_port
from tests.gateway.config.test_secrets import refused_start
from tests.pki import make_pki
from tests.system.harness import GatewayProc, healthz

KEY = "Ok41XFEl/DeKy6pux3hFfJerdJWtAhOlimOtK81inSo="


def config(tmp_path: Path, *, mqtt: str = "", sync: str = "") -> Path:
    write_secret(tmp_path / "k1.key", KEY + "\n")
    write_secret(tmp_path / "token", "t0k\n")
    (tmp_path / "ca.pem").write_text(make_pki(tmp_path / "pki")["ca"].read_text())
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(
        '[gateway]\nstore = "s1"\ndevice = "d1"\n'
        '[keyring]\nactive = "k1"\n[keyring.keys]\nk1 = "k1.key"\n'
        f'[buffer]\npath = "{tmp_path / "buffer.db"}"\n'
        f"[mqtt]\n{mqtt}\n" + (f'[consent.sync]\ntoken_file = "token"\n{sync}\n' if sync else ""),
        encoding="utf-8",
    )
    return cfg


def check(cfg: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(["check-config", str(cfg)])
    return rc, capsys.readouterr().out


@pytest.mark.parametrize(
    "url",
    ["http://identity.central.example", "http://10.0.0.5:8080", "http://[2001:db8::1]/"],
)
def test_consent_sync_over_http_is_refused_unless_opted_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    rc, out = check(config(tmp_path, sync=f'base_url = "{url}"'), capsys)
    assert rc == 1
    assert "consent.sync" in out and "allow_plaintext" in out and "https://" in out, out
    rc, out = check(config(tmp_path, sync=f'base_url = "{url}"\nallow_plaintext = true'), capsys)
    assert rc == 0, out


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8080", "http://127.8.9.10", "http://localhost:9000", "http://[::1]:80"],
)
def test_consent_sync_to_loopback_needs_no_tls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    rc, out = check(config(tmp_path, sync=f'base_url = "{url}"'), capsys)
    assert rc == 0, out


@pytest.mark.parametrize(
    "url",
    [
        "https://gw:hunter2secret@identity.central.example",
        "http://gw:hunter2secret@127.0.0.1:8080",
        "https://hunter2secret@identity.central.example/",
    ],
)
def test_credentials_in_the_consent_url_are_always_refused_and_never_echoed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], url: str
) -> None:
    cfg = config(tmp_path, sync=f'base_url = "{url}"\nallow_plaintext = true')
    rc, out = check(cfg, capsys)
    assert rc == 1
    assert "token_file" in out and "hunter2secret" not in out, out


@pytest.mark.parametrize(
    "mqtt",
    [
        'host = "mqtt.central.example"\nusername = "u"\npassword_file = "token"',
        'host = "192.0.2.7"',
    ],
)
def test_mqtt_without_tls_to_the_network_is_refused_unless_opted_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mqtt: str
) -> None:
    rc, out = check(config(tmp_path, mqtt=mqtt), capsys)
    assert rc == 1
    assert "mqtt" in out and "allow_plaintext" in out and "[mqtt.tls]" in out, out
    rc, out = check(config(tmp_path, mqtt=mqtt + "\nallow_plaintext = true"), capsys)
    assert rc == 0, out


@pytest.mark.parametrize(
    "mqtt",
    [
        'host = "127.0.0.1"\nusername = "u"\npassword_file = "token"',
        'host = "localhost"',
        'host = "::1"',
        'host = "mqtt.central.example"\n[mqtt.tls]\nca_file = "ca.pem"',
    ],
)
def test_mqtt_to_loopback_or_over_tls_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mqtt: str
) -> None:
    rc, out = check(config(tmp_path, mqtt=mqtt), capsys)
    assert rc == 0, out


def test_the_daemon_refuses_to_start_on_plaintext(tmp_path: Path) -> None:
    cfg = config(tmp_path, sync='base_url = "http://identity.central.example"')
    assert "allow_plaintext" in refused_start(cfg)


def test_opted_in_plaintext_warns_at_start_shows_in_healthz_and_a_reload_to_it_is_refused(
    tmp_path: Path,
) -> None:
    port = free_port()
    gw = GatewayProc(
        tmp_path / "gw",
        free_port(),
        sources="",
        health_port=port,
        mqtt_extra="allow_plaintext = true",
    )
    text = gw.config.read_text()
    gw.config.write_text(text.replace('host = "127.0.0.1"', 'host = "192.0.2.7"', 1))
    gw.start()
    try:
        gw.wait_ready()
        gw.wait_log("WARNING")
        log = gw.log.read_text()
        assert "plaintext" in log and "192.0.2.7" in log, log[-2000:]
        _, doc = healthz(port)
        assert doc["plaintext_transports"] == ["mqtt"], doc
        # A reload to a config that drops the opt-in is refused; the daemon keeps running.
        gw.config.write_text(gw.config.read_text().replace("allow_plaintext = true", ""))
        assert gw.proc is not None
        gw.reload()
        gw.wait_log("reload refused")
        assert "allow_plaintext" in gw.log.read_text()
        assert gw.alive()
    finally:
        if gw.alive():
            gw.stop()
