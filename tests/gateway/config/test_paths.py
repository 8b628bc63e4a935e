"""${CREDENTIALS_DIRECTORY}/NAME in config values: expanded, or refused with advice."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config.credentials import (
    CredentialPathError,
    credential_references,
    expand_credentials,
    expand_credentials_in,
)

CREDS = "/run/credentials/touchpoint-gateway.service"


def test_expands_a_credential_reference() -> None:
    assert expand_credentials("${CREDENTIALS_DIRECTORY}/k1.key", CREDS) == f"{CREDS}/k1.key"
    assert expand_credentials("${CREDENTIALS_DIRECTORY}/k1.key", CREDS + "/") == f"{CREDS}/k1.key"


@pytest.mark.parametrize("value", ["/etc/touchpoint-gateway/tls/ca.pem", "k1.key", "", "$HOME"])
def test_values_without_a_reference_are_unchanged(value: str) -> None:
    assert expand_credentials(value, None) == value


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("${CREDENTIAL_DIRECTORY}/k1.key", "unknown variable ${CREDENTIAL_DIRECTORY}"),
        ("${HOME}/k1.key", "unknown variable ${HOME}"),
        ("/etc/${CREDENTIALS_DIRECTORY}/k1.key", "write credentials as"),
        ("${CREDENTIALS_DIRECTORY}", "write credentials as"),
        ("${CREDENTIALS_DIRECTORY}/", "write credentials as"),
        ("${CREDENTIALS_DIRECTORY}/keys/k1.key", "write credentials as"),
        ("${CREDENTIALS_DIRECTORY}/..", "write credentials as"),
        ("${CREDENTIALS_DIRECTORY}k1.key", "write credentials as"),
    ],
)
def test_malformed_references_are_refused(value: str, why: str) -> None:
    with pytest.raises(CredentialPathError, match=why.replace("$", r"\$").replace("{", r"\{")):
        expand_credentials(value, CREDS)


def test_unset_or_relative_directory_is_refused_with_advice() -> None:
    with pytest.raises(CredentialPathError, match="CREDENTIALS_DIRECTORY=/etc/touchpoint"):
        expand_credentials("${CREDENTIALS_DIRECTORY}/k1.key", None)
    with pytest.raises(CredentialPathError, match="not an absolute path"):
        expand_credentials("${CREDENTIALS_DIRECTORY}/k1.key", "run/creds")


def test_expands_a_whole_config_and_reports_every_problem_by_key_path() -> None:
    data: dict[str, Any] = {
        "keyring": {"active": "k1", "keys": {"k1": "${CREDENTIALS_DIRECTORY}/k1.key"}},
        "mqtt": {"password_file": "${CREDENTIALS_DIRECTORY}/mqtt.password", "port": 8883},
        "sources": [{"name": "a", "device": "${DEV}/ttyUSB0"}],
    }
    out, problems = expand_credentials_in(data, CREDS)
    assert out["keyring"]["keys"]["k1"] == f"{CREDS}/k1.key"
    assert out["mqtt"] == {"password_file": f"{CREDS}/mqtt.password", "port": 8883}
    assert problems == [
        ("sources[0].device", "unknown variable ${DEV}: only ${CREDENTIALS_DIRECTORY} is expanded")
    ]
    assert data["keyring"]["keys"]["k1"] == "${CREDENTIALS_DIRECTORY}/k1.key"  # not mutated
    assert credential_references(data) == {
        "keyring.keys.k1": "k1.key",
        "mqtt.password_file": "mqtt.password",
    }
