"""What every fuzz target shares: profiles, the per-input time bound, byte mutations.

Profiles (``TOUCHPOINT_FUZZ=ci|deep``; ``ci`` by default) are applied per test with
``@fuzz_settings()`` rather than loaded globally, so the rest of the suite keeps its own
hypothesis settings when it runs in the same session.

``bounded(fn, *args)`` runs one target on one input under a CPU-time alarm (SIGVTALRM,
so pytest-timeout's SIGALRM is left alone) and a wall-clock check: a parser that loops
forever raises ``Hang`` instead of stalling the run.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from types import FrameType
from typing import TypeVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

T = TypeVar("T")

ENV_VAR = "TOUCHPOINT_FUZZ"
PROFILES = {
    # CI: bounded; the whole suite stays well under a minute on a 2-core machine.
    "ci": {"max_examples": 100, "deadline": timedelta(seconds=1)},
    # `make fuzz`: the long run, for a developer or a nightly job.
    "deep": {"max_examples": 20_000, "deadline": timedelta(seconds=2)},
}
HARD_LIMIT_S = 2.0  # CPU seconds one input may take before it counts as a hang
WALL_LIMIT_S = 5.0  # wall-clock seconds (a loaded 2-core machine needs the slack)


def profile_name() -> str:
    """The profile asked for in ``TOUCHPOINT_FUZZ`` (``ci`` when unset)."""
    name = os.environ.get(ENV_VAR, "ci") or "ci"
    if name not in PROFILES:
        raise ValueError(f"{ENV_VAR}={name!r}: use one of {', '.join(PROFILES)}")
    return name


def register_profiles() -> None:
    """Register ``touchpoint-fuzz-ci`` and ``touchpoint-fuzz-deep`` with hypothesis."""
    for name, values in PROFILES.items():
        settings.register_profile(
            f"touchpoint-fuzz-{name}",
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            **values,  # type: ignore[arg-type]
        )


def fuzz_settings(scale: float = 1.0) -> settings:
    """The active profile as a decorator; ``scale`` trims examples for a costly target."""
    register_profiles()
    base = settings.get_profile(f"touchpoint-fuzz-{profile_name()}")
    return settings(base, max_examples=max(10, int(base.max_examples * scale)))


class Hang(AssertionError):
    """One input took longer than the per-input bound: a hang or a blow-up."""


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang(f"a single input used more than {HARD_LIMIT_S}s of CPU")


def bounded(fn: Callable[..., T], *args: object, limit_s: float = HARD_LIMIT_S) -> T:
    """``fn(*args)`` under a CPU-time alarm, then a wall-clock check; raises ``Hang``."""
    old = signal.signal(signal.SIGVTALRM, _alarm)
    start = time.perf_counter()
    signal.setitimer(signal.ITIMER_VIRTUAL, limit_s)
    try:
        out = fn(*args)
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)
        signal.signal(signal.SIGVTALRM, old)
    elapsed = time.perf_counter() - start
    if elapsed > WALL_LIMIT_S:
        raise Hang(f"a single input took {elapsed:.1f}s of wall-clock time")
    return out


# ------------------------------------------------------------------- structure-aware mutation

# Bytes that mean something to one of the wire formats: STX/ETX, CR/LF, DLE/ESC/FS/GS,
# the magstripe sentinels, JSON and TOML punctuation, base32/base64 edges, sign bits.
INTERESTING = bytes(
    [0x00, 0x01, 0x02, 0x03, 0x0A, 0x0D, 0x10, 0x15, 0x1B, 0x1C, 0x1D, 0x20, 0x22, 0x25,
     0x28, 0x2C, 0x2E, 0x30, 0x31, 0x3A, 0x3B, 0x3D, 0x3F, 0x4C, 0x50, 0x5B, 0x5D, 0x6B,
     0x7B, 0x7D, 0x7F, 0x80, 0xAA, 0xAC, 0xBE, 0xC0, 0xFE, 0xFF]
)  # fmt: skip
_U16 = (0, 1, 2, 3, 0x7F, 0x80, 0xFF, 0x100, 0x1BB1, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF)
_OPS = (
    "flip", "interesting", "random", "insert", "repeat", "delete", "duplicate",
    "truncate", "splice", "u16",
)  # fmt: skip


@st.composite
def mutated(
    draw: st.DrawFn, seeds: Sequence[bytes], *, max_ops: int = 6, max_len: int = 8192
) -> bytes:
    """A seed with up to ``max_ops`` mutations: the way a fuzzer edits a valid input."""
    buf = bytearray(draw(st.sampled_from(seeds)))
    for op in draw(st.lists(st.sampled_from(_OPS), max_size=max_ops)):
        at = draw(st.integers(0, len(buf)))
        if op == "flip" and at < len(buf):
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "interesting" and at < len(buf):
            buf[at] = draw(st.sampled_from(INTERESTING))
        elif op == "random" and at < len(buf):
            buf[at] = draw(st.integers(0, 255))
        elif op == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "repeat":
            buf[at:at] = bytes([draw(st.sampled_from(INTERESTING))]) * draw(st.integers(1, 300))
        elif op == "delete":
            del buf[at : at + draw(st.integers(1, 16))]
        elif op == "duplicate":
            end = draw(st.integers(at, len(buf)))
            buf[at:at] = buf[at:end] * draw(st.integers(1, 4))
        elif op == "truncate":
            del buf[at:]
        elif op == "splice":
            other = draw(st.sampled_from(seeds))
            start = draw(st.integers(0, len(other)))
            buf[at:] = other[start:]
        elif op == "u16" and at + 2 <= len(buf):
            buf[at : at + 2] = draw(st.sampled_from(_U16)).to_bytes(2, "little")
        del buf[max_len:]
    return bytes(buf)


# Characters that tend to break text parsers: separators, non-ASCII digits (isdigit()
# but not [0-9]), case folding that changes length, surrogates, controls, whitespace.
TRICKY_CHARS = ".:=-_ \t\n\x00\x7f\u00b2\u0663\uff11\u00df\u0131\u212a\ufeff\u200b\ud800Zz9/+"


@st.composite
def mutated_text(draw: st.DrawFn, seeds: Sequence[str], *, max_ops: int = 6) -> str:
    """A seed string with up to ``max_ops`` character-level edits."""
    chars = list(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, max_ops))):
        at = draw(st.integers(0, len(chars)))
        op = draw(st.sampled_from(("replace", "insert", "delete", "upper", "truncate")))
        piece = draw(st.one_of(st.sampled_from(TRICKY_CHARS), st.characters()))
        if op == "replace" and at < len(chars):
            chars[at] = piece
        elif op == "insert":
            chars.insert(at, piece * draw(st.integers(1, 3)))
        elif op == "delete":
            del chars[at : at + draw(st.integers(1, 8))]
        elif op == "upper":
            chars = [c.upper() if draw(st.booleans()) else c.lower() for c in chars]
        elif op == "truncate":
            del chars[at:]
    return "".join(chars)


def json_values(max_leaves: int = 12) -> st.SearchStrategy[object]:
    """Any JSON value, with the awkward ones weighted in: big ints, unhashable members."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.sampled_from([2**63, 2**63 + 1, -1, 0, 10**30]),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
        st.sampled_from(["analytics", "linking", "marketing", "k1:x", "2030-01-01T00:00:00Z"]),
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=max_leaves,
    )
