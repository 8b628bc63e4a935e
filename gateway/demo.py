"""``touchpoint-gateway demo``: the real daemon against simulated hardware.

It starts a mosquitto on a free loopback port, the fake central service, the card-reader
simulator on a pty and the BLE simulator (a fake BlueZ on a private D-Bus), writes a config
for them, and runs the same Gateway object ``run`` runs, printing a live summary.

The consent registry comes from the fake central over HTTP: some shoppers have consented,
one never has.  Then the story: the broker goes down for a while (events buffer), a
consented shopper withdraws meanwhile (the poll brings it: their buffered events are
erased), and the broker comes back (the others' events flow, none of the leaver's).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from gateway.config import load_config
from gateway.daemon import Gateway
from gateway.identity import Keyring

SCENARIOS = Path(__file__).resolve().parent.parent / "simulators" / "scenarios"
CONSENTED_CARDS = ["13005D1DA5", "7F00A1B2C3"]  # 0A1B2C3D4E has not consented
IBEACON = "83256b74-78d0-43a4-8269-05f9dc8a44ba:16:32"  # consents, then withdraws
EDDYSTONE = "e157bd5df90aad1dc2fb:000000000001"  # never consented
TOKEN = "demo-consent-token"  # noqa: S105 - the fake central's demo credential
OUTAGE = (12.0, 27.0)  # broker down between these seconds of the demo
WITHDRAW_AT = 18.0  # the iBeacon shopper withdraws, while the broker is down


def _spawn(
    args: list[str], log: IO[bytes], env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=log, env=env or dict(os.environ)
    )


def _first_line(proc: subprocess.Popen[bytes], what: str, timeout: float = 20) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode().strip()
        if line:
            return line
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
    raise RuntimeError(f"{what} did not start within {timeout}s")


def _config(work: Path, port: int, card_link: Path, http_port: int) -> str:
    return f"""
[gateway]
store = "nl-ams-001"
device = "gw-demo"

[keyring]
active = "k1"
[keyring.keys]
k1 = "k1.key"

[buffer]
path = "buffer.db"

[mqtt]
host = "127.0.0.1"
port = {port}
reconnect_min_s = 0.2
reconnect_max_s = 5

[consent.sync]
base_url = "http://127.0.0.1:{http_port}"
token_file = "consent.token"
poll_interval_s = 2

[status]
summary_interval_s = 30

[[sources]]
kind = "serial_card"
name = "till-2-card"
device = "{card_link}"
protocol = "rdm6300"
lane = "till-2"

[[sources]]
kind = "ble"
name = "entrance-ble"
adapter = "hci0"
zone = "entrance"
allow_ibeacon_uuids = ["83256b74-78d0-43a4-8269-05f9dc8a44ba"]
allow_eddystone_namespaces = ["e157bd5df90aad1dc2fb"]
allow_altbeacon_prefixes = ["2f234454cf6d4a0fadf2f491"]
enter_rssi = -75
exit_rssi = -85
smoothing_window_s = 1.0
min_samples = 3
silence_s = 1.5
min_dwell_s = 1.0
watchdog_s = 20
"""


def _consent_script(work: Path, ring: Keyring) -> Path:
    """The central's consent story: grants at once, one withdrawal later."""
    steps: list[dict[str, Any]] = [
        {
            "at_s": 0,
            "action": "grant",
            "subject": ring.pseudonym("rfid", c),
            "purposes": ["linking"],
        }
        for c in CONSENTED_CARDS
    ]
    leaver = ring.pseudonym("ibeacon", IBEACON)
    steps.append({"at_s": 0, "action": "grant", "subject": leaver, "purposes": ["analytics"]})
    steps.append({"at_s": WITHDRAW_AT, "action": "withdraw", "subject": leaver, "push": True})
    path = work / "consent-script.json"
    path.write_text(json.dumps({"steps": steps}, indent=1), encoding="utf-8")
    (work / "consent.token").write_text(TOKEN + "\n", encoding="utf-8")
    return path


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


async def _run(gw: Gateway, summary: _Summary, seconds: float | None, broker: Any) -> None:
    task = asyncio.create_task(gw.run())
    await gw.ready.wait()
    start = time.monotonic()
    deadline = None if seconds is None else start + seconds
    story: list[tuple[float, str, Callable[[], None] | None]] = [
        (OUTAGE[0], "the broker goes down: events stay in the buffer", broker.stop),
        (WITHDRAW_AT + 1, "the iBeacon shopper withdraws consent; the poll brings it", None),
        (OUTAGE[1], "the broker is back: the buffer drains, none of the leaver's", broker.start),
    ]
    while not task.done():
        if story and time.monotonic() - start >= story[0][0]:
            _, text, action = story.pop(0)
            summary.note(text)
            if action is not None:
                await asyncio.to_thread(action)
        summary.show()
        if deadline is not None and time.monotonic() >= deadline:
            gw.stop_event.set()
            break
        await asyncio.sleep(0.5)
    await task


def run_demo(*, seconds: float | None, workdir: Path | None) -> int:
    from simulators.broker import Mosquitto, free_port

    tmp = None
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="touchpoint-demo-")
        work = Path(tmp.name)
    else:
        work = workdir.resolve()
        work.mkdir(parents=True, exist_ok=True)
    key = work / "k1.key"
    if not key.exists():
        key.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n", encoding="ascii")
    procs: list[subprocess.Popen[bytes]] = []
    sim_log = (work / "simulators.log").open("ab")
    print(f"demo: files in {work} (simulator output in simulators.log)")
    try:
        with Mosquitto(work / "mosquitto", persistence=True) as broker:
            print(f"demo: mosquitto on 127.0.0.1:{broker.port}")
            http_port = free_port()
            central = _spawn(
                [
                    "-m",
                    "simulators.central",
                    "--mqtt-host",
                    "127.0.0.1",
                    "--mqtt-port",
                    str(broker.port),
                    "--out",
                    str(work / "central-events.jsonl"),
                    "--stats",
                    str(work / "central-stats.json"),
                    "--store",
                    "nl-ams-001",
                    "--http-port",
                    str(http_port),
                    "--consent-token-file",
                    str(work / "consent.token"),
                    "--consent-script",
                    str(_consent_script(work, Keyring.from_files({"k1": key}, "k1"))),
                ],
                sim_log,
            )
            procs.append(central)
            print(f"demo: {_first_line(central, 'the fake central')}")
            link = work / "card-reader"
            cards = _spawn(
                [
                    "-m",
                    "simulators.card_reader",
                    str(SCENARIOS / "card-demo.toml"),
                    "--link",
                    str(link),
                ],
                sim_log,
            )
            procs.append(cards)
            print(
                f"demo: card reader simulator on {_first_line(cards, 'the card reader simulator')}"
            )
            ble = _spawn(
                [
                    "-m",
                    "simulators.ble_scenario",
                    str(SCENARIOS / "ble-walkthrough.toml"),
                    "--repeat",
                ],
                sim_log,
            )
            procs.append(ble)
            bus = _first_line(ble, "the BLE simulator")
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus.partition("=")[2]
            print("demo: fake BlueZ on a private D-Bus, replaying a store walk-through")
            (work / "gateway.toml").write_text(
                _config(work, broker.port, link, http_port), encoding="utf-8"
            )
            cfg = load_config(work / "gateway.toml")
            gw = Gateway(cfg)
            print("demo: running the daemon; Ctrl-C stops it\n")
            summary = _Summary(gw, work / "central-stats.json")
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(_run(gw, summary, seconds, broker))
            summary.show(final=True)
            decisions = gw.metrics.by_label("consent_decisions_total", "reason")
            print(
                "demo: consent decisions: "
                + ", ".join(f"{k} {v:.0f}" for k, v in sorted(decisions.items()))
            )
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
            if p.stdout is not None:
                p.stdout.close()
        sim_log.close()
        if tmp is not None:
            tmp.cleanup()
    return 0
