"""A certificate's identity as blackbox_exporter labels it (``probe_ssl_last_chain_info``).

blackbox prints names with Go's ``pkix.Name.String()``, which differs from RFC 4514 as
Python's libraries print it: the nine attribute types Go knows are regrouped into a fixed
order (every value of one type in one multi-valued RDN) and any other type is printed as
its OID with the hex of the value's DER, re-encoded as Go's marshaller would. Writing the
same text lets dashboards and alerts built on blackbox's labels (``changes()`` on the
fingerprint, the subject shown) join with ours.
"""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization

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


def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes((tag, n)) + body
    size = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(size))) + size + body


def _marshal(value: str | bytes) -> bytes:
    """The value's DER as Go's ``asn1.Marshal`` writes it: a string as PrintableString when
    its characters allow, else UTF8String; a bit string (the only non-text value) as such."""
    if isinstance(value, bytes):
        return _der(0x03, b"\0" + value)
    raw = value.encode("utf-8", "surrogatepass")
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


def go_name(name: x509.Name) -> str:
    """``name`` as Go's ``pkix.Name.String()`` prints it."""
    attrs = list(name)
    values: dict[str, list[str]] = {}
    other: list[list[str]] = []
    for attr in attrs:
        oid = attr.oid.dotted_string
        if oid in _GO_NAMES:
            if isinstance(attr.value, str):  # Go parses only text into its named fields
                if oid in _SINGLE:
                    values[oid] = [attr.value]
                else:
                    values.setdefault(oid, []).append(attr.value)
            continue
        other.append([f"{oid}=#{_marshal(attr.value).hex()}"])
    rdns = other + [[f"{_GO_NAMES[oid]}={_escape(v)}" for v in values[oid]]
                    for oid, _ in _GO_ORDER if oid in values]
    return ",".join("+".join(rdn) for rdn in reversed(rdns))


def dns_names(cert: x509.Certificate) -> list[str]:
    """The certificate's DNS subject alternative names, in order (none when it has no such
    extension or the extension cannot be read)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
        return []
    return list(san.value.get_values_for_type(x509.DNSName))


def leaf_labels(cert: x509.Certificate) -> tuple[str, str, str, str]:
    """blackbox's labels for the leaf: SHA-256 fingerprint of its DER (lower-case hex),
    issuer, subject, and its DNS names joined by commas, in that (alphabetical) order.

    Raises ValueError when a name cannot be read."""
    fingerprint = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()
    return fingerprint, go_name(cert.issuer), go_name(cert.subject), ",".join(dns_names(cert))
