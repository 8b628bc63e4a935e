"""A fleet of real gateways against one mosquitto: restart the broker, measure the
reconnect storm, and check that nothing committed is lost.

Each worker process (``tests.fleet.fleet_harness``) runs several real ``Gateway`` objects,
built from a TOML file as ``touchpoint-gateway run`` builds them; see that module for why
this is the daemon's code path.  Ground truth per gateway is its own buffer: seqs are
assigned contiguously in commit order, so its stream holds exactly 1..last_seq, and the
central must hold every one of them.

The reconnect time of a gateway is the time from the broker's start (the restart) to the
gateway's first successful CONNACK after it, stamped by a ``PahoPublisher.on_connect``
hook.  A gateway that is sleeping in its backoff when the broker comes back tries again
within at most ``reconnect_max_s`` (full jitter: each wait is uniform in
[reconnect_min_s / 2, min(reconnect_max_s, reconnect_min_s * 2**attempt)]), so every
gateway must be back within ``reconnect_max_s`` plus a slack for the connect itself on a
loaded 2-core box; and the times must be spread over that interval, not one spike.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from simulators.central.service import Central
from simulators.infra.broker import Mosquitto

ROOT = Path(__file__).resolve().parents[2]
SLACK_S = 3.0  # connect + CONNACK + event-loop latency with the whole fleet on 2 cores


@dataclass
class FleetRun:
    gateways: list[dict[str, Any]]
    reconnect_s: list[float]
    central: dict[str, Any]
    missing: dict[str, int]
    extra: int
    runtime_s: float
    report: dict[str, Any]


def _states(workdir: Path, firsts: list[int], kind: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for first in firsts:
        path = workdir / f"{kind}-{first}.json"
        with contextlib.suppress(FileNotFoundError, ValueError):
            out += json.loads(path.read_text(encoding="utf-8"))["gateways"]
    return out


def _wait(predicate: Any, timeout: float, what: str, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-1500:]}" for p in logs)
    raise TimeoutError(f"{what} not within {timeout}s\n{tails}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def histogram(values: list[float], width: float) -> dict[str, int]:
    bins: dict[str, int] = {}
    for v in sorted(values):
        lo = int(v // width) * width
        key = f"{lo:.1f}-{lo + width:.1f}s"
        bins[key] = bins.get(key, 0) + 1
    return bins


def run_fleet(
    tmp: Path,
    *,
    gateways: int,
    per_process: int,
    rate: float,
    reconnect_min: float,
    reconnect_max: float,
    warmup_s: float,
    outage_s: float,
    after_s: float,
) -> FleetRun:
    started = time.monotonic()
    workdir = tmp / "fleet"
    workdir.mkdir(parents=True)
    firsts = list(range(0, gateways, per_process))
    logs = [tmp / f"worker-{first}.log" for first in firsts]
    procs: list[subprocess.Popen[bytes]] = []
    with Mosquitto(tmp / "mq", persistence=True) as broker:
        central = Central("127.0.0.1", broker.port, out=tmp / "central.jsonl")
        central.start()
        try:
            assert central.wait_subscribed(10)

            def worker_args(first: int) -> list[str]:
                count = min(per_process, gateways - first)
                return [
                    f"--port={broker.port}",
                    f"--workdir={workdir}",
                    f"--first={first}",
                    f"--count={count}",
                    f"--rate={rate}",
                    f"--reconnect-min={reconnect_min}",
                    f"--reconnect-max={reconnect_max}",
                ]

            for first, log in zip(firsts, logs, strict=True):
                with log.open("wb") as out:
                    procs.append(
                        subprocess.Popen(
                            [
                                sys.executable,
                                "-m",
                                "tests.fleet.fleet_harness",
                                *worker_args(first),
                            ],
                            cwd=ROOT,
                            stdout=out,
                            stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                        )
                    )

            def all_connected() -> bool:
                states = _states(workdir, firsts, "state")
                return len(states) == gateways and all(g["connected"] for g in states)

            _wait(all_connected, 60 + gateways * 0.1, "every gateway connected", logs)
            time.sleep(warmup_s)

            broker.stop()  # a clean stop: mosquitto saves the central's session
            down_at = time.time()
            time.sleep(outage_s)
            up_at = time.time()  # the restart: from here a connect can succeed
            broker.start()
            listening_s = time.time() - up_at

            def all_back() -> bool:
                states = _states(workdir, firsts, "state")
                return all(any(t > down_at for t in g["connects"]) for g in states)

            _wait(all_back, reconnect_max + SLACK_S + 30, "every gateway reconnected", logs)
            time.sleep(after_s)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            codes = []
            for proc in procs:
                try:
                    codes.append(proc.wait(timeout=60))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    codes.append(proc.wait())
            results = _states(workdir, firsts, "result")
            expected = sum(g.get("buffer", {}).get("last_seq", 0) for g in results)
            with contextlib.suppress(TimeoutError):
                central.wait_for(lambda s: s["accepted"] >= expected, timeout=30)
            central.stop()
            keys = central.accepted_keys()
            cstats = central.stats()
    assert codes == [0] * len(procs), f"worker exit codes {codes}; see {logs}"
    assert len(results) == gateways

    missing: dict[str, int] = {}
    extra = 0
    by_stream: dict[tuple[str, str, str], set[int]] = {}
    for store, device, stream, seq in keys:
        by_stream.setdefault((store, device, stream), set()).add(seq)
    for g in results:
        buf = g["buffer"]
        got = by_stream.get((g["store"], g["device"], buf["stream"]), set())
        want = set(range(1, buf["last_seq"] + 1))
        if want - got:
            missing[f"{g['store']}/{g['device']}"] = len(want - got)
        extra += len(got - want)

    reconnect = [min(t for t in g["connects"] if t > down_at) - up_at for g in results]
    runtime = time.monotonic() - started
    report = {
        "gateways": gateways,
        "processes": len(procs),
        "rate_per_gateway": rate,
        "reconnect_min_s": reconnect_min,
        "reconnect_max_s": reconnect_max,
        "outage_s": outage_s,
        "broker_listening_after_s": round(listening_s, 3),
        "reconnect_s": {
            "min": round(min(reconnect), 3),
            "median": round(statistics.median(reconnect), 3),
            "p95": round(percentile(reconnect, 0.95), 3),
            "max": round(max(reconnect), 3),
            "stdev": round(statistics.pstdev(reconnect), 3),
        },
        "histogram_0.5s": histogram(reconnect, 0.5),
        "committed_events": sum(g["buffer"]["last_seq"] for g in results),
        "central_accepted": cstats["accepted"],
        "central_duplicates": cstats["duplicates"],
        "central_invalid": cstats["invalid_total"],
        "missing": missing,
        "dead_letters": sum(g["buffer"]["dead_letters"] for g in results),
        "left_in_buffers": sum(g["buffer"]["depth"] for g in results),
        "connect_failures_total": sum(g["mqtt_connect_failures_total"] for g in results),
        "runtime_s": round(runtime, 1),
    }
    (tmp / "fleet-report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print("\nfleet report:", json.dumps(report, indent=2))
    return FleetRun(results, reconnect, cstats, missing, extra, runtime, report)


def check_fleet(run: FleetRun, *, reconnect_max: float) -> None:
    r = run.report
    # Nothing lost: every committed event of every gateway reached the central.
    assert not run.missing, f"events never reached the central: {run.missing}"
    assert run.extra == 0, "the central holds events that were never committed"
    assert r["central_invalid"] == 0, run.central["invalid"]
    assert r["dead_letters"] == 0 and r["left_in_buffers"] == 0
    assert r["committed_events"] > 0
    # Every gateway saw the restart and came back within the bound the config gives.
    assert all(g["mqtt_reconnects_total"] >= 1 for g in run.gateways)
    bound = reconnect_max + SLACK_S
    assert max(run.reconnect_s) <= bound, f"a gateway took longer than {bound}s: {r}"
    # Full jitter spreads the storm over the backoff interval: not one spike.
    spread = max(run.reconnect_s) - min(run.reconnect_s)
    assert spread >= 0.25 * reconnect_max, f"reconnects bunched within {spread:.3f}s: {r}"
    assert len(r["histogram_0.5s"]) >= 3, r["histogram_0.5s"]


def test_fleet_of_20_survives_a_broker_restart(tmp_path: Path) -> None:
    run = run_fleet(
        tmp_path,
        gateways=20,
        per_process=10,
        rate=5,
        reconnect_min=0.5,
        reconnect_max=4.0,
        warmup_s=2.0,
        outage_s=3.0,
        after_s=2.0,
    )
    check_fleet(run, reconnect_max=4.0)


@pytest.mark.slow
def test_fleet_of_200_survives_a_broker_restart(tmp_path: Path) -> None:
    run = run_fleet(
        tmp_path,
        gateways=200,
        per_process=25,
        rate=2,
        reconnect_min=0.5,
        reconnect_max=5.0,
        warmup_s=5.0,
        outage_s=5.0,
        after_s=3.0,
    )
    check_fleet(run, reconnect_max=5.0)
    assert run.runtime_s < 180
