"""A certificate's identity as blackbox_exporter labels it (``probe_ssl_last_chain_info``).

blackbox prints names with Go's ``pkix.Name.String()``, which differs from RFC 4514 as
Python's libraries print it: the nine attribute types Go knows are regrouped into a fixed
order (every value of one type in one multi-valued RDN, an empty CN or serial number left
out) and any other type is printed as its OID with the hex of the value's DER, re-encoded
as Go's marshaller would. Writing the same text lets dashboards and alerts built on
blackbox's labels (``changes()`` on the fingerprint, the subject shown) join with ours.

Names are read from the certificate's DER here, as leniently as Go reads them (a T61String's
bytes, a BMPString's NUL), not through ``cryptography``, whose text differs from Go's.
"""

from __future__ import annotations

import hashlib

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


def _tbs_parts(cert_der: bytes) -> tuple[bytes, bytes, bytes | None]:
    """The issuer's and the subject's Name contents, and the extensions' SEQUENCE contents
    (None without any), of a certificate's DER."""
    tag, cert, _ = _element(cert_der, 0)
    if tag != 0x30:
        raise CertificateError("not a certificate")
    tag, tbs, _ = _element(cert, 0)
    fields = _elements(tbs)
    if fields and fields[0][0] == 0xA0:  # the version, when not v1
        fields = fields[1:]
    # serial, signature algorithm, issuer, validity, subject, public key, then optional
    if len(fields) < 6 or fields[2][0] != 0x30 or fields[4][0] != 0x30:
        raise CertificateError("not a certificate")
    extensions = next((_element(body, 0)[1] for tag, body, _ in fields[6:] if tag == 0xA3),
                      None)
    return fields[2][1], fields[4][1], extensions


def dns_names(extensions: bytes | None) -> list[str]:
    """The DNS names of the subject alternative name extension, in order."""
    for _, ext, _ in _elements(extensions or b""):
        parts = _elements(ext)
        if parts and parts[0][0] == 0x06 and _oid(parts[0][1]) == _SAN:
            _, names, _ = _element(parts[-1][1], 0)  # OCTET STRING holding GeneralNames
            return [body.decode("latin-1") for tag, body, _ in _elements(names) if tag == 0x82]
    return []


def leaf_labels(cert_der: bytes) -> tuple[str, str, str, str]:
    """blackbox's labels for the leaf: SHA-256 fingerprint of its DER (lower-case hex),
    issuer, subject, and its DNS names joined by commas, in that (alphabetical) order.

    Raises CertificateError when the DER is not a certificate's."""
    issuer, subject, extensions = _tbs_parts(cert_der)
    return (hashlib.sha256(cert_der).hexdigest(), go_name(issuer), go_name(subject),
            ",".join(dns_names(extensions)))
