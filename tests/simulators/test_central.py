"""The fake central against a real mosquitto, fed by plain paho with hand-built payloads."""

from __future__ import annotations

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
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from simulators.broker import Mosquitto
from simulators.central import Central

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
    command = [sys.executable, "-m", "simulators.central", "--mqtt-host", "127.0.0.1"]
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


def test_cli_help_describes_every_option() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "simulators.central", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    for option in ("--mqtt-host", "--mqtt-port", "--out", "--stats", "--store"):
        assert option in result.stdout
