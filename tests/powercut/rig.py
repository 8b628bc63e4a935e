"""Power cuts against the real daemon: the mount, the run loop and the checker.

The daemon runs as a process (``GatewayProc``) with its buffer on a ``cutfs`` mount, a
synthetic source for load, a real mosquitto and the fake central.  A cut: the
filesystem kills the daemon (-9) and freezes - at a random moment, inside a write to the
``-wal`` file, or inside a write to the main database file (in WAL mode only a
checkpoint writes it) - then applies one loss (drop, tear, subset) to its backing
directory and is unmounted; the test checks the database the cut left, mounts again and
restarts the daemon.

What counts as committed, and so must reach the central unchanged:
- every event in the buffer's synced state at a cut (the snapshot the filesystem takes
  before applying the loss: what an fsync the daemon completed put on the disk);
- every event the central received (a (stream, seq) it holds must never come again with
  other content: ``conflicts``).
After the final drain the central's seqs of each stream are 1..max without a gap but for
the ranges the daemon declared skipped (``gaps``: the consumer's rule, contract README
"Delivery semantics").  With ``durability_window_ms = 0`` every group is committed and
nothing is skipped.  With a durability window (the default, 500 ms) a cut may lose the
undelivered events read in the last window, and the daemon, which cannot know after a cut
which seqs the broker saw, resumes numbering past its fsynced high-water mark and
declares the range between: some of it may have been delivered before the cut (legal),
but no declared range may cover a committed event (``declared_over_committed``), and
every declaration must have been confirmed by the end (``declarations_pending``).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from random import Random
from typing import Any

from simulators.central.service import Central
from tests.system.harness import GatewayProc, card_number, synthetic

REPO = Path(__file__).resolve().parents[2]
KINDS = ("random", "wal", "checkpoint")
MODES = ("drop", "tear", "subset")
Key = tuple[str, int]  # (stream, seq)
RESERVE_BYTES = 262144  # buffer.disk_reserve_bytes: checked after every cut and restart


def why_not() -> str | None:
    """Why FUSE cannot be mounted here (a skip reason), or None."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root to mount a FUSE filesystem"
    if not Path("/dev/fuse").exists():
        return "no /dev/fuse"
    try:
        import fuse  # noqa: F401 - fusepy loads libfuse2 through ctypes
    except (ImportError, OSError) as exc:
        return f"fusepy cannot load libfuse2 ({exc}): make system-deps installs it"
    if shutil.which("umount") is None:
        return "no umount"
    return None


# Every mount a test made: one whose test died before unmounting (a timeout) would leave a
# dead FUSE mount ("Transport endpoint is not connected") in the tmp folder.
_MOUNTED: list[CutFSMount] = []


@atexit.register
def _unmount_leftovers() -> None:
    for m in _MOUNTED:
        m.unmount()


class CutFSMount:
    """A ``cutfs`` process on ``mountpoint`` over ``backing``, and its control socket."""

    def __init__(self, root: Path) -> None:
        self.backing = root / "backing"
        self.mountpoint = root / "mnt"
        self.control = root / "cutfs.sock"
        self.log = root / "cutfs.log"
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        _MOUNTED.append(self)

    def mount(self, timeout: float = 10) -> None:
        self.control.unlink(missing_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.powercut.cutfs", str(self.backing),
                 str(self.mountpoint), str(self.control)],
                cwd=REPO, stdout=log, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if os.path.ismount(self.mountpoint) and self.control.exists():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.unmount()
        raise RuntimeError(f"cutfs did not mount; its log:\n{self.log.read_text()[-2000:]}")

    def ask(self, **req: Any) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(60)
            s.connect(str(self.control))
            with s.makefile("rw", encoding="utf-8") as f:
                f.write(json.dumps(req) + "\n")
                f.flush()
                answer: dict[str, Any] = json.loads(f.readline())
        if "error" in answer:
            raise RuntimeError(f"cutfs: {answer['error']}")
        return answer

    def unmount(self) -> None:
        if os.path.ismount(self.mountpoint):
            done = subprocess.run(
                ["umount", str(self.mountpoint)], check=False, capture_output=True
            )
            if done.returncode != 0:
                subprocess.run(["umount", "-l", str(self.mountpoint)], check=False)
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def event_digest(event: dict[str, Any]) -> str:
    """The content of an event, as the central compares copies (its own canonical form)."""
    canonical = json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass
class Buffer:
    """What a copy of the buffer holds: integrity_check, its stream, its events."""

    integrity: str
    stream: str | None = None
    events: dict[Key, str] = field(default_factory=dict)  # (stream, seq) -> digest


def buffered_events(folder: Path) -> Buffer:
    """Open the copy of the buffer in ``folder`` (SQLite recovers its WAL)."""
    db = folder / "buffer.db"
    if not db.exists():
        return Buffer("no database file")
    conn = sqlite3.connect(db, timeout=5)
    try:
        integrity = str(conn.execute("PRAGMA integrity_check").fetchone()[0])
        if integrity != "ok":
            return Buffer(integrity)
        if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
            return Buffer("an empty database: the buffer was lost whole")
        stream = str(conn.execute("SELECT value FROM meta WHERE key = 'stream'").fetchone()[0])
        events: dict[Key, str] = {}
        for (body,) in conn.execute("SELECT body FROM chunks"):
            for ev in json.loads(f"[{body}]"):
                events[(stream, int(ev["seq"]))] = event_digest(ev)
        return Buffer(integrity, stream, events)
    except (sqlite3.DatabaseError, TypeError) as exc:  # not our database any more: a finding
        return Buffer(f"{exc.__class__.__name__}: {exc}")
    finally:
        conn.close()


def copy_buffer(src: Path, dst: Path) -> Path:
    """The database and its WAL (not the -shm: SQLite rebuilds it) into ``dst``."""
    dst.mkdir(parents=True)
    for name in ("buffer.db", "buffer.db-wal"):
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    return dst


def central_events(path: Path) -> dict[Key, str]:
    """The first copy of every event the central accepted (its ``out`` file)."""
    out: dict[Key, str] = {}
    if not path.exists():
        return out
    for line in path.read_text(encoding="utf-8").splitlines():
        doc = json.loads(line)
        stream = doc.pop("stream")
        doc.pop("store")
        doc.pop("device")
        out.setdefault((stream, int(doc["seq"])), event_digest(doc))
    return out


@dataclass
class Cut:
    kind: str  # random | wal | checkpoint (what was asked)
    mode: str
    where: str  # where the cut landed (from the filesystem)
    integrity: str  # of the database the cut left
    durable: int  # events in the synced state at the cut
    dirty_sectors: int
    kept_sectors: int
    ready_s: float  # READY after the restart, from the spawn (Python's start-up included)
    ready_in_daemon_s: float = 0.0  # from the daemon's first log line (buffer open, recovery)
    reserve_left: int = -1  # bytes of buffer.db.reserve the cut left (-1: no file)
    reserve_after: int = -1  # ...and once the daemon is READY again (must be RESERVE_BYTES)


@dataclass
class Outcome:
    cuts: list[Cut] = field(default_factory=list)
    committed: int = 0  # distinct events durable at some cut
    lost: list[Key] = field(default_factory=list)  # durable at a cut, not at the central as such
    lost_at: dict[str, int] = field(default_factory=dict)  # the cut that first held them
    reused_in_buffer: list[Key] = field(default_factory=list)  # one key, two contents
    conflicts: int = 0  # the central's: a re-sent (stream, seq) with other content
    gaps: dict[str, list[int]] = field(default_factory=dict)  # neither received nor declared
    declared: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # by stream
    declared_over_committed: list[Key] = field(default_factory=list)  # must stay empty
    declared_delivered: int = 0  # received seqs inside a declared range: sent before a cut
    declarations_pending: list[tuple[int, int]] = field(default_factory=list)  # at the end
    streams_in_buffer: int = 0  # >1: a cut lost the whole buffer and a new stream began
    # (the streams seen in the buffer at cuts, at the end, and at the central)
    seen: int = 0  # distinct events the daemon's view held at some cut (synced or not)
    seen_lost: int = 0  # ...that never reached the central as such
    delivered: int = 0
    running_s: float = 0.0  # the daemon's time under load, READY to cut
    wal_writes: int = 0
    db_writes: int = 0
    fsyncs: int = 0

    def summary(self) -> dict[str, Any]:
        ready = sorted(c.ready_s for c in self.cuts)
        return {
            "cuts": len(self.cuts),
            "by_kind": {k: sum(c.kind == k for c in self.cuts) for k in KINDS},
            "by_mode": {m: sum(c.mode == m for c in self.cuts) for m in MODES},
            "inside_wal_write": sum("-wal at" in c.where for c in self.cuts),
            "inside_checkpoint": sum("buffer.db at" in c.where for c in self.cuts),
            "committed_events": self.committed,
            "lost": len(self.lost),
            "lost_at": self.lost_at,
            "reused_in_buffer": len(self.reused_in_buffer),
            "conflicts": self.conflicts,
            "gaps": sum(len(g) for g in self.gaps.values()),
            "declared_ranges": sum(len(r) for r in self.declared.values()),
            "declared_seqs": sum(hi - lo + 1 for r in self.declared.values() for lo, hi in r),
            "declared_delivered": self.declared_delivered,
            "declared_over_committed": len(self.declared_over_committed),
            "declarations_pending": len(self.declarations_pending),
            "streams_in_buffer": self.streams_in_buffer,
            "integrity_ok": sum(c.integrity == "ok" for c in self.cuts),
            "integrity_failures": [
                f"{c.kind}/{c.mode} {c.where}: {c.integrity[:200]}"
                for c in self.cuts
                if c.integrity != "ok"
            ],
            "unsynced_seen_then_lost": self.seen_lost,
            "delivered": self.delivered,
            "events_per_s_under_load": round(self.delivered / self.running_s)
            if self.running_s
            else 0,
            "ready_s_min_max": [round(ready[0], 2), round(ready[-1], 2)] if ready else None,
            "ready_in_daemon_s_min_max": [
                round(min(c.ready_in_daemon_s for c in self.cuts), 3),
                round(max(c.ready_in_daemon_s for c in self.cuts), 3),
            ]
            if self.cuts
            else None,
            "reserve_left_short": sum(c.reserve_left < RESERVE_BYTES for c in self.cuts),
            "reserve_after_restart": sorted({c.reserve_after for c in self.cuts}),
            "dirty_sectors_at_cuts_max": max((c.dirty_sectors for c in self.cuts), default=0),
            "fs_writes_wal_db_fsyncs": [self.wal_writes, self.db_writes, self.fsyncs],
        }


def make_gateway(
    workdir: Path, port: int, db: Path, rate: float, window_ms: int | None = None
) -> GatewayProc:
    from gateway.identity.pseudonyms import Keyring, decode_key
    from tests.system.harness import KEY_B64

    ring = Keyring({"k1": decode_key(KEY_B64, "k")}, "k1")
    consented = [ring.pseudonym("loyalty", card_number(i)) for i in range(50)]
    return GatewayProc(
        workdir,
        port,
        sources=synthetic(rate),
        consented=consented,
        buffer_path=db,
        # a small reserve: it is made (and synced) on the mount too, through FUSE writes
        buffer_extra=f"disk_reserve_bytes = {RESERVE_BYTES}"
        + ("" if window_ms is None else f"\ndurability_window_ms = {window_ms}"),
    )


def run_power_cuts(
    root: Path,
    broker_port: int,
    *,
    cuts: int,
    rate: float,
    seed: int,
    env: dict[str, str] | None = None,
    modes: tuple[str, ...] = MODES,
    keep: bool = False,
    window_ms: int | None = None,
) -> Outcome:
    """Run the daemon under load on a cutfs mount, cut it ``cuts`` times, drain, check.

    Before each cut the daemon runs until it has checkpointed once since its restart (so
    the database file itself has content to lose), then 0.3-1.2 s more; then the cut
    comes at once (``random``), at the n-th write to the WAL, or at the n-th write to
    the database file (a checkpoint).  Cut i is of kind ``KINDS[i % 3]`` and loss
    ``modes[i // 3 % len(modes)]``, so 9 cuts cover every pair.  ``keep`` keeps each
    cut's synced state, view and what the cut left (``cutNNN-*`` in ``root``).
    """
    rng = Random(seed)
    out = Outcome()
    fs = CutFSMount(root / "fs")
    central = Central("127.0.0.1", broker_port, out=root / "central.jsonl")
    central.start()
    assert central.wait_subscribed(10)
    gw = make_gateway(root / "gw", broker_port, fs.mountpoint / "buffer.db", rate, window_ms)
    gw.env.update(env or {})
    committed: dict[Key, str] = {}
    first_cut: dict[Key, int] = {}  # the cut whose synced state first held the event
    seen: dict[Key, str] = {}
    streams: set[str] = set()
    try:
        fs.mount()
        gw.start()
        gw.wait_ready()
        gw.wait_db()
        ready_at = time.monotonic()
        for i in range(cuts):
            kind, mode = KINDS[i % 3], modes[(i // 3) % len(modes)]
            deadline = time.monotonic() + 10
            while fs.ask(cmd="status")["db_writes"] == 0 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.3, 1.2))  # under load
            assert gw.proc is not None and gw.alive(), gw.log.read_text()[-3000:]
            pid = gw.proc.pid
            if kind != "random":
                suffix, after = ("-wal", rng.randint(1, 60)) if kind == "wal" else (
                    "buffer.db", rng.randint(1, 12))  # fmt: skip
                fs.ask(cmd="arm", pid=pid, suffix=suffix, after=after)
                # with a durability window the database is written about once a second
                # (bookkeeping), so a checkpoint's n-th page write can take a while on a
                # loaded box: wait for it rather than fall back to a cut at once
                deadline = time.monotonic() + (10 if kind == "wal" else 30)
                while not fs.ask(cmd="status")["frozen"] and time.monotonic() < deadline:
                    time.sleep(0.02)
            fs.ask(cmd="cut", pid=pid)  # no-op once cut; a trigger never met cuts now
            gw.proc.wait(timeout=10)
            gw.proc = None
            out.running_s += time.monotonic() - ready_at
            snap, view = root / f"cut{i:03d}-synced", root / f"cut{i:03d}-view"
            report = fs.ask(
                cmd="crash", mode=mode, seed=rng.randrange(1 << 30),
                snapshot=str(snap), view=str(view),
            )  # fmt: skip
            out.wal_writes += report["wal_writes"]
            out.db_writes += report["db_writes"]
            out.fsyncs += report["fsyncs"]
            fs.unmount()
            durable = buffered_events(snap)
            for key, digest in durable.events.items():
                first_cut.setdefault(key, i)
                if committed.setdefault(key, digest) != digest:
                    out.reused_in_buffer.append(key)
            for key, digest in buffered_events(view).events.items():
                seen.setdefault(key, digest)
            left = buffered_events(copy_buffer(fs.backing, root / f"cut{i:03d}-left"))
            streams.update(s for s in (durable.stream, left.stream) if s)
            reserve_left = _size(fs.backing / "buffer.db.reserve")
            fs.mount()
            t0 = time.monotonic()
            gw.start()
            gw.wait_ready()
            ready_at = time.monotonic()
            out.cuts.append(
                Cut(kind, mode, report["cut"]["where"], left.integrity, len(durable.events),
                    report["dirty_sectors"], report["kept_sectors"], ready_at - t0,
                    reserve_left=reserve_left,
                    reserve_after=_size(fs.mountpoint / "buffer.db.reserve"))
            )  # fmt: skip
            if not keep:
                for folder in (snap, view, root / f"cut{i:03d}-left"):
                    shutil.rmtree(folder)
        time.sleep(1.0)
        out.running_s += time.monotonic() - ready_at
        assert gw.stop() == 0, gw.log.read_text()[-3000:]
        streams.add(gw.stream())
        gw.set_sources("")  # gw.drain_and_stop(), waiting for the declarations too
        gw.start()
        gw.wait_ready()
        gw.wait_drained(60)
        out.declarations_pending = _wait_declared(gw.db)
        assert gw.stop() == 0, gw.log.read_text()[-3000:]
        _wait_quiet(central)
    finally:
        if gw.alive():
            gw.kill9()
        fs.unmount()
        central.stop()
    for c, took in zip(out.cuts, _startups(gw.log.read_text())[1:], strict=False):
        c.ready_in_daemon_s = took
    got = central_events(root / "central.jsonl")
    out.committed = len(committed)
    out.lost = sorted(k for k, d in committed.items() if got.get(k) != d)
    for key in out.lost:
        c = out.cuts[first_cut[key]]
        where = f"cut {first_cut[key]} ({c.kind}/{c.mode}, {c.where})"
        out.lost_at[where] = out.lost_at.get(where, 0) + 1
    out.seen = len(seen)
    out.seen_lost = sum(got.get(k) != d for k, d in seen.items())
    out.conflicts = int(central.stats()["conflicts"])
    out.delivered = len(got)
    by_stream: dict[str, set[int]] = {}
    for stream, seq in got:
        by_stream.setdefault(stream, set()).add(seq)
    out.streams_in_buffer = len(streams | by_stream.keys())
    for name, ranges in central.stats()["skipped"].items():
        out.declared[name.rsplit("/", 1)[1]] = [(int(lo), int(hi)) for lo, hi in ranges]

    def declared(key: Key) -> bool:
        return any(lo <= key[1] <= hi for lo, hi in out.declared.get(key[0], ()))

    out.declared_over_committed = sorted(k for k in committed if declared(k))
    out.declared_delivered = sum(declared(k) for k in got)
    for stream, seqs in by_stream.items():
        missing = [
            s for s in range(1, max(seqs) + 1) if s not in seqs and not declared((stream, s))
        ]
        if missing:
            out.gaps[stream] = missing
    return out


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1


def _wait_declared(db: Path, timeout: float = 10) -> list[tuple[int, int]]:
    """The skipped ranges still waiting to be declared, once none is (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        conn = sqlite3.connect(db, timeout=5)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'skipped_seqs'").fetchone()
        finally:
            conn.close()
        pending = [(int(lo), int(hi)) for lo, hi in json.loads(row[0])] if row else []
        if not pending or time.monotonic() >= deadline:
            return pending
        time.sleep(0.1)


def _startups(log: str) -> list[float]:
    """Seconds from each start's first log line (the CLI, config loaded) to READY."""
    out: list[float] = []
    first: datetime | None = None
    for line in log.splitlines():
        if "core dumps off" in line:
            first = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
        elif first is not None and "touchpoint-gateway " in line and " stream " in line:
            out.append(
                (datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f") - first).total_seconds()
            )
            first = None
    return out


def _wait_quiet(central: Central, quiet_s: float = 1.5, timeout: float = 30) -> None:
    """Until the central has accepted nothing new for ``quiet_s``."""
    deadline = time.monotonic() + timeout
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        n = int(central.stats()["accepted"])
        if n != last:
            last, since = n, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return
        time.sleep(0.1)
