"""Fixtures shared by the driver tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from simulators.fake_bluez import DBusDaemon


@pytest.fixture
def bus(monkeypatch: pytest.MonkeyPatch) -> Iterator[DBusDaemon]:
    """A private system D-Bus (its own dbus-daemon) for a fake BlueZ; bleak is pointed at it."""
    with DBusDaemon() as d:
        monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", d.address)
        yield d
