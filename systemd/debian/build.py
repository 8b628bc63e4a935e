"""``make dist``: the Debian packages of the gateway, for amd64 and arm64, on any box.

    python systemd/debian/build.py [--arch amd64,arm64] [--out dist] [--version V]

For each architecture it writes two packages:

- ``touchpoint-gateway_<version>_<arch>.deb``: the daemon and every runtime dependency
  but the camera's, under ``/opt/touchpoint-gateway`` (``lib/``: the wheels installed as a
  plain ``--target`` tree, ``bin/touchpoint-gateway``: a launcher for Debian's own
  ``python3``), the unit, sysusers, tmpfiles and udev rules in their Debian places, the
  example configs and notes under ``/opt/touchpoint-gateway/share``;
- ``touchpoint-gateway-camera_<version>_<arch>.deb``: OpenCV, numpy, pyzbar and zxing-cpp
  in ``/opt/touchpoint-gateway/lib-camera``, for the stores with a kiosk camera.

No compiler and no emulation: every dependency is a binary wheel for the target, chosen
by pip's platform options (manylinux up to glibc 2.36, Debian 12's; CPython 3.11, Debian
12's) from ``requirements.lock``, which pins every version with its hashes for every
platform (``make lock`` regenerates it with uv's universal resolver).  The package is
built with ``dpkg-deb`` from a staged tree; the maintainer scripts beside this file create
the user and directories, compile the bytecode, and restart the service after an upgrade
only if the installed config passes ``check-config``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PREFIX = "/opt/touchpoint-gateway"
NAME = "touchpoint-gateway"
MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}
ELF_MACHINES = {"amd64": 0x3E, "arm64": 0xB7}
GLIBC_MINOR = 36  # Debian 12 bookworm
PYTHON = "3.11"  # Debian 12 bookworm's python3
CAMERA = frozenset({"numpy", "opencv-python-headless", "pyzbar", "zxing-cpp"})
# Debian packages each one needs (the camera's pyzbar loads libzbar0 with ctypes).
DEPENDS = "python3 (>= 3.11), python3 (<< 3.12), dbus, bluez, systemd"
CAMERA_DEPENDS = "libzbar0"


def say(text: str) -> None:
    print(f"dist: {text}", flush=True)


def version() -> str:
    data = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return str(data["project"]["version"])


def split_lock(lock: Path) -> tuple[list[str], list[str]]:
    """The lock's requirement blocks (a line and its ``\\`` continuations), base and
    camera apart."""
    blocks: list[str] = []
    current: list[str] = []
    for line in lock.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        current.append(line)
        if not line.rstrip().endswith("\\"):
            blocks.append("\n".join(current))
            current = []
    base, camera = [], []
    for block in blocks:
        name = re.split(r"[=<>;\s]", block, maxsplit=1)[0].lower().replace("_", "-")
        (camera if name in CAMERA else base).append(block)
    return base, camera


def platform_args(arch: str) -> list[str]:
    machine = MACHINES[arch]
    args = ["--only-binary=:all:", "--python-version", PYTHON, "--implementation", "cp"]
    for abi in ("cp311", "abi3", "none"):
        args += ["--abi", abi]
    for minor in range(GLIBC_MINOR, 16, -1):
        args += ["--platform", f"manylinux_2_{minor}_{machine}"]
    return [*args, "--platform", f"manylinux2014_{machine}", "--platform", f"linux_{machine}"]


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], check=True)


def fetch(blocks: Sequence[str], arch: str, dest: Path) -> list[Path]:
    """Download the wheels of ``blocks`` for ``arch``, hashes checked."""
    dest.mkdir(parents=True, exist_ok=True)
    req = dest / "requirements.txt"
    req.write_text("\n".join(blocks) + "\n", encoding="utf-8")
    pip("download", "-q", "--no-deps", "--require-hashes", *platform_args(arch),
        "-r", str(req), "-d", str(dest))  # fmt: skip
    return sorted(dest.glob("*.whl"))


def own_wheel(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    # setuptools builds in the tree and packs all of build/lib: files a former build left
    # there (a package since moved out of this wheel, like simulators/) would ship too.
    shutil.rmtree(REPO / "build", ignore_errors=True)
    pip("wheel", "-q", "--no-deps", "-w", str(dest), str(REPO))
    (wheel,) = dest.glob("touchpoint_gateway-*.whl")
    return wheel


def install_target(wheels: Iterable[Path], target: Path, arch: str) -> None:
    """Lay wheels out as an importable tree (what a venv's site-packages holds)."""
    pip("install", "-q", "--no-deps", "--no-index", "--no-compile", "--target", str(target),
        *platform_args(arch), *map(str, wheels))  # fmt: skip
    for junk in ("bin",):  # console scripts made for the build's interpreter
        shutil.rmtree(target / junk, ignore_errors=True)
    prune(target)


# Installed by the lock but never run on a store box: pip (sqlite-utils requires it for its
# `sqlite-utils install` command; 14 MB on disk with bytecode) and the libraries' own test
# suites (numpy's is 17 MB).  The hashes were checked on the wheels; this trims the tree.
PRUNE_TOP = ("pip",)
PRUNE_DIRS = ("tests",)


def prune(target: Path) -> None:
    for name in PRUNE_TOP:
        shutil.rmtree(target / name, ignore_errors=True)
        for info in target.glob(f"{name}-*.dist-info"):
            shutil.rmtree(info)
    for tests in sorted(target.rglob("*"), reverse=True):
        if tests.is_dir() and tests.name in PRUNE_DIRS:
            shutil.rmtree(tests)


LAUNCHER = f"""#!/usr/bin/python3 -I
# touchpoint-gateway: Debian's python3 with the packaged libraries (see {PREFIX}/share).
import sys

sys.path[:0] = ["{PREFIX}/lib", "{PREFIX}/lib-camera"]
from gateway.app.cli import main

sys.exit(main())
"""


def stamp_version(lib: Path, ver: str) -> None:
    """The package's version is the program's: ``--version`` builds (an upgrade test's
    newer package, a hotfix) must print what dpkg says is installed."""
    init = lib / "gateway" / "__init__.py"
    text = init.read_text(encoding="utf-8")
    new, n = re.subn(r'^__version__ = "[^"]*"$', f'__version__ = "{ver}"', text, flags=re.M)
    if n != 1:
        raise SystemExit(f"dist: no __version__ line in {init}")
    init.write_text(new, encoding="utf-8")


def install_file(src: Path, dest: Path, mode: int = 0o644, text: str | None = None) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if text is None:
        shutil.copyfile(src, dest)
    else:
        dest.write_text(text, encoding="utf-8")
    dest.chmod(mode)


def stage_base(root: Path, lib: Path) -> None:
    shutil.copytree(lib, root / PREFIX.lstrip("/") / "lib")
    opt = root / PREFIX.lstrip("/")
    install_file(HERE, opt / "bin" / NAME, 0o755, LAUNCHER)
    systemd = REPO / "systemd"
    install_file(systemd / f"{NAME}.service", root / f"lib/systemd/system/{NAME}.service")
    install_file(systemd / f"{NAME}.sysusers", root / f"usr/lib/sysusers.d/{NAME}.conf")
    install_file(systemd / f"{NAME}.tmpfiles", root / f"usr/lib/tmpfiles.d/{NAME}.conf")
    fw = REPO / "firmware-config"
    for rules in (fw / "udev").glob("*.rules"):
        install_file(rules, root / "lib/udev/rules.d" / rules.name)
    share = opt / "share" / NAME
    shutil.copytree(fw, share / "firmware-config", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("README.md", f"{NAME}.service", f"{NAME}.sysusers", f"{NAME}.tmpfiles"):
        install_file(systemd / f, share / "systemd" / f)
    install_file(REPO / "README.md", share / "README.md")


def control(package: str, ver: str, arch: str, *, depends: str, size_kib: int, what: str) -> str:
    return (
        f"Package: {package}\nVersion: {ver}\nArchitecture: {arch}\n"
        "Maintainer: Touchpoint Gateway <gateway@touchpoint.example>\n"
        f"Depends: {depends}\nInstalled-Size: {size_kib}\nSection: net\nPriority: optional\n"
        f"Description: {what}\n"
    )


def tree_kib(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) // 1024 + 1


def dpkg_deb(root: Path, out: Path) -> Path:
    subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "-z6", "--build", str(root),
                    str(out)], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return out


def native_libraries(root: Path) -> list[tuple[Path, int]]:
    """Every ELF file in a staged tree, with its machine (e_machine)."""
    out = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            with path.open("rb") as fh:
                head = fh.read(20)
            if head[:4] == b"\x7fELF":
                out.append((path, int.from_bytes(head[18:20], "little")))
    return out


def check_machine(root: Path, arch: str) -> None:
    wrong = [p for p, m in native_libraries(root) if m != ELF_MACHINES[arch]]
    if wrong:
        raise SystemExit(f"dist: {len(wrong)} native files are not {arch}: {wrong[:3]}")


def build(arch: str, out: Path, ver: str, work: Path) -> list[Path]:
    base, camera = split_lock(HERE / "requirements.lock")
    say(f"{arch}: wheels for {MACHINES[arch]}, CPython {PYTHON}, glibc <= 2.{GLIBC_MINOR}")
    base_wheels = [*fetch(base, arch, work / "wheels-base"), own_wheel(work / "wheels-own")]
    camera_wheels = fetch(camera, arch, work / "wheels-camera")
    install_target(base_wheels, work / "lib", arch)
    install_target(camera_wheels, work / "lib-camera", arch)
    stamp_version(work / "lib", ver)

    built = []
    root = work / "root-base"
    stage_base(root, work / "lib")
    debian = root / "DEBIAN"
    for script in ("postinst", "prerm", "postrm"):
        text = (HERE / script).read_text(encoding="utf-8").replace("@VERSION@", ver)
        install_file(HERE, debian / script, 0o755, text)
    size = tree_kib(root)
    install_file(HERE, debian / "control", 0o644, control(
        NAME, ver, arch, depends=DEPENDS, size_kib=size,
        what="In-store edge gateway: beacons, QR codes and loyalty cards to pseudonymised,\n"
        " consented events over MQTT (the daemon; the kiosk camera is a separate package).",
    ))  # fmt: skip
    check_machine(root, arch)
    built.append(dpkg_deb(root, out / f"{NAME}_{ver}_{arch}.deb"))
    say(f"{built[-1].name}: installed size {size / 1024:.1f} MiB")

    croot = work / "root-camera"
    shutil.copytree(work / "lib-camera", croot / PREFIX.lstrip("/") / "lib-camera")
    cdebian = croot / "DEBIAN"
    csize = tree_kib(croot)
    install_file(HERE, cdebian / "control", 0o644, control(
        f"{NAME}-camera", ver, arch, depends=f"{NAME} (= {ver}), {CAMERA_DEPENDS}",
        size_kib=csize,
        what="Kiosk camera support for Touchpoint Gateway: OpenCV, numpy, QR decoders.",
    ))  # fmt: skip
    for script in ("postinst", "prerm"):
        text = (HERE / f"camera.{script}").read_text(encoding="utf-8")
        install_file(HERE, cdebian / script, 0o755, text)
    check_machine(croot, arch)
    built.append(dpkg_deb(croot, out / f"{NAME}-camera_{ver}_{arch}.deb"))
    say(f"{built[-1].name}: installed size {csize / 1024:.1f} MiB")
    return built


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--arch", default="amd64,arm64", help="comma-separated: amd64, arm64")
    p.add_argument("--out", type=Path, default=REPO / "dist", help="where the .deb files go")
    p.add_argument("--version", help="package version (default: pyproject's)")
    args = p.parse_args(argv)
    arches = [a for a in args.arch.split(",") if a]
    unknown = set(arches) - set(MACHINES)
    if unknown:
        p.error(f"unknown architecture(s) {sorted(unknown)}; choose from {sorted(MACHINES)}")
    if shutil.which("dpkg-deb") is None:
        raise SystemExit("dist: dpkg-deb not found (apt-get install dpkg)")
    ver = args.version or version()
    args.out.mkdir(parents=True, exist_ok=True)
    for arch in arches:
        with tempfile.TemporaryDirectory(prefix=f"tp-dist-{arch}-") as tmp:
            for deb in build(arch, args.out, ver, Path(tmp)):
                say(f"wrote {deb}")
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
