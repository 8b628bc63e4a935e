"""pytest fixtures that start the simulated store, shipped with ``touchpoint-simulators``.

Installing the distribution registers this plugin (entry point ``pytest11``), so a test
just names the fixtures it needs.  Each fixture is function-scoped, starts real processes
or servers on loopback (nothing on the host's system bus or public ports) and stops them
when the test ends:

==================  =========================================================================
``broker``          ``Mosquitto``: mosquitto on a free 127.0.0.1 port (``.port``), anonymous
``fake_central``    ``Central``: the fake central consuming ``touchpoint/v1/+/+/...`` from
                    ``broker``, validating against the contract (``.stats()``,
                    ``.wait_for(pred)``, ``.accepted_keys()``, ``.out_path``), with its
                    consent API on ``.consent.port`` (bearer ``CONSENT_TOKEN``)
``card_reader``     ``CardReaderSim``: a serial card reader on a pty (``.path``, and the
                    symlink ``.link``); ``.write_frame("13005D1DA5")``, ``.unplug()``
``bus``             ``DBusDaemon``: a private system D-Bus (``.address``), with
                    ``DBUS_SYSTEM_BUS_ADDRESS`` set to it for the test
``fake_bluez``      ``BlueZOnThread``: a fake ``org.bluez`` with adapter ``hci0`` on ``bus``;
                    ``.call(lambda fake: fake.advert(...))``, ``.play(scenario)``
``camera``          ``CameraSim``: the kiosk camera, MJPEG over HTTP (``.url``);
                    ``.show(payload)``, ``.outage(s)`` (needs the ``camera`` extra)
``till_printer``    ``TillPrinter``: a fake network printer (``.port``) and a till;
                    ``.print(data, port=your_tap)``, ``.jobs(n)``
==================  =========================================================================

The simulators are imported only when a fixture is used, so the plugin loads in any
pytest session; a missing dependency (mosquitto, dbus-daemon, the camera extra) fails the
test that needs it with an error that says what to install.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from simulators.central.service import Central
    from simulators.devices.camera import CameraSim
    from simulators.devices.card_reader import CardReaderSim
    from simulators.devices.fake_bluez import DBusDaemon
    from simulators.harness import BlueZOnThread, TillPrinter
    from simulators.infra.broker import Mosquitto

# The fake central's consent API answers requests with this bearer token.
CONSENT_TOKEN = "simulated-store-consent-token"  # noqa: S105 - a test fixture's token


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A mosquitto on a free loopback port (``broker.port``); stop/start, pause/resume."""
    from simulators.infra.broker import Mosquitto  # noqa: PLC0415

    with Mosquitto(tmp_path / "mosquitto") as running:
        yield running


@pytest.fixture
def fake_central(broker: Mosquitto, tmp_path: Path) -> Iterator[Central]:
    """The fake central on ``broker``, subscribed before the test starts."""
    from simulators.central.consent_api import ConsentAPI  # noqa: PLC0415
    from simulators.central.service import Central  # noqa: PLC0415

    central = Central(
        "127.0.0.1",
        broker.port,
        out=tmp_path / "central-events.jsonl",
        stats_path=tmp_path / "central-stats.json",
        consent=ConsentAPI(token=CONSENT_TOKEN),
    )
    central.start()
    try:
        if not central.wait_subscribed(10):
            raise RuntimeError(f"the fake central did not subscribe on port {broker.port}")
        yield central
    finally:
        central.stop()


@pytest.fixture
def card_reader(tmp_path: Path) -> Iterator[CardReaderSim]:
    """A card reader on a pty: open ``card_reader.path`` (or the link ``tmp_path/card0``)."""
    from simulators.devices.card_reader import CardReaderSim  # noqa: PLC0415

    with CardReaderSim(link=tmp_path / "card0") as sim:
        yield sim


@pytest.fixture
def bus(monkeypatch: pytest.MonkeyPatch) -> Iterator[DBusDaemon]:
    """A private system D-Bus (its own dbus-daemon); DBUS_SYSTEM_BUS_ADDRESS points at it."""
    from simulators.devices.fake_bluez import DBusDaemon  # noqa: PLC0415

    with DBusDaemon() as daemon:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", daemon.address)
        yield daemon


@pytest.fixture
def fake_bluez(bus: DBusDaemon) -> Iterator[BlueZOnThread]:
    """A fake BlueZ with adapter ``hci0`` on ``bus``; bleak in the test scans it."""
    from simulators.harness import BlueZOnThread  # noqa: PLC0415

    bluez = BlueZOnThread(bus.address)
    try:
        yield bluez
    finally:
        bluez.close()


@pytest.fixture
def camera() -> Iterator[CameraSim]:
    """The kiosk camera at ``camera.url`` (640x480, 10 fps), showing an empty scene."""
    from simulators.devices.camera import CameraSim  # noqa: PLC0415

    with CameraSim(640, 480, fps=10) as sim:
        yield sim


@pytest.fixture
def till_printer() -> Iterator[TillPrinter]:
    """A fake network printer (``till_printer.port``) and a till that prints to any port."""
    from simulators.harness import TillPrinter  # noqa: PLC0415

    pair = TillPrinter()
    try:
        yield pair
    finally:
        pair.close()
