"""The ESC/POS command table against the printer reference, command by command.

Every command of the reference is written out here by hand (not from the table under
test), its parameter bytes chosen to look like commands: ``GS`` (0x1D), then ``V``
(0x56) and ``NUL`` where the reference allows any byte.  A length rule one byte short
leaves a ``GS`` behind that starts a false command; one byte long swallows the cut that
follows.  Either way the test sees it.
"""

from __future__ import annotations

import pytest

from drivers.receipt_tap.escpos import EscPosParser, parse
from drivers.receipt_tap.escpos_commands import COMMANDS, CUTS

ESC, GS, FS, DLE = b"\x1b", b"\x1d", b"\x1c", b"\x10"
G = 0x1D  # a parameter byte that is a command prefix
CUT = GS + b"V\x00"
DATA = (b"\x1dV\x00" * 200)[:512]  # image/barcode data that reads as cuts


def data(n: int) -> bytes:
    return (DATA * (n // len(DATA) + 1))[:n]


def u16(n: int) -> bytes:
    return bytes([n & 0xFF, n >> 8])


def p(*values: int) -> bytes:
    return bytes(values)


def bmp(size: int) -> bytes:
    """A BMP file's first bytes: ``BM`` and its total size; the rest is data."""
    return b"BM" + size.to_bytes(4, "little") + data(size - 6)


# name -> one instance of the command, written from the reference
REFERENCE: dict[str, bytes] = {
    "ESC FF": ESC + b"\x0c",
    "ESC SP n": ESC + b" " + p(G),
    "ESC ! n": ESC + b"!" + p(G),
    "ESC $ nL nH": ESC + b"$" + p(G, G),
    "ESC % n": ESC + b"%" + p(G),
    "ESC & y c1 c2": ESC + b"&" + p(3, 0x41, 0x42) + p(2) + data(6) + p(1) + data(3),
    "ESC ( A": ESC + b"(A" + u16(4) + p(G, G, G, G),
    "ESC ( Y": ESC + b"(Y" + u16(2) + p(48, G),
    "ESC * 8-dot": ESC + b"*" + p(0) + u16(5) + data(5),
    "ESC * 24-dot": ESC + b"*" + p(33) + u16(5) + data(15),
    "ESC + n": ESC + b"+" + p(G),
    "ESC - n": ESC + b"-" + p(G),
    "ESC 2": ESC + b"2",
    "ESC 3 n": ESC + b"3" + p(G),
    "ESC <": ESC + b"<",
    "ESC = n": ESC + b"=" + p(G),
    "ESC ? n": ESC + b"?" + p(G),
    "ESC @": ESC + b"@",
    "ESC A n": ESC + b"A" + p(G),
    "ESC B n t": ESC + b"B" + p(G, G),
    "ESC D tabs NUL": ESC + b"D" + p(8, 16, G, 0),
    "ESC E n": ESC + b"E" + p(G),
    "ESC G n": ESC + b"G" + p(G),
    "ESC J n": ESC + b"J" + p(G),
    "ESC K n": ESC + b"K" + p(G),
    "ESC L": ESC + b"L",
    "ESC M n": ESC + b"M" + p(G),
    "ESC R n": ESC + b"R" + p(G),
    "ESC S": ESC + b"S",
    "ESC T n": ESC + b"T" + p(G),
    "ESC U n": ESC + b"U" + p(G),
    "ESC V n": ESC + b"V" + p(G),
    "ESC W area": ESC + b"W" + p(G) * 8,
    "ESC \\ nL nH": ESC + b"\\" + p(G, G),
    "ESC a n": ESC + b"a" + p(G),
    "ESC c 3 n": ESC + b"c3" + p(G),
    "ESC c 5 n": ESC + b"c5" + p(G),
    "ESC d n": ESC + b"d" + p(G),
    "ESC e n": ESC + b"e" + p(G),
    "ESC f t1 t2": ESC + b"f" + p(G, G),
    "ESC p m t1 t2": ESC + b"p" + p(0, G, G),
    "ESC r n": ESC + b"r" + p(G),
    "ESC t n": ESC + b"t" + p(G),
    "ESC u n": ESC + b"u" + p(G),
    "ESC v": ESC + b"v",
    "ESC { n": ESC + b"{" + p(G),
    "FS ! n": FS + b"!" + p(G),
    "FS &": FS + b"&",
    "FS ( A": FS + b"(A" + u16(4) + p(48, G, G, G),
    "FS ( L": FS + b"(L" + u16(2) + p(33, G),
    "FS ( e": FS + b"(e" + u16(2) + p(51, G),
    "FS - n": FS + b"-" + p(G),
    "FS .": FS + b".",
    "FS 2 c1 c2 d1..d72": FS + b"2" + p(G, G) + data(72),
    "FS ? c1 c2": FS + b"?" + p(G, G),
    "FS C n": FS + b"C" + p(G),
    "FS S n1 n2": FS + b"S" + p(G, G),
    "FS W n": FS + b"W" + p(G),
    "FS g 1 write": FS + b"g1" + p(0, G, G, G, G) + u16(7) + data(7),
    "FS g 2 read": FS + b"g2" + p(0, G, G, G, G) + u16(300),
    "FS p n m": FS + b"p" + p(1, G),
    "FS q n": FS + b"q" + p(2) + u16(1) + u16(1) + data(8) + u16(2) + u16(1) + data(16),
    "GS ! n": GS + b"!" + p(G),
    "GS # n": GS + b"#" + p(G),
    "GS $ nL nH": GS + b"$" + p(G, G),
    "GS ( A": GS + b"(A" + u16(2) + p(G, G),
    "GS ( C": GS + b"(C" + u16(5) + p(0, 0, 0, G, G),
    "GS ( D": GS + b"(D" + u16(3) + p(20, 1, G),
    "GS ( E": GS + b"(E" + u16(3) + p(1, 73, G),
    "GS ( H": GS + b"(H" + u16(6) + p(48, 48, G, G, G, G),
    "GS ( K": GS + b"(K" + u16(2) + p(48, G),
    "GS ( L raster": GS + b"(L" + u16(12) + b"0p0\x01\x01\x31" + u16(8) + u16(1) + data(1),
    "GS ( L print": GS + b"(L" + u16(2) + b"02",
    "GS ( M": GS + b"(M" + u16(3) + p(1, 1, G),
    "GS ( N": GS + b"(N" + u16(2) + p(48, G),
    "GS ( P": GS + b"(P" + u16(8) + p(48) + p(G) * 7,
    "GS ( Q": GS + b"(Q" + u16(4) + p(48, G, G, G),
    "GS ( k model": GS + b"(k" + u16(4) + p(49, 65, 50, 0),
    "GS ( k pdf417 store": GS + b"(k" + u16(8) + p(48, 80, 48) + data(5),
    "GS ( k print": GS + b"(k" + u16(3) + p(49, 81, 48),
    "GS ( z": GS + b"(z" + u16(3) + p(42, G, G),
    "GS * x y": GS + b"*" + p(2, 3) + data(48),
    "GS / m": GS + b"/" + p(G),
    "GS 8 L": GS + b"8L" + (9).to_bytes(4, "little") + b"0p" + data(7),
    "GS :": GS + b":",
    "GS A m n": GS + b"A" + p(G, G),
    "GS B n": GS + b"B" + p(G),
    "GS C 0 n m": GS + b"C0" + p(G, G),
    "GS C 1 counter": GS + b"C1" + p(G) * 6,
    "GS C 2 nL nH": GS + b"C2" + p(G, G),
    "GS C ; counter": GS + b"C;" + b"1;99;1;1;0;",
    "GS D 0 C bmp": GS + b"D0C" + p(48, 32, 32, 1, 49) + bmp(40),
    "GS D 0 S bmp": GS + b"D0S" + p(48, 1, 49) + bmp(30),
    "GS E n": GS + b"E" + p(G),
    "GS H n": GS + b"H" + p(G),
    "GS I n": GS + b"I" + p(G),
    "GS L nL nH": GS + b"L" + p(G, G),
    "GS P x y": GS + b"P" + p(G, G),
    "GS Q 0": GS + b"Q0" + p(0) + u16(2) + u16(3) + data(6),
    "GS T n": GS + b"T" + p(G),
    "GS V 0": GS + b"V" + p(0),
    "GS V 1": GS + b"V" + p(49),
    "GS V 65 n": GS + b"V" + p(65, G),
    "GS V 66 n": GS + b"V" + p(66, G),
    "GS V 97 n": GS + b"V" + p(97, G),
    "GS V 98 n": GS + b"V" + p(98, G),
    "GS V 103 n": GS + b"V" + p(103, G),
    "GS V 104 n": GS + b"V" + p(104, G),
    "GS W nL nH": GS + b"W" + p(G, G),
    "GS \\ nL nH": GS + b"\\" + p(G, G),
    "GS ^ r t m": GS + b"^" + p(G, G, G),
    "GS a n": GS + b"a" + p(G),
    "GS b n": GS + b"b" + p(G),
    "GS c": GS + b"c",
    "GS f n": GS + b"f" + p(G),
    "GS g 0 m nL nH": GS + b"g0" + p(0, G, G),
    "GS g 2 m nL nH": GS + b"g2" + p(0, G, G),
    "GS h n": GS + b"h" + p(G),
    "GS j n": GS + b"j" + p(G),
    "GS k 4 NUL": GS + b"k" + p(4) + b"\x1dV" + b"CODE39" + p(0),
    "GS k 73 n": GS + b"k" + p(73) + p(6) + data(6),
    "GS r n": GS + b"r" + p(G),
    "GS v 0": GS + b"v0" + p(0) + u16(2) + u16(3) + data(6),
    "GS w n": GS + b"w" + p(G),
    "GS z 0 t1 t2": GS + b"z0" + p(G, G),
    "GS | n": GS + b"|" + p(G),
    "DLE EOT n": DLE + b"\x04" + p(1),
    "DLE EOT 7 a": DLE + b"\x04" + p(7, G),
    "DLE ENQ n": DLE + b"\x05" + p(G),
    "DLE DC4 1 m t": DLE + b"\x14" + p(1, 0, G),
    "DLE DC4 2 a b": DLE + b"\x14" + p(2, 1, 8),
    "DLE DC4 3 buzzer": DLE + b"\x14" + p(3, G, G, G, G, G),
    "DLE DC4 7 m": DLE + b"\x14" + p(7, G),
    "DLE DC4 8 clear": DLE + b"\x14" + p(8, 1, 3, 20, 1, 6, 2, 8),
}
CUT_NAMES = {n for n in REFERENCE if n.startswith("GS V")} | {"ESC i", "ESC m"}
REFERENCE |= {"ESC i": ESC + b"i", "ESC m": ESC + b"m"}


def test_the_issue_case_line_spacing_then_vat() -> None:
    """ESC + n with n = GS, then "VAT ...": one cut, the last."""
    stream = b"\x1b@\x1b+\x1dVAT 21% ...... 0.21\n\x1bd\x06\x1dV\x00"
    result = parse(stream)
    assert result.cuts == [len(stream) - 3]
    assert result.unsure_cuts == []


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_every_reference_command_has_its_length(name: str) -> None:
    command = REFERENCE[name]
    stream = ESC + b"@" + command + b"VAT 21%\n" + CUT
    parser = EscPosParser()
    result = parser.feed(stream)
    want = [2] if name in CUT_NAMES else []
    assert result.cuts == [*want, len(stream) - 3], name
    assert result.unsure_cuts == []
    assert parser.stats.unknown == 0
    assert parser.between_commands


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_every_reference_command_byte_by_byte(name: str) -> None:
    stream = ESC + b"@" + REFERENCE[name] + b"VAT\n" + CUT
    parser = EscPosParser()
    cuts = [c for b in stream for c in parser.feed(bytes([b])).cuts]
    assert cuts == parse(stream).cuts


def test_the_table_holds_every_reference_command() -> None:
    """Each command written out above is a key of the table, and the table has no other."""
    keys = {REFERENCE[name][:2] for name in REFERENCE}
    assert keys == set(COMMANDS)
    assert {REFERENCE[name][:2] for name in CUT_NAMES} == CUTS


@pytest.mark.parametrize(
    "unknown",
    [ESC + b"\x7f", GS + b"\x01", FS + b"z", GS + b"V\x07", DLE + b"\x14\x09", GS + b"k\x20"],
)
def test_unknown_command_makes_cuts_unsure_until_initialise(unknown: bytes) -> None:
    """After an unknown command no cut is trusted (nothing is injected) until ESC @."""
    stream = ESC + b"@" + unknown + b"\x1dVAT\n" + CUT + ESC + b"@receipt 2\n" + CUT
    parser = EscPosParser()
    result = parser.feed(stream)
    assert result.cuts == [len(stream) - 3]
    assert result.unsure_cuts
    assert parser.stats.unknown == 1


def test_dle_alone_is_a_data_byte() -> None:
    result = parse(b"a\x10b" + CUT)
    assert result.cuts == [3]
    assert result.unsure_cuts == []
