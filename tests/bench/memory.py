"""``python -m tests.bench memory``: the daemon's footprint with every source at load.

The whole simulated store runs (``simulators.rig.store.StoreRig``: mosquitto, the fake
central, the card reader on a pty, the fake BlueZ on a private D-Bus, the MJPEG kiosk
camera, a receipt printer behind the tap and a till sending receipts), at a busy store's
rates (``LOAD``) plus a synthetic source adding bulk card reads.  The real daemon runs as
a process (``touchpoint-gateway run``) on the rig's config, and its resident memory, open
file descriptors, threads and CPU are sampled from /proc over time: from exec, for the
run's seconds counted from when every source has reached the central (a slow box takes
longer to get there).

Reference, same run: the same daemon on the same config with its sources removed (broker,
buffer, consent sync and health only), sampled the same way.

Goal (issue 7): RSS <= 100 MiB (not judged under emulation, where the RSS is the
emulator's: ``tests.bench.goals``).  ``rss_growth_pct`` compares the peak after warm-up
(the first third of the run) with the value at the end of warm-up; the soak measures
flatness over days, this run only shows nothing grows fast.

    from tests.bench.memory import bench_memory, print_memory
    print_memory(bench_memory(quick=True))
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.bench.goals import emulated, judge, verdict

GOAL_RSS_MIB = 100.0
READY_LIMIT_S = 600.0  # exec to READY=1, however slow the box
_TICK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    t: float  # seconds since the process started being sampled
    rss_mib: float
    fds: int
    threads: int
    cpu_s: float  # user + system CPU-seconds so far


def sample(pid: int, t0: float) -> Sample:
    """One reading of a process's footprint from /proc (OSError if it has gone)."""
    proc = Path(f"/proc/{pid}")
    status = dict(
        line.split(":", 1)
        for line in (proc / "status").read_text(encoding="ascii").splitlines()
        if ":" in line
    )
    stat = (proc / "stat").read_text(encoding="ascii")
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    cpu = (int(fields[11]) + int(fields[12])) / _TICK  # utime, stime
    return Sample(
        t=round(time.monotonic() - t0, 3),
        rss_mib=round(int(status["VmRSS"].split()[0]) / 1024, 2),
        fds=sum(1 for _ in (proc / "fd").iterdir()),
        threads=int(status["Threads"]),
        cpu_s=cpu,
    )


def _run_sampled(
    config: Path,
    env: dict[str, str],
    seconds: float,
    interval: float,
    log: Path,
    *,
    at_load: Callable[[], bool] | None = None,
) -> list[Sample]:
    """Run ``touchpoint-gateway run --config`` until ``seconds`` after its READY=1 (and
    ``at_load()`` true, when given); its samples from exec on.  The window counts from
    there, not exec: on a slow box (a Pi, an emulated root) the start alone can take
    longer than a quick run's window."""
    notify = log.with_suffix(".notify")
    notify.unlink(missing_ok=True)
    with (
        log.open("wb") as out,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        sock.bind(str(notify))
        sock.setblocking(False)
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(config)],
            env={**env, "NOTIFY_SOCKET": str(notify)}, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        samples: list[Sample] = []
        t0 = time.monotonic()
        end = t0 + READY_LIMIT_S  # until READY=1 comes (and the load is on)
        ready = loaded = False
        try:
            while time.monotonic() < end:
                ready = ready or _ready(sock)
                if ready and not loaded and (at_load is None or at_load()):
                    loaded, end = True, time.monotonic() + seconds
                if proc.poll() is not None:
                    tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
                    raise RuntimeError(
                        f"the daemon exited with {proc.returncode} after "
                        f"{time.monotonic() - t0:.1f}s; its log ends:\n{tail}"
                    )
                samples.append(sample(proc.pid, t0))
                time.sleep(interval)
            if not loaded:  # the window never began: say what did not happen
                what = "sent no READY=1" if not ready else "had not every source at load"
                raise RuntimeError(f"the daemon {what} within {READY_LIMIT_S:.0f}s")
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return samples


def _ready(sock: socket.socket) -> bool:
    """Whether READY=1 is among the notify messages waiting on ``sock``."""
    while True:
        try:
            if b"READY=1" in sock.recv(4096):
                return True
        except BlockingIOError:
            return False


def summarise(samples: list[Sample], warmup_fraction: float = 1 / 3) -> dict[str, Any]:
    """Peak, end and growth after warm-up of a series of samples."""
    if len(samples) < 3:
        raise ValueError(f"too few samples to summarise ({len(samples)})")
    warm_t = samples[-1].t * warmup_fraction
    after = [s for s in samples if s.t >= warm_t]
    warm = after[0]
    span = samples[-1].t - samples[0].t
    return {
        "rss_peak_mib": max(s.rss_mib for s in samples),
        "rss_end_mib": samples[-1].rss_mib,
        "rss_at_warmup_mib": warm.rss_mib,
        "rss_growth_pct": round(
            100 * (max(s.rss_mib for s in after) - warm.rss_mib) / warm.rss_mib, 2
        ),
        "fds_peak": max(s.fds for s in samples),
        "fds_growth": max(s.fds for s in after) - warm.fds,
        "threads_peak": max(s.threads for s in samples),
        "cpu_percent": round(100 * (samples[-1].cpu_s - samples[0].cpu_s) / max(span, 1e-6), 1),
    }


# A busy store: the BLE scenario at 4x, the kiosk camera decoded at its full 30 fps, a
# receipt every second, and bulk card reads from the synthetic source.
def _load(quick: bool) -> Any:
    from simulators.rig.store import RigLoad

    return RigLoad(
        ble_speed=4.0,
        camera_decode_fps=30.0,
        till_interval_s=1.0,
        synthetic_rate=200.0 if quick else 1000.0,
        synthetic_cards=200,
    )


def _without_sources(text: str) -> str:
    head, sep, _ = text.partition("\n[[sources]]")
    if not sep:
        raise ValueError("the rig's config has no [[sources]]")
    return head + "\n"


def bench_memory(quick: bool = False) -> dict[str, Any]:
    from simulators.rig.store import StoreRig

    expected = ("till-2-card", "entrance-ble", "kiosk-cam", "till-2-printer", "bulk-cards")

    seconds, interval = (12.0, 0.5) if quick else (90.0, 1.0)
    ref_seconds = 4.0 if quick else 15.0
    with tempfile.TemporaryDirectory(prefix="tp-bench-mem-") as d:
        work = Path(d)
        with StoreRig(work / "rig", _load(quick)) as rig:
            env = rig.env()
            ref_cfg = work / "reference.toml"
            ref_cfg.write_text(_without_sources(rig.config_text()), encoding="utf-8")
            ref = _run_sampled(ref_cfg, env, ref_seconds, interval, work / "reference.log")
            before = len(rig.central_events())
            cfg = rig.write_config()

            def at_load() -> bool:  # every source has reached the central
                sources = {e.get("source") for e in rig.central_events()[before:]}
                return sources.issuperset(expected)

            log = work / "gateway.log"
            samples = _run_sampled(cfg, env, seconds, interval, log, at_load=at_load)
            time.sleep(1.0)  # the last batches reach the central
            events = rig.central_events()[before:]
    by_source = Counter(str(e.get("source", "?")) for e in events)
    ours, reference = summarise(samples), summarise(ref)
    return {
        "benchmark": "memory",
        "quick": quick,
        "seconds": seconds,
        "interval_s": interval,
        "load": {
            "ble_speed": 4.0,
            "camera_decode_fps": 30.0,
            "till_interval_s": 1.0,
            "synthetic_rate_per_s": 200.0 if quick else 1000.0,
        },
        **ours,
        "reference_rss_peak_mib": reference["rss_peak_mib"],
        "reference_fds_peak": reference["fds_peak"],
        "reference_threads_peak": reference["threads_peak"],
        "reference_cpu_percent": reference["cpu_percent"],
        "events_by_source": dict(sorted(by_source.items())),
        "silent_sources": [s for s in expected if by_source[s] == 0],
        "goal_rss_mib": GOAL_RSS_MIB,
        "emulated": emulated(),
        "goal_met": judge(ours["rss_peak_mib"] <= GOAL_RSS_MIB),  # None when emulated
        "samples": [[s.t, s.rss_mib, s.fds, s.threads, round(s.cpu_s, 2)] for s in samples],
        "reference_samples": [[s.t, s.rss_mib, s.fds, s.threads, round(s.cpu_s, 2)] for s in ref],
        "sample_columns": ["t_s", "rss_mib", "fds", "threads", "cpu_s"],
    }


def print_memory(f: dict[str, Any]) -> None:
    print(f"daemon footprint with every source at load, {f['seconds']:.0f} s")
    print(
        f"  RSS   peak {f['rss_peak_mib']:>6.1f} MiB  end {f['rss_end_mib']:.1f} MiB"
        f"  growth after warm-up {f['rss_growth_pct']:+.1f} %"
        f"  (no sources: {f['reference_rss_peak_mib']:.1f} MiB)"
    )
    print(
        f"  fds   peak {f['fds_peak']:>6}  (no sources: {f['reference_fds_peak']})"
        f"   threads peak {f['threads_peak']} (no sources: {f['reference_threads_peak']})"
    )
    print(f"  CPU   {f['cpu_percent']} % of a core (no sources: {f['reference_cpu_percent']} %)")
    counts = ", ".join(f"{k} {v:,}" for k, v in f["events_by_source"].items())
    print(f"  events at the central by source: {counts or 'none'}")
    if f["silent_sources"]:
        print(f"  sources that sent nothing: {', '.join(f['silent_sources'])}")
    print(f"  goal RSS <= {f['goal_rss_mib']:.0f} MiB: {verdict(f['goal_met'])}")
