"""Receipt printer tap: a transparent ESC/POS passthrough between till and printer.

    till ──TCP──► tap (listen) ──TCP──► printer (raw port 9100)
         ◄──────── status replies ◄────

Per till connection the tap opens one printer connection and closes it when the till
closes (many printers take one connection at a time, so nothing is held between jobs).
Till connections are served one at a time: a till that reconnects at once for its next
receipt waits until the previous job's printer connection is closed, rather than
meeting a busy printer.
Bytes from the till are parsed by ``drivers.escpos`` on their way through:

- injection off: every byte is forwarded as soon as it arrives, unaltered;
- injection on: just before each cut (``GS V``, ``ESC i``, ``ESC m``) a freshly minted
  receipt token (contract §7) is printed as a native QR or a ``GS v 0`` raster image.
  The token's counter is reserved (committed and fsynced) in the ``CounterStore`` before
  any byte of it is written, so a counter is never printed twice, even across restarts.
  Only the bytes of an incomplete command header (at most ``escpos.MAX_HEADER``) are
  held back, so that a cut split across TCP segments is still seen before it is sent.

Guards (the tap mints signed receipt tokens, so it must not be an open printer):

- it listens on loopback unless the config names an address of the store network, and
  then only takes connections from ``till_allow`` (addresses or networks); any other
  connection is closed before the printer is touched;
- tokens are minted at most ``mint_rate_per_min`` per minute per lane on average
  (``mint_burst`` at once): a cut beyond that prints without a token, so a flood of
  cuts cannot burn counters or make events;
- only cuts at a known command boundary get a token: after a command the parser does
  not know (``drivers.escpos``) cuts are counted in ``receipt_tap_cuts_unsure_total``
  and passed on untouched.
Refusals are counted in ``source_refused_total`` by reason (``address``,
``mint_rate``), shown per source in ``/healthz``, and logged at most once a minute.

A printer that refuses or times out a connection turns the source's state to
``error`` (the till's job is closed, as a printer switched off would do) and is probed
(connect, then close at once) with jittered backoff until it accepts again; it is never
probed while it works.

Printer replies (``DLE EOT`` status, ...) are relayed to the till unaltered.  A till
that stays silent for ``idle_timeout_s`` is treated as done, so it cannot hold the
printer forever.  Tokens and QR payloads are never logged.

Tills cabled to their printer over RS-232 or USB-serial get the same tap on a serial
line (``transport = "serial"``, ``drivers.receipt_tap_serial``).  What both transports
share lives here: ``JobForwarder`` (parse, forward, inject before each cut), the token
minting of ``TapBase`` and the ``CounterStore``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Protocol, Self

from drivers.backoff import Backoff, device_error
from drivers.escpos import EscPosParser, qr_native, qr_raster
from gateway.config import ReceiptTapSourceConfig
from gateway.errors import SourceError
from gateway.identity import Keyring
from gateway.metrics import Metrics
from gateway.paths import private_database
from gateway.ports import Reading, SourceContext
from gateway.tokens import mint_receipt_token

if TYPE_CHECKING:
    from drivers.receipt_tap_serial import SerialReceiptTap, SerialTapSettings

log = logging.getLogger(__name__)

READ_CHUNK = 65536
PROBE_MIN_S, PROBE_MAX_S = 1.0, 30.0  # an unreachable printer is probed this often
COUNTER_MAX = 0xFFFFFFFF
LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")
REFUSAL_LOG_EVERY_S = 60.0  # refusals are logged at most this often per tap (with a count)
_MIGRATIONS = (
    (
        "001_receipt_counter",
        "CREATE TABLE receipt_counter ("
        " store TEXT NOT NULL, lane INTEGER NOT NULL, last INTEGER NOT NULL,"
        " PRIMARY KEY (store, lane))",
    ),
)


class CounterStore:
    """Receipt counters per (store, lane number) in SQLite; a reserved value is never reused.

    ``reserve`` commits with ``synchronous=FULL`` (fsync) before it returns.  Blocking:
    the tap calls it from its single worker thread, which owns the connection.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            private_database(self.path)  # 0600 whatever the umask
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._migrate()
        except (sqlite3.Error, OSError) as exc:
            raise SourceError(f"{self.path}: cannot open the receipt counter store: {exc}") from exc

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _migrate(self) -> None:
        with self._transaction() as db:
            db.execute("CREATE TABLE IF NOT EXISTS migrations (name TEXT PRIMARY KEY, at REAL)")
            done = {row[0] for row in db.execute("SELECT name FROM migrations")}
            for name, sql in _MIGRATIONS:
                if name not in done:
                    db.execute(sql)
                    db.execute("INSERT INTO migrations VALUES (?, ?)", (name, time.time()))

    def reserve(self, store: str, lane: int) -> int:
        """The next counter for (store, lane), durably recorded as used (first is 1)."""
        with self._transaction() as db:
            row = db.execute(
                "INSERT INTO receipt_counter VALUES (?, ?, 1)"
                " ON CONFLICT (store, lane) DO UPDATE SET last = last + 1 RETURNING last",
                (store, lane),
            ).fetchone()
            value = int(row[0])
            if value > COUNTER_MAX:
                raise OverflowError(f"receipt counter of lane {lane} is exhausted")
        return value

    def last(self, store: str, lane: int) -> int:
        """The last reserved counter (0 if none)."""
        row = self._db.execute(
            "SELECT last FROM receipt_counter WHERE store = ? AND lane = ?", (store, lane)
        ).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        self._db.close()


@dataclass(frozen=True, slots=True)
class TapSettings:
    """Where the tap listens, where the printer is, and what it injects."""

    printer_host: str
    printer_port: int = 9100
    listen_host: str = "127.0.0.1"
    listen_port: int = 9100
    lane: str = "lane"
    lane_number: int = 1
    inject: Literal["off", "native", "raster"] = "off"
    url_prefix: str = ""
    module_size: int = 6
    connect_timeout_s: float = 5.0
    linger_s: float = 1.0
    idle_timeout_s: float = 60.0
    till_allow: tuple[str, ...] = LOOPBACK_NETWORKS
    mint_rate_per_min: float = 30.0
    mint_burst: int = 5


class LaneSettings(Protocol):
    """What every tap transport's settings say about the lane and the injection."""

    @property
    def lane(self) -> str: ...
    @property
    def lane_number(self) -> int: ...
    @property
    def inject(self) -> Literal["off", "native", "raster"]: ...
    @property
    def url_prefix(self) -> str: ...
    @property
    def module_size(self) -> int: ...
    @property
    def idle_timeout_s(self) -> float: ...
    @property
    def mint_rate_per_min(self) -> float: ...
    @property
    def mint_burst(self) -> int: ...


class Sink(Protocol):
    """Where the tap writes printer bytes (an ``asyncio.StreamWriter`` is one)."""

    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Printed:
    """One receipt token handed to the printer."""

    lane: str
    receipt: str
    at: float


@dataclass(frozen=True, slots=True)
class Minting:
    """What injection needs: the tenant keyring, the store id and the counter store."""

    keyring: Keyring
    store: str
    counters: CounterStore


class MintBucket:
    """A token bucket: ``rate_per_min`` on average, ``burst`` at once (``now``: monotonic s)."""

    def __init__(self, rate_per_min: float, burst: int) -> None:
        self.rate = rate_per_min / 60.0
        self.burst = float(burst)
        self._level = self.burst
        self._at: float | None = None

    def take(self, now: float) -> bool:
        """One unit if there is one."""
        if self._at is not None:
            self._level = min(self.burst, self._level + (now - self._at) * self.rate)
        self._at = now
        if self._level >= 1.0:
            self._level -= 1.0
            return True
        return False


class TapBase:
    """What every tap transport shares: counters, metrics and the token injection.

    ``on_printed`` is called on the event loop after a token's bytes were handed to the
    printer.  The counter store is only touched from one worker thread.
    """

    def __init__(  # noqa: PLR0917
        self,
        settings: LaneSettings,
        minting: Minting | None = None,
        on_printed: Callable[[Printed], None] | None = None,
        metrics: Metrics | None = None,
        name: str = "receipt-tap",
        now: Callable[[], float] = time.time,
        on_state: Callable[[str, str], None] | None = None,
    ) -> None:
        if settings.inject != "off" and minting is None:
            raise ValueError("injection needs a keyring, a store id and a counter store")
        self._on_state = on_state
        self.lane_settings = settings
        self.name = name
        self._minting = minting
        self._on_printed = on_printed
        self._metrics = metrics or Metrics()
        self._now = now
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"{name}-counter")
        self._mint_bucket = MintBucket(settings.mint_rate_per_min, settings.mint_burst)
        self._refusals_unlogged = 0
        self._refusal_logged_at = -REFUSAL_LOG_EVERY_S
        self._unsure_logged = False

    @property
    def injecting(self) -> bool:
        return self.lane_settings.inject != "off"

    def _report_state(self, state: str, detail: str) -> None:
        """Tell the source's status (``on_state``) what the tap's state is now."""
        if self._on_state is not None:
            self._on_state(state, detail)

    async def start(self) -> object:
        """Open the transport (listen, or open the ports)."""
        raise NotImplementedError

    async def close(self) -> None:
        """Stop relaying and release everything."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _count(self, metric: str, amount: float = 1) -> None:
        self._metrics.inc(metric, amount, source=self.name)

    def _unsure_cuts(self, unknown: int) -> None:
        """Cuts after a command the parser does not know got no token: say so, once."""
        if self._unsure_logged:
            return
        self._unsure_logged = True
        log.warning(
            "%s: the till sent %d ESC/POS command(s) outside the printer reference; cuts "
            "after one get no receipt token until the next ESC @ "
            "(receipt_tap_cuts_unsure_total counts them)",
            self.name, unknown,
        )  # fmt: skip

    def _refuse(self, reason: str, what: str) -> None:
        """Count a refusal (``source_refused_total``, shown in /healthz); log it sparingly."""
        self._metrics.inc("source_refused_total", source=self.name, reason=reason)
        self._refusals_unlogged += 1
        now = time.monotonic()
        if now - self._refusal_logged_at >= REFUSAL_LOG_EVERY_S:
            log.warning(
                "%s: refused %s (%d refusal(s) since the last report)",
                self.name, what, self._refusals_unlogged,
            )  # fmt: skip
            self._refusals_unlogged = 0
            self._refusal_logged_at = now

    async def _stop_worker(self) -> None:
        await asyncio.to_thread(self._worker.shutdown, wait=True)

    async def _inject(self, printer: Sink) -> None:
        """Reserve a counter, mint a token, write its QR.  A failure skips one token."""
        assert self._minting is not None
        m, s = self._minting, self.lane_settings
        if not self._mint_bucket.take(time.monotonic()):
            self._refuse(
                "mint_rate",
                f"a receipt token above the lane's rate ({s.mint_rate_per_min:g}/min, burst "
                f"{s.mint_burst}); the receipt prints without one",
            )
            return
        loop = asyncio.get_running_loop()
        try:
            counter = await loop.run_in_executor(
                self._worker, m.counters.reserve, m.store, s.lane_number
            )
        except (sqlite3.Error, OverflowError) as exc:
            self._count("receipt_tap_inject_failed_total")
            self._metrics.error(self.name, f"receipt counter store: {exc}")
            log.error("%s: no receipt token printed: counter store: %s", self.name, exc)
            return
        now = self._now()
        token = mint_receipt_token(
            m.keyring.active, m.keyring.active_key, m.store, s.lane_number, int(now), counter
        )
        data = (s.url_prefix + token).encode("utf-8")
        if s.inject == "native":
            image = qr_native(data, module_size=s.module_size)
        else:
            image = qr_raster(data, module_px=s.module_size)
        printer.write(b"\n\x1ba\x01" + image + b"\n\x1ba\x00")
        await printer.drain()
        self._count("receipt_tokens_printed_total")
        log.debug("%s: printed receipt token %d of lane %d", self.name, counter, s.lane_number)
        if self._on_printed is not None:
            self._on_printed(Printed(s.lane, token, now))


class JobForwarder:
    """The till's byte stream to the printer: parse, forward, inject before each cut.

    One per till stream (a TCP connection, or a serial line until it goes quiet or
    away), shared by both transports.  Injection off: each chunk is written as it came.
    Injection on: only the bytes of an incomplete command header are held back.  With
    ``printer=None`` (a serial printer that is unplugged) the bytes are parsed, so the
    parser stays in step with the till, and dropped (counted); nothing is injected.
    """

    def __init__(self, tap: TapBase) -> None:
        self.tap = tap
        self.parser = EscPosParser()
        self._held = b""

    async def feed(self, data: bytes, printer: Sink | None) -> int:
        """Forward the next bytes from the till; return the number of cuts among them."""
        tap = self.tap
        tap._count("receipt_tap_bytes_total", len(data))
        result = self.parser.feed(data)
        if result.qr:
            tap._count("receipt_tap_qr_seen_total", len(result.qr))
        if result.unsure_cuts:
            tap._count("receipt_tap_cuts_unsure_total", len(result.unsure_cuts))
            tap._unsure_cuts(self.parser.stats.unknown)
        if printer is not None and not tap.injecting:
            printer.write(data)
            await printer.drain()
            return len(result.cuts)
        chunk = self._held + data
        start = self.parser.offset - len(chunk)
        ready = len(chunk) - self.parser.pending
        self._held = chunk[ready:]
        if printer is None:
            tap._count("receipt_tap_bytes_dropped_total", ready)
            return len(result.cuts)
        last = 0
        for cut in result.cuts:
            printer.write(chunk[last : cut - start])
            last = cut - start
            await tap._inject(printer)
        printer.write(chunk[last:ready])
        await printer.drain()
        return len(result.cuts)

    async def finish(self, printer: Sink | None) -> None:
        """The stream ended: write what was held back (an incomplete command)."""
        held, self._held = self._held, b""
        if held and printer is not None:
            printer.write(held)
            await printer.drain()
        elif held:
            self.tap._count("receipt_tap_bytes_dropped_total", len(held))


class ReceiptTap(TapBase):
    """The TCP tap.  ``async with ReceiptTap(...) as tap`` listens on ``tap.port``.

    One-shot: after ``close`` a new instance is needed.  ``on_printed`` is called on the
    event loop after a token's bytes were handed to the printer connection.
    """

    def __init__(  # noqa: PLR0917
        self,
        settings: TapSettings,
        minting: Minting | None = None,
        on_printed: Callable[[Printed], None] | None = None,
        metrics: Metrics | None = None,
        name: str = "receipt-tap",
        now: Callable[[], float] = time.time,
        on_state: Callable[[str, str], None] | None = None,
    ) -> None:
        super().__init__(settings, minting, on_printed, metrics, name, now, on_state)
        self.settings = settings
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._probe: asyncio.Task[None] | None = None  # while the printer is unreachable
        self._allowed = tuple(ipaddress.ip_network(n, strict=False) for n in settings.till_allow)
        self._printer_lock = asyncio.Lock()
        self.port = 0

    @property
    def printer_unreachable(self) -> bool:
        return self._probe is not None

    def _printer_down(self, why: str) -> None:
        """A job could not reach the printer: say so, and probe it until it answers."""
        if self._probe is not None:
            return
        s = self.settings
        where = f"{s.printer_host}:{s.printer_port}"
        self._report_state("error", f"printer {where} unreachable ({why})")
        self._probe = asyncio.create_task(self._probe_printer(), name=f"{self.name}-probe")

    def _printer_up(self) -> None:
        probe, self._probe = self._probe, None
        if probe is None:
            return
        if probe is not asyncio.current_task():
            probe.cancel()
        s = self.settings
        log.info("%s: printer %s:%d reachable again", self.name, s.printer_host, s.printer_port)
        self._report_state("ok", self.listening)

    async def _probe_printer(self) -> None:
        """Connect and close at once, with jittered backoff, until the printer accepts.

        Only while it is unreachable: a printer that takes one connection at a time is
        never probed while it works.
        """
        s = self.settings
        backoff = Backoff(PROBE_MIN_S, PROBE_MAX_S)
        while True:
            await asyncio.sleep(backoff.next())
            try:
                async with asyncio.timeout(s.connect_timeout_s):
                    _, writer = await asyncio.open_connection(s.printer_host, s.printer_port)
            except (OSError, TimeoutError):
                continue
            await _close(writer)
            self._printer_up()
            return

    @property
    def listening(self) -> str:
        s = self.settings
        return f"listening on {s.listen_host}:{self.port} for {s.printer_host}:{s.printer_port}"

    async def start(self) -> int:
        """Start listening; return the bound port."""
        s = self.settings
        try:
            self._server = await asyncio.start_server(self._handle, s.listen_host, s.listen_port)
        except OSError as exc:
            raise SourceError(
                f"{self.name}: cannot listen on {s.listen_host}:{s.listen_port}: {exc.strerror}"
            ) from exc
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("%s: listening on %s:%d for the till", self.name, s.listen_host, self.port)
        return self.port

    async def close(self) -> None:
        """Stop listening, end every open till connection, stop the worker thread."""
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await probe
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        await self._stop_worker()

    def _till_allowed(self, till_w: asyncio.StreamWriter) -> bool:
        """Whether the connecting address is on ``till_allow``; a refusal is counted."""
        peer = till_w.get_extra_info("peername")
        try:
            address = ipaddress.ip_address(peer[0].split("%", 1)[0])
        except (TypeError, IndexError, ValueError):
            address = None
        if address is not None and isinstance(address, ipaddress.IPv6Address):
            address = address.ipv4_mapped or address
        if address is not None and any(address in net for net in self._allowed):
            return True
        self._refuse("address", f"a connection from {address}: not on till_allow")
        return False

    async def _handle(self, till_r: asyncio.StreamReader, till_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            if self._till_allowed(till_w):
                async with self._printer_lock:  # one printer connection at a time
                    await self._job(till_r, till_w)
            else:
                await _close(till_w)
        finally:
            self._handlers.discard(task)

    async def _job(self, till_r: asyncio.StreamReader, till_w: asyncio.StreamWriter) -> None:
        """One till connection: one printer connection, relayed both ways, then closed."""
        s = self.settings
        try:
            async with asyncio.timeout(s.connect_timeout_s):
                printer_r, printer_w = await asyncio.open_connection(s.printer_host, s.printer_port)
        except (OSError, TimeoutError) as exc:
            self._count("receipt_tap_printer_unreachable_total")
            why = "timed out" if isinstance(exc, TimeoutError) else device_error(exc)
            log.warning(
                "%s: printer %s:%d unreachable (%s); closing the till connection",
                self.name, s.printer_host, s.printer_port, why,
            )  # fmt: skip
            self._printer_down(why)
            await _close(till_w)
            return
        self._printer_up()
        self._count("receipt_tap_jobs_total")
        up = asyncio.create_task(self._upstream(till_r, printer_w), name=f"{self.name}-up")
        down = asyncio.create_task(self._relay(printer_r, till_w), name=f"{self.name}-down")
        try:
            await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            if up.done() and not down.done():  # till done sending: let replies drain
                await asyncio.wait({down}, timeout=s.linger_s)
        finally:
            for t in (up, down):
                t.cancel()
            for t in (up, down):
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await t
            await _close(printer_w)
            await _close(till_w)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Printer to till, unaltered, until the printer closes."""
        while data := await reader.read(READ_CHUNK):
            writer.write(data)
            await writer.drain()

    async def _upstream(self, reader: asyncio.StreamReader, printer: asyncio.StreamWriter) -> None:
        """Till to printer: parse, forward, inject before cuts; EOF is passed on."""
        forwarder = JobForwarder(self)
        while data := await self._read_till(reader):
            await forwarder.feed(data, printer)
        await forwarder.finish(printer)
        if printer.can_write_eof():
            printer.write_eof()
        await printer.drain()

    async def _read_till(self, reader: asyncio.StreamReader) -> bytes:
        """The next bytes from the till; b"" at EOF or when it stays silent too long."""
        try:
            async with asyncio.timeout(self.settings.idle_timeout_s):
                return await reader.read(READ_CHUNK)
        except TimeoutError:
            self._count("receipt_tap_idle_closed_total")
            log.info(
                "%s: till silent for %.0f s; ending the job",
                self.name,
                self.settings.idle_timeout_s,
            )
            return b""


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


class ReceiptTapSource:
    """The tap as a configured Source: yields ``receipt.printed`` for each injected token.

    ``transport = "tcp"`` runs a ``ReceiptTap``, ``"serial"`` a ``SerialReceiptTap``.
    QR codes the till prints itself are only counted (``receipt_tap_qr_seen_total``).
    The store id comes from the SourceContext (``ctx.store``).  ``port`` is the bound
    listening port once a TCP tap runs.
    """

    def __init__(self, config: ReceiptTapSourceConfig, ctx: SourceContext) -> None:
        self.config = config
        self.name = config.name
        self.port = 0
        self._ctx = ctx

    def _settings(self) -> TapSettings:
        c = self.config
        assert c.printer_host is not None  # the config requires it with transport tcp
        return TapSettings(
            printer_host=c.printer_host,
            printer_port=c.printer_port,
            listen_host=c.listen_host,
            listen_port=c.listen_port,
            lane=c.lane,
            lane_number=c.lane_number,
            inject=c.inject,
            url_prefix=c.url_prefix,
            module_size=c.module_size,
            connect_timeout_s=c.connect_timeout_s,
            idle_timeout_s=c.idle_timeout_s,
            till_allow=tuple(c.till_allow),
            mint_rate_per_min=c.mint_rate_per_min,
            mint_burst=c.mint_burst,
        )

    async def readings(self) -> AsyncIterator[Reading]:
        """Run the tap until cancelled."""
        c, ctx = self.config, self._ctx
        counters: CounterStore | None = None
        minting: Minting | None = None
        if c.inject != "off":
            store = ctx.store
            if not store:
                raise SourceError(f"{self.name}: injection needs the store id in SourceContext")
            counters = await asyncio.to_thread(CounterStore, c.counter_path)
            minting = Minting(ctx.keyring, store, counters)
        queue: asyncio.Queue[Printed] = asyncio.Queue()
        tap: ReceiptTap | SerialReceiptTap
        if c.transport == "serial":
            from drivers.receipt_tap_serial import SerialReceiptTap  # noqa: PLC0415

            tap = SerialReceiptTap(
                _serial_settings(c), minting, queue.put_nowait, ctx.metrics, self.name,
                ctx.now, ctx.set_state,
            )  # fmt: skip
        else:
            tap = ReceiptTap(
                self._settings(), minting, queue.put_nowait, ctx.metrics, self.name, ctx.now,
                ctx.set_state,
            )  # fmt: skip
        try:
            if isinstance(tap, ReceiptTap):
                self.port = await tap.start()
                ctx.set_state("ok", tap.listening)
            else:
                await tap.start()
            while True:
                printed = await _next_printed(queue, tap)
                attrs = {"lane": printed.lane, "receipt": printed.receipt}
                yield Reading("receipt.printed", self.name, printed.at, None, attrs)
        finally:
            await tap.close()
            if counters is not None:
                counters.close()


async def _next_printed(
    queue: asyncio.Queue[Printed], tap: ReceiptTap | SerialReceiptTap
) -> Printed:
    """The next token printed; a serial tap whose relaying died raises instead."""
    if isinstance(tap, ReceiptTap):
        return await queue.get()
    getter = asyncio.ensure_future(queue.get())
    ended = asyncio.ensure_future(tap.wait())
    try:
        await asyncio.wait({getter, ended}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for fut in (getter, ended):
            if not fut.done():
                fut.cancel()
    if getter.done() and not getter.cancelled():
        return getter.result()
    ended.result()  # the relaying task's exception, if it had one
    raise SourceError(f"{tap.name}: the serial relay stopped")


def _serial_settings(c: ReceiptTapSourceConfig) -> SerialTapSettings:
    from drivers.receipt_tap_serial import SerialLine, SerialTapSettings  # noqa: PLC0415

    assert c.till_device is not None  # the config requires both with transport serial
    assert c.printer_device is not None
    return SerialTapSettings(
        till_device=str(c.till_device),
        printer_device=str(c.printer_device),
        line=SerialLine(c.baudrate, c.bytesize, c.parity, c.stopbits, c.flow_control),
        lane=c.lane,
        lane_number=c.lane_number,
        inject=c.inject,
        url_prefix=c.url_prefix,
        module_size=c.module_size,
        idle_timeout_s=c.idle_timeout_s,
        reopen_min_s=c.reopen_min_s,
        reopen_max_s=c.reopen_max_s,
        mint_rate_per_min=c.mint_rate_per_min,
        mint_burst=c.mint_burst,
    )
