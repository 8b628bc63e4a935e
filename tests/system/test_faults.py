"""Fault injection against the real daemon process, a real mosquitto and the fake central.

Ground truth: seqs are assigned contiguously in commit order, so the events committed in
a stream are exactly 1..last_seq; the central must hold every one of them.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulators.central.service import Central
from simulators.infra.broker import Mosquitto
from tests.system.harness import (
    GatewayProc,
    assert_all_delivered,
    card_number,
    synthetic,
)

pytestmark = pytest.mark.slow

WINDOW, BATCH = 10, 200


@pytest.fixture
def pbroker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "mq", persistence=True) as b:
        yield b


@pytest.fixture
def central(tmp_path: Path, pbroker: Mosquitto) -> Iterator[Central]:
    c = Central("127.0.0.1", pbroker.port, out=tmp_path / "central.jsonl")
    c.start()
    assert c.wait_subscribed(10)
    yield c
    c.stop()


def make_gateway(tmp_path: Path, port: int, rate: float = 1500, **kw: str) -> GatewayProc:
    from gateway.identity.pseudonyms import Keyring, decode_key
    from tests.system.harness import KEY_B64

    ring = Keyring({"k1": decode_key(KEY_B64, "k")}, "k1")
    consented = [ring.pseudonym("loyalty", card_number(i)) for i in range(50)]
    return GatewayProc(tmp_path / "gw", port, sources=synthetic(rate), consented=consented, **kw)


def test_kill9_repeatedly_under_load_loses_nothing(
    tmp_path: Path, pbroker: Mosquitto, central: Central
) -> None:
    gw = make_gateway(tmp_path, pbroker.port)
    kills = 6
    rng = random.Random(7)
    for _ in range(kills):
        gw.start()
        gw.wait_db()
        time.sleep(rng.uniform(0.3, 1.2))
        gw.kill9()
    gw.start()
    gw.wait_ready()
    time.sleep(1.0)
    assert gw.stop() == 0
    gw.drain_and_stop()
    assert gw.last_seq() > 1000
    assert_all_delivered(gw, central, max_dupes=(kills + 2) * WINDOW * BATCH)


def test_broker_restart_under_load(tmp_path: Path, pbroker: Mosquitto, central: Central) -> None:
    gw = make_gateway(tmp_path, pbroker.port)
    gw.start()
    gw.wait_db()
    time.sleep(1.0)
    pbroker.stop()  # a clean stop: mosquitto saves the central's session and its queue
    time.sleep(3.0)
    pbroker.start()
    time.sleep(3.0)
    assert gw.stop() == 0
    gw.drain_and_stop()
    assert_all_delivered(gw, central, max_dupes=2 * WINDOW * BATCH)
    assert "disconnected from broker" in gw.log.read_text()


@pytest.mark.parametrize("kill_during_stall", [False, True], ids=["resume", "kill9-during-stall"])
def test_hung_broker_sigstop(
    tmp_path: Path, pbroker: Mosquitto, central: Central, kill_during_stall: bool
) -> None:
    gw = make_gateway(tmp_path, pbroker.port)
    gw.start()
    gw.wait_db()
    time.sleep(1.0)
    pbroker.pause()
    try:
        time.sleep(15.0)
        if kill_during_stall:
            gw.kill9()
            gw.start()
        time.sleep(15.0)
    finally:
        pbroker.resume()
    time.sleep(5.0)
    assert gw.stop() == 0
    gw.drain_and_stop()
    assert_all_delivered(gw, central, max_dupes=3 * WINDOW * BATCH)


def test_acl_denied_topic_goes_to_dead_letters(tmp_path: Path) -> None:
    acl = "topic read touchpoint/#\ntopic write touchpoint/v1/+/+/status\n"
    with Mosquitto(tmp_path / "mq", acl=acl) as b:
        gw = make_gateway(tmp_path, b.port, rate=200)
        gw.start()
        gw.wait_ready()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and gw.status_json()["dead_letters"] == 0:
            time.sleep(0.2)
        assert gw.stop() == 0
        status = gw.status_json()
        assert status["dead_letters"] > 0
        assert status["last_publish_at"] is None, "a refused publish is not a success"
        log = gw.log.read_text()
        assert "moved to dead letters" in log
        assert "disconnected from broker" not in log, "a refusal is not a disconnect"


def test_full_buffer_while_offline_applies_the_policy(tmp_path: Path) -> None:
    from simulators.infra.broker import free_port

    gw = make_gateway(
        tmp_path,
        free_port(),
        rate=20000,
        buffer_extra="max_bytes = 1048576\ncommit_max_events = 500",
    )
    gw.start()
    gw.wait_ready()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "buffer full: evicted" not in gw.log.read_text():
        time.sleep(0.2)
    assert gw.alive(), "the daemon keeps running with a full buffer"
    assert gw.stop() == 0
    log = gw.log.read_text()
    assert "buffer full: evicted" in log
    status = gw.status_json()
    assert status["db_bytes"] <= 1048576
    assert status["depth"] > 0 and status["last_seq"] > status["depth"]


def test_sighup_reload_under_load_loses_and_resends_nothing(
    tmp_path: Path, pbroker: Mosquitto, central: Central
) -> None:

    gw = make_gateway(tmp_path, pbroker.port)
    gw.start()
    gw.wait_ready()
    time.sleep(1.5)
    gw.set_sources(synthetic(800))  # a changed source: applied by the reload
    assert gw.proc is not None
    pid = gw.proc.pid
    gw.reload()
    gw.wait_log("reloading")
    deadline = time.monotonic() + 15
    while gw.log.read_text().count("touchpoint-gateway 0.1.0:") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.5)
    assert gw.alive() and gw.proc.pid == pid, "a reload is not a restart of the process"
    assert gw.stop() == 0
    gw.drain_and_stop()
    assert_all_delivered(gw, central, max_dupes=0)


def test_sighup_with_an_invalid_config_keeps_the_old_one_running(
    tmp_path: Path, pbroker: Mosquitto, central: Central
) -> None:

    gw = make_gateway(tmp_path, pbroker.port)
    gw.start()
    gw.wait_ready()
    good = gw.config.read_text()
    gw.config.write_text(good.replace('store = "nl-ams-001"', 'store = "NOT VALID"'))
    assert gw.proc is not None
    gw.reload()
    gw.wait_log("reload refused")
    before = gw.last_seq()
    time.sleep(1.5)
    assert gw.alive() and gw.last_seq() > before, "the old config keeps running"
    assert "gateway.store" in gw.log.read_text(), "the refusal names the key"
    gw.config.write_text(good)
    assert gw.stop() == 0
    gw.drain_and_stop()
    assert_all_delivered(gw, central, max_dupes=0)
