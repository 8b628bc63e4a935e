"""Events and batches on the wire (contract §3, §4), as pure functions.

An event is encoded once, when it is created, into everything but its ``seq``; the
outbox writer prepends the seq it assigns, so a batch is built by joining stored bodies.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_dumps = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode


def rfc3339(at: float) -> str:
    """RFC 3339 UTC, whole seconds, ``Z`` suffix."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(at)))


def new_stream_id() -> str:
    return secrets.token_hex(8)


def event_tail(
    *,
    type_: str,
    at: float,
    source: str,
    subject: str | None,
    purposes: Sequence[str],
    attrs: Mapping[str, Any],
) -> str:
    """The JSON of an event after its ``seq`` (starting with ``"type"``, ending with ``}``)."""
    body: dict[str, Any] = {"type": type_, "ts": rfc3339(at), "source": source}
    if subject is not None:
        body["subject"] = subject
    body["purposes"] = sorted(purposes)
    body["attrs"] = dict(attrs)
    return _dumps(body)[1:]


def with_seq(seq: int, tail: str) -> str:
    return f'{{"seq":{seq},{tail}'


def batch_prefix(store: str, device: str, stream: str) -> bytes:
    head = _dumps({"v": 1, "store": store, "device": device, "stream": stream})
    return (head[:-1] + ',"events":[').encode()


def batch_payload(prefix: bytes, bodies: Iterable[str]) -> bytes:
    return prefix + ",".join(bodies).encode() + b"]}"


def status_payload(state: str, at: float, version: str) -> bytes:
    return _dumps({"v": 1, "state": state, "ts": rfc3339(at), "version": version}).encode()


def topic_prefix(store: str, device: str) -> str:
    return f"touchpoint/v1/{store}/{device}"
