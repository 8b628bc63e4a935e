"""A lazy registry from a config ``kind`` to the class that implements it.

Drivers are imported only when a configured source needs them, so a missing native
library (libzbar, BlueZ bindings) disables that one source with a clear error instead
of stopping the daemon.  A source class takes ``(config_model, SourceContext)``.
"""

from __future__ import annotations

import importlib
from typing import Any

from gateway.errors import SourceError
from gateway.ports import Source, SourceContext

SOURCE_KINDS: dict[str, str] = {
    "serial_card": "drivers.serial_cards.source:SerialCardSource",
    "synthetic": "drivers.synthetic:SyntheticSource",
    "ble": "drivers.ble.source:BleSource",
    "receipt_tap": "drivers.receipt_tap.source:ReceiptTapSource",
    "camera": "drivers.camera.source:CameraSource",
}


def source_class(kind: str) -> type[Any]:
    try:
        target = SOURCE_KINDS[kind]
    except KeyError:
        raise SourceError(
            f"unknown source kind {kind!r}; known: {', '.join(SOURCE_KINDS)}"
        ) from None
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SourceError(
            f"source kind {kind!r} is unavailable: {exc}. Install the project's "
            "dependencies with 'make install' (system libraries too)."
        ) from exc
    cls: type[Any] = getattr(module, attr)
    return cls


def build_source(config: Any, ctx: SourceContext) -> Source:
    cls = source_class(config.kind)
    source: Source = cls(config, ctx)
    return source
