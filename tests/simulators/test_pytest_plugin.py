"""The simulators' pytest plugin: each fixture starts its simulator, and real clients use it.

The fixtures come from ``simulators.pytest_plugin`` (registered by touchpoint-simulators'
entry point), used here exactly as an integrator's test uses them; the clients are the
ones an integration would use (paho, bleak, a raw pty read, an HTTP GET, a TCP proxy).
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
import zxingcpp
from bleak import BleakScanner
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData

import simulators.pytest_plugin
from simulators.central.service import Central
from simulators.devices.camera import CameraSim
from simulators.devices.card_reader import CardReaderSim, rdm6300_frame
from simulators.devices.fake_bluez import DBusDaemon
from simulators.devices.till import receipt
from simulators.harness import BlueZOnThread, TillPrinter
from simulators.infra.broker import Mosquitto
from simulators.infra.netproxy import NetProxy
from tests.simulators.test_central import DEVICE, STORE, STREAM, footfall

ROOT = Path(__file__).resolve().parents[2]


def test_the_plugin_defines_each_fixture_once(request: pytest.FixtureRequest) -> None:
    """Loaded by entry point and named in tests/conftest.py: one plugin, one definition."""
    plugins = request.config.pluginmanager.get_plugins()
    assert sum(p is simulators.pytest_plugin for p in plugins) == 1
    shown = subprocess.run(
        [sys.executable, "-m", "pytest", "--fixtures", "-p", "no:randomly", __file__],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    names = [line.split()[0] for line in shown.splitlines() if line and not line[0].isspace()]
    for fixture in ("broker", "fake_central", "card_reader", "bus", "fake_bluez", "camera",
                    "till_printer"):  # fmt: skip
        assert names.count(fixture) == 1, (fixture, shown)


def test_broker_and_fake_central(broker: Mosquitto, fake_central: Central) -> None:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        doc = {"v": 1, "store": STORE, "device": DEVICE, "stream": STREAM,
               "events": [footfall(1), footfall(2)]}  # fmt: skip
        topic = f"touchpoint/v1/{STORE}/{DEVICE}/events"
        client.publish(topic, json.dumps(doc), qos=1).wait_for_publish(5)
        client.publish(topic, b"not json", qos=1).wait_for_publish(5)
        stats = fake_central.wait_for(lambda s: s["accepted"] == 2 and s["invalid"], timeout=10)
    finally:
        client.disconnect()
        client.loop_stop()
    assert fake_central.accepted_keys() == {(STORE, DEVICE, STREAM, 1), (STORE, DEVICE, STREAM, 2)}
    assert sum(stats["invalid"].values()) == 1
    assert fake_central.consent is not None and fake_central.consent.port > 0


def test_card_reader_on_a_pty(card_reader: CardReaderSim) -> None:
    assert card_reader.link is not None and card_reader.link.resolve() == Path(card_reader.path)
    fd = os.open(card_reader.link, os.O_RDWR | os.O_NOCTTY)
    try:
        card_reader.write_frame("13005D1DA5")
        got = b""
        while len(got) < 14 and select.select([fd], [], [], 5)[0]:
            got += os.read(fd, 64)
    finally:
        os.close(fd)
    assert got == rdm6300_frame("13005D1DA5")


def test_fake_bluez_is_scanned_by_bleak(bus: DBusDaemon, fake_bluez: BlueZOnThread) -> None:
    assert os.environ["DBUS_SYSTEM_BUS_ADDRESS"] == bus.address == fake_bluez.address
    seen: list[tuple[str, int, dict[int, bytes]]] = []

    def on_advert(device: BLEDevice, adv: AdvertisementData) -> None:
        seen.append((device.address, adv.rssi, adv.manufacturer_data))

    async def main() -> None:
        scanner = BleakScanner(on_advert, bluez={"adapter": "hci0"})
        await scanner.start()
        try:
            await asyncio.to_thread(fake_bluez.call, lambda fake: fake.advert(
                "hci0", "C4:00:00:00:00:01", rssi=-61, manufacturer_data={0x0059: b"\x01\x02"}
            ))  # fmt: skip
            for _ in range(100):
                if seen:
                    break
                await asyncio.sleep(0.05)
        finally:
            await scanner.stop()

    asyncio.run(main())
    assert seen[:1] == [("C4:00:00:00:00:01", -61, {0x0059: b"\x01\x02"})]


def test_fake_bluez_plays_a_scenario_to_bleak(fake_bluez: BlueZOnThread) -> None:
    seen: set[str] = set()

    def on_advert(device: BLEDevice, adv: AdvertisementData) -> None:
        seen.add(device.address)

    async def main() -> int:
        async with BleakScanner(on_advert, bluez={"adapter": "hci0"}):
            scenario = ROOT / "simulators/scenarios/ble-walkthrough.toml"
            return await asyncio.to_thread(fake_bluez.play, scenario, speed=4.0)

    steps = asyncio.run(main())
    assert steps > 0
    assert len(seen) >= 3  # the shoppers, the passer-by, the phones


def test_camera_serves_what_it_shows(camera: CameraSim) -> None:
    camera.show(b"https://example.test/r/42")
    with urllib.request.urlopen(f"http://127.0.0.1:{camera.port}/frame.jpg", timeout=5) as r:
        jpeg = r.read()
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert [bytes(b.bytes) for b in zxingcpp.read_barcodes(img)] == [b"https://example.test/r/42"]
    assert camera.url.endswith("/stream.mjpg")


def test_till_prints_through_a_tap_to_the_printer(till_printer: TillPrinter) -> None:
    job = receipt(["SHOP", "1x TEA  1.80"], qr_data=b"https://example.test/r/7")
    with NetProxy(till_printer.port) as tap:  # stands in for an integrator's receipt tap
        till_printer.print(job, port=tap.port)
        till_printer.print()
        jobs = till_printer.jobs(2)
    assert jobs == [job, receipt()]
