"""``python -m tests.bench pipeline``: the real pipeline beside a bare reference.

- ours: an in-process source pushes N events through consent gate, outbox (SQLite,
  synchronous=FULL, group commit), forwarder and paho to a local mosquitto, until every
  PUBACK is in and every row deleted;
- reference, in the same run: the same events written to SQLite in batches, published
  with plain paho at the same window and batch size, and deleted on PUBACK — no gateway
  logic;
- latency: capture -> PUBACK at a fixed moderate rate (p50 / p99);
- WAN: throughput through a loopback proxy adding 20 ms of round trip, beside the
  window x batch / RTT limit.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.app.daemon import Gateway
from gateway.config.credentials import write_secret
from gateway.config.loading import parse_config
from gateway.contract.events import batch_payload, batch_prefix, event_tail, with_seq
from gateway.ports import Reading

KEY = "Ok41XFEl/DeKy6pux3hFfJerdJWtAhOlimOtK81inSo="  # a bench key, not the published one
SUBJECTS = 200
WINDOW, BATCH = 20, 500
DEADLINE_S = 300.0  # a reference that gets no PUBACK says so instead of hanging


class _Source:
    """Yields prepared readings as fast as the pipeline takes them, or at a fixed rate."""

    def __init__(self, readings: list[Reading], rate: float | None = None) -> None:
        self.name = "bench"
        self._readings = readings
        self._rate = rate

    async def readings(self) -> AsyncIterator[Reading]:
        if self._rate is None:
            for r in self._readings:
                yield r
        else:
            tick = 0.005
            per_tick = max(1, int(self._rate * tick))
            next_t = time.monotonic()
            for i in range(0, len(self._readings), per_tick):
                now = time.time()
                for r in self._readings[i : i + per_tick]:
                    yield Reading(r.type, r.source, now, r.subject, r.attrs)
                next_t += tick
                await asyncio.sleep(max(0.0, next_t - time.monotonic()))
        await asyncio.Event().wait()  # a source runs until cancelled


def _gateway(work: Path, port: int, n: int, rate: float | None) -> tuple[Gateway, int]:
    work.mkdir(parents=True, exist_ok=True)
    write_secret(work / "k1.key", KEY)
    cfg = parse_config(
        {
            "gateway": {"store": "bench", "device": "gw-01"},
            "keyring": {"active": "k1", "keys": {"k1": "k1.key"}},
            "buffer": {"path": "buffer.db"},
            "mqtt": {
                "host": "127.0.0.1",
                "port": port,
                "inflight_window": WINDOW,
                "batch_max_events": BATCH,
            },
        },
        "bench",
        work,
    )
    probe = Gateway(cfg)
    subjects = [probe.keyring.pseudonym("loyalty", f"2600{i:09d}") for i in range(SUBJECTS)]
    records = [{"subject": s, "purposes": ["linking"], "expires": None} for s in subjects]
    (work / "seed.json").write_text(json.dumps({"records": records}), encoding="utf-8")
    cfg = cfg.model_copy(
        update={"consent": cfg.consent.model_copy(update={"seed_file": work / "seed.json"})}
    )
    now = time.time()
    attrs = {"lane": "till-1", "reader": "scanner"}
    readings = [Reading("card.read", "bench", now, subjects[i % SUBJECTS], attrs) for i in range(n)]
    gw = Gateway(cfg, sources=[_Source(readings, rate)])
    return gw, n


async def run_until(
    gw: Gateway,
    metric: str,
    n: int,
    *,
    poll_s: float,
    deadline_s: float | None = None,
    connected: bool = False,
) -> float:
    """Run the gateway until its counter ``metric`` reaches ``n`` (RuntimeError if the
    gateway stops first, or ``deadline_s`` passes); the seconds from READY (and, with
    ``connected``, the broker connection) to there.  The gateway is stopped after."""
    task = asyncio.create_task(gw.run(install_signals=False))
    try:
        await gw.ready.wait()
        if connected:
            assert gw.publisher is not None
            await gw.publisher.wait_connected()
        t0 = time.perf_counter()
        while gw.metrics.get(metric) < n:
            if deadline_s is not None and time.perf_counter() - t0 > deadline_s:
                raise RuntimeError(f"{metric} did not reach {n} in {deadline_s}s")
            if task.done():
                task.result()
                raise RuntimeError("the gateway stopped early")
            await asyncio.sleep(poll_s)
        return time.perf_counter() - t0
    finally:
        gw.stop_event.set()
        await task


def run_ours(work: Path, port: int, n: int, rate: float | None = None) -> tuple[float, list[float]]:
    gw, n = _gateway(work, port, n, rate)
    gw.latencies = []
    elapsed = asyncio.run(run_until(gw, "events_forwarded_total", n, poll_s=0.002, connected=True))
    return n / elapsed, gw.latencies


def run_reference(work: Path, port: int, n: int) -> float:
    """SQLite batches -> plain paho QoS 1 (same window and batch) -> delete on PUBACK."""
    work.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(work / "ref.db", isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, body TEXT)")
    tail = event_tail(
        type_="card.read",
        at=time.time(),
        source="bench",
        subject="k1:y12r74-dyodquqc6XBqP4A",
        purposes=["linking"],
        attrs={"lane": "till-1", "reader": "scanner"},
    )
    prefix = batch_prefix("bench", "ref", "00112233aabbccdd")
    window = threading.Semaphore(WINDOW)
    # The callback only enqueues: paho holds its own message lock while it calls
    # on_publish, so a lock of ours taken there and around publish() deadlocks.
    acked: queue.SimpleQueue[int] = queue.SimpleQueue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    ranges: dict[int, tuple[int, int]] = {}

    def on_publish(c: Any, u: Any, mid: int, rc: Any, p: Any) -> None:
        acked.put(mid)
        window.release()

    def settled() -> list[tuple[int, int]]:
        out = []
        while not acked.empty():
            out.append(ranges.pop(acked.get()))
        return out

    client.on_publish = on_publish
    client.connect("127.0.0.1", port)
    client.loop_start()
    t0 = time.perf_counter()
    seq = 0
    while seq < n:
        lo = seq + 1
        rows = [(s, with_seq(s, tail)) for s in range(lo, min(n, seq + BATCH) + 1)]
        seq = rows[-1][0]
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO events VALUES (?, ?)", rows)
        conn.execute("COMMIT")
        if not window.acquire(timeout=DEADLINE_S):
            raise RuntimeError(f"reference: no PUBACK within {DEADLINE_S:.0f}s")
        info = client.publish(
            "bench/ref/events", batch_payload(prefix, [b for _, b in rows]), qos=1
        )
        ranges[info.mid] = (lo, seq)  # before settled() can look for it
        done = settled()
        if done:
            conn.execute("BEGIN")
            conn.executemany("DELETE FROM events WHERE seq BETWEEN ? AND ?", done)
            conn.execute("COMMIT")
    for _ in range(WINDOW):
        if not window.acquire(timeout=DEADLINE_S):
            raise RuntimeError(f"reference: no PUBACK within {DEADLINE_S:.0f}s")
    conn.execute("BEGIN")
    conn.executemany("DELETE FROM events WHERE seq BETWEEN ? AND ?", settled())
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - t0
    client.disconnect()
    client.loop_stop()
    conn.close()
    return n / elapsed


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return (
        statistics.quantiles(values, n=1000, method="inclusive")[int(q * 10) - 1]
        if len(values) > 1
        else values[0]
    )


def bench_pipeline(quick: bool = False) -> dict[str, Any]:
    from simulators.infra.broker import Mosquitto
    from simulators.infra.netproxy import NetProxy

    n = 50_000 if quick else 400_000
    with tempfile.TemporaryDirectory(prefix="tp-bench-") as d:
        work = Path(d)
        with Mosquitto(work / "mq") as broker:
            ref = run_reference(work / "ref", broker.port, n)
            ours, _ = run_ours(work / "ours", broker.port, n)
            rate = 1000.0
            _, lat = run_ours(
                work / "lat", broker.port, int(rate * (3 if quick else 10)), rate=rate
            )
            with NetProxy(broker.port, delay_s=0.010) as proxy:
                wan, _ = run_ours(work / "wan", proxy.port, n // 4)
    rtt = 0.020
    return {
        "benchmark": "pipeline",
        "events": n,
        "events_per_s": round(ours),
        "reference_events_per_s": round(ref),
        "ratio": round(ours / ref, 3),
        "p50_ms": round(_pct(lat, 50) * 1000, 2),
        "p99_ms": round(_pct(lat, 99) * 1000, 2),
        "latency_percentiles_ms": {
            str(q): round(_pct(lat, q) * 1000, 2) for q in (10, 25, 50, 75, 90, 95, 99, 99.9)
        }
        | {"100": round(max(lat, default=float("nan")) * 1000, 2)},
        "latency_samples": len(lat),
        "latency_rate_per_s": rate,
        "wan_rtt_ms": rtt * 1000,
        "wan_events_per_s": round(wan),
        "wan_limit_events_per_s": round(WINDOW * BATCH / rtt),
        "window": WINDOW,
        "batch_max_events": BATCH,
    }


def print_pipeline(f: dict[str, Any]) -> None:
    print(f"pipeline benchmark ({f['events']} events, window {WINDOW}, batch {BATCH})")
    print(f"  ours (durable, end to end)   {f['events_per_s']:>10,} events/s")
    print(f"  reference (SQLite + paho)    {f['reference_events_per_s']:>10,} events/s")
    print(f"  ratio                        {f['ratio']:>10}")
    print(
        f"  latency at {f['latency_rate_per_s']:.0f}/s capture->PUBACK"
        f"  p50 {f['p50_ms']} ms  p99 {f['p99_ms']} ms"
    )
    print(
        f"  through +{f['wan_rtt_ms']:.0f} ms RTT        {f['wan_events_per_s']:>10,} events/s"
        f"  (limit window x batch / RTT = {f['wan_limit_events_per_s']:,})"
    )
