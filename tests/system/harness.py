"""Run the real daemon as a process against a real broker and the fake central."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from gateway.identity import Keyring, decode_key

KEY_B64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
STORE, DEVICE = "nl-ams-001", "gw-01"


def card_number(i: int) -> str:
    return f"2600{i:09d}"  # the synthetic source's numbering


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
    ) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "k1.key").write_text(KEY_B64 + "\n", encoding="ascii")
        self.keyring = Keyring({"k1": decode_key(KEY_B64, "k")}, "k1")
        records = [
            {"subject": s, "purposes": ["analytics", "linking"], "expires": None}
            for s in (consented or [])
        ]
        (self.dir / "seed.json").write_text(json.dumps({"records": records}), encoding="utf-8")
        self.db = self.dir / "buffer.db"
        self.config = self.dir / "gateway.toml"
        self._template = f"""
[gateway]
store = "{STORE}"
device = "{DEVICE}"
[keyring]
active = "k1"
[keyring.keys]
k1 = "k1.key"
[buffer]
path = "buffer.db"
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
"""
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
                [sys.executable, "-m", "gateway.cli", "run", "--config", str(self.config)],
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def wait_log(self, text: str, timeout: float = 15) -> None:
        """Wait until this run of the daemon has logged ``text``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log.exists() and text in self.log.read_text()[self._log_mark :]:
                return
            time.sleep(0.05)
        raise TimeoutError(f"daemon did not log {text!r}; log:\n{self.log.read_text()[-3000:]}")

    def wait_ready(self) -> None:
        self.wait_log("touchpoint-gateway ")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def stop(self, timeout: float = 20) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout=timeout)
        self.proc = None
        return rc

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
        out = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "status", "--config", str(self.config), "--json"],
            check=True,
            capture_output=True,
            text=True,
        )
        data: dict[str, Any] = json.loads(out.stdout)
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


def synthetic(rate: float, cards: int = 50) -> str:
    return f"""
[[sources]]
kind = "synthetic"
name = "load"
rate_per_s = {rate}
cards = {cards}
"""
