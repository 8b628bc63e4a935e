"""App tokens, receipt tokens and QR classification, fuzzed below the signature.

A mutated token under the contract's key only ever reaches the signature check, so the
claims are built and broken first (types swapped, huge ints, bad nonces and subjects,
invalid JSON or UTF-8) and then signed with a fuzz key: the claims parser and the
validity window are what get exercised.  Receipt tokens are built field by field with our
own encoder (wrong versions, key ids, stores), optionally mutated, and re-tagged so the
layout checks behind the tag are reached.  Only TokenError may escape; what verifies has
every documented property (``targets._check_claims``, ``targets.verify_receipt_checked``).
"""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.support import TRICKY_CHARS, bounded, fuzz_settings, json_values, mutated
from tests.fuzz.targets import (
    FUZZ_PUBLIC,
    KEYRING,
    RECEIPT_PREFIX,
    VECTORS,
    receipt_tag,
    run_qr,
    sign_app_token,
    verify_app_checked,
    verify_receipt_checked,
)

_BASE_CLAIMS = VECTORS["app_tokens"][0]["claims"]
_IAT = _BASE_CLAIMS["iat"]
_edge_ints = st.sampled_from([-1, 0, 1, _IAT - 61, _IAT, _IAT + 300, 2**53, 2**63, 2**63 + 1])
_field_values = {
    "sub": st.one_of(st.text(max_size=130), st.sampled_from(["", "a" * 128, "a" * 129, "x\ny"]),
                     st.text(TRICKY_CHARS, max_size=5)),
    "iat": _edge_ints | st.integers(),
    "exp": _edge_ints | st.integers(),
    "nonce": st.one_of(st.text(max_size=130), st.sampled_from(["", "n" * 128, "n" * 129])),
    "purposes": st.lists(
        st.sampled_from(["analytics", "linking", "marketing", "x", ""]) | st.text(max_size=5),
        max_size=5,
    ),
}  # fmt: skip


@st.composite
def _claims_bytes(draw: st.DrawFn) -> bytes:
    claims: Any = dict(_BASE_CLAIMS)
    for key in draw(st.lists(st.sampled_from(sorted(_field_values)), max_size=4)):
        action = draw(st.sampled_from(("valid", "valid", "any", "drop")))
        if action == "valid":
            claims[key] = draw(_field_values[key])
        elif action == "any":
            claims[key] = draw(json_values())
        else:
            claims.pop(key, None)
    if draw(st.integers(0, 9)) == 0:
        claims = draw(json_values())  # not an object at all
    raw = json.dumps(claims, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 4)) == 0:
        raw = draw(mutated([raw], max_ops=3))  # broken JSON, broken UTF-8
    return raw


@fuzz_settings()
@given(claims=_claims_bytes(), now_offset=st.sampled_from([-61, -60, 0, 299, 300, 10**6]))
def test_signed_hostile_claims_give_token_error_or_valid_claims(
    claims: bytes, now_offset: int
) -> None:
    bounded(verify_app_checked, sign_app_token(claims), FUZZ_PUBLIC, float(_IAT + now_offset))


@fuzz_settings()
@given(claims=_claims_bytes(), data=st.data())
def test_mutated_token_text_gives_token_error_or_valid_claims(
    claims: bytes, data: st.DataObject
) -> None:
    token = sign_app_token(claims)
    text = data.draw(mutated([token.encode()], max_ops=3)).decode("utf-8", "surrogateescape")
    bounded(verify_app_checked, text, FUZZ_PUBLIC, float(_IAT))


@st.composite
def _receipt_text(draw: st.DrawFn) -> str:
    odd_kid = st.sampled_from([b"k3", b"", b"k" * 16, b"k" * 17, b"\xff"])
    kid = draw(st.sampled_from([b"k1", b"k2"]) | odd_kid)
    odd_store = st.sampled_from([b"-bad", b"UPPER", b"x" * 33, b""]) | st.binary(max_size=8)
    store = draw(
        st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=32).map(
            lambda s: ("s" + s)[:32].encode()
        )
        | odd_store
    )
    payload = (
        struct.pack(
            ">BIIB",
            draw(st.sampled_from([1, 1, 0, 2, 255])),
            draw(st.integers(0, 2**32 - 1)),
            draw(st.integers(0, 2**32 - 1)),
            draw(st.integers(0, 255)),
        )
        + store
    )
    key = KEYRING.keys.get(kid.decode("ascii", "replace"), b"\x00" * 32)
    raw = bytes([len(kid)]) + kid + payload + receipt_tag(key, kid, payload)
    if draw(st.integers(0, 2)) == 0:
        raw = draw(mutated([raw], max_ops=3))
        if draw(st.booleans()) and raw and len(raw) >= raw[0] + 11:
            rkid = raw[1 : 1 + raw[0]]
            rkey = KEYRING.keys.get(rkid.decode("ascii", "replace"), b"\x00" * 32)
            raw = raw[:-10] + receipt_tag(rkey, rkid, raw[1 + len(rkid) : -10])
    text = base64.b32encode(raw).decode("ascii")
    return text if draw(st.integers(0, 4)) == 0 else text.rstrip("=")


@fuzz_settings()
@given(text=_receipt_text())
def test_hostile_receipt_tokens_give_token_error_or_valid_fields(text: str) -> None:
    bounded(verify_receipt_checked, text)


@fuzz_settings()
@given(
    payload=st.one_of(
        _claims_bytes().map(lambda c: sign_app_token(c).encode()),
        st.builds(
            lambda prefix, token: (prefix + token).encode("utf-8", "surrogatepass"),
            st.sampled_from(
                [RECEIPT_PREFIX, RECEIPT_PREFIX.lower(), "HTTPS://R.EXAMPLE.COM/", "ß"]
            ),
            _receipt_text(),
        ),
        st.binary(max_size=200),
        st.binary(min_size=8190, max_size=8194),
    )
)
def test_any_scanned_payload_is_classified_or_token_error(payload: bytes) -> None:
    bounded(run_qr, payload)
