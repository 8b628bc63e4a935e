"""``make bench``: every benchmark in turn, one report.

Each benchmark runs as its own process (``python -m tests.bench NAME --json``), so a
crash, a hang (killed after ``timeout_s``) or a leak in one cannot spoil the others: a
benchmark that fails is reported as failed, with its error, and the next one runs.
The report directory gets

    report.md     the machine, the load around each benchmark, the versions, the
                  headline table (figure, ours, same-run reference, goal, met) and plots
    report.json   the same, plus every figure each benchmark printed
    *.png         plots (matplotlib, Agg backend; without matplotlib the report says so)

``--readme FILE`` also replaces the block between ``<!-- bench:begin -->`` and
``<!-- bench:end -->`` in FILE with the headline table.

    from tests.bench.report import run_report
    run_report(Path("bench-report"), only=("pipeline",), quick=True)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.bench.goals import EMULATED_ENV, NOT_JUDGED, emulated
from tests.bench.headline import Row, fmt_number, headline_rows
from tests.bench.machine import load_snapshot, machine, python_start_s, versions
from tests.bench.registry import BENCHMARKS

BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
TIMEOUT_S = {"quick": 900.0, "full": 1800.0}


class ReadmeBlockError(ValueError):
    """The README has no (or a broken) bench block to replace."""


def replace_block(text: str, block: str) -> str:
    """``text`` with everything between the bench markers replaced by ``block``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < 0 or end < start or text.count(BEGIN) != 1 or text.count(END) != 1:
        raise ReadmeBlockError(
            f"expected exactly one {BEGIN} followed by one {END}: "
            "add the two markers on their own lines where the table goes"
        )
    return text[: start + len(BEGIN)] + "\n" + block.strip("\n") + "\n" + text[end:]


def _run_one(name: str, quick: bool, timeout_s: float) -> dict[str, Any]:
    """Run ``bench NAME --json`` as a process; its figures or its error."""
    argv = [sys.executable, "-m", "tests.bench", name, "--json"]
    if quick:
        argv.append("--quick")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        return _failed(t0, f"did not finish within {timeout_s:.0f} s (stopped)", err)
    if proc.returncode != 0:
        return _failed(t0, f"exited with status {proc.returncode}", err)
    try:
        figures = json.loads(out.decode("utf-8").strip().splitlines()[-1])
    except (ValueError, IndexError):
        return _failed(t0, "printed no JSON figures", err)
    return {"status": "ok", "seconds": round(time.monotonic() - t0, 1), "figures": figures}


def _failed(t0: float, why: str, stderr: bytes) -> dict[str, Any]:
    tail = stderr.decode("utf-8", errors="replace").strip().splitlines()[-15:]
    return {
        "status": "failed",
        "seconds": round(time.monotonic() - t0, 1),
        "error": why + (":\n" + "\n".join(tail) if tail else ""),
    }


def run_report(
    out: Path,
    *,
    only: Sequence[str] = BENCHMARKS,
    quick: bool = False,
    readme: Path | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Run the benchmarks in ``only`` (in the report's order) and write the report."""
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}: pick from {BENCHMARKS}")
    names = [b for b in BENCHMARKS if b in only]
    limit = timeout_s or TIMEOUT_S["quick" if quick else "full"]
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(UTC)
    report: dict[str, Any] = {
        "report": 1,
        "started": started.isoformat(timespec="seconds"),
        "quick": quick,
        "emulated": emulated(),  # goals are then not judged (tests.bench.goals)
        "benchmarks_selected": names,
        "machine": machine(),
        "versions": versions(),
        "load_before": load_snapshot(),
        "benchmarks": {},
    }
    for i, name in enumerate(names, 1):
        _progress(f"[{i}/{len(names)}] {name} ...")
        load = load_snapshot()
        result = _run_one(name, quick, limit)
        result["load_before"] = load
        result["load_after"] = load_snapshot(sample_s=0)
        if name == "drain" and result["status"] == "ok":
            result["figures"]["python_start_s"] = python_start_s()
        report["benchmarks"][name] = result
        verdict = "done" if result["status"] == "ok" else "FAILED"
        _progress(f"[{i}/{len(names)}] {name} {verdict} in {result['seconds']:.0f} s")
    report["load_after"] = load_snapshot()
    report["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    report["headline"] = [r.as_dict() for r in _headline(report)]
    report["plots"], report["plots_error"] = _plots(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_markdown(report), encoding="utf-8")
    if readme is not None:
        text = readme.read_text(encoding="utf-8")
        readme.write_text(replace_block(text, readme_block(report)), encoding="utf-8")
    _progress(f"report written to {out / 'report.md'} and {out / 'report.json'}")
    return report


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _headline(report: dict[str, Any]) -> list[Row]:
    rows: list[Row] = []
    for name, result in report["benchmarks"].items():
        if result["status"] != "ok":
            rows.append(Row(name, "(benchmark failed)", None, "", note=_first_line(result)))
            continue
        try:
            rows.extend(headline_rows(name, result["figures"]))
        except (KeyError, TypeError, ZeroDivisionError) as exc:
            note = f"figures incomplete: {type(exc).__name__} {exc}"
            rows.append(Row(name, "(figures incomplete)", None, "", note=note))
    return rows


def _first_line(result: dict[str, Any]) -> str:
    return str(result.get("error", "")).splitlines()[0] if result.get("error") else ""


def _plots(report: dict[str, Any], out: Path) -> tuple[list[str], str | None]:
    try:
        from tests.bench.plots import draw_all
    except ImportError as exc:  # matplotlib is a dev extra
        return [], f"no plots: matplotlib is not installed ({exc}); pip install matplotlib"
    return draw_all(report, out)


# -- Markdown -----------------------------------------------------------------------------


def _met(row: dict[str, Any]) -> str:
    if row.get("emulated"):
        return NOT_JUDGED
    return {True: "met", False: "**not met**", None: "—"}[row["met"]]


def _reference_cell(row: dict[str, Any]) -> str:
    if row["reference"] is None:
        return f"— ({row['reference_label']})" if row["reference_label"] else "—"
    cell = f"{fmt_number(row['reference'], row['unit'])} ({row['reference_label']})"
    if row["ratio"] is not None and row["figure"] != "ours / bare SQLite + paho":
        cell += f"; ratio {row['ratio']}"
    return cell


def headline_table(report: dict[str, Any]) -> str:
    lines = [
        "| benchmark | figure | ours | same-run reference | goal | met |",
        "|---|---|---|---|---|---|",
    ]
    for row in report["headline"]:
        figure = row["figure"] + (f" ({row['note']})" if row["note"] else "")
        lines.append(
            f"| {row['benchmark']} | {_md(figure)} | {fmt_number(row['ours'], row['unit'])} "
            f"| {_md(_reference_cell(row))} | {row['goal'] or '—'} | {_met(row)} |"
        )
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def load_line(report: dict[str, Any]) -> str:
    before, after = report["load_before"], report["load_after"]
    cores = report["machine"]["cores"]
    other = max(
        [before["other_cpu_cores"]]
        + [b["load_before"]["other_cpu_cores"] for b in report["benchmarks"].values()]
    )
    verdict = (
        f"other load present (other processes used up to {other:.2f} of {cores} cores "
        "between benchmarks): absolute figures are low, ratios hold"
        if other >= 0.25
        else "no other load of note"
    )
    return f"load average {_la(before['loadavg'])} before, {_la(after['loadavg'])} after; {verdict}"


def _la(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def readme_block(report: dict[str, Any]) -> str:
    m = report["machine"]
    kind = ("quick run" if report["quick"] else "full run") + (
        ", emulated: goals not judged" if report.get("emulated") else ""
    )
    return (
        f"Latest report ({kind}, {report['started'][:10]}, `make bench`): "
        f"{m['cpu_model']}, {m['cores']} cores, {m['ram_gib']} GiB, Python {m['python']}; "
        f"{load_line(report)}.\n\n" + headline_table(report)
    )


def render_markdown(report: dict[str, Any]) -> str:
    m, v = report["machine"], report["versions"]
    parts = [
        "# Touchpoint Gateway benchmark report\n",
        f"{'Quick' if report['quick'] else 'Full'} run, {report['started']} to "
        f"{report['finished']} (UTC). Every figure is beside a reference measured in the "
        "same run; on a shared machine the ratios hold, absolute figures do not.\n",
        f"Load: {load_line(report)}.\n",
        *_emulated_line(report),
        "## Headline\n",
        headline_table(report),
        "## Machine\n",
        _kv_table(m),
        "## Versions\n",
        _kv_table(v),
        "## Benchmarks\n",
    ]
    for name, result in report["benchmarks"].items():
        parts.append(f"### {name}\n")
        lb, la = result["load_before"], result["load_after"]
        parts.append(
            f"{result['status']} in {result['seconds']:.0f} s; load average "
            f"{_la(lb['loadavg'])} before, {_la(la['loadavg'])} after; other processes "
            f"{lb['other_cpu_cores']:.2f} cores just before.\n"
        )
        if result["status"] != "ok":
            parts.append("```\n" + result.get("error", "") + "\n```\n")
            continue
        for plot in report["plots"]:
            if plot.startswith(name + "-"):
                parts.append(f"![{plot}]({plot})\n")
        parts.append(_kv_table(_scalars(result["figures"])))
    if report["plots_error"]:
        parts.append(f"Plots: {report['plots_error']}\n")
    return "\n".join(parts)


def _emulated_line(report: dict[str, Any]) -> list[str]:
    if not report.get("emulated"):
        return []
    return [
        f"Emulated run ({EMULATED_ENV}): every figure is measured and shown, speed and "
        "footprint goals are not judged (an emulator's speed and memory are not the "
        "code's).\n"
    ]


def _scalars(figures: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested figures into dotted keys; long series are left to report.json."""
    flat: dict[str, Any] = {}
    for key, value in figures.items():
        name = prefix + str(key)
        if isinstance(value, dict):
            flat.update(_scalars(value, name + "."))
        elif isinstance(value, list) and len(value) > 8:
            flat[name] = f"({len(value)} values in report.json)"
        else:
            flat[name] = value
    return flat


def _kv_table(values: dict[str, Any]) -> str:
    lines = ["| | |", "|---|---|"]
    for key, value in values.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        lines.append(f"| {_md(str(key))} | {_md(text)} |")
    return "\n".join(lines) + "\n"
