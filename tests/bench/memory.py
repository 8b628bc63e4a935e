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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.bench.goals import emulated, judge, verdict

if TYPE_CHECKING:
    from simulators.rig.store import RigLoad, StoreRig

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


def run_sampled(
    argv: list[str],
    config: Path,
    env: dict[str, str],
    seconds: float,
    interval: float,
    log: Path,
    *,
    at_load: Callable[[], bool] | None = None,
) -> tuple[list[Sample], float]:
    """Run ``argv run --config`` until ``seconds`` after its READY=1 (and ``at_load()``
    true, when given); its samples from exec on, and when (seconds from exec) the window
    began.  The window counts from there, not exec: on a slow box (a Pi, an emulated
    root) the start alone can take longer than a quick run's window."""
    notify = log.with_suffix(".notify")
    notify.unlink(missing_ok=True)
    with (
        log.open("wb") as out,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        sock.bind(str(notify))
        sock.setblocking(False)
        proc = subprocess.Popen(
            [*argv, "run", "--config", str(config)],
            env={**env, "NOTIFY_SOCKET": str(notify)}, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
        samples: list[Sample] = []
        t0 = time.monotonic()
        end = t0 + READY_LIMIT_S  # until READY=1 comes (and the load is on)
        ready = loaded = False
        load_t = 0.0
        try:
            while time.monotonic() < end:
                ready = ready or _ready(sock)
                if ready and not loaded and (at_load is None or at_load()):
                    now = time.monotonic()
                    loaded, end, load_t = True, now + seconds, round(now - t0, 3)
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
            stop(proc)
    return samples, load_t


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL after 15 s."""
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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
def busy_store(quick: bool) -> RigLoad:
    from simulators.rig.store import RigLoad

    return RigLoad(
        ble_speed=4.0,
        camera_decode_fps=30.0,
        till_interval_s=1.0,
        synthetic_rate=200.0 if quick else 1000.0,
        synthetic_cards=200,
    )


SOURCES = ("till-2-card", "entrance-ble", "kiosk-cam", "till-2-printer", "bulk-cards")
CAMERA_SOURCE = "kiosk-cam"


def _without_sources(text: str) -> str:
    head, sep, _ = text.partition("\n[[sources]]")
    if not sep:
        raise ValueError("the rig's config has no [[sources]]")
    return head + "\n"


def without_camera(config: str) -> str:
    """The rig's config with its ``kind = "camera"`` source left out."""
    head, *blocks = config.split("\n[[sources]]")
    kept = [b for b in blocks if 'kind = "camera"' not in b]
    if len(kept) != len(blocks) - 1:
        raise ValueError("expected exactly one camera source in the rig's config")
    return "\n[[sources]]".join([head, *kept])


@dataclass(frozen=True)
class AtLoad:
    """The store rig running a busy store, and the daemon's configs for it."""

    rig: StoreRig
    config: Path  # every source (but the camera, without it)
    reference: Path  # the same config with no sources
    sources: tuple[str, ...]  # the sources expected at the central

    def sample(
        self, argv: list[str], work: Path, *, seconds: float, ref_seconds: float, interval: float
    ) -> LoadRun:
        """The reference run, then the daemon sampled for ``seconds`` from when every
        source has reached the central."""
        env = self.rig.env()
        ref, _ = run_sampled(
            argv, self.reference, env, ref_seconds, interval, work / "reference.log"
        )
        before = len(self.rig.central_events())

        def at_load() -> bool:  # every source has reached the central
            sources = {e.get("source") for e in self.rig.central_events()[before:]}
            return sources.issuperset(self.sources)

        samples, load_t = run_sampled(
            argv, self.config, env, seconds, interval, work / "gateway.log", at_load=at_load
        )
        time.sleep(1.0)  # the last batches reach the central
        events = self.rig.central_events()[before:]
        by_source = Counter(str(e.get("source", "?")) for e in events)
        return LoadRun(samples, ref, load_t, by_source, self.sources)


@dataclass(frozen=True)
class LoadRun:
    samples: list[Sample]
    reference: list[Sample]
    load_s: float  # exec to every source at the central
    by_source: Counter[str]
    sources: tuple[str, ...]

    @property
    def silent(self) -> list[str]:
        return [s for s in self.sources if self.by_source[s] == 0]


@contextmanager
def store_at_load(work: Path, quick: bool, *, camera: bool = True) -> Iterator[AtLoad]:
    """The whole simulated store at a busy store's rates (without its camera: the camera
    simulator stopped and its source left out of the config)."""
    from simulators.rig.store import StoreRig

    with StoreRig(work / "rig", busy_store(quick)) as rig:
        text = rig.config_text()
        sources: tuple[str, ...] = SOURCES
        if not camera:
            rig.stop("camera")  # no camera source: its simulator would only take CPU
            text = without_camera(text)
            sources = tuple(s for s in SOURCES if s != CAMERA_SOURCE)
        config = work / "rig" / "gateway.toml"
        config.write_text(text, encoding="utf-8")
        reference = work / "reference.toml"
        reference.write_text(_without_sources(text), encoding="utf-8")
        yield AtLoad(rig, config, reference, sources)


def samples_table(samples: list[Sample]) -> list[list[float]]:
    """``samples`` as rows of ``SAMPLE_COLUMNS``."""
    return [[s.t, s.rss_mib, s.fds, s.threads, round(s.cpu_s, 2)] for s in samples]


SAMPLE_COLUMNS = ["t_s", "rss_mib", "fds", "threads", "cpu_s"]
DAEMON = [sys.executable, "-m", "gateway"]  # from this checkout


def bench_memory(quick: bool = False) -> dict[str, Any]:
    seconds, interval = (12.0, 0.5) if quick else (90.0, 1.0)
    ref_seconds = 4.0 if quick else 15.0
    with tempfile.TemporaryDirectory(prefix="tp-bench-mem-") as d:
        work = Path(d)
        with store_at_load(work, quick) as store:
            run = store.sample(
                DAEMON, work, seconds=seconds, ref_seconds=ref_seconds, interval=interval
            )
    ours, reference = summarise(run.samples), summarise(run.reference)
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
        "load_s": run.load_s,
        "events_by_source": dict(sorted(run.by_source.items())),
        "silent_sources": run.silent,
        "goal_rss_mib": GOAL_RSS_MIB,
        "emulated": emulated(),
        "goal_met": judge(ours["rss_peak_mib"] <= GOAL_RSS_MIB),  # None when emulated
        "samples": samples_table(run.samples),
        "reference_samples": samples_table(run.reference),
        "sample_columns": SAMPLE_COLUMNS,
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
