"""Power cuts under load, in ``make test``: the buffer loses no committed event.

The rig (``rig.py``) runs the real daemon with its buffer on a FUSE filesystem of our
own (``cutfs.py``) that keeps unsynced writes in memory and, at a cut, drops them, tears
the last write at a sector boundary or keeps a random subset.  ``POWERCUT_CUTS`` sets
the number of cuts (``make powercut``: the long profile); ``POWERCUT_RATE`` the load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.buffer.outbox import TEST_WAL_AUTOCHECKPOINT_VAR, UNSAFE_SYNCHRONOUS_VAR
from simulators.infra.broker import Mosquitto
from tests.powercut.rig import RESERVE_BYTES, run_power_cuts, why_not

pytestmark = [pytest.mark.slow, pytest.mark.host]

_WHY_NOT = why_not()
needs_fuse = pytest.mark.skipif(_WHY_NOT is not None, reason=f"power cuts: {_WHY_NOT}")


@pytest.fixture
def pbroker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "mq", persistence=True) as b:
        yield b


def _window() -> int | None:
    """``POWERCUT_WINDOW_MS``: the buffer's durability window (default: the daemon's)."""
    value = os.environ.get("POWERCUT_WINDOW_MS", "")
    return int(value) if value else None


def _settings() -> tuple[int, float, int, bool]:
    cuts = int(os.environ.get("POWERCUT_CUTS", "12"))
    rate = float(os.environ.get("POWERCUT_RATE", "1000"))
    seed = int(os.environ.get("POWERCUT_SEED", "16"))
    keep = os.environ.get("POWERCUT_KEEP", "") == "1"  # each cut's files, for a post-mortem
    return cuts, rate, seed, keep


@needs_fuse
def test_power_cuts_under_load_lose_no_committed_event(tmp_path: Path, pbroker: Mosquitto) -> None:
    cuts, rate, seed, keep = _settings()
    window = _window()
    # With the durability window SQLite is written once per window and the WAL (64 pages)
    # seldom fills: a checkpoint follows every commit here, so that armed checkpoint cuts land.
    out = run_power_cuts(
        tmp_path, pbroker.port, cuts=cuts, rate=rate, seed=seed, keep=keep, window_ms=window,
        env={TEST_WAL_AUTOCHECKPOINT_VAR: "1"},
    )  # fmt: skip
    summary = out.summary()
    print("power cuts:", json.dumps(summary))
    bad = [c for c in out.cuts if c.integrity != "ok"]
    assert not bad, f"integrity_check after cuts: {bad}"
    assert not out.lost, f"{len(out.lost)} committed events lost: {out.lost[:5]} {out.lost_at}"
    assert not out.reused_in_buffer, (
        f"(stream, seq) reused in the buffer: {out.reused_in_buffer[:5]}"
    )
    assert out.conflicts == 0, f"{out.conflicts} (stream, seq) re-sent with other content"
    assert out.streams_in_buffer == 1, f"a cut lost the whole buffer: {summary}"
    # Seqs skipped after a cut are declared (contract README, "Delivery semantics"): the
    # central's set is gapless but for them, no range covers a committed event, and every
    # declaration got its PUBACK by the end.
    assert not out.gaps, (
        f"seqs neither received nor declared: { {s: g[:5] for s, g in out.gaps.items()} }"
    )
    assert not out.declared_over_committed, (
        f"declared skipped but committed: {out.declared_over_committed[:5]} {out.declared}"
    )
    assert not out.declarations_pending, out.declarations_pending
    if window == 0:  # every group committed and fsynced: nothing read is ever skipped
        assert not out.declared, out.declared
    else:  # 12 cuts under load: the stage held undelivered events at some of them
        assert out.declared, summary
    # the method reached where it should: cuts inside WAL writes and inside checkpoints
    assert summary["inside_wal_write"] >= 1 and summary["inside_checkpoint"] >= 1, summary
    # the disk reserve is whole again after every restart, whatever the cut left of it
    assert summary["reserve_after_restart"] == [RESERVE_BYTES], summary
    assert out.committed > 0 and out.delivered >= out.committed, summary


@needs_fuse
def test_negative_control_weak_sync_is_caught(tmp_path: Path, pbroker: Mosquitto) -> None:
    """The same cuts against ``synchronous=NORMAL`` (commits not fsynced, the WAL synced
    only at checkpoints), every cut dropping what was not synced: the checker must see
    (stream, seq)s the central received come again with other content (the central keeps
    the first copy, so each conflict is an event lost), lost events or a lost buffer."""
    _, rate, seed, keep = _settings()
    cuts = int(os.environ.get("POWERCUT_CONTROL_CUTS", "4"))
    out = run_power_cuts(
        tmp_path, pbroker.port, cuts=cuts, rate=rate, seed=seed,
        env={UNSAFE_SYNCHRONOUS_VAR: "NORMAL"}, modes=("drop",), keep=keep,
    )  # fmt: skip
    summary = out.summary()
    print("negative control (synchronous=NORMAL):", json.dumps(summary))
    found = out.conflicts + len(out.lost) + len(out.reused_in_buffer) + out.streams_in_buffer - 1
    assert found > 0, f"the checker saw nothing wrong under synchronous=NORMAL: {summary}"


@needs_fuse
def test_with_every_group_committed_the_central_is_gapless(
    tmp_path: Path, pbroker: Mosquitto
) -> None:
    """``durability_window_ms = 0``: every group is committed and fsynced before it is
    acknowledged, so a cut skips nothing and the central's seqs have no gap."""
    _, rate, seed, keep = _settings()
    cuts = int(os.environ.get("POWERCUT_STRICT_CUTS", "6"))
    out = run_power_cuts(
        tmp_path, pbroker.port, cuts=cuts, rate=rate, seed=seed + 1, keep=keep, window_ms=0
    )
    summary = out.summary()
    print("power cuts, no durability window:", json.dumps(summary))
    assert all(c.integrity == "ok" for c in out.cuts), out.cuts
    assert not out.lost and not out.reused_in_buffer and out.conflicts == 0, summary
    assert out.streams_in_buffer == 1, summary
    assert summary["inside_wal_write"] >= 1 and summary["inside_checkpoint"] >= 1, summary
    assert not out.gaps and not out.declared, (
        f"the central's seqs have gaps: { {s: g[:5] for s, g in out.gaps.items()} } "
        f"declared skipped: {out.declared}"
    )
