"""Certificate expiry read from PEM files (checked against cryptography's own reading)."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.uplink.tls import certificate_not_after
from tests.pki import make_pki


def _pem(not_after: datetime.datetime, *, version_field: bool = True) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(not_after)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_utc_time_and_generalized_time(tmp_path: Path) -> None:
    soon = datetime.datetime(2031, 3, 4, 5, 6, 7, tzinfo=datetime.UTC)  # UTCTime
    late = datetime.datetime(2061, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)  # GeneralizedTime
    for when in (soon, late):
        path = tmp_path / f"{when.year}.pem"
        path.write_bytes(_pem(when))
        assert certificate_not_after(path) == when.timestamp()


def test_a_bundle_counts_its_earliest_expiry(tmp_path: Path) -> None:
    first = datetime.datetime(2040, 1, 1, tzinfo=datetime.UTC)
    second = datetime.datetime(2030, 6, 1, tzinfo=datetime.UTC)
    path = tmp_path / "ca.pem"
    path.write_bytes(_pem(first) + b"\n" + _pem(second))
    assert certificate_not_after(path) == second.timestamp()


def test_the_test_pki_agrees_with_cryptography(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    for name in ("ca", "other_ca", "server", "client"):
        cert = x509.load_pem_x509_certificate(pki[name].read_bytes())
        assert certificate_not_after(pki[name]) == cert.not_valid_after_utc.timestamp()


def test_unreadable_or_not_a_certificate_is_none(tmp_path: Path) -> None:
    assert certificate_not_after(tmp_path / "missing.pem") is None
    junk = tmp_path / "junk.pem"
    junk.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    assert certificate_not_after(junk) is None
    truncated = tmp_path / "truncated.pem"
    good = _pem(datetime.datetime(2035, 1, 1, tzinfo=datetime.UTC)).decode().splitlines()
    truncated.write_text("\n".join(good[:3] + good[-1:]) + "\n")
    assert certificate_not_after(truncated) is None
