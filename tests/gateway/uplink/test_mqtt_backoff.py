"""The MQTT reconnects are paced by the gateway's one Backoff (issue 15): each wait is in
[c/2, c] of its step c = min(max, min * 2**n), reset by a good CONNACK, and paho's own
private waiting is not overridden (its public reconnect delay is set before each wait)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import paho.mqtt.client as mqtt

from gateway.config.sections import MqttConfig
from gateway.observe.metrics import Metrics
from gateway.uplink import mqtt as gateway_mqtt
from gateway.uplink.mqtt import PahoPublisher


class SlammingListener:
    """Accepts each connection and closes it at once, noting when it came."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.times: list[float] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.times.append(time.monotonic())
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_reconnect_waits_follow_the_one_backoff() -> None:
    low, high = 0.2, 1.6
    listener = SlammingListener()

    async def run() -> None:
        pub = PahoPublisher(
            MqttConfig(
                host="127.0.0.1", port=listener.port, reconnect_min_s=low, reconnect_max_s=high
            ),
            client_id="gw-backoff",
            will_topic="touchpoint/v1/nl-ams-001/gw-01/status",
            will_payload=b"{}",
            metrics=Metrics(),
        )
        await pub.start()
        try:
            deadline = time.monotonic() + 30
            while len(listener.times) < 8 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            await pub.close()

    try:
        asyncio.run(run())
    finally:
        listener.close()
    gaps = [b - a for a, b in zip(listener.times, listener.times[1:], strict=False)]
    assert len(gaps) >= 7, listener.times
    for n, gap in enumerate(gaps[:7]):
        step = min(high, low * 2**n)
        assert step / 2 - 0.02 <= gap <= step + 0.6, (n, gap, gaps)
    # Jitter: the waits at the cap are not all the same.
    assert len({round(g, 2) for g in gaps[3:7]}) > 1, gaps
    # paho's private wait is paho's: the gateway sets its public delay instead.
    client = vars(gateway_mqtt)["_Client"]
    assert issubclass(client, mqtt.Client) and "_reconnect_wait" not in vars(client)
