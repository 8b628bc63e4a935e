"""The receipt tap on real loopback TCP, between the fake till and the fake printer."""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import ExitStack, asynccontextmanager, closing, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zxingcpp
from pydantic import ValidationError

from drivers.receipt_tap.base import Minting, Printed, TapSettings
from drivers.receipt_tap.counter import CounterStore
from drivers.receipt_tap.escpos import parse, qr_native
from drivers.receipt_tap.source import ReceiptTapSource
from drivers.receipt_tap.tcp import ReceiptTap
from gateway.app.sources import source_class
from gateway.config.sources import ReceiptTapSourceConfig
from gateway.errors import SourceError
from gateway.identity.pseudonyms import Keyring
from gateway.identity.tokens import verify_receipt_token
from gateway.observe.metrics import Metrics
from gateway.ports import Reading, SourceContext
from simulators.devices import till
from simulators.devices.printer import PAPER_OUT, FakePrinter
from tests.drivers.test_escpos_commands import REFERENCE

PREFIX = "HTTPS://R.EXAMPLE.COM/R/"
STORE = "nl-ams-001"


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 20))


@contextmanager
def minting(
    counters: CounterStore | Path | None, keyring: Keyring | None
) -> Iterator[Minting | None]:
    """The tap's minting (None without counters or keyring); a counter store given by its
    path is opened here and closed on the way out."""
    if counters is None or keyring is None:
        yield None
        return
    with ExitStack() as stack:
        if isinstance(counters, Path):
            counters = stack.enter_context(closing(CounterStore(counters)))
        yield Minting(keyring=keyring, store=STORE, counters=counters)


@asynccontextmanager
async def rig(
    inject: str = "off",
    counters: CounterStore | Path | None = None,
    keyring: Keyring | None = None,
    printed: list[Printed] | None = None,
    metrics: Metrics | None = None,
    idle_timeout_s: float = 10.0,
    **over: Any,
) -> AsyncIterator[tuple[FakePrinter, ReceiptTap]]:
    async with FakePrinter() as printer:
        settings = TapSettings(
            printer_host="127.0.0.1",
            printer_port=printer.port,
            listen_port=0,
            lane="till-2",
            lane_number=2,
            inject=inject,  # type: ignore[arg-type]
            url_prefix=PREFIX,
            module_size=4,
            linger_s=0.5,
            idle_timeout_s=idle_timeout_s,
            **over,
        )
        on_printed = printed.append if printed is not None else None
        with minting(counters, keyring) as mint:
            async with ReceiptTap(settings, mint, on_printed, metrics) as tap:
                yield printer, tap


def source_context(name: str, keyring: Keyring) -> SourceContext:
    return SourceContext(
        name=name, keyring=keyring, metrics=Metrics(), now=lambda: 1795000000.0, store=STORE
    )


@asynccontextmanager
async def pumped(source: ReceiptTapSource) -> AsyncIterator[asyncio.Queue[Reading]]:
    """The source's readings, put on a queue by a task that is cancelled on the way out."""
    readings: asyncio.Queue[Reading] = asyncio.Queue()

    async def pump() -> None:
        async for reading in source.readings():
            readings.put_nowait(reading)

    task = asyncio.create_task(pump(), name="tap-pump")
    try:
        yield readings
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def some_job(rnd: random.Random, i: int) -> bytes:
    parts = [till.receipt(qr_data=f"https://shop.example/{i}".encode(), seed=i)]
    if rnd.random() < 0.5:
        parts.insert(0, till.trap_logo(seed=i))
    if rnd.random() < 0.3:
        parts.append(till.column_image(40, rnd.randbytes(30)))
    return b"".join(parts * rnd.randint(1, 3))


def test_passthrough_is_byte_exact_under_random_segmentation() -> None:
    async def scenario() -> None:
        metrics = Metrics()
        async with rig(metrics=metrics) as (printer, tap):
            rnd = random.Random(7)
            sent = []
            for i in range(12):
                job = some_job(rnd, i)
                sent.append(job)
                await till.send_job(
                    "127.0.0.1", tap.port, job, rnd=rnd, max_segment=rnd.choice([2, 7, 300, 5000])
                )
            jobs = await printer.wait_jobs(12)
        assert [sha(j) for j in jobs] == [sha(s) for s in sent]
        assert printer.refused == 0
        assert printer.connections == 12
        assert metrics.get("receipt_tap_jobs_total", source="receipt-tap") == 12
        assert metrics.get("receipt_tap_bytes_total", source="receipt-tap") == sum(map(len, sent))
        # the till's own QR codes were seen, the fake ones inside the trap logos were not
        qrs = sum(len(parse(s).qr) for s in sent)
        assert metrics.get("receipt_tap_qr_seen_total", source="receipt-tap") == qrs

    run(scenario)


def test_status_replies_are_relayed() -> None:
    async def scenario() -> None:
        async with rig() as (printer, tap):
            job = till.receipt() + till.status_query(4) + till.status_query(2)
            replies = await till.send_job("127.0.0.1", tap.port, job, query_status=True)
            assert replies == bytes([0x16, 0x12, 0x12])
            printer.status = dict(PAPER_OUT)
            replies = await till.send_job("127.0.0.1", tap.port, b"", query_status=True)
            assert replies == bytes([0x1E])
            assert printer.queries == 4

    run(scenario)


def test_printer_connection_lives_only_as_long_as_the_till_connection() -> None:
    async def scenario() -> None:
        async with rig() as (printer, tap):
            _, writer = await asyncio.open_connection("127.0.0.1", tap.port)
            writer.write(till.init() + till.text("hello"))
            await writer.drain()
            while printer.active == 0:
                await asyncio.sleep(0.005)
            assert printer.connections == 1
            writer.close()
            await writer.wait_closed()
            await printer.wait_idle()
            assert await printer.wait_jobs(1) == [till.init() + till.text("hello")]
            # a second and third job each get their own printer connection
            for _ in range(2):
                await till.send_job("127.0.0.1", tap.port, till.receipt())
                await printer.wait_idle()
            assert (printer.connections, printer.refused) == (3, 0)

    run(scenario)


def test_silent_till_releases_the_printer() -> None:
    async def scenario() -> None:
        metrics = Metrics()
        async with rig(metrics=metrics, idle_timeout_s=0.2) as (printer, tap):
            reader, writer = await asyncio.open_connection("127.0.0.1", tap.port)
            writer.write(till.init())
            await writer.drain()
            assert await reader.read() == b""  # the tap ended the job
            writer.close()
            await writer.wait_closed()
            assert await printer.wait_jobs(1) == [till.init()]
        assert metrics.get("receipt_tap_idle_closed_total", source="receipt-tap") == 1

    run(scenario)


def test_counter_store_failure_prints_the_receipt_without_a_token(
    tmp_path: Path, keyring: Keyring
) -> None:
    async def scenario() -> None:
        metrics = Metrics()
        printed: list[Printed] = []
        counters = CounterStore(tmp_path / "counters.db")
        counters.close()  # every reserve now fails
        async with rig("native", counters, keyring, printed, metrics) as (printer, tap):
            job = till.receipt()
            await till.send_job("127.0.0.1", tap.port, job, max_segment=3)
            assert await printer.wait_jobs(1) == [job]
        assert printed == []
        assert metrics.get("receipt_tap_inject_failed_total", source="receipt-tap") == 1
        assert "receipt-tap" in metrics.last_error

    run(scenario)


def test_printer_unreachable_closes_the_till_connection() -> None:
    async def scenario() -> None:
        metrics = Metrics()
        async with FakePrinter() as gone:
            port = gone.port
        settings = TapSettings(printer_host="127.0.0.1", printer_port=port, listen_port=0)
        async with ReceiptTap(settings, metrics=metrics) as tap:
            reader, writer = await asyncio.open_connection("127.0.0.1", tap.port)
            assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()
        assert metrics.get("receipt_tap_printer_unreachable_total", source="receipt-tap") == 1

    run(scenario)


def test_an_unreachable_printer_is_a_state_and_is_probed_until_it_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("drivers.receipt_tap.tcp.PROBE_MIN_S", 0.05)
    monkeypatch.setattr("drivers.receipt_tap.tcp.PROBE_MAX_S", 0.2)
    states: list[tuple[str, str]] = []

    async def scenario() -> None:
        async with FakePrinter() as gone:
            port = gone.port
        settings = TapSettings(printer_host="127.0.0.1", printer_port=port, listen_port=0)
        async with ReceiptTap(settings, on_state=lambda s, d: states.append((s, d))) as tap:
            reader, writer = await asyncio.open_connection("127.0.0.1", tap.port)
            assert await reader.read() == b""
            writer.close()
            assert states[-1][0] == "error" and f"127.0.0.1:{port} unreachable" in states[-1][1]
            assert tap.printer_unreachable
            await asyncio.sleep(0.5)  # probes keep failing: no state flapping
            assert [s for s, _ in states] == ["error"]
            async with FakePrinter(port=port) as back:  # the printer is switched on again
                async with asyncio.timeout(10):
                    while tap.printer_unreachable:
                        await asyncio.sleep(0.02)
                assert states[-1] == ("ok", tap.listening)
                assert back.connections >= 1 and back.jobs == [b""], "a probe prints nothing"

    run(scenario)


def split_injection(sent: bytes, printed: bytes) -> bytes:
    """The bytes the tap added: ``printed`` must be ``sent`` with one block before the cut."""
    cut = parse(sent).cuts
    assert len(cut) == 1
    head, tail = sent[: cut[0]], sent[cut[0] :]
    assert printed.startswith(head)
    assert printed.endswith(tail)
    return printed[len(head) : len(printed) - len(tail)]


@pytest.mark.parametrize("max_segment", [1, 5, 64, 100_000])
def test_native_injection_before_the_cut(
    tmp_path: Path, keyring: Keyring, max_segment: int
) -> None:
    async def scenario() -> None:
        printed: list[Printed] = []
        async with rig("native", tmp_path / "counters.db", keyring, printed) as (printer, tap):
            job = till.trap_logo() + till.receipt(qr_data=b"TILL-OWN-QR")
            await till.send_job(
                "127.0.0.1",
                tap.port,
                job,
                rnd=random.Random(max_segment),
                max_segment=max_segment,
            )
            (got,) = await printer.wait_jobs(1)
        block = split_injection(job, got)
        qrs = parse(got).qr
        assert qrs[0] == b"TILL-OWN-QR"
        assert qrs[1] == (PREFIX + printed[0].receipt).encode()
        assert parse(block).qr == [qrs[1]]
        token = verify_receipt_token(printed[0].receipt, keyring)
        assert (token.store, token.lane_number, token.counter, token.key_id) == (STORE, 2, 1, "k1")
        assert printed[0].lane == "till-2"

    run(scenario)


def decode_raster(block: bytes) -> list[str]:
    start = block.index(b"\x1dv0\x00")
    row_bytes = block[start + 4] | block[start + 5] << 8
    height = block[start + 6] | block[start + 7] << 8
    data = np.frombuffer(block[start + 8 : start + 8 + row_bytes * height], dtype=np.uint8)
    bits = np.unpackbits(data.reshape(height, row_bytes), axis=1)
    image = np.where(bits == 1, 0, 255).astype(np.uint8)
    return [found.text for found in zxingcpp.read_barcodes(image)]


def test_raster_injection_decodes_as_a_receipt_token(tmp_path: Path, keyring: Keyring) -> None:
    async def scenario() -> None:
        printed: list[Printed] = []
        async with rig("raster", tmp_path / "counters.db", keyring, printed) as (printer, tap):
            job = till.receipt()
            await till.send_job("127.0.0.1", tap.port, job, rnd=random.Random(3), max_segment=9)
            (got,) = await printer.wait_jobs(1)
        block = split_injection(job, got)
        assert parse(got).qr == []  # no native QR: the token is an image
        (text,) = decode_raster(block)
        assert text == PREFIX + printed[0].receipt
        assert verify_receipt_token(text.removeprefix(PREFIX), keyring).counter == 1

    run(scenario)


def test_counter_is_persisted_and_never_reused_across_restarts(
    tmp_path: Path, keyring: Keyring
) -> None:
    path = tmp_path / "state" / "counters.db"
    printed: list[Printed] = []

    async def one_life(jobs: int) -> None:
        async with rig("native", path, keyring, printed) as (printer, tap):
            # two receipts (two cuts) in one job, then single ones
            await till.send_job("127.0.0.1", tap.port, till.receipt() * 2)
            for _ in range(jobs - 1):
                await till.send_job("127.0.0.1", tap.port, till.receipt())
            await printer.wait_jobs(jobs)

    run(lambda: one_life(2))
    run(lambda: one_life(3))
    counters = [verify_receipt_token(p.receipt, keyring).counter for p in printed]
    assert counters == [1, 2, 3, 4, 5, 6, 7]
    store = CounterStore(path)
    try:
        assert store.last(STORE, 2) == 7
        assert store.reserve(STORE, 3) == 1  # lanes count separately
        assert store.reserve(STORE, 2) == 8
    finally:
        store.close()


def test_hostile_till_does_not_break_the_tap(tmp_path: Path, keyring: Keyring) -> None:
    async def scenario() -> None:
        printed: list[Printed] = []
        async with rig("native", tmp_path / "counters.db", keyring, printed) as (printer, tap):
            for seed in range(5):
                junk = till.hostile(seed)
                await till.send_job("127.0.0.1", tap.port, junk, rnd=random.Random(seed))
                # a truncated/garbage stream is forwarded whole (no cut, nothing injected)
                jobs = await printer.wait_jobs(seed + 1)
                assert jobs[-1] == junk
            # and the tap still works for a normal receipt
            await till.send_job("127.0.0.1", tap.port, till.receipt())
            jobs = await printer.wait_jobs(6)
        assert len(printed) == 1
        assert parse(jobs[-1]).qr == [(PREFIX + printed[0].receipt).encode()]

    run(scenario)


def test_counter_store_refuses_an_unusable_path(tmp_path: Path) -> None:
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(SourceError):
        CounterStore(tmp_path / "dir.db")


def test_injection_needs_minting() -> None:
    with pytest.raises(ValueError):
        ReceiptTap(TapSettings(printer_host="127.0.0.1", inject="native"))


# ---------------------------------------------------------------------- as a Source


def tap_config(printer_port: int, tmp_path: Path, **over: Any) -> ReceiptTapSourceConfig:
    fields: dict[str, Any] = {
        "kind": "receipt_tap",
        "name": "till-2-printer",
        "lane": "till-2",
        "lane_number": 2,
        "listen_host": "127.0.0.1",
        "listen_port": 0,
        "printer_host": "127.0.0.1",
        "printer_port": printer_port,
        "inject": "native",
        "url_prefix": PREFIX,
        "counter_path": tmp_path / "counters.db",
    }
    fields.update(over)
    return ReceiptTapSourceConfig.model_validate(fields)


def test_config_and_registry(tmp_path: Path) -> None:
    assert source_class("receipt_tap") is ReceiptTapSource
    with pytest.raises(ValidationError, match="url_prefix"):
        tap_config(9100, tmp_path, url_prefix="")
    assert tap_config(9100, tmp_path, inject="off", url_prefix="").inject == "off"


def test_source_yields_receipt_printed(tmp_path: Path, keyring: Keyring) -> None:
    async def scenario() -> None:
        ctx = source_context("till-2-printer", keyring)
        async with FakePrinter() as printer:
            source = ReceiptTapSource(tap_config(printer.port, tmp_path), ctx)
            async with pumped(source) as readings:
                while not source.port:
                    await asyncio.sleep(0.005)
                assert ctx.state["state"] == "ok"
                await till.send_job("127.0.0.1", source.port, till.receipt(qr_data=b"OWN"))
                reading = await readings.get()
        assert (reading.type, reading.source, reading.subject) == (
            "receipt.printed",
            "till-2-printer",
            None,
        )
        assert reading.at == 1795000000.0
        assert reading.attrs["lane"] == "till-2"
        token = verify_receipt_token(reading.attrs["receipt"], keyring)
        assert (token.counter, token.issued, token.store) == (1, 1795000000, STORE)
        assert readings.empty()  # the till's own QR is not an event

    run(scenario)


def test_source_without_store_id_cannot_inject(tmp_path: Path, keyring: Keyring) -> None:
    async def scenario() -> None:
        ctx = SourceContext(name="t", keyring=keyring, metrics=Metrics())
        source = ReceiptTapSource(tap_config(9100, tmp_path), ctx)
        with pytest.raises(SourceError, match="store id"):
            await anext(aiter(source.readings()))

    run(scenario)


def test_bench_tap_reports_figures_beside_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    from tests.bench.qr import bench_tap, print_tap, tap_streams

    figures = bench_tap(quick=True, rounds=1)
    for key in ("tap_mb_per_s", "tap_reference_mb_per_s", "tap_inject_mb_per_s"):
        assert figures[key] > 0
    assert figures["tap_ratio"] == pytest.approx(
        figures["tap_mb_per_s"] / figures["tap_reference_mb_per_s"], rel=0.05
    )
    assert set(figures["tap_streams"]) == {"receipts", "raster"}
    # the receipts are realistic: raster logos, the till's own QR codes, one cut each
    jobs = tap_streams(quick=True)["receipts"]
    found = parse(jobs[0])
    assert len(found.qr) == len(found.cuts) == 20
    print_tap(figures)
    out = capsys.readouterr().out
    assert "bare asyncio byte relay" in out and "baud" in out


# ------------------------------------------------------- injection at command boundaries


def strip_injected(sent: bytes, printed: bytes, blocks: list[bytes]) -> None:
    """``printed`` is ``sent`` with ``blocks[k]`` inserted just before its k-th cut."""
    cuts = parse(sent).cuts
    assert len(cuts) == len(blocks)
    rebuilt, last = bytearray(), 0
    for cut, block in zip(cuts, blocks, strict=True):
        rebuilt += sent[last:cut] + block
        last = cut
    rebuilt += sent[last:]
    assert sha(bytes(rebuilt)) == sha(printed)


def injected_blocks(printed: list[Printed]) -> list[bytes]:
    """The bytes the tap writes for each token (native QR, as in drivers.receipt_tap.base)."""
    return [
        b"\n\x1ba\x01" + qr_native((PREFIX + p.receipt).encode(), module_size=4) + b"\n\x1ba\x00"
        for p in printed
    ]


@pytest.mark.parametrize("max_segment", [1, 3, 17, 100_000])
def test_injection_never_lands_inside_a_command(
    tmp_path: Path, keyring: Keyring, max_segment: int
) -> None:
    """The issue's receipt (ESC + n with n = GS before "VAT"), then every reference command:
    one token per cut, each just before its cut, the till's bytes otherwise untouched."""
    vat = b"\x1b@\x1b+\x1dVAT 21% ...... 0.21\n\x1bd\x06\x1dV\x00"
    every = b"\x1b@" + b"".join(REFERENCE[name] + b"VAT\n" for name in sorted(REFERENCE))
    job = vat + every + b"\x1dV\x00"

    async def scenario() -> None:
        printed: list[Printed] = []
        async with rig("native", tmp_path / "counters.db", keyring, printed, mint_burst=100) as (
            printer,
            tap,
        ):
            await till.send_job(
                "127.0.0.1", tap.port, job, rnd=random.Random(max_segment),
                max_segment=max_segment,
            )  # fmt: skip
            (got,) = await printer.wait_jobs(1)
        assert len(printed) == len(parse(job).cuts) == 12
        strip_injected(job, got, injected_blocks(printed))

    run(scenario)


def test_a_second_till_connection_waits_for_the_printer() -> None:
    """A till that connects for its next receipt before the last job is done loses nothing:
    the tap holds it until the printer connection of the previous job is closed."""

    async def scenario() -> None:
        async with rig() as (printer, tap):
            _, first = await asyncio.open_connection("127.0.0.1", tap.port)
            first.write(till.receipt(seed=1))
            await first.drain()
            while printer.active == 0:
                await asyncio.sleep(0.005)
            _, second = await asyncio.open_connection("127.0.0.1", tap.port)
            second.write(till.receipt(seed=2))
            await second.drain()
            for writer in (first, second):
                writer.close()
                await writer.wait_closed()
            jobs = await printer.wait_jobs(2)
        assert jobs == [till.receipt(seed=1), till.receipt(seed=2)]
        assert printer.refused == 0

    run(scenario)


def test_a_cut_after_an_unknown_command_gets_no_token(
    tmp_path: Path, keyring: Keyring, caplog: pytest.LogCaptureFixture
) -> None:
    """After a command outside the reference the parser cannot tell a parameter from a
    command: nothing is injected (counted, logged once) until ESC @ starts a receipt."""
    unsure = b"\x1b@\x1b\x7f\x1dVAT 21%\n\x1dV\x00"  # ESC 0x7F: no such command
    sure = b"\x1b@receipt 2\n\x1dV\x00"

    async def scenario() -> None:
        metrics = Metrics()
        printed: list[Printed] = []
        async with rig("native", tmp_path / "counters.db", keyring, printed, metrics) as (
            printer,
            tap,
        ):
            await till.send_job("127.0.0.1", tap.port, unsure + sure)
            await till.send_job("127.0.0.1", tap.port, unsure)
            got = await printer.wait_jobs(2)
        assert len(printed) == 1
        assert got[1] == unsure
        head = unsure + b"\x1b@receipt 2\n"
        assert got[0].startswith(head) and got[0].endswith(b"\x1dV\x00")
        assert parse(got[0][len(head) :]).qr == [(PREFIX + printed[0].receipt).encode()]
        assert metrics.get("receipt_tap_cuts_unsure_total", source="receipt-tap") == 4
        warnings = [r for r in caplog.records if "outside the printer reference" in r.message]
        assert len(warnings) == 1

    run(scenario)
