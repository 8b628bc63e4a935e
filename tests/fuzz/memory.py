"""Bounded memory under long hostile streams: feed ~1 MB and watch the decoder.

The stream is generated chunk by chunk (never held whole), the results of each ``feed``
are dropped at once, and tracemalloc's peak over the whole run is compared with a cap far
below the stream's size: a decoder that buffered the stream, or any fixed fraction of it,
would pass the cap.
"""

from __future__ import annotations

import itertools
import time
import tracemalloc
from collections.abc import Callable, Iterator

STREAM_BYTES = 1 << 20
CHUNK = 1024  # results of one feed are held until it returns: keep them small
PEAK_CAP = 256 * 1024  # bytes; a buffered 1 MB stream (or a quarter of it) is far above
TIME_CAP_S = 30.0  # generous: a 2-core machine shared with other test runs


def chunks(patterns: list[bytes], total: int = STREAM_BYTES, size: int = CHUNK) -> Iterator[bytes]:
    """``total`` bytes cycling through ``patterns`` (each repeated to fill its share)."""
    share = total // len(patterns)
    for i, pattern in enumerate(patterns):
        if i == len(patterns) - 1:
            share += total % len(patterns)
        sent = 0
        body = (pattern * (size // max(1, len(pattern)) + 1))[:size]
        while sent < share:
            yield body[: share - sent]
            sent += size


def measure(
    feed: Callable[[bytes], object], stream: Iterator[bytes], check: Callable[[], None]
) -> tuple[int, float]:
    """Feed every chunk, calling ``check`` after each; (tracemalloc peak, seconds)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        start = time.perf_counter()
        for chunk in stream:
            feed(chunk)
            check()
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return peak, elapsed


def interleave(*streams: Iterator[bytes]) -> Iterator[bytes]:
    """Round-robin over several generators (a decoder that sees them all in turn)."""
    for group in itertools.zip_longest(*streams):
        yield from (c for c in group if c is not None)
