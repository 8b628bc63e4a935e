"""Config: one TOML file validated into frozen models that forbid unknown keys.

Every problem is reported as (file, key path, why) in one ConfigError, so
``touchpoint-gateway check-config`` can list them all at once.  Relative paths in the file
are resolved against the file's folder.  The models are in ``gateway.config.sections`` and
``gateway.config.sources``; ``${CREDENTIALS_DIRECTORY}`` in ``gateway.config.credentials``.
"""

from __future__ import annotations

import base64
import json
import os
import ssl
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, ValidationError, model_validator

from gateway.config.credentials import CREDENTIALS_VAR, expand_credentials_in, secret_file_problem
from gateway.config.sections import (
    BufferConfig,
    ConsentConfig,
    GatewayIdentity,
    HealthConfig,
    KeyringConfig,
    Model,
    MqttConfig,
    StatusConfig,
)
from gateway.config.sources import SourceConfig
from gateway.consent.registry import load_seed_file
from gateway.errors import ConfigError, GatewayError
from gateway.identity.pseudonyms import decode_key, weak_key_problem


class Config(Model):
    gateway: GatewayIdentity = Field(description="Which box this is")
    keyring: KeyringConfig = Field(description="The tenant keys pseudonyms are made with")
    buffer: BufferConfig = Field(default=BufferConfig(), description="The SQLite outbox")
    mqtt: MqttConfig = Field(default=MqttConfig(), description="The broker link to central")
    consent: ConsentConfig = Field(
        default=ConsentConfig(), description="Consent registry, policy and sync"
    )
    status: StatusConfig = Field(
        default=StatusConfig(), description="The log summary and the health message"
    )
    health: HealthConfig | None = Field(
        default=None, description="Loopback /healthz and /metrics; off when absent"
    )
    sources: list[SourceConfig] = Field(
        default_factory=list, description="The inputs: [[sources]] tables, each with a kind"
    )

    @model_validator(mode="after")
    def _unique_sources(self) -> Config:
        seen: set[str] = set()
        for src in self.sources:
            if src.name in seen:
                raise ValueError(f"source name {src.name!r} is used twice")
            seen.add(src.name)
        return self

    @model_validator(mode="after")
    def _stale_after_a_poll(self) -> Config:
        sync, health = self.consent.sync, self.health
        max_age = None if health is None else health.consent_max_age_s
        if sync is not None and max_age is not None and max_age <= sync.poll_interval_s:
            raise ValueError(
                f"health.consent_max_age_s ({max_age:g}) must exceed "
                f"consent.sync.poll_interval_s ({sync.poll_interval_s:g}): "
                "the registry would look stale between two good polls"
            )
        return self


def _source_kinds() -> set[str]:
    kinds: set[str] = set()
    for member in SourceConfig.__origin__.__args__:  # type: ignore[attr-defined]
        kinds.update(member.model_fields["kind"].annotation.__args__)
    return kinds


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _source_kinds() and out.endswith("]"):
            continue  # pydantic adds the discriminator tag; the user never wrote it
        else:
            out += f".{part}" if out else str(part)
    return out


def _resolve_paths(value: Any, base: Path) -> Any:
    if isinstance(value, Path):
        return value if value.is_absolute() else (base / value)
    if isinstance(value, BaseModel):
        updates = {k: _resolve_paths(getattr(value, k), base) for k in type(value).model_fields}
        return value.model_copy(update=updates)
    if isinstance(value, dict):
        return {k: _resolve_paths(v, base) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_paths(v, base) for v in value]
    return value


def parse_config(data: dict[str, Any], file: str, base: Path) -> Config:
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            why = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                why = "unknown key (check the spelling; see firmware-config/gateway.example.toml)"
            problems.append((file, _loc(tuple(err["loc"])), why))
        raise ConfigError(problems) from None
    resolved: Config = _resolve_paths(cfg, base)
    return resolved


def load_config(path: str | Path, *, credentials_directory: str | None = None) -> Config:
    """Read and validate a config file, or raise ConfigError naming file, key and why.

    ``${CREDENTIALS_DIRECTORY}/NAME`` values (gateway.config.credentials) expand to
    ``credentials_directory``, by default ``$CREDENTIALS_DIRECTORY`` as systemd sets it.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([(str(p), "", "file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([(str(p), "", f"cannot read: {exc}")]) from None
    try:
        data = tomllib.loads(text)
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError, huge ints, deep nesting
        why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ConfigError([(str(p), "", f"not valid TOML: {why}")]) from None
    if credentials_directory is None:
        credentials_directory = os.environ.get(CREDENTIALS_VAR)
    data, problems = expand_credentials_in(data, credentials_directory)
    if problems:
        raise ConfigError([(str(p), key, why) for key, why in problems])
    cfg = parse_config(data, str(p), p.resolve().parent)
    found = file_problems(cfg, str(p), credentials_directory=credentials_directory)
    if found:
        raise ConfigError(found)
    return cfg


def secret_files(cfg: Config) -> dict[str, Path]:
    """Every secret file the config names, by key path: keys, token, password, TLS key."""
    out = {f"keyring.keys.{kid}": path for kid, path in cfg.keyring.keys.items()}
    if cfg.mqtt.password_file is not None:
        out["mqtt.password_file"] = cfg.mqtt.password_file
    if cfg.mqtt.tls is not None and cfg.mqtt.tls.key_file is not None:
        out["mqtt.tls.key_file"] = cfg.mqtt.tls.key_file
    if cfg.consent.sync is not None:
        out["consent.sync.token_file"] = cfg.consent.sync.token_file
    return out


def file_problems(
    cfg: Config, file: str, *, credentials_directory: str | None = None
) -> list[tuple[str, str, str]]:
    """The checks of a valid config that look at files: (file, key path, why) each.

    Secret files open to the group or others are refused (``paths.secret_file_problem``).
    ``load_config`` runs this, so ``check-config``, start and reload all do.
    """
    problems = []
    for key, path in secret_files(cfg).items():
        why = secret_file_problem(path, credentials_directory)
        if why is not None:
            problems.append((file, key, why))
    return problems


def plaintext_links(cfg: Config) -> dict[str, str]:
    """The links a config lets cross the network in the clear (``allow_plaintext``):
    link name -> what to say.  The daemon warns of each at start and /healthz lists them."""
    out: dict[str, str] = {}
    if cfg.mqtt.plaintext:
        out["mqtt"] = f"MQTT to {cfg.mqtt.host}:{cfg.mqtt.port} without TLS"
    sync = cfg.consent.sync
    if sync is not None and sync.plaintext:
        out["consent_sync"] = f"consent sync to {urlsplit(sync.base_url).hostname} over http://"
    return out


def load_checked_config(path: str | Path, *, credentials_directory: str | None = None) -> Config:
    """The one validation ``check-config``, the start and a reload (SIGHUP) all run:
    ``load_config`` and then ``runtime_problems``; every problem in one ConfigError."""
    cfg = load_config(path, credentials_directory=credentials_directory)
    problems = runtime_problems(cfg, str(path))
    if problems:
        raise ConfigError(problems)
    return cfg


def runtime_problems(cfg: Config, file: str) -> list[tuple[str, str, str]]:
    """What the daemon would only find out when it uses the config: files that cannot be
    read, keys that do not load, certificates that do not match.  Add a check here and
    check-config, start and reload all make it."""
    problems: list[tuple[str, str, str]] = []

    def readable(path: Path | None, key: str) -> str | None:
        if path is None:
            return None
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append((file, key, f"cannot read {path}: {exc.__class__.__name__}"))
            return None

    for key_id, key_path in cfg.keyring.keys.items():
        text = readable(key_path, f"keyring.keys.{key_id}")
        if text is not None:
            try:
                weak = weak_key_problem(decode_key(text, str(key_path)))
            except GatewayError as exc:
                problems.append((file, f"keyring.keys.{key_id}", str(exc)))
            else:
                if weak is not None:  # all-zero, patterned, or the contract's published key
                    problems.append((file, f"keyring.keys.{key_id}", f"{key_path}: {weak}"))
    readable(cfg.mqtt.password_file, "mqtt.password_file")
    tls = cfg.mqtt.tls
    if tls is not None:
        for name in ("ca_file", "cert_file", "key_file"):
            readable(getattr(tls, name), f"mqtt.tls.{name}")
        try:
            ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
            if tls.cert_file is not None and tls.key_file is not None:
                ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        except (OSError, ssl.SSLError) as exc:
            problems.append((file, "mqtt.tls", f"the certificates do not load: {exc}"))
    sync = cfg.consent.sync
    if sync is not None and sync.ca_file is not None:
        try:
            ssl.create_default_context(cafile=str(sync.ca_file))
        except (OSError, ssl.SSLError) as exc:
            problems.append((file, "consent.sync.ca_file", f"cannot load the CA: {exc}"))
    if cfg.consent.seed_file is not None:
        try:
            load_seed_file(cfg.consent.seed_file)
        except ConfigError as exc:
            problems += [(file, key, f"{where}: {why}") for where, key, why in exc.problems]
    for i, src in enumerate(cfg.sources):
        key_file = getattr(src, "app_public_key_file", None)
        text = readable(key_file, f"sources[{i}].app_public_key_file")
        if text is not None:
            try:
                raw = base64.b64decode("".join(text.split()), validate=True)
            except ValueError:
                raw = b""
            if len(raw) != 32:
                problems.append(
                    (file, f"sources[{i}].app_public_key_file", "not base64 of 32 bytes")
                )
    return problems


def json_schema() -> str:
    """The config's JSON Schema, as shipped in firmware-config/gateway.schema.json."""
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "Touchpoint Gateway config"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
