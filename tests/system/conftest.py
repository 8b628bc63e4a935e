"""Fixtures shared by the system tests of consent and erasure."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from simulators.central.consent_api import ConsentAPI
from tests.system.harness import STORE
from tests.system.test_consent_system import CONSENTED, TOKEN


@pytest.fixture
def api() -> Iterator[ConsentAPI]:
    """The central's consent API, every subject of ``CONSENTED`` granted."""
    with ConsentAPI(token=TOKEN) as a:
        for s in CONSENTED:
            a.grant(STORE, s, ["analytics", "linking"])
        yield a
