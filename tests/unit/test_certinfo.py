"""A certificate's labels as blackbox_exporter writes them (``probe_ssl_last_chain_info``).

The expected texts are what Debian's prometheus-blackbox-exporter 0.23 printed for the same
certificate (a tcp/tls probe of a server presenting it, 2026-12-03): Go's
``pkix.Name.String()``, which regroups the attribute types it knows into a fixed order and
prints the others as an OID with the hex of their DER.
"""

from __future__ import annotations

import datetime as dt
from ipaddress import IPv4Address

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ntp_probe.proto.certinfo import CertificateError, go_name, leaf_labels, read

RDN = x509.RelativeDistinguishedName
A = x509.NameAttribute


def _name(*rdns: list[x509.NameAttribute[str]]) -> x509.Name:
    return x509.Name([RDN(r) for r in rdns])


CA_NAME = _name([A(NameOID.COUNTRY_NAME, "DE")], [A(NameOID.ORGANIZATION_NAME, "Test CA; Inc")],
                [A(NameOID.COMMON_NAME, "ca")])
SUBJECT = _name(
    [A(NameOID.DOMAIN_COMPONENT, "net")],
    [A(NameOID.DOMAIN_COMPONENT, "example")],
    [A(NameOID.COUNTRY_NAME, "DE")],
    [A(NameOID.ORGANIZATION_NAME, "Zeit, Inc.")],
    [A(NameOID.ORGANIZATIONAL_UNIT_NAME, "b"), A(NameOID.ORGANIZATIONAL_UNIT_NAME, "a")],
    [A(NameOID.COMMON_NAME, "first")],
    [A(NameOID.EMAIL_ADDRESS, "ops@example.net")],
    [A(NameOID.LOCALITY_NAME, " #lead+trail ")],
    [A(NameOID.COMMON_NAME, "#localhost")],
    [A(NameOID.SERIAL_NUMBER, "42")],
    [A(NameOID.ORGANIZATIONAL_UNIT_NAME, "Zeitdienst \u00e4<>")],
    [A(NameOID.USER_ID, "x*y&z")],
)
# What blackbox printed for SUBJECT: the last CN only, every OU in one RDN (sorted into
# Go's order, the multi-valued RDN's members reversed with the rest), '*' and '&' making a
# UTF8String, the unknown types last in reverse order.
GO_SUBJECT = (
    "SERIALNUMBER=42,CN=\\#localhost,OU=a+OU=b+OU=Zeitdienst \u00e4\\<\\>,O=Zeit\\, Inc.,"
    "L=\\ #lead\\+trail\\ ,C=DE,0.9.2342.19200300.100.1.1=#0c05782a79267a,"
    "1.2.840.113549.1.9.1=#0c0f6f7073406578616d706c652e6e6574,"
    "0.9.2342.19200300.100.1.25=#13076578616d706c65,0.9.2342.19200300.100.1.25=#13036e6574"
)


def _leaf(san: list[x509.GeneralName] | None, subject: x509.Name = SUBJECT) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(CA_NAME)
               .public_key(key.public_key()).serial_number(7)
               .not_valid_before(now - dt.timedelta(days=1))
               .not_valid_after(now + dt.timedelta(days=20)))
    if san is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def test_labels_are_blackboxs() -> None:
    der = _leaf([x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1")),
                 x509.DNSName("ntp.example")])
    fingerprint, issuer, subject, san = leaf_labels(der)
    assert fingerprint == x509.load_der_x509_certificate(der).fingerprint(hashes.SHA256()).hex()
    assert issuer == "CN=ca,O=Test CA\\; Inc,C=DE"
    assert subject == GO_SUBJECT
    assert san == "localhost,ntp.example"  # DNS names only, in order


def test_no_alternative_names_is_an_empty_label() -> None:
    assert leaf_labels(_leaf(None))[3] == ""


@pytest.mark.parametrize(("name", "text"), [
    (_name(), ""),
    (_name([A(NameOID.COMMON_NAME, "a b")]), "CN=a b"),  # inner space kept as is
    (_name([A(NameOID.COMMON_NAME, "x" * 64)]), "CN=" + "x" * 64),
    # A long value's DER has a long-form length.
    (_name([A(NameOID.EMAIL_ADDRESS, "a@" + "b" * 200)]),
     "1.2.840.113549.1.9.1=#0c81ca" + ("a@" + "b" * 200).encode().hex()),
])
def test_go_name(name: x509.Name, text: str) -> None:
    assert leaf_labels(_leaf(None, subject=name))[2] == text


def _der(tag: int, body: bytes) -> bytes:
    return bytes((tag, len(body))) + body


def _raw_name(*atvs: tuple[bytes, int, bytes]) -> bytes:
    """A Name's DER contents that cryptography would refuse to build: one RDN for each
    (OID DER, string tag, value bytes)."""
    return b"".join(_der(0x31, _der(0x30, _der(0x06, oid) + _der(tag, value)))
                    for oid, tag, value in atvs)


CN, ORG, SERIAL = (bytes((0x55, 0x04, n)) for n in (3, 10, 5))


@pytest.mark.parametrize(("atvs", "text"), [
    # Go (and OpenSSL) take a wildcard in a PrintableString; cryptography refuses it.
    ([(CN, 0x13, b"*.example.net")], "CN=*.example.net"),
    # A T61String's Latin-1 byte is not UTF-8: Go prints U+FFFD for it.
    ([(CN, 0x14, b"M\xfcller")], "CN=M\ufffdller"),
    ([(CN, 0x1E, "Zeit".encode("utf-16-be"))], "CN=Zeit"),  # BMPString
    ([(CN, 0x1E, "host\0".encode("utf-16-be"))], "CN=host"),  # its NUL terminator dropped
    # Each byte that is not UTF-8 is one U+FFFD, as Go prints it; under a type Go does not
    # know, such text cannot be marshalled, so Go prints it as text (blackbox 0.23 did).
    ([(CN, 0x14, b"\xe9\x80x")], "CN=\ufffd\ufffdx"),
    ([(bytes.fromhex("2b0601040182370101"), 0x14, b"ab\xe9")],
     "1.3.6.1.4.1.311.1.1=ab\ufffd"),
    # Go leaves out an empty CN or serial number and keeps the last CN only, even an
    # empty one; an empty O it prints (blackbox 0.23 printed these).
    ([(SERIAL, 0x13, b""), (CN, 0x0C, b"n"), (ORG, 0x0C, b"o")], "CN=n,O=o"),
    ([(CN, 0x0C, b"real"), (CN, 0x0C, b"")], ""),
    ([(ORG, 0x0C, b"")], "O="),
])
def test_names_are_read_as_leniently_as_go_reads_them(
        atvs: list[tuple[bytes, int, bytes]], text: str) -> None:
    assert go_name(_raw_name(*atvs)) == text


@pytest.mark.parametrize("der", [b"", b"\x30", b"\x30\x03\x02\x01", b"\x04\x00",
                                 b"\x30\x84\xff\xff\xff\xff"])
def test_what_is_no_certificate_is_an_error_not_a_crash(der: bytes) -> None:
    with pytest.raises(CertificateError):
        leaf_labels(der)


def test_an_oid_too_long_to_print_is_an_error_not_a_crash() -> None:
    # One arc of 2,000 bytes is past Python's int-to-str limit.
    def der(tag: int, body: bytes) -> bytes:
        return bytes((tag, 0x82)) + len(body).to_bytes(2, "big") + body
    oid = der(0x06, b"\xff" * 1999 + b"\x7f")
    with pytest.raises(CertificateError):
        go_name(der(0x31, der(0x30, oid + der(0x0C, b"x"))))


# --- what the probe judges: validity, extended key usage, subjectAltNames -------------


def _long(tag: int, body: bytes) -> bytes:
    n = len(body)
    return bytes((tag, n)) + body if n < 128 else bytes((tag, 0x82)) + n.to_bytes(2, "big") + body


def _skeleton(times: tuple[bytes, bytes], *extensions: tuple[bytes, bytes]) -> bytes:
    """A certificate's DER as far as the reader looks: ``times`` (whole DER elements) and
    extensions (OID contents, value); serial, algorithm and key are stand-ins."""
    exts = b"".join(_long(0x30, _der(0x06, oid) + _long(0x04, value))
                    for oid, value in extensions)
    tbs = (_der(0xA0, _der(0x02, b"\x02")) + _der(0x02, b"\x07") + _der(0x30, b"")
           + _der(0x30, b"") + _der(0x30, times[0] + times[1]) + _der(0x30, b"")
           + _der(0x30, b"") + (_long(0xA3, _long(0x30, exts)) if extensions else b""))
    return _long(0x30, _long(0x30, tbs) + _der(0x30, b"") + _der(0x03, b"\0"))


UTC_2026 = _der(0x17, b"260101000000Z")  # 1767225600
SAN, EKU = bytes((0x55, 0x1D, 0x11)), bytes((0x55, 0x1D, 0x25))


@pytest.mark.parametrize(("element", "seconds"), [
    (_der(0x17, b"491231235959Z"), 2524607999),  # UTCTime 49: 2049
    (_der(0x17, b"500101000000Z"), -631152000),  # 50: 1950 (RFC 5280, 4.1.2.5.1)
    (_der(0x17, b"2601010000Z"), 1767225600),  # minutes only: Go takes it
    (_der(0x17, b"260101010000+0100"), 1767225600),  # an offset
    (_der(0x18, b"20500101000000Z"), 2524608000),  # GeneralizedTime
])
def test_validity_times_are_read_as_go_reads_them(element: bytes, seconds: int) -> None:
    cert = read(_skeleton((UTC_2026, element)))
    assert (cert.not_before, cert.not_after) == (1767225600, seconds)


@pytest.mark.parametrize("element", [
    _der(0x18, b"20500101000000.5Z"),  # a fraction: Go re-prints without it and refuses
    _der(0x17, b"260101000000+0000"),  # a zero offset Go re-prints as Z
    _der(0x17, b"260230000000Z"),  # 30 February
    _der(0x17, b"260101000060Z"),  # second 60
    _der(0x18, b"500101000000Z"),  # a UTCTime's digits under GeneralizedTime's tag
    _der(0x04, b"260101000000Z"),  # no time type
])
def test_a_time_go_refuses_makes_the_certificate_unreadable(element: bytes) -> None:
    with pytest.raises(CertificateError, match="validity"):
        read(_skeleton((UTC_2026, element)))


def test_key_usage_and_names_are_read_from_the_der() -> None:
    server_auth = bytes.fromhex("2b06010505070301")
    names = (_der(0x82, b"ntp.example") + _der(0x87, bytes((127, 0, 0, 1)))
             + _der(0x81, b"ops@example") + _der(0x82, b"*.example"))
    cert = read(_skeleton((UTC_2026, UTC_2026), (EKU, _der(0x30, _der(0x06, server_auth))),
                          (SAN, _der(0x30, names))))
    assert cert.problem is None
    assert cert.extended_key_usage == ("1.3.6.1.5.5.7.3.1",)
    assert cert.dns_names == (b"ntp.example", b"*.example")  # e-mail left out, as Go does
    assert cert.ip_addresses == (bytes((127, 0, 0, 1)),)
    assert read(_skeleton((UTC_2026, UTC_2026))).extended_key_usage is None  # none at all
    # An empty list Go takes as no restriction (RFC 5280 wants one at least).
    assert read(_skeleton((UTC_2026, UTC_2026), (EKU, _der(0x30, b"")))).extended_key_usage == ()


@pytest.mark.parametrize(("extensions", "problem"), [
    ([(SAN, _der(0x30, b"")), (SAN, _der(0x30, b""))], "duplicate extension 2.5.29.17"),
    ([(SAN, b"\x30\x04\x82\x05ab")], "truncated"),
    ([(EKU, _der(0x30, _der(0x04, b"x")))], "bad extended key usage"),
    ([(EKU, _der(0x04, b""))], "bad extended key usage"),
    ([(SAN, _der(0x30, _der(0x87, b"\x7f\0\0")))], "bad subjectAltName"),  # 3 bytes
    ([(SAN, _der(0x30, _der(0x82, "zeit.bü".encode())))], "bad subjectAltName"),  # not IA5
])
def test_extensions_that_do_not_parse_are_the_certificates_problem(
        extensions: list[tuple[bytes, bytes]], problem: str) -> None:
    # Go refuses such a certificate; its expiry is still read (and reported).
    cert = read(_skeleton((UTC_2026, UTC_2026), *extensions))
    assert cert.problem == problem and cert.not_after == 1767225600
    assert (cert.extended_key_usage, cert.dns_names, cert.ip_addresses) == (None, (), ())


def test_a_real_certificates_facts() -> None:
    der = _leaf([x509.DNSName("localhost"), x509.IPAddress(IPv4Address("127.0.0.1"))])
    loaded = x509.load_der_x509_certificate(der)
    cert = read(der)
    assert cert.der == der
    assert cert.not_before == loaded.not_valid_before_utc.timestamp()
    assert cert.not_after == loaded.not_valid_after_utc.timestamp()
    assert (cert.dns_names, cert.ip_addresses) == ((b"localhost",), (bytes((127, 0, 0, 1)),))
