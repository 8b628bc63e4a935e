"""The outbox: a SQLite buffer in WAL mode, owned by one writer thread.

Every database operation is a command queued to that thread.  Writes queued while a
commit runs are grouped (up to ``commit_max_events`` events or ``commit_interval_ms``).

With ``durability_window_ms`` 0, each group is a transaction committed with
``synchronous=FULL`` before its futures resolve.  With a window (the default, 500 ms),
each group of events is written to the stage (gateway/buffer/stage.py): in the OS from then on,
so committed against any crash of the process, and its futures resolve.  Acks are staged
too.  Events still undelivered a window after they were read go into the database in one
``synchronous=FULL`` transaction with the acks and the bookkeeping; delivered ones never
do.  A power cut loses at most the undelivered events of the last window.  Reads that
need the database (a backlog fetch, erasure, consent) commit the staged rows first.

``seq`` is assigned here, in commit order; ``last_seq`` is stored with the rows, and a
high-water mark ``seq_reserved`` is fsynced before any seq above it is handed out, so a
seq is never reused, even after the rows are deleted or a power cut took the stage.  The
stream id is created once with the database.  The seqs a cut skips (from the last one known
to be handed out to ``seq_reserved``) are stored as a declaration (meta ``skipped_seqs``,
in the recovery's transaction) that the forwarder sends to the central (the batch's
``skipped``, contract README "Delivery semantics") and removes once a PUBACK confirms it.

Events are stored in chunks: one row holds a run of consecutive events (at most a batch's
worth of events and bytes), already encoded as the inside of a batch's ``events`` array.
The forwarder publishes one or more whole chunks per batch and a PUBACK deletes whole
rows, so per-event database work is one string join — not an index insert and a delete.
Each row lists its subjects, so an erasure finds and rewrites the rows of one subject.

Bounds: ``max_page_count`` caps the file (deletes still work when it is full), rows older
than ``max_age_s`` are expired, and when full the configured policy applies
(``evict_oldest`` deletes the oldest rows; ``drop_new`` refuses the new ones); every
eviction, expiry and drop is counted.  ``secure_delete`` overwrites deleted content.

The writer thread cannot end unnoticed: an exception other than a SQLite error (a bug, or
a database changed under the daemon into something the code does not expect) is logged,
counted (``buffer_writer_failures_total``), turns ``buffer_write_ok`` to 0, fails every
command queued or yet to come with ``WriterDied``, and resolves ``failed``: the daemon
watches it and exits non-zero so systemd restarts it.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from gateway.buffer.migrations import migrate
from gateway.buffer.stage import (
    Ack,
    Mark,
    Marker,
    Row,
    encode_ack,
    encode_mark,
    encode_row,
    marker_path,
    parse,
    stage_path,
)
from gateway.buffer.transaction import transaction
from gateway.config.credentials import private_database
from gateway.config.sections import BufferConfig
from gateway.contract.events import new_stream_id, with_seq
from gateway.errors import BufferError_, BufferFull, WriterDied
from gateway.identity.clock import CLOCK_FLOOR
from gateway.observe.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

EVICT_MIN_EVENTS = 100
EVICT_LOG_INTERVAL_S = 60.0  # evictions are logged as a sum, at most this often
WAL_RESERVE_MAX = 8 * 1024 * 1024  # free space kept for the WAL when the disk is small
RECAP_INTERVAL_S = 1.0  # how often the cap follows the filesystem's free space
WAL_WINDOW_PAGES = 64  # wal_autocheckpoint with a durability window
SEQ_RESERVE_MIN = 10_000  # seqs reserved (durably) ahead of those handed out
# Declared skipped seq ranges not yet confirmed by a PUBACK (meta SKIPPED_KEY, JSON): at
# most this many, the oldest dropped (logged) beyond it, so a box cut again and again
# while offline keeps a bounded list (64 ranges: under 3 KB in one batch).  Ranges are
# never merged: the seqs between two ranges were handed out and may still be sent.
SKIPPED_KEY = "skipped_seqs"
SKIPPED_MAX = 64
# A window whose events were all delivered within it has nothing that needs the disk but
# its bookkeeping (last_seq, last_publish_at): that is stored at most this often (status
# tools and tests read last_seq from the file and see it move within ~1.5 s).  Until
# then the stage keeps the window's rows and acks, so a crash still numbers on from them.
BOOKKEEPING_INTERVAL_S = 1.0
STAGE_MAX_BYTES = 16 * 1024 * 1024  # a larger stage is committed before its window ends
# ``buffer.disk_reserve_bytes``: a file of zeros beside the buffer (``<buffer>.reserve``),
# deleted the moment the disk is full, so that the full-buffer policy can still run:
# evicting rows is itself a write and needs room in the WAL.  Made again once the disk
# has 4x its size free.


@dataclass(slots=True)
class Pending:
    """An event waiting to be committed: its JSON after ``seq``, and what erasure needs."""

    created: float
    type: str
    subject: str | None
    tail: str


@dataclass(frozen=True, slots=True)
class Batch:
    """Whole chunks to publish together: ``bodies`` join with "," into the events array."""

    lo: int
    hi: int
    count: int
    bodies: list[str]
    nbytes: int
    created: list[float]


# A stored chunk: (lo, hi, n, created (per event in memory, oldest from the database), body)
Chunk = tuple[int, int, int, list[float] | float, str]


@dataclass(slots=True)
class _Cmd:
    kind: str  # "append" | "write" | "read"
    fn: Callable[[sqlite3.Connection], Any] | None = None
    events: list[Pending] = field(default_factory=list)
    rows: list[Chunk] = field(default_factory=list)
    # A write that may delete rows not yet fetched (expiry, erasure) empties the tail cache.
    invalidates: bool = True
    # an ack (lo, hi, when, events): staged with the window, needs no fsync of its own
    ack: tuple[int, int, float, int] | None = None
    flush: bool = True  # a read that needs the window's rows in the database first
    future: asyncio.Future[Any] | None = None
    result: Any = None
    error: BaseException | None = None


_STOP = object()


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=5)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


class Outbox:
    def __init__(
        self,
        cfg: BufferConfig,
        metrics: Metrics,
        *,
        now: Callable[[], float] = time.time,
        chunk_events: int = 500,
        chunk_bytes: int = 255 * 1024,
    ) -> None:
        self.cfg = cfg
        self.chunk_events = chunk_events
        self.chunk_bytes = chunk_bytes
        self.metrics = metrics
        self.now = now
        self.stream = ""
        self.new_data = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._next_seq = 1
        self._page_size = 4096
        self._open: list[Pending] = []
        # Writer thread only: recently committed chunks, complete from seq ``_cache_from``
        # on, so the live path fetches without reading the database.
        self._recent: deque[Chunk] = deque()
        self._recent_max = 2000
        self._cache_from = 1
        self._open_future: asyncio.Future[list[int]] | None = None
        self._outstanding = 0
        self._max_outstanding = 4 * cfg.commit_max_events
        self._capacity = asyncio.Event()
        self._last_write_ok: bool | None = None  # writer thread only
        self._recap_at = 0.0  # writer thread only: when to size the cap to the disk again
        self._evict_log_at = 0.0  # writer thread only: evictions not yet logged, and when
        self._evicted_unlogged = 0
        self._evict_logged = False
        self._dead: WriterDied | None = None  # set by the writer thread as it dies
        # Durability window (gateway/buffer/stage.py); writer thread only.
        self._window_s = cfg.durability_window_ms / 1000.0
        self._window_due: float | None = None  # when the staged rows must be committed
        self._staged: list[Row] = []  # rows written to the stage, not to the database
        self._staged_at: list[float] = []  # when each was staged (monotonic)
        self._staged_events = 0
        self._deletes: list[tuple[int, int, int]] = []  # acked rows in the database: lo, hi, n
        self._db_hi = 0  # the highest seq inserted into the database
        self._db_last_seq = 0  # meta last_seq as stored
        self._reserved = 0  # meta seq_reserved as stored: no seq above it is handed out
        self._publish_at: float | None = None  # last_publish_at not yet stored
        self._bookkeeping_due = 0.0  # monotonic: when bookkeeping alone is stored again
        self._wake_reader = False  # a backlog read missed staged rows: set new_data once stored
        self._stage_fd: int | None = None
        self._stage_size = 0
        self._marker: Marker | None = None
        self._stage_max = min(STAGE_MAX_BYTES, cfg.max_bytes // 8)
        self._near_full = False  # over half the cap: commit each group, as with no window
        self._failed: asyncio.Future[WriterDied] | None = None
        # Declared skipped seq ranges (lo, hi) not yet confirmed sent: read at open, then
        # changed only on the loop (``skipped_sent``).
        self._skipped: list[tuple[int, int]] = []
        self._test_wal_pages = _test_wal_pages()  # the power-cut rig's checkpoints, or None

    # -- lifecycle (blocking; call before the pipeline starts) ------------------------

    def open(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        path = Path(self.cfg.path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            private_database(path)  # 0600 whatever the umask: it holds pseudonyms
            conn = connect(path)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {_synchronous()}")
            conn.execute("PRAGMA secure_delete = ON")
            conn.execute(f"PRAGMA journal_size_limit = {16 * 1024 * 1024}")
            self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
            migrate(conn, str(path))
            self._keep_reserve()
            self._set_max_pages(conn)
            row = conn.execute("SELECT value FROM meta WHERE key = 'stream'").fetchone()
            if row is None:
                self.stream = new_stream_id()
                conn.execute(
                    "INSERT INTO meta(key, value) VALUES ('stream', ?), ('created_at', ?)",
                    (self.stream, str(self.now())),
                )
            else:
                self.stream = str(row[0])
            self._next_seq = _last_seq(conn) + 1
            self._recover(conn)
            self._cache_from = self._next_seq
        except (sqlite3.Error, OSError) as exc:
            raise BufferError_(f"{path}: cannot open the buffer database: {exc}") from exc
        self._conn = conn
        self._loop = loop or asyncio.get_running_loop()
        self._failed = self._loop.create_future()
        self._last_write_ok = True
        self.metrics.set("buffer_write_ok", 1)  # the writer thread reports changes
        self._thread = threading.Thread(target=self._run, name="outbox-writer", daemon=True)
        self._thread.start()

    def _set_max_pages(self, conn: sqlite3.Connection, ceiling: int | None = None) -> int:
        """Cap the file at ``max_bytes``, or lower when the filesystem has less room.

        A filesystem that fills before the cap (a small partition, other files) would
        leave SQLite unable to grow the WAL even to delete rows.  So the buffer's room
        on the filesystem (its files plus the free space) is split: half of it, at most
        ``WAL_RESERVE_MAX``, is kept for the WAL (checkpointed at a quarter of that),
        the rest may hold the database.  Returns the cap in pages.
        """
        pages = max(16, self.cfg.max_bytes // self._page_size)
        if ceiling is not None:  # never above the cap in force
            pages = min(pages, ceiling)
        current = int(conn.execute("PRAGMA page_count").fetchone()[0])
        path = Path(self.cfg.path)
        try:
            fs = os.statvfs(path.parent)
            room = fs.f_bavail * fs.f_frsize
            for f in (path, path.with_name(path.name + "-wal")):
                room += f.stat().st_size if f.exists() else 0
        except OSError:
            room = -1
        if room >= 0:
            reserve = min(WAL_RESERVE_MAX, room // 2)
            wal_pages = max(16, reserve // 4 // self._page_size)
            if self.cfg.durability_window_ms > 0:
                # few, large commits: a short WAL is overwritten in place from its start
                # (no new blocks, no filesystem journal per commit); it checkpoints at most
                # once per commit, and each checkpoint writes each changed page once
                wal_pages = min(wal_pages, WAL_WINDOW_PAGES)
            conn.execute(f"PRAGMA wal_autocheckpoint = {self._test_wal_pages or wal_pages}")
            pages = min(pages, (room - reserve) // self._page_size)
        # max_page_count cannot be set below the current size; it then stays at the size.
        return int(conn.execute(f"PRAGMA max_page_count = {max(pages, current, 16)}").fetchone()[0])

    def close(self, *, checkpoint: bool = True) -> None:
        """Finish queued commands, checkpoint the WAL and close the database."""
        if self._thread is not None:
            self._flush_open()
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None
        if self._conn is not None and checkpoint:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("WAL checkpoint at close failed: %s", exc)
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._close_stage()

    # -- API for the event loop ------------------------------------------------------

    def submit(self, event: Pending) -> tuple[asyncio.Future[list[int]], int]:
        """Queue one event.  Returns (future, index): the future resolves, once the event
        is committed, with the seqs of every event submitted in the same loop iteration;
        this event's seq is at ``index``.  One future per group keeps the hot path cheap.
        """
        assert self._loop is not None
        if not self._open:
            self._open_future = self._loop.create_future()
            self._loop.call_soon(self._flush_open)
        self._open.append(event)
        self._outstanding += 1
        index = len(self._open) - 1
        fut = self._open_future
        assert fut is not None
        if len(self._open) >= self.cfg.commit_max_events:
            self._flush_open()
        return fut, index

    def submit_many(self, events: list[Pending]) -> asyncio.Future[list[int]]:
        assert self._loop is not None
        fut: asyncio.Future[list[int]] = self._loop.create_future()
        self._outstanding += len(events)
        self._put(_Cmd("append", events=events, future=fut))
        return fut

    def _flush_open(self) -> None:
        if self._open:
            self._put(_Cmd("append", events=self._open, future=self._open_future))
            self._open = []

    def _put(self, cmd: _Cmd) -> None:
        """Queue a command for the writer; once it has died, fail the command instead."""
        if self._dead is None:
            self._queue.put(cmd)
        else:
            self._fail([cmd], self._dead)

    @property
    def failed(self) -> asyncio.Future[WriterDied]:
        """Resolves (with the error) when the writer thread has died; never otherwise."""
        assert self._failed is not None
        return self._failed

    async def wait_capacity(self) -> None:
        """Backpressure: wait while too many events are submitted but not yet committed."""
        while self._outstanding >= self._max_outstanding:
            self._capacity.clear()
            await self._capacity.wait()

    @property
    def outstanding(self) -> int:
        return self._outstanding

    @property
    def cached_chunks(self) -> int:
        """Chunks in the tail cache of recently committed rows (at most ``_recent_max``)."""
        return len(self._recent)

    # -- the one submission path: the stores (gateway/buffer/*_store.py) and the
    # outbox's own methods.  Private to gateway/buffer/: every table's SQL lives here
    # (tests/test_layering.py checks that nothing outside runs SQL on the buffer).

    def _submit_write(
        self, fn: Callable[[sqlite3.Connection], T], *, invalidates: bool = True
    ) -> asyncio.Future[T]:
        """Run ``fn(conn)`` inside the next write transaction (grouped with every write
        queued while the current commit runs).

        ``invalidates=False`` promises that ``fn`` deletes no event the forwarder has not
        fetched yet (acks, dead letters, consent rows); anything else empties the cache of
        recently committed events, so a deleted event is never served from memory.
        """
        assert self._loop is not None
        self._flush_open()
        fut: asyncio.Future[T] = self._loop.create_future()
        self._put(_Cmd("write", fn=fn, future=fut, invalidates=invalidates))
        return fut

    def _submit_read(
        self, fn: Callable[[sqlite3.Connection], T], *, flush: bool = True
    ) -> asyncio.Future[T]:
        """Run ``fn(conn)`` on the writer's connection after the pending commit (and,
        with ``flush``, after the durability window's rows are in the database)."""
        assert self._loop is not None
        self._flush_open()
        fut: asyncio.Future[T] = self._loop.create_future()
        self._put(_Cmd("read", fn=fn, future=fut, flush=flush))
        return fut

    @property
    def skipped(self) -> list[tuple[int, int]]:
        """Seq ranges (lo, hi, inclusive) of this stream a power cut skipped: never sent,
        to be declared to the central until a PUBACK confirms a batch that carried them."""
        return list(self._skipped)

    def skipped_sent(self, ranges: list[tuple[int, int]]) -> asyncio.Future[None]:
        """A batch declaring ``ranges`` got a success PUBACK: forget them (stored)."""
        done = set(ranges)
        self._skipped = [r for r in self._skipped if r not in done]

        def fn(c: sqlite3.Connection) -> None:
            kept = [r for r in _skipped(c) if r not in done]
            if kept:
                c.execute(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                    (SKIPPED_KEY, json.dumps(kept)),
                )
            else:
                c.execute("DELETE FROM meta WHERE key = ?", (SKIPPED_KEY,))

        return self._submit_write(fn, invalidates=False)

    def fetch(
        self, after: int, max_batches: int, max_events: int, max_bytes: int
    ) -> asyncio.Future[list[Batch]]:
        """Committed events with seq > ``after``, cut into batches in seq order.

        Served from the writer's cache of recently committed rows when it holds every
        row after ``after`` (the live path); from the database otherwise (a backlog).
        """
        return self._submit_read(
            lambda c: self._fetch(c, after, max_batches, max_events, max_bytes), flush=False
        )

    def _fetch(
        self, c: sqlite3.Connection, after: int, max_batches: int, max_events: int, max_bytes: int
    ) -> list[Batch]:
        recent = self._recent
        if after >= self._cache_from - 1:
            while recent and recent[0][0] <= after:
                recent.popleft()
            # complete from after + 1 on now: an earlier ``after`` (the forwarder reading
            # again after a reconnect) must read the database
            self._cache_from = max(self._cache_from, after + 1)
            return _batches(iter(recent), max_batches, max_events, max_bytes)
        if (self._staged or self._deletes) and not self._flush_window():
            # A backlog read commits the window's rows first; that failed, so they stay
            # staged and this read does not see them.  The window that stores them wakes
            # the reader (``new_data``): a quiet box may bring no event that would.
            self._wake_reader = True
        rows = c.execute(
            "SELECT lo, hi, n, created, body FROM chunks WHERE lo > ? ORDER BY lo LIMIT ?",
            (after, max_batches * 20),
        )
        return _batches(rows, max_batches, max_events, max_bytes)

    def ack(self, batch: Batch) -> asyncio.Future[int]:
        """Delete a delivered batch's rows and record the time of the last publish."""
        now = self.now()
        if self._window_s > 0:  # staged: no transaction, no fsync of its own
            assert self._loop is not None
            self._flush_open()
            fut: asyncio.Future[int] = self._loop.create_future()
            ack = (batch.lo, batch.hi, now, batch.count)
            self._put(_Cmd("write", future=fut, invalidates=False, ack=ack))
            return fut

        def fn(c: sqlite3.Connection) -> int:
            n = c.execute("DELETE FROM chunks WHERE lo BETWEEN ? AND ?", (batch.lo, batch.hi))
            c.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES ('last_publish_at', ?)",
                (str(now),),
            )
            return n.rowcount

        return self._submit_write(fn, invalidates=False)

    def dead_letter(self, batch: Batch, reason_code: int, reason: str) -> asyncio.Future[int]:
        """Move a batch the broker refused into ``dead_letters`` (visible in status)."""
        now = self.now()

        def fn(c: sqlite3.Connection) -> int:
            c.execute(
                "INSERT OR REPLACE INTO dead_letters(lo, hi, n, created, subjects, body,"
                " reason_code, reason, failed_at) SELECT lo, hi, n, created, subjects, body,"
                " ?, ?, ? FROM chunks WHERE lo BETWEEN ? AND ?",
                (reason_code, reason, now, batch.lo, batch.hi),
            )
            n = c.execute("DELETE FROM chunks WHERE lo BETWEEN ? AND ?", (batch.lo, batch.hi))
            return n.rowcount

        return self._submit_write(fn, invalidates=False)

    def expire(self, now: float | None = None) -> asyncio.Future[int]:
        """Delete rows older than ``max_age_s``, oldest first, in bounded chunks."""
        cutoff = (self.now() if now is None else now) - self.cfg.max_age_s
        written = self._submit_write(lambda c: _expire(c, cutoff))
        assert self._loop is not None
        out: asyncio.Future[int] = self._loop.create_future()

        def settle(fut: asyncio.Future[int]) -> None:
            """A failed write is shown by ``buffer_write_ok``; expiry runs again later."""
            if out.done():
                return
            if fut.cancelled():
                out.cancel()
                return
            exc = fut.exception()
            if exc is None:
                out.set_result(fut.result())
            elif isinstance(exc, BufferError_):
                out.set_result(0)
            else:
                out.set_exception(exc)

        written.add_done_callback(settle)
        return out

    def stats(self) -> asyncio.Future[dict[str, Any]]:
        return self._submit_read(self._stats, flush=False)

    def _stats(self, c: sqlite3.Connection) -> dict[str, Any]:
        """Writer thread: the database's figures, with the window's not yet in it."""
        now = self.now()
        out = buffer_stats(c, now)
        out["depth"] += self._staged_events - sum(d[2] for d in self._deletes)
        out["last_seq"] = self._next_seq - 1
        if self._publish_at is not None:
            out["last_publish_at"] = self._publish_at
        if self._staged:
            age = now - min(r[3] for r in self._staged)
            out["oldest_age_s"] = max(out["oldest_age_s"] or 0.0, age)
        return out

    # -- writer thread ----------------------------------------------------------------

    def _collect(self, first: _Cmd) -> tuple[list[_Cmd], bool]:
        group = [first]
        n_events = len(first.events)
        deadline = time.monotonic() + self.cfg.commit_interval_ms / 1000.0
        stop = False
        while n_events < self.cfg.commit_max_events:
            try:
                cmd = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if n_events == 0 or remaining <= 0:
                    break
                try:
                    cmd = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if cmd is _STOP:
                stop = True
                break
            group.append(cmd)
            n_events += len(cmd.events)
            if cmd.kind == "read":
                break  # a reader is waiting: commit now
        return group, stop

    def _run(self) -> None:
        group: list[_Cmd] = []
        try:
            while True:
                first = self._next()
                if first is None:  # the durability window ended
                    self._flush_window(due_only=True)
                    continue
                if first is _STOP:
                    self._flush_window(final=True)
                    return
                group, stop = self._collect(first)
                self._execute(group)
                group = []
                if stop:
                    self._flush_window(final=True)
                    return
        except BaseException as exc:  # the thread must not end unnoticed
            self._died(group, exc)

    def _next(self) -> Any:
        """The next command, or None when the durability window ends first."""
        due = self._window_due
        if due is None:
            return self._queue.get()
        try:
            return self._queue.get(timeout=max(0.0, due - time.monotonic()))
        except queue.Empty:
            return None

    def _died(self, group: list[_Cmd], exc: BaseException) -> None:
        """Writer thread, dying: roll back, tell the loop, fail everything queued."""
        log.critical(
            "the buffer writer stopped on an unexpected %s; nothing more can be buffered: "
            "the daemon exits for systemd to restart it",
            exc.__class__.__name__,
            exc_info=exc,
        )
        if self._conn is not None:
            self._rollback(self._conn)
        dead = WriterDied(f"the buffer writer stopped: {exc.__class__.__name__}: {exc}")
        self._dead = dead  # from now on, commands fail at once (``_put``)
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
            self._loop.call_soon_threadsafe(self._on_death, group, dead)

    def _on_death(self, group: list[_Cmd], dead: WriterDied) -> None:
        """Event loop: count, turn health red, fail the group and the queue, signal."""
        self._last_write_ok = False
        self.metrics.inc("buffer_writer_failures_total")
        self.metrics.set("buffer_write_ok", 0)
        self.metrics.error("buffer", str(dead))
        cmds = [c for c in group if c.future is None or not c.future.done()]
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Cmd):
                cmds.append(item)
        self._fail(cmds, dead)
        if self._failed is not None and not self._failed.done():
            self._failed.set_result(dead)

    def _fail(self, cmds: list[_Cmd], dead: WriterDied) -> None:
        """Event loop: fail commands the dead writer will never run; lost events count."""
        lost = sum(len(c.events) for c in cmds)
        if lost:
            self._outstanding -= lost
            self._capacity.set()
            self.metrics.inc("events_dropped_total", lost, reason="buffer_error")
        for cmd in cmds:
            fut = cmd.future
            if fut is not None and not fut.done():
                fut.set_exception(dead)
                if cmd.kind == "append":  # counted here; sources do not wait
                    fut.exception()

    def _execute(self, group: list[_Cmd]) -> None:
        if self._window_s > 0:
            self._execute_windowed(group)
            return
        assert self._conn is not None
        conn = self._conn
        writes = [c for c in group if c.kind != "read"]
        appended = 0
        if writes:
            appended = self._commit(conn, writes)
            self._remember(writes)
        self._read_and_resolve(conn, group, appended)

    def _read_and_resolve(self, conn: sqlite3.Connection, group: list[_Cmd], appended: int) -> None:
        """After a group's writes: run its reads, then hand the results to the loop."""
        for cmd in group:
            if cmd.kind == "read" and cmd.fn is not None:
                try:
                    cmd.result = cmd.fn(conn)
                except sqlite3.Error as exc:
                    cmd.error = BufferError_(f"buffer read failed: {exc}")
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody is waiting
            self._loop.call_soon_threadsafe(self._resolve, group, appended)

    def _commit(self, conn: sqlite3.Connection, writes: list[_Cmd]) -> int:
        """Commit the writes; apply the full-buffer policy. Returns events appended."""
        # Its own loop around the helper: a full disk applies the policy and tries again.
        for attempt in range(3):
            start_seq = self._next_seq
            try:
                with transaction(conn):
                    appends = [c for c in writes if c.kind == "append" and c.error is None]
                    appended = self._insert(conn, appends) if appends else 0
                    for cmd in writes:
                        if cmd.error is None and cmd.kind == "write" and cmd.fn is not None:
                            cmd.result = cmd.fn(conn)
                    if appended:
                        conn.execute(
                            "INSERT OR REPLACE INTO meta(key, value) VALUES ('last_seq', ?)",
                            (str(self._next_seq - 1),),
                        )
            except sqlite3.Error as exc:
                self._next_seq = start_seq
                if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL and attempt < 2:
                    self._when_full(conn, writes)
                    continue
                err = BufferError_(f"buffer write failed: {exc}")
                if self._last_write_ok:  # once per failure, not once per commit
                    log.error("buffer write failed: %s", exc)
                self._write_ok(False, str(err))
                lost = sum(len(c.events) for c in writes if c.kind == "append" and c.error is None)
                if lost:
                    self._count_on_loop("events_dropped_total", lost, reason="buffer_error")
                for cmd in writes:
                    cmd.error = cmd.error or err
                return 0
            self._write_ok(True)
            self._recap_when_due(conn)
            return appended
        return 0

    def _insert(self, conn: sqlite3.Connection, appends: list[_Cmd]) -> int:
        """Assign seqs, cut the events into chunks and insert them.  Returns the count."""
        start = self._next_seq
        conn.executemany(
            "INSERT INTO chunks(lo, hi, n, created, subjects, body) VALUES (?, ?, ?, ?, ?, ?)",
            self._cut(appends),
        )
        return self._next_seq - start

    def _cut(self, appends: list[_Cmd]) -> list[Row]:
        """Assign seqs and cut the events into chunk rows (kept for the tail cache)."""
        seq = self._next_seq
        limit_n, limit_bytes = self.chunk_events, self.chunk_bytes
        rows: list[Row] = []
        chunks: list[Chunk] = []
        bodies: list[str] = []
        times: list[float] = []
        subjects: set[str] = set()
        nbytes = 0

        def cut() -> None:
            body = ",".join(bodies)
            lo = seq - len(bodies)
            rows.append((lo, seq - 1, len(bodies), min(times), " ".join(subjects), body))
            chunks.append((lo, seq - 1, len(bodies), times, body))

        for cmd in appends:
            first = seq
            for ev in cmd.events:
                body = with_seq(seq, ev.tail)
                size = (len(body) if body.isascii() else len(body.encode())) + 1
                if bodies and (len(bodies) >= limit_n or nbytes + size > limit_bytes):
                    cut()
                    bodies, times, subjects, nbytes = [], [], set(), 0
                bodies.append(body)
                times.append(ev.created)
                if ev.subject is not None:
                    subjects.add(ev.subject)
                nbytes += size
                seq += 1
            cmd.result = list(range(first, seq))
        if bodies:
            cut()
        appends[0].rows = chunks
        self._next_seq = seq
        return rows

    # -- durability window (gateway/buffer/stage.py) -----------------------------------------

    def _execute_windowed(self, group: list[_Cmd]) -> None:
        """Appends and acks go to the stage; the database only at the window's end, or
        at once for a write or read that needs it (erasure, consent, status reads)."""
        assert self._conn is not None
        conn = self._conn
        appends = [c for c in group if c.kind == "append" and c.error is None]
        writes = [c for c in group if c.kind == "write" and c.ack is None]
        if self._window_due is not None and time.monotonic() >= self._window_due:
            self._flush_window(due_only=True)  # before this group opens the next window
        appended = self._stage_appends(appends) if appends else 0
        for cmd in group:
            if cmd.kind == "write" and cmd.ack is not None:
                self._stage_ack(cmd)
        if writes or any(c.kind == "read" and c.flush for c in group):
            self._flush_window(writes)
        self._remember([c for c in group if c.kind != "read"])
        self._read_and_resolve(conn, group, appended)

    def _stage_appends(self, appends: list[_Cmd]) -> int:
        n = sum(len(c.events) for c in appends)
        need = self._next_seq - 1 + n
        if need > self._reserved:  # reserve seqs durably before any is handed out
            ahead = max(SEQ_RESERVE_MIN, 4 * max(n, self._staged_events))
            if not self._flush_window(reserve=need + ahead):
                err = BufferError_("buffer write failed: cannot reserve seqs")
                for cmd in appends:
                    cmd.error = err
                self._count_on_loop("events_dropped_total", n, reason="buffer_error")
                return 0
        # Over half full, the full-buffer policy must see each group as it comes: the
        # window's rows first, then the group, into the database.  If the window's commit
        # fails, the group is staged like any other (the next window tries again).
        if self._near_full and self._flush_window():
            assert self._conn is not None
            appended = self._commit(self._conn, appends)
            self._db_last_seq = self._db_hi = self._next_seq - 1
            self._check_room(self._conn)
            return appended
        rows = self._cut(appends)
        self._staged.extend(rows)
        self._staged_at.extend([time.monotonic()] * len(rows))
        self._staged_events += n
        if self._window_due is None:
            self._window_due = time.monotonic() + self._window_s
        if not self._stage_write(b"".join(encode_row(r) for r in rows)):
            self._flush_window()  # no stage: into the database at once, the durable way
        elif self._stage_size > self._stage_max:
            self._flush_window()
        return n

    def _stage_ack(self, cmd: _Cmd) -> None:
        assert cmd.ack is not None
        lo, hi, when, count = cmd.ack
        self._stage_write(encode_ack(lo, hi))
        kept: list[Row] = []
        kept_at: list[float] = []
        gone = 0
        for row, at in zip(self._staged, self._staged_at, strict=True):
            if lo <= row[0] <= hi:
                gone += row[2]
            else:
                kept.append(row)
                kept_at.append(at)
        self._staged, self._staged_at = kept, kept_at
        self._staged_events -= gone
        if lo <= self._db_hi:  # some of its rows are in the database
            self._deletes.append((lo, hi, count - gone))
        self._publish_at = when
        if self._window_due is None:
            self._window_due = time.monotonic() + self._window_s
        cmd.result = count

    def _stage_write(self, data: bytes) -> bool:
        """Append to the stage (the OS holds it from here on); False if that failed."""
        if self._stage_fd is None:
            return False
        try:
            view = memoryview(data)
            while view:
                done = os.write(self._stage_fd, view)
                view = view[done:]
                self._stage_size += done
        except OSError as exc:
            log.warning("buffer stage write failed (%s): committing to the database", exc)
            return False
        if self._marker is not None:
            self._marker.set(self._stage_size)
        return True

    def _flush_window(
        self,
        writes: list[_Cmd] | None = None,
        *,
        reserve: int = 0,
        final: bool = False,
        due_only: bool = False,
    ) -> bool:
        """Commit the window (rows still unacknowledged, deletes, bookkeeping that
        changed, and ``writes``) in one transaction, fsynced; then empty the stage.

        ``due_only`` (the window's timer): only rows staged a whole window ago go in;
        younger rows stay staged until their own window ends (or they are delivered).
        """
        if self._window_s <= 0 and not self._staged:
            return True
        writes = [c for c in writes or [] if c.error is None]
        assert self._conn is not None
        conn = self._conn
        last = self._next_seq - 1
        reserved = last if final else max(self._reserved, reserve)
        due = len(self._staged)
        if due_only:
            due = bisect.bisect_right(self._staged_at, time.monotonic() - self._window_s + 0.001)
        rows, keep, keep_at = self._staged[:due], self._staged[due:], self._staged_at[due:]
        # rows kept staged are numbered above what the database says it holds
        stored_last = keep[0][0] - 1 if keep else last
        if not (
            self._staged
            or self._deletes
            or writes
            or last != self._db_last_seq
            or reserved != self._reserved
            or self._publish_at is not None
        ):
            self._window_due = None
            self._empty_stage()
            return True
        if (
            not (rows or self._deletes or writes or final)
            and reserved == self._reserved
            and time.monotonic() < self._bookkeeping_due
        ):
            # nothing undelivered is due: no transaction, no fsync; wake up again for the
            # rows kept staged, or else for the bookkeeping (a quiet box may send nothing
            # more to wake the writer: its file would keep last_seq stale until then)
            self._window_due = keep_at[0] + self._window_s if keep_at else self._bookkeeping_due
            return True
        # Its own loop around the helper: a full disk applies the policy and tries again.
        for attempt in range(3):
            try:
                with transaction(conn):
                    conn.executemany(
                        "INSERT INTO chunks(lo, hi, n, created, subjects, body)"
                        " VALUES (?, ?, ?, ?, ?, ?)",
                        rows,
                    )
                    conn.executemany(
                        "DELETE FROM chunks WHERE lo BETWEEN ? AND ?",
                        [(lo, hi) for lo, hi, _n in self._deletes],
                    )
                    for cmd in writes:
                        if cmd.fn is not None:
                            cmd.result = cmd.fn(conn)
                    bookkeeping = []
                    if stored_last != self._db_last_seq:
                        bookkeeping.append(("last_seq", str(stored_last)))
                    if reserved != self._reserved:
                        bookkeeping.append(("seq_reserved", str(reserved)))
                    if self._publish_at is not None:
                        bookkeeping.append(("last_publish_at", str(self._publish_at)))
                    for key, value in bookkeeping:  # an UPDATE rewrites one page, not two
                        if not conn.execute(
                            "UPDATE meta SET value = ? WHERE key = ?", (value, key)
                        ).rowcount:
                            conn.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (key, value))
            except sqlite3.Error as exc:
                if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL and attempt < 2:
                    self._when_full(conn, [], staged=self._staged_events)
                    if self.cfg.when_full == "drop_new":  # counted by _when_full
                        self._staged, self._staged_at, self._staged_events = [], [], 0
                        self._forget()
                    continue
                err = BufferError_(f"buffer write failed: {exc}")
                if self._last_write_ok:  # once per failure, not once per commit
                    log.error("buffer write failed: %s", exc)
                self._write_ok(False, str(err))
                for cmd in writes:
                    cmd.error = err
                # the window's rows stay staged; the next window tries again
                self._window_due = time.monotonic() + self._window_s
                return False
            else:
                if rows:
                    self._db_hi = max(self._db_hi, rows[-1][1])
                self._db_last_seq, self._reserved = stored_last, reserved
                self._staged, self._staged_at, self._deletes = keep, keep_at, []
                self._staged_events = sum(r[2] for r in keep)
                self._publish_at = None
                self._window_due = keep_at[0] + self._window_s if keep_at else None
                self._bookkeeping_due = time.monotonic() + BOOKKEEPING_INTERVAL_S
                self._empty_stage()
                if keep:  # still staged: written again to the emptied stage, and how far
                    # numbering went (rows delivered meanwhile are not in it)
                    kept = b"".join(encode_row(r) for r in keep)
                    self._stage_write(kept + encode_mark(last))
                self._write_ok(True)
                if self._wake_reader:  # rows a backlog read missed are in the database now
                    self._wake_reader = False
                    assert self._loop is not None
                    with contextlib.suppress(RuntimeError):  # the loop closed
                        self._loop.call_soon_threadsafe(self.new_data.set)
                self._check_room(conn)
                self._recap_when_due(conn)
                return True
        return False

    def _recap_when_due(self, conn: sqlite3.Connection) -> None:
        """Every RECAP_INTERVAL_S, size the cap to the filesystem's free space again."""
        if time.monotonic() >= self._recap_at:
            self._recap_at = time.monotonic() + RECAP_INTERVAL_S
            self._keep_reserve()
            with contextlib.suppress(sqlite3.Error):
                self._set_max_pages(conn)

    def _check_room(self, conn: sqlite3.Connection) -> None:
        with contextlib.suppress(sqlite3.Error):
            used, free, cap = (
                int(conn.execute(f"PRAGMA {p}").fetchone()[0])
                for p in ("page_count", "freelist_count", "max_page_count")
            )
            self._near_full = 2 * (used - free) > cap

    def _empty_stage(self) -> None:
        """The window is in the database: the stage starts again (marker first: a crash
        between the two leaves a stage the replay skips as already stored)."""
        if self._stage_fd is None or self._stage_size == 0:
            return
        if self._marker is not None:
            self._marker.set(0)
        try:
            os.ftruncate(self._stage_fd, 0)
            self._stage_size = 0
        except OSError as exc:
            log.warning("could not empty the buffer stage: %s", exc)

    def _recover(self, conn: sqlite3.Connection) -> None:
        """Open: replay what a crash or power cut left in the stage; start a fresh one.

        A stage whose whole records reach the size its RAM marker records is complete
        (the process died, the kernel kept everything): it is replayed and numbering
        goes on from it.  Otherwise (a reboot or a power cut took unsynced pages) what
        is whole is replayed and the next seq starts after ``seq_reserved``, so no seq
        the broker may have seen is reused for other content.
        """
        path = Path(self.cfg.path)
        stage = stage_path(path)
        self._marker = Marker(marker_path(path), self.stream)
        last = _last_seq(conn)
        self._reserved = _meta_int(conn, "seq_reserved", last)
        try:
            data = stage.read_bytes()
        except FileNotFoundError:
            data = b""
        records, whole = parse(data)
        recorded = self._marker.read()
        complete = recorded is not None and whole >= recorded
        rows: dict[int, Row] = {}
        deletes: list[tuple[int, int]] = []
        top = last  # the highest seq known to have been handed out
        for rec in records:
            if isinstance(rec, Ack):
                for lo in [lo for lo in rows if rec.lo <= lo <= rec.hi]:
                    del rows[lo]
                deletes.append((rec.lo, rec.hi))
            elif isinstance(rec, Mark):
                top = max(top, rec.seq)
            elif rec[0] > last:  # else already in the database
                rows[rec[0]] = rec
                top = max(top, rec[1])
        next_seq = top + 1
        skipped = _skipped(conn)
        declared = list(skipped)
        if not complete and self._reserved > top and (data or self._window_s > 0):
            next_seq = self._reserved + 1
            log.warning(
                "the buffer stage was not whole after an unclean stop (a power cut?): "
                "seqs %d-%d are skipped, never reused, and declared to the central; "
                "%d staged events were recovered",
                top + 1,
                self._reserved,
                sum(r[2] for r in rows.values()),
            )
            skipped.append((top + 1, self._reserved))
            if len(skipped) > SKIPPED_MAX:
                dropped = skipped[: len(skipped) - SKIPPED_MAX]
                del skipped[: len(dropped)]
                log.warning(
                    "more than %d skipped seq ranges wait to be declared (cut again and "
                    "again while offline?): the oldest %d (seqs %d-%d) are dropped and will "
                    "show to the central as missing",
                    SKIPPED_MAX,
                    len(dropped),
                    dropped[0][0],
                    dropped[-1][1],
                )
        reserved = self._reserved if self._window_s > 0 else next_seq - 1
        changed = skipped != declared
        if rows or deletes or next_seq - 1 != last or reserved != self._reserved or changed:
            with transaction(conn):
                conn.executemany(
                    "INSERT INTO chunks(lo, hi, n, created, subjects, body)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    list(rows.values()),
                )
                conn.executemany("DELETE FROM chunks WHERE lo BETWEEN ? AND ?", deletes)
                conn.executemany(
                    "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                    [("last_seq", str(next_seq - 1)), ("seq_reserved", str(reserved))],
                )
                if changed:  # with last_seq: a seq past the skip is never handed out undeclared
                    conn.execute(
                        "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                        (SKIPPED_KEY, json.dumps(skipped)),
                    )
            if rows:
                log.info("replayed %d staged events after an unclean stop", len(rows))
        self._reserved = reserved
        self._skipped = skipped
        self._next_seq = next_seq
        self._db_last_seq = self._db_hi = next_seq - 1
        self._check_room(conn)
        if self._window_s <= 0:
            stage.unlink(missing_ok=True)
            self._marker.close(remove=True)
            self._marker = None
            return
        self._marker.set(0)
        fd = os.open(stage, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.ftruncate(fd, 0)
        self._stage_fd, self._stage_size = fd, 0

    def _close_stage(self) -> None:
        """After the final window: a stage with nothing staged goes, with its marker."""
        clean = not self._staged and not self._deletes
        if self._stage_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._stage_fd)
            self._stage_fd = None
            if clean:
                stage_path(Path(self.cfg.path)).unlink(missing_ok=True)
        if self._marker is not None:
            self._marker.close(remove=clean)
            self._marker = None

    def _remember(self, writes: list[_Cmd]) -> None:
        """Keep committed rows in the tail cache; drop it after a deleting write."""
        recent = self._recent
        for cmd in writes:
            if cmd.error is not None:
                continue
            if cmd.kind == "append":
                recent.extend(cmd.rows)
                cmd.rows = []
            elif cmd.invalidates:
                self._forget()
        while len(recent) > self._recent_max:
            recent.popleft()
            self._cache_from = recent[0][0]

    def _forget(self) -> None:
        self._recent.clear()
        self._cache_from = self._next_seq

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")

    @property
    def reserve_path(self) -> Path:
        path = Path(self.cfg.path)
        return path.with_name(path.name + ".reserve")

    def _keep_reserve(self) -> None:
        """Make the disk reserve (``disk_reserve_bytes``) when it is missing or short (a
        power cut can leave its name with fewer bytes) and the filesystem has four times
        that free; synced with its folder, so a cut keeps it whole.  Never raises (no
        reserve is no error)."""
        size, reserve = self.cfg.disk_reserve_bytes, self.reserve_path
        if not size:
            return
        try:
            with contextlib.suppress(FileNotFoundError):
                if reserve.stat().st_size >= size:
                    return
                reserve.unlink()  # short: made again below
            fs = os.statvfs(reserve.parent)
            if fs.f_bavail * fs.f_frsize < 4 * size:
                return
            fd = os.open(reserve, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)  # the blocks are taken now, not when needed
                os.fsync(fd)
            finally:
                os.close(fd)
            dir_fd = os.open(reserve.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the name survives a cut too
            finally:
                os.close(dir_fd)
        except OSError as exc:
            log.debug("no disk reserve beside the buffer: %s", exc)
            with contextlib.suppress(OSError):
                if reserve.exists() and reserve.stat().st_size < size:
                    reserve.unlink()

    def _release_reserve(self) -> None:
        """The disk is full: give the reserve back so the policy's own writes fit."""
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("could not release the disk reserve %s: %s", self.reserve_path, exc)
            return
        log.warning(
            "disk full: released the %.1f MiB reserve beside the buffer so the %s policy can run",
            self.cfg.disk_reserve_bytes / (1 << 20),
            self.cfg.when_full,
        )

    def _when_full(self, conn: sqlite3.Connection, writes: list[_Cmd], staged: int = 0) -> None:
        incoming = staged + sum(len(c.events) for c in writes if c.kind == "append")
        pages, cap = (
            int(conn.execute(f"PRAGMA {p}").fetchone()[0]) for p in ("page_count", "max_page_count")
        )
        if pages < cap:  # the filesystem is full below the cap: that is the cap now
            self._release_reserve()
            with contextlib.suppress(sqlite3.Error):  # the next commit reuses the WAL
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            with contextlib.suppress(sqlite3.Error):
                if self._set_max_pages(conn, ceiling=cap) < cap:
                    log.warning(
                        "buffer full: the disk filled below max_bytes; capped at %d bytes",
                        pages * self._page_size,
                    )
        if self.cfg.when_full == "drop_new":
            for cmd in writes:
                if cmd.kind == "append":
                    cmd.error = BufferFull("buffer full: event dropped (policy drop_new)")
            self._count_on_loop("events_dropped_total", incoming, reason="buffer_full")
            self._error_on_loop(f"buffer full: dropped {incoming} new events (policy drop_new)")
            return
        self._forget()
        total, chunks = conn.execute("SELECT coalesce(sum(n), 0), count(*) FROM chunks").fetchone()
        want = max(EVICT_MIN_EVENTS, incoming, int(total) // 100)
        evicted = 0
        try:
            with transaction(conn):
                for lo, n in conn.execute(
                    "SELECT lo, n FROM chunks ORDER BY lo LIMIT ?", (max(1, int(chunks)),)
                ).fetchall():
                    if evicted >= want:
                        break
                    conn.execute("DELETE FROM chunks WHERE lo = ?", (lo,))
                    evicted += int(n)
        except sqlite3.Error as exc:
            if self._last_write_ok:  # once per failure, not once per commit
                log.error("buffer full and eviction failed: %s", exc)
            return
        self._evicted_unlogged += evicted
        now = time.monotonic()
        if now >= self._evict_log_at:  # a full buffer under load evicts at every commit
            self._evict_log_at = now + EVICT_LOG_INTERVAL_S
            if self._evict_logged:
                log.warning(
                    "buffer full: evicted %d more of the oldest events since the last such line",
                    self._evicted_unlogged,
                )
            else:
                log.warning(
                    "buffer full: evicted the %d oldest events (policy evict_oldest); "
                    "further evictions are summed into a line at most every %.0f s",
                    self._evicted_unlogged,
                    EVICT_LOG_INTERVAL_S,
                )
            self._evicted_unlogged, self._evict_logged = 0, True
        self._count_on_loop("events_evicted_total", evicted)
        self._error_on_loop(
            f"buffer full: evicted the {evicted} oldest events (policy evict_oldest)"
        )

    def _write_ok(self, ok: bool, error: str = "") -> None:
        """Writer thread: tell the loop (gauge buffer_write_ok) when the outcome changes."""
        if ok is self._last_write_ok:
            return
        self._last_write_ok = ok
        assert self._loop is not None

        def post() -> None:
            self.metrics.set("buffer_write_ok", 1 if ok else 0)
            if not ok:
                self.metrics.error("buffer", error)
                self.metrics.inc("buffer_write_errors_total")

        with contextlib.suppress(RuntimeError):  # the loop closed
            self._loop.call_soon_threadsafe(post)

    def _count_on_loop(self, name: str, amount: int, **labels: str) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(lambda: self.metrics.inc(name, amount, **labels))

    def _error_on_loop(self, message: str) -> None:
        """Writer thread: the buffer's last error (shown by /healthz and status)."""
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self.metrics.error, "buffer", message)

    def _resolve(self, group: list[_Cmd], appended: int) -> None:
        settled = sum(len(c.events) for c in group)
        if settled:
            self._outstanding -= settled
            self._capacity.set()
        if appended:
            self.metrics.inc("events_buffered_total", appended)
            self.new_data.set()
        for cmd in group:
            fut = cmd.future
            if fut is None or fut.done():
                continue
            if cmd.error is not None:
                fut.set_exception(cmd.error)
                if cmd.kind == "append":  # counted and logged here; sources do not wait
                    fut.exception()
            else:
                fut.set_result(cmd.result)


# Test only: the power-cut test's negative control (tests/powercut) runs the daemon with a
# weaker ``synchronous`` to show that its checker sees the loss; never set in production.
UNSAFE_SYNCHRONOUS_VAR = "TOUCHPOINT_TEST_UNSAFE_SYNCHRONOUS"


def _synchronous() -> str:
    """``FULL``, unless the test-only variable asks for ``NORMAL`` or ``OFF`` (logged)."""
    weak = os.environ.get(UNSAFE_SYNCHRONOUS_VAR, "")
    if weak in ("NORMAL", "OFF"):
        log.warning(
            "%s=%s: the buffer is NOT power-cut safe (test only)", UNSAFE_SYNCHRONOUS_VAR, weak
        )
        return weak
    return "FULL"


# Test only (the power-cut rig): checkpoint after any commit whose WAL has this many pages,
# so that cuts inside checkpoints are likely with the durability window too.
TEST_WAL_AUTOCHECKPOINT_VAR = "TOUCHPOINT_TEST_WAL_AUTOCHECKPOINT"


def _test_wal_pages() -> int | None:
    value = os.environ.get(TEST_WAL_AUTOCHECKPOINT_VAR, "")
    if not value.isdigit() or int(value) < 1:
        return None
    log.warning(
        "%s=%s: WAL checkpoints far more often (test only)", TEST_WAL_AUTOCHECKPOINT_VAR, value
    )
    return int(value)


def _last_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone()
    return int(row[0]) if row else 0


def _skipped(conn: sqlite3.Connection) -> list[tuple[int, int]]:
    """The declared skipped ranges not yet confirmed sent (meta ``SKIPPED_KEY``)."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (SKIPPED_KEY,)).fetchone()
    if row is None:
        return []
    try:
        return [(int(lo), int(hi)) for lo, hi in json.loads(row[0])]
    except (ValueError, TypeError):
        log.error("meta %s is not a list of seq ranges; ignored: %.80r", SKIPPED_KEY, row[0])
        return []


def _meta_int(conn: sqlite3.Connection, key: str, default: int) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else default


def _batches(
    rows: Iterable[Chunk] | Iterator[Any],
    max_batches: int,
    max_events: int,
    max_bytes: int,
) -> list[Batch]:
    """Merge consecutive whole chunks into batches within the event and byte limits."""
    batches: list[Batch] = []
    bodies: list[str] = []
    times: list[float] = []
    lo = hi = count = nbytes = 0
    overhead = 128  # the batch envelope
    for c_lo, c_hi, n, created, body in rows:
        size = (len(body) if body.isascii() else len(body.encode())) + 1
        if bodies and (count + n > max_events or nbytes + size + overhead > max_bytes):
            batches.append(Batch(lo, hi, count, bodies, nbytes, times))
            if len(batches) >= max_batches:
                return batches
            bodies, times, count, nbytes = [], [], 0, 0
        if not bodies:
            lo = c_lo
        bodies.append(body)
        if isinstance(created, list):
            times.extend(created)
        else:
            times.extend([created] * n)
        hi = c_hi
        count += n
        nbytes += size
    if bodies:
        batches.append(Batch(lo, hi, count, bodies, nbytes, times))
    return batches


# Events stamped before CLOCK_FLOOR (gateway.identity.clock) were made with an unset clock: their
# age is unknown, so age never expires them (the size cap still bounds them), and while
# the clock itself reads before it, nothing is expired at all.


def _expire(conn: sqlite3.Connection, cutoff: float, chunk: int = 500) -> int:
    """Delete the oldest chunks whose oldest event is older than ``cutoff``."""
    total = 0
    after = 0
    while True:
        rows = conn.execute(
            "SELECT lo, n, created FROM chunks WHERE lo > ? ORDER BY lo LIMIT ?", (after, chunk)
        ).fetchall()
        doomed = []
        for lo, n, created in rows:
            after = lo
            if created < CLOCK_FLOOR:
                continue  # stamped by an unset clock: age unknown
            if created >= cutoff:
                break
            doomed.append((lo,))
            total += int(n)
        else:
            if rows:
                conn.executemany("DELETE FROM chunks WHERE lo = ?", doomed)
                continue
        conn.executemany("DELETE FROM chunks WHERE lo = ?", doomed)
        return total


# meta key: when an erasure committed whose old page images a WAL checkpoint has not yet
# cleared from the files (a reader held a snapshot); deleted once a checkpoint succeeds.
ERASED_IN_WAL_KEY = "erased_in_wal_since"


def buffer_stats(conn: sqlite3.Connection, now: float) -> dict[str, Any]:
    depth, oldest = conn.execute("SELECT coalesce(sum(n), 0), min(created) FROM chunks").fetchone()
    dead = conn.execute("SELECT coalesce(sum(n), 0) FROM dead_letters").fetchone()[0]
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    last_pub = meta.get("last_publish_at")
    erased_in_wal = meta.get(ERASED_IN_WAL_KEY)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    return {
        "stream": meta.get("stream"),
        "depth": int(depth),
        "oldest_age_s": (now - float(oldest)) if oldest is not None else None,
        "last_seq": _last_seq(conn),
        "last_publish_at": float(last_pub) if last_pub else None,
        "dead_letters": int(dead),
        "db_bytes": int(page_size) * int(pages),
        "db_free_bytes": int(page_size) * int(free),
        "erased_in_wal_since": float(erased_in_wal) if erased_in_wal else None,
    }
