"""A kiosk camera as a Source: OpenCV capture, QR decoding, token classification.

    capture thread: VideoCapture.read() ──► one-slot Mailbox (newer frame replaces older)
                                                   │ wake: loop.call_soon_threadsafe
    event loop:     take newest ──to_thread(prepare + decode)──► payloads
                    ──ScanDebouncer──► new scans ──classify_qr──► Reading("qr.scan")
                                                        └── TokenError: ctx.reject(reason)

Capture runs in its own thread because ``VideoCapture.read`` blocks; it only ever
hands over the newest frame.  A frame replaced before the loop took it is stale and is
counted in ``camera_frames_dropped_total``; nothing queues.  The loop takes a frame at
most ``decode_fps`` times a second; decoding (grey, ROI crop, downscale while the
smallest module stays >= 3 px, then the configured decoder) runs in a worker thread.

Stream loss (an open that fails, a read that fails or times out, a camera unplugged,
end of a file) is handled here: the state goes to ``absent`` and the stream is reopened
with jittered exponential backoff between ``reopen_min_s`` and ``reopen_max_s``.

What a code holds is never logged, stored or sent unless it is a verified token: the
debouncer keeps keyed digests of payloads, ``other`` codes become ``kind: "other"``
with no subject, and invalid tokens are only counted by reason.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from typing import Any
from urllib.parse import urlsplit

import cv2
import numpy as np

from drivers.camera.decoders import Image, QrDecoder, make_decoder, prepare, scale_for
from gateway.backoff import Backoff
from gateway.config.sources import CameraSourceConfig
from gateway.errors import RejectedInput, SourceError
from gateway.identity.tokens import AppPublicKey, ReplaySet, classify_qr, load_public_key
from gateway.ports import Reading, SourceContext

log = logging.getLogger(__name__)

DEBOUNCE_MAX_ENTRIES = 1024
FILE_FPS_FALLBACK = 25.0


class ScanDebouncer:
    """A code seen in consecutive frames is one scan; absent >= ``window_s``, a new one.

    Keys are keyed BLAKE2b digests (the key is random per process): the raw payload is
    never kept.  The table is pruned on every call and bounded by ``max_entries``.
    """

    def __init__(self, window_s: float, max_entries: int = DEBOUNCE_MAX_ENTRIES) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._secret = secrets.token_bytes(16)
        self._last: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._last)

    def clear(self) -> None:
        self._last.clear()

    def new_scans(self, payloads: list[bytes], now: float) -> list[bytes]:
        """The payloads that start a scan at ``now`` (each distinct payload once)."""
        while self._last and now - next(iter(self._last.values())) >= self.window_s:
            self._last.popitem(last=False)
        fresh: list[bytes] = []
        for payload in payloads:
            key = hashlib.blake2b(payload, key=self._secret, digest_size=16).digest()
            if key not in self._last and payload not in fresh:
                fresh.append(payload)
            self._last[key] = now
            self._last.move_to_end(key)
            if len(self._last) > self.max_entries:
                self._last.popitem(last=False)
        return fresh


class Mailbox:
    """One slot between the capture thread and the loop; a newer frame replaces an older.

    ``put`` and ``fail`` run in the capture thread and only wake the loop (through
    ``wake``, e.g. ``loop.call_soon_threadsafe``) when the slot goes from empty to full.
    """

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._lock = threading.Lock()
        self._frame: Image | None = None
        self.failure: str | None = None
        self.captured = 0
        self.dropped = 0

    def put(self, frame: Image) -> None:
        with self._lock:
            replaced = self._frame is not None
            self._frame = frame
            self.captured += 1
            self.dropped += replaced
        if not replaced:
            self._wake()

    def fail(self, why: str) -> None:
        with self._lock:
            self.failure = why
        self._wake()

    def take(self) -> Image | None:
        with self._lock:
            frame, self._frame = self._frame, None
        return frame

    async def next_frame(self, ready: asyncio.Event) -> Image:
        """The newest frame, once there is one (``ready`` is what ``wake`` sets); raises
        ``StreamLost`` when the capture has failed and no frame is left.

        A failure right after a last frame wakes the loop once for both: after that frame
        is taken, the failure must not wait for a wake that will never come.
        """
        while True:
            if self.failure is None:
                await ready.wait()
            ready.clear()
            frame = self.take()
            if frame is not None:
                return frame
            if self.failure is not None:
                raise StreamLost(self.failure)


def _open_capture(config: CameraSourceConfig) -> Any:
    """A VideoCapture for the configured url, device or file (blocking)."""
    if config.url is not None:
        params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(config.open_timeout_s * 1000),
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(config.read_timeout_s * 1000),
        ]  # fmt: skip
        return cv2.VideoCapture(config.url, cv2.CAP_FFMPEG, params)
    if config.file is not None:
        return cv2.VideoCapture(str(config.file), cv2.CAP_FFMPEG)
    target = config.device if isinstance(config.device, int) else str(config.device)
    cap = cv2.VideoCapture(target, cv2.CAP_V4L2)
    if config.width:
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, config.width)
    if config.height:
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, config.height)
    return cap


def _capture(config: CameraSourceConfig, box: Mailbox, stop: threading.Event) -> None:
    """The capture thread: open, read into the mailbox until stopped or the stream fails.

    It never ends unheard: any failure, not only OpenCV's, is told to the mailbox, whose
    reader would otherwise wait for a frame for ever (the source stuck, its state ok)."""
    try:
        _capture_frames(config, box, stop)
    except Exception as exc:  # a bug, or MemoryError for a frame: a stream loss too
        log.error("%s: the capture thread failed", describe(config), exc_info=exc)
        box.fail(f"capture failed ({exc.__class__.__name__})")


def _capture_frames(config: CameraSourceConfig, box: Mailbox, stop: threading.Event) -> None:
    try:
        cap = _open_capture(config)
    except cv2.error as exc:
        box.fail(f"cannot open the stream ({exc.__class__.__name__})")
        return
    try:
        if not cap.isOpened():
            box.fail("cannot open the stream")
            return
        period = 0.0
        if config.file is not None:
            fps = cap.get(cv2.CAP_PROP_FPS)
            period = 1.0 / (fps if 0 < fps < 1000 else FILE_FPS_FALLBACK)
        deadline = time.monotonic()
        while not stop.is_set():
            ok, frame = cap.read()
            if not ok or frame is None:
                box.fail("end of file" if config.file is not None else "stream lost")
                return
            box.put(frame)
            if period:
                deadline = max(deadline + period, time.monotonic())
                stop.wait(deadline - time.monotonic())
    except cv2.error as exc:
        box.fail(f"stream failed ({exc.__class__.__name__})")
    finally:
        cap.release()


def describe(config: CameraSourceConfig) -> str:
    """Where frames come from, without credentials (an RTSP URL may carry a password)."""
    if config.url is not None:
        parts = urlsplit(config.url)
        return f"{parts.scheme}://{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"
    return str(config.file if config.file is not None else config.device)


class StreamLost(Exception):
    """Internal: the capture thread reported a failure; reopen after backoff."""


class CameraSource:
    """A configured kiosk camera.  Yields ``qr.scan`` readings until cancelled."""

    def __init__(self, config: CameraSourceConfig, ctx: SourceContext) -> None:
        self.config = config
        self.name = config.name
        self._ctx = ctx
        # The daemon's one replay set (kept in the buffer database); a private one alone.
        self._replay = ctx.replay if ctx.replay is not None else ReplaySet()
        self._debounce = ScanDebouncer(config.debounce_s)
        self._place = {"zone": config.zone} if config.zone is not None else {"lane": config.lane}
        self._scale = scale_for(config.min_module_px)
        self._key: AppPublicKey | None = None
        self._streamed = False

    def _count(self, metric: str, amount: float = 1, **labels: str) -> None:
        self._ctx.metrics.inc(metric, amount, source=self.name, **labels)

    def _load_key(self) -> AppPublicKey | None:
        c = self.config
        text = c.app_public_key
        if c.app_public_key_file is not None:
            try:
                text = c.app_public_key_file.read_text(encoding="ascii")
            except (OSError, UnicodeDecodeError) as exc:
                raise SourceError(
                    f"{self.name}: cannot read app_public_key_file {c.app_public_key_file}: "
                    f"{exc}. Put the central public key (base64) there."
                ) from exc
        if text is None:
            log.warning("%s: no app_public_key configured; app tokens are rejected", self.name)
            return None
        try:
            return load_public_key(base64.b64decode("".join(text.split()), validate=True))
        except (ValueError, binascii.Error) as exc:
            raise SourceError(f"{self.name}: the app public key is unusable: {exc}") from None

    def forget(self, subject: str) -> None:
        """An erasure: the debounce table is keyed by payload digests that cannot be
        told apart by subject, so it is emptied (a code in view counts as a new scan).
        The token replay set stays: it only blocks re-use until the token expires."""
        self._debounce.clear()

    def memory_sizes(self) -> dict[str, int]:
        """Entries in this source's in-memory tables (``Gateway.memory_stats``)."""
        sizes = {"debounce": len(self._debounce)}
        if self._replay is not self._ctx.replay:  # the daemon's shared set is its own entry
            sizes["token_replay"] = len(self._replay)
        return sizes

    async def readings(self) -> AsyncGenerator[Reading, None]:
        """Capture, decode and classify until cancelled; reopen the stream when it is lost."""
        c, ctx = self.config, self._ctx
        self._key = await asyncio.to_thread(self._load_key)
        decoder = await asyncio.to_thread(make_decoder, c.decoder)
        backoff = Backoff(c.reopen_min_s, c.reopen_max_s)
        where = describe(c)
        while True:
            ctx.set_state("connecting", f"opening {where}")
            self._streamed = False
            try:
                async with contextlib.aclosing(self._stream(decoder, where)) as stream:
                    async for reading in stream:
                        yield reading
            except StreamLost as exc:
                self._count("camera_stream_lost_total")
                if self._streamed:
                    backoff.reset()
                delay = backoff.next()
                ctx.set_state("absent", f"{where}: {exc}; retrying in {delay:.1f} s")
                log.warning("%s: %s: %s; retrying in %.1f s", self.name, where, exc, delay)
                await asyncio.sleep(delay)

    async def _stream(self, decoder: QrDecoder, where: str) -> AsyncGenerator[Reading, None]:
        """One open stream: frames until it fails (StreamLost) or the caller stops."""
        c, ctx = self.config, self._ctx
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closing: we are stopping
                loop.call_soon_threadsafe(ready.set)

        box, stop = Mailbox(wake), threading.Event()
        thread = threading.Thread(
            target=_capture, args=(c, box, stop), name=f"{self.name}-capture", daemon=True
        )
        thread.start()
        period = 1.0 / c.decode_fps
        counted = (0, 0)
        try:
            while True:
                try:
                    frame = await box.next_frame(ready)
                finally:
                    counted = self._flush_counts(box, counted)
                if not self._streamed:
                    ctx.set_state("ok", f"decoding {where} with {decoder.name}")
                    log.info("%s: streaming from %s", self.name, where)
                    self._streamed = True
                begun = loop.time()
                now = ctx.now()
                payloads = await asyncio.to_thread(self._decode, decoder, frame)
                self._count("camera_frames_decoded_total")
                for reading in self._scans(payloads, now):
                    yield reading
                await asyncio.sleep(max(0.0, begun + period - loop.time()))
        finally:
            stop.set()
            await asyncio.to_thread(thread.join)
            self._flush_counts(box, counted)

    def _flush_counts(self, box: Mailbox, counted: tuple[int, int]) -> tuple[int, int]:
        captured, dropped = box.captured, box.dropped
        if captured > counted[0]:
            self._count("camera_frames_captured_total", captured - counted[0])
        if dropped > counted[1]:
            self._count("camera_frames_dropped_total", dropped - counted[1])
        return captured, dropped

    def _decode(self, decoder: QrDecoder, frame: Image) -> list[bytes]:
        """Worker thread: grey, crop, downscale, decode."""
        grey = prepare(np.asarray(frame), self.config.roi, self._scale)
        return decoder.decode(grey)

    def _scans(self, payloads: list[bytes], now: float) -> list[Reading]:
        """Debounce, then classify each new scan; invalid tokens are counted, not sent."""
        out: list[Reading] = []
        for payload in self._debounce.new_scans(payloads, now):
            try:
                qr = classify_qr(
                    payload,
                    keyring=self._ctx.keyring,
                    app_public_key=self._key,
                    receipt_prefixes=(self.config.receipt_url_prefix,),
                    now=now,
                    replay=self._replay,
                )  # evidence expiry: the daemon applies consent.token_consent_ttl_s
            except RejectedInput as exc:
                self._ctx.reject(exc.reason)
                log.debug("%s: rejected a scanned token: %s", self.name, exc.reason)
                continue
            self._count("qr_scans_total", kind=qr.kind)
            attrs: dict[str, Any] = {**self._place, "kind": qr.kind}
            if qr.kind == "receipt":
                attrs["receipt"] = qr.receipt
            subject = qr.subject if qr.kind == "app" else None
            out.append(Reading("qr.scan", self.name, now, subject, attrs, qr.evidence))
        return out
