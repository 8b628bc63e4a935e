"""One bytes-in harness per parser boundary: the corpus, hypothesis and atheris all use it.

``TARGETS[name].run(data)`` feeds one input through the real boundary code and checks its
contract: only the boundary's documented exception escapes (anything else propagates and
fails the caller), outputs are well-formed, incremental decoders stay bounded and agree
with themselves across chunkings.  ``check(target, data)`` adds the per-input time bound.

``known_bugs`` lists the exception types a target is known to leak today (see
``tests/fuzz/README.md``).  Properties tolerate them so that CI stays green while the fix is
pending; the corpus files that reproduce them are replayed strictly as
``xfail(strict=True)``, so the fix shows up as an XPASS that asks for the entry's removal.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import hmac
import json
import re
import sqlite3
import tempfile
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drivers.ble.adverts import (
    EDDYSTONE_UUID,
    AdvertResolver,
    AllowList,
    BeaconId,
    Skip,
    full_uuid16,
    parse_ad,
    parse_advert,
    parse_raw_advert,
)
from drivers.receipt_tap.escpos import MAX_HEADER, EscPosParser
from drivers.serial_cards.frames import (
    RDM6300_BODY,
    SCANNER_MAX_LINE,
    TRACK2_MAX,
    Card,
    Rejected,
    decoder_for,
)
from gateway.buffer.consent_store import CURSOR_KEY, ConsentStore, read_cursor, save_rows
from gateway.config.credentials import write_secret
from gateway.config.loading import load_config
from gateway.config.sections import ConsentSyncConfig
from gateway.consent.registry import PURPOSES, load_seed_file, parse_records
from gateway.consent.sync import (
    MAX_CURSOR_CHARS,
    Applied,
    ConsentSync,
    RegistryUpdater,
    parse_response,
    usable_cursor,
    valid_cursor,
)
from gateway.errors import ConfigError, RejectedInput, SyncError, SyncProtocolError, TokenError
from gateway.identity.pseudonyms import NAMESPACES, Keyring, canonicalise, decode_key
from gateway.identity.tokens import (
    KNOWN_PURPOSES,
    MAX_NONCE_CHARS,
    ReplaySet,
    classify_qr,
    load_public_key,
    verify_app_token,
    verify_receipt_token,
)
from gateway.observe.metrics import Metrics
from tests.fuzz.support import bounded

ROOT = Path(__file__).resolve().parents[2]
VECTORS: dict[str, Any] = json.loads(
    (ROOT / "gateway" / "contract" / "vectors.json").read_text(encoding="utf-8")
)
CORPUS = Path(__file__).resolve().parent / "corpus"

KEYRING = Keyring(
    keys={
        VECTORS["key_id"]: decode_key(VECTORS["key_base64"], "vectors"),
        "k2": bytes(range(100, 132)),
    },
    active=VECTORS["key_id"],
)
VECTOR_PUBLIC = load_public_key(base64.b64decode(VECTORS["app_token_public_key_base64"]))
# A fixed key of our own: mutated claims are re-signed with it so the claims parser is
# reached (a mutation under the contract's key only ever reaches the signature check).
FUZZ_PRIVATE = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
FUZZ_PUBLIC = load_public_key(FUZZ_PRIVATE.public_key().public_bytes_raw())
RECEIPT_PREFIX = "HTTPS://R.EXAMPLE.COM/R/"
NOW = 1_795_000_100.0

SKIP_REASONS = frozenset(
    {
        "ibeacon_malformed", "altbeacon_malformed", "eddystone_malformed", "eddystone_url",
        "eddystone_tlm", "eddystone_eid", "eddystone_other", "apple_other",
        "manufacturer_other", "no_beacon", "ad_malformed",
    }
)  # fmt: skip
CARD_REASONS = frozenset(
    {"garbage", "partial", "too_long", "bad_hex", "bad_checksum", "bad_symbology",
     "bad_check_digit", "bad_format"}
)  # fmt: skip
# The most a decoder may hold: one frame body, one scanner line, one Track 2.
CARD_CAPS = {"rdm6300": RDM6300_BODY, "scanner": SCANNER_MAX_LINE, "magstripe": TRACK2_MAX}
_CHUNKS = (1, 2, 5, 13, 64, 511)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign_app_token(claims: bytes, private: Ed25519PrivateKey = FUZZ_PRIVATE) -> str:
    """A contract §6 token over ``claims`` (any bytes), written here, not in gateway/."""
    head = "TPA1." + b64url(claims)
    return head + "." + b64url(private.sign(head.encode("ascii")))


def receipt_tag(key: bytes, key_id: bytes, payload: bytes) -> bytes:
    """Contract §7's tag, written independently of gateway/identity/tokens.py."""
    derived = hmac.new(key, b"touchpoint receipt v1", hashlib.sha256).digest()
    return hmac.new(derived, key_id + b"." + payload, hashlib.sha256).digest()[:10]


def retag(raw: bytes) -> bytes:
    """``raw`` with its last 10 bytes replaced by the right tag, when its key id is known."""
    if not raw or len(raw) < raw[0] + 11:
        return raw
    kid = raw[1 : 1 + raw[0]]
    key = KEYRING.keys.get(kid.decode("ascii", "replace"))
    if key is None:
        return raw
    payload = raw[1 + len(kid) : -10]
    return raw[:-10] + receipt_tag(key, kid, payload)


def _chunks(data: bytes) -> Iterator[bytes]:
    pos, i = 0, 0
    while pos < len(data):
        size = _CHUNKS[i % len(_CHUNKS)]
        yield data[pos : pos + size]
        pos, i = pos + size, i + 1


def _text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


# ------------------------------------------------------------------------------ BLE


def check_beacon_result(result: object) -> None:
    """A parse result is a Skip with a known reason, or an identity the contract accepts."""
    if isinstance(result, Skip):
        assert result.reason in SKIP_REASONS, result.reason
        return
    assert isinstance(result, BeaconId), type(result)
    assert result.namespace in ("ibeacon", "eddystone", "altbeacon")
    # cross-cutting: what the parser emits is already canonical for the pseudonymiser
    assert canonicalise(result.namespace, result.canonical) == result.canonical
    assert result.tx_power is None or -128 <= result.tx_power <= 127


@functools.cache
def _resolver() -> AdvertResolver:
    allow = AllowList.build(
        ibeacon_uuids=["83256b74-78d0-43a4-8269-05f9dc8a44ba"],
        eddystone_namespaces=["e157bd5df90aad1dc2fb"],
        altbeacon_prefixes=["2f23", "0"],
    )
    return AdvertResolver(allow, KEYRING.pseudonym_of_canonical, maxsize=8)


def resolve_checked(manufacturer: dict[int, bytes], service: dict[str, bytes]) -> None:
    resolver = _resolver()
    outcome, subject = resolver.resolve(manufacturer, service)
    assert len(resolver) <= 8
    if outcome == "ours":
        assert subject is not None and subject.startswith("k1:")
    else:
        assert subject is None
        assert outcome == "foreign" or outcome in SKIP_REASONS


def run_ble_raw(data: bytes) -> None:
    """Raw AD structures as on air -> fields -> beacon identity; nothing may raise."""
    fields = parse_ad(data)
    result = parse_raw_advert(data)
    check_beacon_result(result)
    if isinstance(fields, Skip):
        assert result == fields == Skip("ad_malformed")
        return
    assert result == parse_advert(fields.manufacturer_data, fields.service_data)
    resolve_checked(fields.manufacturer_data, fields.service_data)


def ble_fields(data: bytes) -> tuple[dict[int, bytes], dict[str, bytes]]:
    """Bytes -> bleak-shaped fields: company id (2 LE), cut, manufacturer data | service."""
    company = int.from_bytes(data[:2], "little")
    cut = data[2] if len(data) > 2 else 0
    mfr, svc = data[3 : 3 + cut], data[3 + cut :]
    return {company: mfr}, {EDDYSTONE_UUID: svc, full_uuid16(company): svc}


def run_ble_fields(data: bytes) -> None:
    """bleak's manufacturer_data / service_data dicts -> identity; nothing may raise."""
    manufacturer, service = ble_fields(data)
    check_beacon_result(parse_advert(manufacturer, service))
    check_beacon_result(parse_advert({0x004C: data}, {}))
    check_beacon_result(parse_advert({}, {EDDYSTONE_UUID: data}))
    resolve_checked(manufacturer, service)


# ---------------------------------------------------------------------- card readers


def run_card(protocol: str, data: bytes) -> None:
    """One reader stream, whole and chunked: same results, bounded buffer, clean flush."""
    whole = decoder_for(protocol)
    expected = whole.feed(data) + whole.flush()
    dec = decoder_for(protocol)
    got = []
    for chunk in _chunks(data):
        got += dec.feed(chunk)
        assert dec.buffered <= CARD_CAPS[protocol], dec.buffered
    got += dec.flush()
    assert not dec.pending and dec.buffered == 0
    assert got == expected
    for result in got:
        if isinstance(result, Rejected):
            assert result.reason in CARD_REASONS, result.reason
            continue
        assert isinstance(result, Card), type(result)
        assert result.namespace in ("rfid", "loyalty")
        # cross-cutting: a card read either canonicalises or is a counted rejection
        with contextlib.suppress(RejectedInput):
            canonicalise(result.namespace, result.value)


# --------------------------------------------------------------------------- ESC/POS


def _escpos_checked(data: bytes, max_qr: int) -> tuple[list[bytes], list[int]]:
    parser = EscPosParser(max_qr)
    qr: list[bytes] = []
    cuts: list[int] = []
    for chunk in _chunks(data):
        found = parser.feed(chunk)
        qr += found.qr
        cuts += found.cuts
        assert parser.pending <= MAX_HEADER, parser.pending
        collecting = parser._collect  # the only buffer that grows with the input
        assert collecting is None or len(collecting) <= max_qr
    assert parser.offset == len(data)
    return qr, cuts


def run_escpos(data: bytes) -> None:
    """A print job, whole and chunked: same QR payloads and cuts; bounded state."""
    for max_qr in (7089, 16):
        whole = EscPosParser(max_qr).feed(data)
        qr, cuts = _escpos_checked(data, max_qr)
        assert qr == whole.qr and cuts == whole.cuts
        assert all(1 <= len(q) <= max_qr for q in qr)
        assert cuts == sorted(set(cuts)) and all(0 <= c < len(data) for c in cuts)


# ---------------------------------------------------------------------------- tokens


def _check_claims(claims: Any, now: float) -> None:
    assert claims.iat - 60 <= now < claims.exp and claims.iat < claims.exp
    assert 1 <= len(claims.nonce) <= MAX_NONCE_CHARS
    assert set(claims.purposes) <= KNOWN_PURPOSES and list(claims.purposes) == sorted(
        claims.purposes
    )
    assert canonicalise("app", claims.sub) == claims.sub


def _now_for(claims_raw: bytes) -> float:
    """A clock inside the claims' window when they name one, so success paths are reached."""
    try:
        doc = json.loads(claims_raw)
    except (ValueError, RecursionError):
        return NOW
    iat = doc.get("iat") if isinstance(doc, dict) else None
    return float(iat) if isinstance(iat, int) and 0 <= iat < 2**53 else NOW


def verify_app_checked(text: str, public: Any, now: float) -> None:
    replay = ReplaySet(max_entries=4)
    try:
        claims = verify_app_token(text, public, now, replay)
    except TokenError as exc:
        assert exc.reason and len(replay) == 0
        return
    _check_claims(claims, now)
    assert len(replay) == 1
    try:
        verify_app_token(text, public, now, replay)
    except TokenError as exc:
        assert exc.reason == "replayed"
    else:
        raise AssertionError("a token was accepted twice under one replay set")


def run_app_token(data: bytes) -> None:
    """The bytes as a token under the contract key, and as claims signed by our key."""
    verify_app_checked(_text(data), VECTOR_PUBLIC, NOW)
    verify_app_checked(sign_app_token(data), FUZZ_PUBLIC, _now_for(data))


def verify_receipt_checked(text: str) -> None:
    try:
        got = verify_receipt_token(text, KEYRING)
    except TokenError as exc:
        assert exc.reason
        return
    assert got.key_id in KEYRING.keys
    assert 0 <= got.lane_number <= 255 and got.issued >= 0 and got.counter >= 0
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]{0,31}", got.store)


def run_receipt_token(data: bytes) -> None:
    """The bytes as token text, as raw token bytes, and as raw bytes with a valid tag."""
    verify_receipt_checked(_text(data))
    for raw in (data, retag(data)):
        verify_receipt_checked(base64.b32encode(raw).decode("ascii").rstrip("="))


def run_qr(data: bytes) -> None:
    """One decoded QR payload: app token, receipt token or other; TokenError only."""
    for public in (VECTOR_PUBLIC, FUZZ_PUBLIC, None):
        try:
            got = classify_qr(
                data,
                keyring=KEYRING,
                app_public_key=public,
                receipt_prefixes=(RECEIPT_PREFIX, "", "x"),
                now=NOW,
                replay=ReplaySet(max_entries=4),
            )
        except TokenError as exc:
            assert exc.reason
            continue
        if got.kind == "app":
            assert got.subject is not None and got.subject.startswith("k1:")
            assert got.evidence is None or got.evidence.subject == got.subject
        elif got.kind == "receipt":
            assert got.receipt is not None
            verify_receipt_token(got.receipt, KEYRING)
        else:
            assert got.kind == "other"
            assert (got.subject, got.evidence, got.receipt) == (None, None, None)


# --------------------------------------------------------------------------- consent


def _check_records(records: Any) -> None:
    for subject, purposes, expires in records:
        _check_subject(subject)
        assert purposes <= PURPOSES
        assert expires is None or isinstance(expires, float)


_CONTRACT_PSEUDONYM = re.compile(r"^[a-z0-9]{1,16}:[A-Za-z0-9_-]{22}$")  # event.json


def _check_subject(subject: Any) -> None:
    """An accepted subject is the contract's pseudonym: encodable, storable, short."""
    assert isinstance(subject, str) and _CONTRACT_PSEUDONYM.match(subject), repr(subject)
    subject.encode("utf-8")  # a lone surrogate here killed the buffer's writer


def _check_cursor_usable(cursor: str) -> None:
    """An accepted cursor goes back in the next request's URL and into the buffer."""
    assert valid_cursor(cursor) and len(cursor) <= MAX_CURSOR_CHARS
    cursor.encode("ascii")
    httpx.Request("GET", "https://central.invalid/v1/stores/s/consent", params={"since": cursor})


class _FakeOutbox:
    """Runs the poller's buffer writes on an in-memory database at once."""

    def __init__(self) -> None:
        self.conn = sqlite3.connect(":memory:")
        self.conn.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT)")

    async def _submit_write(self, fn: Callable[[sqlite3.Connection], object], **_: object) -> None:
        fn(self.conn)


class _RecordingUpdater(RegistryUpdater):
    """The real ``on_push``; ``apply_records`` only records (the registry is not fuzzed)."""

    def __init__(self) -> None:  # deliberately not the real wiring: no outbox, no eraser
        self.metrics = Metrics()
        self.outbox = _FakeOutbox()  # type: ignore[assignment]
        self.store = ConsentStore(self.outbox)  # type: ignore[arg-type]
        self.registry = types.SimpleNamespace(records={})  # type: ignore[assignment]
        self._tasks = set()
        self.applied: list[list[Any]] = []

    async def apply_records(
        self, records: Any, source: str = "sync", *, reset: bool = False
    ) -> Applied:
        self.applied.append(list(records))
        return Applied(len(records), 0, 0, 0)


def run_consent_push(data: bytes) -> None:
    """An MQTT consent delta: ``on_push`` never raises; it applies or counts ``invalid``."""

    async def go() -> None:
        updater = _RecordingUpdater()
        updater.on_push(data)
        await updater.drain()
        ok = updater.metrics.get("consent_push_total", outcome="ok")
        invalid = updater.metrics.get("consent_push_total", outcome="invalid")
        assert (ok, invalid) in ((1, 0), (0, 1))
        assert len(updater.applied) == ok
        for records in updater.applied:
            _check_records(records)

    asyncio.run(go())


@functools.cache
def _workdir() -> Path:
    # kept for the process: one small file per target, overwritten for every input
    holder = tempfile.TemporaryDirectory(prefix="tp-fuzz-")
    _HOLDERS.append(holder)
    path = Path(holder.name)
    write_secret(path / "token", "t0ken\n")
    return path


_HOLDERS: list[tempfile.TemporaryDirectory[str]] = []


def run_consent_api(data: bytes) -> None:
    """An HTTP 200 body from the registry, through the real poller: SyncError only."""
    cfg = ConsentSyncConfig(base_url="https://central.invalid", token_file=_workdir() / "token")

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=data, headers={"content-type": "application/json"})

    async def go() -> None:
        updater = _RecordingUpdater()
        sync = ConsentSync(cfg, "nl-ams-001", updater, transport=httpx.MockTransport(answer))
        async with sync.client() as client:
            try:
                await sync.poll_once(client)
            except SyncError as exc:
                assert str(exc)
                assert sync.cursor is None and not updater.applied
                return
            assert isinstance(sync.cursor, str) and len(updater.applied) == 1
            _check_records(updater.applied[0])
            _check_cursor_usable(sync.cursor)
            await sync.poll_once(client)  # the accepted cursor goes back: no crash
            assert len(updater.applied) == 2

    asyncio.run(go())


def run_consent_cursor(data: bytes) -> None:
    """A cursor as the buffer holds it (an older version stored whatever it was sent):
    ``usable_cursor(read_cursor(...))`` gives None or a cursor the next request can carry."""
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT)")
    stored: str | bytes = data[1:] if data[:1] == b"\x00" else _text(data)  # text or a blob
    with contextlib.suppress(UnicodeEncodeError):  # sqlite3 cannot store a lone surrogate
        conn.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (CURSOR_KEY, stored))
    cursor = usable_cursor(read_cursor(conn))
    if cursor is not None:
        _check_cursor_usable(cursor)
    body = json.dumps({"cursor": _text(data), "reset": False, "records": []})
    try:
        got, _, _ = parse_response(json.loads(body))
    except SyncProtocolError as exc:
        assert str(exc)
        return
    _check_cursor_usable(got)


def run_consent_subject(data: bytes) -> None:
    """A subject in a registry record: refused with a short ValueError, or a pseudonym
    the buffer can store.  Input starting with a backslash is a JSON string body (so
    ``\\ud800`` escapes make lone surrogates); invalid UTF-8 makes them too."""
    if data.startswith(b"\\"):
        try:
            subject: Any = json.loads('"' + _text(data[1:]) + '"')
        except (ValueError, RecursionError):
            return
    else:
        subject = _text(data)
    doc = {"records": [{"subject": subject, "purposes": ["linking"], "expires": None}]}
    try:
        records = parse_records(doc)
    except ValueError as exc:
        assert 0 < len(str(exc)) < 200, "the error does not echo the subject"
        return
    _check_records(records)
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE consent(subject TEXT PRIMARY KEY, purposes TEXT, expires REAL,"
                 " source TEXT, updated_at REAL)")  # fmt: skip
    save_rows(conn, [(records[0][0], '["linking"]', None, "sync", 0.0)])


def run_consent_seed(data: bytes) -> None:
    """A consent seed file (the API body's shape): ConfigError only."""
    path = _workdir() / "seed.json"
    path.write_bytes(data)
    try:
        records = load_seed_file(path)
    except ConfigError as exc:
        assert exc.problems and exc.problems[0][1] == "consent.seed_file"
        return
    _check_records(records)


# ---------------------------------------------------------------------------- config


def check_config(cfg: Any) -> None:
    """A loaded config: every path resolved (absolute), sources uniquely named."""
    assert cfg.buffer.path.is_absolute()
    assert all(p.is_absolute() for p in cfg.keyring.keys.values())
    names = [s.name for s in cfg.sources]
    assert len(names) == len(set(names))


def run_config_toml(data: bytes) -> None:
    """A config file's bytes: ConfigError (file, key path, why) and nothing else."""
    path = _workdir() / "gateway.toml"
    path.write_bytes(data)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert exc.problems
        assert all(file == str(path) for file, _, _ in exc.problems)
        return
    check_config(cfg)


# -------------------------------------------------------------------------- identity

_IDENTITY_NS = (*NAMESPACES, "nope")


def run_identity(data: bytes) -> None:
    """First byte picks the namespace, the rest is the raw value: RejectedInput only."""
    if not data:
        return
    namespace = _IDENTITY_NS[data[0] % len(_IDENTITY_NS)]
    check_canonical(namespace, _text(data[1:]))


def check_canonical(namespace: str, raw: str) -> None:
    try:
        canonical = canonicalise(namespace, raw)
    except RejectedInput as exc:
        assert exc.reason
        assert len(raw) < 16 or raw not in str(exc)  # never echoes the raw identifier
        return
    assert canonicalise(namespace, canonical) == canonical  # idempotent
    assert KEYRING.pseudonym(namespace, raw).startswith("k1:")


# ----------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    boundary: str  # what it covers, for the README and the atheris usage text
    known_bugs: tuple[type[BaseException], ...] = ()


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("ble_raw", run_ble_raw, "drivers.ble.adverts.parse_ad / parse_raw_advert"),
        Target("ble_fields", run_ble_fields, "drivers.ble.adverts.parse_advert, AdvertResolver"),
        Target("card_rdm6300", functools.partial(run_card, "rdm6300"), "card_frames rdm6300"),
        Target("card_scanner", functools.partial(run_card, "scanner"), "card_frames scanner"),
        Target("card_magstripe", functools.partial(run_card, "magstripe"), "card_frames magstripe"),
        Target("escpos", run_escpos, "drivers.receipt_tap.escpos.EscPosParser"),
        Target("app_token", run_app_token, "gateway.identity.tokens.verify_app_token"),
        Target("receipt_token", run_receipt_token, "gateway.identity.tokens.verify_receipt_token"),
        Target("qr", run_qr, "gateway.identity.tokens.classify_qr"),
        Target(
            "consent_push",
            run_consent_push,
            "gateway.consent.sync.RegistryUpdater.on_push",
        ),
        Target(
            "consent_api",
            run_consent_api,
            "gateway.consent.sync.ConsentSync.poll_once / parse_response",
        ),
        Target(
            "consent_cursor",
            run_consent_cursor,
            "gateway.consent.sync.usable_cursor / parse_response cursor",
        ),
        Target(
            "consent_subject",
            run_consent_subject,
            "gateway.consent.registry.parse_records subject / is_pseudonym",
        ),
        Target(
            "consent_seed",
            run_consent_seed,
            "gateway.consent.registry.load_seed_file / parse_records",
        ),
        Target(
            "config_toml",
            run_config_toml,
            "gateway.config.loading.load_config / parse_config",
        ),
        Target(
            "identity",
            run_identity,
            "gateway.identity.pseudonyms.canonicalise",
        ),
    )
}


def check(target: Target, data: bytes, *, strict: bool) -> bool:
    """Run one input under the time bound.  False when a known bug fired (not ``strict``)."""
    try:
        bounded(target.run, data)
    except target.known_bugs as exc:
        # A known bug leaks exactly this type; the property still holds for the rest.
        if strict or isinstance(exc, AssertionError):
            raise
        return False
    return True


def corpus_files(name: str) -> list[Path]:
    return sorted(p for p in (CORPUS / name).iterdir() if p.is_file())
