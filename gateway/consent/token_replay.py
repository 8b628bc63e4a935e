"""The daemon's one app-token replay set, kept in the buffer database (contract §6).

    load (at start, one outbox write): the salt from ``meta`` (made once), the
        ``token_replay`` rows of tokens not yet expired  ──►  ReplaySet in memory
    every camera verifies against that one set; a pair recorded  ──►  outbox write
        (INSERT into ``token_replay``), queued before the scan's event is submitted, so
        a scan that is durable has its replay row durable too
    prune (housekeeping): rows of tokens that have expired are deleted

A reload (SIGHUP) and a restart build the set again from the table, so a token is
accepted once per daemon, not once per camera or per run.  The rows hold a keyed digest
of (sub, nonce) (``tokens.replay_key``) and ``exp``: no app subject, no nonce.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
from typing import TYPE_CHECKING

from gateway.identity.tokens import ReplaySet

if TYPE_CHECKING:
    from gateway.buffer.outbox import Outbox

log = logging.getLogger(__name__)

SALT_KEY = "token_replay_salt"


def _load(conn: sqlite3.Connection, now: float) -> tuple[bytes, list[tuple[str, int]]]:
    """Outbox write: the salt (made on first use) and the rows still valid."""
    conn.execute(
        "INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)",
        (SALT_KEY, secrets.token_hex(16)),
    )
    (salt,) = conn.execute("SELECT value FROM meta WHERE key = ?", (SALT_KEY,)).fetchone()
    conn.execute("DELETE FROM token_replay WHERE exp <= ?", (now,))
    rows = conn.execute("SELECT key, exp FROM token_replay").fetchall()
    return bytes.fromhex(str(salt)), [(str(k), int(e)) for k, e in rows]


def _insert(conn: sqlite3.Connection, key: str, exp: int) -> None:
    conn.execute("INSERT OR IGNORE INTO token_replay(key, exp) VALUES (?, ?)", (key, exp))


def _prune(conn: sqlite3.Connection, now: float) -> int:
    return conn.execute("DELETE FROM token_replay WHERE exp <= ?", (now,)).rowcount


class TokenReplay:
    """The replay set shared by every source of the daemon, persisted by the outbox."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.set: ReplaySet | None = None

    async def load(self, now: float) -> ReplaySet:
        """Build the set from the buffer database (after ``outbox.open``)."""
        salt, rows = await self.outbox.write(lambda c: _load(c, now), invalidates=False)
        replay = ReplaySet(salt=salt, on_add=self._persist)
        n = replay.load(rows, now)
        if n:
            log.info("token replay set: %d used token(s) not yet expired", n)
        self.set = replay
        return replay

    def _persist(self, key: str, exp: int) -> None:
        fut = self.outbox.write(lambda c: _insert(c, key, exp), invalidates=False)
        fut.add_done_callback(_report)

    async def prune(self, now: float) -> int:
        """Forget the tokens that have expired, in memory and in the table."""
        if self.set is not None:
            self.set.prune(now)
        return await self.outbox.write(lambda c: _prune(c, now), invalidates=False)


def _report(fut: asyncio.Future[None]) -> None:
    """A failed write is shown by ``buffer_write_ok``; the pair stays in memory."""
    if not fut.cancelled() and (exc := fut.exception()) is not None:
        log.warning("could not record a used app token in the buffer: %s", exc)
