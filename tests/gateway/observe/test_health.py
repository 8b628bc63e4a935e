"""/healthz and /metrics over real HTTP, read by http.client, against real Metrics."""

from __future__ import annotations

import asyncio
import http.client
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.observe.health import HealthMonitor, HealthRules, Histogram, serve_health
from gateway.observe.metrics import Metrics
from tests.fakes import FakePublisher


@dataclass
class GatewayLike:
    """The attributes of gateway.app.daemon.Gateway that the endpoint reads."""

    metrics: Metrics = field(default_factory=Metrics)
    last_stats: dict[str, Any] = field(default_factory=dict)
    publisher: FakePublisher | None = field(default_factory=FakePublisher)


class Clock:
    def __init__(self) -> None:
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def busy_gateway(clock: Clock) -> GatewayLike:
    gw = GatewayLike(
        last_stats={
            "depth": 42,
            "oldest_age_s": 3.5,
            "dead_letters": 2,
            "db_bytes": 1_048_576,
            "last_publish_at": clock.t - 1,
        }
    )
    m = gw.metrics
    m.inc("readings_total", 7, source="till-2-card", type="card.read")
    m.inc("readings_total", 3, source="zone-a", type="presence.enter")
    m.inc("events_buffered_total", 9)
    m.inc("events_forwarded_total", 5)
    m.inc("events_dropped_total", 1, reason="consent")
    m.inc("events_dropped_total", 4, reason="buffer_full")
    m.inc("events_evicted_total", 100)
    m.inc("events_dead_lettered_total", 2)
    m.inc("mqtt_reconnects_total", 3)
    m.inc("ble_scanner_starts_total", 2, source="zone-a")
    m.inc("source_restarts_total", 1, source="till-2-card")
    m.set("mqtt_connected", 1)
    m.set("buffer_depth", 42)
    m.set("buffer_write_ok", 1)
    m.set("last_publish_at", clock.t - 1)
    m.set("consent_sync_last_ok_at", clock.t - 30)
    for name in ("till-2-card", "zone-a"):
        m.set_source_state(name, "ok")
        m.sources[name]["since"] = clock.t - 600
    m.error("mqtt", "cannot reach broker mqtt:8883")
    return gw


async def get(port: int, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    def fetch() -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request(method, path)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    return await asyncio.to_thread(fetch)


def run_with_server(
    gw: GatewayLike,
    monitor: HealthMonitor,
    body: Callable[[int], Awaitable[None]],
    latency: Histogram | None = None,
) -> None:
    async def main() -> None:
        server = await serve_health(gw, port=0, monitor=monitor, latency=latency)
        port = server.sockets[0].getsockname()[1]
        try:
            await body(port)
        finally:
            server.close()
            await server.wait_closed()
        assert monitor.sampler is not None
        await asyncio.wait_for(monitor.sampler, 2)  # the sampler ends with the server

    asyncio.run(main())


def test_healthy_gateway_reports_every_component() -> None:
    clock = Clock()
    gw = busy_gateway(clock)
    mon = HealthMonitor(gw, now=clock)

    async def body(port: int) -> None:
        clock.t += 5
        gw.metrics.inc("readings_total", source="zone-a", type="presence.exit")
        status, headers, raw = await get(port, "/healthz")
        assert status == 200
        assert headers["content-type"] == "application/json"
        doc = json.loads(raw)
        assert doc["status"] == "ok"
        assert doc["problems"] == []
        assert doc["broker"]["connected"] is True
        assert doc["broker"]["reconnects"] == 3
        assert doc["broker"]["last_publish_age_s"] == pytest.approx(6)
        assert doc["buffer"] == {
            "depth": 42,
            "oldest_age_s": 3.5,
            "dead_letters": 2,
            "db_bytes": 1_048_576,
            "last_write_ok": True,
            "erased_in_wal": {"waiting": False, "for_s": None, "why": ""},
            "evicted": 100,
            "expired": 0,
            "lost": {"buffer_full": 4},
        }
        assert doc["plaintext_transports"] == []
        assert doc["clock"]["state"] == "unset"  # this clock reads 1970
        zone = doc["sources"]["zone-a"]
        assert zone["state"] == "ok"
        assert zone["state_age_s"] == pytest.approx(605)
        assert zone["last_reading_age_s"] == 0  # counted at this sample
        assert zone["readings"] == 4
        assert doc["consent"]["sync_age_s"] == pytest.approx(35)
        assert doc["last_error"] == {"mqtt": "cannot reach broker mqtt:8883"}
        clock.t += 20
        doc = json.loads((await get(port, "/healthz"))[2])
        assert doc["sources"]["zone-a"]["last_reading_age_s"] == pytest.approx(20)

    run_with_server(gw, mon, body)


def test_broker_down_longer_than_the_limit_is_unhealthy() -> None:
    clock = Clock()
    gw = busy_gateway(clock)
    mon = HealthMonitor(gw, HealthRules(broker_down_s=60), now=clock)

    async def body(port: int) -> None:
        assert gw.publisher is not None
        gw.publisher._connected.clear()
        mon.sample()  # the sampler notices the disconnect
        clock.t += 59
        status, _, raw = await get(port, "/healthz")
        assert status == 200
        assert json.loads(raw)["broker"]["down_for_s"] == pytest.approx(59)
        clock.t += 2
        status, _, raw = await get(port, "/healthz")
        doc = json.loads(raw)
        assert status == 503
        assert doc["status"] == "unhealthy"
        assert doc["problems"] == ["broker disconnected for 61s (limit 60s)"]
        gw.publisher._connected.set()
        assert (await get(port, "/healthz"))[0] == 200

    run_with_server(gw, mon, body)


def test_broker_that_never_connected_counts_from_start() -> None:
    clock = Clock()
    gw = busy_gateway(clock)
    gw.publisher = None  # the daemon has not made its publisher yet
    mon = HealthMonitor(gw, HealthRules(broker_down_s=60), now=clock)
    clock.t += 61
    healthy, doc = mon.report()
    assert not healthy
    assert doc["broker"]["connected"] is False


def test_failed_buffer_write_is_unhealthy() -> None:
    clock = Clock()
    gw = busy_gateway(clock)
    gw.metrics.set("buffer_write_ok", 0)
    gw.metrics.error("buffer", "buffer write failed: disk I/O error")
    mon = HealthMonitor(gw, now=clock)

    async def body(port: int) -> None:
        status, _, raw = await get(port, "/healthz")
        doc = json.loads(raw)
        assert status == 503
        assert doc["buffer"]["last_write_ok"] is False
        assert doc["problems"] == [
            "the buffer's last write failed: buffer write failed: disk I/O error"
        ]

    run_with_server(gw, mon, body)


@pytest.mark.parametrize(
    ("state", "age", "healthy"),
    [
        ("error", 299, True),
        ("error", 301, False),
        ("absent", 301, False),
        ("connecting", 3000, True),
        ("disabled", 1, False),
    ],
)
def test_source_state_rules(state: str, age: float, healthy: bool) -> None:
    clock = Clock()
    gw = busy_gateway(clock)
    gw.metrics.set_source_state("zone-a", state, "adapter hci0 not found")
    gw.metrics.sources["zone-a"]["since"] = clock.t - age
    ok, doc = HealthMonitor(gw, HealthRules(source_down_s=300), now=clock).report()
    assert ok is healthy
    assert doc["sources"]["zone-a"]["detail"] == "adapter hci0 not found"
    if not healthy:
        assert doc["problems"][0].startswith(f"source zone-a {state}")


def test_stale_consent_sync_only_when_a_limit_is_set() -> None:
    clock = Clock()
    gw = busy_gateway(clock)
    clock.t += 4000
    assert HealthMonitor(gw, now=clock).report()[0]
    ok, doc = HealthMonitor(gw, HealthRules(consent_max_age_s=3600), now=clock).report()
    assert not ok
    assert "consent registry synced" in doc["problems"][0]


# -- /metrics ----------------------------------------------------------------------------

SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"(?:\{(?P<labels>.*)\})?"
    r" (?P<value>[-+]?(?:[0-9.]+(?:[eE][-+]?[0-9]+)?|Inf|NaN))$"
)
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(,|$)')


def unescape(value: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), value)


def parse_prometheus(text: str) -> dict[str, dict[str, Any]]:
    """A strict little parser of the text format: families with help, type and samples."""
    assert text.endswith("\n")
    families: dict[str, dict[str, Any]] = {}
    current: str | None = None
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert name not in families, f"{name} described twice"
            families[name] = {"help": help_text, "type": None, "samples": []}
            current = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert name == current and families[name]["type"] is None
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped")
            families[name]["type"] = kind
        else:
            m = SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name = m.group("name")
            assert current is not None
            base = current
            if families[base]["type"] == "histogram":
                assert name in (f"{base}_bucket", f"{base}_sum", f"{base}_count")
            else:
                assert name == base, f"{name} outside its family {base}"
            labels: dict[str, str] = {}
            raw = m.group("labels") or ""
            pos = 0
            while pos < len(raw):
                lm = LABEL.match(raw, pos)
                assert lm, f"bad labels in {line!r}"
                labels[lm.group(1)] = unescape(lm.group(2))
                pos = lm.end()
            value = float(m.group("value").replace("Inf", "inf"))
            families[base]["samples"].append((name, labels, value))
    return families


def test_metrics_exposition() -> None:
    clock = Clock()
    gw = busy_gateway(clock)
    gw.metrics.inc("readings_rejected_total", source="till-2-card", reason='bad "frame"\\\n')
    latency = Histogram()
    latency.observe_many([0.004, 0.004, 0.02, 0.3, 7.0, 5000.0])
    mon = HealthMonitor(gw, now=clock)

    async def body(port: int) -> None:
        status, headers, raw = await get(port, "/metrics")
        assert status == 200
        assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        fams = parse_prometheus(raw.decode())
        assert all(name.startswith(("touchpoint_", "process_")) for name in fams)
        assert fams["process_resident_memory_bytes"]["samples"][0][2] > 1 << 20
        assert all(f["help"] and f["type"] for f in fams.values())

        def samples(name: str) -> dict[tuple[tuple[str, str], ...], float]:
            return {tuple(sorted(lab.items())): v for _, lab, v in fams[name]["samples"]}

        assert fams["touchpoint_readings_total"]["type"] == "counter"
        assert samples("touchpoint_readings_total") == {
            (("source", "till-2-card"), ("type", "card.read")): 7,
            (("source", "zone-a"), ("type", "presence.enter")): 3,
        }
        assert samples("touchpoint_events_dropped_total") == {
            (("reason", "buffer_full"),): 4,
            (("reason", "consent"),): 1,
        }
        assert samples("touchpoint_events_evicted_total") == {(): 100}
        assert samples("touchpoint_events_dead_lettered_total") == {(): 2}
        assert samples("touchpoint_mqtt_reconnects_total") == {(): 3}
        assert samples("touchpoint_events_expired_total") == {(): 0}  # baseline
        assert samples("touchpoint_ble_scanner_starts_total") == {(("source", "zone-a"),): 2}
        assert samples("touchpoint_source_restarts_total") == {(("source", "till-2-card"),): 1}
        assert samples("touchpoint_readings_rejected_total") == {
            (("reason", 'bad "frame"\\\n'), ("source", "till-2-card")): 1
        }
        assert fams["touchpoint_buffer_depth"]["type"] == "gauge"
        assert samples("touchpoint_buffer_depth") == {(): 42}
        assert samples("touchpoint_buffer_oldest_age_seconds") == {(): 3.5}
        assert samples("touchpoint_buffer_dead_letters") == {(): 2}
        assert "touchpoint_broker_connected" not in fams  # one gauge per fact: mqtt_connected
        assert samples("touchpoint_last_publish_timestamp_seconds") == {(): clock.t - 1}
        assert "touchpoint_last_publish_at" not in fams
        assert samples("touchpoint_healthy") == {(): 1}
        assert samples("touchpoint_source_state")[(("source", "zone-a"), ("state", "ok"))] == 1

        hist = fams["touchpoint_publish_latency_seconds"]
        assert hist["type"] == "histogram"
        buckets = [(lab["le"], v) for n, lab, v in hist["samples"] if n.endswith("_bucket")]
        assert buckets[-1] == ("+Inf", 6)
        counts = [v for _, v in buckets]
        assert counts == sorted(counts)
        assert dict(buckets)["0.005"] == 2
        assert dict(buckets)["0.025"] == 3
        totals = {n: v for n, _, v in hist["samples"] if not n.endswith("_bucket")}
        assert totals["touchpoint_publish_latency_seconds_count"] == 6
        assert totals["touchpoint_publish_latency_seconds_sum"] == pytest.approx(5007.328)

    run_with_server(gw, mon, body, latency)


def test_other_paths_and_methods() -> None:
    clock = Clock()
    gw = busy_gateway(clock)

    async def body(port: int) -> None:
        assert (await get(port, "/"))[0] == 404
        assert (await get(port, "/healthz", "POST"))[0] == 405
        status, headers, raw = await get(port, "/healthz", "HEAD")
        assert status == 200
        assert raw == b""
        assert int(headers["content-length"]) > 0
        assert (await get(port, "/metrics?format=text"))[0] == 200

    run_with_server(gw, HealthMonitor(gw, now=clock), body)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "::", "example.com"])
def test_refuses_non_loopback_addresses(host: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(serve_health(GatewayLike(), host=host, port=0))


def test_a_registry_never_synced_is_stale_once_the_limit_has_passed_since_start() -> None:
    clock = Clock()
    gw = GatewayLike()  # no sync ever succeeded
    gw.metrics.set("mqtt_connected", 1)
    monitor = HealthMonitor(gw, HealthRules(consent_max_age_s=900), now=clock)
    clock.t += 60
    ok, doc = monitor.report()
    assert ok, "a daemon that just started is not stale yet"
    clock.t += 900
    ok, doc = monitor.report()
    assert not ok and "consent registry never synced" in " ".join(doc["problems"])
