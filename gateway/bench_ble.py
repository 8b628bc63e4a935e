"""How many adverts per second parse + allow-list + pseudonym + presence can take.

In-process and synthetic: no D-Bus, no bleak (the radio and BlueZ are not measured).
The advert mix is a store's: a share of our beacons among foreign beacons and phones.

    from gateway.bench_ble import bench_adverts
    bench_adverts(adverts=200_000)   # -> {"adverts_per_s": ..., "events": ..., ...}
"""

from __future__ import annotations

import random
import struct
import time
import uuid
from typing import Any

from drivers.ble_adverts import AdvertResolver, AllowList
from gateway.identity import Keyring
from gateway.presence import PresenceParams, PresenceTracker, PseudonymCache

OUR_UUID = uuid.UUID("83256b74-78d0-43a4-8269-05f9dc8a44ba")
FOREIGN_UUID = uuid.UUID("f7826da6-4fa2-4e98-8024-bc5b71e0893e")

Advert = tuple[dict[int, bytes], dict[str, bytes]]


def synthetic_adverts(count: int, subjects: int, seed: int = 1) -> list[tuple[Advert, int]]:
    """(advert fields, rssi) pairs: 50 % ours, 25 % foreign iBeacons, 25 % phones."""
    rng = random.Random(seed)
    out: list[tuple[Advert, int]] = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.75:
            beacon = OUR_UUID if roll < 0.5 else FOREIGN_UUID
            minor = rng.randrange(subjects)
            body = b"\x02\x15" + beacon.bytes + struct.pack(">HHb", 1, minor, -59)
            fields: Advert = ({0x004C: body}, {})
        else:
            fields = ({0x004C: b"\x10\x05" + rng.randbytes(5)}, {})
        out.append((fields, rng.randrange(-95, -45)))
    return out


def bench_adverts(
    adverts: int = 200_000, subjects: int = 500, rate_hz: float = 1000.0, seed: int = 1
) -> dict[str, Any]:
    """Feed ``adverts`` synthetic adverts at a simulated ``rate_hz``; measure wall time.

    The loop is ``BleSource._handle`` without the queue: resolve (parse, allow-list,
    pseudonym), count the result, observe.
    """
    keyring = Keyring(keys={"k1": bytes(range(32))}, active="k1")
    allow = AllowList.build(ibeacon_uuids=[str(OUR_UUID)])
    cache = PseudonymCache(keyring.pseudonym_of_canonical, maxsize=4096)
    resolver = AdvertResolver(allow, cache.get, maxsize=4096)
    tracker = PresenceTracker(PresenceParams(min_dwell_s=1.0, silence_s=5.0))
    data = synthetic_adverts(adverts, subjects, seed)
    resolve, observe = resolver.resolve, tracker.observe
    counts: dict[str, int] = {}
    events = 0
    now = 1_795_000_000.0
    step = 1.0 / rate_hz
    cpu0, start = time.process_time(), time.perf_counter()
    for (manufacturer, service), rssi in data:
        now += step
        result, subject = resolve(manufacturer, service)
        counts[result] = counts.get(result, 0) + 1
        if subject is not None:
            events += len(observe(subject, "bench", rssi, now=now))
    events += len(tracker.tick(now=now + 3600))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return {
        "adverts": adverts,
        "seconds": round(elapsed, 3),
        "adverts_per_s": round(adverts / elapsed),
        "cpu_s_per_10k": round(cpu / adverts * 10_000, 4),
        "events": events,
        "results": counts,
        "hmac_computed": cache.misses,
        "tracked_at_end": len(tracker),
    }
