"""Valid (and a few classic invalid) inputs per target: the corpus's seeds.

Built from the contract vectors, the simulators' independent encoders and the shipped
example config.  ``python -m tests.fuzz.seeds`` (re)writes ``corpus/<target>/seed-*``;
files named otherwise (inputs a fuzzer found) are left alone.
"""

from __future__ import annotations

import base64
import json
import sys

from drivers.receipt_tap.escpos import qr_native, raster_image
from simulators.devices import till
from simulators.devices.ble_scenario import (
    encode_altbeacon,
    encode_eddystone_tlm,
    encode_eddystone_uid,
    encode_eddystone_url,
    encode_ibeacon,
)
from simulators.devices.card_reader import bad_frame, ean_check_digit, encode, rdm6300_frame
from tests.fuzz.targets import (
    CORPUS,
    RECEIPT_PREFIX,
    ROOT,
    TARGETS,
    VECTORS,
    sign_app_token,
)

IBEACON_RAW = bytes.fromhex(
    "02 01 1A 1A FF 4C 00 02 15 83 25 6B 74 78 D0 43 A4 82 69 05 F9 DC 8A 44 BA 00 10 00 20 C6"
)
SUBJECT = VECTORS["pseudonyms"][0]["pseudonym"]


def ad(ad_type: int, value: bytes) -> bytes:
    """One AD structure: length, type, value."""
    return bytes([len(value) + 1, ad_type]) + value


def raw_advert(payload: tuple[dict[int, bytes], dict[str, bytes]]) -> bytes:
    """bleak-shaped fields back to AD structures (flags first, as a beacon sends them)."""
    manufacturer, service = payload
    out = ad(0x01, b"\x06")
    for company, data in manufacturer.items():
        out += ad(0xFF, company.to_bytes(2, "little") + data)
    for uuid_text, data in service.items():
        out += ad(0x16, int(uuid_text[4:8], 16).to_bytes(2, "little") + data)
    return out


def _adverts() -> list[tuple[dict[int, bytes], dict[str, bytes]]]:
    return [
        encode_ibeacon("83256b74-78d0-43a4-8269-05f9dc8a44ba", 16, 32, -58),
        encode_eddystone_uid("e157bd5df90aad1dc2fb", "000000000001", -8),
        encode_eddystone_url("https://www.example.com/", -20),
        encode_eddystone_tlm(3000, 21.5, 1234, 3600.0),
        encode_altbeacon("2f234454cf6d4a0fadf2f4911ba9ffa600010002", 0x0118, -59),
        ({0x004C: b"\x10\x05\x01\x18\x4a\x2b\x3c"}, {}),  # a phone's Nearby payload
    ]


def ble_raw() -> dict[str, bytes]:
    seeds = {"ibeacon-vector": IBEACON_RAW}
    for i, payload in enumerate(_adverts()):
        seeds[f"advert-{i}"] = raw_advert(payload)
    seeds["service-128"] = ad(0x21, bytes(range(16)) + b"\x00\xf8" + bytes(16))
    seeds["service-32"] = ad(0x20, b"\xaa\xfe\x00\x00" + b"\x00" * 18)
    seeds["padding"] = IBEACON_RAW + b"\x00" * 8
    return seeds


def ble_fields() -> dict[str, bytes]:
    seeds = {}
    for i, (manufacturer, service) in enumerate(_adverts()):
        company, mfr = next(iter(manufacturer.items()), (0, b""))
        svc = next(iter(service.values()), b"")
        seeds[f"fields-{i}"] = company.to_bytes(2, "little") + bytes([len(mfr)]) + mfr + svc
    return seeds


def cards(protocol: str) -> dict[str, bytes]:
    good = {
        "rdm6300": "13005D1DA5",
        "scanner": "2600123456789",
        "magstripe": "6011000990139424",
    }[protocol]
    seeds = {"frame": encode(good, protocol), "bad": bad_frame(good, protocol)}
    seeds["stream"] = b"junk" + encode(good, protocol) + b"\r\n" + encode(good, protocol)
    if protocol == "rdm6300":
        seeds["corrupt-twice"] = rdm6300_frame("0102030405", corrupt=True) * 2
    elif protocol == "scanner":
        body = "400638133393"
        seeds["aim-e0"] = encode(body + ean_check_digit(body), protocol, aim="]E0")
        seeds["ean8"] = encode("9638507" + ean_check_digit("9638507"), protocol, aim="]E4")
    else:
        seeds["track1-then-2"] = b"%B6011000990139424^DOE/J^2512?" + encode(good, protocol)
    return seeds


def escpos() -> dict[str, bytes]:
    return {
        "receipt": till.receipt(qr_data=b"HELLO-QR", with_logo=False),
        "receipt-logo": till.receipt(qr_data=b"X", seed=1)[:600] + till.cut(),
        "hostile": till.hostile(seed=3)[:1500],
        "trap-logo": till.trap_logo(),
        "native-qr": qr_native(b"https://r.example.com/r/ABC") + b"\x1dV\x00",
        "raster": raster_image([[True, False] * 8] * 4) + b"\x1bi",
        "column-image": till.column_image(8, b"\x1d(k") + till.status_query(2),
        "tabs-and-amp": b"\x1bD\x08\x10\x00\x1b&\x03\x41\x42\x02" + bytes(12) + b"\x1cq\x01"
        + b"\x01\x00\x01\x00" + bytes(8) + b"\x1dk\x04123\x00\x1dkI\x03abc",
        # ESC + n / ESC A n / ESC 3 n with n = GS before "VAT": once read as a cut
        "line-spacing-vat": b"\x1b@\x1b+\x1dVAT 21% ...... 0.21\n\x1bA\x1dVAT\n\x1b3\x1dVAT\n"
        + b"\x1bd\x06\x1dV\x00",
    }  # fmt: skip


def app_token() -> dict[str, bytes]:
    token = VECTORS["app_tokens"][0]
    claims = json.dumps(token["claims"], separators=(",", ":")).encode()
    seeds = {"vector-token": token["token"].encode(), "vector-claims": claims}
    for i, bad in enumerate(VECTORS["app_tokens_invalid"]):
        seeds[f"invalid-{i}"] = bad.encode()
    seeds["claims-no-purposes"] = json.dumps(
        {"sub": "user-7", "iat": 1_795_000_000, "exp": 1_795_000_300, "nonce": "n2"}
    ).encode()
    return seeds


def receipt_token() -> dict[str, bytes]:
    text = VECTORS["receipt_tokens"][0]["token"]
    raw = base64.b32decode(text + "=" * (-len(text) % 8))
    return {"vector-text": text.encode(), "vector-raw": raw, "lowercase": text.lower().encode()}


def qr() -> dict[str, bytes]:
    receipt = VECTORS["receipt_tokens"][0]["token"]
    claims = json.dumps(VECTORS["app_tokens"][0]["claims"]).encode()
    return {
        "vector-app": VECTORS["app_tokens"][0]["token"].encode(),
        "fuzz-key-app": sign_app_token(claims).encode(),
        "receipt-url": (RECEIPT_PREFIX + receipt).encode(),
        "receipt-url-lower": (RECEIPT_PREFIX.lower() + receipt.lower()).encode(),
        "plain": b"https://example.com/menu",
        "not-utf8": b"\xff\xfe\x00TPA1.",
    }


def _records() -> list[dict[str, object]]:
    return [
        {"subject": SUBJECT, "purposes": ["analytics", "linking"], "expires": None},
        {"subject": "k1:" + "a" * 22, "purposes": [], "expires": "2030-01-01T00:00:00Z"},
        {
            "subject": "k2:" + "D-_" * 7 + "f",
            "purposes": ["marketing"],
            "expires": "2030-01-01T00:00:00+02:00",
        },
    ]


def consent_push() -> dict[str, bytes]:
    return {
        "delta": json.dumps({"v": 1, "records": _records()}).encode(),
        "empty": b'{"v":1,"records":[]}',
        "v2": b'{"v":2,"records":[]}',
    }


def consent_api() -> dict[str, bytes]:
    return {
        "snapshot": json.dumps({"cursor": "c-1", "reset": True, "records": _records()}).encode(),
        "delta": b'{"cursor":"c-2","reset":false,"records":[]}',
        "not-json": b"<html>502</html>",
    }


def consent_cursor() -> dict[str, bytes]:
    return {
        "epoch": b"1.42",
        "opaque": b"eyJvZmZzZXQiOjQyfQ==",
        "longest": b"c" * 512,
        "too-long": b"c" * 513,
        "space": b"1 2",
        "blob": b"\x001.42",
        "not-utf8": b"1.\xff",
    }


def consent_subject() -> dict[str, bytes]:
    return {
        "vector": SUBJECT.encode(),
        "longest-key-id": ("k" * 16 + ":" + "A" * 22).encode(),
        "short": b"k1:abc",
        "lone-surrogate": b"\\k1:\\ud800",
        "not-utf8": b"k1:\xed\xa0\x80" + b"A" * 19,
        "upper-key-id": ("K1:" + "A" * 22).encode(),
        "padded": ("k1:" + "A" * 21 + "=").encode(),
    }


def consent_seed() -> dict[str, bytes]:
    return {"seed": json.dumps({"records": _records()}, indent=1).encode()}


MINIMAL_CONFIG = b"""[gateway]
store = "nl-ams-001"
device = "gw-01"

[keyring]
active = "k1"
keys = { k1 = "keys/k1.key" }

[[sources]]
kind = "serial_card"
name = "lane1"
device = "/dev/ttyUSB0"
protocol = "rdm6300"
lane = "1"

[[sources]]
kind = "ble"
name = "entrance"
zone = "entrance"
allow_ibeacon_uuids = ["83256b74-78d0-43a4-8269-05f9dc8a44ba"]
"""


def config_toml() -> dict[str, bytes]:
    example = (ROOT / "firmware-config" / "gateway.example.toml").read_bytes()
    return {"example": example, "minimal": MINIMAL_CONFIG}


def identity() -> dict[str, bytes]:
    order = ("loyalty", "rfid", "ibeacon", "eddystone", "altbeacon", "app")
    return {
        f"vector-{i}": bytes([order.index(case["namespace"])]) + case["input"].encode()
        for i, case in enumerate(VECTORS["pseudonyms"])
    }


SEEDS = {
    "ble_raw": ble_raw,
    "ble_fields": ble_fields,
    "card_rdm6300": lambda: cards("rdm6300"),
    "card_scanner": lambda: cards("scanner"),
    "card_magstripe": lambda: cards("magstripe"),
    "escpos": escpos,
    "app_token": app_token,
    "receipt_token": receipt_token,
    "qr": qr,
    "consent_push": consent_push,
    "consent_api": consent_api,
    "consent_cursor": consent_cursor,
    "consent_subject": consent_subject,
    "consent_seed": consent_seed,
    "config_toml": config_toml,
    "identity": identity,
}
assert set(SEEDS) == set(TARGETS)


def write_seeds() -> int:
    """(Re)write every ``corpus/<target>/seed-*`` file; returns how many were written."""
    count = 0
    for name, make in SEEDS.items():
        folder = CORPUS / name
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("seed-*"):
            old.unlink()
        for label, data in make().items():
            (folder / f"seed-{label}").write_bytes(data)
            count += 1
    return count


if __name__ == "__main__":
    print(f"wrote {write_seeds()} seed files under {CORPUS}")
    sys.exit(0)
