"""The power-cut filesystem keeps its promises: what a cut loses, tears and keeps.

Each test writes through a real mount (the kernel's FUSE, as SQLite will), cuts, and
reads the backing directory the next mount starts from.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.powercut.rig import CutFSMount, why_not

_WHY_NOT = why_not()
pytestmark = [
    pytest.mark.host,
    pytest.mark.skipif(_WHY_NOT is not None, reason=f"power cuts: {_WHY_NOT}"),
]

S = 512


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[CutFSMount]:
    m = CutFSMount(tmp_path / "fs")
    m.mount()
    yield m
    m.unmount()


def write(path: Path, data: bytes, offset: int = 0, *, sync: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, data, offset)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cut(fs: CutFSMount, mode: str, seed: int = 1) -> dict[str, object]:
    report = fs.ask(
        cmd="crash",
        mode=mode,
        seed=seed,
        snapshot=str(fs.backing.parent / f"snap-{time.monotonic_ns()}"),
        view=str(fs.backing.parent / f"view-{time.monotonic_ns()}"),
    )
    fs.unmount()
    return report


def test_a_cut_drops_what_was_not_synced(fs: CutFSMount) -> None:
    f = fs.mountpoint / "f"
    write(f, b"A" * 1000, sync=True)
    write(f, b"B" * 1000)
    write(f, b"C" * 500, 1000)  # an unsynced extension too
    assert f.read_bytes() == b"B" * 1000 + b"C" * 500  # the running system sees it all
    cut(fs, "drop")
    assert (fs.backing / "f").read_bytes() == b"A" * 1000


def test_a_name_needs_an_fsync_and_its_data_its_own(fs: CutFSMount) -> None:
    write(fs.mountpoint / "never", b"x" * 100)  # no sync after it at all
    write(fs.mountpoint / "named", b"y" * 100)
    fsync_dir(fs.mountpoint)  # the names so far reach the disk, their data does not
    write(fs.mountpoint / "late", b"z" * 100)
    cut(fs, "drop")
    assert sorted(p.name for p in fs.backing.iterdir()) == ["named", "never"]
    assert (fs.backing / "named").read_bytes() == b""  # the zero-length file of a cut


def test_a_rename_or_unlink_is_pending_until_an_fsync(fs: CutFSMount) -> None:
    write(fs.mountpoint / "a", b"1" * 10, sync=True)
    write(fs.mountpoint / "gone", b"2" * 10, sync=True)
    (fs.mountpoint / "a").rename(fs.mountpoint / "b")
    (fs.mountpoint / "gone").unlink()
    cut(fs, "drop")
    assert sorted(p.name for p in fs.backing.iterdir()) == ["a", "gone"]
    fs.mount()
    (fs.mountpoint / "a").rename(fs.mountpoint / "b")
    write(fs.mountpoint / "other", b"3", sync=True)  # any fsync commits the namespace
    cut(fs, "drop")
    assert sorted(p.name for p in fs.backing.iterdir()) == ["b", "gone", "other"]


def test_a_tear_lands_a_prefix_of_the_last_write_at_a_sector_boundary(fs: CutFSMount) -> None:
    landed = set()
    for seed in range(6):
        if seed:
            fs.mount()
        f = fs.mountpoint / "f"
        write(f, b"\0" * (8 * S), sync=True)
        write(f, b"p" * 100, 8 * S)  # an earlier unsynced write: lands whole
        write(f, b"x" * (8 * S))
        report = cut(fs, "tear", seed)
        data = (fs.backing / "f").read_bytes()
        k = data[: 8 * S].count(b"x") // S
        assert data[: 8 * S] == b"x" * (k * S) + b"\0" * ((8 - k) * S), seed
        assert data[8 * S :] == b"p" * 100
        assert report["torn"] == {"sectors": 8, "landed": k}
        assert k < 8  # a tear, never the whole write
        landed.add(k)
    assert len(landed) > 1  # the boundary moves with the seed


def test_a_tear_never_undoes_a_synced_write(fs: CutFSMount) -> None:
    """The last write before the cut was fsynced (a commit that returned): nothing to tear.
    (The 130-cut profile found this: the model tore a synced WAL frame, the daemon came
    back without a committed transaction and gave its seqs to other events.)"""
    f = fs.mountpoint / "f"
    write(f, b"\0" * (8 * S), sync=True)
    write(f, b"x" * (8 * S), sync=True)
    report = cut(fs, "tear", 2)
    assert (fs.backing / "f").read_bytes() == b"x" * (8 * S)
    assert "torn" not in report


def test_a_subset_lands_whole_sectors_some_not_all(fs: CutFSMount) -> None:
    f = fs.mountpoint / "f"
    write(f, b"\0" * (64 * S), sync=True)
    write(f, b"x" * (64 * S))
    cut(fs, "subset", 3)
    data = (fs.backing / "f").read_bytes()
    sectors = [data[i : i + S] for i in range(0, len(data), S)]
    assert all(s in (b"x" * S, b"\0" * S) for s in sectors)
    kept = sum(s == b"x" * S for s in sectors)
    assert 0 < kept < 64


def test_an_armed_cut_kills_the_writer_inside_its_write(fs: CutFSMount) -> None:
    """The n-th write to a ``-wal`` file: the writer dies (-9) and nothing lands after."""
    script = (
        "import os, sys\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)\n"
        "i = 0\n"
        "while True:\n"
        "    os.pwrite(fd, b'w' * 4096, i * 4096); i += 1\n"
        "    if i % 5 == 0: os.fsync(fd)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", script, str(fs.mountpoint / "db-wal")])
    fs.ask(cmd="arm", pid=writer.pid, suffix="-wal", after=23)
    assert writer.wait(timeout=20) == -signal.SIGKILL
    status = fs.ask(cmd="status")
    assert status["frozen"] and "db-wal at 90112+4096" in status["cut"]["where"]
    with pytest.raises(OSError):  # frozen: nothing lands after the cut
        write(fs.mountpoint / "db-wal", b"late", 0)
    cut(fs, "drop")
    assert (fs.backing / "db-wal").read_bytes() == b"w" * (20 * 4096)  # the last fsync's
