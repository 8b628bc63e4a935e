"""The MQTT publisher: paho-mqtt 2.x behind the ``Publisher`` port.

paho runs its own network thread (``loop_start``); its callbacks only hand facts to the
event loop with ``call_soon_threadsafe``.  Designed around paho's known traps:

- ``on_publish`` fires even when the PUBACK carries a failure reason code: the verdict
  carries the code and the forwarder dead-letters the batch.
- paho keeps every unacknowledged QoS 1 message in memory and, after a reconnect, sends
  it again on the new connection (and a publish made while disconnected is queued there,
  unbounded).  That would be a second queue, out of erasure's reach: a withdrawal applied
  during an outage would not stop the events paho held.  So the outbox is the only queue:
  a publish is handed to paho only while connected; when the link drops, every message
  waiting for its PUBACK is abandoned (its verdict says so, its rows stay in the outbox)
  and dropped from paho before the next CONNECT and again on the CONNACK, before paho's
  resend loop runs; the forwarder then sends again from the outbox.  Every connect is a
  clean start (MQTT 5) or a clean session (3.1.1): the broker keeps no session either.
- The will is set again before every connect, with the time of that connect: a retained
  ``offline`` is never older than the ``online`` it replaces.
- MQTT 5's CONNACK announces the broker's Maximum Packet Size and Receive Maximum:
  ``max_payload`` and ``receive_maximum`` expose them to the forwarder, which sizes its
  batches and window by them; a payload the broker cannot take is refused here, by name
  (reason code 0x95, Packet too large), never sent to have the broker drop the link.
- Message ids are 16-bit: the window is far below 65,536.
- MQTT never sends a message again on a live connection, so a PUBACK the broker (or a
  middlebox) loses while the link stays up would hold its batch, and in time the whole
  window, forever.  A PUBACK awaited ``puback_timeout_s`` on a live link counts as a
  broken link: the socket is shut, paho reconnects with backoff and the forwarder
  sends the batch again from the outbox (a duplicate at worst, which the central drops).

Reconnects are paced by the gateway's one ``Backoff`` (exponential, jittered from the first
retry), so a fleet does not reconnect in lock-step after a broker restart: each delay is
handed to paho through its public ``reconnect_delay_set`` just before paho waits.  The
socket gets ``TCP_NODELAY``: QoS 1 throughput is bounded by window / round trip, and
Nagle's algorithm adds a delay to every round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.backoff import Backoff
from gateway.config.sections import MqttConfig
from gateway.errors import ConfigError
from gateway.observe.metrics import Metrics
from gateway.ports import PACKET_TOO_LARGE, Verdict

log = logging.getLogger(__name__)


class _Client(mqtt.Client):
    """paho's client, whose reconnect forgets the last connection and renews the will."""

    def reconnect(self) -> MQTTErrorCode:
        """paho's reconnect, remembering why it failed (paho's callback is not told).

        Before the CONNECT: nothing held from an earlier connection is carried into this
        one, and the will is renewed with this connect's time."""
        self.drop_out_messages()
        if self.will is not None:
            topic, payload = self.will
            self.will_set(topic, payload(), qos=1, retain=True)
        try:
            return super().reconnect()
        except OSError as exc:
            self.last_connect_error = exc
            raise

    last_connect_error: OSError | None = None
    will: tuple[str, Callable[[], bytes]] | None = None


def _describe(exc: BaseException | None) -> str:
    """A short, actionable reason for a failed connect."""
    if exc is None:
        return "unknown error"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message}); check mqtt.tls.ca_file"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason}); check the client certificate and key"
    for kind, text in _CONNECT_ERRORS:
        if isinstance(exc, kind):
            return text
    return f"{exc.__class__.__name__}: {exc}"


_ABANDONED = Verdict(ok=False, reason="the link dropped before the PUBACK", abandoned=True)

_CONNECT_ERRORS: list[tuple[type[BaseException], str]] = [
    (ConnectionRefusedError, "connection refused (is the broker running on that port?)"),
    (TimeoutError, "timed out"),
    (socket.gaierror, "host name does not resolve"),
]


class PahoPublisher:
    def __init__(
        self,
        cfg: MqttConfig,
        *,
        client_id: str,
        will_topic: str,
        will_payload: bytes | Callable[[], bytes],
        metrics: Metrics,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: dict[int, asyncio.Future[Verdict]] = {}
        # mid -> when its PUBACK became due: the publish, or the connect that resends it
        self._since: dict[int, float] = {}
        self._ack_timer: asyncio.TimerHandle | None = None
        self._connected = asyncio.Event()
        self._on_connect_hooks: list[Any] = []
        self._closing = False
        self._subscriptions: dict[str, Callable[[bytes], None]] = {}
        self.max_packet_size: int | None = None  # the broker's, from its CONNACK
        self.receive_maximum: int | None = None
        self._topic_lens: dict[str, int] = {}
        v5 = cfg.protocol == "5"
        self._v5 = v5
        client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else True,
        )
        # Our Backoff paces the reconnects: before each of paho's waits (a failed connect
        # or a lost link, whose callbacks run just before it on paho's thread) its next
        # jittered delay is set as paho's public reconnect delay, min = max.
        self._backoff = Backoff(cfg.reconnect_min_s, cfg.reconnect_max_s)
        client.connect_timeout = cfg.connect_timeout_s
        # Our window is the real bound; paho's is only a backstop above it.
        client.max_inflight_messages_set(cfg.inflight_window + 16)
        client.max_queued_messages_set(0)
        fixed = will_payload
        payload = (lambda: fixed) if isinstance(fixed, bytes) else fixed
        client.will = (will_topic, payload)  # set again before every connect
        if cfg.username is not None:
            password = None
            if cfg.password_file is not None:
                try:
                    password = cfg.password_file.read_text(encoding="utf-8").strip()
                except OSError as exc:
                    raise ConfigError(
                        [(str(cfg.password_file), "mqtt.password_file", f"cannot read: {exc}")]
                    ) from None
            client.username_pw_set(cfg.username, password)
        if cfg.tls is not None:
            client.tls_set(
                ca_certs=str(cfg.tls.ca_file) if cfg.tls.ca_file else None,
                certfile=str(cfg.tls.cert_file) if cfg.tls.cert_file else None,
                keyfile=str(cfg.tls.key_file) if cfg.tls.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        client.on_connect = self._cb_connect
        client.on_disconnect = self._cb_disconnect
        client.on_publish = self._cb_publish
        client.on_connect_fail = self._cb_connect_fail
        client.on_socket_open = self._cb_socket_open
        client.on_message = self._cb_message
        self.client = client

    # -- Publisher port -----------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = {}
        if self._v5:
            kwargs["clean_start"] = True  # the database is the session
        self.client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive_s, **kwargs)
        self.client.loop_start()
        self._ack_timer = self._loop.call_later(self._ack_check_s, self._check_acks)

    @property
    def _ack_check_s(self) -> float:
        return min(5.0, self.cfg.puback_timeout_s / 4)

    def subscribe(self, topic: str, callback: Callable[[bytes], None]) -> None:
        """Receive ``topic`` at QoS 1 on every connection; ``callback(payload)`` runs on
        the event loop.  Call before ``start``."""
        self._subscriptions[topic] = callback

    def on_connect(self, hook: Any) -> None:
        """Call ``hook()`` on the event loop after every successful connect."""
        self._on_connect_hooks.append(hook)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        await self._connected.wait()

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False
    ) -> asyncio.Future[Verdict]:
        assert self._loop is not None
        fut: asyncio.Future[Verdict] = self._loop.create_future()
        if not self._connected.is_set():  # nothing waits in the client while down
            fut.set_result(_ABANDONED)
            return fut
        limit = self.max_payload(topic)
        if limit is not None and len(payload) > limit:
            fut.set_result(
                Verdict(
                    ok=False,
                    reason_code=PACKET_TOO_LARGE,
                    reason=f"Packet too large: {len(payload)} bytes, the broker's maximum "
                    f"packet size {self.max_packet_size} leaves {limit} for a payload",
                )
            )
            return fut
        try:
            info = self.client.publish(topic, payload, qos=1, retain=retain)
        except ValueError as exc:  # payload too large or bad topic: never queued
            fut.set_result(Verdict(ok=False, reason_code=-1, reason=str(exc)))
            return fut
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            # The link went between our last news of it and now: paho holds the message
            # until the next connect drops it; the caller sends it again from its store.
            fut.set_result(_ABANDONED)
            return fut
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            fut.set_result(
                Verdict(ok=False, reason_code=-int(info.rc), reason=mqtt.error_string(info.rc))
            )
            return fut
        self._pending[info.mid] = fut
        self._since[info.mid] = time.monotonic()
        return fut

    async def close(self, *, graceful: bool = True) -> None:
        """Disconnect; when graceful, first wait (up to 2 s) for pending PUBACKs."""
        self._closing = True
        if self._ack_timer is not None:
            self._ack_timer.cancel()
        if graceful and self.connected and self._pending:
            await asyncio.wait(set(self._pending.values()), timeout=2.0)
        self.client.disconnect()
        self.client.loop_stop()
        for fut in self._pending.values():
            if not fut.done():
                fut.cancel()
        self._pending.clear()
        self._since.clear()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def max_payload(self, topic: str) -> int | None:
        """The largest payload the broker takes on ``topic`` (its Maximum Packet Size less
        a PUBLISH's header), or None when it announced no limit."""
        if self.max_packet_size is None:
            return None
        n = self._topic_lens.get(topic)
        if n is None:
            n = self._topic_lens[topic] = len(topic.encode())
        # fixed header (1 + up to 4), topic (2 + n), packet id (2), properties length (1)
        return self.max_packet_size - (5 + 2 + n + 2 + 1)

    def _abandon_all(self) -> None:
        """The link is gone: no verdict will come for what waits (see the docstring)."""
        pending = list(self._pending.values())
        self._pending.clear()
        self._since.clear()
        for fut in pending:
            if not fut.done():
                fut.set_result(_ABANDONED)

    # -- paho callbacks: network thread, enqueue only -------------------------------------

    def _post(self, fn: Any, *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(fn, *args)

    def _cb_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        callback = self._subscriptions.get(msg.topic)
        if callback is not None:
            self._post(callback, bytes(msg.payload))

    def _cb_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if isinstance(sock, socket.socket | ssl.SSLSocket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _cb_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if not reason_code.is_failure:
            # Before paho's resend loop (it runs after this callback): send nothing again.
            client.drop_out_messages()
            self._backoff.reset()
        limits = (
            getattr(properties, "MaximumPacketSize", None),
            getattr(properties, "ReceiveMaximum", None),
        )
        self._post(self._connected_changed, not reason_code.is_failure, str(reason_code), limits)

    def _next_wait(self, client: mqtt.Client) -> None:
        """On paho's thread, just before paho waits to reconnect: how long it waits."""
        delay = self._backoff.next()
        # Typed int, but seconds of any kind: paho adds it to time.monotonic() and sleeps.
        client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]

    def _cb_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        self._next_wait(client)
        exc = self.client.last_connect_error
        self._post(self._connect_failed, _describe(exc))

    def _cb_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._next_wait(client)
        self._post(self._connected_changed, False, str(reason_code))

    def _cb_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._post(
            self._published, mid, reason_code.value, str(reason_code), reason_code.is_failure
        )

    # -- on the event loop ----------------------------------------------------------------

    def _connected_changed(
        self, up: bool, reason: str, limits: tuple[int | None, int | None] = (None, None)
    ) -> None:
        self._abandon_all()  # whatever waited belongs to a connection that is gone
        if up:
            if not self._connected.is_set():
                log.info("connected to broker %s:%d", self.cfg.host, self.cfg.port)
            self._limits(*limits)
            for topic in self._subscriptions:
                self.client.subscribe(topic, qos=1)
            self._connected.set()
            self.metrics.set("mqtt_connected", 1)
            for hook in self._on_connect_hooks:
                hook()
            return
        if self._closing:
            pass
        elif self._connected.is_set():
            log.warning("disconnected from broker: %s; reconnecting with backoff", reason)
            self.metrics.inc("mqtt_reconnects_total")
        elif reason != "Success":
            message = f"broker refused the connection: {reason}"
            if self.metrics.last_error.get("mqtt") != message:
                log.warning("%s", message)  # once per distinct cause, not per retry
            self.metrics.error("mqtt", message)
        self._connected.clear()
        self.metrics.set("mqtt_connected", 0)

    def _limits(self, max_packet: int | None, receive_max: int | None) -> None:
        if (max_packet, receive_max) != (self.max_packet_size, self.receive_maximum):
            log.info(
                "broker limits: maximum packet size %s, receive maximum %s",
                max_packet or "none",
                receive_max or "none",
            )
        self.max_packet_size, self.receive_maximum = max_packet, receive_max
        self.metrics.set("mqtt_broker_max_packet_bytes", max_packet or 0)
        self.metrics.set("mqtt_broker_receive_maximum", receive_max or 0)

    def _connect_failed(self, why: str) -> None:
        self.metrics.inc("mqtt_connect_failures_total")
        message = f"cannot connect to broker {self.cfg.host}:{self.cfg.port}: {why}"
        if self.metrics.last_error.get("mqtt") != message:
            log.warning("%s; retrying with backoff", message)  # once per distinct cause
        self.metrics.error("mqtt", message)

    def _check_acks(self) -> None:
        """Every few seconds: a PUBACK awaited ``puback_timeout_s`` on a live link breaks
        the link (see the module docstring)."""
        assert self._loop is not None
        self._ack_timer = self._loop.call_later(self._ack_check_s, self._check_acks)
        if not self._since or not self.connected or self._closing:
            return
        now = time.monotonic()
        waited = now - min(self._since.values())
        if waited < self.cfg.puback_timeout_s:
            return
        log.warning(
            "no PUBACK from the broker for %.0f s on a live connection (%d batches waiting); "
            "reconnecting to send them again",
            waited,
            len(self._since),
        )
        self.metrics.inc("mqtt_puback_timeouts_total")
        for mid in self._since:  # once per stall, not at every check until the link goes
            self._since[mid] = now
        sock = self.client.socket()
        if isinstance(sock, socket.socket):  # ssl.SSLSocket too: shuts the TCP link
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _published(self, mid: int, code: int, reason: str, failure: bool) -> None:
        self._since.pop(mid, None)
        fut = self._pending.pop(mid, None)
        if fut is None or fut.done():
            return
        fut.set_result(Verdict(ok=not failure, reason_code=code, reason=reason))
