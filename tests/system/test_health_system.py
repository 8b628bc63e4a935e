"""/healthz and /metrics of the real daemon process, healthy and with the broker gone."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.identity.pseudonyms import Keyring, decode_key
from simulators.infra.broker import Mosquitto, free_port
from tests.system.harness import KEY_B64, GatewayProc, card_number, synthetic

pytestmark = pytest.mark.slow


def get(port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()


def _with_health(tmp_path: Path, broker: Mosquitto, port: int, extra: str = "") -> GatewayProc:
    """The daemon with a synthetic source and ``[health]`` on ``port``, started, connected
    and reading for a moment."""
    ring = Keyring({"k1": decode_key(KEY_B64, "k")}, "k1")
    consented = [ring.pseudonym("loyalty", card_number(i)) for i in range(50)]
    gw = GatewayProc(tmp_path / "gw", broker.port, sources=synthetic(200), consented=consented)
    gw._template += f'[health]\nlisten = "127.0.0.1:{port}"\n{extra}'
    gw.set_sources(synthetic(200))
    gw.start()
    gw.wait_log("connected to broker")
    time.sleep(2.5)
    return gw


def test_health_and_metrics_of_the_running_daemon(tmp_path: Path) -> None:
    port = free_port()
    with Mosquitto(tmp_path / "mq") as broker:
        gw = _with_health(tmp_path, broker, port, "broker_down_s = 2\n")
        status, body = get(port, "/healthz")
        assert status == 200, body
        health = json.loads(body)
        assert health["broker"]["connected"] is True
        assert "load" in json.dumps(health["sources"])
        status, metrics = get(port, "/metrics")
        assert status == 200
        name = "touchpoint_events_forwarded_total"
        forwarded = [line for line in metrics.splitlines() if line.startswith(name)]
        assert forwarded and float(forwarded[0].split()[-1]) > 0
        assert "# TYPE touchpoint_readings_total counter" in metrics
        table = subprocess.run(
            [sys.executable, "-m", "gateway", "status", "--config", str(gw.config)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "daemon" in table and "ok" in table
        assert "source load" in table and "readings" in table
        assert "consented" in table, "consent decisions by reason"
        broker.stop()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            status, body = get(port, "/healthz")
            if status == 503:
                break
            time.sleep(0.3)
        assert status == 503, body
        assert gw.alive(), "unhealthy is reported, not a crash"
        assert gw.stop() == 0


def test_metrics_pass_promtool_and_follow_the_conventions(tmp_path: Path) -> None:
    """`promtool check metrics` (Debian's prometheus package) finds nothing to say about
    the running daemon's /metrics; times are *_timestamp_seconds, one gauge per fact, a
    build_info, and the process's own memory, CPU and open files."""
    import shutil

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; make test installs it)")
    port = free_port()
    with Mosquitto(tmp_path / "mq") as broker:
        gw = _with_health(tmp_path, broker, port)
        try:
            status, text = get(port, "/metrics")
        finally:
            gw.stop()
    assert status == 200
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
    )
    assert check.returncode == 0 and not check.stdout.strip() and not check.stderr.strip(), (
        check.stdout + check.stderr
    )
    names = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
    assert "touchpoint_last_publish_timestamp_seconds" in names
    assert not {n for n in names if n.endswith("_at")}, "Unix times end in _timestamp_seconds"
    assert "touchpoint_broker_connected" not in names  # one gauge per fact: mqtt_connected
    assert "touchpoint_mqtt_connected" in names
    build = [x for x in text.splitlines() if x.startswith("touchpoint_build_info{")]
    assert build and 'version="' in build[0] and build[0].endswith(" 1"), build
    for name in (
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
    ):
        assert name in names, name
