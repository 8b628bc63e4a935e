"""A throw-away PKI for TLS tests: a CA, a server certificate for 127.0.0.1, a client
certificate, and an unrelated CA to prove that trust is checked."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    ip: str | None = None,
    days: float = 1,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ip:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False
        )
    return b.sign(issuer_key, hashes.SHA256())


def _write(
    path: Path, cert: x509.Certificate | None = None, key: ec.EllipticCurvePrivateKey | None = None
) -> Path:
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return path


def _owner_only(path: Path) -> Path:
    path.chmod(0o600)
    return path


def make_pki(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test-ca", ca_key, "test-ca", ca_key, ca=True)
    srv_key = ec.generate_private_key(ec.SECP256R1())
    cli_key = ec.generate_private_key(ec.SECP256R1())
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = _cert("other-ca", other_key, "other-ca", other_key, ca=True)
    return {
        "ca": _write(d / "ca.pem", ca),
        "other_ca": _write(d / "other-ca.pem", other_ca),
        "server": _write(
            d / "server.pem", _cert("broker", srv_key, "test-ca", ca_key, ip="127.0.0.1")
        ),
        "server_key": _write(d / "server.key", key=srv_key),
        "client": _write(d / "client.pem", _cert("nl-ams-001-gw-01", cli_key, "test-ca", ca_key)),
        # The gateway refuses a TLS key open to the group or others (the broker's is not ours).
        "client_key": _owner_only(_write(d / "client.key", key=cli_key)),
        "ca_key": _owner_only(_write(d / "ca.key", key=ca_key)),
    }


def renew_client(pki: dict[str, Path], days: float) -> datetime.datetime:
    """Replace the client certificate (same key, same CA) with one valid ``days``; returns
    its notAfter."""
    ca_key = serialization.load_pem_private_key(pki["ca_key"].read_bytes(), None)
    cli_key = serialization.load_pem_private_key(pki["client_key"].read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    assert isinstance(cli_key, ec.EllipticCurvePrivateKey)
    cert = _cert("nl-ams-001-gw-01", cli_key, "test-ca", ca_key, days=days)
    _write(pki["client"], cert)
    return cert.not_valid_after_utc
