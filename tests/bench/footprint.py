"""``python -m tests.bench footprint``: what a store box pays for the package (issue 17).

- installed size: the packages ``make dist`` builds (``systemd/debian/build.py``, this
  checkout), unpacked with ``dpkg-deb -x`` and byte-compiled as the postinst does, then
  measured on disk (blocks, each file once), beside dpkg's ``Installed-Size`` (file sizes
  only, no bytecode).  The quick profile builds this machine's architecture only (~40 s
  for amd64); the full profile builds amd64 and arm64 (no emulation: sizes need no
  running);
- RSS: the packaged daemon (this machine's unpacked package, its own launcher on Debian's
  ``/usr/bin/python3 -I`` where the box has it) on the simulated store with every source
  but the camera (``simulators.rig.store``: card reader on a pty, BLE against the fake
  BlueZ on a private D-Bus, the receipt tap, a synthetic source adding bulk card reads),
  sampled from /proc; reference, same run: the same daemon with no sources;
- start -> READY: exec of the launcher to ``READY=1`` on a ``NOTIFY_SOCKET``, on the same
  config (median of several starts); reference, same run: a bare ``python3 -I -c pass``.

Goals (issue 17): base <= 60 MB, base + camera <= 300 MB (MB = 10^6 bytes), RSS <= 64 MiB,
start -> READY <= 0.5 s.  When the packages cannot be built (no ``dpkg-deb``, no wheels),
the sizes are reported as missing with the reason and the daemon runs from the checkout.

    from tests.bench.footprint import bench_footprint, print_footprint
    print_footprint(bench_footprint(quick=True))
"""

from __future__ import annotations

import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.bench.memory import (
    DAEMON,
    SAMPLE_COLUMNS,
    sample,
    samples_table,
    stop,
    store_at_load,
    summarise,
)

GOAL_BASE_MB = 60.0
GOAL_CAMERA_MB = 300.0  # base + camera
GOAL_RSS_MIB = 64.0
GOAL_READY_S = 0.5
PREFIX = "opt/touchpoint-gateway"
NAME = "touchpoint-gateway"
BUILD = Path(__file__).resolve().parents[2] / "systemd" / "debian" / "build.py"
BOX_PYTHON = Path("/usr/bin/python3")  # Debian's, what the package's launcher runs on
HOST_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), "")


def box_python() -> str:
    """Debian's python3 when it is the 3.11 the package targets, else this interpreter."""
    if BOX_PYTHON.exists():
        out = subprocess.run(
            [str(BOX_PYTHON), "-c", "import sys; print(sys.version_info[:2] == (3, 11))"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if out.stdout.strip() == "True":
            return str(BOX_PYTHON)
    return sys.executable


def disk_bytes(root: Path) -> int:
    """Bytes the tree takes on disk (allocated blocks, like ``du``), each inode once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        total += st.st_blocks * 512
    return total


def build_packages(arches: list[str], out: Path) -> None:
    """``systemd/debian/build.py`` for ``arches`` into ``out`` (CalledProcessError if not)."""
    subprocess.run(
        [sys.executable, str(BUILD), "--arch", ",".join(arches), "--out", str(out)],
        check=True, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip


def _field(deb: Path, name: str) -> str:
    done = subprocess.run(
        ["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def unpack(deb: Path, dest: Path, python: str) -> Path:
    """The package's files under ``dest`` as the box has them after postinst (bytecode)."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)
    for lib in ("lib", "lib-camera"):
        tree = dest / PREFIX / lib
        if tree.is_dir():
            subprocess.run([python, "-m", "compileall", "-q", "-j", "0", str(tree)],
                           check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return dest


def package_sizes(dist: Path, arch: str, work: Path, python: str) -> dict[str, float]:
    """MB on disk (with bytecode) and dpkg's Installed-Size, base and camera packages."""
    (base,) = dist.glob(f"{NAME}_*_{arch}.deb")
    (camera,) = dist.glob(f"{NAME}-camera_*_{arch}.deb")
    base_tree = unpack(base, work / f"{arch}-base", python)
    camera_tree = unpack(camera, work / f"{arch}-camera", python)
    base_mb = disk_bytes(base_tree) / 1e6
    camera_mb = disk_bytes(camera_tree) / 1e6
    base_kib = int(_field(base, "Installed-Size"))
    camera_kib = int(_field(camera, "Installed-Size"))
    return {
        "base_mb": round(base_mb, 1),
        "base_camera_mb": round(base_mb + camera_mb, 1),
        "base_installed_size_mb": round(base_kib * 1024 / 1e6, 1),
        "base_camera_installed_size_mb": round((base_kib + camera_kib) * 1024 / 1e6, 1),
        "deb_base_mb": round(base.stat().st_size / 1e6, 1),
        "deb_camera_mb": round(camera.stat().st_size / 1e6, 1),
    }


def packaged_daemon(tree: Path, python: str, work: Path) -> list[str]:
    """argv of the unpacked package's own launcher, its paths pointed at ``tree``."""
    launcher = (tree / PREFIX / "bin" / NAME).read_text(encoding="utf-8")
    moved = work / "launcher.py"
    moved.write_text(launcher.replace(f"/{PREFIX}", str(tree / PREFIX)), encoding="utf-8")
    return [python, "-I", str(moved)]


def start_to_ready(
    argv: list[str], config: Path, env: dict[str, str], work: Path
) -> tuple[float, float]:
    """Seconds from exec of ``argv run --config`` to READY=1 on a notify socket, and the
    CPU-seconds the daemon had used by then (less sensitive to other load)."""
    path = work / "notify.sock"
    path.unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(30)
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [*argv, "run", "--config", str(config)], env={**env, "NOTIFY_SOCKET": str(path)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            while b"READY=1" not in sock.recv(4096):
                pass
            elapsed = time.perf_counter() - t0
            return elapsed, sample(proc.pid, t0).cpu_s
        finally:
            stop(proc)


def bare_start(python: str, runs: int) -> float:
    """Median seconds from exec to exit of ``python -I -c pass``."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([python, "-I", "-c", "pass"], check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _sizes(arches: list[str], work: Path, python: str) -> tuple[dict[str, Any], Path | None]:
    """Sizes per architecture, and the unpacked base tree for this machine (None if not
    built)."""
    if shutil.which("dpkg-deb") is None:
        return {"size_error": "dpkg-deb not found (apt-get install dpkg)"}, None
    dist = work / "dist"
    t0 = time.monotonic()
    try:
        build_packages(arches, dist)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        tail = "\n".join(str(exc.stderr or "").strip().splitlines()[-5:])
        return {"size_error": f"make dist failed: {exc}\n{tail}".strip()}, None
    figures: dict[str, Any] = {"build_s": round(time.monotonic() - t0, 1), "arches": arches}
    for arch in arches:
        figures[arch] = package_sizes(dist, arch, work / "unpacked", python)
    tree = work / "unpacked" / f"{HOST_ARCH}-base"
    return figures, tree if HOST_ARCH in arches and tree.is_dir() else None


def bench_footprint(quick: bool = False) -> dict[str, Any]:
    arches = [HOST_ARCH or "amd64"] if quick else ["amd64", "arm64"]
    seconds, interval = (12.0, 0.5) if quick else (60.0, 1.0)
    ref_seconds = 4.0 if quick else 15.0
    starts = 3 if quick else 7
    rate = 200.0 if quick else 1000.0
    python = box_python()
    with tempfile.TemporaryDirectory(prefix="tp-bench-footprint-") as d:
        work = Path(d)
        sizes, tree = _sizes(arches, work, python)
        if tree is not None:
            argv = packaged_daemon(tree, python, work)
            daemon = f"the {HOST_ARCH} package's launcher on {python} -I"
        else:
            argv = DAEMON
            daemon = "this checkout (the package could not be built)"
        with store_at_load(work, quick, camera=False) as store:
            env = store.rig.env()
            ready = [start_to_ready(argv, store.config, env, work) for _ in range(starts)]
            bare = bare_start(python, starts)
            run = store.sample(
                argv, work, seconds=seconds, ref_seconds=ref_seconds, interval=interval
            )
    ours, reference = summarise(run.samples), summarise(run.reference)
    return {
        "benchmark": "footprint",
        "quick": quick,
        "python": python,
        "daemon": daemon,
        "sizes": sizes,
        "goal_base_mb": GOAL_BASE_MB,
        "goal_base_camera_mb": GOAL_CAMERA_MB,
        "seconds": seconds,
        "load": {"ble_speed": 4.0, "till_interval_s": 1.0, "synthetic_rate_per_s": rate},
        "rss_peak_mib": ours["rss_peak_mib"],
        "rss_end_mib": ours["rss_end_mib"],
        "rss_growth_pct": ours["rss_growth_pct"],
        "threads_peak": ours["threads_peak"],
        "cpu_percent": ours["cpu_percent"],
        "reference_rss_peak_mib": reference["rss_peak_mib"],
        "goal_rss_mib": GOAL_RSS_MIB,
        "load_s": run.load_s,
        "events_by_source": dict(sorted(run.by_source.items())),
        "silent_sources": run.silent,
        "camera_events": run.by_source["kiosk-cam"],
        "start_to_ready_s": round(statistics.median(r for r, _ in ready), 3),
        "start_to_ready_max_s": round(max(r for r, _ in ready), 3),
        "start_to_ready_runs": [round(r, 3) for r, _ in ready],
        "start_to_ready_cpu_s": round(statistics.median(c for _, c in ready), 3),
        "reference_python_start_s": round(bare, 3),
        "goal_ready_s": GOAL_READY_S,
        "samples": samples_table(run.samples),
        "sample_columns": SAMPLE_COLUMNS,
    }


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def print_footprint(f: dict[str, Any]) -> None:
    sizes = f["sizes"]
    print("footprint on a store box (issue 17)")
    if "size_error" in sizes:
        print(f"  installed size: not measured: {sizes['size_error']}")
    for arch in sizes.get("arches", []):
        s = sizes[arch]
        print(
            f"  {arch}  base {s['base_mb']:.1f} MB on disk (Installed-Size "
            f"{s['base_installed_size_mb']:.1f} MB)  goal <= {f['goal_base_mb']:.0f} MB: "
            f"{_met(s['base_mb'] <= f['goal_base_mb'])}"
        )
        print(
            f"  {arch}  base + camera {s['base_camera_mb']:.1f} MB on disk (Installed-Size "
            f"{s['base_camera_installed_size_mb']:.1f} MB)  goal <= "
            f"{f['goal_base_camera_mb']:.0f} MB: "
            f"{_met(s['base_camera_mb'] <= f['goal_base_camera_mb'])}"
        )
    print(f"  daemon: {f['daemon']}")
    print(
        f"  RSS, every source but the camera at load: peak {f['rss_peak_mib']:.1f} MiB "
        f"(no sources: {f['reference_rss_peak_mib']:.1f} MiB)  goal <= "
        f"{f['goal_rss_mib']:.0f} MiB: {_met(f['rss_peak_mib'] <= f['goal_rss_mib'])}"
    )
    counts = ", ".join(f"{k} {v:,}" for k, v in f["events_by_source"].items())
    print(f"  events at the central by source: {counts or 'none'}")
    if f["silent_sources"]:
        print(f"  sources that sent nothing: {', '.join(f['silent_sources'])}")
    print(
        f"  start -> READY median {f['start_to_ready_s']} s, max {f['start_to_ready_max_s']} s"
        f" (bare python3 -I: {f['reference_python_start_s']} s; CPU to READY "
        f"{f['start_to_ready_cpu_s']} s)  goal <= "
        f"{f['goal_ready_s']} s: {_met(f['start_to_ready_s'] <= f['goal_ready_s'])}"
    )
