"""The daemon's one app-token replay set (contract §6): table ``token_replay`` and its
salt in ``meta``.  A row is a keyed digest of (sub, nonce), never the subject, and the
token's ``exp``; rows of expired tokens are pruned.  The set itself lives in memory
(gateway/consent/token_replay.py)."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3

from gateway.buffer.store import Store

SALT_KEY = "token_replay_salt"


def _load(conn: sqlite3.Connection, now: float) -> tuple[bytes, list[tuple[str, int]]]:
    """The salt (made on first use) and the rows still valid (expired ones go)."""
    conn.execute(
        "INSERT OR IGNORE INTO meta(key, value) VALUES (?, ?)",
        (SALT_KEY, secrets.token_hex(16)),
    )
    (salt,) = conn.execute("SELECT value FROM meta WHERE key = ?", (SALT_KEY,)).fetchone()
    conn.execute("DELETE FROM token_replay WHERE exp <= ?", (now,))
    rows = conn.execute("SELECT key, exp FROM token_replay").fetchall()
    return bytes.fromhex(str(salt)), [(str(k), int(e)) for k, e in rows]


class TokenStore(Store):
    def load(self, now: float) -> asyncio.Future[tuple[bytes, list[tuple[str, int]]]]:
        """One write (the salt may be made): (salt, [(key, exp)] of unexpired tokens)."""
        return self._write(lambda c: _load(c, now), invalidates=False)

    def add(self, key: str, exp: int) -> asyncio.Future[None]:
        def fn(c: sqlite3.Connection) -> None:
            c.execute("INSERT OR IGNORE INTO token_replay(key, exp) VALUES (?, ?)", (key, exp))

        return self._write(fn, invalidates=False)

    def prune(self, now: float) -> asyncio.Future[int]:
        """Delete the rows of tokens expired at ``now``; the count deleted."""

        def fn(c: sqlite3.Connection) -> int:
            return int(c.execute("DELETE FROM token_replay WHERE exp <= ?", (now,)).rowcount)

        return self._write(fn, invalidates=False)
