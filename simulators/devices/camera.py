"""A fake kiosk camera: an MJPEG-over-HTTP stream on loopback that plays a scenario.

    python -m simulators.devices.camera simulators/scenarios/camera-kiosk.toml [--port N]
        [--write-video FILE] [--loops N]

The first stdout line is the stream URL (``http://127.0.0.1:PORT/stream.mjpg``), the
second ``APP_PUBLIC_KEY=<base64>``: the public half of the scenario's test signing key,
for the gateway's ``app_public_key``.  With ``--write-video`` the frames go to a video
file (MJPG in AVI) instead, with no server.

Frames are rendered with this module's own code (``qrcode`` for the module matrix,
numpy/OpenCV for the picture): a phone screen showing a QR code at a given module size,
angle, tilt, blur, contrast, glare and sensor noise, on a textured background.  App
tokens (contract section 6) are signed here with ``cryptography``; nothing is imported
from ``gateway/`` or ``drivers/``.  ``render_frame`` is also the benchmark's corpus.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import logging
import math
import secrets
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any

from simulators.deps import CAMERA, missing

try:
    import cv2
    import numpy as np
    import qrcode
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from numpy.typing import NDArray
except ModuleNotFoundError as exc:
    raise missing(exc, "the kiosk camera", CAMERA) from exc

log = logging.getLogger(__name__)

Gray = NDArray[np.uint8]
BOUNDARY = "tpframe"
SHOW_KINDS = ("app", "text", "hostile", "empty", "outage")
HOSTILE = ("huge", "binary", "invalid_utf8")


class ScenarioError(ValueError):
    """A camera scenario file is wrong; the message names the step and key."""


# ------------------------------------------------------------------------------ rendering


@dataclass(frozen=True, slots=True)
class Look:
    """How a code appears on the frame.  Sizes in frame pixels, angles in degrees."""

    module_px: float = 6.0  # one QR module on the frame
    angle: float = 0.0  # in-plane rotation
    tilt: float = 0.0  # perspective: the far edge is this fraction shorter (0..0.5)
    blur: float = 0.0  # gaussian sigma, px
    contrast: float = 1.0  # 1: black on white; 0.25: grey on grey
    glare: float = 0.0  # 0..1: a bright spot over the screen
    noise: float = 0.0  # sensor noise sigma, grey levels
    x: float = 0.5  # centre of the phone, fraction of the width
    y: float = 0.5  # ... and of the height


def qr_matrix(payload: bytes, border: int = 4) -> NDArray[np.bool_]:
    """The QR module matrix (True = dark) of ``payload`` in byte mode, with quiet zone."""
    code = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_M, border=border)
    code.add_data(payload, optimize=0)
    code.make(fit=True)
    return np.array(code.get_matrix(), dtype=bool)


def _background(width: int, height: int, rng: np.random.Generator) -> NDArray[np.float32]:
    small = rng.uniform(60, 170, size=(max(2, height // 40), max(2, width // 40)))
    big = cv2.resize(small.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
    return np.asarray(big, dtype=np.float32)


def render_frame(
    width: int,
    height: int,
    payload: bytes | None,
    look: Look,
    rng: np.random.Generator,
) -> Gray:
    """One grey camera frame: a phone showing ``payload`` as a QR code (None: no phone)."""
    frame = _background(width, height, rng)
    if payload is not None:
        modules = qr_matrix(payload)
        px = max(2, round(look.module_px))
        code = np.where(np.kron(modules, np.ones((px, px), dtype=bool)), 0.0, 1.0)
        pad = code.shape[0] // 8  # screen margin around the quiet zone, then the bezel
        phone = np.full((code.shape[0] + 2 * pad, code.shape[1] + 2 * pad), 1.0, np.float32)
        phone[pad:-pad, pad:-pad] = code
        bezel = pad // 2 + 2
        phone = cv2.copyMakeBorder(phone, bezel * 3, bezel * 3, bezel, bezel, 0, value=0.05)
        c = min(max(look.contrast, 0.0), 1.0)
        phone = 0.5 + (phone - 0.5) * c  # low contrast: dim screen, grey "black"
        scale = look.module_px / px
        h, w = phone.shape
        src = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float32)
        half_w, half_h = w * scale / 2, h * scale / 2
        t = min(max(look.tilt, 0.0), 0.5)
        corners = np.array(
            [[-half_w * (1 - t), -half_h], [half_w * (1 - t), -half_h], [half_w, half_h],
             [-half_w, half_h]],
            np.float32,
        )  # fmt: skip
        a = math.radians(look.angle)
        rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]], np.float32)
        dst = corners @ rot.T + np.array([look.x * width, look.y * height], np.float32)
        m = cv2.getPerspectiveTransform(src, dst.astype(np.float32))
        warped = cv2.warpPerspective(phone * 255.0, m, (width, height), flags=cv2.INTER_AREA)
        mask = cv2.warpPerspective(np.ones_like(phone), m, (width, height))
        frame = frame * (1.0 - mask) + warped * mask
        if look.glare > 0:
            cx, cy = dst.mean(axis=0) + rng.uniform(-0.2, 0.2, 2) * (half_w, half_h)
            yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
            r2 = ((xx - cx) ** 2 + (yy - cy) ** 2) / max(1.0, (half_w * 0.5) ** 2)
            frame = frame + look.glare * 220.0 * np.exp(-r2)
    if look.blur > 0:
        frame = np.asarray(cv2.GaussianBlur(frame, (0, 0), look.blur), dtype=np.float32)
    if look.noise > 0:
        frame = frame + rng.normal(0.0, look.noise, frame.shape).astype(np.float32)
    return np.clip(frame, 0, 255).astype(np.uint8)


def hostile_payload(variant: str, rng: np.random.Generator) -> bytes:
    """A payload that must not hurt the gateway: ``huge``, ``binary`` or ``invalid_utf8``."""
    if variant == "huge":
        return bytes(rng.integers(0x21, 0x7F, 1200, dtype=np.uint8))
    if variant == "binary":
        return bytes(rng.integers(0, 256, 200, dtype=np.uint8))
    if variant == "invalid_utf8":
        return b"TPA1.\xff\xfe\xc3(" + bytes(rng.integers(0x80, 0x100, 40, dtype=np.uint8))
    raise ValueError(f"unknown hostile variant {variant!r}; one of {', '.join(HOSTILE)}")


# ----------------------------------------------------------------------------- app tokens


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def sign_app_token(  # noqa: PLR0917 - the claims, in the contract's order
    key: Ed25519PrivateKey, sub: str, iat: int, exp: int, nonce: str, purposes: Sequence[str]
) -> str:
    """``TPA1.<claims>.<signature>`` as the loyalty app makes it (contract section 6)."""
    claims = {"sub": sub, "iat": iat, "exp": exp, "nonce": nonce, "purposes": list(purposes)}
    head = "TPA1." + _b64url(json.dumps(claims, separators=(",", ":")).encode("utf-8"))
    return head + "." + _b64url(key.sign(head.encode("ascii")))


def public_key_b64(key: Ed25519PrivateKey) -> str:
    """The raw 32-byte public key, base64: what the gateway's ``app_public_key`` takes."""
    return base64.b64encode(key.public_key().public_bytes_raw()).decode("ascii")


# ------------------------------------------------------------------------------ scenarios


@dataclass(frozen=True, slots=True)
class Step:
    """One scenario step: show something for ``seconds``."""

    show: str
    seconds: float
    look: Look = Look()
    text: str = ""
    variant: str = ""
    sub: str = "app-user-1"
    purposes: tuple[str, ...] = ("linking",)
    ttl_s: int = 300


@dataclass(frozen=True, slots=True)
class Scenario:
    """A camera scenario: frame size and rate, a signing key and the steps."""

    name: str
    width: int = 640
    height: int = 480
    fps: float = 10.0
    loops: int = 1
    seed: int = 0
    signing_key: bytes = bytes(32)
    steps: tuple[Step, ...] = field(default_factory=tuple)

    @property
    def key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.signing_key)


_LOOK_KEYS = {f.name for f in fields(Look)}
_STEP_KEYS = {"show", "seconds", "text", "variant", "sub", "purposes", "ttl_s"} | _LOOK_KEYS
_SCENARIO_KEYS = {"name", "description", "width", "height", "fps", "loops", "seed", "signing_key"}


def _parse_step(raw: Any, where: str) -> Step:
    if not isinstance(raw, dict):
        raise ScenarioError(f"{where}: a step is a table")
    unknown = set(raw) - _STEP_KEYS
    if unknown:
        raise ScenarioError(f"{where}: unknown keys {sorted(unknown)}")
    show = raw.get("show")
    if show not in SHOW_KINDS:
        raise ScenarioError(f"{where}.show: one of {', '.join(SHOW_KINDS)}")
    seconds = raw.get("seconds", 1.0)
    if not isinstance(seconds, int | float) or seconds <= 0:
        raise ScenarioError(f"{where}.seconds: a number > 0")
    try:
        look = Look(**{k: float(v) for k, v in raw.items() if k in _LOOK_KEYS})
    except (TypeError, ValueError):
        raise ScenarioError(f"{where}: look values are numbers") from None
    if show == "hostile" and raw.get("variant") not in HOSTILE:
        raise ScenarioError(f"{where}.variant: one of {', '.join(HOSTILE)}")
    if show == "text" and not isinstance(raw.get("text"), str):
        raise ScenarioError(f"{where}.text: the QR text")
    return Step(
        show=show,
        seconds=float(seconds),
        look=look,
        text=str(raw.get("text", "")),
        variant=str(raw.get("variant", "")),
        sub=str(raw.get("sub", "app-user-1")),
        purposes=tuple(raw.get("purposes", ("linking",))),
        ttl_s=int(raw.get("ttl_s", 300)),
    )


def parse_scenario(data: dict[str, Any], where: str = "<scenario>") -> Scenario:
    """A Scenario from parsed TOML; ScenarioError names the bad key."""
    head = data.get("scenario", {})
    unknown = (set(data) - {"scenario", "steps"}) | (set(head) - _SCENARIO_KEYS)
    if unknown:
        raise ScenarioError(f"{where}: unknown keys {sorted(unknown)}")
    try:
        key = base64.b64decode(head.get("signing_key", base64.b64encode(bytes(32))))
    except ValueError:
        raise ScenarioError(f"{where}: scenario.signing_key is base64 of 32 bytes") from None
    if len(key) != 32:
        raise ScenarioError(f"{where}: scenario.signing_key is base64 of 32 bytes")
    steps = data.get("steps", [])
    if not isinstance(steps, list) or not steps:
        raise ScenarioError(f"{where}: at least one [[steps]]")
    return Scenario(
        name=str(head.get("name", Path(where).stem)),
        width=int(head.get("width", 640)),
        height=int(head.get("height", 480)),
        fps=float(head.get("fps", 10.0)),
        loops=int(head.get("loops", 1)),
        seed=int(head.get("seed", 0)),
        signing_key=key,
        steps=tuple(_parse_step(s, f"{where}: steps[{i}]") for i, s in enumerate(steps)),
    )


def load_scenario(path: str | Path) -> Scenario:
    """Read a scenario TOML file."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"{p}: {exc}") from None
    return parse_scenario(data, str(p))


def step_payload(step: Step, scenario: Scenario, rng: np.random.Generator) -> bytes | None:
    """What a step shows; app tokens are signed now (valid from the current wall clock)."""
    if step.show == "app":
        iat = int(time.time())
        nonce = secrets.token_urlsafe(12)
        return sign_app_token(
            scenario.key, step.sub, iat, iat + step.ttl_s, nonce, step.purposes
        ).encode("ascii")
    if step.show == "text":
        return step.text.encode("utf-8")
    if step.show == "hostile":
        return hostile_payload(step.variant, rng)
    return None


# --------------------------------------------------------------------------------- server


class CameraSim:
    """The MJPEG server.  ``with CameraSim() as sim:`` serves ``sim.url`` on loopback.

    A producer thread renders ``fps`` frames a second of what ``show`` last set; every
    client of ``/stream.mjpg`` gets each new frame as one part of a
    ``multipart/x-mixed-replace`` response (``/frame.jpg``: one frame).  ``outage``
    ends every stream and answers 503 until it is over (a camera unplugged, a network
    stream dropped).
    """

    def __init__(
        self, width: int = 640, height: int = 480, fps: float = 10.0, port: int = 0, seed: int = 0
    ) -> None:
        self.width, self.height, self.fps = width, height, fps
        self.frames_rendered = 0
        self._rng = np.random.default_rng(seed)
        self._payload: bytes | None = None
        self._look = Look()
        self._jpeg = b""
        self._seq = 0
        self._cond = threading.Condition()
        self._render_lock = threading.Lock()
        self._stop = threading.Event()
        self._down_until = 0.0
        self._generation = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self._server.daemon_threads = False
        self._server.block_on_close = True
        self.port: int = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/stream.mjpg"
        self._render_once()
        self._threads = [
            threading.Thread(target=self._produce, name="camsim-render", daemon=True),
            threading.Thread(target=self._server.serve_forever, args=(0.05,), name="camsim-http"),
        ]
        for t in self._threads:
            t.start()

    def show(self, payload: bytes | None, look: Look | None = None) -> None:
        """Show ``payload`` as a QR code (None: an empty scene); the current frame too."""
        with self._cond:
            self._payload, self._look = payload, look or Look()
        self._render_once()

    def outage(self, seconds: float) -> None:
        """End every open stream now and refuse new ones (503) for ``seconds``.

        The scene goes empty too: whatever was held up before the drop is gone when the
        stream comes back (a reconnect that beats the next ``show`` must not scan it
        again as a new code)."""
        with self._cond:
            self._down_until = time.monotonic() + seconds
            self._generation += 1
            self._cond.notify_all()
        self.show(None)

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    def _render_once(self) -> None:
        with self._render_lock:  # show() and the producer thread; one rng
            with self._cond:
                payload, look = self._payload, self._look
            img = render_frame(self.width, self.height, payload, look, self._rng)
            ok, jpeg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
            assert ok
            self._publish(jpeg.tobytes())

    def _publish(self, jpeg: bytes) -> None:
        with self._cond:
            self._jpeg, self._seq = jpeg, self._seq + 1
            self.frames_rendered += 1
            self._cond.notify_all()

    def _produce(self) -> None:
        period = 1.0 / self.fps
        deadline = time.monotonic()
        while not self._stop.is_set():
            self._render_once()
            deadline = max(deadline + period, time.monotonic())
            self._stop.wait(deadline - time.monotonic())

    def next_frame(self, after: int, generation: int) -> tuple[int, bytes] | None:
        """The first frame newer than ``after``; None when stopping or the stream dropped."""
        with self._cond:
            while self._seq <= after:
                if self._stop.is_set() or generation != self._generation:
                    return None
                self._cond.wait(0.1)
            if self._stop.is_set() or generation != self._generation:
                return None
            return self._seq, self._jpeg

    @property
    def generation(self) -> int:
        with self._cond:
            return self._generation

    def close(self) -> None:
        """Stop rendering and serving; every handler thread is joined."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        self._server.shutdown()
        self._server.server_close()
        for t in self._threads:
            t.join()

    def __enter__(self) -> CameraSim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _handler_for(sim: CameraSim) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        timeout = 5.0
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("camsim: " + format, *args)

        def do_GET(self) -> None:
            if sim.down:
                self.send_error(503, "camera unavailable")
                return
            if self.path.startswith("/frame.jpg"):
                got = sim.next_frame(0, sim.generation)
                if got is None:
                    self.send_error(503, "camera unavailable")
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(got[1])))
                self.end_headers()
                self.wfile.write(got[1])
                return
            if not self.path.startswith("/stream.mjpg"):
                self.send_error(404, "try /stream.mjpg or /frame.jpg")
                return
            self.send_response(200)
            self.send_header("Content-Type", f"multipart/x-mixed-replace;boundary={BOUNDARY}")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            generation, seq = sim.generation, 0
            with contextlib.suppress(OSError):
                while (got := sim.next_frame(seq, generation)) is not None:
                    seq, jpeg = got
                    head = (
                        f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\n"
                        f"Content-Length: {len(jpeg)}\r\n\r\n"
                    )
                    self.wfile.write(head.encode("ascii") + jpeg + b"\r\n")
                    self.wfile.flush()

    return Handler


# ---------------------------------------------------------------------------------- play


def play(sim: CameraSim, scenario: Scenario, stop: threading.Event | None = None) -> None:
    """Show each step on ``sim`` for its duration, ``loops`` times (0: forever)."""
    rng = np.random.default_rng(scenario.seed)
    stop = stop or threading.Event()
    n = 0
    while scenario.loops == 0 or n < scenario.loops:
        n += 1
        for step in scenario.steps:
            if step.show == "outage":
                sim.outage(step.seconds)
            else:
                sim.show(step_payload(step, scenario, rng), step.look)
            if stop.wait(step.seconds):
                return
    sim.show(None)


def write_video(scenario: Scenario, path: str | Path) -> int:
    """Render the scenario's frames (one loop; outages skipped) to an MJPG AVI; frame count."""
    rng = np.random.default_rng(scenario.seed)
    size = (scenario.width, scenario.height)
    fourcc = cv2.VideoWriter.fourcc(*"MJPG")
    writer = cv2.VideoWriter(str(path), fourcc, scenario.fps, size, isColor=False)
    if not writer.isOpened():
        raise OSError(f"{path}: OpenCV cannot write an MJPG video here")
    count = 0
    try:
        for step in scenario.steps:
            if step.show == "outage":
                continue
            payload = step_payload(step, scenario, rng)
            for _ in range(max(1, round(step.seconds * scenario.fps))):
                writer.write(render_frame(*size, payload, step.look, rng))
                count += 1
    finally:
        writer.release()
    return count


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.devices.camera",
        description="Fake kiosk camera: MJPEG over HTTP on 127.0.0.1 playing a scenario. "
        "Prints the stream URL, then APP_PUBLIC_KEY=<base64>.",
    )
    parser.add_argument("scenario", type=Path, help="scenario TOML (see simulators/README.md)")
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: any free one)")
    parser.add_argument("--write-video", type=Path, help="write the frames to this .avi instead")
    parser.add_argument("--loops", type=int, help="override the scenario's loops (0: forever)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.loops is not None:
        scenario = replace(scenario, loops=args.loops)
    if args.write_video:
        count = write_video(scenario, args.write_video)
        print(f"{args.write_video}: {count} frames", flush=True)
        print(f"APP_PUBLIC_KEY={public_key_b64(scenario.key)}", flush=True)
        return 0
    signal.signal(signal.SIGTERM, _stop)
    with CameraSim(scenario.width, scenario.height, scenario.fps, args.port, scenario.seed) as sim:
        print(sim.url, flush=True)
        print(f"APP_PUBLIC_KEY={public_key_b64(scenario.key)}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            play(sim, scenario)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
