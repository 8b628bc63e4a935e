"""QR decoders behind one small interface, and the frame preparation before them.

    frame (BGR or grey) ──prepare──► grey, ROI-cropped, downscaled ──QrDecoder──► payloads

    QrDecoder.decode(grey) -> list[bytes]      raw payload bytes of every QR code found

Implementations (each imports its library lazily, on first construction):

    zxing         zxing-cpp              the default: fastest, and reads low-contrast codes
    pyzbar        ZBar through pyzbar    needs libzbar0 from apt
    opencv-aruco  cv2.QRCodeDetectorAruco
    opencv        cv2.QRCodeDetector     the reference in ``python -m tests.bench qr``

``make_decoder(name)`` maps a missing library to DecoderUnavailable (a SourceError) with
what to install.  Decoders are not thread-safe: one instance per decoding thread.
Payloads are returned, never logged.

Why zxing is the default (``python -m tests.bench qr --quick``, 2-core box, same
corpus and run; frames/s on frames with a code at 640x480 / 1280x720, then success at
1280x720 on upright / rotated / low contrast / glare+blur):

    zxing         744 / 316 fps   100 / 100 / 100 / 70 %
    pyzbar         64 /  22 fps   100 /  90 /  80 / 60 %
    opencv-aruco   42 /  16 fps   100 / 100 /  90 / 30 %
    opencv (ref)   39 /  14 fps    40 /  30 /  40 /  0 %

zxing is an order of magnitude faster than the others (and ~500 fps on the empty
frames a kiosk sees most of the time, so it costs the box almost nothing), and it is
the only one that reads every dimmed, noisy screen.  pyzbar stays available (ZBar is
the most widely deployed), opencv-aruco is as accurate but 20x slower.

Downscaling: ``scale_for(min_module_px)`` is the smallest scale at which the smallest
expected QR module still covers ``MIN_MODULE_PX`` (3) pixels; frames are never upscaled.

Edges: a code held so that it touches the frame's edge has no quiet zone on that side,
and zxing-cpp misses it when part of a finder pattern's outer ring falls outside the
frame.  ``prepare`` adds ``EDGE_PAD_PX`` light pixels around every frame (a quiet zone
for such a code; nothing for the others), so every decoder reads codes at the edge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from gateway.errors import SourceError

MIN_MODULE_PX = 3.0
EDGE_PAD_PX = 8  # light border added by prepare: a quiet zone for a code at the edge
DECODERS = ("zxing", "pyzbar", "opencv-aruco", "opencv")
DEFAULT_DECODER = "zxing"

Image = NDArray[np.uint8]
Roi = tuple[float, float, float, float]
FULL_ROI: Roi = (0.0, 0.0, 1.0, 1.0)


class DecoderUnavailable(SourceError):
    """A decoder's library is missing or fails to load; install it or pick another."""


class QrDecoder(Protocol):
    """Finds QR codes in a grey image and returns their payloads as raw bytes."""

    name: str

    def decode(self, grey: Image) -> list[bytes]: ...


# --------------------------------------------------------------------- frame preparation


def scale_for(min_module_px: float) -> float:
    """The downscale factor (<= 1) that keeps a ``min_module_px`` module >= 3 px."""
    if min_module_px <= 0:
        raise ValueError("min_module_px must be > 0")
    return min(1.0, MIN_MODULE_PX / min_module_px)


def roi_box(shape: Sequence[int], roi: Roi) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1) of ``roi`` (x, y, w, h as fractions) in a frame."""
    height, width = shape[0], shape[1]
    x, y, w, h = roi
    x0, y0 = round(x * width), round(y * height)
    x1, y1 = min(width, round((x + w) * width)), min(height, round((y + h) * height))
    if x1 <= x0 or y1 <= y0:
        raise ValueError("the region of interest is empty")
    return x0, y0, x1, y1


def prepare(frame: Image, roi: Roi = FULL_ROI, scale: float = 1.0) -> Image:
    """Grey, crop to ``roi``, shrink by ``scale`` (INTER_AREA) when it is below 1, then
    add a light border of ``EDGE_PAD_PX`` (a quiet zone for a code at the edge)."""
    import cv2  # noqa: PLC0415 - OpenCV loads only with a camera source

    x0, y0, x1, y1 = roi_box(frame.shape, roi)
    crop = frame[y0:y1, x0:x1]
    if crop.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if crop.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        grey: Image = np.asarray(cv2.cvtColor(crop, code), dtype=np.uint8)
    else:
        grey = crop
    if scale < 1.0:
        size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
        grey = np.asarray(cv2.resize(grey, size, interpolation=cv2.INTER_AREA), dtype=np.uint8)
    pad = EDGE_PAD_PX
    padded = cv2.copyMakeBorder(grey, pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=255)
    return np.ascontiguousarray(padded, dtype=np.uint8)


# ------------------------------------------------------------------------------ decoders


class ZxingDecoder:
    """zxing-cpp, QR codes only, raw bytes (``Barcode.bytes``), inverted codes too."""

    name = "zxing"

    def __init__(self) -> None:
        import zxingcpp  # noqa: PLC0415

        self._read = zxingcpp.read_barcodes
        self._formats = zxingcpp.BarcodeFormats(zxingcpp.BarcodeFormat.QRCode)

    def decode(self, grey: Image) -> list[bytes]:
        found = self._read(grey, formats=self._formats, try_rotate=False, try_downscale=True)
        return [bytes(b.bytes) for b in found if b.valid]


class PyzbarDecoder:
    """ZBar through pyzbar, QR codes only.

    ZBar may transcode byte-mode payloads it takes for Latin-1 or Shift-JIS text into
    UTF-8; that changes only non-ASCII payloads, which are never tokens.
    """

    name = "pyzbar"

    def __init__(self) -> None:
        from pyzbar import pyzbar  # noqa: PLC0415

        self._decode = pyzbar.decode
        self._symbols = [pyzbar.ZBarSymbol.QRCODE]

    def decode(self, grey: Image) -> list[bytes]:
        height, width = grey.shape[:2]
        found = self._decode((grey.tobytes(), width, height), symbols=self._symbols)
        return [bytes(s.data) for s in found]


class OpencvDecoder:
    """OpenCV's QR detector (``aruco=True``: QRCodeDetectorAruco), several codes a frame.

    OpenCV returns text, not bytes: non-UTF-8 payloads come back mangled, which only
    ever makes them ``other``.
    """

    def __init__(self, aruco: bool = False) -> None:
        import cv2  # noqa: PLC0415

        self.name = "opencv-aruco" if aruco else "opencv"
        self._detector: Any = cv2.QRCodeDetectorAruco() if aruco else cv2.QRCodeDetector()

    def decode(self, grey: Image) -> list[bytes]:
        ok, texts, _points, _straight = self._detector.detectAndDecodeMulti(grey)
        if not ok:
            return []
        return [t.encode("utf-8", "surrogateescape") for t in texts if t]


_FACTORIES: dict[str, Callable[[], QrDecoder]] = {
    "zxing": ZxingDecoder,
    "pyzbar": PyzbarDecoder,
    "opencv-aruco": lambda: OpencvDecoder(aruco=True),
    "opencv": OpencvDecoder,
}


def make_decoder(name: str) -> QrDecoder:
    """A new decoder by name; DecoderUnavailable if its library cannot be loaded."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise DecoderUnavailable(
            f"unknown QR decoder {name!r}; known: {', '.join(DECODERS)}"
        ) from None
    try:
        return factory()
    except ImportError as exc:
        raise DecoderUnavailable(
            f"QR decoder {name!r} is unavailable: {exc}. Install the project's dependencies "
            "with 'make install' (pyzbar also needs libzbar0 from apt), or configure "
            f"another decoder ({', '.join(DECODERS)})."
        ) from exc
