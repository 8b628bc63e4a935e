"""The machine-readable contract: JSON Schemas and the AsyncAPI document.

Examples are written out by hand from CONTRACT.md, not produced by gateway code, so these
tests check the schemas against the contract text rather than against our implementation.
"""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

CONTRACT_DIR = Path(__file__).resolve().parents[3] / "gateway" / "contract"
SCHEMA_DIR = CONTRACT_DIR / "schemas"
SCHEMA_FILES = (
    "event.json",
    "batch.json",
    "status.json",
    "health.json",
    "consent-delta.json",
    "consent-response.json",
)

SUBJECT = "k1:y12r74-dyodquqc6XBqP4A"
RECEIPT = "AJVTCALK7WDMAAAAAAIQE3TMFVQW24ZNGAYDCTZVXEBIVXUSXBCI6"
TS = "2026-11-22T10:15:00Z"

EXAMPLES: dict[str, dict[str, Any]] = {
    "presence.enter": {
        "seq": 1,
        "type": "presence.enter",
        "ts": TS,
        "source": "entrance-ble",
        "subject": SUBJECT,
        "purposes": ["analytics"],
        "attrs": {"zone": "entrance", "rssi": -67},
    },
    "presence.exit": {
        "seq": 2,
        "type": "presence.exit",
        "ts": TS,
        "source": "entrance-ble",
        "subject": SUBJECT,
        "purposes": ["analytics"],
        "attrs": {"zone": "entrance", "dwell_s": 312},
    },
    "card.read": {
        "seq": 3,
        "type": "card.read",
        "ts": TS,
        "source": "till-2-card",
        "subject": SUBJECT,
        "purposes": ["analytics", "linking"],
        "attrs": {"lane": "till-2", "reader": "rdm6300"},
    },
    "qr.scan": {
        "seq": 4,
        "type": "qr.scan",
        "ts": TS,
        "source": "kiosk-cam",
        "subject": "k1:M2YsvGP7chEPUUWFye0MSQ",
        "purposes": ["analytics", "linking", "marketing"],
        "attrs": {"zone": "kiosk", "kind": "app"},
    },
    "qr.scan receipt": {
        "seq": 5,
        "type": "qr.scan",
        "ts": TS,
        "source": "kiosk-cam",
        "purposes": [],
        "attrs": {"lane": "till-2", "kind": "receipt", "receipt": RECEIPT},
    },
    "qr.scan other": {
        "seq": 5,
        "type": "qr.scan",
        "ts": TS,
        "source": "kiosk-cam",
        "purposes": [],
        "attrs": {"zone": "kiosk", "kind": "other"},
    },
    "receipt.printed": {
        "seq": 6,
        "type": "receipt.printed",
        "ts": TS,
        "source": "till-2-printer",
        "purposes": [],
        "attrs": {"lane": "till-2", "receipt": RECEIPT},
    },
    "footfall": {
        "seq": 7,
        "type": "footfall",
        "ts": TS,
        "source": "door-cam",
        "purposes": [],
        "attrs": {
            "zone": "entrance",
            "window_start": "2026-11-22T10:00:00Z",
            "window_s": 900,
            "count": 12,
        },
    },
}


def _registry() -> Registry[Any]:
    schemas = [json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8")) for name in SCHEMA_FILES]
    return Registry().with_resources(
        (schema["$id"], Resource.from_contents(schema)) for schema in schemas
    )


REGISTRY = _registry()


def validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(REGISTRY.contents(name), registry=REGISTRY)


def errors(name: str, doc: Any) -> list[str]:
    return [error.message for error in validator(name).iter_errors(doc)]


def batch(*events: dict[str, Any]) -> dict[str, Any]:
    return {
        "v": 1,
        "store": "nl-ams-001",
        "device": "gw-01",
        "stream": "0123456789abcdef",
        "events": list(events),
    }


@pytest.mark.parametrize("name", SCHEMA_FILES)
def test_schema_is_valid_draft_2020_12_with_a_simple_id(name: str) -> None:
    schema = json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8"))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"] == name
    Draft202012Validator.check_schema(schema)


def test_the_clock_flag_is_optional_and_only_unsynced() -> None:
    event = EXAMPLES["card.read"]
    assert errors("event.json", {**event, "clock": "unsynced"}) == []
    assert errors("event.json", {**event, "clock": "synced"}) != []
    assert errors("event.json", {**event, "clock": True}) != []


def test_schema_directory_holds_exactly_the_contract_schemas() -> None:
    assert sorted(p.name for p in SCHEMA_DIR.glob("*.json")) == sorted(SCHEMA_FILES)


@pytest.mark.parametrize("kind", sorted(EXAMPLES))
def test_every_event_type_validates_alone_and_in_a_batch(kind: str) -> None:
    assert errors("event.json", EXAMPLES[kind]) == []
    assert errors("batch.json", batch(EXAMPLES[kind])) == []


def test_every_event_type_has_an_example() -> None:
    event_schema = REGISTRY.contents("event.json")
    types = set(event_schema["properties"]["type"]["enum"])
    assert {example["type"] for example in EXAMPLES.values()} == types


_DELETE = object()


def _mutate(kind: str, path: tuple[str, ...], value: Any) -> dict[str, Any]:
    event = copy.deepcopy(EXAMPLES[kind])
    target = event
    for key in path[:-1]:
        target = target[key]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return event


BAD_EVENTS = {
    "subject on footfall": ("footfall", ("subject",), SUBJECT),
    "subject on receipt.printed": ("receipt.printed", ("subject",), SUBJECT),
    "no subject on card.read": ("card.read", ("subject",), _DELETE),
    "unsorted purposes": ("card.read", ("purposes",), ["linking", "analytics"]),
    "duplicate purposes": ("card.read", ("purposes",), ["analytics", "analytics"]),
    "unknown purpose": ("card.read", ("purposes",), ["advertising"]),
    "empty purposes with subject": ("presence.enter", ("purposes",), []),
    "purposes without subject": ("footfall", ("purposes",), ["analytics"]),
    "fractional seconds": ("presence.enter", ("ts",), "2026-11-22T10:15:00.5Z"),
    "offset instead of Z": ("presence.enter", ("ts",), "2026-11-22T11:15:00+01:00"),
    "date only": ("presence.enter", ("ts",), "2026-11-22"),
    "unknown top-level key": ("presence.enter", ("extra",), 1),
    "unknown attr": ("presence.enter", ("attrs", "battery"), 80),
    "missing attr": ("presence.exit", ("attrs", "dwell_s"), _DELETE),
    "float rssi": ("presence.enter", ("attrs", "rssi"), -67.5),
    "raw identifier as subject": ("card.read", ("subject",), "2600123456789"),
    "footfall count 0": ("footfall", ("attrs", "count"), 0),
    "footfall window_start with fraction": (
        "footfall",
        ("attrs", "window_start"),
        "2026-11-22T10:00:00.000Z",
    ),
    "qr.scan with both lane and zone": ("qr.scan", ("attrs", "lane"), "till-2"),
    "qr.scan receipt without token": ("qr.scan receipt", ("attrs", "receipt"), _DELETE),
    "qr.scan app with a receipt": ("qr.scan", ("attrs", "receipt"), RECEIPT),
    "receipt token with URL prefix": (
        "receipt.printed",
        ("attrs", "receipt"),
        "HTTPS://R.EXAMPLE/" + RECEIPT,
    ),
    "unknown type": ("footfall", ("type",), "door.open"),
    "string seq": ("footfall", ("seq",), "7"),
}


@pytest.mark.parametrize("case", sorted(BAD_EVENTS))
def test_bad_events_are_rejected(case: str) -> None:
    kind, path, value = BAD_EVENTS[case]
    event = _mutate(kind, path, value)
    assert errors("event.json", event) != []
    assert errors("batch.json", batch(event)) != []


def test_purposes_accept_exactly_the_sorted_unique_subsets() -> None:
    names = ["analytics", "linking", "marketing"]
    for size in range(1, 4):
        for chosen in itertools.permutations(names, size):
            event = _mutate("card.read", ("purposes",), list(chosen))
            assert (errors("event.json", event) == []) == (list(chosen) == sorted(chosen))


@pytest.mark.parametrize(
    "change",
    [
        {"v": 2},
        {"stream": "0123456789ABCDEF"},
        {"stream": "0123456789abcde"},
        {"store": "NL-AMS-001"},
        {"device": "-gw"},
        {"events": []},
        {"extra": True},
    ],
)
def test_bad_batches_are_rejected(change: dict[str, Any]) -> None:
    assert errors("batch.json", {**batch(EXAMPLES["footfall"]), **change}) != []


def test_status() -> None:
    online = {"v": 1, "state": "online", "ts": TS, "version": "0.1.0"}
    assert errors("status.json", online) == []
    assert errors("status.json", {**online, "state": "offline"}) == []
    assert errors("status.json", {**online, "state": "sleeping"}) != []
    assert errors("status.json", {**online, "ts": "2026-11-22T10:15:00.1Z"}) != []
    assert errors("status.json", {k: v for k, v in online.items() if k != "version"}) != []


def test_consent_response_and_delta(vectors: dict[str, Any]) -> None:
    records = [
        {"subject": case["pseudonym"], "purposes": ["analytics", "linking"], "expires": None}
        for case in vectors["pseudonyms"]
    ]
    records.append({"subject": SUBJECT, "purposes": [], "expires": None})  # a withdrawal
    records.append({"subject": SUBJECT, "purposes": ["marketing"], "expires": TS})
    records.append(
        {"subject": SUBJECT, "purposes": ["marketing"], "expires": "2027-01-01T00:00:00.25+01:00"}
    )
    response = {"cursor": "c-42", "reset": False, "records": records}
    assert errors("consent-response.json", response) == []
    assert errors("consent-delta.json", {"v": 1, "records": records}) == []

    bad_record = {"subject": SUBJECT, "purposes": ["marketing", "analytics"], "expires": None}
    assert errors("consent-delta.json", {"v": 1, "records": [bad_record]}) != []
    assert errors("consent-response.json", {**response, "reset": "no"}) != []
    no_expiry_key = {"subject": SUBJECT, "purposes": []}
    assert errors("consent-delta.json", {"v": 1, "records": [no_expiry_key]}) != []


def test_vector_pseudonyms_and_receipt_tokens_fit_the_schema_patterns(
    vectors: dict[str, Any],
) -> None:
    for case in vectors["pseudonyms"]:
        assert errors("event.json", _mutate("card.read", ("subject",), case["pseudonym"])) == []
    for case in vectors["receipt_tokens"]:
        event = _mutate("receipt.printed", ("attrs", "receipt"), case["token"])
        assert errors("event.json", event) == []


# -- AsyncAPI ---------------------------------------------------------------------------


def load_asyncapi() -> dict[str, Any]:
    """Parse asyncapi.yaml: it is JSON-compatible YAML after its leading comment lines."""
    text = (CONTRACT_DIR / "asyncapi.yaml").read_text(encoding="utf-8")
    body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    doc: dict[str, Any] = json.loads(body)
    try:
        import yaml
    except ImportError:
        return doc
    assert yaml.safe_load(text) == doc
    return doc


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if "$ref" in node else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def _pointer(doc: dict[str, Any], ref: str) -> Any:
    node: Any = doc
    for part in ref.removeprefix("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_asyncapi_parses_and_every_reference_resolves() -> None:
    doc = load_asyncapi()
    assert doc["asyncapi"].startswith("3.")
    refs = _refs(doc)
    files = {ref for ref in refs if not ref.startswith("#")}
    assert files == {
        "./schemas/batch.json",
        "./schemas/status.json",
        "./schemas/health.json",
        "./schemas/consent-delta.json",
    }
    for ref in files:
        assert (CONTRACT_DIR / ref).is_file(), ref
    for ref in refs:
        if ref.startswith("#"):
            assert _pointer(doc, ref) is not None, ref


def test_asyncapi_topics_qos_retain_and_will_match_the_contract() -> None:
    doc = load_asyncapi()
    channels = doc["channels"]
    assert channels["events"]["address"] == "touchpoint/v1/{store}/{device}/events"
    assert channels["status"]["address"] == "touchpoint/v1/{store}/{device}/status"
    assert channels["health"]["address"] == "touchpoint/v1/{store}/{device}/health"
    assert channels["consent"]["address"] == "touchpoint/v1/{store}/consent"
    for channel in channels.values():
        placeholders = {part[1:-1] for part in channel["address"].split("/") if part[0] == "{"}
        assert set(channel["parameters"]) == placeholders

    expected = {
        "sendEvents": ("send", "#/channels/events", False),
        "sendStatus": ("send", "#/channels/status", True),
        "sendHealth": ("send", "#/channels/health", True),
        "receiveConsent": ("receive", "#/channels/consent", False),
    }
    for name, (action, channel, retain) in expected.items():
        operation = doc["operations"][name]
        assert operation["action"] == action
        assert operation["channel"]["$ref"] == channel
        assert operation["bindings"]["mqtt"]["qos"] == 1
        assert operation["bindings"]["mqtt"]["retain"] is retain

    (server,) = doc["servers"].values()
    will = server["bindings"]["mqtt"]["lastWill"]
    assert will["topic"] == channels["status"]["address"]
    assert (will["qos"], will["retain"]) == (1, True)
    assert '"state":"offline"' in will["message"]


@pytest.mark.parametrize("kind", ["app", "receipt", "other"])
def test_qr_scans_carry_a_subject_exactly_when_kind_is_app(kind: str) -> None:
    attrs: dict[str, object] = {"zone": "kiosk", "kind": kind}
    if kind == "receipt":
        attrs["receipt"] = RECEIPT
    base = {"seq": 1, "type": "qr.scan", "ts": TS, "source": "kiosk-cam", "attrs": attrs}
    with_subject = {**base, "subject": SUBJECT, "purposes": ["linking"]}
    without = {**base, "purposes": []}
    assert (errors("event.json", with_subject) == []) == (kind == "app")
    assert (errors("event.json", without) == []) == (kind != "app")


# -- skipped seqs (our addition: a declaration after a power cut) ------------------------


def test_a_declaration_of_skipped_seqs_is_a_batch_with_no_events(vectors: dict[str, Any]) -> None:
    for case in vectors["batches_skipped"]:
        doc = json.loads(case["payload"])
        assert errors("batch.json", doc) == []
        assert doc["events"] == [] and doc["skipped"] == case["skipped"]
    for case in vectors["batches_skipped_invalid"]:
        found = errors("batch.json", json.loads(case["payload"]))
        assert (found == []) == case.get("schema_valid", False), (case["reason"], found)


def test_batches_with_events_stay_as_they_were() -> None:
    """The field is optional: a batch with events and no ``skipped`` is the v1 batch."""
    assert "skipped" not in batch(EXAMPLES["footfall"])
    assert errors("batch.json", batch(EXAMPLES["footfall"])) == []
    assert errors("batch.json", {**batch(), "skipped": [[3, 4]] * 65}) != []


def test_the_gateway_encodes_the_declaration_vector_byte_for_byte(
    vectors: dict[str, Any],
) -> None:
    from gateway.contract.events import batch_prefix, skipped_payload

    for case in vectors["batches_skipped"]:
        doc = json.loads(case["payload"])
        prefix = batch_prefix(doc["store"], doc["device"], doc["stream"])
        ranges = [(lo, hi) for lo, hi in case["skipped"]]
        assert skipped_payload(prefix, ranges) == case["payload"].encode()
