"""A model-based test of the uplink against the real daemon, a real mosquitto and the fake
central: seeded random interleavings of readings from several subjects, withdrawals by
poll and by push, the broker away, hung (SIGSTOP) and back, a PUBACK-losing link and
``kill -9``.  After every run:

- for each withdrawn subject, every event of theirs at the central left the gateway (a
  proxy between the daemon and the broker timestamps each PUBLISH) before the withdrawal
  was applied (the daemon logs the moment);
- nothing is lost for the others: every seq the daemon assigned is at the central, except
  the events the erasures removed (at most as many as the daemon says it erased), and
  every event that left the gateway and is not at the central was a withdrawn subject's;
- no event of a withdrawn subject is left in the database or its WAL.

Three seeds run in ``make test`` (seed 2 caught paho's offline queue);
``UPLINK_MODEL_SEEDS=20`` runs more.
"""

from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path

import pytest

from simulators.central.consent_api import ConsentAPI
from simulators.central.service import Central
from simulators.infra.broker import Mosquitto
from simulators.infra.netproxy import NetProxy
from tests.system.harness import STORE, GatewayProc, synthetic
from tests.system.test_consent_system import CONSENTED, TOKEN, gateway
from tests.system.uplink import central_events, first_sent, leaks, log_times

pytestmark = pytest.mark.slow

APPLIED = "withdrawal applied"
SEEDS = list(range(int(os.environ.get("UPLINK_MODEL_SEEDS", "3"))))
STEPS = 9


def count_in_files(paths: list[Path], needle: bytes) -> int:
    return sum(p.read_bytes().count(needle) for p in paths if p.exists())


class Run:
    def __init__(
        self,
        tmp: Path,
        seed: int,
        broker: Mosquitto,
        link: NetProxy,
        api: ConsentAPI,
        gw: GatewayProc,
    ) -> None:
        self.rng = random.Random(seed)
        self.broker, self.link, self.api, self.gw = broker, link, api, gw
        self.withdrawn: dict[str, float] = {}
        self.is_down = False
        self.trace: list[str] = []

    def step(self) -> None:
        moves = ["wait", "withdraw_poll", "withdraw_push", "kill9", "lose_pubacks"]
        moves.append("up" if self.is_down else "down")
        if not self.is_down:
            moves.append("hang")
        move = self.rng.choice(moves)
        self.trace.append(move)
        getattr(self, move)()

    def wait(self) -> None:
        time.sleep(self.rng.uniform(0.3, 2.0))

    def _withdraw(self, push: bool) -> None:
        left = [s for s in CONSENTED if s not in self.withdrawn]
        if len(left) <= len(CONSENTED) // 2:
            return self.wait()
        subject = self.rng.choice(left)
        issued = time.time()
        self.api.withdraw(STORE, subject, push=push)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            applied = [t for t in log_times(self.gw.log, APPLIED) if t >= issued - 0.01]
            if applied:
                self.withdrawn[subject] = applied[0]
                self.settle_polls()
                time.sleep(self.rng.uniform(0, 1))
                return None
            time.sleep(0.05)
        raise TimeoutError(f"withdrawal not applied; trace {self.trace}")

    def settle_polls(self) -> None:
        """Wait for two more registry polls: a withdrawal applied by push is applied again
        by the poll that brings it (erasure is idempotent), and a restarted daemon applies
        every withdrawal again; the next withdrawal's moment must not be taken from those."""
        base = len(self.api.requests)  # the fake consent API's log of the daemon's polls
        deadline = time.monotonic() + 20
        while len(self.api.requests) < base + 2:
            assert time.monotonic() < deadline, "the daemon stopped polling the registry"
            time.sleep(0.05)

    def withdraw_poll(self) -> None:
        self._withdraw(push=False)

    def withdraw_push(self) -> None:
        self._withdraw(push=True)

    def down(self) -> None:
        self.link.refuse()
        self.link.cut()
        self.is_down = True
        self.wait()

    def up(self) -> None:
        self.link.accept()
        self.is_down = False
        self.wait()

    def hang(self) -> None:
        self.broker.pause()  # the daemon's keepalive (3 s) notices
        time.sleep(self.rng.uniform(1.0, 5.0))
        self.broker.resume()

    def lose_pubacks(self) -> None:
        self.link.lose_pubacks(every=self.rng.randint(2, 5))
        time.sleep(self.rng.uniform(1.0, 3.0))
        self.link.clear_faults()

    def kill9(self) -> None:
        self.gw.kill9()
        self.gw.start()
        self.gw.wait_ready()
        self.settle_polls()


@pytest.mark.parametrize("seed", SEEDS)
def test_a_withdrawal_reaches_everything_that_has_not_left_the_gateway(
    tmp_path: Path, seed: int
) -> None:
    api = ConsentAPI(token=TOKEN)  # the central starts and stops it
    for s in CONSENTED:
        api.grant(STORE, s, ["analytics", "linking"])
    out = tmp_path / "central.jsonl"
    with (
        Mosquitto(tmp_path / "mq") as broker,
        NetProxy(broker.port, mqtt=True) as link,
        Central("127.0.0.1", broker.port, out=out, consent=api) as central,
    ):
        assert central.wait_subscribed(10)
        gw = gateway(tmp_path, link.port, api)
        gw.set_sources(synthetic(150, cards=20))
        gw.start()
        gw.wait_log("consent snapshot", timeout=20)
        run = Run(tmp_path, seed, broker, link, api, gw)
        for _ in range(STEPS):
            run.step()
        link.accept()
        link.clear_faults()
        assert gw.stop() == 0, gw.log.read_text()[-3000:]
        gw.drain_and_stop(timeout=90)
        time.sleep(1.5)  # the central takes the last batches
        sent = first_sent(link)
    events = central_events(out)
    leaked = leaks(events, sent, run.withdrawn)
    assert not leaked, f"seed {seed}, trace {run.trace}: {leaked[:5]}"
    # Nothing lost: every assigned seq is at the central, except the erased events.
    seen = {(str(e["stream"]), int(str(e["seq"]))) for e in events}
    streams = {s for s, _ in seen}
    assert len(streams) == 1, streams
    stream = streams.pop()
    missing = [q for q in range(1, gw.last_seq() + 1) if (stream, q) not in seen]
    erased = sum(
        int(m.group(1))
        for m in re.finditer(r"erased \d+ subject\(s\): (\d+) buffered", gw.log.read_text())
    )
    # (an erased event may still arrive: its batch was on the wire when it was applied)
    assert len(missing) <= erased, (seed, run.trace, len(missing), erased)
    for q in missing:  # what left the gateway and never arrived was a withdrawn subject's
        left = sent.get((stream, q))
        assert left is None or left[1] in run.withdrawn, (seed, run.trace, q, left)
    files = [gw.db, Path(f"{gw.db}-wal")]
    for subject in run.withdrawn:
        marker = f'"subject":"{subject}"'.encode()
        assert count_in_files(files, marker) == 0, (seed, run.trace, subject)
