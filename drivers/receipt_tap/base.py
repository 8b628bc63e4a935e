"""Receipt printer tap: a transparent ESC/POS passthrough between till and printer.

    till ──TCP──► tap (listen) ──TCP──► printer (raw port 9100)
         ◄──────── status replies ◄────

Per till connection the tap opens one printer connection and closes it when the till
closes (many printers take one connection at a time, so nothing is held between jobs).
Till connections are served one at a time: a till that reconnects at once for its next
receipt waits until the previous job's printer connection is closed, rather than
meeting a busy printer.
Bytes from the till are parsed by ``drivers.receipt_tap.escpos`` on their way through:

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
  not know (``drivers.receipt_tap.escpos``) cuts are counted in ``receipt_tap_cuts_unsure_total``
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
line (``transport = "serial"``, ``drivers.receipt_tap.serial_line``; over TCP it is
``drivers.receipt_tap.tcp``; ``drivers.receipt_tap.source`` is the Source that runs
either).  What both transports share lives here: ``JobForwarder`` (parse, forward, inject
before each cut) and the token minting of ``TapBase``; the counters are
``drivers.receipt_tap.counter``'s.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Literal, Protocol, Self, TypeVar

from drivers.receipt_tap.counter import CounterStore
from drivers.receipt_tap.escpos import EscPosParser, qr_native, qr_raster
from gateway.identity.pseudonyms import Keyring
from gateway.identity.tokens import mint_receipt_token
from gateway.observe.metrics import Metrics

log = logging.getLogger(__name__)

READ_CHUNK = 65536
LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")
REFUSAL_LOG_EVERY_S = 60.0  # refusals are logged at most this often per tap (with a count)


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


S = TypeVar("S", bound=LaneSettings)


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


class TapBase(Generic[S]):
    """What every tap transport shares: counters, metrics and the token injection.

    ``settings`` are the transport's own (``TapSettings``, ``SerialTapSettings``), each a
    ``LaneSettings``.  ``on_printed`` is called on the event loop after a token's bytes
    were handed to the printer.  The counter store is only touched from one worker thread.
    A transport sets up its own parts in ``_setup``.
    """

    def __init__(  # noqa: PLR0917
        self,
        settings: S,
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
        self.settings: S = settings
        self.lane_settings: LaneSettings = settings
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
        self._setup()

    def _setup(self) -> None:
        """The transport's own parts (its ports, its server), once the shared ones exist."""

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

    def __init__(self, tap: TapBase[Any]) -> None:
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
