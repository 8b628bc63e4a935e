"""Beacon advert parsers: the issue's vectors, our own, the contract, and any bytes."""

from __future__ import annotations

import struct
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.ble_adverts import (
    EDDYSTONE_UUID,
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
from gateway.identity import Keyring, canonicalise

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
