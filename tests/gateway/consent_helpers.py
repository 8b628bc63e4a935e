"""Shared set-up for the consent tests: a real outbox on a temp file and the pieces."""

from __future__ import annotations

import json
import random
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from gateway.buffer.consent_store import ConsentStore
from gateway.buffer.outbox import Outbox, Pending
from gateway.config.sections import BufferConfig, ConsentSyncConfig
from gateway.consent.erasure import Eraser
from gateway.consent.policy import ConsentPolicy, FootfallAggregator, HoldQueue
from gateway.consent.registry import ConsentRegistry
from gateway.consent.sync import ConsentSync, RegistryUpdater
from gateway.contract.events import EventEncoder
from gateway.observe.metrics import Metrics
from gateway.ports import Reading
from simulators.central.consent_api import ConsentAPI

REQUIRED = {
    "presence.enter": ("analytics",),
    "presence.exit": ("analytics",),
    "card.read": ("linking",),
    "qr.scan": ("linking",),
}
STORE = "nl-ams-001"


class Clock:
    def __init__(self, t: float = 1_700_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Rig:
    """The consent side of the daemon, wired as the daemon is meant to wire it."""

    path: Path
    clock: Clock
    policy_name: str = "drop"
    hold_ttl_s: float = 60.0
    k: int = 5
    window_s: int = 60
    metrics: Metrics = field(default_factory=Metrics)

    def __post_init__(self) -> None:
        self.outbox = Outbox(
            BufferConfig(path=self.path), self.metrics, now=self.clock, chunk_events=5
        )
        self.registry = ConsentRegistry(REQUIRED, self.metrics, token_ttl_s=3600)
        hold = (
            HoldQueue(self.outbox, self.metrics, self.hold_ttl_s)
            if self.policy_name == "hold"
            else None
        )
        foot = (
            FootfallAggregator(self.metrics, k=self.k, window_s=self.window_s)
            if self.policy_name == "aggregate"
            else None
        )
        self.policy = ConsentPolicy(
            self.policy_name, self.registry, self.metrics, hold=hold, footfall=foot
        )
        self.eraser = Eraser(self.outbox, self.registry, self.metrics, hold=hold, now=self.clock)
        self.updater = RegistryUpdater(
            self.registry,
            self.outbox,
            self.eraser,
            self.metrics,
            policy=self.policy,
            submit=self.accept,
            now=self.clock,
        )
        self.encoders: dict[tuple[str, str], EventEncoder] = {}
        self.accepted: list[Reading] = []

    async def open(self) -> None:
        self.outbox.open()
        self.registry.restore(await ConsentStore(self.outbox).load())
        if self.policy.hold is not None:
            await self.policy.hold.load()

    def accept(self, reading: Reading) -> bool:
        """What Gateway.accept does, with the consent wiring proposed for it."""
        if reading.evidence is not None:
            self.updater.apply_evidence(reading.evidence)
        purposes = self.registry.purposes_json(reading.type, reading.subject, reading.at)
        if purposes is None:
            self.policy.denied(reading, self.clock())
            return False
        key = (reading.source, reading.type)
        enc = self.encoders.get(key) or self.encoders.setdefault(
            key, EventEncoder(reading.type, reading.source)
        )
        tail = enc.tail(reading.at, reading.subject, purposes, reading.attrs)
        self.outbox.submit(Pending(reading.at, reading.type, reading.subject, tail))
        self.accepted.append(reading)
        return True

    def tick(self) -> None:
        for reading in self.policy.tick(self.clock()):
            self.accept(reading)

    def sync(self, base_url: str, token_file: Path, **kw: object) -> ConsentSync:
        cfg = ConsentSyncConfig.model_validate(
            {"base_url": base_url, "token_file": token_file, **kw}
        )
        return ConsentSync(cfg, STORE, self.updater)

    def close(self) -> None:
        self.outbox.close()

    def events(self) -> list[dict[str, object]]:
        conn = sqlite3.connect(self.path)
        try:
            rows = conn.execute("SELECT body FROM chunks ORDER BY lo").fetchall()
        finally:
            conn.close()
        out: list[dict[str, object]] = []
        for (body,) in rows:
            out.extend(json.loads("[" + body + "]"))
        return out


def card(subject: str, at: float, lane: str = "till-1") -> Reading:
    return Reading("card.read", "till-card", at, subject, {"lane": lane, "reader": "rdm6300"})


def enter(subject: str, at: float, zone: str = "entrance") -> Reading:
    return Reading("presence.enter", "entrance-ble", at, subject, {"zone": zone, "rssi": -60})


@asynccontextmanager
async def opened(path: Path, clock: Clock | None = None, **kw: Any) -> AsyncIterator[Rig]:
    """A Rig on ``path`` with its outbox open; closed on the way out."""
    rig = Rig(path, clock or Clock(), **kw)
    await rig.open()
    try:
        yield rig
    finally:
        rig.close()


def poller(
    rig: Rig, api: ConsentAPI, token_file: Path, *, seed: int = 7, timeout_s: float = 2.0, **kw: Any
) -> ConsentSync:
    """The rig's consent sync to ``api``: retries from 1 s up to 8 s, jitter drawn from
    ``seed`` so the delays are the same on every run."""
    sync = rig.sync(
        api.base_url, token_file, timeout_s=timeout_s, backoff={"min_s": 1.0, "max_s": 8.0}, **kw
    )
    sync.rng = random.Random(seed)
    return sync


@asynccontextmanager
async def polling(
    path: Path, api: ConsentAPI, token_file: Path, clock: Clock | None = None, **kw: Any
) -> AsyncIterator[tuple[Rig, ConsentSync, httpx.AsyncClient]]:
    """An opened Rig, its ``poller`` to ``api`` (``kw`` as there) and the poller's client."""
    async with opened(path, clock) as rig:
        sync = poller(rig, api, token_file, **kw)
        async with sync.client() as client:
            yield rig, sync, client
