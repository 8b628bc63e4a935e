"""What every typed store of the buffer database shares: its commands go to the outbox's
writer thread through the one submission path (``Outbox._submit_write`` / ``_submit_read``),
so a store's write queued while a commit runs is grouped with every other write into the
next transaction, exactly as the outbox's own appends and acks are.

    consent_store.py  consent rows and the consent sync cursor (``consent``, ``meta``)
    held_store.py     readings held for consent (``held``)
    token_store.py    the app-token replay set and its salt (``token_replay``, ``meta``)
    erasure_store.py  erasure across every table, the erasure log, the WAL checkpoint

A store holds no state of its own: build one over an open ``Outbox`` wherever it is
needed.  Each method returns the future the writer resolves once the command has run
(a write: once its transaction committed, or its group's stage write with a
durability window; see gateway/buffer/outbox.py).
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from gateway.buffer.outbox import Outbox

T = TypeVar("T")


class Store:
    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox

    def _write(
        self, fn: Callable[[sqlite3.Connection], T], *, invalidates: bool
    ) -> asyncio.Future[T]:
        """``invalidates=False`` promises that ``fn`` deletes no event the forwarder has
        not fetched yet (see ``Outbox._submit_write``); every store says which it is."""
        return self.outbox._submit_write(fn, invalidates=invalidates)

    def _read(
        self, fn: Callable[[sqlite3.Connection], T], *, flush: bool = True
    ) -> asyncio.Future[T]:
        return self.outbox._submit_read(fn, flush=flush)
