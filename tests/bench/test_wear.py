"""``bench wear``: its figures become headline rows with the floor and the goals."""

from __future__ import annotations

from tests.bench.headline import headline_rows
from tests.bench.registry import BENCHMARKS
from tests.bench.wear import floor_per_event, window_of


def figures(per_event: dict[int, int], idle_per_hour: int) -> dict[str, object]:
    rates: list[dict[str, object]] = [
        {"rate_per_s": 0, "bytes_per_hour": idle_per_hour, "flushes_per_s": 0.0}
    ]
    for rate, b in per_event.items():
        rates.append(
            {
                "rate_per_s": rate,
                "bytes_per_event": b,
                "floor_bytes_per_event": round(floor_per_event(rate, 184, 500)),
                "goal_bytes_per_event": {10: 2048, 100: 512, 1000: 256}[rate],
                "flushes_per_s": 1.0,
            }
        )
    return {"durability_window_ms": 500.0, "rates": rates}


def test_wear_is_in_the_one_report() -> None:
    assert "wear" in BENCHMARKS


def test_rows_judge_each_rate_against_its_goal() -> None:
    rows = headline_rows("wear", figures({10: 1215, 100: 600, 1000: 18}, 0))
    met = {r.figure: r.met for r in rows}
    assert met == {
        "idle: bytes written to the device per hour": True,
        "bytes to the device per event at 10 events/s": True,
        "bytes to the device per event at 100 events/s": False,
        "bytes to the device per event at 1,000 events/s": True,
    }
    assert headline_rows("wear", figures({10: 1}, 4096))[0].met is False


def test_the_floor_is_the_payload_and_a_page_per_commit() -> None:
    assert floor_per_event(10, 184, 500) == 184 + 4096 * 2 / 10
    assert floor_per_event(1, 184, 500) == 184 + 4096  # slower than the window: one each
    assert window_of({}) == 500
    assert window_of({"durability_window_ms": 0}) == 5.0  # the group commit's, then
