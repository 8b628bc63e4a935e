"""Shared fixtures: the contract vectors, a tenant keyring; the simulated store's fixtures
(``broker``: a real mosquitto, ``bus``: a private system D-Bus for the fake BlueZ, and the
rest) come from the simulators' pytest plugin, as an integrator gets them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from gateway.config.credentials import write_secret
from gateway.identity.pseudonyms import (
    ALLOW_TEST_KEY_VALUE,
    ALLOW_TEST_KEY_VAR,
    Keyring,
    decode_key,
)

# touchpoint-simulators registers this plugin by entry point under this same name (make
# install installs it), so pytest loads it once; naming it here also covers a checkout
# where only the daemon is installed.
pytest_plugins = ["simulators.pytest_plugin"]

# .ci/fresh-root sets this in its root: tests marked `host` (FUSE mounts, Debian roots of
# their own) need the machine itself, and .ci/run runs them there (`pytest -m host`).
FRESH_ROOT_VAR = "TOUCHPOINT_FRESH_ROOT"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not os.environ.get(FRESH_ROOT_VAR):
        return
    skip = pytest.mark.skip(
        reason="needs the host (marker `host`): inside .ci/fresh-root's root; .ci/run runs it "
        "on the host"
    )
    for item in items:
        if item.get_closest_marker("host") is not None:
            item.add_marker(skip)


VECTORS_PATH = Path(__file__).resolve().parents[1] / "gateway" / "contract" / "vectors.json"


@pytest.fixture(scope="session")
def vectors() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))
    return data


@pytest.fixture(scope="session")
def keyring(vectors: dict[str, Any]) -> Keyring:
    return Keyring(
        keys={vectors["key_id"]: decode_key(vectors["key_base64"], "vectors")},
        active=vectors["key_id"],
    )


@pytest.fixture
def key_file(tmp_path: Path, vectors: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Path:
    """The contract's vector key in a file (0600).  A key file may hold that published key
    only with the explicit opt-in (gateway.identity.pseudonyms.ALLOW_TEST_KEY_VAR), set here for the
    test alone; it is ignored under systemd."""
    monkeypatch.setenv(ALLOW_TEST_KEY_VAR, ALLOW_TEST_KEY_VALUE)
    monkeypatch.delenv("INVOCATION_ID", raising=False)
    path = tmp_path / "k1.key"
    write_secret(path, vectors["key_base64"] + "\n")
    return path
