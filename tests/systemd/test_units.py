"""The unit, sysusers and tmpfiles files, checked by systemd's own tools; install.sh into a
temporary root.  Nothing here needs systemd as PID 1 or touches the real system."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest

from gateway.config.credentials import credential_references
from gateway.config.sections import BufferConfig

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
UNIT = SYSTEMD / "touchpoint-gateway.service"
INSTALL = SYSTEMD / "install.sh"
EXPOSURE_LIMIT = 2.0

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze missing: apt-get install -y systemd (make test does)"
)


def unit_entries(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value (systemd keys repeat; an empty value resets)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not key=value: {raw!r}"
        values = out[section].setdefault(key, [])
        if value == "":
            values.clear()
        else:
            values.append(value)
    return out


def run_install(dest: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DESTDIR", "PREFIX")}
    env["DESTDIR"] = str(dest)
    return subprocess.run(
        ["sh", str(INSTALL), "--no-venv", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def staged_root(tmp_path: Path) -> Path:
    """install.sh into a root, plus what verify looks for: the binary and systemd's units."""
    root = tmp_path / "root"
    res = run_install(root)
    assert res.returncode == 0, res.stderr
    for exe in ("opt/touchpoint-gateway/bin/touchpoint-gateway", "bin/kill"):
        p = root / exe
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("#!/bin/sh\nexit 0\n")
        p.chmod(0o755)
    for system_units in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if system_units.is_dir():
            shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
            break
    return root


def verify(root: Path) -> subprocess.CompletedProcess[str]:
    assert ANALYZE is not None
    return subprocess.run(
        [ANALYZE, "verify", "--man=no", f"--root={root}", "touchpoint-gateway.service"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@needs_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    root = staged_root(tmp_path)
    res = verify(root)
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""  # not even a warning (an unknown key is only a warning)

    # the check is real: a misspelt key and a missing binary are both caught
    unit = root / "etc/systemd/system/touchpoint-gateway.service"
    good = unit.read_text()
    unit.write_text(good.replace("ProtectSystem=", "ProtectSytem="))
    assert "Unknown key" in verify(root).stderr
    unit.write_text(good)
    (root / "opt/touchpoint-gateway/bin/touchpoint-gateway").unlink()
    res = verify(root)
    assert res.returncode != 0
    assert "touchpoint-gateway is not executable" in res.stderr


def exposure(unit: Path, threshold: float) -> tuple[int, float, str]:
    assert ANALYZE is not None
    res = subprocess.run(
        [ANALYZE, "security", "--offline=yes", f"--threshold={round(threshold * 10)}", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", res.stdout)
    assert m, res.stdout + res.stderr
    return res.returncode, float(m.group(1)), res.stdout


@needs_analyze
def test_security_exposure_is_at_most_2(tmp_path: Path) -> None:
    rc, level, report = exposure(UNIT, EXPOSURE_LIMIT)
    print(f"systemd-analyze security: overall exposure {level}")
    assert level <= EXPOSURE_LIMIT, report
    assert rc == 0, report
    # the threshold works: an unhardened unit fails it
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nExecStart=/bin/true\n")
    rc, level, _ = exposure(bare, EXPOSURE_LIMIT)
    assert level > EXPOSURE_LIMIT
    assert rc != 0


def test_unit_settings_the_issue_asks_for() -> None:
    svc = unit_entries(UNIT)["Service"]
    one = {k: v[-1] for k, v in svc.items() if v}
    assert one["Type"] == "notify"
    assert one["NotifyAccess"] == "main"
    assert one["Restart"] == "on-failure"
    assert one["WatchdogSec"] == "30s"
    assert one["ExecStart"] == (
        "/opt/touchpoint-gateway/bin/touchpoint-gateway run "
        "--config /etc/touchpoint-gateway/gateway.toml"
    )
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["LimitCORE"] == "0"  # no core dump carries the tenant key or raw ids
    assert one["MemoryMax"] == "512M" and one["MemoryHigh"] == "384M"  # issue 14
    assert one["ProtectSystem"] == "strict"
    assert one["DevicePolicy"] == "closed"
    assert sorted(svc["DeviceAllow"]) == [
        "char-ttyACM rw",
        "char-ttyAMA rw",
        "char-ttyUSB rw",
        "char-video4linux rw",
    ]
    assert one["SupplementaryGroups"].split() == ["dialout", "video", "bluetooth"]
    assert one["RestrictAddressFamilies"].split() == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert svc["SystemCallFilter"][0] == "@system-service"
    assert one["StateDirectory"] == one["ConfigurationDirectory"] == "touchpoint-gateway"
    # the buffer's default path is inside StateDirectory=
    assert BufferConfig().path.parent == Path("/var/lib") / one["StateDirectory"]


def test_credentials_cover_what_the_template_names() -> None:
    svc = unit_entries(UNIT)["Service"]
    loaded = {}
    for entry in svc["LoadCredential"]:
        cred_id, _, path = entry.partition(":")
        assert path == f"/etc/touchpoint-gateway/credstore/{cred_id}"  # ID == file name
        loaded[cred_id] = path
    template = tomllib.loads((ROOT / "firmware-config/store-template.toml").read_text())
    assert set(credential_references(template).values()) == set(loaded)


def sysusers_lines() -> list[list[str]]:
    lines = []
    for raw in (SYSTEMD / "touchpoint-gateway.sysusers").read_text().splitlines():
        if raw.strip() and not raw.startswith("#"):
            lines.append(re.findall(r'"[^"]*"|\S+', raw))
    return lines


def test_sysusers_and_unit_agree() -> None:
    svc = {k: v[-1] for k, v in unit_entries(UNIT)["Service"].items() if v}
    lines = sysusers_lines()
    assert all(fields[0] in ("u", "g", "m") for fields in lines)
    users = [f for f in lines if f[0] == "u"]
    assert [u[1] for u in users] == [svc["User"]]
    assert users[0][4] == "/var/lib/touchpoint-gateway"
    members = {f[2] for f in lines if f[0] == "m" and f[1] == svc["User"]}
    assert members == set(svc["SupplementaryGroups"].split())


TMPFILES_LINE = re.compile(
    r"^([dDvqQpLcbCxXrRzZtThHaAfFw][-+!=~^]*)\s+(/\S+)\s+(\d{4}|-)\s+(\S+)\s+(\S+)\s+(\S+)$"
)


def test_tmpfiles_lines_parse_and_match_the_unit() -> None:
    entries = {}
    for raw in (SYSTEMD / "touchpoint-gateway.tmpfiles").read_text().splitlines():
        if raw.strip() and not raw.startswith("#"):
            m = TMPFILES_LINE.match(raw)
            assert m, raw
            entries[m.group(2)] = (m.group(1), m.group(3), m.group(4), m.group(5))
    svc = {k: v[-1] for k, v in unit_entries(UNIT)["Service"].items() if v}
    assert entries["/var/lib/touchpoint-gateway"] == (
        "d",
        svc["StateDirectoryMode"],
        svc["User"],
        svc["Group"],
    )
    assert entries["/etc/touchpoint-gateway/credstore"] == ("d", "0700", "root", "root")
    assert entries["/etc/touchpoint-gateway"][1] == svc["ConfigurationDirectoryMode"]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_install_into_a_temporary_root(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    res = run_install(dest)
    assert res.returncode == 0, res.stderr
    assert "staged into" in res.stdout
    expected = {
        "etc/systemd/system/touchpoint-gateway.service": 0o644,
        "etc/sysusers.d/touchpoint-gateway.conf": 0o644,
        "etc/tmpfiles.d/touchpoint-gateway.conf": 0o644,
        "etc/touchpoint-gateway": 0o755,
        "etc/touchpoint-gateway/credstore": 0o700,
        "etc/touchpoint-gateway/tls": 0o755,
        "etc/touchpoint-gateway/gateway.example.toml": 0o644,
        "etc/touchpoint-gateway/store-template.toml": 0o644,
        "var/lib/touchpoint-gateway": 0o750,
        "opt/touchpoint-gateway/bin": 0o755,
        "opt/touchpoint-gateway/share/touchpoint-gateway/systemd/README.md": 0o644,
        "opt/touchpoint-gateway/share/touchpoint-gateway/firmware-config/RASPBERRY-PI.md": 0o644,
        "opt/touchpoint-gateway/share/touchpoint-gateway/firmware-config/udev": 0o755,
    }
    for rel, want in expected.items():
        assert (dest / rel).exists(), rel
        assert mode(dest / rel) == want, f"{rel}: {oct(mode(dest / rel))}"
    assert (dest / "etc/systemd/system/touchpoint-gateway.service").read_bytes() == (
        UNIT.read_bytes()
    )
    assert not (dest / "etc/touchpoint-gateway/gateway.toml").exists()
    assert not (dest / "etc/systemd/system/bluetooth.service.d").exists()
    assert not list(dest.rglob("*.tmp"))

    # a second run upgrades and never touches the live config
    live = dest / "etc/touchpoint-gateway/gateway.toml"
    live.write_text("# the store's config\n")
    res = run_install(dest, "--bluez-experimental")
    assert res.returncode == 0, res.stderr
    assert live.read_text() == "# the store's config\n"
    dropin = dest / "etc/systemd/system/bluetooth.service.d/touchpoint-experimental.conf"
    assert "--experimental" in dropin.read_text()


def test_install_follows_prefix(tmp_path: Path) -> None:
    res = run_install(tmp_path / "root", "--prefix", "/srv/tpg")
    assert res.returncode == 0, res.stderr
    unit = (tmp_path / "root/etc/systemd/system/touchpoint-gateway.service").read_text()
    assert "ExecStart=/srv/tpg/bin/touchpoint-gateway run --config" in unit
    assert "Documentation=file:/srv/tpg/share/touchpoint-gateway/systemd/README.md" in unit
    assert "/opt/" not in unit
    assert (tmp_path / "root/srv/tpg/share/touchpoint-gateway/systemd/README.md").is_file()


@pytest.mark.parametrize(
    ("args", "why"),
    [(["--prefix", "opt/x"], "absolute"), (["--prefix", "/opt/a b"], "only letters"),
     (["--bogus"], "unknown option")],
)  # fmt: skip
def test_install_refuses_bad_arguments(tmp_path: Path, args: list[str], why: str) -> None:
    res = run_install(tmp_path / "root", *args)
    assert res.returncode != 0
    assert why in res.stderr
    assert not (tmp_path / "root/etc").exists()


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="no systemd-sysusers")
def test_sysusers_creates_the_user_in_the_staged_root(tmp_path: Path) -> None:
    dest = tmp_path / "root"
    assert run_install(dest).returncode == 0
    res = subprocess.run(
        ["systemd-sysusers", f"--root={dest}"], capture_output=True, text=True, check=False
    )
    assert res.returncode == 0, res.stderr
    passwd = (dest / "etc/passwd").read_text()
    assert re.search(
        r"^touchpoint-gateway:x:\d+:\d+:Touchpoint Gateway:/var/lib/touchpoint-gateway:"
        r"/usr/sbin/nologin$",
        passwd,
        re.M,
    )
    groups = {
        line.split(":")[0]: line.split(":")[3].split(",")
        for line in (dest / "etc/group").read_text().splitlines()
    }
    for group in ("dialout", "video", "bluetooth"):
        assert "touchpoint-gateway" in groups[group]


def test_a_config_error_is_not_restarted_forever() -> None:
    """A bad config exits EX_CONFIG (78); the unit does not restart on it, and systemd's
    start limit is reachable for the failures it does restart."""
    svc = unit_entries(UNIT)["Service"]
    one = {k: v[-1] for k, v in svc.items() if v}
    assert "78" in one["RestartPreventExitStatus"].split()
    assert "EX_CONFIG" not in one.get("SuccessExitStatus", "")


def test_the_unit_waits_for_time_sync() -> None:
    """Ordering after time-sync.target does not pull it in: the unit must want it too."""
    unit = unit_entries(UNIT)["Unit"]
    assert "time-sync.target" in " ".join(unit["Wants"]).split()
    assert "time-sync.target" in " ".join(unit["After"]).split()
