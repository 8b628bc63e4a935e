"""Per-device credentials and ACLs: ``firmware-config/mosquitto/`` on a real mosquitto.

mosquitto runs ``mosquitto.example.conf`` (without TLS) and ``acl.example`` verbatim, with
a password file; the gateways are the real daemon (``python -m gateway run``).  A box
provisioned for store A but configured as store B connects, yet every batch it publishes
as B is refused with PUBACK 0x87 and the real forwarder moves it to dead letters, while a
box publishing as itself is delivered.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.buffer.outbox import buffer_stats, connect
from gateway.config.credentials import write_secret
from simulators.infra.broker import find_mosquitto, free_port
from tests.fleet.fleet_harness import consented_subjects, write_gateway_dir

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "firmware-config" / "mosquitto"
ACL = CONF_DIR / "acl.example"
USERS = ("central", "nl-ams-001-gw-01", "nl-utr-002-gw-01")


def password_file(folder: Path) -> Path:
    path = folder / "passwd"
    for i, user in enumerate(USERS):
        flags = ["-c"] if i == 0 else []
        subprocess.run(
            ["mosquitto_passwd", "-b", *flags, str(path), user, f"pw-{user}"],
            check=True,
            capture_output=True,
        )
    return path


class Client:
    """A plain paho client with credentials: records CONNACK, SUBACK, PUBACK, messages."""

    def __init__(
        self, port: int, user: str | None, client_id: str, password: str | None = None
    ) -> None:
        self.connack: ReasonCode | None = None
        self.subacks: list[list[ReasonCode]] = []
        self.pubacks: dict[int, ReasonCode] = {}
        self.messages: list[tuple[str, bytes, bool]] = []
        self.disconnects = 0
        self.changed = threading.Condition()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if user is not None:
            c.username_pw_set(user, password or f"pw-{user}")
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        c.on_disconnect = self._on_disconnect
        c.connect("127.0.0.1", port)
        c.loop_start()
        self.client = c

    def _note(self, fn: Any) -> None:
        with self.changed:
            fn()
            self.changed.notify_all()

    def _on_connect(self, c: Any, u: Any, f: Any, rc: ReasonCode, p: Properties | None) -> None:
        self._note(lambda: setattr(self, "connack", rc))

    def _on_subscribe(self, c: Any, u: Any, mid: int, rcs: list[ReasonCode], p: Any) -> None:
        self._note(lambda: self.subacks.append(rcs))

    def _on_publish(self, c: Any, u: Any, mid: int, rc: ReasonCode, p: Any) -> None:
        self._note(lambda: self.pubacks.__setitem__(mid, rc))

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        self._note(lambda: self.messages.append((msg.topic, bytes(msg.payload), msg.retain)))

    def _on_disconnect(self, c: Any, u: Any, f: Any, rc: ReasonCode, p: Any) -> None:
        self._note(lambda: setattr(self, "disconnects", self.disconnects + 1))

    def wait(self, predicate: Any, timeout: float = 10) -> None:
        with self.changed:
            assert self.changed.wait_for(predicate, timeout), "no answer from the broker"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class ExampleBroker:
    """mosquitto started from ``mosquitto.example.conf`` as shipped, except: no TLS (it
    needs certificates), a loopback port, and paths moved into a temporary folder.  The
    ACL is ``acl.example`` itself."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True)
        self.port = free_port()
        self.log = folder / "mosquitto.log"
        tls = ("cafile", "certfile", "keyfile", "tls_version", "log_dest")
        example = (CONF_DIR / "mosquitto.example.conf").read_text(encoding="utf-8")
        lines = [line for line in example.splitlines() if not line.startswith(tls)]
        text = (
            "\n".join([*lines, "log_dest stderr", ""])
            .replace("listener 8883", f"listener {self.port} 127.0.0.1")
            .replace("/etc/mosquitto/touchpoint/passwd", str(password_file(folder)))
            .replace("/etc/mosquitto/touchpoint/acl", str(ACL))
            .replace("/var/lib/mosquitto/", f"{folder}/")
        )
        if os.geteuid() == 0:
            text += "user root\n"  # else it drops to 'mosquitto' and cannot write here
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(text, encoding="utf-8")
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [find_mosquitto(), "-c", str(self.conf)], stdout=log, stderr=log
            )
        deadline = time.monotonic() + 10
        while True:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                assert time.monotonic() < deadline, "mosquitto did not listen"
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[ExampleBroker]:
    broker = ExampleBroker(tmp_path / "mq")
    yield broker
    broker.stop()


def test_acl_example_is_what_the_generator_makes_of_stores_example() -> None:
    out = subprocess.run(
        [sys.executable, str(CONF_DIR / "acl_from_csv.py"), "firmware-config/stores.example.csv"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    assert out.stdout == ACL.read_text(encoding="utf-8"), "regenerate acl.example"


def test_example_conf_refuses_anonymous_and_wrong_passwords(secured: ExampleBroker) -> None:
    anon = Client(secured.port, None, "anon")
    wrong = Client(secured.port, "nl-ams-001-gw-01", "tp-x", password="guess")
    device = Client(secured.port, "nl-ams-001-gw-01", "tp-nl-ams-001-gw-01")
    try:
        for c in (anon, wrong, device):
            c.wait(lambda c=c: c.connack is not None)
        assert anon.connack is not None and anon.connack.is_failure
        assert wrong.connack is not None and wrong.connack.is_failure
        assert device.connack is not None and not device.connack.is_failure
    finally:
        for c in (anon, wrong, device):
            c.close()


def test_another_client_cannot_take_a_gateways_session(secured: ExampleBroker) -> None:
    """The client id is the authenticated username (``use_username_as_clientid``): a client
    that names a gateway's client id (its default, or its username) gets its own session,
    and the gateway's connection lives on."""
    dev = Client(secured.port, "nl-ams-001-gw-01", "tp-nl-ams-001-gw-01")
    intruders: list[Client] = []
    try:
        dev.wait(lambda: dev.connack is not None)
        assert dev.connack is not None and not dev.connack.is_failure
        for user, claimed in (
            ("nl-utr-002-gw-01", "tp-nl-ams-001-gw-01"),  # the daemon's default client id
            ("central", "nl-ams-001-gw-01"),  # the gateway's username
        ):
            intruder = Client(secured.port, user, claimed)
            intruders.append(intruder)
            intruder.wait(lambda i=intruder: i.connack is not None)
            assert intruder.connack is not None and not intruder.connack.is_failure
        time.sleep(0.5)
        assert dev.disconnects == 0, "an intruder took the gateway's session"
        sent = dev.client.publish("touchpoint/v1/nl-ams-001/gw-01/events", b"{}", qos=1)
        dev.wait(lambda: sent.mid in dev.pubacks)
        assert all(i.disconnects == 0 for i in intruders), "each has its own session"
    finally:
        for c in (dev, *intruders):
            c.close()


def test_device_users_are_held_to_their_own_topics(secured: ExampleBroker) -> None:
    dev = Client(secured.port, "nl-ams-001-gw-01", "tp-nl-ams-001-gw-01")
    central = Client(secured.port, "central", "central-1")
    try:
        dev.wait(lambda: dev.connack is not None)
        central.wait(lambda: central.connack is not None)
        dev.client.subscribe([("touchpoint/v1/nl-ams-001/consent", 1)])
        dev.client.subscribe([("touchpoint/v1/nl-utr-002/consent", 1)])
        central.client.subscribe([("$share/central/touchpoint/v1/+/+/events", 1)])
        dev.wait(lambda: len(dev.subacks) == 2)
        central.wait(lambda: len(central.subacks) == 1)
        assert not central.subacks[0][0].is_failure, "central may use a shared subscription"
        # mosquitto's acl_file grants the SUBACK and filters on delivery: check delivery.
        for store in ("nl-utr-002", "nl-ams-001"):  # the allowed one last: it marks the end
            info = central.client.publish(f"touchpoint/v1/{store}/consent", store.encode(), qos=1)
            central.wait(lambda info=info: info.mid in central.pubacks)
        dev.wait(lambda: len(dev.messages) >= 1)
        time.sleep(0.2)
        assert [t for t, *_ in dev.messages] == ["touchpoint/v1/nl-ams-001/consent"]
        sent = dev.client.publish("touchpoint/v1/nl-ams-001/gw-01/events", b"{}", qos=1)
        dev.wait(lambda: sent.mid in dev.pubacks)
        assert not dev.pubacks[sent.mid].is_failure, "a gateway publishes its own events"
        central.wait(lambda: len(central.messages) == 1)
        assert central.messages[0][0] == "touchpoint/v1/nl-ams-001/gw-01/events"
        forged = central.client.publish("touchpoint/v1/nl-ams-001/gw-01/events", b"{}", qos=1)
        central.wait(lambda: forged.mid in central.pubacks)
        assert central.pubacks[forged.mid].value == 0x87, "central cannot publish events"
    finally:
        dev.close()
        central.close()


def _daemon(folder: Path, port: int, *, store: str, user: str) -> tuple[Path, Path]:
    folder.mkdir(parents=True)
    write_secret(folder / "mqtt.password", f"pw-{user}\n")
    config = write_gateway_dir(
        folder,
        store=store,
        device="gw-01",
        port=port,
        rate=20,
        reconnect_min=0.2,
        reconnect_max=2,
        subjects=consented_subjects(),
        mqtt_extra=f'username = "{user}"\npassword_file = "mqtt.password"',
    )
    return config, folder / "buffer.db"


def _stats(db: Path) -> dict[str, Any]:
    conn = connect(db, readonly=True)
    try:
        return buffer_stats(conn, time.time())
    finally:
        conn.close()


def test_gateway_of_store_a_cannot_publish_as_store_b(
    tmp_path: Path, secured: ExampleBroker
) -> None:
    central = Client(secured.port, "central", "central-1")
    central.wait(lambda: central.connack is not None)
    central.client.subscribe(
        [("$share/central/touchpoint/v1/+/+/events", 1), ("touchpoint/v1/+/+/status", 1)]
    )
    central.wait(lambda: len(central.subacks) == 1)
    assert not any(rc.is_failure for rc in central.subacks[0])
    # The box of store A (its credentials), once configured as itself, once as store B.
    own_cfg, own_db = _daemon(
        tmp_path / "own", secured.port, store="nl-ams-001", user="nl-ams-001-gw-01"
    )
    forged_cfg, forged_db = _daemon(
        tmp_path / "forged", secured.port, store="nl-utr-002", user="nl-ams-001-gw-01"
    )
    # One after the other: the broker ties the session to the username, so two boxes on
    # one credential would take the session from each other (as a copied SD card should).
    codes = []
    for cfg, db, ready in (
        (forged_cfg, forged_db, lambda st: st["dead_letters"] >= 20),
        (own_cfg, own_db, lambda st: st["last_seq"] >= 20),
    ):
        with (cfg.parent / "gateway.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "--config", str(cfg)],
                cwd=ROOT,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                with contextlib.suppress(sqlite3.Error):  # not created or migrated yet
                    if ready(_stats(db)):
                        break
                time.sleep(0.2)
        finally:
            proc.send_signal(signal.SIGTERM)
            codes.append(proc.wait(30))
    own_log = (own_cfg.parent / "gateway.log").read_text()
    forged_log = (forged_cfg.parent / "gateway.log").read_text()
    assert codes == [0, 0], own_log[-2000:] + forged_log[-2000:]
    assert "disconnected from broker" not in own_log

    forged = _stats(forged_db)
    assert forged["last_seq"] > 0 and forged["depth"] == 0
    assert forged["dead_letters"] == forged["last_seq"], "every forged batch was refused"
    assert forged["last_publish_at"] is None
    assert "Not authorized (reason code 135); moved to dead letters" in forged_log
    # A refusal is an answer, not a fault: the connection stays up (with this broker
    # config; see firmware-config/mosquitto/README.md about max_queued_messages 0).
    assert "disconnected from broker" not in forged_log

    own = _stats(own_db)
    assert own["dead_letters"] == 0 and own["depth"] == 0 and own["last_seq"] >= 20
    want = set(range(1, own["last_seq"] + 1))

    def own_seqs() -> set[int]:
        seqs: set[int] = set()
        for topic, payload, _retain in central.messages:
            if topic == "touchpoint/v1/nl-ams-001/gw-01/events":
                doc = json.loads(payload)
                assert doc["stream"] == own["stream"]
                seqs.update(event["seq"] for event in doc["events"])
        return seqs

    central.wait(lambda: own_seqs() >= want)
    central.close()
    assert own_seqs() == want, "store A's own events all arrived, and only those"
    assert not [t for t, *_ in central.messages if "/nl-utr-002/" in t], "nothing as store B"
    states = [json.loads(p)["state"] for t, p, _ in central.messages if t.endswith("gw-01/status")]
    assert "online" in states and "offline" in states
