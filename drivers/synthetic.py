"""An in-process source of card reads at a set rate, for benchmarks and hardware-free demos.

It goes through the same pseudonymisation as a real reader (with a cache, as a real
high-rate source would keep), so the pipeline downstream cannot tell the difference.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from gateway.config.sources import SyntheticSourceConfig
from gateway.ports import Reading, SourceContext


def card_number(i: int) -> str:
    return f"2600{i:09d}"


class SyntheticSource:
    def __init__(self, config: SyntheticSourceConfig, ctx: SourceContext) -> None:
        self.config = config
        self.ctx = ctx
        self.name = ctx.name
        self.subjects = [
            ctx.keyring.pseudonym("loyalty", card_number(i)) for i in range(config.cards)
        ]

    async def readings(self) -> AsyncIterator[Reading]:
        cfg = self.config
        attrs = {"lane": cfg.lane, "reader": "scanner"}
        tick = 0.01
        per_tick = cfg.rate_per_s * tick
        carry = 0.0
        i = 0
        self.ctx.set_state("ok")
        next_t = time.monotonic()
        while True:
            carry += per_tick
            n = int(carry)
            carry -= n
            now = self.ctx.now()
            for _ in range(n):
                yield Reading("card.read", self.name, now, self.subjects[i % cfg.cards], attrs)
                i += 1
            next_t += tick
            delay = next_t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)
                next_t = time.monotonic()
