"""The receipt printer tap on a serial line: between the till's port and the printer's.

    till ──RS-232──► till_device   tap   printer_device ──RS-232──► printer
         ◄──────── status replies (DLE EOT n) ◄──────────────────────

Many tills drive their receipt printer over RS-232 or a USB-serial adapter.  Here the
gateway has two ports, one cabled to the till (it plays the printer) and one to the
printer (it plays the till), both with the printer's line settings: baud rate, data
bits, parity, stop bits and flow control.  Bytes from the till go through the same
``JobForwarder`` as on TCP (parsed, forwarded unaltered with injection off, a receipt
token injected before each cut with it on); every byte from the printer (status
replies) goes back to the till unaltered.

A serial line has no connections: a job ends at the cut.  A till silent for
``idle_timeout_s`` with a command half sent starts a new stream, so a lying length
cannot blind the parser for ever.

Flow control:
  - ``rtscts``: the kernel's hardware handshake (CRTSCTS) on both ports;
  - ``xonxoff``: towards the printer the tap honours its XOFF/XON (IXON) and never
    sends any (the printer would print them); towards the till it sends XOFF/XON when
    it falls behind (IXOFF) and never acts on the till's bytes (raster data is full of
    0x11 and 0x13).  XOFF/XON bytes of the printer are consumed by the kernel.
Back-pressure is end to end: the tap reads the till only when the printer took the
previous bytes.

A port that cannot be opened or goes away (a USB adapter pulled: EIO, hang-up) is a
status, not an error: the source state goes to ``absent`` naming the side, and that
side is reopened with jittered exponential backoff between ``reopen_min_s`` and
``reopen_max_s``; the other side stays open.  While the printer is away the till's
bytes are still parsed (the parser stays in step) and dropped, counted in
``receipt_tap_bytes_dropped_total``; the till gets no status reply, so it reports the
printer offline as it would without the tap.  No token is minted for a printer that is
not there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import termios
from dataclasses import dataclass, field
from typing import Literal

import serial

from drivers.receipt_tap.base import JobForwarder, TapBase
from gateway.backoff import Backoff, device_error

log = logging.getLogger(__name__)

READ_CHUNK = 4096
XON, XOFF = 0x11, 0x13
Side = Literal["till", "printer"]
OPENING = "opening"
_PARITY = {
    "none": serial.PARITY_NONE,
    "even": serial.PARITY_EVEN,
    "odd": serial.PARITY_ODD,
    "mark": serial.PARITY_MARK,
    "space": serial.PARITY_SPACE,
}


@dataclass(frozen=True, slots=True)
class SerialLine:
    """Line settings, the same on both ports (the till was set up for this printer)."""

    baudrate: int = 9600
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["none", "even", "odd", "mark", "space"] = "none"
    stopbits: float = 1
    flow_control: Literal["none", "rtscts", "xonxoff"] = "none"


@dataclass(frozen=True, slots=True)
class SerialTapSettings:
    """The two ports, the line, the lane and what the tap injects."""

    till_device: str
    printer_device: str
    line: SerialLine = field(default_factory=SerialLine)
    lane: str = "lane"
    lane_number: int = 1
    inject: Literal["off", "native", "raster"] = "off"
    url_prefix: str = ""
    module_size: int = 6
    idle_timeout_s: float = 60.0
    reopen_min_s: float = 0.5
    reopen_max_s: float = 30.0
    mint_rate_per_min: float = 30.0
    mint_burst: int = 5


class PortLost(Exception):
    """One side of the line went away (unplugged, I/O error, hang-up)."""

    def __init__(self, side: Side, why: str) -> None:
        super().__init__(f"{side} port lost: {why}")
        self.side = side
        self.why = why


class SerialPort:
    """One end of the line, opened non-blocking and served by the event loop.

    Reads wait for readiness with ``loop.add_reader`` (a tty with VMIN=0 reads b""
    when empty, so b"" after readiness means the device hung up); writes wait with
    ``loop.add_writer`` when the kernel buffer is full (flow control holds it).
    ``close`` wakes every waiter with PortLost.
    """

    def __init__(self, side: Side, device: str, line: SerialLine) -> None:
        self.side: Side = side
        self.device = device
        self.line = line
        self.why = OPENING
        self._port: serial.Serial | None = None
        self._waiters: set[asyncio.Future[None]] = set()

    @property
    def is_open(self) -> bool:
        return self._port is not None

    def open(self) -> None:
        """Open and configure the port (raises OSError: SerialException is one)."""
        line = self.line
        port = serial.Serial(
            self.device,
            baudrate=line.baudrate,
            bytesize=line.bytesize,
            parity=_PARITY[line.parity],
            stopbits=line.stopbits,
            rtscts=line.flow_control == "rtscts",
            xonxoff=False,
            timeout=0,
            write_timeout=0,
            exclusive=True,
        )
        try:
            if line.flow_control == "xonxoff":
                _software_flow_control(port.fileno(), self.side)
        except OSError:
            port.close()
            raise
        self._port = port
        self.why = ""

    def close(self, why: str) -> None:
        """Close the port (if open) and wake every reader and writer with PortLost."""
        port, self._port = self._port, None
        if port is None:
            return
        self.why = why
        fd = port.fileno()
        loop = asyncio.get_running_loop()
        loop.remove_reader(fd)
        loop.remove_writer(fd)
        port.close()
        for waiter in list(self._waiters):
            if not waiter.done():
                waiter.set_exception(PortLost(self.side, why))

    def _fd(self) -> int:
        if self._port is None:
            raise PortLost(self.side, self.why)
        return int(self._port.fileno())

    async def _ready(self, fd: int, *, write: bool) -> None:
        loop = asyncio.get_running_loop()
        port = self._port
        waiter: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        (loop.add_writer if write else loop.add_reader)(fd, wake)
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)
            if self._port is port:
                (loop.remove_writer if write else loop.remove_reader)(fd)

    def _lost(self, why: str) -> PortLost:
        self.close(why)
        return PortLost(self.side, why)

    async def read(self) -> bytes:
        """The next bytes (waits for them); PortLost when the device goes away."""
        fd = self._fd()
        await self._ready(fd, write=False)
        try:
            data = os.read(self._fd(), READ_CHUNK)
        except BlockingIOError:
            return b""
        except OSError as exc:
            raise self._lost(device_error(exc)) from None
        if not data:
            raise self._lost("device hung up")
        return data

    async def send(self, data: bytes) -> None:
        """Write all of ``data``, waiting while flow control holds the line."""
        view = memoryview(data)
        while view:
            fd = self._fd()
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                await self._ready(fd, write=True)
            except OSError as exc:
                raise self._lost(device_error(exc)) from None


def _software_flow_control(fd: int, side: Side) -> None:
    """XON/XOFF, one way only: see the module docstring."""
    attrs = termios.tcgetattr(fd)
    attrs[0] &= ~(termios.IXON | termios.IXOFF | termios.IXANY)
    attrs[0] |= termios.IXOFF if side == "till" else termios.IXON
    attrs[6][termios.VSTART] = bytes([XON])
    attrs[6][termios.VSTOP] = bytes([XOFF])
    termios.tcsetattr(fd, termios.TCSANOW, attrs)


class _PortSink:
    """The printer port as the forwarder's Sink: write buffers, drain sends."""

    def __init__(self, port: SerialPort) -> None:
        self._port = port
        self._buffer = bytearray()

    def write(self, data: bytes) -> None:
        self._buffer += data

    async def drain(self) -> None:
        data, self._buffer = bytes(self._buffer), bytearray()
        if data:
            await self._port.send(data)


class SerialReceiptTap(TapBase[SerialTapSettings]):
    """The serial tap.  ``async with SerialReceiptTap(...)`` runs it until closed.

    ``on_state(state, detail)`` hears ``ok`` when both ports are open and ``absent``
    (naming the side and why) when one is not.  One-shot, like ``ReceiptTap``.
    """

    def _setup(self) -> None:
        settings = self.settings
        self.till = SerialPort("till", settings.till_device, settings.line)
        self.printer = SerialPort("printer", settings.printer_device, settings.line)
        self._state: tuple[str, str] | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Open the ports (retrying in the background) and start relaying."""
        self._report()
        self._task = asyncio.create_task(self._run(), name=f"{self.name}-serial")

    async def wait(self) -> None:
        """Return (or raise) when the relaying ends: only on a bug, ports are retried."""
        if self._task is None:
            raise RuntimeError("the serial tap is not started")
        await asyncio.shield(self._task)

    async def close(self) -> None:
        """Stop relaying, close both ports, stop the worker thread."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.till.close("tap stopped")
        self.printer.close("tap stopped")
        await self._stop_worker()

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._till_side(), name=f"{self.name}-till")
            group.create_task(self._printer_side(), name=f"{self.name}-printer")

    def _report(self) -> None:
        """Set the state from both sides; log only changes."""
        s = self.settings
        down = [p for p in (self.till, self.printer) if not p.is_open]
        if not down:
            state, detail = "ok", f"till {s.till_device} <-> printer {s.printer_device}"
        else:
            opening = all(p.why == OPENING for p in down)
            state = "connecting" if opening else "absent"
            detail = "; ".join(f"{p.side} port {p.device}: {p.why}" for p in down)
        if (state, detail) == self._state:
            return
        self._state = (state, detail)
        if state == "ok":
            log.info("%s: relaying %s", self.name, detail)
        elif state == "absent":
            log.warning("%s: %s; retrying with backoff", self.name, detail)
        self._report_state(state, detail)

    async def _open(self, port: SerialPort, backoff: Backoff) -> float:
        """Open ``port``, retrying with backoff until it opens; return when it did."""
        while True:
            try:
                port.open()
            except OSError as exc:
                port.why = f"cannot open: {device_error(exc)}"
                self._report()
                await asyncio.sleep(backoff.next())
                continue
            self._report()
            return asyncio.get_running_loop().time()

    async def _pause_after_loss(self, backoff: Backoff, opened_at: float) -> None:
        """Wait before reopening; a port that stayed up a while starts the backoff afresh."""
        if asyncio.get_running_loop().time() - opened_at >= self.settings.reopen_max_s:
            backoff.reset()
        await asyncio.sleep(backoff.next())

    async def _till_side(self) -> None:
        """Till to printer: one forwarder per stream; a lost till ends the stream."""
        s = self.settings
        backoff = Backoff(s.reopen_min_s, s.reopen_max_s)
        sink = _PortSink(self.printer)
        while True:
            opened_at = await self._open(self.till, backoff)
            forwarder = JobForwarder(self)
            try:
                while True:
                    try:
                        async with asyncio.timeout(s.idle_timeout_s):
                            data = await self.till.read()
                    except TimeoutError:
                        forwarder = await self._idle(forwarder, sink)
                        continue
                    backoff.reset()
                    if data:
                        await self._forward(forwarder, data, sink)
            except PortLost as lost:
                self._count("receipt_tap_port_lost_total")
                log.warning("%s: %s", self.name, lost)
                self._report()
                with contextlib.suppress(PortLost):
                    await forwarder.finish(sink if self.printer.is_open else None)
            await self._pause_after_loss(backoff, opened_at)

    async def _forward(self, forwarder: JobForwarder, data: bytes, sink: _PortSink) -> None:
        printer = sink if self.printer.is_open else None
        try:
            cuts = await forwarder.feed(data, printer)
        except PortLost as lost:
            if lost.side == "till":
                raise
            return  # the printer went away mid-write: the printer side reopens it
        if printer is not None:  # a job is a receipt that reached the printer
            self._count("receipt_tap_jobs_total", cuts)

    async def _idle(self, forwarder: JobForwarder, sink: _PortSink) -> JobForwarder:
        """The till went quiet: a stream left inside a command starts afresh."""
        if forwarder.parser.between_commands:
            return forwarder
        self._count("receipt_tap_idle_closed_total")
        log.info(
            "%s: till silent for %.0f s inside a command; starting a new stream",
            self.name,
            self.settings.idle_timeout_s,
        )
        with contextlib.suppress(PortLost):
            await forwarder.finish(sink if self.printer.is_open else None)
        return JobForwarder(self)

    async def _printer_side(self) -> None:
        """Printer to till, unaltered; replies with no till to take them are dropped."""
        s = self.settings
        backoff = Backoff(s.reopen_min_s, s.reopen_max_s)
        while True:
            opened_at = await self._open(self.printer, backoff)
            try:
                while True:
                    data = await self.printer.read()
                    backoff.reset()
                    if not self.till.is_open:
                        self._count("receipt_tap_replies_dropped_total", len(data))
                        continue
                    with contextlib.suppress(PortLost):  # the till side reopens it
                        await self.till.send(data)
            except PortLost as lost:
                self._count("receipt_tap_port_lost_total")
                log.warning("%s: %s", self.name, lost)
                self._report()
            await self._pause_after_loss(backoff, opened_at)
