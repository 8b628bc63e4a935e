"""Card reader wire formats: vectors, resync, chunking, bounded memory.

Frames are built both by hand and with the simulator's independent encoders, so a bug
shared by the decoder and the simulator would have to be made twice.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.serial_cards.frames import (
    SCANNER_MAX_LINE,
    TRACK1_MAX,
    TRACK2_MAX,
    Card,
    MagstripeDecoder,
    Rdm6300Decoder,
    Rejected,
    Result,
    ScannerDecoder,
    decoder_for,
    gtin_check_ok,
)
from gateway.identity.pseudonyms import Keyring
from simulators.devices.card_reader import ean_check_digit, rdm6300_frame, scanner_line, track2

PROTOCOLS = ("rdm6300", "scanner", "magstripe")
TAG = "0102030405"
MAX_BUFFERED = max(12, SCANNER_MAX_LINE, TRACK2_MAX, TRACK1_MAX)


def _vector(vectors: dict[str, Any], namespace: str, canonical: str) -> dict[str, Any]:
    for case in vectors["pseudonyms"]:
        if case["namespace"] == namespace and case["canonical"] == canonical:
            found: dict[str, Any] = case
            return found
    raise AssertionError(f"no contract vector for {namespace}")


# --- RDM6300 --------------------------------------------------------------------------


def test_rdm6300_contract_vector(vectors: dict[str, Any], keyring: Keyring) -> None:
    case = _vector(vectors, "rfid", "13005D1DA5")
    frame = b"\x02" + case["input"].encode() + b"F6\x03"  # lower-case hex as in the vector
    assert frame.upper() == rdm6300_frame(case["input"])
    [card] = Rdm6300Decoder().feed(frame)
    assert card == Card("rfid", "13005D1DA5")
    assert isinstance(card, Card)
    assert keyring.pseudonym(card.namespace, card.value) == case["pseudonym"]


def test_card_repr_hides_the_raw_value() -> None:
    assert "13005D1DA5" not in repr(Card("rfid", "13005D1DA5"))


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b"\x0213005D1DA5F7\x03", [Rejected("bad_checksum")]),
        (b"\x0213005D1DAZF6\x03", [Rejected("bad_hex")]),
        (b"\x0213005D\x03", [Rejected("partial")]),
        (b"\x02" + b"0" * 20 + b"\x03", [Rejected("too_long")]),
        (b"\x0213005D" + rdm6300_frame(TAG), [Rejected("partial"), Card("rfid", TAG)]),
        (b"hello\x03\xff" + rdm6300_frame(TAG), [Rejected("garbage"), Card("rfid", TAG)]),
        (rdm6300_frame("0102030405") + b"\r\n", [Card("rfid", "0102030405"), Rejected("garbage")]),
    ],
)
def test_rdm6300_rejections_and_resync(stream: bytes, expected: list[Result]) -> None:
    assert Rdm6300Decoder().feed(stream) == expected


def test_rdm6300_flush_counts_an_incomplete_frame() -> None:
    dec = Rdm6300Decoder()
    assert dec.feed(b"\x0213005") == []
    assert dec.pending
    assert dec.flush() == [Rejected("partial")]
    assert not dec.pending
    assert dec.feed(rdm6300_frame("13005D1DA5")) == [Card("rfid", "13005D1DA5")]


# --- scanners -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("digits", "ok"),
    [
        ("4006381333931", True),
        ("4006381333932", False),
        ("5901234123457", True),
        ("0000000000000", True),
        ("96385074", True),  # EAN-8
        ("96385075", False),
        ("40063813339a1", False),
        ("7", False),
    ],
)
def test_gtin_check_digit(digits: str, ok: bool) -> None:
    assert gtin_check_ok(digits) is ok
    if ok:
        assert ean_check_digit(digits[:-1]) == digits[-1]  # the simulator agrees


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"]E04006381333931\r\n", Card("loyalty", "4006381333931")),
        (b"]E04006381333932\r\n", Rejected("bad_check_digit")),
        (b"]E0400638133393\r\n", Rejected("bad_format")),
        (b"]E496385074\n", Card("loyalty", "96385074")),
        (b"4006381333931\r", Card("loyalty", "4006381333931")),
        (b"4006381333932\r", Rejected("bad_check_digit")),  # bare 13 digits: EAN-13 rules
        (b"]C1123456789\n", Card("loyalty", "123456789")),
        (b"]Q1 12345678 \r\n", Card("loyalty", "12345678")),
        (b"]\r\n", Rejected("bad_symbology")),
        (b"]11234\r\n", Rejected("bad_symbology")),
        (b"]C1\r\n", Rejected("bad_format")),
        (b"1234\x015678\r\n", Rejected("garbage")),
        (b"\xc3\xa91234\n", Rejected("garbage")),
    ],
)
def test_scanner_lines(line: bytes, expected: Result) -> None:
    assert ScannerDecoder().feed(line) == [expected]


def test_scanner_contract_vector(vectors: dict[str, Any], keyring: Keyring) -> None:
    case = _vector(vectors, "loyalty", "2600123456789")
    [card] = ScannerDecoder().feed(scanner_line(case["input"], aim="]C1"))
    assert isinstance(card, Card)
    assert keyring.pseudonym(card.namespace, card.value) == case["pseudonym"]


def test_scanner_bare_ean13_check_can_be_switched_off() -> None:
    line = b"0001234567890\r\n"  # a contract loyalty number that is not a valid EAN-13
    assert ScannerDecoder().feed(line) == [Rejected("bad_check_digit")]
    assert ScannerDecoder(check_bare_ean13=False).feed(line) == [Card("loyalty", "0001234567890")]


def test_scanner_terminators_and_overlong_lines() -> None:
    dec = ScannerDecoder()
    out = dec.feed(b"]C111111111\r\n]C122222222\r]C133333333\n\r\n\n")
    assert out == [Card("loyalty", v) for v in ("11111111", "22222222", "33333333")]
    out = dec.feed(b"9" * (SCANNER_MAX_LINE * 10))
    assert out == [Rejected("too_long")]
    assert dec.buffered == 0
    assert dec.feed(b"still junk\r\n]C144444444\r\n") == [Card("loyalty", "44444444")]


# --- magstripe ------------------------------------------------------------------------


def test_magstripe_contract_vector(vectors: dict[str, Any], keyring: Keyring) -> None:
    case = _vector(vectors, "loyalty", "0001234567890")
    for frame in (track2(case["input"]), track2(case["input"], lrc=False)):
        [card] = MagstripeDecoder().feed(frame + b"\r\n")
        assert isinstance(card, Card)
        assert keyring.pseudonym(card.namespace, card.value) == case["pseudonym"]


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b";12345678?", [Card("loyalty", "12345678")]),
        (b"%B1234^DOE/J^49?;12345678=49?\r", [Card("loyalty", "12345678")]),
        (b";1234:5678=49?", [Rejected("bad_format")]),
        (b";=49?", [Rejected("bad_format")]),
        (b";1234\r;12345678?", [Rejected("partial"), Card("loyalty", "12345678")]),
        (b";1234;12345678?", [Rejected("partial"), Card("loyalty", "12345678")]),
        (b"xyz\x00;12345678?", [Rejected("garbage"), Card("loyalty", "12345678")]),
        (b";" + b"1" * 60 + b"?;12345678?", [Rejected("too_long"), Card("loyalty", "12345678")]),
        (b";12A4?\r;12345678?", [Rejected("garbage"), Card("loyalty", "12345678")]),
    ],
)
def test_magstripe_streams(stream: bytes, expected: list[Result]) -> None:
    assert MagstripeDecoder().feed(stream) == expected


def test_magstripe_lrc_is_swallowed_between_back_to_back_swipes() -> None:
    stream = b"".join(track2(pan) for pan in ("11111111", "22222222", "33333333"))
    out = MagstripeDecoder().feed(stream)
    assert out == [Card("loyalty", v) for v in ("11111111", "22222222", "33333333")]


def test_unknown_protocol() -> None:
    with pytest.raises(ValueError, match="unknown card reader protocol"):
        decoder_for("telepathy")


# --- properties -----------------------------------------------------------------------

_tags = st.binary(min_size=5, max_size=5).map(lambda b: b.hex())
_digits = st.text("0123456789", min_size=8, max_size=19)
_good_frames: dict[str, st.SearchStrategy[bytes]] = {
    "rdm6300": _tags.map(rdm6300_frame),
    "scanner": _digits.map(lambda d: scanner_line(d, aim="]C1")),
    "magstripe": st.tuples(_digits, st.booleans()).map(lambda t: track2(t[0], lrc=t[1])),
}


@st.composite
def _streams(draw: st.DrawFn, protocol: str) -> tuple[bytes, list[int]]:
    parts = draw(st.lists(st.one_of(_good_frames[protocol], st.binary(max_size=40)), max_size=12))
    stream = b"".join(parts)
    cuts = sorted(draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    return stream, cuts


@pytest.mark.parametrize("protocol", PROTOCOLS)
@given(data=st.data())
@settings(max_examples=150, deadline=None)
def test_any_chunking_gives_the_same_results(protocol: str, data: st.DataObject) -> None:
    stream, cuts = data.draw(_streams(protocol))
    whole = decoder_for(protocol).feed(stream)
    dec = decoder_for(protocol)
    pieces: list[Result] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        pieces += dec.feed(stream[start:end])
    assert pieces == whole


@pytest.mark.parametrize("protocol", PROTOCOLS)
@given(chunks=st.lists(st.binary(max_size=300), max_size=30))
@settings(max_examples=150, deadline=None)
def test_any_bytes_never_raise_and_memory_stays_bounded(protocol: str, chunks: list[bytes]) -> None:
    dec = decoder_for(protocol)
    for chunk in chunks:
        for result in dec.feed(chunk):
            assert isinstance(result, Card | Rejected)
        assert dec.buffered <= MAX_BUFFERED
    assert all(isinstance(r, Rejected) for r in dec.flush())
    assert not dec.pending


_resync = {"rdm6300": b"", "scanner": b"\r\n", "magstripe": b"\r\n"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@given(junk=st.binary(max_size=400), data=st.data())
@settings(max_examples=150, deadline=None)
def test_a_good_frame_after_any_junk_is_read(
    protocol: str, junk: bytes, data: st.DataObject
) -> None:
    frame = data.draw(_good_frames[protocol])
    dec = decoder_for(protocol)
    out = dec.feed(junk + _resync[protocol] + frame)
    assert isinstance(out[-1], Card)
    assert dec.feed(frame)[-1] == out[-1]


def test_debouncer_forget_makes_the_next_sighting_new() -> None:
    from drivers.serial_cards.source import Debouncer

    d = Debouncer(window_s=1.0)
    assert d.is_new("k1:a", 0.0)
    assert not d.is_new("k1:a", 0.5)
    d.forget("k1:a")
    assert d.is_new("k1:a", 0.6)
