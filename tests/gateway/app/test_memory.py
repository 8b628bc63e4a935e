"""Freed heap goes back to the OS: what a drained backlog leaves behind does not stay."""

from __future__ import annotations

import subprocess
import sys

import pytest

from gateway.app.memory import release_free_memory

PROBE = """
from gateway.app.memory import release_free_memory

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024

# 80 MiB in 1 KiB blocks (malloc's, not Python's small-object arenas), then free all but
# every 64th: the survivors pin the heap, so malloc cannot shrink it from the top.
blocks = [bytes(1024) for _ in range(80_000)]
keep = blocks[::64]
del blocks
before = rss_mib()
assert release_free_memory()
after = rss_mib()
print(before, after)
"""


@pytest.mark.skipif(not release_free_memory(), reason="not glibc: nothing to release")
def test_freed_heap_is_returned_to_the_os() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    before, after = map(float, out.split())
    assert before - after > 40, f"RSS {before:.0f} MiB -> {after:.0f} MiB"
