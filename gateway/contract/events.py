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
_quote = json.encoder.encode_basestring
# One C encoder built once: JSONEncoder.encode builds a new one on every call.  Compact
# separators, no NaN (ValueError), insertion order.
_c_encode = json.encoder.c_make_encoder(  # type: ignore[attr-defined]
    None, None, _quote, None, ":", ",", False, False, False
)


def _dumps_obj(obj: Any) -> str:
    return "".join(_c_encode(obj, 0))


_ts_cache: tuple[int, str] = (-1, "")


def rfc3339(at: float) -> str:
    """RFC 3339 UTC, whole seconds, ``Z`` suffix (the last second is cached)."""
    global _ts_cache  # noqa: PLW0603 - a one-entry cache on the hot path
    sec = int(at)
    if _ts_cache[0] != sec:
        _ts_cache = (sec, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(sec)))
    return _ts_cache[1]


def new_stream_id() -> str:
    return secrets.token_hex(8)


_purposes_cache: dict[tuple[str, ...], str] = {}


class EventEncoder:
    """Encodes the events of one (type, source) pair: the constant parts are built once."""

    __slots__ = ("_head", "_mid")

    def __init__(self, type_: str, source: str) -> None:
        self._head = f'"type":{_dumps(type_)},"ts":"'
        self._mid = f'","source":{_dumps(source)}'

    def tail(
        self,
        at: float,
        subject: str | None,
        purposes_json: str,
        attrs: Mapping[str, Any],
        *,
        unsynced: bool = False,
    ) -> str:
        """The event's JSON after its seq; ``purposes_json`` is the sorted list, encoded.
        ``unsynced``: the wall clock was not known to be synchronised when ``at`` was read,
        so the event says ``"clock":"unsynced"`` (contract: the clock flag)."""
        end = _UNSYNCED_END if unsynced else "}"
        if subject is None:
            return (
                f'{self._head}{rfc3339(at)}{self._mid},"purposes":{purposes_json},'
                f'"attrs":{_dumps_obj(attrs)}{end}'
            )
        return (
            f'{self._head}{rfc3339(at)}{self._mid},"subject":{_quote(subject)},'
            f'"purposes":{purposes_json},"attrs":{_dumps_obj(attrs)}{end}'
        )


_UNSYNCED_END = ',"clock":"unsynced"}'


def purposes_json(purposes: Sequence[str]) -> str:
    key = tuple(purposes)
    out = _purposes_cache.get(key)
    if out is None:
        out = _purposes_cache[key] = _dumps(sorted(purposes))
    return out


def event_tail(
    *,
    type_: str,
    at: float,
    source: str,
    subject: str | None,
    purposes: Sequence[str],
    attrs: Mapping[str, Any],
) -> str:
    """The JSON of an event after its ``seq`` (starting with ``"type"``, ending with ``}``).

    Keys in contract order; type, source and purposes come from small caches, so the hot
    path encodes only the subject and the attrs.
    """
    return EventEncoder(type_, source).tail(at, subject, purposes_json(purposes), attrs)


def with_seq(seq: int, tail: str) -> str:
    return f'{{"seq":{seq},{tail}'


def batch_prefix(store: str, device: str, stream: str) -> bytes:
    head = _dumps({"v": 1, "store": store, "device": device, "stream": stream})
    return (head[:-1] + ',"events":[').encode()


def batch_payload(prefix: bytes, bodies: Iterable[str]) -> bytes:
    return prefix + ",".join(bodies).encode() + b"]}"


def skipped_payload(prefix: bytes, ranges: Iterable[tuple[int, int]]) -> bytes:
    """A batch with no events declaring seq ranges (lo, hi, inclusive) of the stream that
    will never be sent (skipped after a power cut): ``"events":[],"skipped":[[lo,hi],…]``."""
    skipped = ",".join(f"[{int(lo)},{int(hi)}]" for lo, hi in ranges)
    return prefix + f'],"skipped":[{skipped}]}}'.encode()


def status_payload(state: str, at: float, version: str) -> bytes:
    return _dumps({"v": 1, "state": state, "ts": rfc3339(at), "version": version}).encode()


def topic_prefix(store: str, device: str) -> str:
    return f"touchpoint/v1/{store}/{device}"
