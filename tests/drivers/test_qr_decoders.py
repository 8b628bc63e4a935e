"""One contract suite over every QR decoder, frame preparation, and the benchmark corpus."""

from __future__ import annotations

import numpy as np
import pytest

from drivers.camera.decoders import (
    DECODERS,
    DEFAULT_DECODER,
    EDGE_PAD_PX,
    DecoderUnavailable,
    QrDecoder,
    make_decoder,
    prepare,
    roi_box,
    scale_for,
)
from gateway.errors import SourceError
from simulators.devices.camera import Look, hostile_payload, qr_matrix, render_frame
from tests.bench.goals import emulated
from tests.bench.qr import CLASSES, bench_qr, corpus

PAYLOAD = b"TPA1.eyJzdWIiOiJhcHAtdXNlci0xIn0.c2lnbmF0dXJlLXBsYWNlaG9sZGVyLXh4eHh4eHh4eHh4eA"


@pytest.fixture(params=DECODERS)
def decoder(request: pytest.FixtureRequest) -> QrDecoder:
    return make_decoder(request.param)


def _frame(payload: bytes | None, look: Look, seed: int = 1) -> np.ndarray:
    return render_frame(640, 480, payload, look, np.random.default_rng(seed))


def test_decodes_an_upright_code(decoder: QrDecoder) -> None:
    assert decoder.decode(_frame(PAYLOAD, Look(module_px=5))) == [PAYLOAD]


def test_empty_frame_has_no_codes(decoder: QrDecoder) -> None:
    assert decoder.decode(_frame(None, Look(noise=3))) == []


def test_flat_and_tiny_images_do_not_raise(decoder: QrDecoder) -> None:
    assert decoder.decode(np.zeros((480, 640), np.uint8)) == []
    assert decoder.decode(np.full((8, 8), 255, np.uint8)) == []


@pytest.mark.parametrize("variant", ["huge", "binary", "invalid_utf8"])
def test_hostile_payloads_are_survived(decoder: QrDecoder, variant: str) -> None:
    payload = hostile_payload(variant, np.random.default_rng(9))
    found = decoder.decode(_frame(payload, Look(module_px=3 if variant == "huge" else 4)))
    assert all(isinstance(p, bytes) for p in found)
    if decoder.name == "zxing":
        assert found == [payload], "zxing returns the exact bytes"


def test_two_codes_in_one_frame() -> None:
    rng = np.random.default_rng(4)
    left = render_frame(640, 480, b"LEFT-CODE", Look(module_px=5, x=0.25), rng)
    right = render_frame(640, 480, b"RIGHT-CODE", Look(module_px=5, x=0.75), rng)
    frame = np.concatenate([left[:, :320], right[:, 320:]], axis=1)
    assert sorted(make_decoder(DEFAULT_DECODER).decode(frame)) == [b"LEFT-CODE", b"RIGHT-CODE"]


def test_scale_keeps_the_smallest_module_at_three_pixels() -> None:
    assert scale_for(3.0) == 1.0
    assert scale_for(2.0) == 1.0, "never upscale"
    assert scale_for(6.0) == 0.5
    with pytest.raises(ValueError, match="min_module_px"):
        scale_for(0)


def test_prepare_greys_crops_and_downscales() -> None:
    grey = _frame(PAYLOAD, Look(module_px=6, x=0.3))
    bgr = np.repeat(grey[:, :, None], 3, axis=2)
    small = prepare(bgr, (0.0, 0.0, 0.6, 1.0), scale_for(6.0))
    assert small.shape == (240 + 2 * EDGE_PAD_PX, 192 + 2 * EDGE_PAD_PX)
    assert small.dtype == np.uint8
    assert make_decoder(DEFAULT_DECODER).decode(small) == [PAYLOAD], "modules still 3 px"
    outside = prepare(bgr, (0.6, 0.0, 0.4, 1.0))
    assert make_decoder(DEFAULT_DECODER).decode(outside) == [], "the code is outside the ROI"


def edge_frame(side: str, module_px: int, off: int) -> np.ndarray:
    """A frame whose code's first dark module starts ``off`` px from the ``side`` edge
    (negative: partly outside), the phone's screen and bezel cut off by the frame."""
    width, height = 1280, 720
    n = qr_matrix(PAYLOAD).shape[0]  # with its 4-module quiet zone
    code = n * module_px
    pad = code // 8
    bezel = pad // 2 + 2
    phone_w, phone_h = code + 2 * pad + 2 * bezel, code + 2 * pad + 6 * bezel
    dark_x, dark_y = bezel + pad + 4 * module_px, 3 * bezel + pad + 4 * module_px
    x, y = 0.5, 0.5
    if side == "left":
        x = (off - dark_x + phone_w / 2) / width
    elif side == "right":
        x = (width - off + dark_x - phone_w / 2) / width
    elif side == "top":
        y = (off - dark_y + phone_h / 2) / height
    else:
        y = (height - off + dark_y - phone_h / 2) / height
    look = Look(module_px=module_px, x=x, y=y)
    return render_frame(width, height, PAYLOAD, look, np.random.default_rng(1))


@pytest.mark.parametrize("side", ["left", "right", "top", "bottom"])
@pytest.mark.parametrize(("module_px", "off"), [(3, -2), (4, -3), (4, -2), (6, -4), (0, 0)])
def test_a_code_touching_the_frame_edge_is_read(side: str, module_px: int, off: int) -> None:
    """The code's edge modules are cut by the frame: no quiet zone on that side."""
    module_px = module_px or 5
    frame = edge_frame(side, module_px, off)
    assert make_decoder(DEFAULT_DECODER).decode(prepare(frame)) == [PAYLOAD]


def test_roi_box() -> None:
    assert roi_box((480, 640), (0.25, 0.5, 0.5, 0.5)) == (160, 240, 480, 480)
    with pytest.raises(ValueError, match="empty"):
        roi_box((480, 640), (0.999, 0.0, 0.0001, 1.0))


def test_unknown_decoder_is_a_source_error() -> None:
    with pytest.raises(DecoderUnavailable, match="known: zxing") as info:
        make_decoder("tesseract")
    assert isinstance(info.value, SourceError)


def test_corpus_is_deterministic() -> None:
    a, b = corpus(640, 480, 2), corpus(640, 480, 2)
    assert list(a) == list(CLASSES)
    for cls in CLASSES:
        for (pa, fa), (pb, fb) in zip(a[cls], b[cls], strict=True):
            assert pa == pb and np.array_equal(fa, fb)


def test_success_rate_per_decoder_and_class() -> None:
    """A small corpus; the default decoder meets the issue's success goals on it."""
    frames = corpus(640, 480, 6)
    rates: dict[str, dict[str, float]] = {}
    for name in DECODERS:
        dec = make_decoder(name)
        for cls in ("upright", "rotated", "low_contrast"):
            ok = sum(p in dec.decode(f) for p, f in frames[cls])
            rates.setdefault(name, {})[cls] = ok / len(frames[cls])
    print(rates)
    assert rates[DEFAULT_DECODER] == {"upright": 1.0, "rotated": 1.0, "low_contrast": 1.0}
    assert rates["pyzbar"]["upright"] == 1.0


def test_bench_figures_have_the_json_keys() -> None:
    figures = bench_qr(quick=True, decoders=(DEFAULT_DECODER,), per_class=2)
    for key in ("fps_1280x720", "success_upright", "success_rotated", "success_low_contrast"):
        assert isinstance(figures[key], float)
    assert figures["default_decoder"] == DEFAULT_DECODER
    assert 0.0 <= figures["success_low_contrast"] <= 1.0
    assert set(figures["decoders"][DEFAULT_DECODER]) == {"640x480", "1280x720"}


@pytest.mark.slow
@pytest.mark.timeout(1800 if emulated() else 300)  # every decoder's frames under qemu-user
def test_bench_quick_all_decoders_and_goal(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.bench.qr import print_qr

    figures = bench_qr(quick=True)
    print_qr(figures)
    out = capsys.readouterr().out
    assert "opencv (ref)" in out and "pyzbar" in out
    if emulated():  # frames/s under qemu say nothing of the code; success rates still do
        assert figures["goal_met"] is None, out
        assert "not judged (emulated))" in out
    else:
        assert figures["goal_met"] is True, out


def test_bench_under_emulation_prints_figures_and_leaves_the_speed_goal_unjudged(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.bench.qr import print_qr

    monkeypatch.setenv("TOUCHPOINT_EMULATED", "1")
    figures = bench_qr(quick=True, decoders=(DEFAULT_DECODER,), per_class=2, tap=False)
    print_qr(figures)
    out = capsys.readouterr().out
    assert figures["emulated"] is True and figures["fps_1280x720"] > 0
    assert figures["success_upright"] == 1.0  # still measured and judged
    assert figures["goal_met"] is None and "not judged (emulated))" in out, out
    monkeypatch.setenv("TOUCHPOINT_EMULATED", "0")
    figures = bench_qr(quick=True, decoders=(DEFAULT_DECODER,), per_class=2, tap=False)
    assert figures["emulated"] is False and figures["goal_met"] in (True, False)
