"""Whether this run may judge the benchmarks' goals: not under emulation.

An emulated root (qemu-user, ``make test-arm64``) runs ~10x slower than the host and its
processes' memory is the emulator's: speed and footprint goals say nothing about the
code there.  ``.ci/fresh-root`` sets ``TOUCHPOINT_EMULATED=1`` when the root's
architecture differs from the host's.  Under it every benchmark still runs and prints
its figures, but goals are reported as "not judged (emulated)" (``None``) instead of
met or not met; goals emulation does not bend (a decoder's success rate on a fixed
corpus) are still judged.  Natively nothing changes: a missed goal is "NOT met".

    figures["emulated"] = emulated()
    figures["goal_met"] = judge(fps >= GOAL_FPS, also=success_ok)   # True / False / None
    print(verdict(figures["goal_met"]))                             # met / NOT met / ...
"""

from __future__ import annotations

import os
from collections.abc import Mapping

EMULATED_ENV = "TOUCHPOINT_EMULATED"
NOT_JUDGED = "not judged (emulated)"


def emulated(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``TOUCHPOINT_EMULATED`` is set to anything but "" or "0" (read per call)."""
    env = os.environ if environ is None else environ
    return env.get(EMULATED_ENV, "").strip() not in ("", "0")


def judge(met: bool, *, also: bool = True, emulated_run: bool | None = None) -> bool | None:
    """A goal's verdict: ``met`` natively, None under emulation.

    ``also`` is a part of the goal emulation does not bend (judged either way): when it
    fails, the verdict is False even under emulation.
    """
    if not also:
        return False
    if emulated() if emulated_run is None else emulated_run:
        return None
    return met


def verdict(met: bool | None) -> str:
    """How a verdict of ``judge`` is printed."""
    return {True: "met", False: "NOT met", None: NOT_JUDGED}[met]
