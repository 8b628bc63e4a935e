"""Every command answers --help; the tools print what support staff and IT rely on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import pytest

from gateway.app.cli import build_parser, main
from gateway.config.credentials import write_secret

ROOT = Path(__file__).resolve().parents[3]


def commands() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sorted(sub.choices)  # type: ignore[arg-type]


@pytest.mark.parametrize("command", commands())
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: touchpoint-gateway {command}" in out
    assert len(out.splitlines()) > 3


def test_top_level_help_lists_commands() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for command in ("run", "check-config", "status", "pseudonym", "provision", "fleet"):
        assert command in out
    # The demo and the benchmarks are not the daemon's: make demo and make bench run them.
    for command in ("demo", "bench"):
        listed = f"    {command} " in out or f"{{{command}," in out or f",{command}" in out
        assert not listed, command


def _pseudonym(key_file: Path, namespace: str, stdin: str, *extra: str) -> CompletedProcess[str]:
    """The real command in its own process, the identifier on stdin."""
    return subprocess.run(
        [
            *(sys.executable, "-m", "gateway", "pseudonym"),
            *("--key-file", str(key_file), "--key-id", "k1", namespace, *extra),
        ],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_pseudonym_reads_the_identifier_from_stdin_and_prints_the_vector(
    vectors: dict[str, Any], key_file: Path
) -> None:
    for case in vectors["pseudonyms"]:
        out = _pseudonym(key_file, case["namespace"], case["input"] + "\n")
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == case["pseudonym"]


def test_pseudonym_refuses_an_identifier_on_the_command_line(key_file: Path) -> None:
    """argv is readable by every user in /proc/<pid>/cmdline: refused, not echoed."""
    out = _pseudonym(key_file, "loyalty", "", "2600123456789")
    assert out.returncode == 2
    assert "stdin" in out.stderr and "2600123456789" not in out.stderr + out.stdout


def test_pseudonym_rejects_bad_input_without_echoing_it(key_file: Path) -> None:
    out = _pseudonym(key_file, "loyalty", "12x\n")
    assert out.returncode == 2
    assert "12x" not in out.stderr + out.stdout
    assert _pseudonym(key_file, "loyalty", "").returncode == 2  # nothing on stdin


def test_check_config_lists_problems_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[gateway]\nstore = "X"\ndevice = "gw-01"\n', encoding="utf-8")
    assert main(["check-config", str(bad)]) == 1
    out = capsys.readouterr().out
    assert f"{bad}: gateway.store:" in out
    assert f"{bad}: keyring:" in out


def test_check_config_ok(
    tmp_path: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.toml"
    good.write_text(
        f'[gateway]\nstore = "nl-ams-001"\ndevice = "gw-01"\n[keyring]\nactive = "k1"\n'
        f'[keyring.keys]\nk1 = "{key_file}"\n',
        encoding="utf-8",
    )
    assert main(["check-config", str(good)]) == 0
    assert "ok" in capsys.readouterr().out


def test_check_config_short_key_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_secret(tmp_path / "k.key", "AAEC\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        '[gateway]\nstore = "s"\ndevice = "d"\n'
        '[keyring]\nactive = "k1"\n[keyring.keys]\nk1 = "k.key"\n',
        encoding="utf-8",
    )
    assert main(["check-config", str(cfg)]) == 1
    assert "at least 32" in capsys.readouterr().out


def test_status_without_database_says_so(
    tmp_path: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[gateway]\nstore = "s"\ndevice = "d"\n'
        f'[keyring]\nactive = "k1"\n[keyring.keys]\nk1 = "{key_file}"\n'
        f'[buffer]\npath = "{tmp_path}/none.db"\n',
        encoding="utf-8",
    )
    assert main(["status", "--config", str(cfg)]) == 3, "not running, as systemctl says"
    assert "has not run yet" in capsys.readouterr().err


def test_config_schema_matches_the_shipped_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config-schema"]) == 0
    shipped = (ROOT / "firmware-config" / "gateway.schema.json").read_text(encoding="utf-8")
    assert capsys.readouterr().out == shipped


LEAVER, STAYER = "k1:" + "L" * 22, "k1:" + "S" * 22


def test_erase_removes_a_subjects_events_offline(
    tmp_path: Path, key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio
    import time

    from gateway.buffer.outbox import Outbox, Pending
    from gateway.config.sections import BufferConfig
    from gateway.observe.metrics import Metrics

    db = tmp_path / "buffer.db"

    async def fill() -> None:
        box = Outbox(BufferConfig(path=db), Metrics(), chunk_events=3)
        box.open()
        events = [
            Pending(time.time(), "card.read", s, f'"type":"card.read","subject":"{s}"}}')
            for s in [LEAVER, STAYER] * 5
        ]
        await box.submit_many(events)
        box.close()

    asyncio.run(fill())
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'[gateway]\nstore = "s"\ndevice = "d"\n'
        f'[keyring]\nactive = "k1"\n[keyring.keys]\nk1 = "{key_file}"\n'
        f'[buffer]\npath = "{db}"\n',
        encoding="utf-8",
    )
    for bad in ("k1:leaver", "k1:\ud800", "2600 1234 5678 9"):  # refused, not echoed
        assert main(["erase", "--config", str(cfg), bad]) == 2
        assert bad not in capsys.readouterr().err
    assert main(["erase", "--config", str(cfg), LEAVER]) == 0
    assert "5 buffered event(s)" in capsys.readouterr().out
    data = db.read_bytes() + (
        db.with_name("buffer.db-wal").read_bytes()
        if db.with_name("buffer.db-wal").exists()
        else b""
    )
    assert f'"subject":"{LEAVER}"'.encode() not in data
    assert data.count(f'"subject":"{STAYER}"'.encode()) == 5
    assert main(["erase", "--config", str(cfg), LEAVER]) == 0, "idempotent"


def test_run_with_a_bad_config_exits_ex_config_loudly(tmp_path: Path) -> None:
    """`run` on a config it cannot use exits 78 (EX_CONFIG, which the unit does not
    restart), and journald gets each line as an error."""
    import os

    bad = tmp_path / "bad.toml"
    bad.write_text("[gateway]\nstore = 'S1'\nnot_a_key = 1\n", encoding="utf-8")
    err_path = tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with err_path.open("wb") as err:
        st = os.fstat(err.fileno())
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        proc = subprocess.run(
            [sys.executable, "-m", "gateway", "run", "--config", str(bad)],
            stderr=err, env=env, timeout=60, check=False,
        )  # fmt: skip
    assert proc.returncode == 78
    lines = err_path.read_text(encoding="utf-8").splitlines()
    errors = [x for x in lines if "config error" in x]
    assert errors and all(x.startswith("<3>") for x in errors), lines
    assert any("not_a_key" in x for x in errors), lines
    assert all(x.startswith("<") for x in lines), lines  # every line has its priority
