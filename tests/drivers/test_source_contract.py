"""One contract suite for the Source port, run over every implementation: each real driver on
its simulator (serial cards on a pty, BLE through the real bleak against the fake BlueZ on a
private D-Bus, the camera on the MJPEG simulator, the receipt tap between the fake till and
printer on loopback TCP and on two pty pairs) and the in-process synthetic source, each built
as the daemon builds it (``gateway.app.sources.build_source`` from its config model).

What the daemon relies on, and nothing else: the port is the only way in (``Source``, and the
optional ``Forgets`` and ``ReportsMemory`` through isinstance).  A rig per implementation
says how its simulator shows an identity and loses the device; every assertion names it.

Device loss: a source may raise SourceError (the supervisor restarts it) or report the loss
in its context's state (``absent``/``error``) and retry by itself, as every driver here
does; anything else it raises, or silence, breaks the contract.  The core's unit tests have
no in-process fake Source of their own (tests/fakes.py holds only the Publisher's); the
synthetic source is the in-process one.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import re
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from bleak.backends.bluezdbus.manager import get_global_bluez_manager
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from drivers.synthetic import card_number
from gateway.app.sources import build_source
from gateway.config.sources import (
    BleSourceConfig,
    CameraSourceConfig,
    ReceiptTapSourceConfig,
    SerialCardSourceConfig,
    SyntheticSourceConfig,
)
from gateway.errors import SourceError
from gateway.identity.pseudonyms import Keyring
from gateway.observe.metrics import Metrics
from gateway.ports import EVENT_TYPES, Forgets, Reading, ReportsMemory, Source, SourceContext
from simulators.devices import till
from simulators.devices.ble_scenario import encode_eddystone_uid
from simulators.devices.camera import Look, public_key_b64, sign_app_token
from simulators.devices.printer import FakePrinter, SerialPrinter
from simulators.devices.serial_pty import SerialEnd
from tests.waiting import until

pytestmark = pytest.mark.slow

CONTRACT = Path(__file__).resolve().parents[2] / "gateway" / "contract"
PSEUDONYM = re.compile(
    json.loads((CONTRACT / "schemas" / "event.json").read_text(encoding="utf-8"))["$defs"][
        "pseudonym"
    ]["pattern"]
)
STORE = "nl-ams-001"
READING_S = 10.0  # a first reading, a state change: generous for a loaded 2-core box
CANCEL_S = 3.0  # cancelling readings() ends it within this
SETTLE_S = 0.6  # no reading comes within this: the debounce held
LEAK_GRACE_S = 3.0  # threads and fds of the source are gone within this after it ends


class Rig:
    """How one implementation is configured, shown an identity and made to lose its device."""

    impl = ""  # the implementation's name in every failing assertion
    raw: tuple[str, ...] = ()  # what the simulator sent that identifies someone
    fixtures: tuple[str, ...] = ()
    loses_device = True
    has_subject = True  # its readings carry a subject (receipt.printed has none)
    forgets_a_new_sighting = False  # forgettable() shows something not shown before

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path, keyring: Keyring) -> None:
        self.sims = {name: request.getfixturevalue(name) for name in self.fixtures}
        self.tmp_path = tmp_path
        self.keyring = keyring

    async def start(self) -> None:
        """Start what the rig runs on the test's loop (fixtures run on threads of their own)."""

    async def stop(self) -> None:
        """Stop what ``start`` started."""

    def config(self) -> Any:
        raise NotImplementedError

    async def present(self, source: Source) -> None:
        """The simulator shows the identity (again); readings() may then yield one."""

    async def forgettable(self, source: Source) -> None:
        """Shows what ``Forgets`` is about (the identity, unless the driver says otherwise)."""
        await self.present(source)

    def forget_key(self, reading: Reading) -> str:
        assert reading.subject is not None
        return reading.subject

    async def lose(self, source: Source) -> None:
        """The device goes away."""


# ------------------------------------------------------------------------------ serial


class SerialRig(Rig):
    impl = "serial_card"
    fixtures = ("card_reader",)
    TAG = "13005D1DA5"
    raw = (TAG, str(int(TAG[2:], 16)))  # the tag, and the number printed on the card

    def config(self) -> SerialCardSourceConfig:
        return SerialCardSourceConfig(
            kind="serial_card",
            name="till-2-card",
            device=Path(self.sims["card_reader"].path),
            protocol="rdm6300",
            lane="till-2",
            debounce_s=30.0,
            reopen_min_s=0.05,
            reopen_max_s=0.2,
        )

    async def present(self, source: Source) -> None:
        self.sims["card_reader"].write_frame(self.TAG)

    async def lose(self, source: Source) -> None:
        self.sims["card_reader"].unplug()


# ------------------------------------------------------------------------------ BLE


class BleRig(Rig):
    impl = "ble"
    fixtures = ("fake_bluez",)
    NAMESPACE, INSTANCE = "e157bd5df90aad1dc2fb", "000000000001"
    ADDRESS = "C4:00:00:00:00:0B"
    raw = (NAMESPACE, INSTANCE, NAMESPACE + INSTANCE, ADDRESS)

    async def start(self) -> None:
        """bleak keeps one D-Bus connection per event loop, shared by every scanner on it
        (its global BlueZ manager): opened here, as the daemon's first scan opens it once,
        so it is not taken for something a source left open."""

        await get_global_bluez_manager()

    def config(self) -> BleSourceConfig:
        return BleSourceConfig(
            kind="ble",
            name="entrance-ble",
            zone="entrance",
            allow_eddystone_namespaces=(self.NAMESPACE,),
            enter_rssi=-70,
            exit_rssi=-80,
            smoothing_window_s=0.5,
            smoothing_samples=5,
            min_samples=3,
            silence_s=30.0,
            min_dwell_s=0.5,
            watchdog_s=5.0,
            retry_min_s=0.1,
            retry_max_s=0.4,
        )

    async def present(self, source: Source) -> None:
        manufacturer, service = encode_eddystone_uid(self.NAMESPACE, self.INSTANCE, -8)
        bluez = self.sims["fake_bluez"]
        for i in range(15):  # 0.6 s of adverts, more than min_samples in the window

            def one(fake: Any, i: int = i) -> None:
                fake.advert("hci0", self.ADDRESS, rssi=-62 + i % 3 - 1,
                            manufacturer_data=manufacturer, service_data=service)  # fmt: skip

            await asyncio.to_thread(bluez.call, one)
            await asyncio.sleep(0.04)

    async def lose(self, source: Source) -> None:
        await asyncio.to_thread(self.sims["fake_bluez"].call, lambda f: f.remove_adapter("hci0"))


# ------------------------------------------------------------------------------ camera


class CameraRig(Rig):
    impl = "camera"
    fixtures = ("camera",)
    SUB = "shopper-42"
    forgets_a_new_sighting = True
    OTHER = b"https://example.com/promo/spring"

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path, keyring: Keyring) -> None:
        super().__init__(request, tmp_path, keyring)
        self.key = Ed25519PrivateKey.generate()
        now = int(time.time())
        self.token = sign_app_token(self.key, self.SUB, now, now + 300, "n-1", ["analytics"])
        self.raw = (self.SUB, self.token, self.token.split(".")[1])

    def config(self) -> CameraSourceConfig:
        return CameraSourceConfig(
            kind="camera",
            name="kiosk-cam",
            url=self.sims["camera"].url,
            zone="kiosk",
            decode_fps=20,
            app_public_key=public_key_b64(self.key),
            debounce_s=1.0,
            reopen_min_s=0.1,
            reopen_max_s=0.3,
            read_timeout_s=1.0,
            open_timeout_s=2.0,
        )

    async def present(self, source: Source) -> None:
        self.sims["camera"].show(self.token.encode("ascii"), Look(module_px=4))

    async def forgettable(self, source: Source) -> None:
        """The camera's forget empties its debounce table (keyed by payload digests, not by
        subject), so a code still in view is a new scan; an app token shown again is then
        refused by the replay set, on purpose, so the code kept in view is a plain one."""

        self.sims["camera"].show(self.OTHER, Look(module_px=4))

    def forget_key(self, reading: Reading) -> str:
        return self.keyring.pseudonym("app", self.SUB)

    async def lose(self, source: Source) -> None:
        self.sims["camera"].outage(30.0)


# ------------------------------------------------------------------------------ receipt tap


class ReceiptTapRig(Rig):
    """The till prints through the tap to the fake printer, both on the test's loop (a lost
    printer is one this rig stops, so it runs its own rather than the fixture's)."""

    impl = "receipt_tap-tcp"
    LOYALTY = "2600000000042"  # a loyalty number printed on the receipt: never in a reading
    raw = (LOYALTY,)
    has_subject = False

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path, keyring: Keyring) -> None:
        super().__init__(request, tmp_path, keyring)
        self.printer = FakePrinter()
        self.printer_port = 0

    async def start(self) -> None:
        self.printer_port = await self.printer.start()

    async def stop(self) -> None:
        await self.printer.close()

    def config(self) -> ReceiptTapSourceConfig:
        return ReceiptTapSourceConfig.model_validate({
            "kind": "receipt_tap",
            "name": "till-2-printer",
            "lane": "till-2",
            "lane_number": 2,
            "listen_port": 0,
            "printer_host": "127.0.0.1",
            "printer_port": self.printer_port,
            "inject": "native",
            "url_prefix": "HTTPS://R.EXAMPLE.COM/R/",
            "counter_path": self.tmp_path / "counters.db",
            "connect_timeout_s": 1.0,
        })  # fmt: skip

    async def present(self, source: Source) -> None:
        port: int = getattr(source, "port", 0)
        async with asyncio.timeout(READING_S):
            while not port:
                await asyncio.sleep(0.01)
                port = getattr(source, "port", 0)
        job = till.receipt(("SHOP", f"LOYALTY {self.LOYALTY}", "TOTAL 2.50"))
        with contextlib.suppress(OSError):  # a lost printer: the tap closes the till's link
            await till.send_job("127.0.0.1", port, job)

    async def lose(self, source: Source) -> None:
        await self.printer.close()
        await self.present(source)  # the next job finds the printer gone


class SerialReceiptTapRig(Rig):
    """The tap on two serial lines (pty pairs): the fake till on one, the fake printer on the
    other, opened through links as udev links are on a box; a lost printer is unplugged."""

    impl = "receipt_tap-serial"
    LOYALTY = ReceiptTapRig.LOYALTY
    raw = (LOYALTY,)
    has_subject = False

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path, keyring: Keyring) -> None:
        super().__init__(request, tmp_path, keyring)
        self.stack = contextlib.AsyncExitStack()

    async def start(self) -> None:
        self.till = self.stack.enter_context(SerialEnd.pty(self.tmp_path / "till"))
        printer_end = self.stack.enter_context(SerialEnd.pty(self.tmp_path / "printer"))
        self.printer = await self.stack.enter_async_context(SerialPrinter(printer_end))

    async def stop(self) -> None:
        await self.stack.aclose()

    def config(self) -> ReceiptTapSourceConfig:
        return ReceiptTapSourceConfig.model_validate({
            "kind": "receipt_tap",
            "name": "till-3-printer",
            "lane": "till-3",
            "lane_number": 3,
            "transport": "serial",
            "till_device": self.tmp_path / "till",
            "printer_device": self.tmp_path / "printer",
            "baudrate": 115200,
            "inject": "native",
            "url_prefix": "HTTPS://R.EXAMPLE.COM/R/",
            "counter_path": self.tmp_path / "counters.db",
            "reopen_min_s": 0.02,
            "reopen_max_s": 0.1,
        })  # fmt: skip

    async def present(self, source: Source) -> None:
        job = till.receipt(("SHOP", f"LOYALTY {self.LOYALTY}", "TOTAL 2.50"))
        await till.send_serial_job(self.till, job)

    async def lose(self, source: Source) -> None:
        self.printer.end.unplug()


# ------------------------------------------------------------------------------ synthetic


class SyntheticRig(Rig):
    impl = "synthetic"
    loses_device = False  # no device to lose

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path, keyring: Keyring) -> None:
        super().__init__(request, tmp_path, keyring)
        self.raw = tuple(card_number(i) for i in range(3))

    def config(self) -> SyntheticSourceConfig:
        return SyntheticSourceConfig(kind="synthetic", name="bench-synthetic", rate_per_s=20,
                                     cards=3)  # fmt: skip


RIGS: dict[str, type[Rig]] = {
    "serial_card": SerialRig,
    "ble": BleRig,
    "camera": CameraRig,
    "receipt_tap-tcp": ReceiptTapRig,
    "receipt_tap-serial": SerialReceiptTapRig,
    "synthetic": SyntheticRig,
}


# ------------------------------------------------------------------------------ harness


class Pump:
    """``readings()`` in a task, as the daemon's pipeline consumes it."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.readings: list[Reading] = []
        self.task = asyncio.create_task(self._run(), name=f"pump-{source.name}")

    async def _run(self) -> None:
        async for reading in self.source.readings():
            self.readings.append(reading)

    async def next(self, after: int, what: str, impl: str) -> Reading:
        """The first reading after index ``after``."""
        try:
            await until(lambda: len(self.readings) > after or self.task.done(), READING_S)
        except TimeoutError:
            pytest.fail(f"{impl}: no reading within {READING_S} s of {what}")
        if self.task.done():
            pytest.fail(f"{impl}: readings() ended after {what}: {self.ended()!r}")
        return self.readings[after]

    def ended(self) -> BaseException | None:
        return None if self.task.cancelled() else self.task.exception()

    async def cancel(self, impl: str) -> float:
        """Cancel readings(); how long it took to end."""
        begun = time.monotonic()
        self.task.cancel()
        try:
            async with asyncio.timeout(CANCEL_S):
                with contextlib.suppress(asyncio.CancelledError):
                    await self.task
        except TimeoutError:
            pytest.fail(f"{impl}: readings() still running {CANCEL_S} s after cancel")
        return time.monotonic() - begun


def state(ctx: SourceContext) -> str:
    return str(ctx.state.get("state", ""))


def fds() -> dict[str, str]:
    """This process's open fds, each with what it points at."""
    out = {}
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):  # the listing's own fd, closed by now
            out[fd.name] = str(fd.readlink())
    return out


def check_leftovers(impl: str, threads_before: set[threading.Thread], fds_before: set[Any]) -> None:
    """No thread or fd the source started outlives it (the simulators' own were there before;
    the event loop and its executor end with ``asyncio.run``)."""
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        gc.collect()
        extra = [t.name for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        opened = sorted(set(fds().items()) - fds_before)
        if (not extra and not opened) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not extra, f"{impl}: threads left running after readings() ended: {extra}"
    assert not opened, f"{impl}: fds left open after readings() ended: {opened}"


def build(impl: str, rig: Rig) -> tuple[Source, SourceContext, Any]:
    config = rig.config()
    ctx = SourceContext(name=config.name, keyring=rig.keyring, metrics=Metrics(), store=STORE)
    source = build_source(config, ctx)
    assert isinstance(source, Source), f"{impl}: not a Source"
    assert source.name == config.name, f"{impl}: name {source.name!r} is not {config.name!r}"
    return source, ctx, config


def check_private(impl: str, rig: Rig, reading: Reading, ctx: SourceContext) -> None:
    assert isinstance(reading, Reading), f"{impl}: yielded {type(reading).__name__}"
    assert reading.source == ctx.name, f"{impl}: source {reading.source!r} is not {ctx.name!r}"
    assert reading.type in EVENT_TYPES, f"{impl}: type {reading.type!r}"
    subjects = [reading.subject] + ([reading.evidence.subject] if reading.evidence else [])
    for subject in subjects:
        assert subject is None or PSEUDONYM.fullmatch(subject), (
            f"{impl}: subject {subject!r} is not a pseudonym"
        )
    seen = (repr(reading) + repr(ctx.state)).lower()
    leaked = [raw for raw in rig.raw if raw.lower() in seen]
    assert not leaked, f"{impl}: raw identifiers in a reading or the state: {leaked}"


@pytest.fixture(params=list(RIGS))
def rig(request: pytest.FixtureRequest, tmp_path: Path, keyring: Keyring) -> Rig:
    made = RIGS[request.param](request, tmp_path, keyring)
    assert made.impl == request.param
    return made


def run(impl: str, rig: Rig, body: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """``body`` on a fresh loop, between the rig's start and stop, checked for leftovers."""

    threads_before = set(threading.enumerate())
    fds_before: set[Any] = set()

    async def main() -> None:
        await rig.start()
        fds_before.update(fds().items())
        try:
            await body()
        finally:
            await rig.stop()

    asyncio.run(asyncio.wait_for(main(), 45))
    check_leftovers(impl, threads_before, fds_before)


# ------------------------------------------------------------------------------ the suite


def test_every_source_keeps_the_port_contract(rig: Rig) -> None:
    run(rig.impl, rig, lambda: contract(rig.impl, rig))


async def contract(impl: str, rig: Rig) -> None:
    source, ctx, _ = build(impl, rig)
    pump = Pump(source)
    try:
        await until(lambda: state(ctx) == "ok" or pump.task.done(), READING_S)
    except TimeoutError:
        pytest.fail(f"{impl}: state {ctx.state!r}, not ok, {READING_S} s after start")
    assert state(ctx) == "ok", f"{impl}: ended before ok: {pump.ended()!r}"

    await rig.present(source)
    first = await pump.next(0, "the first sighting", impl)
    check_private(impl, rig, first, ctx)
    if rig.has_subject:
        assert first.subject is not None, f"{impl}: a {first.type} without its subject"

    if isinstance(source, ReportsMemory):
        sizes = source.memory_sizes()
        assert sizes, f"{impl}: memory_sizes() is empty after a reading"
        assert all(isinstance(k, str) and type(v) is int for k, v in sizes.items()), (
            f"{impl}: memory_sizes() is not str -> int: {sizes!r}"
        )
        assert sum(sizes.values()) > 0, f"{impl}: nothing remembered after a reading: {sizes}"

    if isinstance(source, Forgets):
        seen = first
        if rig.forgets_a_new_sighting:
            count = len(pump.readings)
            await rig.forgettable(source)
            seen = await pump.next(count, "the sighting to forget", impl)
        count = len(pump.readings)
        await rig.forgettable(source)  # within the debounce window: nothing new
        await asyncio.sleep(SETTLE_S)
        assert len(pump.readings) == count, (
            f"{impl}: a re-sighting within the window made a reading before forget"
        )
        source.forget(rig.forget_key(seen))
        await rig.forgettable(source)
        again = await pump.next(count, "a re-sighting after forget", impl)
        assert again.subject == seen.subject, f"{impl}: forget then re-sighting: {again!r}"

    for reading in pump.readings:
        check_private(impl, rig, reading, ctx)
    assert not pump.task.done(), f"{impl}: readings() ended by itself: {pump.ended()!r}"
    took = await pump.cancel(impl)
    assert pump.task.cancelled(), f"{impl}: cancel did not end in CancelledError"
    assert took < CANCEL_S, f"{impl}: cancel took {took:.2f} s"


def test_losing_the_device_is_a_source_error_or_a_reported_state(rig: Rig) -> None:
    impl = rig.impl
    if not rig.loses_device:
        pytest.skip(f"{impl} has no device to lose")

    async def body() -> None:
        source, ctx, _ = build(impl, rig)
        pump = Pump(source)
        try:
            await until(lambda: state(ctx) == "ok", READING_S)
        except TimeoutError:
            pytest.fail(f"{impl}: state {ctx.state!r}, not ok, {READING_S} s after start")
        await rig.lose(source)
        try:
            await until(lambda: pump.task.done() or state(ctx) in {"absent", "error"}, READING_S)
        except TimeoutError:
            pytest.fail(f"{impl}: device lost, and {READING_S} s later neither SourceError "
                        f"nor a state saying so (state {ctx.state!r})")  # fmt: skip
        if pump.task.done():
            error = pump.ended()
            assert isinstance(error, SourceError), (
                f"{impl}: losing the device ended readings() with {error!r}, not SourceError"
            )
            return
        await asyncio.sleep(0.3)  # it keeps retrying, quietly
        assert not pump.task.done(), f"{impl}: ended after reporting the loss: {pump.ended()!r}"
        await pump.cancel(impl)

    run(impl, rig, body)
