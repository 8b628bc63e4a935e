"""One contract suite for the Publisher port, run over every implementation: the in-process
fake the core's unit tests use, and the real MQTT client against a real mosquitto.

What the daemon relies on, and nothing else: the port is the only way in (no isinstance of
a concrete client, no getattr of an optional method)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from gateway.config.sections import MqttConfig
from gateway.observe.metrics import Metrics
from gateway.ports import Publisher, Verdict
from gateway.uplink.mqtt import PahoPublisher
from simulators.infra.broker import Mosquitto
from tests.fakes import FakePublisher
from tests.waiting import until

TOPIC = "touchpoint/v1/nl-ams-001/consent"


class FakeSide:
    """Plays the broker for the fake: acks what is published, delivers to subscriptions."""

    def __init__(self, pub: FakePublisher) -> None:
        self.pub = pub

    def settle(self) -> None:
        for _, _, fut in self.pub.sent:
            if not fut.done():
                fut.set_result(Verdict(ok=True))

    async def inject(self, topic: str, payload: bytes) -> None:
        self.pub.deliver(topic, payload)


class BrokerSide:
    """The real broker acks by itself; a message to a subscription is published to it."""

    def __init__(self, pub: PahoPublisher) -> None:
        self.pub = pub

    def settle(self) -> None:
        return None

    async def inject(self, topic: str, payload: bytes) -> None:
        verdict = await self.pub.publish(topic, payload)
        assert verdict.ok, verdict


@asynccontextmanager
async def implementation(kind: str, tmp_path: Path) -> AsyncIterator[tuple[Any, Any]]:
    if kind == "fake":
        pub = FakePublisher()
        yield pub, FakeSide(pub)
        return
    with Mosquitto(tmp_path / "mosquitto") as broker:
        paho = PahoPublisher(
            MqttConfig(host="127.0.0.1", port=broker.port),
            client_id="gw-contract",
            will_topic="touchpoint/v1/nl-ams-001/gw-01/status",
            will_payload=b"{}",
            metrics=Metrics(),
        )
        try:
            yield paho, BrokerSide(paho)
        finally:
            await paho.close()


@pytest.mark.parametrize("kind", ["fake", "paho"])
def test_every_publisher_keeps_the_port_contract(kind: str, tmp_path: Path) -> None:
    async def run() -> None:
        async with implementation(kind, tmp_path) as (pub, side):
            assert isinstance(pub, Publisher)
            loop_thread = threading.get_ident()
            got: list[tuple[bytes, int]] = []
            connects: list[int] = []
            # Subscriptions and connect hooks are made before start, and hold on every link.
            pub.subscribe(TOPIC, lambda payload: got.append((payload, threading.get_ident())))
            pub.on_connect(lambda: connects.append(threading.get_ident()))
            await pub.start()
            await asyncio.wait_for(pub.wait_connected(), 10)
            assert pub.connected
            await until(lambda: bool(connects), timeout=10.0)
            assert connects == [loop_thread], "on_connect hooks run on the event loop"

            futures = [pub.publish("touchpoint/v1/nl-ams-001/gw-01/events", b"{}")]
            assert isinstance(pub.in_flight, int) and pub.in_flight >= 0
            side.settle()
            verdicts = await asyncio.wait_for(asyncio.gather(*futures), 10)
            assert all(isinstance(v, Verdict) and v.ok for v in verdicts)
            await until(lambda: pub.in_flight == 0, timeout=10.0)

            await asyncio.sleep(0.3)  # a real client subscribes once connected
            await side.inject(TOPIC, b'{"v":1}')
            await until(lambda: bool(got), timeout=10.0)
            assert got == [(b'{"v":1}', loop_thread)], "subscriptions are called on the loop"

            limit = pub.max_payload("touchpoint/v1/nl-ams-001/gw-01/events")
            assert limit is None or (isinstance(limit, int) and limit > 0)
            rm = pub.receive_maximum
            assert rm is None or (isinstance(rm, int) and rm > 0)

    asyncio.run(run())
