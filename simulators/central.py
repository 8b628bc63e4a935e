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
conflict (a re-sent event must be identical). Lines already in ``out`` are read back on
start, so dedupe survives a restart. Events and status are subscribed with Retain As
Published, so ``retained`` in a status record says whether the gateway set the flag.
Garbage is counted by reason in ``stats()["invalid"]``, never raised. paho's callbacks
only enqueue; one worker thread validates, writes and keeps the stats file fresh.

    python -m simulators.central --mqtt-host 127.0.0.1 --mqtt-port 1883 \\
        --out events.jsonl --stats stats.json

With ``consent=ConsentAPI(...)`` (or ``--http-port``) it also serves the consent registry
over HTTP (contract §5, see ``simulators.consent_api``) and publishes each change made
with ``push=True`` on ``touchpoint/v1/<store>/consent`` (§4, QoS 1, not retained),
validated against ``consent-delta.json`` first.

    python -m simulators.central --http-port 8080 --consent-token-file token \\
        --consent-script consent.toml --store nl-ams-001
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import logging
import os
import queue
import re
import secrets
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, FunctionType
from typing import IO, Any, cast

import fastjsonschema
import paho.mqtt.client as mqtt
from fastjsonschema import JsonSchemaDefinitionException, JsonSchemaValueException
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from referencing import Registry, Resource

from simulators.consent_api import ConsentAPI, Record, load_script

log = logging.getLogger(__name__)

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "gateway" / "contract" / "schemas"
TOPIC_ROOT = "touchpoint/v1"
DEFAULT_MAX_PAYLOAD = 1 << 20
STATS_INTERVAL_S = 0.2
SESSION_EXPIRY_S = 300

Key = tuple[str, str, str, int]
Stats = dict[str, Any]


class Invalid(Exception):
    """A message that breaks the contract; ``reason`` is the countable label."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class _Message:
    topic: str
    payload: bytes
    retain: bool


def _read_schemas(schema_dir: Path) -> dict[str, dict[str, Any]]:
    return {
        path.name: json.loads(path.read_text(encoding="utf-8"))
        for path in sorted(schema_dir.glob("*.json"))
    }


def load_validators(schema_dir: Path = SCHEMA_DIR) -> dict[str, Draft202012Validator]:
    """One validator per schema file, keyed by file name, resolving ``$ref`` locally."""
    schemas = _read_schemas(schema_dir)
    registry: Registry[Any] = Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in schemas.values()
    )
    return {
        name: Draft202012Validator(schema, registry=registry) for name, schema in schemas.items()
    }


# -- fast validation -----------------------------------------------------------------------
#
# jsonschema walks the schema for every instance (~1,200 events/s); fastjsonschema compiles
# it to Python once.  fastjsonschema implements drafts 04-07 (2020-12 documents get its
# draft-2019 generator), so only keywords whose meaning it shares with draft 2020-12, as the
# contract uses them, are let through; anything else (``prefixItems``, ``unevaluated*``,
# ``dependent*``, ``format``, ...) would be silently ignored by it, so it fails loudly here.
# tests/simulators/test_central.py holds the compiled validators to jsonschema's verdicts.

_ASSERTIONS = frozenset(
    {
        "type", "enum", "const", "pattern", "minLength", "minimum", "minItems", "maxItems",
        "uniqueItems", "required", "properties", "additionalProperties", "items",
        "allOf", "anyOf", "oneOf", "not", "if", "then", "else", "$ref",
    }
)  # fmt: skip
_ANNOTATIONS = frozenset({"$schema", "$id", "$defs", "title", "description", "$comment"})
_REF = re.compile(r"(?P<file>[a-z0-9-]+\.json)?(?P<pointer>#(/[^/#]+)*)?")

Check = Callable[[Any], Any]


def _check_supported(node: Any, where: str, files: set[str], *, root: bool = False) -> None:
    """Refuse a schema the compiled validator could read differently from draft 2020-12."""
    if isinstance(node, bool):
        return
    if not isinstance(node, dict):
        raise ValueError(f"{where}: a schema must be an object or a boolean")
    unknown = set(node) - _ASSERTIONS - _ANNOTATIONS
    if unknown:
        raise ValueError(f"{where}: keywords {sorted(unknown)} are not supported by the fast path")
    if "$id" in node and not root:
        raise ValueError(f"{where}: $id below the root would move $ref resolution")
    if "$ref" in node:
        # draft 2020-12 applies a $ref's siblings too; fastjsonschema ignores them.
        if set(node) - _ANNOTATIONS != {"$ref"}:
            raise ValueError(f"{where}: $ref with sibling keywords")
        ref = _REF.fullmatch(node["$ref"])
        if ref is None or ref["file"] not in (None, *files):
            raise ValueError(f"{where}: $ref {node['$ref']!r} is not to a local schema file")
    if "items" in node and not isinstance(node["items"], dict | bool):
        raise ValueError(f"{where}: array-form items is not draft 2020-12")
    for key in ("properties", "$defs"):
        for name, child in node.get(key, {}).items():
            _check_supported(child, f"{where}/{key}/{name}", files)
    for key in ("allOf", "anyOf", "oneOf"):
        for index, child in enumerate(node.get(key, [])):
            _check_supported(child, f"{where}/{key}/{index}", files)
    for key in ("items", "additionalProperties", "not", "if", "then", "else"):
        if key in node:
            _check_supported(node[key], f"{where}/{key}", files)


def _inline(node: Any, file: str, schemas: dict[str, dict[str, Any]], depth: int = 0) -> Any:
    """``node`` (from schema ``file``) with every ``$ref`` replaced by what it points to.

    The compiled code then makes no call per reference.  _check_supported has made sure a
    ``$ref`` has no sibling assertions, points into a local file and no ``$id`` moves scope.
    """
    if depth > 64:
        raise ValueError(f"{file}: $ref nesting too deep (recursive schema?)")
    if isinstance(node, list):
        return [_inline(item, file, schemas, depth) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        ref = _REF.fullmatch(node["$ref"])
        assert ref is not None  # checked by _check_supported
        target_file = ref["file"] or file
        target: Any = schemas[target_file]
        for part in (ref["pointer"] or "#").split("/")[1:]:
            target = target[part.replace("~1", "/").replace("~0", "~")]
        return _inline(target, target_file, schemas, depth + 1)
    inlined = {  # $defs only holds $ref targets, inlined by now; enum and const hold data
        key: value if key in ("enum", "const") else _inline(value, file, schemas, depth)
        for key, value in node.items()
        if key != "$defs"
    }
    return _drop_implied(inlined)


def _drop_implied(node: dict[str, Any]) -> dict[str, Any]:
    """Drop the assertions next to an ``enum`` that every one of its values already meets.

    An instance the enum accepts equals one of those values, so they can add nothing; the
    compiled code then skips them (for ``purposes``: type, items and uniqueItems).
    """
    if not isinstance(node.get("enum"), list):
        return node
    others = {key: value for key, value in node.items() if key in _ASSERTIONS - {"enum"}}
    if not others:
        return node
    implied = Draft202012Validator(others)
    if not all(implied.is_valid(value) for value in node["enum"]):
        return node
    return {key: value for key, value in node.items() if key not in others}


def _decide(condition: Any, event_type: str, has_subject: bool) -> bool | None:
    """Whether an ``if`` holds for any object with this ``type`` and ``subject`` presence.

    None when that depends on more of the instance; only the shapes event.json uses are
    decided: ``required`` of type/subject and ``properties: {type: {const: ...}}``.
    """
    if not isinstance(condition, dict) or set(condition) - {"required", "properties"}:
        return None
    holds = True
    for name in condition.get("required", []):
        if name == "subject":
            holds = holds and has_subject
        elif name != "type":  # present: the caller only asks about objects with a type
            return None
    properties = condition.get("properties", {})
    if set(properties) - {"type"}:
        return None
    if "type" in properties:
        if properties["type"].keys() != {"const"}:
            return None
        const = properties["type"]["const"]
        holds = holds and isinstance(const, str) and const == event_type
    return holds


def _specialise(node: dict[str, Any], event_type: str, has_subject: bool) -> dict[str, Any]:
    """``node`` with each decidable if/then/else replaced by the branch that applies.

    Sound because ``allOf`` is a conjunction: an ``if`` that holds adds its ``then``, one
    that fails adds its ``else``.  It spares the compiled code a raised exception per
    undecided ``if``, which is most of its time on an event (six type branches).
    """
    node = dict(node)
    if "allOf" in node:
        node["allOf"] = [
            _specialise(child, event_type, has_subject) if isinstance(child, dict) else child
            for child in node["allOf"]
        ]
    holds = _decide(node.get("if"), event_type, has_subject) if "if" in node else None
    if holds is not None:
        branch = node.pop("then", None) if holds else node.pop("else", None)
        node.pop("if")
        node.pop("then", None)
        node.pop("else", None)
        if branch is not None:
            node["allOf"] = [*node.get("allOf", []), branch]
    return node


class ContractSchemas:
    """Validate documents against the contract schemas: fast, with jsonschema's verdicts.

    The decision comes from fastjsonschema-compiled code; jsonschema only explains a
    rejection (``best_match``), which keeps the reasons as they always were.  Events are
    validated one by one with code specialised to their ``type`` and whether they carry a
    ``subject`` (compiled on first use), and a batch as its envelope plus its events.
    """

    def __init__(self, schema_dir: Path = SCHEMA_DIR) -> None:
        self._schemas = _read_schemas(schema_dir)
        self.reference = load_validators(schema_dir)
        files = set(self._schemas)
        for name, schema in self._schemas.items():
            if schema.get("$id") != name:
                raise ValueError(f"{name}: $id must be the file name, so $refs resolve to files")
            _check_supported(schema, name, files, root=True)
        self._lock = threading.Lock()
        self._compiled: dict[str, Check] = {}
        self._events: dict[tuple[str, bool], Check] = {}
        event = self._schemas.get("event.json", {})
        type_enum = event.get("properties", {}).get("type", {}).get("enum", [])
        self._event_types = frozenset(t for t in type_enum if isinstance(t, str))
        # A batch is its envelope plus one event.json per item when that is all it says.
        batch = self._schemas.get("batch.json", {})
        self._split_batch = batch.get("properties", {}).get("events", {}).get("items") == {
            "$ref": "event.json"
        }

    def _compile(self, file: str, schema: dict[str, Any]) -> Check:
        def refuse(uri: str) -> Any:  # unreachable: no $ref is left after inlining
            raise JsonSchemaDefinitionException(f"unexpected $ref to {uri!r}")

        check = fastjsonschema.compile(
            _inline(schema, file, self._schemas),
            handlers={"": refuse},
            use_default=False,
            use_formats=False,
        )
        # fastjsonschema compiles patterns with "$" rewritten to \Z; jsonschema searches with
        # the pattern as written, where "$" also matches before a final newline.  Do the same.
        patterns: dict[str, re.Pattern[str]] = cast(FunctionType, check).__globals__[
            "REGEX_PATTERNS"
        ]
        for pattern in patterns:
            patterns[pattern] = re.compile(pattern)
        return check

    def _compiled_for(self, key: str, build: Callable[[], dict[str, Any]]) -> Check:
        check = self._compiled.get(key)
        if check is None:
            with self._lock:
                check = self._compiled.get(key) or self._compile(key.partition("#")[0], build())
                self._compiled[key] = check
        return check

    def _envelope(self) -> dict[str, Any]:
        envelope = copy.deepcopy(self._schemas["batch.json"])
        del envelope["properties"]["events"]["items"]
        return envelope

    def _check_event(self, event: Any) -> None:
        event_type = event.get("type") if isinstance(event, dict) else None
        if isinstance(event_type, str) and event_type in self._event_types:
            key = (event_type, "subject" in event)
            check = self._events.get(key)
            if check is None:
                schema = self._schemas["event.json"]
                check = self._compiled_for(f"event.json#{key}", lambda: _specialise(schema, *key))
                self._events[key] = check
            check(event)
        else:
            self._compiled_for("event.json", lambda: self._schemas["event.json"])(event)

    def _check_fast(self, name: str, doc: Any) -> None:
        if name == "event.json":
            self._check_event(doc)
        elif name == "batch.json" and self._split_batch:
            self._compiled_for("batch.json#envelope", self._envelope)(doc)
            for event in doc["events"]:
                self._check_event(event)
        else:
            self._compiled_for(name, lambda: self._schemas[name])(doc)

    def is_valid(self, name: str, doc: Any) -> bool:
        """The fast decision alone."""
        try:
            self._check_fast(name, doc)
        except JsonSchemaValueException:
            return False
        return True

    def check(self, name: str, doc: Any) -> None:
        """Raise Invalid("schema") unless ``doc`` is valid against schema file ``name``."""
        try:
            self._check_fast(name, doc)
        except JsonSchemaValueException as exc:
            error = best_match(self.reference[name].iter_errors(doc))
            if error is None:  # never seen: the tests hold both to the same verdicts
                raise Invalid("schema", f"{name}: {exc.message[:200]}") from None
            where = "/".join(str(part) for part in error.absolute_path) or "<top>"
            raise Invalid("schema", f"{name} at {where}: {error.message[:200]}") from None


_CACHE: dict[tuple[Path, tuple[tuple[str, str], ...]], ContractSchemas] = {}
_CACHE_LOCK = threading.Lock()


def contract_schemas(schema_dir: Path = SCHEMA_DIR) -> ContractSchemas:
    """A shared ContractSchemas per schema directory and content: compiling takes ~50 ms."""
    texts = tuple(
        (path.name, path.read_text(encoding="utf-8")) for path in sorted(schema_dir.glob("*.json"))
    )
    key = (schema_dir.resolve(), texts)
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = ContractSchemas(schema_dir)
        return _CACHE[key]


def _digest(event: dict[str, Any]) -> str:
    canonical = json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


class Central:
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
        self.topics = [f"{TOPIC_ROOT}/{store or '+'}/+/{kind}" for kind in ("events", "status")]
        self._schemas = contract_schemas(schema_dir)
        self._queue: queue.Queue[_Message | None] = queue.Queue()
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self._worker: threading.Thread | None = None
        self._out: IO[str] | None = None
        self._seen: dict[Key, str] = {}  # key -> digest of the event, to spot conflicts
        self._streams: dict[str, dict[str, int]] = {}
        self._status: dict[str, dict[str, Any]] = {}
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

    def __enter__(self) -> Central:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

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
        if parts[4] not in ("events", "status"):
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
        stream = doc["stream"]
        info = self._streams.setdefault(f"{store}/{device}/{stream}", {"last_seq": -1, "count": 0})
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
        prog="python -m simulators.central",
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
