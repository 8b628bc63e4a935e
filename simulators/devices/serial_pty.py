"""One end of a serial cable for the fake till and the fake printer: a pty or a device.

    port = SerialEnd.pty(link="/run/touchpoint-sim/till")   # the gateway opens the link
    port = SerialEnd.device("/dev/ttyUSB1", 9600)          # a real cable to the gateway
    await port.write(data); data = await port.read()

A pty pair stands in for a USB-serial adapter: the simulator holds the master, the
device under test opens the slave (``path``, or ``link``, a symlink replaced atomically
so that a replugged adapter keeps its name, as a udev rule gives it).  Both ends are
set raw: in cooked mode ETX would be the interrupt character and CR would become LF.
``unplug`` closes the pair (the other side's reads fail with EIO), ``replug`` makes a
new one.  Writes wait while the other side does not read (the kernel buffer is full),
as a till does under flow control; nothing is dropped.

This module imports nothing from ``drivers`` or ``gateway``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tty
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

READ_CHUNK = 65536


def open_raw_pty(link: Path | None = None) -> tuple[int, int, str]:
    """A pty pair set raw (master non-blocking): (master, slave, slave path).

    ``link``, when given, is pointed at the slave path atomically (a udev-style name).
    """
    master, slave = os.openpty()
    tty.setraw(master)
    tty.setraw(slave)  # ETX (0x03) is VINTR in cooked mode
    os.set_blocking(master, False)
    path = os.ttyname(slave)
    if link is not None:
        tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(path)
        tmp.replace(link)
    return master, slave, path


def close_pty(link: Path | None, *fds: int | None) -> None:
    """Remove the link and close the pair: the other side's reads fail with EIO."""
    if link is not None:
        link.unlink(missing_ok=True)
    for fd in fds:
        if fd is not None:
            os.close(fd)


class SerialEnd:
    """The simulator's end of a serial line; see the module docstring."""

    def __init__(self, *, link: str | Path | None = None, device: str | None = None) -> None:
        self.link = Path(link) if link is not None else None
        self.device = device
        self.path = ""
        self._fd: int | None = None
        self._slave: int | None = None
        self._serial: object | None = None
        self._waiters: set[asyncio.Future[None]] = set()
        self._generation = 0  # bumped on every plug: an fd number can come back

    @classmethod
    def pty(cls, link: str | Path | None = None) -> SerialEnd:
        end = cls(link=link)
        end.open()
        return end

    @classmethod
    def device_port(cls, device: str, baudrate: int = 9600) -> SerialEnd:
        """A real serial device (a USB-serial adapter cabled to the gateway), set raw."""
        import serial  # noqa: PLC0415 - only the device mode needs pyserial

        end = cls(device=device)
        port = serial.Serial(device, baudrate, timeout=0, write_timeout=0, exclusive=True)
        end._serial = port
        end._fd = port.fileno()
        end.path = device
        return end

    @property
    def plugged(self) -> bool:
        return self._fd is not None

    def open(self) -> str:
        """Create the pty (and the link); return the slave path."""
        if self._fd is not None:
            return self.path
        self._fd, self._slave, self.path = open_raw_pty(self.link)
        self._generation += 1
        log.info("serial line plugged in at %s", self.path)
        return self.path

    def unplug(self) -> None:
        """Close the pty (the other side sees EIO) and remove the link."""
        if self.device is not None:
            raise RuntimeError("a real device cannot be unplugged by software")
        self._forget_waiters()
        close_pty(self.link, self._fd, self._slave)
        self._fd = self._slave = None

    def replug(self) -> str:
        self.unplug()
        return self.open()

    def _forget_waiters(self) -> None:
        """Stop watching the fd before it is closed; readers and writers get ConnectionError."""
        if self._fd is not None and self._waiters:
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._fd)
            loop.remove_writer(self._fd)
        for waiter in list(self._waiters):
            if not waiter.done():
                waiter.set_exception(ConnectionError("serial line unplugged"))

    def close(self) -> None:
        if self._serial is not None:
            self._forget_waiters()
            self._serial.close()  # type: ignore[attr-defined]
            self._serial = None
            self._fd = None
        else:
            self.unplug()

    def __enter__(self) -> SerialEnd:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _require(self) -> int:
        if self._fd is None:
            raise ConnectionError("serial line unplugged")
        return self._fd

    async def _ready(self, fd: int, *, write: bool) -> None:
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        generation = self._generation

        def wake() -> None:
            if not waiter.done():
                waiter.set_result(None)

        (loop.add_writer if write else loop.add_reader)(fd, wake)
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)
            if self._fd == fd and self._generation == generation:
                (loop.remove_writer if write else loop.remove_reader)(fd)

    async def write(self, data: bytes) -> None:
        """Send every byte, waiting while the other side does not take them."""
        view = memoryview(data)
        while view:
            fd = self._require()
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                await self._ready(fd, write=True)

    async def read(self) -> bytes:
        """The next bytes from the other side (waits for them)."""
        while True:
            fd = self._require()
            await self._ready(fd, write=False)
            try:
                data = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                continue
            if not data:  # VMIN=0 device: readiness without data is a hang-up
                raise ConnectionError("serial line hung up")
            return data


def add_serial_options(parser: argparse.ArgumentParser, serial_help: str) -> None:
    """``--serial DEVICE`` (or ``pty``), ``--link`` and ``--baudrate``: see :func:`from_args`."""
    parser.add_argument("--serial", metavar="DEVICE", help=serial_help)
    parser.add_argument("--link", type=Path, help="with --serial pty: keep a symlink to it here")
    parser.add_argument("--baudrate", type=int, default=9600, help="with --serial DEVICE")


def from_args(args: argparse.Namespace) -> SerialEnd:
    """The serial end ``--serial`` names: a new pty (``pty``, linked at ``--link``), or a
    real device at ``--baudrate``."""
    if args.serial == "pty":
        return SerialEnd.pty(args.link)
    return SerialEnd.device_port(args.serial, args.baudrate)
