"""``touchpoint-gateway``: the daemon and the tools around it.  Every command has --help."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway.errors import ConfigError, GatewayError, RejectedInput, UnknownMigrations

log = logging.getLogger("gateway")


# sysexits.h: the config cannot be used.  The unit does not restart on it
# (RestartPreventExitStatus=78): a restart would meet the same file.
EX_CONFIG = 78


def _setup_logging(level: str) -> None:
    from gateway.observe.logs import setup_logging

    setup_logging(level)


def _error_line(text: str) -> None:
    """One line to stderr at error priority when stderr is the journal."""
    from gateway.observe.logs import stderr_is_journal

    print(("<3>" if stderr_is_journal() else "") + text, file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from gateway.app.daemon import Gateway
    from gateway.app.notify import Notifier
    from gateway.config.loading import load_checked_config

    _setup_logging(args.log_level)
    # numpy only carries camera frames here; it never multiplies a matrix.  OpenBLAS would
    # start a thread pool at import (one thread per core, each with its buffers) that sat
    # idle for the life of the daemon.  Set before any source is built, not at an import.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from gateway.app.memory import forbid_core_dumps

    if forbid_core_dumps():  # before the keys are read: no core dump carries them
        logging.getLogger("gateway.app.daemon").info(
            "core dumps off: not dumpable, RLIMIT_CORE 0 (keys and raw ids stay in memory)"
        )

    async def serve() -> None:
        notifier = Notifier()
        cfg = load_checked_config(args.config)
        while True:  # SIGHUP with a valid config: a new instance on the same buffer
            gw = Gateway(cfg, notifier=notifier, config_path=args.config)
            await gw.run()
            if gw.reload_to is None:
                return
            cfg = gw.reload_to

    asyncio.run(serve())
    return 0


def _check_rows(template: Path, csv_path: Path) -> int:
    from gateway.app.provision import check_rows

    try:
        results = check_rows(template, csv_path)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"{csv_path}: cannot read: {exc}")
        return 1
    for label, problems in results:
        if not problems:
            print(f"{label}: ok")
        for file, key, why in problems:
            print(f"{label}: {key or '<top>'}: {why}" + (f" ({file})" if file != label else ""))
    return 1 if any(problems for _, problems in results) else 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.buffer.migrations import database_problem
    from gateway.config.loading import load_checked_config, load_config

    if (args.template is None) != (args.csv is None):
        raise SystemExit("check-config: --template and --csv go together")
    if args.template is not None and not args.offline:
        raise SystemExit("check-config: --template/--csv check a chain offline: add --offline")
    if not args.files and args.template is None:
        raise SystemExit("check-config: give config files, or --offline --template T --csv C")
    failed = args.template is not None and _check_rows(args.template, args.csv) != 0
    for path in args.files:
        try:
            cfg = (
                load_config(path)  # offline: the secrets are not on this machine
                if args.offline
                else load_checked_config(path)  # what start and reload run too
            )
        except ConfigError as exc:
            failed = True
            for file, key, why in exc.problems:
                print(f"{file}: {key or '<top>'}: {why}")
            continue
        if not args.offline and (trouble := database_problem(Path(cfg.buffer.path))):
            failed = True
            print(f"{path}: buffer.path: {trouble}")
            continue
        print(
            f"{path}: ok ({len(cfg.sources)} source(s), "
            f"store {cfg.gateway.store}, device {cfg.gateway.device})"
        )
    return 1 if failed else 0


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


# ``status`` exit codes, as systemctl's: 0 running and healthy, 1 running and unhealthy,
# 3 not running (no answer on the health address, or no buffer yet), 4 unknown (no
# ``[health]`` section to ask).
STATUS_OK, STATUS_UNHEALTHY, STATUS_NOT_RUNNING, STATUS_UNKNOWN = 0, 1, 3, 4


def cmd_status(args: argparse.Namespace) -> int:
    from gateway.buffer.outbox import buffer_stats, connect
    from gateway.config.loading import load_config
    from gateway.consent.erasure import WAL_WAIT_WHY

    cfg = load_config(args.config)
    path = Path(cfg.buffer.path)
    if not path.exists():
        print(f"no buffer database at {path} (the daemon has not run yet)", file=sys.stderr)
        return STATUS_NOT_RUNNING
    conn = connect(path, readonly=True)
    try:
        now = time.time()
        stats = buffer_stats(conn, now)
    finally:
        conn.close()
    doc, code, detail = _live(cfg)
    if args.json:
        problems = doc.get("problems", []) if doc else []
        stats["daemon"] = {
            "state": detail,
            "problems": problems,
            "exit_code": code,
            "health": doc,  # the whole live /healthz: every live row of the table, and more
        }
        print(json.dumps(stats, indent=2, sort_keys=True))
        return code
    last = stats["last_publish_at"]
    rows = [
        ("store / device", f"{cfg.gateway.store} / {cfg.gateway.device}"),
        ("stream", str(stats["stream"])),
        ("buffer depth", f"{stats['depth']} events"),
        ("oldest pending", _age(stats["oldest_age_s"])),
        ("last seq", str(stats["last_seq"])),
        ("last successful publish", "never" if last is None else f"{_age(now - last)} ago"),
        ("dead letters", str(stats["dead_letters"])),
        (
            "erased bytes in the WAL",
            "none"
            if stats["erased_in_wal_since"] is None
            else f"waiting {_age(now - stats['erased_in_wal_since'])}: {WAL_WAIT_WHY}",
        ),
        (
            "database size",
            f"{stats['db_bytes'] / 1e6:.1f} MB (cap {cfg.buffer.max_bytes / 1e6:.0f} MB)",
        ),
    ]
    rows += [("daemon", detail)] if doc is None else _live_rows(doc)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return code


def _live(cfg: Any) -> tuple[dict[str, Any] | None, int, str]:
    """Ask the running daemon's loopback /healthz: (its document, exit code, a word)."""
    import http.client

    if cfg.health is None:
        return None, STATUS_UNKNOWN, "no [health] section: live state not available"
    host, _, port = cfg.health.listen.rpartition(":")
    conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=2)
    try:
        conn.request("GET", "/healthz")
        doc = json.loads(conn.getresponse().read())
        if not isinstance(doc, dict) or "status" not in doc:
            raise ValueError("not a health document")
    except (OSError, ValueError, http.client.HTTPException):
        return None, STATUS_NOT_RUNNING, f"not answering on {cfg.health.listen} (stopped?)"
    finally:
        conn.close()
    healthy = doc["status"] == "ok"
    return doc, STATUS_OK if healthy else STATUS_UNHEALTHY, str(doc["status"])


def _live_rows(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """What the running daemon says on its /healthz, as rows."""
    rows = [("daemon", doc["status"] + "".join(f"; {p}" for p in doc.get("problems", [])))]
    broker = doc["broker"]
    rows.append(
        ("broker", "connected" if broker["connected"] else f"down {_age(broker['down_for_s'])}")
    )
    limits = broker.get("limits")
    if limits:
        rows.append(
            (
                "broker limits",
                f"max packet {limits['max_packet_bytes'] or 'none'} B, receive maximum "
                f"{limits['receive_maximum'] or 'none'}; window {limits['window']}, "
                f"batch {limits['batch_max_bytes']} B, {limits['batches_split']:.0f} split, "
                f"{limits['batches_too_large']:.0f} too large",
            )
        )
    for name, src in sorted(doc["sources"].items()):
        detail = f" ({src['detail']})" if src.get("detail") else ""
        rows.append(
            (
                f"source {name}",
                f"{src['state']}{detail}, {src['readings']:.0f} readings, "
                f"last {_age(src['last_reading_age_s'])} ago",
            )
        )
    consent = doc.get("consent", {})
    decisions = ", ".join(f"{k} {v:.0f}" for k, v in sorted(consent.get("decisions", {}).items()))
    rows.append(("consent decisions", decisions or "-"))
    rows.append(("consent synced", f"{_age(consent.get('sync_age_s'))} ago"))
    for component, error in doc.get("last_error", {}).items():
        rows.append((f"last error {component}", error))
    return rows


MAX_IDENTIFIER_CHARS = 256


def _read_identifier(namespace: str) -> str | None:
    """The raw identifier from a prompt (not echoed) on a terminal, else stdin's first
    line; None when there is none.  Never from argv: /proc shows argv to every user."""
    if sys.stdin.isatty():
        import getpass

        text = getpass.getpass(f"{namespace} identifier (not echoed): ")
    else:
        text = sys.stdin.readline(MAX_IDENTIFIER_CHARS + 1)
    text = text.strip()
    return text if text and len(text) <= MAX_IDENTIFIER_CHARS else None


def cmd_pseudonym(args: argparse.Namespace) -> int:
    from gateway.identity.pseudonyms import Keyring

    if args.value is not None:
        print(
            "pseudonym: give the identifier on stdin, not on the command line (every user "
            "sees a command line in /proc and ps); e.g.  touchpoint-gateway pseudonym "
            f"--key-file K --key-id {args.key_id} {args.namespace} < FILE, or type it at "
            "the prompt",
            file=sys.stderr,
        )
        return 2
    ring = Keyring.from_files({args.key_id: Path(args.key_file)}, args.key_id)
    raw = _read_identifier(args.namespace)
    if raw is None:
        print("pseudonym: no identifier on stdin", file=sys.stderr)
        return 2
    try:
        print(ring.pseudonym(args.namespace, raw))
    except RejectedInput as exc:
        print(f"not a valid {args.namespace} identifier: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_erase(args: argparse.Namespace) -> int:
    from gateway.buffer.erasure_store import erase_offline
    from gateway.config.loading import load_config
    from gateway.consent.erasure import WAL_WAIT_WHY
    from gateway.consent.registry import is_pseudonym

    bad = sum(not is_pseudonym(p) for p in args.pseudonyms)
    if bad:  # not echoed: it may be the raw number pasted by mistake
        print(
            f"{bad} argument(s) are not pseudonyms (<key id>:<22 base64url characters>); "
            "get one with `touchpoint-gateway pseudonym`",
            file=sys.stderr,
        )
        return 2
    cfg = load_config(args.config)
    path = Path(cfg.buffer.path)
    if not path.exists():
        print(f"no buffer database at {path}", file=sys.stderr)
        return 1
    out = erase_offline(path, args.pseudonyms)
    print(
        f"erased {len(args.pseudonyms)} subject(s): {out.events} buffered event(s), "
        f"{out.held} held, {out.consent} consent record(s); the erasure log keeps "
        "the pseudonym and the time"
    )
    if out.erased_in_wal:
        print(f"warning: {WAL_WAIT_WHY} (by the daemon, at its next start)", file=sys.stderr)
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    from gateway.config.loading import Config, json_schema
    from gateway.config.reference import reference

    text = json_schema()
    if args.reference:
        Path(args.reference).write_text(reference(Config.model_json_schema()), encoding="utf-8")
    if args.write:
        Path(args.write).write_text(text, encoding="utf-8")
    elif not args.reference:
        sys.stdout.write(text)
    return 0


def _command(
    sub: Any,
    name: str,
    fn: Callable[[argparse.Namespace], int],
    help: str,
    description: str,
    *,
    config: bool = False,
) -> argparse.ArgumentParser:
    """Add the subcommand ``name`` run by ``fn``; with ``config``, its --config option."""
    s: argparse.ArgumentParser = sub.add_parser(name, help=help, description=description)
    s.set_defaults(fn=fn)
    if config:
        s.add_argument("--config", required=True, type=Path, help="the gateway's TOML config file")
    return s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="touchpoint-gateway",
        description="In-store edge gateway: card, beacon and QR sightings to pseudonymised, "
        "consented events, buffered in SQLite and forwarded over MQTT.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = _command(
        sub,
        "run",
        cmd_run,
        help="run the daemon",
        description="Run the gateway daemon (systemd Type=notify).",
        config=True,
    )
    s.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default info)",
    )

    s = _command(
        sub,
        "check-config",
        cmd_check_config,
        help="validate config files",
        description="List every problem in the config files (file, key, why); "
        "exit 1 if any, else 0.",
    )
    s.add_argument("files", nargs="*", type=Path, help="config files to check")
    s.add_argument(
        "--offline",
        action="store_true",
        help="without the secrets: key files are not read (for IT's machine)",
    )
    s.add_argument("--template", type=Path, help="with --offline and --csv: the chain template")
    s.add_argument("--csv", type=Path, help="with --template: check every row of a stores CSV")

    s = _command(
        sub,
        "status",
        cmd_status,
        help="show the buffer's state",
        description="Show buffer depth, oldest pending age, last successful publish and "
        "dead letters, read from the buffer database, and the running daemon's health "
        "(with a [health] section).  Exit status as systemctl's: 0 running and healthy, "
        "1 unhealthy, 3 not running, 4 unknown (no [health] section to ask).",
        config=True,
    )
    s.add_argument("--json", action="store_true", help="print one JSON object")

    s = _command(
        sub,
        "pseudonym",
        cmd_pseudonym,
        help="print the pseudonym of an identifier",
        description="Print the pseudonym of a raw identifier (for erasure requests). "
        "The identifier is read from stdin (a prompt that does not echo on a terminal), "
        "never from the command line, which every user can see in /proc; it is not logged.",
    )
    s.add_argument("--key-file", required=True, help="tenant key file (base64 of >= 32 bytes)")
    s.add_argument("--key-id", required=True, help="the key's id, e.g. k1")
    s.add_argument(
        "namespace",
        choices=["loyalty", "rfid", "ibeacon", "eddystone", "altbeacon", "app"],
        help="identifier namespace",
    )
    s.add_argument("value", nargs="?", help=argparse.SUPPRESS)  # refused: see cmd_pseudonym

    s = _command(
        sub,
        "erase",
        cmd_erase,
        help="erase a subject's buffered events (daemon stopped)",
        description="Erase every buffered and held event and the consent record of the "
        "given pseudonyms from the buffer database, overwriting the bytes (secure_delete, "
        "WAL checkpoint). Stop the service first; while it runs, withdraw consent at the "
        "central service instead, which reaches the gateway within seconds. Find a "
        "customer's pseudonym with the pseudonym command.",
        config=True,
    )
    s.add_argument("pseudonyms", nargs="+", help="pseudonyms such as k1:y12r74-dyodquqc6XBqP4A")

    s = _command(
        sub,
        "config-schema",
        cmd_config_schema,
        help="print the config's JSON Schema",
        description="Print (or write) the JSON Schema of the config file.",
    )
    s.add_argument("--write", type=Path, help="write to this file instead of stdout")
    s.add_argument(
        "--reference", type=Path, help="also write the Markdown reference of every key here"
    )

    from gateway.app.provision import add_parser as add_provision_parser

    add_provision_parser(sub)
    from gateway.observe.fleet import add_parser as add_fleet_parser

    add_fleet_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc: int = args.fn(args)
    except ConfigError as exc:
        for file, key, why in exc.problems:
            _error_line(f"config error: {file}: {key or '<top>'}: {why}")
        return EX_CONFIG if args.fn is cmd_run else 1
    except UnknownMigrations as exc:  # a rollback onto a newer buffer: a restart won't help
        _error_line(f"error: {exc}")
        return EX_CONFIG if args.fn is cmd_run else 1
    except GatewayError as exc:
        _error_line(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `status --json | head`: the reader left; say nothing
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, as a shell reports it
    try:
        sys.stdout.flush()  # a pipe closed after the last write fails here
    except BrokenPipeError:
        _quiet_stdout()
    return rc


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot complain."""
    import os

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
