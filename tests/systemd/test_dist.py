"""`make dist`: the Debian packages, built for amd64 and arm64 on this box (no compiler,
no emulation), checked as dpkg sees them.

Installing them into a fresh Debian root, upgrading and rolling back is
tests/systemd/test_dist_install.py.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "systemd" / "debian"))
import build  # noqa: E402

pytestmark = pytest.mark.slow

VERSION = build.version()
BASE_GOAL_MIB = 60
CAMERA_GOAL_MIB = 300  # base + camera
NOT_ON_A_BOX = tuple(f"/opt/touchpoint-gateway/{lib}/{pkg}" for lib in ("lib", "lib-camera")
                     for pkg in ("simulators/", "tests/", "touchpoint_simulators"))  # fmt: skip


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, str(ROOT / "systemd/debian/build.py"), "--out", str(out)],
        check=True, cwd=ROOT, timeout=1800,
    )  # fmt: skip
    return out


def field(deb: Path, name: str) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True
    ).stdout.strip()


def contents(deb: Path) -> list[str]:
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    return [line.split()[5].lstrip(".") for line in listing.splitlines()]


def extract(deb: Path, dest: Path) -> Path:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
    return dest


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_packages_for_each_architecture(dist: Path, arch: str) -> None:
    base = dist / f"touchpoint-gateway_{VERSION}_{arch}.deb"
    camera = dist / f"touchpoint-gateway-camera_{VERSION}_{arch}.deb"
    assert base.is_file() and camera.is_file()
    assert field(base, "Architecture") == arch == field(camera, "Architecture")
    depends = field(base, "Depends")
    for dep in ("python3 (>= 3.11)", "dbus", "bluez"):
        assert dep in depends
    assert f"touchpoint-gateway (= {VERSION})" in field(camera, "Depends")
    assert "libzbar0" in field(camera, "Depends")
    files = contents(base)
    for path in (
        "/opt/touchpoint-gateway/bin/touchpoint-gateway",
        "/lib/systemd/system/touchpoint-gateway.service",
        "/usr/lib/sysusers.d/touchpoint-gateway.conf",
        "/usr/lib/tmpfiles.d/touchpoint-gateway.conf",
        "/lib/udev/rules.d/99-touchpoint-serial.rules",
        "/opt/touchpoint-gateway/share/touchpoint-gateway/firmware-config/gateway.example.toml",
        "/opt/touchpoint-gateway/lib/gateway/app/cli.py",
        "/opt/touchpoint-gateway/lib/paho/mqtt/client.py",
    ):
        assert path in files, path
    # the camera's libraries are only in the camera package
    camera_dirs = ("/opt/touchpoint-gateway/lib/cv2/", "/opt/touchpoint-gateway/lib/numpy/")
    assert not [f for f in files if f.startswith(camera_dirs)]
    cfiles = contents(camera)
    assert "/opt/touchpoint-gateway/lib-camera/cv2/__init__.py" in cfiles
    assert any(f.startswith("/opt/touchpoint-gateway/lib-camera/zxingcpp") for f in cfiles)
    # no simulators and no tests on a store box: they are touchpoint-simulators' (and the
    # checkout's), never the daemon's wheel
    assert [f for f in files if f.startswith("/opt/touchpoint-gateway/lib/drivers/")]
    for listing in (files, cfiles):
        assert not [f for f in listing if f.startswith(NOT_ON_A_BOX)], arch


def test_the_daemons_wheel_carries_no_simulators(tmp_path: Path) -> None:
    """The wheel build.py packs (``pip wheel`` of the repository): gateway and drivers only."""
    wheel = build.own_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        tops = {name.split("/")[0] for name in zf.namelist()}
    assert tops == {"gateway", "drivers", f"touchpoint_gateway-{VERSION}.dist-info"}


@pytest.mark.parametrize("arch", ["amd64", "arm64"])
def test_every_native_library_is_for_the_target(dist: Path, arch: str, tmp_path: Path) -> None:
    for name in ("touchpoint-gateway", "touchpoint-gateway-camera"):
        tree = extract(dist / f"{name}_{VERSION}_{arch}.deb", tmp_path / name)
        elves = build.native_libraries(tree)
        assert elves, "the packages hold native libraries (pydantic-core, OpenCV...)"
        wrong = [str(p) for p, machine in elves if machine != build.ELF_MACHINES[arch]]
        assert not wrong, wrong[:5]


def test_installed_sizes_meet_the_goals(dist: Path) -> None:
    for arch in ("amd64", "arm64"):
        base = int(field(dist / f"touchpoint-gateway_{VERSION}_{arch}.deb", "Installed-Size"))
        camera = int(
            field(dist / f"touchpoint-gateway-camera_{VERSION}_{arch}.deb", "Installed-Size")
        )
        print(f"{arch}: base {base / 1024:.1f} MiB, base + camera {(base + camera) / 1024:.1f} MiB")
        assert base / 1024 <= BASE_GOAL_MIB
        assert (base + camera) / 1024 <= CAMERA_GOAL_MIB


def test_the_lock_pins_every_runtime_dependency_with_hashes() -> None:
    base, camera = build.split_lock(ROOT / "systemd/debian/requirements.lock")
    names = {b.split("==")[0] for b in base + camera}
    for name in ("paho-mqtt", "pydantic", "bleak", "opencv-python-headless", "zxing-cpp"):
        assert name in names
    for block in base + camera:
        assert "==" in block and "--hash=sha256:" in block, block.splitlines()[0]
    assert {b.split("==")[0] for b in camera} == set(build.CAMERA)


def test_the_packages_carry_no_pip_and_no_test_suites(dist: Path) -> None:
    """sqlite-utils requires pip for its `install` command, which a store box never runs
    (14 MB on disk with bytecode); numpy's own test suite is 17 MB."""
    for name in ("touchpoint-gateway", "touchpoint-gateway-camera"):
        files = contents(dist / f"{name}_{VERSION}_arm64.deb")
        assert not [f for f in files if "/lib/pip/" in f or "/lib/pip-" in f], name
        tests = [f for f in files if "/tests/" in f]
        assert not tests, tests[:5]
    base = contents(dist / f"touchpoint-gateway_{VERSION}_arm64.deb")
    assert "/opt/touchpoint-gateway/lib/sqlite_utils/db.py" in base
    camera = contents(dist / f"touchpoint-gateway-camera_{VERSION}_arm64.deb")
    assert "/opt/touchpoint-gateway/lib-camera/numpy/testing/__init__.py" in camera
