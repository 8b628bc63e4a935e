"""Pseudonyms (contract §2): canonical forms and the keyed hash.

Raw identifiers go in, pseudonyms come out; nothing here logs or stores a raw value.
The functions are pure: ``canonicalise`` checks and normalises one raw identifier,
``Keyring.pseudonym`` hashes a canonical value under the active key.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from gateway.config.credentials import CREDENTIALS_VAR, secret_file_problem
from gateway.errors import KeyringError, RejectedInput

NAMESPACES = ("loyalty", "rfid", "ibeacon", "eddystone", "altbeacon", "app")
KEY_ID_RE = re.compile(r"[a-z0-9]{1,16}")
MIN_KEY_BYTES = 32
MIN_DISTINCT_KEY_BYTES = 16  # 32 random bytes hold ~31 distinct values; 16 is never chance
# Keys printed in the contract (gateway/contract/vectors.json): anyone can reverse their
# pseudonyms.  A key file holding one is refused unless ALLOW_TEST_KEY_VAR is set to
# ALLOW_TEST_KEY_VALUE and the process is not a systemd service (no INVOCATION_ID): the
# test suite's opt-in, which a unit file or a copied config cannot set by accident.
PUBLISHED_TEST_KEYS = frozenset({bytes(range(32))})
ALLOW_TEST_KEY_VAR = "TOUCHPOINT_ALLOW_PUBLISHED_TEST_KEY"
ALLOW_TEST_KEY_VALUE = "yes-this-key-is-public"

_LOYALTY_RE = re.compile(r"[0-9]{8,19}")
_RFID_RE = re.compile(r"[0-9A-F]{8,20}")
_UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_HEX_RE = re.compile(r"[0-9a-f]+")


def _loyalty(raw: str) -> str:
    value = raw.replace(" ", "").replace("-", "")
    if not _LOYALTY_RE.fullmatch(value):
        raise RejectedInput("loyalty_format", "expected 8-19 digits")
    return value


def _rfid(raw: str) -> str:
    value = re.sub(r"[\s:\-.]", "", raw).upper()
    if not _RFID_RE.fullmatch(value):
        raise RejectedInput("rfid_format", "expected 8-20 hex digits")
    return value


def _int_in(text: str, low: int, high: int, reason: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 6:
        raise RejectedInput(reason, "not a decimal number")
    value = int(text)
    if not low <= value <= high:
        raise RejectedInput(reason, f"outside {low}..{high}")
    return value


def _ibeacon(raw: str) -> str:
    parts = raw.lower().split(":")
    if len(parts) != 3 or not _UUID_RE.fullmatch(parts[0]):
        raise RejectedInput("ibeacon_format", "expected <uuid>:<major>:<minor>")
    major = _int_in(parts[1], 0, 0xFFFF, "ibeacon_format")
    minor = _int_in(parts[2], 0, 0xFFFF, "ibeacon_format")
    return f"{parts[0]}:{major}:{minor}"


def _eddystone(raw: str) -> str:
    parts = raw.lower().split(":")
    if (
        len(parts) != 2
        or len(parts[0]) != 20
        or len(parts[1]) != 12
        or not _HEX_RE.fullmatch(parts[0] + parts[1])
    ):
        raise RejectedInput("eddystone_format", "expected <20 hex>:<12 hex>")
    return f"{parts[0]}:{parts[1]}"


def _altbeacon(raw: str) -> str:
    value = raw.lower()
    if len(value) != 40 or not _HEX_RE.fullmatch(value):
        raise RejectedInput("altbeacon_format", "expected 40 hex digits")
    return value


def _app(raw: str) -> str:
    if not 1 <= len(raw) <= 128 or not raw.isprintable():
        raise RejectedInput("app_format", "expected 1-128 printable characters")
    return raw


_CANONICAL: Mapping[str, Callable[[str], str]] = {
    "loyalty": _loyalty,
    "rfid": _rfid,
    "ibeacon": _ibeacon,
    "eddystone": _eddystone,
    "altbeacon": _altbeacon,
    "app": _app,
}


def canonicalise(namespace: str, raw: str) -> str:
    """Return the canonical form of ``raw`` in ``namespace`` or raise RejectedInput."""
    try:
        fn = _CANONICAL[namespace]
    except KeyError:
        raise RejectedInput("unknown_namespace", namespace) from None
    return fn(raw)


def decode_key(text: str, where: str) -> bytes:
    """Decode a tenant key file's base64 text (standard alphabet, padding optional)."""
    compact = "".join(text.split())
    compact += "=" * (-len(compact) % 4)
    try:
        key = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise KeyringError(f"{where}: not valid base64") from None
    if len(key) < MIN_KEY_BYTES:
        raise KeyringError(
            f"{where}: key has {len(key)} bytes, needs at least {MIN_KEY_BYTES}; "
            "generate one with: head -c 32 /dev/urandom | base64"
        )
    return key


def published_test_key_allowed() -> bool:
    """The explicit opt-in of the test suite (see ``PUBLISHED_TEST_KEYS``)."""
    return (
        os.environ.get(ALLOW_TEST_KEY_VAR) == ALLOW_TEST_KEY_VALUE
        and "INVOCATION_ID" not in os.environ
    )


def weak_key_problem(key: bytes) -> str | None:
    """Why a tenant key must not be used (all zeros, a pattern, a published key), or None."""
    new_key = "make a new one: head -c 32 /dev/urandom | base64 > FILE; chmod 600 FILE"
    if len(set(key)) < MIN_DISTINCT_KEY_BYTES:
        return f"the key is not random (all zeros or a pattern): {new_key}"
    if key in PUBLISHED_TEST_KEYS and not published_test_key_allowed():
        return (
            "the key is the contract's published test-vector key: anyone can reverse its "
            f"pseudonyms; {new_key}"
        )
    return None


@dataclass(frozen=True)
class Keyring:
    """Tenant keys by key id; ``active`` names the one used for new pseudonyms."""

    keys: Mapping[str, bytes]
    active: str

    def __post_init__(self) -> None:
        for key_id in self.keys:
            if not KEY_ID_RE.fullmatch(key_id):
                raise KeyringError(f"key id {key_id!r} must match [a-z0-9]{{1,16}}")
        if self.active not in self.keys:
            raise KeyringError(f"active key id {self.active!r} is not in the keyring")

    @classmethod
    def from_files(cls, files: Mapping[str, Path], active: str) -> Keyring:
        keys: dict[str, bytes] = {}
        for key_id, path in files.items():
            try:
                text = Path(path).read_text(encoding="ascii")
            except (OSError, UnicodeDecodeError) as exc:
                raise KeyringError(
                    f"{path}: cannot read key file: {exc.__class__.__name__}"
                ) from None
            problem = secret_file_problem(Path(path), os.environ.get(CREDENTIALS_VAR))
            if problem is not None:
                raise KeyringError(problem)
            key = decode_key(text, str(path))
            weak = weak_key_problem(key)
            if weak is not None:
                raise KeyringError(f"{path}: {weak}")
            keys[key_id] = key
        return cls(keys=keys, active=active)

    @property
    def active_key(self) -> bytes:
        return self.keys[self.active]

    def pseudonym_of_canonical(
        self, namespace: str, canonical: str, key_id: str | None = None
    ) -> str:
        kid = key_id or self.active
        digest = hmac.new(
            self.keys[kid], f"{namespace}:{canonical}".encode(), hashlib.sha256
        ).digest()[:16]
        return f"{kid}:{base64.urlsafe_b64encode(digest).rstrip(b'=').decode('ascii')}"

    def pseudonym(self, namespace: str, raw: str, key_id: str | None = None) -> str:
        """Canonicalise ``raw`` and return its pseudonym; raises RejectedInput."""
        return self.pseudonym_of_canonical(namespace, canonicalise(namespace, raw), key_id)

    def all_pseudonyms(self, namespace: str, raw: str) -> list[str]:
        """The pseudonym under every loaded key (for consent look-ups across rotation)."""
        canonical = canonicalise(namespace, raw)
        return [self.pseudonym_of_canonical(namespace, canonical, kid) for kid in self.keys]
