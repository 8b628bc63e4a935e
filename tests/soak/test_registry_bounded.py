"""The consent registry over a month of app users: it holds the live ones only.

Every app user scanned at the kiosk leaves token consent (contract §6) that expires
after ``token_consent_ttl_s``; the daemon's housekeeping calls
``ConsentRegistry.forget_expired_evidence`` and deletes the rows it returns.  The
store-level soak shows the same five app users all week, so this test drives the
registry itself with a new crowd every day.
"""

from __future__ import annotations

import sqlite3

from gateway.buffer.consent_store import delete_rows, save_rows
from gateway.buffer.migrations import migrate
from gateway.consent.registry import ConsentRegistry
from gateway.observe.metrics import Metrics
from gateway.ports import ConsentEvidence

DAY = 86_400.0
TTL = DAY


def test_a_month_of_app_users_keeps_only_live_token_consent() -> None:
    reg = ConsentRegistry({"qr.scan": ["linking"]}, Metrics(), token_ttl_s=TTL)
    conn = sqlite3.connect(":memory:", isolation_level=None)
    migrate(conn)
    rows = reg.apply([("k1:registry-subject", frozenset({"linking"}), None)], "sync", 0.0)
    save_rows(conn, rows)
    start = 1_800_000_000.0
    sizes = []
    for day in range(30):
        for hour in range(24):
            now = start + day * DAY + hour * 3600
            rows = [
                reg.apply_evidence(
                    ConsentEvidence(f"k1:app-{day}-{hour}-{i}", ("linking",), now + 7 * DAY), now
                )
                for i in range(20)
            ]
            save_rows(conn, [r for r in rows if r is not None])
            if hour % 6 == 0:  # housekeeping, here four times a day
                delete_rows(conn, reg.forget_expired_evidence(now))
        sizes.append(len(reg.records))
    # A day of app users (480) and the last quarter day's before it, never a month's.
    assert max(sizes) <= 24 * 20 + 6 * 20 + 1, sizes
    assert sizes[-1] == sizes[5]
    stored = conn.execute("SELECT count(*) FROM consent").fetchone()[0]
    assert stored == len(reg.records)
    assert "k1:registry-subject" in reg.records  # registry consent is not the token's
    now = start + 29 * DAY + 23 * 3600
    assert reg.purposes_for("qr.scan", "k1:app-29-23-0", now) == ["linking"]
    assert reg.purposes_for("qr.scan", "k1:app-0-0-0", now) is None
