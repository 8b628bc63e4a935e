"""Fixtures of the consent sync tests: a real consent registry server and its token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from simulators.central.consent_api import ConsentAPI


@pytest.fixture
def api() -> Iterator[ConsentAPI]:
    with ConsentAPI(token="s3cret") as server:
        yield server


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("s3cret\n", encoding="utf-8")
    return path
