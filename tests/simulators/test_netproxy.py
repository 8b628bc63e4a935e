"""The network proxy's MQTT packet faults, against a raw TCP peer on loopback."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from simulators.infra.netproxy import MqttFrames, NetProxy, packet_length

PUBACK_1 = bytes([0x40, 0x02, 0x00, 0x01])
PUBACK_2 = bytes([0x40, 0x02, 0x00, 0x02])
PUBACK_3 = bytes([0x40, 0x02, 0x00, 0x03])
PINGRESP = bytes([0xD0, 0x00])


def publish(packet_id: int, payload: bytes) -> bytes:
    topic = b"t/x"
    body = len(topic).to_bytes(2, "big") + topic + packet_id.to_bytes(2, "big") + payload
    n, rl = len(body), bytearray()
    while True:
        n, digit = divmod(n, 128)
        rl.append(digit | (0x80 if n else 0))
        if not n:
            break
    return bytes([0x32]) + bytes(rl) + body


def test_packet_length_reads_the_fixed_header() -> None:
    assert packet_length(PUBACK_1) == 4
    assert packet_length(PINGRESP) == 2
    assert packet_length(bytes([0x30, 0xC1, 0x02])) == 1 + 2 + 321  # 321 = 0x41 + 2 * 128
    assert packet_length(bytes([0x30])) is None
    assert packet_length(bytes([0x30, 0x80])) is None  # the length continues
    with pytest.raises(ValueError, match="remaining length"):
        packet_length(bytes([0x30, 0xFF, 0xFF, 0xFF, 0xFF]))


def test_frames_reassemble_packets_split_anywhere() -> None:
    big = publish(7, b"x" * 300)
    stream = PUBACK_1 + big + PINGRESP
    for cut in range(1, len(stream)):
        frames = MqttFrames()
        got = frames.feed(stream[:cut]) + frames.feed(stream[cut:])
        assert got == [PUBACK_1, big, PINGRESP], cut


class Peer:
    """A TCP server on loopback that sends ``greeting`` and records what it receives."""

    def __init__(self, greeting: bytes = b"") -> None:
        self.greeting = greeting
        self.received = bytearray()
        self.closed = threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            conn.sendall(self.greeting)
            try:
                while data := conn.recv(65536):
                    self.received += data
            except OSError:
                pass
        self.closed.set()

    def close(self) -> None:
        self.sock.close()


def read_until_closed(sock: socket.socket) -> bytes:
    got = bytearray()
    sock.settimeout(30)
    try:
        while data := sock.recv(65536):
            got += data
    except ConnectionResetError:
        pass
    return bytes(got)


@pytest.fixture
def peer_and_proxy(request: pytest.FixtureRequest) -> Iterator[tuple[Peer, NetProxy]]:
    peer = Peer(getattr(request, "param", b""))
    with NetProxy(peer.port, mqtt=True) as proxy:
        yield peer, proxy
    peer.close()


@pytest.mark.parametrize(
    "peer_and_proxy", [PUBACK_1 + PINGRESP + PUBACK_2 + PUBACK_3], indirect=True
)
def test_a_lost_puback_takes_the_link_with_it(peer_and_proxy: tuple[Peer, NetProxy]) -> None:
    peer, proxy = peer_and_proxy
    proxy.lose_pubacks(every=2)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as client:
        got = read_until_closed(client)
    assert got == PUBACK_1 + PINGRESP, "packets before the lost PUBACK pass, nothing after"
    assert proxy.pubacks_lost == 1
    assert peer.closed.wait(30), "the broker's side of the link is cut too"


@pytest.mark.parametrize(
    "peer_and_proxy", [PUBACK_1 + PINGRESP + PUBACK_2 + PUBACK_3], indirect=True
)
def test_a_swallowed_puback_leaves_the_link_up(peer_and_proxy: tuple[Peer, NetProxy]) -> None:
    peer, proxy = peer_and_proxy
    proxy.swallow_pubacks(every=2)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as client:
        got = b""
        while len(got) < len(PUBACK_1 + PINGRESP + PUBACK_3):
            got += client.recv(65536)
        assert got == PUBACK_1 + PINGRESP + PUBACK_3, "only the 2nd PUBACK is missing"
        client.settimeout(0.3)
        with pytest.raises(TimeoutError):
            client.recv(1)  # the link is still up: nothing more, and no close
        assert not peer.closed.is_set(), "the broker's side stays up too"
    assert proxy.pubacks_swallowed == 1


def test_a_publish_is_cut_half_way_and_the_link_with_it(
    peer_and_proxy: tuple[Peer, NetProxy],
) -> None:
    peer, proxy = peer_and_proxy
    proxy.cut_mid_publish(every=2)
    first, second = publish(1, b"a" * 1000), publish(2, b"b" * 1000)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as client:
        client.sendall(first + second + publish(3, b"c"))
        assert read_until_closed(client) == b""
    assert peer.closed.wait(30)
    assert bytes(peer.received) == first + second[: len(second) // 2]
    assert proxy.publishes_cut == 1


def test_without_faults_bytes_pass_unchanged(peer_and_proxy: tuple[Peer, NetProxy]) -> None:
    peer, proxy = peer_and_proxy
    proxy.cut_mid_publish(every=2)
    proxy.clear_faults()
    data = publish(1, b"a") + publish(2, b"b") + publish(3, b"c")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as client:
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        read_until_closed(client)
    assert peer.closed.wait(30)
    assert bytes(peer.received) == data
    assert proxy.publishes_cut == 0


def test_packet_faults_need_the_mqtt_mode() -> None:
    with NetProxy(1) as proxy, pytest.raises(ValueError, match="mqtt=True"):
        proxy.lose_pubacks(every=1)
