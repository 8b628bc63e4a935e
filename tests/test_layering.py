"""The layering the folders promise, checked on every run (issue 15).

    drivers/ ──implement──► gateway/ports ◄──implement── simulators/
                                  │
              gateway/ (the daemon: no benchmark, demo, simulator or test code)

- importing the daemon's package loads none of simulators/, tests/, matplotlib,
  cryptography, bleak, cv2 or numpy (drivers are loaded lazily, per configured source);
- drivers/ never imports simulators/ or tests/;
- simulators outside the rig import no gateway/ or drivers/ code: they are independent
  implementations of the wire formats (the rig wires the real daemon to them);
- no import cycles between our modules, counting imports inside functions too;
- importing a package changes nothing in the environment.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("gateway", "drivers", "simulators", "tests")
FORBIDDEN_IN_DAEMON = (
    "simulators", "tests", "matplotlib", "cryptography", "bleak", "cv2", "numpy",
    "httpx",  # imported at the first consent poll, after READY (start -> READY counts)
)  # fmt: skip


def modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports when it runs, at its top or inside a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {  # ``if TYPE_CHECKING:`` blocks are read by type checkers, never run
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")
        for stmt in node.body
        for inner in ast.walk(stmt)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                is_pkg = path.name == "__init__.py"
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def our_graph() -> dict[str, set[str]]:
    everything = {}
    for package in PACKAGES:
        everything.update(modules(package))
    graph: dict[str, set[str]] = {}
    for name, path in everything.items():
        graph[name] = {i for i in imports_of(path, name) if i in everything and i != name}
    return graph


def test_importing_the_daemon_loads_no_simulator_test_bench_or_optional_library() -> None:
    names = sorted(modules("gateway"))
    code = (
        "import importlib, json, os, sys\n"
        "env = dict(os.environ)\n"
        f"for name in {names!r}:\n"
        "    if name != 'gateway.__main__':\n"
        "        importlib.import_module(name)\n"
        "print(json.dumps({'modules': sorted(sys.modules), 'env': dict(os.environ) == env}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    loaded = json.loads(out)
    bad = sorted(m for m in loaded["modules"] if m.split(".")[0] in FORBIDDEN_IN_DAEMON)
    assert not bad, f"importing gateway/ loaded {bad}"
    assert not [m for m in loaded["modules"] if m.split(".")[0] == "drivers"], (
        "gateway/ imports a driver at import time; the source registry loads them lazily"
    )
    assert loaded["env"], "importing gateway/ changed the environment"


def test_importing_the_drivers_changes_nothing_in_the_environment() -> None:
    names = [n for n in sorted(modules("drivers")) if not n.startswith("drivers.camera")]
    code = (
        "import importlib, os\n"
        "env = dict(os.environ)\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(dict(os.environ) == env)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "True"


@pytest.mark.parametrize(
    ("package", "may_not_import", "except_in"),
    [
        ("gateway", ("drivers", "simulators", "tests"), ()),
        ("drivers", ("simulators", "tests"), ()),
        ("simulators", ("gateway", "drivers", "tests"), ("simulators.rig",)),
    ],
)
def test_layers_import_only_what_they_may(
    package: str, may_not_import: tuple[str, ...], except_in: tuple[str, ...]
) -> None:
    graph = our_graph()
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in graph.items()
        if module.split(".")[0] == package and not module.startswith(except_in)
        for target in targets
        if target.split(".")[0] in may_not_import
    )
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles() -> None:
    graph = our_graph()
    # Importing a package's module imports the package first: that edge is not a cycle.
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_config_models_and_drivers_do_not_share_class_names() -> None:
    """A config model is ``...Config``; a driver's class is the thing itself: the two never
    need an ``as`` to be told apart."""

    def classes(package: str) -> set[str]:
        return {
            node.name
            for path in modules(package).values()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.ClassDef)
        }

    config = {
        node.name
        for path in (ROOT / "gateway" / "config").glob("*.py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.ClassDef)
    }
    assert not config & classes("drivers"), sorted(config & classes("drivers"))


# The buffer database's tables are owned by gateway/buffer/ (the outbox and its typed
# stores); elsewhere, code calls typed methods.  A file outside that runs SQL of its own
# must be on this list, with the reason (its own database, not the buffer's).
OWN_DATABASE = {
    "drivers/receipt_tap/counter.py": "the receipt counters' own database file (counter_db)",
    "drivers/receipt_tap/base.py": "catches the receipt counters' sqlite3.Error",
}
SQL_CALLS = frozenset({"execute", "executemany", "executescript"})
SUBMIT = frozenset({"_submit_write", "_submit_read"})


def sql_outside_the_buffer(path: Path) -> list[str]:
    """What in ``path`` reaches SQLite or the outbox's submission path directly."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] == "sqlite3"]
            found += [(node.lineno, f"imports {name}") for name in names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sqlite3"):
            found.append((node.lineno, f"imports from {node.module}"))
        elif isinstance(node, ast.Attribute) and node.attr in SUBMIT:
            found.append((node.lineno, f"calls {ast.unparse(node)}"))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            receiver = ast.unparse(node.func.value)
            if node.func.attr in SQL_CALLS:
                found.append((node.lineno, f"runs SQL: {receiver}.{node.func.attr}(...)"))
            elif node.func.attr in ("write", "read") and receiver.endswith("outbox"):
                found.append((node.lineno, f"calls {receiver}.{node.func.attr}(...)"))
    return [f"{path.relative_to(ROOT)}:{line}: {what}" for line, what in found]


def test_only_the_buffer_package_runs_sql_on_the_buffer() -> None:
    """Issue 15: the outbox owns its tables.  Outside gateway/buffer/ nothing imports
    sqlite3, runs SQL or submits to the outbox's writer; consent, the daemon and the
    rig call the typed stores (gateway/buffer/*_store.py)."""
    from gateway.buffer.outbox import Outbox

    wrong = []
    for package in ("gateway", "drivers", "simulators"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith("gateway/buffer/") or rel in OWN_DATABASE:
                continue
            wrong += sql_outside_the_buffer(path)
    assert not wrong, "\n".join(wrong)
    assert not hasattr(Outbox, "write") and not hasattr(Outbox, "read"), (
        "Outbox.write/read are private to gateway/buffer/ (_submit_write, _submit_read)"
    )
    for rel in OWN_DATABASE:  # the exceptions are still needed, or they go
        assert sql_outside_the_buffer(ROOT / rel), f"{rel} runs no SQL now: take it off the list"
