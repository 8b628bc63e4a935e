"""Serial card readers: streams of real frames, broken frames and junk, then mutated.

Each stream is checked by ``targets.run_card``: whole and chunked feeding agree, the
buffer never exceeds one frame, flush leaves the decoder idle, every result is a counted
rejection or a card that canonicalises (or is rejected) in its namespace.  Then a 1 MB
hostile stream per protocol (unterminated frames, endless Track 1, start bytes without
end) must stay within a fixed tracemalloc peak and per-feed buffer cap.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.serial_cards.frames import decoder_for
from simulators.devices.card_reader import bad_frame, ean_check_digit, encode
from tests.fuzz.memory import PEAK_CAP, TIME_CAP_S, chunks, measure
from tests.fuzz.support import bounded, fuzz_settings, mutated
from tests.fuzz.targets import CARD_CAPS, run_card

PROTOCOLS = ("rdm6300", "scanner", "magstripe")
_digits = st.text("0123456789", min_size=8, max_size=19)
_cards = {
    "rdm6300": st.binary(min_size=5, max_size=5).map(lambda b: b.hex().upper()),
    "scanner": st.one_of(
        _digits,
        st.text("0123456789", min_size=12, max_size=12).map(lambda d: d + ean_check_digit(d)),
    ),
    "magstripe": _digits,
}


@st.composite
def _frames(draw: st.DrawFn, protocol: str) -> bytes:
    card = draw(_cards[protocol])
    kind = draw(st.sampled_from(("good", "good", "bad", "junk", "terminator")))
    if kind == "bad" and (protocol != "scanner" or len(card) >= 12):
        return bad_frame(card, protocol)
    if kind == "junk":
        return draw(st.binary(max_size=40))
    if kind == "terminator":
        return draw(st.sampled_from([b"\r", b"\n", b"\r\n", b"\x02", b"\x03", b";", b"%", b"?"]))
    if protocol == "scanner":
        aim = draw(st.sampled_from(["", "]E0", "]C1", "]Q3", "]"]))
        term = draw(st.sampled_from(["cr", "lf", "crlf"]))
        return encode(card, protocol, aim=aim, terminator=term)
    return encode(card, protocol, lrc=draw(st.booleans()))


@pytest.mark.parametrize("protocol", PROTOCOLS)
@fuzz_settings()
@given(data=st.data())
def test_mutated_reader_streams_keep_the_contract(protocol: str, data: st.DataObject) -> None:
    stream = b"".join(data.draw(st.lists(_frames(protocol), min_size=1, max_size=10)))
    bounded(run_card, protocol, data.draw(mutated([stream])))


_HOSTILE = {
    "rdm6300": [b"\x02" + b"0123456789AB" * 40, b"\x02", b"\x02\x02\x03", b"\x03junk"],
    "scanner": [b"]E0" + b"4" * 997, b"\xff" * 64, b"]\r]E\n", b"x" * 129 + b"\r"],
    "magstripe": [b";" + b"1" * 64, b"%" + b"B" * 90, b";=?;", b";1?\x31" * 8, b"\r\n;\r"],
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_one_megabyte_of_hostile_bytes_stays_bounded(protocol: str) -> None:
    dec = decoder_for(protocol)
    cap = CARD_CAPS[protocol]

    def buffer_is_capped() -> None:
        assert dec.buffered <= cap, dec.buffered

    peak, elapsed = measure(dec.feed, chunks(_HOSTILE[protocol]), buffer_is_capped)
    assert peak <= PEAK_CAP, f"{protocol}: tracemalloc peak {peak} bytes over a 1 MB stream"
    assert elapsed <= TIME_CAP_S
    dec.flush()
    assert dec.buffered == 0 and not dec.pending
