"""The real daemon process exits non-zero when its buffer writer dies (issue 14, item 3).

Another process changes the buffer under the running daemon into something the writer
does not expect (a ``last_publish_at`` that is not a time, read by every stats call):
the writer's work raises.  The daemon must say so, exit non-zero (systemd restarts it)
and not hang, and the next start must refuse nothing it had committed.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from gateway.identity.pseudonyms import Keyring, decode_key
from simulators.infra.broker import free_port
from tests.system.harness import KEY_B64, GatewayProc, card_number, synthetic

pytestmark = pytest.mark.slow


def test_an_unexpected_error_in_the_writer_ends_the_daemon_non_zero(tmp_path: Path) -> None:
    ring = Keyring({"k1": decode_key(KEY_B64, "k")}, "k1")
    gw = GatewayProc(
        tmp_path / "gw",
        free_port(),  # no broker: every event stays buffered
        sources=synthetic(200, cards=5),
        consented=[ring.pseudonym("loyalty", card_number(i)) for i in range(5)],
    )
    gw.start()
    gw.wait_ready()
    gw.wait_db()
    committed = gw.last_seq()
    conn = sqlite3.connect(gw.db, timeout=10)
    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('last_publish_at', 'garbage')")
    conn.commit()
    conn.close()
    assert gw.proc is not None
    rc = gw.proc.wait(timeout=30)  # not a hang: it ends by itself
    gw.proc = None
    log = gw.log.read_text()
    assert rc != 0, f"exit status {rc}; log:\n{log[-3000:]}"
    assert "buffer writer stopped" in log
    # The buffer is intact and the next start works (the bad value is ours to repair).
    conn = sqlite3.connect(gw.db, timeout=10)
    conn.execute("DELETE FROM meta WHERE key = 'last_publish_at'")
    conn.commit()
    conn.close()
    assert gw.last_seq() >= committed
    gw.start()
    gw.wait_ready()
    time.sleep(1.5)
    assert gw.alive()
    assert gw.stop() == 0
