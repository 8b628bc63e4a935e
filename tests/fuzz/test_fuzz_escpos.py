"""ESC/POS: print jobs assembled from real commands, with lengths that lie, then mutated.

``targets.run_escpos`` checks each job: whole and chunked parsing agree (with the default
QR cap and a 16-byte one), pending headers stay under MAX_HEADER, the QR collector under
its cap, cut offsets inside the stream and increasing.  Then 1 MB hostile jobs (maximal
QR after QR, 2 GiB image declarations, endless header fragments fed byte by byte) must
stay within a fixed tracemalloc peak.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from drivers.receipt_tap.escpos import DEFAULT_MAX_QR_BYTES, MAX_HEADER, EscPosParser, qr_native
from simulators.devices import till
from tests.fuzz.memory import PEAK_CAP, TIME_CAP_S, chunks, measure
from tests.fuzz.support import bounded, fuzz_settings, mutated
from tests.fuzz.targets import run_escpos

_u16 = st.sampled_from([0, 1, 2, 3, 4, 255, 256, 7089, 7092, 0xFFFF]) | st.integers(0, 0xFFFF)


def _le(n: int) -> bytes:
    return n.to_bytes(2, "little")


_pieces = st.one_of(
    st.builds(till.text, st.text(max_size=30)),
    st.just(till.init()),
    st.just(till.cut()),
    st.builds(till.qr, st.binary(max_size=60)),
    st.builds(qr_native, st.binary(max_size=60)),
    st.builds(lambda w, h, d: till.logo(w, h, data=d), st.integers(1, 4), st.integers(1, 8),
              st.binary(min_size=1, max_size=8)),
    st.builds(till.column_image, st.integers(0, 20), st.binary(min_size=1, max_size=8)),
    # lying or edge-case length fields: GS ( k, GS ( L, GS 8 L, GS v 0, ESC *, GS k, ESC &, FS q
    st.builds(lambda n, b: b"\x1d(k" + _le(n) + b"\x31\x50\x30" + b, _u16, st.binary(max_size=20)),
    st.builds(lambda n, b: b"\x1d(L" + _le(n) + b, _u16, st.binary(max_size=20)),
    st.builds(lambda b: b"\x1d8L" + b, st.binary(min_size=4, max_size=8)),
    st.builds(lambda x, y: b"\x1dv0\x00" + _le(x) + _le(y), _u16, _u16),
    st.builds(lambda m, n: b"\x1b*" + bytes([m]) + _le(n), st.integers(0, 255), _u16),
    st.builds(lambda m, b: b"\x1dk" + bytes([m]) + b, st.integers(0, 255), st.binary(max_size=12)),
    st.builds(lambda y, c1, c2: b"\x1b&" + bytes([y, c1, c2]), st.integers(0, 255),
              st.integers(0, 255), st.integers(0, 255)),
    st.builds(lambda n, b: b"\x1cq" + bytes([n]) + b, st.integers(0, 255), st.binary(max_size=12)),
    st.builds(lambda b: b"\x1bD" + b, st.binary(max_size=40)),
    st.sampled_from([b"\x1b", b"\x1d", b"\x1c", b"\x10", b"\x1dV", b"\x1di", b"\x10\x04"]),
    st.builds(till.hostile, st.integers(0, 3)).map(lambda b: b[:400]),
)  # fmt: skip


@fuzz_settings()
@given(data=st.data())
def test_mutated_print_jobs_keep_the_contract(data: st.DataObject) -> None:
    job = b"".join(data.draw(st.lists(_pieces, min_size=1, max_size=12)))
    bounded(run_escpos, data.draw(mutated([job])))


_MAX_QR = b"\x1d(k" + _le(DEFAULT_MAX_QR_BYTES + 3) + b"\x31\x50\x30" + b"Q" * DEFAULT_MAX_QR_BYTES
_HOSTILE = {
    "max-qr-after-max-qr": ([_MAX_QR], 4096),
    "oversize-qr-and-huge-images": (
        [b"\x1d(k\xff\xff\x31\x50\x30", b"\x1d8L\xff\xff\xff\x7f", b"\x1dv0\x00\xff\xff\xff\xff"],
        4096,
    ),
    "header-fragments-byte-by-byte": ([b"\x1d(k\x05", b"\x1b&\xff\x00\xff\x01", b"\x1cq\xff"], 1),
    "nul-runs-and-tabs": ([b"\x1dk\x00" + b"1" * 300, b"\x1bD" + b"\x01" * 40], 4096),
}


@pytest.mark.parametrize("name", sorted(_HOSTILE))
def test_one_megabyte_hostile_job_stays_bounded(name: str) -> None:
    patterns, size = _HOSTILE[name]
    total = (1 << 20) if size > 1 else (1 << 15)  # byte-by-byte: 32 Ki calls
    parser = EscPosParser()

    def state_is_capped() -> None:
        assert parser.pending <= MAX_HEADER
        collecting = parser._collect
        assert collecting is None or len(collecting) <= DEFAULT_MAX_QR_BYTES

    peak, elapsed = measure(parser.feed, chunks(patterns, total, size), state_is_capped)
    assert peak <= PEAK_CAP, f"{name}: tracemalloc peak {peak} bytes"
    assert elapsed <= TIME_CAP_S
    assert parser.offset == total
