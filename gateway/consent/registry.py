"""The consent gate: a local registry of pseudonym -> purposes and expiry.

The registry lives in memory for the hot path and in the buffer database (table
``consent``, gateway/buffer/consent_store.py) for restarts; every change goes through the
outbox writer.  An event passes
the gate when its subject has an unexpired consent for at least one purpose its type
needs; the event then carries exactly those purposes (contract §3).  Subject-less events
(``receipt.printed``, ``footfall``) pass with ``purposes: []``.

Sources of consent: ``sync`` (the registry, polled or pushed), ``seed`` (a file read at
start) and ``token`` (a verified app token, contract §6: fresh evidence for ``app:<sub>``
until ``token_ttl_s`` unless the registry holds a live record for the subject).  A
withdrawal erases the record and leaves a tombstone (``withdrawn``, rebuilt from the
erasure log at start): token evidence never revives a withdrawn subject; only a new
grant from the registry does.  Expired consent is no consent.

Decisions are counted: ``consent_decisions_total{decision, reason}`` at the gate and
``consent_evidence_total{outcome}`` for app-token evidence.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.buffer.consent_store import ConsentRow, ConsentSnapshot
from gateway.contract.events import purposes_json
from gateway.errors import ConfigError
from gateway.observe.metrics import Metrics
from gateway.ports import ConsentEvidence

log = logging.getLogger(__name__)

PURPOSES = frozenset({"analytics", "linking", "marketing"})
EVIDENCE_SOURCE = "token"  # consent recorded from an app token
# A snapshot (reset) replaces the records of these sources; token evidence is local.
REGISTRY_SOURCES = frozenset({"sync", "seed"})

Row = ConsentRow  # as stored (gateway/buffer/consent_store.py)

# A subject is a pseudonym (contract §2): key id, a colon, 16 bytes in base64url without
# padding.  Anything else from the registry or a push is refused before it is stored.
PSEUDONYM_RE = re.compile(r"[a-z0-9]{1,16}:[A-Za-z0-9_-]{22}")
MAX_SUBJECT_CHARS = 16 + 1 + 22


def is_pseudonym(value: object) -> bool:
    """Whether ``value`` is a pseudonym of the contract's grammar (nothing longer)."""
    return (
        isinstance(value, str)
        and len(value) <= MAX_SUBJECT_CHARS
        and PSEUDONYM_RE.fullmatch(value) is not None
    )


@dataclass(frozen=True, slots=True)
class Consent:
    purposes: frozenset[str]
    expires: float | None
    source: str
    updated_at: float

    def active(self, now: float) -> frozenset[str]:
        if self.expires is not None and now >= self.expires:
            return frozenset()
        return self.purposes


def parse_expiry(value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 64:
        raise ValueError("expires must be an RFC 3339 string or null")
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def parse_records(data: Any) -> list[tuple[str, frozenset[str], float | None]]:
    """Validate a ``{"records": [...]}`` document (contract §5); raise ValueError."""
    if not isinstance(data, dict) or not isinstance(data.get("records"), list):
        raise ValueError("expected an object with a 'records' list")
    out = []
    for i, rec in enumerate(data["records"]):
        if not isinstance(rec, dict):
            raise ValueError(f"records[{i}]: not an object")
        subject, purposes = rec.get("subject"), rec.get("purposes")
        if not isinstance(subject, str) or not is_pseudonym(subject):
            raise ValueError(
                f"records[{i}].subject: not a pseudonym (<key id>:<22 base64url characters>)"
            )
        if (
            not isinstance(purposes, list)
            or not all(isinstance(p, str) for p in purposes)
            or not set(purposes) <= PURPOSES
        ):
            raise ValueError(f"records[{i}].purposes: must be a list of {sorted(PURPOSES)}")
        try:
            expires = parse_expiry(rec.get("expires"))
        except ValueError as exc:
            raise ValueError(f"records[{i}].expires: {exc}") from None
        out.append((subject, frozenset(purposes), expires))
    return out


class ConsentRegistry:
    def __init__(
        self,
        required: Mapping[str, Sequence[str]],
        metrics: Metrics,
        *,
        token_ttl_s: float = 24 * 3600.0,
    ) -> None:
        self.required = {k: frozenset(v) for k, v in required.items()}
        self.metrics = metrics
        self.token_ttl_s = token_ttl_s
        self.records: dict[str, Consent] = {}
        # Tombstones: subject -> time of its last withdrawal (no record while present).
        self.withdrawn: dict[str, float] = {}
        self._passed = metrics.counter(
            "consent_decisions_total", decision="pass", reason="consented"
        )
        self._json: dict[frozenset[str], str] = {}

    # -- the gate (event loop, hot path) ------------------------------------------------

    def purposes_for(self, type_: str, subject: str | None, now: float) -> list[str] | None:
        """The purposes to put on the event, or None when it must be dropped."""
        encoded = self.purposes_json(type_, subject, now)
        return None if encoded is None else json.loads(encoded)

    def purposes_json(self, type_: str, subject: str | None, now: float) -> str | None:
        """Like ``purposes_for``, encoded as the event's JSON list (the hot path)."""
        if subject is None:
            return "[]"
        needed = self.required.get(type_)
        if not needed:
            self.metrics.inc("consent_decisions_total", decision="drop", reason="no_policy")
            return None
        rec = self.records.get(subject)
        if rec is None:
            reason = "withdrawn" if subject in self.withdrawn else "unknown_subject"
            self.metrics.inc("consent_decisions_total", decision="drop", reason=reason)
            return None
        granted = needed & rec.active(now)
        if not granted:
            reason = "expired" if rec.purposes & needed else "purpose_missing"
            self.metrics.inc("consent_decisions_total", decision="drop", reason=reason)
            return None
        self._passed.value += 1
        out = self._json.get(granted)
        if out is None:
            out = self._json[granted] = purposes_json(sorted(granted))
        return out

    def allows(self, type_: str, subject: str, now: float) -> bool:
        """Whether the gate would pass this event now (not counted; for held readings)."""
        needed = self.required.get(type_)
        rec = self.records.get(subject)
        return bool(needed and rec is not None and needed & rec.active(now))

    # -- changes (applied in memory; persisted by the caller through the outbox) ---------

    def apply(
        self,
        records: Iterable[tuple[str, frozenset[str], float | None]],
        source: str,
        now: float,
    ) -> list[Row]:
        """Apply records in memory; return the rows to persist.

        A grant (non-empty purposes) clears the subject's tombstone.  Withdrawals
        (``purposes`` empty) are the eraser's job (gateway.consent.erasure), not this method's.
        """
        rows = []
        for subject, purposes, expires in records:
            self.records[subject] = Consent(purposes, expires, source, now)
            if purposes:
                self.withdrawn.pop(subject, None)
            rows.append((subject, json.dumps(sorted(purposes)), expires, source, now))
        return rows

    def replace(
        self,
        records: Sequence[tuple[str, frozenset[str], float | None]],
        source: str,
        now: float,
    ) -> tuple[list[Row], list[str]]:
        """Apply a full snapshot: registry records absent from it end (token evidence
        stays).  Returns (rows to persist, subjects whose record was removed)."""
        present = {subject for subject, _, _ in records}
        removed = [
            subject
            for subject, rec in self.records.items()
            if rec.source in REGISTRY_SOURCES and subject not in present
        ]
        for subject in removed:
            del self.records[subject]
        return self.apply(records, source, now), removed

    def apply_evidence(self, evidence: ConsentEvidence, now: float) -> Row | None:
        """Record a verified app token's purposes (contract §6); the row to persist, or
        None when it changes nothing: the subject withdrew, or the registry has a live
        record for it (the registry says otherwise), or no known purpose is named."""
        subject = evidence.subject
        purposes = frozenset(evidence.purposes) & PURPOSES
        if subject in self.withdrawn:
            outcome = "withdrawn"
        elif not purposes:
            outcome = "no_purpose"
        else:
            rec = self.records.get(subject)
            outcome = (
                "registry"
                if rec is not None and rec.source != EVIDENCE_SOURCE and rec.active(now)
                else "applied"
            )
        self.metrics.inc("consent_evidence_total", outcome=outcome)
        if outcome != "applied":
            return None
        expires = min(evidence.expires, now + self.token_ttl_s)
        self.records[subject] = Consent(purposes, expires, EVIDENCE_SOURCE, now)
        return (subject, json.dumps(sorted(purposes)), expires, EVIDENCE_SOURCE, now)

    def forget_expired_evidence(self, now: float) -> list[str]:
        """Drop app-token consent that has expired and return those subjects (the caller
        deletes their rows).  Without this, every app user ever scanned would stay in
        memory and in the ``consent`` table for the life of the buffer; their next
        reading is refused as ``unknown_subject`` instead of ``expired``, the same drop."""
        gone = [
            subject
            for subject, rec in self.records.items()
            if rec.source == EVIDENCE_SOURCE and rec.expires is not None and now >= rec.expires
        ]
        for subject in gone:
            del self.records[subject]
        return gone

    def erase(self, subject: str, now: float) -> bool:
        """Forget a subject's consent and remember the withdrawal; True if it had one."""
        self.withdrawn[subject] = now
        return self.records.pop(subject, None) is not None

    def restore(self, snapshot: ConsentSnapshot) -> int:
        """At start: the stored rows back into memory, and a tombstone for each logged
        erasure newer than the subject's record.  Returns the subjects with a record."""
        for subject, purposes, expires, source, updated in snapshot.rows:
            self.records[subject] = Consent(
                frozenset(json.loads(purposes)), expires, source, updated
            )
        for subject, erased_at in snapshot.erasures:
            rec = self.records.get(subject)
            if rec is None or rec.updated_at < erased_at:
                self.withdrawn[subject] = erased_at
        return len(self.records)


def load_seed_file(path: Path) -> list[tuple[str, frozenset[str], float | None]]:
    """Read a seed file (the consent API's body shape); errors name the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return parse_records(data)
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: absurd nesting
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ConfigError([(str(path), "consent.seed_file", why)]) from None
