"""A fake serial card reader on a pty, replaying a declarative TOML scenario.

    python -m simulators.devices.card_reader SCENARIO.toml [--link PATH] [--rate-scale X]

prints the pty's slave path as its first stdout line (and again after every replug),
so the gateway can open it as its serial ``device``.  With ``--link`` a symlink to the
slave is kept at PATH (replaced atomically), the way a udev rule names a real reader.

The frames are encoded here, independently of ``drivers/``: this module imports
nothing from ``drivers`` or ``gateway``, so the two implementations of the wire formats
check each other.  Tests drive it through ``CardReaderSim``::

    with CardReaderSim(link=tmp / "card0") as sim:
        sim.write_frame("13005D1DA5")          # one RDM6300 frame
        sim.unplug(); sim.replug()             # the pty goes away and comes back

The scenario format is documented in simulators/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import operator
import os
import random
import signal
import sys
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from simulators.devices.serial_pty import close_pty, open_raw_pty

log = logging.getLogger(__name__)

PROTOCOLS = ("rdm6300", "scanner", "magstripe")
TERMINATORS = {"crlf": b"\r\n", "cr": b"\r", "lf": b"\n"}
_STEP_KEYS: Mapping[str, frozenset[str]] = {
    "tap": frozenset({"card", "protocol", "repeats", "interval_s", "aim", "terminator", "lrc"}),
    "bad_frame": frozenset({"card", "protocol"}),
    "partial": frozenset({"card", "protocol", "keep"}),
    "noise": frozenset({"count", "hex"}),
    "pause": frozenset({"seconds"}),
    "unplug": frozenset({"seconds"}),
}
_SCENARIO_KEYS = frozenset({"name", "protocol", "loops", "seed", "description"})


class ScenarioError(ValueError):
    """A scenario file is wrong; the message names the file, the step and the key."""


# --- wire formats, written independently of drivers/serial_cards/frames.py ---------------------


def rdm6300_frame(tag: str, *, corrupt: bool = False) -> bytes:
    """STX, 10 hex chars, XOR checksum as 2 hex chars, ETX.  ``corrupt`` flips the checksum."""
    data = bytes.fromhex(tag)
    if len(data) != 5:
        raise ValueError("an RDM6300 tag is 5 bytes (10 hex chars)")
    check = functools.reduce(operator.xor, data, 0) ^ (0xFF if corrupt else 0)
    return b"\x02" + tag.upper().encode("ascii") + b"%02X" % check + b"\x03"


def ean_check_digit(body: str) -> str:
    """The GS1 check digit for ``body`` (12 digits for EAN-13, 7 for EAN-8)."""
    weights = [1, 3] * len(body) if len(body) % 2 == 0 else [3, 1] * len(body)
    total = sum(w * int(c) for w, c in zip(weights, body, strict=False))
    return str(-total % 10)


def scanner_line(payload: str, *, aim: str = "", terminator: str = "crlf") -> bytes:
    """A scanner's output line: optional AIM id (``]E0``), payload, CR/LF/CRLF."""
    return (aim + payload).encode("ascii") + TERMINATORS[terminator]


def track2(pan: str, *, fields: str = "4912101", lrc: bool = True) -> bytes:
    """Magstripe Track 2 as ASCII: ``;PAN=fields?`` plus the LRC character if asked."""
    text = f";{pan}={fields}?".encode("ascii")
    if not lrc:
        return text
    parity = 0
    for ch in text:
        parity ^= ch - 0x30
    return text + bytes([0x30 + parity])


def encode(
    card: str, protocol: str, *, aim: str = "", terminator: str = "crlf", lrc: bool = True
) -> bytes:
    if protocol == "rdm6300":
        return rdm6300_frame(card)
    if protocol == "scanner":
        return scanner_line(card, aim=aim, terminator=terminator)
    return track2(card, lrc=lrc)


def bad_frame(card: str, protocol: str) -> bytes:
    """A frame the reader's own checks must reject."""
    if protocol == "rdm6300":
        return rdm6300_frame(card, corrupt=True)
    if protocol == "scanner":  # EAN-13 with the check digit off by one
        digits = card[:12]
        wrong = (int(ean_check_digit(digits)) + 1) % 10
        return scanner_line(f"{digits}{wrong}", aim="]E0")
    return track2(card[:4] + ":" + card[4:])  # a non-digit inside the PAN


# --- scenarios ------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    action: str
    options: Mapping[str, Any]


@dataclass(frozen=True)
class Scenario:
    name: str
    protocol: str
    loops: int  # 0 = forever
    seed: int
    steps: tuple[Step, ...]


_HEXDIGITS = frozenset("0123456789abcdefABCDEF")


def _check_card(card: Any, protocol: str, where: str) -> None:
    ok = (
        isinstance(card, str)
        and card.isascii()
        and (
            (protocol == "rdm6300" and len(card) == 10 and _HEXDIGITS.issuperset(card))
            or (protocol == "scanner" and 0 < len(card) <= 100 and card.isprintable())
            or (protocol == "magstripe" and card.isdigit() and 1 <= len(card) <= 19)
        )
    )
    if not ok:
        raise ScenarioError(f"{where}.card: not a valid {protocol} card number")


def _number(value: Any, where: str, *, integer: bool = False, minimum: int = 0) -> None:
    wrong_type = isinstance(value, bool) or not isinstance(value, int | float)
    if wrong_type or (integer and not isinstance(value, int)) or value < minimum:
        kind = "an integer" if integer else "a number"
        raise ScenarioError(f"{where}: must be {kind} >= {minimum}")


def _parse_step(raw: Any, protocol: str, where: str) -> Step:
    if not isinstance(raw, dict) or not isinstance(raw.get("action"), str):
        raise ScenarioError(f"{where}: a step is a table with an 'action' key")
    action = raw["action"]
    if action not in _STEP_KEYS:
        known = ", ".join(_STEP_KEYS)
        raise ScenarioError(f"{where}.action: unknown action {action!r}; known: {known}")
    opts = {k: v for k, v in raw.items() if k != "action"}
    unknown = sorted(set(opts) - _STEP_KEYS[action])
    if unknown:
        raise ScenarioError(f"{where}: unknown key(s) {', '.join(unknown)} for action {action!r}")
    if "protocol" in _STEP_KEYS[action]:
        opts.setdefault("protocol", protocol)
    if opts.get("protocol", protocol) not in PROTOCOLS:
        raise ScenarioError(f"{where}.protocol: one of {', '.join(PROTOCOLS)}")
    if action in ("tap", "bad_frame", "partial"):
        if "card" not in opts:
            raise ScenarioError(f"{where}: action {action!r} needs 'card'")
        _check_card(opts["card"], opts["protocol"], where)
        if (
            action == "bad_frame"
            and opts["protocol"] == "scanner"
            and not (opts["card"].isdigit() and len(opts["card"]) >= 12)
        ):
            raise ScenarioError(f"{where}.card: a scanner bad_frame needs >= 12 digits")
    for key in ("seconds", "interval_s"):
        if key in opts:
            _number(opts[key], f"{where}.{key}")
    for key in ("repeats", "count", "keep"):
        if key in opts:
            _number(opts[key], f"{where}.{key}", integer=True, minimum=1)
    if action in ("pause", "unplug") and "seconds" not in opts:
        raise ScenarioError(f"{where}: action {action!r} needs 'seconds'")
    if action == "noise":
        if ("count" in opts) == ("hex" in opts):
            raise ScenarioError(f"{where}: noise needs exactly one of 'count' or 'hex'")
        if "hex" in opts:
            try:
                opts["hex"] = bytes.fromhex(opts["hex"])
            except (TypeError, ValueError):
                raise ScenarioError(f"{where}.hex: not hex bytes") from None
    if opts.get("terminator", "crlf") not in TERMINATORS:
        raise ScenarioError(f"{where}.terminator: one of {', '.join(TERMINATORS)}")
    aim = opts.get("aim", "")
    if not isinstance(aim, str) or (aim and (len(aim) != 3 or aim[0] != "]")):
        raise ScenarioError(f"{where}.aim: an AIM id like ']E0'")
    if not isinstance(opts.get("lrc", True), bool):
        raise ScenarioError(f"{where}.lrc: true or false")
    return Step(action, opts)


def parse_scenario(data: Mapping[str, Any], where: str = "<scenario>") -> Scenario:
    """Validate a scenario's TOML data; raises ScenarioError naming the bad key."""
    unknown = sorted(set(data) - {"scenario", "steps"})
    if unknown:
        raise ScenarioError(f"{where}: unknown top-level key(s) {', '.join(unknown)}")
    head = data.get("scenario", {})
    if not isinstance(head, dict) or set(head) - _SCENARIO_KEYS:
        raise ScenarioError(f"{where}: [scenario] keys are {', '.join(sorted(_SCENARIO_KEYS))}")
    protocol = head.get("protocol", "rdm6300")
    if protocol not in PROTOCOLS:
        raise ScenarioError(f"{where}: scenario.protocol: one of {', '.join(PROTOCOLS)}")
    _number(head.get("loops", 1), f"{where}: scenario.loops", integer=True)
    _number(head.get("seed", 0), f"{where}: scenario.seed", integer=True)
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise ScenarioError(f"{where}: needs at least one [[steps]] table")
    steps = tuple(
        _parse_step(raw, protocol, f"{where}: steps[{i}]") for i, raw in enumerate(raw_steps)
    )
    return Scenario(
        name=str(head.get("name", Path(where).stem)),
        protocol=protocol,
        loops=head.get("loops", 1),
        seed=head.get("seed", 0),
        steps=steps,
    )


def load_scenario(path: str | Path) -> Scenario:
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"{p}: cannot load: {exc}") from None
    return parse_scenario(data, str(p))


# --- the pty ------------------------------------------------------------------------------


class CardReaderSim:
    """A pty pair standing in for a USB-serial card reader (raw mode on both sides)."""

    def __init__(self, link: str | Path | None = None) -> None:
        self.link = Path(link) if link is not None else None
        self.path = ""
        self.dropped = 0
        self._master: int | None = None
        self._slave: int | None = None

    @property
    def plugged(self) -> bool:
        return self._master is not None

    def open(self) -> str:
        """Create the pty (and the link); return the slave path."""
        if self._master is not None:
            return self.path
        self._master, self._slave, self.path = open_raw_pty(self.link)
        log.info("card reader plugged in at %s", self.path)
        return self.path

    def unplug(self) -> None:
        """Close the pty (readers see EIO) and remove the link."""
        close_pty(self.link, self._master, self._slave)
        if self._master is not None:
            log.info("card reader unplugged from %s", self.path)
        self._master = self._slave = None

    def replug(self) -> str:
        self.unplug()
        return self.open()

    def close(self) -> None:
        self.unplug()

    def __enter__(self) -> CardReaderSim:
        self.open()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def write(self, data: bytes) -> int:
        """Send bytes down the line; like a UART, what the reader cannot take is lost."""
        if self._master is None:
            self.dropped += len(data)
            return 0
        sent = 0
        while sent < len(data):
            try:
                sent += os.write(self._master, data[sent:])
            except BlockingIOError:
                break
        self.dropped += len(data) - sent
        return sent

    def write_frame(self, card: str, protocol: str = "rdm6300", **options: Any) -> int:
        """Encode one card read (``aim``, ``terminator``, ``lrc`` as in scenarios) and send it."""
        return self.write(encode(card, protocol, **options))


# --- playing a scenario -----------------------------------------------------------------


def play(
    sim: CardReaderSim,
    scenario: Scenario,
    *,
    rate_scale: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
    on_replug: Callable[[str], None] | None = None,
) -> None:
    """Run the scenario's steps ``loops`` times (forever when 0); durations / rate_scale."""
    rng = random.Random(scenario.seed)
    loop = 0
    while scenario.loops == 0 or loop < scenario.loops:
        loop += 1
        for step in scenario.steps:
            _run_step(sim, step, rng, lambda s: sleep(s / rate_scale), on_replug)


def _run_step(
    sim: CardReaderSim,
    step: Step,
    rng: random.Random,
    sleep: Callable[[float], None],
    on_replug: Callable[[str], None] | None,
) -> None:
    opts = step.options
    if step.action == "tap":
        frame = encode(
            opts["card"],
            opts["protocol"],
            aim=opts.get("aim", ""),
            terminator=opts.get("terminator", "crlf"),
            lrc=opts.get("lrc", True),
        )
        for i in range(opts.get("repeats", 1)):
            if i:
                sleep(opts.get("interval_s", 0.1))
            sim.write(frame)
    elif step.action == "bad_frame":
        sim.write(bad_frame(opts["card"], opts["protocol"]))
    elif step.action == "partial":
        frame = encode(opts["card"], opts["protocol"])
        sim.write(frame[: opts.get("keep", len(frame) // 2)])
    elif step.action == "noise":
        sim.write(opts["hex"] if "hex" in opts else rng.randbytes(opts["count"]))
    elif step.action == "pause":
        sleep(opts["seconds"])
    elif step.action == "unplug":
        sim.unplug()
        sleep(opts["seconds"])
        path = sim.open()
        if on_replug is not None:
            on_replug(path)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulators.devices.card_reader",
        description="Fake serial card reader: a pty that replays a TOML scenario. "
        "Prints the pty path on the first stdout line.",
    )
    parser.add_argument("scenario", type=Path, help="scenario TOML file (see simulators/README.md)")
    parser.add_argument("--link", type=Path, help="keep a symlink to the pty here (atomic)")
    parser.add_argument(
        "--rate-scale",
        type=float,
        default=1.0,
        help="speed factor: 2 plays twice as fast (default 1)",
    )
    parser.add_argument("--verbose", "-v", action="store_true", help="log each plug event")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    if args.rate_scale <= 0:
        parser.error("--rate-scale must be > 0")
    try:
        scenario = load_scenario(args.scenario)
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _stop)

    def announce(path: str) -> None:
        print(path, flush=True)

    with CardReaderSim(link=args.link) as sim:
        announce(sim.path)
        with contextlib.suppress(KeyboardInterrupt):
            play(sim, scenario, rate_scale=args.rate_scale, on_replug=announce)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
