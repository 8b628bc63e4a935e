"""Consent API bodies (§5), MQTT consent deltas (§4) and seed files, fuzzed as documents.

Valid records (subjects from the contract vectors, purpose subsets, RFC 3339 expiries)
are edited at the JSON level (fields dropped, replaced by any JSON value, records that
are not objects, wrong ``v``/``cursor``/``reset``) and sometimes at the byte level.
Documented errors: ``parse_records`` ValueError, ``parse_response`` SyncProtocolError,
``on_push`` none (it counts ``invalid``), the poller SyncError.

Known bugs (see test_corpus.KNOWN_BUGS), tolerated here by type: a purposes list holding
a list or object leaks TypeError; a deeply nested body leaks RecursionError.
"""

from __future__ import annotations

import json
from datetime import UTC, timedelta, timezone
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gateway.consent.registry import parse_records
from gateway.consent.sync import parse_response
from gateway.errors import SyncProtocolError
from tests.fuzz.support import bounded, fuzz_settings, json_values, mutated
from tests.fuzz.targets import (
    TARGETS,
    VECTORS,
    _check_records,
    run_consent_api,
    run_consent_cursor,
    run_consent_push,
    run_consent_seed,
    run_consent_subject,
)

_ZONES = [UTC, timezone(timedelta(hours=14)), timezone(-timedelta(hours=23, minutes=59))]
_SUBJECTS = [c["pseudonym"] for c in VECTORS["pseudonyms"]]
_expiry = st.one_of(
    st.none(),
    st.datetimes(timezones=st.none() | st.sampled_from(_ZONES)).map(lambda d: d.isoformat()),
    st.sampled_from(["2030-01-01T00:00:00Z", "0001-01-01", "9999-12-31T23:59:59+23:59", "Z",
                     "2030-13-01T00:00:00Z", "2030-01-01T00:00:00ZZ", ""]),
)  # fmt: skip
_record = st.fixed_dictionaries(
    {
        "subject": st.sampled_from(_SUBJECTS) | st.text(max_size=10),
        "purposes": st.lists(st.sampled_from(["analytics", "linking", "marketing"]), max_size=3),
    },
    optional={"expires": _expiry},
)


@st.composite
def _records(draw: st.DrawFn) -> list[Any]:
    records: list[Any] = draw(st.lists(_record, max_size=5))
    for i in draw(st.lists(st.integers(0, 4), max_size=3)):
        if i >= len(records) or not isinstance(records[i], dict):
            records.append(draw(json_values()))  # not a record at all
            continue
        key = draw(st.sampled_from(["subject", "purposes", "expires", "extra"]))
        if draw(st.booleans()):
            records[i][key] = draw(json_values())
        else:
            records[i].pop(key, None)
    return records


@st.composite
def _documents(draw: st.DrawFn, head: dict[str, Any]) -> Any:
    doc = {**head, "records": draw(_records())}
    for key in draw(st.lists(st.sampled_from([*head, "records"]), max_size=2)):
        doc[key] = draw(json_values())
    return doc if draw(st.integers(0, 9)) else draw(json_values())


def _bytes(doc: Any, draw: Any) -> bytes:
    raw = json.dumps(doc).encode()
    return draw(mutated([raw], max_ops=3)) if draw(st.integers(0, 3)) == 0 else raw


@fuzz_settings(0.5)
@given(doc=_documents({}))
def test_records_documents_give_value_error_or_valid_records(doc: Any) -> None:
    try:
        _check_records(bounded(parse_records, doc))
    except ValueError as exc:
        assert str(exc)
    except TARGETS["consent_seed"].known_bugs:
        pass


@fuzz_settings(0.5)
@given(doc=_documents({"cursor": "c-1", "reset": False}))
def test_registry_bodies_give_protocol_error_or_valid_records(doc: Any) -> None:
    try:
        cursor, reset, records = bounded(parse_response, doc)
    except SyncProtocolError as exc:
        assert str(exc)
    except TARGETS["consent_api"].known_bugs:
        pass
    else:
        assert isinstance(cursor, str) and isinstance(reset, bool)
        _check_records(records)


@fuzz_settings(0.5)
@given(doc=_documents({"cursor": "c-1", "reset": True}), data=st.data())
def test_registry_http_bodies_through_the_poller(doc: Any, data: st.DataObject) -> None:
    try:
        bounded(run_consent_api, _bytes(doc, data.draw))
    except TARGETS["consent_api"].known_bugs:
        pass


@fuzz_settings(0.5)
@given(doc=_documents({"v": 1}), data=st.data())
def test_mqtt_consent_deltas_are_applied_or_counted_invalid(doc: Any, data: st.DataObject) -> None:
    try:
        bounded(run_consent_push, _bytes(doc, data.draw))
    except TARGETS["consent_push"].known_bugs:
        pass


@fuzz_settings(0.5)
@given(doc=_documents({}), data=st.data())
def test_seed_files_load_or_give_config_error(doc: Any, data: st.DataObject) -> None:
    try:
        bounded(run_consent_seed, _bytes(doc, data.draw))
    except TARGETS["consent_seed"].known_bugs:
        pass


# -- the boundaries issue 14 added: cursors and subjects ----------------------------------

_any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=600)
_near_pseudonyms = st.from_regex(r"[a-z0-9]{1,17}:[A-Za-z0-9_=+/-]{20,24}", fullmatch=True)


@fuzz_settings(0.5)
@given(
    cursor=_any_text
    | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=500, max_size=520)
)
def test_cursors_are_usable_or_refused(cursor: str) -> None:
    bounded(run_consent_cursor, cursor.encode("utf-8", "surrogatepass"))


@fuzz_settings(0.5)
@given(subject=_any_text | _near_pseudonyms)
def test_subjects_are_pseudonyms_or_refused(subject: str) -> None:
    bounded(run_consent_subject, subject.encode("utf-8", "surrogatepass"))
    escaped = json.dumps(subject)[1:-1]  # as a JSON body carries it: \ud800 and all
    bounded(run_consent_subject, b"\\" + escaped.encode())


@fuzz_settings(0.5)
@given(
    cursor=_any_text,
    subject=_any_text | _near_pseudonyms | st.sampled_from(_SUBJECTS),
    data=st.data(),
)
def test_registry_answers_with_any_cursor_and_subject(
    cursor: str, subject: str, data: st.DataObject
) -> None:
    """Through the real poller: a cursor or subject it accepts is one it can use next."""
    doc = {
        "cursor": cursor,
        "reset": data.draw(st.booleans()),
        "records": [{"subject": subject, "purposes": ["linking"], "expires": None}],
    }
    bounded(run_consent_api, json.dumps(doc).encode())
    bounded(run_consent_push, json.dumps({"v": 1, "records": doc["records"]}).encode())
