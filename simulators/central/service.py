"""A fake central identity service: the consumer side of the MQTT contract (v1, section 4).

An independent implementation: it imports nothing from ``gateway`` or ``drivers`` and
reads the JSON Schemas in ``gateway/contract/schemas/`` as data, so the gateway and this
consumer are two implementations held against one contract.

    central = Central("127.0.0.1", broker.port, out=tmp / "events.jsonl")
    central.start()
    central.wait_subscribed()
    ...                                     # run a gateway against the same broker
    central.wait_for(lambda s: s["accepted"] >= 3)
    central.stop()

It subscribes with QoS 1 to ``touchpoint/v1/+/+/events`` and ``.../status``, validates
every message (schema, topic store/device equal to the payload's, strictly increasing
``seq`` within a batch, events not retained), dedupes events on the idempotency key
(store, device, stream, seq) and appends each newly accepted event as one JSON line to
``out``. A duplicate whose content differs from the first copy is also counted as a
conflict (a re-sent event must be identical). A batch with no events and ``skipped``
(seq ranges the gateway declares will never be sent, after a power cut) is recorded per
stream: ``skipped(stream)``; ``gaps()`` is the consumer's rule, the seqs neither received
nor declared. Lines already in ``out`` are read back on start, so dedupe survives a
restart (declarations are kept in memory only). Events and status are subscribed with
Retain As Published, so ``retained`` in a status record says whether the gateway set the
flag.
Garbage is counted by reason in ``stats()["invalid"]``, never raised. paho's callbacks
only enqueue; one worker thread validates, writes and keeps the stats file fresh.

    python -m simulators.central.service --mqtt-host 127.0.0.1 --mqtt-port 1883 \\
        --out events.jsonl --stats stats.json

With ``consent=ConsentAPI(...)`` (or ``--http-port``) it also serves the consent registry
over HTTP (contract §5, see ``simulators.central.consent_api``) and publishes each change made
with ``push=True`` on ``touchpoint/v1/<store>/consent`` (§4, QoS 1, not retained),
validated against ``consent-delta.json`` first.

    python -m simulators.central.service --http-port 8080 --consent-token-file token \\
        --consent-script consent.toml --store nl-ams-001
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import queue
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

from simulators.deps import missing

try:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode
    from paho.mqtt.subscribeoptions import SubscribeOptions
except ModuleNotFoundError as exc:
    raise missing(exc, "the fake central") from exc

from simulators.central.consent_api import ConsentAPI, Record, load_script
from simulators.central.contract_schemas import (
    SCHEMA_DIR,
    Invalid,
    contract_schemas,
)
from simulators.infra.service import Service

log = logging.getLogger(__name__)

TOPIC_ROOT = "touchpoint/v1"
DEFAULT_MAX_PAYLOAD = 1 << 20
STATS_INTERVAL_S = 0.2
HEALTH_KEPT = 100  # health messages kept per gateway
SESSION_EXPIRY_S = 300

Key = tuple[str, str, str, int]
Stats = dict[str, Any]


@dataclass(frozen=True)
class _Message:
    topic: str
    payload: bytes
    retain: bool


def _digest(event: dict[str, Any]) -> str:
    canonical = json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


class Central(Service):
    """The consumer: connect, subscribe, validate, dedupe, record.  Thread-safe reads."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        out: Path | None = None,
        stats_path: Path | None = None,
        store: str | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        schema_dir: Path = SCHEMA_DIR,
        consent: ConsentAPI | None = None,
    ) -> None:
        self.host, self.port = host, port
        self.consent = consent
        if consent is not None:
            consent.on_change = self.push_consent
        self.out_path, self.stats_path = out, stats_path
        self.max_payload = max_payload
        self.topics = [
            f"{TOPIC_ROOT}/{store or '+'}/+/{kind}" for kind in ("events", "status", "health")
        ]
        self._schemas = contract_schemas(schema_dir)
        self._queue: queue.Queue[_Message | None] = queue.Queue()
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._worker: threading.Thread | None = None
        self._out: IO[str] | None = None
        self._seen: dict[Key, str] = {}  # key -> digest of the event, to spot conflicts
        self._streams: dict[str, dict[str, int]] = {}
        self._skipped: dict[str, set[tuple[int, int]]] = {}  # store/device/stream -> ranges
        self._status: dict[str, dict[str, Any]] = {}
        self._health: dict[str, list[dict[str, Any]]] = {}  # every health message, by gateway
        self._invalid: dict[str, int] = {}
        self._last_invalid: dict[str, str] | None = None
        self._counts = dict.fromkeys(
            (
                "messages",
                "batches",
                "accepted",
                "duplicates",
                "conflicts",
                "reordered",
                "restored",
                "connects",
                "consent_pushes",
                "declarations",
            ),
            0,
        )
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"central-{os.getpid()}-{secrets.token_hex(4)}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self._client.reconnect_delay_set(min_delay=1, max_delay=4)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Restore ``out``, then connect in the background (retrying with backoff)."""
        if self.out_path is not None:
            self._restore(self.out_path)
            self._out = self.out_path.open("a", encoding="utf-8")
        if self.consent is not None:
            self.consent.start()
        self._write_stats()
        self._worker = threading.Thread(target=self._run, name="central-worker", daemon=True)
        self._worker.start()
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = SESSION_EXPIRY_S
        # clean_start=False from the first connect: mosquitto restores a persisted session
        # across its own restart only for a session that was never clean-started.
        self._client.connect_async(
            self.host, self.port, keepalive=5, clean_start=False, properties=props
        )
        self._client.loop_start()

    def stop(self) -> None:
        """Disconnect, process what was already received, write the stats a last time."""
        if self.consent is not None:
            self.consent.stop()
        self._client.disconnect()
        self._client.loop_stop()
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
            self._worker = None
        if self._out is not None:
            self._out.close()
            self._out = None
        self._write_stats()

    def push_consent(self, store: str, records: list[Record]) -> mqtt.MQTTMessageInfo:
        """Publish a consent delta to the store's gateways (QoS 1, not retained)."""
        doc = {"v": 1, "records": records}
        self._schemas.check("consent-delta.json", doc)
        payload = json.dumps(doc, separators=(",", ":")).encode()
        with self._cond:
            self._counts["consent_pushes"] += 1
        return self._client.publish(f"{TOPIC_ROOT}/{store}/consent", payload, qos=1)

    # -- reading state -----------------------------------------------------------------

    def stats(self) -> Stats:
        with self._cond:
            return self._snapshot()

    def accepted_keys(self) -> set[Key]:
        with self._cond:
            return set(self._seen)

    def skipped(self, stream: str) -> list[tuple[int, int]]:
        """The seq ranges declared skipped for ``store/device/stream``, sorted."""
        with self._cond:
            return sorted(self._skipped.get(stream, ()))

    def gaps(self) -> dict[str, list[int]]:
        """Per ``store/device/stream``: seqs from 1 to the highest received that were
        neither received nor declared skipped (the consumer's rule; empty once drained)."""
        with self._cond:
            got: dict[str, set[int]] = {}
            for store, device, stream, seq in self._seen:
                got.setdefault(f"{store}/{device}/{stream}", set()).add(seq)
            out: dict[str, list[int]] = {}
            for name, seqs in got.items():
                declared = self._skipped.get(name, set())
                missing = [
                    s
                    for s in range(1, max(seqs) + 1)
                    if s not in seqs and not any(lo <= s <= hi for lo, hi in declared)
                ]
                if missing:
                    out[name] = missing
            return out

    def wait_subscribed(self, timeout: float = 10.0) -> bool:
        return self._subscribed.wait(timeout)

    def wait_for(self, predicate: Callable[[Stats], bool], timeout: float = 10.0) -> Stats:
        """Block until ``predicate(stats)`` holds; raise TimeoutError with the stats if not."""
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self._snapshot()), timeout):
                raise TimeoutError(f"central: condition not met in {timeout}s: {self._snapshot()}")
            return self._snapshot()

    def _snapshot(self) -> Stats:
        return {
            **self._counts,
            "invalid": dict(self._invalid),
            "invalid_total": sum(self._invalid.values()),
            "last_invalid": self._last_invalid,
            "status": {device: dict(status) for device, status in self._status.items()},
            "streams": {stream: dict(info) for stream, info in self._streams.items()},
            "skipped": {stream: sorted(r) for stream, r in self._skipped.items()},
            "connected": self._client.is_connected(),
            "subscribed": self._subscribed.is_set(),
        }

    # -- paho callbacks: enqueue and flag only ---------------------------------------------

    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            log.warning("central: broker refused the connection: %s", reason_code)
            return
        self._counts["connects"] += 1
        # Retain As Published: the retain flag then tells whether the sender set it.
        options = SubscribeOptions(qos=1, retainAsPublished=True)
        client.subscribe([(topic, options) for topic in self.topics])

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if any(code.is_failure for code in reason_codes):
            log.error("central: subscription refused: %s", reason_codes)
        else:
            self._subscribed.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._subscribed.clear()
        log.info("central: disconnected (%s); reconnecting", reason_code)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._queue.put(_Message(msg.topic, bytes(msg.payload), bool(msg.retain)))

    # -- worker ------------------------------------------------------------------------------

    def _run(self) -> None:
        next_write = time.monotonic() + STATS_INTERVAL_S
        while True:
            try:
                item = self._queue.get(timeout=STATS_INTERVAL_S)
            except queue.Empty:
                pass
            else:
                if item is None:
                    return
                with self._cond:
                    self._handle(item)
                    self._cond.notify_all()
            if time.monotonic() >= next_write:
                self._write_stats()
                next_write = time.monotonic() + STATS_INTERVAL_S

    def _handle(self, msg: _Message) -> None:
        self._counts["messages"] += 1
        try:
            store, device, kind = self._parse_topic(msg.topic)
            doc = self._decode(msg.payload)
            if kind == "events":
                self._accept_batch(store, device, doc, msg.retain)
            elif kind == "health":
                self._record_health(store, device, doc, msg.retain)
            else:
                self._record_status(store, device, doc, msg.retain)
        except Invalid as exc:
            self._invalid[exc.reason] = self._invalid.get(exc.reason, 0) + 1
            self._last_invalid = {"reason": exc.reason, "topic": msg.topic, "detail": exc.detail}
            log.warning("central: invalid message on %s: %s", msg.topic, exc)

    @staticmethod
    def _parse_topic(topic: str) -> tuple[str, str, str]:
        parts = topic.split("/")
        if len(parts) != 5 or "/".join(parts[:2]) != TOPIC_ROOT:
            raise Invalid("topic", "not touchpoint/v1/<store>/<device>/<kind>")
        if parts[4] not in ("events", "status", "health"):
            raise Invalid("topic", f"unknown kind {parts[4][:32]!r}")
        return parts[2], parts[3], parts[4]

    def _decode(self, payload: bytes) -> Any:
        if not payload:
            raise Invalid("empty", "zero-length payload")
        if len(payload) > self.max_payload:
            raise Invalid("too_large", f"{len(payload)} bytes > {self.max_payload}")
        try:
            text = payload.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Invalid("not_utf8", str(exc)) from None
        try:
            return json.loads(text, parse_constant=_reject_constant)
        except ValueError as exc:
            raise Invalid("not_json", str(exc)[:200]) from None

    def _validate(self, schema: str, doc: Any) -> None:
        self._schemas.check(schema, doc)

    def _accept_batch(self, store: str, device: str, doc: Any, retained: bool) -> None:
        self._validate("batch.json", doc)
        if (doc["store"], doc["device"]) != (store, device):
            raise Invalid("topic_mismatch", "payload store/device differ from the topic's")
        seqs = [event["seq"] for event in doc["events"]]
        if any(b <= a for a, b in itertools.pairwise(seqs)):
            raise Invalid("seq_order", "seq not strictly increasing within the batch")
        if retained:
            raise Invalid("retained", "events must not be published retained")
        skipped = [(int(lo), int(hi)) for lo, hi in doc.get("skipped", [])]
        if any(lo > hi for lo, hi in skipped):
            raise Invalid("skipped_range", "a skipped range with lo above hi")
        stream = doc["stream"]
        info = self._streams.setdefault(f"{store}/{device}/{stream}", {"last_seq": -1, "count": 0})
        if skipped:
            self._skipped.setdefault(f"{store}/{device}/{stream}", set()).update(skipped)
            self._counts["declarations"] += 1
        lines = []
        for event in doc["events"]:
            key = (store, device, stream, event["seq"])
            digest = _digest(event)
            if key in self._seen:
                self._counts["duplicates"] += 1
                if self._seen[key] != digest:
                    self._counts["conflicts"] += 1
                    log.warning("central: duplicate %s with different content", key)
                continue
            self._seen[key] = digest
            self._counts["accepted"] += 1
            if event["seq"] < info["last_seq"]:
                self._counts["reordered"] += 1
            info["last_seq"] = max(info["last_seq"], event["seq"])
            info["count"] += 1
            line = {"store": store, "device": device, "stream": stream, **event}
            lines.append(json.dumps(line, separators=(",", ":"), ensure_ascii=False) + "\n")
        self._counts["batches"] += 1
        if self._out is not None and lines:
            self._out.writelines(lines)
            self._out.flush()

    def _record_status(self, store: str, device: str, doc: Any, retained: bool) -> None:
        self._validate("status.json", doc)
        self._status[f"{store}/{device}"] = {
            "state": doc["state"],
            "ts": doc["ts"],
            "version": doc["version"],
            "retained": retained,
            "received": time.time(),
        }

    def _record_health(self, store: str, device: str, doc: Any, retained: bool) -> None:
        self._validate("health.json", doc)
        kept = self._health.setdefault(f"{store}/{device}", [])
        kept.append({**doc, "retained": retained, "received": time.time()})
        del kept[:-HEALTH_KEPT]

    def health(self, gateway: str) -> list[dict[str, Any]]:
        """The health messages of ``store/device`` received so far (the newest last)."""
        with self._cond:
            return [dict(h) for h in self._health.get(gateway, [])]

    def wait_health(
        self, gateway: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30
    ) -> dict[str, Any]:
        """Wait for a health message of ``gateway`` that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for doc in reversed(self._health.get(gateway, [])):
                    if predicate(doc):
                        return dict(doc)
                left = deadline - time.monotonic()
                if left <= 0:
                    got = self._health.get(gateway, [])[-1:]
                    raise TimeoutError(f"no matching health message from {gateway}; last {got}")
                self._cond.wait(min(left, 0.5))

    def _restore(self, path: Path) -> None:
        """Read back accepted events from an earlier run, so dedupe survives a restart."""
        if not path.exists():
            return
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                try:
                    event = json.loads(line)
                    where = (event.pop("store"), event.pop("device"), event.pop("stream"))
                    key: Key = (*where, int(event["seq"]))
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # a line cut short when an earlier run was killed
                self._seen[key] = _digest(event)
                info = self._streams.setdefault("/".join(key[:3]), {"last_seq": -1, "count": 0})
                info["last_seq"] = max(info["last_seq"], key[3])
                info["count"] += 1
                self._counts["restored"] += 1

    def _write_stats(self) -> None:
        if self.stats_path is None:
            return
        with self._cond:
            text = json.dumps(self._snapshot(), indent=2, sort_keys=True)
        tmp = self.stats_path.with_name(f".{self.stats_path.name}.tmp")
        tmp.write_text(text + "\n", encoding="utf-8")
        tmp.replace(self.stats_path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.central.service",
        description="Fake central identity service: consume, validate and dedupe gateway "
        "events from an MQTT broker (contract v1).",
    )
    parser.add_argument("--mqtt-host", default="127.0.0.1", help="broker host (127.0.0.1)")
    parser.add_argument("--mqtt-port", type=int, default=1883, help="broker port (1883)")
    parser.add_argument("--out", type=Path, help="append accepted events here, one JSON line each")
    parser.add_argument("--stats", type=Path, help="keep a JSON stats file here, rewritten ~5/s")
    parser.add_argument("--store", help="only subscribe to this store's topics")
    parser.add_argument(
        "--max-payload",
        type=int,
        default=DEFAULT_MAX_PAYLOAD,
        help="reject larger messages as too_large (bytes)",
    )
    parser.add_argument(
        "--http-port", type=int, help="serve the consent registry API on 127.0.0.1:PORT"
    )
    parser.add_argument(
        "--consent-token-file", type=Path, help="file holding the bearer token it accepts"
    )
    parser.add_argument(
        "--consent-script", type=Path, help="JSON or TOML [[steps]] of consent changes"
    )
    parser.add_argument("--log-level", default="WARNING", help="logging level (WARNING)")
    args = parser.parse_args(argv)
    consent = None
    if args.http_port is not None:
        if args.consent_token_file is None or args.store is None:
            parser.error("--http-port needs --consent-token-file and --store")
        token = args.consent_token_file.read_text(encoding="utf-8").strip()
        consent = ConsentAPI(token=token, port=args.http_port)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )

    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    central = Central(
        args.mqtt_host,
        args.mqtt_port,
        out=args.out,
        stats_path=args.stats,
        store=args.store,
        max_payload=args.max_payload,
        consent=consent,
    )
    central.start()
    if consent is not None:
        print(f"central: consent API on {consent.base_url}", flush=True)
        if args.consent_script is not None:
            consent.run_script(load_script(args.consent_script), args.store)
    where = f"mqtt://{args.mqtt_host}:{args.mqtt_port}"
    if central.wait_subscribed(timeout=5.0):
        print(f"central: listening on {where}, topics {' '.join(central.topics)}", flush=True)
    else:
        print(f"central: listening on {where} (broker not reachable yet, retrying)", flush=True)
    while not stopping.wait(0.5):
        pass
    central.stop()
    stats = central.stats()
    print(
        f"central: stopped; accepted {stats['accepted']}, duplicates {stats['duplicates']}, "
        f"invalid {stats['invalid_total']}",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
