"""A fleet worker: N real ``Gateway`` objects in one process, one asyncio task each.

    python -m tests.fleet.fleet_harness --port 1883 --workdir /tmp/fleet --first 0 \\
        --count 25 --rate 2 --reconnect-min 0.5 --reconnect-max 5

Why this is the code path of ``touchpoint-gateway run``, only packed differently:

- each gateway gets its own folder with a ``gateway.toml``, a key file, a consent seed
  and its own SQLite buffer, and is built exactly as ``gateway.app.cli.cmd_run`` builds it:
  ``Gateway(load_config(path), config_path=path)`` then ``await gw.run()``.  So each one
  runs the real config validation, Outbox (own writer thread, WAL, ``synchronous=FULL``),
  consent gate, Forwarder, PahoPublisher (own paho network thread, own socket, jittered
  reconnect backoff) and the registry's ``synthetic`` source at store rate;
- nothing is replaced or patched.  The harness only *observes*: after ``gw.ready`` it adds
  a hook with the public ``PahoPublisher.on_connect`` (the hook the daemon itself uses to
  publish ``online``), which stamps the wall-clock time of every successful connect;
- what differs is process packing: ``run(install_signals=False)`` because one process
  holds many gateways, and the worker's own SIGTERM handler sets every ``gw.stop_event``
  (what ``run()`` installs per process: ``add_signal_handler(SIGTERM, stop_event.set)``),
  so each gateway runs its normal stop sequence (drain, ``offline``, disconnect).

While running, the worker rewrites ``state.json`` twice a second (connect times per
gateway); after a stop it writes ``result.json``: per gateway the buffer's stream,
last_seq, depth and dead letters (read with ``buffer_stats``, as ``status`` does), its
connect times and its MQTT counters.  Exit status 0 only if every gateway stopped cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from drivers.synthetic import card_number
from gateway.app.daemon import Gateway
from gateway.buffer.outbox import buffer_stats, connect
from gateway.config.credentials import write_secret
from gateway.config.loading import load_config
from gateway.identity.pseudonyms import Keyring, decode_key
from gateway.observe.logs import setup_logging
from simulators.infra.broker import free_port

KEY_B64 = "Ok41XFEl/DeKy6pux3hFfJerdJWtAhOlimOtK81inSo="  # not the published vector key
CARDS = 20
DEVICES_PER_STORE = 2

_current = contextvars.ContextVar("fleet_gateway", default="-")


def identity(index: int) -> tuple[str, str]:
    """Gateway ``index`` of the fleet: two devices per store (store, device)."""
    return f"st-{index // DEVICES_PER_STORE:04d}", f"gw-{index % DEVICES_PER_STORE + 1:02d}"


def consented_subjects() -> list[str]:
    ring = Keyring({"k1": decode_key(KEY_B64, "k")}, "k1")
    return [ring.pseudonym("loyalty", card_number(i)) for i in range(CARDS)]


def write_gateway_dir(
    folder: Path,
    *,
    store: str,
    device: str,
    port: int,
    rate: float,
    reconnect_min: float,
    reconnect_max: float,
    subjects: list[str],
    mqtt_extra: str = "",
    health_interval: float = 120.0,
    faulty: bool = False,
) -> Path:
    """One store box's files, as provisioning would lay them out; returns the config."""
    folder.mkdir(parents=True, exist_ok=True)
    write_secret(folder / "k1.key", KEY_B64 + "\n")
    records = [
        {"subject": s, "purposes": ["analytics", "linking"], "expires": None} for s in subjects
    ]
    (folder / "seed.json").write_text(json.dumps({"records": records}), encoding="utf-8")
    config = folder / "gateway.toml"
    config.write_text(
        f"""
[gateway]
store = "{store}"
device = "{device}"
[keyring]
active = "k1"
[keyring.keys]
k1 = "k1.key"
[buffer]
path = "buffer.db"
disk_reserve_bytes = 0  # 200 gateways on one disk
[mqtt]
host = "127.0.0.1"
port = {port}
keepalive_s = 10
reconnect_min_s = {reconnect_min}
reconnect_max_s = {reconnect_max}
connect_timeout_s = 3
inflight_window = 10
batch_max_events = 200
{mqtt_extra}
[consent]
seed_file = "seed.json"
[status]
summary_interval_s = 600
health_interval_s = {health_interval}
health_min_interval_s = 1
[[sources]]
kind = "synthetic"
name = "till"
rate_per_s = {rate}
cards = {CARDS}
"""
        + (
            FAULTY_READER.format(device=folder / "unplugged-reader", port=free_port())
            if faulty
            else ""
        ),
        encoding="utf-8",
    )
    return config


# A card reader that is not plugged in, judged after 3 s (the default is 5 minutes): the
# failure a store's fleet view must show.
FAULTY_READER = """
[[sources]]
kind = "serial_card"
name = "till-card"
device = "{device}"
protocol = "rdm6300"
lane = "till-1"
reopen_min_s = 0.5
reopen_max_s = 2
[health]
listen = "127.0.0.1:{port}"
source_down_s = 3
"""


@dataclass
class Member:
    store: str
    device: str
    config: Path
    gateway: Gateway | None = None
    connects: list[float] = field(default_factory=list)
    error: str | None = None

    def state(self) -> dict[str, Any]:
        gw = self.gateway
        return {
            "store": self.store,
            "device": self.device,
            "connects": self.connects,
            "connected": bool(gw is not None and gw.publisher and gw.publisher.connected),
        }

    def result(self) -> dict[str, Any]:
        out = self.state()
        out["error"] = self.error
        if self.gateway is not None:
            m = self.gateway.metrics
            out["mqtt_reconnects_total"] = m.get("mqtt_reconnects_total")
            out["mqtt_connect_failures_total"] = m.get("mqtt_connect_failures_total")
            out["events_forwarded_total"] = m.get("events_forwarded_total")
            path = Path(self.gateway.cfg.buffer.path)
            conn = connect(path, readonly=True)
            try:
                out["buffer"] = buffer_stats(conn, time.time())
            finally:
                conn.close()
        return out


class _GatewayName(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = f"[{_current.get()}] {record.msg}"
        return True


async def _run_member(member: Member, stagger: float) -> None:
    _current.set(f"{member.store}/{member.device}")  # inherited by the gateway's tasks
    await asyncio.sleep(stagger)
    gw = Gateway(load_config(member.config), config_path=member.config)
    member.gateway = gw

    async def observe() -> None:
        await gw.ready.wait()  # set just before publisher.start(): no connect is missed
        assert gw.publisher is not None
        gw.publisher.on_connect(lambda: member.connects.append(time.time()))  # type: ignore[attr-defined]

    watcher = asyncio.create_task(observe(), name=f"observe:{member.store}/{member.device}")
    try:
        await gw.run(install_signals=False, drain_timeout=20.0)
    except Exception as exc:
        member.error = f"{exc.__class__.__name__}: {exc}"
        raise
    finally:
        watcher.cancel()


def _write_json(path: Path, doc: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc), encoding="utf-8")
    tmp.replace(path)


async def run_worker(args: argparse.Namespace) -> int:
    workdir: Path = args.workdir
    subjects = consented_subjects()
    members = []
    for index in range(args.first, args.first + args.count):
        store, device = identity(index)
        config = write_gateway_dir(
            workdir / f"{store}-{device}",
            store=store,
            device=device,
            port=args.port,
            rate=args.rate,
            reconnect_min=args.reconnect_min,
            reconnect_max=args.reconnect_max,
            subjects=subjects,
            health_interval=args.health_interval,
            faulty=index in args.faulty,
        )
        members.append(Member(store, device, config))
    state_path = workdir / f"state-{args.first}.json"
    result_path = workdir / f"result-{args.first}.json"
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)

    async def publish_state() -> None:
        while True:
            _write_json(state_path, {"pid": os.getpid(), "gateways": [m.state() for m in members]})
            await asyncio.sleep(0.5)

    async def stop_all() -> None:
        await stopping.wait()
        for m in members:
            if m.gateway is not None:
                m.gateway.stop_event.set()

    failed = False
    try:
        async with asyncio.TaskGroup() as tg:
            state_task = tg.create_task(publish_state(), name="state")
            stopper = tg.create_task(stop_all(), name="stop-all")
            runs = [
                tg.create_task(
                    _run_member(m, i * args.stagger), name=f"gateway:{m.store}/{m.device}"
                )
                for i, m in enumerate(members)
            ]
            await asyncio.gather(*runs)
            state_task.cancel()
            stopper.cancel()
    except* Exception:
        logging.getLogger(__name__).exception("a gateway failed")
        failed = True
    results = []
    for m in members:
        try:
            results.append(m.result())
        except Exception as exc:  # e.g. a buffer that was never created
            results.append({**m.state(), "error": m.error or repr(exc)})
            failed = True
    _write_json(result_path, {"pid": os.getpid(), "gateways": results})
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.fleet.fleet_harness",
        description="Run several real Gateway objects in one process against one broker.",
    )
    parser.add_argument("--port", type=int, required=True, help="broker port on 127.0.0.1")
    parser.add_argument("--workdir", type=Path, required=True, help="one folder per gateway")
    parser.add_argument("--first", type=int, default=0, help="index of the first gateway")
    parser.add_argument("--count", type=int, default=25, help="gateways in this process")
    parser.add_argument("--rate", type=float, default=2.0, help="events/s per gateway")
    parser.add_argument("--reconnect-min", type=float, default=0.5, help="mqtt.reconnect_min_s")
    parser.add_argument("--reconnect-max", type=float, default=5.0, help="mqtt.reconnect_max_s")
    parser.add_argument(
        "--stagger", type=float, default=0.02, help="seconds between gateway starts"
    )
    parser.add_argument("--log-level", default="info", help="logging level (info)")
    parser.add_argument(
        "--health-interval", type=float, default=120.0, help="status.health_interval_s"
    )
    parser.add_argument(
        "--faulty",
        type=lambda text: {int(i) for i in text.split(",") if i},
        default=set(),
        help="indices of gateways given an unplugged card reader (comma-separated)",
    )
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    setup_logging(args.log_level)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_GatewayName())
    return asyncio.run(run_worker(args))


if __name__ == "__main__":
    sys.exit(main())
