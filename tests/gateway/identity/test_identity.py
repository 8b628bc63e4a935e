from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import KeyringError, RejectedInput
from gateway.identity.pseudonyms import Keyring, canonicalise, decode_key


def test_every_contract_pseudonym_vector(vectors: dict[str, Any], keyring: Keyring) -> None:
    assert len(vectors["pseudonyms"]) >= 7
    for case in vectors["pseudonyms"]:
        assert canonicalise(case["namespace"], case["input"]) == case["canonical"]
        assert keyring.pseudonym(case["namespace"], case["input"]) == case["pseudonym"]


@pytest.mark.parametrize(
    ("namespace", "raw"),
    [
        ("loyalty", "1234567"),  # 7 digits
        ("loyalty", "12345678901234567890"),  # 20 digits
        ("loyalty", "1234 5678 x"),
        ("rfid", "1234567"),
        ("rfid", "12345G78"),
        ("ibeacon", "83256b74-78d0-43a4-8269-05f9dc8a44ba:16"),
        ("ibeacon", "83256b74-78d0-43a4-8269-05f9dc8a44ba:65536:1"),
        ("eddystone", "e157bd5df90aad1dc2fb:0000000001"),
        ("altbeacon", "2f23"),
        ("app", ""),
        ("app", "x" * 129),
        ("app", "tab\there"),
        ("nope", "x"),
    ],
)
def test_rejects_what_does_not_canonicalise(namespace: str, raw: str) -> None:
    with pytest.raises(RejectedInput) as info:
        canonicalise(namespace, raw)
    if len(raw) > 3:
        assert raw not in str(info.value)


def test_short_key_is_an_error_that_says_what_to_do() -> None:
    with pytest.raises(KeyringError, match="at least 32"):
        decode_key("AAEC", "k.key")


def test_key_whitespace_and_missing_padding_are_accepted(vectors: dict[str, Any]) -> None:
    text = vectors["key_base64"].rstrip("=")
    spaced = text[:10] + "\n " + text[10:]
    assert decode_key(spaced, "k") == decode_key(vectors["key_base64"], "k")


def test_rotation_keeps_old_keys_for_lookups(vectors: dict[str, Any]) -> None:
    old = decode_key(vectors["key_base64"], "k")
    ring = Keyring(keys={"k1": old, "k2": bytes(range(100, 132))}, active="k2")
    assert ring.pseudonym("app", "user-42").startswith("k2:")
    assert "k1:M2YsvGP7chEPUUWFye0MSQ" in ring.all_pseudonyms("app", "user-42")


@given(st.text(max_size=40))
def test_loyalty_canonical_is_digits_only(raw: str) -> None:
    try:
        out = canonicalise("loyalty", raw)
    except RejectedInput:
        return
    assert out.isdigit() and out.isascii() and 8 <= len(out) <= 19
