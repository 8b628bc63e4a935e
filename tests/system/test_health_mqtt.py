"""Health over MQTT from the real daemon process: central sees a store's trouble."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from simulators.central.service import Central
from simulators.infra.broker import Mosquitto, free_port
from tests.system.harness import DEVICE, STORE, GatewayProc, synthetic

pytestmark = pytest.mark.slow

GATEWAY = f"{STORE}/{DEVICE}"

READER = """
[[sources]]
kind = "serial_card"
name = "till-1-card"
device = "{device}"
protocol = "rdm6300"
lane = "till-1"
reopen_min_s = 0.05
reopen_max_s = 0.2
"""


def test_health_is_published_retained_and_shows_a_dead_reader(tmp_path: Path) -> None:
    """The daemon publishes a valid, retained health message at start; a card reader that
    is gone shows as a problem in the next one (within the rate limit); after a broker
    restart the message is published again."""
    with Mosquitto(tmp_path / "mq") as broker:
        central = Central("127.0.0.1", broker.port)
        central.start()
        assert central.wait_subscribed(10)
        gw = GatewayProc(
            tmp_path / "gw",
            broker.port,
            sources=synthetic(5) + READER.format(device=tmp_path / "no-such-tty"),
        )
        gw._template += (
            "health_interval_s = 60\nhealth_min_interval_s = 0.5\n"
            '[health]\nlisten = "127.0.0.1:' + str(free_port()) + '"\nsource_down_s = 1\n'
        )
        gw.set_sources(synthetic(5) + READER.format(device=tmp_path / "no-such-tty"))
        gw.start()
        try:
            first = central.wait_health(GATEWAY, lambda h: True, timeout=20)
            assert first["retained"] is True  # published retained (retain as published)
            assert first["key_id"] == "k1" and first["version"]
            assert set(first["sources"]) == {"load", "till-1-card"}
            assert first["broker"]["connected"] is True
            assert first["clock"]["state"] in ("synchronized", "unsynchronized", "unknown")
            assert first["rss_bytes"] and first["rss_bytes"] > 1 << 20
            bad = central.wait_health(GATEWAY, lambda h: h["status"] == "unhealthy", timeout=30)
            assert any("till-1-card" in p for p in bad["problems"]), bad["problems"]
            assert bad["sources"]["till-1-card"]["state"] in ("absent", "error")
            assert bad["sources"]["load"]["state"] == "ok"

            # a new subscriber gets the newest as the retained message
            late = Central("127.0.0.1", broker.port)
            late.start()
            try:
                kept = late.wait_health(GATEWAY, lambda h: h["retained"], timeout=20)
                assert kept["status"] == "unhealthy"
            finally:
                late.stop()

            before = len(central.health(GATEWAY))
            broker.stop()
            time.sleep(1.0)
            broker.start()
            central.wait_subscribed(20)
            deadline = time.monotonic() + 30
            while len(central.health(GATEWAY)) <= before and time.monotonic() < deadline:
                time.sleep(0.2)
            assert len(central.health(GATEWAY)) > before, "not published after the reconnect"
        finally:
            gw.stop()
            central.stop()
