"""``python -m tests.bench ble``: BLE adverts through our path beside bare bleak and a peer.

Three measurements, in one run:

- **parse + presence** (in-process, synthetic, no D-Bus): resolve (parse, allow-list,
  pseudonym) and ``PresenceTracker.observe`` on a store's mix of our beacons, foreign
  beacons and phones; adverts/s on one core.
- **real path, saturated**: a private dbus-daemon with the fake BlueZ (in this process)
  and two scanner processes on it: a bare ``BleakScanner`` with an empty callback, and our
  ``BleSource`` draining its readings.  Both are stopped (SIGSTOP) while the fake sends
  the flood, so dbus-daemon queues it for them, then each is let go alone and timed until
  it has taken every advert: adverts/s and CPU-seconds per 10,000 (their own
  ``process_time``), median of 3 rounds (1 with ``quick``).  ``bleak_path_ratio`` = our
  adverts per CPU-second / bare bleak's (what each takes on one core; the wall-clock
  ratio, ``bleak_path_wall_ratio``, moves with whatever else the machine runs).
- **peer, paced**: TheengsGateway (``python -m TheengsGateway``, publishing to a local
  mosquitto) scanning the same fake, beside the two above, while the fake sends adverts at
  a fixed rate the peer can keep up with (``PACED_RATE``, exactly: fractional adverts
  per 10 ms slot carry over), cycling through the flood's whole mix of devices;
  CPU-seconds per 10,000 adverts sent for all three (the peer's CPU read from /proc).
  The peer scans continuously (``-sd 3600 -tb 0``), not with its default 7 s on / 5 s
  off duty cycle that misses ~40 % of adverts.
  Three rounds of 10 s (1 of 2 s with ``quick``), medians.
  ``cpu_ratio_vs_peer`` = our CPU per advert / the peer's, the median of the rounds'
  ratios (each round's two figures were measured side by side).  If the peer cannot run,
  ``peer_error`` says why and no peer figure is given.

    from tests.bench.ble import bench_ble, print_ble
    print_ble(bench_ble(quick=True))
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import statistics
import struct
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.ble.adverts import AdvertResolver, AllowList
from drivers.ble.presence import PresenceParams, PresenceTracker, PseudonymCache
from gateway.identity.pseudonyms import Keyring

OUR_UUID = uuid.UUID("83256b74-78d0-43a4-8269-05f9dc8a44ba")
FOREIGN_UUID = uuid.UUID("f7826da6-4fa2-4e98-8024-bc5b71e0893e")

Advert = tuple[dict[int, bytes], dict[str, bytes]]


def synthetic_adverts(count: int, subjects: int, seed: int = 1) -> list[tuple[Advert, int]]:
    """(advert fields, rssi) pairs: 50 % ours, 25 % foreign iBeacons, 25 % phones."""
    rng = random.Random(seed)
    out: list[tuple[Advert, int]] = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.75:
            beacon = OUR_UUID if roll < 0.5 else FOREIGN_UUID
            minor = rng.randrange(subjects)
            body = b"\x02\x15" + beacon.bytes + struct.pack(">HHb", 1, minor, -59)
            fields: Advert = ({0x004C: body}, {})
        else:
            fields = ({0x004C: b"\x10\x05" + rng.randbytes(5)}, {})
        out.append((fields, rng.randrange(-95, -45)))
    return out


def bench_adverts(
    adverts: int = 200_000, subjects: int = 500, rate_hz: float = 1000.0, seed: int = 1
) -> dict[str, Any]:
    """Feed ``adverts`` synthetic adverts at a simulated ``rate_hz``; measure wall time.

    The loop is ``BleSource._handle`` without the queue: resolve (parse, allow-list,
    pseudonym), count the result, observe.
    """
    keyring = Keyring(keys={"k1": bytes(range(32))}, active="k1")
    allow = AllowList.build(ibeacon_uuids=[str(OUR_UUID)])
    cache = PseudonymCache(keyring.pseudonym_of_canonical, maxsize=4096)
    resolver = AdvertResolver(allow, cache.get, maxsize=4096)
    tracker = PresenceTracker(PresenceParams(min_dwell_s=1.0, silence_s=5.0))
    data = synthetic_adverts(adverts, subjects, seed)
    resolve, observe = resolver.resolve, tracker.observe
    counts: dict[str, int] = {}
    events = 0
    now = 1_795_000_000.0
    step = 1.0 / rate_hz
    cpu0, start = time.process_time(), time.perf_counter()
    for (manufacturer, service), rssi in data:
        now += step
        result, subject = resolve(manufacturer, service)
        counts[result] = counts.get(result, 0) + 1
        if subject is not None:
            events += len(observe(subject, "bench", rssi, now=now))
    events += len(tracker.tick(now=now + 3600))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return {
        "adverts": adverts,
        "seconds": round(elapsed, 3),
        "adverts_per_s": round(adverts / elapsed),
        "cpu_s_per_10k": round(cpu / adverts * 10_000, 4),
        "events": events,
        "results": counts,
        "hmac_computed": cache.misses,
        "tracked_at_end": len(tracker),
    }


# -- the real path: fake BlueZ, bleak, our source, the peer ---------------------------

OUR_NAMESPACE = "e157bd5df90aad1dc2fb"
_ROOT = Path(__file__).resolve().parents[2]
_PEER_TOPIC = "bench/TheengsGateway/BTtoMQTT"
PACED_RATE = 250.0  # adverts/s: below what the peer can take on this kind of machine


@dataclass(frozen=True)
class _Sample:
    """What a scanner process reports: adverts taken, and when / at what CPU the last came."""

    seen: int
    last_at: float  # time.monotonic() when ``seen`` last changed (10 ms resolution)
    cpu_at_last: float  # its process_time() then
    cpu_now: float
    dropped: int


class _Scanner:
    """One scanner process (``bare`` bleak or ``ours``) on the private bus."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, env: dict[str, str]) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.bench.ble", "consume", self.kind,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise RuntimeError(f"the {self.kind} scanner did not start scanning")

    async def sample(self, command: bytes = b"count") -> _Sample:
        assert self.proc is not None and self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(command + b"\n")
        await self.proc.stdin.drain()
        seen, last_at, cpu_last, cpu_now, dropped = (
            await asyncio.wait_for(self.proc.stdout.readline(), 10)
        ).split()
        return _Sample(int(seen), float(last_at), float(cpu_last), float(cpu_now), int(dropped))

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.returncode is None:
            os.kill(self.proc.pid, sig)

    async def close(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.signal(signal.SIGCONT)
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class _Flood:
    """Adverts for the fake: our iBeacons and Eddystone-UIDs, foreign iBeacons, phones."""

    def __init__(self, fake: Any, devices: int = 200, seed: int = 7) -> None:
        from simulators.devices.ble_scenario import encode_eddystone_uid, encode_ibeacon

        self.fake = fake
        self.rng = random.Random(seed)
        self.devices: list[tuple[str, str, dict[int, bytes], dict[str, bytes], int]] = []
        for i in range(devices):
            address = f"C0:00:00:00:{i >> 8:02X}:{i & 0xFF:02X}"
            share = i / devices
            if share < 0.4:
                kind, (m, s), rssi = "ours", encode_ibeacon(str(OUR_UUID), 1, i, -59), -60
            elif share < 0.5:
                kind, rssi = "ours", -62
                m, s = encode_eddystone_uid(OUR_NAMESPACE, f"{i:012x}", -20)
            elif share < 0.75:
                kind, (m, s), rssi = "foreign", encode_ibeacon(str(FOREIGN_UUID), 2, i, -59), -70
            else:
                kind, m, s, rssi = "phone", {}, {}, -80
            self.devices.append((kind, address, m, s, rssi))
        self.rng.shuffle(self.devices)
        self.rounds = 0
        self.cursor = 0  # the next device of the round-robin

    def _one(self, index: int) -> bool:
        kind, address, m, s, rssi = self.devices[index]
        if kind == "phone":  # Apple Nearby: a fresh payload every time, never an identity
            m = {0x004C: b"\x10\x05" + self.rng.randbytes(5)}
        jitter = (self.rounds + index) % 2  # RSSI always changes: every advert is reported
        sent: bool = self.fake.advert("hci0", address, rssi=rssi - jitter,
                                      manufacturer_data=m, service_data=s)  # fmt: skip
        return sent

    async def send(self, count: int) -> int:
        """Send ``count`` adverts round-robin as fast as the bus takes them.

        The round-robin goes on where the last call stopped, so small paced sends cycle
        through every device (the whole mix) too, not just the first few.
        """
        sent = 0
        for i in range(count):
            index = self.cursor
            self.cursor = (index + 1) % len(self.devices)
            if index == 0:
                self.rounds += 1
            sent += self._one(index)
            if i % 100 == 99:
                await self._sync()
        await self._sync()
        return sent

    async def _sync(self) -> None:
        """Wait until dbus-daemon has read everything sent so far (``FakeBlueZ.drain``)."""
        await self.fake.drain()

    async def paced(self, rate: float, seconds: float) -> int:
        """Send at ``rate`` adverts/s for ``seconds`` (in 10 ms slots; a slot sends the
        adverts due by its end, so fractional rates per slot come out exact)."""
        slot = 0.01
        start = time.monotonic()
        sent = due = 0
        for n in range(round(seconds / slot)):
            count = round(rate * slot * (n + 1)) - due
            due += count
            if count:
                sent += await self.send(count)
            await asyncio.sleep(max(0.0, start + (n + 1) * slot - time.monotonic()))
        return sent


def _proc_cpu_s(pid: int) -> float:
    """utime + stime of a process (all threads) from /proc, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    fields = stat.rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _settle(scanner: _Scanner, target: int, idle_s: float, limit_s: float) -> _Sample:
    """Poll until the scanner has ``target`` adverts or took none for ``idle_s``."""
    deadline = time.monotonic() + limit_s
    last = await scanner.sample()
    changed = time.monotonic()
    while last.seen < target and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        now = await scanner.sample()
        if now.seen != last.seen:
            changed = time.monotonic()
        elif time.monotonic() - changed >= idle_s:
            return now
        last = now
    return last


async def _saturated(
    flood: _Flood, scanners: list[_Scanner], adverts: int, rounds: int
) -> dict[str, Any]:
    """Queue ``adverts`` for stopped scanners, then time each one draining them alone.

    Repeated ``rounds`` times; each figure is the median over the rounds.
    """
    runs: dict[str, list[dict[str, float]]] = {s.kind: [] for s in scanners}
    sent = 0
    for _ in range(rounds):
        base = {s.kind: await s.sample(b"watch") for s in scanners}
        for s in scanners:
            s.signal(signal.SIGSTOP)
        sent = await flood.send(adverts)  # (on failure, _Scanner.close resumes them)
        for s in scanners:
            start = time.monotonic()
            s.signal(signal.SIGCONT)
            end = await _settle(s, base[s.kind].seen + sent, idle_s=1.5, limit_s=120)
            await s.sample(b"still")
            seen = end.seen - base[s.kind].seen
            cpu = end.cpu_at_last - base[s.kind].cpu_now
            runs[s.kind].append({
                "seen": seen, "dropped": end.dropped - base[s.kind].dropped,
                "adverts_per_s": seen / max(end.last_at - start, 1e-6),
                "cpu_s_per_10k": cpu / max(seen, 1) * 10_000,
            })  # fmt: skip
    out: dict[str, Any] = {"sent": sent, "rounds": rounds}
    for kind, results in runs.items():
        out[kind] = {
            "seen": min(r["seen"] for r in results),
            "dropped": max(r["dropped"] for r in results),
            "adverts_per_s": round(statistics.median(r["adverts_per_s"] for r in results)),
            "cpu_s_per_10k": round(statistics.median(r["cpu_s_per_10k"] for r in results), 4),
            "cpu_s_per_10k_runs": [round(r["cpu_s_per_10k"], 4) for r in results],
        }
    return out


class _Peer:
    """TheengsGateway on the private bus, publishing to a local mosquitto; counted there."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.proc: asyncio.subprocess.Process | None = None
        self.broker: Any = None
        self.client: Any = None
        self.messages = 0
        self._lock = threading.Lock()

    def _on_message(self, *_: Any) -> None:
        with self._lock:
            self.messages += 1

    async def start(self, env: dict[str, str], fake: Any) -> None:
        """Start broker, counter and peer; raises RuntimeError saying why it cannot run."""
        import importlib.util

        if importlib.util.find_spec("TheengsGateway") is None:
            raise RuntimeError(
                "the peer, TheengsGateway, is not installed: make bench builds it "
                "(pip install '.[bench-peer]' needs a compiler and CMake)"
            )
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from simulators.infra.broker import Mosquitto

        try:
            self.broker = Mosquitto(self.work / "mosquitto")
            self.broker.start()
        except (FileNotFoundError, RuntimeError) as exc:
            raise RuntimeError(f"no local mosquitto for the peer: {exc}") from exc
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-ble-counter")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", self.broker.port)
        self.client.subscribe(f"{_PEER_TOPIC}/#")
        self.client.loop_start()
        sessions = len(fake.adapters["hci0"].sessions)
        stderr = (self.work / "peer.log").open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "TheengsGateway", "-H", "127.0.0.1",
            "-P", str(self.broker.port), "-c", str(self.work / "theengsgw.conf"),
            "-a", "hci0", "-sd", "3600", "-tb", "0", "-D", "0", "-pa", "1",
            "-pt", _PEER_TOPIC, "-Lt", "bench/TheengsGateway/LWT", "-ll", "ERROR",
            stdin=asyncio.subprocess.DEVNULL, stdout=stderr, stderr=stderr, env=env,
        )  # fmt: skip
        stderr.close()
        deadline = time.monotonic() + 30  # it waits up to 5 s for MQTT before it scans
        while len(fake.adapters["hci0"].sessions) <= sessions:
            if self.proc.returncode is not None or time.monotonic() > deadline:
                tail = (self.work / "peer.log").read_text(errors="replace").strip()[-400:]
                what = "exited" if self.proc.returncode is not None else "never started a scan"
                raise RuntimeError(f"TheengsGateway {what}: {tail or 'no output'}")
            await asyncio.sleep(0.1)

    def cpu_s(self) -> float:
        assert self.proc is not None
        return _proc_cpu_s(self.proc.pid)

    def count(self) -> int:
        with self._lock:
            return self.messages

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)  # it stops on KeyboardInterrupt
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self.client is not None:
            self.client.loop_stop()
            self.client.disconnect()
        if self.broker is not None:
            self.broker.stop()


async def _paced(
    flood: _Flood,
    scanners: list[_Scanner],
    peer: _Peer | None,
    *,
    rate: float,
    seconds: float,
    rounds: int,
) -> dict[str, Any]:
    """All scanners (and the peer) on one flood at ``rate``; CPU per 10,000 adverts sent.

    ``rounds`` rounds of ``seconds`` each; each figure is the median over the rounds (a
    round the machine spent on something else does not move it), ``*_runs`` every round.
    """
    runs: dict[str, list[float]] = {s.kind: [] for s in scanners}
    seen: dict[str, int] = {s.kind: 0 for s in scanners}
    ratios: list[float] = []
    sent_total = 0
    for _ in range(rounds):
        base = {s.kind: await s.sample() for s in scanners}
        peer_base = (peer.cpu_s(), peer.count()) if peer else (0.0, 0)
        sent = await flood.paced(rate, seconds)
        sent_total += sent
        for s in scanners:
            end = await _settle(s, base[s.kind].seen + sent, idle_s=1.0, limit_s=30)
            seen[s.kind] += end.seen - base[s.kind].seen
            runs[s.kind].append((end.cpu_now - base[s.kind].cpu_now) / sent * 10_000)
        if peer is not None:
            changed, last = time.monotonic(), peer.count()
            while time.monotonic() - changed < 1.5 and time.monotonic() - changed < 60:
                await asyncio.sleep(0.1)
                if peer.count() != last:
                    changed, last = time.monotonic(), peer.count()
            runs.setdefault("peer", []).append((peer.cpu_s() - peer_base[0]) / sent * 10_000)
            seen["peer"] = seen.get("peer", 0) + peer.count() - peer_base[1]
            ratios.append(runs["ours"][-1] / max(runs["peer"][-1], 1e-9))
    out: dict[str, Any] = {"rate_per_s": rate, "sent": sent_total, "rounds": rounds}
    for kind, values in runs.items():
        out[kind] = {
            "seen": seen[kind],
            "cpu_s_per_10k": round(statistics.median(values), 4),
            "cpu_s_per_10k_runs": [round(v, 4) for v in values],
        }
    if ratios:
        out["ratio_runs"] = [round(r, 4) for r in ratios]
    return out


async def _real_path(quick: bool, with_peer: bool = True) -> dict[str, Any]:
    from simulators.devices.fake_bluez import DBusDaemon, FakeBlueZ

    flood_n, rounds = (5_000, 1) if quick else (30_000, 3)
    paced_s, paced_rounds = (2.0, 1) if quick else (10.0, 3)
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="tp-bench-ble-") as tmp, DBusDaemon() as daemon:
        path = os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": daemon.address, "PYTHONPATH": path}
        fake = FakeBlueZ(daemon.address, device_timeout_s=3600)
        await fake.start()
        scanners = [_Scanner("bare"), _Scanner("ours")]
        peer: _Peer | None = None
        try:
            fake.add_adapter("hci0")
            for s in scanners:
                await s.start(env)
            flood = _Flood(fake)
            warm = await flood.send(len(flood.devices) * 2)  # every device known to everyone
            for s in scanners:
                await _settle(s, warm, idle_s=1.0, limit_s=30)
            out["saturated"] = await _saturated(flood, scanners, flood_n, rounds)
            if with_peer:
                peer = _Peer(Path(tmp))
                try:
                    await peer.start(env, fake)
                except RuntimeError as exc:
                    out["peer_error"] = str(exc)
                    await peer.close()
                    peer = None
            else:
                out["peer_error"] = "not run (with_peer=False)"
            out["paced"] = await _paced(
                flood, scanners, peer, rate=PACED_RATE, seconds=paced_s, rounds=paced_rounds
            )
        finally:
            if peer is not None:
                await peer.close()
            for s in scanners:
                await s.close()
            await fake.close()
    return out


def bench_ble(quick: bool = False) -> dict[str, Any]:
    """Every figure of ``bench ble`` as one flat-ish dict (see the module docstring)."""
    runs = [bench_adverts(adverts=100_000 if quick else 200_000) for _ in range(1 if quick else 3)]
    rates = sorted(r["adverts_per_s"] for r in runs)
    real = asyncio.run(_real_path(quick))
    sat, paced = real["saturated"], real["paced"]
    figures: dict[str, Any] = {
        "quick": quick,
        "presence_adverts_per_s": rates[len(rates) // 2],
        "presence_adverts_per_s_runs": rates,
        "presence_cpu_s_per_10k": runs[0]["cpu_s_per_10k"],
        "flood_adverts": sat["sent"],
        "bare_bleak_adverts_per_s": sat["bare"]["adverts_per_s"],
        "ours_bleak_adverts_per_s": sat["ours"]["adverts_per_s"],
        "bare_bleak_cpu_s_per_10k": sat["bare"]["cpu_s_per_10k"],
        "ours_bleak_cpu_s_per_10k": sat["ours"]["cpu_s_per_10k"],
        "bare_bleak_seen": sat["bare"]["seen"],
        "ours_bleak_seen": sat["ours"]["seen"],
        "ours_dropped": sat["ours"]["dropped"],
        "bare_bleak_cpu_s_per_10k_runs": sat["bare"]["cpu_s_per_10k_runs"],
        "ours_bleak_cpu_s_per_10k_runs": sat["ours"]["cpu_s_per_10k_runs"],
        # adverts per CPU-second, ours / bare: what each could take on one core
        "bleak_path_ratio": round(
            sat["bare"]["cpu_s_per_10k"] / max(sat["ours"]["cpu_s_per_10k"], 1e-9), 3
        ),
        # adverts per wall second while draining: the same, plus whatever else ran
        "bleak_path_wall_ratio": round(
            sat["ours"]["adverts_per_s"] / max(sat["bare"]["adverts_per_s"], 1), 3
        ),
        "paced_rate_per_s": paced["rate_per_s"],
        "paced_adverts": paced["sent"],
        "paced_rounds": paced["rounds"],
        "paced_ours_cpu_s_per_10k_runs": paced["ours"]["cpu_s_per_10k_runs"],
        "paced_bare_cpu_s_per_10k": paced["bare"]["cpu_s_per_10k"],
        "paced_ours_cpu_s_per_10k": paced["ours"]["cpu_s_per_10k"],
        "paced_ours_seen": paced["ours"]["seen"],
    }
    if "peer" in paced:
        peer = paced["peer"]
        figures.update(
            peer="TheengsGateway " + _peer_version(),
            peer_cpu_s_per_10k=peer["cpu_s_per_10k"],
            peer_seen=peer["seen"],
            peer_cpu_s_per_10k_runs=peer["cpu_s_per_10k_runs"],
            # the median of the rounds' ratios: each round's two figures share its noise
            cpu_ratio_vs_peer=round(statistics.median(paced["ratio_runs"]), 4),
            cpu_ratio_vs_peer_runs=paced["ratio_runs"],
        )
    else:
        figures["peer_error"] = real.get("peer_error", "the peer did not run")
    return figures


def _peer_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("theengsgateway")
    except PackageNotFoundError:
        return "?"


def print_ble(figures: dict[str, Any]) -> None:
    """The figures as a short table a person reads."""
    f = figures
    print(f"BLE benchmark{' (quick)' if f['quick'] else ''}")
    runs = ", ".join(f"{r:,}" for r in f["presence_adverts_per_s_runs"])
    print(f"  parse + presence, one core    {f['presence_adverts_per_s']:>10,} adverts/s"
          f"  (runs: {runs})")  # fmt: skip
    print(f"  real path, {f['flood_adverts']:,} adverts queued by dbus-daemon, drained alone:")
    for who, key in (("bare BleakScanner", "bare"), ("ours (BleSource)", "ours")):
        print(f"    {who:<26}{f[f'{key}_bleak_adverts_per_s']:>10,} adverts/s"
              f"  {f[f'{key}_bleak_cpu_s_per_10k']:>8.3f} CPU-s/10k"
              f"  saw {f[f'{key}_bleak_seen']:,}")  # fmt: skip
    print(f"    ours / bare bleak           {f['bleak_path_ratio']:>10}  per CPU-second"
          f"  ({f['bleak_path_wall_ratio']} per wall second)")  # fmt: skip
    print(f"  paced at {f['paced_rate_per_s']:.0f}/s ({f['paced_adverts']:,} adverts in"
          f" {f['paced_rounds']} rounds), CPU-s per 10k, median:")  # fmt: skip
    print(f"    bare BleakScanner           {f['paced_bare_cpu_s_per_10k']:>10.3f}")
    print(f"    ours (BleSource)            {f['paced_ours_cpu_s_per_10k']:>10.3f}")
    if "peer_error" in f:
        print(f"    peer                        not measured: {f['peer_error']}")
    else:
        print(f"    {f['peer']:<28}{f['peer_cpu_s_per_10k']:>10.3f}"
              f"  (published {f['peer_seen']:,} of {f['paced_adverts']:,})")  # fmt: skip
        runs = ", ".join(str(r) for r in f["cpu_ratio_vs_peer_runs"])
        print(f"    ours / peer                 {f['cpu_ratio_vs_peer']:>10}  (rounds: {runs})")


# -- the scanner processes (python -m tests.bench.ble consume bare|ours) -------------


async def _consume(kind: str) -> None:
    counted = [0]
    dropped: Any = lambda: 0  # noqa: E731
    stop: list[Any] = []
    if kind == "bare":
        from bleak import BleakScanner

        def on_advert(device: Any, adv: Any) -> None:
            counted[0] += 1

        bluez: Any = {"adapter": "hci0", "filters": {"DuplicateData": False}}  # as BleSource's
        scanner = BleakScanner(on_advert, scanning_mode="active", bluez=bluez)
        await scanner.start()
        seen: Any = lambda: counted[0]  # noqa: E731
        stop.append(scanner.stop)
    else:
        from drivers.ble.source import BleSource
        from gateway.config.sources import BleSourceConfig
        from gateway.observe.metrics import Metrics
        from gateway.ports import SourceContext

        cfg = BleSourceConfig(kind="ble", name="bench-ble", zone="bench",
            allow_ibeacon_uuids=(str(OUR_UUID),), allow_eddystone_namespaces=(OUR_NAMESPACE,),
            min_dwell_s=1.0, silence_s=5.0, watchdog_s=3600.0)  # fmt: skip
        metrics = Metrics()
        keyring = Keyring(keys={"k1": bytes(range(32))}, active="k1")
        source = BleSource(cfg, SourceContext(name="bench-ble", keyring=keyring, metrics=metrics))

        async def drain() -> None:
            async for _ in source.readings():
                counted[0] += 1

        task = asyncio.create_task(drain(), name="bench-ble-source")
        while source.ctx.state.get("state") != "ok":
            await asyncio.sleep(0.02)
        seen = lambda: int(metrics.total("ble_adverts_total"))  # noqa: E731
        dropped = lambda: int(metrics.total("ble_adverts_dropped_total"))  # noqa: E731
        stop.append(lambda: _cancel(task))
    last = [0, time.monotonic(), time.process_time()]

    async def sampler() -> None:
        while True:
            await asyncio.sleep(0.01)
            n = seen()
            if n != last[0]:
                last[:] = [n, time.monotonic(), time.process_time()]

    sampling: asyncio.Task[None] | None = None  # only while a drain is timed: it costs CPU
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    print("ready", flush=True)
    while command := (await reader.readline()).strip():
        if command == b"watch" and sampling is None:
            sampling = asyncio.create_task(sampler(), name="bench-ble-sampler")
        elif command == b"still" and sampling is not None:
            await _cancel(sampling)
            sampling = None
        n = seen()
        if n != last[0]:
            last[:] = [n, time.monotonic(), time.process_time()]
        print(f"{last[0]} {last[1]} {last[2]} {time.process_time()} {dropped()}", flush=True)
    if sampling is not None:
        await _cancel(sampling)
    for fn in stop:
        await fn()


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


if __name__ == "__main__":
    if sys.argv[1:2] == ["consume"] and sys.argv[2:3] in (["bare"], ["ours"]):
        asyncio.run(_consume(sys.argv[2]))
    else:
        print_ble(bench_ble(quick="--quick" in sys.argv))
