"""Opt-in: the BLE source on a real adapter, through the real BlueZ on the system bus.

    TOUCHPOINT_REAL_BLE=hci0 pytest tests/drivers/test_ble_real.py

scans that adapter for ``TOUCHPOINT_REAL_BLE_SECONDS`` (default 8) through ``BleSource``
and asserts it reports a clear status: ``ok`` with what it scans, or else the state and
detail (adapter absent, powered off, bluetoothd not running) in the failure message.
Set ``TOUCHPOINT_REAL_BLE_ALLOW`` to your beacons' iBeacon UUIDs / Eddystone namespaces
(comma-separated) to also require a presence reading when one of them is heard; and
``TOUCHPOINT_REAL_BLE_MODE=passive`` to try passive scanning (reported, with the reason,
when BlueZ cannot do it).  Skipped, saying so, without ``TOUCHPOINT_REAL_BLE``.
Needs read/write access to BlueZ on the system bus (root, or group ``bluetooth``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import uuid
from typing import Any

import pytest

from drivers.ble.source import BleSource
from gateway.config.sources import BleSourceConfig
from gateway.identity.pseudonyms import Keyring
from gateway.observe.metrics import Metrics
from gateway.ports import Reading, SourceContext

ADAPTER = os.environ.get("TOUCHPOINT_REAL_BLE", "")

pytestmark = pytest.mark.skipif(
    not ADAPTER,
    reason="real-hardware test: set TOUCHPOINT_REAL_BLE=hci0 (the adapter) to run it",
)


def _allow_lists(text: str) -> dict[str, tuple[str, ...]]:
    uuids, namespaces = [], []
    for item in filter(None, (part.strip() for part in text.split(","))):
        if re.fullmatch(r"[0-9a-fA-F]{20}", item):
            namespaces.append(item.lower())
        else:
            uuids.append(str(uuid.UUID(item)))
    # a random UUID when none is given: nothing nearby is ours, every advert is counted
    return {
        "allow_ibeacon_uuids": tuple(uuids) or (str(uuid.uuid4()),),
        "allow_eddystone_namespaces": tuple(namespaces),
    }


def test_real_adapter_scans_with_a_clear_status(keyring: Keyring) -> None:
    seconds = float(os.environ.get("TOUCHPOINT_REAL_BLE_SECONDS", "8"))
    allow = _allow_lists(os.environ.get("TOUCHPOINT_REAL_BLE_ALLOW", ""))
    values: dict[str, Any] = {
        "kind": "ble", "name": "real-ble", "zone": "bench", "adapter": ADAPTER,
        "scanning_mode": os.environ.get("TOUCHPOINT_REAL_BLE_MODE", "active"),
        "enter_rssi": -100, "exit_rssi": -110, "min_dwell_s": 1.0, "silence_s": 30.0,
        **allow,
    }  # fmt: skip
    ctx = SourceContext(name="real-ble", keyring=keyring, metrics=Metrics())
    source = BleSource(BleSourceConfig(**values), ctx)
    readings: list[Reading] = []

    async def main() -> None:
        async def collect() -> None:
            async for reading in source.readings():
                readings.append(reading)

        task = asyncio.create_task(collect(), name="real-ble")
        await asyncio.sleep(seconds)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())
    state, detail = ctx.state.get("state"), ctx.state.get("detail", "")
    assert state == "ok", f"{ADAPTER}: state {state!r}: {detail or 'no detail'}"
    assert detail.startswith(f"scanning {ADAPTER} (")
    counts = ctx.metrics.by_label("ble_adverts_total", "result")
    print(f"{ADAPTER}: {detail}; adverts by result: {counts}")
    if counts.get("ours", 0) >= 3:  # one of the listed beacons was heard for a while
        assert [r.type for r in readings][:1] == ["presence.enter"]
