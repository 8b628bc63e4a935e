"""What a soak run must show, and its outputs: samples.csv, soak.png, REPORT.md.

The checks are plain functions of the samples, so tests/soak/test_soak.py also feeds
them a leaking series and a growing map to show that they fail when they should.

- **flat** (RSS and fds): warm-up is the first ``plan.warmup_days`` simulated days (every
  code path has run once by then: a broker outage and its backlog drain, retention,
  erasures, holds).  The reference level is the median of the first simulated day after
  warm-up; every later sample must stay within +10 % of it and the median of the last
  simulated day within +-10 %.
- **bounded maps**: for every table of ``Gateway.memory_stats()``, the maximum over the
  second half of the run may exceed the first half's by at most max(2, 10 %), or the
  table stays within its configured bound (``SoakRun.bounds``).
- **sources**: each of the five sources read something in the second half of the run
  (and in its last simulated day): a source that hangs after a while fails the run.
- **buffer**: the database file never exceeds ``max_bytes``; the depth rose during each
  broker outage and came back down after it.
- **no loss**: every seq the daemon committed reached the central, except those counted
  as expired (retention), evicted (cap) or erased (withdrawal): the central's
  (stream, seq) set is compared with 1..last_seq.
- **privacy**: no raw identifier in the database, its WAL, the receipt counters, the
  daemon's log, or the central's copy of every MQTT payload.
"""

from __future__ import annotations

import csv
import json
import re
import sqlite3
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.soak.soak_run import SoakRun

DAY = 86_400.0
FLAT_PCT = 10.0
MAP_SLACK = (2, 0.10)  # a map may end above its first-half maximum by max(2, 10 %)
EXPECTED_SOURCES = ("bulk-cards", "entrance-ble", "kiosk-cam", "till-2-card", "till-2-printer")


@dataclass
class Verdict:
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    maps: list[dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append((name, ok, detail))

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def failures(self) -> list[str]:
        return [f"{name}: {detail}" for name, ok, detail in self.checks if not ok]

    def lines(self) -> list[str]:
        return [f"{'PASS' if ok else 'FAIL'} {name}: {detail}" for name, ok, detail in self.checks]


# ------------------------------------------------------------------------------ checks


def flat(
    samples: list[dict[str, Any]], key: str, warmup_days: float, pct: float = FLAT_PCT
) -> tuple[bool, str, dict[str, float]]:
    """Whether ``key`` stays within ``pct`` of its level after warm-up (see module doc)."""
    after = [s for s in samples if s["sim_days"] >= warmup_days]
    if len(after) < 4:
        return False, f"too few samples after warm-up ({len(after)})", {}
    first = [s[key] for s in after if s["sim_days"] < warmup_days + 1] or [after[0][key]]
    end_day = after[-1]["sim_days"] - 1
    last = [s[key] for s in after if s["sim_days"] >= end_day] or [after[-1][key]]
    ref = statistics.median(first)
    peak = max(s[key] for s in after)
    end = statistics.median(last)
    fig = {
        "start": samples[0][key],
        "at_warmup": ref,
        "end": samples[-1][key],
        "max": max(s[key] for s in samples),
        "max_after_warmup": peak,
        "growth_pct": round(100 * (peak - ref) / ref, 2) if ref else 0.0,
        "end_drift_pct": round(100 * (end - ref) / ref, 2) if ref else 0.0,
    }
    ok = peak <= ref * (1 + pct / 100) and abs(end - ref) <= ref * pct / 100
    detail = (
        f"level after warm-up {ref:g}, peak after warm-up {peak:g} ({fig['growth_pct']:+.1f} %),"
        f" last day {end:g} ({fig['end_drift_pct']:+.1f} %); limit {pct:g} %"
    )
    return ok, detail, fig


def map_growth(
    samples: list[dict[str, Any]], bounds: dict[str, int]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Per map: first-half and second-half maxima, its bound, and whether it is bounded."""
    names = sorted({name for s in samples for name in s["maps"]})
    half = samples[-1]["sim_days"] / 2
    rows, bad = [], []
    for name in names:
        first = [s["maps"].get(name, 0) for s in samples if s["sim_days"] < half]
        second = [s["maps"].get(name, 0) for s in samples if s["sim_days"] >= half]
        m1, m2 = max(first, default=0), max(second, default=0)
        bound = bounds.get(name)
        flat_ok = m2 <= m1 + max(MAP_SLACK[0], MAP_SLACK[1] * m1)
        bound_ok = bound is not None and max(m1, m2) <= bound
        rows.append({
            "map": name,
            "start": samples[0]["maps"].get(name, 0),
            "end": samples[-1]["maps"].get(name, 0),
            "max_first_half": m1,
            "max_second_half": m2,
            "bound": bound,
            "verdict": "flat" if flat_ok else ("within bound" if bound_ok else "GROWING"),
        })  # fmt: skip
        if not (flat_ok or bound_ok):
            bad.append(f"{name} {m1} -> {m2}" + (f" (bound {bound})" if bound else ""))
    return rows, bad


def central_seqs(path: Path, stream: str) -> set[int]:
    """The seqs of ``stream`` the fake central accepted (it dedupes)."""
    seqs: set[int] = set()
    needle = f'"stream":"{stream}"'
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if needle in line:
                seqs.add(int(json.loads(line)["seq"]))
    return seqs


def find_raw(paths: Iterable[Path], raws: list[str], chunk: int = 1 << 20) -> list[str]:
    """Raw identifiers (as written, upper and lower case) found in these files.

    Read in ``chunk``-byte pieces, each searched with the end of the one before it (one
    byte shorter than the longest form), so a form across a boundary is still found.  Not
    ``mmap.find``: Debian 12's Python 3.11.2 can crash in it (CPython gh-105235).
    """
    forms = sorted({f.encode() for r in raws for f in (r, r.upper(), r.lower())})
    digits = {f for f in forms if f.isdigit()}
    others = [f for f in forms if f not in digits]
    runs = re.compile(rb"\d{%d,}" % min((len(d) for d in digits), default=1))
    keep = max((len(f) for f in forms), default=1) - 1
    found = []
    for path in paths:
        if not path.exists() or path.stat().st_size == 0:
            continue
        hits: set[bytes] = set()
        tail = b""
        with path.open("rb") as fh:
            while piece := fh.read(chunk):
                data = tail + piece
                hits |= {f for f in others if f in data}
                if digits:  # digit identifiers: scan the digit runs once, not once per number
                    for m in runs.finditer(data):
                        run = m.group()
                        hits |= {d for d in digits if d in run}
                tail = data[-keep:] if keep else b""
        found += [f"{h.decode()} in {path.name}" for h in sorted(hits)]
    return found


def _db_state(db: Path) -> tuple[int, int, str]:
    """(events still buffered, last seq, stream) of a closed buffer database."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        depth = int(conn.execute("SELECT coalesce(sum(n), 0) FROM chunks").fetchone()[0])
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    finally:
        conn.close()
    return depth, int(meta.get("last_seq", 0)), str(meta.get("stream", ""))


def silent_sources(samples: list[dict[str, Any]], expected: Iterable[str]) -> tuple[list[str], str]:
    """Sources that read nothing in the run's second half (and, for runs of two days or
    more, its last simulated day): a source that hangs after a while shows here."""
    end = samples[-1]["sim_days"]
    windows = [("second half", end / 2)] + ([("last day", end - 1)] if end >= 2 else [])
    silent = [
        f"{src} ({label})"
        for label, start in windows
        for src in expected
        if _read_since(samples, src, start) <= 0
    ]
    return silent, " and ".join(label for label, _ in windows)


def _read_since(samples: list[dict[str, Any]], source: str, day: float) -> int:
    """Readings a source took from simulated ``day`` to the end of the run."""
    before = [x["sources"].get(source, 0) for x in samples if x["sim_days"] < day]
    return int(samples[-1]["sources"].get(source, 0) - (before[-1] if before else 0))


def counter(run: SoakRun, name: str, **labels: str) -> float:
    """A counter of the run, summed over the label sets that include ``labels``."""
    want = labels.items()
    return sum(v for n, lab, v in run.counters if n == name and want <= lab.items())


def check(run: SoakRun, *, flat_checks: bool) -> Verdict:
    """Every check of the module docstring; ``flat_checks`` off for the short smoke run."""
    v = Verdict()
    s = run.samples
    plan = run.plan
    v.figures["samples"] = len(s)
    for key in ("rss_mib", "fds", "threads"):
        ok, detail, fig = flat(s, key, plan.warmup_days)
        v.figures[key] = fig
        if flat_checks and key != "threads":
            v.add(f"{key} flat after warm-up", ok, detail)
    rows, bad = map_growth(s, run.bounds)
    v.maps = rows
    v.add("in-memory maps bounded", not bad, "; ".join(bad) or f"{len(rows)} maps")
    # the buffer
    max_db = max(x["db_mib"] for x in s)
    cap = plan.max_bytes / 2**20
    v.figures.update(
        max_depth=max(x["depth"] for x in s),
        max_db_mib=max_db,
        max_wal_mib=max(x["wal_mib"] for x in s),
        cap_mib=cap,
    )
    v.add("buffer file within its cap", max_db <= cap, f"max {max_db:.2f} MiB, cap {cap:.0f} MiB")
    live = statistics.median([x["depth"] for x in s if x["broker_up"]] or [0])
    for lo, hi in run.timeline.outages:
        during = [x["depth"] for x in s if lo <= x["sim_days"] < hi]
        after = [x["depth"] for x in s if x["sim_days"] >= hi]
        rose = max(during, default=0) > max(1000, 10 * live)
        drained = bool(after) and min(after) < max(during, default=0) / 10
        v.add(
            f"outage day {lo:.2f}-{hi:.2f}: buffer filled and drained",
            rose and (drained or not after),
            f"max depth during {max(during, default=0):,}, "
            f"min after {min(after) if after else 'n/a'}",
        )
    # no loss
    depth, last_seq, stream = _db_state(run.db)
    seqs = central_seqs(run.work / "rig" / "central-events.jsonl", stream)
    missing = last_seq - len({q for q in seqs if 1 <= q <= last_seq})
    expired = counter(run, "events_expired_total")
    evicted = counter(run, "events_evicted_total")
    erased = counter(run, "erased_events_total")
    v.figures.update(
        last_seq=last_seq,
        at_central=len(seqs),
        left_in_buffer=depth,
        missing=missing,
        expired=int(expired),
        evicted=int(evicted),
        erased=int(erased),
        readings=int(counter(run, "readings_total")),
        forwarded=int(counter(run, "events_forwarded_total")),
        dead_lettered=int(counter(run, "events_dead_lettered_total")),
    )
    v.add(
        "no event lost",
        missing - depth <= expired + evicted + erased and stream == run.stream,
        f"{last_seq:,} committed, {len(seqs):,} at the central, {depth} left in the buffer; "
        f"{missing:,} not delivered vs {int(expired):,} expired + {int(evicted):,} evicted "
        f"+ {int(erased):,} erased",
    )
    # the store did what the plan says
    totals: dict[str, float] = {}
    for name, labels, val in run.counters:
        if name == "readings_total":
            totals[labels["source"]] = totals.get(labels["source"], 0) + val
    v.figures["readings_by_source"] = {k: int(x) for k, x in sorted(totals.items())}
    silent, windows = silent_sources(s, EXPECTED_SOURCES)
    v.add(
        "every source kept reading",
        not silent,
        f"silent: {', '.join(silent)}" if silent else f"all {len(EXPECTED_SOURCES)}, in {windows}",
    )
    v.figures["consent_policy"] = {
        lab["outcome"]: int(x) for n, lab, x in run.counters if n == "consent_policy_total"
    }
    released = counter(run, "consent_policy_total", outcome="released")
    lapsed = counter(run, "consent_policy_total", outcome="hold_expired")
    v.figures["erasures"] = int(counter(run, "erasures_total"))
    # A held reading expires only when no grant comes within the hold TTL and a policy
    # tick (once a real second: 16 simulated minutes at x960) falls in between; half a
    # simulated day has a dozen held readings, too few to be sure of both outcomes, so
    # the smoke asks for one of them and a run of a simulated day or more for both.
    both = plan.days >= 1
    held_ok = (released > 0 and lapsed > 0) if both else released + lapsed > 0
    v.add(
        "consent cycled",
        v.figures["erasures"] > 0 and held_ok,
        f"{v.figures['erasures']} erasures; held readings: {int(released)} released,"
        f" {int(lapsed)} expired ({'both' if both else 'either'} needed)",
    )
    # privacy
    rig = run.work / "rig"
    files = [run.db, Path(f"{run.db}-wal"), rig / "receipt-counters.db",
             Path(f"{rig / 'receipt-counters.db'}-wal"), run.log_path,
             rig / "central-events.jsonl"]  # fmt: skip
    leaks = find_raw(files, run.raw)
    v.add("nothing raw on disk or in MQTT payloads", not leaks, "; ".join(leaks) or
          f"{len(run.raw)} identifiers, {len(files)} files")  # fmt: skip
    central = json.loads((rig / "central-stats.json").read_text(encoding="utf-8"))
    v.figures["central_duplicates"] = int(central.get("duplicates", 0))
    v.figures["central_invalid"] = int(central.get("invalid_total", 0))
    v.add(
        "every message valid at the central",
        v.figures["central_invalid"] == 0,
        f"invalid {central.get('invalid', {})}, duplicates {v.figures['central_duplicates']}",
    )
    gauge = "touchpoint_memory_entries{" in run.metrics_text
    v.add("memory_entries gauge on /metrics", gauge, "present" if gauge else "missing")
    return v


# ----------------------------------------------------------------------------- outputs


def write_csv(samples: list[dict[str, Any]], path: Path) -> None:
    names = sorted({n for s in samples for n in s["maps"]})
    sources = sorted({n for s in samples for n in s["sources"]})
    cols = [k for k in samples[0] if k not in ("maps", "sources")]
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(cols + [f"read:{n}" for n in sources] + [f"map:{n}" for n in names])
        for s in samples:
            w.writerow(
                [s[k] for k in cols]
                + [s["sources"].get(n, "") for n in sources]
                + [s["maps"].get(n, "") for n in names]
            )


def plot(run: SoakRun, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = run.samples
    x = [p["sim_days"] for p in s]
    fig, axes = plt.subplots(4, 1, figsize=(11, 13), sharex=True)
    ax_rss, ax_fd, ax_buf, ax_map = axes
    ax_rss.plot(x, [p["rss_mib"] for p in s], color="tab:blue", label="RSS")
    w = run.plan.warmup_days
    after = [p["rss_mib"] for p in s if w <= p["sim_days"] < w + 1]
    if after:
        ref = statistics.median(after)
        ax_rss.axhspan(ref * 0.9, ref * 1.1, color="tab:green", alpha=0.12, label="level +-10 %")
    ax_rss.set_ylabel("RSS (MiB)")
    ax_fd.plot(x, [p["fds"] for p in s], label="file descriptors")
    ax_fd.plot(x, [p["threads"] for p in s], label="threads")
    ax_fd.plot(x, [p["asyncio_tasks"] for p in s], label="asyncio tasks")
    ax_fd.set_ylabel("count")
    ax_buf.plot(x, [p["depth"] for p in s], color="tab:orange", label="buffer depth (events)")
    ax_buf.set_ylabel("events")
    twin = ax_buf.twinx()
    twin.plot(x, [p["db_mib"] for p in s], color="tab:purple", label="buffer.db (MiB)")
    twin.plot(x, [p["wal_mib"] for p in s], color="tab:gray", label="WAL (MiB)", lw=0.8)
    twin.axhline(run.plan.max_bytes / 2**20, color="tab:red", ls=":", label="max_bytes")
    twin.set_ylabel("MiB")
    twin.legend(loc="upper right", fontsize=8)
    names = sorted({n for p in s for n in p["maps"]})
    for n in names:
        ys = [p["maps"].get(n, 0) for p in s]
        if max(ys) > 0:
            ax_map.plot(x, [y + 1 for y in ys], label=n, lw=0.9)
    ax_map.set_yscale("log")
    ax_map.set_ylabel("entries + 1 (log)")
    ax_map.legend(fontsize=6, ncol=3, loc="upper left")
    for ax in axes:
        ax.axvline(run.plan.warmup_days, color="k", ls="--", lw=0.8)
        for lo, hi in run.timeline.outages:
            ax.axvspan(lo, hi, color="tab:red", alpha=0.08)
        ax.grid(alpha=0.3)
    for ax in (ax_rss, ax_fd, ax_buf):
        ax.legend(loc="upper left", fontsize=8)
    ax_map.set_xlabel("simulated days (dashed: end of warm-up; red: broker down)")
    fig.suptitle(
        f"Soak: {run.sim_days:.1f} simulated days in {run.real_s / 60:.1f} real minutes "
        f"(x{run.plan.rate:.0f})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fmt(x: Any) -> str:
    return f"{x:,}" if isinstance(x, int) else (f"{x:,.2f}" if isinstance(x, float) else str(x))


def report_md(run: SoakRun, v: Verdict, machine: dict[str, str]) -> str:
    p, f = run.plan, v.figures
    out = [
        "# Soak report",
        "",
        "Written by `make soak` (`python -m tests.soak.soak_run`); the method is in",
        "`tests/soak/soak_run.py` and the checks in `tests/soak/analysis.py`.",
        "",
        f"**Result: {'PASS' if v.ok else 'FAIL'}**",
        "",
        "## Run",
        "",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, {machine['platform']},"
        f" Python {machine['python']} (shared with other work while it ran; load average at"
        f" the end {machine['load_at_end']})",
        f"- duration: {run.real_s / 60:.1f} real minutes = {run.sim_days:.2f} simulated days"
        f" (clock x{p.rate:.0f}); {f['samples']} samples every {p.sample_s:g} s",
        f"- load: bulk card reads {p.synthetic_rate:g}/s real, BLE scenario x{p.ble_speed:g},"
        f" a receipt every {p.till_interval_s:g} s, camera at {p.camera_decode_fps:g} fps",
        "- broker down (simulated days): "
        + ", ".join(f"{lo:.2f}-{hi:.2f}" for lo, hi in run.timeline.outages),
        f"- retention {p.max_age_s / 3600:g} h, cap {p.max_bytes / 2**20:g} MiB,"
        f" policy hold (TTL {p.hold_ttl_s / 3600:g} h), a consent change every"
        f" {p.consent_every_h:g} simulated h",
        f"- warm-up: the first {p.warmup_days:g} simulated days",
        "",
        "## Events",
        "",
        f"- readings: {f['readings']:,} ("
        + ", ".join(f"{k} {x:,}" for k, x in f["readings_by_source"].items())
        + ")",
        f"- committed (last seq): {f['last_seq']:,}; forwarded: {f['forwarded']:,};"
        f" at the central: {f['at_central']:,}; left in the buffer: {f['left_in_buffer']:,}",
        f"- expired by retention: {f['expired']:,}; evicted at the cap: {f['evicted']:,};"
        f" erased by withdrawals: {f['erased']:,} ({f['erasures']} erasures);"
        f" dead-lettered: {f['dead_lettered']:,}; duplicates seen by the central:"
        f" {f['central_duplicates']:,}",
        "- consent policy outcomes: "
        + ", ".join(f"{k} {x:,}" for k, x in sorted(f["consent_policy"].items())),
        "",
        "## Process",
        "",
        "| | start | after warm-up | end | max | max growth after warm-up |",
        "|---|---|---|---|---|---|",
    ]
    rows = (("rss_mib", "RSS (MiB)"), ("fds", "file descriptors"), ("threads", "threads"))
    for key, label in rows:
        g = f[key]
        if g:
            out.append(
                f"| {label} | {_fmt(g['start'])} | {_fmt(g['at_warmup'])} | {_fmt(g['end'])} |"
                f" {_fmt(g['max'])} | {g['growth_pct']:+.1f} % |"
            )
    out += [
        "",
        f"Buffer: max depth {f['max_depth']:,} events, max file {f['max_db_mib']:.2f} MiB"
        f" (cap {f['cap_mib']:g} MiB), max WAL {f['max_wal_mib']:.2f} MiB.",
        "",
        "## In-memory maps (`Gateway.memory_stats()`)",
        "",
        "| map | start | end | max 1st half | max 2nd half | bound | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in v.maps:
        out.append(
            f"| {r['map']} | {r['start']:,} | {r['end']:,} | {r['max_first_half']:,} |"
            f" {r['max_second_half']:,} | {_fmt(r['bound']) if r['bound'] else '-'} |"
            f" {r['verdict']} |"
        )
    out += [
        "",
        "*flat*: the second half's maximum is at most the first half's + max(2, 10 %);"
        " *within bound*: it grew between the halves but stayed within its configured bound"
        " (for subject-keyed tables without one, the number of subjects the simulated store"
        " has).  `tokens.replay` grows here by design of the run, not of the"
        " daemon: the camera simulator signs app tokens with the real clock, so every token"
        " accepted during the run must be valid until the accelerated clock's end, and the"
        " replay set keeps each (sub, nonce) until its token's `exp`; its expiry and cap are"
        " tested in `tests/gateway/identity/test_tokens.py`.  `consent.withdrawn` holds the"
        " tombstones of the bulk cards currently withdrawn (a few groups of"
        f" {p.rotating_cards} while withdrawals and re-grants overlap).",
        "",
        "## Checks",
        "",
    ]
    out += [f"- {line}" for line in v.lines()]
    out += ["", "![soak](soak.png)", ""]
    return "\n".join(out)


def write_outputs(
    run: SoakRun, v: Verdict, out: Path, machine: dict[str, str], *, committed: bool = False
) -> None:
    """samples.csv, soak.png and REPORT.md (committed: only the plot and the report)."""
    out.mkdir(parents=True, exist_ok=True)
    plot(run, out / "soak.png")
    (out / "REPORT.md").write_text(report_md(run, v, machine), encoding="utf-8")
    if not committed:
        write_csv(run.samples, out / "samples.csv")
        (out / "verdict.json").write_text(
            json.dumps({"ok": v.ok, "checks": v.checks, "figures": v.figures, "maps": v.maps,
                        "counters": run.counters},
                       indent=2, default=str),
            encoding="utf-8",
        )  # fmt: skip
