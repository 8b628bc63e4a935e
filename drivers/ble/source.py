"""BLE presence source: one long-lived bleak scanner on one BlueZ adapter, one zone.

    BleSource(config, ctx).readings()  ->  Reading(presence.enter / presence.exit)

    bleak callback --queue the advert's fields--> list
    --(tick timer, or at once for a flood)--> resolve (drivers.ble.adverts: parse -->
        allow-list --> pseudonym, memoised) --> count --> PresenceTracker --> Readings
        --> readings() (woken only when there are some)

The callback queues three values per advert and nothing else: the manufacturer-data and
service-data dicts bleak made for it and its RSSI.  Python's cyclic garbage collector does
not track those (dicts of ints, strs and bytes are untracked), so however full the queue
it has nothing of ours to traverse or promote.  Queueing bleak's ``AdvertisementData`` (a
tuple holding a list) instead kept thousands of tracked objects alive between ticks under
a flood, and the collector's passes over them, full collections included, cost about a
third of the pipeline's CPU.  The work itself runs in batches: done per advert inside
bleak's callback, between bleak's own steps, the same look-ups measured several times
slower at a store's paced rate (cold caches).  Both measured on ``bench ble``'s flood.

The scanner is started once and left running (never duty-cycled): active scanning with
BlueZ's duplicate filter off so RSSI updates keep coming, or passive scanning with
or-patterns for the three beacon formats.  Passive needs BlueZ >= 5.56 started with
--experimental (firmware-config/bluez/): before each scanner start the adapter is asked
for its AdvertisementMonitorManager1; without one the source **falls back to active
scanning** (presence keeps working), says why in a warning and in its status detail
(``scanning hci0 (active, as BlueZ offers no AdvertisementMonitorManager1 ...)``), sets
``ble_passive_unavailable`` and scans passively again once BlueZ offers it.

Clocks: presence windows, silence, dwell and the watchdog run on ``time.monotonic()``;
events carry the context's wall clock (``ctx.now``) as ``at``.  A wall-clock step (NTP
fixing a Pi that booted without an RTC) neither ends nor freezes a presence.

Recovery ladder (after Home Assistant's habluetooth), run by one named task:

    adapter absent / powered off / BlueZ not on the bus -> state "absent", retry w/ backoff
    StartDiscovery fails InProgress or Failed -> stop our scanner (StopDiscovery), retry;
                                                 twice in a row -> power-cycle the adapter
    StartDiscovery fails NotReady            -> power-cycle the adapter (if it is powered)
    no advert for watchdog_s                 -> stop and restart the scanner
    still none for another watchdog_s        -> power-cycle the adapter, then restart
    bluetoothd hung (no reply in 5 s to our  -> state "error" ("bluetoothd is not
    calls, or 10 s to StartDiscovery)            answering"), retry with backoff

The watchdog only fires after ``watchdog_s`` without a single advert: the callback counts
adverts, a check every ``min(1 s, watchdog_s / 4)`` notes when the count last moved, so
sparse adverts (gaps shorter than ``watchdog_s``) never restart the scanner.

Library errors are mapped here, once, by D-Bus error name (never by message text).
Nothing here logs a beacon id or a MAC address: adverts are reduced to a pseudonym
before they reach any state, and the device address is never read.

Real hardware: ``TOUCHPOINT_REAL_BLE=hci0 pytest tests/drivers/test_ble_real.py`` scans
the real adapter for a few seconds through this source (skipped without the variable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from bleak import BleakScanner
from bleak.args.bluez import OrPattern, OrPatternLike
from bleak.assigned_numbers import AdvertisementDataType
from bleak.exc import BleakDBusError, BleakError
from dbus_fast import BusType, Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from drivers.ble.adverts import OURS, AdvertResolver, AllowList
from drivers.ble.presence import Decision, PresenceParams, PresenceTracker, PseudonymCache
from gateway.backoff import Backoff
from gateway.observe.metrics import Cell
from gateway.ports import Reading, SourceContext

if TYPE_CHECKING:
    from bleak.backends.device import BLEDevice
    from bleak.backends.scanner import AdvertisementData

    from gateway.config.sources import BleSourceConfig

log = logging.getLogger(__name__)

_BLUEZ = "org.bluez"
_ADAPTER = "org.bluez.Adapter1"
_MONITOR_MANAGER = "org.bluez.AdvertisementMonitorManager1"
_NO_PASSIVE = (
    "BlueZ offers no AdvertisementMonitorManager1 on {adapter}: passive scanning needs "
    "BlueZ >= 5.56 started with --experimental (firmware-config/bluez/)"
)
_PROPS = "org.freedesktop.DBus.Properties"
_NO_BLUEZ = {
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
}
# StartDiscovery errors -> what the ladder does about them
_RECOVERY = {
    "org.bluez.Error.InProgress": "retry",
    "org.bluez.Error.Failed": "retry",
    "org.bluez.Error.NotReady": "reset",
}
_STOP_TIMEOUT_S = 5.0
_START_TIMEOUT_S = 10.0
_CALL_TIMEOUT_S = 5.0  # our own Get/Set/GetAll calls to BlueZ
# Adverts are handled in batches by one repeating timer (every _TICK_S, or a quarter of
# the shortest presence timing if that is shorter), not by a wake-up per D-Bus read or
# per batch: presence works in seconds, so 0.25 s of latency costs nothing, while at
# store rates of a few hundred adverts/s every extra wake-up of the loop costs more CPU
# than the adverts' handling.  A flood (_BATCH_N waiting) is handled at once.
_TICK_S = 0.25
_BATCH_N = 256
_MALFORMED = frozenset(
    {"ibeacon_malformed", "altbeacon_malformed", "eddystone_malformed", "ad_malformed"}
)
PASSIVE_PATTERNS: list[OrPatternLike] = [
    OrPattern(0, AdvertisementDataType.MANUFACTURER_SPECIFIC_DATA, b"\x4c\x00\x02\x15"),
    OrPattern(0, AdvertisementDataType.SERVICE_DATA_UUID16, b"\xaa\xfe"),
    OrPattern(2, AdvertisementDataType.MANUFACTURER_SPECIFIC_DATA, b"\xbe\xac"),
]


class AdapterControl:
    """Our own small D-Bus connection to BlueZ: adapter presence and power-cycling."""

    def __init__(self, adapter: str, power_cycle_pause_s: float = 0.5) -> None:
        self.path = f"/org/bluez/{adapter}"
        self.pause_s = power_cycle_pause_s
        self._bus: MessageBus | None = None

    async def _call(self, member: str, signature: str, body: list[Any]) -> Message:
        """One call to BlueZ; ``TimeoutError`` when bluetoothd does not answer in time
        (hung, or stopped): the connection is then dropped, so a late reply is not
        taken for the answer to a later call."""
        try:
            async with asyncio.timeout(_CALL_TIMEOUT_S):
                if self._bus is None or not self._bus.connected:
                    self.close()
                    self._bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
                return await self._bus.call(Message(destination=_BLUEZ, path=self.path,
                    interface=_PROPS, member=member, signature=signature, body=body))  # fmt: skip
        except TimeoutError:
            self.close()
            raise

    async def state(self) -> tuple[str, str]:
        """(``ok`` | ``absent`` | ``error``, detail) for the adapter, never raising."""
        try:
            reply = await self._call("Get", "ss", [_ADAPTER, "Powered"])
        except (OSError, EOFError) as exc:  # no system bus at all
            self.close()
            return "absent", f"system D-Bus unavailable ({exc.__class__.__name__})"
        except TimeoutError:
            return "error", f"bluetoothd is not answering (no reply in {_CALL_TIMEOUT_S:.0f} s)"
        if reply.message_type == MessageType.ERROR:
            if reply.error_name in _NO_BLUEZ:
                return "absent", "bluetoothd is not running"
            return "absent", "adapter not present"
        if not reply.body[0].value:
            return "absent", "adapter powered off"
        return "ok", ""

    async def passive_support(self) -> str:
        """Why the adapter cannot scan passively with or-patterns; "" when it can."""
        try:
            reply = await self._call("GetAll", "s", [_MONITOR_MANAGER])
        except (OSError, EOFError) as exc:
            self.close()
            return f"system D-Bus unavailable ({exc.__class__.__name__})"
        except TimeoutError:
            return "bluetoothd is not answering"
        adapter = self.path.rsplit("/", 1)[-1]
        if reply.message_type == MessageType.ERROR:
            return _NO_PASSIVE.format(adapter=adapter)
        types = reply.body[0].get("SupportedMonitorTypes")
        if types is None or "or_patterns" not in types.value:
            return f"BlueZ's AdvertisementMonitorManager1 on {adapter} lacks or_patterns"
        return ""

    async def power_cycle(self) -> bool:
        """Power the adapter off and on again; True if both steps were accepted."""
        ok = True
        for powered in (False, True):
            try:
                reply = await self._call("Set", "ssv", [_ADAPTER, "Powered", Variant("b", powered)])
            except (OSError, EOFError, TimeoutError):
                return False
            ok = ok and reply.message_type == MessageType.METHOD_RETURN
            if not powered:
                await asyncio.sleep(self.pause_s)
        return ok

    def close(self) -> None:
        if self._bus is not None:
            self._bus.disconnect()
            self._bus = None


class BleSource:
    """A configured BLE adapter; ``readings`` yields presence events until cancelled."""

    def __init__(self, config: BleSourceConfig, ctx: SourceContext) -> None:
        self.name = ctx.name
        self.config = config
        self.ctx = ctx
        self.allow = AllowList.build(config.allow_ibeacon_uuids,
            config.allow_eddystone_namespaces, config.allow_altbeacon_prefixes)  # fmt: skip
        self.tracker = PresenceTracker(PresenceParams(
            enter_rssi=config.enter_rssi, exit_rssi=config.exit_rssi,
            silence_s=config.silence_s, min_dwell_s=config.min_dwell_s,
            window_s=config.smoothing_window_s, window_samples=config.smoothing_samples,
            min_samples=config.min_samples, max_tracks=config.max_tracked_subjects,
        ))  # fmt: skip
        self.pseudonyms = PseudonymCache(ctx.keyring.pseudonym_of_canonical,
                                         config.pseudonym_cache_size)  # fmt: skip
        self.resolver = AdvertResolver(self.allow, self.pseudonyms.get,
                                       config.pseudonym_cache_size)  # fmt: skip
        self._counted: dict[str, Cell] = {}  # result -> its ble_adverts_total cell
        self._ours = self.ctx.metrics.counter("ble_adverts_total", source=self.name, result=OURS)
        self._counted[OURS] = self._ours
        self._dropped = self.ctx.metrics.counter("ble_adverts_dropped_total", source=self.name)
        self.control = AdapterControl(config.adapter)
        self.monotonic = time.monotonic  # presence windows and the watchdog: never stepped
        # the callback's queue: manufacturer data, service data, rssi, ... (3 per advert)
        self._queue: list[Any] = []
        self._out: deque[Reading] = deque()  # readings waiting for readings() to yield
        self._failure: BaseException | None = None  # a bug in the batch handler
        self._waiter: asyncio.Future[None] | None = None  # set while readings() waits
        self._ticker: asyncio.TimerHandle | None = None
        self._hurried = False  # a flood's batch is scheduled ahead of the tick
        self._no_passive = ""  # why passive scanning is unavailable ("" = it is, or unasked)
        self._scanner: BleakScanner | None = None
        self._running = False
        self._last_advert = time.monotonic()  # updated by the watchdog from _heard
        self._heard = 0  # adverts bleak reported (the callback counts; no clock read)
        # a batch waits at most a tick: short next to the shortest presence timing
        shortest = min(config.silence_s, config.smoothing_window_s, config.min_dwell_s or 1e9)
        self._tick_s = max(0.05, min(_TICK_S, shortest / 4))
        self._batch_n = 3 * min(_BATCH_N, config.queue_size)  # 3 queue items per advert
        self._queue_cap = 3 * config.queue_size

    # -- the bleak callback: queue only -----------------------------------------------

    def _on_advert(self, device: BLEDevice, adv: AdvertisementData) -> None:
        self._heard += 1  # for the watchdog: no clock read per advert
        queue = self._queue
        if len(queue) < self._batch_n:
            queue += (adv.manufacturer_data, adv.service_data, adv.rssi)
            return
        if not self._hurried:  # a flood: handle it right after this read, not at the tick
            self._hurried = True
            asyncio.get_running_loop().call_soon(self._on_batch)
        if len(queue) < self._queue_cap:
            queue += (adv.manufacturer_data, adv.service_data, adv.rssi)
        else:
            self._dropped.value += 1

    def _wake(self, *_: object) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _on_batch(self) -> None:
        """A flood's batch, scheduled by the callback to run right after bleak's read."""
        self._hurried = False
        self._handle(tick=False)

    def _on_tick(self) -> None:
        """Repeating timer: the waiting adverts, then expiry of silent tracks."""
        self._ticker = asyncio.get_running_loop().call_later(self._tick_s, self._on_tick)
        self._handle(tick=True)

    def _handle(self, *, tick: bool) -> None:
        """Run the pipeline on the loop (never inside bleak's callback).  readings() is
        only woken when that made a reading: adverts are many, events few."""
        if not self._running or self._failure is not None:
            return
        try:
            self._drain()
            if tick:
                self._emit(self.tracker.tick(now=self.monotonic(), wall=self.ctx.now()))
                self.ctx.metrics.set("ble_tracked_subjects", len(self.tracker), source=self.name)
        except Exception as exc:  # handed to readings(), which raises it
            self._failure = exc
        if self._out or self._failure is not None:
            self._wake()

    # -- the pipeline -----------------------------------------------------------------

    def _drain(self) -> None:
        """Every queued advert through resolve -> count -> presence, dated now.

        One call and two clock reads (monotonic for presence, wall for the events) per
        batch; a batch waited at most one tick (longer only under a backlog, where the
        bus already delayed it as much).
        """
        queue = self._queue
        if not queue:
            return
        resolve, observe = self.resolver.resolve, self.tracker.observe
        counted, zone = self._counted, self.config.zone
        now, wall = self.monotonic(), self.ctx.now()
        ours = 0
        fields = iter(queue)
        try:
            for manufacturer, service, rssi in zip(fields, fields, fields, strict=True):
                result, subject = resolve(manufacturer, service)
                if subject is not None:
                    ours += 1
                    decisions = observe(subject, zone, rssi, now, wall)
                    if decisions:
                        self._emit(decisions)
                    continue
                cell = counted.get(result)
                if cell is None:
                    cell = counted[result] = self.ctx.metrics.counter(
                        "ble_adverts_total", source=self.name, result=result
                    )
                cell.value += 1
                if result in _MALFORMED:
                    self.ctx.reject(result)
        finally:
            queue.clear()
            self._ours.value += ours

    def _emit(self, decisions: Sequence[Decision]) -> None:
        self._out.extend(Reading(type=d.type, source=self.name, at=d.at, subject=d.subject,
                                 attrs=d.attrs) for d in decisions)  # fmt: skip

    def forget(self, subject: str) -> None:
        """An erasure: drop the subject's presence tracks (no exit is sent) and the
        cached payloads and pseudonyms that resolve to it (called by the daemon)."""
        self.tracker.forget(subject)
        self.resolver.forget(subject)
        self.pseudonyms.forget(subject)

    def memory_sizes(self) -> dict[str, int]:
        """Entries in this source's in-memory tables (``Gateway.memory_stats``)."""
        return {"presence_tracks": len(self.tracker), "pseudonym_cache": len(self.pseudonyms),
                "advert_cache": len(self.resolver),
                "advert_queue": len(self._queue) // 3}  # fmt: skip

    async def readings(self) -> AsyncIterator[Reading]:
        """Run the scanner and yield presence readings until cancelled or closed.

        The callback queues each advert's fields; a repeating timer puts every queued
        advert through the pipeline each tick and expires silent tracks (a flood's batch
        of ``_BATCH_N`` goes at once).  Those callbacks wake this loop only when they made a
        reading.  No future or timer per advert or per batch.
        """
        loop = asyncio.get_running_loop()
        self._queue.clear()
        self._out.clear()
        self._failure = None
        self._hurried = False
        self._running = True
        scan = asyncio.create_task(self._scan_loop(), name=f"ble-scan-{self.name}")
        scan.add_done_callback(self._wake)
        self._ticker = loop.call_later(self._tick_s, self._on_tick)
        out = self._out
        try:
            while True:
                if scan.done():
                    scan.result()  # a bug in the ladder ends the source loudly
                if self._failure is not None:
                    raise self._failure  # ...and so does a bug in the pipeline
                if not out:
                    self._waiter = loop.create_future()
                    await self._waiter
                    continue
                while out:
                    yield out.popleft()
        finally:
            self._running = False
            self._waiter = None
            if self._ticker is not None:
                self._ticker.cancel()
            scan.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await scan

    # -- scanner lifecycle and recovery ladder ----------------------------------------

    async def _scan_mode(self) -> str:
        """The mode to start the scanner in: the configured one, or ``active`` when
        ``passive`` is configured but BlueZ cannot do it (said once, in the log and the
        source's status, and checked again at every scanner start)."""
        if self.config.scanning_mode != "passive":
            return "active"
        why = await self.control.passive_support()
        if why != self._no_passive:
            if why:
                log.warning("%s: %s; scanning actively instead", self.name, why)
            else:
                log.info("%s: passive scanning available on %s", self.name, self.config.adapter)
            self._no_passive = why
            self.ctx.metrics.set("ble_passive_unavailable", 1 if why else 0, source=self.name)
        return "active" if why else "passive"

    def _new_scanner(self, mode: str) -> BleakScanner:
        adapter = self.config.adapter
        if mode == "passive":
            return BleakScanner(
                self._on_advert,
                scanning_mode="passive",
                bluez={"adapter": adapter, "or_patterns": PASSIVE_PATTERNS},
            )
        return BleakScanner(
            self._on_advert,
            scanning_mode="active",
            bluez={"adapter": adapter, "filters": {"DuplicateData": False}},
        )

    async def _stop_scanner(self) -> None:
        scanner, self._scanner = self._scanner, None
        if scanner is None:
            return
        try:
            async with asyncio.timeout(_STOP_TIMEOUT_S):  # a hung bluetoothd must not hang us
                await scanner.stop()  # StopDiscovery / UnregisterMonitor on bleak's connection
        except (BleakError, OSError, EOFError, TimeoutError) as exc:
            # the adapter or the bus is already gone: nothing left to stop
            log.debug("%s: stopping the scanner failed: %s", self.name, exc.__class__.__name__)

    async def _start_scanner(self, mode: str) -> str:
        """Start a fresh scanner; returns "" or the recovery action its failure calls for."""
        await self._stop_scanner()
        scanner = self._new_scanner(mode)
        try:
            async with asyncio.timeout(_START_TIMEOUT_S):  # a hung bluetoothd answers nothing
                await scanner.start()
        except TimeoutError:
            log.warning("%s: bluetoothd did not answer StartDiscovery on %s within %.0f s",
                        self.name, self.config.adapter, _START_TIMEOUT_S)  # fmt: skip
            self.ctx.set_state("error", "bluetoothd is not answering (StartDiscovery)")
            with contextlib.suppress(BleakError, OSError, EOFError, TimeoutError):
                async with asyncio.timeout(_STOP_TIMEOUT_S):
                    await scanner.stop()
            return "backoff"
        except BleakDBusError as exc:
            log.warning("%s: starting the scan on %s failed: %s", self.name,
                        self.config.adapter, exc.dbus_error)  # fmt: skip
            self.ctx.metrics.inc("ble_scan_start_errors_total", source=self.name,
                                 error=exc.dbus_error.rsplit(".", 1)[-1])  # fmt: skip
            return _RECOVERY.get(exc.dbus_error, "retry")
        except BleakError as exc:  # adapter vanished between check and start, no passive
            log.warning("%s: starting the scan failed: %s", self.name, exc)
            self.ctx.set_state("error", str(exc))
            return "backoff"
        except (OSError, EOFError) as exc:
            self.ctx.set_state("absent", f"system D-Bus unavailable ({exc.__class__.__name__})")
            return "backoff"
        self._scanner = scanner
        self.ctx.metrics.inc("ble_scanner_starts_total", source=self.name)
        return ""

    async def _watch(self) -> str:
        """Wait while the scan is healthy; returns "absent" or "silent"."""
        check_s = min(1.0, self.config.watchdog_s / 4)
        heard = self._heard
        while True:
            await asyncio.sleep(check_s)
            if self._heard != heard:  # the last advert was heard within this check_s
                heard, self._last_advert = self._heard, self.monotonic()
            state, detail = await self.control.state()
            if state != "ok":
                log.warning("%s: adapter %s lost: %s", self.name, self.config.adapter, detail)
                self.ctx.set_state(state, detail)
                return "absent"
            if self.monotonic() - self._last_advert >= self.config.watchdog_s:
                return "silent"

    async def _scan_loop(self) -> None:
        cfg = self.config
        backoff = Backoff(cfg.retry_min_s, cfg.retry_max_s)
        failures = strikes = 0
        try:
            while True:
                state, detail = await self.control.state()
                if state != "ok":
                    self.tracker.blind(now=self.monotonic())
                    self.ctx.set_state(state, detail)
                    await self._stop_scanner()
                    await asyncio.sleep(backoff.next())
                    continue
                self.ctx.set_state("connecting", f"starting scan on {cfg.adapter}")
                mode = await self._scan_mode()
                action = await self._start_scanner(mode)
                if action:
                    self.tracker.blind(now=self.monotonic())
                    failures += 1
                    if action == "reset" or (action == "retry" and failures >= 2):
                        await self._reset_adapter("starting the scan kept failing")
                        failures = 0
                    await asyncio.sleep(backoff.next())
                    continue
                failures = 0
                backoff.reset()
                started = self._last_advert = self.monotonic()
                self.tracker.resume(now=self.monotonic())
                how = mode if mode == cfg.scanning_mode else f"active, as {self._no_passive}"
                self.ctx.set_state("ok", f"scanning {cfg.adapter} ({how})")
                outcome = await self._watch()
                self.tracker.blind(now=self.monotonic())
                if outcome != "silent":
                    strikes = 0
                    continue
                strikes = 1 if self._last_advert > started else strikes + 1
                if strikes == 1:
                    log.warning("%s: no advert for %.0f s; restarting the scanner",
                                self.name, cfg.watchdog_s)  # fmt: skip
                    self.ctx.metrics.inc("ble_watchdog_total", source=self.name, action="restart")
                else:
                    await self._reset_adapter("still no advert after a scanner restart")
                    strikes = 0
        finally:
            await self._stop_scanner()
            self.control.close()

    async def _reset_adapter(self, why: str) -> None:
        log.warning("%s: power-cycling adapter %s: %s", self.name, self.config.adapter, why)
        self.ctx.metrics.inc("ble_watchdog_total", source=self.name, action="reset")
        self.ctx.set_state("connecting", f"resetting {self.config.adapter}: {why}")
        await self._stop_scanner()
        if not await self.control.power_cycle():
            log.warning("%s: adapter %s refused the power cycle", self.name, self.config.adapter)
