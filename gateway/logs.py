"""Logging: one readable line per event worth a human's attention, journald-friendly.

A redaction filter is the last line of defence: long digit runs (card numbers) and MAC
addresses are masked in every record, even though the code never logs raw identifiers.
"""

from __future__ import annotations

import logging
import os
import re
import sys

# Standalone runs of 8+ digits (card numbers); not digits inside hex ids or words.
_DIGITS = re.compile(r"(?<![0-9A-Za-z_])\d{8,}(?![0-9A-Za-z_])")
_MAC = re.compile(r"\b(?:[0-9A-Fa-f]{2}[:-]){5}[0-9A-Fa-f]{2}\b")


def redact(text: str) -> str:
    return _MAC.sub("<mac>", _DIGITS.sub("<digits>", text))


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


def setup_logging(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        fmt = "%(levelname)s %(name)s: %(message)s"  # journald adds time and unit
    else:
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("bleak").setLevel(max(root.level, logging.WARNING))
