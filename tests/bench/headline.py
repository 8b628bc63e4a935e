"""The report's headline: each benchmark's figures as rows of figure, ours, reference, goal.

Every row carries the measured value, the reference measured in the same run (when there
is one) and the goal from the issues, with ``met`` True / False, or None when the goal
does not apply to this run (a quick run, a reference that could not run) or there is no
goal.  Goals are applied to ``ours`` or to the ratio ours / reference, as each issue
states them.  Figures from an emulated run (``"emulated": true``, see
``tests.bench.goals``) leave speed and footprint goals unjudged (``met`` None,
``emulated`` True); goals emulation does not bend (``Goal.emulated_ok``) are judged.

    rows = headline_rows("pipeline", figures)   # figures: ``bench pipeline --json``
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from tests.bench.goals import NOT_JUDGED

_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le}
FULL_DRAIN_EVENTS = 1_000_000


@dataclass(frozen=True)
class Goal:
    """``op`` ``value`` on ``on`` ("ours" or "ratio"); ``text`` as the issue says it.

    ``emulated_ok``: emulation does not bend the figure (a success rate on a fixed
    corpus), so the goal is judged in an emulated run too.
    """

    op: str
    value: float
    text: str
    on: str = "ours"
    emulated_ok: bool = False


@dataclass(frozen=True)
class Row:
    benchmark: str
    figure: str
    ours: float | None
    unit: str
    reference: float | None = None
    reference_label: str = ""
    ratio: float | None = None
    goal: str = ""
    met: bool | None = None
    note: str = ""
    emulated: bool = False  # the goal was not judged: an emulated run

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _row(
    benchmark: str,
    figure: str,
    ours: float | None,
    unit: str,
    *,
    reference: float | None = None,
    reference_label: str = "",
    ratio: float | None = None,
    goal: Goal | None = None,
    note: str = "",
    applies: bool = True,
    emulated: bool = False,
) -> Row:
    met: bool | None = None
    unjudged = goal is not None and applies and emulated and not goal.emulated_ok
    if unjudged:
        note = f"{note}; {NOT_JUDGED}" if note else NOT_JUDGED
    elif goal is not None and applies:
        judged = ours if goal.on == "ours" else ratio
        if judged is not None:
            met = _OPS[goal.op](judged, goal.value)
    return Row(
        benchmark, figure, ours, unit, reference, reference_label, ratio,
        goal.text if goal else "", met, note, unjudged,
    )  # fmt: skip


def _rows_for(f: dict[str, Any]) -> Callable[..., Row]:
    """``_row`` for one benchmark's figures: goals unjudged when they are emulated."""
    return partial(_row, emulated=bool(f.get("emulated", False)))


def _pipeline(f: dict[str, Any]) -> list[Row]:
    b = "pipeline"
    _row = _rows_for(f)
    return [
        _row(b, "durable end-to-end events/s", f["events_per_s"], "events/s",
             reference=f["reference_events_per_s"], reference_label="bare SQLite + paho",
             ratio=f["ratio"], goal=Goal(">=", 65_000, "≥ 65,000 events/s")),
        _row(b, "ours / bare SQLite + paho", f["ratio"], "",
             reference=1.0, reference_label="bare SQLite + paho",
             ratio=f["ratio"], goal=Goal(">=", 0.3, "≥ 0.3", on="ratio")),
        _row(b, f"capture → PUBACK p99 at {f['latency_rate_per_s']:,.0f} events/s",
             f["p99_ms"], "ms", goal=Goal("<=", 50, "≤ 50 ms"),
             note=f"p50 {f['p50_ms']} ms"),
        _row(b, f"events/s through +{f['wan_rtt_ms']:.0f} ms RTT", f["wan_events_per_s"],
             "events/s", reference=f["wan_limit_events_per_s"],
             reference_label="window x batch / RTT limit"),
    ]  # fmt: skip


def _drain(f: dict[str, Any]) -> list[Row]:
    b = "drain"
    _row = _rows_for(f)
    full = f["events"] == FULL_DRAIN_EVENTS
    return [
        _row(b, f"backlog drain of {f['events']:,} buffered events", f["drain_s"], "s",
             reference=f["reference_drain_s"], reference_label="plain paho, same stored chunks",
             ratio=f["ratio"], goal=Goal("<=", 30, "≤ 30 s for 1,000,000"), applies=full,
             note="" if full else "goal is for 1,000,000 events"),
        _row(b, "start to READY (exec → READY=1)", f["start_to_ready_s"], "s",
             reference=f.get("python_start_s"), reference_label="bare `python -c pass`",
             goal=Goal("<=", 1.0, "≤ 1 s")),
        _row(b, "daemon RSS, synthetic source at 5,000 events/s", f["rss_mib_at_5000_per_s"],
             "MiB", goal=Goal("<=", 100, "≤ 100 MiB")),
    ]  # fmt: skip


def _ble(f: dict[str, Any]) -> list[Row]:
    b = "ble"
    _row = _rows_for(f)
    rows = [
        _row(b, "parse + presence, one core", f["presence_adverts_per_s"], "adverts/s",
             goal=Goal(">=", 200_000, "≥ 200,000 adverts/s")),
        _row(b, "real bleak path, CPU per 10k adverts (flood)", f["ours_bleak_cpu_s_per_10k"],
             "CPU-s", reference=f["bare_bleak_cpu_s_per_10k"],
             reference_label="bare BleakScanner", ratio=f["bleak_path_ratio"],
             goal=Goal(">=", 0.70, "≥ 0.70 of bare bleak per CPU-second", on="ratio"),
             note="ratio: adverts per CPU-second, ours / bare"),
    ]  # fmt: skip
    peer = f.get("peer_cpu_s_per_10k")
    rows.append(
        _row(b, f"CPU per 10k adverts at {f['paced_rate_per_s']:.0f}/s",
             f["paced_ours_cpu_s_per_10k"], "CPU-s", reference=peer,
             reference_label=f.get("peer", "TheengsGateway"),
             ratio=f.get("cpu_ratio_vs_peer"),
             goal=Goal("<=", 0.05, "≤ 1/20 of the peer", on="ratio"),
             note=f"peer not measured: {f['peer_error']}" if "peer_error" in f else "")
    )  # fmt: skip
    return rows


def _qr(f: dict[str, Any]) -> list[Row]:
    b = "qr"
    _row = _rows_for(f)
    default, ref_name = f["default_decoder"], f["reference_decoder"]
    ref = f["decoders"].get(ref_name, {}).get("1280x720", {})
    ref_success = f["success"].get(ref_name, {})
    ref_fps = ref.get("fps_code")
    label = "OpenCV QRCodeDetector" if ref_name == "opencv" else ref_name
    rows = [
        _row(b, f"{default} frames/s at 1280x720, frames with a code", f["fps_1280x720"],
             "frames/s", reference=ref_fps, reference_label=label,
             ratio=round(f["fps_1280x720"] / ref_fps, 2) if ref_fps else None,
             goal=Goal(">=", 120, "≥ 120 frames/s")),
    ]  # fmt: skip
    for cls, goal in (
        ("upright", Goal(">=", 98, "≥ 98 %", emulated_ok=True)),
        ("rotated", Goal(">=", 98, "≥ 98 %", emulated_ok=True)),
        ("low_contrast", Goal(">=", 90, "≥ 90 %", emulated_ok=True)),
        ("glare_blur", None),
    ):
        ref_share = ref_success.get(cls)
        rows.append(
            _row(b, f"{default} success, {cls.replace('_', ' ')}",
                 round(f[f"success_{cls}"] * 100, 2), "%",
                 reference=None if ref_share is None else round(ref_share * 100, 2),
                 reference_label=label, goal=goal)
        )  # fmt: skip
    ref_label = f.get("tap_reference", "bare byte relay")
    for figure, key, ratio_key, ref, note in (
        ("receipt tap, receipts, parsing only", "tap_mb_per_s", "tap_ratio",
         f.get("tap_reference_mb_per_s"), ""),
        ("receipt tap, receipts, token injection on", "tap_inject_mb_per_s",
         "tap_inject_ratio", f.get("tap_reference_mb_per_s"),
         f"{f.get('tap_inject_ms_per_receipt', '?')} ms per receipt"),
        ("receipt tap, raster-heavy stream", "tap_raster_mb_per_s", "tap_raster_ratio",
         f.get("tap_streams", {}).get("raster", {}).get("reference_mb_per_s"), ""),
    ):  # fmt: skip
        if key in f:
            rows.append(
                _row(b, figure, f[key], "MB/s", reference=ref, reference_label=ref_label,
                     ratio=f.get(ratio_key), note=note)
            )  # fmt: skip
    return rows


def _memory(f: dict[str, Any]) -> list[Row]:
    b = "memory"
    _row = _rows_for(f)
    return [
        _row(b, "daemon RSS, every source at load (peak)", f["rss_peak_mib"], "MiB",
             reference=f.get("reference_rss_peak_mib"),
             reference_label="the same daemon with no sources",
             goal=Goal("<=", 100, "≤ 100 MiB")),
        _row(b, "RSS growth after warm-up", f["rss_growth_pct"], "%",
             goal=Goal("<=", 10, "≤ 10 % (flat)"),
             note=f"{f['seconds']:.0f} s run; the soak runs longer"),
        _row(b, "open file descriptors (peak)", f["fds_peak"], "",
             reference=f.get("reference_fds_peak"),
             reference_label="the same daemon with no sources"),
        _row(b, "threads (peak)", f["threads_peak"], "",
             reference=f.get("reference_threads_peak"),
             reference_label="the same daemon with no sources"),
    ]  # fmt: skip


def _wear(f: dict[str, Any]) -> list[Row]:
    b = "wear"
    rows = []
    for r in f["rates"]:
        note = f"{r['flushes_per_s']} device flushes/s"
        if r["rate_per_s"] == 0:
            rows.append(
                _row(b, "idle: bytes written to the device per hour", r["bytes_per_hour"],
                     "B/h", goal=Goal("<=", 0, "0 B/h"), note=note)
            )  # fmt: skip
            continue
        goal = r["goal_bytes_per_event"]
        rows.append(
            _row(b, f"bytes to the device per event at {r['rate_per_s']:,} events/s",
                 r["bytes_per_event"], "B", reference=r["floor_bytes_per_event"],
                 reference_label=f"floor at a {f['durability_window_ms']:g} ms window",
                 goal=Goal("<=", goal, f"≤ {goal:,} B"), note=note)
        )  # fmt: skip
    return rows


def _journal(f: dict[str, Any]) -> list[Row]:
    b = "journal"
    _row = _rows_for(f)
    v = f["variants"]
    idle = v["idle"]["bytes_per_hour"]
    idle_label = "journald on its own (defaults, nothing sent)"
    window = f"{f['seconds']:.0f} s window, a forced sync at its end"
    return [
        _row(b, "the daemon's journal lines per hour, busy store (info)",
             f["daemon_lines_per_hour"], "lines/h",
             note=f"{f['daemon_text_bytes_per_hour']:,} B/h of text"),
        _row(b, "journald defaults (persistent): bytes to the card per hour",
             v["defaults"]["bytes_per_hour"], "B/h", reference=idle,
             reference_label=idle_label, note=window),
        _row(b, "journald Storage=volatile (recommended): bytes to the card per hour",
             v["volatile"]["bytes_per_hour"], "B/h",
             goal=Goal("<=", 0, "0 B/h", emulated_ok=True), note=window),
        _row(b, "journald persistent, SystemMaxUse, SyncIntervalSec=15min: bytes per hour",
             v["persistent"]["bytes_per_hour"], "B/h", reference=idle,
             reference_label=idle_label, note=window),
    ]  # fmt: skip


def _footprint(f: dict[str, Any]) -> list[Row]:
    b = "footprint"
    sizes = f["sizes"]
    rows: list[Row] = []
    if "size_error" in sizes:
        rows.append(_row(b, "installed size (packages not built)", None, "MB",
                         note=sizes["size_error"].splitlines()[0]))  # fmt: skip
    for arch in sizes.get("arches", []):
        s = sizes[arch]
        rows += [
            _row(b, f"installed size, base package ({arch}, on disk with bytecode)",
                 s["base_mb"], "MB", goal=Goal("<=", f["goal_base_mb"], "≤ 60 MB"),
                 note=f"dpkg Installed-Size {s['base_installed_size_mb']} MB"),
            _row(b, f"installed size, base + camera ({arch}, on disk with bytecode)",
                 s["base_camera_mb"], "MB",
                 goal=Goal("<=", f["goal_base_camera_mb"], "≤ 300 MB"),
                 note=f"dpkg Installed-Size {s['base_camera_installed_size_mb']} MB"),
        ]  # fmt: skip
    rows += [
        _row(b, "packaged daemon RSS, every source but the camera at load (peak)",
             f["rss_peak_mib"], "MiB", reference=f["reference_rss_peak_mib"],
             reference_label="the same daemon with no sources",
             goal=Goal("<=", f["goal_rss_mib"], "≤ 64 MiB")),
        _row(b, "start → READY, every source but the camera (median)",
             f["start_to_ready_s"], "s", reference=f["reference_python_start_s"],
             reference_label="bare `python3 -I -c pass`",
             goal=Goal("<=", f["goal_ready_s"], "≤ 0.5 s"),
             note=f"max {f['start_to_ready_max_s']} s of {len(f['start_to_ready_runs'])}; "
             f"CPU to READY {f['start_to_ready_cpu_s']} s"),
    ]  # fmt: skip
    return rows


_EXTRACTORS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "pipeline": _pipeline,
    "drain": _drain,
    "ble": _ble,
    "qr": _qr,
    "memory": _memory,
    "wear": _wear,
    "journal": _journal,
    "footprint": _footprint,
}


def headline_rows(benchmark: str, figures: dict[str, Any]) -> list[Row]:
    """The headline rows of one benchmark's figures (KeyError if a figure is missing)."""
    return _EXTRACTORS[benchmark](figures)


def fmt_number(value: float | None, unit: str = "") -> str:
    """A figure as a person reads it: 65,012 events/s, 0.53, 8.9 ms, 98.0 %."""
    if value is None:
        return "—"
    if unit == "%":
        return f"{value:.1f} %"
    if abs(value) >= 1000 or float(value).is_integer():
        text = f"{value:,.0f}"
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".rstrip()
