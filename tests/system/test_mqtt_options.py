"""The forwarder over TLS with a client certificate and a password file, and over MQTT 3.1.1,
against a real mosquitto."""

from __future__ import annotations

import contextlib
import subprocess
import time
from pathlib import Path

import pytest

from gateway.config.credentials import write_secret
from simulators.infra.broker import Mosquitto
from tests.pki import make_pki
from tests.system.harness import GatewayProc, card_number, synthetic

pytestmark = pytest.mark.slow


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    files = make_pki(tmp_path / "pki")
    files["passwd"] = tmp_path / "pki" / "passwd"
    files["password"] = tmp_path / "pki" / "mqtt.password"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(files["passwd"]), "nl-ams-001-gw-01", "s3cret"],
        check=True,
        capture_output=True,
    )
    write_secret(files["password"], "s3cret\n")
    return files


def consented() -> list[str]:
    from gateway.identity.pseudonyms import Keyring, decode_key
    from tests.system.harness import KEY_B64

    ring = Keyring({"k1": decode_key(KEY_B64, "k")}, "k1")
    return [ring.pseudonym("loyalty", card_number(i)) for i in range(50)]


def run_until_published(gw: GatewayProc, timeout: float = 20) -> dict[str, object]:
    gw.start()
    gw.wait_ready()
    deadline = time.monotonic() + timeout
    status = gw.status_json()
    while time.monotonic() < deadline and status["last_publish_at"] is None:
        time.sleep(0.2)
        status = gw.status_json()
    assert gw.stop() == 0
    return gw.status_json()


def tls_conf(pki: dict[str, Path]) -> str:
    return (
        f"cafile {pki['ca']}\ncertfile {pki['server']}\nkeyfile {pki['server_key']}\n"
        f"require_certificate true\npassword_file {pki['passwd']}\n"
    )


def tls_mqtt(pki: dict[str, Path], ca: str = "ca", password: str = "password") -> str:
    return (
        f'username = "nl-ams-001-gw-01"\npassword_file = "{pki[password]}"\n'
        f'[mqtt.tls]\nca_file = "{pki[ca]}"\n'
        f'cert_file = "{pki["client"]}"\nkey_file = "{pki["client_key"]}"\n'
    )


def run_tls(
    tmp_path: Path, pki: dict[str, Path], *, timeout: float = 20, **mqtt: str
) -> tuple[dict[str, object], str]:
    """A TLS-only broker that wants a client certificate and a password; the daemon
    against it with ``tls_mqtt(pki, **mqtt)``.  Returns its final status and its log."""
    with Mosquitto(tmp_path / "mq", extra_conf=tls_conf(pki), allow_anonymous=False) as b:
        gw = GatewayProc(
            tmp_path / "gw",
            b.port,
            sources=synthetic(200),
            consented=consented(),
            mqtt_extra=tls_mqtt(pki, **mqtt),
        )
        status = run_until_published(gw, timeout=timeout)
    return status, gw.log.read_text()


def test_tls_client_certificate_and_password(tmp_path: Path, pki: dict[str, Path]) -> None:
    status, log = run_tls(tmp_path, pki)
    assert status["last_publish_at"] is not None
    assert "connected to broker" in log


def test_tls_with_the_wrong_ca_never_publishes_and_says_so(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    status, log = run_tls(tmp_path, pki, timeout=4, ca="other_ca")
    assert status["last_publish_at"] is None
    assert status["depth"], "events stay buffered"
    assert "connected to broker" not in log
    assert "TLS certificate not trusted" in log


def test_wrong_password_is_reported(tmp_path: Path, pki: dict[str, Path]) -> None:
    write_secret(tmp_path / "bad.password", "nope\n")
    pki = {**pki, "bad": tmp_path / "bad.password"}
    status, log = run_tls(tmp_path, pki, timeout=4, password="bad")
    assert status["last_publish_at"] is None
    assert "refused the connection" in log


def test_mqtt_311(tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "mq") as b:
        gw = GatewayProc(
            tmp_path / "gw",
            b.port,
            sources=synthetic(200),
            consented=consented(),
            mqtt_extra='protocol = "3.1.1"',
        )
        status = run_until_published(gw)
    assert status["last_publish_at"] is not None


def test_status_is_retained_online_and_offline_is_the_will(tmp_path: Path) -> None:
    from simulators.central.service import Central

    with Mosquitto(tmp_path / "mq") as b:
        gw = GatewayProc(tmp_path / "gw", b.port, sources=synthetic(50), consented=consented())
        gw.start()
        gw.wait_log("connected to broker")
        with Central("127.0.0.1", b.port) as central:  # subscribes after: sees the retained one
            status = central.wait_for(lambda s: bool(s["status"]), timeout=10)["status"]
            assert status["nl-ams-001/gw-01"]["state"] == "online"
            assert status["nl-ams-001/gw-01"]["retained"] is True
            gw.kill9()  # no goodbye: the broker publishes the will
            central.wait_for(
                lambda s: s["status"]["nl-ams-001/gw-01"]["state"] == "offline", timeout=10
            )


def test_publisher_socket_has_nodelay(tmp_path: Path) -> None:
    import asyncio
    import socket

    from gateway.config.sections import MqttConfig
    from gateway.observe.metrics import Metrics
    from gateway.uplink.mqtt import PahoPublisher

    async def run(port: int) -> int:
        pub = PahoPublisher(
            MqttConfig(host="127.0.0.1", port=port),
            client_id="nodelay-test",
            will_topic="t/status",
            will_payload=b"offline",
            metrics=Metrics(),
        )
        await pub.start()
        await asyncio.wait_for(pub.wait_connected(), 10)
        sock = pub.client.socket()
        assert isinstance(sock, socket.socket)
        value = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        verdict = await asyncio.wait_for(pub.publish("t/x", b"1"), 5)
        assert verdict.ok
        await pub.close()
        return value

    with Mosquitto(tmp_path / "mq") as b:
        assert asyncio.run(run(b.port)) == 1


def test_publisher_subscription_delivers_on_the_loop_after_reconnects(tmp_path: Path) -> None:
    import asyncio
    import threading

    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from gateway.config.sections import MqttConfig
    from gateway.observe.metrics import Metrics
    from gateway.uplink.mqtt import PahoPublisher

    async def run(broker: Mosquitto) -> list[tuple[bytes, bool]]:
        got: list[tuple[bytes, bool]] = []
        loop_thread = threading.get_ident()
        pub = PahoPublisher(
            MqttConfig(
                host="127.0.0.1", port=broker.port, reconnect_min_s=0.1, reconnect_max_s=0.5
            ),
            client_id="sub-test",
            will_topic="t/status",
            will_payload=b"offline",
            metrics=Metrics(),
        )
        pub.subscribe(
            "touchpoint/v1/s1/consent",
            lambda p: got.append((p, threading.get_ident() == loop_thread)),
        )
        await pub.start()
        for round_ in range(2):
            await asyncio.wait_for(pub.wait_connected(), 10)
            await asyncio.sleep(0.3)  # the SUBSCRIBE is in
            sender = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
            sender.connect("127.0.0.1", broker.port)
            sender.loop_start()
            sender.publish(
                "touchpoint/v1/s1/consent", f"delta-{round_}".encode(), qos=1
            ).wait_for_publish(5)
            sender.disconnect()
            sender.loop_stop()
            for _ in range(100):
                if len(got) > round_:
                    break
                await asyncio.sleep(0.05)
            if round_ == 0:
                broker.stop()
                broker.start()
                await asyncio.sleep(0.2)
        await pub.close()
        return got

    with Mosquitto(tmp_path / "mq") as b:
        got = asyncio.run(run(b))
    assert got == [(b"delta-0", True), (b"delta-1", True)]


def test_certificates_expiring_within_30_days_are_warned(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    """The test PKI's certificates expire in a day: the daemon warns for the client
    certificate and the CA, and says what to do."""
    status, log = run_tls(tmp_path, pki)
    assert status["last_publish_at"] is not None
    warnings = [line for line in log.splitlines() if "certificate expires in" in line]
    assert any("mqtt_client" in w and "WARNING" in w for w in warnings), log[-2000:]
    assert any("mqtt_ca" in w for w in warnings), warnings
    assert all("systemctl reload" in w for w in warnings)


def retained_status(port: int) -> dict[str, str]:
    """The retained status as a plain subscriber reads it."""
    import json

    import paho.mqtt.subscribe as subscribe

    msg = subscribe.simple(
        "touchpoint/v1/nl-ams-001/gw-01/status", hostname="127.0.0.1", port=port, retained=True
    )
    assert msg.retain
    doc: dict[str, str] = json.loads(msg.payload)
    return doc


def test_the_will_is_renewed_at_every_connect(tmp_path: Path) -> None:
    """After a reconnect, a kill -9 leaves a retained ``offline`` no older than the
    ``online`` it replaces: the will carries the time of the last connect."""
    from simulators.infra.netproxy import NetProxy
    from tests.system.uplink import wait_count

    with Mosquitto(tmp_path / "mq") as b, NetProxy(b.port) as link:
        gw = GatewayProc(tmp_path / "gw", link.port, sources=synthetic(50), consented=consented())
        gw.start()
        gw.wait_log("connected to broker")
        time.sleep(2.2)  # the next connect is seconds later
        link.cut()
        wait_count(gw, "connected to broker", 2)
        deadline = time.monotonic() + 10
        online = retained_status(b.port)
        while online["state"] != "online" and time.monotonic() < deadline:
            online = retained_status(b.port)
        gw.kill9()  # no goodbye: the broker publishes the will
        deadline = time.monotonic() + 10
        offline = retained_status(b.port)
        while offline["state"] != "offline" and time.monotonic() < deadline:
            time.sleep(0.1)
            offline = retained_status(b.port)
    assert offline["state"] == "offline"
    assert offline["ts"] >= online["ts"], (online, offline)


def test_a_reload_picks_up_a_renewed_client_certificate(
    tmp_path: Path, pki: dict[str, Path]
) -> None:
    """The client certificate expires in a day (warned); IT renews it and reloads: the new
    expiry shows in /metrics and the daemon connects with the new certificate."""
    from simulators.infra.broker import free_port
    from tests.pki import renew_client
    from tests.system.harness import metrics

    port = free_port()
    with Mosquitto(tmp_path / "mq", extra_conf=tls_conf(pki), allow_anonymous=False) as b:
        gw = GatewayProc(
            tmp_path / "gw", b.port, sources=synthetic(20), consented=consented(),
            mqtt_extra=tls_mqtt(pki), health_port=port,
        )  # fmt: skip
        gw.start()
        gw.wait_log("connected to broker")
        name = "certificate_expiry_timestamp_seconds"
        before = metrics(port)[name][(("certificate", "mqtt_client"),)]
        assert before - time.time() < 2 * 86400
        renewed = renew_client(pki, days=400).timestamp()
        assert gw.proc is not None
        gw.reload()
        gw.wait_log("reloading")
        deadline = time.monotonic() + 20
        after = before
        while time.monotonic() < deadline and after != renewed:
            time.sleep(0.3)
            with contextlib.suppress(OSError, KeyError):
                after = metrics(port)[name][(("certificate", "mqtt_client"),)]
        assert after == renewed
        assert gw.log.read_text().count("connected to broker") >= 2  # with the new one
        assert gw.stop() == 0
