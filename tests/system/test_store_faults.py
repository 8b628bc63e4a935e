"""Faults against the real daemon running every source of the simulated store.

The store rig (``simulators.rig.store``) runs the broker, the fake central, the card
reader on a pty, the fake BlueZ, the kiosk camera, the printer and a till; the daemon runs
as its own process on the rig's config.  Ground truth for delivery: seqs are assigned
contiguously in commit order, so the events committed in a stream are exactly
1..last_seq, and the central must hold every one of them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from drivers.synthetic import card_number
from simulators.infra.broker import Mosquitto, free_port
from simulators.rig.store import StoreRig
from tests.system.harness import (
    ConfigGatewayProc,
    GatewayProc,
    assert_all_delivered,
    by_source,
    healthz,
    metrics,
)

pytestmark = pytest.mark.slow

DEVICE = "gw-rig"
# The rig's config keeps the MQTT defaults: a batch holds at most 500 events and at most
# 20 batches are in flight, so one crash can resend at most WINDOW * BATCH events.
WINDOW, BATCH = 20, 500


# ---- helpers --------------------------------------------------------------------------


def wait_until(
    what: str, check: Callable[[], bool], timeout: float = 60, every: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, ValueError):  # the endpoint is (re)starting
            if check():
                return
        time.sleep(every)
    raise TimeoutError(f"not within {timeout:.0f}s: {what}")


def central_stats(rig: StoreRig) -> dict[str, Any]:
    for _ in range(50):
        with contextlib.suppress(OSError, ValueError):  # being rewritten
            data: dict[str, Any] = json.loads(rig.central_stats.read_text(encoding="utf-8"))
            return data
        time.sleep(0.1)
    raise AssertionError(f"no readable stats from the central at {rig.central_stats}")


def central_seqs(rig: StoreRig, stream: str) -> set[int]:
    return {
        int(e["seq"])
        for e in rig.central_events()
        if e["device"] == DEVICE and e["stream"] == stream
    }


class RawScan:
    """Every raw identifier the rig shows the daemon, to look for in the daemon's files."""

    def __init__(self, rig: StoreRig) -> None:
        self.exact: list[tuple[str, bytes]] = []
        for ns, raw in rig.raw_identities():
            for form in {raw, raw.lower(), raw.upper()}:
                self.exact.append((ns, form.encode()))
        for address in rig.ble_addresses():
            for form in {address, address.lower()}:
                self.exact.append(("BLE address", form.encode()))
        # The synthetic cards are many: find every candidate with one pattern.
        self.cards = {card_number(i).encode() for i in range(rig.load.synthetic_cards)}
        self.card_pattern = re.compile(rb"2600[0-9]{9}")

    def leaks(self, path: Path) -> list[str]:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return []
        out = [
            f"{path.name}: raw {ns} identifier at offset {data.find(form)}"
            for ns, form in self.exact
            if form in data
        ]
        out += [
            f"{path.name}: raw synthetic card number at offset {m.start()}"
            for m in self.card_pattern.finditer(data)
            if m.group() in self.cards
        ]
        return out

    def assert_clean(self, files: list[Path], when: str) -> None:
        leaks = [leak for f in files for leak in self.leaks(f)]
        assert not leaks, f"{when}: raw identifiers on disk: {leaks[:5]}"


def daemon_files(rig: StoreRig, gw: ConfigGatewayProc) -> list[Path]:
    """Everything the daemon writes: the buffer with its WAL and shm, the receipt
    counters, and its log (stdout and stderr, so crash output too)."""
    out = []
    for db in (gw.db, rig.work / "receipt-counters.db"):
        out += [db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")]
    return [*out, gw.log]


def wait_committed_past(gw: GatewayProc, seq: int, timeout: float = 60) -> None:
    def past() -> bool:
        try:
            return gw.db.exists() and gw.last_seq() > seq
        except sqlite3.Error:  # created, not yet migrated
            return False

    try:
        wait_until(f"the daemon commits past seq {seq}", past, timeout, every=0.05)
    except TimeoutError as exc:
        raise TimeoutError(f"no commit past seq {seq}; log:\n{gw.log.read_text()[-3000:]}") from exc


@pytest.fixture
def reaper() -> Iterator[list[GatewayProc]]:
    """Daemons a test started: killed at teardown when a failure left them running."""
    procs: list[GatewayProc] = []
    yield procs
    for gw in procs:
        if gw.alive():
            gw.kill9()


# ---- 1. kill -9 at random moments under load from every simulator ---------------------


@pytest.fixture
def loaded_rig(tmp_path: Path) -> Iterator[StoreRig]:
    from simulators.rig.store import RigLoad

    load = RigLoad(synthetic_rate=200, till_interval_s=0.3)
    with StoreRig(tmp_path / "rig", load) as rig:
        yield rig


KILLS = 20
EVERY_SOURCE = {"bulk-cards", "till-2-card", "entrance-ble", "kiosk-cam", "till-2-printer"}


# About 100 s on an idle 2-core box, 3 min on a busy one.
def test_kill9_at_random_moments_under_store_load(
    loaded_rig: StoreRig, reaper: list[GatewayProc]
) -> None:
    rig = loaded_rig
    gw = ConfigGatewayProc(rig.write_config(), env=rig.env())
    reaper.append(gw)
    scan = RawScan(rig)
    rng = random.Random(20261122)
    committed = resendable = 0
    for crash in range(KILLS):
        gw.start()
        wait_committed_past(gw, committed)  # this run is up, reading and committing
        if crash == 0:  # BLE presence takes seconds to decide: let every source deliver once
            wait_until(
                "the central holds events from every source",
                lambda: by_source_of_central(rig) >= EVERY_SOURCE,
                90,
                every=0.5,
            )
        time.sleep(rng.uniform(0.0, 1.0))
        gw.kill9()
        committed = gw.last_seq()
        # What the next run may send again: the unacknowledged rows, at most a window.
        resendable += min(gw.depth(), WINDOW * BATCH)
        scan.assert_clean(daemon_files(rig, gw), f"after crash {crash + 1}")

    gw.drain_and_stop()  # restarted with no sources: forwards the backlog, stops cleanly
    scan.assert_clean(daemon_files(rig, gw), "after the drain")
    stream, last = gw.stream(), gw.last_seq()
    want = set(range(1, last + 1))
    with contextlib.suppress(TimeoutError):
        wait_until(
            "the central holds every committed seq", lambda: central_seqs(rig, stream) >= want, 30
        )
    got = central_seqs(rig, stream)
    stats = central_stats(rig)
    assert stats["invalid_total"] == 0, (
        f"the central refused {stats['invalid_total']} batch(es): {stats['last_invalid']}"
    )
    missing = sorted(want - got)
    assert not missing, (
        f"{len(missing)} of {last} committed events never reached the central: "
        f"seq {missing[:3]}..{missing[-3:]}"
    )
    assert got == want, "the central holds events that were never committed"
    assert by_source_of_central(rig) >= EVERY_SOURCE
    assert stats["conflicts"] == 0, "a resent event differs from the first copy"
    assert stats["duplicates"] <= resendable, (
        f"{stats['duplicates']} duplicates, but only {resendable} events were unacknowledged "
        "at the crashes"
    )


def by_source_of_central(rig: StoreRig) -> set[str]:
    return {str(e["source"]) for e in rig.central_events() if e["device"] == DEVICE}


# ---- 2. hardware faults, one at a time ------------------------------------------------

SOURCES = {
    "cards": "till-2-card",
    "camera": "kiosk-cam",
    "ble": "entrance-ble",
    "printer": "till-2-printer",
}


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[StoreRig, ConfigGatewayProc]]:
    from simulators.rig.store import RigLoad

    with StoreRig(tmp_path / "rig", RigLoad(till_interval_s=1.0)) as rig:
        text = rig.config_text()
        # A small BLE watchdog, so a silent BlueZ is noticed within seconds.
        assert "watchdog_s = 20\n" in text
        cfg = rig.work / "gateway.toml"
        cfg.write_text(text.replace("watchdog_s = 20\n", "watchdog_s = 2\n"), encoding="utf-8")
        gw = ConfigGatewayProc(cfg, env=rig.env())
        gw.start()
        try:
            yield rig, gw
        finally:
            if gw.alive():
                gw.stop()


def source_doc(port: int) -> dict[str, dict[str, Any]]:
    sources: dict[str, dict[str, Any]] = healthz(port)[1]["sources"]
    return sources


def readings(port: int) -> dict[str, float]:
    return by_source(metrics(port), "readings_total")


class Fault:
    """Start and end one hardware fault on the rig."""

    def __init__(self, rig: StoreRig, name: str) -> None:
        self.rig, self.name = rig, name

    def begin(self) -> None:
        if self.name == "ble":  # BlueZ hangs: its process stops answering and sending
            os.kill(self.rig.pids()["ble"], signal.SIGSTOP)
        else:  # a reader unplugged, a stream dropped, a printer refusing connections
            self.rig.stop(self.name)

    def end(self) -> None:
        if self.name == "ble":
            os.kill(self.rig.pids()["ble"], signal.SIGCONT)
        else:
            self.rig.start(self.name)


@pytest.mark.parametrize("fault", sorted(SOURCES))
def test_hardware_fault_is_visible_isolated_and_recovers(
    store: tuple[StoreRig, ConfigGatewayProc], fault: str
) -> None:
    rig, gw = store
    port = rig.health_port
    assert port is not None
    faulty = SOURCES[fault]
    others = [s for s in SOURCES.values() if s != faulty]
    assert gw.proc is not None
    pid = gw.proc.pid

    def all_reading() -> bool:
        doc = source_doc(port)
        return all(doc.get(s, {}).get("readings", 0) > 0 for s in SOURCES.values()) and (
            doc[faulty]["state"] == "ok"
        )

    wait_until("every source produces readings and the one to fail is ok", all_reading, 90)

    fault_ = Fault(rig, fault)
    fault_.begin()
    try:
        wait_until(
            f"/healthz shows {faulty} not ok",
            lambda: source_doc(port)[faulty]["state"] != "ok",
            30,
        )
        during = source_doc(port)[faulty]
        assert during["detail"], f"{faulty} is {during['state']} without a reason"
        start = readings(port)

        def others_produce() -> bool:
            doc = source_doc(port)
            assert doc[faulty]["state"] != "ok", f"{faulty} ok while its hardware is away"
            now = readings(port)
            return all(now.get(s, 0) > start.get(s, 0) for s in others)

        wait_until("every other source keeps producing readings", others_produce, 90, every=0.5)
        at_end = readings(port).get(faulty, 0)
    finally:
        fault_.end()

    def recovered() -> bool:
        doc = source_doc(port)
        return doc[faulty]["state"] == "ok" and readings(port).get(faulty, 0) > at_end

    wait_until(f"{faulty} recovers and reads again", recovered, 90, every=0.5)
    assert gw.alive() and gw.proc is not None and gw.proc.pid == pid, "recovered in-process"
    assert gw.stop() == 0


# ---- 3. disk full under load ------------------------------------------------------------


def counted(port: int, policy: str) -> float:
    m = metrics(port)
    if policy == "evict_oldest":
        return sum(m.get("events_evicted_total", {}).values())
    return sum(
        v for k, v in m.get("events_dropped_total", {}).items() if ("reason", "buffer_full") in k
    )


def make_offline_gateway(tmp_path: Path, broker_port: int, policy: str, **kw: Any) -> GatewayProc:
    from gateway.identity.pseudonyms import Keyring, decode_key
    from tests.system.harness import KEY_B64, synthetic
    from tests.system.harness import card_number as harness_card

    ring = Keyring({"k1": decode_key(KEY_B64, "k")}, "k1")
    consented = [ring.pseudonym("loyalty", harness_card(i)) for i in range(50)]
    extra = kw.pop("buffer_extra", "")
    return GatewayProc(
        tmp_path / "gw",
        broker_port,
        sources=synthetic(5000),
        consented=consented,
        buffer_extra=f'when_full = "{policy}"\n{extra}',
        health_port=free_port(),
        **kw,
    )


def broker_returns_and_backlog_forwards(
    tmp_path: Path, gw: GatewayProc, broker_port: int, backlog: float
) -> str:
    """Start the broker: the daemon forwards more than ``backlog`` events and is healthy;
    then it stops cleanly.  Returns its log."""
    port = gw.health_port
    assert port is not None
    with Mosquitto(tmp_path / "mq", port=broker_port):

        def forwarding() -> bool:
            m = metrics(port)
            return m["events_forwarded_total"][()] > backlog and healthz(port)[0] == 200

        wait_until("the daemon forwards the backlog and is healthy", forwarding, 90, every=0.5)
        assert gw.alive()
        assert gw.stop() == 0
    return gw.log.read_text()


def fill_apply_and_recover(
    tmp_path: Path,
    gw: GatewayProc,
    broker_port: int,
    policy: str,
    *,
    fill: Callable[[], None] = lambda: None,
    space_returns: Callable[[], None] = lambda: None,
) -> None:
    """Broker away, so the buffer fills: the policy applies, is counted and shown, the
    daemon keeps running; then space returns and the broker comes back: it forwards."""
    port = gw.health_port
    assert port is not None
    gw.start()
    gw.wait_ready()
    fill()
    wait_until(f"the {policy} policy is counted in /metrics", lambda: counted(port, policy) > 0, 60)
    time.sleep(2.0)  # the buffer stays full under load for a while
    assert gw.alive(), "the daemon keeps running with a full buffer"
    doc = healthz(port)[1]
    assert doc["buffer"]["last_write_ok"], f"the policy keeps the buffer writable: {doc}"
    assert "buffer full" in doc["last_error"].get("buffer", ""), doc["last_error"]
    m = metrics(port)
    assert m["buffer_write_ok"][()] == 1
    assert m["buffer_depth"][()] > 0
    full_depth = m["buffer_depth"][()]
    space_returns()
    log = broker_returns_and_backlog_forwards(tmp_path, gw, broker_port, full_depth)
    assert "Traceback" not in log, log[-3000:]
    assert "buffer write failed" not in log, "the policy applies before writes fail"


@pytest.mark.parametrize("policy", ["evict_oldest", "drop_new"])
def test_size_cap_fills_under_load_policy_applies_and_recovers(
    tmp_path: Path, policy: str, reaper: list[GatewayProc]
) -> None:
    broker_port = free_port()
    gw = make_offline_gateway(tmp_path, broker_port, policy, buffer_extra="max_bytes = 1048576")
    reaper.append(gw)
    fill_apply_and_recover(tmp_path, gw, broker_port, policy)
    assert gw.status_json()["db_bytes"] <= 1048576


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB tmpfs, or a skip where mounting is not permitted (not root)."""
    mnt = tmp_path / "small-fs"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the size-cap variant runs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("policy", ["evict_oldest", "drop_new"])
def test_small_filesystem_fills_under_load_policy_applies_and_recovers(
    tmp_path: Path, small_fs: Path, policy: str, reaper: list[GatewayProc]
) -> None:
    """The filesystem is smaller than max_bytes (256 MiB by default): the buffer caps
    itself by the free space (keeping room for the WAL) and applies the policy instead
    of failing writes with ENOSPC; when the filesystem grows and the broker is back,
    it forwards."""
    broker_port = free_port()
    gw = make_offline_gateway(tmp_path, broker_port, policy, buffer_path=small_fs / "buffer.db")
    reaper.append(gw)

    def grow() -> None:
        subprocess.run(["mount", "-o", "remount,size=32m", str(small_fs)], check=True)

    fill_apply_and_recover(tmp_path, gw, broker_port, policy, space_returns=grow)


def fill_to_the_last_byte(path: Path) -> int:
    """Write ``path`` until the filesystem refuses another byte (another process filling
    the disk); returns the bytes written."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 1 << 10, 1):
            block = b"\0" * size
            while True:
                try:
                    written += os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    finally:
        os.close(fd)
    return written


def test_filesystem_filled_by_another_process_then_freed(
    tmp_path: Path, small_fs: Path, reaper: list[GatewayProc]
) -> None:
    """Another process takes the buffer's filesystem to its last byte while the broker is
    away: the daemon gives back its disk reserve so evict_oldest can still make room,
    keeps running, says so in /healthz, loses nothing it does not count, and once the
    space is freed it forwards the backlog."""
    # room for the disk reserve (made when the filesystem has 4x its size free)
    subprocess.run(["mount", "-o", "remount,size=32m", str(small_fs)], check=True)
    broker_port = free_port()
    gw = make_offline_gateway(tmp_path, broker_port, "evict_oldest",
                              buffer_path=small_fs / "buffer.db")  # fmt: skip
    reaper.append(gw)
    port = gw.health_port
    assert port is not None
    gw.start()
    gw.wait_ready()
    depth = lambda: metrics(port).get("buffer_depth", {}).get((), 0)  # noqa: E731
    wait_until("events are buffered", lambda: depth() > 1000, 30)
    filler = small_fs / "filler"
    assert fill_to_the_last_byte(filler) > 0

    # the reserve beside the buffer is given back, so evict_oldest still makes room
    wait_until("the policy applies on the full disk", lambda: counted(port, "evict_oldest") > 0, 60)
    time.sleep(2.0)  # the disk stays full under load for a while
    assert gw.alive(), "the daemon keeps running on a full disk"
    assert healthz(port)[1]["last_error"].get("buffer"), "the buffer's trouble is shown"
    filler.unlink()

    def buffering_again() -> bool:
        before = metrics(port)["events_buffered_total"][()]
        time.sleep(0.5)
        m = metrics(port)
        return m["buffer_write_ok"][()] == 1 and m["events_buffered_total"][()] > before

    wait_until("writes succeed again once space is freed", buffering_again, 60)
    backlog = depth()
    log = broker_returns_and_backlog_forwards(tmp_path, gw, broker_port, backlog)
    assert "Traceback" not in log
    assert "released the 2.0 MiB reserve beside the buffer" in log
    # every card read is accounted for: buffered, or lost to the full disk and counted
    final = log.split("stopped: ")[-1].splitlines()[0]
    fields = {k: v for k, _, v in (f.rpartition(" ") for f in final.split(", "))}
    read, buffered = int(fields["read"]), int(fields["buffered"])
    assert read == buffered + int(fields.get("lost(buffer)", 0)), final
    assert int(fields["evicted"]) > 0, final


# ---- 4. a lossy link to the broker ------------------------------------------------------


@pytest.mark.parametrize("fault", ["lose_pubacks", "swallow_pubacks", "cut_mid_publish"])
def test_lossy_link_duplicates_but_never_loses(
    tmp_path: Path, fault: str, reaper: list[GatewayProc]
) -> None:
    """PUBACKs lost with the link (the broker has the batch, the daemon does not know),
    PUBACKs lost on a link that stays up (MQTT sends nothing again on a live link: the
    daemon must break it after ``puback_timeout_s``), and links cut half way through a
    batch: every committed event reaches the central, duplicates stay within the
    in-flight window per broken link."""
    from simulators.central.service import Central
    from simulators.infra.netproxy import NetProxy

    window, batch = 10, 200  # GatewayProc's inflight_window and batch_max_events
    with (
        Mosquitto(tmp_path / "mq", persistence=True) as broker,
        Central("127.0.0.1", broker.port, out=tmp_path / "central.jsonl") as central,
        NetProxy(broker.port, mqtt=True) as proxy,
    ):
        assert central.wait_subscribed(10)
        gw = make_offline_gateway(
            tmp_path, proxy.port, "evict_oldest", mqtt_extra="puback_timeout_s = 1.5\n"
        )
        reaper.append(gw)
        getattr(proxy, fault)(every=7)
        gw.start()
        gw.wait_ready()

        def broken() -> int:
            if fault == "swallow_pubacks":  # the daemon breaks the link; one break per stall
                return gw.log.read_text().count("disconnected from broker")
            return proxy.pubacks_lost + proxy.publishes_cut

        wait_until("the link breaks five times", lambda: broken() >= 5, 90)
        proxy.clear_faults()
        assert gw.alive()
        assert gw.stop() == 0
        gw.drain_and_stop()
        lost = broken() + proxy.pubacks_swallowed
        stats = assert_all_delivered(gw, central, max_dupes=(lost + 2) * window * batch)
        if fault != "cut_mid_publish":
            assert stats["duplicates"] > 0, "a lost PUBACK makes the batch come again"
        assert gw.log.read_text().count("disconnected from broker") >= 5
