"""Canonical forms (contract §2): the vectors' inputs, edited character by character.

Only RejectedInput may escape ``canonicalise``; an accepted value is idempotent and
hashes.  Known bug (see test_corpus.KNOWN_BUGS): ibeacon major/minor written with
non-ASCII digits, or with more than 4300 digits, raise ValueError; tolerated here.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.identity.pseudonyms import NAMESPACES
from tests.fuzz.support import bounded, fuzz_settings, mutated_text
from tests.fuzz.targets import TARGETS, VECTORS, check_canonical

_INPUTS = {
    ns: [c["input"] for c in VECTORS["pseudonyms"] if c["namespace"] == ns] for ns in NAMESPACES
}


@fuzz_settings()
@given(namespace=st.sampled_from(NAMESPACES), data=st.data())
def test_edited_identifiers_canonicalise_or_are_rejected(
    namespace: str, data: st.DataObject
) -> None:
    seeds = _INPUTS[namespace] + [c["canonical"] for c in VECTORS["pseudonyms"]]
    raw = data.draw(mutated_text(seeds))
    try:
        bounded(check_canonical, namespace, raw)
    except TARGETS["identity"].known_bugs:
        if namespace != "ibeacon":
            raise
