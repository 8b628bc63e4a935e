"""The redaction filter: the last line of defence for logs."""

from __future__ import annotations

import logging

import pytest

from gateway.logs import RedactingFilter, redact, setup_logging


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
