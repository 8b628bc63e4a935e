"""ESC/POS: an incremental parser that finds QR payloads and cuts, and a few builders.

The parser is a pure state machine: ``feed(bytes)`` may be called with any
segmentation of the stream and reports the same things as one call with everything.
It walks command by command so that declared payloads (raster images ``GS v 0``,
``GS ( L``, ``GS 8 L``, ``ESC *``, ``GS Q 0``, ``GS *``, ``FS q``, barcodes, every
``GS ( x pL pH`` block) are skipped by length: a byte scan would find QR-looking bytes
inside image data.  Memory is bounded whatever the lengths say: a skipped payload is
counted down, never buffered, and a QR payload larger than ``max_qr_bytes`` is skipped
the same way.  At most ``MAX_HEADER`` bytes of an incomplete command header are kept.

Reported:
  - ``qr``: the data of each QR store-data command (``GS ( k`` cn 49 fn 80);
  - ``cuts``: the stream offset at which each cut command starts (``GS V``, ``ESC i``,
    ``ESC m``), so a caller can inject bytes just before it.

Commands outside the common set are stepped over by their two command bytes.  QR
payloads may hold personal data: nothing here logs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

ESC, GS, FS, DLE, NUL = 0x1B, 0x1D, 0x1C, 0x10, 0x00
MAX_HEADER = 10
DEFAULT_MAX_QR_BYTES = 7089  # the largest QR code (version 40, numeric, level L)
_CONTROL_BYTES = (0x10, 0x1B, 0x1C, 0x1D)  # DLE ESC FS GS: every command starts with one
_CONTROL_SET = frozenset(_CONTROL_BYTES)

# Parameter bytes after the two command bytes, for fixed-length commands.
_ESC_FIXED = {
    0x0C: 0, 0x20: 1, 0x21: 1, 0x24: 2, 0x25: 1, 0x2D: 1, 0x32: 0, 0x33: 1, 0x3C: 0,
    0x3D: 1, 0x3F: 1, 0x40: 0, 0x42: 2, 0x45: 1, 0x47: 1, 0x4A: 1, 0x4B: 1, 0x4C: 0,
    0x4D: 1, 0x52: 1, 0x53: 0, 0x54: 1, 0x55: 1, 0x56: 1, 0x57: 8, 0x5C: 2, 0x61: 1,
    0x63: 2, 0x64: 1, 0x65: 1, 0x69: 0, 0x6D: 0, 0x70: 3, 0x72: 1, 0x74: 1, 0x75: 1,
    0x76: 0, 0x7B: 1,
}  # fmt: skip
_GS_FIXED = {
    0x21: 1, 0x24: 2, 0x2F: 1, 0x3A: 0, 0x42: 1, 0x45: 1, 0x48: 1, 0x49: 1, 0x4C: 2,
    0x50: 2, 0x54: 1, 0x57: 2, 0x5C: 2, 0x5E: 3, 0x61: 1, 0x62: 1, 0x63: 0, 0x66: 1,
    0x67: 4, 0x68: 1, 0x6A: 1, 0x72: 1, 0x77: 1, 0x7A: 3,
}  # fmt: skip
_FS_FIXED = {0x21: 1, 0x26: 0, 0x2D: 1, 0x2E: 0, 0x32: 74, 0x43: 1, 0x53: 2, 0x57: 1, 0x70: 2}
_DLE_FIXED = {0x04: 1, 0x05: 1, 0x14: 3}
_FIXED = {ESC: _ESC_FIXED, GS: _GS_FIXED, FS: _FS_FIXED, DLE: _DLE_FIXED}
_CUTS_ESC = (0x69, 0x6D)  # ESC i, ESC m
_CUT_4_BYTES = (65, 66, 97, 98, 103, 104)  # GS V m n (feed then cut)
_QR_CN, _QR_STORE = 49, 80


@dataclass
class ParseResult:
    """What one ``feed`` found: QR payloads and absolute offsets of cut commands."""

    qr: list[bytes] = field(default_factory=list)
    cuts: list[int] = field(default_factory=list)


@dataclass
class ParserStats:
    """Counters a driver can export: skipped image bytes, oversize QR commands, ..."""

    commands: int = 0
    images: int = 0
    skipped_bytes: int = 0
    qr_oversize: int = 0
    unknown: int = 0


Mode = Literal["text", "amp", "fsq", "nul"]


class EscPosParser:
    """Incremental ESC/POS parser; see the module docstring."""

    def __init__(self, max_qr_bytes: int = DEFAULT_MAX_QR_BYTES) -> None:
        self.max_qr_bytes = max_qr_bytes
        self.stats = ParserStats()
        self.offset = 0  # bytes fed so far
        self._header = b""  # start of an incomplete command
        self._skip = 0  # payload bytes still to step over
        self._collect: bytearray | None = None
        self._collect_left = 0
        self._mode: Mode = "text"  # what follows the current skip
        self._repeat = 0  # amp: characters left / fsq: images left / nul: bytes left
        self._amp_y = 0

    @property
    def pending(self) -> int:
        """Bytes at the end of the stream that start a command not yet complete."""
        return len(self._header)

    @property
    def between_commands(self) -> bool:
        """True when the stream so far ends on a command boundary (nothing half-read)."""
        return not (self._header or self._skip or self._collect is not None) and (
            self._mode == "text"
        )

    def feed(self, data: bytes) -> ParseResult:
        """Parse the next bytes of the stream."""
        result = ParseResult()
        buf = self._header + data if self._header else bytes(data)
        base = self.offset - len(self._header)
        self.offset += len(data)
        self._header = b""
        i, n = 0, len(buf)
        nxt = [-2, -2, -2, -2]  # next offset of each control byte (-1: none left)
        while i < n:
            if self._skip:
                take = min(self._skip, n - i)
                self._skip -= take
                self.stats.skipped_bytes += take
                i += take
            elif self._collect is not None:
                take = min(self._collect_left, n - i)
                self._collect += buf[i : i + take]
                self._collect_left -= take
                i += take
                if not self._collect_left:
                    result.qr.append(bytes(self._collect))
                    self._collect = None
            elif self._mode == "text":
                if buf[i] not in _CONTROL_SET:
                    i = _next_control(buf, i, nxt)
                    if i < 0:
                        break
                used = self._command(buf, i, base + i, result)
                if not used:
                    self._header = buf[i:]
                    break
                self.stats.commands += 1
                i += used
            else:
                used = self._continue(buf, i)
                if not used:
                    self._header = buf[i:]
                    break
                i += used
        return result

    def _continue(self, buf: bytes, i: int) -> int:
        """Inside ESC &, FS q or a NUL-terminated payload: the next piece."""
        n = len(buf)
        if self._mode == "nul":
            end = buf.find(b"\x00", i, min(n, i + self._repeat))
            used = (end + 1 - i) if end >= 0 else min(n - i, self._repeat)
            self._repeat -= used
            if end >= 0 or not self._repeat:
                self._mode = "text"
            return used
        size = 1 if self._mode == "amp" else 4
        if i + size > n:
            return 0
        self._repeat -= 1
        if self._mode == "amp":  # x, then y * x bytes
            self._skip = self._amp_y * buf[i]
        else:  # fsq: xL xH yL yH, then x * y * 8 bytes
            self._skip = _u16(buf, i) * _u16(buf, i + 2) * 8
            self.stats.images += 1
        if not self._repeat:
            self._mode = "text"
        return size

    def _command(self, buf: bytes, i: int, at: int, result: ParseResult) -> int:
        """Parse the command starting at ``buf[i]``; return its header length, 0 if cut short."""
        if i + 2 > len(buf):
            return 0
        lead, cmd = buf[i], buf[i + 1]
        key = (lead, cmd)
        fixed = _FIXED[lead].get(cmd)
        if fixed is not None:
            size = 2 + fixed
        elif key in _VARIABLE:
            size = _header_size(buf, i, key)
        else:  # a stray prefix byte, or a command outside the common set
            self.stats.unknown += int(lead != DLE)
            return 1 if lead == DLE or cmd in _FIXED else 2
        if i + size > len(buf):
            return 0
        if fixed is None:
            self._act(key, buf[i : i + size], at, result)
        elif lead == ESC and cmd in _CUTS_ESC:
            result.cuts.append(at)
        return size

    def _act(self, key: tuple[int, int], h: bytes, at: int, result: ParseResult) -> None:
        """Set up the state for a variable-length command whose header is ``h``."""
        if key in ((GS, 0x28), (ESC, 0x28), (FS, 0x28)):  # x ( fn pL pH ...
            if len(h) == 8 and h[5] == _QR_CN and h[6] == _QR_STORE:
                self._start_qr(_u16(h, 3) - 3)
            else:
                if key == (GS, 0x28) and h[2] == 0x4C:
                    self.stats.images += 1
                self._skip = _u16(h, 3) - (len(h) - 5)
        elif key == (GS, 0x56):  # GS V m [n]
            result.cuts.append(at)
        elif key in ((GS, 0x76), (GS, 0x51)):  # GS v 0 / GS Q 0: m xL xH yL yH
            self._image(_u16(h, 4) * _u16(h, 6))
        elif key == (GS, 0x38):  # GS 8 L p1 p2 p3 p4
            self._image(int.from_bytes(h[3:7], "little"))
        elif key == (GS, 0x2A):  # GS * x y: x * y * 8 bytes
            self._image(h[2] * h[3] * 8)
        elif key == (ESC, 0x2A):  # ESC * m nL nH: n columns of 1 or 3 bytes
            self._image(_u16(h, 3) * (3 if h[2] >= 32 else 1))
        elif key == (GS, 0x6B):  # GS k m: NUL-terminated (m <= 6) or n-prefixed data
            if len(h) == 4:
                self._skip = h[3]
            else:
                self._mode, self._repeat = "nul", 256
        elif key == (ESC, 0x44):  # ESC D n1 ... nk NUL (tab stops, at most 32)
            self._mode, self._repeat = "nul", 33
        elif key == (ESC, 0x26):  # ESC & y c1 c2, then per character: x, y * x bytes
            self._amp_y = h[2]
            self._repeat = max(0, h[4] - h[3] + 1)
            self._mode = "amp" if self._repeat else "text"
        elif key == (FS, 0x71):  # FS q n, then n images
            self._repeat = h[2]
            self._mode = "fsq" if self._repeat else "text"

    def _image(self, size: int) -> None:
        self.stats.images += 1
        self._skip = size

    def _start_qr(self, size: int) -> None:
        if size > self.max_qr_bytes:
            self.stats.qr_oversize += 1
            self._skip = size
        elif size:
            self._collect, self._collect_left = bytearray(), size


def _next_control(buf: bytes, i: int, nxt: list[int]) -> int:
    """The offset of the next command byte at or after ``i`` (-1: none).

    ``nxt`` remembers where each of the four bytes occurs next, so each is searched
    for again (memchr) only once passed: linear in the buffer, unlike a search per
    command for a byte that does not occur at all.
    """
    best = -1
    for k, byte in enumerate(_CONTROL_BYTES):
        at = nxt[k]
        if -1 < at < i or at == -2:
            at = nxt[k] = buf.find(byte, i)
        if at >= 0 and (best < 0 or at < best):
            best = at
    return best


def _u16(buf: bytes, i: int) -> int:
    return buf[i] | buf[i + 1] << 8


# Header lengths of variable-length commands; _header_size extends a few on their bytes.
_VARIABLE = {
    (GS, 0x28): 5, (ESC, 0x28): 5, (FS, 0x28): 5, (GS, 0x56): 3, (GS, 0x76): 8,
    (GS, 0x51): 8, (GS, 0x38): 7, (GS, 0x2A): 4, (ESC, 0x2A): 5, (GS, 0x6B): 3,
    (ESC, 0x44): 2, (ESC, 0x26): 5, (FS, 0x71): 3,
}  # fmt: skip


def _header_size(buf: bytes, i: int, key: tuple[int, int]) -> int:
    """The header length of the command at ``buf[i]`` (as far as its bytes are known)."""
    size = _VARIABLE[key]
    if len(buf) - i < size:
        return size
    if key == (GS, 0x28) and buf[i + 2] == 0x6B and _u16(buf, i + 3) >= 3:
        return 8  # GS ( k pL pH cn fn m: look at cn and fn
    if key == (GS, 0x56) and buf[i + 2] in _CUT_4_BYTES:
        return 4
    if key == (GS, 0x6B) and buf[i + 2] > 6:
        return 4
    return size


def parse(data: bytes, max_qr_bytes: int = DEFAULT_MAX_QR_BYTES) -> ParseResult:
    """Parse a whole stream at once (tests and tools)."""
    return EscPosParser(max_qr_bytes).feed(data)


# ---------------------------------------------------------------------------- builders

_EC_LEVELS = {"L": 48, "M": 49, "Q": 50, "H": 51}


def _gs_k(fn: int, params: bytes) -> bytes:
    length = 2 + len(params)
    return bytes([GS, 0x28, 0x6B, length & 0xFF, length >> 8, _QR_CN, fn]) + params


def qr_native(data: bytes, *, module_size: int = 6, ec: str = "M") -> bytes:
    """A native QR code (model 2): select model, module size, error correction, store, print."""
    if not 1 <= module_size <= 16:
        raise ValueError("module size must be 1..16")
    if len(data) > DEFAULT_MAX_QR_BYTES:
        raise ValueError("QR data too long")
    return b"".join(
        [
            _gs_k(65, bytes([50, 0])),
            _gs_k(67, bytes([module_size])),
            _gs_k(69, bytes([_EC_LEVELS[ec]])),
            _gs_k(_QR_STORE, b"\x30" + data),
            _gs_k(81, b"\x30"),
        ]
    )


def raster_image(rows: Sequence[Sequence[bool]]) -> bytes:
    """``GS v 0`` for a bitmap given as rows of pixels (True = black), MSB first."""
    height = len(rows)
    width = max((len(r) for r in rows), default=0)
    row_bytes = (width + 7) // 8
    if not 0 < height <= 0xFFFF or not 0 < row_bytes <= 0xFFFF:
        raise ValueError("image must be 1..65535 rows of 1..524280 pixels")
    out = bytearray([GS, 0x76, 0x30, 0])
    out += bytes([row_bytes & 0xFF, row_bytes >> 8, height & 0xFF, height >> 8])
    for row in rows:
        packed = bytearray(row_bytes)
        for x, black in enumerate(row):
            if black:
                packed[x >> 3] |= 0x80 >> (x & 7)
        out += packed
    return bytes(out)


def qr_matrix(data: bytes, ec: str = "M", border: int = 4) -> list[list[bool]]:
    """The module matrix of a QR code for ``data`` (with its quiet zone), via ``qrcode``."""
    import qrcode  # noqa: PLC0415 - only needed for raster injection
    import qrcode.constants  # noqa: PLC0415

    levels = {
        "L": qrcode.constants.ERROR_CORRECT_L,
        "M": qrcode.constants.ERROR_CORRECT_M,
        "Q": qrcode.constants.ERROR_CORRECT_Q,
        "H": qrcode.constants.ERROR_CORRECT_H,
    }
    qr = qrcode.QRCode(error_correction=levels[ec], border=border)
    qr.add_data(data)
    qr.make(fit=True)
    return [[bool(m) for m in row] for row in qr.get_matrix()]


def qr_raster(data: bytes, *, module_px: int = 6, ec: str = "M") -> bytes:
    """A QR code as a ``GS v 0`` raster image, for printers without native QR."""
    if not 1 <= module_px <= 32:
        raise ValueError("module size must be 1..32 pixels")
    rows: list[list[bool]] = []
    for row in qr_matrix(data, ec):
        wide = [m for m in row for _ in range(module_px)]
        rows.extend([wide] * module_px)
    return raster_image(rows)
