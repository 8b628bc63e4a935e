"""The fake central's consent side: the HTTP registry API and MQTT push deltas.

Also the long mixed scenario: a real outbox, forwarder and paho publisher, the consent
sync over HTTP and pushes over a real mosquitto, against the fake central: no event of a
subject without consent ever reaches the central.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from pathlib import Path

import httpx
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from gateway.config.sections import MqttConfig
from gateway.uplink.forwarder import Forwarder
from gateway.uplink.mqtt import PahoPublisher
from simulators.central.consent_api import ConsentAPI, load_script
from simulators.central.contract_schemas import contract_schemas
from simulators.central.service import Central
from simulators.infra.broker import Mosquitto
from tests.gateway.consent_helpers import STORE, Clock, Rig, card
from tests.waiting import until

A, B, C = "k1:" + "A" * 22, "k1:" + "B" * 22, "k1:" + "C" * 22
URL = "/v1/stores/" + STORE + "/consent"


def get(api: ConsentAPI, since: str | None = None, token: str = "t0k") -> httpx.Response:
    params = {"since": since} if since is not None else None
    return httpx.get(
        api.base_url + URL, params=params, headers={"Authorization": f"Bearer {token}"}
    )


def test_snapshot_delta_cursor_expiry_and_auth() -> None:
    schemas = contract_schemas()
    with ConsentAPI(token="t0k") as api:
        api.grant(STORE, A, ["linking", "analytics"], expires=1_800_000_000)
        api.grant(STORE, B, ["analytics"])
        api.withdraw(STORE, B)
        snap = get(api).json()
        schemas.check("consent-response.json", snap)
        assert snap["reset"] is True
        assert snap["records"] == [
            {
                "subject": A,
                "purposes": ["analytics", "linking"],
                "expires": "2027-01-15T08:00:00Z",
            },
            {"subject": B, "purposes": [], "expires": None},  # withdrawals stay in snapshots
        ]
        api.grant(STORE, C, ["marketing"])
        delta = get(api, snap["cursor"]).json()
        schemas.check("consent-response.json", delta)
        assert delta["reset"] is False and [r["subject"] for r in delta["records"]] == [C]
        assert get(api, delta["cursor"]).json()["records"] == []
        api.expire_cursors()
        assert get(api, delta["cursor"]).status_code == 410
        assert get(api, "garbage").status_code == 410
        assert get(api, token="wrong").status_code == 401
        api.fail(403, count=2)
        assert [get(api).status_code for _ in range(3)] == [403, 403, 200]
        api.delay(0.5)
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(api.base_url + URL, timeout=0.2)
        assert httpx.get(api.base_url + "/other").status_code == 404
        assert [r.authorized for r in api.requests][-3:] == [True, True, False]


def test_script_file_replays_changes(tmp_path: Path) -> None:
    script = tmp_path / "consent.toml"
    script.write_text(
        f"""
[[steps]]
at_s = 0
action = "grant"
subject = "{A}"
purposes = ["linking"]
expires_in_s = 3600

[[steps]]
at_s = 0.1
action = "fail"
status = 503

[[steps]]
at_s = 0.2
action = "withdraw"
subject = "{A}"
""",
        encoding="utf-8",
    )
    with ConsentAPI(token="t0k") as api:
        api.run_script(load_script(script), STORE)
        deadline = time.monotonic() + 5
        while api.current(STORE).get(A, {}).get("purposes") != [] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert api.current(STORE)[A]["purposes"] == []
        assert get(api).status_code == 503
        assert get(api).status_code == 200
    (tmp_path / "bad.json").write_text('{"steps": [1]}', encoding="utf-8")
    with pytest.raises(ValueError, match="list of steps"):
        load_script(tmp_path / "bad.json")


def test_a_script_step_with_when_file_waits_for_the_file(tmp_path: Path) -> None:
    go = tmp_path / "withdraw-now"
    steps = [
        {"at_s": 0, "action": "grant", "subject": A, "purposes": ["linking"]},
        {"at_s": 0, "action": "withdraw", "subject": A, "when_file": str(go)},
    ]
    with ConsentAPI(token="t0k") as api:
        api.run_script(steps, STORE)
        time.sleep(1.0)  # long past its at_s: still waiting for the file
        assert api.current(STORE)[A]["purposes"] == ["linking"]
        go.touch()
        deadline = time.monotonic() + 5
        while api.current(STORE)[A]["purposes"] != [] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert api.current(STORE)[A]["purposes"] == []
    with ConsentAPI(token="t0k") as api:  # a file that never comes does not block stop()
        api.run_script([{"action": "expire_cursors", "when_file": str(tmp_path / "never")}],
                       STORE)  # fmt: skip
    assert not (tmp_path / "never").exists()


def test_push_reaches_the_gateway_through_the_real_publisher(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """central.push_consent -> mosquitto -> PahoPublisher.subscribe -> RegistryUpdater."""

    async def run() -> None:
        api = ConsentAPI(token="t0k")
        central = Central("127.0.0.1", broker.port, consent=api)
        central.start()
        rig = Rig(tmp_path / "b.db", Clock())
        await rig.open()
        pub = consent_publisher(broker.port, "gw-test", rig)
        try:
            await pub.start()
            await asyncio.wait_for(pub.wait_connected(), 10)
            await asyncio.sleep(0.3)  # the subscription is made on connect
            assert central.wait_subscribed(10)
            api.grant(STORE, A, ["linking"], push=True)
            api.grant(STORE, B, ["linking"])  # not pushed: only the poll brings it
            await until(lambda: A in rig.registry.records, timeout=10.0)
            assert B not in rig.registry.records
            assert rig.accept(card(A, rig.clock()))
            api.withdraw(STORE, A, push=True)
            await until(lambda: A in rig.registry.withdrawn, timeout=10.0)
            await rig.updater.drain()
            assert rig.events() == []
            assert central.stats()["consent_pushes"] == 2
        finally:
            await pub.close()
            rig.close()
            central.stop()

    asyncio.run(run())


def consent_publisher(port: int, client_id: str, rig: Rig) -> PahoPublisher:
    """The gateway's real publisher to the broker on ``port``, consent pushes to ``rig``."""
    pub = PahoPublisher(
        MqttConfig(host="127.0.0.1", port=port),
        client_id=client_id,
        will_topic=f"touchpoint/v1/{STORE}/gw-01/status",
        will_payload=b"{}",
        metrics=rig.metrics,
    )
    pub.subscribe(f"touchpoint/v1/{STORE}/consent", rig.updater.on_push)
    return pub


@pytest.mark.slow
def test_long_mixed_scenario_nothing_unconsented_reaches_the_central(
    tmp_path: Path, broker: Mosquitto
) -> None:
    """Grants, withdrawals (pushed and polled), expiries, a 410, credential failures and
    an outage, hold with releases and expiries, over ~2,000 readings of 40 subjects."""
    rnd = random.Random(5)
    subjects = [f"k1:{i:022d}" for i in range(40)]
    never = set(subjects[30:])  # never consented: must never reach the central

    async def run() -> None:
        clock = Clock()
        api = ConsentAPI(token="t0k", clock=clock)
        central = Central("127.0.0.1", broker.port, out=tmp_path / "central.jsonl", consent=api)
        central.start()
        assert central.wait_subscribed(10)
        token = tmp_path / "token"
        token.write_text("t0k", encoding="utf-8")
        rig = Rig(tmp_path / "b.db", clock, policy_name="hold", hold_ttl_s=20)
        await rig.open()
        pub = consent_publisher(broker.port, "gw-mixed", rig)
        await pub.start()
        fwd = Forwarder(
            rig.outbox,
            pub,
            MqttConfig(batch_max_events=50),
            store=STORE,
            device="gw-01",
            topic=f"touchpoint/v1/{STORE}/gw-01/events",
            metrics=rig.metrics,
            now=clock,
        )
        sync = rig.sync(api.base_url, token, timeout_s=0.5)
        fwd_task = asyncio.create_task(fwd.run())
        try:
            await asyncio.wait_for(pub.wait_connected(), 10)
            async with sync.client() as client:
                for step in range(200):
                    clock.t += 1
                    action = rnd.random()
                    s = rnd.choice(subjects[:30])
                    if action < 0.08:
                        api.grant(STORE, s, ["linking"], push=rnd.random() < 0.5)
                    elif action < 0.12:
                        api.withdraw(STORE, s, push=rnd.random() < 0.5)
                    elif action < 0.14:
                        api.grant(STORE, s, ["linking"], expires=clock() + 5)
                    elif action < 0.15:
                        api.expire_cursors()
                    elif action < 0.16:
                        api.fail(rnd.choice([401, 403, 503]))
                    if step % 5 == 0:
                        await sync.step(client)
                    await rig.updater.drain()
                    rig.tick()
                    for _ in range(10):
                        who = rnd.choice(subjects)
                        rig.accept(card(who, clock()))
                    await asyncio.sleep(0)
                await sync.step(client)
            await rig.outbox._submit_read(lambda c: None)
            await until(lambda: _depth(rig) == 0, 30)
            central.wait_for(lambda s: s["accepted"] >= 1, timeout=10)
        finally:
            fwd_task.cancel()
            await asyncio.gather(fwd_task, return_exceptions=True)
            await fwd.cancel()
            await pub.close()
            rig.close()
            central.stop()
        lines = (tmp_path / "central.jsonl").read_text().splitlines()
        seen = [json.loads(x) for x in lines]
        assert seen, "the scenario sent consented events"
        got = {e["subject"] for e in seen}
        assert not got & never, "an unconsented subject reached the central"
        accepted = {r.subject for r in rig.accepted}
        assert got <= accepted
        assert rig.metrics.get("consent_policy_total", policy="hold", outcome="hold_expired")
        assert rig.metrics.get("consent_sync_polls_total", outcome="auth") >= 1
        assert central.stats()["invalid_total"] == 0

    asyncio.run(run())


def _depth(rig: Rig) -> int:
    import sqlite3

    conn = sqlite3.connect(rig.path)
    try:
        return int(conn.execute("SELECT coalesce(sum(n), 0) FROM chunks").fetchone()[0])
    finally:
        conn.close()


def test_mqtt_sniffer_sees_valid_deltas(broker: Mosquitto) -> None:
    got: list[bytes] = []
    done = threading.Event()
    sniff = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        got.append(m.payload)
        done.set()

    sniff.on_message = on_message
    sniff.connect("127.0.0.1", broker.port)
    sniff.subscribe(f"touchpoint/v1/{STORE}/consent", qos=1)
    sniff.loop_start()
    api = ConsentAPI(token="t0k")
    central = Central("127.0.0.1", broker.port, consent=api)
    central.start()
    try:
        assert central.wait_subscribed(10)
        time.sleep(0.2)
        api.withdraw(STORE, A, push=True)
        assert done.wait(10)
        doc = json.loads(got[0])
        contract_schemas().check("consent-delta.json", doc)
        assert doc == {"v": 1, "records": [{"subject": A, "purposes": [], "expires": None}]}
    finally:
        central.stop()
        sniff.disconnect()
        sniff.loop_stop()
