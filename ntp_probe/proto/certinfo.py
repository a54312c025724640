"""A certificate's identity as blackbox_exporter labels it (``probe_ssl_last_chain_info``).

blackbox prints names with Go's ``pkix.Name.String()``, which differs from RFC 4514 as
Python's libraries print it: the nine attribute types Go knows are regrouped into a fixed
order (every value of one type in one multi-valued RDN, an empty CN or serial number left
out) and any other type is printed as its OID with the hex of the value's DER, re-encoded
as Go's marshaller would. Writing the same text lets dashboards and alerts built on
blackbox's labels (``changes()`` on the fingerprint, the subject shown) join with ours.

Names are read from the certificate's DER here, as leniently as Go reads them (a T61String's
bytes, a BMPString's NUL), not through ``cryptography``, whose text differs from Go's.

What the probe judges a certificate by (its validity, extended key usage and
subjectAltNames, :func:`read`) is read here too: ``cryptography`` refuses whole certificates
that OpenSSL and Go accept (a '*' in a PrintableString, a SET of attributes out of DER
order), and such a certificate would read as untrusted where blackbox probes it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import UTC, datetime

# Go's attributeTypeNames, and the order of Name.ToRDNSequence (C first, SERIALNUMBER last).
_GO_ORDER = (
    ("2.5.4.6", "C"), ("2.5.4.8", "ST"), ("2.5.4.7", "L"), ("2.5.4.9", "STREET"),
    ("2.5.4.17", "POSTALCODE"), ("2.5.4.10", "O"), ("2.5.4.11", "OU"), ("2.5.4.3", "CN"),
    ("2.5.4.5", "SERIALNUMBER"),
)
_GO_NAMES = dict(_GO_ORDER)
_SINGLE = frozenset({"2.5.4.3", "2.5.4.5"})  # Go keeps the last CN and serial number only
# ASN.1 PrintableString's characters (X.680), without '*' and '&' as Go marshals.
_PRINTABLE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                       b"0123456789 '()+,-./:=?")
# The string types Go reads a name's values from, and how their bytes become text (a
# T61String's bytes are taken as they are: see _text).
_STRINGS = {0x0C: "utf-8", 0x12: "ascii", 0x13: "latin-1", 0x14: "utf-8", 0x16: "latin-1",
            0x1E: "utf-16-be", 0x1C: "utf-32-be"}
_BMP = 0x1E
_SAN = "2.5.29.17"
_EKU = "2.5.29.37"
# Validity times as Go's parser takes them: seconds (minutes too in a UTCTime), no fraction,
# Z or a non-zero offset (it re-prints what it parsed and refuses what differs).
_UTC_TIME = re.compile(rb"(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)?(Z|[+-]\d{4})")
_GENERALIZED_TIME = re.compile(rb"(\d{4})(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)(Z|[+-]\d{4})")


class CertificateError(ValueError):
    """The certificate's DER does not hold what a certificate holds."""


def _element(data: bytes, i: int) -> tuple[int, bytes, int]:
    """The DER element at ``i``: its tag, its contents and where the next one starts."""
    if i + 2 > len(data):
        raise CertificateError("truncated")
    tag, n = data[i], data[i + 1]
    i += 2
    if n & 0x80:
        size = n & 0x7F
        if not 0 < size <= 4 or i + size > len(data):
            raise CertificateError("bad length")
        n = int.from_bytes(data[i:i + size], "big")
        i += size
    if i + n > len(data):
        raise CertificateError("truncated")
    return tag, data[i:i + n], i + n


def _elements(data: bytes) -> list[tuple[int, bytes, bytes]]:
    """Each element within ``data``: tag, contents, and the whole element's DER."""
    out, i = [], 0
    while i < len(data):
        tag, body, end = _element(data, i)
        out.append((tag, body, data[i:end]))
        i = end
    return out


def _oid(body: bytes) -> str:
    if len(body) > 64:  # OpenSSL's and cryptography's bound too; a longer arc would not
        raise CertificateError("OID too long")  # even print (Python's int-to-str limit)
    arcs, value = [], 0
    for b in body:
        value = value << 7 | b & 0x7F
        if not b & 0x80:
            arcs.append(value)
            value = 0
    if not arcs:
        raise CertificateError("empty OID")
    first = min(arcs[0] // 40, 2)
    return ".".join(str(a) for a in (first, arcs[0] - 40 * first, *arcs[1:]))


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes((tag, n)) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + body


def _text(tag: int, body: bytes) -> tuple[str, bool] | None:
    """A string value's text as Go holds it, and whether it is valid UTF-8 (None for a
    value that is no string). Go takes a T61String's bytes as they are: each byte that is
    not UTF-8 shows as one U+FFFD (Python's 'replace' would merge a run of them); a
    BMPString loses a trailing NUL, as Go's parser drops it."""
    codec = _STRINGS.get(tag)
    if codec is None:
        return None
    if tag == _BMP and body.endswith(b"\0\0") and len(body) % 2 == 0:
        body = body[:-2]
    text = body.decode(codec, "surrogateescape" if codec == "utf-8" else "replace")
    valid = not any("\udc80" <= c <= "\udcff" for c in text)
    if not valid:
        text = "".join("\ufffd" if "\udc80" <= c <= "\udcff" else c for c in text)
    return text, valid


def _marshal(text: str) -> bytes:
    """A string's DER as Go's ``asn1.Marshal`` writes it: PrintableString when its
    characters allow, else UTF8String."""
    raw = text.encode("utf-8", "surrogatepass")
    return _der(0x13 if all(c in _PRINTABLE for c in raw) else 0x0C, raw)


def _escape(value: str) -> str:
    out = []
    last = len(value.encode("utf-8", "surrogatepass")) - 1
    k = 0  # Go's byte index, which its test against the last byte uses
    for c in value:
        if c in ',+"\\<>;' or (c == " " and k in (0, last)) or (c == "#" and k == 0):
            out.append("\\")
        out.append(c)
        k += len(c.encode("utf-8", "surrogatepass"))
    return "".join(out)


def go_name(name_der: bytes) -> str:
    """The Name whose DER (the SEQUENCE's contents) is ``name_der``, as Go's
    ``pkix.Name.String()`` prints it."""
    values: dict[str, list[str]] = {}
    other: list[str] = []
    for _, rdn, _ in _elements(name_der):
        for _, atv, _ in _elements(rdn):
            parts = _elements(atv)
            if len(parts) != 2 or parts[0][0] != 0x06:
                raise CertificateError("bad attribute")
            oid = _oid(parts[0][1])
            tag, body, whole = parts[1]
            decoded = _text(tag, body)
            if oid in _GO_NAMES:
                if decoded is not None:  # Go puts only text into its named fields
                    if oid in _SINGLE:
                        values[oid] = [decoded[0]]
                    else:
                        values.setdefault(oid, []).append(decoded[0])
                continue
            if decoded is None:
                other.append(f"{oid}=#{whole.hex()}")
            elif decoded[1]:
                other.append(f"{oid}=#{_marshal(decoded[0]).hex()}")
            else:  # Go's marshaller refuses text that is not UTF-8: printed as text
                other.append(f"{oid}={_escape(decoded[0])}")
    rdns = [[o] for o in other] + [
        [f"{_GO_NAMES[oid]}={_escape(v)}" for v in values[oid]]
        for oid, _ in _GO_ORDER
        if oid in values and not (oid in _SINGLE and values[oid] == [""])]
    return ",".join("+".join(rdn) for rdn in reversed(rdns))


class _Tbs:
    """The parts of a certificate's tbsCertificate the probe reads (contents, not headers)."""

    __slots__ = ("extensions", "issuer", "subject", "validity")

    def __init__(self, cert_der: bytes) -> None:
        tag, cert, _ = _element(cert_der, 0)
        if tag != 0x30:
            raise CertificateError("not a certificate")
        tag, tbs, _ = _element(cert, 0)
        fields = _elements(tbs)
        if fields and fields[0][0] == 0xA0:  # the version, when not v1
            fields = fields[1:]
        # serial, signature algorithm, issuer, validity, subject, public key, then optional
        if len(fields) < 6 or any(fields[i][0] != 0x30 for i in (2, 3, 4)):
            raise CertificateError("not a certificate")
        self.issuer, self.validity, self.subject = fields[2][1], fields[3][1], fields[4][1]
        self.extensions: bytes | None = next(
            (_element(body, 0)[1] for tag, body, _ in fields[6:] if tag == 0xA3), None)


def _extensions(extensions: bytes | None) -> dict[str, bytes]:
    """Each extension's value (the OCTET STRING's contents) by its OID."""
    out: dict[str, bytes] = {}
    for _, ext, _ in _elements(extensions or b""):
        parts = _elements(ext)
        if len(parts) < 2 or parts[0][0] != 0x06 or parts[-1][0] != 0x04:
            raise CertificateError("bad extension")
        oid = _oid(parts[0][1])
        if oid in out:  # Go and cryptography refuse the certificate too
            raise CertificateError(f"duplicate extension {oid}")
        out[oid] = parts[-1][1]
    return out


def _general_names(san: bytes | None) -> list[tuple[int, bytes]]:
    """The subjectAltName's GeneralNames: (tag, contents); other kinds skipped, as Go does."""
    if san is None:
        return []
    tag, names, end = _element(san, 0)
    if tag != 0x30 or end != len(san):
        raise CertificateError("bad subjectAltName")
    return [(tag, body) for tag, body, _ in _elements(names)]


def dns_names(extensions: bytes | None) -> list[str]:
    """The DNS names of the subject alternative name extension, in order."""
    return [body.decode("latin-1")
            for tag, body in _general_names(_extensions(extensions).get(_SAN)) if tag == 0x82]


def _time(tag: int, body: bytes) -> float:
    """A Validity time in seconds since 1970, or CertificateError where Go refuses it."""
    pattern = {0x17: _UTC_TIME, 0x18: _GENERALIZED_TIME}.get(tag)
    match = pattern.fullmatch(body) if pattern is not None else None
    if match is None:
        raise CertificateError("bad validity time")
    year = int(match[1])
    if tag == 0x17:
        year += 1900 if year >= 50 else 2000  # RFC 5280, 4.1.2.5.1
    zone, offset = match[7], 0
    if zone != b"Z":
        hours, minutes = int(zone[1:3]), int(zone[3:5])
        if hours > 23 or minutes > 59 or hours == minutes == 0:
            raise CertificateError("bad validity time")
        offset = (hours * 60 + minutes) * 60 * (-1 if zone[:1] == b"-" else 1)
    try:
        when = datetime(year, int(match[2]), int(match[3]), int(match[4]), int(match[5]),
                        int(match[6] or 0), tzinfo=UTC)
    except ValueError:
        raise CertificateError("bad validity time") from None
    return when.timestamp() - offset


@dataclass(frozen=True, slots=True)
class Certificate:
    """What the probe judges a certificate by, read from its DER as Go reads it."""

    der: bytes
    not_before: float  # seconds since 1970
    not_after: float
    extended_key_usage: tuple[str, ...] | None  # dotted OIDs; None without the extension
    dns_names: tuple[bytes, ...]  # subjectAltName dNSNames, as written
    ip_addresses: tuple[bytes, ...]  # subjectAltName iPAddresses, 4 or 16 bytes
    problem: str | None = None  # why the extensions cannot be read (then none are given)


def read(cert_der: bytes) -> Certificate:
    """A certificate's validity, extended key usage and subjectAltNames.

    Raises CertificateError for what is no certificate or a time Go would not read; a
    duplicate extension, or a key usage or subjectAltName extension that does not parse,
    is the certificate's ``problem`` (Go refuses such a certificate; its expiry is still
    worth reporting)."""
    tbs = _Tbs(cert_der)
    times = _elements(tbs.validity)
    if len(times) != 2:
        raise CertificateError("bad validity")
    not_before, not_after = (_time(tag, body) for tag, body, _ in times)
    try:
        usage, names = _judged(tbs.extensions)
    except CertificateError as exc:
        return Certificate(cert_der, not_before, not_after, None, (), (), str(exc))
    return Certificate(cert_der, not_before, not_after, usage,
                       tuple(body for tag, body in names if tag == 0x82),
                       tuple(body for tag, body in names if tag == 0x87))


def _judged(extensions_der: bytes | None) -> tuple[tuple[str, ...] | None,
                                                   list[tuple[int, bytes]]]:
    """The extended key usage (None without one) and the subjectAltName's GeneralNames."""
    extensions = _extensions(extensions_der)
    usage: tuple[str, ...] | None = None
    if _EKU in extensions:
        tag, oids, end = _element(extensions[_EKU], 0)
        if tag != 0x30 or end != len(extensions[_EKU]):
            raise CertificateError("bad extended key usage")
        parts = _elements(oids)
        if any(tag != 0x06 for tag, _, _ in parts):
            raise CertificateError("bad extended key usage")
        usage = tuple(_oid(body) for _, body, _ in parts)  # none at all: Go's "any"
    names = _general_names(extensions.get(_SAN))
    for tag, body in names:
        # Go refuses an address of another length, and a DNS name or e-mail not IA5
        if (tag == 0x87 and len(body) not in (4, 16)) or (tag in (0x81, 0x82)
                                                          and not body.isascii()):
            raise CertificateError("bad subjectAltName")
    return usage, names


def leaf_labels(cert_der: bytes) -> tuple[str, str, str, str]:
    """blackbox's labels for the leaf: SHA-256 fingerprint of its DER (lower-case hex),
    issuer, subject, and its DNS names joined by commas, in that (alphabetical) order.

    Raises CertificateError when the DER is not a certificate's."""
    tbs = _Tbs(cert_der)
    return (hashlib.sha256(cert_der).hexdigest(), go_name(tbs.issuer), go_name(tbs.subject),
            ",".join(dns_names(tbs.extensions)))
