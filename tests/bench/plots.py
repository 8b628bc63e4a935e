"""The benchmark report's plots: PNG files drawn with matplotlib's Agg backend.

One figure per benchmark that ran, named ``<benchmark>-<what>.png``; a plot that cannot
be drawn (a figure missing from an older benchmark's output) is named in the error and
the others are still drawn.

    files, error = draw_all(report, out_dir)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: the box has no screen

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure

OURS, REF, PEER, GOAL = "#1f6feb", "#8c959f", "#d29922", "#cf222e"


def _bars(ax: Axes, labels: list[str], values: list[float], colours: list[str]) -> None:
    bars = ax.bar(labels, values, color=colours)
    ax.bar_label(bars, labels=[f"{v:,.3g}" if v < 1000 else f"{v:,.0f}" for v in values])


def _goal(ax: Axes, value: float, text: str, horizontal: bool = True) -> None:
    if horizontal:
        ax.axhline(value, color=GOAL, linestyle="--", linewidth=1)
        ax.annotate(text, (0.01, value), xycoords=("axes fraction", "data"), color=GOAL,
                    va="bottom", fontsize=8)  # fmt: skip


def _pipeline(f: dict[str, Any]) -> Figure:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    _bars(a, ["ours", "bare SQLite+paho", f"ours +{f['wan_rtt_ms']:.0f} ms RTT"],
          [f["events_per_s"], f["reference_events_per_s"], f["wan_events_per_s"]],
          [OURS, REF, OURS])  # fmt: skip
    _goal(a, 65_000, "goal >= 65,000")
    a.set_ylabel("events/s, durable end to end")
    a.set_title(f"throughput ({f['events']:,} events)")
    pct = f.get("latency_percentiles_ms") or {"50": f["p50_ms"], "99": f["p99_ms"]}
    pct = dict(sorted(pct.items(), key=lambda kv: float(kv[0])))  # JSON sorts them as text
    xs = list(range(len(pct)))  # evenly spaced: the tail is what matters
    b.plot(xs, list(pct.values()), marker="o", color=OURS)
    b.set_xticks(xs, [f"p{k}" if k != "100" else "max" for k in pct], fontsize=8)
    _goal(b, 50, "goal p99 <= 50 ms")
    b.set_xlabel("percentile")
    b.set_ylabel("capture -> PUBACK, ms")
    b.set_title(f"latency at {f['latency_rate_per_s']:,.0f} events/s")
    return fig


def _drain(f: dict[str, Any]) -> Figure:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    _bars(a, ["ours", "plain paho"], [f["drain_s"], f["reference_drain_s"]], [OURS, REF])
    if f["events"] == 1_000_000:
        _goal(a, 30, "goal <= 30 s")
    a.set_ylabel("seconds to drain")
    a.set_title(f"backlog of {f['events']:,} events to a local mosquitto")
    labels, values, colours = ["ours: exec -> READY=1"], [f["start_to_ready_s"]], [OURS]
    if "python_start_s" in f:
        labels.append("python -c pass")
        values.append(f["python_start_s"])
        colours.append(REF)
    _bars(b, labels, values, colours)
    _goal(b, 1.0, "goal <= 1 s")
    b.set_ylabel("seconds")
    b.set_title("start-up")
    return fig


def _ble(f: dict[str, Any]) -> Figure:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    _bars(a, ["ours (BleSource)", "bare BleakScanner"],
          [f["ours_bleak_cpu_s_per_10k"], f["bare_bleak_cpu_s_per_10k"]], [OURS, REF])  # fmt: skip
    a.set_ylabel("CPU-seconds per 10,000 adverts")
    a.set_title(f"real bleak path, {f['flood_adverts']:,} adverts queued")
    labels = ["ours", "bare bleak"]
    values = [f["paced_ours_cpu_s_per_10k"], f["paced_bare_cpu_s_per_10k"]]
    colours = [OURS, REF]
    if "peer_cpu_s_per_10k" in f:
        labels.append(f.get("peer", "peer"))
        values.append(f["peer_cpu_s_per_10k"])
        colours.append(PEER)
    _bars(b, labels, values, colours)
    b.set_yscale("log")
    b.set_ylim(bottom=min(values) / 4)  # the bars start below the smallest one
    b.set_ylabel("CPU-seconds per 10,000 adverts (log)")
    b.set_title(f"paced at {f['paced_rate_per_s']:.0f} adverts/s")
    return fig


def _qr(f: dict[str, Any]) -> Figure:
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    decoders = list(f["decoders"])
    sizes = sorted({s for d in f["decoders"].values() for s in d})
    width = 0.8 / (2 * len(sizes))
    for i, size in enumerate(sizes):
        for j, kind in enumerate(("fps_code", "fps_empty")):
            xs = [k + (2 * i + j) * width for k in range(len(decoders))]
            ys = [f["decoders"][d].get(size, {}).get(kind, 0) for d in decoders]
            a.bar(xs, ys, width, label=f"{size} {'with a code' if j == 0 else 'empty'}",
                  color=(OURS, PEER)[i % 2], alpha=1.0 if j == 0 else 0.45)  # fmt: skip
    a.set_xticks([k + 0.4 - width / 2 for k in range(len(decoders))], decoders)
    a.set_yscale("log")
    _goal(a, 120, "goal >= 120 at 1280x720")
    a.set_ylabel("frames/s, one core (log)")
    a.set_title("QR decoders, same corpus")
    a.legend(fontsize=7)
    classes = list(next(iter(f["success"].values())))
    width = 0.8 / len(decoders)
    for j, d in enumerate(decoders):
        xs = [k + j * width for k in range(len(classes))]
        b.bar(xs, [100 * f["success"][d].get(c, 0) for c in classes], width, label=d)
    b.set_xticks([k + 0.4 - width / 2 for k in range(len(classes))],
                 [c.replace("_", " ") for c in classes], fontsize=8)  # fmt: skip
    b.set_ylabel("success, %")
    b.set_title("success by difficulty class")
    b.legend(fontsize=7)
    return fig


def _tap(f: dict[str, Any]) -> Figure | None:
    streams = f.get("tap_streams")
    if not streams:
        return None  # an older bench qr without the tap
    fig, a = plt.subplots(figsize=(8, 4))
    names = list(streams)
    kinds = (("reference_mb_per_s", "bare relay (reference)", REF),
             ("tap_mb_per_s", "tap, parsing", OURS),
             ("tap_inject_mb_per_s", "tap, token injection", PEER))  # fmt: skip
    width = 0.8 / len(kinds)
    for j, (key, label, colour) in enumerate(kinds):
        xs = [k + j * width for k in range(len(names))]
        bars = a.bar(xs, [streams[s][key] for s in names], width, label=label, color=colour)
        a.bar_label(bars, fmt="%.1f", fontsize=8)
    a.set_xticks([k + 0.4 - width / 2 for k in range(len(names))], names)
    a.set_ylabel("MB/s through the TCP tap")
    a.set_title("receipt tap, same loopback")
    a.legend(fontsize=8)
    return fig


def _memory(f: dict[str, Any]) -> Figure:
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for series, label, colour in (
        (f["samples"], "every source at load", OURS),
        (f["reference_samples"], "no sources", REF),
    ):
        a.plot([s[0] for s in series], [s[1] for s in series], label=label, color=colour)
        b.plot([s[0] for s in series], [s[2] for s in series], label=f"fds, {label}",
               color=colour)  # fmt: skip
        b.plot([s[0] for s in series], [s[3] for s in series], label=f"threads, {label}",
               color=colour, linestyle=":")  # fmt: skip
    _goal(a, 100, "goal <= 100 MiB")
    a.set_ylim(bottom=0)
    a.set_xlabel("seconds")
    a.set_ylabel("RSS, MiB")
    a.set_title("daemon resident memory")
    a.legend(fontsize=8)
    b.set_ylim(bottom=0)
    b.set_xlabel("seconds")
    b.set_title("open file descriptors and threads")
    b.legend(fontsize=7)
    return fig


_PLOTS: dict[str, list[tuple[str, Callable[[dict[str, Any]], Figure | None]]]] = {
    "pipeline": [("throughput-latency", _pipeline)],
    "drain": [("times", _drain)],
    "ble": [("cpu-per-advert", _ble)],
    "qr": [("fps-success", _qr), ("tap", _tap)],
    "memory": [("over-time", _memory)],
}


def draw_all(report: dict[str, Any], out: Path) -> tuple[list[str], str | None]:
    """Draw every plot for the benchmarks that ran; (file names, errors or None)."""
    files: list[str] = []
    errors: list[str] = []
    for name, result in report["benchmarks"].items():
        if result["status"] != "ok" or name not in _PLOTS:
            continue
        for what, draw in _PLOTS[name]:
            file = f"{name}-{what}.png"
            try:
                fig = draw(result["figures"])
            except (KeyError, TypeError, ValueError, ZeroDivisionError, StopIteration) as exc:
                errors.append(f"{file}: {type(exc).__name__} {exc}")
                continue
            if fig is None:
                continue
            try:
                fig.suptitle(f"{name}{' (quick)' if report['quick'] else ''}", fontsize=10)
                fig.tight_layout()
                fig.savefig(out / file, dpi=90)
            finally:
                plt.close(fig)
            files.append(file)
    return files, "; ".join(errors) or None
