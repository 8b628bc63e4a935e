"""The incremental ESC/POS parser and the QR builders.

Streams here are written byte by byte in the tests (not with the builders under test),
so a wrong length rule in the parser cannot hide behind the same rule in a builder.
"""

from __future__ import annotations

import numpy as np
import pytest
import zxingcpp
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.receipt_tap.escpos import (
    MAX_HEADER,
    EscPosParser,
    parse,
    qr_native,
    qr_raster,
    raster_image,
)

ESC, GS, FS = b"\x1b", b"\x1d", b"\x1c"


def store_qr(data: bytes) -> bytes:
    """GS ( k pL pH 49 80 48 d1..dk, written out by hand."""
    n = len(data) + 3
    return GS + b"(k" + bytes([n & 0xFF, n >> 8, 49, 80, 48]) + data


def print_qr() -> bytes:
    return GS + b"(k\x03\x00" + bytes([49, 81, 48])


FAKE = store_qr(b"EVIL-HIDDEN") + print_qr()


def u16(n: int) -> bytes:
    return bytes([n & 0xFF, n >> 8])


def gs_v0(data: bytes, row_bytes: int) -> bytes:
    assert len(data) % row_bytes == 0
    return GS + b"v0\x00" + u16(row_bytes) + u16(len(data) // row_bytes) + data


def image_commands(payload: bytes) -> dict[str, bytes]:
    """Each image/data command, with ``payload`` padded into its declared data."""
    p8 = payload + b"\x00" * (-len(payload) % 8)
    p3 = payload + b"\x00" * (-len(payload) % 3)
    chars = payload + b"\x00" * (-len(payload) % 36)  # ESC & y=3, x=12: 36 bytes a char
    return {
        "GS v 0": gs_v0(p8, 8),
        "GS Q 0": GS + b"Q0\x00" + u16(8) + u16(len(p8) // 8) + p8,
        "GS ( L": GS + b"(L" + u16(len(payload) + 2) + b"0p" + payload,
        "GS 8 L": GS + b"8L" + (len(payload) + 2).to_bytes(4, "little") + b"0p" + payload,
        "ESC * 33": ESC + b"*\x21" + u16(len(p3) // 3) + p3,
        "ESC * 0": ESC + b"*\x00" + u16(len(payload)) + payload,
        "GS *": GS + b"*" + bytes([1, len(p8) // 8]) + p8,
        "FS q": FS + b"q\x02" + u16(1) + u16(len(p8) // 8) + p8 + u16(1) + u16(1) + bytes(8),
        "ESC &": ESC + b"&\x03\x41" + bytes([0x41 + len(chars) // 36 - 1])
        + b"".join(b"\x0c" + chars[k : k + 36] for k in range(0, len(chars), 36)),
        "GS k 73": GS + b"kI" + bytes([len(payload)]) + payload,
        "GS ( k pdf417": GS + b"(k" + u16(len(payload) + 3) + b"\x30\x50\x30" + payload,
    }  # fmt: skip


def test_builder_round_trip() -> None:
    data = b"HTTPS://R.EXAMPLE/R/AJVTCALK7WDMAAAAAAIQE3TMFVQW24ZNGAYDCTZVXEBIVXUSXBCI6"
    result = parse(b"\x1b@hello\n" + qr_native(data) + b"\x1dV\x00")
    assert result.qr == [data]
    assert result.cuts == [8 + len(qr_native(data))]


def test_hand_written_store_command() -> None:
    assert parse(b"x" + store_qr(b"\x00\x1d\x1b binary") + b"y").qr == [b"\x00\x1d\x1b binary"]
    assert parse(store_qr(b"")).qr == []


@pytest.mark.parametrize("name", sorted(image_commands(b"").keys()))
def test_qr_hidden_in_image_data_is_not_reported(name: str) -> None:
    command = image_commands(FAKE + b"\x1dV\x00" + b"\xff" * 7)[name]
    assert FAKE in command  # a naive byte scan would report it
    stream = ESC + b"@" + command + b"text\n" + store_qr(b"REAL") + b"\x1dVA\x10"
    result = parse(stream)
    assert result.qr == [b"REAL"], name
    assert result.cuts == [len(stream) - 4]


def test_fixed_parameters_are_not_commands() -> None:
    # ESC ! n with n = GS, then "(k..." as text: not a QR command
    stream = ESC + b"!" + b"\x1d" + b"(k\x06\x00\x31\x50\x30abc" + ESC + b"a\x1d" + b"V\x00"
    assert parse(stream).qr == []
    assert parse(stream).cuts == []


def test_cuts_and_their_offsets() -> None:
    stream = b"ab" + GS + b"V\x00" + b"c" + GS + b"VB\x05" + ESC + b"i" + ESC + b"m" + GS + b"V1"
    assert parse(stream).cuts == [2, 6, 10, 12, 14]


def test_lying_length_is_counted_not_buffered() -> None:
    parser = EscPosParser(max_qr_bytes=100)
    parser.feed(GS + b"8L" + (2**32 - 1).to_bytes(4, "little"))
    chunk = store_qr(b"INSIDE") * 10_000
    for _ in range(50):
        assert parser.feed(chunk).qr == []
        assert parser.pending == 0
    assert parser.stats.skipped_bytes == 50 * len(chunk)


def test_oversize_qr_is_skipped_and_parsing_resumes() -> None:
    parser = EscPosParser(max_qr_bytes=100)
    big = store_qr(b"x" * 101)
    result = parser.feed(big + store_qr(b"ok") + big[:50])
    assert result.qr == [b"ok"]
    assert parser.stats.qr_oversize == 2
    assert parser.feed(big[50:] + store_qr(b"ok2")).qr == [b"ok2"]


def test_truncated_header_is_pending() -> None:
    parser = EscPosParser()
    assert parser.feed(b"text" + GS).cuts == []
    assert parser.pending == 1
    assert parser.feed(b"V").cuts == []
    assert parser.pending == 2
    assert parser.feed(b"A").cuts == []  # GS V 65 needs n
    assert parser.feed(b"\x00").cuts == [4]
    assert parser.pending == 0


# ------------------------------------------------------------- segmentation invariance

_text = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
_piece = st.one_of(
    st.tuples(st.just("text"), _text.map(lambda t: t.encode() + b"\n")),
    st.tuples(st.just("qr"), st.binary(min_size=1, max_size=300)),
    st.tuples(
        st.just("image"),
        st.tuples(st.sampled_from(sorted(image_commands(b"").keys())), st.binary(max_size=200)),
    ),
    st.tuples(st.just("fixed"), st.tuples(st.sampled_from(b"!-EGMaJdtr"), st.integers(0, 255))),
    st.tuples(st.just("cut"), st.sampled_from([GS + b"V\x00", GS + b"VB\x03", ESC + b"i"])),
    st.tuples(st.just("status"), st.integers(1, 4).map(lambda n: b"\x10\x04" + bytes([n]))),
)


def build(pieces: list[tuple[str, object]]) -> tuple[bytes, list[bytes], list[int]]:
    """A stream and what the parser must find in it."""
    out, qrs, cuts = bytearray(), [], []
    for kind, value in pieces:
        if kind == "qr":
            assert isinstance(value, bytes)
            out += store_qr(value) + print_qr()
            qrs.append(value)
        elif kind == "image":
            name, payload = value  # type: ignore[misc]
            out += image_commands(FAKE + payload)[name]
        elif kind == "fixed":
            letter, param = value  # type: ignore[misc]
            out += ESC + bytes([letter, param])
        elif kind == "cut":
            cuts.append(len(out))
            out += value  # type: ignore[operator]
        else:
            out += value  # type: ignore[operator]
    return bytes(out), qrs, cuts


def feed_split(stream: bytes, splits: list[int]) -> tuple[list[bytes], list[int]]:
    parser = EscPosParser()
    qrs: list[bytes] = []
    cuts: list[int] = []
    last = 0
    for at in [*sorted(splits), len(stream)]:
        result = parser.feed(stream[last:at])
        qrs += result.qr
        cuts += result.cuts
        last = at
        assert parser.pending <= MAX_HEADER
    return qrs, cuts


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(_piece, max_size=25),
    splits=st.lists(st.floats(0, 1), max_size=30),
)
def test_model_and_any_segmentation(pieces: list[tuple[str, object]], splits: list[float]) -> None:
    stream, want_qr, want_cuts = build(pieces)
    cut_points = [int(f * len(stream)) for f in splits]
    assert feed_split(stream, []) == (want_qr, want_cuts)
    assert feed_split(stream, cut_points) == (want_qr, want_cuts)


@settings(max_examples=300, deadline=None)
@given(stream=st.binary(max_size=2000), splits=st.lists(st.integers(0, 2000), max_size=20))
def test_random_bytes_any_segmentation(stream: bytes, splits: list[int]) -> None:
    whole = feed_split(stream, [])
    assert feed_split(stream, [min(s, len(stream)) for s in splits]) == whole
    assert feed_split(stream, list(range(len(stream)))) == whole  # byte by byte


# ------------------------------------------------------------------------ raster builder


def decode_gs_v0(command: bytes) -> np.ndarray:
    """Turn a GS v 0 command back into a grayscale image (written independently)."""
    assert command[:4] == b"\x1dv0\x00"
    row_bytes = command[4] | command[5] << 8
    height = command[6] | command[7] << 8
    data = np.frombuffer(command[8:], dtype=np.uint8).reshape(height, row_bytes)
    bits = np.unpackbits(data, axis=1)
    return np.where(bits == 1, 0, 255).astype(np.uint8)


def test_qr_raster_decodes() -> None:
    data = b"HTTPS://R.EXAMPLE/R/AJVTCALK7WDMAAAAAAIQE3TMFVQW24ZNGAYDCTZVXEBIVXUSXBCI6"
    command = qr_raster(data, module_px=4)
    image = decode_gs_v0(command)
    found = zxingcpp.read_barcodes(image)
    assert [f.text for f in found] == [data.decode()]
    # the parser steps over it whole
    assert parse(command + store_qr(b"after")).qr == [b"after"]


def test_raster_image_bits() -> None:
    command = raster_image([[True, False] * 5, [False] * 9 + [True]])
    assert command == b"\x1dv0\x00\x02\x00\x02\x00" + bytes([0xAA, 0x80, 0x00, 0x40])
    with pytest.raises(ValueError):
        raster_image([])


def test_native_builder_limits() -> None:
    with pytest.raises(ValueError):
        qr_native(b"x", module_size=0)
    with pytest.raises(ValueError):
        qr_native(b"x" * 8000)
