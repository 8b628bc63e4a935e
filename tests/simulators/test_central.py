"""The fake central against a real mosquitto, fed by plain paho with hand-built payloads."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from simulators.central.contract_schemas import ContractSchemas, Invalid, contract_schemas
from simulators.central.service import Central
from simulators.infra.broker import Mosquitto
from tests.gateway.contract.test_contract_schemas import (
    BAD_EVENTS,
    EXAMPLES,
    RECEIPT,
    REGISTRY,
    _mutate,
)
from tests.gateway.contract.test_contract_schemas import batch as contract_batch

ROOT = Path(__file__).resolve().parents[2]
STORE, DEVICE, STREAM = "nl-ams-001", "gw-01", "00112233aabbccdd"
EVENTS_TOPIC = f"touchpoint/v1/{STORE}/{DEVICE}/events"
STATUS_TOPIC = f"touchpoint/v1/{STORE}/{DEVICE}/status"
SUBJECT = "k1:y12r74-dyodquqc6XBqP4A"


def presence(seq: int) -> dict[str, Any]:
    return {
        "seq": seq,
        "type": "presence.enter",
        "ts": "2026-11-22T10:15:00Z",
        "source": "entrance-ble",
        "subject": SUBJECT,
        "purposes": ["analytics"],
        "attrs": {"zone": "entrance", "rssi": -60 - seq},
    }


def footfall(seq: int) -> dict[str, Any]:
    return {
        "seq": seq,
        "type": "footfall",
        "ts": "2026-11-22T10:15:00Z",
        "source": "door-cam",
        "purposes": [],
        "attrs": {
            "zone": "entrance",
            "window_start": "2026-11-22T10:00:00Z",
            "window_s": 900,
            "count": 5,
        },
    }


def batch(*events: dict[str, Any], store: str = STORE, stream: str = STREAM) -> bytes:
    doc = {"v": 1, "store": store, "device": DEVICE, "stream": stream, "events": list(events)}
    return json.dumps(doc).encode()


def status(state: str) -> bytes:
    doc = {"v": 1, "state": state, "ts": "2026-11-22T10:00:00Z", "version": "0.1.0"}
    return json.dumps(doc).encode()


def new_client() -> mqtt.Client:
    return mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)


class Publisher:
    def __init__(self, port: int) -> None:
        self.client = new_client()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=5)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(broker: Mosquitto) -> Iterator[Publisher]:
    pub = Publisher(broker.port)
    yield pub
    pub.close()


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "events.jsonl"


@pytest.fixture
def central(broker: Mosquitto, out: Path, tmp_path: Path) -> Iterator[Central]:
    c = Central("127.0.0.1", broker.port, out=out, stats_path=tmp_path / "stats.json")
    c.start()
    assert c.wait_subscribed(5)
    yield c
    c.stop()


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_valid_batches_are_accepted_and_written_one_line_per_event(
    central: Central, publisher: Publisher, out: Path
) -> None:
    publisher.publish(EVENTS_TOPIC, batch(presence(1), footfall(2)))
    publisher.publish(EVENTS_TOPIC, batch(presence(3)))
    other_stream = "ffeeddccbbaa9988"
    publisher.publish(EVENTS_TOPIC, batch(presence(1), stream=other_stream))

    stats = central.wait_for(lambda s: s["accepted"] == 4, timeout=5)
    assert (stats["batches"], stats["duplicates"], stats["invalid"]) == (3, 0, {})
    assert lines(out) == [
        {"store": STORE, "device": DEVICE, "stream": STREAM, **presence(1)},
        {"store": STORE, "device": DEVICE, "stream": STREAM, **footfall(2)},
        {"store": STORE, "device": DEVICE, "stream": STREAM, **presence(3)},
        {"store": STORE, "device": DEVICE, "stream": other_stream, **presence(1)},
    ]
    assert central.accepted_keys() == {
        (STORE, DEVICE, STREAM, 1),
        (STORE, DEVICE, STREAM, 2),
        (STORE, DEVICE, STREAM, 3),
        (STORE, DEVICE, other_stream, 1),
    }
    assert stats["streams"][f"{STORE}/{DEVICE}/{STREAM}"] == {"last_seq": 3, "count": 3}


def test_duplicates_are_counted_and_not_written_again(
    central: Central, publisher: Publisher, out: Path
) -> None:
    publisher.publish(EVENTS_TOPIC, batch(presence(1), presence(2)))
    publisher.publish(EVENTS_TOPIC, batch(presence(1), presence(2)))  # a redelivery
    publisher.publish(EVENTS_TOPIC, batch(presence(2), presence(3)))  # overlapping
    changed = presence(3) | {"source": "somewhere-else"}
    publisher.publish(EVENTS_TOPIC, batch(changed))  # same key, other content: a gateway bug

    stats = central.wait_for(lambda s: s["batches"] == 4, timeout=5)
    assert (stats["accepted"], stats["duplicates"], stats["conflicts"]) == (3, 4, 1)
    assert lines(out)[2]["source"] == "entrance-ble"
    assert [line["seq"] for line in lines(out)] == [1, 2, 3]


def test_dedupe_survives_a_restart_of_central(
    broker: Mosquitto, publisher: Publisher, out: Path
) -> None:
    with Central("127.0.0.1", broker.port, out=out) as first:
        assert first.wait_subscribed(5)
        publisher.publish(EVENTS_TOPIC, batch(presence(1), presence(2)))
        first.wait_for(lambda s: s["accepted"] == 2, timeout=5)
    with Central("127.0.0.1", broker.port, out=out) as second:
        assert second.wait_subscribed(5)
        assert second.stats()["restored"] == 2
        publisher.publish(EVENTS_TOPIC, batch(presence(2), presence(3)))
        stats = second.wait_for(lambda s: s["batches"] == 1, timeout=5)
    assert (stats["accepted"], stats["duplicates"], stats["conflicts"]) == (1, 1, 0)
    assert [line["seq"] for line in lines(out)] == [1, 2, 3]


def test_invalid_messages_are_counted_by_reason_and_never_stop_it(
    central: Central, publisher: Publisher, out: Path
) -> None:
    bad_schema = footfall(1) | {"subject": SUBJECT}
    garbage: list[tuple[bytes | str, bool]] = [
        (b"", False),
        (b"\xff\xfe not utf-8", False),
        ("{not json", False),
        ('{"v": NaN}', False),
        ("[1, 2, 3]", False),
        (batch(bad_schema), False),
        (batch(presence(1))[:-1], False),
        (
            json.dumps({"v": 1, "store": STORE, "device": DEVICE, "stream": STREAM, "events": []}),
            False,
        ),
        (batch(presence(2), presence(1)), False),
        (batch(presence(5), presence(5)), False),
        (batch(presence(1)), True),
        (b"x" * (2 << 20), False),
        (status("online"), False),  # a status on the events topic
    ]
    for payload, retain in garbage:
        publisher.publish(EVENTS_TOPIC, payload, retain=retain)
    publisher.publish(STATUS_TOPIC, "offline")
    publisher.publish(EVENTS_TOPIC, batch(presence(1)))  # still alive

    stats = central.wait_for(lambda s: s["accepted"] == 1, timeout=10)
    assert stats["invalid"] == {
        "empty": 1,
        "not_utf8": 1,
        "not_json": 4,
        "schema": 4,
        "seq_order": 2,
        "retained": 1,
        "too_large": 1,
    }
    assert stats["messages"] == len(garbage) + 2
    assert stats["status"] == {}
    assert [line["seq"] for line in lines(out)] == [1]


def test_a_batch_whose_store_differs_from_its_topic_is_rejected(
    central: Central, publisher: Publisher, out: Path
) -> None:
    publisher.publish(EVENTS_TOPIC, batch(presence(1), store="de-ber-002"))
    publisher.publish(f"touchpoint/v1/{STORE}/gw-02/events", batch(presence(1)))

    stats = central.wait_for(lambda s: s["messages"] == 2, timeout=5)
    assert stats["invalid"] == {"topic_mismatch": 2}
    assert stats["last_invalid"]["topic"] == f"touchpoint/v1/{STORE}/gw-02/events"
    assert stats["accepted"] == 0
    assert lines(out) == []


def test_retained_status_and_the_offline_will_are_recorded(
    broker: Mosquitto, publisher: Publisher
) -> None:
    publisher.publish(STATUS_TOPIC, status("online"), retain=True)
    with Central("127.0.0.1", broker.port) as central:  # subscribes after the publish
        stats = central.wait_for(lambda s: f"{STORE}/{DEVICE}" in s["status"], timeout=5)
        recorded = stats["status"][f"{STORE}/{DEVICE}"]
        assert (recorded["state"], recorded["version"], recorded["retained"]) == (
            "online",
            "0.1.0",
            True,
        )

        gateway = new_client()
        gateway.will_set(f"touchpoint/v1/{STORE}/gw-02/status", status("offline"), 1, True)
        gateway.connect("127.0.0.1", broker.port)
        gateway.loop_start()
        try:
            # MQTT 5 reason code 0x04: disconnect and have the broker publish the will.
            gateway.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=4))
        finally:
            gateway.loop_stop()
        stats = central.wait_for(lambda s: f"{STORE}/gw-02" in s["status"], timeout=5)
        assert stats["status"][f"{STORE}/gw-02"]["state"] == "offline"
        assert stats["status"][f"{STORE}/gw-02"]["retained"] is True

        # Subscribed with Retain As Published: a live status sent without retain shows it.
        publisher.publish(f"touchpoint/v1/{STORE}/gw-03/status", status("online"))
        stats = central.wait_for(lambda s: f"{STORE}/gw-03" in s["status"], timeout=5)
        assert stats["status"][f"{STORE}/gw-03"]["retained"] is False


def test_reconnects_after_the_broker_restarts(
    broker: Mosquitto, central: Central, out: Path
) -> None:
    broker.stop()
    broker.start()
    assert central.wait_subscribed(10)
    pub = Publisher(broker.port)
    try:
        pub.publish(EVENTS_TOPIC, batch(presence(1)))
        stats = central.wait_for(lambda s: s["accepted"] == 1, timeout=5)
    finally:
        pub.close()
    assert stats["connects"] == 2


def test_cli_runs_until_sigterm_and_leaves_its_stats(
    broker: Mosquitto, publisher: Publisher, tmp_path: Path
) -> None:
    out, stats_path = tmp_path / "events.jsonl", tmp_path / "stats.json"
    command = [sys.executable, "-m", "simulators.central.service", "--mqtt-host", "127.0.0.1"]
    command += ["--mqtt-port", str(broker.port), "--out", str(out), "--stats", str(stats_path)]
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith(f"central: listening on mqtt://127.0.0.1:{broker.port}")
        publisher.publish(EVENTS_TOPIC, batch(presence(1), presence(2)))
        publisher.publish(EVENTS_TOPIC, "garbage")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if out.exists() and len(out.read_text(encoding="utf-8").splitlines()) == 2:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "accepted 2" in rest
    stats = json.loads(stats_path.read_text(encoding="utf-8"))
    assert (stats["accepted"], stats["invalid"], stats["messages"]) == (2, {"not_json": 1}, 2)
    assert [line["seq"] for line in lines(out)] == [1, 2]


# -- the compiled validator against jsonschema ---------------------------------------------
#
# The central decides with fastjsonschema-compiled code (specialised per event type, $refs
# inlined, redundant enum siblings dropped) for speed; jsonschema, through the contract
# tests' own registry, stays the reference.  Every document here must get the same verdict.

FAST = contract_schemas()
SCHEMA_NAMES = (
    "event.json",
    "batch.json",
    "status.json",
    "consent-delta.json",
    "consent-response.json",
)
REFERENCE = {
    name: Draft202012Validator(REGISTRY.contents(name), registry=REGISTRY) for name in SCHEMA_NAMES
}
ONLINE = {"v": 1, "state": "online", "ts": "2026-11-22T10:15:00Z", "version": "0.1.0"}


def same_verdict(name: str, doc: Any) -> bool:
    """Assert the fast and the reference validator agree on ``doc``; return the verdict."""
    expected = REFERENCE[name].is_valid(doc)
    assert FAST.is_valid(name, doc) is expected, (name, expected, doc)
    try:
        FAST.check(name, doc)
    except Invalid as exc:
        assert not expected, (name, exc, doc)
        assert exc.reason == "schema"
    else:
        assert expected, (name, doc)
    return expected


def both_ways(event: Any) -> list[bool]:
    """An event alone and inside a batch (also with a valid event around it)."""
    return [
        same_verdict("event.json", event),
        same_verdict("batch.json", contract_batch(event)),
        same_verdict(
            "batch.json", contract_batch(EXAMPLES["footfall"], event, EXAMPLES["qr.scan"])
        ),
    ]


def edge_values() -> list[Any]:
    """Values on the edges where draft 2020-12, jsonschema and fastjsonschema could part.

    Only what json.loads can return: the central validates nothing else (a tuple, say, is an
    array to fastjsonschema but not to jsonschema).
    """
    return [
        None, True, False, 0, 1, -1, 1.0, 0.0, -0.0, 1.5, 2**64, -(2**64), "", "\n", [], {},
        [None], {"": None}, "1", "true",
        "nl-ams-001\n", "0123456789abcdef\n", "2026-11-22T10:15:00Z\n", "2026-11-22T10:15:00z",
        "k1:y12r74-dyodquqc6XBqP4A\n", RECEIPT + "\n", RECEIPT.lower(), "till-2\n",
        ["analytics", "linking"], ["analytics", "analytics"], ["ANALYTICS"],
        [True], [1], [["analytics"]],
    ]  # fmt: skip


def test_fast_validator_matches_jsonschema_on_the_contract_corpus(vectors: dict[str, Any]) -> None:
    verdicts: dict[str, list[bool]] = {"event": [], "batch": [], "status": [], "consent": []}
    for example in EXAMPLES.values():
        verdicts["event"] += both_ways(example)
    for kind, path, value in BAD_EVENTS.values():
        verdicts["event"] += both_ways(_mutate(kind, path, value))
    for chosen in ([], ["analytics", "marketing"], ["marketing", "linking"], ["x"]):
        verdicts["event"] += both_ways(_mutate("card.read", ("purposes",), chosen))
    for case in vectors["pseudonyms"]:
        verdicts["event"] += both_ways(_mutate("card.read", ("subject",), case["pseudonym"]))
    for case in vectors["receipt_tokens"]:
        verdicts["event"] += both_ways(
            _mutate("receipt.printed", ("attrs", "receipt"), case["token"])
        )
    # Every example's attrs under every type, with and without a subject.
    for kind, example in EXAMPLES.items():
        for other in EXAMPLES.values():
            event = _mutate(kind, ("attrs",), copy.deepcopy(other["attrs"]))
            verdicts["event"] += both_ways(event)
            verdicts["event"] += both_ways(_mutate(kind, ("type",), other["type"]))
            if "subject" in example:
                verdicts["event"] += both_ways({k: v for k, v in event.items() if k != "subject"})
    # Each leaf of each example, set to each edge value.
    for kind, example in EXAMPLES.items():
        leaves = [(key,) for key in example] + [("attrs", key) for key in example["attrs"]]
        for path in leaves:
            for value in edge_values():
                verdicts["event"] += both_ways(_mutate(kind, path, value))
    for value in [*edge_values(), *EXAMPLES.values(), "[1]"]:
        verdicts["event"] += both_ways(value)
        verdicts["batch"].append(same_verdict("batch.json", value))
        verdicts["status"].append(same_verdict("status.json", value))

    good = contract_batch(*EXAMPLES.values())
    verdicts["batch"].append(same_verdict("batch.json", good))
    for key in good:
        for value in [*edge_values(), "NL-AMS-001", "-gw", "0123456789ABCDEF", "a" * 33]:
            verdicts["batch"].append(same_verdict("batch.json", {**good, key: value}))
        verdicts["batch"].append(
            same_verdict("batch.json", {k: v for k, v in good.items() if k != key})
        )
    verdicts["batch"].append(same_verdict("batch.json", {**good, "extra": True}))

    verdicts["status"].append(same_verdict("status.json", ONLINE))
    for key in ONLINE:
        for value in [*edge_values(), "offline", "sleeping", "2026-11-22T10:15:00.1Z"]:
            verdicts["status"].append(same_verdict("status.json", {**ONLINE, key: value}))
        verdicts["status"].append(
            same_verdict("status.json", {k: v for k, v in ONLINE.items() if k != key})
        )

    records = [
        {"subject": case["pseudonym"], "purposes": ["analytics", "linking"], "expires": None}
        for case in vectors["pseudonyms"]
    ]
    records += [
        {"subject": EXAMPLES["card.read"]["subject"], "purposes": [], "expires": expires}
        for expires in ("2027-01-01T00:00:00.25+01:00", "2026-11-22T10:15:00Z", "2026-11-22", 0)
    ]
    for record in records:
        for doc in (
            {"v": 1, "records": [record]},
            {"cursor": "c-42", "reset": False, "records": [record]},
            {"cursor": "c-42", "reset": "no", "records": [record]},
        ):
            for name in ("consent-delta.json", "consent-response.json"):
                verdicts["consent"].append(same_verdict(name, doc))

    for kind, found in verdicts.items():
        assert True in found and False in found, kind  # the corpus exercises both verdicts


# Values a mutation may put in: edge cases, pieces of valid events, strings from the
# contract's own patterns (with and without a trailing newline), and arbitrary JSON.
PATTERNS = sorted(
    {
        "^[a-z0-9][a-z0-9-]{0,31}$",
        "^[0-9a-f]{16}$",
        "^[a-z0-9]{1,16}:[A-Za-z0-9_-]{22}$",
        "^[A-Z2-7]{16,}$",
        "^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])T([01][0-9]|2[0-3]):[0-5][0-9]:"
        "([0-5][0-9]|60)Z$",
    }
)
PIECES = [
    piece
    for example in EXAMPLES.values()
    for piece in (
        example["attrs"],
        example["purposes"],
        example["type"],
        *example["attrs"].values(),
    )
]
KEYS = sorted(
    {key for example in EXAMPLES.values() for key in (*example, *example["attrs"])}
    | {"v", "store", "device", "stream", "events", "state", "version", "extra"}
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
PATTERN_STRINGS = st.sampled_from(PATTERNS).flatmap(lambda p: st.from_regex(p, fullmatch=True))
SUFFIXES = st.sampled_from(["", "\n", " ", "x", "\n\n"])
VALUES = st.one_of(
    st.sampled_from(edge_values()).map(copy.deepcopy),
    st.sampled_from(PIECES).map(copy.deepcopy),
    st.tuples(PATTERN_STRINGS, SUFFIXES).map("".join),
    st.integers(-3, 3),
    JSON,
)


def _containers(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [path]
    children = node.items() if isinstance(node, dict) else enumerate(node)
    for key, child in children:
        if isinstance(child, dict | list):
            found += _containers(child, (*path, key))
    return found


def mutate(data: st.DataObject, doc: Any) -> Any:
    """``doc`` after one to three random edits: set, delete, add or duplicate something."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        if not isinstance(doc, dict | list):
            break
        target = doc
        for key in data.draw(st.sampled_from(_containers(doc))):
            target = target[key]
        op = data.draw(st.sampled_from(["set", "delete", "add", "duplicate"]))
        if isinstance(target, dict):
            keys = sorted(target)
            if op == "add" or not keys:
                target[data.draw(st.sampled_from(KEYS) | st.text(max_size=4))] = data.draw(VALUES)
            elif op == "delete":
                del target[data.draw(st.sampled_from(keys))]
            else:
                key = data.draw(st.sampled_from(keys))
                target[key] = copy.deepcopy(target[key]) if op == "duplicate" else data.draw(VALUES)
        elif op == "add" or not target:
            target.append(data.draw(VALUES))
        else:
            index = data.draw(st.integers(0, len(target) - 1))
            if op == "delete":
                del target[index]
            elif op == "duplicate":
                target.insert(index, copy.deepcopy(target[index]))
            else:
                target[index] = data.draw(VALUES)
    return doc


MUTATIONS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@MUTATIONS
@given(st.data())
def test_fast_validator_matches_jsonschema_on_mutated_events(data: st.DataObject) -> None:
    event = mutate(data, EXAMPLES[data.draw(st.sampled_from(sorted(EXAMPLES)))])
    both_ways(event)


@MUTATIONS
@given(st.data())
def test_fast_validator_matches_jsonschema_on_mutated_batches(data: st.DataObject) -> None:
    events = data.draw(st.lists(st.sampled_from(sorted(EXAMPLES)), min_size=1, max_size=5))
    same_verdict("batch.json", mutate(data, contract_batch(*(EXAMPLES[kind] for kind in events))))


@MUTATIONS
@given(st.data())
def test_fast_validator_matches_jsonschema_on_mutated_status(data: st.DataObject) -> None:
    same_verdict("status.json", mutate(data, ONLINE))


@settings(max_examples=200, deadline=None)
@given(JSON | VALUES)
def test_fast_validator_matches_jsonschema_on_arbitrary_json(doc: Any) -> None:
    for name in REFERENCE:
        same_verdict(name, doc)


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "array", "prefixItems": [{"type": "integer"}]},
        {"type": "object", "unevaluatedProperties": False},
        {"type": "string", "format": "date-time"},
        {"properties": {"a": {"$ref": "#/$defs/a", "minimum": 1}}, "$defs": {"a": {}}},
        {"properties": {"a": {"$ref": "https://example.com/a.json"}}},
    ],
)
def test_fast_validator_refuses_keywords_it_could_read_differently(
    tmp_path: Path, schema: dict[str, Any]
) -> None:
    full = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "x.json", **schema}
    (tmp_path / "x.json").write_text(json.dumps(full), encoding="utf-8")
    with pytest.raises(ValueError, match=r"not supported|sibling|local schema"):
        ContractSchemas(tmp_path)


def test_declared_skipped_seqs_close_the_gaps_and_a_reversed_range_is_refused(
    central: Central, publisher: Publisher, out: Path
) -> None:
    """The consumer's rule (contract README, "Delivery semantics"): every seq up to the
    highest received is received or inside a declared range."""
    publisher.publish(EVENTS_TOPIC, batch(presence(1), footfall(2), presence(9)))
    central.wait_for(lambda s: s["accepted"] == 3, timeout=5)
    name = f"{STORE}/{DEVICE}/{STREAM}"
    assert central.gaps() == {name: [3, 4, 5, 6, 7, 8]}, "still missing, not declared"
    declaration = {"v": 1, "store": STORE, "device": DEVICE, "stream": STREAM, "events": []}
    publisher.publish(EVENTS_TOPIC, json.dumps({**declaration, "skipped": [[9, 3]]}))
    central.wait_for(lambda s: s["invalid"].get("skipped_range") == 1, timeout=5)
    publisher.publish(EVENTS_TOPIC, json.dumps({**declaration, "events": []}))
    central.wait_for(lambda s: s["invalid_total"] == 2, timeout=5)
    publisher.publish(EVENTS_TOPIC, json.dumps({**declaration, "skipped": [[2, 6], [8, 8]]}))
    stats = central.wait_for(lambda s: s["declarations"] == 1, timeout=5)
    assert central.skipped(name) == [(2, 6), (8, 8)] and stats["skipped"] == {
        name: [(2, 6), (8, 8)]
    }
    assert central.gaps() == {name: [7]}
    assert len(lines(out)) == 3, "a declaration writes no event line"
