"""``touchpoint-gateway fleet``: every gateway's retained status and health, for IT.

    touchpoint-gateway fleet --host broker.example --port 8883 --ca-file ca.pem ...
    touchpoint-gateway fleet --config central.toml --json
    touchpoint-gateway fleet --config central.toml --serve 0.0.0.0:9465

It subscribes to ``touchpoint/v1/+/+/status`` and ``.../health`` (both retained, so one
connection shows the whole fleet at once), judges each gateway and prints one table:
store, device, state, last seen, problems.  A gateway's state is

- ``offline``: its status says so (a clean stop, or the broker published its will);
- ``silent``: its newest status or health message is older than ``--silent-after``;
- ``unhealthy``: its health says so, or it reports data loss (evictions, events the buffer
  could not take), an unset clock, or a certificate that expires within 30 days;
- ``no-health``: online but it never published health (an older version);
- ``ok`` otherwise.

Exit status: 0 when every gateway is ok, 1 when any is not (or none was found), 2 when
the broker cannot be reached.  ``--serve ADDR`` keeps the subscription and serves the
whole fleet as Prometheus metrics, labelled by store and device, on ``ADDR/metrics``.

``--config`` reads a TOML file with a ``[broker]`` table (host, port, username,
password_file, ca_file, cert_file, key_file, client_id) and an optional ``[fleet]`` table
(silent_after_s, wait_s); flags given on the command line win.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import ssl
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from gateway.observe.health import MetricFamilies, http_response, serve_http

log = logging.getLogger(__name__)

TOPICS = ("touchpoint/v1/+/+/status", "touchpoint/v1/+/+/health")
MAX_PAYLOAD = 64 * 1024  # a health message is ~1 KiB; anything far larger is not one
CERT_WARN_DAYS = 30
EXIT_OK, EXIT_PROBLEMS, EXIT_UNREACHABLE = 0, 1, 2
CONTENT_TYPE_METRICS = "text/plain; version=0.0.4; charset=utf-8"


def _parse_ts(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


@dataclass
class Gateway:
    store: str
    device: str
    status: dict[str, Any] | None = None
    health: dict[str, Any] | None = None
    invalid: int = 0


@dataclass
class Row:
    store: str
    device: str
    state: str
    last_seen: float | None
    problems: list[str] = field(default_factory=list)
    health: dict[str, Any] | None = None

    def to_json(self, now: float) -> dict[str, Any]:
        return {
            "store": self.store,
            "device": self.device,
            "state": self.state,
            "last_seen": self.last_seen,
            "last_seen_age_s": None if self.last_seen is None else round(now - self.last_seen, 1),
            "problems": self.problems,
            "health": self.health,
        }


class Fleet:
    """What the broker told about every gateway; thread-safe ``update``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.gateways: dict[tuple[str, str], Gateway] = {}
        self.messages = 0

    def update(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if len(parts) != 5 or parts[0:2] != ["touchpoint", "v1"]:
            return
        store, device, kind = parts[2], parts[3], parts[4]
        with self._lock:
            self.messages += 1
            gw = self.gateways.setdefault((store, device), Gateway(store, device))
            if not payload:  # a cleared retained message
                if kind == "status":
                    gw.status = None
                elif kind == "health":
                    gw.health = None
                return
            try:
                if len(payload) > MAX_PAYLOAD:
                    raise ValueError("too large")
                doc = json.loads(payload)
                if not isinstance(doc, dict):
                    raise ValueError("not an object")
            except ValueError:
                gw.invalid += 1
                return
            if kind == "status":
                gw.status = doc
            elif kind == "health":
                gw.health = doc

    def rows(self, now: float, silent_after_s: float) -> list[Row]:
        with self._lock:
            gateways = sorted(self.gateways.values(), key=lambda g: (g.store, g.device))
            return [judge(g, now, silent_after_s) for g in gateways]


def judge(gw: Gateway, now: float, silent_after_s: float) -> Row:
    """One gateway's state and problems (see the module docstring)."""
    status, health = gw.status or {}, gw.health or {}
    seen = [t for t in (_parse_ts(status.get("ts")), _parse_ts(health.get("ts"))) if t]
    last_seen = max(seen, default=None)
    problems: list[str] = []
    if gw.invalid:
        problems.append(f"{gw.invalid} invalid message(s)")
    if status.get("state") == "offline":
        return Row(gw.store, gw.device, "offline", last_seen, ["offline", *problems], gw.health)
    if last_seen is None or now - last_seen > silent_after_s:
        age = "never seen" if last_seen is None else f"silent for {now - last_seen:.0f}s"
        return Row(gw.store, gw.device, "silent", last_seen, [age, *problems], gw.health)
    if not health:
        return Row(gw.store, gw.device, "no-health", last_seen, problems, None)
    problems += [str(p) for p in health.get("problems", [])]
    buffer = health.get("buffer", {}) if isinstance(health.get("buffer"), dict) else {}
    if buffer.get("evicted"):
        problems.append(f"{buffer['evicted']} events evicted (buffer full)")
    for reason, n in sorted((buffer.get("lost") or {}).items()):
        if n:
            problems.append(f"{n} events lost ({reason})")
    clock = health.get("clock", {}).get("state") if isinstance(health.get("clock"), dict) else None
    if clock == "unset":
        problems.append("clock unset (no time sync)")
    for name, ts in sorted((health.get("certificates") or {}).items()):
        at = _parse_ts(ts)
        if at is not None and at - now < CERT_WARN_DAYS * 86400:
            days = (at - now) / 86400
            problems.append(
                f"{name} certificate expired"
                if days <= 0
                else f"{name} certificate expires in {days:.0f} days"
            )
    unhealthy = health.get("status") != "ok" or bool(problems)
    return Row(gw.store, gw.device, "unhealthy" if unhealthy else "ok", last_seen, problems, health)


def _age(now: float, at: float | None) -> str:
    if at is None:
        return "never"
    s = max(0.0, now - at)
    if s < 120:
        return f"{s:.0f}s ago"
    if s < 7200:
        return f"{s / 60:.0f}m ago"
    return f"{s / 3600:.0f}h ago"


def render_table(rows: list[Row], now: float) -> str:
    head = ("STORE", "DEVICE", "STATE", "LAST SEEN", "PROBLEMS")
    lines = [(r.store, r.device, r.state, _age(now, r.last_seen), "; ".join(r.problems) or "-")
             for r in rows]  # fmt: skip
    widths = [max(len(x[i]) for x in [head, *lines]) for i in range(4)]
    out = []
    for line in [head, *lines]:
        out.append("  ".join(c.ljust(w) for c, w in zip(line[:4], widths, strict=True)) + "  "
                   + line[4])  # fmt: skip
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    out.append(f"{len(rows)} gateways: {summary or 'none found'}")
    return "\n".join(out) + "\n"


_STATES = ("ok", "unhealthy", "no-health", "silent", "offline")


def render_metrics(rows: list[Row], now: float) -> str:
    """The fleet as Prometheus text, one series per gateway labelled store and device."""
    fam = MetricFamilies(prefix="touchpoint_fleet_", help_text=FLEET_HELP)
    counts = dict.fromkeys(_STATES, 0)
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
        who = {"store": r.store, "device": r.device}
        fam.add("gateway_up", "gauge", who, 0.0 if r.state in ("offline", "silent") else 1.0)
        fam.add("gateway_healthy", "gauge", who, 1.0 if r.state == "ok" else 0.0)
        fam.add("gateway_problems", "gauge", who, float(len(r.problems)))
        if r.last_seen is not None:
            fam.add("gateway_last_seen_timestamp_seconds", "gauge", who, r.last_seen)
        h = r.health or {}
        buffer = h.get("buffer") or {}
        for key, name in (("depth", "buffer_depth"), ("oldest_age_s", "buffer_oldest_age_seconds"),
                          ("dead_letters", "buffer_dead_letters")):  # fmt: skip
            if isinstance(buffer.get(key), int | float):
                fam.add(name, "gauge", who, float(buffer[key]))
        for key, name in (("evicted", "events_evicted"), ("expired", "events_expired")):
            if isinstance(buffer.get(key), int | float):
                fam.add(name, "gauge", who, float(buffer[key]))
        for reason, n in (buffer.get("lost") or {}).items():
            fam.add("events_lost", "gauge", {**who, "reason": str(reason)}, float(n))
        for source, s in (h.get("sources") or {}).items():
            up = 1.0 if isinstance(s, dict) and s.get("state") == "ok" else 0.0
            fam.add("source_up", "gauge", {**who, "source": str(source)}, up)
        for cert, ts in (h.get("certificates") or {}).items():
            if (at := _parse_ts(ts)) is not None:
                labels = {**who, "certificate": str(cert)}
                fam.add("certificate_expiry_timestamp_seconds", "gauge", labels, at)
        if isinstance(h.get("rss_bytes"), int):
            fam.add("gateway_resident_memory_bytes", "gauge", who, float(h["rss_bytes"]))
    for state, n in counts.items():
        fam.add("gateways", "gauge", {"state": state}, float(n))
    return fam.render()


FLEET_HELP = {
    "gateway_up": "1 unless the gateway is offline or silent",
    "gateway_healthy": "1 when the gateway is ok",
    "gateway_problems": "Problems the fleet view sees for the gateway",
    "gateway_last_seen_timestamp_seconds": "Newest status or health timestamp of the gateway",
    "buffer_depth": "Events waiting in the gateway's buffer",
    "buffer_oldest_age_seconds": "Age of the oldest event waiting in the gateway's buffer",
    "buffer_dead_letters": "Events the broker refused, held in dead letters",
    "events_evicted": "Events evicted because the gateway's buffer was full (since its start)",
    "events_expired": "Events expired unsent in the gateway's buffer (since its start)",
    "events_lost": "Events the gateway's buffer could not take, by reason (since its start)",
    "source_up": "1 while the gateway's source is ok",
    "certificate_expiry_timestamp_seconds": "notAfter of the gateway's MQTT certificates",
    "gateway_resident_memory_bytes": "Resident memory of the gateway daemon",
    "gateways": "Gateways by state",
}


# -- the broker connection ----------------------------------------------------------------


@dataclass
class BrokerOptions:
    host: str = "127.0.0.1"
    port: int = 1883
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    client_id: str = ""
    silent_after_s: float = 600.0
    wait_s: float = 3.0


def options(args: argparse.Namespace) -> BrokerOptions:
    """The ``--config`` file's values, then the flags given on the command line."""
    opts = BrokerOptions()
    if args.config is not None:
        try:
            doc = tomllib.loads(args.config.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SystemExit(f"fleet: cannot read {args.config}: {exc}") from None
        unknown = set(doc) - {"broker", "fleet"}
        if unknown:
            raise SystemExit(f"fleet: {args.config}: unknown tables {sorted(unknown)}")
        for table in ("broker", "fleet"):
            for key, value in doc.get(table, {}).items():
                if not hasattr(opts, key):
                    raise SystemExit(f"fleet: {args.config}: unknown key {table}.{key}")
                base = args.config.parent
                setattr(opts, key, base / value if key.endswith("_file") else value)
    for key in vars(opts):
        value = getattr(args, key, None)
        if value is not None:
            setattr(opts, key, value)
    return opts


def _client(opts: BrokerOptions, fleet: Fleet, subscribed: threading.Event) -> Any:
    # paho only when a fleet command runs: the CLI imports this module to build --help
    import paho.mqtt.client as mqtt  # noqa: PLC0415
    from paho.mqtt.enums import CallbackAPIVersion  # noqa: PLC0415

    client = mqtt.Client(
        CallbackAPIVersion.VERSION2, client_id=opts.client_id, protocol=mqtt.MQTTv5
    )
    if opts.username is not None:
        password = None
        if opts.password_file is not None:
            password = Path(opts.password_file).read_text(encoding="utf-8").strip()
        client.username_pw_set(opts.username, password)
    if opts.ca_file or opts.cert_file:
        client.tls_set(
            ca_certs=str(opts.ca_file) if opts.ca_file else None,
            certfile=str(opts.cert_file) if opts.cert_file else None,
            keyfile=str(opts.key_file) if opts.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )

    def on_connect(c: Any, userdata: Any, flags: Any, rc: Any, props: Any = None) -> None:
        if not rc.is_failure:
            c.subscribe([(t, 1) for t in TOPICS])

    def on_subscribe(c: Any, userdata: Any, mid: int, codes: Any, props: Any = None) -> None:
        subscribed.set()

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = lambda c, u, msg: fleet.update(msg.topic, bytes(msg.payload))
    return client


def collect(opts: BrokerOptions) -> Fleet | None:
    """Connect, subscribe, gather the retained messages for ``wait_s``; None if the broker
    could not be reached."""
    fleet, subscribed = Fleet(), threading.Event()
    client = _client(opts, fleet, subscribed)
    try:
        client.connect(opts.host, opts.port, keepalive=30)
    except (OSError, ssl.SSLError) as exc:
        print(f"fleet: cannot reach the broker {opts.host}:{opts.port}: {exc}", file=sys.stderr)
        return None
    client.loop_start()
    try:
        if not subscribed.wait(max(5.0, opts.wait_s)):
            print(f"fleet: the broker {opts.host}:{opts.port} did not accept the "
                  "subscription (credentials or ACL?)", file=sys.stderr)  # fmt: skip
            return None
        time.sleep(opts.wait_s)  # retained messages arrive right after the SUBACK
    finally:
        client.disconnect()
        client.loop_stop()
    return fleet


async def serve(opts: BrokerOptions, host: str, port: int) -> None:
    """Keep the subscription; serve ``/metrics`` (the fleet) and ``/fleet`` (JSON)."""
    fleet, subscribed = Fleet(), threading.Event()
    client = _client(opts, fleet, subscribed)
    client.connect_async(opts.host, opts.port, keepalive=30)
    client.loop_start()

    def route(method: str, target: str) -> bytes:
        now = time.time()
        rows = fleet.rows(now, opts.silent_after_s)
        if target == "/metrics":
            body = render_metrics(rows, now).encode()
            return http_response(200, body, CONTENT_TYPE_METRICS, method == "HEAD")
        if target == "/fleet":
            body = json.dumps([r.to_json(now) for r in rows], indent=1).encode()
            return http_response(200, body, "application/json", method == "HEAD")
        return http_response(404, b"try /metrics or /fleet\n", "text/plain", False)

    server = await serve_http(route, host, port)
    bound = server.sockets[0].getsockname()[1] if server.sockets else port
    print(f"fleet: serving http://{host}:{bound}/metrics and /fleet", file=sys.stderr, flush=True)
    try:
        async with server:
            await server.serve_forever()
    finally:
        client.disconnect()
        client.loop_stop()


def cmd_fleet(args: argparse.Namespace) -> int:
    opts = options(args)
    if args.serve:
        host, _, port = args.serve.rpartition(":")
        try:
            asyncio.run(serve(opts, host.strip("[]") or "0.0.0.0", int(port)))  # noqa: S104
        except KeyboardInterrupt:
            return 0
        return 0
    fleet = collect(opts)
    if fleet is None:
        return EXIT_UNREACHABLE
    now = time.time()
    rows = fleet.rows(now, opts.silent_after_s)
    try:
        if args.json:
            doc = {"gateways": [r.to_json(now) for r in rows], "at": now}
            sys.stdout.write(json.dumps(doc, indent=1) + "\n")
        else:
            sys.stdout.write(render_table(rows, now))
        sys.stdout.flush()
    except BrokenPipeError:  # `fleet | head`
        with contextlib.suppress(OSError):
            sys.stdout.close()
    if not rows:
        return EXIT_PROBLEMS
    return EXIT_OK if all(r.state == "ok" for r in rows) else EXIT_PROBLEMS


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "fleet",
        help="every gateway's status and health from the broker, as a table or metrics",
        description=__doc__.split("\n\n", 1)[1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="TOML with [broker] and [fleet] tables")
    p.add_argument("--host", help="broker host (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="broker port (default 1883)")
    p.add_argument("--username", help="MQTT user (the central consumer's)")
    p.add_argument("--password-file", dest="password_file", type=Path, help="its password")
    p.add_argument("--ca-file", dest="ca_file", type=Path, help="CA for TLS")
    p.add_argument("--cert-file", dest="cert_file", type=Path, help="client certificate")
    p.add_argument("--key-file", dest="key_file", type=Path, help="client key")
    p.add_argument("--client-id", dest="client_id", help="MQTT client id (default: random)")
    p.add_argument(
        "--silent-after", dest="silent_after_s", type=float,
        help="a gateway not heard from for longer is silent (default 600 s)",
    )  # fmt: skip
    p.add_argument(
        "--wait", dest="wait_s", type=float,
        help="seconds to gather retained messages after subscribing (default 3)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--serve", metavar="ADDR", help="serve /metrics and /fleet on HOST:PORT")
    p.set_defaults(fn=cmd_fleet)
