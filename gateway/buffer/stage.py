"""The stage: events of the current durability window, written to the OS, not to the disk.

With ``buffer.durability_window_ms`` above 0 the outbox writer appends each group of
events (as the chunk rows it will insert) and each acknowledgement to a plain file
beside the buffer (``<buffer>-stage``) with one ``write()``, and hands the events on:
they are committed in the sense that matters to a crash of the process, since the
kernel holds the bytes whatever happens to the daemon (``kill -9``, an exception, the
OOM killer).  Once per window the rows still unacknowledged go into SQLite in one
transaction with ``synchronous=FULL`` (one fsync), and the stage is truncated: its
pages are dropped before the kernel's writeback (30 s) would write them, so they almost
never reach the flash.  Rows acknowledged within their window never touch the database.

A power cut loses the page cache, so the stage with it.  To tell the two apart, a marker
in a RAM filesystem (``$RUNTIME_DIRECTORY`` under systemd, else ``/dev/shm``) records
the stage's size after every write: it is gone after a reboot, and disagrees with the
stage when its unsynced pages were lost.  At start-up a stage whose records are whole
and reach the marker's size is replayed as it is (a crash: nothing lost, no seq
skipped); otherwise the whole records it still holds are replayed and the next seq
jumps past ``seq_reserved``, the durable high-water mark written before any seq beyond
it is handed out: a seq the broker may have seen is never reused for other content.

Records (little-endian): ``R`` lo hi n created len(subjects) len(body) crc32 subjects
body, ``A`` lo hi crc32 (an ack), or ``M`` seq crc32 (every seq up to it was handed
out); the crc covers the fields before it and the strings.  Rows younger than a window
are kept staged across a commit: the stage is then written again with them and a mark.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

# (lo, hi, n, created (oldest), subjects (space-separated), body) as inserted into chunks
Row = tuple[int, int, int, float, str, str]

_ROW = struct.Struct("<cqqidII")
_ACK = struct.Struct("<cqq")
_MARK = struct.Struct("<cq")
_CRC = struct.Struct("<I")


def encode_row(row: Row) -> bytes:
    lo, hi, n, created, subjects, body = row
    s, b = subjects.encode(), body.encode()
    head = _ROW.pack(b"R", lo, hi, n, created, len(s), len(b))
    return head + _CRC.pack(zlib.crc32(b, zlib.crc32(s, zlib.crc32(head)))) + s + b


def encode_ack(lo: int, hi: int) -> bytes:
    head = _ACK.pack(b"A", lo, hi)
    return head + _CRC.pack(zlib.crc32(head))


def encode_mark(seq: int) -> bytes:
    head = _MARK.pack(b"M", seq)
    return head + _CRC.pack(zlib.crc32(head))


@dataclass(frozen=True, slots=True)
class Ack:
    lo: int
    hi: int


@dataclass(frozen=True, slots=True)
class Mark:
    """Every seq up to ``seq`` was handed out (written after rows kept across a commit)."""

    seq: int


def parse(data: bytes) -> tuple[list[Row | Ack | Mark], int]:
    """The whole records at the start of ``data``, and how many bytes they take."""
    out: list[Row | Ack | Mark] = []
    pos = 0
    while pos < len(data):
        kind = data[pos : pos + 1]
        if kind == b"R" and pos + _ROW.size + 4 <= len(data):
            _k, lo, hi, n, created, ls, lb = _ROW.unpack_from(data, pos)
            start = pos + _ROW.size + 4
            end = start + ls + lb
            if end > len(data):
                break
            (crc,) = _CRC.unpack_from(data, pos + _ROW.size)
            s, b = data[start : start + ls], data[start + ls : end]
            if crc != zlib.crc32(b, zlib.crc32(s, zlib.crc32(data[pos : pos + _ROW.size]))):
                break
            try:
                out.append((lo, hi, n, created, s.decode(), b.decode()))
            except UnicodeDecodeError:
                break
            pos = end
        elif kind == b"A" and pos + _ACK.size + 4 <= len(data):
            (crc,) = _CRC.unpack_from(data, pos + _ACK.size)
            if crc != zlib.crc32(data[pos : pos + _ACK.size]):
                break
            _k, lo, hi = _ACK.unpack_from(data, pos)
            out.append(Ack(lo, hi))
            pos += _ACK.size + 4
        elif kind == b"M" and pos + _MARK.size + 4 <= len(data):
            (crc,) = _CRC.unpack_from(data, pos + _MARK.size)
            if crc != zlib.crc32(data[pos : pos + _MARK.size]):
                break
            _k, seq = _MARK.unpack_from(data, pos)
            out.append(Mark(seq))
            pos += _MARK.size + 4
        else:
            break
    return out, pos


def stage_path(buffer: Path) -> Path:
    return buffer.with_name(buffer.name + "-stage")


def marker_path(buffer: Path) -> Path | None:
    """The RAM-filesystem marker of this buffer's stage (None: nowhere to put it)."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    for folder in (runtime, "/dev/shm"):  # noqa: S108 - a RAM filesystem, by design
        if folder and Path(folder).is_dir() and os.access(folder, os.W_OK):
            digest = hashlib.sha256(str(buffer.resolve()).encode()).hexdigest()[:16]
            return Path(folder) / f"touchpoint-gateway-{digest}.stage"
    return None


class Marker:
    """The stage's size as of its last write, kept in RAM (``stream size``)."""

    def __init__(self, path: Path | None, stream: str) -> None:
        self.path = path
        self.stream = stream
        self._fd: int | None = None

    def read(self) -> int | None:
        """The size recorded for this stream, or None (no marker: a reboot, or none)."""
        if self.path is None:
            return None
        try:
            text = self.path.read_text(encoding="ascii").split()
        except (OSError, UnicodeDecodeError):
            return None
        if len(text) != 2 or text[0] != self.stream or not text[1].isdigit():
            return None
        return int(text[1])

    def set(self, size: int) -> None:
        if self.path is None:
            return
        try:
            if self._fd is None:
                flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW
                self._fd = os.open(self.path, flags, 0o600)
            line = f"{self.stream} {size:020d}\n".encode()
            os.pwrite(self._fd, line, 0)
        except OSError:
            self.close()
            self.path = None  # no marker: an unclean start skips to seq_reserved

    def close(self, *, remove: bool = False) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        if remove and self.path is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
