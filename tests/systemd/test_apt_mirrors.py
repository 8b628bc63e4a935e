"""``.ci/apt-mirrors``: the one reader of the host's apt sources that both .ci/fresh-root
and tests/systemd/test_dist_install.py use to find the Debian mirror for mmdebstrap."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / ".ci" / "apt-mirrors"


def mirrors(etc: Path, suite: str = "bookworm") -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), suite, "--etc", str(etc)],
                          capture_output=True, text=True, check=False)  # fmt: skip


def test_one_line_and_deb822_sources_give_every_entry_of_the_suite(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# deb http://commented.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://one.example/debian bookworm main contrib # x\n"
        "deb-src http://one.example/debian bookworm main\n"
        "deb http://one.example/debian bookworm-updates main\n"
        "deb http://other.example/ubuntu jammy main\n"
        "deb http://one.example/debian bookwormish main\n",
        encoding="utf-8",
    )
    (tmp_path / "sources.list.d" / "dup.list").write_text(
        "deb http://one.example/debian bookworm-updates main\n", encoding="utf-8"
    )
    (tmp_path / "sources.list.d" / "ignored.list.disabled").write_text(
        "deb http://disabled.example/debian bookworm main\n", encoding="utf-8"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb deb-src\n"
        "# http://commented.example/archive\n"
        "URIs: http://two.example/debian\n"
        "Suites: bookworm\n"
        " bookworm-backports\n"
        "Components: main non-free-firmware\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "\n"
        "Types: deb\n"
        "URIs: http://off.example/debian\n"
        "Suites: bookworm\n"
        "Enabled: no\n"
        "\n"
        "Types: deb\n"
        "URIs: http://two.example/debian-security\n"
        "Suites: bookworm-security\n",
        encoding="utf-8",
    )
    done = mirrors(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "deb http://one.example/debian bookworm main contrib",
        "deb http://one.example/debian bookworm-updates main",
        "deb http://two.example/debian bookworm main non-free-firmware",
        "deb http://two.example/debian bookworm-backports main non-free-firmware",
        "deb http://two.example/debian-security bookworm-security main",
    ]


def test_no_entry_for_the_suite_is_an_error_that_says_where_it_looked(tmp_path: Path) -> None:
    (tmp_path / "sources.list").write_text("deb http://x.example/ubuntu jammy main\n")
    done = mirrors(tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert f"no bookworm entry in {tmp_path}/sources.list" in done.stderr


def test_fresh_root_and_the_install_test_read_apt_sources_only_through_it() -> None:
    repo = SCRIPT.parents[1]
    for caller in (repo / ".ci" / "fresh-root", repo / "tests/systemd/test_dist_install.py"):
        text = caller.read_text(encoding="utf-8")
        assert "apt-mirrors" in text, caller
        assert "sources.list.d" not in text.replace("/etc/apt/sources.list.d/)", ""), caller
