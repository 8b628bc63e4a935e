"""``python -m tests.bench journal``: what journald writes to the card in a busy store.

How it is measured: four real ``systemd-journald`` processes run at once, each alone in
a private mount namespace (``unshare --mount --propagation private``): tmpfs over
``/run`` (its sockets, ``/run/log/journal``), over ``/etc/systemd`` (the host's
journald.conf is not read; the variant's drop-in directory is bind-mounted at
``/etc/systemd/journald.conf.d``) and over ``/var/log``, and a fresh ext4 on a loop
device (``tests.bench.wear.loop_filesystem``) bind-mounted at ``/var/log/journal``, where
a store box's SD card would be.  Nothing of the host's /run, /etc or /var/log is touched;
the namespace ends with its journald.  Each journald is asked to flush to
/var/log/journal (``journalctl --flush``, as ``systemd-journal-flush.service`` does at
boot).  The variants:

    idle          journald's defaults (Storage=auto, persistent as /var/log/journal
                  exists), nothing sent to it: what journald writes on its own (the
                  same-run reference)
    defaults      journald's defaults, the daemon's log
    volatile      systemd/README.md's recommendation (Storage=volatile ...), the daemon's
                  log; goal: 0 B/h to the card
    persistent    README's alternative (SystemMaxUse=64M, SyncIntervalSec=15min ...)

The whole simulated store runs at a busy store's rates (``tests.bench.memory.busy_store``:
``StoreRig``, every source at load) and the real daemon runs as a process
(``touchpoint-gateway run``) at the default log level (``info``).  systemd-cat (252) does
not set ``JOURNAL_STREAM``, so the bench gives the daemon's stderr what systemd gives a
service's: a Unix stream socket named in ``JOURNAL_STREAM`` (device:inode), so the daemon
writes ``<N>`` priority prefixes.  The bench reads its other end and copies each byte to
the three variants' journald stdout streams (the protocol ``sd_journal_stream_fd`` and
systemd use, level prefixes parsed by journald).

The window starts once every source has reached the fake central (and a warm-up); at its
start and end each journald is synced (``journalctl --sync``) and its filesystem synced
(syncfs) before ``/sys/block/loopN/stat`` is read.  journald fsyncs by itself only every
SyncIntervalSec (5 min by default), but the kernel writes its dirty mmap'd pages back
every ~30 s anyway; the figures give what reached the device by itself in the window and
what the forced final sync added, and the rate per hour of their sum.  The daemon's lines
and bytes of text are read back from the defaults variant's journal
(``journalctl -o json``, the window's entries of its identifier), with their priorities.

Needs root (losetup, mount, unshare); elsewhere it says so and exits non-zero.

    from tests.bench.journal import bench_journal, print_journal
    print_journal(bench_journal(quick=True))
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench.goals import judge, verdict
from tests.bench.memory import READY_LIMIT_S, _ready, busy_store, stop
from tests.bench.wear import WearUnavailable, device_counters, loop_filesystem, syncfs

JOURNALD = Path("/lib/systemd/systemd-journald")
IDENTIFIER = "touchpoint-gateway"
EXPECTED_SOURCES = ("till-2-card", "entrance-ble", "kiosk-cam", "till-2-printer", "bulk-cards")
_DIGITS = re.compile(r"\d+")
SYSLOG_LEVELS = {2: "CRITICAL", 3: "ERROR", 4: "WARNING", 6: "INFO", 7: "DEBUG"}

# systemd/README.md's journald.conf.d/touchpoint.conf: volatile, or persistent bounded
_COMMON = "RateLimitIntervalSec=30s\nRateLimitBurst=1000\nForwardToSyslog=no\n"
VARIANTS: dict[str, tuple[str, bool]] = {  # name: (drop-in, gets the daemon's log)
    "idle": ("", False),
    "defaults": ("", True),
    "volatile": ("[Journal]\nStorage=volatile\nRuntimeMaxUse=32M\n" + _COMMON, True),
    "persistent": (
        "[Journal]\nStorage=persistent\nSystemMaxUse=64M\nSyncIntervalSec=15min\n" + _COMMON,
        True,
    ),
}

# in the namespace: $1 the drop-in directory, $2 the loop filesystem's mount point
_NAMESPACE_SH = """set -eu
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/systemd /run/log
mount -t tmpfs -o mode=0755 tmpfs /etc/systemd
mkdir /etc/systemd/journald.conf.d
mount --bind "$1" /etc/systemd/journald.conf.d
mount -t tmpfs -o mode=0755 tmpfs /var/log
mkdir /var/log/journal
mount --bind "$2" /var/log/journal
exec "$3"
"""


class JournalUnavailable(WearUnavailable):
    """journald cannot be run here (not root, no journald, unshare or nsenter)."""


def check_available() -> None:
    """Raise JournalUnavailable saying what is missing."""
    if os.geteuid() != 0:
        raise JournalUnavailable(
            "bench journal needs root (losetup, mount, unshare of a mount namespace)"
        )
    if not JOURNALD.exists():
        raise JournalUnavailable(f"bench journal needs systemd-journald ({JOURNALD})")
    for tool in ("unshare", "nsenter", "journalctl", "losetup", "mkfs.ext4"):
        if shutil.which(tool) is None:
            raise JournalUnavailable(f"bench journal needs {tool}")


@dataclass
class Journald:
    """One journald in its own mount namespace over a loop filesystem."""

    name: str
    mnt: Path
    dev: str
    proc: subprocess.Popen[bytes]
    log: Path
    stream: socket.socket | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid  # unshare and sh exec: this is journald

    def path(self, inside: str) -> str:
        """A path in its namespace, seen from outside (through /proc/PID/root)."""
        return f"/proc/{self.pid}/root{inside}"

    def ctl(self, *args: str, timeout: float = 60) -> str:
        """``journalctl ARGS`` in its namespace."""
        argv = ["nsenter", "--target", str(self.pid), "--mount", "journalctl", *args]
        done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{self.name}: journalctl {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def counters(self) -> int:
        return device_counters(self.dev)[0]

    def sync(self) -> None:
        """journald's own sync, then the filesystem's: every byte so far is on the device."""
        self.ctl("--sync")
        syncfs(self.mnt)

    def open_stream(self, identifier: str) -> socket.socket:
        """A stdout stream to it, as ``sd_journal_stream_fd`` opens one (level prefixes on)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.path("/run/systemd/journal/stdout"))
        s.shutdown(socket.SHUT_RD)
        # identifier, unit id, priority, level prefix, to syslog, to kmsg, to console
        s.sendall(f"{identifier}\n\n6\n1\n0\n0\n0\n".encode())
        return s


@contextlib.contextmanager
def journald(name: str, work: Path, dropin: str) -> Iterator[Journald]:
    """A journald with ``dropin`` as its only configuration, over a fresh loop ext4."""
    vdir = work / name
    conf = vdir / "journald.conf.d"
    conf.mkdir(parents=True)
    if dropin:
        (conf / "touchpoint.conf").write_text(dropin, encoding="utf-8")
    with loop_filesystem(vdir) as (mnt, dev):
        log = vdir / "journald.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c", _NAMESPACE_SH,
                 "sh", str(conf), str(mnt), str(JOURNALD)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        j = Journald(name, mnt, dev, proc, log)
        try:
            _wait_started(j)
            j.ctl("--flush")  # to /var/log/journal, as systemd-journal-flush.service at boot
            yield j
        finally:
            if j.stream is not None:
                j.stream.close()
            stop(proc)
            # the namespace (and its bind of mnt) has gone: loop_filesystem can unmount


def _wait_started(j: Journald, limit_s: float = 30.0) -> None:
    end, exe = time.monotonic() + limit_s, os.path.realpath(JOURNALD)
    while time.monotonic() < end:
        if j.proc.poll() is not None:
            tail = j.log.read_text(encoding="utf-8", errors="replace")[-1500:]
            raise JournalUnavailable(f"journald ({j.name}) exited {j.proc.returncode}: {tail}")
        with contextlib.suppress(OSError):  # exec'd (the mounts are done), then its socket
            sock = Path(j.path("/run/systemd/journal/io.systemd.journal"))
            if str(Path(f"/proc/{j.pid}/exe").readlink()) == exe and sock.exists():
                return
        time.sleep(0.1)
    raise RuntimeError(f"journald ({j.name}) made no sockets within {limit_s:.0f} s")


def _fan_out(src: socket.socket, sinks: list[socket.socket], tally: list[int]) -> None:
    """Copy what the daemon writes to every journald stream (until it closes stderr)."""
    while data := src.recv(65536):
        tally[0] += len(data)
        for s in sinks:
            s.sendall(data)


def _start_daemon(
    config: Path, env: dict[str, str], log: Path, sinks: list[socket.socket], tally: list[int]
) -> tuple[subprocess.Popen[bytes], socket.socket, socket.socket]:
    """The daemon with its stderr a stream socket named in JOURNAL_STREAM (as systemd
    gives a service), stdout to ``log``, and READY=1 on a notify socket beside it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.shutdown(socket.SHUT_WR)
    st = os.fstat(theirs.fileno())
    notify = log.with_suffix(".notify")
    notify.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    sock.setblocking(False)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(config)],
            env={**env, "NOTIFY_SOCKET": str(notify), "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"},
            stdin=subprocess.DEVNULL, stdout=out, stderr=theirs.fileno(),
        )  # fmt: skip
    theirs.close()
    pump = threading.Thread(target=_fan_out, args=(ours, sinks, tally), daemon=True)
    pump.start()
    return proc, sock, ours


def daemon_entries(j: Journald, since: float, until: float | None = None) -> list[dict[str, Any]]:
    """The daemon's journal entries (MESSAGE, PRIORITY) from ``since`` (epoch seconds)."""
    args = ["-o", "json", "--output-fields=MESSAGE,PRIORITY", "-t", IDENTIFIER]
    args += [f"--since=@{since:.6f}"] + ([f"--until=@{until:.6f}"] if until else [])
    out = j.ctl(*args)
    entries = [json.loads(line) for line in out.splitlines() if line.strip()]
    return [e for e in entries if isinstance(e.get("MESSAGE"), str)]


def priority_matches(entry: dict[str, Any]) -> bool:
    """Whether journald recorded the priority the line's level names ("WARNING x: ..."
    at PRIORITY 4): the daemon wrote its ``<N>`` prefix and journald parsed it."""
    level = SYSLOG_LEVELS.get(int(entry.get("PRIORITY", -1)), "?")
    return str(entry["MESSAGE"]).startswith(level + " ")


def journal_file_bytes(j: Journald) -> int:
    """Space the journal files take on the loop filesystem (allocated blocks)."""
    return sum(p.stat().st_blocks * 512 for p in j.mnt.rglob("*.journal*") if p.is_file())


def bench_journal(quick: bool = False, seconds: float | None = None) -> dict[str, Any]:
    from simulators.rig.store import StoreRig

    check_available()
    window = seconds if seconds is not None else (60.0 if quick else 600.0)
    warmup_s = 5.0 if quick else 20.0
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="tp-journal-", dir="/var/tmp") as d:
        work = Path(d)
        with contextlib.ExitStack() as stack:
            js = {n: stack.enter_context(journald(n, work, c)) for n, (c, _) in VARIANTS.items()}
            fed = [j for n, j in js.items() if VARIANTS[n][1]]
            for j in fed:
                j.stream = j.open_stream(IDENTIFIER)
            rig = stack.enter_context(StoreRig(work / "rig", busy_store(quick)))
            cfg = rig.write_config()
            tally = [0]
            started = time.time()
            proc, notify, stderr = _start_daemon(
                cfg, rig.env(), work / "gateway.log", [j.stream for j in fed if j.stream], tally
            )
            stack.callback(notify.close)
            stack.callback(stderr.close)
            stack.callback(stop, proc)
            _wait_at_load(proc, notify, rig, work / "gateway.log")
            time.sleep(warmup_s)
            for j in js.values():
                j.sync()
            # counters only: listing a directory here would dirty its atime in the window
            before = {n: j.counters() for n, j in js.items()}
            t0, m0, sent0 = time.time(), time.monotonic(), tally[0]
            time.sleep(window)
            t1, elapsed, sent = time.time(), time.monotonic() - m0, tally[0] - sent0
            by_itself = {n: j.counters() for n, j in js.items()}
            for j in js.values():
                j.sync()
            after = {n: j.counters() for n, j in js.items()}
            for n, j in js.items():
                rows[n] = {
                    "device_bytes_by_itself": by_itself[n] - before[n],
                    "device_bytes": after[n] - before[n],
                    "journal_files_bytes": journal_file_bytes(j),
                }
            if proc.poll() is not None:
                raise RuntimeError(f"the daemon exited {proc.returncode} during the window")
            window_entries = daemon_entries(js["defaults"], t0, t1)
            all_entries = {n: daemon_entries(js[n], started) for n in ("defaults", "volatile")}
    for r in rows.values():
        r["bytes_per_hour"] = round(r["device_bytes"] * 3600 / elapsed)
        r["bytes_per_hour_by_itself"] = round(r["device_bytes_by_itself"] * 3600 / elapsed)
    rows["volatile"]["goal_bytes_per_hour"] = 0
    text = sum(len(e["MESSAGE"].encode()) + 1 for e in window_entries)
    prios = Counter(int(e.get("PRIORITY", 6)) for e in window_entries)
    kinds = Counter(
        f"<{e.get('PRIORITY', '?')}> {_DIGITS.sub('N', e['MESSAGE'])[:140]}" for e in window_entries
    )
    return {
        "benchmark": "journal",
        "quick": quick,
        "seconds": round(elapsed, 1),
        "method": (
            "systemd-journald in a private mount namespace, /var/log/journal on a loop "
            "device's ext4; sectors written between journalctl --sync + syncfs at the "
            "window's start and end; the daemon (info) under the busy store rig"
        ),
        "load": {"synthetic_rate_per_s": 200.0 if quick else 1000.0, "rig": "every source"},
        "daemon_lines": len(window_entries),
        "daemon_text_bytes": text,
        "daemon_stderr_bytes": sent,
        "daemon_lines_per_hour": round(len(window_entries) * 3600 / elapsed),
        "daemon_text_bytes_per_hour": round(text * 3600 / elapsed),
        "daemon_priorities": {str(k): v for k, v in sorted(prios.items())},
        "daemon_line_kinds": dict(kinds.most_common(12)),
        "daemon_lines_since_start": {n: len(v) for n, v in all_entries.items()},
        "daemon_lines_priority_mismatch": {
            n: sum(1 for e in v if not priority_matches(e)) for n, v in all_entries.items()
        },
        "daemon_sample_lines": [
            [int(e.get("PRIORITY", 6)), e["MESSAGE"][:160]] for e in all_entries["defaults"][:5]
        ],
        "variants": {n: {"dropin": VARIANTS[n][0], **rows[n]} for n in VARIANTS},
        "goal_met": judge(rows["volatile"]["device_bytes"] == 0, emulated_run=False),
    }


def _wait_at_load(
    proc: subprocess.Popen[bytes], notify: socket.socket, rig: Any, log: Path
) -> None:
    """Until READY=1 and every source has reached the central."""
    end, ready, before = time.monotonic() + READY_LIMIT_S, False, len(rig.central_events())
    while time.monotonic() < end:
        if proc.poll() is not None:
            tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise RuntimeError(f"the daemon exited with {proc.returncode}: {tail}")
        ready = ready or _ready(notify)
        if ready:
            sources = {e.get("source") for e in rig.central_events()[before:]}
            if sources.issuperset(EXPECTED_SOURCES):
                return
        time.sleep(0.5)
    raise RuntimeError(f"the daemon was not ready with every source at load in {READY_LIMIT_S} s")


def print_journal(f: dict[str, Any]) -> None:
    print(f"journal benchmark: what journald writes, {f['seconds']:.0f} s window ({f['method']})")
    prios = ", ".join(
        f"{SYSLOG_LEVELS.get(int(p), p)} {n}" for p, n in f["daemon_priorities"].items()
    )
    print(
        f"  the daemon's log (info): {f['daemon_lines']} lines, {f['daemon_text_bytes']:,} B of"
        f" text in the window = {f['daemon_lines_per_hour']:,} lines/h,"
        f" {f['daemon_text_bytes_per_hour']:,} B/h ({prios or 'none'})"
    )
    for kind, n in f["daemon_line_kinds"].items():
        print(f"    {n:>5} x {kind}")
    print(
        f"  {'journald':>10} {'by itself':>12} {'+ final sync':>13}"
        f" {'per hour':>14} {'(by itself)':>14} {'files':>9}"
    )
    for name, r in f["variants"].items():
        print(
            f"  {name:>10} {r['device_bytes_by_itself']:>10,} B {r['device_bytes']:>11,} B"
            f" {r['bytes_per_hour']:>10,} B/h {r['bytes_per_hour_by_itself']:>10,} B/h"
            f" {r['journal_files_bytes'] / 2**20:>5.1f} MiB"
        )
    print(
        "  bytes reaching the loop device; idle: journald on its own, nothing sent (reference);"
        " per hour counts the forced final sync once per window"
    )
    print(f"  goal: Storage=volatile writes 0 B/h to the card: {verdict(f['goal_met'])}")
