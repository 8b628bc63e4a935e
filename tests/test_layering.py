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
