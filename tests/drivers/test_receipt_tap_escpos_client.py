"""Conformance: python-escpos, a real till-side ESC/POS library, prints through the tap.

python-escpos's ``Network`` printer talks to the TCP tap and its ``Serial`` printer to
the serial tap (a pty pair cabled to the tap's till port by a null-modem relay), with
the fake printer behind the tap.  The receipts use what a till sends: text and styles,
line spacing in every form (``ESC 3``, ``ESC +`` and ``ESC A``, with n = 0x1D before
"VAT ...", the case that once read as a cut), tab stops, the cash drawer, barcodes in
both ``GS k`` forms, native and image QR codes, images in every mode (``GS v 0``,
``GS ( L``, ``ESC *``), each cut form, and status queries answered by the printer.

With injection off the printer gets the till's bytes exactly and every native QR is
seen; with it on each receipt gets exactly one token, just before its cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from drivers.receipt_tap.base import Printed
from drivers.receipt_tap.counter import CounterStore
from drivers.receipt_tap.escpos import parse
from gateway.identity.pseudonyms import Keyring
from gateway.identity.tokens import verify_receipt_token
from gateway.observe.metrics import Metrics
from simulators.devices.serial_pty import SerialEnd
from tests.drivers.test_receipt_tap import PREFIX, injected_blocks, rig, run, strip_injected
from tests.drivers.test_receipt_tap_serial import rig as serial_rig
from tests.waiting import until

escpos_printer = pytest.importorskip("escpos.printer")

PROFILE = "TM-T88V"
TILL_QR = b"https://shop.example/r/000123"
SOURCE = "receipt-tap"


class Recording:
    """Mixed into a python-escpos printer class: keeps every byte it sends."""

    sent: bytearray

    def _raw(self, msg: bytes) -> None:
        self.sent += msg
        super()._raw(msg)  # type: ignore[misc]


class TillNetwork(Recording, escpos_printer.Network):  # type: ignore[misc,name-defined]
    pass


class TillSerial(Recording, escpos_printer.Serial):  # type: ignore[misc,name-defined]
    pass


def picture() -> Image.Image:
    """A 64 x 48 bitmap whose bytes include GS, V and NUL (0x1D 0x56 0x00)."""
    img = Image.new("1", (64, 48), 1)
    for y in range(48):
        for x in range(64):
            if (x * 7 + y * 3) % 5 == 0 or (y % 8 == 3 and x % 8 in {3, 5, 6, 7}):
                img.putpixel((x, y), 0)
    return img


def text_receipt(p: Any) -> None:
    p.hw("INIT")
    p.set(bold=True, underline=1, align="center", double_height=True, double_width=True)
    p.textln("TOUCHPOINT STORE 001")
    p.set_with_default()
    p.set(font="b", invert=True, smooth=True, density=3, flip=False)
    for divisor in (360, 60, 180):  # ESC + n, ESC A n, ESC 3 n: n = GS before "VAT"
        p.line_spacing(0x1D, divisor=divisor)
        p.textln("VAT 21% ...... 0.21")
    p.line_spacing()
    p.control("HT", count=3, tab_size=29)  # ESC D 29 58 NUL
    p.text("Total\t12.34\n")
    p.cashdraw(2)
    p.print_and_feed(2)
    p.cut()  # GS V A n: feed and full cut


def barcode_receipt(p: Any) -> None:
    p.hw("INIT")
    p.barcode("4006381333931", "EAN13")  # GS k m ... NUL
    p.barcode("{B012345678", "CODE128", function_type="B")  # GS k m n ...
    p.cut(mode="PART")


def qr_receipt(p: Any) -> None:
    p.hw("INIT")
    p.qr(TILL_QR.decode(), native=True, size=4)
    p.qr("https://shop.example/survey", native=False, size=4)
    p.cut(feed=False)  # GS V 0


def image_receipt(p: Any) -> None:
    p.hw("INIT")
    for impl in ("bitImageRaster", "graphics", "bitImageColumn"):
        p.image(picture(), impl=impl)
    p.cut(mode="PART", feed=False)  # GS V 1


RECEIPTS: list[Callable[[Any], None]] = [
    text_receipt,
    barcode_receipt,
    qr_receipt,
    image_receipt,
]


def statuses(p: Any) -> tuple[bool, int]:
    """``DLE EOT 1`` and ``DLE EOT 4``, answered by the printer through the tap."""
    return p.is_online(), p.paper_status()


@pytest.fixture(autouse=True)
def _quiet_escpos(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="root")


def print_over_tcp(port: int) -> tuple[list[bytes], list[tuple[bool, int]]]:
    """Each receipt on its own connection, as a till prints; status asked first."""
    sent: list[bytes] = []
    answers: list[tuple[bool, int]] = []
    for body in RECEIPTS:
        p = TillNetwork("127.0.0.1", port, timeout=10, profile=PROFILE)
        p.sent = bytearray()
        try:
            answers.append(statuses(p))
            body(p)
        finally:
            p.close()
        sent.append(bytes(p.sent))
    return sent, answers


def check_passthrough(sent: list[bytes], got: list[bytes], metrics: Metrics) -> None:
    assert [len(g) for g in got] == [len(s) for s in sent]
    assert got == sent  # byte-exact
    for job in sent:
        result = parse(job)
        assert len(result.cuts) == 1
        assert result.unsure_cuts == []
    native = [q for job in sent for q in parse(job).qr]
    assert native == [TILL_QR]  # the image QR is an image, not a QR command
    assert metrics.get("receipt_tap_qr_seen_total", source=SOURCE) == len(native)
    assert metrics.get("receipt_tap_cuts_unsure_total", source=SOURCE) == 0


def check_injected(
    sent: list[bytes], got: list[bytes], printed: list[Printed], kr: Keyring
) -> None:
    assert len(printed) == len(sent)  # exactly one token a receipt
    blocks = injected_blocks(printed)
    for job, out, block in zip(sent, got, blocks, strict=True):
        strip_injected(job, out, [block])  # the token just before the cut, nothing else
    assert [verify_receipt_token(p.receipt, kr).counter for p in printed] == [1, 2, 3, 4]
    assert parse(got[2]).qr == [TILL_QR, (PREFIX + printed[2].receipt).encode()]


def test_python_escpos_network_passthrough_is_byte_exact() -> None:
    async def scenario() -> None:
        metrics = Metrics()
        async with rig(metrics=metrics) as (printer, tap):
            sent, answers = await asyncio.to_thread(print_over_tcp, tap.port)
            got = await printer.wait_jobs(len(RECEIPTS))
        assert answers == [(True, 2)] * len(RECEIPTS)
        check_passthrough(sent, got, metrics)

    run(scenario)


def test_python_escpos_network_one_token_before_each_cut(tmp_path: Path, keyring: Keyring) -> None:
    async def scenario() -> None:
        printed: list[Printed] = []
        async with rig("native", tmp_path / "counters.db", keyring, printed) as (printer, tap):
            sent, answers = await asyncio.to_thread(print_over_tcp, tap.port)
            got = await printer.wait_jobs(len(RECEIPTS))
        assert answers == [(True, 2)] * len(RECEIPTS)
        check_injected(sent, got, printed, keyring)

    run(scenario)


# ---------------------------------------------------------------------------- serial


@contextlib.asynccontextmanager
async def null_modem(link: Path, till_end: SerialEnd) -> AsyncIterator[str]:
    """A pty for python-escpos (its path is yielded), cabled to ``till_end``."""

    async def pump(src: SerialEnd, dst: SerialEnd) -> None:
        while True:
            await dst.write(await src.read())

    with SerialEnd.pty(link) as escpos_end:
        tasks = [
            asyncio.create_task(pump(escpos_end, till_end), name="null-modem-out"),
            asyncio.create_task(pump(till_end, escpos_end), name="null-modem-back"),
        ]
        try:
            yield str(link)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def print_over_serial(device: str) -> tuple[list[bytes], list[tuple[bool, int]]]:
    """One serial port held open, the receipts one after another, status asked first."""
    # a status read waits for 16 bytes or the timeout: ask before the first receipt only
    p = TillSerial(device, baudrate=115200, timeout=1, dsrdtr=False, profile=PROFILE)
    sent: list[bytes] = []
    answers: list[tuple[bool, int]] = []
    try:
        for body in RECEIPTS:
            p.sent = bytearray()
            if not sent:
                answers.append(statuses(p))
            body(p)
            p.device.flush()
            sent.append(bytes(p.sent))
    finally:
        p.close()
    return sent, answers


@pytest.mark.parametrize("inject", ["off", "native"])
def test_python_escpos_serial_through_the_serial_tap(
    tmp_path: Path, keyring: Keyring, inject: str
) -> None:
    async def scenario() -> None:
        counters = CounterStore(tmp_path / "counters.db")
        try:
            async with (
                serial_rig(tmp_path, inject=inject, keyring=keyring, counters=counters) as r,
                null_modem(tmp_path / "escpos", r.till) as device,
            ):
                sent, answers = await asyncio.to_thread(print_over_serial, device)
                total = sum(map(len, sent)) + (
                    0 if inject == "off" else sum(map(len, injected_blocks(r.printed)))
                )
                await until(lambda: len(r.printer.received) >= total)
                got = bytes(r.printer.received)
                printed = list(r.printed)
                metrics = r.metrics
        finally:
            counters.close()
        assert answers == [(True, 2)]
        if inject == "off":
            assert got == b"".join(sent)
            check_passthrough(sent, split_by(got, [len(job) for job in sent]), metrics)
        else:
            assert len(printed) == len(RECEIPTS)
            blocks = injected_blocks(printed)
            strip_injected(b"".join(sent), got, blocks)
            sizes = [len(job) + len(block) for job, block in zip(sent, blocks, strict=True)]
            check_injected(sent, split_by(got, sizes), printed, keyring)

    run(scenario)


def split_by(stream: bytes, sizes: list[int]) -> list[bytes]:
    """The serial printer's one stream cut into receipts of these sizes."""
    out, at = [], 0
    for size in sizes:
        out.append(stream[at : at + size])
        at += size
    assert at == len(stream)
    return out
