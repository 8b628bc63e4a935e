"""The packages ``make dist`` builds, installed for real into a fresh Debian 12 root.

A minimal bookworm root (mmdebstrap, from the host's own apt mirror, with what a Debian or
Raspberry Pi OS box has: python3, dbus, bluez, systemd, libzbar0) gets the amd64 package
installed offline (``unshare -n``: apt cannot download anything), then the daemon runs
from it against a mosquitto on the host's loopback; then an upgrade, a rollback, a buffer
written by a future version, the camera package, and removal.

Each command runs in its own private mount and PID namespaces (``unshare``), with /proc,
/sys, /dev and /run mounted inside: when it ends, its processes and mounts are gone.
Needs root, mmdebstrap and dpkg-deb; the root is cached as a tarball (ROOT_CACHE) so only
the first run downloads it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from gateway.identity.pseudonyms import Keyring
from simulators.infra.broker import Mosquitto
from tests.system.harness import card_number

pytestmark = [pytest.mark.slow, pytest.mark.host]

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "systemd" / "debian" / "build.py"
SUITE = "bookworm"
INCLUDE = "python3,dbus,bluez,systemd,libzbar0,ca-certificates"
ROOT_CACHE = Path(os.environ.get("TOUCHPOINT_ROOT_CACHE", "/var/tmp/touchpoint-gateway-test"))
PREFIX = "/opt/touchpoint-gateway"
LAUNCHER = f"{PREFIX}/bin/touchpoint-gateway"
CONFIG = "/etc/touchpoint-gateway/gateway.toml"
BUFFER = "/var/lib/touchpoint-gateway/buffer.db"
USER = "touchpoint-gateway"
CARDS = 20
ENV = ["HOME=/root", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
       "LANG=C.UTF-8", "DEBIAN_FRONTEND=noninteractive"]  # fmt: skip


def _why_not() -> str | None:
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root (mmdebstrap, chroot and mounts)"
    for tool in ("mmdebstrap", "dpkg-deb", "unshare", "chroot", "mount"):
        if shutil.which(tool) is None:
            return f"needs {tool} on the host"
    if subprocess.run(["unshare", "--mount", "--pid", "--fork", "true"],
                      capture_output=True, check=False).returncode != 0:  # fmt: skip
        return "cannot make mount/PID namespaces here (unshare --mount --pid)"
    return None


if (_reason := _why_not()) is not None:
    pytest.skip(_reason, allow_module_level=True)

T0 = time.monotonic()
FIGURES: dict[str, str] = {}


def say(text: str) -> None:
    print(f"[dist-install +{time.monotonic() - T0:6.1f}s] {text}", file=sys.stderr, flush=True)


def host_mirrors(suite: str = SUITE) -> list[str]:
    """``deb URI SUITE COMPONENTS`` lines for every *suite* entry in the host's apt sources
    (``.ci/apt-mirrors``, which .ci/fresh-root uses too)."""
    done = subprocess.run([sys.executable, str(REPO / ".ci" / "apt-mirrors"), suite],
                          capture_output=True, text=True, check=False)  # fmt: skip
    return done.stdout.splitlines()


def root_tarball(arch: str) -> Path:
    """The cached minimal root for *arch*, made on first use."""
    tar = ROOT_CACHE / f"{SUITE}-{arch}-{INCLUDE.replace(',', '-')}.tar"
    if tar.exists():
        say(f"root: cached {tar}")
        return tar
    mirrors = host_mirrors()
    if not mirrors:
        pytest.skip(f"no {SUITE} mirror in the host's apt sources")
    ROOT_CACHE.mkdir(parents=True, exist_ok=True)
    say(f"root: mmdebstrap {SUITE} {arch} from {', '.join(mirrors)}")
    t = time.monotonic()
    part = tar.with_suffix(".part.tar")
    subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase", f"--architectures={arch}",
                    f"--include={INCLUDE}", SUITE, str(part), *mirrors], check=True)  # fmt: skip
    part.rename(tar)
    FIGURES["root creation"] = f"{time.monotonic() - t:.0f} s"
    say(f"root: made in {FIGURES['root creation']}")
    return tar


class Root:
    """A Debian root in a directory; each command in fresh private namespaces."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def argv(self, cmd: list[str], *, net: bool, env: tuple[str, ...] = ()) -> list[str]:
        r = str(self.path)
        mounts = (
            f"mount -t proc proc {r}/proc && mount --rbind /sys {r}/sys && "
            f"mount --rbind /dev {r}/dev && mount -t tmpfs -o mode=0755 tmpfs {r}/run && "
            f'exec chroot {r} /usr/bin/env -i {" ".join(ENV + list(env))} "$@"'
        )
        flags = ["--mount", "--pid", "--fork", "--kill-child=SIGTERM", "--propagation", "private"]
        return ["unshare", *flags, *([] if net else ["--net"]), "sh", "-c", mounts, "sh", *cmd]

    def run(self, *cmd: str, net: bool = False, check: bool = True,
            env: tuple[str, ...] = (), timeout: float = 600,
            ) -> subprocess.CompletedProcess[str]:  # fmt: skip
        proc = subprocess.run(self.argv(list(cmd), net=net, env=env), capture_output=True,
                              text=True, timeout=timeout, check=False)  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"{cmd} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sh(self, script: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, **kw)  # type: ignore[arg-type]

    def file(self, path: str) -> Path:
        return self.path / path.lstrip("/")

    def install(self, *debs: Path, downgrade: bool = False) -> float:
        """apt-get install the local packages, offline; seconds it took."""
        for deb in debs:
            shutil.copy(deb, self.file(f"/tmp/{deb.name}"))
        t = time.monotonic()
        self.run("apt-get", "install", "-y", "--no-install-recommends",
                 *(["--allow-downgrades"] if downgrade else []),
                 *(f"/tmp/{d.name}" for d in debs))  # fmt: skip
        return time.monotonic() - t


def _newer(ver: str) -> str:
    head, _, last = ver.rpartition(".")
    return f"{head}.{int(last) + 1}" if last.isdigit() else f"{ver}.1"


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """amd64 packages of this checkout: the current version and a newer one."""
    sys.path.insert(0, str(BUILD.parent))
    try:
        import build as dist_build  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(BUILD.parent))
    old = dist_build.version()
    out: dict[str, dict[str, Path]] = {}
    for ver in (old, _newer(old)):
        dest = tmp_path_factory.mktemp(f"dist-{ver}")
        say(f"build: {ver} amd64")
        t = time.monotonic()
        subprocess.run([sys.executable, str(BUILD), "--arch", "amd64", "--out", str(dest),
                        "--version", ver], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        FIGURES[f"build {ver}"] = f"{time.monotonic() - t:.0f} s"
        say(f"build: {ver} in {FIGURES[f'build {ver}']}")
        out[ver] = {
            "base": dest / f"touchpoint-gateway_{ver}_amd64.deb",
            "camera": dest / f"touchpoint-gateway-camera_{ver}_amd64.deb",
        }
    return out


def unpack(arch: str, tmp_path_factory: pytest.TempPathFactory) -> Root:
    path = tmp_path_factory.mktemp(f"root-{arch}")
    with tarfile.open(root_tarball(arch)) as tf:
        tf.extractall(path, filter="fully_trusted")
    say(f"root: unpacked in {path}")
    return Root(path)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Root]:
    r = unpack("amd64", tmp_path_factory)
    yield r
    shutil.rmtree(r.path, ignore_errors=True)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path_factory.mktemp("mq")) as b:
        yield b


def provision(root: Root, port: int) -> Keyring:
    """A small config for this root: a random tenant key (0600 in the credstore), MQTT
    to the host's loopback without TLS, a synthetic source, consent for its cards."""
    raw = secrets.token_bytes(32)
    key = base64.b64encode(raw).decode()
    ring = Keyring({"k1": raw}, "k1")
    seed = {"records": [{"subject": ring.pseudonym("loyalty", card_number(i)),
                         "purposes": ["analytics", "linking"], "expires": None}
                        for i in range(CARDS)]}  # fmt: skip
    etc = root.file("/etc/touchpoint-gateway")
    (etc / "credstore" / "k1.key").write_text(key + "\n", encoding="utf-8")
    (etc / "credstore" / "k1.key").chmod(0o600)
    (etc / "seed.json").write_text(json.dumps(seed), encoding="utf-8")
    (etc / "gateway.toml").write_text(f"""
[gateway]
store = "nl-ams-001"
device = "gw-01"
[keyring]
active = "k1"
[keyring.keys]
k1 = "${{CREDENTIALS_DIRECTORY}}/k1.key"
[buffer]
path = "{BUFFER}"
[mqtt]
host = "127.0.0.1"
port = {port}
reconnect_min_s = 0.2
reconnect_max_s = 2
[consent]
seed_file = "/etc/touchpoint-gateway/seed.json"
[[sources]]
kind = "synthetic"
name = "load"
rate_per_s = 20
cards = {CARDS}
""", encoding="utf-8")  # fmt: skip
    return ring


def check_config(root: Root) -> subprocess.CompletedProcess[str]:
    return root.run(LAUNCHER, "check-config", CONFIG, check=False,
                    env=("CREDENTIALS_DIRECTORY=/etc/touchpoint-gateway/credstore",))  # fmt: skip


def run_daemon(root: Root, port: int, seconds: float = 6.0) -> dict[str, object]:
    """Run the installed daemon as its user for a few seconds (systemd's way: the key in a
    credentials directory it can read, NOTIFY_SOCKET); what it published and used."""
    creds = root.file("/run-creds")
    creds.mkdir(exist_ok=True)
    shutil.copy(root.file("/etc/touchpoint-gateway/credstore/k1.key"), creds / "k1.key")
    notify = root.file("/tmp/notify.sock")
    notify.unlink(missing_ok=True)
    got: list[str] = []
    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = lambda c, u, m: got.append(m.topic)
    sub.connect("127.0.0.1", port)
    sub.subscribe("touchpoint/v1/+/+/events", qos=1)
    sub.loop_start()
    cmd = ["sh", "-c", f"chown -R {USER}: /run-creds && chmod 0400 /run-creds/k1.key && "
           f"exec timeout {seconds + 30:.0f} setpriv --reuid={USER} --regid={USER} "
           f"--init-groups {LAUNCHER} run --config {CONFIG}"]  # fmt: skip
    env = ("CREDENTIALS_DIRECTORY=/run-creds", "NOTIFY_SOCKET=/tmp/notify.sock")
    result: dict[str, object] = {}
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as ns:
        ns.bind(str(notify))
        notify.chmod(0o777)  # the daemon runs as its user
        ns.settimeout(0.5)
        t0 = time.monotonic()
        proc = subprocess.Popen(root.argv(cmd, net=True, env=env), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            deadline = t0 + 60
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if b"READY=1" in ns.recv(4096):
                        result["ready_s"] = time.monotonic() - t0
                        break
                except TimeoutError:
                    pass
            end = time.monotonic() + seconds
            while time.monotonic() < end and proc.poll() is None:
                time.sleep(0.5)
            result["rss_kib"] = _rss_kib(proc.pid)
            result["alive"] = proc.poll() is None
            if result["alive"]:  # `timeout` (PID 1 there) passes SIGTERM on to the daemon
                _leaf_signal(proc.pid)
            out, _ = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()  # the namespace's PID 1 dies with it (--kill-child)
                proc.communicate()
            sub.loop_stop()
            sub.disconnect()
    result.update(rc=proc.returncode, log=out, events=len(got))
    return result


def _leaf(pid: int) -> int:
    """The innermost process below *pid* (unshare -> timeout -> the daemon)."""
    while True:
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            return pid
        if not kids:
            return pid
        pid = int(kids[0])


def _leaf_signal(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(_leaf(pid), 15)


def _rss_kib(pid: int) -> int | None:
    """VmRSS of the daemon."""
    try:
        for line in Path(f"/proc/{_leaf(pid)}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def assert_runs(root: Root, port: int, what: str) -> None:
    r = run_daemon(root, port)
    say(f"{what}: ready after {r.get('ready_s', -1):.2f} s, VmRSS {r['rss_kib']} KiB, "
        f"{r['events']} event batches")  # fmt: skip
    FIGURES[f"{what}: start->READY"] = f"{r.get('ready_s', -1):.2f} s"
    FIGURES[f"{what}: VmRSS"] = f"{r['rss_kib']} KiB"
    assert r["alive"] and "ready_s" in r, r["log"]
    assert r["events"] > 0, f"nothing forwarded\n{r['log']}"


def version_of(root: Root) -> str:
    return root.run(LAUNCHER, "--version").stdout.strip()


@pytest.mark.timeout(1800)
def test_install_upgrade_rollback_remove(
    root: Root, debs: dict[str, dict[str, Path]], broker: Mosquitto
) -> None:
    old, new = list(debs)
    say(f"install {old} offline")
    FIGURES["install"] = f"{root.install(debs[old]['base']):.1f} s"
    assert version_of(root) == f"touchpoint-gateway {old}"
    assert root.run("getent", "passwd", USER).returncode == 0
    assert root.file("/var/lib/touchpoint-gateway").is_dir()
    assert root.file("/etc/systemd/system/multi-user.target.wants/touchpoint-gateway.service"
                     ).is_symlink()  # fmt: skip
    provision(root, broker.port)
    check = check_config(root)
    assert check.returncode == 0, check.stdout + check.stderr
    assert_runs(root, broker.port, f"{old}")
    assert root.file(BUFFER).exists()

    say(f"upgrade to {new}")
    root.install(debs[new]["base"])
    assert version_of(root) == f"touchpoint-gateway {new}"
    assert_runs(root, broker.port, f"upgraded {new}")

    say(f"roll back to {old}")
    root.install(debs[old]["base"], downgrade=True)
    assert version_of(root) == f"touchpoint-gateway {old}"
    assert_runs(root, broker.port, f"rolled back {old}")

    say("a buffer from a future version")
    db = sqlite3.connect(root.file(BUFFER))
    with db:
        db.execute("INSERT INTO _migrations(name, applied_at, version, older_can_read)"
                   " VALUES ('900_x', 0, '9.9.9', 0)")  # fmt: skip
    db.close()
    r = run_daemon(root, broker.port, seconds=0)
    assert r["rc"] == 78 and "9.9.9" in str(r["log"]), r
    check = check_config(root)
    assert check.returncode == 1 and "9.9.9" in check.stdout, check.stdout + check.stderr
    db = sqlite3.connect(root.file(BUFFER))
    with db:
        db.execute("DELETE FROM _migrations WHERE name = '900_x'")
    db.close()

    say("camera package")
    root.install(debs[old]["camera"])
    root.run("/usr/bin/python3", "-I", "-c",
             f"import sys; sys.path[:0] = ['{PREFIX}/lib', '{PREFIX}/lib-camera']; "
             "import cv2, zxingcpp, pyzbar.pyzbar, gateway.app.cli")  # fmt: skip

    say("remove both")
    root.run("apt-get", "remove", "-y", "touchpoint-gateway-camera", "touchpoint-gateway")
    assert not root.file("/usr/lib/systemd/system/touchpoint-gateway.service").exists()
    assert not root.file("/lib/systemd/system/touchpoint-gateway.service").exists()
    assert not root.file("/etc/systemd/system/multi-user.target.wants/"
                         "touchpoint-gateway.service").exists()  # fmt: skip
    left = [str(p) for p in root.file(PREFIX).rglob("*")] if root.file(PREFIX).exists() else []
    assert left == [], left[:20]
    say("figures: " + "; ".join(f"{k}: {v}" for k, v in FIGURES.items()))


@pytest.mark.timeout(3600)
@pytest.mark.skipif(os.environ.get("TOUCHPOINT_TEST_ARM64") != "1",
                    reason="arm64 under qemu-user is slow: make test-arm64-package")  # fmt: skip
def test_arm64_package_installs_under_emulation(
    tmp_path_factory: pytest.TempPathFactory, broker: Mosquitto
) -> None:
    """The arm64 package on an arm64 root (qemu-user-static through binfmt_misc):
    installs offline, ``--version`` and ``check-config`` pass, and the fast tests pass
    against the installed package (``run_fast_tests``)."""
    if not Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
        pytest.skip("qemu-aarch64 is not registered in binfmt_misc (qemu-user-static)")
    sys.path.insert(0, str(BUILD.parent))
    try:
        import build as dist_build
    finally:
        sys.path.remove(str(BUILD.parent))
    ver = dist_build.version()
    dest = tmp_path_factory.mktemp("dist-arm64")
    say(f"build: {ver} arm64")
    subprocess.run([sys.executable, str(BUILD), "--arch", "arm64", "--out", str(dest)],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    root = unpack("arm64", tmp_path_factory)
    try:
        say("arm64: install offline")
        t = root.install(dest / f"touchpoint-gateway_{ver}_arm64.deb")
        say(f"arm64: installed in {t:.0f} s")
        assert root.run("uname", "-m").stdout.strip() == "aarch64"
        assert version_of(root) == f"touchpoint-gateway {ver}"
        provision(root, broker.port)
        check = check_config(root)
        assert check.returncode == 0, check.stdout + check.stderr
        say("arm64: --version and check-config pass")
        run_fast_tests(root, "arm64", tmp_path_factory.mktemp("test-deps-arm64"))
    finally:
        shutil.rmtree(root.path, ignore_errors=True)


# The fast tests run on the installed package under emulation: those that exercise each
# native library of the base package on the target (pydantic-core: config; PyNaCl and
# cffi: tokens; dbus-fast: bleak against the fake BlueZ on a private D-Bus; pyserial on a
# pty; Debian's sqlite3: the outbox) and the wire formats (hypothesis).  The whole
# not-slow suite (1,200 tests) takes hours under qemu-user on two cores;
# TOUCHPOINT_ARM64_TESTS="tests -m 'not slow'" asks for it anyway.
ARM64_FAST_TESTS = (
    "tests/gateway/config/test_config.py tests/gateway/identity/test_tokens.py "
    "tests/gateway/identity/test_identity.py tests/gateway/buffer/test_outbox.py "
    "tests/drivers/test_ble_adverts.py "
    "tests/drivers/test_card_frames.py tests/drivers/test_serial_cards.py "
    "tests/drivers/test_ble_driver.py::test_walkthrough_end_to_end "
    "tests/drivers/test_ble_driver.py::test_address_rotation_and_two_zones -m 'not slow'"
)
# What the tests need beyond the package, at the dev venv's versions.
TEST_TOOLS = ("pytest", "pytest-timeout", "hypothesis", "cryptography")
# Emulation is ~10x slower: no hypothesis deadlines (the tests' own timeouts stay).
EMULATED_CONFTEST = """from hypothesis import settings

settings.register_profile("emulated", deadline=None)
settings.load_profile("emulated")
"""


def fetch_test_tools(arch: str, dest: Path) -> Path:
    """pytest and the test tools as binary wheels for *arch* (pip's platform options, no
    compiler), laid out as a ``--target`` tree; the tree."""
    import importlib.metadata

    sys.path.insert(0, str(BUILD.parent))
    try:
        import build as dist_build
    finally:
        sys.path.remove(str(BUILD.parent))
    pins = [f"{n}=={importlib.metadata.version(n)}" for n in TEST_TOOLS]
    wheels = dest / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                    *dist_build.platform_args(arch), "-d", str(wheels), *pins],
                   check=True)  # fmt: skip
    dist_build.install_target(sorted(wheels.glob("*.whl")), dest / "site", arch)
    return dest / "site"


def run_fast_tests(root: Root, arch: str, work: Path) -> None:
    """The fast tests against the installed package in the root: the test tree, the
    simulators (touchpoint-simulators, not in the package) and the test tools copied in;
    ``gateway`` and ``drivers`` are the package's own."""
    selection = os.environ.get("TOUCHPOINT_ARM64_TESTS", ARM64_FAST_TESTS)
    say(f"{arch}: fetching the test tools for the root: {', '.join(TEST_TOOLS)}")
    tools = fetch_test_tools(arch, work)
    tp = root.file("/root/tp")
    shutil.copytree(REPO / "tests", tp / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tp / "pyproject.toml")
    (tp / "conftest.py").write_text(EMULATED_CONFTEST, encoding="utf-8")
    shutil.copytree(tools, tp / "tools")
    shutil.copytree(REPO / "simulators", tp / "simulators",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))  # fmt: skip
    for name in ("gateway", "drivers"):
        (tp / name).symlink_to(f"{PREFIX}/lib/{name}")
    (tp / "firmware-config").symlink_to(f"{PREFIX}/share/touchpoint-gateway/firmware-config")
    say(f"{arch}: pytest {selection} (in the root, under emulation)")
    t = time.monotonic()
    limit = float(os.environ.get("TOUCHPOINT_ARM64_TESTS_LIMIT", "900"))
    done = root.sh(f"cd /root/tp && python3 -m pytest -q -p no:cacheprovider {selection}",
                   net=True, check=False, timeout=limit,
                   env=(f"PYTHONPATH=/root/tp/tools:{PREFIX}/lib",))  # fmt: skip
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    FIGURES[f"{arch} fast tests"] = f"{summary} ({time.monotonic() - t:.0f} s)"
    say(f"{arch}: fast tests: {FIGURES[f'{arch} fast tests']}")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
