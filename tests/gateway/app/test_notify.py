"""The systemd notify protocol against a real AF_UNIX datagram socket.

Covers the messages (READY with STATUS, WATCHDOG, RELOADING/READY, STOPPING), both socket
address forms, the no-op without $NOTIFY_SOCKET, the watchdog interval, and the watchdog
cadence driven by ProgressWatch: pings while the pipeline moves or the broker is away,
none once the pipeline stalls or the buffer cannot be written, pings again on recovery.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.app.notify import Notifier, watchdog_interval
from gateway.app.watchdog import ProgressWatch


class Receiver:
    """The service manager's end: a bound datagram socket."""

    def __init__(self, sock: socket.socket, address: str) -> None:
        self.sock = sock
        self.address = address

    def messages(self) -> list[str]:
        out = []
        while True:
            try:
                out.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return out


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    try:
        yield Receiver(sock, str(path))
    finally:
        sock.close()


def test_ready_status_watchdog_reloading_stopping(
    receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver.address)
    n = Notifier()
    assert n.enabled
    assert n.ready("read 0, depth 0")
    assert n.watchdog()
    assert n.status("read 5, depth 2")
    assert n.reloading()
    assert n.ready()
    assert n.stopping()
    n.close()
    assert receiver.messages() == [
        "READY=1\nSTATUS=read 0, depth 0",
        "WATCHDOG=1",
        "STATUS=read 5, depth 2",
        "RELOADING=1",
        "READY=1",
        "STOPPING=1",
    ]


def test_abstract_namespace_address() -> None:
    name = f"touchpoint-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.setblocking(False)
    try:
        n = Notifier(address="@" + name)
        assert n.ready()
        n.close()
        assert Receiver(sock, "").messages() == ["READY=1"]
    finally:
        sock.close()


def test_no_op_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    assert not n.ready("x")
    assert not n.watchdog()
    assert not n.stopping()
    n.close()


def test_gone_manager_is_not_an_error(tmp_path: Path) -> None:
    n = Notifier(address=str(tmp_path / "nobody-listens.sock"))
    assert n.enabled
    assert not n.watchdog()
    n.close()


def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "soon")
    assert watchdog_interval() is None


def test_watchdog_cadence_follows_progress(receiver: Receiver) -> None:
    """One tick a second, as the housekeeping loop runs with WatchdogSec=30s."""
    n = Notifier(address=receiver.address)
    watch = ProgressWatch(stall_after_s=5)
    n.ready()
    msgs = receiver.messages()
    t, forwarded = 0.0, 0.0
    log: list[tuple[float, bool]] = []

    def tick(*, depth: int, connected: bool = True, buffer_ok: bool = True) -> None:
        nonlocal t
        t += 1.0
        ok = watch.progressing(
            mono=t, buffer_ok=buffer_ok, connected=connected, depth=depth, forwarded=forwarded
        )
        if ok:
            n.watchdog()
        log.append((t, ok))
        # drain as the service manager does: a full socket queue would block the sender
        msgs.extend(receiver.messages())

    for _ in range(3):  # idle, empty buffer
        tick(depth=0)
    for _ in range(3):  # a backlog that moves
        forwarded += 100
        tick(depth=500)
    for _ in range(10):  # broker away for a while: buffering is progress
        tick(depth=800, connected=False)
    for _ in range(8):  # broker "connected" but nothing acknowledged: a stall
        tick(depth=800)
    forwarded += 800  # it moves again
    tick(depth=0)
    tick(depth=0, buffer_ok=False)  # the buffer's last write failed
    tick(depth=0)
    n.close()

    pinged = [ok for _, ok in log]
    assert pinged[:16] == [True] * 16
    # stalled since t=16: pings while the stall is <= 5 s, then none
    assert pinged[16:24] == [True] * 5 + [False] * 3
    assert pinged[24:] == [True, False, True]
    assert msgs[0] == "READY=1"
    assert msgs[1:] == ["WATCHDOG=1"] * sum(pinged)
