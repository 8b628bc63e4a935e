"""One exception tree: every error class of the gateway and its drivers descends from
GatewayError and is drawn in ``gateway.errors``' docstring (issue 15)."""

from __future__ import annotations

import importlib
import pkgutil

import drivers
import gateway
from gateway import errors


def error_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for package in (gateway, drivers):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if info.name.endswith("__main__"):
                continue
            module = importlib.import_module(info.name)
            for name, value in vars(module).items():
                if (
                    isinstance(value, type)
                    and issubclass(value, errors.GatewayError)
                    and value.__module__ == module.__name__
                ):
                    found[name] = value
    return found


def test_every_gateway_error_is_drawn_in_the_tree() -> None:
    classes = error_classes()
    assert {"GatewayError", "SyncError", "WriterDied", "DecoderUnavailable"} <= set(classes)
    doc = errors.__doc__ or ""
    missing = sorted(name for name in classes if f" {name} " not in doc.replace("─", " "))
    assert not missing, f"not drawn in gateway/errors.py's docstring: {missing}"
    # Each is drawn under its parent: the line of a class is indented below its base's.
    lines = doc.splitlines()
    for name, cls in classes.items():
        if cls is errors.GatewayError:
            continue
        parent = cls.__bases__[0].__name__
        row = next(i for i, line in enumerate(lines) if f" {name} " in line.replace("─", " "))
        above = [i for i, line in enumerate(lines[:row]) if f" {parent} " in line.replace("─", " ")]
        assert above, f"{name} is drawn above its base {parent}"
