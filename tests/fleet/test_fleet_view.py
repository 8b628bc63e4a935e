"""`touchpoint-gateway fleet`: IT's view of every gateway, from the retained status and
health messages on the broker.

The judgement is tested on messages (a pure function); the whole view against the fleet
rig: 200 real gateways in worker processes (tests/fleet/fleet_harness.py) on one
mosquitto, with failures injected at some stores, read by the real CLI in a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from gateway.observe.fleet import Fleet, judge, render_metrics, render_table
from simulators.infra.broker import Mosquitto, free_port
from tests.fleet.fleet_harness import identity

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_800_000_000.0


def ts(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def health(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "v": 1, "ts": ts(NOW - 5), "status": "ok", "problems": [], "problems_total": 0,
        "version": "0.1.0", "uptime_s": 100.0, "rss_bytes": 50 << 20, "key_id": "k1",
        "clock": {"state": "synchronized"}, "broker": {"connected": True, "reconnects": 0},
        "buffer": {"depth": 0, "oldest_age_s": None, "dead_letters": 0, "evicted": 0,
                   "expired": 0, "lost": {}, "last_write_ok": True},
        "sources": {"till": {"state": "ok", "last_reading_age_s": 0.5}},
        "consent": {"sync_age_s": 30.0}, "certificates": {},
    }  # fmt: skip
    doc.update(over)
    return doc


def fleet_of(**gateways: tuple[dict[str, Any] | None, dict[str, Any] | None]) -> Fleet:
    fleet = Fleet()
    for name, (status, hdoc) in gateways.items():
        store, device = name.split("__")
        if status is not None:
            fleet.update(f"touchpoint/v1/{store}/{device}/status", json.dumps(status).encode())
        if hdoc is not None:
            fleet.update(f"touchpoint/v1/{store}/{device}/health", json.dumps(hdoc).encode())
    return fleet


ONLINE = {"v": 1, "state": "online", "ts": ts(NOW - 100), "version": "0.1.0"}


def test_each_state_and_its_problems() -> None:
    buf = {**health()["buffer"], "evicted": 12, "lost": {"buffer_error": 3}}
    fleet = fleet_of(
        s1__ok=(ONLINE, health()),
        s2__down=({**ONLINE, "state": "offline", "ts": ts(NOW - 50)}, health()),
        s3__quiet=({**ONLINE, "ts": ts(NOW - 1000)}, health(ts=ts(NOW - 900))),
        s4__sick=(ONLINE, health(status="unhealthy", problems=["source till error for 400s"])),
        s5__loss=(ONLINE, health(buffer=buf)),
        s6__cert=(ONLINE, health(certificates={"mqtt_client": ts(NOW + 10 * 86400)})),
        s7__clock=(ONLINE, health(clock={"state": "unset"})),
        s8__old=({**ONLINE, "ts": ts(NOW - 10)}, None),
    )
    fleet.update("touchpoint/v1/s1/ok/health", b"{not json")
    rows = {r.store: r for r in fleet.rows(NOW, silent_after_s=600)}
    assert rows["s1"].state == "unhealthy" and rows["s1"].problems == ["1 invalid message(s)"]
    assert rows["s2"].state == "offline"
    assert rows["s3"].state == "silent" and "silent for 900s" in rows["s3"].problems[0]
    assert rows["s4"].state == "unhealthy" and rows["s4"].problems == ["source till error for 400s"]
    assert rows["s5"].problems == [
        "12 events evicted (buffer full)",
        "3 events lost (buffer_error)",
    ]
    assert rows["s6"].problems == ["mqtt_client certificate expires in 10 days"]
    assert rows["s7"].problems == ["clock unset (no time sync)"]
    assert rows["s8"].state == "no-health"
    fine = fleet_of(s1__gw=(ONLINE, health()))
    assert [r.state for r in fine.rows(NOW, 600)] == ["ok"]
    assert judge(fine.gateways[("s1", "gw")], NOW + 1000, 600).state == "silent"


def test_table_and_metrics_name_every_gateway() -> None:
    fleet = fleet_of(
        a__gw=(ONLINE, health()),
        b__gw=(ONLINE, health(status="unhealthy", problems=["broker disconnected"])),
    )
    rows = fleet.rows(NOW, 600)
    table = render_table(rows, NOW)
    assert table.splitlines()[0].split() == ["STORE", "DEVICE", "STATE", "LAST", "SEEN", "PROBLEMS"]
    assert "b      gw      unhealthy  5s ago     broker disconnected" in table
    assert table.splitlines()[-1] == "2 gateways: 1 ok, 1 unhealthy"
    text = render_metrics(rows, NOW)
    assert 'touchpoint_fleet_gateway_healthy{device="gw",store="b"} 0' in text
    assert 'touchpoint_fleet_gateway_healthy{device="gw",store="a"} 1' in text
    assert 'touchpoint_fleet_source_up{device="gw",source="till",store="a"} 1' in text
    assert 'touchpoint_fleet_gateways{state="unhealthy"} 1' in text
    assert "# TYPE touchpoint_fleet_gateway_up gauge" in text


def _fleet_cli(port: int, *extra: str) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "fleet", "--port", str(port), "--json",
         "--wait", "2", *extra],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_unreachable_broker_exits_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "gateway", "fleet", "--port", str(free_port())],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "cannot reach the broker" in proc.stderr


@pytest.mark.slow
def test_fleet_of_200_failures_show_within_a_minute(tmp_path: Path) -> None:
    """200 gateways; three stores' card readers are unplugged (they start so); then a
    worker with 25 gateways is killed (its sockets close: the broker publishes their wills at
    once) and another with 25 is frozen (SIGSTOP: a hung or powered-off box, whose sockets
    stay open until the broker's keepalive runs out).  Within a minute of each, `fleet`
    names every failure and only those, and `--serve` exposes the same."""
    gateways, per_process = 200, 25
    faulty = {3, 57, 120}
    killed_first = 175  # the last worker's gateways, 175..199
    frozen_first = 150  # 150..174
    firsts = list(range(0, gateways, per_process))
    workdir = tmp_path / "fleet"
    procs: dict[int, subprocess.Popen[bytes]] = {}
    with Mosquitto(tmp_path / "mq") as broker:
        try:
            for first in firsts:
                with (tmp_path / f"worker-{first}.log").open("wb") as out:
                    procs[first] = subprocess.Popen(
                        [sys.executable, "-m", "tests.fleet.fleet_harness",
                         f"--port={broker.port}", f"--workdir={workdir}", f"--first={first}",
                         f"--count={per_process}", "--rate=1", "--health-interval=10",
                         "--reconnect-min=0.5", "--reconnect-max=5",
                         f"--faulty={','.join(map(str, sorted(faulty)))}"],
                        cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                        env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    )  # fmt: skip
            started = time.monotonic()
            expect_sick = {identity(i) for i in faulty}
            deadline = started + 120 + 60  # start-up of 200 gateways on 2 cores, then a minute
            while True:
                rc, doc = _fleet_cli(broker.port, "--silent-after", "60")
                rows = {(g["store"], g["device"]): g for g in doc["gateways"]}
                sick = {k for k, g in rows.items() if g["state"] == "unhealthy"}
                ok = {k for k, g in rows.items() if g["state"] == "ok"}
                if len(rows) == gateways and sick == expect_sick and len(ok) == gateways - 3:
                    break
                assert time.monotonic() < deadline, (len(rows), sorted(sick), len(ok))
                time.sleep(2)
            assert rc == 1
            for key in expect_sick:
                assert any("till-card" in p for p in rows[key]["problems"]), rows[key]

            procs[killed_first].send_signal(signal.SIGKILL)
            procs[killed_first].wait()
            procs[frozen_first].send_signal(signal.SIGSTOP)
            killed_at = time.monotonic()
            expect_down = {identity(i) for i in range(frozen_first, gateways)}
            while True:
                rc, doc = _fleet_cli(broker.port, "--silent-after", "60")
                rows = {(g["store"], g["device"]): g for g in doc["gateways"]}
                down = {k for k, g in rows.items() if g["state"] in ("offline", "silent")}
                if down == expect_down:
                    break
                assert time.monotonic() - killed_at < 60, (len(down), sorted(down)[:5])
                time.sleep(2)
            shown_after_s = time.monotonic() - killed_at
            assert rc == 1
            table = subprocess.run(
                [sys.executable, "-m", "gateway", "fleet", "--port", str(broker.port),
                 "--wait", "2", "--silent-after", "60"],
                capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
            )  # fmt: skip
            assert table.returncode == 1
            lines = table.stdout.splitlines()
            assert lines[-1] == "200 gateways: 50 offline, 147 ok, 3 unhealthy", lines[-1]
            print("\n".join(lines[:6] + ["..."] + [x for x in lines if "unhealthy" in x]))
            print("\n".join(lines[-3:]))
            assert {k for k, g in rows.items() if g["state"] == "ok"} == (
                {identity(i) for i in range(gateways)} - expect_down - expect_sick
            )

            port = free_port()
            server = subprocess.Popen(
                [sys.executable, "-m", "gateway", "fleet", "--port", str(broker.port),
                 "--serve", f"127.0.0.1:{port}", "--silent-after", "60"],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                text = ""
                for _ in range(100):
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as r:
                            text = r.read().decode()
                    except OSError:
                        text = ""
                    if 'touchpoint_fleet_gateways{state="ok"} 147' in text:
                        break
                    time.sleep(0.2)
                assert 'touchpoint_fleet_gateways{state="ok"} 147' in text, text[-2000:]
                assert 'touchpoint_fleet_gateways{state="unhealthy"} 3' in text
                store, device = identity(3)
                assert (
                    f'touchpoint_fleet_source_up{{device="{device}",source="till-card",'
                    f'store="{store}"}} 0'
                ) in text
            finally:
                server.send_signal(signal.SIGINT)
                server.wait(timeout=20)
            print(f"fleet: the killed stores showed {shown_after_s:.1f}s after the kill")
        finally:
            for proc in procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGCONT)
                    proc.send_signal(signal.SIGTERM)
            for proc in procs.values():
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
