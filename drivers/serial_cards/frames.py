"""Serial card-reader wire formats: bytes in, card numbers or counted rejections out.

Pure and incremental, no I/O.  Each decoder takes whatever chunks the serial port
delivers (``feed``) and returns the results completed by them, so the same stream cut
anywhere gives the same results.  Junk is counted once per run and skipped; the
decoder resyncs on the next start byte or line end.  Buffers are bounded, so a stream
of junk without a terminator never grows memory.

    rdm6300    STX(0x02) + 10 hex (version byte + 4-byte tag) + 2 hex XOR checksum + ETX(0x03)
    scanner    [AIM id "]" letter char] payload, ended by CR, LF or CRLF
    magstripe  Track 2: ";" PAN ["=" fields] "?" [LRC]

A ``Card`` carries a raw identifier (a personal identifier: pseudonymise it at once and
never log it; its repr hides it).  A ``Rejected`` carries a short countable reason:
``garbage``, ``partial``, ``too_long``, ``bad_hex``, ``bad_checksum``, ``bad_symbology``,
``bad_check_digit``, ``bad_format``.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Protocol

STX = 0x02
ETX = 0x03
CR = 0x0D
LF = 0x0A

RDM6300_BODY = 12  # 10 hex data chars + 2 hex checksum chars
SCANNER_MAX_LINE = 128
TRACK2_MAX = 40  # ISO 7813: at most 40 characters including sentinels and LRC
TRACK1_MAX = 79

_HEX = frozenset(string.hexdigits.encode())
_PRINTABLE = frozenset(range(0x20, 0x7F))
_TRACK2_CHARS = frozenset(range(0x30, 0x40))  # 0-9 : ; < = > ?


@dataclass(frozen=True, slots=True)
class Card:
    """A well-formed card read.  ``value`` is raw: pseudonymise it, never log it."""

    namespace: str
    value: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Rejected:
    """A frame or run of bytes that was skipped; ``reason`` is a countable label."""

    reason: str


Result = Card | Rejected


class Decoder(Protocol):
    """An incremental decoder of one reader protocol."""

    def feed(self, data: bytes) -> list[Result]:
        """Consume ``data`` and return the results it completed, in stream order."""
        ...

    def flush(self) -> list[Result]:
        """Drop any incomplete frame (counted as ``partial``) and return to idle."""
        ...

    @property
    def pending(self) -> bool:
        """True while an incomplete frame is buffered."""
        ...

    @property
    def buffered(self) -> int:
        """Bytes held in the internal buffer (bounded)."""
        ...


def gtin_check_ok(digits: str) -> bool:
    """True if the last digit is the GS1 mod-10 check digit of the others (EAN-8/13)."""
    if not digits.isascii() or not digits.isdigit() or len(digits) < 2:
        return False
    body = digits[:-1]
    total = sum(int(d) * (3 if i % 2 == 0 else 1) for i, d in enumerate(reversed(body)))
    return (10 - total % 10) % 10 == int(digits[-1])


class Rdm6300Decoder:
    """RDM6300 / EM4100 125 kHz reader frames; yields ``rfid`` cards (10 hex chars)."""

    def __init__(self) -> None:
        self._frame = bytearray()
        self._in_frame = False
        self._in_junk = False

    @property
    def pending(self) -> bool:
        return self._in_frame

    @property
    def buffered(self) -> int:
        return len(self._frame)

    def flush(self) -> list[Result]:
        out: list[Result] = [Rejected("partial")] if self._in_frame else []
        self._frame.clear()
        self._in_frame = False
        self._in_junk = False
        return out

    def feed(self, data: bytes) -> list[Result]:
        out: list[Result] = []
        for byte in data:
            if byte == STX:
                if self._in_frame:
                    out.append(Rejected("partial"))
                self._frame.clear()
                self._in_frame = True
                self._in_junk = False
            elif not self._in_frame:
                if not self._in_junk:
                    out.append(Rejected("garbage"))
                    self._in_junk = True
            elif byte == ETX:
                out.append(self._finish())
            elif len(self._frame) >= RDM6300_BODY:
                out.append(Rejected("too_long"))
                self._frame.clear()
                self._in_frame = False
                self._in_junk = True  # the rest of this run is part of the same fault
            else:
                self._frame.append(byte)
        return out

    def _finish(self) -> Result:
        body = bytes(self._frame)
        self._frame.clear()
        self._in_frame = False
        if len(body) != RDM6300_BODY:
            return Rejected("partial")
        if not _HEX.issuperset(body):
            return Rejected("bad_hex")
        data = bytes.fromhex(body[:10].decode("ascii"))
        checksum = 0
        for b in data:
            checksum ^= b
        if checksum != int(body[10:], 16):
            return Rejected("bad_checksum")
        return Card("rfid", body[:10].decode("ascii").upper())


class ScannerDecoder:
    """Line-terminated barcode/2D scanners; yields ``loyalty`` cards.

    An AIM symbology identifier (``]E0`` ...) is stripped.  EAN-13 (``]E0``) and EAN-8
    (``]E4``) are checked for their check digit, and so is a bare 13-digit line when
    ``check_bare_ean13`` is set (scanners configured without AIM ids).
    """

    def __init__(self, *, check_bare_ean13: bool = True) -> None:
        self._line = bytearray()
        self._skipping = False
        self._check_bare_ean13 = check_bare_ean13

    @property
    def pending(self) -> bool:
        return bool(self._line) or self._skipping

    @property
    def buffered(self) -> int:
        return len(self._line)

    def flush(self) -> list[Result]:
        out: list[Result] = [Rejected("partial")] if self._line else []
        self._line.clear()
        self._skipping = False
        return out

    def feed(self, data: bytes) -> list[Result]:
        out: list[Result] = []
        for byte in data:
            if byte in (CR, LF):
                if self._line:
                    out.append(self._finish(bytes(self._line)))
                    self._line.clear()
                self._skipping = False
            elif self._skipping:
                continue
            elif len(self._line) >= SCANNER_MAX_LINE:
                out.append(Rejected("too_long"))
                self._line.clear()
                self._skipping = True
            else:
                self._line.append(byte)
        return out

    def _finish(self, line: bytes) -> Result:
        if not _PRINTABLE.issuperset(line):
            return Rejected("garbage")
        text = line.decode("ascii")
        symbology = ""
        if text.startswith("]"):
            if len(text) < 3 or not text[1].isalpha() or not text[2].isalnum():
                return Rejected("bad_symbology")
            symbology, text = text[1:3], text[3:]
        payload = text.strip()
        if not payload:
            return Rejected("bad_format")
        needs_check = symbology in ("E0", "E4") or (
            not symbology and self._check_bare_ean13 and len(payload) == 13 and payload.isdigit()
        )
        if needs_check:
            want = 13 if symbology in ("E0", "") else 8
            if len(payload) != want or not payload.isdigit():
                return Rejected("bad_format")
            if not gtin_check_ok(payload):
                return Rejected("bad_check_digit")
        return Card("loyalty", payload)


class MagstripeDecoder:
    """Magnetic stripe Track 2 (``;PAN=...?`` + optional LRC); yields ``loyalty`` PANs.

    Track 1 (``%...?``) is skipped silently; CR/LF between tracks is ignored.  The LRC,
    when the reader sends it, is recognised and swallowed; it is not required.
    """

    def __init__(self) -> None:
        self._track = bytearray()
        self._state = "idle"  # idle | track2 | track1 | junk | lrc
        self._lrc = 0
        self._skipped = 0

    @property
    def pending(self) -> bool:
        return self._state in ("track2", "track1")

    @property
    def buffered(self) -> int:
        return len(self._track)

    def flush(self) -> list[Result]:
        out: list[Result] = [Rejected("partial")] if self._state == "track2" else []
        self._reset("idle")
        return out

    def _reset(self, state: str) -> None:
        self._track.clear()
        self._state = state
        self._skipped = 0

    def feed(self, data: bytes) -> list[Result]:
        out: list[Result] = []
        for byte in data:
            if self._state == "lrc":
                self._state = "idle"
                if byte == self._lrc and byte != ord(";"):
                    continue  # a ";" is taken as the next start sentinel instead
            if byte == ord(";"):
                if self._state == "track2" and self._track:
                    out.append(Rejected("partial"))
                self._reset("track2")
            elif self._state == "track2":
                if byte == ord("?"):
                    out.append(self._finish())
                elif byte in (CR, LF):
                    if self._track:
                        out.append(Rejected("partial"))
                    self._reset("idle")
                elif byte not in _TRACK2_CHARS:
                    out.append(Rejected("garbage"))
                    self._reset("junk")
                elif len(self._track) >= TRACK2_MAX - 3:
                    out.append(Rejected("too_long"))
                    self._reset("junk")
                else:
                    self._track.append(byte)
            elif self._state == "track1":
                self._skipped += 1
                if byte == ord("?"):
                    self._reset("idle")
                elif byte in (CR, LF) or self._skipped > TRACK1_MAX:
                    out.append(Rejected("garbage"))
                    self._reset("idle" if byte in (CR, LF) else "junk")
            elif byte in (CR, LF):
                self._state = "idle"
            elif byte == ord("%") and self._state == "idle":
                self._reset("track1")
            elif self._state == "idle":
                out.append(Rejected("garbage"))
                self._state = "junk"
        return out

    def _finish(self) -> Result:
        body = bytes(self._track)
        self._reset("lrc")
        lrc = 0
        for b in b";" + body + b"?":
            lrc ^= b & 0x0F
        self._lrc = 0x30 | lrc
        pan = body.split(b"=", 1)[0]
        if not pan or not pan.isdigit():
            return Rejected("bad_format")
        return Card("loyalty", pan.decode("ascii"))


def decoder_for(protocol: str, *, check_bare_ean13: bool = True) -> Decoder:
    """A fresh decoder for a configured ``protocol`` (``rdm6300``, ``scanner``, ``magstripe``)."""
    if protocol == "rdm6300":
        return Rdm6300Decoder()
    if protocol == "scanner":
        return ScannerDecoder(check_bare_ean13=check_bare_ean13)
    if protocol == "magstripe":
        return MagstripeDecoder()
    raise ValueError(f"unknown card reader protocol {protocol!r}")
