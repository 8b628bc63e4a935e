"""``touchpoint-gateway bench qr``: QR decoders on one generated corpus, same run.

The corpus is rendered in code with a fixed seed (``simulators.camera.render_frame``):
phones showing a signed app token (~250 bytes, a version 13 code) at 640x480 and
1280x720, in difficulty classes

    empty         no code at all (what a kiosk camera sees most of the time)
    upright       within +-5 degrees, sharp-ish, good contrast
    rotated       any angle, up to 25 % perspective tilt
    low_contrast  grey on grey (contrast 0.12-0.3) with sensor noise
    glare_blur    a bright spot over the screen and a defocus of 1-2 px

Every decoder decodes every frame once, whole (no ROI, no downscale); frames/s is
frames over decode time.  OpenCV's QRCodeDetector runs as the reference.  The goal
for the default decoder: >= 120 frames/s at 1280x720 on frames with a code, >= 98 %
on upright and rotated, >= 90 % on low contrast.

    from gateway.bench_qr import bench_qr, print_qr
    figures = bench_qr(quick=True); print_qr(figures)
"""

from __future__ import annotations

import time
from typing import Any

GOAL_FPS = 120.0
GOAL_UPRIGHT_ROTATED = 0.98
GOAL_LOW_CONTRAST = 0.90
SIZES = ((640, 480), (1280, 720))
CLASSES = ("empty", "upright", "rotated", "low_contrast", "glare_blur")
REFERENCE = "opencv"
SEED = 20240917

Corpus = dict[str, list[tuple[bytes | None, Any]]]


def corpus(width: int, height: int, per_class: int, seed: int = SEED) -> Corpus:
    """``per_class`` grey frames per difficulty class, with the payload each one shows."""
    import numpy as np
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
    )

    from simulators.camera import Look, qr_matrix, render_frame

    rng = np.random.default_rng([seed, width, height])
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    modules = qr_matrix(_token(key, 0)).shape[0]
    top = max(3.2, min(6.0, 0.75 * min(width, height) / (modules * 1.42)))

    def look(cls: str) -> Look:
        base = {
            "module_px": rng.uniform(3.0, top),
            "x": rng.uniform(0.4, 0.6),
            "y": rng.uniform(0.45, 0.55),
            "noise": rng.uniform(1.0, 3.0),
            "blur": rng.uniform(0.3, 0.7),
        }
        if cls == "upright":
            return Look(angle=rng.uniform(-5, 5), **base)
        if cls == "rotated":
            return Look(angle=rng.uniform(-180, 180), tilt=rng.uniform(0, 0.25), **base)
        if cls == "low_contrast":
            base["noise"] = rng.uniform(3.0, 6.0)
            return Look(angle=rng.uniform(-30, 30), contrast=rng.uniform(0.12, 0.3), **base)
        base["blur"] = rng.uniform(1.0, 2.0)
        return Look(angle=rng.uniform(-30, 30), glare=rng.uniform(0.3, 0.7), **base)

    out: Corpus = {}
    for cls in CLASSES:
        frames: list[tuple[bytes | None, Any]] = []
        for i in range(per_class):
            payload = None if cls == "empty" else _token(key, i)
            frames.append((payload, render_frame(width, height, payload, look(cls), rng)))
        out[cls] = frames
    return out


def _token(key: Any, i: int) -> bytes:
    from simulators.camera import sign_app_token

    iat = 1_795_000_000 + i
    return sign_app_token(key, f"app-user-{i:06d}", iat, iat + 300, f"nonce-{i:08d}",
                          ["analytics", "linking"]).encode("ascii")  # fmt: skip


def _measure(decoder: Any, frames: list[tuple[bytes | None, Any]]) -> tuple[float, int, float]:
    """(seconds, successes, frames) for one decoder over frames of one class."""
    ok = 0
    spent = 0.0
    for payload, frame in frames:
        start = time.perf_counter()
        found = decoder.decode(frame)
        spent += time.perf_counter() - start
        ok += (not found) if payload is None else (payload in found)
    return spent, ok, float(len(frames))


def bench_qr(
    quick: bool = False,
    decoders: tuple[str, ...] | None = None,
    per_class: int | None = None,
) -> dict[str, Any]:
    """Decode the corpus with every decoder; figures per decoder, size and class.

    ``quick``: 10 frames per class and size (about 20 s on a 2-core box), else 50;
    ``per_class`` overrides both.  ``decoders``: a subset of DECODERS (default: all).
    """
    from drivers.qr_decoders import DECODERS, DEFAULT_DECODER, make_decoder

    names = decoders or DECODERS
    per_class = per_class or (10 if quick else 50)
    per_decoder: dict[str, Any] = {}
    pooled: dict[str, dict[str, list[float]]] = {n: {} for n in names}
    for width, height in SIZES:
        frames = corpus(width, height, per_class)
        size = f"{width}x{height}"
        for name in names:
            dec = make_decoder(name)
            row: dict[str, Any] = {"success": {}}
            code_s = code_n = 0.0
            for cls in CLASSES:
                spent, ok, n = _measure(dec, frames[cls])
                row["success"][cls] = round(ok / n, 4)
                acc = pooled[name].setdefault(cls, [0.0, 0.0])
                acc[0] += ok
                acc[1] += n
                if cls == "empty":
                    row["fps_empty"] = round(n / spent, 1)
                else:
                    code_s, code_n = code_s + spent, code_n + n
            row["fps_code"] = round(code_n / code_s, 1)
            per_decoder.setdefault(name, {})[size] = row
    success = {
        name: {cls: round(ok / n, 4) for cls, (ok, n) in classes.items()}
        for name, classes in pooled.items()
    }
    default = DEFAULT_DECODER if DEFAULT_DECODER in names else names[0]
    d720 = per_decoder[default]["1280x720"]
    figures: dict[str, Any] = {
        "default_decoder": default,
        "reference_decoder": REFERENCE,
        "frames_per_class": per_class,
        "fps_1280x720": d720["fps_code"],
        "fps_1280x720_empty": d720["fps_empty"],
        "success_upright": success[default]["upright"],
        "success_rotated": success[default]["rotated"],
        "success_low_contrast": success[default]["low_contrast"],
        "success_glare_blur": success[default]["glare_blur"],
        "decoders": per_decoder,
        "success": success,
    }
    figures["goal_met"] = (
        figures["fps_1280x720"] >= GOAL_FPS
        and min(figures["success_upright"], figures["success_rotated"]) >= GOAL_UPRIGHT_ROTATED
        and figures["success_low_contrast"] >= GOAL_LOW_CONTRAST
    )
    return figures


def print_qr(figures: dict[str, Any]) -> None:
    """The figures as a table: frames/s per decoder and size, then success per class."""
    print(f"QR decoders, {figures['frames_per_class']} frames per class and size")
    print(f"{'decoder':<14}{'size':>10}{'fps empty':>11}{'fps code':>10}  success by class")
    for name, sizes in figures["decoders"].items():
        label = name + (" (ref)" if name == figures["reference_decoder"] else "")
        for size, row in sizes.items():
            rates = " ".join(f"{c}={v:.0%}" for c, v in row["success"].items())
            fps = f"{row['fps_empty']:>11.1f}{row['fps_code']:>10.1f}"
            print(f"{label:<14}{size:>10}{fps}  {rates}")
    print(
        f"default {figures['default_decoder']}: {figures['fps_1280x720']:.0f} fps at 1280x720, "
        f"upright {figures['success_upright']:.1%}, rotated {figures['success_rotated']:.1%}, "
        f"low contrast {figures['success_low_contrast']:.1%} "
        f"(goal >= {GOAL_FPS:.0f} fps, {GOAL_UPRIGHT_ROTATED:.0%}, {GOAL_LOW_CONTRAST:.0%}: "
        f"{'met' if figures['goal_met'] else 'NOT met'})"
    )
