"""``make demo`` (``python -m simulators.rig.demo``): the real daemon against simulated hardware.

It starts the simulated store (``simulators.rig.store``): a mosquitto on a free loopback
port, the fake central service, the card-reader simulator on a pty, the BLE simulator (a
fake BlueZ on a private D-Bus), the kiosk camera (MJPEG over HTTP) and a till printing
receipts through the receipt tap to a fake printer; writes a config for them all, and
runs the same Gateway object ``run`` runs, printing a live summary.

The consent registry comes from the fake central over HTTP: some shoppers have consented,
one never has.  Then the story: the broker goes down for a while (events buffer), a
consented shopper withdraws meanwhile (the poll brings it: their buffered events are
erased), and the broker comes back (the others' events flow, none of the leaver's).
Each step waits for what it needs (``_Story``), not for a second of the clock, so a slow
box tells the same story; ``--seconds N`` lets an unfinished story end first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulators.deps import GATEWAY, missing

try:
    from gateway.app.daemon import Gateway
    from gateway.buffer.erasure_store import ErasureStore
    from gateway.config.loading import load_config
except ModuleNotFoundError as exc:
    raise missing(exc, "the store rig", GATEWAY) from exc

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"
# Shoppers the central's registry has no consent for: their events are dropped.
NOT_CONSENTED = frozenset(
    {("rfid", "0A1B2C3D4E"), ("eddystone", "e157bd5df90aad1dc2fb:000000000001")}
)
LEAVER = ("ibeacon", "83256b74-78d0-43a4-8269-05f9dc8a44ba:16:32")  # consents, then withdraws
# The story is told by events, not the clock (a Pi or an emulated root is many times
# slower): the broker goes down once events flow and the leaver has consent; the leaver
# withdraws once their events are in the buffer; the broker comes back once the
# withdrawal is applied (their buffered events erased).  On a fast box these seconds
# pace it for a watcher: no step comes earlier.
OUTAGE = (12.0, 27.0)  # broker down between these seconds of the demo, at the earliest
WITHDRAW_AT = 18.0  # the iBeacon shopper withdraws, while the broker is down
STORY_PATIENCE_S = 600.0  # --seconds N: past N, the story may take this long to end
AFTER_STORY_S = 7.0  # --seconds N: the buffer drains this long after the story, at least
CENTRAL_CATCH_UP_S = 30.0  # at the end: the central's figures catch up with forwarded


class _Summary:
    def __init__(self, gw: Gateway, stats_path: Path) -> None:
        self.gw = gw
        self.stats_path = stats_path
        self.tty = sys.stdout.isatty()
        self.start = time.monotonic()
        self.last_print = 0.0

    def central(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self.stats_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data

    def line(self) -> str:
        m = self.gw.metrics
        reads = m.by_label("readings_total", "source")
        c = self.central()
        return (
            f"{time.monotonic() - self.start:5.0f}s  cards {reads.get('till-2-card', 0):.0f}  "
            f"presence {reads.get('entrance-ble', 0):.0f}  "
            f"kiosk {reads.get('kiosk-cam', 0):.0f}  "
            f"receipts {reads.get('till-2-printer', 0):.0f}  "
            f"buffered {m.get('events_buffered_total'):.0f}  "
            f"forwarded {m.get('events_forwarded_total'):.0f}  "
            f"dropped(consent) {m.total('events_dropped_total', reason='consent'):.0f}  "
            f"depth {self.gw.last_stats.get('depth', 0)}  "
            f"erased {m.get('erased_events_total'):.0f}  "
            f"rejected {m.total('readings_rejected_total'):.0f}  "
            f"broker {'up' if m.get('mqtt_connected') else 'down'}  "
            f"central accepted {c.get('accepted', 0)}"
        )

    def note(self, text: str) -> None:
        print(("\n" if self.tty else "") + f"demo: {text}", flush=True)

    def show(self, final: bool = False) -> None:
        now = time.monotonic()
        if self.tty and not final:
            sys.stdout.write("\r" + self.line() + "\033[K")
            sys.stdout.flush()
        elif final or now - self.last_print >= 5:
            self.last_print = now
            print(("\n" if self.tty else "") + self.line(), flush=True)


@dataclass
class _Step:
    not_before_s: float  # the pace on a fast box
    happened: Callable[[], Awaitable[bool]]  # what the step waits for
    text: Callable[[], str]
    action: Callable[[], None] | None = None


class _Story:
    """The outage and withdrawal, each step when what it needs has happened."""

    def __init__(self, gw: Gateway, broker: Any, trigger: Path) -> None:
        self.gw = gw
        self.broker = broker
        self.trigger = trigger  # the fake central withdraws the leaver when it exists
        self.leaver = gw.keyring.pseudonym(*LEAVER)
        self.buffered = 0
        self.erasures = 0.0
        self.steps = [
            _Step(OUTAGE[0], self._flowing,
                  lambda: "the broker goes down: events stay in the buffer", broker.stop),
            _Step(WITHDRAW_AT, self._leaver_buffered, self._withdraw_text, self._withdraw),
            _Step(0.0, self._erased, self._erased_text),
            _Step(OUTAGE[1], self._always,
                  lambda: "the broker is back: the buffer drains, none of the leaver's",
                  broker.start),
        ]  # fmt: skip

    async def _flowing(self) -> bool:
        m = self.gw.metrics
        return (
            bool(m.get("mqtt_connected"))
            and m.get("events_forwarded_total") > 0
            and self.leaver in self.gw.consent.records
        )

    async def _leaver_buffered(self) -> bool:
        self.buffered = await ErasureStore(self.gw.outbox).count_events(self.leaver)
        return self.buffered > 0

    def _withdraw_text(self) -> str:
        return (
            f"the iBeacon shopper withdraws consent ({self.buffered} of their events "
            "in the buffer); the poll brings it"
        )

    def _withdraw(self) -> None:
        self.erasures = self.gw.metrics.get("erasures_total")
        self.trigger.touch()

    async def _erased(self) -> bool:
        return (
            self.leaver in self.gw.consent.withdrawn
            and self.gw.metrics.get("erasures_total") > self.erasures
            and await ErasureStore(self.gw.outbox).count_events(self.leaver) == 0
        )

    def _erased_text(self) -> str:
        erased = self.gw.metrics.get("erased_events_total")
        return f"the withdrawal is applied: {erased:.0f} buffered events erased"

    @staticmethod
    async def _always() -> bool:
        return True

    async def advance(self, elapsed: float, summary: _Summary) -> None:
        """Tell the next step if its time has come and what it needs has happened."""
        if self.steps and elapsed >= self.steps[0].not_before_s and await self.steps[0].happened():
            step = self.steps.pop(0)
            summary.note(step.text())
            if step.action is not None:
                await asyncio.to_thread(step.action)


async def _run(
    gw: Gateway, summary: _Summary, seconds: float | None, broker: Any, trigger: Path
) -> None:
    task = asyncio.create_task(gw.run())
    await gw.ready.wait()
    start = time.monotonic()
    story = _Story(gw, broker, trigger)
    ended: float | None = None  # when the story's last step was told
    while not task.done():
        await story.advance(time.monotonic() - start, summary)
        if ended is None and not story.steps:
            ended = time.monotonic()
        summary.show()
        if seconds is not None and _done(start, seconds, ended, summary):
            gw.stop_event.set()
            break
        await asyncio.sleep(0.5)
    await task


def _done(start: float, seconds: float, ended: float | None, summary: _Summary) -> bool:
    """``--seconds`` are up: N seconds and the story told (and the buffer some time to
    drain), or N seconds and STORY_PATIENCE_S more without it."""
    now = time.monotonic()
    if now < start + seconds:
        return False
    if ended is not None:
        return now >= ended + AFTER_STORY_S
    if now >= start + seconds + STORY_PATIENCE_S:
        summary.note(f"stopped before the story ended ({STORY_PATIENCE_S:.0f}s past --seconds)")
        return True
    return False


def run_demo(*, seconds: float | None, workdir: Path | None) -> int:
    from simulators.rig.store import RigLoad, StoreRig

    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="touchpoint-demo-")
        work = Path(tmp.name)
    else:
        work = workdir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    print(f"demo: files in {work} (simulator output in sim-*.log)")
    trigger = work / "withdraw-now"  # the story touches it when the leaver is buffered
    trigger.unlink(missing_ok=True)
    rig = StoreRig(
        work,
        RigLoad(till_interval_s=4.0),
        consent_exclude=NOT_CONSENTED,
        consent_steps=[
            {"at_s": 0, "when_file": str(trigger), "action": "withdraw", "identity": LEAVER,
             "push": True}
        ],
    )  # fmt: skip
    try:
        with rig:
            print(f"demo: mosquitto on 127.0.0.1:{rig.broker.port}")
            print(f"demo: the fake central (consent API on 127.0.0.1:{rig.http_port})")
            print(f"demo: card reader simulator on {rig.card_link}")
            print("demo: fake BlueZ on a private D-Bus, replaying a store walk-through")
            print(f"demo: kiosk camera (MJPEG) on 127.0.0.1:{rig.camera_port}")
            print(
                f"demo: a till printing a receipt every 4 s through the tap on "
                f"127.0.0.1:{rig.tap_port} to a printer on 127.0.0.1:{rig.printer_port}"
            )
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = rig.bus_address
            cfg_path = rig.write_config(extra="\n[status]\nsummary_interval_s = 30\n")
            cfg = load_config(cfg_path)
            gw = Gateway(cfg)
            print(
                f"demo: running the daemon; Ctrl-C stops it "
                f"(status: touchpoint-gateway status --config {cfg_path})\n"
            )
            summary = _Summary(gw, rig.central_stats)
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(_run(gw, summary, seconds, rig.broker, trigger))
            forwarded = gw.metrics.get("events_forwarded_total")
            # the central writes its figures every ~0.5 s (slower on a slow box)
            deadline = time.monotonic() + CENTRAL_CATCH_UP_S
            while summary.central().get("accepted", 0) < forwarded and time.monotonic() < deadline:
                time.sleep(0.2)
            summary.show(final=True)
            decisions = gw.metrics.by_label("consent_decisions_total", "reason")
            print(
                "demo: consent decisions: "
                + ", ".join(f"{k} {v:.0f}" for k, v in sorted(decisions.items()))
            )
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m simulators.rig.demo",
        description="Start a local mosquitto, the fake central service and every simulated "
        "device of a store, and run the real daemon against them, with a live summary. "
        "Ctrl-C stops it.",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="stop after this many seconds (default: until Ctrl-C)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where to keep the demo's files (default: a temporary folder)",
    )
    p.add_argument(
        "--log-level",
        default="warning",
        choices=["debug", "info", "warning", "error"],
        help="daemon log level (default warning)",
    )
    args = p.parse_args(argv)
    from gateway.observe.logs import setup_logging

    setup_logging(args.log_level)
    try:
        return run_demo(seconds=args.seconds, workdir=args.workdir)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
