"""The camera simulator: scenarios, rendering, app tokens, the MJPEG server, video files."""

from __future__ import annotations

import http.client
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zxingcpp

from gateway.identity.tokens import ReplaySet, load_public_key, verify_app_token
from simulators.devices.camera import (
    BOUNDARY,
    CameraSim,
    Look,
    ScenarioError,
    load_scenario,
    parse_scenario,
    play,
    public_key_b64,
    render_frame,
    sign_app_token,
)

SCENARIOS = Path(__file__).resolve().parents[2] / "simulators" / "scenarios"
ROOT = SCENARIOS.parents[1]


def _read(img: np.ndarray) -> list[bytes]:
    return [bytes(b.bytes) for b in zxingcpp.read_barcodes(img)]


def _jpeg(data: bytes) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    assert img is not None
    return np.asarray(img)


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("camera-*.toml")), ids=lambda p: p.stem)
def test_shipped_scenarios_load(path: Path) -> None:
    scenario = load_scenario(path)
    assert scenario.steps and scenario.name == path.stem


@pytest.mark.parametrize(
    ("data", "why"),
    [
        ({"steps": [{"show": "app", "colour": 1}]}, "unknown keys"),
        ({"steps": [{"show": "dance"}]}, "show: one of"),
        ({"steps": [{"show": "app", "seconds": 0}]}, "seconds"),
        ({"steps": [{"show": "hostile", "variant": "nice"}]}, "variant"),
        ({"steps": [{"show": "text"}]}, "text"),
        ({"steps": [{"show": "app", "angle": "steep"}]}, "numbers"),
        ({"scenario": {"signing_key": "AAAA"}, "steps": [{"show": "app"}]}, "32 bytes"),
        ({"scenario": {"fsp": 3}, "steps": [{"show": "app"}]}, "unknown keys"),
        ({"scenario": {}}, "at least one"),
    ],
)
def test_scenario_errors_name_the_key(data: dict[str, object], why: str) -> None:
    with pytest.raises(ScenarioError, match=why):
        parse_scenario(data, "t.toml")


def test_app_tokens_verify_under_the_gateways_code() -> None:
    scenario = load_scenario(SCENARIOS / "camera-kiosk.toml")
    token = sign_app_token(
        scenario.key, "app-user-1", 1_790_000_000, 1_790_000_300, "n1", ["linking", "ads"]
    )
    key = load_public_key(scenario.key.public_key().public_bytes_raw())
    claims = verify_app_token(token, key, 1_790_000_000, ReplaySet())
    assert (claims.sub, claims.purposes) == ("app-user-1", ("linking",))
    assert public_key_b64(scenario.key).endswith("=")


def test_render_is_deterministic_and_readable() -> None:
    look = Look(module_px=4, angle=33, tilt=0.2, blur=0.5, contrast=0.4, glare=0.3, noise=3)
    a = render_frame(640, 480, b"HELLO", look, np.random.default_rng(5))
    b = render_frame(640, 480, b"HELLO", look, np.random.default_rng(5))
    assert a.shape == (480, 640) and a.dtype == np.uint8 and np.array_equal(a, b)
    assert _read(a) == [b"HELLO"]
    assert _read(render_frame(640, 480, None, Look(), np.random.default_rng(5))) == []


def _stream_parts(url: str, count: int) -> list[bytes]:
    """Read ``count`` JPEG parts of the multipart stream with our own parser."""
    host_port = url.split("/")[2]
    conn = http.client.HTTPConnection(host_port, timeout=5)
    try:
        conn.request("GET", "/stream.mjpg")
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.getheader("Content-Type") == f"multipart/x-mixed-replace;boundary={BOUNDARY}"
        parts = []
        for _ in range(count):
            assert resp.readline() == f"--{BOUNDARY}\r\n".encode()
            headers = {}
            while (line := resp.readline()) != b"\r\n":
                k, _, v = line.decode().partition(":")
                headers[k.lower()] = v.strip()
            assert headers["content-type"] == "image/jpeg"
            parts.append(resp.read(int(headers["content-length"])))
            assert resp.readline() == b"\r\n"
        return parts
    finally:
        conn.close()


def test_mjpeg_stream_serves_new_frames() -> None:
    with CameraSim(320, 240, fps=20) as sim:
        sim.show(b"STREAMED", Look(module_px=4))
        parts = _stream_parts(sim.url, 3)
    frames = [_jpeg(p) for p in parts]
    assert all(f.shape == (240, 320) for f in frames)
    assert _read(frames[-1]) == [b"STREAMED"]


def test_outage_ends_streams_and_answers_503() -> None:
    with CameraSim(160, 120, fps=20) as sim:
        conn = http.client.HTTPConnection(f"127.0.0.1:{sim.port}", timeout=5)
        conn.request("GET", "/stream.mjpg")
        resp = conn.getresponse()
        resp.readline()
        sim.outage(0.5)
        deadline = time.monotonic() + 2
        while resp.read(65536) and time.monotonic() < deadline:
            pass
        assert time.monotonic() < deadline, "the open stream ended"
        conn.close()
        conn = http.client.HTTPConnection(f"127.0.0.1:{sim.port}", timeout=5)
        conn.request("GET", "/frame.jpg")
        assert conn.getresponse().status == 503
        conn.close()
        time.sleep(0.6)
        conn = http.client.HTTPConnection(f"127.0.0.1:{sim.port}", timeout=5)
        conn.request("GET", "/frame.jpg")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read()[:2] == b"\xff\xd8"
        conn.close()


def test_opencv_reads_the_stream() -> None:
    with CameraSim(320, 240, fps=20) as sim:
        sim.show(b"VIA-OPENCV", Look(module_px=4))
        cap = cv2.VideoCapture(sim.url, cv2.CAP_FFMPEG)
        try:
            ok, frame = cap.read()
        finally:
            cap.release()
    assert ok and _read(frame) == [b"VIA-OPENCV"]


def test_play_steps_through_the_scenario() -> None:
    data = {
        "scenario": {"fps": 20, "width": 320, "height": 240},
        "steps": [{"show": "text", "text": "ONE", "seconds": 0.3, "module_px": 4},
                  {"show": "outage", "seconds": 0.2}],
    }  # fmt: skip
    scenario = parse_scenario(data)
    with CameraSim(320, 240, fps=20) as sim:
        thread = threading.Thread(target=play, args=(sim, scenario))
        thread.start()
        time.sleep(0.15)
        parts = _stream_parts(sim.url, 1)
        thread.join()
        assert not thread.is_alive()
    assert _read(_jpeg(parts[0])) == [b"ONE"]


def test_write_video_cli(tmp_path: Path) -> None:
    scenario = tmp_path / "camera-tiny.toml"
    scenario.write_text(
        "[scenario]\nwidth = 320\nheight = 240\nfps = 10\n"
        '[[steps]]\nshow = "hostile"\nvariant = "binary"\nseconds = 0.5\nmodule_px = 2\n'
        '[[steps]]\nshow = "outage"\nseconds = 5\n'
        '[[steps]]\nshow = "app"\nseconds = 0.7\nmodule_px = 3\n',
        encoding="utf-8",
    )
    out = tmp_path / "tiny.avi"
    proc = subprocess.run(
        [sys.executable, "-m", "simulators.devices.camera", str(scenario), "--write-video",
         str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    lines = proc.stdout.splitlines()
    assert lines[0] == f"{out}: 12 frames" and lines[1].startswith("APP_PUBLIC_KEY=")
    cap = cv2.VideoCapture(str(out))
    try:
        assert cap.get(cv2.CAP_PROP_FRAME_COUNT) == 12
        seen = set()
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            seen.update(_read(frame))
    finally:
        cap.release()
    assert any(p.startswith(b"TPA1.") for p in seen)


def test_server_cli_prints_url_and_key() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulators.devices.camera", str(SCENARIOS / "camera-kiosk.toml")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        key = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:") and url.endswith("/stream.mjpg")
        assert key.startswith("APP_PUBLIC_KEY=")
        conn = http.client.HTTPConnection(url.split("/")[2], timeout=5)
        conn.request("GET", "/frame.jpg")
        assert conn.getresponse().status == 200
        conn.close()
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        assert proc.stdout is not None
        proc.stdout.close()
