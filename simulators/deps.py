"""What to install when a simulator's dependency is missing.

The simulators are their own distribution (``simulators/pyproject.toml``): a checkout with
only the daemon installed, or ``touchpoint-simulators`` without its camera extra, lacks some
of their libraries.  Each simulator imports its libraries through ``missing`` so the error
names the package and the command that installs it::

    try:
        import fastjsonschema
    except ModuleNotFoundError as exc:
        raise missing(exc, "the fake central") from exc
"""

from __future__ import annotations

SIMULATORS = "pip install touchpoint-simulators (from a checkout: pip install ./simulators)"
CAMERA = (
    "pip install 'touchpoint-simulators[camera]' "
    "(from a checkout: pip install './simulators[camera]')"
)
GATEWAY = "pip install touchpoint-gateway (from a checkout: pip install .)"


class MissingDependency(ImportError):
    """A simulator's library is not installed; the message says what to install."""


def missing(exc: ModuleNotFoundError, what: str, install: str = SIMULATORS) -> MissingDependency:
    """The error to raise from ``exc`` (a failed import) for ``what`` (e.g. "the fake central")."""
    package = (exc.name or "?").split(".")[0]
    return MissingDependency(
        f"{what} needs the Python package '{package}', which is not installed: {install}",
        name=package,
    )
