"""``python -m tests.bench drain``: a backlog, start-up and memory.

- backlog drain: N events are buffered through the real pipeline while the broker is
  unreachable; then a fresh daemon instance connects and drains them to a local
  mosquitto, timed until the buffer is empty.  Reference, same run: the same rows read
  from the same kind of database and published with plain paho at the same window,
  deleted on PUBACK (no gateway logic);
- start-up: ``touchpoint-gateway run`` as a process, from exec to ``READY=1`` on a
  notify socket (Python start-up, imports, config, buffer migration included), on the
  drained database;
- memory: the daemon process's RSS after running a synthetic source at load.
"""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config.credentials import write_secret
from gateway.contract.events import batch_payload, batch_prefix
from tests.bench.pipeline import KEY, WINDOW, _gateway, run_until

DEADLINE_S = 300.0  # a benchmark that cannot finish says so instead of hanging


async def _fill(gw: Any, n: int) -> float:
    return await run_until(gw, "events_buffered_total", n, poll_s=0.05, deadline_s=DEADLINE_S)


async def _drain(gw: Any, n: int) -> float:
    return await run_until(gw, "events_forwarded_total", n, poll_s=0.01, deadline_s=DEADLINE_S)


def _reference_drain(db: Path, port: int) -> tuple[int, float]:
    """Plain paho over the same stored chunks: read, publish (same window), delete."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous = FULL")
    prefix = batch_prefix("bench", "ref", "00112233aabbccdd")
    window = threading.Semaphore(WINDOW)
    # The callback only enqueues: paho holds its own message lock while it calls
    # on_publish, so a lock of ours taken there and around publish() deadlocks.
    acked: queue.SimpleQueue[int] = queue.SimpleQueue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    los: dict[int, int] = {}

    def on_publish(c: Any, u: Any, mid: int, rc: Any, p: Any) -> None:
        acked.put(mid)
        window.release()

    def settled() -> list[tuple[int]]:
        out = []
        while not acked.empty():
            out.append((los.pop(acked.get()),))
        return out

    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    n = 0
    t0 = time.perf_counter()
    for lo, count, body in conn.execute("SELECT lo, n, body FROM chunks ORDER BY lo").fetchall():
        if not window.acquire(timeout=DEADLINE_S):
            raise RuntimeError("reference: no PUBACK within the deadline")
        info = client.publish("bench/ref/events", batch_payload(prefix, [body]), qos=1)
        los[info.mid] = lo  # before settled() can look for it
        n += count
        done = settled()
        if done:
            conn.executemany("DELETE FROM chunks WHERE lo = ?", done)
    for _ in range(WINDOW):
        if not window.acquire(timeout=DEADLINE_S):
            raise RuntimeError("reference: no PUBACK within the deadline")
    conn.executemany("DELETE FROM chunks WHERE lo = ?", settled())
    elapsed = time.perf_counter() - t0
    client.disconnect()
    client.loop_stop()
    conn.close()
    return n, elapsed


def _config_text(port: int, sources: str = "") -> str:
    return (
        '[gateway]\nstore = "bench"\ndevice = "gw-01"\n'
        '[keyring]\nactive = "k1"\n[keyring.keys]\nk1 = "k1.key"\n'
        f'[buffer]\npath = "buffer.db"\n[mqtt]\nhost = "127.0.0.1"\nport = {port}\n' + sources
    )


def startup_to_ready(work: Path, port: int) -> float:
    """Seconds from exec of ``touchpoint-gateway run`` to READY=1 on a notify socket."""
    write_secret(work / "k1.key", KEY)
    (work / "gateway.toml").write_text(_config_text(port), encoding="utf-8")
    path = str(work / "notify.sock")
    Path(path).unlink(missing_ok=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(30)
        env = {**os.environ, "NOTIFY_SOCKET": path}
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(work / "gateway.toml")],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            while b"READY=1" not in sock.recv(4096):
                pass
            elapsed = time.perf_counter() - t0
        finally:
            proc.terminate()
            proc.wait(10)
    return elapsed


def rss_at_load(work: Path, port: int, rate: float, seconds: float) -> float:
    """MiB of resident memory of the daemon process after ``seconds`` at ``rate``."""
    work.mkdir(parents=True, exist_ok=True)
    write_secret(work / "k1.key", KEY)
    sources = f'[[sources]]\nkind = "synthetic"\nname = "load"\nrate_per_s = {rate}\ncards = 500\n'
    (work / "gateway.toml").write_text(_config_text(port, sources), encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(work / "gateway.toml")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(seconds)
        status = Path(f"/proc/{proc.pid}/status").read_text(encoding="ascii")
        kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    finally:
        proc.terminate()
        proc.wait(10)
    return kib / 1024


def bench_drain(quick: bool = False) -> dict[str, Any]:
    from simulators.infra.broker import Mosquitto, free_port

    n = 100_000 if quick else 1_000_000
    with tempfile.TemporaryDirectory(prefix="tp-drain-") as d:
        work = Path(d)
        offline = free_port()  # nothing listens: the events stay buffered
        gw, _ = _gateway(work / "ours", offline, n, None)
        fill_s = asyncio.run(_fill(gw, n))
        ref_gw, _ = _gateway(work / "ref", offline, n, None)
        asyncio.run(_fill(ref_gw, n))
        with Mosquitto(work / "mq") as broker:
            ref_n, ref_s = _reference_drain(work / "ref" / "buffer.db", broker.port)
            gw2, _ = _gateway(work / "ours", broker.port, 0, None)
            drain_s = asyncio.run(_drain(gw2, n))
            ready_s = min(startup_to_ready(work / "ours", broker.port) for _ in range(3))
            rss = rss_at_load(work / "rss", broker.port, 5000, 5 if quick else 20)
    return {
        "benchmark": "drain",
        "events": n,
        "fill_events_per_s": round(n / fill_s),
        "drain_s": round(drain_s, 2),
        "drain_events_per_s": round(n / drain_s),
        "reference_drain_s": round(ref_s, 2),
        "reference_events_per_s": round(ref_n / ref_s),
        "ratio": round((n / drain_s) / (ref_n / ref_s), 3),
        "start_to_ready_s": round(ready_s, 3),
        "rss_mib_at_5000_per_s": round(rss, 1),
    }


def print_drain(f: dict[str, Any]) -> None:
    print(f"backlog drain of {f['events']:,} buffered events to a local mosquitto")
    print(f"  ours        {f['drain_s']:>7} s  {f['drain_events_per_s']:>10,} events/s")
    print(
        f"  reference   {f['reference_drain_s']:>7} s  {f['reference_events_per_s']:>10,} events/s"
        f"  (same chunks, plain paho)   ratio {f['ratio']}"
    )
    print(f"  (filled through the pipeline at {f['fill_events_per_s']:,} events/s)")
    print(f"start to READY (process exec -> READY=1)  {f['start_to_ready_s']} s")
    print(f"daemon RSS with a synthetic source at 5,000 events/s  {f['rss_mib_at_5000_per_s']} MiB")
