"""A FUSE filesystem that loses what a power cut loses.

One flat directory, passed through to a backing directory that holds exactly what has
reached "the platter": the data of a file as of its last fsync/fdatasync, and the names
as of the last fsync of anything.  Everything else lives in memory:

- per file, the 512-byte sectors written since its last sync (reads see them over the
  backing file), its size, and a pending truncation;
- the namespace operations (create, rename, unlink) since the last fsync.  The model is
  a journaling filesystem's (ext4 data=ordered): any fsync - of a file or of the
  directory - commits every pending namespace operation, in order; a file's fsync also
  writes that file's sectors and size.  So a file created and never synced comes back
  empty after a cut (the classic zero-length file), and its name only if something was
  synced after the create.

A cut (``crash``, over the control socket) freezes the filesystem - every later
operation fails with EIO - then applies one of three losses to the backing directory:

- ``drop``: every unsynced sector and namespace operation is lost;
- ``tear``: everything reaches the disk in order except the last write, which is torn
  at a random sector boundary (its first k sectors new, the rest old) unless it was
  synced already;
- ``subset``: a random subset of the dirty sectors and of the pending namespace
  operations (applied in order, each kept with probability 1/2, one whose precondition
  no longer holds is skipped) reaches the disk, and a random size between the synced
  one and the current one.

The control socket also arms the cut: kill -9 a process (the daemon) when the n-th
write to a file whose name matches (the ``-wal`` file: inside a WAL write; the main
database file: in WAL mode only a checkpoint writes it) arrives, or now.  The kill
and the freeze happen under the filesystem's lock, so no operation of the victim lands
after its death.  Before the loss is applied the synced state is copied to a snapshot
folder: what the test may call durable.

Run: ``python -m tests.powercut.cutfs BACKING MOUNTPOINT CONTROL_SOCKET`` (root, libfuse2).
The process ends when the mount point is unmounted.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import socket
import stat
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fuse import FUSE, FuseOSError, Operations  # fusepy: libfuse2 through ctypes

SECTOR = 512


@dataclass(eq=False)
class Node:
    ino: int
    bname: str | None  # its name in the backing directory (None: not on disk)
    synced_size: int = 0  # the backing file's size
    size: int = 0  # the size the running system sees
    zero_from: int = 0  # backing bytes from here on are gone (a truncation not yet synced)
    dirty: dict[int, bytes] = field(default_factory=dict)  # sector -> its 512 bytes now
    mode: int = 0o600
    mtime: float = field(default_factory=time.time)


@dataclass
class LastWrite:
    node: Node
    sectors: list[int]  # the sectors it touched, in order
    before: dict[int, bytes]  # their content before it
    size_before: int


class CutFS(Operations):  # type: ignore[misc]
    def __init__(self, backing: Path) -> None:
        self.backing = backing
        self._mu = threading.RLock()
        self.names: dict[str, Node] = {}
        self.handles: dict[int, Node] = {}
        self.pending: list[tuple[str, Node, str, str]] = []  # (op, node, name, new name)
        self.next_ino = 2
        self.next_fh = 1
        self.frozen = False
        self.last_write: LastWrite | None = None
        self.counts = {"writes": 0, "fsyncs": 0, "dir_fsyncs": 0, "wal_writes": 0, "db_writes": 0}
        # the armed cut: (pid, name suffix, writes to go)
        self.armed: tuple[int, str, int] | None = None
        self.cut_at: dict[str, Any] | None = None
        for entry in sorted(backing.iterdir()):
            if entry.is_file():
                size = entry.stat().st_size
                self.names[entry.name] = Node(
                    self._ino(), entry.name, synced_size=size, size=size, zero_from=size
                )

    def _ino(self) -> int:
        self.next_ino += 1
        return self.next_ino

    # -- the view -------------------------------------------------------------------

    def _node(self, path: str, fh: int | None = None) -> Node:
        if fh is not None and fh in self.handles:
            return self.handles[fh]
        node = self.names.get(path.lstrip("/"))
        if node is None:
            raise FuseOSError(errno.ENOENT)
        return node

    def _view(self, node: Node, offset: int, size: int) -> bytes:
        end = min(offset + size, node.size)
        if offset >= end:
            return b""
        buf = bytearray(end - offset)
        base = min(node.synced_size, node.zero_from)
        if node.bname is not None and base > offset:
            with (self.backing / node.bname).open("rb") as f:
                f.seek(offset)
                got = f.read(min(end, base) - offset)
            buf[: len(got)] = got
        for s in range(offset // SECTOR, (end - 1) // SECTOR + 1):
            data = node.dirty.get(s)
            if data is None:
                continue
            lo, hi = max(s * SECTOR, offset), min((s + 1) * SECTOR, end)
            buf[lo - offset : hi - offset] = data[lo - s * SECTOR : hi - s * SECTOR]
        return bytes(buf)

    def _sector(self, node: Node, s: int) -> bytes:
        data = node.dirty.get(s)
        if data is not None:
            return data
        return self._view(node, s * SECTOR, SECTOR).ljust(SECTOR, b"\0")

    def _check(self) -> None:
        if self.frozen:
            raise FuseOSError(errno.EIO)

    # -- namespace ----------------------------------------------------------------------

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        with self._mu:
            if path == "/":
                now = time.time()
                return {
                    "st_mode": stat.S_IFDIR | 0o755,
                    "st_nlink": 2,
                    "st_mtime": now,
                    "st_ctime": now,
                    "st_atime": now,
                }
            node = self._node(path, fh)
            return {
                "st_mode": stat.S_IFREG | node.mode,
                "st_nlink": 1,
                "st_size": node.size,
                "st_ino": node.ino,
                "st_blocks": (node.size + 511) // 512,
                "st_mtime": node.mtime,
                "st_ctime": node.mtime,
                "st_atime": node.mtime,
            }

    def readdir(self, path: str, fh: int) -> list[str]:
        with self._mu:
            return [".", "..", *self.names]

    def statfs(self, path: str) -> dict[str, int]:
        fs = os.statvfs(self.backing)
        keys = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree")
        return {k: getattr(fs, k) for k in (*keys, "f_namemax")}

    def access(self, path: str, amode: int) -> int:
        return 0

    def chmod(self, path: str, mode: int) -> int:
        with self._mu:
            self._check()
            self._node(path).mode = mode & 0o7777
            return 0

    def chown(self, path: str, uid: int, gid: int) -> int:
        return 0

    def utimens(self, path: str, times: tuple[float, float] | None = None) -> int:
        return 0

    def mkdir(self, path: str, mode: int) -> int:
        raise FuseOSError(errno.EPERM)  # one flat directory

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        with self._mu:
            self._check()
            name = path.lstrip("/")
            node = self.names.get(name)
            if node is None:
                node = Node(self._ino(), None, mode=mode & 0o7777)
                self.names[name] = node
                self.pending.append(("create", node, name, ""))
            return self._open(node)

    def open(self, path: str, flags: int) -> int:
        with self._mu:
            node = self._node(path)
            if flags & os.O_TRUNC:
                self._check()
                self._truncate(node, 0)
            return self._open(node)

    def _open(self, node: Node) -> int:
        self.next_fh += 1
        self.handles[self.next_fh] = node
        return self.next_fh

    def release(self, path: str, fh: int) -> int:
        with self._mu:
            self.handles.pop(fh, None)
            return 0

    def flush(self, path: str, fh: int) -> int:
        return 0

    def unlink(self, path: str) -> int:
        with self._mu:
            self._check()
            name = path.lstrip("/")
            node = self.names.pop(name, None)
            if node is None:
                raise FuseOSError(errno.ENOENT)
            self.pending.append(("unlink", node, name, ""))
            return 0

    def rename(self, old: str, new: str) -> int:
        with self._mu:
            self._check()
            o, n = old.lstrip("/"), new.lstrip("/")
            node = self.names.pop(o, None)
            if node is None:
                raise FuseOSError(errno.ENOENT)
            self.names[n] = node
            self.pending.append(("rename", node, o, n))
            return 0

    # -- data -----------------------------------------------------------------------

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        with self._mu:
            return self._view(self._node(path, fh), offset, size)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        with self._mu:
            self._check()
            node = self._node(path, fh)
            end = offset + len(data)
            sectors = list(range(offset // SECTOR, (end - 1) // SECTOR + 1)) if data else []
            before = {s: self._sector(node, s) for s in sectors}
            for s in sectors:
                sec = bytearray(before[s])
                lo, hi = max(s * SECTOR, offset), min((s + 1) * SECTOR, end)
                sec[lo - s * SECTOR : hi - s * SECTOR] = data[lo - offset : hi - offset]
                node.dirty[s] = bytes(sec)
            self.last_write = LastWrite(node, sectors, before, node.size)
            node.size = max(node.size, end)
            node.mtime = time.time()
            self.counts["writes"] += 1
            name = path.lstrip("/")
            if name.endswith("-wal"):
                self.counts["wal_writes"] += 1
            elif name.endswith(".db"):
                self.counts["db_writes"] += 1
            if self.armed is not None:
                pid, suffix, left = self.armed
                if name.endswith(suffix):
                    left -= 1
                    self.armed = (pid, suffix, left)
                    if left <= 0:
                        self._cut(f"inside a write to {name} at {offset}+{len(data)}")
            return len(data)

    def truncate(self, path: str, length: int, fh: int | None = None) -> int:
        with self._mu:
            self._check()
            self._truncate(self._node(path, fh), length)
            return 0

    def _truncate(self, node: Node, length: int) -> None:
        if length < node.size:
            for s in [s for s in node.dirty if s * SECTOR >= length]:
                del node.dirty[s]
            s = length // SECTOR
            if length % SECTOR:  # the partial sector keeps zeros after the new end
                sec = bytearray(self._sector(node, s))
                sec[length % SECTOR :] = bytes(SECTOR - length % SECTOR)
                node.dirty[s] = bytes(sec)
            node.zero_from = min(node.zero_from, length)
        node.size = length
        node.mtime = time.time()

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        with self._mu:
            self._check()
            self.counts["fsyncs"] += 1
            self._commit_names(list(self.pending))
            node = self._node(path, fh)
            self._persist(node, dict(node.dirty), node.size, node.zero_from)
            if self.last_write is not None and self.last_write.node is node:
                self.last_write = None  # on the disk now: a cut cannot tear it
            return 0

    def fsyncdir(self, path: str, datasync: int, fh: int) -> int:
        with self._mu:
            self._check()
            self.counts["dir_fsyncs"] += 1
            self._commit_names(list(self.pending))
            return 0

    # -- reaching the disk ---------------------------------------------------------------

    def _commit_names(self, ops: list[tuple[str, Node, str, str]]) -> None:
        """Apply namespace operations to the backing directory, in order; one whose
        precondition no longer holds (a dropped create before it) is skipped."""
        for op, node, name, new in ops:
            if op == "create":
                if node.bname is None and not (self.backing / name).exists():
                    (self.backing / name).touch(mode=0o600)
                    node.bname, node.synced_size, node.zero_from = name, 0, 0
            elif op == "unlink":
                if node.bname == name:
                    (self.backing / name).unlink()
                    node.bname = None
            elif op == "rename" and node.bname == name:
                for other in self._all_nodes():
                    if other.bname == new:
                        other.bname = None
                (self.backing / name).replace(self.backing / new)
                node.bname = new
        self.pending = []  # the rest is lost (a cut's subset) or was just committed

    def _all_nodes(self) -> list[Node]:
        seen = {id(n): n for n in [*self.names.values(), *self.handles.values()]}
        for _, n, _, _ in self.pending:
            seen[id(n)] = n
        return list(seen.values())

    def _persist(self, node: Node, sectors: dict[int, bytes], size: int, cut_from: int) -> None:
        """Write ``sectors`` and ``size`` to the node's backing file (after dropping the
        bytes from ``cut_from`` on); what is written is then the synced state."""
        if node.bname is not None:
            path = self.backing / node.bname
            fd = os.open(path, os.O_WRONLY)
            try:
                if cut_from < node.synced_size:
                    os.ftruncate(fd, cut_from)
                for s, data in sorted(sectors.items()):
                    if s * SECTOR < size:
                        os.pwrite(fd, data[: size - s * SECTOR], s * SECTOR)
                os.ftruncate(fd, size)
            finally:
                os.close(fd)
        for s in sectors:
            node.dirty.pop(s, None)
        node.synced_size = size
        node.zero_from = size

    # -- power cuts ---------------------------------------------------------------------

    def _cut(self, where: str) -> None:
        """Freeze, then kill the armed process (under the lock: nothing lands after)."""
        self.frozen = True
        pid = self.armed[0] if self.armed else 0
        self.armed = None
        self.cut_at = {"where": where, "at": time.time()}
        if pid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                self.cut_at["where"] += " (the process had already ended)"

    def crash(self, mode: str, seed: int, snapshot: Path, view: Path) -> dict[str, Any]:
        """Apply a power cut's loss to the backing directory.  First the synced state is
        copied to ``snapshot`` and what the running system saw to ``view``.  Returns
        what was kept and lost."""
        with self._mu:
            if not self.frozen:
                self._cut("now")
            shutil.copytree(self.backing, snapshot)
            view.mkdir(parents=True)
            for name, node in self.names.items():
                (view / name).write_bytes(self._view(node, 0, node.size))
            rng = random.Random(seed)
            report: dict[str, Any] = {"mode": mode, "cut": self.cut_at, **self.counts}
            nodes = self._all_nodes()
            dirty_total = sum(len(n.dirty) for n in nodes)
            report["dirty_sectors"] = dirty_total
            report["pending_names"] = [(op, name, new) for op, _, name, new in self.pending]
            kept_sectors = 0
            if mode == "drop":
                pass
            elif mode == "tear":
                self._commit_names(list(self.pending))
                lw = self.last_write
                for node in nodes:
                    if lw is not None and node is lw.node and lw.sectors:
                        k = rng.randrange(len(lw.sectors))  # sectors of it that land
                        for s in lw.sectors[k:]:
                            node.dirty[s] = lw.before[s]
                        kept_end = (lw.sectors[k - 1] + 1) * SECTOR if k else 0
                        size = max(lw.size_before, min(node.size, kept_end))
                        report["torn"] = {"sectors": len(lw.sectors), "landed": k}
                    else:
                        size = node.size
                    kept_sectors += len(node.dirty)
                    self._persist(node, dict(node.dirty), size, node.zero_from)
            elif mode == "subset":
                ops = [p for p in self.pending if rng.random() < 0.5]
                report["kept_names"] = [(op, name, new) for op, _, name, new in ops]
                self._commit_names(ops)
                for node in nodes:
                    keep = {s: d for s, d in node.dirty.items() if rng.random() < 0.5}
                    kept_sectors += len(keep)
                    cut_from = node.zero_from if rng.random() < 0.5 else node.synced_size
                    base = min(node.synced_size, cut_from)
                    ends = [(s + 1) * SECTOR for s in keep]
                    size = max([base, *ends])
                    size = min(max(size, rng.randint(base, max(base, node.size))), node.size)
                    self._persist(node, keep, max(size, base), cut_from)
            else:
                raise ValueError(mode)
            report["kept_sectors"] = kept_sectors
            report["files"] = {p.name: p.stat().st_size for p in sorted(self.backing.iterdir())}
            return report

    def control(self, req: dict[str, Any]) -> dict[str, Any]:
        cmd = req["cmd"]
        if cmd == "arm":
            with self._mu:
                self.armed = (int(req["pid"]), str(req["suffix"]), int(req["after"]))
            return {"ok": True}
        if cmd == "cut":
            with self._mu:
                if not self.frozen:
                    if req.get("pid"):
                        self.armed = (int(req["pid"]), "", 0)
                    self._cut("at a random moment")
            return {"ok": True}
        if cmd == "status":
            with self._mu:
                return {"frozen": self.frozen, "cut": self.cut_at, **self.counts}
        if cmd == "crash":
            return self.crash(
                str(req["mode"]), int(req["seed"]), Path(req["snapshot"]), Path(req["view"])
            )
        return {"error": f"unknown command {cmd!r}"}


def serve_control(fs: CutFS, path: Path) -> None:
    """One JSON request per line, one JSON answer per line."""
    path.unlink(missing_ok=True)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(4)
    while True:
        conn, _ = srv.accept()
        with conn, conn.makefile("rw", encoding="utf-8") as f:
            for line in f:
                try:
                    answer = fs.control(json.loads(line))
                except Exception as exc:  # the test sees it, the filesystem stays up
                    answer = {"error": f"{exc.__class__.__name__}: {exc}"}
                f.write(json.dumps(answer) + "\n")
                f.flush()


def main(argv: list[str]) -> int:
    backing, mountpoint, control = (Path(a) for a in argv[:3])
    fs = CutFS(backing)
    threading.Thread(target=serve_control, args=(fs, control), daemon=True).start()
    FUSE(fs, str(mountpoint), foreground=True, nothreads=False, fsname="cutfs")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
