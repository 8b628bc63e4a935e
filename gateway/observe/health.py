"""Loopback-only HTTP: ``/healthz`` (JSON) and ``/metrics`` (Prometheus text 0.0.4).

    GET /healthz   200 {"status": "ok", ...} or 503 {"status": "unhealthy", "problems": [...]}
    GET /metrics   every counter and gauge as touchpoint_<name>, with HELP and TYPE lines

Health rules (``HealthRules``; any one makes /healthz answer 503):

- the broker has been disconnected for longer than ``broker_down_s`` (counted from the
  daemon's start when it never connected);
- the buffer's last write failed (gauge ``buffer_write_ok`` is 0);
- a source has been in state ``error`` or ``absent`` for longer than ``source_down_s``,
  or is ``disabled`` (its driver could not load: it will not recover by itself);
- when ``consent_max_age_s`` is set (the daemon sets it when ``consent.sync`` is on,
  900 s by default): the consent registry was last synced longer ago, or never in that
  long since the start (gauge ``consent_sync_last_ok_at``, set by ``gateway.consent.sync``);
- the buffer's writer thread died: ``buffer_write_ok`` is 0 from that moment, the last
  error says so, ``buffer_writer_failures_total`` counts it (and the daemon exits).

Everything else (buffer depth, oldest event, last reading per source, last error per
component) is reported, not judged.  The server binds loopback addresses only and reads
the gateway's own attributes (``metrics``, ``last_stats``, ``publisher.connected``); a
sampler notes when the broker went away and when each source last produced a reading.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import ipaddress
import json
import logging
import math
import os
import re
import resource
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gateway import __version__
from gateway.consent.erasure import WAL_WAIT_WHY
from gateway.identity.clock import clock_state
from gateway.observe.metrics import Metrics

log = logging.getLogger(__name__)

DEFAULT_PORT = 9464
PREFIX = "touchpoint_"
CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"

HELP: dict[str, str] = {
    "readings_total": "Readings taken from sources, by source and event type",
    "readings_rejected_total": "Inputs a source rejected (bad frame, bad token), by reason",
    "source_refused_total": "What a source refused at its boundary (a till address not "
    "allowed, a token above the lane's mint rate), by source and reason",
    "events_buffered_total": "Events committed to the SQLite buffer",
    "events_forwarded_total": "Events acknowledged by the broker (PUBACK success)",
    "events_dropped_total": "Events dropped before the buffer, by reason",
    "events_evicted_total": "Buffered events evicted because the buffer was full",
    "events_expired_total": "Buffered events expired unsent (older than max_age_s)",
    "events_dead_lettered_total": "Events the broker refused, moved to dead letters",
    "batches_published_total": "Batches acknowledged by the broker",
    "consent_decisions_total": "Consent gate decisions, by decision and reason",
    "mqtt_reconnects_total": "Broker connections lost and re-established",
    "mqtt_connect_failures_total": "Attempts to reach the broker that failed",
    "mqtt_puback_timeouts_total": "Links broken because a PUBACK did not come on a live link",
    "source_restarts_total": "Sources restarted by the supervisor after an error",
    "ble_scanner_starts_total": "BLE scanner (re)starts, by source",
    "ble_watchdog_total": "BLE scan watchdog actions (restart, reset), by source",
    "buffer_depth": "Events waiting in the buffer",
    "memory_entries": "Entries in each in-memory table of the daemon (all bounded), by map",
    "mqtt_connected": "1 while connected to the broker",
    "mqtt_broker_max_packet_bytes": "The broker's Maximum Packet Size (MQTT 5), 0 for none",
    "mqtt_broker_receive_maximum": "The broker's Receive Maximum (MQTT 5), 0 for none",
    "forwarder_window": "Batches the forwarder keeps on the wire at most",
    "forwarder_batch_max_bytes": "The largest batch payload the forwarder sends",
    "batches_split_total": "Stored chunks larger than the batch limits, sent in parts",
    "batches_too_large_total": "Batches refused for their size (packet too large)",
    "batches_abandoned_total": "Batches whose link dropped before the PUBACK (sent again)",
    "last_publish_timestamp_seconds": "Unix time of the last acknowledged batch",
    "buffer_write_ok": "0 when the buffer's last write failed, else 1",
    "consent_sync_last_ok_timestamp_seconds": "Unix time of the last successful consent sync",
    "build_info": "Always 1; the labels say the gateway's version and Python",
    "consent_sync_up": "1 while the consent registry sync succeeds",
    "consent_sync_polls_total": "Consent registry polls, by outcome (too_large, deadline, ...)",
    "buffer_writer_failures_total": "Times the buffer's writer thread died (the daemon exits)",
    "consent_push_total": "Consent pushes received over MQTT, by outcome",
    "consent_records_total": "Consent records applied, by kind",
    "reloads_total": "SIGHUP reloads, by result",
    "publish_latency_seconds": "Capture to broker PUBACK, per event",
    "buffer_oldest_age_seconds": "Age of the oldest event waiting in the buffer",
    "buffer_dead_letters": "Events held in dead letters",
    "buffer_bytes": "Size of the buffer database file",
    "source_state": "1 for each source's current state",
    "source_last_reading_age_seconds": "Seconds since the source's last reading",
    "healthy": "1 when /healthz answers 200",
    "certificate_expiry_timestamp_seconds": "notAfter of the MQTT client certificate and CA",
}

# Counters that exist from the start, so a dashboard sees 0 rather than no series.
BASELINE_COUNTERS = (
    "events_buffered_total",
    "events_forwarded_total",
    "events_evicted_total",
    "events_expired_total",
    "events_dead_lettered_total",
    "mqtt_reconnects_total",
    "source_restarts_total",
)

LATENCY_BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0, 3600.0)


class Histogram:
    """A Prometheus histogram kept as per-bucket counts (one bisect per observation)."""

    def __init__(self, bounds: Iterable[float] = LATENCY_BOUNDS) -> None:
        self.bounds = tuple(sorted(bounds))
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe_many(self, values: Iterable[float]) -> None:
        bounds, counts = self.bounds, self.counts
        for v in values:
            counts[bisect.bisect_left(bounds, v)] += 1
            self.sum += v
            self.count += 1

    def cumulative(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append((_fmt(bound), running))
        return out


class _Broker(Protocol):
    @property
    def connected(self) -> bool: ...


class HealthSubject(Protocol):
    """What the server reads; ``gateway.app.daemon.Gateway`` satisfies it."""

    @property
    def metrics(self) -> Metrics: ...

    @property
    def last_stats(self) -> Mapping[str, Any]: ...

    @property
    def publisher(self) -> _Broker | None: ...


@dataclass(frozen=True)
class HealthRules:
    broker_down_s: float = 120.0
    source_down_s: float = 300.0
    consent_max_age_s: float | None = None


def _by_reason(metrics: Metrics, name: str, source: str) -> dict[str, float]:
    """A counter of one source, by its ``reason`` label."""
    return {
        labels.get("reason", ""): value
        for n, labels, value in metrics.counters()
        if n == name and labels.get("source") == source
    }


def _erased_in_wal(m: Metrics, now: float) -> dict[str, Any]:
    since = _gauge(m, "erased_in_wal_since")
    if not since:
        return {"waiting": False, "for_s": None, "why": ""}
    return {"waiting": True, "for_s": max(0.0, now - since), "why": WAL_WAIT_WHY}


def _gauge(metrics: Metrics, name: str) -> float | None:
    for n, labels, value in metrics.gauges():
        if n == name and not labels:
            return value
    return None


class HealthMonitor:
    """Samples the gateway and judges it by ``rules``.  Time is passed in (``now``)."""

    def __init__(
        self,
        gw: HealthSubject,
        rules: HealthRules | None = None,
        *,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.gw = gw
        self.rules = rules or HealthRules()
        self.now = now
        self._started = now()
        self._broker_down_since: float | None = self._started
        self._reading_totals: dict[str, float] = {}
        self._last_reading: dict[str, float] = {}
        self.sampler: asyncio.Task[None] | None = None

    def sample(self) -> None:
        now = self.now()
        pub = self.gw.publisher
        if pub is not None and pub.connected:
            self._broker_down_since = None
        elif self._broker_down_since is None:
            self._broker_down_since = now
        for source, total in self.gw.metrics.by_label("readings_total", "source").items():
            if total != self._reading_totals.get(source, 0.0):
                self._last_reading[source] = now
            self._reading_totals[source] = total

    def report(self) -> tuple[bool, dict[str, Any]]:
        """Sample, then (healthy, the /healthz document)."""
        self.sample()
        now, rules, m = self.now(), self.rules, self.gw.metrics
        problems: list[str] = []

        down_for = None if self._broker_down_since is None else now - self._broker_down_since
        if down_for is not None and down_for > rules.broker_down_s:
            problems.append(
                f"broker disconnected for {down_for:.0f}s (limit {rules.broker_down_s:.0f}s)"
            )

        write_ok = _gauge(m, "buffer_write_ok")
        if write_ok == 0:
            problems.append("the buffer's last write failed: " + m.last_error.get("buffer", "?"))

        sources: dict[str, dict[str, Any]] = {}
        for name in sorted(set(m.sources) | set(self._reading_totals)):
            info = m.sources.get(name, {})
            state = str(info.get("state", "unknown"))
            since = info.get("since")
            state_age = None if since is None else max(0.0, now - float(since))
            last = self._last_reading.get(name)
            sources[name] = {
                "state": state,
                "detail": info.get("detail", ""),
                "state_age_s": state_age,
                "last_reading_age_s": None if last is None else now - last,
                "readings": self._reading_totals.get(name, 0.0),
            }
            refused = _by_reason(m, "source_refused_total", name)
            if refused:
                sources[name]["refused"] = refused
            if state == "disabled":
                problems.append(f"source {name} disabled: {info.get('detail', '')}")
            elif state in ("error", "absent") and (state_age or 0.0) > rules.source_down_s:
                problems.append(
                    f"source {name} {state} for {state_age:.0f}s (limit {rules.source_down_s:.0f}s)"
                )

        too_large = m.get("batches_too_large_total")
        if too_large:
            problems.append(
                f"{too_large:.0f} batch(es) too large for the broker's maximum packet size "
                "moved to dead letters: " + m.last_error.get("forwarder", "?")
            )

        synced_at = _gauge(m, "consent_sync_last_ok_at")
        sync_age = None if synced_at is None else now - synced_at
        stale_for = now - self._started if sync_age is None else sync_age
        if rules.consent_max_age_s is not None and stale_for > rules.consent_max_age_s:
            problems.append(
                "consent registry never synced"
                if sync_age is None
                else f"consent registry synced {sync_age:.0f}s ago"
                f" (limit {rules.consent_max_age_s:.0f}s)"
            )

        stats = self.gw.last_stats
        last_pub = _gauge(m, "last_publish_at")
        doc: dict[str, Any] = {
            "status": "unhealthy" if problems else "ok",
            "problems": problems,
            "uptime_s": now - self._started,
            "broker": {
                "connected": down_for is None,
                "down_for_s": down_for,
                "reconnects": m.get("mqtt_reconnects_total"),
                "last_publish_age_s": None if last_pub is None else now - last_pub,
                "limits": {  # the broker's (MQTT 5 CONNACK; null: none announced), ours
                    "max_packet_bytes": _gauge(m, "mqtt_broker_max_packet_bytes") or None,
                    "receive_maximum": _gauge(m, "mqtt_broker_receive_maximum") or None,
                    "window": _gauge(m, "forwarder_window"),
                    "batch_max_bytes": _gauge(m, "forwarder_batch_max_bytes"),
                    "batches_split": m.get("batches_split_total"),
                    "batches_too_large": m.get("batches_too_large_total"),
                },
            },
            "buffer": {
                "depth": stats.get("depth"),
                "oldest_age_s": stats.get("oldest_age_s"),
                "dead_letters": stats.get("dead_letters"),
                "db_bytes": stats.get("db_bytes"),
                "last_write_ok": write_ok != 0,
                # an erasure's old page images still in the WAL (a reader blocks the
                # checkpoint, retried in the background): since when, and why
                "erased_in_wal": _erased_in_wal(m, now),
                "evicted": m.get("events_evicted_total"),
                "expired": m.get("events_expired_total"),
                "lost": {  # events the buffer could not take, by reason
                    reason: n
                    for reason in ("buffer_full", "buffer_error")
                    if (n := m.total("events_dropped_total", reason=reason))
                },
            },
            "clock": {"state": clock_state(now)},
            "sources": sources,
            "consent": {
                "sync_age_s": sync_age,
                "subjects": len(getattr(getattr(self.gw, "consent", None), "records", {})),
                "decisions": m.by_label("consent_decisions_total", "reason"),
                "erased_events": m.get("erased_events_total"),
            },
            "last_error": dict(sorted(m.last_error.items())),
            # links the config lets cross the network in the clear (allow_plaintext)
            "plaintext_transports": sorted(
                labels.get("link", "")
                for name, labels, value in m.gauges()
                if name == "plaintext_transport" and value
            ),
        }
        return not problems, doc


# -- Prometheus text format 0.0.4 ---------------------------------------------------------

_NAME_BAD = re.compile(r"[^a-zA-Z0-9_:]")
_LABEL_BAD = re.compile(r"[^a-zA-Z0-9_]")


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(float(v))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f'{_LABEL_BAD.sub("_", k)}="{_escape_label(str(v))}"' for k, v in sorted(labels.items())
    )
    return "{" + inner + "}"


class MetricFamilies:
    """Samples grouped by metric name, rendered with HELP and TYPE lines."""

    def __init__(self, prefix: str = PREFIX, help_text: Mapping[str, str] = HELP) -> None:
        self.prefix = prefix
        self.help_text = help_text
        self.kinds: dict[str, str] = {}
        self.samples: dict[str, list[str]] = {}

    def add(self, name: str, kind: str, labels: Mapping[str, str], value: float) -> None:
        self.add_line(name, kind, f"{self.prefix}{name}{_labels(labels)} {_fmt(value)}")

    def add_line(self, name: str, kind: str, line: str) -> None:
        name = _NAME_BAD.sub("_", name)
        if self.kinds.setdefault(name, kind) != kind:
            return  # the same name as a counter and a gauge: keep the first
        self.samples.setdefault(name, []).append(line)

    def render(self) -> str:
        out: list[str] = []
        for name in sorted(self.samples):
            help_text = self.help_text.get(name, name.replace("_", " "))
            help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
            out.append(f"# HELP {self.prefix}{name} {help_text}")
            out.append(f"# TYPE {self.prefix}{name} {self.kinds[name]}")
            out.extend(self.samples[name])
        return "\n".join(out) + "\n"


def render_metrics(
    gw: HealthSubject, monitor: HealthMonitor | None = None, latency: Histogram | None = None
) -> str:
    """Every counter and gauge of ``gw.metrics`` plus the buffer, broker and source state."""
    m = gw.metrics
    fam = MetricFamilies()
    seen = set()
    for name, labels, value in m.counters():
        fam.add(name, "counter", labels, value)
        seen.add(name)
    for name in BASELINE_COUNTERS:
        if name not in seen:
            fam.add(name, "counter", {}, 0)
    for name, labels, value in m.gauges():
        fam.add(EXPOSED_AS.get(name, name), "gauge", labels, value)
    fam.add("build_info", "gauge", {"version": __version__, "python": _PYTHON}, 1)
    stats = gw.last_stats
    for name, key in (
        ("buffer_oldest_age_seconds", "oldest_age_s"),
        ("buffer_dead_letters", "dead_letters"),
        ("buffer_bytes", "db_bytes"),
    ):
        if stats.get(key) is not None:
            fam.add(name, "gauge", {}, float(stats[key]))
    sizes = getattr(gw, "memory_stats", None)  # gateway.app.daemon.Gateway has it
    if callable(sizes):
        for table, n in sorted(sizes().items()):
            fam.add("memory_entries", "gauge", {"map": table}, n)
    for source, info in sorted(m.sources.items()):
        fam.add("source_state", "gauge", {"source": source, "state": str(info["state"])}, 1)
    if monitor is not None:
        healthy, doc = monitor.report()
        fam.add("healthy", "gauge", {}, 1 if healthy else 0)
        for source, info in doc["sources"].items():
            if info["last_reading_age_s"] is not None:
                fam.add(
                    "source_last_reading_age_seconds",
                    "gauge",
                    {"source": source},
                    info["last_reading_age_s"],
                )
    hist = latency or Histogram()
    name = "publish_latency_seconds"
    for le, n in hist.cumulative():
        fam.add_line(name, "histogram", f'{PREFIX}{name}_bucket{{le="{le}"}} {n}')
    fam.add_line(name, "histogram", f"{PREFIX}{name}_sum {_fmt(hist.sum)}")
    fam.add_line(name, "histogram", f"{PREFIX}{name}_count {hist.count}")
    return fam.render() + process_metrics()


# Unix times are exposed as *_timestamp_seconds (Prometheus naming); the gauges keep their
# short names inside the daemon.
EXPOSED_AS = {
    "last_publish_at": "last_publish_timestamp_seconds",
    "consent_sync_last_ok_at": "consent_sync_last_ok_timestamp_seconds",
}
_PYTHON = ".".join(map(str, sys.version_info[:3]))
PROCESS_HELP = {
    "process_resident_memory_bytes": "Resident memory size in bytes",
    "process_virtual_memory_bytes": "Virtual memory size in bytes",
    "process_cpu_seconds_total": "User and system CPU time spent in seconds",
    "process_open_fds": "Number of open file descriptors",
    "process_max_fds": "Maximum number of open file descriptors",
    "process_start_time_seconds": "Start time of the process since the Unix epoch in seconds",
}


def process_metrics() -> str:
    """The standard ``process_*`` metrics of this process, read from /proc (none where
    /proc is missing)."""
    fam = MetricFamilies(prefix="", help_text=PROCESS_HELP)
    try:
        stat = Path("/proc/self/stat").read_text(encoding="ascii")
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text(encoding="ascii").splitlines()
            if line.startswith("btime ")
        )
        open_fds = sum(1 for _ in Path("/proc/self/fd").iterdir())
    except (OSError, ValueError, IndexError, StopIteration):
        return ""
    tick = os.sysconf("SC_CLK_TCK")
    page = resource.getpagesize()
    # fields[n] is stat field n + 3 (proc(5)): utime 14, stime 15, starttime 22, vsize 23,
    # rss 24
    fam.add("process_cpu_seconds_total", "counter", {}, (int(fields[11]) + int(fields[12])) / tick)
    fam.add("process_start_time_seconds", "gauge", {}, boot + int(fields[19]) / tick)
    fam.add("process_virtual_memory_bytes", "gauge", {}, float(fields[20]))
    # statm, as the health message reads it (stat's rss field is 0 under qemu-user, which
    # writes its own /proc/self/stat; statm is the kernel's)
    rss = rss_bytes()
    fam.add(
        "process_resident_memory_bytes",
        "gauge",
        {},
        float(rss if rss is not None else int(fields[21]) * page),
    )
    fam.add("process_open_fds", "gauge", {}, float(open_fds))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY:
        fam.add("process_max_fds", "gauge", {}, float(soft))
    return fam.render()


def rss_bytes() -> int | None:
    """Resident set size of this process, from /proc (None where there is none)."""
    try:
        pages = int(Path("/proc/self/statm").read_text(encoding="ascii").split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * resource.getpagesize()


# -- the server -------------------------------------------------------------------------

_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 400: "Bad Request",
            503: "Service Unavailable"}  # fmt: skip


def http_response(status: int, body: bytes, content_type: str, head: bool) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head else body)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def serve_http(route: Callable[[str, str], bytes], host: str, port: int) -> asyncio.Server:
    """A minimal HTTP/1.1 server: ``route(method, path)`` gives each whole response.
    A request line and its headers must arrive within 10 s and in 8 KiB; one request per
    connection."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readline()
                for _ in range(100):  # headers: read and ignore
                    if (await reader.readline()) in (b"\r\n", b"\n", b""):
                        break
            parts = request.decode("latin-1").split()
            if len(parts) != 3 or not parts[2].startswith("HTTP/"):
                writer.write(http_response(400, b"bad request\n", "text/plain", False))
            else:
                writer.write(route(parts[0], parts[1].split("?", 1)[0]))
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port, limit=8192)


async def serve_health(
    gw: HealthSubject,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    monitor: HealthMonitor | None = None,
    latency: Histogram | None = None,
    sample_interval_s: float = 1.0,
) -> asyncio.Server:
    """Start the endpoint on a loopback address; ``server.close()`` stops it."""
    if not _is_loopback(host):
        raise ValueError(f"health endpoint must listen on loopback, not {host!r}")
    mon = monitor or HealthMonitor(gw)

    def _route(method: str, target: str) -> bytes:
        if target not in ("/healthz", "/metrics"):
            body = b"not found: try /healthz or /metrics\n"
            return http_response(404, body, "text/plain", False)
        if method not in ("GET", "HEAD"):
            return http_response(405, b"GET only\n", "text/plain", False)
        head = method == "HEAD"
        if target == "/metrics":
            body = render_metrics(gw, mon, latency).encode()
            return http_response(200, body, CONTENT_TYPE_METRICS, head)
        healthy, doc = mon.report()
        body = (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()
        return http_response(200 if healthy else 503, body, "application/json", head)

    server = await serve_http(_route, host, port)

    async def sample_until_closed() -> None:
        closed = asyncio.ensure_future(server.wait_closed())
        try:
            while not closed.done():
                mon.sample()
                await asyncio.wait({closed}, timeout=sample_interval_s)
        finally:
            closed.cancel()

    mon.sampler = asyncio.get_running_loop().create_task(
        sample_until_closed(), name="health-sampler"
    )
    bound = server.sockets[0].getsockname()[1] if server.sockets else port
    log.info("health endpoint on http://%s:%d/healthz and /metrics", host, bound)
    return server
