"""Fuzz suite set-up: the hypothesis profiles and a quiet consent logger.

Profiles: ``touchpoint-fuzz-ci`` (the default: bounded, for every CI run) and
``touchpoint-fuzz-deep`` (``TOUCHPOINT_FUZZ=deep``, ``make fuzz``).  They are applied by
``tests.fuzz.support.fuzz_settings`` on each fuzz test, not loaded globally, so the other
tests in the same session keep their own settings.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from tests.fuzz.support import profile_name, register_profiles

register_profiles()


def pytest_report_header() -> str:
    return f"touchpoint fuzz profile: {profile_name()} (set TOUCHPOINT_FUZZ=deep for the long run)"


@pytest.fixture(autouse=True)
def _quiet_rejections() -> Iterator[None]:
    """Invalid pushes log a warning each; thousands of them would only fill the report."""
    logger = logging.getLogger("gateway.consent.sync")
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)
