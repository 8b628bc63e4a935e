"""A TCP proxy on loopback for network faults and latency, run in its own thread.

    python -m simulators.infra.netproxy UPSTREAM_PORT [--port N] [--delay 0.01] [--mqtt ...]

prints the port it listens on as its first stdout line and runs until Ctrl-C or SIGTERM.

    with NetProxy(upstream_port, delay_s=0.010) as proxy:   # +20 ms round trip
        proxy.port                 # connect here instead of upstream
        proxy.refuse()             # new connections are closed at once
        proxy.accept()             # ... and accepted again
        proxy.cut()                # drop every open connection

Delay is applied per direction to each chunk, in order, like a long cable.

With ``mqtt=True`` the proxy cuts both directions into MQTT control packets (a fixed
header: the packet type in the high nibble of the first byte, then the remaining length
as a variable byte integer; the same in MQTT 3.1.1 and 5) for packet-level faults:

    proxy.lose_pubacks(every=5)     # every 5th PUBACK to a client is lost with its link
    proxy.swallow_pubacks(every=5)  # every 5th PUBACK is dropped; the link lives on
    proxy.cut_mid_publish(every=7)  # every 7th PUBLISH from a client is cut half way
    proxy.clear_faults()
    proxy.published            # (wall time, topic, payload) of every PUBLISH passed on
    proxy.pubacks_lost, proxy.pubacks_swallowed, proxy.publishes_cut   # how many so far

A lost PUBACK is the broker's acknowledgement dying with the connection after the broker
took the message: the client must send it again on its next connection (a duplicate,
never a loss).  A swallowed PUBACK is a broker (or middlebox) that took the message and
never acknowledged it on a link that stays up: MQTT sends nothing again on a live link,
so the client must notice and break the link itself.  A publish cut half way through is
a link dying mid-batch: the broker never sees the message, and the client must send it
again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import Sequence

from simulators.infra.service import Service, serve

CONNECT, PUBLISH, PUBACK = 1, 3, 4
_CUT = b"\x00cut"  # queued after the last bytes a faulty link passes on


class MqttFrames:
    """Cut a byte stream into whole MQTT control packets (pure; no I/O)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.v5 = False  # the CONNECT seen on this stream asked for MQTT 5

    def feed(self, data: bytes) -> list[bytes]:
        """Append ``data``; return the packets it completes, in order."""
        self.buf += data
        out = []
        while (n := packet_length(self.buf)) is not None and len(self.buf) >= n:
            out.append(bytes(self.buf[:n]))
            del self.buf[:n]
        return out


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """A variable byte integer at ``buf[i:]``: (value, index after it)."""
    value, mult = 0, 1
    while True:
        byte = buf[i]
        i += 1
        value += (byte & 0x7F) * mult
        if not byte & 0x80:
            return value, i
        mult *= 128


def publish_fields(packet: bytes, v5: bool) -> tuple[str, bytes]:
    """(topic, payload) of a whole PUBLISH packet (MQTT 3.1.1 or 5)."""
    _, i = _varint(packet, 1)
    n = int.from_bytes(packet[i : i + 2], "big")
    topic = packet[i + 2 : i + 2 + n].decode()
    i += 2 + n
    if (packet[0] >> 1) & 3:  # QoS > 0: a packet identifier
        i += 2
    if v5:
        props, i = _varint(packet, i)
        i += props
    return topic, packet[i:]


def is_v5_connect(packet: bytes) -> bool:
    """Whether a CONNECT packet asks for MQTT 5 (protocol level 5)."""
    _, i = _varint(packet, 1)
    n = int.from_bytes(packet[i : i + 2], "big")
    return packet[i + 2 + n] == 5


def packet_length(buf: bytes | bytearray) -> int | None:
    """The whole packet's length from its fixed header, or None while it is incomplete.

    Raises ValueError for a remaining length longer than the four bytes MQTT allows.
    """
    value, mult = 0, 1
    for i in range(1, min(len(buf), 5)):
        value += (buf[i] & 0x7F) * mult
        if not buf[i] & 0x80:
            return 1 + i + value
        mult *= 128
    if len(buf) >= 5:
        raise ValueError("malformed MQTT remaining length (more than 4 bytes)")
    return None


class NetProxy(Service):
    def __init__(
        self,
        upstream_port: int,
        *,
        upstream_host: str = "127.0.0.1",
        delay_s: float = 0.0,
        mqtt: bool = False,
        port: int = 0,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.delay_s = delay_s
        self.mqtt = mqtt
        self._puback_every = 0
        self._swallow_every = 0
        self._publish_every = 0
        self._pubacks_seen = 0
        self._swallow_seen = 0
        self._publishes_seen = 0
        self.pubacks_lost = 0
        self.pubacks_swallowed = 0
        self.publishes_cut = 0
        self.port = port
        self._accepting = True
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="netproxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self.connections = 0
        self.published: list[tuple[float, str, bytes]] = []

    def start(self) -> None:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(self._start(), self._loop)
        fut.result(5)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def _inspect(self, upstream: bool, frames: MqttFrames, data: bytes) -> tuple[bytes, bool]:
        """The bytes to pass on, and whether the link dies after them."""
        out = bytearray()
        for packet in frames.feed(data):
            kind = packet[0] >> 4
            if upstream and kind == CONNECT:
                frames.v5 = is_v5_connect(packet)
            if not upstream and kind == PUBACK and self._puback_every:
                self._pubacks_seen += 1
                if self._pubacks_seen % self._puback_every == 0:
                    self.pubacks_lost += 1
                    return bytes(out), True
            if not upstream and kind == PUBACK and self._swallow_every:
                self._swallow_seen += 1
                if self._swallow_seen % self._swallow_every == 0:
                    self.pubacks_swallowed += 1
                    continue
            if upstream and kind == PUBLISH and self._publish_every:
                self._publishes_seen += 1
                if self._publishes_seen % self._publish_every == 0:
                    self.publishes_cut += 1
                    return bytes(out + packet[: len(packet) // 2]), True
            if upstream and kind == PUBLISH:  # leaves the proxy now, whole
                self.published.append((time.time(), *publish_fields(packet, frames.v5)))
            out += packet
        return bytes(out), False

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        upstream: bool = False,
        peer: asyncio.StreamWriter | None = None,
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def pump() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is _CUT:  # the link dies: both ends see a reset
                    await asyncio.sleep(0.05)  # let the bytes before it leave
                    for w in (writer, peer):
                        if w is not None:
                            w.transport.abort()
                    break
                writer.write(data)
                await writer.drain()

        task = asyncio.create_task(pump())
        frames = MqttFrames() if self.mqtt else None
        try:
            while data := await reader.read(65536):
                due = time.monotonic() + self.delay_s
                cut = False
                if frames is not None:
                    data, cut = self._inspect(upstream, frames, data)
                if data:
                    await queue.put((due, data))
                if cut:
                    await queue.put((due, _CUT))
                    break
        except (ConnectionError, OSError, ValueError):
            pass
        finally:
            await queue.put((0.0, b""))
            with contextlib.suppress(ConnectionError, OSError):
                await task
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._accepting:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            return
        self.connections += 1
        self._conns.update((writer, up_writer))
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, upstream=True, peer=writer),
                self._pipe(up_reader, writer, peer=up_writer),
            )
        finally:
            self._conns.discard(writer)
            self._conns.discard(up_writer)

    def _call(self, fn: object) -> None:
        async def run() -> None:
            fn()  # type: ignore[operator]

        asyncio.run_coroutine_threadsafe(run(), self._loop).result(5)

    def lose_pubacks(self, every: int) -> None:
        """Lose every ``every``-th PUBACK to a client, and that connection with it."""
        self._need_mqtt()
        self._pubacks_seen, self._puback_every = 0, every

    def swallow_pubacks(self, every: int) -> None:
        """Drop every ``every``-th PUBACK to a client, keeping the connection up."""
        self._need_mqtt()
        self._swallow_seen, self._swallow_every = 0, every

    def cut_mid_publish(self, every: int) -> None:
        """Cut every ``every``-th PUBLISH from a client half way, and its connection."""
        self._need_mqtt()
        self._publishes_seen, self._publish_every = 0, every

    def clear_faults(self) -> None:
        self._puback_every = self._swallow_every = self._publish_every = 0

    def _need_mqtt(self) -> None:
        if not self.mqtt:
            raise ValueError("packet faults need NetProxy(..., mqtt=True)")

    def refuse(self) -> None:
        self._accepting = False

    def accept(self) -> None:
        self._accepting = True

    def cut(self) -> None:
        def close_all() -> None:
            for w in list(self._conns):
                w.transport.abort()

        self._call(close_all)

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._conns):
                w.transport.abort()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.infra.netproxy",
        description="A TCP proxy on 127.0.0.1 that adds latency and, with --mqtt, loses or "
        "swallows PUBACKs and cuts PUBLISHes half way; the first stdout line is its port.  "
        "Ctrl-C or SIGTERM stops it.",
    )
    parser.add_argument("upstream_port", type=int, help="the port to forward to (a broker's)")
    parser.add_argument("--upstream-host", default="127.0.0.1", help="host to forward to")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: a free one)")
    parser.add_argument(
        "--delay", type=float, default=0.0, help="seconds added to each chunk, each direction"
    )
    parser.add_argument("--mqtt", action="store_true", help="cut the streams into MQTT packets")
    parser.add_argument(
        "--lose-pubacks", type=int, default=0, metavar="N",
        help="with --mqtt: every Nth PUBACK is lost with its connection",
    )  # fmt: skip
    parser.add_argument(
        "--swallow-pubacks", type=int, default=0, metavar="N",
        help="with --mqtt: every Nth PUBACK is dropped, the connection lives on",
    )  # fmt: skip
    parser.add_argument(
        "--cut-mid-publish", type=int, default=0, metavar="N",
        help="with --mqtt: every Nth PUBLISH from a client is cut half way",
    )  # fmt: skip
    args = parser.parse_args(argv)
    faults = (args.lose_pubacks, args.swallow_pubacks, args.cut_mid_publish)
    if any(faults) and not args.mqtt:
        parser.error("--lose-pubacks, --swallow-pubacks and --cut-mid-publish need --mqtt")
    proxy = NetProxy(
        args.upstream_port,
        upstream_host=args.upstream_host,
        delay_s=args.delay,
        mqtt=args.mqtt,
        port=args.port,
    )
    if args.lose_pubacks:
        proxy.lose_pubacks(args.lose_pubacks)
    if args.swallow_pubacks:
        proxy.swallow_pubacks(args.swallow_pubacks)
    if args.cut_mid_publish:
        proxy.cut_mid_publish(args.cut_mid_publish)
    return serve(proxy)


if __name__ == "__main__":
    sys.exit(main())
