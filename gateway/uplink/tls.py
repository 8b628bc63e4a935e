"""Certificate expiry, read from the PEM files the MQTT link uses.

The daemon only needs one field of an X.509 certificate, ``validity.notAfter``; reading it
takes a few lines of DER (RFC 5280 section 4.1) instead of a dependency:

    Certificate ::= SEQUENCE { tbsCertificate SEQUENCE {
        [0] version OPTIONAL, serialNumber INTEGER, signature SEQUENCE, issuer SEQUENCE,
        validity SEQUENCE { notBefore Time, notAfter Time }, ... }, ... }

A CA file may hold several certificates: the earliest expiry counts, since that is the
first one a link can fail on.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import re
from pathlib import Path

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s*(.+?)\s*-----END CERTIFICATE-----", re.DOTALL)
MAX_PEM_BYTES = 1 << 20  # a certificate bundle larger than this is not read


class _Der:
    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data, self.pos, self.end = data, pos, len(data) if end is None else end

    def next(self) -> tuple[int, int, int]:
        """(tag, start of content, end of content) of the next element; moves past it."""
        d = self.data
        if self.pos + 2 > self.end:
            raise ValueError("truncated")
        tag, first = d[self.pos], d[self.pos + 1]
        pos = self.pos + 2
        if first < 0x80:
            length = first
        else:
            n = first & 0x7F
            if n == 0 or n > 4 or pos + n > self.end:
                raise ValueError("bad length")
            length = int.from_bytes(d[pos : pos + n], "big")
            pos += n
        if pos + length > self.end:
            raise ValueError("truncated")
        self.pos = pos + length
        return tag, pos, pos + length


def _time(tag: int, text: bytes) -> float:
    s = text.decode("ascii")
    if tag == 0x17:  # UTCTime YYMMDDHHMMSSZ; years 50-99 are 19xx (RFC 5280)
        year = int(s[:2])
        s = f"{1900 + year if year >= 50 else 2000 + year}{s[2:]}"
    elif tag != 0x18:  # GeneralizedTime YYYYMMDDHHMMSSZ
        raise ValueError("not a time")
    if not s.endswith("Z") or len(s) != 15:
        raise ValueError("not a UTC time")
    parts = (s[0:4], s[4:6], s[6:8], s[8:10], s[10:12], s[12:14])
    y, mo, d, h, mi, sec = (int(p) for p in parts)
    return float(calendar.timegm((y, mo, d, h, mi, sec, 0, 0, 0)))


def der_not_after(der: bytes) -> float:
    """``notAfter`` of one DER certificate, as Unix time; ValueError if it is not one."""
    cert = _Der(der)
    tag, start, end = cert.next()
    if tag != 0x30:
        raise ValueError("not a certificate")
    tbs_tag, tbs_start, tbs_end = _Der(der, start, end).next()
    if tbs_tag != 0x30:
        raise ValueError("not a certificate")
    tbs = _Der(der, tbs_start, tbs_end)
    tag, _, _ = tbs.next()
    if tag == 0xA0:  # explicit version: the serial number follows
        tag, _, _ = tbs.next()
    tbs.next()  # signature algorithm
    tbs.next()  # issuer
    tag, v_start, v_end = tbs.next()
    if tag != 0x30:
        raise ValueError("no validity")
    validity = _Der(der, v_start, v_end)
    validity.next()  # notBefore
    tag, t_start, t_end = validity.next()
    return _time(tag, der[t_start:t_end])


def certificate_not_after(path: Path) -> float | None:
    """The earliest ``notAfter`` of the PEM certificates in ``path``; None when the file
    cannot be read or holds none."""
    try:
        with path.open("rb") as fh:
            pem = fh.read(MAX_PEM_BYTES)
    except OSError:
        return None
    found: list[float] = []
    for block in _PEM.findall(pem):
        try:
            found.append(der_not_after(base64.b64decode(block)))
        except (ValueError, binascii.Error, UnicodeDecodeError):
            continue
    return min(found, default=None)
