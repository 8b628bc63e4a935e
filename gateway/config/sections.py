"""The config's section models: ``[gateway]``, ``[keyring]``, ``[buffer]``, ``[mqtt]``,
``[consent]``, ``[status]`` and ``[health]``, frozen and refusing unknown keys.

The ``[[sources]]`` tables are in ``gateway.config.sources``; the whole file, its loading
and its error paths in ``gateway.config.loading``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,31}$"
KEY_ID_PATTERN = r"^[a-z0-9]{1,16}$"
PURPOSES = ("analytics", "linking", "marketing")
Purpose = Literal["analytics", "linking", "marketing"]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 and ``localhost`` (and ``*.localhost``, RFC 6761): traffic to
    them never leaves the box, so plaintext there is not the network's to read.  Any
    other name counts as the network, whatever it resolves to today."""
    name = host.strip().strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


ALLOW_PLAINTEXT_HELP = (
    "Accept a plaintext link to a host that is not loopback (warned at start, shown in "
    "/healthz); off: refused"
)


class GatewayIdentity(Model):
    store: Annotated[str, Field(pattern=ID_PATTERN, description="Store id, e.g. nl-ams-001")]
    device: Annotated[str, Field(pattern=ID_PATTERN, description="Device id, e.g. gw-01")]


class KeyringConfig(Model):
    active: Annotated[
        str, Field(pattern=KEY_ID_PATTERN, description="Key id used for new pseudonyms")
    ]
    keys: Annotated[
        dict[str, Path],
        Field(description="Key id -> file holding the base64 of >= 32 random bytes"),
    ]

    @model_validator(mode="after")
    def _active_is_loaded(self) -> KeyringConfig:
        if self.active not in self.keys:
            raise ValueError(
                f"active key {self.active!r} is not one of keys ({', '.join(self.keys)})"
            )
        return self


class BufferConfig(Model):
    path: Path = Field(
        default=Path("/var/lib/touchpoint-gateway/buffer.db"),
        description="SQLite outbox file (WAL mode)",
    )
    max_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1024 * 1024, description="Size cap of the database file"
    )
    max_age_s: int = Field(
        default=7 * 24 * 3600, ge=60, description="Events older than this are expired unsent"
    )
    when_full: Literal["evict_oldest", "drop_new"] = Field(
        default="evict_oldest", description="What to do when max_bytes is reached"
    )
    commit_interval_ms: float = Field(
        default=5.0, ge=0, le=1000, description="Group commit: wait at most this long"
    )
    commit_max_events: int = Field(
        default=2000, ge=1, description="Group commit: or until this many events"
    )
    durability_window_ms: float = Field(
        default=500.0,
        ge=0,
        le=10_000,
        description="Events reach the disk (fsync) at least this often; a power cut loses "
        "at most the undelivered events read in the last window, kill -9 none "
        "(0: fsync every group commit)",
    )
    disk_reserve_bytes: int = Field(
        default=2 * 1024 * 1024,
        ge=0,
        description="File of zeros beside the buffer, given back when the disk fills (0: none)",
    )


class TlsConfig(Model):
    ca_file: Path | None = Field(
        default=None, description="CA bundle (PEM) the broker's certificate must chain to"
    )
    cert_file: Path | None = Field(
        default=None, description="Client certificate (PEM), for brokers that ask for one"
    )
    key_file: Path | None = Field(
        default=None, description="The client certificate's private key (a secret: 0600)"
    )

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class MqttConfig(Model):
    host: str = Field(default="localhost", description="Broker host name or address")
    port: int = Field(default=1883, ge=1, le=65535, description="Broker port (8883 with TLS)")
    protocol: Literal["5", "3.1.1"] = Field(
        default="5", description="MQTT version; 5 gives PUBACK reason codes and broker limits"
    )
    client_id: str | None = Field(default=None, description="Default: tp-<store>-<device>")
    username: str | None = Field(
        default=None, description="MQTT user, one per gateway: <store>-<device>"
    )
    password_file: Path | None = Field(
        default=None, description="File holding the MQTT password (a secret: 0600)"
    )
    tls: TlsConfig | None = Field(default=None, description="TLS to the broker; off when absent")
    allow_plaintext: bool = Field(default=False, description=ALLOW_PLAINTEXT_HELP)
    keepalive_s: int = Field(
        default=30, ge=2, le=3600, description="MQTT keepalive; a dead link shows in ~1.5x"
    )
    connect_timeout_s: float = Field(default=10.0, gt=0, description="Time one connect may take")
    batch_max_events: int = Field(
        default=500, ge=1, le=10000, description="Events in one published batch at most"
    )
    batch_max_bytes: int = Field(
        default=256 * 1024,
        ge=1024,
        le=64 * 1024 * 1024,
        description="Bytes of one batch payload at most (also capped by the broker's maximum)",
    )
    inflight_window: int = Field(
        default=20,
        ge=1,
        le=1000,
        description="Batches awaiting a PUBACK at most (also capped by the broker's Receive "
        "Maximum)",
    )
    reconnect_min_s: float = Field(
        default=0.5, gt=0, description="First reconnect delay (exponential, full jitter)"
    )
    reconnect_max_s: float = Field(default=60.0, gt=0, description="Reconnect delay cap")
    puback_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="A batch unacknowledged this long on a live link: reconnect (it is sent again)",
    )

    @property
    def plaintext(self) -> bool:
        """The link crosses the network without TLS (``allow_plaintext`` let it)."""
        return self.tls is None and not is_loopback_host(self.host)

    @model_validator(mode="after")
    def _no_silent_plaintext(self) -> MqttConfig:
        if self.plaintext and not self.allow_plaintext:
            what = "the password and " if self.username or self.password_file else ""
            raise ValueError(
                f"no TLS to {self.host}, which is not loopback: {what}every event (personal "
                "data) would cross the network in the clear; add [mqtt.tls] (ca_file, "
                "cert_file, key_file), or set mqtt.allow_plaintext = true to accept that"
            )
        return self


def _default_required() -> dict[str, tuple[Purpose, ...]]:
    return {
        "presence.enter": ("analytics",),
        "presence.exit": ("analytics",),
        "card.read": ("linking",),
        "qr.scan": ("linking",),
    }


class ConsentSyncBackoff(Model):
    min_s: float = Field(default=1.0, gt=0, description="First retry after a failure")
    max_s: float = Field(default=300.0, gt=0, description="Retry delay cap (full jitter)")


class ConsentSyncConfig(Model):
    base_url: str = Field(
        pattern=r"^https?://[^\s]+$", description="Central service base URL (https://...)"
    )
    token_file: Path = Field(description="File holding the bearer token (re-read each poll)")
    ca_file: Path | None = Field(default=None, description="Private CA bundle (PEM) to trust")
    poll_interval_s: float = Field(default=60.0, gt=0, description="Delta poll interval")
    timeout_s: float = Field(
        default=10.0, gt=0, description="Per-phase timeout (connect, each read, pool)"
    )
    deadline_s: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Total time one request may take, body included; cut after it",
    )
    max_body_bytes: int = Field(
        default=16 * 1024 * 1024,
        ge=1024,
        le=256 * 1024 * 1024,
        description="Largest answer body accepted (about 100 bytes per record); "
        "a larger one is cut off and refused",
    )
    backoff: ConsentSyncBackoff = Field(
        default=ConsentSyncBackoff(), description="Retry delays after a failed poll"
    )
    allow_plaintext: bool = Field(default=False, description=ALLOW_PLAINTEXT_HELP)

    @property
    def plaintext(self) -> bool:
        """Plain http:// to a host that is not loopback (``allow_plaintext`` let it)."""
        parts = urlsplit(self.base_url)
        return parts.scheme == "http" and not is_loopback_host(parts.hostname or "")

    @model_validator(mode="after")
    def _no_credentials_in_url_no_silent_plaintext(self) -> ConsentSyncConfig:
        # The URL itself is never put in a message: it may hold a password.
        if "@" in urlsplit(self.base_url).netloc:
            raise ValueError(
                "base_url holds credentials (user:password@host): a URL is logged and "
                "shown, so they would leak; remove them and put the bearer token in token_file"
            )
        if self.plaintext and not self.allow_plaintext:
            raise ValueError(
                "base_url is http:// to a host that is not loopback: the bearer token and "
                "the registry would cross the network in the clear; use https://, or set "
                "consent.sync.allow_plaintext = true to accept that"
            )
        return self


class ConsentConfig(Model):
    seed_file: Path | None = Field(
        default=None, description="JSON {records:[...]} loaded into the registry at start"
    )
    required: dict[str, tuple[Purpose, ...]] = Field(
        default_factory=_default_required,
        description="Per event type, the purposes it needs (any one suffices)",
    )
    policy: Literal["drop", "hold", "aggregate"] = Field(
        default="drop",
        description="Subject without consent: drop; hold (quarantine up to hold_ttl_s, "
        "released if consent arrives); aggregate (counted into footfall, no subject)",
    )
    hold_ttl_s: float = Field(
        default=900.0, gt=0, le=7 * 24 * 3600, description="hold: erased unsent after this"
    )
    footfall_k: int = Field(
        default=5, ge=1, description="aggregate: a window count below k is suppressed"
    )
    footfall_window_s: int = Field(
        default=900, ge=1, le=24 * 3600, description="aggregate: footfall window length"
    )
    token_consent_ttl_s: float = Field(
        default=24 * 3600.0, gt=0, description="A valid app token is consent for this long"
    )
    sync: ConsentSyncConfig | None = Field(
        default=None, description="Registry sync over HTTPS (contract §5); off when absent"
    )


class StatusConfig(Model):
    summary_interval_s: float = Field(default=60.0, gt=0, description="Log a summary this often")
    health_interval_s: float = Field(
        default=120.0,
        gt=0,
        description="Publish the retained health message (touchpoint/v1/<store>/<device>/health)"
        " at least this often",
    )
    health_min_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="At most one health message per this many seconds when the state changes",
    )


class HealthConfig(Model):
    listen: str = Field(
        default="127.0.0.1:9464",
        pattern=r"^(127\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}|localhost|\[::1\]):[0-9]{1,5}$",
        description="Loopback address:port of /healthz and /metrics",
    )
    broker_down_s: float = Field(default=120.0, gt=0, description="Unhealthy: broker down longer")

    @field_validator("listen")
    @classmethod
    def _loopback_address(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        if not 1 <= int(port) <= 65535:
            raise ValueError(f"port {int(port)} is outside 1-65535")
        if host not in ("localhost", "[::1]"):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{host!r} is not an IPv4 address") from None
        return value

    source_down_s: float = Field(
        default=300.0, gt=0, description="Unhealthy: a source in error/absent longer"
    )
    consent_max_age_s: float | None = Field(
        default=900.0,
        gt=0,
        description="Unhealthy: consent registry not synced for longer (with consent.sync)",
    )
