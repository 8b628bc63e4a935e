"""The outbox is the only queue: a withdrawal made while the broker is away reaches every
event of the subject that has not left the gateway (the demo's story, asserted)."""

from __future__ import annotations

import calendar
import json
import time
from pathlib import Path

import pytest

from simulators.central.consent_api import ConsentAPI
from simulators.central.service import Central
from simulators.infra.broker import Mosquitto
from simulators.infra.netproxy import NetProxy
from tests.system.harness import STORE
from tests.system.test_consent_system import CONSENTED, LEAVER, STRANGERS, gateway
from tests.system.uplink import first_sent, leaks, log_times, wait_count

pytestmark = pytest.mark.slow


def epoch(ts: str) -> int:
    return calendar.timegm(time.strptime(ts, "%Y-%m-%dT%H:%M:%SZ"))


def test_withdrawal_during_an_outage_reaches_what_waited_for_the_broker(
    tmp_path: Path, api: ConsentAPI
) -> None:
    """Broker down, the leaver's events buffered, withdrawal, broker back: none of the
    leaver's buffered events reach the central; every other consented subject's do."""
    with (
        Mosquitto(tmp_path / "mq") as broker,
        NetProxy(broker.port, mqtt=True) as link,  # the outage: the link refuses and cuts
        Central("127.0.0.1", broker.port, out=tmp_path / "central.jsonl") as central,
    ):
        assert central.wait_subscribed(10)
        gw = gateway(tmp_path, link.port, api)
        gw.start()
        gw.wait_log("connected to broker")
        central.wait_for(lambda s: s["accepted"] > 400, timeout=20)
        link.refuse()
        link.cut()
        down_at = time.time()
        gw.wait_log("disconnected from broker")
        time.sleep(4)  # the leaver's events pile up while the broker is away
        api.withdraw(STORE, LEAVER)  # by the next poll
        gw.wait_log("erased 1 subject(s)", timeout=10)
        time.sleep(1)
        link.accept()
        wait_count(gw, "connected to broker", 2)
        central.wait_for(lambda s: s["accepted"] > 2000, timeout=20)
        assert gw.stop() == 0
        gw.drain_and_stop()
        time.sleep(1)
        sent = first_sent(link)
    erased_at = log_times(gw.log, "erased 1 subject(s)")[0]  # after it was applied
    events = [
        json.loads(x)
        for name in ("central.jsonl",)
        for x in (tmp_path / name).read_text().splitlines()
    ]
    assert any(e.get("subject") == LEAVER for e in events), "delivered before the outage"
    leaked = leaks(events, sent, {LEAVER: erased_at})
    assert not leaked, f"{len(leaked)} of the leaver's events left after the withdrawal"
    during = {e["subject"] for e in events if epoch(e["ts"]) >= int(down_at) + 1}
    assert during == set(CONSENTED) - {LEAVER}, "the others' buffered events all arrive"
    assert not {e.get("subject") for e in events} & set(STRANGERS)
