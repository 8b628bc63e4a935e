"""A broker that announces a Maximum Packet Size and a Receive Maximum (MQTT 5 CONNACK):
batches fit it, stored chunks larger than it are sent in parts, the window keeps to it,
across an outage, and nothing is lost."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from simulators.central.service import Central
from simulators.infra.broker import Mosquitto, free_port
from simulators.infra.netproxy import NetProxy
from tests.system.harness import GatewayProc, assert_all_delivered, card_number, healthz, synthetic
from tests.system.uplink import first_sent, wait_count

pytestmark = pytest.mark.slow

LIMITS = "max_packet_size 65536\nmax_inflight_messages 4"


def consented() -> list[str]:
    from gateway.identity.pseudonyms import Keyring, decode_key
    from tests.system.harness import KEY_B64

    ring = Keyring({"k1": decode_key(KEY_B64, "k")}, "k1")
    return [ring.pseudonym("loyalty", card_number(i)) for i in range(50)]


def test_batches_fit_the_brokers_maximum_packet_size_across_an_outage(tmp_path: Path) -> None:
    health = free_port()
    with (
        Mosquitto(tmp_path / "mq", extra_conf=LIMITS) as broker,
        NetProxy(broker.port, mqtt=True) as link,
        Central("127.0.0.1", broker.port, out=tmp_path / "central.jsonl") as central,
    ):
        assert central.wait_subscribed(10)
        gw = GatewayProc(
            tmp_path / "gw",
            link.port,
            sources=synthetic(3000),
            consented=consented(),
            # batches and stored chunks far above the broker's 64 KB
            mqtt_extra="batch_max_bytes = 4194304",
            health_port=health,
        )
        gw.config.write_text(
            gw.config.read_text().replace("batch_max_events = 200", "batch_max_events = 5000")
        )
        gw.start()
        gw.wait_log("connected to broker")
        time.sleep(1)
        link.refuse()
        link.cut()
        time.sleep(4)  # a backlog of large chunks
        link.accept()
        wait_count(gw, "connected to broker", 2)
        _, doc = healthz(health)
        limits = doc["broker"]["limits"]
        assert limits["max_packet_bytes"] == 65536
        assert limits["receive_maximum"] == 4
        assert limits["window"] == 4
        assert limits["batch_max_bytes"] <= 65536
        assert gw.stop() == 0
        gw.drain_and_stop(timeout=90)
        assert_all_delivered(gw, central, max_dupes=4 * 5000)
        sent = list(link.published)
    log = gw.log.read_text()
    assert log.count("disconnected from broker") == 1, "only the outage: the broker never drops us"
    assert "oversize" not in (tmp_path / "mq" / "mosquitto.log").read_text()
    assert max(len(payload) for _, _, payload in sent) <= 65536
    assert "broker limits: maximum packet size 65536, receive maximum 4" in log


def test_lower_batch_limits_take_effect_for_stored_chunks(tmp_path: Path) -> None:
    """Chunks stored under batch_max_events = 1000 go out in batches of at most 50 once
    a reload (SIGHUP) says so."""

    with (
        Mosquitto(tmp_path / "mq") as broker,
        NetProxy(broker.port, mqtt=True) as link,
        Central("127.0.0.1", broker.port, out=tmp_path / "central.jsonl") as central,
    ):
        assert central.wait_subscribed(10)
        link.refuse()  # the broker is away: everything stays buffered in large chunks
        gw = GatewayProc(
            tmp_path / "gw",
            link.port,
            sources=synthetic(2000),
            consented=consented(),
            buffer_extra="commit_interval_ms = 200",  # commits, and so chunks, of ~400
        )
        big = gw.config.read_text().replace("batch_max_events = 200", "batch_max_events = 1000")
        gw.config.write_text(big)
        gw.start()
        gw.wait_db()
        time.sleep(2)
        assert gw.query("SELECT max(n) FROM chunks")[0] > 50
        gw.config.write_text(big.replace("batch_max_events = 1000", "batch_max_events = 50"))
        gw.set_sources("")  # and the reload stops the source: the backlog is what is left
        gw.config.write_text(
            gw.config.read_text().replace("batch_max_events = 200", "batch_max_events = 50")
        )
        assert gw.proc is not None
        gw.reload()
        gw.wait_log("reloading")
        link.accept()
        gw.wait_drained(60)
        assert gw.stop() == 0
        assert_all_delivered(gw, central, max_dupes=10 * 50)
        sizes = [
            len(json.loads(p)["events"])
            for _, t, p in first_sent_all(link)
            if t.endswith("/events")
        ]
    assert sizes and max(sizes) <= 50, max(sizes)


def first_sent_all(link: NetProxy) -> list[tuple[float, str, bytes]]:
    first_sent(link)  # parses: every payload is a valid batch
    return list(link.published)


def test_an_event_larger_than_the_broker_takes_is_diagnosed_by_name(tmp_path: Path) -> None:
    """A batch that cannot fit the broker's packet even alone is refused before sending
    (the broker would drop the link for it, again and again): named in the log and in
    health, moved to dead letters; the link stays up."""
    health = free_port()
    with Mosquitto(tmp_path / "mq", extra_conf="max_packet_size 200") as broker:
        gw = GatewayProc(
            tmp_path / "gw",
            broker.port,
            sources=synthetic(20),
            consented=consented(),
            health_port=health,
        )
        gw.start()
        gw.wait_log("Packet too large")
        code, doc = healthz(health)
        assert gw.stop() == 0
    assert code == 503
    assert any("too large for the broker's maximum packet size" in p for p in doc["problems"])
    assert "Packet too large" in doc["last_error"]["forwarder"]
    assert doc["broker"]["limits"]["batches_too_large"] >= 1
    assert gw.log.read_text().count("disconnected from broker") == 0
    assert gw.query("SELECT count(*) FROM dead_letters")[0] >= 1
