"""``python -m tests.bench wear``: bytes reaching the block device per event.

How it is measured: a 512 MiB file is attached to a loop device (``losetup``), formatted
ext4 (default options: ordered data, 5 s journal commit; inode tables
initialised by mkfs, not lazily during the runs) and mounted; the real daemon
(``Gateway``: consent gate, outbox, forwarder, paho) keeps its buffer there and forwards
to a local mosquitto (its persistence off, not on the device).  A paced source feeds
it at 0, 10, 100 and 1,000 events/s.  After a warm-up the filesystem is synced and the
device's counters are read from ``/sys/block/loopN/stat`` (sectors written, flush
requests); after the measured run the filesystem is synced again (so dirty pages the
kernel would write later are counted) and read again.  Bytes per event are sectors
written x 512 / events buffered in the run.  Flushes per second are the cache flushes
the device received (each fsync on ext4: the data, the journal commit).

The floor beside each rate is what the chosen durability window must write at least:
the event's payload once, and one page per commit (one commit per window, or per event
when events come slower than that).  The idle figure is the device's bytes written
while the daemon runs with no events, scaled to an hour; its goal is 0.

Needs root (losetup, mount); elsewhere it says so and exits non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from gateway.app.daemon import Gateway
from gateway.config.credentials import write_secret
from gateway.config.loading import parse_config
from gateway.config.sections import BufferConfig
from gateway.contract.events import event_tail, with_seq
from gateway.ports import Reading
from tests.bench.pipeline import KEY, SUBJECTS

RATES = (10, 100, 1000)
PAGE = 4096
GOALS_B = {10: 2048, 100: 512, 1000: 256}  # bytes per event, issue 16
IMAGE_BYTES = 512 * 1024 * 1024


class WearUnavailable(RuntimeError):
    """The loop device cannot be set up here (not root, no losetup or no loop devices)."""


@contextlib.contextmanager
def loop_filesystem(work: Path) -> Iterator[tuple[Path, str]]:
    """A fresh ext4 on a loop device, mounted: (mount point, device name like loop3)."""
    image, mnt = work / "disk.img", work / "mnt"
    mnt.mkdir(parents=True, exist_ok=True)
    with image.open("wb") as f:
        f.truncate(IMAGE_BYTES)

    def run(*argv: str) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=120)
        except (OSError, subprocess.CalledProcessError) as exc:
            err = getattr(exc, "stderr", "") or exc
            raise WearUnavailable(f"{' '.join(argv)}: {err}".strip()) from exc
        return done.stdout.strip()

    dev = run("losetup", "--find", "--show", str(image))
    try:
        # inode tables and journal zeroed now, not by a kernel thread during the runs
        run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
        run("mount", "-t", "ext4", dev, str(mnt))
        try:
            yield mnt, Path(dev).name
        finally:
            run("umount", str(mnt))
    finally:
        run("losetup", "--detach", dev)


def device_counters(name: str) -> tuple[int, int]:
    """(bytes written, flush requests) of a block device, from /sys/block/NAME/stat."""
    fields = [int(x) for x in Path(f"/sys/block/{name}/stat").read_text().split()]
    flushes = fields[15] if len(fields) > 15 else 0
    return fields[6] * 512, flushes


def syncfs(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        subprocess.run(["sync", "-f", str(path)], check=True)
    finally:
        os.close(fd)


class PacedSource:
    """Card reads at a fixed rate (``rate`` 0: none at all), spread evenly."""

    def __init__(self, subjects: list[str], rate: float) -> None:
        self.name = "bench"
        self.rate = rate
        self.subjects = subjects

    async def readings(self) -> AsyncIterator[Reading]:
        attrs = {"lane": "till-1", "reader": "scanner"}
        if self.rate <= 0:
            await asyncio.Event().wait()
        tick = max(0.005, 1.0 / self.rate)
        per_tick = self.rate * tick
        due, i, owed = time.monotonic(), 0, 0.0
        while True:
            owed += per_tick
            while owed >= 1.0:
                owed -= 1.0
                subject = self.subjects[i % len(self.subjects)]
                yield Reading("card.read", "bench", time.time(), subject, attrs)
                i += 1
            due += tick
            await asyncio.sleep(max(0.0, due - time.monotonic()))


def _config(work: Path, port: int, buffer: dict[str, Any]) -> Any:
    write_secret(work / "k1.key", KEY)
    raw = {
        "gateway": {"store": "bench", "device": "gw-01"},
        "keyring": {"active": "k1", "keys": {"k1": "k1.key"}},
        "buffer": {"path": "buffer.db", **buffer},
        "mqtt": {"host": "127.0.0.1", "port": port},
    }
    return parse_config(raw, "bench", work)


async def _measure(
    gw: Gateway, mnt: Path, dev: str, warmup_s: float, seconds: float
) -> dict[str, float]:
    task = asyncio.create_task(gw.run(install_signals=False))
    await gw.ready.wait()
    assert gw.publisher is not None
    await gw.publisher.wait_connected()
    await asyncio.sleep(warmup_s)
    await asyncio.to_thread(syncfs, mnt)
    b0, f0 = device_counters(dev)
    e0 = gw.metrics.get("events_buffered_total")
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    e1 = gw.metrics.get("events_buffered_total")
    await asyncio.to_thread(syncfs, mnt)
    b1, f1 = device_counters(dev)
    elapsed = time.monotonic() - t0
    forwarded = gw.metrics.get("events_forwarded_total")
    gw.stop_event.set()
    await task
    if task.done() and task.exception() is not None:
        raise RuntimeError("the gateway stopped early") from task.exception()
    return {
        "events": e1 - e0,
        "bytes": b1 - b0,
        "flushes": f1 - f0,
        "seconds": elapsed,
        "forwarded": forwarded,
    }


def payload_bytes(subject: str) -> int:
    """One event's JSON as stored and sent (seq of six digits)."""
    tail = event_tail(
        type_="card.read",
        at=time.time(),
        source="bench",
        subject=subject,
        purposes=["linking"],
        attrs={"lane": "till-1", "reader": "scanner"},
    )
    return len(with_seq(123456, tail).encode())


def window_of(buffer: dict[str, Any]) -> float:
    """The durability window in force (ms): the setting, else the group commit's."""
    cfg = BufferConfig.model_validate({"path": "x", **buffer})
    window = getattr(cfg, "durability_window_ms", 0.0)
    return float(window or cfg.commit_interval_ms)


def floor_per_event(rate: float, payload: int, window_ms: float) -> float:
    """Payload once, and one page per commit (a commit per window, at most per event)."""
    commits_per_s = min(rate, 1000.0 / window_ms) if window_ms > 0 else rate
    return payload + PAGE * commits_per_s / rate


def bench_wear(quick: bool = False, buffer: dict[str, Any] | None = None) -> dict[str, Any]:
    from simulators.infra.broker import Mosquitto

    if os.geteuid() != 0:
        raise WearUnavailable("bench wear needs root (losetup and mount of a loop device)")
    buffer = dict(buffer or {})
    seconds = 20.0 if quick else 60.0
    idle_s = 30.0 if quick else 120.0
    # the WAL reaches its working size (wal_autocheckpoint) and is then overwritten in
    # place: the warm-up lets it get there, so the run shows the steady state
    warmup_s = 15.0 if quick else 30.0
    window_ms = window_of(buffer)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tp-wear-", dir="/var/tmp") as d:
        work = Path(d)
        with Mosquitto(work / "mq") as broker, loop_filesystem(work) as (mnt, dev):
            payload = 0
            for rate in (0, *RATES):
                run_dir = mnt / f"rate-{rate}"
                run_dir.mkdir()
                cfg = _config(run_dir, broker.port, buffer)
                probe = Gateway(cfg)
                subjects = [
                    probe.keyring.pseudonym("loyalty", f"2600{i:09d}") for i in range(SUBJECTS)
                ]
                payload = payload_bytes(subjects[0])
                records = [
                    {"subject": s, "purposes": ["linking"], "expires": None} for s in subjects
                ]
                seed = run_dir / "seed.json"
                seed.write_text(json.dumps({"records": records}))
                consent = cfg.consent.model_copy(update={"seed_file": seed})
                cfg = cfg.model_copy(update={"consent": consent})
                gw = Gateway(cfg, sources=[PacedSource(subjects, rate)])
                m = asyncio.run(_measure(gw, mnt, dev, warmup_s, idle_s if rate == 0 else seconds))
                row: dict[str, Any] = {
                    "rate_per_s": rate,
                    "seconds": round(m["seconds"], 1),
                    "events": int(m["events"]),
                    "device_bytes": int(m["bytes"]),
                    "flushes_per_s": round(m["flushes"] / m["seconds"], 1),
                }
                if rate == 0:
                    row["bytes_per_hour"] = round(m["bytes"] * 3600 / m["seconds"])
                    row["goal_bytes_per_hour"] = 0
                else:
                    per_event = m["bytes"] / max(1.0, m["events"])
                    row["bytes_per_event"] = round(per_event)
                    row["amplification"] = round(per_event / payload, 1)
                    row["floor_bytes_per_event"] = round(floor_per_event(rate, payload, window_ms))
                    row["goal_bytes_per_event"] = GOALS_B[rate]
                rows.append(row)
    return {
        "benchmark": "wear",
        "method": (
            "ext4 (defaults) on a loop device; /sys/block/loopN/stat sectors written and "
            "flush requests between two syncfs, around a run of the real daemon at each rate"
        ),
        "durability_window_ms": window_ms,
        "payload_bytes": payload,
        "page_bytes": PAGE,
        "rates": rows,
    }


def print_wear(f: dict[str, Any]) -> None:
    print(f"wear benchmark: bytes reaching the block device ({f['method']})")
    print(
        f"  payload {f['payload_bytes']} B/event; durability window {f['durability_window_ms']} ms;"
        f" floor = payload + one {f['page_bytes']} B page per commit"
    )
    print(f"  {'rate':>8} {'bytes/event':>12} {'floor':>8} {'goal':>8} {'flushes/s':>10}")
    for r in f["rates"]:
        if r["rate_per_s"] == 0:
            print(
                f"  {'idle':>8} {r['bytes_per_hour']:>10,} B/h {'0':>8} {'0 B/h':>8}"
                f" {r['flushes_per_s']:>10}"
            )
        else:
            print(
                f"  {r['rate_per_s']:>6}/s {r['bytes_per_event']:>12,}"
                f" {r['floor_bytes_per_event']:>8,} {r['goal_bytes_per_event']:>8,}"
                f" {r['flushes_per_s']:>10}"
            )
