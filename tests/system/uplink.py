"""What left the gateway and when: PUBLISHes timestamped by a proxy between the daemon
and the broker, held against the daemon's log of when each withdrawal was applied."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

from simulators.infra.netproxy import NetProxy
from tests.system.harness import GatewayProc

Key = tuple[str, int]  # (stream, seq)

_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ")


def log_times(log: Path, text: str) -> list[float]:
    """The wall times of the daemon's log lines containing ``text``."""
    out = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if text in line and (m := _LOG_TIME.match(line)):
            stamp = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"))
            out.append(stamp + int(m.group(2)) / 1000)
    return out


def first_sent(proxy: NetProxy) -> dict[Key, tuple[float, str | None]]:
    """When each event first left the gateway, with its subject."""
    out: dict[Key, tuple[float, str | None]] = {}
    for at, topic, payload in list(proxy.published):
        if not topic.endswith("/events"):
            continue
        doc = json.loads(payload)
        for event in doc["events"]:
            key = (doc["stream"], event["seq"])
            if key not in out:
                out[key] = (at, event.get("subject"))
    return out


def central_events(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def leaks(
    events: list[dict[str, object]],
    sent: dict[Key, tuple[float, str | None]],
    withdrawn: dict[str, float],
    resolution: float = 0.25,
) -> list[str]:
    """Events of a withdrawn subject at the central whose PUBLISH first left the gateway
    after the withdrawal was applied (or never passed the proxy at all).

    ``resolution``: the proxy stamps a PUBLISH when its thread reads it, which on a loaded
    test box (the central validates every batch in the same process) can be tens of ms
    after the daemon wrote it; a batch handed to the link just before the withdrawal must
    not count as sent after it.  A batch held back during an outage and sent after the
    reconnect (the bug this catches) leaves seconds later."""
    out = []
    for e in events:
        subject = e.get("subject")
        if not isinstance(subject, str) or subject not in withdrawn:
            continue
        key = (str(e["stream"]), int(str(e["seq"])))
        left = sent.get(key)
        if left is None or left[0] >= withdrawn[subject] + resolution:
            out.append(
                f"{key} of {subject[:12]}... left at {left and left[0]}, "
                f"withdrawal applied at {withdrawn[subject]}"
            )
    return out


def wait_count(gw: GatewayProc, text: str, n: int, timeout: float = 30) -> None:
    """Wait until the daemon's log holds ``text`` ``n`` times (all runs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gw.log.read_text(encoding="utf-8", errors="replace").count(text) >= n:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{text!r} not logged {n} times; log:\n{gw.log.read_text()[-3000:]}")
