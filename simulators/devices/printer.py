"""A fake receipt printer, networked (raw TCP, port 9100 style) or serial, for tests and demos.

    python -m simulators.devices.printer [--host 127.0.0.1] [--port 9100]
    python -m simulators.devices.printer --serial pty --link /tmp/tp-printer   # a serial printer
    python -m simulators.devices.printer --serial /dev/ttyUSB1 --baudrate 19200

On TCP it records the bytes of each connection as one job, answers ``DLE EOT n``
real-time status queries, and takes one connection at a time, as many real printers
do: a second connection while one is open is accepted and closed at once (counted in
``refused``).  Like a real printer it reacts to ``DLE EOT n`` wherever the bytes appear.

On a serial line (``SerialPrinter``) there are no connections: it records one stream,
answers the same status queries, and can hold the sender off with XOFF/XON
(``pause``/``resume``) as a printer with a full buffer does.  ``--serial pty`` makes a
pty and prints its path first (``--link`` keeps a symlink to it).

This module imports nothing from ``drivers`` or ``gateway``.  In tests::

    async with FakePrinter() as printer:
        ...connect to printer.port...
        jobs = await printer.wait_jobs(1)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging

from simulators.devices.serial_pty import SerialEnd, add_serial_options, from_args
from simulators.infra.service import AsyncService

log = logging.getLogger(__name__)

DLE, EOT = 0x10, 0x04
XON, XOFF = 0x11, 0x13
# Replies for n = 1 (printer), 2 (offline cause), 3 (error cause), 4 (paper sensor):
# bits 1 and 4 are always set, everything else clear means "all fine".
STATUS_OK = {1: 0x16, 2: 0x12, 3: 0x12, 4: 0x12}
PAPER_OUT = {1: 0x1E, 2: 0x32, 3: 0x12, 4: 0x72}


class FakePrinter(AsyncService):
    """The printer; see the module docstring.  ``status`` maps n to the reply byte."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.status: dict[int, int] = dict(STATUS_OK)
        self.jobs: list[bytes] = []
        self.queries = 0
        self.refused = 0
        self.connections = 0
        self.active = 0
        self._server: asyncio.Server | None = None
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()

    async def wait_jobs(self, count: int) -> list[bytes]:
        """Wait until ``count`` jobs are complete (their connections closed)."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.jobs) >= count)
        return list(self.jobs)

    async def wait_idle(self) -> None:
        """Wait until no connection is open."""
        async with self._changed:
            await self._changed.wait_for(lambda: self.active == 0)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            if self.active:
                self.refused += 1
                log.info("printer busy: refusing a second connection")
                return
            self.active += 1
            self.connections += 1
            try:
                self.jobs.append(await self._job(reader, writer))
            finally:
                self.active -= 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            self._tasks.discard(task)
            await self._notify()

    async def _job(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
        job = bytearray()
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                scan_from = max(0, len(job) - 2)
                job += data
                replies = self._status_replies(bytes(job[scan_from:]))
                if replies:
                    writer.write(replies)
                    await writer.drain()
        return bytes(job)

    def _status_replies(self, data: bytes) -> bytes:
        out = status_replies(self.status, data)
        self.queries += len(out)
        return out


def status_replies(status: dict[int, int], data: bytes) -> bytes:
    """The answers to every complete ``DLE EOT n`` in ``data`` (unknown n: none)."""
    out = bytearray()
    start = 0
    while (at := data.find(bytes([DLE, EOT]), start)) >= 0 and at + 2 < len(data):
        n = data[at + 2]
        if n in status:
            out.append(status[n])
        start = at + 1
    return bytes(out)


class SerialPrinter(AsyncService):
    """A serial printer on ``end``: records the stream, answers status queries.

    ``async with SerialPrinter(end) as printer`` reads until closed; an unplugged line
    is waited out (bytes sent meanwhile never arrive, as with a pulled cable).
    """

    def __init__(self, end: SerialEnd) -> None:
        self.end = end
        self.status: dict[int, int] = dict(STATUS_OK)
        self.received = bytearray()
        self.queries = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="fake-serial-printer")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait_bytes(self, count: int) -> bytes:
        """Wait until at least ``count`` bytes arrived; return all of them."""
        async with self._changed:
            await self._changed.wait_for(lambda: len(self.received) >= count)
        return bytes(self.received)

    async def pause(self) -> None:
        """XOFF: ask the sender to stop (a printer's buffer is full)."""
        await self.end.write(bytes([XOFF]))

    async def resume(self) -> None:
        """XON: the sender may go on."""
        await self.end.write(bytes([XON]))

    async def _run(self) -> None:
        while True:
            if not self.end.plugged:
                await asyncio.sleep(0.01)
                continue
            try:
                data = await self.end.read()
            except ConnectionError:
                continue
            scan_from = max(0, len(self.received) - 2)
            self.received += data
            replies = status_replies(self.status, bytes(self.received[scan_from:]))
            if replies:
                self.queries += len(replies)
                with contextlib.suppress(ConnectionError):
                    await self.end.write(replies)
            async with self._changed:
                self._changed.notify_all()


async def _serve(host: str, port: int) -> None:
    async with FakePrinter(host, port) as printer:
        print(f"fake printer on {host}:{printer.port}", flush=True)
        while True:
            await asyncio.sleep(0.5)
            for job in printer.jobs:
                log.info("job of %d bytes", len(job))
            printer.jobs.clear()  # a long run keeps nothing: the log line is the record


async def _serve_serial(end: SerialEnd) -> None:
    print(end.path, flush=True)
    async with SerialPrinter(end) as printer:
        while True:
            await asyncio.sleep(0.5)
            if printer.received:
                log.info("received %d bytes", len(printer.received))
            del printer.received[:]  # a long run keeps nothing: the log line is the record


def main(argv: list[str] | None = None) -> None:
    """Run a fake printer until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m simulators.devices.printer",
        description="Fake ESC/POS receipt printer: raw TCP (default) or a serial line.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=9100, help="port to listen on (0: any)")
    add_serial_options(
        parser,
        "be a serial printer instead: 'pty' makes a pty and prints its path first, "
        "or a device cabled to the gateway (/dev/ttyUSB1)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        if args.serial is None:
            asyncio.run(_serve(args.host, args.port))
            return
        end = from_args(args)
        with end:
            asyncio.run(_serve_serial(end))


if __name__ == "__main__":
    main()
