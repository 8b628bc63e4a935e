"""Erasure while another process reads the buffer (a technician's sqlite3 shell, a backup):
the writer never waits for the reader, the subject's rows are gone at once, the WAL
checkpoint that clears the old page images is retried in the background, and `status` and
/healthz say that erased bytes still wait in the WAL, and why, until it succeeds."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from simulators.central.consent_api import ConsentAPI
from simulators.infra.broker import free_port
from tests.system.harness import STORE, healthz, synthetic
from tests.system.test_consent_system import LEAVER, count_in_files, gateway

pytestmark = pytest.mark.slow

READER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN")
conn.execute("SELECT count(*) FROM chunks").fetchone()  # the read snapshot is taken here
print("reading", flush=True)
sys.stdin.read()  # hold the transaction until the test closes stdin
"""


def test_erasure_with_a_reader_holding_a_transaction(tmp_path: Path, api: ConsentAPI) -> None:
    gw = gateway(tmp_path, free_port(), api)  # no broker: everything stays buffered
    gw.health_port = free_port()
    gw._template += f'[health]\nlisten = "127.0.0.1:{gw.health_port}"\n'
    gw.set_sources(synthetic(400, cards=20))
    files = [gw.db, Path(f"{gw.db}-wal")]
    marker = f'"subject":"{LEAVER}"'.encode()
    gw.start()
    reader = None
    try:
        gw.wait_log("consent snapshot")
        deadline = time.monotonic() + 20
        while count_in_files(files, marker) < 20 and time.monotonic() < deadline:
            time.sleep(0.2)
        reader = subprocess.Popen(
            [sys.executable, "-c", READER, str(gw.db)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert reader.stdout is not None
        assert reader.stdout.readline().strip() == "reading"

        api.withdraw(STORE, LEAVER)
        # Far less than one busy_timeout per attempt (the old writer waited 5 s, 5 times).
        gw.wait_log("erased 1 subject(s)", timeout=4)
        seq_at_erasure = gw.last_seq()
        # The writer goes on committing while the reader still holds its snapshot.
        deadline = time.monotonic() + 10
        while gw.last_seq() <= seq_at_erasure and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gw.last_seq() > seq_at_erasure, "the writer stalled behind the reader"
        # The rows are gone at once for every new reader.
        rows = gw.query(f"SELECT count(*) FROM chunks WHERE instr(body, '{LEAVER}') > 0")
        assert rows[0] == 0
        # ... and status and /healthz say the old page images still wait, and why.
        status = gw.status_json()
        assert status["erased_in_wal_since"] is not None, status
        _, doc = healthz(gw.health_port)
        pending = doc["buffer"]["erased_in_wal"]
        assert pending["waiting"] is True and "read transaction" in pending["why"], pending
        assert reader.poll() is None, "the reader is still there"
    finally:
        if reader is not None:
            reader.communicate("", timeout=10)  # the reader leaves
    try:
        deadline = time.monotonic() + 20  # the background checkpoint gets through now
        while time.monotonic() < deadline and gw.status_json()["erased_in_wal_since"]:
            time.sleep(0.2)
        assert gw.status_json()["erased_in_wal_since"] is None
        assert not healthz(gw.health_port)[1]["buffer"]["erased_in_wal"]["waiting"]
        assert count_in_files(files, marker) == 0, "no event of the leaver in DB or WAL"
        assert count_in_files(files, LEAVER.encode()) <= 1, "only the erasure log names it"
        assert gw.alive()
    finally:
        gw.stop()
