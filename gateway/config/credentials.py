"""Credential references in the config: ``${CREDENTIALS_DIRECTORY}/NAME``.

Under systemd the tenant keys and the broker password arrive through ``LoadCredential=``:
systemd copies each file into a private, read-only directory and passes its path in
``$CREDENTIALS_DIRECTORY``.  A config names such a file as::

    [keyring.keys]
    k1 = "${CREDENTIALS_DIRECTORY}/k1.key"

where ``k1.key`` is the credential's ID (the part before the colon in
``LoadCredential=k1.key:/etc/touchpoint-gateway/credstore/k1.key``).  The variable must
open the value and be followed by exactly one file name; no other ``${...}`` variable is
expanded, and an unknown one is an error rather than a literal path, so a typo cannot
turn into a confusing "file not found".

To check a config by hand outside the service, point the variable at the credstore the
unit loads from (the IDs are the file names there)::

    sudo CREDENTIALS_DIRECTORY=/etc/touchpoint-gateway/credstore \\
        touchpoint-gateway check-config /etc/touchpoint-gateway/gateway.toml

Pure functions: the caller passes the directory (read from the environment when the
config is loaded, never at import time).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CREDENTIALS_VAR = "CREDENTIALS_DIRECTORY"
_REFERENCE = "${" + CREDENTIALS_VAR + "}"
_ANY_VAR = re.compile(r"\$\{([^}]*)\}")
# systemd's rule for credential IDs: a valid file name (no '/', not '.' or '..').
_CREDENTIAL_NAME = re.compile(r"^(?!\.{1,2}$)[A-Za-z0-9_.@:+-]{1,255}$")


class CredentialPathError(ValueError):
    """A value misuses ``${...}``; the message says what to write instead."""


def credential_name(value: str) -> str | None:
    """The credential ID a value refers to, or None when it names no credential."""
    if not value.startswith(_REFERENCE + "/"):
        return None
    return value[len(_REFERENCE) + 1 :]


def expand_credentials(value: str, credentials_directory: str | None) -> str:
    """Expand ``${CREDENTIALS_DIRECTORY}/NAME`` in one config value.

    Values without ``${`` come back unchanged.  Raises CredentialPathError when the
    reference is malformed, names another variable, or the directory is not set.
    """
    if "${" not in value:
        return value
    for match in _ANY_VAR.finditer(value):
        if match.group(1) != CREDENTIALS_VAR:
            raise CredentialPathError(
                f"unknown variable ${{{match.group(1)}}}: only {_REFERENCE} is expanded"
            )
    name = credential_name(value)
    if name is None or not _CREDENTIAL_NAME.fullmatch(name):
        raise CredentialPathError(
            f"write credentials as {_REFERENCE}/NAME, NAME being the LoadCredential= ID "
            "(one file name, no '/')"
        )
    if not credentials_directory:
        raise CredentialPathError(
            f"{_REFERENCE} is not set: the service gets it from LoadCredential=; to check "
            f"by hand, run with {CREDENTIALS_VAR}=/etc/touchpoint-gateway/credstore"
        )
    if not credentials_directory.startswith("/"):
        raise CredentialPathError(
            f"{CREDENTIALS_VAR}={credentials_directory!r} is not an absolute path"
        )
    return credentials_directory.rstrip("/") + "/" + name


def expand_credentials_in(
    data: Any, credentials_directory: str | None, *, at: str = ""
) -> tuple[Any, list[tuple[str, str]]]:
    """Expand every string in parsed TOML data.

    Returns the new data (the input is not modified) and a list of (key path, why) for
    each bad value, in the key-path form ConfigError uses (``keyring.keys.k1``,
    ``sources[0].device``), so the caller can report them all at once.
    """
    problems: list[tuple[str, str]] = []

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, str):
            try:
                return expand_credentials(value, credentials_directory)
            except CredentialPathError as exc:
                problems.append((path, str(exc)))
                return value
        if isinstance(value, Mapping):
            return {k: walk(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    return walk(data, at), problems


def credential_references(data: Any) -> dict[str, str]:
    """Every ``${CREDENTIALS_DIRECTORY}/NAME`` in parsed TOML data: key path -> NAME."""
    found: dict[str, str] = {}

    def walk(value: Any, path: str) -> None:
        if isinstance(value, str):
            name = credential_name(value)
            if name is not None:
                found[path] = name
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, f"{path}.{k}" if path else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{path}[{i}]")

    walk(data, "")
    return found


# ------------------------------------------------------------------------ secret files

SECRET_MODE_MASK = 0o077  # as ssh: a secret file gives the group and others nothing


def secret_file_problem(path: Path, credentials_directory: str | None = None) -> str | None:
    """Why a secret file (key, token, password, TLS key) is not safe to use, or None.

    A file the group or others may read or write is refused, naming the fix.  A file
    that cannot be stat'ed is not judged here: whoever reads it reports that.  Nor is a
    file in systemd's credentials directory: systemd grants the service user read
    access there with an ACL, which shows as group bits (0440), and the directory is
    private to the service.
    """
    if credentials_directory and Path(path).is_relative_to(credentials_directory):
        return None
    try:
        mode = stat.S_IMODE(Path(path).stat().st_mode)
    except OSError:
        return None
    if mode & SECRET_MODE_MASK:
        return (
            f"{path} is open to its group or others (mode {mode:04o}); a secret must be "
            f"the owner's only: run  chmod 600 {path}  (under systemd, prefer "
            "LoadCredential=, see systemd/README.md)"
        )
    return None


def write_secret(path: Path, text: str) -> None:
    """Write a secret file readable by its owner only (0600), whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


def private_database(path: Path) -> None:
    """Make a SQLite database file the owner's only (0600), whatever the umask.

    Creates ``path`` (an empty file is an empty database) or narrows an existing one,
    and its ``-wal``, ``-shm`` and ``-journal`` files if present: SQLite creates those
    with the database file's mode, so they follow it from then on.  Raises OSError.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm", "-journal"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.chmod(0o600)
