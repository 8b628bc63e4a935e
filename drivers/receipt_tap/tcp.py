"""The receipt tap over TCP: a till connects to the tap as to its network printer (port
9100); the tap connects on to the printer and forwards both ways
(see ``drivers.receipt_tap.base``)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging

from drivers.receipt_tap.base import (
    READ_CHUNK,
    JobForwarder,
    TapBase,
    TapSettings,
)
from gateway.backoff import Backoff, device_error
from gateway.errors import SourceError

log = logging.getLogger(__name__)

PROBE_MIN_S, PROBE_MAX_S = 1.0, 30.0  # an unreachable printer is probed this often


class ReceiptTap(TapBase[TapSettings]):
    """The TCP tap.  ``async with ReceiptTap(...) as tap`` listens on ``tap.port``.

    One-shot: after ``close`` a new instance is needed.  ``on_printed`` is called on the
    event loop after a token's bytes were handed to the printer connection.
    """

    def _setup(self) -> None:
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._probe: asyncio.Task[None] | None = None  # while the printer is unreachable
        self._allowed = tuple(
            ipaddress.ip_network(n, strict=False) for n in self.settings.till_allow
        )
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
