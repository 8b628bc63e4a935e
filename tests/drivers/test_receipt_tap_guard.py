"""The receipt tap is not an open printer: loopback by default, an allow-list of tills,
a bound on the minting rate per lane; refusals counted and shown in /healthz.

Everything runs through the real tap on loopback TCP, with the fake till and printer.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from drivers.receipt_tap.base import Printed
from drivers.receipt_tap.counter import CounterStore
from drivers.receipt_tap.escpos import parse
from drivers.receipt_tap.source import ReceiptTapSource
from gateway.config.sources import ReceiptTapSourceConfig
from gateway.identity.pseudonyms import Keyring
from gateway.observe.health import HealthMonitor
from gateway.observe.metrics import Metrics
from gateway.ports import Reading, SourceContext
from simulators.devices import till
from simulators.devices.printer import FakePrinter
from tests.drivers.test_receipt_tap import PREFIX, STORE, rig, run, tap_config

SOURCE = "receipt-tap"


@dataclass
class Gateway:
    """What the health monitor reads of a gateway: its metrics (the rest idle)."""

    metrics: Metrics
    last_stats: dict[str, Any] = field(default_factory=dict)
    publisher: None = None


def refused(metrics: Metrics, reason: str, source: str = SOURCE) -> float:
    return metrics.get("source_refused_total", source=source, reason=reason)


def test_config_listens_on_loopback_unless_told_and_then_needs_an_allow_list(
    tmp_path: Path,
) -> None:
    fields = {"kind": "receipt_tap", "name": "t", "lane": "l", "lane_number": 1}
    config = ReceiptTapSourceConfig.model_validate(fields | {"printer_host": "192.0.2.50"})
    assert config.listen_host == "127.0.0.1"
    assert config.till_allow == ["127.0.0.0/8", "::1/128"]
    with pytest.raises(ValidationError, match="till_allow"):
        tap_config(9100, tmp_path, listen_host="0.0.0.0")
    with pytest.raises(ValidationError, match="not an IP address or network"):
        tap_config(9100, tmp_path, listen_host="0.0.0.0", till_allow=["till-2.local"])
    with pytest.raises(ValidationError, match="not an IP address of this box"):
        tap_config(9100, tmp_path, listen_host="till-gw.local", till_allow=["192.0.2.21"])
    open_config = tap_config(9100, tmp_path, listen_host="0.0.0.0", till_allow=["192.0.2.21"])
    assert open_config.till_allow == ["192.0.2.21"]
    with pytest.raises(ValidationError, match="mint_rate_per_min"):
        tap_config(9100, tmp_path, mint_rate_per_min=0)


def test_a_till_not_on_the_allow_list_is_refused_before_the_printer(
    tmp_path: Path, keyring: Keyring
) -> None:
    async def scenario() -> None:
        metrics = Metrics()
        printed: list[Printed] = []
        async with rig(
            "native",
            tmp_path / "counters.db",
            keyring,
            printed,
            metrics,
            till_allow=("192.0.2.0/28",),
        ) as (printer, tap):
            job = (till.text("x") + till.cut()) * 50
            with contextlib.suppress(ConnectionError):  # closed at once, never relayed
                await till.send_job("127.0.0.1", tap.port, job, max_segment=64)
            await till_closed(tap.port)
            assert printer.connections == 0
            assert printer.jobs == []
        assert printed == []
        assert refused(metrics, "address") == 2
        assert metrics.get("receipt_tap_jobs_total", source=SOURCE) == 0

    run(scenario)


async def till_closed(port: int) -> None:
    """A connection from a refused address is closed without reading a byte."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await asyncio.wait_for(reader.read(1), 5) == b""
    finally:
        writer.close()
        await writer.wait_closed()


def test_an_allowed_till_prints_as_before(tmp_path: Path, keyring: Keyring) -> None:
    async def scenario() -> None:
        metrics = Metrics()
        printed: list[Printed] = []
        async with rig(
            "native", tmp_path / "counters.db", keyring, printed, metrics, till_allow=("127.0.0.1",)
        ) as (printer, tap):
            await till.send_job("127.0.0.1", tap.port, till.receipt())
            (job,) = await printer.wait_jobs(1)
        assert len(printed) == 1
        assert parse(job).qr[-1] == (PREFIX + printed[0].receipt).encode()
        assert refused(metrics, "address") == 0

    run(scenario)


def test_a_flood_of_cuts_mints_no_more_than_the_lane_bound(
    tmp_path: Path, keyring: Keyring
) -> None:
    """The issue's attack: 2,000 cuts in 6 KB.  A burst of 3 at 1 a minute mints 3."""

    async def scenario() -> None:
        metrics = Metrics()
        printed: list[Printed] = []
        counters = CounterStore(tmp_path / "counters.db")
        flood = till.cut() * 2000
        try:
            async with rig(
                "native", counters, keyring, printed, metrics, mint_rate_per_min=1, mint_burst=3
            ) as (printer, tap):
                await till.send_job("127.0.0.1", tap.port, flood, max_segment=6000)
                (job,) = await printer.wait_jobs(1)
            assert counters.last(STORE, 2) == 3  # no counter value burned beyond the bound
        finally:
            counters.close()
        assert len(printed) == 3
        assert len(parse(job).qr) == 3
        assert len(parse(job).cuts) == 2000  # the till's bytes all went through
        assert refused(metrics, "mint_rate") == 1997
        assert metrics.get("receipt_tokens_printed_total", source=SOURCE) == 3

    run(scenario)


def test_refusals_show_in_healthz_for_the_source(tmp_path: Path, keyring: Keyring) -> None:
    async def scenario() -> None:
        metrics = Metrics()
        ctx = SourceContext(name="till-2-printer", keyring=keyring, metrics=metrics, store=STORE)
        async with FakePrinter() as printer:
            config = tap_config(printer.port, tmp_path, till_allow=["198.51.100.7"], mint_burst=1)
            source = ReceiptTapSource(config, ctx)
            readings: list[Reading] = []

            async def pump() -> None:
                async for reading in source.readings():
                    readings.append(reading)

            task = asyncio.create_task(pump(), name="tap-pump")
            try:
                while not source.port:
                    await asyncio.sleep(0.005)
                await till_closed(source.port)
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
        assert readings == []
        _, doc = HealthMonitor(Gateway(metrics)).report()
        assert doc["sources"]["till-2-printer"]["refused"] == {"address": 1.0}

    run(scenario)


def test_the_tap_binds_loopback_by_default() -> None:
    async def scenario() -> None:
        async with rig() as (_, tap):
            assert tap.settings.listen_host == "127.0.0.1"
            assert tap._server is not None
            (sock,) = tap._server.sockets
            assert sock.family == socket.AF_INET
            assert sock.getsockname()[0] == "127.0.0.1"

    run(scenario)
