"""Card-reader simulator -> real daemon process -> real mosquitto -> fake central.

Also the privacy canary: the raw card numbers of the scenario appear nowhere — not in the
database, its WAL, the daemon's log, the MQTT payloads on the wire or the central's
output — while consented reads arrive with the contract's pseudonyms.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from simulators.central.service import Central
from simulators.infra.broker import Mosquitto
from tests.system.harness import STORE, GatewayProc

pytestmark = pytest.mark.slow

CONSENTED = ["13005D1DA5", "7F00A1B2C3"]
NOT_CONSENTED = "0A1B2C3D4E"
TAPS = {"13005D1DA5": 2, "7F00A1B2C3": 1, NOT_CONSENTED: 2}

SCENARIO = """
[scenario]
name = "e2e"
protocol = "rdm6300"
loops = 1

[[steps]]
action = "pause"
seconds = 1.0
{taps}
[[steps]]
action = "pause"
seconds = 1.0
"""

TAP = """
[[steps]]
action = "tap"
card = "{card}"
repeats = 4
interval_s = 0.05

[[steps]]
action = "noise"
count = 16

[[steps]]
action = "bad_frame"
card = "{card}"

[[steps]]
action = "pause"
seconds = 1.3
"""


class Sniffer:
    """A plain MQTT subscriber that keeps every payload seen on touchpoint/#."""

    def __init__(self, port: int) -> None:
        self.payloads: list[bytes] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = lambda c, u, m: self.payloads.append(m.payload)
        self.client.connect("127.0.0.1", port)
        self.client.subscribe("touchpoint/#", qos=1)
        self.client.loop_start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[tuple[Mosquitto, Central, Sniffer]]:
    with Mosquitto(tmp_path / "mq") as broker:
        central = Central("127.0.0.1", broker.port, out=tmp_path / "central.jsonl")
        central.start()
        assert central.wait_subscribed(10)
        sniffer = Sniffer(broker.port)
        yield broker, central, sniffer
        sniffer.close()
        central.stop()


def raw_forms(card: str) -> list[bytes]:
    return [card.encode(), card.lower().encode()]


def scan_for_raw(paths: list[Path], blobs: list[bytes]) -> list[str]:
    found = []
    for card in TAPS:
        for form in raw_forms(card):
            for p in paths:
                if p.exists() and form in p.read_bytes():
                    found.append(f"{card} in {p.name}")
            for i, blob in enumerate(blobs):
                if form in blob:
                    found.append(f"{card} in MQTT payload {i}")
    return found


def test_cards_flow_end_to_end_and_no_raw_number_leaks(
    tmp_path: Path, rig: tuple[Mosquitto, Central, Sniffer]
) -> None:
    broker, central, sniffer = rig
    link = tmp_path / "card0"
    taps = "".join(TAP.format(card=c) for c, n in TAPS.items() for _ in range(n))
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(SCENARIO.format(taps=taps), encoding="utf-8")
    from gateway.identity.pseudonyms import Keyring, decode_key
    from tests.system.harness import KEY_B64

    ring = Keyring({"k1": decode_key(KEY_B64, "k")}, "k1")
    consented = {ring.pseudonym("rfid", c): c for c in CONSENTED}
    source = f"""
[[sources]]
kind = "serial_card"
name = "till-2-card"
device = "{link}"
protocol = "rdm6300"
lane = "till-2"
debounce_s = 0.5
reopen_min_s = 0.05
reopen_max_s = 0.2
"""
    gw = GatewayProc(tmp_path / "gw", broker.port, sources=source, consented=list(consented))
    gw.start()
    gw.wait_ready()
    sim = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulators.devices.card_reader",
            str(scenario),
            "--link",
            str(link),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        expected = sum(n for c, n in TAPS.items() if c in CONSENTED)
        central.wait_for(lambda s: s["accepted"] >= expected, timeout=60)
        sim.wait(timeout=60)
        # Mid-run scan: the WAL is live now.
        mid = scan_for_raw([gw.db, Path(f"{gw.db}-wal"), gw.log], list(sniffer.payloads))
        time.sleep(1.0)
    finally:
        if sim.poll() is None:
            sim.kill()
        sim.communicate()
        assert gw.stop() == 0
    stats = central.stats()
    assert stats["accepted"] == expected, stats
    assert stats["invalid_total"] == 0
    lines = [json.loads(x) for x in (tmp_path / "central.jsonl").read_text().splitlines()]
    got = sorted(consented[e["subject"]] for e in lines)
    assert got == sorted(c for c in CONSENTED for _ in range(TAPS[c]))
    for e in lines:
        assert e["type"] == "card.read" and e["store"] == STORE
        assert e["purposes"] == ["linking"]
        assert e["attrs"] == {"lane": "till-2", "reader": "rdm6300"}
    log = gw.log.read_text()
    assert "till-2-card" in log
    status = gw.status_json()
    assert status["depth"] == 0 and status["last_publish_at"] is not None
    after = scan_for_raw(
        [gw.db, Path(f"{gw.db}-wal"), gw.log, tmp_path / "central.jsonl"], list(sniffer.payloads)
    )
    assert len(sniffer.payloads) >= 2, "the sniffer saw the traffic"
    assert not mid and not after, mid + after
