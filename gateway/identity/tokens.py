"""App tokens (contract §6), receipt tokens (§7) and what a scanned QR code is.

Pure functions, no I/O, time passed in:

    verify_app_token(text, public_key, now, replay)  -> AppClaims      or TokenError
    mint_receipt_token(key_id, key, store, ...)      -> token text
    verify_receipt_token(text, keyring)              -> ReceiptToken   or TokenError
    classify_qr(payload, ...)                        -> QrClass        or TokenError

``TokenError.reason`` is a short countable label (``format``, ``signature``, ``claims``,
``lifetime``, ``not_yet_valid``, ``expired``, ``replayed``, ``unknown_key``, ``tag``).
No message, log line or exception here ever carries a raw payload or token.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import json
import re
import secrets
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from gateway.errors import RejectedInput, TokenError
from gateway.identity.clock import clock_is_set
from gateway.identity.pseudonyms import KEY_ID_RE, Keyring, canonicalise
from gateway.ports import ConsentEvidence

APP_PREFIX = "TPA1."
APP_CLOCK_SKEW_S = 60
# The longest validity (``exp - iat``) a gateway accepts (contract §6).  It bounds how long
# a used token must be remembered (the replay set) and how long a withdrawal's tombstone
# must outlive it: after this, no token issued before the withdrawal is valid.
MAX_APP_TOKEN_LIFETIME_S = 24 * 3600
MAX_TOKEN_CHARS = 4096
KNOWN_PURPOSES = frozenset({"analytics", "linking", "marketing"})
MAX_NONCE_CHARS = 128

RECEIPT_VERSION = 0x01
RECEIPT_TAG_BYTES = 10
RECEIPT_KEY_LABEL = b"touchpoint receipt v1"
_STORE_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")
_B32_RE = re.compile(r"[A-Z2-7]+")
_UINT32_MAX = 0xFFFFFFFF


# --------------------------------------------------------------------------- app tokens


@dataclass(frozen=True, slots=True)
class AppClaims:
    """The claims of a verified app token.  ``purposes``: the known ones, sorted."""

    sub: str
    iat: int
    exp: int
    nonce: str
    purposes: tuple[str, ...]


def replay_key(salt: bytes, sub: str, nonce: str) -> str:
    """The replay set's key for (sub, nonce): a keyed BLAKE2b digest, so neither the
    app subject nor the nonce is kept (in memory or in the buffer database)."""
    msg = sub.encode("utf-8") + b"\0" + nonce.encode("utf-8")
    return hashlib.blake2b(msg, key=salt, digest_size=16).hexdigest()


class ReplaySet:
    """(sub, nonce) pairs already accepted, each kept while its token could still be valid.

    Pairs are kept as ``replay_key`` digests under ``salt`` (random unless given: the
    daemon keeps its salt in the buffer database, so the digests survive a restart).
    ``on_add(key, exp)`` is called for every pair recorded (the daemon persists it);
    ``load`` puts back pairs recorded before.

    An entry is dropped only when its token has expired by the wall clock (``exp <= now``)
    AND the token's remaining lifetime at the time it was recorded has passed on the
    monotonic clock.  So a wall-clock step cannot revive a used token: NTP stepping the
    clock forward and back again (or back, then forward) leaves the entry in place until
    the token is expired by both clocks.

    Memory is bounded: beyond ``max_entries`` the entry closest to its monotonic deadline
    is evicted (its token has the least time left to be replayed in; counted in
    ``evicted``).
    """

    def __init__(
        self,
        max_entries: int = 100_000,
        *,
        mono: Callable[[], float] = time.monotonic,
        salt: bytes | None = None,
        on_add: Callable[[str, int], None] | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.max_entries = max_entries
        self.evicted = 0
        self.salt = salt if salt is not None else secrets.token_bytes(16)
        self.on_add = on_add
        self._mono = mono
        self._expiry: dict[str, int] = {}
        # (monotonic deadline, key); a deadline is re-armed when the wall clock disagrees
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, item: object) -> bool:
        if isinstance(item, tuple) and len(item) == 2:
            sub, nonce = item
            if isinstance(sub, str) and isinstance(nonce, str):
                return replay_key(self.salt, sub, nonce) in self._expiry
        return item in self._expiry

    def prune(self, now: float) -> None:
        """Drop every entry whose token has expired by both clocks."""
        mono = self._mono()
        while self._heap and self._heap[0][0] <= mono:
            _, key = heapq.heappop(self._heap)
            exp = self._expiry.get(key)
            if exp is None:
                continue
            if exp <= now:
                del self._expiry[key]
            else:  # the wall clock went back: keep it for the validity it shows again
                heapq.heappush(self._heap, (mono + (exp - now), key))

    def _put(self, key: str, exp: int, now: float) -> None:
        while len(self._expiry) >= self.max_entries:
            _, old_key = heapq.heappop(self._heap)
            if self._expiry.pop(old_key, None) is not None:
                self.evicted += 1
        self._expiry[key] = exp
        heapq.heappush(self._heap, (self._mono() + max(0.0, exp - now), key))

    def load(self, entries: Iterable[tuple[str, int]], now: float) -> int:
        """Put back (key, exp) pairs recorded before (``on_add`` is not called)."""
        n = 0
        for key, exp in entries:
            if exp > now and key not in self._expiry:
                self._put(key, int(exp), now)
                n += 1
        return n

    def add(self, sub: str, nonce: str, exp: int, now: float) -> bool:
        """Record the pair; False (and nothing recorded) if it is already present."""
        self.prune(now)
        key = replay_key(self.salt, sub, nonce)
        if key in self._expiry:
            return False
        self._put(key, exp, now)
        if self.on_add is not None:
            self.on_add(key, exp)
        return True


def _b64url_decode(part: str) -> bytes:
    if not _B64URL_RE.fullmatch(part) or len(part) % 4 == 1:
        raise TokenError("format", "not base64url")
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("format", "not base64url") from None


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2**63


def _parse_claims(raw: bytes) -> AppClaims:
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise TokenError("claims", "claims are not a JSON object") from None
    if not isinstance(data, dict):
        raise TokenError("claims", "claims are not a JSON object")
    sub, iat, exp = data.get("sub"), data.get("iat"), data.get("exp")
    nonce, purposes = data.get("nonce"), data.get("purposes")
    if not isinstance(sub, str) or not _is_int(iat) or not _is_int(exp):
        raise TokenError("claims", "sub, iat or exp missing or mistyped")
    if not isinstance(nonce, str) or not 1 <= len(nonce) <= MAX_NONCE_CHARS:
        raise TokenError("claims", "nonce missing or mistyped")
    if not isinstance(purposes, list) or not all(isinstance(p, str) for p in purposes):
        raise TokenError("claims", "purposes is not a list of strings")
    try:
        canonicalise("app", sub)
    except RejectedInput:
        raise TokenError("claims", "sub is not 1-128 printable characters") from None
    if exp <= iat:
        raise TokenError("claims", "exp is not after iat")
    if exp - iat > MAX_APP_TOKEN_LIFETIME_S:
        raise TokenError(
            "lifetime", f"valid for more than the maximum {MAX_APP_TOKEN_LIFETIME_S} s"
        )
    known = tuple(sorted(KNOWN_PURPOSES.intersection(purposes)))
    return AppClaims(sub=sub, iat=iat, exp=exp, nonce=nonce, purposes=known)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# The central's Ed25519 public key.  libsodium (PyNaCl) verifies it: the gateway needs
# nothing else of a crypto library, and it costs ~1 MiB resident where cryptography's
# OpenSSL bindings cost ~6 MiB (a Pi's memory budget, `bench memory`).
AppPublicKey = VerifyKey


def load_public_key(raw: bytes) -> AppPublicKey:
    """The central public key from its raw 32 bytes (ValueError if it is not one)."""
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key has 32 bytes, not {len(raw)}")
    return VerifyKey(raw)


def verify_app_token(
    text: str, public_key: AppPublicKey, now: float, replay: ReplaySet | None
) -> AppClaims:
    """Verify an app token and record its (sub, nonce) in ``replay``; or raise TokenError.

    Checks, in order: format, signature, claims (``lifetime``: ``exp - iat`` over
    ``MAX_APP_TOKEN_LIFETIME_S``), a set wall clock (``clock_unset``
    before NTP has set it), validity window ``iat - 60 <= now < exp``, then replay.
    A token is recorded only when all pass.
    """
    if len(text) > MAX_TOKEN_CHARS or not text.startswith(APP_PREFIX):
        raise TokenError("format", "not a TPA1 token")
    parts = text.split(".")
    if len(parts) != 3:
        raise TokenError("format", "expected three dot-separated parts")
    claims_raw = _b64url_decode(parts[1])
    signature = _b64url_decode(parts[2])
    if len(signature) != 64:
        raise TokenError("format", "signature is not 64 bytes")
    signed = f"{parts[0]}.{parts[1]}".encode("ascii")
    try:
        public_key.verify(signed, signature)
    except BadSignatureError:
        raise TokenError("signature", "signature does not verify") from None
    claims = _parse_claims(claims_raw)
    if not clock_is_set(now):
        raise TokenError("clock_unset", "the gateway's clock is not set yet (NTP): cannot judge")
    if now < claims.iat - APP_CLOCK_SKEW_S:
        raise TokenError("not_yet_valid", "issued in the future (check the clock)")
    if now >= claims.exp:
        raise TokenError("expired", "token has expired")
    if replay is not None and not replay.add(claims.sub, claims.nonce, claims.exp, now):
        raise TokenError("replayed", "token was already used")
    return claims


# ----------------------------------------------------------------------- receipt tokens


@dataclass(frozen=True, slots=True)
class ReceiptToken:
    """The fields of a verified receipt token."""

    key_id: str
    issued: int
    counter: int
    lane_number: int
    store: str


def _receipt_key(key: bytes) -> bytes:
    return hmac.new(key, RECEIPT_KEY_LABEL, hashlib.sha256).digest()


def _receipt_tag(key: bytes, key_id: str, payload: bytes) -> bytes:
    msg = key_id.encode("ascii") + b"." + payload
    return hmac.new(_receipt_key(key), msg, hashlib.sha256).digest()[:RECEIPT_TAG_BYTES]


def mint_receipt_token(  # noqa: PLR0917 - the contract's field order
    key_id: str, key: bytes, store: str, lane_number: int, issued: int, counter: int
) -> str:
    """The receipt token text (base32, uppercase, no padding).  ValueError on bad input."""
    if not KEY_ID_RE.fullmatch(key_id):
        raise ValueError("key id must match [a-z0-9]{1,16}")
    if not _STORE_RE.fullmatch(store):
        raise ValueError("store id must match [a-z0-9][a-z0-9-]{0,31}")
    if not 0 <= lane_number <= 0xFF:
        raise ValueError("lane number must be 0..255")
    if not 0 <= issued <= _UINT32_MAX or not 0 <= counter <= _UINT32_MAX:
        raise ValueError("issued and counter must fit in 32 bits")
    payload = struct.pack(">BIIB", RECEIPT_VERSION, issued, counter, lane_number) + store.encode(
        "ascii"
    )
    kid = key_id.encode("ascii")
    raw = bytes([len(kid)]) + kid + payload + _receipt_tag(key, key_id, payload)
    return base64.b32encode(raw).decode("ascii").rstrip("=")


def verify_receipt_token(text: str, keyring: Keyring) -> ReceiptToken:
    """Decode a receipt token and check its tag under the key it names; or TokenError."""
    if len(text) > 256 or not _B32_RE.fullmatch(text) or len(text) % 8 in (1, 3, 6):
        raise TokenError("format", "not a receipt token")
    try:
        raw = base64.b32decode(text + "=" * (-len(text) % 8))
    except (binascii.Error, ValueError):
        raise TokenError("format", "not a receipt token") from None
    kid_len = raw[0]
    fixed = 1 + kid_len + 10  # key id, version, issued, counter, lane
    if not 1 <= kid_len <= 16 or len(raw) < fixed + 1 + RECEIPT_TAG_BYTES:
        raise TokenError("format", "receipt token too short")
    try:
        key_id = raw[1 : 1 + kid_len].decode("ascii")
        store = raw[fixed:-RECEIPT_TAG_BYTES].decode("ascii")
    except UnicodeDecodeError:
        raise TokenError("format", "key id or store id is not ASCII") from None
    payload = raw[1 + kid_len : -RECEIPT_TAG_BYTES]
    version, issued, counter, lane = struct.unpack(">BIIB", payload[:10])
    if version != RECEIPT_VERSION or not _STORE_RE.fullmatch(store):
        raise TokenError("format", "unknown version or bad store id")
    key = keyring.keys.get(key_id)
    if key is None:
        raise TokenError("unknown_key", "receipt token names a key id not in the keyring")
    if not hmac.compare_digest(_receipt_tag(key, key_id, payload), raw[-RECEIPT_TAG_BYTES:]):
        raise TokenError("tag", "receipt token tag does not verify")
    return ReceiptToken(key_id, issued, counter, lane, store)


# ------------------------------------------------------------------------ classification


@dataclass(frozen=True, slots=True)
class QrClass:
    """What a scanned QR code is.  ``other`` keeps nothing of the payload.

    app:     ``subject`` is the pseudonym of ``app:<sub>``; ``evidence`` its purposes
             (None when the token names no known purpose).
    receipt: ``receipt`` is the verified token text (without the URL prefix).
    """

    kind: Literal["app", "receipt", "other"]
    subject: str | None = None
    evidence: ConsentEvidence | None = None
    receipt: str | None = None


MAX_QR_BYTES = 8192


def classify_qr(
    payload: bytes,
    *,
    keyring: Keyring,
    app_public_key: AppPublicKey | None,
    receipt_prefixes: Iterable[str],
    now: float,
    replay: ReplaySet | None,
    evidence_ttl_s: float = 24 * 3600,
) -> QrClass:
    """Classify one decoded QR payload; raises TokenError for a token that fails.

    A payload that is neither an app token nor starts with a receipt prefix is ``other``
    (huge, binary or invalid UTF-8 included).  Without a public key, app tokens are
    rejected with reason ``no_public_key``.
    """
    if len(payload) > MAX_QR_BYTES:
        return QrClass("other")
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return QrClass("other")
    if text.startswith(APP_PREFIX):
        if app_public_key is None:
            raise TokenError("no_public_key", "no central public key configured")
        claims = verify_app_token(text, app_public_key, now, replay)
        subject = keyring.pseudonym_of_canonical("app", claims.sub)
        evidence = (
            ConsentEvidence(subject, claims.purposes, now + evidence_ttl_s)
            if claims.purposes
            else None
        )
        return QrClass("app", subject=subject, evidence=evidence)
    for prefix in receipt_prefixes:
        if prefix and len(text) > len(prefix) and text[: len(prefix)].upper() == prefix.upper():
            token = text[len(prefix) :].upper()
            verify_receipt_token(token, keyring)
            return QrClass("receipt", receipt=token)
    return QrClass("other")
