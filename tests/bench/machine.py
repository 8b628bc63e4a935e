"""What a benchmark report says about where it ran: the machine, the load, the versions.

machine()          CPU model, cores, RAM, kernel, OS, Python
versions()         ours and every library and program a figure depends on
load_snapshot()    load average, and how much CPU other processes used just now
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sqlite3
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from gateway import __version__

_TICK = os.sysconf("SC_CLK_TCK")
_DISTRIBUTIONS = (
    "paho-mqtt", "bleak", "dbus-fast", "opencv-python-headless", "zxing-cpp", "pyzbar",
    "numpy", "pydantic", "theengsgateway", "theengsdecoder", "matplotlib",
)  # fmt: skip


def _read(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _cpu_model() -> str:
    for line in _read("/proc/cpuinfo").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    meminfo = _read("/proc/meminfo").splitlines()
    mem_kib = next((int(x.split()[1]) for x in meminfo if x.startswith("MemTotal")), 0)
    try:
        os_name = platform.freedesktop_os_release().get("PRETTY_NAME", "")
    except OSError:
        os_name = platform.system()
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count() or 0,
        "cores_usable": len(os.sched_getaffinity(0)),
        "ram_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": f"{platform.system()} {platform.release()} {platform.machine()}",
        "os": os_name,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"not available ({exc})"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "not available"


def _zbar_version() -> str:
    try:
        from pyzbar import zbar_library

        lib, _ = zbar_library.load()
        major, minor, patch = ctypes.c_uint(), ctypes.c_uint(), ctypes.c_uint()
        lib.zbar_version(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch))
    except (ImportError, OSError, AttributeError) as exc:
        return f"not available ({exc})"
    return f"{major.value}.{minor.value}.{patch.value}"


def _ours() -> str:
    root = Path(__file__).resolve().parents[2]
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=10, check=False,
        )  # fmt: skip
        commit = done.stdout.strip() if done.returncode == 0 else ""
    return f"{__version__} ({commit})" if commit else __version__


def versions() -> dict[str, str]:
    from simulators.infra.broker import find_mosquitto

    out = {"touchpoint-gateway": _ours()}
    for dist in _DISTRIBUTIONS:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    out["zbar (libzbar)"] = _zbar_version()
    out["sqlite3 library"] = sqlite3.sqlite_version
    try:
        out["mosquitto"] = _first_line([find_mosquitto(), "-h"])
    except RuntimeError as exc:
        out["mosquitto"] = f"not available ({exc})"
    out["dbus-daemon"] = _first_line(["dbus-daemon", "--version"])
    return out


# -- load --------------------------------------------------------------------------------


def _cpu_by_pid() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU-seconds so far) for every process we can read."""
    out: dict[int, tuple[int, float]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = _read(f"/proc/{entry.name}/stat")
        if ")" not in stat:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK)
    return out


def _ours_and_descendants(table: dict[int, tuple[int, float]]) -> set[int]:
    mine = {os.getpid()}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in table.items():
            if ppid in mine and pid not in mine:
                mine.add(pid)
                grew = True
    return mine


def load_snapshot(sample_s: float = 1.0) -> dict[str, Any]:
    """Load average, and the CPU (in cores) other processes used over ``sample_s``."""
    snap: dict[str, Any] = {"loadavg": [round(x, 2) for x in os.getloadavg()]}
    if sample_s <= 0:
        return snap
    first = _cpu_by_pid()
    t0 = time.monotonic()
    time.sleep(sample_s)
    second = _cpu_by_pid()
    elapsed = time.monotonic() - t0
    mine = _ours_and_descendants(second) | _ours_and_descendants(first)
    used = sum(
        cpu - first[pid][1] for pid, (_, cpu) in second.items() if pid in first and pid not in mine
    )
    snap["other_cpu_cores"] = round(max(used, 0.0) / elapsed, 2)
    return snap


def python_start_s(runs: int = 5) -> float:
    """Seconds from exec to exit of a bare ``python -c pass`` (best of ``runs``)."""
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        best = min(best, time.perf_counter() - t0)
    return round(best, 3)
