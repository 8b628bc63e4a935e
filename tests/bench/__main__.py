"""``make bench`` (``python -m tests.bench``): run the benchmarks and write the one report.

The benchmarks live beside the tests, not in the daemon's package: they start simulators,
brokers and reference clients that a store box never carries.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from gateway.observe.logs import setup_logging
from tests.bench.registry import BENCHMARKS, run_bench
from tests.bench.report import ReadmeBlockError, replace_block, run_report


def build_parser() -> argparse.ArgumentParser:
    s = argparse.ArgumentParser(
        prog="python -m tests.bench",
        description="Run the benchmarks and print their figures beside same-run references. "
        "With no benchmark named (or 'all'), run every one in turn, each as its own process, "
        "and write one report to --out: report.md, report.json and PNG plots, with the "
        "machine, the load, the versions, and each figure beside its reference and goal. "
        "Progress goes to stderr; a benchmark that fails is reported as failed and the "
        "others still run (exit status 1).",
    )
    s.add_argument(
        "which",
        nargs="?",
        default="all",
        choices=["all", *BENCHMARKS],
        help="all: every benchmark, one report (default); "
        "pipeline: events end to end beside bare SQLite + paho; "
        "drain: a buffered backlog beside plain paho, start-up to READY, RSS; "
        "ble: adverts/s and CPU per advert beside bare bleak and TheengsGateway; "
        "qr: frames/s and success per QR decoder beside OpenCV's detector; "
        "memory: the daemon's RSS, fds and threads with every simulated source at load; "
        "wear: bytes reaching a loop device's ext4 per event at 0-1,000 events/s (root); "
        "journal: the daemon's journal lines per hour in a busy store and what journald "
        "writes to a loop device with its defaults and the recommended settings (root); "
        "footprint: the packages' installed sizes, and the packaged daemon's RSS and "
        "start-up to READY with every source but the camera",
    )
    s.add_argument(
        "--json",
        action="store_true",
        help="print the figures as one JSON object (with all: the whole report)",
    )
    s.add_argument("--quick", action="store_true", help="smaller run (for CI smoke tests)")
    s.add_argument(
        "--out",
        type=Path,
        default=Path("bench-report"),
        metavar="DIR",
        help="report directory, created if missing (default ./bench-report)",
    )
    s.add_argument(
        "--only",
        metavar="A,B",
        help="comma-separated benchmarks for the report (default: all of them)",
    )
    s.add_argument(
        "--readme",
        type=Path,
        metavar="FILE",
        help="also put the headline table between the <!-- bench:begin --> and "
        "<!-- bench:end --> markers in FILE (e.g. README.md)",
    )
    s.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="stop a benchmark that runs longer than S seconds "
        "and report it failed (default 1800, 900 with --quick)",
    )
    return s


def cmd_bench(args: argparse.Namespace) -> int:
    setup_logging("warning")
    if args.which != "all":
        if args.only or args.readme:
            raise SystemExit("bench: --only and --readme go with the full report (bench all)")

        def stop(signum: int, frame: object) -> None:
            raise SystemExit(128 + signum)  # unwinds: simulators and brokers are stopped

        signal.signal(signal.SIGTERM, stop)  # the report stops a benchmark that overruns
        return run_bench(args.which, as_json=args.json, quick=args.quick)
    only = tuple(x.strip() for x in args.only.split(",") if x.strip()) if args.only else BENCHMARKS
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        raise SystemExit(
            f"bench: unknown benchmark(s) in --only: {', '.join(unknown)} "
            f"(choose from {', '.join(BENCHMARKS)})"
        )
    if args.readme is not None:  # checked before the benchmarks spend minutes
        try:
            replace_block(args.readme.read_text(encoding="utf-8"), "")
        except OSError as exc:
            raise SystemExit(f"bench: --readme {args.readme}: {exc.strerror}") from exc
        except ReadmeBlockError as exc:
            raise SystemExit(f"bench: --readme {args.readme}: {exc}") from exc
    try:
        report = run_report(
            args.out, only=only, quick=args.quick, readme=args.readme, timeout_s=args.timeout
        )
    except ReadmeBlockError as exc:
        raise SystemExit(f"bench: --readme {args.readme}: {exc}") from exc
    if args.json:
        print(json.dumps(report, sort_keys=True))
    failed = [n for n, r in report["benchmarks"].items() if r["status"] != "ok"]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return cmd_bench(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
