"""Logging: one readable line per event worth a human's attention, journald-friendly.

A redaction filter is the last line of defence: long digit runs (card numbers) and MAC
addresses are masked in every record, even though the code never logs raw identifiers.

When stderr is the journal (systemd names its stream in ``JOURNAL_STREAM``), every line
starts with its syslog priority (``<3>`` for errors, ``<4>`` for warnings...), which
journald strips and records as ``PRIORITY``: ``journalctl -p err`` and log shippers keyed
on priority see what they should.  A traceback's lines keep the priority of their record.

Native libraries (OpenCV, FFmpeg) write to file descriptor 2 from C, around our format,
redaction and priorities.  ``capture_native_stderr()`` moves descriptor 2 to a pipe whose
lines a thread logs under ``native.opencv`` / ``native.ffmpeg`` / ``native`` at the level
the line says; Python's own stderr and faulthandler keep the real stream.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import logging
import os
import re
import sys
import threading
from typing import IO

# Standalone runs of 8+ digits (card numbers); not digits inside hex ids or words.
_DIGITS = re.compile(r"(?<![0-9A-Za-z_])\d{8,}(?![0-9A-Za-z_])")
_MAC = re.compile(r"\b(?:[0-9A-Fa-f]{2}[:-]){5}[0-9A-Fa-f]{2}\b")

# syslog priorities (sd-daemon.h) by logging level
_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def redact(text: str) -> str:
    return _MAC.sub("<mac>", _DIGITS.sub("<digits>", text))


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (between levels: the more severe one)."""
    for level in sorted(_PRIORITY, reverse=True):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


class JournalFormatter(logging.Formatter):
    """Every line of a record prefixed with its syslog priority, ``<N>``."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def stderr_is_journal() -> bool:
    """True when stderr is the stream systemd connected to the journal: ``JOURNAL_STREAM``
    holds its device and inode (a redirect by hand leaves the variable but not the match)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(sys.stderr.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError):
        return False


def setup_logging(level: str = "info") -> None:
    journal = stderr_is_journal()
    handler = logging.StreamHandler(sys.stderr)
    if journal:  # journald adds time and unit
        handler.setFormatter(JournalFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("bleak").setLevel(max(root.level, logging.WARNING))
    # httpx logs every request at INFO ("HTTP Request: GET ..."): a journal line per consent
    # poll that says nothing (our own lines say when a poll fails).  Shown at debug.
    httpx_level = logging.DEBUG if root.level <= logging.DEBUG else logging.WARNING
    logging.getLogger("httpx").setLevel(httpx_level)


# -- native libraries' stderr -------------------------------------------------------------

# OpenCV: "[ WARN:0@0.008] global cap.cpp:212 open VIDEOIO(FFMPEG): ..."
_OPENCV = re.compile(r"^\[\s*(?P<level>[A-Z]+)\s*:[^\]]*\]\s*(?:global\s+)?(?P<msg>.*)$")
_OPENCV_LEVELS = {
    "FATAL": logging.CRITICAL,
    "ERROR": logging.ERROR,
    "WARN": logging.WARNING,
    "INFO": logging.INFO,
    "DEBUG": logging.DEBUG,
    "VERBOSE": logging.DEBUG,
}
# FFmpeg: "[tcp @ 0x558b16976a00] Connection to tcp://127.0.0.1:1 failed: ..."
_FFMPEG = re.compile(r"^\[(?P<ctx>[\w-]+) @ 0x[0-9a-fA-F]+\]\s*(?P<msg>.*)$")
_FFMPEG_ERROR = re.compile(r"fail|error|refused|invalid|cannot|unable", re.IGNORECASE)

_captured: IO[str] | None = None


def native_record(line: str) -> tuple[str, int, str]:
    """(logger name, level, message) for one line a native library wrote to stderr."""
    if m := _OPENCV.match(line):
        level = _OPENCV_LEVELS.get(m["level"], logging.WARNING)
        return "native.opencv", level, m["msg"]
    if m := _FFMPEG.match(line):  # FFmpeg's level is not in its line: judge by the words
        level = logging.ERROR if _FFMPEG_ERROR.search(m["msg"]) else logging.WARNING
        return "native.ffmpeg", level, f"{m['ctx']}: {m['msg']}"
    return "native", logging.WARNING, line


def _pump(read_fd: int) -> None:
    with open(read_fd, encoding="utf-8", errors="replace", closefd=True) as pipe:
        for raw in pipe:
            line = raw.rstrip("\n")
            if line.strip():
                name, level, msg = native_record(line)
                logging.getLogger(name).log(level, "%s", msg)


def capture_native_stderr() -> IO[str]:
    """Point descriptor 2 at a pipe logged line by line; returns the real stderr, which
    ``sys.stderr``, the log handlers that wrote to it and faulthandler keep using.  Once
    per process; the daemon calls it when it runs a camera source (OpenCV, FFmpeg)."""
    global _captured  # noqa: PLW0603 - descriptor 2 is process-wide: captured once
    if _captured is not None:
        return _captured
    old = sys.stderr
    old.flush()
    real = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    sys.stderr = real
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is old:
            handler.setStream(real)
    with contextlib.suppress(RuntimeError, ValueError):
        if faulthandler.is_enabled():
            faulthandler.enable(file=real)
    pump = threading.Thread(target=_pump, args=(read_fd,), name="native-stderr", daemon=True)
    pump.start()

    def drain() -> None:  # at exit: give descriptor 2 back, log what is still in the pipe
        with contextlib.suppress(OSError):
            os.dup2(real.fileno(), 2)
        pump.join(timeout=2.0)

    atexit.register(drain)
    _captured = real
    return real
