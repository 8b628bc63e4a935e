"""Declarative BLE scenarios for the fake BlueZ, and the advert encoders they use.

A scenario (TOML, format in simulators/README-ble.md) lists adapters, advertisers with
RSSI curves over time, and timed events (adapter removal, a silent bluetoothd, bursts,
injected D-Bus errors).  ``build_timeline`` turns it into a sorted list of steps
(pure, seeded); ``play`` replays the steps against a running ``FakeBlueZ`` in real time.

The encoders are written from the beacon specifications, independently of
drivers/ble/adverts.py, so each implementation checks the other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import random
import signal
import struct
import time
import tomllib
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from simulators.devices.fake_bluez import DBusDaemon, FakeBlueZ

EDDYSTONE_SERVICE = "0000feaa-0000-1000-8000-00805f9b34fb"
SENSITIVITY_DBM = -100.0  # below this an advert is not heard
KINDS = (
    "ibeacon", "eddystone_uid", "eddystone_url", "eddystone_tlm", "altbeacon", "phone",
    "malformed", "raw",
)  # fmt: skip
ACTIONS = (
    "remove_adapter", "add_adapter", "power_off", "power_on", "silence", "resume", "burst",
    "fail_start",
)  # fmt: skip
_URL_PREFIXES = ["http://www.", "https://www.", "http://", "https://"]
_URL_SUFFIXES = [".com/", ".org/", ".edu/", ".net/", ".info/", ".biz/", ".gov/",
                 ".com", ".org", ".edu", ".net", ".info", ".biz", ".gov"]  # fmt: skip

Payload = tuple[dict[int, bytes], dict[str, bytes]]


def encode_ibeacon(beacon_uuid: str, major: int, minor: int, tx_power: int) -> Payload:
    body = b"\x02\x15" + uuid.UUID(beacon_uuid).bytes + struct.pack(">HHb", major, minor, tx_power)
    return {0x004C: body}, {}


def encode_eddystone_uid(namespace: str, instance: str, tx_power: int) -> Payload:
    frame = bytes([0x00, tx_power & 0xFF]) + bytes.fromhex(namespace + instance) + b"\x00\x00"
    return {}, {EDDYSTONE_SERVICE: frame}


def encode_eddystone_url(url: str, tx_power: int) -> Payload:
    scheme = next(i for i, p in enumerate(_URL_PREFIXES) if url.startswith(p))
    rest = url[len(_URL_PREFIXES[scheme]) :]
    out = bytearray([0x10, tx_power & 0xFF, scheme])
    while rest:
        code = next((i for i, s in enumerate(_URL_SUFFIXES) if rest.startswith(s)), None)
        if code is None:
            out.append(ord(rest[0]))
            rest = rest[1:]
        else:
            out.append(code)
            rest = rest[len(_URL_SUFFIXES[code]) :]
    return {}, {EDDYSTONE_SERVICE: bytes(out)}


def encode_eddystone_tlm(battery_mv: int, temp_c: float, count: int, uptime_s: float) -> Payload:
    frame = struct.pack(">BBHhII", 0x20, 0, battery_mv, round(temp_c * 256), count,
                        round(uptime_s * 10))  # fmt: skip
    return {}, {EDDYSTONE_SERVICE: frame}


def encode_altbeacon(beacon_id: str, company: int, ref_rssi: int) -> Payload:
    return {company: b"\xbe\xac" + bytes.fromhex(beacon_id) + struct.pack(">bB", ref_rssi, 0)}, {}


def _malformed(variant: str, rng: random.Random) -> Payload:
    if variant == "ibeacon_short":
        return {0x004C: b"\x02\x15" + rng.randbytes(19)}, {}
    if variant == "eddystone_short":
        return {}, {EDDYSTONE_SERVICE: b"\x00" + rng.randbytes(rng.randrange(0, 16))}
    if variant == "altbeacon_long":
        return {0xFFFF: b"\xbe\xac" + rng.randbytes(30)}, {}
    return {rng.randrange(0x10000): rng.randbytes(rng.randrange(0, 30))}, {
        EDDYSTONE_SERVICE: rng.randbytes(rng.randrange(0, 30))
    }


def _random_address(rng: random.Random, resolvable: bool) -> str:
    first = (rng.randrange(64) | (0x40 if resolvable else 0xC0)) & 0xFF
    return ":".join(f"{b:02X}" for b in [first, *rng.randbytes(5)])


@dataclass
class Advertiser:
    name: str
    kind: str
    params: dict[str, Any]
    adapters: list[str]
    rssi: dict[str, list[tuple[float, float]]]
    interval_s: float = 0.1
    noise_db: float = 0.0
    rotate_s: float = 0.0
    address: str | None = None


@dataclass
class Scenario:
    name: str
    duration_s: float
    seed: int = 1
    device_timeout_s: float = 30.0
    adapters: list[dict[str, Any]] = field(default_factory=list)
    advertisers: list[Advertiser] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, path: str | Path) -> Scenario:
        return cls.from_dict(tomllib.loads(Path(path).read_text(encoding="utf-8")))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scenario:
        adapters = [dict(a) for a in data.get("adapters", [{"name": "hci0"}])]
        names = [a["name"] for a in adapters]
        advertisers = []
        for raw in data.get("advertisers", []):
            spec = dict(raw)
            kind = spec.pop("kind")
            if kind not in KINDS:
                raise ValueError(f"advertiser {spec.get('name')!r}: unknown kind {kind!r}")
            on = spec.pop("adapters", names)
            curve = spec.pop("rssi", [[0.0, -60.0], [float(data["duration_s"]), -60.0]])
            by_adapter = spec.pop("rssi_by_adapter", {})
            rssi = {a: [(float(t), float(v)) for t, v in by_adapter.get(a, curve)] for a in on}
            advertisers.append(Advertiser(
                name=spec.pop("name", kind), kind=kind, adapters=on, rssi=rssi,
                interval_s=float(spec.pop("interval_s", 0.1)),
                noise_db=float(spec.pop("noise_db", 0.0)),
                rotate_s=float(spec.pop("rotate_s", 0.0)),
                address=spec.pop("address", None), params=spec,
            ))  # fmt: skip
        for event in data.get("events", []):
            if event.get("action") not in ACTIONS:
                what = f"unknown action {event.get('action')!r}"
                raise ValueError(f"event at {event.get('at')}: {what}")
        return cls(
            name=data.get("name", "unnamed"), duration_s=float(data["duration_s"]),
            seed=int(data.get("seed", 1)),
            device_timeout_s=float(data.get("device_timeout_s", 30.0)),
            adapters=adapters, advertisers=advertisers,
            events=sorted((dict(e) for e in data.get("events", [])), key=lambda e: e["at"]),
        )  # fmt: skip


def payload_of(adv: Advertiser, rng: random.Random, t: float) -> Payload:
    """The advert payload an advertiser sends at time ``t``."""
    p = adv.params
    tx = int(p.get("tx_power", -59))
    encoders: dict[str, Callable[[], Payload]] = {
        "ibeacon": lambda: encode_ibeacon(p["uuid"], int(p["major"]), int(p["minor"]), tx),
        "eddystone_uid": lambda: encode_eddystone_uid(p["namespace"], p["instance"], tx),
        "eddystone_url": lambda: encode_eddystone_url(p.get("url", "https://example.com"), tx),
        "eddystone_tlm": lambda: encode_eddystone_tlm(
            int(p.get("battery_mv", 3000)), float(p.get("temp_c", 21.5)),
            int(t / adv.interval_s), t,
        ),
        "altbeacon": lambda: encode_altbeacon(p["beacon_id"], int(p.get("company", 0x0118)), tx),
        # Apple "Nearby Info", as phones send it: changes often, never an identity
        "phone": lambda: ({0x004C: b"\x10\x05" + rng.randbytes(5)}, {}),
        "malformed": lambda: _malformed(p.get("variant", "garbage"), rng),
    }  # fmt: skip
    if adv.kind in encoders:
        return encoders[adv.kind]()
    manufacturer = {int(k, 0): bytes.fromhex(v) for k, v in p.get("manufacturer", {}).items()}
    service = {k: bytes.fromhex(v) for k, v in p.get("service", {}).items()}
    return manufacturer, service


def rssi_at(curve: list[tuple[float, float]], t: float) -> float | None:
    """Piecewise-linear RSSI at ``t``; None outside the curve (not in range)."""
    if not curve or t < curve[0][0] or t > curve[-1][0]:
        return None
    for (t0, v0), (t1, v1) in itertools.pairwise(curve):
        if t0 <= t <= t1:
            return v0 if t1 == t0 else v0 + (v1 - v0) * (t - t0) / (t1 - t0)
    return curve[-1][1]


@dataclass(frozen=True)
class Step:
    at: float
    action: str  # "advert" or one of ACTIONS
    adapter: str = ""
    address: str = ""
    rssi: int = 0
    payload: Payload = ({}, {})
    extra: dict[str, Any] = field(default_factory=dict)


def build_timeline(scenario: Scenario) -> list[Step]:
    """Every advert and event of a scenario, in time order (deterministic per seed)."""
    rng = random.Random(scenario.seed)
    steps: list[Step] = []
    for index, adv in enumerate(scenario.advertisers):
        own = random.Random(scenario.seed * 1_000_003 + index)
        fixed = adv.address or _random_address(own, resolvable=False)
        addresses: dict[int, str] = {}
        t = own.uniform(0, adv.interval_s)
        while t < scenario.duration_s:
            if adv.rotate_s > 0:
                period = int(t // adv.rotate_s)
                address = addresses.setdefault(period, _random_address(own, resolvable=True))
            else:
                address = fixed
            payload = payload_of(adv, own, t)
            for adapter in adv.adapters:
                level = rssi_at(adv.rssi[adapter], t)
                if level is None:
                    continue
                level += own.gauss(0, adv.noise_db) if adv.noise_db else 0.0
                if level >= SENSITIVITY_DBM:
                    steps.append(Step(t, "advert", adapter, address, round(level), payload))
            t += adv.interval_s * own.uniform(0.9, 1.1)
    for event in scenario.events:
        extra = {k: v for k, v in event.items() if k not in ("at", "action", "adapter")}
        if event["action"] == "burst":
            extra["seed"] = rng.randrange(1 << 30)
        steps.append(Step(float(event["at"]), event["action"], event.get("adapter", "hci0"),
                          extra=extra))  # fmt: skip
    steps.sort(key=lambda s: s.at)
    return steps


def setup(fake: FakeBlueZ, scenario: Scenario) -> None:
    """Create the scenario's adapters on the fake."""
    fake.device_timeout_s = scenario.device_timeout_s
    for a in scenario.adapters:
        if a.get("present", True):
            fake.add_adapter(
                a["name"],
                a.get("address", "00:1A:7D:DA:71:00"),
                powered=a.get("powered", True),
                passive=a.get("passive", False),
            )


async def _burst(fake: FakeBlueZ, step: Step) -> None:
    rng = random.Random(step.extra["seed"])
    devices = [_random_address(rng, True) for _ in range(int(step.extra.get("devices", 50)))]
    for i in range(int(step.extra.get("count", 500))):
        manufacturer = {0x004C: b"\x10\x05" + rng.randbytes(5)}
        fake.advert(step.adapter, devices[i % len(devices)], rssi=rng.randrange(-100, -40),
                    manufacturer_data=manufacturer)  # fmt: skip
        if i % 50 == 49:  # pace: a full socket makes dbus-fast drop the reader
            await fake.drain()
            await asyncio.sleep(0)


async def apply(fake: FakeBlueZ, step: Step, scenario: Scenario) -> None:
    """Carry out one timeline step on the fake."""
    if step.action == "advert":
        manufacturer, service = step.payload
        fake.advert(step.adapter, step.address, rssi=step.rssi,
                    manufacturer_data=manufacturer, service_data=service)  # fmt: skip
    elif step.action == "remove_adapter":
        fake.remove_adapter(step.adapter)
    elif step.action == "add_adapter":
        spec = next((a for a in scenario.adapters if a["name"] == step.adapter), {})
        fake.add_adapter(step.adapter, spec.get("address", "00:1A:7D:DA:71:00"),
                         passive=spec.get("passive", False))  # fmt: skip
    elif step.action in ("power_off", "power_on"):
        if step.adapter in fake.adapters:
            fake.set_powered(step.adapter, step.action == "power_on")
    elif step.action in ("silence", "resume"):
        fake.silent = step.action == "silence"
    elif step.action == "burst":
        await _burst(fake, step)
    elif step.action == "fail_start":
        fake.fail_next_start(step.adapter, *step.extra.get("errors", ["org.bluez.Error.Failed"]))


async def play(fake: FakeBlueZ, scenario: Scenario, *, speed: float = 1.0) -> int:
    """Replay a scenario in real time (``speed`` > 1 is faster); returns steps applied."""
    steps = build_timeline(scenario)
    start = time.monotonic()
    for n, step in enumerate(steps, 1):
        delay = start + step.at / speed - time.monotonic()
        if delay > 0:
            await fake.drain()
            await asyncio.sleep(delay)
        await apply(fake, step, scenario)
        if n % 50 == 0:
            await fake.drain()
    await fake.drain()
    return len(steps)


async def _serve(path: Path, speed: float, repeat: bool) -> None:
    scenario = Scenario.load(path)
    with DBusDaemon() as daemon:
        print(f"DBUS_SYSTEM_BUS_ADDRESS={daemon.address}", flush=True)
        fake = FakeBlueZ(daemon.address)
        await fake.start()
        try:
            setup(fake, scenario)
            while True:
                await play(fake, scenario, speed=speed)
                if not repeat:
                    break
        finally:
            await fake.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m simulators.devices.ble_scenario SCENARIO``: a private bus, a fake BlueZ,
    a replay."""
    parser = argparse.ArgumentParser(
        prog="python -m simulators.devices.ble_scenario",
        description="Start a private system D-Bus with a fake BlueZ and replay a BLE "
        "scenario on it.  The first stdout line is DBUS_SYSTEM_BUS_ADDRESS=...; export it "
        "for the gateway (or bleak) to scan the fake.",
    )
    parser.add_argument("scenario", type=Path, help="scenario TOML (simulators/scenarios/ble-*)")
    parser.add_argument("--speed", type=float, default=1.0, help="time scale, 2 = twice as fast")
    parser.add_argument("--repeat", action="store_true", help="replay until interrupted")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_until_terminated(_serve(args.scenario, args.speed, args.repeat)))


async def _until_terminated(serving: Coroutine[Any, Any, None]) -> None:
    """Run ``serving``; SIGTERM cancels it, so its dbus-daemon is stopped, not orphaned."""
    task = asyncio.ensure_future(serving)
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


if __name__ == "__main__":
    main()
