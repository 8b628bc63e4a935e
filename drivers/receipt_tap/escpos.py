"""ESC/POS: an incremental parser that finds QR payloads and cuts, and a few builders.

The parser is a pure state machine: ``feed(bytes)`` may be called with any
segmentation of the stream and reports the same things as one call with everything.
It walks command by command with the length rule of every command of the printer
reference (``drivers.receipt_tap.escpos_commands.COMMANDS``), so a parameter byte is never taken
for a command, and declared payloads (raster images, graphics, bit images, barcodes,
every ``GS ( fn pL pH`` block) are skipped by length: a byte scan would find
QR-looking bytes inside image data.  Memory is bounded whatever the lengths say: a
skipped payload is counted down, never buffered, and a QR payload larger than
``max_qr_bytes`` is skipped the same way.  At most ``MAX_HEADER`` bytes of an
incomplete command header are kept.

Reported:
  - ``qr``: the data of each QR store-data command (``GS ( k`` cn 49 fn 80);
  - ``cuts``: the stream offset at which each cut command starts (``GS V``, ``ESC i``,
    ``ESC m``), so a caller can inject bytes just before it.

Unknown commands (a prefix byte ``ESC``, ``FS`` or ``GS`` followed by a byte the
reference does not define, or a selector it does not list) are stepped over by the
bytes read so far, as a printer ignores them, but their parameters, if they have any,
are unknown: from there on the parser is *unsure* where commands start.  While
unsure, a cut is reported in ``unsure_cuts``, not in ``cuts``, so nothing is ever
injected into what may be the middle of a command (that receipt gets no token, and
it is counted).  ``ESC @`` (initialise, sent at the start of a receipt) or a new
stream makes the parser sure again.  ``DLE`` followed by anything but ``EOT``, ``ENQ``
or ``DC4`` is a data byte to the printer and is stepped over alone.

QR payloads may hold personal data: nothing here logs them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from drivers.receipt_tap.escpos_commands import (
    COMMANDS,
    CUTS,
    DLE,
    GS,
    PREFIXES,
    QR_STORE,
    RESYNC,
    Block,
    Counted,
    Fixed,
    Rule,
    Select,
    Terminated,
    header_limit,
    u16,
)

MAX_HEADER = header_limit() + 3  # + cn fn m of a GS ( k block
DEFAULT_MAX_QR_BYTES = 7089  # the largest QR code (version 40, numeric, level L)
_PREFIX_SET = frozenset(PREFIXES)
_QR_FN, _QR_CN, _QR_STORE = QR_STORE


@dataclass
class ParseResult:
    """What one ``feed`` found: QR payloads and absolute offsets of cut commands.

    ``unsure_cuts``: cuts met after an unknown command, before the next ``ESC @``.
    """

    qr: list[bytes] = field(default_factory=list)
    cuts: list[int] = field(default_factory=list)
    unsure_cuts: list[int] = field(default_factory=list)


@dataclass
class ParserStats:
    """Counters a driver can export: skipped image bytes, oversize QR commands, ..."""

    commands: int = 0
    images: int = 0
    skipped_bytes: int = 0
    qr_oversize: int = 0
    unknown: int = 0


Mode = Literal["text", "amp", "fsq", "term"]


class EscPosParser:
    """Incremental ESC/POS parser; see the module docstring."""

    def __init__(self, max_qr_bytes: int = DEFAULT_MAX_QR_BYTES) -> None:
        self.max_qr_bytes = max_qr_bytes
        self.stats = ParserStats()
        self.offset = 0  # bytes fed so far
        self.unsure = False  # an unknown command was met since the last ESC @
        self._header = b""  # start of an incomplete command
        self._skip = 0  # payload bytes still to step over
        self._collect: bytearray | None = None
        self._collect_left = 0
        self._mode: Mode = "text"  # what follows the current skip
        self._repeat = 0  # amp: characters left / fsq: images left / term: bytes left
        self._amp_y = 0
        self._term_end = 0  # term: the end byte and how many are still to come
        self._term_count = 0

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
        nxt = [-2, -2, -2, -2]  # next offset of each prefix byte (-1: none left)
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
                if buf[i] not in _PREFIX_SET:
                    i = _next_prefix(buf, i, nxt)
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
        """Inside ESC &, FS q or a terminated parameter list: the next piece."""
        n = len(buf)
        if self._mode == "term":
            end = min(n, i + self._repeat)
            at = i
            while self._term_count and at < end:
                hit = buf.find(self._term_end, at, end)
                if hit < 0:
                    at = end
                    break
                self._term_count -= 1
                at = hit + 1
            used = at - i
            self._repeat -= used
            if not self._term_count or not self._repeat:
                self._mode = "text"
            return used
        size = 1 if self._mode == "amp" else 4
        if i + size > n:
            return 0
        self._repeat -= 1
        if self._mode == "amp":  # x, then y * x bytes
            self._skip = self._amp_y * buf[i]
        else:  # fsq: xL xH yL yH, then x * y * 8 bytes
            self._skip = u16(buf, i) * u16(buf, i + 2) * 8
            self.stats.images += 1
        if not self._repeat:
            self._mode = "text"
        return size

    def _command(self, buf: bytes, i: int, at: int, result: ParseResult) -> int:
        """Parse the command starting at ``buf[i]``; return its header length, 0 if cut short."""
        n = len(buf)
        if i + 2 > n:
            return 0
        key = buf[i : i + 2]
        rule: Rule | Select | None = COMMANDS.get(key)
        j = i + 2  # the next byte of the header
        while isinstance(rule, Select):
            if j >= n:
                return 0
            rule = rule.rules.get(buf[j])
            j += 1
        if rule is None:
            return self._unknown(buf, i, j - i)
        size = j - i + rule.params
        qr_block = isinstance(rule, Block) and key[0] == GS and i + size <= n
        if qr_block and buf[j] == _QR_FN and u16(buf, j + 1) >= 3:
            size += 3  # GS ( k pL pH cn fn m: look at cn and fn
        if i + size > n:
            return 0
        self._act(rule, buf[j : i + size], key, at, result)
        return size

    def _unknown(self, buf: bytes, i: int, read: int) -> int:
        """A command the reference does not define: step over it, unsure from here on.

        ``DLE`` only starts real-time commands: before anything else it is a data byte
        (a real-time command with an unknown function is unknown, like any other).
        A prefix followed by a prefix (``ESC ESC``) is stepped over alone.
        """
        if buf[i] == DLE and read == 2:
            return 1
        self.stats.unknown += 1
        self.unsure = True
        return 1 if read == 2 and buf[i + 1] in _PREFIX_SET else read

    def _act(self, rule: Rule, p: bytes, key: bytes, at: int, result: ParseResult) -> None:
        """Set up the state for what follows the header; ``p``: its parameter bytes."""
        if isinstance(rule, Fixed):
            if key in CUTS:
                (result.unsure_cuts if self.unsure else result.cuts).append(at)
            elif key == RESYNC:
                self.unsure = False
        elif isinstance(rule, Block):
            size = u16(p, 1)
            if len(p) == 6 and p[3] == _QR_CN and p[4] == _QR_STORE:
                self._start_qr(size - 3)
            else:
                if key[0] == GS and p[0] == 0x4C:  # GS ( L graphics
                    self.stats.images += 1
                self._skip = size - (len(p) - 3)
        elif isinstance(rule, Counted):
            self.stats.images += int(rule.image)
            self._skip = rule.data(p)
        elif isinstance(rule, Terminated):
            self._mode, self._repeat = "term", rule.limit
            self._term_end, self._term_count = rule.end, rule.count
        elif rule.mode == "amp":  # ESC & y c1 c2, then per character: x, y * x bytes
            self._amp_y = p[0]
            self._repeat = max(0, p[2] - p[1] + 1)
            self._mode = "amp" if self._repeat else "text"
        else:  # FS q n, then n images
            self._repeat = p[0]
            self._mode = "fsq" if self._repeat else "text"

    def _start_qr(self, size: int) -> None:
        if size > self.max_qr_bytes:
            self.stats.qr_oversize += 1
            self._skip = size
        elif size:
            self._collect, self._collect_left = bytearray(), size


def _next_prefix(buf: bytes, i: int, nxt: list[int]) -> int:
    """The offset of the next command prefix byte at or after ``i`` (-1: none).

    ``nxt`` remembers where each of the four bytes occurs next, so each is searched
    for again (memchr) only once passed: linear in the buffer, unlike a search per
    command for a byte that does not occur at all.
    """
    best = -1
    for k, byte in enumerate(PREFIXES):
        at = nxt[k]
        if -1 < at < i or at == -2:
            at = nxt[k] = buf.find(byte, i)
        if at >= 0 and (best < 0 or at < best):
            best = at
    return best


def parse(data: bytes, max_qr_bytes: int = DEFAULT_MAX_QR_BYTES) -> ParseResult:
    """Parse a whole stream at once (tests and tools)."""
    return EscPosParser(max_qr_bytes).feed(data)


# ---------------------------------------------------------------------------- builders

_EC_LEVELS = {"L": 48, "M": 49, "Q": 50, "H": 51}


def _gs_k(fn: int, params: bytes) -> bytes:
    length = 2 + len(params)
    return bytes([GS, 0x28, _QR_FN, length & 0xFF, length >> 8, _QR_CN, fn]) + params


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
