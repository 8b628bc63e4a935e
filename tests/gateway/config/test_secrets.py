"""Secrets on disk: key, token, password and TLS-key files open to the group or others are
refused (as ssh does), and so are weak or published tenant keys, each with an error that
names the file and the fix; check-config, start and reload all refuse them."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from drivers.receipt_tap.counter import CounterStore
from gateway.app.cli import main
from gateway.config.credentials import write_secret
from gateway.identity.pseudonyms import ALLOW_TEST_KEY_VALUE, ALLOW_TEST_KEY_VAR
from simulators.infra.broker import free_port
from tests.pki import make_pki
from tests.system.harness import GatewayProc, healthz, synthetic

GOOD_KEY = base64.b64encode(bytes(range(100, 132))).decode()


def write_config(tmp_path: Path, *, key: str = GOOD_KEY, extra: str = "") -> Path:
    write_secret(tmp_path / "k1.key", key + "\n")
    write_secret(tmp_path / "mqtt.password", "pw\n")
    write_secret(tmp_path / "consent.token", "tok\n")
    pki = make_pki(tmp_path / "pki")  # real files: check-config loads the TLS pair
    write_secret(tmp_path / "client.key", pki["client_key"].read_text())
    (tmp_path / "client.pem").write_text(pki["client"].read_text())
    cfg = tmp_path / "gateway.toml"
    cfg.write_text(
        '[gateway]\nstore = "s1"\ndevice = "d1"\n'
        '[keyring]\nactive = "k1"\n[keyring.keys]\nk1 = "k1.key"\n'
        f'[buffer]\npath = "{tmp_path / "buffer.db"}"\n'
        '[mqtt]\nhost = "127.0.0.1"\nusername = "u"\npassword_file = "mqtt.password"\n'
        '[mqtt.tls]\ncert_file = "client.pem"\nkey_file = "client.key"\n'
        '[consent.sync]\nbase_url = "https://central.example"\ntoken_file = "consent.token"\n'
        + extra,
        encoding="utf-8",
    )
    return cfg


def test_check_config_accepts_owner_only_secrets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path)
    assert main(["check-config", str(cfg)]) == 0, capsys.readouterr().out


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("k1.key", "keyring.keys.k1"),
        ("mqtt.password", "mqtt.password_file"),
        ("consent.token", "consent.sync.token_file"),
        ("client.key", "mqtt.tls.key_file"),
    ],
)
@pytest.mark.parametrize("mode", [0o666, 0o644, 0o640, 0o604])
def test_a_secret_open_to_group_or_others_is_refused_naming_file_and_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, key: str, mode: int
) -> None:
    cfg = write_config(tmp_path)
    (tmp_path / name).chmod(mode)
    assert main(["check-config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert key in out and f"chmod 600 {tmp_path / name}" in out, out


@pytest.mark.parametrize(
    ("key", "why"),
    [
        (base64.b64encode(bytes(32)).decode(), "not random"),
        (base64.b64encode(b"ab" * 16).decode(), "not random"),
        (base64.b64encode(bytes(range(32))).decode(), "published test-vector key"),
    ],
)
def test_weak_or_published_keys_are_refused(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    key: str,
    why: str,
) -> None:
    monkeypatch.delenv(ALLOW_TEST_KEY_VAR, raising=False)
    cfg = write_config(tmp_path, key=key)
    assert main(["check-config", str(cfg)]) == 1
    out = capsys.readouterr().out
    assert why in out and str(tmp_path / "k1.key") in out and "/dev/urandom" in out, out


def test_the_published_key_needs_the_explicit_opt_in_and_never_under_systemd(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config(tmp_path, key=base64.b64encode(bytes(range(32))).decode())
    monkeypatch.setenv(ALLOW_TEST_KEY_VAR, "1")  # not the exact value: no
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    assert main(["check-config", str(cfg)]) == 1
    monkeypatch.setenv(ALLOW_TEST_KEY_VAR, ALLOW_TEST_KEY_VALUE)
    assert main(["check-config", str(cfg)]) == 0
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef")  # a systemd service
    assert main(["check-config", str(cfg)]) == 1
    capsys.readouterr()


def test_the_daemon_refuses_to_start_on_a_world_readable_key(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    (tmp_path / "k1.key").chmod(0o644)
    assert f"chmod 600 {tmp_path / 'k1.key'}" in refused_start(cfg)


def refused_start(cfg: Path) -> str:
    """``touchpoint-gateway run`` on ``cfg`` exits non-zero (within 60 s); what it said."""
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0, proc.stderr
    return proc.stderr + proc.stdout


# ---- the databases: 0600 whatever the umask ---------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_buffer_and_its_wal_are_created_owner_only_whatever_the_umask(
    tmp_path: Path,
) -> None:
    old = os.umask(0o000)  # the loosest: without our own mode, 0666
    try:
        gw = GatewayProc(tmp_path / "gw", free_port(), sources=synthetic(50))
        gw.start()
    finally:
        os.umask(old)
    try:
        gw.wait_ready()  # the buffer is open and migrated: database, WAL and shm exist
        files = [gw.db, Path(f"{gw.db}-wal"), Path(f"{gw.db}-shm")]
        assert all(f.exists() for f in files)
        assert {f.name: _mode(f) for f in files} == {f.name: 0o600 for f in files}
    finally:
        gw.stop()


def test_an_existing_buffer_open_to_others_is_narrowed(tmp_path: Path) -> None:
    db = tmp_path / "buffer.db"
    for name in ("buffer.db", "buffer.db-wal", "buffer.db-shm"):
        (tmp_path / name).touch()
        (tmp_path / name).chmod(0o666)
    (tmp_path / "buffer.db-wal").unlink()  # an empty WAL is no WAL: SQLite makes it
    (tmp_path / "buffer.db-shm").unlink()
    store = CounterStore(db)  # the receipt counters' database, same rule
    try:
        store.reserve("nl-ams-001", 1)
        assert _mode(db) == 0o600
        assert _mode(Path(f"{db}-wal")) == 0o600
    finally:
        store.close()


def test_the_receipt_counter_store_is_created_owner_only(tmp_path: Path) -> None:
    old = os.umask(0o000)
    try:
        store = CounterStore(tmp_path / "counters.db")
        store.reserve("nl-ams-001", 1)
    finally:
        os.umask(old)
    try:
        for name in ("counters.db", "counters.db-wal", "counters.db-shm"):
            assert _mode(tmp_path / name) == 0o600, name
    finally:
        store.close()


# ---- secrets in memory: no core dumps ---------------------------------------------------


def test_the_running_daemon_cannot_dump_core_and_still_answers_health(tmp_path: Path) -> None:
    """A core dump held raw card numbers and the tenant key.  The limit is read from
    outside (/proc/<pid>/limits); PR_SET_DUMPABLE 0 is confirmed by the daemon's own
    PR_GET_DUMPABLE (as root, /proc shows no difference: every file is root's anyway)."""
    port = free_port()
    gw = GatewayProc(tmp_path / "gw", free_port(), sources=synthetic(20), health_port=port)
    gw.start()
    try:
        gw.wait_ready()
        gw.wait_log("core dumps off: not dumpable")
        assert gw.proc is not None
        limits = Path(f"/proc/{gw.proc.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max core file size"))
        assert line.split()[4:6] == ["0", "0"], line
        status, doc = healthz(port)  # /proc/<pid> is root's now: health still answers
        assert status in (200, 503) and "sources" in doc
    finally:
        gw.stop()


def test_credentials_from_systemd_are_not_judged_by_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd grants the service user a credential with an ACL: the file shows 0440."""
    creds = tmp_path / "creds"
    creds.mkdir()
    write_secret(creds / "k1.key", GOOD_KEY + "\n")
    (creds / "k1.key").chmod(0o440)
    cfg = write_config(tmp_path)
    cfg.write_text(
        cfg.read_text().replace('k1 = "k1.key"', 'k1 = "${CREDENTIALS_DIRECTORY}/k1.key"')
    )
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert main(["check-config", str(cfg)]) == 0, capsys.readouterr().out
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "elsewhere"))
    (tmp_path / "elsewhere").mkdir()
    (creds / "k1.key").rename(tmp_path / "elsewhere" / "k1.key")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    cfg.write_text(cfg.read_text().replace("${CREDENTIALS_DIRECTORY}/k1.key", "elsewhere/k1.key"))
    assert main(["check-config", str(cfg)]) == 1  # the same file outside it: refused
    assert "chmod 600" in capsys.readouterr().out
