"""The whole simulated store: every simulator running, and a gateway.toml that uses them all.

    with StoreRig(work) as rig:
        cfg = rig.write_config()          # every source, the broker, the consent grants
        ... run the daemon on cfg (a process, or Gateway in-process with rig.env()) ...
        rig.stop("printer"); rig.start("printer")   # hardware faults, one at a time
        events = rig.central_events()

What runs, each as its own process (logs in ``work/sim-<name>.log``):

- ``broker``: a mosquitto on a free loopback port (``simulators.infra.broker.Mosquitto``);
- ``central``: the fake central service (MQTT consumer, consent API over HTTP);
- ``cards``: the card-reader simulator on a pty (kept behind the ``card-reader`` symlink,
  so a restart is an unplug and replug of the same device name);
- ``ble``: a private D-Bus with the fake BlueZ replaying a BLE scenario in a loop;
- ``camera``: the MJPEG-over-HTTP kiosk camera on a fixed port (a restart is a stream
  drop and return);
- ``printer``: a fake network receipt printer on a fixed port, behind the daemon's tap;
- ``till``: a fake till sending a receipt through the tap every ``till_interval_s``
  (it retries while the tap or the printer is down, as tills do).

The shoppers of the card and BLE scenarios are granted consent by the fake central's
registry (the daemon's consent sync brings it), and the
camera's app tokens carry their own, so events flow from every source
(``consent_exclude`` leaves some out; ``consent_steps`` adds later changes).  ``RigLoad`` sets
the rates; a synthetic source adds bulk card reads when ``synthetic_rate`` > 0.

Used by the demo, ``make bench`` (memory with every source at load) and the
fault, crash and soak tests.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from simulators.deps import GATEWAY, missing

try:
    from drivers.synthetic import card_number
    from gateway.identity.pseudonyms import Keyring
except ModuleNotFoundError as exc:
    raise missing(exc, "the store rig", GATEWAY) from exc
from simulators.devices.ble_scenario import Scenario, build_timeline
from simulators.infra.broker import Mosquitto, free_port

SCENARIOS = Path(__file__).resolve().parents[1] / "scenarios"
STORE = "nl-ams-001"
RIG_CONSENT_TOKEN = "rig-consent-token"  # noqa: S105 - the fake central's test credential
RECEIPT_PREFIX = "https://r.example.test/r/"
SIMULATORS = ("central", "cards", "ble", "camera", "printer", "till")


def _write_owner_only(path: Path, line: str) -> None:
    """A secret file for the gateway: 0600 whatever the umask (it refuses anything wider)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        os.fchmod(fd, 0o600)
        f.write(line + "\n")


@dataclass(frozen=True)
class RigLoad:
    """What the simulated store does, and how fast."""

    card_scenario: Path = SCENARIOS / "card-demo.toml"
    ble_scenario: Path = SCENARIOS / "ble-walkthrough.toml"
    ble_speed: float = 1.0
    camera_scenario: Path = SCENARIOS / "camera-kiosk.toml"
    camera_decode_fps: float = 10.0
    till_interval_s: float = 2.0
    synthetic_rate: float = 0.0  # extra card reads per second from an in-daemon generator
    synthetic_cards: int = 200
    inject: str = "native"  # receipt token QR before each cut: off, native or raster


@dataclass
class _Sim:
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = field(default=None, repr=False)


def _canonical_ble(adv: dict[str, Any]) -> tuple[str, str] | None:
    kind = adv.get("kind")
    if kind == "ibeacon":
        return "ibeacon", f"{adv['uuid']}:{adv['major']}:{adv['minor']}"
    if kind == "eddystone_uid":
        return "eddystone", f"{adv['namespace']}:{adv['instance']}"
    if kind == "altbeacon":
        return "altbeacon", str(adv["beacon_id"])
    return None


class StoreRig:
    """Start every simulator of a store; write the gateway config that uses them."""

    def __init__(
        self,
        work: Path,
        load: RigLoad | None = None,
        *,
        broker_persistence: bool = True,
        consent_grants: bool = True,
        consent_exclude: frozenset[tuple[str, str]] = frozenset(),
        consent_steps: list[dict[str, Any]] | None = None,
        progress: bool = False,
    ) -> None:
        self.work = Path(work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.load = load or RigLoad()
        self.consent_grants = consent_grants
        self.consent_exclude = consent_exclude
        self.consent_steps = consent_steps or []
        self.progress = progress
        self.broker = Mosquitto(self.work / "mosquitto", persistence=broker_persistence)
        self.http_port = free_port()
        self.camera_port = free_port()
        self.printer_port = free_port()
        self.tap_port = free_port()
        self.health_port = free_port()
        self.card_link = self.work / "card-reader"
        self.key_path = self.work / "k1.key"
        self.central_out = self.work / "central-events.jsonl"
        self.central_stats = self.work / "central-stats.json"
        self.bus_address = ""
        self.app_public_key = ""
        self._sims: dict[str, _Sim] = {}

    # ---- identities the scenarios use (for consent grants and privacy canaries) ----

    def ble_addresses(self) -> list[str]:
        """Every device address the BLE scenario's adverts come from (rotating ones too),
        as BlueZ writes it (``AA:BB:...``) and in its D-Bus object paths (``AA_BB_...``):
        personal data the daemon must never keep (privacy canaries)."""
        steps = build_timeline(Scenario.load(self.load.ble_scenario))
        addresses = {s.address for s in steps if s.action == "advert" and s.address}
        return sorted({form for a in addresses for form in (a, a.replace(":", "_"))})

    def raw_identities(self) -> list[tuple[str, str]]:
        """(namespace, raw identifier) of every shopper the card and BLE scenarios show."""
        out: list[tuple[str, str]] = []
        cards = tomllib.loads(self.load.card_scenario.read_text(encoding="utf-8"))
        for step in cards.get("steps", []):
            if step.get("action") == "tap" and "card" in step:
                out.append(("rfid", str(step["card"])))
        ble = tomllib.loads(self.load.ble_scenario.read_text(encoding="utf-8"))
        allowed = self._allow_lists()
        for adv in ble.get("advertisers", []):
            ident = _canonical_ble(adv)
            if ident is None:
                continue
            ns, raw = ident
            head = raw.split(":")[0]
            if (
                (ns == "ibeacon" and head in allowed["allow_ibeacon_uuids"])
                or (ns == "eddystone" and head in allowed["allow_eddystone_namespaces"])
                or (
                    ns == "altbeacon"
                    and any(raw.startswith(p) for p in allowed["allow_altbeacon_prefixes"])
                )
            ):
                out.append(ident)
        return sorted(set(out))

    @staticmethod
    def _allow_lists() -> dict[str, list[str]]:
        return {
            "allow_ibeacon_uuids": ["83256b74-78d0-43a4-8269-05f9dc8a44ba"],
            "allow_eddystone_namespaces": ["e157bd5df90aad1dc2fb"],
            "allow_altbeacon_prefixes": ["2f234454cf6d4a0fadf2f491"],
        }

    def _write_key_and_consent(self) -> None:
        if not self.key_path.exists():
            _write_owner_only(self.key_path, base64.b64encode(secrets.token_bytes(32)).decode())
        ring = Keyring.from_files({"k1": self.key_path}, "k1")
        subjects: list[str] = []
        if self.consent_grants:
            subjects = [
                ring.pseudonym(ns, raw)
                for ns, raw in self.raw_identities()
                if (ns, raw) not in self.consent_exclude
            ]
            # The synthetic source's cards (drivers.synthetic) consent too.
            bulk = self.load.synthetic_cards if self.load.synthetic_rate > 0 else 0
            subjects += [ring.pseudonym("loyalty", card_number(i)) for i in range(bulk)]
        # The central's registry grants them at once; the daemon's sync brings them.
        steps = [
            {"at_s": 0, "action": "grant", "subject": s, "purposes": ["analytics", "linking"]}
            for s in subjects
        ]
        for given in self.consent_steps:  # {"identity": [namespace, raw], ...}: pseudonymised
            step = dict(given)
            if "identity" in step:
                ns, raw = step.pop("identity")
                step["subject"] = ring.pseudonym(ns, raw)
            steps.append(step)
        (self.work / "consent-script.json").write_text(
            json.dumps({"steps": steps}), encoding="utf-8"
        )
        _write_owner_only(self.work / "consent.token", RIG_CONSENT_TOKEN)

    # ---- the gateway's config ----

    def config_text(self, *, buffer_extra: str = "", extra: str = "") -> str:
        """A gateway.toml using every simulator (paths relative to the work folder)."""
        lists = self._allow_lists()
        synthetic = ""
        if self.load.synthetic_rate > 0:
            synthetic = f"""
[[sources]]
kind = "synthetic"
name = "bulk-cards"
rate_per_s = {self.load.synthetic_rate}
cards = {self.load.synthetic_cards}
lane = "bulk"
"""
        inject = ""
        if self.load.inject != "off":
            # the simulated till may print faster than a real lane's mint bound allows
            rate = min(600, max(30, round(120 / self.load.till_interval_s)))
            inject = (
                f'inject = "{self.load.inject}"\nurl_prefix = "{RECEIPT_PREFIX}"\n'
                f"mint_rate_per_min = {rate}\n"
            )
        return f"""# Written by simulators.rig.store: every source of the simulated store.
[gateway]
store = "{STORE}"
device = "gw-rig"

[keyring]
active = "k1"
[keyring.keys]
k1 = "{self.key_path}"

[buffer]
path = "{self.work / "buffer.db"}"
{buffer_extra}

[mqtt]
host = "127.0.0.1"
port = {self.broker.port}
reconnect_min_s = 0.2
reconnect_max_s = 2

[consent.sync]
base_url = "http://127.0.0.1:{self.http_port}"
token_file = "{self.work / "consent.token"}"
poll_interval_s = 5

[health]
listen = "127.0.0.1:{self.health_port}"

[[sources]]
kind = "serial_card"
name = "till-2-card"
device = "{self.card_link}"
protocol = "rdm6300"
lane = "till-2"

[[sources]]
kind = "ble"
name = "entrance-ble"
adapter = "hci0"
zone = "entrance"
allow_ibeacon_uuids = {json.dumps(lists["allow_ibeacon_uuids"])}
allow_eddystone_namespaces = {json.dumps(lists["allow_eddystone_namespaces"])}
allow_altbeacon_prefixes = {json.dumps(lists["allow_altbeacon_prefixes"])}
enter_rssi = -75
exit_rssi = -85
smoothing_window_s = 1.0
min_samples = 3
silence_s = 1.5
min_dwell_s = 1.0
watchdog_s = 20

[[sources]]
kind = "camera"
name = "kiosk-cam"
url = "http://127.0.0.1:{self.camera_port}/stream.mjpg"
zone = "kiosk"
decode_fps = {self.load.camera_decode_fps}
app_public_key = "{self.app_public_key}"
receipt_url_prefix = "{RECEIPT_PREFIX}"
read_timeout_s = 3
reopen_max_s = 2

[[sources]]
kind = "receipt_tap"
name = "till-2-printer"
lane = "till-2"
lane_number = 2
listen_host = "127.0.0.1"
listen_port = {self.tap_port}
printer_host = "127.0.0.1"
printer_port = {self.printer_port}
counter_path = "{self.work / "receipt-counters.db"}"
{inject}{synthetic}{extra}"""

    def write_config(self, path: Path | None = None, **kwargs: str) -> Path:
        path = path or self.work / "gateway.toml"
        path.write_text(self.config_text(**kwargs), encoding="utf-8")
        return path

    def env(self) -> dict[str, str]:
        """The daemon's environment: the private D-Bus the fake BlueZ is on."""
        return {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.bus_address}

    # ---- simulators ----

    def _argv(self, name: str) -> list[str]:
        py = [sys.executable, "-m"]
        load = self.load
        if name == "central":
            return [
                *py, "simulators.central.service",
                "--mqtt-host", "127.0.0.1", "--mqtt-port", str(self.broker.port),
                "--out", str(self.central_out), "--stats", str(self.central_stats),
                "--store", STORE, "--http-port", str(self.http_port),
                "--consent-token-file", str(self.work / "consent.token"),
                "--consent-script", str(self.work / "consent-script.json"),
            ]  # fmt: skip
        if name == "cards":
            return [*py, "simulators.devices.card_reader", str(load.card_scenario),
                    "--link", str(self.card_link)]  # fmt: skip
        if name == "ble":
            return [*py, "simulators.devices.ble_scenario", str(load.ble_scenario), "--repeat",
                    "--speed", str(load.ble_speed)]  # fmt: skip
        if name == "camera":
            return [*py, "simulators.devices.camera", str(load.camera_scenario),
                    "--port", str(self.camera_port), "--loops", "0"]  # fmt: skip
        if name == "printer":
            return [*py, "simulators.devices.printer", "--port", str(self.printer_port)]
        if name == "till":
            return [*py, "simulators.devices.till", "--port", str(self.tap_port), "--count", "0",
                    "--interval", str(load.till_interval_s), "--quiet"]  # fmt: skip
        raise KeyError(name)

    def _lines(self, name: str) -> list[str]:
        try:
            text = self._sims[name].log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        return [ln.strip() for ln in text.splitlines() if ln.strip()]

    def wait_output(self, name: str, lines: int = 1, timeout: float = 30) -> list[str]:
        """The simulator's first ``lines`` lines of output, once it has printed them."""
        sim = self._sims[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self._lines(name)
            if len(got) >= lines:
                return got[:lines]
            if sim.proc is not None and sim.proc.poll() is not None:
                raise RuntimeError(
                    f"simulator {name} exited with {sim.proc.returncode}: see {sim.log_path}"
                )
            time.sleep(0.05)
        raise RuntimeError(f"simulator {name} printed nothing within {timeout}s: {sim.log_path}")

    def start(self, name: str) -> None:
        """Start (or restart after ``stop``) one simulator; return once it is serving."""
        sim = self._sims.get(name)
        if sim is None:
            sim = self._sims[name] = _Sim(self._argv(name), self.work / f"sim-{name}.log")
        if sim.proc is not None and sim.proc.poll() is None:
            return
        sim.log_path.unlink(missing_ok=True)
        sim.log = sim.log_path.open("ab")
        sim.proc = subprocess.Popen(
            sim.argv, stdout=sim.log, stderr=subprocess.STDOUT, cwd=self.work
        )
        if self.progress:
            print(f"rig: started {name} (pid {sim.proc.pid})", file=sys.stderr, flush=True)
        if name in ("central", "cards", "printer"):
            self.wait_output(name)
        elif name == "ble":
            line = self.wait_output(name)[0]
            self.bus_address = line.partition("=")[2]
        elif name == "camera":
            _url, key = self.wait_output(name, 2)
            self.app_public_key = key.partition("=")[2]

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 10) -> None:
        """Stop one simulator (an unplugged reader, a dropped stream, a dead printer...)."""
        sim = self._sims.get(name)
        if sim is None or sim.proc is None:
            return
        if sim.proc.poll() is None:
            sim.proc.send_signal(sig)
            try:
                sim.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                sim.proc.kill()
                sim.proc.wait()
        if sim.log is not None:
            sim.log.close()
            sim.log = None
        if self.progress:
            print(f"rig: stopped {name}", file=sys.stderr, flush=True)

    def running(self, name: str) -> bool:
        sim = self._sims.get(name)
        return sim is not None and sim.proc is not None and sim.proc.poll() is None

    def pids(self) -> dict[str, int]:
        return {n: s.proc.pid for n, s in self._sims.items() if s.proc and s.proc.poll() is None}

    def central_events(self) -> list[dict[str, Any]]:
        """Every event the fake central has accepted so far."""
        try:
            lines = self.central_out.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line being written
        return out

    def __enter__(self) -> StoreRig:
        try:
            self._write_key_and_consent()
            self.broker.start()
            for name in SIMULATORS:
                self.start(name)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for name in reversed(list(self._sims)):
            self.stop(name)
        self.broker.stop()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
