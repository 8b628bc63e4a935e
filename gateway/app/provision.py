"""``touchpoint-gateway provision``: one store's config from the chain's template.

    store-template.toml  +  a store file (TOML) or a row of stores.csv  ─►  gateway.toml
    --key NAME=FILE ...                                                 ─►  credstore/NAME (0400)

Merge rules:

- tables merge key by key, the store's value winning;
- arrays of tables whose items carry ``name`` (``[[sources]]``) merge item by item by
  name; a store item ``{name = "x", omit = true}`` removes the template's ``x``;
- any other value (arrays included) is replaced by the store's;
- a template string ``"<per-store>"`` must be given a value by every store.

A CSV row names keys by dotted path (``gateway.store``, ``mqtt.username``,
``sources.till-2-printer.printer_host``); every column must be a key of the template,
the value takes the template value's type, and an empty cell keeps the template value.

Secrets are never in the config: it names them ``${CREDENTIALS_DIRECTORY}/NAME`` (see
``gateway.config.credentials``) and provisioning copies each ``--key NAME=FILE`` to
``credstore/NAME``
with mode 0400, for the unit's ``LoadCredential=NAME:/etc/touchpoint-gateway/credstore/NAME``.

Nothing is written unless the merged config validates (``gateway.config.loading.parse_config``),
every credential it names is given or already in the credstore, and every keyring key
decodes; otherwise one ConfigError lists every problem.  Files are written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import math
import os
import re
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.config.credentials import credential_references, expand_credentials_in
from gateway.errors import ConfigError, KeyringError
from gateway.identity.pseudonyms import decode_key

PER_STORE = "<per-store>"
CONFIG_NAME = "gateway.toml"
CREDSTORE = "credstore"

Problem = tuple[str, str, str]


# -- reading the inputs ---------------------------------------------------------------


def _load_toml(path: Path, problems: list[Problem]) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        problems.append((str(path), "", "file not found"))
    except (OSError, UnicodeDecodeError) as exc:
        problems.append((str(path), "", f"cannot read: {exc}"))
    except tomllib.TOMLDecodeError as exc:
        problems.append((str(path), "", f"not valid TOML: {exc}"))
    return {}


def read_store_rows(csv_path: Path) -> list[dict[str, str]]:
    """Every row of a stores CSV, as column -> cell."""
    with csv_path.open(encoding="utf-8", newline="") as f:
        return [dict(row) for row in csv.DictReader(f)]


def read_store_row(csv_path: Path, store: str, device: str | None = None) -> dict[str, str]:
    """The row of ``store`` (and ``device`` when a store has several gateways)."""
    try:
        rows = read_store_rows(csv_path)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError([(str(csv_path), "", f"cannot read: {exc}")]) from None
    hits = [
        r
        for r in rows
        if r.get("gateway.store") == store and (device is None or r.get("gateway.device") == device)
    ]
    if len(hits) != 1:
        what = store if device is None else f"{store}/{device}"
        why = "no row" if not hits else f"{len(hits)} rows (give --device)"
        raise ConfigError([(str(csv_path), "gateway.store", f"{why} for {what}")])
    return hits[0]


def _named_items(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(v, dict) and isinstance(v.get("name"), str) for v in value)
    )


def _coerce(cell: str, like: Any) -> Any:
    if isinstance(like, bool):
        low = cell.strip().lower()
        if low in ("true", "yes", "1"):
            return True
        if low in ("false", "no", "0"):
            return False
        raise ValueError(f"{cell!r} is not true or false")
    if isinstance(like, int):
        return int(cell)
    if isinstance(like, float):
        return float(cell)
    if isinstance(like, str):
        return cell
    raise ValueError("only strings, numbers and true/false can come from a CSV cell")


def row_overrides(
    row: Mapping[str, str], template: Mapping[str, Any], label: str
) -> tuple[dict[str, Any], list[Problem]]:
    """Turn a CSV row into a store table shaped like a store file."""
    out: dict[str, Any] = {}
    problems: list[Problem] = []
    for column, cell in row.items():
        if column is None or cell is None or cell == "":
            continue
        parts = column.split(".")
        node: Any = template
        dest: dict[str, Any] = out
        i = 0
        try:
            while i < len(parts):
                part = parts[i]
                if not isinstance(node, dict) or part not in node:
                    raise KeyError(part)
                child = node[part]
                if i == len(parts) - 1:
                    dest[part] = _coerce(cell, child)
                    break
                if _named_items(child):  # sources.<name>.<key>
                    items = {item["name"]: item for item in child}
                    if i + 2 >= len(parts) or parts[i + 1] not in items:
                        raise KeyError(part)
                    entries: list[dict[str, Any]] = dest.setdefault(part, [])
                    entry = next((e for e in entries if e["name"] == parts[i + 1]), None)
                    if entry is None:
                        entry = {"name": parts[i + 1]}
                        entries.append(entry)
                    node, dest = items[parts[i + 1]], entry
                    i += 2
                    continue
                node, dest = child, dest.setdefault(part, {})
                i += 1
        except KeyError:
            problems.append((label, column, "not a key of the template"))
        except ValueError as exc:
            problems.append((label, column, str(exc)))
    return out, problems


# -- merging --------------------------------------------------------------------------


def merge(template: Any, store: Any) -> Any:
    """Deep-merge ``store`` over ``template`` (rules in the module docstring)."""
    if isinstance(template, dict) and isinstance(store, dict):
        out = dict(copy.deepcopy(template))
        for k, v in store.items():
            out[k] = merge(template[k], v) if k in template else copy.deepcopy(v)
        return out
    if _named_items(template) and isinstance(store, list) and _named_items(store):
        merged = {item["name"]: copy.deepcopy(item) for item in template}
        for item in store:
            name = item["name"]
            if item.get("omit") is True:
                merged.pop(name, None)
            elif name in merged:
                merged[name] = merge(merged[name], item)
            else:
                merged[name] = copy.deepcopy(item)
        return list(merged.values())
    return copy.deepcopy(store)


def _placeholders(data: Any, path: str = "") -> list[str]:
    if data == PER_STORE:
        return [path]
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in _placeholders(v, f"{path}.{k}" if path else k)]
    if isinstance(data, list):
        return [p for i, v in enumerate(data) for p in _placeholders(v, f"{path}[{i}]")]
    return []


# -- writing TOML (the stdlib only reads it) ---------------------------------------------

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k, ensure_ascii=False)


def _number(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return repr(v)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return _number(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def dumps_toml(data: Mapping[str, Any]) -> str:
    """TOML text for plain data (tables, arrays of tables, scalars, arrays)."""
    lines: list[str] = []

    def is_table_array(v: Any) -> bool:
        return isinstance(v, list) and bool(v) and all(isinstance(x, dict) for x in v)

    def table(t: Mapping[str, Any], path: list[str]) -> None:
        for k, v in t.items():
            if not isinstance(v, dict) and not is_table_array(v):
                lines.append(f"{_key(k)} = {_value(v)}")
        for k, v in t.items():
            dotted = ".".join(_key(p) for p in [*path, k])
            if isinstance(v, dict):
                lines.extend(["", f"[{dotted}]"])
                table(v, [*path, k])
            elif is_table_array(v):
                for item in v:
                    lines.extend(["", f"[[{dotted}]]"])
                    table(item, [*path, k])

    table(data, [])
    return "\n".join(lines).lstrip("\n") + "\n"


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# -- provisioning ---------------------------------------------------------------------


def provision(
    template: Path,
    store: Path | Mapping[str, str],
    out_dir: Path,
    keys: Mapping[str, Path] | None = None,
    *,
    dry_run: bool = False,
    offline: bool = False,
    dropin_dir: Path | None = None,
) -> Path:
    """Write ``out_dir/gateway.toml``, ``out_dir/credstore/NAME`` (0400) for one store and,
    with ``dropin_dir``, the unit's drop-in loading every credential the config names.

    ``store`` is a store TOML file or a CSV row (column -> cell).  ``keys`` maps a
    credential name to the file holding it.  ``offline`` (implies ``dry_run``): validate
    without the secrets, which are neither needed nor looked for.  Raises ConfigError
    listing every problem, having written nothing.  Returns the config's path.
    """
    dry_run = dry_run or offline
    # pydantic loads here, not when the CLI builds its parser (``--help`` stays fast)
    from gateway.config.loading import parse_config  # noqa: PLC0415

    keys = dict(keys or {})
    problems: list[Problem] = []
    tmpl = _load_toml(template, problems)
    if isinstance(store, Path):
        label = str(store)
        overrides = _load_toml(store, problems)
    else:
        label = f"CSV row {store.get('gateway.store', '?')}/{store.get('gateway.device', '?')}"
        overrides, row_problems = row_overrides(store, tmpl, label)
        problems += row_problems
    if problems and not (tmpl and overrides):
        raise ConfigError(problems)  # nothing to merge

    merged = merge(tmpl, overrides)
    out_path = out_dir / CONFIG_NAME
    credstore = out_dir / CREDSTORE
    where = f"{label} + {template.name}"
    missing = _placeholders(merged)
    for path in missing:
        problems.append((where, path, f"the template requires a per-store value ({PER_STORE})"))

    expanded, cred_problems = expand_credentials_in(merged, str(credstore.absolute()))
    problems += [(where, path, why) for path, why in cred_problems]
    try:
        parse_config(expanded, where, out_dir.absolute())
    except ConfigError as exc:
        problems += [p for p in exc.problems if p[1] not in missing]  # said once is enough

    refs = credential_references(merged)
    keyring_refs = {name for path, name in refs.items() if path.startswith("keyring.keys.")}
    payloads: dict[str, bytes] = {}
    for name in sorted(set(refs.values())):
        if offline:
            continue
        source = keys.get(name)
        if source is None:
            if not (credstore / name).is_file():
                why = f"credential not given (--key {name}=FILE) and not in {credstore}"
                problems.append((where, name, why))
            continue
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            problems.append((str(source), "", f"cannot read key file: {exc.strerror}"))
            continue
        if not data.strip():
            problems.append((str(source), "", "key file is empty"))
        elif name in keyring_refs:
            try:
                decode_key(data.decode("ascii", "replace"), str(source))
            except KeyringError as exc:
                problems.append((str(source), "", str(exc)))
        payloads[name] = data
    for name in sorted(set(keys) - set(refs.values())):
        problems.append((where, name, "--key given but the config never names this credential"))
    if problems:
        raise ConfigError(problems)
    if dry_run:
        return out_path

    out_dir.mkdir(parents=True, exist_ok=True)
    if payloads:
        credstore.mkdir(mode=0o700, exist_ok=True)
    for name, data in payloads.items():
        _write_atomic(credstore / name, data, 0o400)
    header = (
        f"# Provisioned by touchpoint-gateway provision from {template.name} and {label}.\n"
        "# Edit the template or the store's values and provision again.\n"
    )
    _write_atomic(out_path, (header + dumps_toml(merged)).encode(), 0o644)
    extra = sorted(set(refs.values()) - UNIT_CREDENTIALS)
    if dropin_dir is not None:
        dropin_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(dropin_dir / DROPIN_NAME, credentials_dropin(extra).encode(), 0o644)
    return out_path


# The credentials the unit file itself loads (systemd/touchpoint-gateway.service; a test
# keeps the two in step); any other credential the config names goes in a drop-in.
UNIT_CREDENTIALS = frozenset({"k1.key", "mqtt.password"})
DROPIN_DIR = Path("/etc/systemd/system/touchpoint-gateway.service.d")
DROPIN_NAME = "credentials.conf"


def credentials_dropin(names: list[str]) -> str:
    """The unit drop-in that loads ``names`` from the credstore."""
    lines = [
        "# Written by touchpoint-gateway provision: every credential the config names that",
        "# the unit does not load itself.  Provision again rather than editing this file.",
        "[Service]",
    ]
    lines += [f"LoadCredential={n}:/etc/touchpoint-gateway/{CREDSTORE}/{n}" for n in names]
    return "\n".join(lines) + "\n"


def check_rows(template: Path, csv_path: Path) -> list[tuple[str, list[Problem]]]:
    """Every row of a chain's stores CSV provisioned against ``template`` offline (no
    secrets needed): (row label, its problems) for each row, in file order."""
    rows = read_store_rows(csv_path)
    out: list[tuple[str, list[Problem]]] = []
    with tempfile.TemporaryDirectory(prefix="tp-check-") as tmp:
        for number, row in enumerate(rows, start=2):  # line 1 is the header
            label = (
                f"{csv_path}:{number} "
                f"{row.get('gateway.store') or '?'}/{row.get('gateway.device') or '-'}"
            )
            try:
                provision(template, row, Path(tmp), offline=True)
            except ConfigError as exc:
                out.append((label, list(exc.problems)))
            else:
                out.append((label, []))
    return out


# -- command line -----------------------------------------------------------------------


def _key_arg(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError("use NAME=FILE, e.g. k1.key=/media/usb/k1.key")
    return name, Path(path)


def cmd_provision(args: argparse.Namespace) -> int:
    store: Path | dict[str, str]
    if args.store_file is not None:
        store = args.store_file
    elif args.store is None:
        raise ConfigError([(str(args.csv), "gateway.store", "give --store with --csv")])
    else:
        store = read_store_row(args.csv, args.store, args.device)
    keys = dict(args.key or [])
    path = provision(
        args.template, store, args.out, keys, dry_run=args.dry_run, dropin_dir=args.dropin_dir
    )
    if args.dry_run:
        print(f"{path}: ok (dry run, nothing written)")
        return 0
    print(f"wrote {path}")
    for name in sorted(keys):
        print(f"wrote {args.out / CREDSTORE / name} (0400)")
    if args.dropin_dir is not None:
        print(f"wrote {args.dropin_dir / DROPIN_NAME} (LoadCredential= for each credential)")
        print("then: systemctl daemon-reload && systemctl restart touchpoint-gateway")
    else:
        print("no unit drop-in written (--dropin-dir): then systemctl restart touchpoint-gateway")
    return 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``provision`` to the CLI's subparsers (``gateway.app.cli.build_parser``)."""
    s: argparse.ArgumentParser = subparsers.add_parser(
        "provision",
        help="write a store's config from the chain template",
        description="Merge the chain-wide template with one store's values (a store TOML "
        "file, or a row of a stores CSV), validate the result, and write gateway.toml "
        "plus each credential as credstore/NAME with mode 0400. Nothing is written when "
        "anything is wrong; every problem is listed.",
    )
    s.add_argument("--template", required=True, type=Path, help="chain-wide template (TOML)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--store-file", type=Path, help="the store's values (TOML)")
    src.add_argument("--csv", type=Path, help="stores CSV: one row per gateway, dotted keys")
    s.add_argument("--store", help="with --csv: the row's gateway.store")
    s.add_argument("--device", help="with --csv: the row's gateway.device, if not unique")
    s.add_argument(
        "--key",
        action="append",
        type=_key_arg,
        metavar="NAME=FILE",
        help="a credential the config names as ${CREDENTIALS_DIRECTORY}/NAME (repeatable)",
    )
    s.add_argument(
        "--out",
        type=Path,
        default=Path("/etc/touchpoint-gateway"),
        help="where to write gateway.toml and credstore/ (default /etc/touchpoint-gateway)",
    )
    s.add_argument(
        "--dropin-dir",
        type=lambda text: Path(text) if text else None,
        default=DROPIN_DIR,
        help=f"where the unit's credentials drop-in goes (default {DROPIN_DIR}); '' for none",
    )
    s.add_argument("--dry-run", action="store_true", help="validate only; write nothing")
    s.set_defaults(fn=cmd_provision)
    return s
