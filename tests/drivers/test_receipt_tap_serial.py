"""The receipt tap on a serial line: two pty pairs, the fake till on one, the fake printer
on the other, the real tap (pyserial, termios, the event loop) between them.

Both ptys are raw on the simulator side and configured by pyserial on the tap's side
(ETX would be the interrupt character in cooked mode).  The tap opens the ptys through
symlinks, as it opens udev links on a real box, so an unplugged and replugged pty keeps
its name.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import termios
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from drivers.receipt_tap.base import Printed
from drivers.receipt_tap.counter import CounterStore
from drivers.receipt_tap.escpos import parse
from drivers.receipt_tap.serial_line import SerialLine, SerialReceiptTap, SerialTapSettings
from drivers.receipt_tap.source import ReceiptTapSource
from gateway.config.sources import ReceiptTapSourceConfig
from gateway.identity.pseudonyms import Keyring
from gateway.identity.tokens import verify_receipt_token
from gateway.observe.metrics import Metrics
from simulators.devices import till
from simulators.devices.printer import PAPER_OUT, SerialPrinter
from simulators.devices.serial_pty import SerialEnd
from tests.drivers.test_receipt_tap import (
    PREFIX,
    STORE,
    decode_raster,
    minting,
    pumped,
    sha,
    some_job,
    source_context,
    split_injection,
)
from tests.waiting import until

SOURCE = "receipt-tap"


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30))


@dataclass
class Rig:
    till: SerialEnd
    printer: SerialPrinter
    tap: SerialReceiptTap
    metrics: Metrics
    printed: list[Printed]
    states: list[tuple[str, str]] = field(default_factory=list)

    def count(self, metric: str) -> float:
        return self.metrics.get(metric, source=SOURCE)

    async def replies(self, count: int, timeout: float = 3.0) -> bytes:
        got = b""
        async with asyncio.timeout(timeout):
            while len(got) < count:
                got += await self.till.read()
        return got


@asynccontextmanager
async def rig(
    tmp_path: Path,
    *,
    inject: str = "off",
    keyring: Keyring | None = None,
    counters: CounterStore | Path | None = None,
    line: SerialLine | None = None,
    idle_timeout_s: float = 10.0,
) -> AsyncIterator[Rig]:
    till_link, printer_link = tmp_path / "till", tmp_path / "printer"
    metrics = Metrics()
    printed: list[Printed] = []
    settings = SerialTapSettings(
        till_device=str(till_link),
        printer_device=str(printer_link),
        line=line or SerialLine(baudrate=115200),
        lane="till-2",
        lane_number=2,
        inject=inject,  # type: ignore[arg-type]
        url_prefix=PREFIX,
        module_size=4,
        idle_timeout_s=idle_timeout_s,
        reopen_min_s=0.02,
        reopen_max_s=0.1,
    )
    states: list[tuple[str, str]] = []
    with (
        minting(counters, keyring) as mint,
        SerialEnd.pty(till_link) as till_end,
        SerialEnd.pty(printer_link) as printer_end,
    ):
        async with SerialPrinter(printer_end) as printer:
            tap = SerialReceiptTap(
                settings, mint, printed.append, metrics, SOURCE,
                on_state=lambda state, detail: states.append((state, detail)),
            )  # fmt: skip
            async with tap:
                await until(lambda: tap.till.is_open and tap.printer.is_open)
                yield Rig(till_end, printer, tap, metrics, printed, states)


def test_passthrough_is_byte_exact_under_random_segmentation(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with rig(tmp_path) as r:
            rnd = random.Random(11)
            sent = b""
            for i in range(10):
                job = some_job(rnd, i)
                sent += job
                await till.send_serial_job(
                    r.till, job, rnd=rnd, max_segment=rnd.choice([1, 7, 300, 5000])
                )
            got = await r.printer.wait_bytes(len(sent))
            assert sha(got) == sha(sent)
            assert r.states[-1][0] == "ok"
            assert r.count("receipt_tap_bytes_total") == len(sent)
            assert r.count("receipt_tap_jobs_total") == len(parse(sent).cuts)  # a job per cut
            # the till's own QR codes were seen, the fake ones inside the trap logos were not
            qrs = parse(sent).qr
            assert len(qrs) >= 10
            assert all(q.startswith(b"https://shop.example/") for q in qrs)
            assert r.count("receipt_tap_qr_seen_total") == len(qrs)

    run(scenario)


def test_status_replies_are_relayed(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with rig(tmp_path) as r:
            async with asyncio.timeout(3):
                reply = await till.send_serial_job(r.till, b"", query_status=True)
            assert reply == bytes([0x16])
            job = till.receipt() + till.status_query(4) + till.status_query(2)
            await till.send_serial_job(r.till, job, rnd=random.Random(1), max_segment=3)
            assert await r.replies(2) == bytes([0x12, 0x12])
            r.printer.status = dict(PAPER_OUT)
            async with asyncio.timeout(3):
                reply = await till.send_serial_job(r.till, b"", query_status=True)
            assert reply == bytes([0x1E])
            assert r.printer.queries == 4

    run(scenario)


@pytest.mark.parametrize("max_segment", [1, 64, 100_000])
def test_native_injection_before_the_cut(
    tmp_path: Path, keyring: Keyring, max_segment: int
) -> None:
    async def scenario() -> None:
        async with rig(
            tmp_path, inject="native", keyring=keyring, counters=tmp_path / "counters.db"
        ) as r:
            job = till.trap_logo() + till.receipt(qr_data=b"TILL-OWN-QR")
            await till.send_serial_job(
                r.till, job, rnd=random.Random(max_segment), max_segment=max_segment
            )
            await until(lambda: len(r.printed) == 1)
            await until(lambda: bytes(r.printer.received).endswith(till.cut()))
            got = bytes(r.printer.received)
            printed = r.printed
        block = split_injection(job, got)
        qrs = parse(got).qr
        assert qrs == [b"TILL-OWN-QR", (PREFIX + printed[0].receipt).encode()]
        assert parse(block).qr == [qrs[1]]
        token = verify_receipt_token(printed[0].receipt, keyring)
        assert (token.store, token.lane_number, token.counter) == (STORE, 2, 1)
        assert printed[0].lane == "till-2"

    run(scenario)


def test_raster_injection_and_the_counter_across_restarts(tmp_path: Path, keyring: Keyring) -> None:
    path = tmp_path / "state" / "counters.db"
    printed: list[Printed] = []
    outputs: list[bytes] = []

    async def one_life(receipts: int) -> None:
        async with rig(tmp_path, inject="raster", keyring=keyring, counters=path) as r:
            job = till.receipt() * receipts  # one stream, a job per cut
            await till.send_serial_job(r.till, job, rnd=random.Random(3), max_segment=50)
            await until(lambda: len(r.printed) == receipts)
            await until(lambda: bytes(r.printer.received).endswith(till.cut()))
            printed.extend(r.printed)
            outputs.append(bytes(r.printer.received))
            assert r.count("receipt_tap_jobs_total") == receipts

    run(lambda: one_life(2))
    run(lambda: one_life(1))
    assert [verify_receipt_token(p.receipt, keyring).counter for p in printed] == [1, 2, 3]
    block = split_injection(till.receipt(), outputs[1])
    assert decode_raster(block) == [PREFIX + printed[2].receipt]


def test_software_flow_control_holds_the_line_and_never_eats_data(tmp_path: Path) -> None:
    async def scenario() -> None:
        line = SerialLine(baudrate=19200, flow_control="xonxoff")
        async with rig(tmp_path, line=line) as r:
            till_attrs = _attrs(tmp_path / "till")
            printer_attrs = _attrs(tmp_path / "printer")
            # the tap sends XOFF to the till, never acts on the till's bytes ...
            assert till_attrs[0] & termios.IXOFF and not till_attrs[0] & termios.IXON
            # ... and obeys the printer's XOFF, never sending one into the print data
            assert printer_attrs[0] & termios.IXON and not printer_attrs[0] & termios.IXOFF
            job = b"".join(till.receipt(seed=i) for i in range(6)) + till.logo(64, 400, seed=9)
            assert b"\x11" in job and b"\x13" in job  # raster data is full of both
            await r.printer.pause()
            await asyncio.sleep(0.1)
            sending = asyncio.create_task(till.send_serial_job(r.till, job))
            await asyncio.sleep(0.3)
            assert len(r.printer.received) == 0  # held off: nothing reached the printer
            await r.printer.resume()
            await sending
            got = await r.printer.wait_bytes(len(job))
            assert sha(got) == sha(job)
            # the printer's XOFF/XON were consumed by the line, not relayed as status
            async with asyncio.timeout(3):
                reply = await till.send_serial_job(r.till, b"", query_status=True)
            assert reply == bytes([0x16])

    run(scenario)


def _attrs(device: Path) -> list[Any]:
    fd = os.open(device, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        return termios.tcgetattr(fd)
    finally:
        os.close(fd)


def test_line_settings_reach_the_ports(tmp_path: Path) -> None:
    async def scenario() -> None:
        line = SerialLine(
            baudrate=38400, bytesize=7, parity="odd", stopbits=2, flow_control="rtscts"
        )
        async with rig(tmp_path, line=line) as r:
            for side in ("till", "printer"):
                iflag, _, cflag, _, ispeed, ospeed, _ = _attrs(tmp_path / side)
                assert (ispeed, ospeed) == (termios.B38400, termios.B38400)
                # a pty forces CS8 and clears PARENB; what it keeps of the parity is PARODD
                assert cflag & termios.PARODD
                assert cflag & termios.CSTOPB
                assert cflag & termios.CRTSCTS
                assert not iflag & (termios.IXON | termios.IXOFF)
            job = till.receipt()
            await till.send_serial_job(r.till, job)
            assert await r.printer.wait_bytes(len(job)) == job

    run(scenario)


def test_printer_unplugged_and_replugged(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with rig(tmp_path) as r:
            first = till.receipt(seed=1)
            await till.send_serial_job(r.till, first)
            await r.printer.wait_bytes(len(first))
            r.printer.end.unplug()
            await until(lambda: not r.tap.printer.is_open)
            await until(lambda: r.states[-1][0] == "absent")
            assert "printer port" in r.states[-1][1]
            assert str(tmp_path / "printer") in r.states[-1][1]
            # the till goes on: its bytes are parsed and dropped, its query unanswered
            lost = till.receipt(seed=2)
            await till.send_serial_job(r.till, lost)
            await until(lambda: r.count("receipt_tap_bytes_dropped_total") == len(lost))
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await till.send_serial_job(r.till, b"", query_status=True)
            assert r.tap.till.is_open
            r.printer.end.open()
            r.printer.received.clear()
            await until(lambda: r.tap.printer.is_open)
            assert r.states[-1][0] == "ok"
            second = till.receipt(seed=3)
            await till.send_serial_job(r.till, till.status_query(1) + second)
            assert await r.replies(1) == bytes([0x16])
            got = await r.printer.wait_bytes(len(second) + 3)
            assert sha(got) == sha(till.status_query(1) + second)
            assert r.count("receipt_tap_port_lost_total") == 1
            assert r.count("receipt_tap_jobs_total") == 2  # the lost receipt is not a job

    run(scenario)


def test_till_unplugged_and_replugged(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with rig(tmp_path) as r:
            r.till.unplug()
            await until(lambda: not r.tap.till.is_open)
            await until(lambda: r.states[-1][0] == "absent")
            assert "till port" in r.states[-1][1]
            await asyncio.sleep(0.2)  # a few failed reopens: no crash, still retrying
            assert r.tap.printer.is_open
            r.till.open()
            await until(lambda: r.tap.till.is_open)
            assert r.states[-1][0] == "ok"
            job = till.receipt(qr_data=b"AFTER-REPLUG")
            await till.send_serial_job(r.till, job, rnd=random.Random(5), max_segment=40)
            assert sha(await r.printer.wait_bytes(len(job))) == sha(job)
            assert r.count("receipt_tap_qr_seen_total") == 1

    run(scenario)


def test_a_stream_left_inside_a_command_starts_afresh_after_silence(
    tmp_path: Path, keyring: Keyring
) -> None:
    async def scenario() -> None:
        async with rig(
            tmp_path,
            inject="native",
            keyring=keyring,
            counters=tmp_path / "counters.db",
            idle_timeout_s=0.2,
        ) as r:
            junk = till.hostile(0)  # ends inside a command that declares 65532 bytes
            await till.send_serial_job(r.till, junk, rnd=random.Random(0))
            await r.printer.wait_bytes(len(junk))
            await until(lambda: r.count("receipt_tap_idle_closed_total") == 1)
            assert bytes(r.printer.received) == junk  # forwarded whole, nothing injected
            job = till.receipt()
            await till.send_serial_job(r.till, job)
            await until(lambda: len(r.printed) == 1)
            await until(lambda: bytes(r.printer.received).endswith(till.cut()))
            block = split_injection(job, bytes(r.printer.received)[len(junk) :])
            assert parse(block).qr == [(PREFIX + r.printed[0].receipt).encode()]

    run(scenario)


# ---------------------------------------------------------------------- as a Source


def serial_config(tmp_path: Path, **over: Any) -> ReceiptTapSourceConfig:
    fields: dict[str, Any] = {
        "kind": "receipt_tap",
        "name": "till-3-printer",
        "lane": "till-3",
        "lane_number": 3,
        "transport": "serial",
        "till_device": tmp_path / "till",
        "printer_device": tmp_path / "printer",
        "baudrate": 115200,
        "inject": "native",
        "url_prefix": PREFIX,
        "counter_path": tmp_path / "counters.db",
        "reopen_min_s": 0.02,
        "reopen_max_s": 0.1,
    }
    fields.update(over)
    return ReceiptTapSourceConfig.model_validate(fields)


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"printer_host": "192.0.2.5"}, 'printer_host: only for transport = "tcp"'),
        ({"till_device": None}, "till_device required"),
        ({"printer_device": None, "till_device": None}, "till_device and printer_device"),
        ({"printer_device": "/dev/x", "till_device": "/dev/x"}, "two different ports"),
        ({"stopbits": 3}, "stopbits must be 1, 1.5 or 2"),
        ({"parity": "N"}, "parity"),
        ({"flow_control": "dsrdtr"}, "flow_control"),
        ({"transport": "tcp"}, 'only for transport = "serial"; set transport'),
    ],
)
def test_serial_config_errors(tmp_path: Path, over: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        serial_config(tmp_path, **over)


def test_existing_tcp_configs_are_unchanged(tmp_path: Path) -> None:
    tcp = ReceiptTapSourceConfig.model_validate(
        {"kind": "receipt_tap", "name": "t", "lane": "l", "lane_number": 1, "printer_host": "h"}
    )
    assert (tcp.transport, tcp.printer_port, tcp.listen_port) == ("tcp", 9100, 9100)
    with pytest.raises(ValidationError, match="printer_host is required"):
        ReceiptTapSourceConfig.model_validate(
            {"kind": "receipt_tap", "name": "t", "lane": "l", "lane_number": 1}
        )
    assert serial_config(tmp_path, stopbits=1.5).stopbits == 1.5


def test_source_on_a_serial_line_yields_receipt_printed(tmp_path: Path, keyring: Keyring) -> None:
    async def scenario() -> None:
        ctx = source_context("till-3-printer", keyring)
        source = ReceiptTapSource(serial_config(tmp_path), ctx)
        async with pumped(source) as readings:
            await until(lambda: ctx.state.get("state") == "absent")  # nothing plugged
            with (
                SerialEnd.pty(tmp_path / "till") as till_end,
                SerialEnd.pty(tmp_path / "printer") as printer_end,
            ):
                async with SerialPrinter(printer_end) as printer:
                    await until(lambda: ctx.state.get("state") == "ok")
                    await till.send_serial_job(till_end, till.receipt(qr_data=b"OWN"))
                    reading = await readings.get()
                    await until(lambda: bytes(printer.received).endswith(till.cut()))
        assert (reading.type, reading.source, reading.subject) == (
            "receipt.printed",
            "till-3-printer",
            None,
        )
        assert reading.attrs["lane"] == "till-3"
        token = verify_receipt_token(reading.attrs["receipt"], keyring)
        assert (token.counter, token.lane_number, token.store) == (1, 3, STORE)
        assert readings.empty()  # the till's own QR is not an event

    run(scenario)


def test_the_commented_example_in_the_example_config_is_valid() -> None:
    firmware = Path(__file__).resolve().parents[2] / "firmware-config"
    text = (firmware / "gateway.example.toml").read_text(encoding="utf-8")
    start = text.index('# kind = "receipt_tap"')
    block = []
    for raw in text[start:].splitlines():
        if not raw.startswith("# ") or "=" not in raw:
            break
        block.append(raw[2:])
    example = tomllib.loads("\n".join(block))
    config = ReceiptTapSourceConfig.model_validate(example)
    assert config.transport == "serial"
    links = {
        "/dev/" + m
        for m in re.findall(
            r'SYMLINK\+="([^"]+)"', (firmware / "udev/99-touchpoint-serial.rules").read_text()
        )
    }
    assert {str(config.till_device), str(config.printer_device)} <= links
