"""Run the real daemon as a process against a real broker and the fake central."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.config.credentials import write_secret
from gateway.identity.pseudonyms import Keyring, decode_key
from simulators.central.service import Central
from tests.waiting import SLOWDOWN

# A tenant key for the tests, not the contract's published vector key (which a key file
# may not hold: gateway.identity.pseudonyms.PUBLISHED_TEST_KEYS).
KEY_B64 = "Ok41XFEl/DeKy6pux3hFfJerdJWtAhOlimOtK81inSo="
STORE, DEVICE = "nl-ams-001", "gw-01"


def card_number(i: int) -> str:
    return f"2600{i:09d}"  # the synthetic source's numbering


# Every daemon a test started: a test that fails before its stop() would leave its daemon
# running after the session (found on this box: daemons from failed runs, hours old).
_STARTED: list[subprocess.Popen[bytes]] = []


@atexit.register
def _kill_leftovers() -> None:
    for proc in _STARTED:
        if proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


class GatewayProc:
    def __init__(
        self,
        workdir: Path,
        broker_port: int,
        *,
        sources: str,
        consented: list[str] | None = None,
        mqtt_extra: str = "",
        buffer_extra: str = "",
        buffer_path: Path | None = None,
        health_port: int | None = None,
    ) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        write_secret(self.dir / "k1.key", KEY_B64 + "\n")
        self.keyring = Keyring({"k1": decode_key(KEY_B64, "k")}, "k1")
        records = [
            {"subject": s, "purposes": ["analytics", "linking"], "expires": None}
            for s in (consented or [])
        ]
        (self.dir / "seed.json").write_text(json.dumps({"records": records}), encoding="utf-8")
        self.db = buffer_path or self.dir / "buffer.db"
        self.config = self.dir / "gateway.toml"
        self.env: dict[str, str] = dict(os.environ)
        self.health_port = health_port
        health = f'[health]\nlisten = "127.0.0.1:{health_port}"\n' if health_port else ""
        self._template = f"""
[gateway]
store = "{STORE}"
device = "{DEVICE}"
[keyring]
active = "k1"
[keyring.keys]
k1 = "k1.key"
[buffer]
path = "{self.db}"
{buffer_extra}
[mqtt]
host = "127.0.0.1"
port = {broker_port}
keepalive_s = 3
reconnect_min_s = 0.2
reconnect_max_s = 2
connect_timeout_s = 2
inflight_window = 10
batch_max_events = 200
{mqtt_extra}
[consent]
seed_file = "seed.json"
[status]
summary_interval_s = 1
{health}"""
        self.set_sources(sources)
        self.log = self.dir / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_mark = 0

    def set_sources(self, sources: str) -> None:
        self.config.write_text(self._template + sources, encoding="utf-8")

    def start(self) -> None:
        self._log_mark = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "--config", str(self.config)],
                stdout=log,
                stderr=log,
                env={**self.env, "PYTHONUNBUFFERED": "1"},
            )
        _STARTED.append(self.proc)

    def wait_log(self, text: str, timeout: float = 15) -> None:
        """Wait until this run of the daemon has logged ``text`` (``timeout`` is scaled by
        ``SLOWDOWN`` under emulation)."""
        deadline = time.monotonic() + timeout * SLOWDOWN
        while time.monotonic() < deadline:
            if self.log.exists() and text in self.log.read_text()[self._log_mark :]:
                return
            time.sleep(0.05)
        raise TimeoutError(f"daemon did not log {text!r}; log:\n{self.log.read_text()[-3000:]}")

    def wait_ready(self) -> None:
        """The daemon logged its ready line and, with ``[health]``, its endpoint listens (it
        opens just after the ready line: a test that asked at once met a refused connection)."""
        self.wait_log("touchpoint-gateway ")
        if self.health_port is not None:
            self.wait_log("health endpoint on")

    def reload(self) -> None:
        """SIGHUP.  The log mark moves first, so ``wait_log`` and ``wait_ready`` see only
        what the daemon logs from the reload on (a reload can log its ready line before
        a test that waited for "reloading" gets to look)."""
        assert self.proc is not None
        self._log_mark = self.log.stat().st_size if self.log.exists() else 0
        self.proc.send_signal(signal.SIGHUP)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM; the exit status.  A clean stop must balance its books (below)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        self.proc = None
        if rc == 0:
            self.assert_books_balance()
        return rc

    def assert_books_balance(self) -> None:
        """This run's final status line: every reading was buffered, dropped for consent
        or lost and counted (``lost(buffer)``: a full buffer's drop_new, failed writes).
        Only under the ``drop`` policy: ``hold`` re-reads released readings and
        ``aggregate`` folds readings into footfall, so their books have more columns."""
        doc = tomllib.loads(self.config.read_text(encoding="utf-8"))
        if doc.get("consent", {}).get("policy", "drop") != "drop":
            return
        this_run = self.log.read_text()[self._log_mark :]
        if "stopped: " not in this_run:
            return
        final = this_run.split("stopped: ")[-1].splitlines()[0]
        books = status_counts(final)
        accounted = books["buffered"] + books["dropped(consent)"] + books.get("lost(buffer)", 0)
        assert books["read"] == accounted, f"the books do not balance: {final}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def query(self, sql: str) -> Any:
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return conn.execute(sql).fetchone()
        finally:
            conn.close()

    def last_seq(self) -> int:
        row = self.query("SELECT value FROM meta WHERE key = 'last_seq'")
        return int(row[0]) if row else 0

    def stream(self) -> str:
        return str(self.query("SELECT value FROM meta WHERE key = 'stream'")[0])

    def depth(self) -> int:
        return int(self.query("SELECT coalesce(sum(n), 0) FROM chunks")[0])

    def status_json(self) -> dict[str, Any]:
        """``status --json``: the buffer's figures, and ``daemon`` (its exit code is
        systemctl's: 0 healthy, 1 unhealthy, 3 not running, 4 no [health] to ask)."""
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "gateway",
                "status",
                "--config",
                str(self.config),
                "--json",
            ],
            check=False,
            capture_output=True,
            text=True,
        )
        assert out.returncode in (0, 1, 3, 4), (out.returncode, out.stderr)
        data: dict[str, Any] = json.loads(out.stdout)
        assert data["daemon"]["exit_code"] == out.returncode
        return data

    def wait_db(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.db.exists() and self.last_seq() > 0:
                    return
            except sqlite3.Error:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"the daemon wrote nothing; log:\n{self.log.read_text()[-3000:]}")

    def drain_and_stop(self, timeout: float = 60) -> None:
        """Restart with no sources, wait until the buffer is empty, stop cleanly."""
        self.set_sources("")
        self.start()
        self.wait_ready()
        self.wait_drained(timeout)
        rc = self.stop()
        assert rc == 0, f"daemon exited {rc}; log:\n{self.log.read_text()[-3000:]}"

    def wait_drained(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.depth() == 0:
                return
            time.sleep(0.1)
        raise TimeoutError(
            f"buffer not drained: {self.depth()} left; log:\n{self.log.read_text()[-3000:]}"
        )


def status_counts(line: str) -> dict[str, int]:
    """The counts of a daemon status line (``read 10, buffered 9, ...``)."""
    out: dict[str, int] = {}
    for field in line.split(", "):
        name, _, value = field.rpartition(" ")
        if value.isdigit():
            out[name] = int(value)
    return out


def synthetic(rate: float, cards: int = 50) -> str:
    return f"""
[[sources]]
kind = "synthetic"
name = "load"
rate_per_s = {rate}
cards = {cards}
"""


class ConfigGatewayProc(GatewayProc):
    """The daemon on a config written elsewhere (a ``StoreRig``'s), in its environment.

    ``set_sources`` keeps everything before the config's first ``[[sources]]`` and
    replaces the sources, so ``drain_and_stop`` works as for ``GatewayProc``;
    ``restore_config`` puts the original file back.
    """

    def __init__(self, config: Path, *, env: Mapping[str, str] | None = None) -> None:
        self.config = Path(config)
        self.dir = self.config.parent
        self.original = self.config.read_text(encoding="utf-8")
        doc = tomllib.loads(self.original)
        self.db = Path(doc["buffer"]["path"])
        if not self.db.is_absolute():
            self.db = self.dir / self.db
        ring = doc["keyring"]
        self.keyring = Keyring.from_files(
            {k: self.dir / v for k, v in ring["keys"].items()}, ring["active"]
        )
        listen = doc.get("health", {}).get("listen")
        self.health_port = int(listen.rpartition(":")[2]) if listen else None
        self.env = dict(env if env is not None else os.environ)
        head, sep, _ = self.original.partition("\n[[sources]]")
        self._template = head + "\n" if sep else self.original
        self.log = self.dir / "gateway.log"
        self.proc = None
        self._log_mark = 0

    def restore_config(self) -> None:
        self.config.write_text(self.original, encoding="utf-8")


def http_get(port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    """GET ``path`` from the daemon's loopback health endpoint: (status, body)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as exc:  # 503 still carries the document
        return int(exc.code), exc.read()


def healthz(port: int) -> tuple[int, dict[str, Any]]:
    status, body = http_get(port, "/healthz")
    doc: dict[str, Any] = json.loads(body)
    return status, doc


def metrics(port: int) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """/metrics parsed: name (without the touchpoint_ prefix) -> {sorted labels: value}."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for line in http_get(port, "/metrics")[1].decode().splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        name, _, rest = series.partition("{")
        labels: list[tuple[str, str]] = []
        for part in rest.rstrip("}").split('",'):
            if "=" in part:
                k, _, v = part.partition("=")
                labels.append((k, v.strip('"')))
        out.setdefault(name.removeprefix("touchpoint_"), {})[tuple(sorted(labels))] = float(value)
    return out


def by_source(
    families: Mapping[str, Mapping[tuple[tuple[str, str], ...], float]], name: str
) -> dict[str, float]:
    """A counter of ``metrics()`` summed per ``source`` label."""
    out: dict[str, float] = {}
    for labels, value in families.get(name, {}).items():
        src = dict(labels).get("source", "")
        out[src] = out.get(src, 0.0) + value
    return out


def assert_all_delivered(gw: GatewayProc, central: Central, max_dupes: int) -> dict[str, Any]:
    """Every committed seq of the daemon's stream reached the central, nothing else did,
    nothing was refused, a re-sent event equals its first copy, and at most ``max_dupes``
    came twice.  Returns the central's stats."""
    stream, last = gw.stream(), gw.last_seq()
    want = {(STORE, DEVICE, stream, seq) for seq in range(1, last + 1)}
    with contextlib.suppress(TimeoutError):
        central.wait_for(lambda s: s["accepted"] >= last, timeout=30)
    got = {k for k in central.accepted_keys() if k[2] == stream}
    missing = sorted(k[3] for k in want - got)
    assert not missing, (
        f"{len(missing)} of {last} committed events never reached the central: "
        f"seq {missing[:3]}..{missing[-3:]}"
    )
    assert got == want, "the central holds events that were never committed"
    stats = central.stats()
    assert stats["invalid_total"] == 0, stats["invalid"]
    assert stats["conflicts"] == 0, "a re-sent event differs from its first copy"
    assert stats["duplicates"] <= max_dupes, (stats["duplicates"], max_dupes)
    return stats
