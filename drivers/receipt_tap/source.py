"""``kind = "receipt_tap"``: the Source that runs a receipt tap on its transport (TCP or a
serial line) and turns each printed receipt into a Reading."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from drivers.receipt_tap.base import Minting, Printed, TapSettings
from drivers.receipt_tap.counter import CounterStore
from drivers.receipt_tap.serial_line import SerialLine, SerialReceiptTap, SerialTapSettings
from drivers.receipt_tap.tcp import ReceiptTap
from gateway.config.sources import ReceiptTapSourceConfig
from gateway.errors import SourceError
from gateway.ports import Reading, SourceContext

log = logging.getLogger(__name__)


class ReceiptTapSource:
    """The tap as a configured Source: yields ``receipt.printed`` for each injected token.

    ``transport = "tcp"`` runs a ``ReceiptTap``, ``"serial"`` a ``SerialReceiptTap``.
    QR codes the till prints itself are only counted (``receipt_tap_qr_seen_total``).
    The store id comes from the SourceContext (``ctx.store``).  ``port`` is the bound
    listening port once a TCP tap runs.
    """

    def __init__(self, config: ReceiptTapSourceConfig, ctx: SourceContext) -> None:
        self.config = config
        self.name = config.name
        self.port = 0
        self._ctx = ctx

    def _settings(self) -> TapSettings:
        c = self.config
        assert c.printer_host is not None  # the config requires it with transport tcp
        return TapSettings(
            printer_host=c.printer_host,
            printer_port=c.printer_port,
            listen_host=c.listen_host,
            listen_port=c.listen_port,
            lane=c.lane,
            lane_number=c.lane_number,
            inject=c.inject,
            url_prefix=c.url_prefix,
            module_size=c.module_size,
            connect_timeout_s=c.connect_timeout_s,
            idle_timeout_s=c.idle_timeout_s,
            till_allow=tuple(c.till_allow),
            mint_rate_per_min=c.mint_rate_per_min,
            mint_burst=c.mint_burst,
        )

    async def readings(self) -> AsyncIterator[Reading]:
        """Run the tap until cancelled."""
        c, ctx = self.config, self._ctx
        counters: CounterStore | None = None
        minting: Minting | None = None
        if c.inject != "off":
            store = ctx.store
            if not store:
                raise SourceError(f"{self.name}: injection needs the store id in SourceContext")
            counters = await asyncio.to_thread(CounterStore, c.counter_path)
            minting = Minting(ctx.keyring, store, counters)
        queue: asyncio.Queue[Printed] = asyncio.Queue()
        tap: ReceiptTap | SerialReceiptTap
        if c.transport == "serial":
            tap = SerialReceiptTap(
                _serial_settings(c), minting, queue.put_nowait, ctx.metrics, self.name,
                ctx.now, ctx.set_state,
            )  # fmt: skip
        else:
            tap = ReceiptTap(
                self._settings(), minting, queue.put_nowait, ctx.metrics, self.name, ctx.now,
                ctx.set_state,
            )  # fmt: skip
        try:
            if isinstance(tap, ReceiptTap):
                self.port = await tap.start()
                ctx.set_state("ok", tap.listening)
            else:
                await tap.start()
            while True:
                printed = await _next_printed(queue, tap)
                attrs = {"lane": printed.lane, "receipt": printed.receipt}
                yield Reading("receipt.printed", self.name, printed.at, None, attrs)
        finally:
            await tap.close()
            if counters is not None:
                counters.close()


async def _next_printed(
    queue: asyncio.Queue[Printed], tap: ReceiptTap | SerialReceiptTap
) -> Printed:
    """The next token printed; a serial tap whose relaying died raises instead."""
    if isinstance(tap, ReceiptTap):
        return await queue.get()
    getter = asyncio.ensure_future(queue.get())
    ended = asyncio.ensure_future(tap.wait())
    try:
        await asyncio.wait({getter, ended}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for fut in (getter, ended):
            if not fut.done():
                fut.cancel()
    if getter.done() and not getter.cancelled():
        return getter.result()
    ended.result()  # the relaying task's exception, if it had one
    raise SourceError(f"{tap.name}: the serial relay stopped")


def _serial_settings(c: ReceiptTapSourceConfig) -> SerialTapSettings:

    assert c.till_device is not None  # the config requires both with transport serial
    assert c.printer_device is not None
    return SerialTapSettings(
        till_device=str(c.till_device),
        printer_device=str(c.printer_device),
        line=SerialLine(c.baudrate, c.bytesize, c.parity, c.stopbits, c.flow_control),
        lane=c.lane,
        lane_number=c.lane_number,
        inject=c.inject,
        url_prefix=c.url_prefix,
        module_size=c.module_size,
        idle_timeout_s=c.idle_timeout_s,
        reopen_min_s=c.reopen_min_s,
        reopen_max_s=c.reopen_max_s,
        mint_rate_per_min=c.mint_rate_per_min,
        mint_burst=c.mint_burst,
    )
