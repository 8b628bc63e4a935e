"""The small interfaces the core defines; drivers and simulators implement them.

    Source     yields Readings (already pseudonymised at the parser boundary)
    Publisher  publishes one message and reports the broker's verdict

Nothing here imports a hardware library.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from gateway.identity.pseudonyms import Keyring
from gateway.observe.metrics import Metrics

if TYPE_CHECKING:
    from gateway.identity.tokens import ReplaySet

EVENT_TYPES = (
    "presence.enter",
    "presence.exit",
    "card.read",
    "qr.scan",
    "receipt.printed",
    "footfall",
)


@dataclass(frozen=True, slots=True)
class Reading:
    """One thing a source saw, ready to become an event.

    ``subject`` is a pseudonym (never a raw identifier) or None for subject-less types.
    ``at`` is the unix time of capture.  ``attrs`` are the contract's type-specific attrs.
    ``evidence`` optionally carries consent evidence that arrived with the reading
    (a verified app token's purposes and expiry), applied before the consent gate.
    """

    type: str
    source: str
    at: float
    subject: str | None
    attrs: Mapping[str, Any]
    evidence: ConsentEvidence | None = None


@dataclass(frozen=True, slots=True)
class ConsentEvidence:
    subject: str
    purposes: tuple[str, ...]
    expires: float


@dataclass
class SourceContext:
    """What the core hands a source: its name, the keyring, counters and a clock.

    ``replay``: the daemon's one app-token replay set (``gateway.consent.token_replay``), shared
    by every source and kept in the buffer database; None outside the daemon.
    """

    name: str
    keyring: Keyring
    metrics: Metrics
    now: Callable[[], float] = time.time
    store: str = ""
    state: dict[str, Any] = field(default_factory=dict)
    replay: ReplaySet | None = None

    def set_state(self, state: str, detail: str = "") -> None:
        """Report this source's health (``ok``, ``connecting``, ``absent``, ``error``)."""
        self.state = {"state": state, "detail": detail, "since": self.now()}
        self.metrics.set_source_state(self.name, state, detail)

    def reject(self, reason: str) -> None:
        """Count one rejected input by reason; the raw input is never logged."""
        self.metrics.inc("readings_rejected_total", source=self.name, reason=reason)


@runtime_checkable
class Source(Protocol):
    """A configured input.  ``readings`` runs until cancelled, and then ends promptly.

    A device that goes away is either reported with ``SourceContext.set_state`` (``absent``
    or ``error``) while the source reopens it with backoff itself, as every driver does, or
    raised as SourceError, and the supervisor restarts the source with backoff.  Anything
    else it raises ends the daemon (a bug, for systemd to restart).  One contract suite
    holds every implementation to this: tests/drivers/test_source_contract.py.
    """

    name: str

    def readings(self) -> AsyncIterator[Reading]: ...


@dataclass(frozen=True, slots=True)
class Verdict:
    """The broker's answer to one publish: ``ok`` or a failure with its reason code.

    ``abandoned``: no answer will come (the link dropped first, or there was none); the
    message may or may not have reached the broker, and the caller sends it again from
    its own store once the link is back."""

    ok: bool
    reason_code: int = 0
    reason: str = ""
    abandoned: bool = False


PACKET_TOO_LARGE = 0x95  # the MQTT 5 reason code, also for a payload refused before sending


@runtime_checkable
class Publisher(Protocol):
    """Publishes messages and reports each one's broker verdict.

    ``publish`` returns once the message is handed to the client; the awaitable it
    returns resolves with the broker's verdict (PUBACK reason code), or as ``abandoned``
    when the link drops first or is down.  The client keeps nothing across a disconnect:
    the caller's store is the only queue, and it sends an abandoned message again after
    the reconnect.
    """

    async def start(self) -> None: ...

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False
    ) -> Awaitable[Verdict]: ...

    @property
    def connected(self) -> bool: ...

    async def wait_connected(self) -> None: ...

    async def close(self, *, graceful: bool = True) -> None: ...

    def subscribe(self, topic: str, callback: Callable[[bytes], None]) -> None:
        """Receive ``topic`` on every connection; ``callback(payload)`` runs on the event
        loop.  Called before ``start`` (the daemon takes consent pushes this way)."""
        ...

    def on_connect(self, hook: Callable[[], object]) -> None:
        """Call ``hook()`` on the event loop after every successful connect."""
        ...

    @property
    def in_flight(self) -> int:
        """Messages handed to the link and not yet answered."""
        ...

    @property
    def receive_maximum(self) -> int | None:
        """The broker's Receive Maximum from its CONNACK, or None (no limit announced)."""
        ...

    def max_payload(self, topic: str) -> int | None:
        """The largest payload the broker takes on ``topic``, or None (no limit)."""
        ...


@runtime_checkable
class Forgets(Protocol):
    """A source that keeps subjects in memory (debounce, presence) and clears one on erasure."""

    def forget(self, subject: str) -> None: ...


@runtime_checkable
class ReportsMemory(Protocol):
    """A source that reports the sizes of its in-memory tables (``bench memory``, health)."""

    def memory_sizes(self) -> Mapping[str, int]: ...
