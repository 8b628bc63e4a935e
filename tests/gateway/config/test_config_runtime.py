"""One validation for check-config, start and reload (issue 14, item 4).

A config that passes ``check-config`` must not kill the daemon when it starts or reloads
it: addresses and ports it will bind, files it will read, keys and certificates it will
load are checked by ``gateway.config.loading.load_checked_config``, which all three call.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.app.cli import main
from gateway.config.loading import load_checked_config, load_config
from gateway.errors import ConfigError
from tests.gateway.config.test_config import MINIMAL as BASE
from tests.system.harness import KEY_B64 as KEY

TAP = """
[[sources]]
kind = "receipt_tap"
name = "tap"
lane = "lane-1"
lane_number = 1
printer_host = "127.0.0.1"
"""

# (config text after BASE, the key path named, a piece of the reason)
BAD = [
    ('[health]\nlisten = "127.999.1.1:9464"\n', "health.listen", "not an IPv4 address"),
    ('[health]\nlisten = "127.0.0.1:99999"\n', "health.listen", "outside 1-65535"),
    ('[health]\nlisten = "127.0.0.1:0"\n', "health.listen", "outside 1-65535"),
    (TAP + 'listen_host = "999.0.0.1"\n', "sources[0].listen_host", "not an IP address"),
    (TAP + 'listen_host = "till.local"\n', "sources[0].listen_host", "not an IP address"),
    ('[keyring.keys]\nk2 = "missing.key"\n', "keyring.keys.k2", "cannot read"),
    ('[mqtt]\npassword_file = "nope.txt"\n', "mqtt.password_file", "cannot read"),
    ('[mqtt.tls]\nca_file = "garbage.pem"\n', "mqtt.tls", "do not load"),
    ('[consent]\nseed_file = "garbage.pem"\n', "consent.seed_file", "garbage.pem"),
    (
        '[consent.sync]\nbase_url = "https://c.example"\ntoken_file = "t"\n'
        'ca_file = "garbage.pem"\n',
        "consent.sync.ca_file",
        "cannot load the CA",
    ),
]


def write(tmp_path: Path, extra: str) -> Path:
    (tmp_path / "k1.key").write_text(KEY + "\n", encoding="ascii")
    (tmp_path / "k1.key").chmod(0o600)  # a secret is the owner's only
    (tmp_path / "garbage.pem").write_text("not a certificate\n", encoding="utf-8")
    if extra.startswith("[keyring.keys]"):  # a second key in the same table
        text = BASE + extra.removeprefix("[keyring.keys]\n")
    else:
        text = BASE + extra
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(("extra", "key", "why"), BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_check_config_holds_every_runtime_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, key: str, why: str
) -> None:
    path = write(tmp_path, extra)
    assert main(["check-config", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}: {key}: " in out and why in out, out
    with pytest.raises(ConfigError):
        load_checked_config(path)


def test_the_good_siblings_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for extra in (
        '[health]\nlisten = "127.0.0.1:9464"\n',
        '[health]\nlisten = "localhost:9464"\n',
        '[health]\nlisten = "[::1]:9464"\n',
        TAP + 'listen_host = "0.0.0.0"\ntill_allow = ["192.0.2.10"]\n',
        TAP + 'listen_host = "::"\ntill_allow = ["2001:db8::/64"]\n',
    ):
        path = write(tmp_path, extra)
        assert main(["check-config", str(path)]) == 0, capsys.readouterr().out
        assert load_checked_config(path) == load_config(path)


def test_run_refuses_what_check_config_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, '[health]\nlisten = "127.0.0.1:99999"\n')
    assert main(["run", "--config", str(path)]) == 78  # EX_CONFIG: no restart loop
    assert "health.listen" in capsys.readouterr().err


def test_a_stale_limit_shorter_than_the_poll_interval_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path,
        '[consent.sync]\nbase_url = "https://c.example"\ntoken_file = "t"\n'
        "poll_interval_s = 1800\n[health]\n",
    )
    assert main(["check-config", str(path)]) == 1
    assert "consent_max_age_s (900) must exceed" in capsys.readouterr().out
