"""Serial loyalty-card readers (RDM6300 RFID, barcode/2D scanners, magstripe) as a Source.

    device ──pyserial──► bytes ──card_frames decoder──► Card ──keyring──► pseudonym
                                        │                                   │
                                  Rejected: ctx.reject(reason)       debounce ──► Reading

Reading without blocking the loop: the port is opened non-blocking
(``timeout=0``) and its fd is watched with ``loop.add_reader``.  The reader callback
only wakes the generator and removes itself; the generator reads what is there and
re-arms.  No thread means nothing to join on shutdown, cancellation is plain asyncio
cancellation, and while the consumer is busy the bytes wait in the kernel's tty buffer
instead of an unbounded queue of ours (and the loop does not spin on a level-triggered
fd nobody drains).

Device loss is handled here, not raised: an open that fails, or a read that fails
(SerialException, OSError: EIO/EOF when a pty master or a USB adapter goes away), ends
the connection; the state goes to ``absent`` and the port is reopened with jittered
exponential backoff between ``reopen_min_s`` and ``reopen_max_s``.  Results decoded from
the last bytes read are delivered before the port is dropped; an incomplete frame cannot
be continued by bytes from a new connection, so it is counted as ``partial``.  An
incomplete frame left idle for ``idle_flush_s`` is dropped the same way, so a lost line
end does not glue two scans together.

Raw card numbers never reach a log line or an exception: they are pseudonymised at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator

import serial

from drivers.serial_cards.frames import Card, Decoder, Rejected, decoder_for
from gateway.backoff import Backoff, device_error
from gateway.config.sources import SerialCardSourceConfig
from gateway.errors import RejectedInput
from gateway.ports import Reading, SourceContext

log = logging.getLogger(__name__)

READ_CHUNK = 4096
DEBOUNCE_MAX_ENTRIES = 4096


class Debouncer:
    """Suppresses a subject seen again within ``window_s`` of its last sighting.

    The window slides while the subject keeps repeating (an RDM6300 sends its frame
    over and over while a card is held).  Expired entries are evicted on every call and
    the table never holds more than ``max_entries``.
    """

    def __init__(self, window_s: float, max_entries: int = DEBOUNCE_MAX_ENTRIES) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self._last: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._last)

    def forget(self, key: str) -> None:
        self._last.pop(key, None)

    def is_new(self, key: str, now: float) -> bool:
        """Record a sighting at ``now``; True if it starts a new read."""
        while self._last:
            oldest_key, oldest = next(iter(self._last.items()))
            if now - oldest < self.window_s and len(self._last) < self.max_entries:
                break
            del self._last[oldest_key]
        last = self._last.pop(key, None)
        self._last[key] = now
        return last is None or not 0 <= now - last < self.window_s


class SerialCardSource:
    """A card reader on a serial port; yields ``card.read`` Readings."""

    def __init__(
        self, config: SerialCardSourceConfig, ctx: SourceContext, *, idle_flush_s: float = 0.5
    ) -> None:
        self.config = config
        self.name = config.name
        self._ctx = ctx
        self._idle_flush_s = idle_flush_s
        self._decoder: Decoder = decoder_for(
            config.protocol, check_bare_ean13=config.check_bare_ean13
        )
        self._debounce = Debouncer(config.debounce_s)
        self._attrs = {"lane": config.lane, "reader": config.protocol}

    def forget(self, subject: str) -> None:
        """An erasure: drop the subject's debounce entry (called by the daemon)."""
        self._debounce.forget(subject)

    def memory_sizes(self) -> dict[str, int]:
        """Entries in this source's in-memory tables (``Gateway.memory_stats``)."""
        return {"debounce": len(self._debounce)}

    async def readings(self) -> AsyncIterator[Reading]:
        """Read cards until cancelled, reopening the device whenever it goes away."""
        backoff = Backoff(self.config.reopen_min_s, self.config.reopen_max_s)
        loop = asyncio.get_running_loop()
        device = str(self.config.device)
        self._report("connecting", device)
        while True:
            try:
                port = serial.Serial(device, self.config.baudrate, timeout=0, exclusive=True)
            except OSError as exc:  # serial.SerialException is an OSError
                self._report("absent", f"cannot open {device}: {device_error(exc)}")
                await asyncio.sleep(backoff.next())
                continue
            opened_at = loop.time()
            self._report("ok", device)
            got_data = False
            try:
                async for reading in self._read_port(port, loop):
                    got_data = True
                    yield reading
            except OSError as exc:
                self._report("absent", f"lost {device}: {device_error(exc)}")
            finally:
                port.close()
            for reading in self._results(self._decoder.flush()):  # counts a cut-off frame
                yield reading
            if got_data or loop.time() - opened_at >= self.config.reopen_max_s:
                backoff.reset()
            await asyncio.sleep(backoff.next())

    def _report(self, state: str, detail: str) -> None:
        """Set the source state and log it, once per change (not on every retry)."""
        if self._ctx.state.get("state") == state and self._ctx.state.get("detail") == detail:
            return
        self._ctx.set_state(state, detail)
        if state == "absent":
            log.warning("%s: %s; retrying with backoff", self.name, detail)
        elif state == "ok":
            log.info("%s: reading %s cards from %s", self.name, self.config.protocol, detail)

    async def _read_port(
        self, port: serial.Serial, loop: asyncio.AbstractEventLoop
    ) -> AsyncIterator[Reading]:
        """Yield readings from an open port until it fails (raises OSError)."""
        fd = port.fileno()
        while True:
            readable = loop.create_future()

            def wake(fut: asyncio.Future[None] = readable) -> None:
                loop.remove_reader(fd)
                if not fut.done():
                    fut.set_result(None)

            loop.add_reader(fd, wake)
            try:
                timeout = self._idle_flush_s if self._decoder.pending else None
                async with asyncio.timeout(timeout):
                    await readable
            except TimeoutError:
                for reading in self._results(self._decoder.flush()):
                    yield reading
                continue
            finally:
                loop.remove_reader(fd)
            data: bytes = port.read(READ_CHUNK)
            for reading in self._results(self._decoder.feed(data)):
                yield reading

    def _results(self, results: list[Card | Rejected]) -> list[Reading]:
        out: list[Reading] = []
        for result in results:
            if isinstance(result, Rejected):
                self._ctx.reject(result.reason)
                continue
            try:
                subject = self._ctx.keyring.pseudonym(result.namespace, result.value)
            except RejectedInput as exc:
                self._ctx.reject(exc.reason)
                continue
            now = self._ctx.now()
            if not self._debounce.is_new(subject, now):
                self._ctx.metrics.inc("card_repeats_total", source=self.name)
                continue
            out.append(
                Reading(
                    type="card.read",
                    source=self.name,
                    at=now,
                    subject=subject,
                    attrs=dict(self._attrs),
                )
            )
        return out
