"""The disk reserve beside the buffer survives a power cut: checked by size, made again
whole, synced with its folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulators.infra.broker import Mosquitto
from tests.system.harness import GatewayProc, synthetic

pytestmark = pytest.mark.slow


def test_a_reserve_a_power_cut_left_empty_is_made_again(tmp_path: Path, broker: Mosquitto) -> None:
    """A power cut can leave ``buffer.db.reserve`` with its name but fewer bytes (it was
    not synced): the daemon checks its size and makes it again, whole."""
    gw = GatewayProc(tmp_path / "gw", broker.port, sources=synthetic(5))
    reserve = gw.db.with_name(gw.db.name + ".reserve")
    reserve.parent.mkdir(parents=True, exist_ok=True)
    reserve.write_bytes(b"")  # what the cut left
    gw.start()
    gw.wait_ready()
    assert reserve.stat().st_size == 2 * 1024 * 1024  # disk_reserve_bytes' default
    assert gw.stop() == 0
