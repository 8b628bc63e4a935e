"""The ``[[sources]]`` models, one per kind, and ``SourceConfig``, their union by ``kind``.

A model here is ``...SourceConfig``; the driver that runs it (``drivers/``) is the thing
itself (``BleSource``), so the two never need an ``as`` to be told apart.
"""

from __future__ import annotations

import base64
import ipaddress
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from gateway.config.sections import Model

SOURCE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


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
