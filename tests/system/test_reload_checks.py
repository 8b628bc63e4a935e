"""SIGHUP with a config that only runtime checks refuse (issue 14, item 4), on the real
daemon: the reload is refused with the key named, the running config stays, and the
health endpoint keeps answering on its address."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.identity.pseudonyms import Keyring, decode_key
from simulators.infra.broker import free_port
from tests.system.harness import KEY_B64, GatewayProc, card_number, healthz, synthetic

pytestmark = pytest.mark.slow

RING = Keyring({"k1": decode_key(KEY_B64, "k")}, "k1")


@pytest.mark.parametrize("listen", ["127.999.1.1:9464", "127.0.0.1:99999"])
def test_a_reload_to_an_address_that_cannot_be_bound_is_refused(
    tmp_path: Path, listen: str
) -> None:
    gw = GatewayProc(
        tmp_path / "gw",
        free_port(),
        sources=synthetic(100, cards=5),
        consented=[RING.pseudonym("loyalty", card_number(i)) for i in range(5)],
        health_port=free_port(),
    )
    port = gw.health_port
    assert port is not None
    gw.start()
    gw.wait_ready()
    good = gw.config.read_text()
    gw.config.write_text(good.replace(f"127.0.0.1:{port}", listen))
    check = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(gw.config)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 1 and "health.listen" in check.stdout, check.stdout
    assert gw.proc is not None
    gw.reload()
    gw.wait_log("reload refused")
    before = gw.last_seq()
    time.sleep(1.5)
    assert gw.alive(), f"the daemon died; log:\n{gw.log.read_text()[-3000:]}"
    assert gw.last_seq() > before, "the old config keeps running"
    assert "health.listen" in gw.log.read_text()
    doc = healthz(port)[1]
    assert doc["last_error"]["config"].startswith("reload refused")
    gw.config.write_text(good)
    assert gw.stop() == 0
