"""Config: one TOML file validated into frozen models that forbid unknown keys.

Every problem is reported as (file, key path, why) in one ConfigError, so
``touchpoint-gateway check-config`` can list them all at once.  Relative paths in the file
are resolved against the file's folder.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import ssl
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gateway.config.credentials import CREDENTIALS_VAR, expand_credentials_in, secret_file_problem
from gateway.consent.registry import load_seed_file
from gateway.errors import ConfigError, GatewayError
from gateway.identity.pseudonyms import decode_key, weak_key_problem

ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,31}$"
KEY_ID_PATTERN = r"^[a-z0-9]{1,16}$"
SOURCE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"
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


class SerialCardSourceConfig(Model):
    kind: Literal["serial_card"] = Field(description="The source's kind")
    name: Annotated[
        str, Field(pattern=SOURCE_NAME_PATTERN, description="Unique name, in events and health")
    ]
    device: Path = Field(description="Serial device, e.g. a udev symlink /dev/touchpoint-card0")
    protocol: Literal["rdm6300", "scanner", "magstripe"] = Field(
        description="The reader's frames: RDM6300 RFID, a 2D/barcode scanner, magstripe Track 2"
    )
    lane: str = Field(min_length=1, max_length=64, description="Till lane, in each card.read")
    baudrate: int = Field(default=9600, ge=300, le=4_000_000, description="Serial speed")
    debounce_s: float = Field(
        default=1.0, ge=0, description="Same card again within this is one read"
    )
    check_bare_ean13: bool = Field(
        default=True,
        description="scanner: check the EAN-13 check digit of a bare 13-digit line (no AIM id)",
    )
    reopen_min_s: float = Field(
        default=0.5, gt=0, description="First reopen delay after the device is lost"
    )
    reopen_max_s: float = Field(default=30.0, gt=0, description="Reopen delay cap")


class SyntheticSourceConfig(Model):
    """In-process generator of card reads, for benchmarks and demos without hardware."""

    kind: Literal["synthetic"] = Field(description="The source's kind")
    name: Annotated[
        str, Field(pattern=SOURCE_NAME_PATTERN, description="Unique name, in events and health")
    ]
    rate_per_s: float = Field(default=10.0, gt=0, description="Card reads per second")
    cards: int = Field(default=100, ge=1, description="Distinct card numbers, read in turn")
    lane: str = Field(default="bench", description="Lane in each card.read")


_BeaconUuid = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{8}(-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12}$")]
_EddystoneNamespace = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{20}$")]
_AltBeaconPrefix = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{1,40}$")]


class BleSourceConfig(Model):
    """One BLE adapter scanning continuously for the retailer's beacons in one zone."""

    kind: Literal["ble"] = Field(description="The source's kind")
    name: Annotated[
        str, Field(pattern=SOURCE_NAME_PATTERN, description="Unique name, in events and health")
    ]
    adapter: str = Field(default="hci0", pattern=r"^hci[0-9]{1,3}$", description="BlueZ adapter")
    zone: str = Field(min_length=1, max_length=64, description="Zone this adapter covers")
    scanning_mode: Literal["active", "passive"] = Field(
        default="active",
        description="passive needs BlueZ >= 5.56 started with --experimental "
        "(without it the source scans actively and says so in its status)",
    )
    allow_ibeacon_uuids: tuple[_BeaconUuid, ...] = Field(
        default=(), description="iBeacon proximity UUIDs that are ours"
    )
    allow_eddystone_namespaces: tuple[_EddystoneNamespace, ...] = Field(
        default=(), description="Eddystone-UID namespaces (20 hex) that are ours"
    )
    allow_altbeacon_prefixes: tuple[_AltBeaconPrefix, ...] = Field(
        default=(), description="Hex prefixes of AltBeacon ids that are ours"
    )
    enter_rssi: int = Field(default=-75, ge=-127, le=20, description="Smoothed dBm to enter")
    exit_rssi: int = Field(default=-85, ge=-127, le=20, description="Smoothed dBm to leave")
    smoothing: Literal["median"] = Field(
        default="median", description="Sliding median over the smoothing window"
    )
    smoothing_window_s: float = Field(
        default=10.0, gt=0, description="RSSI samples older than this are not smoothed"
    )
    smoothing_samples: int = Field(
        default=7, ge=1, le=100, description="RSSI samples in the median at most"
    )
    min_samples: int = Field(
        default=3, ge=1, le=100, description="Samples a beacon needs before it can enter"
    )
    silence_s: float = Field(default=30.0, gt=0, description="Unheard this long: exit")
    min_dwell_s: float = Field(default=10.0, ge=0, description="Shorter visits send nothing")
    watchdog_s: float = Field(
        default=90.0, gt=0, description="No advert this long: restart scan, then reset adapter"
    )
    retry_min_s: float = Field(default=1.0, gt=0, description="First scanner restart delay")
    retry_max_s: float = Field(default=60.0, gt=0, description="Scanner restart delay cap")
    max_tracked_subjects: int = Field(
        default=10_000, ge=1, description="Beacons tracked at once (the oldest leave first)"
    )
    pseudonym_cache_size: int = Field(
        default=4096, ge=1, description="Beacon ids whose pseudonyms are kept computed"
    )
    queue_size: int = Field(default=10_000, ge=10, description="Adverts waiting; more dropped")

    @model_validator(mode="after")
    def _check(self) -> BleSourceConfig:
        if self.exit_rssi >= self.enter_rssi:
            raise ValueError("exit_rssi must be below enter_rssi (hysteresis)")
        if self.min_samples > self.smoothing_samples:
            raise ValueError("min_samples cannot exceed smoothing_samples")
        if not (
            self.allow_ibeacon_uuids
            or self.allow_eddystone_namespaces
            or self.allow_altbeacon_prefixes
        ):
            raise ValueError("list at least one allow_* beacon id: nothing else is tracked")
        return self


_TAP_TCP_FIELDS = (
    "listen_host", "listen_port", "till_allow", "printer_host", "printer_port",
    "connect_timeout_s",
)  # fmt: skip
_LOOPBACK_NETS = ("127.0.0.0/8", "::1/128")
_TAP_SERIAL_FIELDS = (
    "till_device", "printer_device", "baudrate", "bytesize", "parity", "stopbits",
    "flow_control", "reopen_min_s", "reopen_max_s",
)  # fmt: skip


class ReceiptTapSourceConfig(Model):
    """A tap between a till and its receipt printer (ESC/POS): TCP (raw port 9100) or serial.

    ``transport = "tcp"`` (the default) takes the listen_* and printer_host/port fields;
    ``transport = "serial"`` takes till_device, printer_device and the line settings.
    """

    kind: Literal["receipt_tap"] = Field(description="The source's kind")
    name: Annotated[
        str, Field(pattern=SOURCE_NAME_PATTERN, description="Unique name, in events and health")
    ]
    lane: str = Field(min_length=1, max_length=64, description="Lane name (events' lane attr)")
    lane_number: int = Field(ge=0, le=255, description="Lane number inside receipt tokens")
    transport: Literal["tcp", "serial"] = Field(
        default="tcp", description="tcp: network printer; serial: RS-232 / USB-serial printer"
    )
    listen_host: str = Field(
        default="127.0.0.1",
        description="tcp: address the till connects to (an IP address of this box; "
        "loopback by default: set the store network's address, with till_allow)",
    )
    till_allow: list[str] = Field(
        default=list(_LOOPBACK_NETS),
        min_length=1,
        max_length=64,
        description="tcp: till addresses or networks allowed to connect (CIDR); "
        "others are refused, counted and shown in /healthz. Required with a listen_host "
        "that is not loopback",
    )
    listen_port: int = Field(default=9100, ge=0, le=65535, description="tcp: 0 = any free port")
    printer_host: str | None = Field(
        default=None, min_length=1, description="tcp: the real printer's address (required)"
    )
    printer_port: int = Field(default=9100, ge=1, le=65535, description="tcp: printer port")
    till_device: Path | None = Field(
        default=None, description="serial: the port the till is cabled to (a udev link)"
    )
    printer_device: Path | None = Field(
        default=None, description="serial: the port the printer is cabled to (a udev link)"
    )
    baudrate: int = Field(default=9600, ge=300, le=4_000_000, description="serial: both sides")
    bytesize: Literal[5, 6, 7, 8] = Field(default=8, description="serial: data bits")
    parity: Literal["none", "even", "odd", "mark", "space"] = Field(
        default="none", description="serial: parity"
    )
    stopbits: float = Field(default=1, description="serial: stop bits, 1, 1.5 or 2")
    flow_control: Literal["none", "rtscts", "xonxoff"] = Field(
        default="none",
        description="serial: as the printer is set (its DIP switches or utility)",
    )
    reopen_min_s: float = Field(default=0.5, gt=0, description="serial: first retry delay")
    reopen_max_s: float = Field(default=30.0, gt=0, description="serial: retry delay cap")
    inject: Literal["off", "native", "raster"] = Field(
        default="off", description="Print a receipt token QR before each cut: native or raster"
    )
    url_prefix: str = Field(default="", max_length=200, description="QR text = prefix + token")
    module_size: int = Field(default=6, ge=1, le=16, description="QR module size in dots")
    counter_path: Path = Field(
        default=Path("/var/lib/touchpoint-gateway/receipt-counters.db"),
        description="SQLite file of the per-lane receipt counters (never reused)",
    )
    connect_timeout_s: float = Field(default=5.0, gt=0, description="tcp: printer connect")
    idle_timeout_s: float = Field(default=60.0, gt=0, description="Silent till: end the job")
    mint_rate_per_min: float = Field(
        default=30.0,
        gt=0,
        le=600,
        description="Receipt tokens this lane may mint per minute, on average; a cut beyond "
        "it prints without a token (counted, shown in /healthz)",
    )
    mint_burst: int = Field(
        default=5, ge=1, le=100, description="Tokens that may be minted at once above that rate"
    )

    @field_validator("till_allow")
    @classmethod
    def _till_networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(
                    f"till_allow: {item!r} is not an IP address or network (e.g. 192.0.2.21 "
                    "or 192.0.2.0/28)"
                ) from None
        return value

    @model_validator(mode="after")
    def _open_listener_needs_an_allow_list(self) -> ReceiptTapSourceConfig:
        if self.transport != "tcp":
            return self
        # _listen_address has let only an IP address or localhost through
        host = self.listen_host
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        if not loopback and "till_allow" not in self.model_fields_set:
            raise ValueError(
                f"listen_host {self.listen_host} is reachable from the network: set till_allow "
                "to the till's address (or network), so nothing else can print receipt tokens"
            )
        return self

    @model_validator(mode="after")
    def _prefix_when_injecting(self) -> ReceiptTapSourceConfig:
        if self.inject != "off" and not self.url_prefix:
            raise ValueError("url_prefix is required when inject is native or raster")
        return self

    @field_validator("listen_host")
    @classmethod
    def _listen_address(cls, value: str) -> str:
        if value == "localhost":
            return value
        try:
            ipaddress.ip_address(value)
        except ValueError:
            raise ValueError(
                f"{value!r} is not an IP address of this box to listen on (e.g. 0.0.0.0 or "
                "127.0.0.1)"
            ) from None
        return value

    @field_validator("stopbits")
    @classmethod
    def _stopbits(cls, value: float) -> float:
        if value not in {1, 1.5, 2}:
            raise ValueError("stopbits must be 1, 1.5 or 2")
        return value

    @model_validator(mode="after")
    def _fields_of_the_transport(self) -> ReceiptTapSourceConfig:
        tcp = self.transport == "tcp"
        other = _TAP_SERIAL_FIELDS if tcp else _TAP_TCP_FIELDS
        stray = [f for f in other if f in self.model_fields_set]
        if stray:
            them = "it" if len(stray) == 1 else "them"
            fix = f'set transport = "serial" or remove {them}' if tcp else f"remove {them}"
            raise ValueError(
                f'{", ".join(stray)}: only for transport = "{"serial" if tcp else "tcp"}"; {fix}'
            )
        if self.transport == "tcp" and self.printer_host is None:
            raise ValueError('printer_host is required with transport = "tcp"')
        if self.transport == "serial":
            missing = [f for f in ("till_device", "printer_device") if getattr(self, f) is None]
            if missing:
                raise ValueError(
                    f'{" and ".join(missing)} required with transport = "serial" '
                    "(the ports the till and the printer are cabled to)"
                )
            if self.till_device == self.printer_device:
                raise ValueError("till_device and printer_device must be two different ports")
            if self.reopen_max_s < self.reopen_min_s:
                raise ValueError("reopen_max_s must not be below reopen_min_s")
        return self


class CameraSourceConfig(Model):
    """A kiosk camera decoding QR codes: app tokens, receipt tokens, anything else."""

    kind: Literal["camera"] = Field(description="The source's kind")
    name: Annotated[
        str, Field(pattern=SOURCE_NAME_PATTERN, description="Unique name, in events and health")
    ]
    url: str | None = Field(
        default=None,
        min_length=1,
        description="Network stream: http(s):// MJPEG or rtsp:// (one of url, device, file)",
    )
    device: int | Path | None = Field(
        default=None, description="V4L2 camera: index (0) or path (/dev/video0, a udev link)"
    )
    file: Path | None = Field(default=None, description="A video file, played in real time")
    zone: str | None = Field(default=None, min_length=1, max_length=64, description="or lane")
    lane: str | None = Field(default=None, min_length=1, max_length=64, description="or zone")
    roi: tuple[float, float, float, float] = Field(
        default=(0.0, 0.0, 1.0, 1.0),
        description="Region of interest [x, y, w, h] as fractions of the frame",
    )
    decode_fps: float = Field(default=10.0, gt=0, le=120, description="Target decode rate")
    decoder: Literal["zxing", "pyzbar", "opencv-aruco", "opencv"] = Field(
        default="zxing", description="zxing: fastest and best on low contrast (bench qr)"
    )
    min_module_px: float = Field(
        default=3.0,
        ge=1,
        description="Smallest QR module expected, in frame pixels; frames are downscaled "
        "only while it stays >= 3 px",
    )
    debounce_s: float = Field(
        default=1.0, ge=0, description="A code absent this long and seen again is a new scan"
    )
    app_public_key: str | None = Field(
        default=None, description="Central Ed25519 public key: base64 of the raw 32 bytes"
    )
    app_public_key_file: Path | None = Field(
        default=None, description="...or a file holding that base64"
    )
    receipt_url_prefix: str = Field(
        default="", max_length=200, description="Receipt QR text = this prefix + token"
    )
    width: int | None = Field(default=None, ge=16, le=8192, description="Capture width asked")
    height: int | None = Field(default=None, ge=16, le=8192, description="Capture height asked")
    open_timeout_s: float = Field(default=10.0, gt=0, description="Network stream open timeout")
    read_timeout_s: float = Field(default=5.0, gt=0, description="No frame this long: lost")
    reopen_min_s: float = Field(
        default=0.5, gt=0, description="First reopen delay after the device is lost"
    )
    reopen_max_s: float = Field(default=30.0, gt=0, description="Reopen delay cap")

    @model_validator(mode="after")
    def _check(self) -> CameraSourceConfig:
        if sum(v is not None for v in (self.url, self.device, self.file)) != 1:
            raise ValueError("set exactly one of url, device or file")
        if (self.zone is None) == (self.lane is None):
            raise ValueError("set exactly one of zone or lane")
        x, y, w, h = self.roi
        if not (0 <= x < 1 and 0 <= y < 1 and w > 0 and h > 0) or x + w > 1 or y + h > 1:
            raise ValueError("roi is [x, y, w, h] fractions inside the frame: 0 <= x, x+w <= 1")
        if self.app_public_key is not None and self.app_public_key_file is not None:
            raise ValueError("set app_public_key or app_public_key_file, not both")
        if self.app_public_key is not None:
            try:
                raw = base64.b64decode("".join(self.app_public_key.split()), validate=True)
            except ValueError:
                raise ValueError("app_public_key is not base64") from None
            if len(raw) != 32:
                raise ValueError(f"app_public_key must hold 32 bytes, not {len(raw)}")
        return self


SourceConfig = Annotated[
    SerialCardSourceConfig
    | SyntheticSourceConfig
    | BleSourceConfig
    | ReceiptTapSourceConfig
    | CameraSourceConfig,
    Field(discriminator="kind"),
]


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
