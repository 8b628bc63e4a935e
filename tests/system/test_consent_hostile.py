"""A hostile consent registry against the real daemon process (issue 14, items 1 and 2).

The fake central's consent API trickles a body, sends 100 MB, hands out a 70,000-character
cursor and subjects with a lone surrogate; one was pushed on MQTT too.  The daemon keeps
running and buffering, counts and logs each, shows a stale registry on /healthz, keeps
its memory, and a bad cursor an older version stored does not stop its start.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config.credentials import write_secret
from gateway.identity.pseudonyms import Keyring, decode_key
from simulators.central.consent_api import ConsentAPI
from simulators.infra.broker import Mosquitto, free_port
from tests.system.harness import (
    KEY_B64,
    STORE,
    GatewayProc,
    card_number,
    healthz,
    metrics,
    synthetic,
)

pytestmark = pytest.mark.slow

RING = Keyring({"k1": decode_key(KEY_B64, "k")}, "k1")
SUBJECTS = [RING.pseudonym("loyalty", card_number(i)) for i in range(5)]
TOKEN = "s3cret-token"
MiB = 1024 * 1024


def gateway(tmp_path: Path, broker_port: int, api: ConsentAPI, **sync: object) -> GatewayProc:
    token_file = tmp_path / "consent.token"
    write_secret(token_file, TOKEN + "\n")  # a secret is the owner's only
    gw = GatewayProc(
        tmp_path / "gw",
        broker_port,
        sources=synthetic(100, cards=5),
        consented=[],
        health_port=free_port(),
    )
    conf = {
        "base_url": json.dumps(api.base_url),
        "token_file": json.dumps(str(token_file)),
        "poll_interval_s": 0.5,
        **sync,
    }
    section = "[consent.sync]\n" + "".join(f"{k} = {v}\n" for k, v in conf.items())
    section += "[consent.sync.backoff]\nmin_s = 0.2\nmax_s = 0.5\n"
    gw._template = gw._template.replace("[status]", section + "[status]")
    gw._template += "consent_max_age_s = 3\n"  # the [health] section is last
    gw.set_sources(synthetic(100, cards=5))
    return gw


def polls(port: int, outcome: str) -> float:
    return metrics(port).get("consent_sync_polls_total", {}).get((("outcome", outcome),), 0.0)


def wait(predicate: Callable[[], bool], what: str, gw: GatewayProc, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        assert gw.alive(), f"the daemon died; log:\n{gw.log.read_text()[-3000:]}"
        time.sleep(0.2)
    raise TimeoutError(f"{what}; log:\n{gw.log.read_text()[-3000:]}")


def peak_rss_mib(gw: GatewayProc) -> float:
    assert gw.proc is not None
    for line in Path(f"/proc/{gw.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def test_trickled_and_huge_answers_are_cut_counted_and_shown(tmp_path: Path) -> None:
    with ConsentAPI(token=TOKEN) as api:
        for s in SUBJECTS:
            api.grant(STORE, s, ["analytics", "linking"])
        api.hostile("trickle", interval_s=0.5, count=3)  # never done within the deadline
        api.hostile("flood", size=100 * MiB, announce=False)  # read up to the cap, cut
        api.hostile("flood", size=100 * MiB)  # its Content-Length says too much: unread
        gw = gateway(tmp_path, free_port(), api, timeout_s=5, deadline_s=2, max_body_bytes=MiB)
        port = gw.health_port
        assert port is not None
        gw.start()
        gw.wait_ready()
        try:
            wait(lambda: polls(port, "deadline") >= 1, "no poll cut at the deadline", gw)
            wait(lambda: healthz(port)[0] == 503, "a registry never synced looks healthy", gw)
            doc = healthz(port)[1]
            assert any("consent registry" in p for p in doc["problems"]), doc["problems"]
            assert "deadline_s" in doc["last_error"]["consent_sync"]
            wait(lambda: polls(port, "too_large") >= 2, "no 100 MB answer refused", gw)
            wait(lambda: healthz(port)[0] == 200, "the registry never synced", gw)
            assert polls(port, "deadline") == 3 and polls(port, "snapshot") >= 1
            assert api.sent_bytes < 2 * (MiB + 16 * MiB), api.sent_bytes
            peak = peak_rss_mib(gw)
            assert peak < 150, f"peak RSS {peak:.0f} MiB: a 100 MB answer was held"
            log = gw.log.read_text()
            assert "max_body_bytes" in log and "deadline_s" in log
            wait(lambda: gw.last_seq() > 0, "nothing buffered after the sync", gw)
        finally:
            rc = gw.stop()
        assert rc == 0


def _publish(port: int, topic: str, payload: bytes) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


def test_bad_cursors_and_subjects_never_stop_the_daemon(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "mq") as broker, ConsentAPI(token=TOKEN) as api:
        for s in SUBJECTS:
            api.grant(STORE, s, ["analytics", "linking"])
        gw = gateway(tmp_path, broker.port, api)
        port = gw.health_port
        assert port is not None
        # A buffer where an older version stored a cursor it should have refused.
        gw.start()
        gw.wait_log("consent snapshot")
        assert gw.stop() == 0
        conn = sqlite3.connect(gw.db)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'consent_cursor'", ("x" * 70_000,))
        conn.commit()
        conn.close()
        before = len(api.requests)
        gw.start()
        gw.wait_log("consent snapshot")
        assert api.requests[before].since is None, "the bad stored cursor gave a snapshot"
        assert "stored cursor is not valid" in gw.log.read_text()
        try:
            wait(lambda: gw.last_seq() > 0, "nothing buffered", gw)
            good = gw.query("SELECT value FROM meta WHERE key = 'consent_cursor'")[0]
            grant = {"subject": SUBJECTS[0], "purposes": ["linking"], "expires": None}
            bad = {"subject": "k1:\ud800", "purposes": ["linking"], "expires": None}
            for doc in (
                {"cursor": "y" * 70_000, "reset": False, "records": [grant]},
                {"cursor": "c1", "reset": False, "records": [grant, bad]},
            ):
                api.hostile("body", body=json.dumps(doc).encode())
            wait(lambda: polls(port, "bad_response") >= 2, "bad answers not counted", gw)
            _publish(
                broker.port,
                f"touchpoint/v1/{STORE}/consent",
                json.dumps({"v": 1, "records": [bad]}).encode(),
            )

            def pushed_invalid() -> bool:
                family = metrics(port).get("consent_push_total", {})
                return family.get((("outcome", "invalid"),), 0.0) >= 1

            wait(pushed_invalid, "the push was not refused", gw)
            assert gw.query("SELECT value FROM meta WHERE key = 'consent_cursor'")[0] == good
            # The writer is alive: events keep being buffered, health says the writes work.
            seq = gw.last_seq()
            wait(lambda: gw.last_seq() > seq + 50, "the buffer stopped growing", gw)
            doc = healthz(port)[1]
            assert doc["buffer"]["last_write_ok"], doc
            assert metrics(port).get("buffer_writer_failures_total") is None
        finally:
            rc = gw.stop()
        assert rc == 0
