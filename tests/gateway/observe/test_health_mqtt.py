"""The retained health message (gateway/observe/health_mqtt.py) over the real publisher
(PahoPublisher) against a real broker (simulators.infra.broker.Mosquitto)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config.sections import MqttConfig
from gateway.observe.health import HealthMonitor
from gateway.observe.health_mqtt import HealthPublisher
from gateway.observe.metrics import Metrics
from gateway.uplink.mqtt import PahoPublisher
from simulators.infra.broker import Mosquitto
from tests.gateway.observe.test_health import GatewayLike

TOPIC = "touchpoint/v1/s1/d1/health"


def retained(port: int, topic: str, timeout: float) -> dict[str, Any] | None:
    """The retained message on ``topic`` as a fresh subscriber reads it, or None."""
    got: list[bytes] = []
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(_c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.retain:
            got.append(bytes(msg.payload))
            done.set()

    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        done.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    return json.loads(got[0]) if got else None


def test_the_health_message_is_published_again_at_once_after_a_quick_reconnect(
    tmp_path: Path,
) -> None:
    """A broker restarted without persistence has lost the retained copy: the message is
    published again right after the reconnect, even when the link came back before the
    next tick saw it down (before, only a tick that found the link down did that, so a
    reconnect between two ticks left the broker without a health message until the
    next ``health_interval_s``)."""

    async def run(broker: Mosquitto) -> None:
        cfg = MqttConfig(host="127.0.0.1", port=broker.port, reconnect_min_s=0.1,
                         reconnect_max_s=0.3)  # fmt: skip
        metrics = Metrics()
        pub = PahoPublisher(cfg, client_id="health-test", will_topic="touchpoint/v1/s1/d1/status",
                            will_payload=b"offline", metrics=metrics)  # fmt: skip
        await pub.start()
        await asyncio.wait_for(pub.wait_connected(), 10)
        gw = GatewayLike(metrics=metrics, publisher=None)
        gw.publisher = pub  # type: ignore[assignment]
        health = HealthPublisher(HealthMonitor(gw), pub, TOPIC, key_id="k1", interval_s=600,
                                 min_interval_s=600, tick_s=60)  # fmt: skip
        task = asyncio.create_task(health.run())

        async def published(n: int, within: float) -> None:
            deadline = time.monotonic() + within
            while health.published < n and time.monotonic() < deadline:
                await asyncio.sleep(0.05)

        try:
            await published(1, 10)
            first = await asyncio.to_thread(retained, broker.port, TOPIC, 10)
            assert first is not None, "no health message at start"
            broker.stop()  # no persistence: the retained copy is gone
            broker.start()
            deadline = time.monotonic() + 10
            while metrics.get("mqtt_reconnects_total") < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.wait_for(pub.wait_connected(), 10)
            await published(2, 5)
            again = await asyncio.to_thread(retained, broker.port, TOPIC, 2)
            assert again is not None, "the reconnect left the broker without a health message"
            assert health.published == 2
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await pub.close()

    with Mosquitto(tmp_path / "mq") as broker:
        asyncio.run(run(broker))
