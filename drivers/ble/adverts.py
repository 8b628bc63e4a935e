"""BLE beacon advert formats: pure parsers from advert fields to a beacon identity.

Inputs are what bleak hands a detection callback (``manufacturer_data``: company id ->
bytes, ``service_data``: 128-bit service UUID string -> bytes), or raw AD structures
(length, type, value ...) as they appear on air, which ``parse_ad`` turns into the same
two dicts.  Nothing here does I/O or logs: a raw beacon id is a personal identifier.

    iBeacon    manufacturer 0x004C: 02 15 | uuid(16) | major(2 BE) | minor(2 BE) | tx(1, signed)
    Eddystone  service 0xFEAA: frame type 00 UID | 10 URL | 20 TLM | 30 EID | others
               UID: tx(1, signed) | namespace(10) | instance(6) [| reserved(2)]
               TLM: version 00 (plain, 14 bytes) or 01 (encrypted, 18 bytes)
    AltBeacon  any manufacturer: BE AC | beacon id(20) | reference rssi(1, signed) | reserved(1)

Only iBeacon, Eddystone-UID and AltBeacon carry an identity; URL, TLM and EID frames are
parsed (URL, TLM) or recognised (EID, encrypted TLM) and reported as ``Skip`` with a
countable reason.  Frame types the Eddystone spec leaves to others (vendor sensor frames
such as 0x21, E2EE-EID 0x40, ...) and TLM versions other than 00 and 01 are healthy
devices: ``eddystone_other``.  Only a known frame of the wrong length, or an empty one,
is ``eddystone_malformed``.
"""

from __future__ import annotations

import struct
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

APPLE_COMPANY_ID = 0x004C
EDDYSTONE_UUID = "0000feaa-0000-1000-8000-00805f9b34fb"
_BASE_UUID_TAIL = "-0000-1000-8000-00805f9b34fb"

_IBEACON_PREFIX = b"\x02\x15"
_IBEACON_LEN = 2 + 16 + 2 + 2 + 1
_ALTBEACON_PREFIX = b"\xbe\xac"
_ALTBEACON_LEN = 2 + 20 + 1 + 1

# AD types (Bluetooth Assigned Numbers, "Common Data Types")
AD_SERVICE_DATA_16 = 0x16
AD_SERVICE_DATA_32 = 0x20
AD_SERVICE_DATA_128 = 0x21
AD_MANUFACTURER = 0xFF

# Eddystone-URL scheme prefixes and expansion codes (Eddystone spec, URL frame)
_URL_SCHEMES = ("http://www.", "https://www.", "http://", "https://")
_URL_CODES = (
    ".com/", ".org/", ".edu/", ".net/", ".info/", ".biz/", ".gov/",
    ".com", ".org", ".edu", ".net", ".info", ".biz", ".gov",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class BeaconId:
    """A beacon identity: contract §2 namespace and canonical value, plus its tx power.

    ``canonical`` is a raw identifier: it is left out of ``repr`` so it never reaches a log.
    """

    namespace: str
    canonical: str = field(repr=False)
    tx_power: int | None = None


@dataclass(frozen=True, slots=True)
class Skip:
    """An advert that carries no identity; ``reason`` is a short label to count."""

    reason: str


@dataclass(frozen=True, slots=True)
class EddystoneTlm:
    """Eddystone telemetry (unencrypted, version 0).  Never an identity."""

    battery_mv: int
    temperature_c: float | None
    adv_count: int
    uptime_s: float


ParseResult = BeaconId | Skip

# When an advert holds no identity, the most telling reason is the one counted.
_REASON_PRIORITY = (
    "ibeacon_malformed",
    "altbeacon_malformed",
    "eddystone_malformed",
    "eddystone_url",
    "eddystone_tlm",
    "eddystone_eid",
    "eddystone_other",
    "apple_other",
    "manufacturer_other",
)
_RANK = {reason: rank for rank, reason in enumerate(_REASON_PRIORITY)}
_SKIPS = (*(Skip(reason) for reason in _REASON_PRIORITY), Skip("no_beacon"))
_SKIP = {skip.reason: skip for skip in _SKIPS}  # shared: Skip is frozen, no per-advert object
_NO_BEACON = len(_SKIPS) - 1
_SKIP_AD_MALFORMED = Skip("ad_malformed")
_APPLE_OTHER = _RANK["apple_other"]
_MANUFACTURER_OTHER = _RANK["manufacturer_other"]


def full_uuid16(short: int) -> str:
    """The 128-bit string form of a 16-bit Bluetooth SIG UUID, as bleak spells it."""
    return f"0000{short:04x}{_BASE_UUID_TAIL}"


def parse_ibeacon(data: bytes) -> ParseResult:
    """Parse Apple manufacturer data (company id 0x004C already removed)."""
    if not data.startswith(_IBEACON_PREFIX):
        return _SKIP["apple_other"]  # phones' Nearby/Handoff payloads: never an identity
    if len(data) != _IBEACON_LEN:
        return _SKIP["ibeacon_malformed"]
    major, minor, tx = struct.unpack_from(">HHb", data, 18)
    h = data[2:18].hex()  # uuid 8-4-4-4-12, lowercase (str(uuid.UUID) is 3x slower)
    canonical = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}:{major}:{minor}"
    return BeaconId("ibeacon", canonical, tx)


def parse_altbeacon(data: bytes) -> ParseResult:
    """Parse manufacturer data (company id removed) that may be an AltBeacon."""
    if not data.startswith(_ALTBEACON_PREFIX):
        return _SKIP["manufacturer_other"]
    if len(data) != _ALTBEACON_LEN:
        return _SKIP["altbeacon_malformed"]
    ref_rssi = struct.unpack_from(">b", data, 22)[0]
    return BeaconId("altbeacon", data[2:22].hex(), ref_rssi)


def parse_eddystone_url(data: bytes) -> str | None:
    """Decode an Eddystone-URL frame (frame type byte included) or None if malformed."""
    if len(data) < 3 or data[0] != 0x10 or data[2] >= len(_URL_SCHEMES):
        return None
    parts = [_URL_SCHEMES[data[2]]]
    for byte in data[3:]:
        if byte < len(_URL_CODES):
            parts.append(_URL_CODES[byte])
        elif 0x21 <= byte <= 0x7E:
            parts.append(chr(byte))
        else:
            return None
    return "".join(parts)


_ETLM_LEN = 18  # 20 01 | encrypted TLM(12) | salt(2) | MIC(2)


def _tlm_reason(data: bytes) -> str:
    """Plain (00) or encrypted (01) TLM of the right length: ``eddystone_tlm``."""
    if len(data) < 2:
        return "eddystone_malformed"
    if data[1] == 0x00:
        return "eddystone_tlm" if parse_eddystone_tlm(data) is not None else "eddystone_malformed"
    if data[1] == 0x01:
        return "eddystone_tlm" if len(data) == _ETLM_LEN else "eddystone_malformed"
    return "eddystone_other"  # a TLM version this spec does not know yet


def parse_eddystone_tlm(data: bytes) -> EddystoneTlm | None:
    """Decode an unencrypted Eddystone-TLM frame (frame type byte included)."""
    if len(data) != 14 or data[0] != 0x20 or data[1] != 0x00:
        return None
    battery, temp_raw, adv_count, uptime = struct.unpack_from(">HhII", data, 2)
    temperature = None if temp_raw == -0x8000 else temp_raw / 256.0
    return EddystoneTlm(battery, temperature, adv_count, uptime / 10.0)


_EDDYSTONE_OTHER: dict[int, Callable[[bytes], str]] = {
    0x10: lambda d: (
        "eddystone_url" if parse_eddystone_url(d) is not None else "eddystone_malformed"
    ),
    0x20: _tlm_reason,
    0x30: lambda d: "eddystone_eid" if len(d) == 10 else "eddystone_malformed",
}


def parse_eddystone(data: bytes) -> ParseResult:
    """Parse Eddystone service data (frame type first).  Only UID frames are identities."""
    if not data:
        return _SKIP["eddystone_malformed"]
    frame = data[0]
    if frame == 0x00:
        if len(data) not in (18, 20):
            return _SKIP["eddystone_malformed"]
        tx = struct.unpack_from(">b", data, 1)[0]
        return BeaconId("eddystone", f"{data[2:12].hex()}:{data[12:18].hex()}", tx)
    reason = _EDDYSTONE_OTHER.get(frame)
    return _SKIP[reason(data) if reason is not None else "eddystone_other"]


def parse_advert(
    manufacturer_data: Mapping[int, bytes], service_data: Mapping[str, bytes]
) -> ParseResult:
    """The first beacon identity in one advert's fields, or why there is none.

    When nothing is an identity the most specific reason wins (a malformed beacon frame
    over an unrelated payload), so counters show broken beacons apart from phones.
    """
    rank = _NO_BEACON
    for company, data in manufacturer_data.items():
        # the two-byte prefix picks the one parser that can say more than "other"
        prefix = data[:2]
        if prefix == _IBEACON_PREFIX and company == APPLE_COMPANY_ID:
            result = parse_ibeacon(data)
        elif prefix == _ALTBEACON_PREFIX:
            result = parse_altbeacon(data)
        else:
            rank = min(rank, _APPLE_OTHER if company == APPLE_COMPANY_ID else _MANUFACTURER_OTHER)
            continue
        if isinstance(result, BeaconId):
            return result
        rank = min(rank, _RANK[result.reason])
    eddystone = service_data.get(EDDYSTONE_UUID)
    if eddystone is not None:
        result = parse_eddystone(eddystone)
        if isinstance(result, BeaconId):
            return result
        rank = min(rank, _RANK[result.reason])
    return _SKIPS[rank]


@dataclass(frozen=True, slots=True)
class AdFields:
    """Manufacturer and service data from raw AD structures, keyed as bleak keys them."""

    manufacturer_data: dict[int, bytes]
    service_data: dict[str, bytes]


_MIN_VALUE = {
    AD_MANUFACTURER: 2,
    AD_SERVICE_DATA_16: 2,
    AD_SERVICE_DATA_32: 4,
    AD_SERVICE_DATA_128: 16,
}  # the company id or service UUID that must open the value


def parse_ad(raw: bytes) -> AdFields | Skip:
    """Split raw advertising data into AD structures, as BlueZ does.

    A zero length byte ends the significant part (the rest is padding), as the Core
    specification says.  A structure that runs past the end stops the parse and one
    too short for its company id or service UUID is ignored; the structures before them
    are kept (a controller may cut the last structure short).  Only an advert with a
    broken structure and nothing kept is ``Skip('ad_malformed')``.  Repeated fields keep
    the last value, like BlueZ does.
    """
    manufacturer: dict[int, bytes] = {}
    service: dict[str, bytes] = {}
    broken = False
    pos = 0
    while pos < len(raw):
        length = raw[pos]
        if length == 0:
            break
        end = pos + 1 + length
        if end > len(raw):
            broken = True
            break
        ad_type, value = raw[pos + 1], bytes(raw[pos + 2 : end])
        pos = end
        if len(value) < _MIN_VALUE.get(ad_type, 0):
            broken = True
        elif ad_type == AD_MANUFACTURER:
            manufacturer[int.from_bytes(value[:2], "little")] = value[2:]
        elif ad_type == AD_SERVICE_DATA_16:
            service[full_uuid16(int.from_bytes(value[:2], "little"))] = value[2:]
        elif ad_type == AD_SERVICE_DATA_32:
            short = int.from_bytes(value[:4], "little")
            service[f"{short:08x}{_BASE_UUID_TAIL}"] = value[4:]
        elif ad_type == AD_SERVICE_DATA_128:
            service[str(uuid.UUID(bytes=value[15::-1]))] = value[16:]
    if broken and not manufacturer and not service:
        return _SKIP_AD_MALFORMED
    return AdFields(manufacturer, service)


def parse_raw_advert(raw: bytes) -> ParseResult:
    """Raw AD bytes -> beacon identity or why not."""
    fields = parse_ad(raw)
    if isinstance(fields, Skip):
        return fields
    return parse_advert(fields.manufacturer_data, fields.service_data)


def _hex(text: str) -> str:
    value = text.strip().lower().replace("-", "").replace(":", "")
    int(value, 16)  # ValueError if not hex
    return value


@dataclass(frozen=True)
class AllowList:
    """The retailer's own beacons: only these become identities.

    ``ibeacon_uuids`` match the UUID part, ``eddystone_namespaces`` the 20-hex namespace,
    ``altbeacon_prefixes`` a hex prefix of the 40-hex beacon id.  Empty lists allow nothing.
    """

    ibeacon_uuids: frozenset[str] = frozenset()
    eddystone_namespaces: frozenset[str] = frozenset()
    altbeacon_prefixes: tuple[str, ...] = ()

    @classmethod
    def build(
        cls,
        ibeacon_uuids: Iterable[str] = (),
        eddystone_namespaces: Iterable[str] = (),
        altbeacon_prefixes: Iterable[str] = (),
    ) -> AllowList:
        """Normalise configured values; raises ValueError on a malformed one."""
        uuids = frozenset(str(uuid.UUID(u.strip())) for u in ibeacon_uuids)
        namespaces = frozenset(_hex(n) for n in eddystone_namespaces)
        if any(len(n) != 20 for n in namespaces):
            raise ValueError("an Eddystone namespace is 20 hex digits")
        prefixes = tuple(sorted({_hex(p) for p in altbeacon_prefixes}))
        if any(not 1 <= len(p) <= 40 for p in prefixes):
            raise ValueError("an AltBeacon id prefix is 1-40 hex digits")
        return cls(uuids, namespaces, prefixes)

    def allows(self, beacon: BeaconId) -> bool:
        """True when ``beacon`` is one of the retailer's own."""
        if beacon.namespace == "ibeacon":
            return beacon.canonical[:36] in self.ibeacon_uuids
        if beacon.namespace == "eddystone":
            return beacon.canonical[:20] in self.eddystone_namespaces
        if beacon.namespace == "altbeacon":
            return beacon.canonical.startswith(self.altbeacon_prefixes)
        return False


OURS = "ours"
FOREIGN = "foreign"
# one field: (company id or service uuid, bytes); more: a tuple of such pairs
_PayloadKey = tuple[int | str, bytes] | tuple[tuple[int | str, bytes], ...]
_BEACON_PREFIXES = frozenset({_IBEACON_PREFIX, _ALTBEACON_PREFIX})
_APPLE_OTHER_OUTCOME: tuple[str, str | None] = ("apple_other", None)
_OTHER_OUTCOME: tuple[str, str | None] = ("manufacturer_other", None)


class AdvertResolver:
    """Advert fields -> ``(result, subject)``: parse, allow-list and pseudonym, memoised.

    ``result`` is ``"ours"`` (``subject`` is the pseudonym), ``"foreign"`` (a beacon that
    is not the retailer's) or a ``Skip`` reason (``subject`` is None).

    A beacon sends the same payload in every advert, so payloads that hold an identity are
    remembered in a bounded table keyed on the raw fields: a repeat costs one look-up, with
    no parsing, no allow-list check and no HMAC.  An advert with a single field (an iBeacon,
    AltBeacon or phone's manufacturer data; an Eddystone frame) is keyed on that field's
    ``(company or service uuid, bytes)`` pair as the dict hands it out, with no key to
    build.  Payloads without an identity (phones, whose payloads keep changing; malformed
    frames) are not remembered: they would only churn the table, and a single
    manufacturer field whose first two bytes are neither iBeacon's nor AltBeacon's is
    answered from those two bytes alone (phones are most of a store's adverts).

    The table is first in, first out: a hit only reads it.  A store's beacons are far
    fewer than it holds, and an evicted one costs one parse (its pseudonym stays in the
    ``PseudonymCache``); keeping it least-recently-used would cost a write per advert.
    ``pseudonym`` is only called on a miss (pass a ``PseudonymCache.get`` so two payloads
    of one beacon still cost one HMAC).  Raw payloads stay in memory; nothing here logs.
    """

    def __init__(
        self, allow: AllowList, pseudonym: Callable[[str, str], str], maxsize: int = 4096
    ) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self.allow = allow
        self._pseudonym = pseudonym
        self._maxsize = maxsize
        self._cache: OrderedDict[_PayloadKey, tuple[str, str | None]] = OrderedDict()
        self.misses = 0  # identity payloads parsed (hits are not counted: the hot path)

    def __len__(self) -> int:
        return len(self._cache)

    def forget(self, subject: str) -> int:
        """Drop the remembered payloads that resolve to ``subject`` (an erasure)."""
        keys = [k for k, (_result, s) in self._cache.items() if s == subject]
        for k in keys:
            del self._cache[k]
        return len(keys)

    def resolve(
        self, manufacturer_data: Mapping[int, bytes], service_data: Mapping[str, bytes]
    ) -> tuple[str, str | None]:
        """The outcome for one advert's fields (see the class docstring)."""
        key: _PayloadKey
        if service_data:
            if manufacturer_data or len(service_data) != 1:
                key = (*manufacturer_data.items(), *service_data.items())
            else:
                (key,) = service_data.items()  # (uuid, bytes): an Eddystone frame
        elif len(manufacturer_data) == 1:
            (key,) = manufacturer_data.items()  # (company, bytes)
            if key[1][:2] not in _BEACON_PREFIXES:  # as parse_advert decides, sooner
                return _APPLE_OTHER_OUTCOME if key[0] == APPLE_COMPANY_ID else _OTHER_OUTCOME
        else:
            key = tuple(manufacturer_data.items())
        outcome = self._cache.get(key)
        if outcome is not None:
            return outcome
        result = parse_advert(manufacturer_data, service_data)
        if not isinstance(result, BeaconId):
            return result.reason, None
        self.misses += 1
        if self.allow.allows(result):
            outcome = (OURS, self._pseudonym(result.namespace, result.canonical))
        else:
            outcome = (FOREIGN, None)
        cache = self._cache
        cache[key] = outcome
        if len(cache) > self._maxsize:
            cache.popitem(last=False)
        return outcome
