"""App-token replay against the real daemon process: one replay set for the whole daemon,
kept in the buffer database, so a token is one ``qr.scan`` however often and wherever it
is shown again: at a second camera, after a reload (SIGHUP) and after a restart."""

from __future__ import annotations

import base64
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from simulators.devices.camera import CameraSim, Look, sign_app_token
from simulators.infra.broker import free_port
from tests.system.harness import GatewayProc, metrics

pytestmark = pytest.mark.slow

LOOK = Look(module_px=5)


def camera(name: str, sim: CameraSim, key: Ed25519PrivateKey) -> str:
    pub = base64.b64encode(key.public_key().public_bytes_raw()).decode("ascii")
    return f"""
[[sources]]
kind = "camera"
name = "{name}"
zone = "kiosk"
url = "{sim.url}"
app_public_key = "{pub}"
decode_fps = 10
reopen_min_s = 0.1
reopen_max_s = 0.5
"""


def scans(db: Path) -> int:
    """qr.scan events in the buffer (no broker: nothing leaves it)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return sum(
            str(body).count('"type":"qr.scan"')
            for (body,) in conn.execute("SELECT body FROM chunks")
        )
    finally:
        conn.close()


def rejected(gw: GatewayProc, reason: str) -> float:
    assert gw.health_port is not None
    fam = metrics(gw.health_port).get("readings_rejected_total", {})
    return sum(v for labels, v in fam.items() if dict(labels).get("reason") == reason)


def show_until_judged(gw: GatewayProc, sim: CameraSim, token: bytes, scans_before: int) -> None:
    """Show the token until the daemon has either buffered a new scan of it or refused
    it as replayed; then take it away."""
    assert gw.health_port is not None
    refused_before = rejected(gw, "replayed")
    sim.show(token, LOOK)
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if scans(gw.db) > scans_before or rejected(gw, "replayed") > refused_before:
                return
            time.sleep(0.1)
        raise TimeoutError(
            f"the token was neither scanned nor refused:\n{gw.log.read_text()[-3000:]}"
        )
    finally:
        sim.show(None)


def wait_streaming(gw: GatewayProc) -> None:
    gw.wait_ready()
    gw.wait_log("streaming from", timeout=30)


@contextmanager
def streaming(tmp_path: Path, sources: str) -> Iterator[GatewayProc]:
    """The daemon with ``sources`` and no broker, once it streams from its cameras; it is
    stopped on the way out (if it still runs)."""
    gw = GatewayProc(tmp_path / "gw", free_port(), sources=sources, health_port=free_port())
    gw.start()
    try:
        wait_streaming(gw)
        yield gw
    finally:
        if gw.alive():
            gw.stop()


@pytest.fixture
def sims() -> Iterator[tuple[CameraSim, CameraSim]]:
    with CameraSim(640, 480, fps=10) as a, CameraSim(640, 480, fps=10, seed=1) as b:
        yield a, b


def test_a_token_is_one_scan_across_cameras_reload_and_restart(
    tmp_path: Path, sims: tuple[CameraSim, CameraSim]
) -> None:
    key = Ed25519PrivateKey.generate()
    cam_a, cam_b = sims
    iat = int(time.time())
    token = sign_app_token(
        key, "shopper-7", iat, iat + 600, "once", ["analytics", "linking"]
    ).encode()
    # no broker: every event stays in the buffer to be counted
    with streaming(tmp_path, camera("cam-a", cam_a, key) + camera("cam-b", cam_b, key)) as gw:
        show_until_judged(gw, cam_a, token, 0)
        assert scans(gw.db) == 1

        show_until_judged(gw, cam_b, token, 1)  # a second camera of the same daemon
        assert scans(gw.db) == 1, "the token was accepted again at a second camera"

        gw.reload()  # a reload builds the sources again
        gw.wait_log("reloading")
        wait_streaming(gw)
        show_until_judged(gw, cam_a, token, 1)
        assert scans(gw.db) == 1, "the token was accepted again after a reload"

        assert gw.stop() == 0
        gw.start()
        wait_streaming(gw)
        show_until_judged(gw, cam_b, token, 1)
        assert scans(gw.db) == 1, "the token was accepted again after a restart"
        assert rejected(gw, "replayed") >= 1
    # The replay table holds no raw subject or nonce.
    raw = b"".join(p.read_bytes() for p in gw.db.parent.glob("buffer.db*"))
    assert b"shopper-7" not in raw


def test_a_token_with_a_lifetime_over_the_maximum_is_refused(
    tmp_path: Path, sims: tuple[CameraSim, CameraSim]
) -> None:
    key = Ed25519PrivateKey.generate()
    cam_a, _ = sims
    iat = int(time.time())
    ten_years = iat + 10 * 365 * 86400
    token = sign_app_token(
        key, "shopper-8", iat, ten_years, "long", ["analytics", "linking"]
    ).encode()
    with streaming(tmp_path, camera("cam-a", cam_a, key)) as gw:
        cam_a.show(token, LOOK)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not rejected(gw, "lifetime"):
            assert scans(gw.db) == 0, "a token valid for ten years was accepted"
            time.sleep(0.1)
        assert rejected(gw, "lifetime") >= 1
        assert scans(gw.db) == 0
