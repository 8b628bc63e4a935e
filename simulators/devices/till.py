"""A fake till: writes ESC/POS receipts (text, raster logos, its own QR codes, cuts).

    python -m simulators.devices.till --host 127.0.0.1 --port 9100 [--count 3] [--qr TEXT]
    python -m simulators.devices.till --port 9100 --count 0 --interval 2 --quiet   # a busy lane
    python -m simulators.devices.till --serial pty --link /tmp/tp-till --count 0   # a serial till

The encoders here are written independently of ``drivers.receipt_tap.escpos`` (this module imports
nothing from ``drivers`` or ``gateway``), so the two check each other.  ``send_job``
sends one job over TCP in randomly sized segments, optionally asks the printer for its
status first (``DLE EOT 1``, as tills do before printing), and returns every byte the
printer side answered.  ``send_serial_job`` does the same down a serial line
(``simulators.devices.serial_pty``); ``--serial pty`` makes a pty, prints its path first and
sends there (the gateway's ``till_device``), ``--serial DEVICE`` uses a real port.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import socket
from collections.abc import Awaitable, Callable, Sequence

from simulators.devices.serial_pty import SerialEnd, add_serial_options, from_args

ESC, GS, DLE = b"\x1b", b"\x1d", b"\x10"


def init() -> bytes:
    """ESC @: reset the printer."""
    return ESC + b"@"


def text(line: str) -> bytes:
    """One line of text (code page 437 subset: ASCII), then LF."""
    return line.encode("ascii", "replace") + b"\n"


def bold(on: bool) -> bytes:
    return ESC + b"E" + (b"\x01" if on else b"\x00")


def align(where: str) -> bytes:
    return ESC + b"a" + bytes([{"left": 0, "center": 1, "right": 2}[where]])


def logo(width_bytes: int, height: int, data: bytes | None = None, seed: int = 0) -> bytes:
    """GS v 0 raster image; ``data`` (repeated to size) or pseudo-random pixels."""
    size = width_bytes * height
    if data is None:
        data = random.Random(seed).randbytes(size)
    pixels = (data * (size // max(1, len(data)) + 1))[:size]
    header = bytes([0, width_bytes & 0xFF, width_bytes >> 8, height & 0xFF, height >> 8])
    return GS + b"v0" + header + pixels


def column_image(columns: int, data: bytes) -> bytes:
    """ESC * 33 (24-dot double density): ``columns`` columns of 3 bytes each."""
    pixels = (data * (3 * columns // max(1, len(data)) + 1))[: 3 * columns]
    return ESC + b"*\x21" + bytes([columns & 0xFF, columns >> 8]) + pixels


def qr(data: bytes, size: int = 4) -> bytes:
    """A native QR code: model 2, module size, level M, store, print."""

    def gs_k(fn: int, params: bytes) -> bytes:
        n = len(params) + 2
        return GS + b"(k" + bytes([n % 256, n // 256, 0x31, fn]) + params

    return (
        gs_k(0x41, b"\x32\x00")
        + gs_k(0x43, bytes([size]))
        + gs_k(0x45, b"\x31")
        + gs_k(0x50, b"\x30" + data)
        + gs_k(0x51, b"\x30")
    )


def cut() -> bytes:
    """GS V 66 3: feed three lines, then a partial cut."""
    return GS + b"VB\x03"


def status_query(n: int = 1) -> bytes:
    """DLE EOT n: real-time status request; the printer answers one byte."""
    return DLE + b"\x04" + bytes([n])


def receipt(
    lines: Sequence[str] = ("SHOP", "1x COFFEE   2.50", "TOTAL       2.50"),
    *,
    with_logo: bool = True,
    qr_data: bytes | None = None,
    seed: int = 0,
) -> bytes:
    """A typical receipt: reset, logo, lines, an optional QR of the till's own, cut."""
    out = [init(), align("center")]
    if with_logo:
        out.append(logo(32, 48, seed=seed))
    out += [bold(True), text(lines[0]), bold(False), align("left")]
    out += [text(line) for line in lines[1:]]
    if qr_data is not None:
        out += [align("center"), qr(qr_data), text("")]
    out.append(cut())
    return b"".join(out)


def trap_logo(seed: int = 0) -> bytes:
    """A raster logo whose pixels spell a QR store command and a cut: the naive-scan trap."""
    fake = GS + b"(k\x0c\x00\x31\x50\x30FAKE-QR!!" + GS + b"(k\x03\x00\x31\x51\x30" + GS + b"V\x00"
    return logo(len(fake), 8, data=fake, seed=seed)


def hostile(seed: int = 0) -> bytes:
    """ESC/POS with lying lengths, truncated headers, stray prefixes and random bytes."""
    rnd = random.Random(seed)
    parts = [
        GS + b"(k\xff\xff\x31\x50\x30" + b"short",  # declares 65532 bytes, sends 5
        GS + b"8L\xff\xff\xff\x7f" + rnd.randbytes(300),  # declares 2 GiB
        GS + b"v0\x00\xff\xff\xff\xff" + rnd.randbytes(200),
        ESC + b"*\x21\xff\xff" + rnd.randbytes(100),
        ESC + ESC + GS + GS + b"(" + DLE,
        rnd.randbytes(2000),
        GS + b"(k",
    ]
    return b"".join(parts)


async def send_job(
    host: str,
    port: int,
    data: bytes,
    *,
    rnd: random.Random | None = None,
    max_segment: int = 1500,
    query_status: bool = False,
) -> bytes:
    """Send one job (segments of random size when ``rnd`` is given); return the replies.

    With ``query_status`` the till first sends ``DLE EOT 1`` and waits for its answer.
    After the job it half-closes and reads until the other side closes.  The caller
    bounds the time (``asyncio.timeout``).
    """
    reader, writer = await asyncio.open_connection(host, port)
    try:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        replies = bytearray()
        if query_status:
            writer.write(status_query(1))
            await writer.drain()
            replies += await reader.readexactly(1)
        pos = 0
        while pos < len(data):
            size = rnd.randint(1, max_segment) if rnd else max_segment
            writer.write(data[pos : pos + size])
            await writer.drain()
            pos += size
            if rnd and rnd.random() < 0.1:
                await asyncio.sleep(0)
        writer.write_eof()
        replies += await reader.read()
        return bytes(replies)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def send_serial_job(
    end: SerialEnd,
    data: bytes,
    *,
    rnd: random.Random | None = None,
    max_segment: int = 1500,
    query_status: bool = False,
) -> bytes:
    """Write one job down a serial line (random segments with ``rnd``).

    With ``query_status`` the till first sends ``DLE EOT 1`` and returns the answer byte
    (the caller bounds the wait with ``asyncio.timeout``: a printer that is off never
    answers).  Replies to queries inside ``data`` are read by the caller (``end.read``).
    """
    reply = b""
    if query_status:
        await end.write(status_query(1))
        reply = await end.read()
    pos = 0
    while pos < len(data):
        size = rnd.randint(1, max_segment) if rnd else max_segment
        await end.write(data[pos : pos + size])
        pos += size
        if rnd and rnd.random() < 0.1:
            await asyncio.sleep(0)
    return reply


async def _print_jobs(args: argparse.Namespace, send: Callable[[bytes], Awaitable[bytes]]) -> None:
    """The till's loop: ``args.count`` receipts (0: forever) every ``args.interval`` s.

    ``send`` prints one and returns the printer's status replies; when it fails (the
    printer or the tap is down) the job is retried later, as a real till does.
    """
    i = failed = 0
    while args.count == 0 or i < args.count:
        qr_data = args.qr.encode() if args.qr else None
        try:
            replies = await send(receipt(qr_data=qr_data, seed=i))
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            failed += 1
            print(f"job {i + 1}: not printed ({exc.__class__.__name__}), retrying", flush=True)
            await asyncio.sleep(min(5.0, 0.5 * failed))
            continue
        failed = 0
        i += 1
        if not args.quiet or i % 100 == 0:
            print(f"job {i}: printer status {replies[:1].hex()}", flush=True)
        if args.interval:
            await asyncio.sleep(args.interval)


async def _run_serial(end: SerialEnd, args: argparse.Namespace) -> None:
    print(end.path, flush=True)

    async def send(data: bytes) -> bytes:
        async with asyncio.timeout(2):  # no answer: the printer (or the tap) is off
            replies = await send_serial_job(end, b"", query_status=True)
        await send_serial_job(end, data)
        return replies

    await _print_jobs(args, send)
    # A last status query: its answer means the printer side took every byte before it
    # (a pty discards unread bytes when its till end closes).
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2):
            await send_serial_job(end, b"", query_status=True)


def main(argv: list[str] | None = None) -> None:
    """Send receipts to a printer (or a tap in front of one)."""
    parser = argparse.ArgumentParser(
        prog="python -m simulators.devices.till",
        description="Fake till: send ESC/POS receipts over TCP or down a serial line.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="printer or tap address")
    parser.add_argument("--port", type=int, default=9100, help="printer or tap port")
    parser.add_argument("--count", type=int, default=1, help="number of receipts (0: forever)")
    parser.add_argument(
        "--interval", type=float, default=0.0, help="seconds between receipts (default 0)"
    )
    parser.add_argument("--qr", default=None, help="text of the till's own QR code")
    parser.add_argument(
        "--quiet", action="store_true", help="one line per 100 jobs instead of one per job"
    )
    add_serial_options(
        parser,
        "send down a serial line instead: 'pty' makes a pty and prints its path first "
        "(the gateway's till_device), or a device cabled to the gateway (/dev/ttyUSB0)",
    )
    args = parser.parse_args(argv)
    if args.serial is not None:
        end = from_args(args)
        with end, contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_run_serial(end, args))
        return

    async def send(data: bytes) -> bytes:
        async with asyncio.timeout(30):
            return await send_job(args.host, args.port, data, query_status=True)

    async def run() -> None:
        print(f"fake till sending to {args.host}:{args.port}", flush=True)
        await _print_jobs(args, send)

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
