"""The real serial card driver reading a real pty that the card reader simulator drives.

Nothing of ours is mocked: pyserial opens the simulator's pty (or its symlink), the
driver decodes, pseudonymises and debounces, and the test reads the Readings, the
counters and the reported states.  Time for debouncing comes from an injected clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import serial

from drivers.serial_cards.source import Debouncer, SerialCardSource
from gateway.app.sources import build_source
from gateway.backoff import Backoff
from gateway.config.sources import SerialCardSourceConfig
from gateway.identity.pseudonyms import Keyring
from gateway.observe.metrics import Metrics
from gateway.ports import Reading, Source, SourceContext
from simulators.devices.card_reader import CardReaderSim, bad_frame, rdm6300_frame, track2
from tests.waiting import until

T0 = 1_795_000_000.0
VECTOR_TAG = "13005D1DA5"
OTHER_TAG = "0102030405"


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


class RecordingContext(SourceContext):
    """The real context, also remembering every state it was told (to assert the order)."""

    def set_state(self, state: str, detail: str = "") -> None:
        self.state.setdefault("history", [])
        history = [*self.state["history"], state]
        super().set_state(state, detail)
        self.state["history"] = history


def make_source(
    keyring: Keyring, device: str | Path, protocol: str = "rdm6300", debounce_s: float = 1.0
) -> tuple[SerialCardSource, SourceContext, Clock]:
    clock = Clock()
    config = SerialCardSourceConfig(
        kind="serial_card",
        name="till-2-card",
        device=Path(device),
        protocol=protocol,  # type: ignore[arg-type]
        lane="till-2",
        debounce_s=debounce_s,
        reopen_min_s=0.05,
        reopen_max_s=0.2,
    )
    ctx = RecordingContext(name="till-2-card", keyring=keyring, metrics=Metrics(), now=clock)
    source = build_source(config, ctx)
    assert isinstance(source, SerialCardSource)
    assert isinstance(source, Source)
    return source, ctx, clock


@asynccontextmanager
async def running(source: SerialCardSource) -> AsyncIterator[asyncio.Queue[Reading]]:
    queue: asyncio.Queue[Reading] = asyncio.Queue()

    async def pump() -> None:
        async for reading in source.readings():
            queue.put_nowait(reading)

    task = asyncio.create_task(pump(), name="card-pump")
    try:
        yield queue
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def next_reading(queue: asyncio.Queue[Reading]) -> Reading:
    return await asyncio.wait_for(queue.get(), 3.0)


def state(ctx: SourceContext) -> str:
    current: str = ctx.state.get("state", "")
    return current


def rejected(ctx: SourceContext) -> dict[str, float]:
    counts = {}
    for name, labels, value in ctx.metrics.counters():
        if name == "readings_rejected_total":
            counts[labels["reason"]] = value
    return counts


def pseudonym(vectors: dict[str, Any], namespace: str, canonical: str) -> str:
    for case in vectors["pseudonyms"]:
        if case["namespace"] == namespace and case["canonical"] == canonical:
            found: str = case["pseudonym"]
            return found
    raise AssertionError("no such vector")


def test_a_tap_becomes_a_reading_with_the_contract_pseudonym(
    keyring: Keyring, vectors: dict[str, Any]
) -> None:
    async def scenario() -> None:
        with CardReaderSim() as sim:
            source, ctx, _ = make_source(keyring, sim.path)
            async with running(source) as queue:
                await until(lambda: state(ctx) == "ok", timeout=3.0)
                sim.write_frame(VECTOR_TAG.lower())
                reading = await next_reading(queue)
        assert reading == Reading(
            type="card.read",
            source="till-2-card",
            at=T0,
            subject=pseudonym(vectors, "rfid", VECTOR_TAG),
            attrs={"lane": "till-2", "reader": "rdm6300"},
        )

    asyncio.run(scenario())


def test_a_held_card_is_one_read_while_it_keeps_repeating(keyring: Keyring) -> None:
    async def scenario() -> None:
        with CardReaderSim() as sim:
            source, ctx, clock = make_source(keyring, sim.path, debounce_s=1.0)
            async with running(source) as queue:
                await until(lambda: state(ctx) == "ok", timeout=3.0)
                sim.write_frame(VECTOR_TAG)
                first = await next_reading(queue)
                for i in range(1, 6):  # held for 3 s, repeating every 0.6 s: the window slides
                    clock.t += 0.6
                    sim.write_frame(VECTOR_TAG)
                    await until(
                        lambda n=i: (
                            ctx.metrics.get("card_repeats_total", source="till-2-card") == n
                        ),
                        timeout=3.0,
                    )
                sim.write_frame(OTHER_TAG)  # another card in the meantime is its own read
                other = await next_reading(queue)
                clock.t += 1.5  # taken away and tapped again
                sim.write_frame(VECTOR_TAG)
                again = await next_reading(queue)
                assert queue.empty()
        assert other.subject not in (first.subject, None)
        assert again.subject == first.subject
        assert again.at == pytest.approx(first.at + 4.5)

    asyncio.run(scenario())


def test_junk_and_bad_frames_are_counted_and_good_frames_behind_them_arrive(
    keyring: Keyring, vectors: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        with CardReaderSim() as sim:
            source, ctx, _ = make_source(keyring, sim.path)
            async with running(source) as queue:
                await until(lambda: state(ctx) == "ok", timeout=3.0)
                sim.write(
                    b"\x00\xffnoise"
                    + bad_frame(VECTOR_TAG, "rdm6300")
                    + rdm6300_frame(VECTOR_TAG)[:6]
                    + rdm6300_frame(VECTOR_TAG)
                    + b"\x03\x03"
                    + rdm6300_frame(OTHER_TAG)
                )
                got = [await next_reading(queue), await next_reading(queue)]
        assert got[0].subject == pseudonym(vectors, "rfid", VECTOR_TAG)
        assert got[1].subject is not None
        assert rejected(ctx) == {"garbage": 2, "bad_checksum": 1, "partial": 1}

    asyncio.run(scenario())
    assert VECTOR_TAG not in caplog.text
    assert OTHER_TAG not in caplog.text


@pytest.mark.parametrize(
    ("protocol", "frame", "namespace", "canonical"),
    [
        ("scanner", b"]C12600 1234 5678 9\r\n", "loyalty", "2600123456789"),
        ("magstripe", track2("0001234567890") + b"\r\n", "loyalty", "0001234567890"),
    ],
)
def test_scanner_and_magstripe_readers(
    keyring: Keyring,
    vectors: dict[str, Any],
    protocol: str,
    frame: bytes,
    namespace: str,
    canonical: str,
) -> None:
    async def scenario() -> None:
        with CardReaderSim() as sim:
            source, ctx, _ = make_source(keyring, sim.path, protocol=protocol)
            async with running(source) as queue:
                await until(lambda: state(ctx) == "ok", timeout=3.0)
                sim.write(bad_frame("4006381333931", protocol) + frame)
                reading = await next_reading(queue)
        assert reading.subject == pseudonym(vectors, namespace, canonical)
        assert reading.attrs == {"lane": "till-2", "reader": protocol}
        reason = "bad_check_digit" if protocol == "scanner" else "bad_format"
        assert rejected(ctx) == {reason: 1}

    asyncio.run(scenario())


def test_an_unterminated_line_is_dropped_when_the_line_goes_idle(
    keyring: Keyring, vectors: dict[str, Any]
) -> None:
    async def scenario() -> None:
        with CardReaderSim() as sim:
            source, ctx, _ = make_source(keyring, sim.path, protocol="scanner")
            async with running(source) as queue:
                await until(lambda: state(ctx) == "ok", timeout=3.0)
                sim.write(b"]C1999")  # the line end was lost
                await until(lambda: rejected(ctx) == {"partial": 1}, timeout=3.0)
                sim.write(b"]C12600123456789\r\n")
                reading = await next_reading(queue)
        assert reading.subject == pseudonym(vectors, "loyalty", "2600123456789")

    asyncio.run(scenario())


def test_unplug_and_replug_through_the_symlink_is_survived(
    keyring: Keyring, vectors: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    link = tmp_path / "touchpoint-card0"

    async def scenario() -> None:
        with CardReaderSim(link=link) as sim:
            source, ctx, clock = make_source(keyring, link)
            async with running(source) as queue:
                await until(lambda: state(ctx) == "ok", timeout=3.0)
                sim.write_frame(VECTOR_TAG)
                before = await next_reading(queue)
                sim.write(rdm6300_frame(OTHER_TAG)[:5])  # a frame cut off by the unplug
                await asyncio.sleep(0.05)
                sim.unplug()
                await until(lambda: state(ctx) == "absent", timeout=3.0)
                assert not link.exists()
                await asyncio.sleep(0.4)  # several reopen attempts fail meanwhile
                assert state(ctx) in ("absent", "connecting")
                sim.open()
                await until(lambda: state(ctx) == "ok", timeout=3.0)
                clock.t += 5
                sim.write_frame(VECTOR_TAG)
                after = await next_reading(queue)
        assert before.subject == after.subject == pseudonym(vectors, "rfid", VECTOR_TAG)
        history = ctx.state["history"]
        changes = [s for i, s in enumerate(history) if i == 0 or history[i - 1] != s]
        assert changes == ["connecting", "ok", "absent", "ok"]
        assert ctx.metrics.sources["till-2-card"]["state"] == "ok"
        assert rejected(ctx) == {"partial": 1}

    asyncio.run(scenario())
    assert VECTOR_TAG not in caplog.text
    assert VECTOR_TAG.lower() not in caplog.text
    assert "lost" in caplog.text


def test_a_device_absent_at_start_is_waited_for(keyring: Keyring, tmp_path: Path) -> None:
    link = tmp_path / "card0"

    async def scenario() -> None:
        source, ctx, _ = make_source(keyring, link)
        async with running(source) as queue:
            await until(lambda: state(ctx) == "absent", timeout=3.0)
            assert "No such file" in ctx.state["detail"]
            with CardReaderSim(link=link) as sim:
                await until(lambda: state(ctx) == "ok", timeout=3.0)
                sim.write_frame(VECTOR_TAG)
                await next_reading(queue)

    asyncio.run(scenario())


def test_the_port_is_released_when_the_source_is_cancelled(keyring: Keyring) -> None:
    async def scenario() -> None:
        with CardReaderSim() as sim:
            source, ctx, _ = make_source(keyring, sim.path)
            async with running(source):
                await until(lambda: state(ctx) == "ok", timeout=3.0)
                with pytest.raises(serial.SerialException):
                    serial.Serial(sim.path, timeout=0, exclusive=True)
            port = serial.Serial(sim.path, timeout=0, exclusive=True)
            port.close()

    asyncio.run(scenario())


def test_debounce_memory_is_bounded() -> None:
    deb = Debouncer(window_s=1.0, max_entries=50)
    for i in range(1000):
        assert deb.is_new(f"card-{i % 200}", T0 + i * 0.01)
        assert len(deb) <= 50
    deb = Debouncer(window_s=1.0)
    for i in range(1000):
        deb.is_new(f"card-{i}", T0 + i * 0.1)
    assert len(deb) <= 11  # only the last second's cards are remembered
    assert not deb.is_new("card-999", T0 + 99.95)
    assert Debouncer(window_s=0).is_new("x", T0)


def test_backoff_grows_with_jitter_between_the_bounds() -> None:
    backoff = Backoff(0.5, 30.0)
    delays = [backoff.next() for _ in range(12)]
    assert all(0.25 <= d <= 30.0 for d in delays)
    assert delays[0] <= 0.5
    assert all(d >= 15.0 for d in delays[-3:]), "at the cap, no wait is under half of it"
    backoff.reset()
    assert backoff.next() <= 0.5


def test_backoff_is_jittered_from_the_first_retry() -> None:
    """A fleet that lost its broker at once does not come back in step, not even once."""
    firsts = {Backoff(1.0, 60.0).next() for _ in range(50)}
    assert len(firsts) > 40 and all(0.5 <= d <= 1.0 for d in firsts)
    with pytest.raises(ValueError, match="positive"):
        Backoff(0, 1)
