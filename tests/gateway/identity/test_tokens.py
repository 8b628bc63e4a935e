"""App tokens, receipt tokens and QR classification against the contract vectors."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.errors import TokenError
from gateway.identity.clock import CLOCK_FLOOR
from gateway.identity.pseudonyms import Keyring
from gateway.identity.tokens import (
    MAX_APP_TOKEN_LIFETIME_S,
    AppPublicKey,
    ReplaySet,
    classify_qr,
    load_public_key,
    mint_receipt_token,
    verify_app_token,
    verify_receipt_token,
)

PREFIX = "HTTPS://R.EXAMPLE.COM/R/"


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign(private: Ed25519PrivateKey, claims: dict[str, Any]) -> str:
    head = "TPA1." + b64u(json.dumps(claims).encode())
    return head + "." + b64u(private.sign(head.encode("ascii")))


@pytest.fixture(scope="module")
def private() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def public(private: Ed25519PrivateKey) -> AppPublicKey:
    return load_public_key(private.public_key().public_bytes_raw())


@pytest.fixture(scope="module")
def vector_key(vectors: dict[str, Any]) -> AppPublicKey:
    return load_public_key(base64.b64decode(vectors["app_token_public_key_base64"]))


T0 = 1_790_000_000  # 2026-09-21: tokens are judged only by a set clock (gateway.identity.clock)


def claims(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": "user-7",
        "iat": T0,
        "exp": T0 + 300,
        "nonce": "abc",
        "purposes": ["linking", "analytics"],
    }
    base.update(over)
    return base


# ----------------------------------------------------------------------------- vectors


def test_app_token_vectors(
    vectors: dict[str, Any], vector_key: AppPublicKey, keyring: Keyring
) -> None:
    for vec in vectors["app_tokens"]:
        want = vec["claims"]
        got = verify_app_token(vec["token"], vector_key, want["iat"], ReplaySet())
        assert (got.sub, got.iat, got.exp, got.nonce) == (
            want["sub"],
            want["iat"],
            want["exp"],
            want["nonce"],
        )
        assert got.purposes == tuple(sorted(want["purposes"]))
        result = classify_qr(
            vec["token"].encode(),
            keyring=keyring,
            app_public_key=vector_key,
            receipt_prefixes=[PREFIX],
            now=want["iat"],
            replay=ReplaySet(),
        )
        assert result.kind == "app"
        assert result.subject == vec["subject_pseudonym"]
        assert result.evidence is not None
        assert result.evidence.subject == vec["subject_pseudonym"]
        assert result.evidence.purposes == tuple(sorted(want["purposes"]))
        assert result.evidence.expires == want["iat"] + 24 * 3600


def test_invalid_app_token_vectors(vectors: dict[str, Any], vector_key: AppPublicKey) -> None:
    now = vectors["app_tokens"][0]["claims"]["iat"]
    reasons = []
    for token in vectors["app_tokens_invalid"]:
        replay = ReplaySet()
        with pytest.raises(TokenError) as info:
            verify_app_token(token, vector_key, now, replay)
        reasons.append(info.value.reason)
        assert len(replay) == 0
        assert token not in str(info.value)
    assert reasons == ["signature", "signature", "format"]


def test_refused_app_token_vectors(vectors: dict[str, Any], vector_key: AppPublicKey) -> None:
    """Signed correctly, yet refused: valid for longer than the contract's maximum."""
    assert vectors["app_tokens_refused"]
    for vec in vectors["app_tokens_refused"]:
        claims = vec["claims"]
        assert claims["exp"] - claims["iat"] > MAX_APP_TOKEN_LIFETIME_S
        replay = ReplaySet()
        with pytest.raises(TokenError) as info:
            verify_app_token(vec["token"], vector_key, vec["now"], replay)
        assert info.value.reason == vec["reason"]
        assert len(replay) == 0


def test_lifetime_up_to_the_maximum_is_accepted_beyond_refused(
    private: Ed25519PrivateKey, public: AppPublicKey
) -> None:
    at_max = sign(private, claims(exp=T0 + MAX_APP_TOKEN_LIFETIME_S))
    assert verify_app_token(at_max, public, T0, ReplaySet()).exp == T0 + MAX_APP_TOKEN_LIFETIME_S
    for exp in (T0 + MAX_APP_TOKEN_LIFETIME_S + 1, T0 + 10 * 365 * 86400):
        with pytest.raises(TokenError) as info:
            verify_app_token(sign(private, claims(exp=exp)), public, T0, ReplaySet())
        assert info.value.reason == "lifetime"


def test_replay_set_reports_each_pair_once_and_takes_back_what_it_reported(
    private: Ed25519PrivateKey, public: AppPublicKey
) -> None:
    """What the daemon persists: a salted digest and exp, never the subject or nonce;
    a set loaded from those entries (same salt) refuses the token again."""
    recorded: list[tuple[str, int]] = []
    first = ReplaySet(salt=b"s" * 16, on_add=lambda k, e: recorded.append((k, e)))
    token = sign(private, claims(sub="user-secret", nonce="nonce-secret"))
    verify_app_token(token, public, T0, first)
    with pytest.raises(TokenError):
        verify_app_token(token, public, T0, first)
    assert len(recorded) == 1 and recorded[0][1] == T0 + 300
    assert "secret" not in recorded[0][0]
    again = ReplaySet(salt=b"s" * 16)
    assert again.load(recorded, T0) == 1
    with pytest.raises(TokenError) as info:
        verify_app_token(token, public, T0 + 1, again)
    assert info.value.reason == "replayed"
    assert ReplaySet(salt=b"s" * 16).load(recorded, T0 + 300) == 0  # expired: not loaded


def test_receipt_token_vectors(vectors: dict[str, Any], keyring: Keyring) -> None:
    key = keyring.keys[vectors["key_id"]]
    for vec in vectors["receipt_tokens"]:
        token = mint_receipt_token(
            vectors["key_id"], key, vec["store"], vec["lane"], vec["issued"], vec["counter"]
        )
        assert token == vec["token"]
        got = verify_receipt_token(token, keyring)
        assert (got.key_id, got.store, got.lane_number, got.issued, got.counter) == (
            vectors["key_id"],
            vec["store"],
            vec["lane"],
            vec["issued"],
            vec["counter"],
        )


# ------------------------------------------------------------------------ app tokens


@pytest.mark.parametrize(
    ("now", "reason"),
    [
        (T0 - 61, "not_yet_valid"),
        (T0 - 60.001, "not_yet_valid"),
        (T0 - 60, None),
        (T0 + 299.999, None),
        (T0 + 300, "expired"),
    ],
)
def test_validity_window_edges(
    private: Ed25519PrivateKey, public: AppPublicKey, now: float, reason: str | None
) -> None:
    token = sign(private, claims())
    if reason is None:
        assert verify_app_token(token, public, now, ReplaySet()).sub == "user-7"
    else:
        with pytest.raises(TokenError) as info:
            verify_app_token(token, public, now, ReplaySet())
        assert info.value.reason == reason


def test_replay_rejected_then_forgotten_after_exp(
    private: Ed25519PrivateKey, public: AppPublicKey
) -> None:
    mono = [0.0]
    replay = ReplaySet(mono=lambda: mono[0])
    token = sign(private, claims())
    verify_app_token(token, public, T0, replay)
    with pytest.raises(TokenError) as info:
        verify_app_token(token, public, T0 + 1, replay)
    assert info.value.reason == "replayed"
    # same nonce, different subject: a different pair
    verify_app_token(sign(private, claims(sub="user-8")), public, T0 + 1, replay)
    assert len(replay) == 2
    mono[0] = 300.0
    replay.prune(T0 + 300)
    assert len(replay) == 0


def test_rejected_token_is_not_recorded(private: Ed25519PrivateKey, public: AppPublicKey) -> None:
    replay = ReplaySet()
    token = sign(private, claims())
    with pytest.raises(TokenError):
        verify_app_token(token, public, T0 + 300, replay)
    assert len(replay) == 0


def test_replay_set_hard_cap_evicts_soonest_expiry() -> None:
    replay = ReplaySet(max_entries=3)
    for i, exp in enumerate([50, 10, 30]):
        assert replay.add("s", str(i), exp, now=0)
    assert replay.add("s", "new", 40, now=0)
    assert len(replay) == 3
    assert ("s", "1") not in replay
    assert replay.evicted == 1
    assert not replay.add("s", "0", 50, now=0)


@pytest.mark.parametrize(
    "bad",
    [
        {"sub": ""},
        {"sub": "x" * 129},
        {"sub": "tab\there"},
        {"sub": 5},
        {"iat": "1000000"},
        {"iat": True},
        {"exp": T0 - 1},
        {"nonce": ""},
        {"nonce": None},
        {"purposes": "analytics"},
        {"purposes": [1]},
    ],
)
def test_bad_claims(private: Ed25519PrivateKey, public: AppPublicKey, bad: dict[str, Any]) -> None:
    with pytest.raises(TokenError) as info:
        verify_app_token(sign(private, claims(**bad)), public, T0, ReplaySet())
    assert info.value.reason == "claims"


def test_signed_garbage_claims(private: Ed25519PrivateKey, public: AppPublicKey) -> None:
    for body in [b"[" * 3000, b"\xff\xfe", b"null", b'{"iat": NaN}', b"1" * 5000]:
        head = "TPA1." + b64u(body)
        token = head + "." + b64u(private.sign(head.encode()))
        with pytest.raises(TokenError) as info:
            verify_app_token(token, public, T0, None)
        assert info.value.reason in ("claims", "format")


def test_unknown_purposes_dropped(private: Ed25519PrivateKey, public: AppPublicKey) -> None:
    got = verify_app_token(
        sign(private, claims(purposes=["marketing", "spam", "analytics", "marketing"])),
        public,
        T0,
        None,
    )
    assert got.purposes == ("analytics", "marketing")


def test_wrong_key_is_signature(vectors: dict[str, Any], public: AppPublicKey) -> None:
    vec = vectors["app_tokens"][0]
    with pytest.raises(TokenError) as info:
        verify_app_token(vec["token"], public, vec["claims"]["iat"], None)
    assert info.value.reason == "signature"


# --------------------------------------------------------------------- receipt tokens


def test_receipt_token_all_keys_tried_by_key_id(vectors: dict[str, Any]) -> None:
    old, new = bytes(range(32)), bytes(range(1, 33))
    ring = Keyring(keys={"k1": old, "k2": new}, active="k2")
    for kid, key in (("k1", old), ("k2", new)):
        token = mint_receipt_token(kid, key, "nl-ams-001", 255, 2**32 - 1, 0)
        got = verify_receipt_token(token, ring)
        assert (got.key_id, got.lane_number, got.issued, got.counter) == (kid, 255, 2**32 - 1, 0)
    foreign = mint_receipt_token("k9", old, "nl-ams-001", 1, 1, 1)
    with pytest.raises(TokenError) as info:
        verify_receipt_token(foreign, ring)
    assert info.value.reason == "unknown_key"


def test_receipt_token_tampered(vectors: dict[str, Any], keyring: Keyring) -> None:
    token = vectors["receipt_tokens"][0]["token"]
    reasons = set()
    for i in range(len(token)):
        flipped = token[:i] + ("B" if token[i] != "B" else "C") + token[i + 1 :]
        with pytest.raises(TokenError) as info:
            verify_receipt_token(flipped, keyring)
        reasons.add(info.value.reason)
    assert "tag" in reasons
    for bad in ["", "A", "a" * 10, "AAAA", "0000", token + "A", token[:-2]]:
        with pytest.raises(TokenError):
            verify_receipt_token(bad, keyring)


@pytest.mark.parametrize(
    "args",
    [
        ("K1", "nl-ams-001", 1, 1, 1),
        ("k1", "NL", 1, 1, 1),
        ("k1", "nl", 256, 1, 1),
        ("k1", "nl", 1, 2**32, 1),
        ("k1", "nl", 1, 1, -1),
    ],
)
def test_mint_rejects_bad_input(args: tuple[Any, ...]) -> None:
    kid, store, lane, issued, counter = args
    with pytest.raises(ValueError):
        mint_receipt_token(kid, bytes(32), store, lane, issued, counter)


# ---------------------------------------------------------------------- classification


def classify(payload: bytes, keyring: Keyring, key: AppPublicKey | None, **kw: Any) -> Any:
    return classify_qr(
        payload,
        keyring=keyring,
        app_public_key=key,
        receipt_prefixes=kw.pop("prefixes", [PREFIX]),
        now=kw.pop("now", T0),
        replay=kw.pop("replay", None),
        **kw,
    )


def test_classify_receipt(vectors: dict[str, Any], keyring: Keyring) -> None:
    token = vectors["receipt_tokens"][0]["token"]
    got = classify((PREFIX + token).encode(), keyring, None)
    assert (got.kind, got.receipt, got.subject) == ("receipt", token, None)
    lower = classify((PREFIX.lower() + token).encode(), keyring, None)
    assert lower.receipt == token
    with pytest.raises(TokenError) as info:
        classify((PREFIX + token[:-1] + "A").encode(), keyring, None)
    assert info.value.reason in ("tag", "format")
    assert classify(token.encode(), keyring, None).kind == "other"


def test_classify_other_keeps_nothing(keyring: Keyring, public: AppPublicKey) -> None:
    for payload in [b"https://shop.example/x", b"", b"\xff\x00", b"A" * 100_000, b"TPA1"]:
        got = classify(payload, keyring, public)
        assert got.kind == "other"
        assert (got.subject, got.evidence, got.receipt) == (None, None, None)


def test_classify_app_without_key_is_rejected(private: Ed25519PrivateKey, keyring: Keyring) -> None:
    with pytest.raises(TokenError) as info:
        classify(sign(private, claims()).encode(), keyring, None)
    assert info.value.reason == "no_public_key"


def test_classify_app_without_known_purposes_has_no_evidence(
    private: Ed25519PrivateKey, public: AppPublicKey, keyring: Keyring
) -> None:
    got = classify(sign(private, claims(purposes=[])).encode(), keyring, public)
    assert got.kind == "app"
    assert got.subject == keyring.pseudonym("app", "user-7")
    assert got.evidence is None


_hostile = st.one_of(
    st.binary(max_size=600),
    st.builds(lambda b: b"TPA1." + b, st.binary(max_size=300)),
    st.builds(lambda s: ("TPA1." + s).encode(), st.text(max_size=300)),
    st.builds(
        lambda s: (PREFIX + s).encode(),
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ234567=a", max_size=120),
    ),
    st.builds(
        lambda a, b: f"TPA1.{a}.{b}".encode(),
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123456789-_=.", max_size=200),
        st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123456789-_=", max_size=100),
    ),
)


@settings(max_examples=400, deadline=None)
@given(payload=_hostile)
def test_classify_survives_any_bytes(
    payload: bytes, keyring: Keyring, vector_key: AppPublicKey
) -> None:
    try:
        got = classify(payload, keyring, vector_key, replay=ReplaySet())
    except TokenError as exc:
        assert exc.reason
    else:
        assert got.kind in ("other", "receipt", "app")


# ------------------------------------------------------------------------- clock steps


def test_an_unset_clock_judges_no_token(private: Ed25519PrivateKey, public: AppPublicKey) -> None:
    """A Pi booted without RTC reads 1970 until NTP: tokens are refused as clock_unset."""
    token = sign(private, claims())
    replay = ReplaySet()
    for boot_clock in (0.0, 86_400.0 * 365, CLOCK_FLOOR - 1):
        with pytest.raises(TokenError) as info:
            verify_app_token(token, public, boot_clock, replay)
        assert info.value.reason == "clock_unset"
    assert len(replay) == 0
    # NTP sets the clock: the same token is judged, and accepted, once
    assert verify_app_token(token, public, T0 + 10, replay).sub == "user-7"


@pytest.mark.parametrize("step_s", [86_400.0, -86_400.0, 3_600.0 * 24 * 365])
def test_a_used_token_stays_used_across_wall_clock_steps(
    private: Ed25519PrivateKey, public: AppPublicKey, step_s: float
) -> None:
    """NTP stepping the clock away and back cannot make a used token usable again."""
    mono = [0.0]
    replay = ReplaySet(mono=lambda: mono[0])
    token = sign(private, claims())  # valid T0 - 60 .. T0 + 300
    verify_app_token(token, public, T0 + 10, replay)
    # the clock steps away (the token is expired or not yet valid there), time passes,
    # the replay set is pruned on every use...
    mono[0] = 20.0
    with pytest.raises(TokenError) as away:
        verify_app_token(token, public, T0 + 20 + step_s, replay)
    assert away.value.reason in ("expired", "not_yet_valid")
    replay.prune(T0 + 20 + step_s)
    # ...and steps back while the token is still valid: it is still a replay
    mono[0] = 30.0
    with pytest.raises(TokenError) as back:
        verify_app_token(token, public, T0 + 30, replay)
    assert back.value.reason == "replayed"
    # once expired by both clocks it is forgotten
    mono[0] = 400.0
    replay.prune(T0 + 400)
    assert len(replay) == 0


def test_replay_entries_outlive_a_backward_step_until_the_wall_clock_expires_them() -> None:
    mono = [0.0]
    replay = ReplaySet(mono=lambda: mono[0])
    assert replay.add("s", "n", exp=T0 + 100, now=T0)
    mono[0] = 100.0  # its lifetime has passed on the monotonic clock...
    replay.prune(T0 - 3_600 + 100)  # ...but the wall clock was stepped back an hour
    assert ("s", "n") in replay, "still valid by the wall clock: a replay must be refused"
    mono[0] = 3_700.0
    replay.prune(T0 + 100)
    assert ("s", "n") not in replay
