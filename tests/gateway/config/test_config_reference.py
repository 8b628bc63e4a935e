"""The configuration reference is generated from the schema, describes every key, and
the committed copy is current."""

from __future__ import annotations

from pathlib import Path

from gateway.config.loading import Config
from gateway.config.reference import reference, undescribed

REFERENCE = Path(__file__).resolve().parents[3] / "firmware-config" / "CONFIG-REFERENCE.md"


def test_every_key_has_a_description() -> None:
    assert undescribed(Config.model_json_schema()) == []


def test_the_committed_reference_is_current() -> None:
    expected = reference(Config.model_json_schema())
    assert REFERENCE.read_text(encoding="utf-8") == expected, (
        "regenerate: touchpoint-gateway config-schema --write firmware-config/gateway.schema.json"
        " --reference firmware-config/CONFIG-REFERENCE.md"
    )


def test_every_table_and_source_kind_has_a_section() -> None:
    text = reference(Config.model_json_schema())
    for title in ("[gateway]", "[keyring]", "[buffer]", "[mqtt]", "[mqtt.tls]", "[consent]",
                  "[consent.sync]", "[consent.sync.backoff]", "[status]", "[health]"):  # fmt: skip
        assert f"## {title}\n" in text, title
    for kind in ("serial_card", "synthetic", "ble", "receipt_tap", "camera"):
        assert f'## [[sources]] kind = "{kind}"\n' in text, kind
    assert "| `health_interval_s` | number (> 0) | 120.0 |" in text
    assert '| `when_full` | "evict_oldest" \\| "drop_new" | "evict_oldest" |' in text
