"""Beacon advert parsers: the issue's vectors, our own, the contract, and any bytes."""

from __future__ import annotations

import struct
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.ble.adverts import (
    EDDYSTONE_UUID,
    FOREIGN,
    OURS,
    AdvertResolver,
    AllowList,
    BeaconId,
    Skip,
    full_uuid16,
    parse_ad,
    parse_advert,
    parse_altbeacon,
    parse_eddystone,
    parse_eddystone_tlm,
    parse_eddystone_url,
    parse_ibeacon,
    parse_raw_advert,
)
from gateway.identity.pseudonyms import Keyring, canonicalise

IBEACON_RAW = bytes.fromhex(
    "02 01 1A 1A FF 4C 00 02 15 83 25 6B 74 78 D0 43 A4 82 69 05 F9 DC 8A 44 BA 00 10 00 20 C6"
)
EDDYSTONE_UID = bytes.fromhex("00 F8 E1 57 BD 5D F9 0A AD 1D C2 FB 00 00 00 00 00 01 00 00")
ALT_ID = bytes.fromhex("2F234454CF6D4A0FADF2F4911BA9FFA600010002")
ALTBEACON = b"\xbe\xac" + ALT_ID + b"\xc5\x00"


def test_ibeacon_raw_vector() -> None:
    result = parse_raw_advert(IBEACON_RAW)
    assert result == BeaconId("ibeacon", "83256b74-78d0-43a4-8269-05f9dc8a44ba:16:32", -58)


def test_ibeacon_raw_vector_through_ad_fields() -> None:
    fields = parse_ad(IBEACON_RAW)
    assert not isinstance(fields, Skip)
    assert list(fields.manufacturer_data) == [0x004C]
    assert parse_ibeacon(fields.manufacturer_data[0x004C]) == parse_raw_advert(IBEACON_RAW)


def test_eddystone_uid_vector() -> None:
    result = parse_advert({}, {EDDYSTONE_UUID: EDDYSTONE_UID})
    assert result == BeaconId("eddystone", "e157bd5df90aad1dc2fb:000000000001", -8)
    # the 18-byte form without the reserved bytes is the same identity
    assert parse_eddystone(EDDYSTONE_UID[:18]) == result


def test_eddystone_uid_from_raw_service_data() -> None:
    raw = bytes([3, 0x03, 0xAA, 0xFE, 1 + 2 + len(EDDYSTONE_UID), 0x16, 0xAA, 0xFE]) + EDDYSTONE_UID
    assert parse_raw_advert(raw) == parse_eddystone(EDDYSTONE_UID)


def test_altbeacon() -> None:
    result = parse_advert({0x0118: ALTBEACON}, {})
    assert result == BeaconId("altbeacon", ALT_ID.hex(), -59)
    raw = bytes([len(ALTBEACON) + 3, 0xFF, 0x18, 0x01]) + ALTBEACON
    assert parse_raw_advert(raw) == result


def test_eddystone_url_is_parsed_and_not_an_identity() -> None:
    frame = bytes([0x10, 0xEB, 0x03]) + b"example" + bytes([0x07])
    assert parse_eddystone_url(frame) == "https://example.com"
    assert parse_advert({}, {EDDYSTONE_UUID: frame}) == Skip("eddystone_url")
    assert parse_eddystone_url(bytes([0x10, 0xEB, 0x09])) is None  # unknown scheme


def test_eddystone_tlm_is_parsed_and_not_an_identity() -> None:
    frame = bytes([0x20, 0x00]) + struct.pack(">HhII", 3000, 0x1880, 42, 1234)
    tlm = parse_eddystone_tlm(frame)
    assert tlm is not None
    assert (tlm.battery_mv, tlm.temperature_c, tlm.adv_count, tlm.uptime_s) == (
        3000,
        24.5,
        42,
        123.4,
    )
    assert parse_advert({}, {EDDYSTONE_UUID: frame}) == Skip("eddystone_tlm")


@pytest.mark.parametrize(
    ("manufacturer", "service", "reason"),
    [
        ({}, {}, "no_beacon"),
        ({0x004C: bytes.fromhex("1005031c") + b"\x00" * 3}, {}, "apple_other"),  # a phone
        ({0x004C: b"\x02\x15" + b"\x00" * 20}, {}, "ibeacon_malformed"),  # one byte short
        ({0x0059: b"\x01\x02\x03"}, {}, "manufacturer_other"),
        ({0x0118: ALTBEACON[:-1]}, {}, "altbeacon_malformed"),
        ({}, {EDDYSTONE_UUID: b""}, "eddystone_malformed"),
        ({}, {EDDYSTONE_UUID: EDDYSTONE_UID[:17]}, "eddystone_malformed"),
        ({}, {EDDYSTONE_UUID: b"\x30" + b"\x00" * 9}, "eddystone_eid"),
        ({}, {EDDYSTONE_UUID: b"\x30" + b"\x00" * 8}, "eddystone_malformed"),
        ({}, {EDDYSTONE_UUID: b"\x20\x00" + b"\x0b\xb8" + b"\x00" * 9}, "eddystone_malformed"),
        # healthy frames that carry no identity and are not UID, URL or TLM v0
        ({}, {EDDYSTONE_UUID: bytes.fromhex("2001") + b"\xa5" * 16}, "eddystone_tlm"),  # ETLM
        ({}, {EDDYSTONE_UUID: bytes.fromhex("2001") + b"\xa5" * 15}, "eddystone_malformed"),
        ({}, {EDDYSTONE_UUID: bytes.fromhex("21") + b"\x01\x02" * 8}, "eddystone_other"),
        ({}, {EDDYSTONE_UUID: bytes.fromhex("40") + b"\x5a" * 20}, "eddystone_other"),  # E2EE-EID
        ({}, {EDDYSTONE_UUID: bytes.fromhex("2002") + b"\x00" * 12}, "eddystone_other"),
        ({}, {EDDYSTONE_UUID: b"\x21"}, "eddystone_other"),
        ({}, {full_uuid16(0x180F): b"\x64"}, "no_beacon"),
    ],
)
def test_what_is_not_an_identity(
    manufacturer: dict[int, bytes], service: dict[str, bytes], reason: str
) -> None:
    assert parse_advert(manufacturer, service) == Skip(reason)


def test_identity_wins_over_other_payloads() -> None:
    phone = bytes.fromhex("1005031c000000")
    assert isinstance(parse_advert({0x0059: b"\x01", 0x0118: ALTBEACON}, {}), BeaconId)
    assert parse_advert({0x004C: phone}, {EDDYSTONE_UUID: EDDYSTONE_UID}).namespace == "eddystone"  # type: ignore[union-attr]


def test_truncated_ad_structure_is_malformed() -> None:
    assert parse_raw_advert(IBEACON_RAW[:-1]) == Skip("ad_malformed")
    assert parse_ad(bytes([1, 0xFF])) == Skip("ad_malformed")  # manufacturer without company
    # zero length ends the significant part: trailing padding is fine
    assert parse_raw_advert(IBEACON_RAW + b"\x00\x00\x00") == parse_raw_advert(IBEACON_RAW)


@pytest.mark.parametrize(
    "tail",
    [
        b"\x05",  # a length byte and nothing else
        b"\x09\x09TP",  # a local name cut short
        b"\x1a\xff\x4c\x00\x02\x15",  # a second manufacturer structure cut short
        b"\x01\xff",  # manufacturer data without its company id (ignored, as BlueZ does)
        b"\x02\x16\xaa",  # service data without its whole UUID
    ],
)
def test_valid_structures_before_a_broken_one_are_kept(tail: bytes) -> None:
    """As BlueZ: the structures before a truncated trailing one still count."""
    assert parse_raw_advert(IBEACON_RAW + tail) == parse_raw_advert(IBEACON_RAW)
    eddystone = bytes([3, 0x03, 0xAA, 0xFE, len(EDDYSTONE_UID) + 3, 0x16, 0xAA, 0xFE])
    eddystone += EDDYSTONE_UID
    assert isinstance(parse_raw_advert(eddystone), BeaconId)
    assert parse_raw_advert(eddystone + tail) == parse_raw_advert(eddystone)


def test_128_bit_service_data_key() -> None:
    service = uuid.UUID("12345678-1234-5678-1234-56789abcdef0")
    raw = bytes([1 + 16 + 2, 0x21]) + service.bytes[::-1] + b"\x01\x02"
    fields = parse_ad(raw)
    assert not isinstance(fields, Skip)
    assert fields.service_data == {str(service): b"\x01\x02"}


def test_repr_never_shows_the_raw_id() -> None:
    beacon = parse_raw_advert(IBEACON_RAW)
    assert "83256b74" not in repr(beacon)


def test_canonical_forms_are_the_contracts(vectors: dict[str, Any], keyring: Keyring) -> None:
    """What the parser emits canonicalises to itself and hashes to the contract vector."""
    by_ns = {c["namespace"]: c for c in vectors["pseudonyms"]}
    parsed = {
        "ibeacon": parse_raw_advert(IBEACON_RAW),
        "eddystone": parse_eddystone(EDDYSTONE_UID),
        "altbeacon": parse_altbeacon(ALTBEACON),
    }
    for namespace, beacon in parsed.items():
        assert isinstance(beacon, BeaconId)
        assert beacon.namespace == namespace
        case = by_ns[namespace]
        assert beacon.canonical == case["canonical"]
        assert canonicalise(namespace, beacon.canonical) == beacon.canonical
        assert keyring.pseudonym_of_canonical(namespace, beacon.canonical) == case["pseudonym"]


@given(
    st.uuids(),
    st.integers(0, 0xFFFF),
    st.integers(0, 0xFFFF),
    st.integers(-128, 127),
)
def test_any_ibeacon_canonicalises(u: uuid.UUID, major: int, minor: int, tx: int) -> None:
    data = b"\x02\x15" + u.bytes + struct.pack(">HHb", major, minor, tx)
    beacon = parse_ibeacon(data)
    assert isinstance(beacon, BeaconId)
    assert beacon.tx_power == tx
    assert canonicalise("ibeacon", beacon.canonical) == beacon.canonical


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_any_raw_bytes_never_raise(raw: bytes) -> None:
    assert isinstance(parse_raw_advert(raw), BeaconId | Skip)


@settings(max_examples=300)
@given(
    st.dictionaries(st.integers(0, 0xFFFF), st.binary(max_size=40), max_size=3),
    st.binary(max_size=40),
)
def test_any_fields_never_raise(manufacturer: dict[int, bytes], eddystone: bytes) -> None:
    result = parse_advert(manufacturer, {EDDYSTONE_UUID: eddystone})
    if isinstance(result, BeaconId):
        assert canonicalise(result.namespace, result.canonical) == result.canonical
    for prefix in (b"\x02\x15", b"\xbe\xac"):
        assert isinstance(parse_advert({0x004C: prefix + eddystone}, {}), BeaconId | Skip)


def test_allow_list() -> None:
    allow = AllowList.build(
        ibeacon_uuids=["83256B74-78D0-43A4-8269-05F9DC8A44BA"],
        eddystone_namespaces=["E157BD5DF90AAD1DC2FB"],
        altbeacon_prefixes=["2f234454"],
    )
    ours = [
        parse_raw_advert(IBEACON_RAW),
        parse_eddystone(EDDYSTONE_UID),
        parse_altbeacon(ALTBEACON),
    ]
    for beacon in ours:
        assert isinstance(beacon, BeaconId)
        assert allow.allows(beacon)
    foreign = [
        BeaconId("ibeacon", "00000000-78d0-43a4-8269-05f9dc8a44ba:16:32"),
        BeaconId("eddystone", "00000000000000000000:000000000001"),
        BeaconId("altbeacon", "ff" * 20),
        BeaconId("rfid", "13005D1DA5"),
    ]
    assert not any(allow.allows(b) for b in foreign)
    assert not AllowList().allows(ours[0])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"ibeacon_uuids": ["not-a-uuid"]},
        {"eddystone_namespaces": ["e157"]},
        {"altbeacon_prefixes": ["zz"]},
        {"altbeacon_prefixes": ["00" * 21]},
    ],
)
def test_allow_list_rejects_malformed_config(kwargs: dict[str, list[str]]) -> None:
    with pytest.raises(ValueError):
        AllowList.build(**kwargs)


def _reference_parse(manufacturer: dict[int, bytes], service: dict[str, bytes]) -> Any:
    """The first, slower form of parse_advert: the fast one must agree with it."""
    priority = ["ibeacon_malformed", "altbeacon_malformed", "eddystone_malformed",
                "eddystone_url", "eddystone_tlm", "eddystone_eid", "eddystone_other",
                "apple_other", "manufacturer_other"]  # fmt: skip
    reasons: list[str] = []
    for company, data in manufacturer.items():
        results = [parse_altbeacon(data)]
        if company == 0x004C:
            results.insert(0, parse_ibeacon(data))
        for result in results:
            if isinstance(result, BeaconId):
                return result
        reasons.extend(r.reason for r in results if isinstance(r, Skip))
    if EDDYSTONE_UUID in service:
        result = parse_eddystone(service[EDDYSTONE_UUID])
        if isinstance(result, BeaconId):
            return result
        reasons.append(result.reason)
    return next((Skip(r) for r in priority if r in reasons), Skip("no_beacon"))


_payloads = st.one_of(
    st.binary(max_size=30),
    st.builds(
        lambda p, b: p + b, st.sampled_from([b"\x02\x15", b"\xbe\xac"]), st.binary(max_size=30)
    ),
    st.just(IBEACON_RAW[7:]),
    st.just(ALTBEACON),
)


@settings(max_examples=300)
@given(
    st.dictionaries(st.sampled_from([0x004C, 0x0118, 0x0059]), _payloads, max_size=3),
    st.one_of(st.none(), st.binary(max_size=24), st.just(EDDYSTONE_UID)),
)
def test_parse_advert_agrees_with_the_reference(
    manufacturer: dict[int, bytes], eddystone: bytes | None
) -> None:
    service = {} if eddystone is None else {EDDYSTONE_UUID: eddystone}
    assert parse_advert(manufacturer, service) == _reference_parse(manufacturer, service)


ALLOW = AllowList.build(
    ibeacon_uuids=["83256B74-78D0-43A4-8269-05F9DC8A44BA"],
    eddystone_namespaces=["E157BD5DF90AAD1DC2FB"],
)


@settings(max_examples=200)
@given(
    st.lists(
        st.tuples(
            st.dictionaries(st.sampled_from([0x004C, 0x0118]), _payloads, max_size=2),
            st.one_of(st.none(), st.just(EDDYSTONE_UID), st.binary(max_size=20)),
        ),
        max_size=20,
    )
)
def test_resolver_agrees_with_parse_allow_pseudonym(
    adverts: list[tuple[dict[int, bytes], bytes | None]],
) -> None:
    """Cached or not, the resolver's outcome is parse -> allow-list -> pseudonym's."""
    resolver = AdvertResolver(ALLOW, lambda ns, canonical: f"p:{ns}:{canonical}", maxsize=3)
    for manufacturer, eddystone in adverts * 2:  # twice: the second pass hits the cache
        service = {} if eddystone is None else {EDDYSTONE_UUID: eddystone}
        parsed = parse_advert(manufacturer, service)
        if isinstance(parsed, Skip):
            expected: tuple[str, str | None] = (parsed.reason, None)
        elif ALLOW.allows(parsed):
            expected = (OURS, f"p:{parsed.namespace}:{parsed.canonical}")
        else:
            expected = (FOREIGN, None)
        assert resolver.resolve(manufacturer, service) == expected
        assert len(resolver) <= 3


def test_resolver_remembers_beacons_not_phones(keyring: Keyring) -> None:
    calls: list[str] = []

    def pseudonym(namespace: str, canonical: str) -> str:
        calls.append(canonical)
        return keyring.pseudonym_of_canonical(namespace, canonical)

    resolver = AdvertResolver(ALLOW, pseudonym, maxsize=2)
    ours = {0x004C: IBEACON_RAW[7:]}
    for _ in range(100):  # fresh bytes objects each time, as bleak hands them
        assert resolver.resolve({0x004C: bytes(IBEACON_RAW[7:])}, {}) == (
            OURS, "k1:eP6urfab4yzJ9mpD9_RcmQ",
        )  # fmt: skip
    assert (resolver.misses, len(calls), len(resolver)) == (1, 1, 1)
    foreign = {0x004C: b"\x02\x15" + bytes(16) + IBEACON_RAW[-5:]}
    assert resolver.resolve(foreign, {}) == (FOREIGN, None)
    for i in range(50):  # phones: parsed every time, never remembered
        assert resolver.resolve({0x004C: b"\x10\x05" + bytes([i]) * 5}, {}) == ("apple_other", None)
    assert len(resolver) == 2
    eddystone = {EDDYSTONE_UUID: EDDYSTONE_UID}
    assert resolver.resolve({}, eddystone)[0] == OURS  # evicts the oldest entry (ours)
    assert len(resolver) == 2
    resolver.resolve(foreign, {})
    resolver.resolve(ours, {})  # evicted before: parsed again
    assert resolver.misses == 4
    with pytest.raises(ValueError):
        AdvertResolver(ALLOW, pseudonym, maxsize=0)
