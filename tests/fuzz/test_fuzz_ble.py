"""BLE adverts: beacon frames built by the simulator's encoders, then broken on purpose.

Existing per-module properties cover random bytes and random field dicts; these start
from every beacon format with random parameters, corrupt the payload where it matters
(prefixes, frame types, lengths), and assert through both the raw-AD and the bleak-field
entry points: no exception, a known Skip reason or a canonical identity, and a resolver
cache that never passes its bound.
"""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from drivers.ble.adverts import (
    EDDYSTONE_UUID,
    AdvertResolver,
    AllowList,
    full_uuid16,
    parse_advert,
)
from simulators.devices.ble_scenario import (
    encode_altbeacon,
    encode_eddystone_tlm,
    encode_eddystone_uid,
    encode_eddystone_url,
    encode_ibeacon,
)
from tests.fuzz.seeds import raw_advert
from tests.fuzz.support import bounded, fuzz_settings, mutated
from tests.fuzz.targets import KEYRING, check_beacon_result, run_ble_raw

_hex = st.binary(min_size=1, max_size=20).map(bytes.hex)
_url = st.builds(
    lambda scheme, host, tld: f"{scheme}{host}{tld}",
    st.sampled_from(["http://www.", "https://www.", "http://", "https://"]),
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12),
    st.sampled_from([".com/", ".org", ".info/x", "/path?q=1", ""]),
)
_payloads = st.one_of(
    st.builds(
        encode_ibeacon,
        st.uuids().map(str),
        st.integers(0, 0xFFFF),
        st.integers(0, 0xFFFF),
        st.integers(-128, 127),
    ),
    st.builds(
        encode_eddystone_uid,
        st.binary(min_size=10, max_size=10).map(bytes.hex),
        st.binary(min_size=6, max_size=6).map(bytes.hex),
        st.integers(-128, 127),
    ),
    st.builds(encode_eddystone_url, _url, st.integers(-128, 127)),
    st.builds(
        encode_eddystone_tlm,
        st.integers(0, 0xFFFF),
        st.floats(-127, 127),
        st.integers(0, 2**32 - 1),
        st.floats(0, 400_000_000),
    ),
    st.builds(
        encode_altbeacon,
        st.binary(min_size=20, max_size=20).map(bytes.hex),
        st.integers(0, 0xFFFF),
        st.integers(-128, 127),
    ),
)


@st.composite
def _broken_fields(draw: st.DrawFn) -> tuple[dict[int, bytes], dict[str, bytes]]:
    manufacturer, service = draw(_payloads)
    manufacturer = {k: draw(mutated([v], max_ops=3)) for k, v in manufacturer.items()}
    service = {k: draw(mutated([v], max_ops=3)) for k, v in service.items()}
    if draw(st.booleans()):  # a phone or a second beacon in the same advert
        manufacturer[draw(st.sampled_from([0x004C, 0x0118, 0xFFFF]))] = draw(st.binary(max_size=30))
    if draw(st.booleans()):
        service[draw(st.sampled_from([EDDYSTONE_UUID, full_uuid16(0xFE9F), str(uuid.uuid4())]))] = (
            draw(st.binary(max_size=30))
        )
    return manufacturer, service


@fuzz_settings()
@given(fields=_broken_fields())
def test_broken_beacon_fields_parse_to_a_reason_or_a_canonical_id(
    fields: tuple[dict[int, bytes], dict[str, bytes]],
) -> None:
    check_beacon_result(bounded(parse_advert, *fields))


@fuzz_settings()
@given(data=st.data())
def test_broken_raw_adverts_keep_the_contract(data: st.DataObject) -> None:
    manufacturer, service = data.draw(_payloads)
    raw = raw_advert((manufacturer, service))
    bounded(run_ble_raw, data.draw(mutated([raw])))


@fuzz_settings(0.5)
@given(stream=st.lists(_broken_fields(), min_size=1, max_size=60))
def test_resolver_cache_stays_bounded(
    stream: list[tuple[dict[int, bytes], dict[str, bytes]]],
) -> None:
    allow = AllowList.build(altbeacon_prefixes=["0", "8"], eddystone_namespaces=["0" * 20])
    resolver = AdvertResolver(allow, KEYRING.pseudonym_of_canonical, maxsize=4)
    for manufacturer, service in stream:
        outcome, subject = bounded(resolver.resolve, manufacturer, service)
        assert (subject is not None) == (outcome == "ours")
        assert len(resolver) <= 4
