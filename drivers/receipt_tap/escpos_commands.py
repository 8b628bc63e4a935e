"""The ESC/POS command set as data: every command of the printer reference and its length.

``COMMANDS`` maps the two command bytes (a prefix, ``DLE`` ``ESC`` ``FS`` or ``GS``, and
the command byte) to the rule that says how many bytes follow.  It follows Epson's
ESC/POS command reference (the TM series), obsolete commands included, since tills keep
sending them:

- ``Fixed(n)``: n parameter bytes (``ESC ! n``, ``ESC p m t1 t2``, ``ESC W`` ...);
- ``Select``: the next byte picks the rule of the rest (``GS V m``, ``GS k m``,
  ``DLE DC4 fn``, ``FS g fn`` ...); a selector the reference does not define makes the
  command unknown;
- ``Counted``: n parameter bytes, then data whose length they give (``GS v 0`` and
  ``GS Q 0`` raster, ``ESC *`` columns, ``GS 8 L`` graphics, ``GS *``, ``GS k`` m n);
- ``Block``: ``fn pL pH`` then pL + pH * 256 bytes (every ``GS (``, ``ESC (``, ``FS (``
  function: graphics ``GS ( L``, 2D codes ``GS ( k``, ``GS ( E``, ``FS ( L`` ...);
- ``Terminated``: up to and including the ``count``-th ``end`` byte, ``limit`` at most
  (``ESC D`` tab stops and ``GS k`` m <= 6 end in NUL, ``GS C ;`` in five ``;``);
- ``Repeated``: ``ESC &`` (per character: x, then y * x bytes) and ``FS q`` (n images,
  each xL xH yL yH then x * y * 8 bytes).

Commands that cut the paper are in ``CUTS``.  Single control bytes (LF, CR, HT, FF, CAN
...) and printable bytes are text: they take no parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

ESC, GS, FS, DLE, NUL = 0x1B, 0x1D, 0x1C, 0x10, 0x00
PREFIXES = (DLE, ESC, FS, GS)  # every command starts with one of these


def u16(buf: bytes, i: int) -> int:
    """Little-endian 16-bit value at ``buf[i]``."""
    return buf[i] | buf[i + 1] << 8


@dataclass(frozen=True, slots=True)
class Fixed:
    """``params`` bytes follow the command bytes (and its selectors)."""

    params: int


@dataclass(frozen=True, slots=True)
class Counted:
    """``params`` bytes, then ``data(params)`` bytes of data (images, barcode text)."""

    params: int
    data: Callable[[bytes], int]
    image: bool = False


@dataclass(frozen=True, slots=True)
class Block:
    """``fn pL pH``, then pL + pH * 256 bytes (the ``GS ( fn`` family)."""

    params: int = 3


@dataclass(frozen=True, slots=True)
class Terminated:
    """Bytes up to and including the ``count``-th ``end`` byte, at most ``limit`` bytes."""

    end: int
    limit: int
    count: int = 1
    params: int = 0


@dataclass(frozen=True, slots=True)
class Repeated:
    """``ESC &`` (``amp``: y c1 c2) or ``FS q`` (``fsq``: n), then per-item data."""

    mode: str
    params: int


Rule = Fixed | Counted | Block | Terminated | Repeated


@dataclass(frozen=True, slots=True)
class Select:
    """The next byte picks the rule for what follows it; unlisted values are unknown."""

    rules: Mapping[int, Rule | Select] = field(default_factory=dict)


def _raster(p: bytes) -> int:  # m xL xH yL yH: x bytes a row, y rows
    return u16(p, 1) * u16(p, 3)


def _columns(p: bytes) -> int:  # m nL nH: n columns of 1 (8-dot) or 3 (24-dot) bytes
    return u16(p, 1) * (3 if p[0] in {32, 33} else 1)


def _graphics_8l(p: bytes) -> int:  # p1 p2 p3 p4: a 32-bit length
    return int.from_bytes(p[0:4], "little")


def _defined_image(p: bytes) -> int:  # GS * x y: x * 8 columns of y bytes
    return p[0] * p[1] * 8


def _count_byte(p: bytes) -> int:  # GS k m n: n bytes
    return p[0]


def _nv_write(p: bytes) -> int:  # FS g 1: m a1 a2 a3 a4 nL nH, then n bytes
    return u16(p, 5)


def _bmp_after(at: int) -> Callable[[bytes], int]:
    """GS D: a Windows BMP whose size is in its header (``BM`` s1 s2 s3 s4 ...)."""

    def size(p: bytes) -> int:
        return max(0, int.from_bytes(p[at + 2 : at + 6], "little") - 6)

    return size


_BLOCK = Block()
_NONE = Fixed(0)
_ONE = Fixed(1)

ESC_COMMANDS: dict[int, Rule | Select] = {
    0x0C: _NONE,  # ESC FF      print data in page mode
    0x20: _ONE,  # ESC SP n     right-side character spacing
    0x21: _ONE,  # ESC ! n      print mode
    0x24: Fixed(2),  # ESC $ nL nH  absolute print position
    0x25: _ONE,  # ESC % n      user-defined character set on/off
    0x26: Repeated("amp", 3),  # ESC & y c1 c2 [x d1...d(y*x)]...  define characters
    0x28: _BLOCK,  # ESC ( fn pL pH ...  (A beeper, Y ...)
    0x2A: Counted(3, _columns, image=True),  # ESC * m nL nH d...  bit image (columns)
    0x2B: _ONE,  # ESC + n      line spacing in 1/360 inch (older models)
    0x2D: _ONE,  # ESC - n      underline
    0x32: _NONE,  # ESC 2       default line spacing
    0x33: _ONE,  # ESC 3 n      line spacing
    0x3C: _NONE,  # ESC <       return home
    0x3D: _ONE,  # ESC = n      select peripheral device
    0x3F: _ONE,  # ESC ? n      cancel user-defined character
    0x40: _NONE,  # ESC @       initialise
    0x41: _ONE,  # ESC A n      line spacing in 1/60 inch (older models)
    0x42: Fixed(2),  # ESC B n t  buzzer
    0x44: Terminated(NUL, 33),  # ESC D n1...nk NUL  tab stops (k <= 32)
    0x45: _ONE,  # ESC E n      emphasized
    0x47: _ONE,  # ESC G n      double-strike
    0x4A: _ONE,  # ESC J n      print and feed
    0x4B: _ONE,  # ESC K n      print and reverse feed
    0x4C: _NONE,  # ESC L       page mode
    0x4D: _ONE,  # ESC M n      character font
    0x52: _ONE,  # ESC R n      international character set
    0x53: _NONE,  # ESC S       standard mode
    0x54: _ONE,  # ESC T n      print direction in page mode
    0x55: _ONE,  # ESC U n      unidirectional printing
    0x56: _ONE,  # ESC V n      90 degree rotation
    0x57: Fixed(8),  # ESC W xL xH yL yH dxL dxH dyL dyH  page mode area
    0x5C: Fixed(2),  # ESC \ nL nH  relative print position
    0x61: _ONE,  # ESC a n      justification
    0x63: Fixed(2),  # ESC c 0|1|3|4|5 n  paper type, sensors, panel buttons
    0x64: _ONE,  # ESC d n      print and feed n lines
    0x65: _ONE,  # ESC e n      print and reverse feed n lines
    0x66: Fixed(2),  # ESC f t1 t2  cut sheet wait time
    0x69: _NONE,  # ESC i       partial cut (one point left)
    0x6D: _NONE,  # ESC m       partial cut (three points left)
    0x70: Fixed(3),  # ESC p m t1 t2  drawer kick pulse
    0x72: _ONE,  # ESC r n      print colour
    0x74: _ONE,  # ESC t n      character code table
    0x75: _ONE,  # ESC u n      transmit peripheral device status
    0x76: _NONE,  # ESC v       transmit paper sensor status
    0x7B: _ONE,  # ESC { n      upside-down printing
}

GS_COMMANDS: dict[int, Rule | Select] = {
    0x21: _ONE,  # GS ! n       character size
    0x23: _ONE,  # GS # n       select NV bit image (obsolete)
    0x24: Fixed(2),  # GS $ nL nH  absolute vertical position in page mode
    0x28: _BLOCK,  # GS ( fn pL pH ...  (A C D E H K L M N P Q k z ...)
    0x2A: Counted(2, _defined_image, image=True),  # GS * x y d...  define bit image
    0x2F: _ONE,  # GS / m       print downloaded bit image
    0x38: Select({0x4C: Counted(4, _graphics_8l, image=True)}),  # GS 8 L p1..p4 ...
    0x3A: _NONE,  # GS :        start/end macro definition
    0x41: Fixed(2),  # GS A m n  adjust print position (obsolete)
    0x42: _ONE,  # GS B n       reverse printing
    0x43: Select(  # GS C 0 n m / 1 aL aH bL bH n r / 2 nL nH / ; sa;sb;sn;sr;sc;  counter
        {0x30: Fixed(2), 0x31: Fixed(6), 0x32: Fixed(2), 0x3B: Terminated(0x3B, 40, count=5)}
    ),
    0x44: Select(  # GS D 0 C|S ...  Windows BMP graphics (its size is in the BMP header)
        {
            0x30: Select(
                {
                    0x43: Counted(5 + 6, _bmp_after(5), image=True),  # a kc1 kc2 b c BMP
                    0x53: Counted(3 + 6, _bmp_after(3), image=True),  # a b c BMP
                }
            )
        }
    ),
    0x45: _ONE,  # GS E n       print density / head energising (obsolete)
    0x48: _ONE,  # GS H n       HRI position
    0x49: _ONE,  # GS I n       transmit printer ID
    0x4C: Fixed(2),  # GS L nL nH  left margin
    0x50: Fixed(2),  # GS P x y  motion units
    0x51: Select({0x30: Counted(5, _raster, image=True)}),  # GS Q 0 m xL xH yL yH d...
    0x54: _ONE,  # GS T n       print position to the line start
    0x56: Select(  # GS V m [n]  cut (and feed)
        dict.fromkeys((0, 1, 48, 49), _NONE) | dict.fromkeys((65, 66, 97, 98, 103, 104), _ONE)
    ),
    0x57: Fixed(2),  # GS W nL nH  print area width
    0x5C: Fixed(2),  # GS \ nL nH  relative vertical position in page mode
    0x5E: Fixed(3),  # GS ^ r t m  execute macro
    0x61: _ONE,  # GS a n       automatic status back
    0x62: _ONE,  # GS b n       smoothing
    0x63: _NONE,  # GS c        print counter (obsolete)
    0x66: _ONE,  # GS f n       HRI font
    0x67: Select({0x30: Fixed(3), 0x32: Fixed(3)}),  # GS g 0|2 m nL nH  maintenance counter
    0x68: _ONE,  # GS h n       barcode height
    0x6A: _ONE,  # GS j n       automatic status back (ink)
    0x6B: Select(  # GS k m d1...dk NUL (m 0..6)  /  GS k m n d1...dn (m 65..79)
        {m: Terminated(NUL, 256) for m in range(7)}
        | {m: Counted(1, _count_byte) for m in range(65, 80)}
    ),
    0x72: _ONE,  # GS r n       transmit status
    0x76: Select({0x30: Counted(5, _raster, image=True)}),  # GS v 0 m xL xH yL yH d...
    0x77: _ONE,  # GS w n       barcode module width
    0x7A: Select({0x30: Fixed(2)}),  # GS z 0 t1 t2  online recovery wait time
    0x7C: _ONE,  # GS | n       print density
}

FS_COMMANDS: dict[int, Rule | Select] = {
    0x21: _ONE,  # FS ! n       print mode for Kanji
    0x26: _NONE,  # FS &        Kanji mode
    0x28: _BLOCK,  # FS ( fn pL pH ...  (A C E L e)
    0x2D: _ONE,  # FS - n       Kanji underline
    0x2E: _NONE,  # FS .        cancel Kanji mode
    0x32: Counted(2, lambda _: 72),  # FS 2 c1 c2 d1...d72  define a user Kanji
    0x3F: Fixed(2),  # FS ? c1 c2  cancel a user Kanji
    0x43: _ONE,  # FS C n       Kanji code system
    0x53: Fixed(2),  # FS S n1 n2  Kanji spacing
    0x57: _ONE,  # FS W n       Kanji quadruple size
    0x67: Select(  # FS g 1 m a1..a4 nL nH d...  /  FS g 2 m a1..a4 nL nH  NV user memory
        {0x31: Counted(7, _nv_write), 0x32: Fixed(7)}
    ),
    0x70: Fixed(2),  # FS p n m     print NV bit image
    0x71: Repeated("fsq", 1),  # FS q n [xL xH yL yH d...]  define NV bit images
}

DLE_COMMANDS: dict[int, Rule | Select] = {
    0x04: Select({1: _NONE, 2: _NONE, 3: _NONE, 4: _NONE, 7: _ONE, 8: _ONE}),  # DLE EOT n [a]
    0x05: _ONE,  # DLE ENQ n    real-time request
    0x14: Select(  # DLE DC4 fn ...  pulse, power off, buzzer, status, clear buffers
        {1: Fixed(2), 2: Fixed(2), 3: Fixed(5), 7: _ONE, 8: Fixed(7)}
    ),
}

COMMANDS: dict[bytes, Rule | Select] = {
    bytes([prefix, cmd]): rule
    for prefix, table in ((ESC, ESC_COMMANDS), (GS, GS_COMMANDS), (FS, FS_COMMANDS),
                          (DLE, DLE_COMMANDS))
    for cmd, rule in table.items()
}  # fmt: skip

CUTS = frozenset({b"\x1dV", b"\x1bi", b"\x1bm"})  # GS V, ESC i, ESC m
RESYNC = b"\x1b@"  # ESC @: the printer is initialised; see ``drivers.receipt_tap.escpos``
QR_STORE = (0x6B, 49, 80)  # GS ( k ... cn 49, fn 80: store QR data


def header_limit() -> int:
    """The longest header (command bytes, selectors, parameters) in the table."""

    def longest(rule: Rule | Select) -> int:
        if isinstance(rule, Select):
            return 1 + max(longest(r) for r in rule.rules.values())
        return rule.params

    return 2 + max(longest(rule) for rule in COMMANDS.values())
