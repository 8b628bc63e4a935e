"""The soak: a busy store's week, accelerated, against the real daemon and every simulator.

    python -m tests.soak.soak_run --days 7 --out DIR [--minutes 10] [--report tests/soak]

What runs: ``simulators.rig.store.StoreRig`` (mosquitto, the fake central with its consent
registry, the card reader on a pty, the fake BlueZ, the MJPEG kiosk camera, a printer and
a till) and, in this process, the real ``gateway.app.daemon.Gateway`` with every source, the
same object and ``run()`` coroutine ``touchpoint-gateway run`` uses.  Running it in-process
lets its wall clock be injected (``FastClock``: one real second is ``rate`` simulated
seconds) without a time-warp switch in the product; the price is that RSS, fds and
threads measured here include this harness (a few hundred samples, nothing else).

The simulators run in real time, so every time constant of a sensor is scaled by the
rate in the daemon's config (card and camera debounce): a card held for 1 s real is one
read, as it is in a store.  BLE presence windows need nothing: the driver times them on
the monotonic clock and only dates its events with the wall clock.  What is in simulated time:
event timestamps, retention (``max_age_s``), the consent hold TTL, consent and token
expiry, footfall windows.  Real-time things stay real: MQTT
keepalive and reconnect backoff, consent sync polling, the housekeeping cadence.

A simulated week, by default in 10 real minutes: bulk card reads at ~1000/s (the
synthetic source), the BLE scenario at twice its pace, a receipt every 0.2 s through the
tap, the camera scenario looping (app tokens, junk codes, a stream drop per loop); the
broker stopped for two simulated nights (the buffer fills, is expired by retention and
capped, then drains); the central's consent script rotating withdrawals (erasures) and
re-grants of bulk cards, and granting / expiring one card-scenario shopper whose reads
the ``hold`` policy quarantines, releases and expires.  Every ``sample_s`` the harness
records RSS, fds, threads, buffer depth and file sizes, and ``Gateway.memory_stats()``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import re
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers.camera.source import DEBOUNCE_MAX_ENTRIES as CAMERA_DEBOUNCE_MAX
from drivers.serial_cards.source import DEBOUNCE_MAX_ENTRIES as CARD_DEBOUNCE_MAX
from drivers.synthetic import card_number
from gateway.app.daemon import Gateway
from gateway.config.loading import Config, load_config
from gateway.identity.tokens import ReplaySet
from simulators.rig.store import SCENARIOS, RigLoad, StoreRig

log = logging.getLogger(__name__)

DAY = 86_400.0
HELD_CARD = ("rfid", "0A1B2C3D4E")  # a card-scenario shopper the registry grants only at times
APP_SUBS = [f"app-user-{n}" for n in range(1001, 1006)]  # the camera scenario's app users


@dataclass(frozen=True)
class SoakPlan:
    """How long, how fast and what happens.  ``outages``: (start day, hours) of broker
    downtime in simulated time."""

    days: float = 7.0
    real_s: float = 600.0
    synthetic_rate: float = 1000.0
    synthetic_cards: int = 200
    ble_speed: float = 2.0
    till_interval_s: float = 0.2
    camera_decode_fps: float = 10.0
    sample_s: float = 2.0
    warmup_days: float = 1.5
    outages: tuple[tuple[float, float], ...] = ((0.8, 10.0), (3.7, 26.0))
    max_age_s: int = 8 * 3600  # retention shorter than the long outage: expiry runs
    max_bytes: int = 16 * 1024 * 1024  # a cap the long outage reaches: eviction runs
    hold_ttl_s: float = 2 * 3600.0  # the held card is without consent 3 h in 6: some expire
    consent_every_h: float = 6.0  # a consent change this often (simulated)
    rotating_cards: int = 3  # bulk cards withdrawn (erased) per change, re-granted next

    @property
    def rate(self) -> float:
        """Simulated seconds per real second."""
        return self.days * DAY / self.real_s

    @classmethod
    def smoke(cls) -> SoakPlan:
        """Half a simulated day in ~45 s: the same code, for ``make test``."""
        return cls(
            days=0.5,
            real_s=45.0,
            synthetic_rate=300.0,
            sample_s=1.0,
            warmup_days=0.125,
            outages=((0.2, 2.5),),
            max_age_s=2 * 3600,
            max_bytes=64 * 1024 * 1024,
            hold_ttl_s=900.0,
            consent_every_h=1.0,
        )


class FastClock:
    """An accelerated wall clock: starts at the real time, runs ``rate`` times faster."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.start = time.time()
        self._mono0 = time.monotonic()

    def __call__(self) -> float:
        return self.start + (time.monotonic() - self._mono0) * self.rate

    def elapsed(self) -> float:
        """Simulated seconds since the start."""
        return (time.monotonic() - self._mono0) * self.rate

    def real_elapsed(self) -> float:
        return time.monotonic() - self._mono0


# ------------------------------------------------------------------------- the store's set-up


def soak_load(plan: SoakPlan, work: Path) -> RigLoad:
    """The rig's load, with a camera scenario whose app tokens outlive the run: the camera
    signs them with the real clock, and the daemon's clock runs ahead by up to ``days``."""
    text = (SCENARIOS / "camera-kiosk.toml").read_text(encoding="utf-8")
    ttl = int(plan.days * DAY + 2 * DAY)
    text, n = re.subn(r'(?m)^show = "app".*$', lambda m: f"{m.group(0)}\nttl_s = {ttl}", text)
    if n == 0:
        raise RuntimeError("the camera scenario shows no app token any more: update the soak")
    camera = work / "camera-soak.toml"
    camera.write_text(text, encoding="utf-8")
    return RigLoad(
        ble_speed=plan.ble_speed,
        camera_scenario=camera,
        camera_decode_fps=plan.camera_decode_fps,
        till_interval_s=plan.till_interval_s,
        synthetic_rate=plan.synthetic_rate,
        synthetic_cards=plan.synthetic_cards,
    )


def consent_steps(plan: SoakPlan) -> list[dict[str, Any]]:
    """The central's consent changes, in real seconds from its start."""
    period = plan.consent_every_h * 3600 / plan.rate
    steps: list[dict[str, Any]] = []
    held = list(HELD_CARD)
    k, at = 0, period
    while at < plan.real_s:
        push = k % 2 == 0  # alternately pushed over MQTT and picked up by the HTTP poll
        steps.append({"at_s": at, "action": "grant", "identity": held,
                      "purposes": ["analytics", "linking"], "push": push})  # fmt: skip
        steps.append({"at_s": at + period / 2, "action": "expire", "identity": held})
        n = plan.rotating_cards
        for i in range(k * n, (k + 1) * n):
            card = ["loyalty", card_number(i % plan.synthetic_cards)]
            steps.append({"at_s": at, "action": "withdraw", "identity": card, "push": push})
            steps.append({"at_s": at + period, "action": "grant", "identity": card,
                          "purposes": ["analytics", "linking"], "push": not push})  # fmt: skip
        k, at = k + 1, at + period
    return steps


def _sub(text: str, pattern: str, repl: str | Callable[[re.Match[str]], str]) -> str:
    out, n = re.subn(pattern, repl, text, count=1, flags=re.MULTILINE)
    if n != 1:
        raise RuntimeError(f"the rig's config changed: no line matches {pattern!r}")
    return out


def soak_config(rig: StoreRig, plan: SoakPlan) -> Path:
    """The rig's gateway.toml with sensor time constants scaled to the clock's rate."""
    r = plan.rate
    text = rig.config_text(
        buffer_extra=f"max_age_s = {plan.max_age_s}\nmax_bytes = {plan.max_bytes}\n"
    )
    consent = f'[consent]\npolicy = "hold"\nhold_ttl_s = {plan.hold_ttl_s}\n\n[consent.sync]'
    text = _sub(text, r"^\[consent\.sync\]$", consent)
    # BLE presence windows run on the monotonic clock (drivers/ble/source.py): they stay real.
    text = _sub(text, r'^protocol = "rdm6300"$', f'protocol = "rdm6300"\ndebounce_s = {r}')
    text = _sub(text, r"^decode_fps = .*$", lambda m: f"{m[0]}\ndebounce_s = {r}")
    path = rig.work / "gateway-soak.toml"
    path.write_text(text, encoding="utf-8")
    return path


def map_bounds(cfg: Config, gw: Gateway, population: int) -> dict[str, int]:
    """The configured bound of each in-memory table that has one.  Tables keyed by
    subject with no bound of their own are held to the store's population: every
    subject the simulators show (``population``)."""
    bounds = {
        "consent.records": population,
        "consent.withdrawn": population,
        "outbox.outstanding": 4 * cfg.buffer.commit_max_events,
        # settling batches: the window awaiting PUBACKs, and as many awaiting their ack's
        # commit (the window slot is freed before the rows are deleted)
        "forwarder.in_flight": 2 * cfg.mqtt.inflight_window,
        "forwarder.queued": cfg.mqtt.inflight_window,
        "mqtt.pending": cfg.mqtt.inflight_window + 2,  # and the status messages
        "outbox.tail_cache": 2000,  # gateway.buffer.outbox.Outbox._recent_max
    }
    if gw.policy.hold is not None:
        bounds["policy.hold"] = gw.policy.hold.max_entries
    for src in cfg.sources:
        if src.kind == "ble":
            bounds[f"{src.name}.presence_tracks"] = src.max_tracked_subjects
            bounds[f"{src.name}.pseudonym_cache"] = src.pseudonym_cache_size
            bounds[f"{src.name}.advert_cache"] = src.pseudonym_cache_size
            bounds[f"{src.name}.advert_queue"] = src.queue_size
        elif src.kind == "serial_card":
            bounds[f"{src.name}.debounce"] = CARD_DEBOUNCE_MAX
        elif src.kind == "camera":
            bounds[f"{src.name}.debounce"] = CAMERA_DEBOUNCE_MAX
            bounds["tokens.replay"] = ReplaySet().max_entries  # one set for the daemon
    return bounds


def raw_identifiers(rig: StoreRig, plan: SoakPlan) -> list[str]:
    """Every raw identifier the simulated store shows the daemon (privacy canaries)."""
    raws = [raw for _ns, raw in rig.raw_identities()]
    raws += [card_number(i) for i in range(plan.synthetic_cards)]
    raws += rig.ble_addresses()
    return sorted({*raws, *APP_SUBS})


# ------------------------------------------------------------------------------ sampling


def _proc_status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "Threads"):
            out[key] = int(value.split()[0])
    return out


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


@dataclass
class Timeline:
    """What the harness did when, in simulated days."""

    outages: list[tuple[float, float]] = field(default_factory=list)


def take_sample(gw: Gateway, clock: FastClock, db: Path, broker_up: bool) -> dict[str, Any]:
    st = _proc_status()
    stats = gw.last_stats
    m = gw.metrics
    return {
        "real_s": round(clock.real_elapsed(), 2),
        "sim_days": round(clock.elapsed() / DAY, 4),
        "rss_mib": round(st["VmRSS"] / 1024, 2),
        "fds": sum(1 for _ in Path("/proc/self/fd").iterdir()),
        "threads": st["Threads"],
        "asyncio_tasks": len(asyncio.all_tasks()),
        "broker_up": int(broker_up),
        "depth": int(stats.get("depth", 0)),
        "db_mib": round(_size(db) / 2**20, 3),
        "wal_mib": round(_size(Path(f"{db}-wal")) / 2**20, 3),
        "readings": int(m.total("readings_total")),
        "buffered": int(m.get("events_buffered_total")),
        "forwarded": int(m.get("events_forwarded_total")),
        "sources": {k: int(x) for k, x in m.by_label("readings_total", "source").items()},
        "maps": gw.memory_stats(),
    }


# ----------------------------------------------------------------------------------- run


@dataclass
class SoakRun:
    plan: SoakPlan
    samples: list[dict[str, Any]]
    timeline: Timeline
    bounds: dict[str, int]
    counters: list[tuple[str, dict[str, str], float]]
    stream: str
    db: Path
    work: Path
    log_path: Path
    raw: list[str]
    metrics_text: str
    real_s: float = 0.0
    sim_days: float = 0.0


async def _drive(
    rig: StoreRig, plan: SoakPlan, cfg: Config, clock: FastClock, progress: bool
) -> tuple[Gateway, list[dict[str, Any]], Timeline, str]:
    gw = Gateway(cfg, now=clock)
    runner = asyncio.create_task(gw.run(install_signals=False, drain_timeout=60.0), name="gw")
    samples: list[dict[str, Any]] = []
    timeline = Timeline()
    broker_up, down_since = True, 0.0
    outages = sorted((d * DAY, d * DAY + h * 3600) for d, h in plan.outages)
    db = Path(cfg.buffer.path)
    metrics_text = ""
    next_sample = time.monotonic()
    try:
        await asyncio.wait_for(gw.ready.wait(), 60)
        while (sim := clock.elapsed()) < plan.days * DAY:
            if runner.done():
                runner.result()
                raise RuntimeError("the daemon stopped by itself")
            want_up = not any(lo <= sim < hi for lo, hi in outages)
            if want_up != broker_up:
                await asyncio.to_thread(rig.broker.start if want_up else rig.broker.stop)
                broker_up = want_up
                if want_up:
                    timeline.outages.append((down_since / DAY, clock.elapsed() / DAY))
                else:
                    down_since = clock.elapsed()
                log.info("soak: broker %s at day %.2f", "up" if want_up else "down", sim / DAY)
            if time.monotonic() >= next_sample:
                next_sample += plan.sample_s
                samples.append(take_sample(gw, clock, db, broker_up))
                if progress and len(samples) % 15 == 1:
                    s = samples[-1]
                    print(f"soak: day {s['sim_days']:.2f} rss {s['rss_mib']} MiB fds {s['fds']}"
                          f" depth {s['depth']} forwarded {s['forwarded']:,}",
                          file=sys.stderr, flush=True)  # fmt: skip
            await asyncio.sleep(0.1)
        if not broker_up:
            await asyncio.to_thread(rig.broker.start)
            timeline.outages.append((down_since / DAY, clock.elapsed() / DAY))
        if cfg.health is not None:
            metrics_text = await asyncio.to_thread(_get_metrics, cfg.health.listen)
    finally:
        gw.stop_event.set()
        await runner
    return gw, samples, timeline, metrics_text


def _get_metrics(listen: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as r:
        return str(r.read().decode())


@contextlib.contextmanager
def _environment(bus_address: str, log_path: Path) -> Iterator[None]:
    """The private D-Bus for bleak and the daemon's log in a file, for the run only."""
    old_bus = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = bus_address
    handler = logging.FileHandler(log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    old_level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        handler.close()
        if old_bus is None:
            os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
        else:
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = old_bus


def run_soak(plan: SoakPlan, work: Path, *, progress: bool = False) -> SoakRun:
    """Run the store for ``plan.days`` simulated days; the rig stays in ``work``."""
    work = work.resolve()
    if (work / "rig").exists():  # an earlier run's buffer and central events would mix in
        raise FileExistsError(f"{work / 'rig'} exists: remove it or choose another folder")
    work.mkdir(parents=True, exist_ok=True)
    load = soak_load(plan, work)
    rig = StoreRig(
        work / "rig",
        load,
        consent_exclude=frozenset({HELD_CARD}),
        consent_steps=consent_steps(plan),
        progress=progress,
    )
    log_path = work / "gateway.log"
    with rig:
        cfg = load_config(soak_config(rig, plan))
        with _environment(rig.bus_address, log_path):
            clock = FastClock(plan.rate)
            t0 = time.monotonic()
            gw, samples, timeline, metrics_text = asyncio.run(
                _drive(rig, plan, cfg, clock, progress)
            )
            real_s, sim_days = time.monotonic() - t0, clock.elapsed() / DAY
        _wait_central(rig, gw.outbox.stream, int(gw.metrics.get("events_forwarded_total")))
    return SoakRun(
        plan=plan,
        samples=samples,
        timeline=timeline,
        bounds=map_bounds(cfg, gw, len(raw_identifiers(rig, plan))),
        counters=list(gw.metrics.counters()),
        stream=gw.outbox.stream,
        db=Path(cfg.buffer.path),
        work=work,
        log_path=log_path,
        raw=raw_identifiers(rig, plan),
        metrics_text=metrics_text,
        real_s=real_s,
        sim_days=sim_days,
    )


def _wait_central(rig: StoreRig, stream: str, forwarded: int, timeout: float = 60.0) -> None:
    """Wait until the central has written every event the broker acknowledged."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stats = json.loads(rig.central_stats.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stats = {}
        got = sum(
            int(info.get("count", 0))
            for key, info in stats.get("streams", {}).items()
            if key.endswith(f"/{stream}")
        )
        if got >= forwarded:
            return
        time.sleep(0.5)


def machine() -> dict[str, str]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="ascii").splitlines():
            if line.startswith("model name"):
                cpu = line.partition(":")[2].strip()
                break
    return {
        "platform": platform.platform(),
        "cpu": cpu or platform.machine(),
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "load_at_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> int:
    from tests.soak.analysis import check, write_outputs

    parser = argparse.ArgumentParser(
        prog="python -m tests.soak.soak_run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--days", type=float, default=7.0, help="simulated days (default 7)")
    parser.add_argument("--minutes", type=float, default=10.0, help="real minutes (default 10)")
    parser.add_argument("--out", type=Path, required=True, help="folder for samples, plot, rig")
    parser.add_argument("--report", type=Path, help="also write REPORT.md and soak.png here")
    args = parser.parse_args(argv)
    plan = SoakPlan(days=args.days, real_s=args.minutes * 60)
    result = run_soak(plan, args.out / "work", progress=True)
    verdict = check(result, flat_checks=True)
    write_outputs(result, verdict, args.out, machine())
    if args.report is not None:
        write_outputs(result, verdict, args.report, machine(), committed=True)
    for line in verdict.lines():
        print(line)
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    sys.exit(main())
