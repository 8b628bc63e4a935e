"""Consent against the real daemon process: registry sync over HTTP, withdrawal by MQTT
push and by poll, erasure proven on the database file and its WAL."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from gateway.config.credentials import write_secret
from gateway.identity.pseudonyms import Keyring, decode_key
from simulators.central.consent_api import ConsentAPI
from simulators.central.service import Central
from simulators.infra.broker import Mosquitto, free_port
from tests.system.harness import KEY_B64, STORE, GatewayProc, card_number, synthetic

pytestmark = pytest.mark.slow

RING = Keyring({"k1": decode_key(KEY_B64, "k")}, "k1")
SUBJECTS = [RING.pseudonym("loyalty", card_number(i)) for i in range(20)]
CONSENTED, STRANGERS = SUBJECTS[:12], SUBJECTS[12:]
LEAVER = CONSENTED[0]
TOKEN = "s3cret-token"


def sync_conf(api: ConsentAPI, token_file: Path) -> str:
    return (
        f'[consent.sync]\nbase_url = "{api.base_url}"\ntoken_file = "{token_file}"\n'
        "poll_interval_s = 0.5\ntimeout_s = 2\n"
    )


def gateway(tmp_path: Path, port: int, api: ConsentAPI) -> GatewayProc:
    token_file = tmp_path / "consent.token"
    write_secret(token_file, TOKEN + "\n")
    gw = GatewayProc(tmp_path / "gw", port, sources=synthetic(400, cards=20), consented=[])
    # The registry comes from the central only: no seed records.
    gw._template = gw._template.replace("[status]", sync_conf(api, token_file) + "[status]")
    gw.set_sources(synthetic(400, cards=20))
    return gw


def count_in_files(paths: list[Path], needle: bytes) -> int:
    return sum(p.read_bytes().count(needle) for p in paths if p.exists())


def test_withdrawal_while_offline_erases_buffered_events_from_the_files(
    tmp_path: Path, api: ConsentAPI
) -> None:
    gw = gateway(tmp_path, free_port(), api)  # no broker: everything stays buffered
    gw.start()
    gw.wait_log("consent snapshot")
    deadline = time.monotonic() + 20
    files = [gw.db, Path(f"{gw.db}-wal")]
    marker = f'"subject":"{LEAVER}"'.encode()
    while count_in_files(files, marker) < 20 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert count_in_files(files, marker) >= 20, "the leaver's events are buffered"
    api.withdraw(STORE, LEAVER)  # reaches the gateway by the next poll
    gw.wait_log("erased 1 subject(s)", timeout=10)
    time.sleep(0.5)
    assert count_in_files(files, marker) == 0, "no event of the leaver left in the DB or WAL"
    assert gw.alive()
    assert gw.stop() == 0
    assert count_in_files(files, marker) == 0
    assert count_in_files(files, LEAVER.encode()) <= 1, "only the erasure log names it"
    # Others' events are intact and go out once a broker is there; none of the leaver's.
    with Mosquitto(tmp_path / "mq") as broker:
        central = Central("127.0.0.1", broker.port, out=tmp_path / "central.jsonl")
        central.start()
        try:
            assert central.wait_subscribed(10)
            gw2 = GatewayProc(tmp_path / "gw", broker.port, sources="", consented=[])
            gw2.start()
            gw2.wait_ready()
            gw2.wait_drained()
            assert gw2.stop() == 0
            central.wait_for(lambda s: s["accepted"] > 0, timeout=10)
        finally:
            central.stop()
    events = [json.loads(x) for x in (tmp_path / "central.jsonl").read_text().splitlines()]
    subjects = {e["subject"] for e in events}
    assert LEAVER not in subjects
    assert subjects <= set(CONSENTED) and len(subjects) == len(CONSENTED) - 1
    assert not any(s in subjects for s in STRANGERS), "no event of an unconsented subject"


def test_withdrawal_by_mqtt_push_stops_events_within_a_second(tmp_path: Path) -> None:
    api = ConsentAPI(token=TOKEN)  # the central starts and stops it
    with Mosquitto(tmp_path / "mq") as broker:
        for s in CONSENTED:
            api.grant(STORE, s, ["analytics", "linking"])
        central = Central("127.0.0.1", broker.port, out=tmp_path / "central.jsonl", consent=api)
        central.start()
        gw = gateway(tmp_path, broker.port, api)
        try:
            assert central.wait_subscribed(10)
            gw._template = gw._template.replace("poll_interval_s = 0.5", "poll_interval_s = 600")
            gw.set_sources(synthetic(400, cards=20))
            gw.start()
            gw.wait_log("connected to broker")
            central.wait_for(lambda s: s["accepted"] > 200, timeout=20)
            time.sleep(0.5)  # the gateway's consent subscription is in
            api.withdraw(STORE, LEAVER, push=True)  # published on MQTT by the central
            pushed = time.time()
            gw.wait_log("erased 1 subject(s)", timeout=5)
            time.sleep(1.5)
            assert gw.stop() == 0
            central.wait_for(lambda s: s["accepted"] > 0, timeout=5)
        finally:
            central.stop()
    events = [json.loads(x) for x in (tmp_path / "central.jsonl").read_text().splitlines()]
    leaver_ts = [e["ts"] for e in events if e.get("subject") == LEAVER]
    after = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(pushed) + 2))
    assert leaver_ts, "the leaver's earlier events had been delivered"
    assert max(leaver_ts) < after, "nothing of the leaver after the withdrawal"
    assert not {e.get("subject") for e in events} & set(STRANGERS)
    assert "consent push" not in gw.log.read_text(), "the push was valid and applied"
