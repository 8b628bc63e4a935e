"""The consent gate: a local registry of pseudonym -> purposes and expiry.

The registry lives in memory for the hot path and in the buffer database (table
``consent``) for restarts; every change goes through the outbox writer.  An event passes
the gate when its subject has an unexpired consent for at least one purpose its type
needs; the event then carries exactly those purposes (contract §3).  Subject-less events
(``receipt.printed``, ``footfall``) pass with ``purposes: []``.

Decisions are counted: ``consent_decisions_total{decision, reason}``.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from gateway.errors import ConfigError
from gateway.events import purposes_json
from gateway.metrics import Metrics

log = logging.getLogger(__name__)

PURPOSES = frozenset({"analytics", "linking", "marketing"})


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
    if not isinstance(value, str):
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
        if not isinstance(subject, str) or ":" not in subject:
            raise ValueError(f"records[{i}].subject: not a pseudonym")
        if not isinstance(purposes, list) or not set(purposes) <= PURPOSES:
            raise ValueError(f"records[{i}].purposes: must be a list of {sorted(PURPOSES)}")
        try:
            expires = parse_expiry(rec.get("expires"))
        except ValueError as exc:
            raise ValueError(f"records[{i}].expires: {exc}") from None
        out.append((subject, frozenset(purposes), expires))
    return out


class ConsentRegistry:
    def __init__(self, required: Mapping[str, Sequence[str]], metrics: Metrics) -> None:
        self.required = {k: frozenset(v) for k, v in required.items()}
        self.metrics = metrics
        self.records: dict[str, Consent] = {}
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
            self.metrics.inc("consent_decisions_total", decision="drop", reason="unknown_subject")
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

    # -- changes (applied in memory; persisted by the caller through the outbox) ---------

    def apply(
        self,
        records: Iterable[tuple[str, frozenset[str], float | None]],
        source: str,
        now: float,
    ) -> list[tuple[str, str, float | None, str, float]]:
        """Apply records in memory; return the rows to persist."""
        rows = []
        for subject, purposes, expires in records:
            self.records[subject] = Consent(purposes, expires, source, now)
            rows.append((subject, json.dumps(sorted(purposes)), expires, source, now))
        return rows

    @staticmethod
    def persist(
        conn: sqlite3.Connection, rows: list[tuple[str, str, float | None, str, float]]
    ) -> None:
        conn.executemany(
            "INSERT OR REPLACE INTO consent(subject, purposes, expires, source, updated_at)"
            " VALUES (?, ?, ?, ?, ?)",
            rows,
        )

    def load(self, conn: sqlite3.Connection) -> int:
        for subject, purposes, expires, source, updated in conn.execute(
            "SELECT subject, purposes, expires, source, updated_at FROM consent"
        ):
            self.records[subject] = Consent(
                frozenset(json.loads(purposes)), expires, source, updated
            )
        return len(self.records)


def load_seed_file(path: Path) -> list[tuple[str, frozenset[str], float | None]]:
    """Read a seed file (the consent API's body shape); errors name the file."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return parse_records(data)
    except (OSError, ValueError) as exc:
        raise ConfigError([(str(path), "consent.seed_file", str(exc))]) from None
