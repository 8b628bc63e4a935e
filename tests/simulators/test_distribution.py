"""touchpoint-simulators' own pyproject ships every simulator package and the contract."""

from __future__ import annotations

import tomllib
from pathlib import Path

from simulators.central.contract_schemas import SCHEMA_DIR

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "simulators" / "pyproject.toml").read_text(encoding="utf-8"))


def test_every_package_under_simulators_is_in_the_distribution() -> None:
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for init in (ROOT / "simulators").rglob("__init__.py")
        if "build" not in init.relative_to(ROOT).parts
    }
    assert set(PYPROJECT["tool"]["setuptools"]["packages"]) == found


def test_the_fake_central_reads_the_contracts_own_schemas() -> None:
    """central/schemas is a link to gateway/contract/schemas, never a copy that drifts."""
    assert (ROOT / "simulators/central/schemas").is_symlink()
    assert SCHEMA_DIR.resolve() == (ROOT / "gateway/contract/schemas").resolve()
    assert sorted(p.name for p in SCHEMA_DIR.glob("*.json")) == sorted(
        p.name for p in (ROOT / "gateway/contract/schemas").glob("*.json")
    )
    assert "schemas/*.json" in PYPROJECT["tool"]["setuptools"]["package-data"]["simulators.central"]


def test_the_plugin_is_registered_under_its_module_name() -> None:
    """So tests/conftest.py's ``pytest_plugins`` finds it loaded: one definition."""
    entry = PYPROJECT["project"]["entry-points"]["pytest11"]
    assert entry == {"simulators.pytest_plugin": "simulators.pytest_plugin"}
