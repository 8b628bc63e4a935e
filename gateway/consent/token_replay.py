"""The daemon's one app-token replay set, kept in the buffer database (contract §6).

    load (at start, one outbox write): the salt from ``meta`` (made once), the
        ``token_replay`` rows of tokens not yet expired  ──►  ReplaySet in memory
    every camera verifies against that one set; a pair recorded  ──►  outbox write
        (INSERT into ``token_replay``), queued before the scan's event is submitted, so
        a scan that is durable has its replay row durable too
    prune (housekeeping): rows of tokens that have expired are deleted

A reload (SIGHUP) and a restart build the set again from the table, so a token is
accepted once per daemon, not once per camera or per run.  The rows hold a keyed digest
of (sub, nonce) (``tokens.replay_key``) and ``exp``: no app subject, no nonce.  The
table's SQL is the buffer's: gateway/buffer/token_store.py.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from gateway.buffer.token_store import TokenStore
from gateway.identity.tokens import ReplaySet

if TYPE_CHECKING:
    from gateway.buffer.outbox import Outbox

log = logging.getLogger(__name__)


class TokenReplay:
    """The replay set shared by every source of the daemon, persisted by the outbox."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self.store = TokenStore(outbox)
        self.set: ReplaySet | None = None

    async def load(self, now: float) -> ReplaySet:
        """Build the set from the buffer database (after ``outbox.open``)."""
        salt, rows = await self.store.load(now)
        replay = ReplaySet(salt=salt, on_add=self._persist)
        n = replay.load(rows, now)
        if n:
            log.info("token replay set: %d used token(s) not yet expired", n)
        self.set = replay
        return replay

    def _persist(self, key: str, exp: int) -> None:
        fut = self.store.add(key, exp)
        fut.add_done_callback(_report)

    async def prune(self, now: float) -> int:
        """Forget the tokens that have expired, in memory and in the table."""
        if self.set is not None:
            self.set.prune(now)
        return await self.store.prune(now)


def _report(fut: asyncio.Future[None]) -> None:
    """A failed write is shown by ``buffer_write_ok``; the pair stays in memory."""
    if not fut.cancelled() and (exc := fut.exception()) is not None:
        log.warning("could not record a used app token in the buffer: %s", exc)
