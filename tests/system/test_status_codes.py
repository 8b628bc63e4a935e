"""``touchpoint-gateway status`` exits as systemctl does (issue 14, item 8): 0 running and
healthy, 1 unhealthy, 3 not running, 4 unknown (no [health] to ask); and ``status --json |
head`` ends quietly."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.identity.pseudonyms import Keyring, decode_key
from simulators.infra.broker import Mosquitto, free_port
from tests.system.harness import KEY_B64, GatewayProc, card_number, synthetic

pytestmark = pytest.mark.slow

RING = Keyring({"k1": decode_key(KEY_B64, "k")}, "k1")


def status(gw: GatewayProc, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "status", "--config", str(gw.config), *extra],
        capture_output=True,
        text=True,
        check=False,
    )


def test_status_exit_codes_follow_systemctl(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "mq") as broker:
        gw = GatewayProc(
            tmp_path / "gw",
            broker.port,
            sources=synthetic(50, cards=5),
            consented=[RING.pseudonym("loyalty", card_number(i)) for i in range(5)],
            health_port=free_port(),
        )
        gw._template += "broker_down_s = 1\n"  # the [health] section is last
        gw.set_sources(synthetic(50, cards=5))
        gw.start()
        gw.wait_log("connected to broker")
        gw.wait_db()
        ok = status(gw)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        # --json holds everything the table shows, the live rows included
        live = json.loads(status(gw, "--json").stdout)["daemon"]["health"]
        assert live["broker"]["connected"] is True and "limits" in live["broker"], live
        assert "load" in live["sources"] and live["buffer"]["last_write_ok"] is True
        for row in ok.stdout.splitlines():
            key = row.split("  ")[0]
            if key in ("broker limits", "source load"):
                assert key.split()[-1] in json.dumps(live), key
        for reader in ("head -1", "true"):  # `true` leaves before a byte is written
            piped = subprocess.run(
                f"{sys.executable} -m gateway status --config {gw.config} --json | {reader}",
                shell=True,
                capture_output=True,
                text=True,
                check=False,
            )
            assert piped.stderr == "", piped.stderr
        assert piped.stdout == ""
        broker.stop()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and status(gw).returncode != 1:
            time.sleep(0.3)
        sick = status(gw)
        assert sick.returncode == 1 and "broker disconnected" in sick.stdout, sick.stdout
        assert gw.stop() == 0
    stopped = status(gw)
    assert stopped.returncode == 3 and "not answering" in stopped.stdout
    assert gw.status_json()["daemon"]["state"].startswith("not answering")
    gw._template = gw._template.split("[health]")[0]
    gw.set_sources("")
    assert status(gw).returncode == 4, "no [health]: unknown"
