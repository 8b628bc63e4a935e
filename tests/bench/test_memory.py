"""bench memory's sampling window: counted from READY=1 and the load, not from exec."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from gateway.config.credentials import write_secret
from simulators.infra.broker import free_port
from tests.bench import memory as bench_memory
from tests.bench.drain import _config_text
from tests.bench.pipeline import KEY


def _config(work: Path) -> Path:
    write_secret(work / "k1.key", KEY)
    cfg = work / "gateway.toml"
    cfg.write_text(_config_text(free_port()), encoding="utf-8")  # no broker: it retries
    return cfg


def test_the_window_counts_from_the_load_not_from_exec(tmp_path: Path) -> None:
    """A box where the load takes 3 s to come (a slow start) still gets its 1 s window."""
    cfg = _config(tmp_path)
    t0 = time.monotonic()
    samples, load_t = bench_memory.run_sampled(
        bench_memory.DAEMON, cfg, dict(os.environ), 1.0, 0.2, tmp_path / "gateway.log",
        at_load=lambda: time.monotonic() - t0 >= 3.0,
    )  # fmt: skip
    assert samples[-1].t >= 3.5, samples[-1]  # 3 s to the load, then ~1 s
    assert load_t >= 3.0 and samples[-1].t >= load_t + 1.0 - 0.2, load_t  # to one interval
    assert len(samples) >= 10 and all(s.rss_mib > 10 for s in samples[-5:])


def test_a_load_that_never_comes_is_an_error_that_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench_memory, "READY_LIMIT_S", 15.0)
    with pytest.raises(RuntimeError, match="had not every source at load within 15s"):
        bench_memory.run_sampled(
            bench_memory.DAEMON, _config(tmp_path), dict(os.environ), 1.0, 0.2,
            tmp_path / "gateway.log",
            at_load=lambda: False,
        )  # fmt: skip
