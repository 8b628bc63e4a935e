"""The redaction filter: the last line of defence for logs."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.observe.logs import RedactingFilter, redact, setup_logging


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("card 2600123456789 read", "card <digits> read"),
        ("pan=4912101234567890", "pan=<digits>"),
        ("phone AA:BB:CC:DD:EE:FF seen", "phone <mac> seen"),
        ("mac 00-1a-7d-da-71-01", "mac <mac>"),
        ("stream d1063f5c12345678 ok", "stream d1063f5c12345678 ok"),  # hex ids stay
        ("seq 1234567", "seq 1234567"),  # short numbers stay
        ("k1:y12r74-dyodquqc6XBqP4A", "k1:y12r74-dyodquqc6XBqP4A"),  # pseudonyms stay
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def test_filter_masks_arguments_too(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tp.test.redact")
    logger.addFilter(RedactingFilter())
    with caplog.at_level(logging.INFO, logger="tp.test.redact"):
        logger.info("unexpected %s from %s", "2600123456789", "AA:BB:CC:DD:EE:FF")
    assert caplog.records[-1].getMessage() == "unexpected <digits> from <mac>"


def test_setup_logging_installs_the_filter(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        setup_logging("info")
        logging.getLogger("tp.test.setup").warning("card %s", "0001234567890")
        err = capsys.readouterr().err
        assert "<digits>" in err and "0001234567890" not in err
    finally:
        root.handlers[:], root.level = saved[0], saved[1]


def test_a_consent_poll_is_not_a_log_line_at_info(capsys: pytest.CaptureFixture[str]) -> None:
    """httpx logs every request at INFO ("HTTP Request: GET ..."): at the default level that
    was a line a minute in the journal for each consent poll, on an SD card, saying
    nothing (bench journal).  Our own lines say when a poll fails."""
    import http.server
    import threading

    import httpx

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        setup_logging("info")
        with httpx.Client() as client:
            assert client.get(f"http://127.0.0.1:{server.server_port}/v1/consent").is_success
        assert "HTTP Request" not in capsys.readouterr().err
        setup_logging("debug")  # asked for: there it is
        with httpx.Client() as client:
            client.get(f"http://127.0.0.1:{server.server_port}/v1/consent")
        assert "HTTP Request" in capsys.readouterr().err
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        server.shutdown()
        server.server_close()


# -- journald priorities and native libraries' messages (real processes) -------------------

_LOGGING_PROGRAM = """
import logging, sys
from gateway.observe.logs import capture_native_stderr, setup_logging
setup_logging("debug")
{native}
log = logging.getLogger("gateway.test")
log.debug("a debug line")
log.info("an info line")
log.warning("a warning line")
log.error("an error line")
try:
    raise ValueError("boom")
except ValueError:
    log.exception("a failure")
print("a plain stderr print", file=sys.stderr)
{extra}
"""


def _run_logging(
    tmp_path: Path, *, journal: bool, native: bool = False, extra: str = ""
) -> tuple[int, list[str]]:
    """Run a small program that logs at every level, its stderr a file; with ``journal``,
    JOURNAL_STREAM names that file the way systemd names the journal's stream."""
    err_path = tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    with err_path.open("wb") as err:
        if journal:
            st = os.fstat(err.fileno())
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        program = _LOGGING_PROGRAM.format(
            native="capture_native_stderr()" if native else "", extra=extra
        )
        proc = subprocess.run(
            [sys.executable, "-c", program], stderr=err, env=env, timeout=60, check=False
        )
    return proc.returncode, err_path.read_text(encoding="utf-8").splitlines()


def test_journal_gets_each_line_at_its_priority(tmp_path: Path) -> None:
    rc, lines = _run_logging(tmp_path, journal=True)
    assert rc == 0
    assert any(x.startswith("<7>") and "a debug line" in x for x in lines), lines
    assert any(x.startswith("<6>") and "an info line" in x for x in lines), lines
    assert any(x.startswith("<4>") and "a warning line" in x for x in lines), lines
    assert any(x.startswith("<3>") and "an error line" in x for x in lines), lines
    # journald reads every line as an entry: a traceback's lines keep the error's priority
    start = next(i for i, x in enumerate(lines) if "a failure" in x)
    traceback_lines = lines[start : start + 4]
    assert all(x.startswith("<3>") for x in traceback_lines), traceback_lines
    assert any("ValueError: boom" in x for x in traceback_lines), traceback_lines


def test_no_priority_prefix_when_stderr_is_not_the_journal(tmp_path: Path) -> None:
    rc, lines = _run_logging(tmp_path, journal=False)
    assert rc == 0
    assert lines and not any(x.startswith("<") for x in lines), lines
    assert any("WARNING gateway.test: a warning line" in x for x in lines), lines


def test_native_library_messages_go_through_our_logging(tmp_path: Path) -> None:
    """OpenCV and FFmpeg write to file descriptor 2 from C: captured, each line logged
    through our format, redaction and priorities, never raw around them."""
    extra = (
        "import cv2\n"
        "cv2.VideoCapture('http://127.0.0.1:1/cam.mjpg', cv2.CAP_FFMPEG)\n"
        "import os; os.write(2, b'card 2600123456789 in a native line\\n')\n"
        "logging.getLogger('gateway.test').info('after the camera')\n"
    )
    rc, lines = _run_logging(tmp_path, journal=True, native=True, extra=extra)
    assert rc == 0
    raw = [x for x in lines if x.startswith(("[ WARN", "[tcp @", "[http @", "card "))]
    assert not raw, raw
    native = [x for x in lines if " native" in x]
    assert any(x.startswith("<4>") and "native.opencv" in x and "VIDEOIO" in x for x in native)
    assert any(x.startswith("<3>") and "native.ffmpeg" in x and "refused" in x for x in native)
    assert any("<digits>" in x for x in native), native  # the redaction filter applies
    assert not any("2600123456789" in x for x in lines)
    assert any("a plain stderr print" in x for x in lines)  # Python's own stderr still works
