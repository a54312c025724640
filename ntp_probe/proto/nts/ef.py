"""Sans-IO NTS extension fields for NTPv4 (RFC 8915 §5.3-§5.7).

A client request carries, after the 48-byte NTP header: a Unique Identifier, one NTS Cookie,
zero or more Cookie Placeholders and, last, the NTS Authenticator and Encrypted Extension
Fields, whose AEAD tag covers every byte before it. The reply must echo the Unique Identifier
inside the authenticated part and carry an authenticator made with the server-to-client key;
its encrypted fields hold the new cookies.

Extension fields are handled here as raw bytes (RFC 7822 framing: ``type(16) | length(16) |
value``, length a multiple of 4 and at least 16) so that the authenticated bytes are exactly
the bytes sent: the caller appends :func:`build_request_fields` to the header unchanged.

AEAD algorithms are looked up in :data:`AEAD_ALGORITHMS`, keyed by their RFC 5116 registry id.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum
from types import MappingProxyType
from typing import ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

HEADER_LEN = 48
MIN_UID_LENGTH = 32  # RFC 8915 §5.3
MAX_PLACEHOLDERS = 7  # RFC 8915 §5.7: keep at most 8 unused cookies, one of them being sent
NAK_KISS_CODE = b"NTSN"  # RFC 8915 §5.7, registry §7.4
EXPORTER_LABEL = b"EXPORTER-network-time-security"  # RFC 8915 §5.1
AEAD_AES_SIV_CMAC_256 = 15

_FIELD_HEADER = struct.Struct("!HH")
_AUTH_LENGTHS = struct.Struct("!HH")
_EXPORTER_CONTEXT = struct.Struct("!HHB")
_MIN_FIELD_LEN = 16  # RFC 7822 §3
_NTPV4_PROTOCOL_ID = 0
_STRATUM_OFFSET = 1
_REFID = slice(12, 16)


class FieldType(IntEnum):
    """NTP extension field types defined by RFC 8915 §5.3-§5.6 (registry §7.5)."""

    UNIQUE_IDENTIFIER = 0x0104
    NTS_COOKIE = 0x0204
    COOKIE_PLACEHOLDER = 0x0304
    NTS_AUTHENTICATOR = 0x0404


class Direction(IntEnum):
    """Key direction octet of the exporter context (RFC 8915 §5.1)."""

    C2S = 0
    S2C = 1


@dataclass(frozen=True, slots=True)
class ExtensionField:
    """One NTP extension field; ``value`` excludes the type/length header, padding included."""

    field_type: int
    value: bytes


@dataclass(frozen=True, slots=True)
class AEADAlgorithm:
    """How one AEAD algorithm is used in NTS.

    ``encrypt(key, nonce, plaintext, ad)`` and ``decrypt(key, nonce, ciphertext, ad)`` hide the
    differences between cipher APIs; ``decrypt`` raises ``InvalidTag`` on forgery.
    """

    aead_id: int
    name: str
    key_length: int
    nonce_length: int  # what this client draws
    min_nonce_length: int
    max_nonce_length: int | None  # None: unbounded
    encrypt: Callable[[bytes, bytes, bytes, bytes], bytes]
    decrypt: Callable[[bytes, bytes, bytes, bytes], bytes]

    @property
    def required_nonce_space(self) -> int:
        """N_REQ of RFC 8915 §5.6: nonce plus additional padding must fill at least this."""
        cap = 16 if self.max_nonce_length is None else min(16, self.max_nonce_length)
        return _padded_length(cap)


def _siv_encrypt(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    # RFC 5297 §3: in nonce-based use the nonce is the last associated-data component.
    return AESSIV(key).encrypt(plaintext, [ad, nonce])


def _siv_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, ad: bytes) -> bytes:
    return AESSIV(key).decrypt(ciphertext, [ad, nonce])


def _siv(aead_id: int, name: str, key_length: int) -> AEADAlgorithm:
    return AEADAlgorithm(aead_id, name, key_length, 16, 1, None, _siv_encrypt, _siv_decrypt)


AEAD_ALGORITHMS: Mapping[int, AEADAlgorithm] = MappingProxyType({
    a.aead_id: a
    for a in (
        _siv(AEAD_AES_SIV_CMAC_256, "AEAD_AES_SIV_CMAC_256", 32),
        _siv(16, "AEAD_AES_SIV_CMAC_384", 48),
        _siv(17, "AEAD_AES_SIV_CMAC_512", 64),
    )
})


def aead_algorithm(aead_id: int) -> AEADAlgorithm:
    """The algorithm registered under ``aead_id``; ValueError if it is not supported."""
    try:
        return AEAD_ALGORITHMS[aead_id]
    except KeyError:
        raise ValueError(f"unsupported AEAD algorithm {aead_id}") from None


def exporter_context(aead_id: int, direction: Direction) -> bytes:
    """The TLS exporter context for NTPv4 keys (RFC 8915 §5.1): protocol, AEAD id, direction."""
    return _EXPORTER_CONTEXT.pack(_NTPV4_PROTOCOL_ID, aead_id, direction)


class NTSReplyError(Exception):
    """A reply that must not be used; ``reason`` is the probe failure reason."""

    reason: ClassVar[str] = "nts_auth_failed"


class NTSReplyMalformed(NTSReplyError):
    """The extension fields cannot be parsed, so the reply cannot be authenticated."""


class NTSNoAuthenticator(NTSReplyError):
    """The reply has no NTS Authenticator field."""


class NTSAuthFailed(NTSReplyError):
    """The authenticator does not verify with the server-to-client key."""


class NTSUIDMismatch(NTSReplyError):
    """The authenticated Unique Identifier is missing or not ours: not a reply to our request.

    RFC 8915 §5.7 has the client discard such a packet; ``nak`` tells whether it looked
    like an NTS NAK, which must be ignored too.
    """

    reason = "nts_uid_mismatch"

    def __init__(self, message: str, *, nak: bool = False) -> None:
        self.nak = nak
        super().__init__(message)


class NTSNak(NTSReplyError):
    """An NTS NAK (kiss code NTSN) echoing our UID: the server rejected cookie or MAC.

    It is unauthenticated (RFC 8915 §5.7): never use its timestamps.
    """

    reason = "nts_nak"


@dataclass(frozen=True, slots=True)
class VerifiedReply:
    """What an authenticated reply carried."""

    cookies: tuple[bytes, ...]
    encrypted_fields: tuple[ExtensionField, ...]
    unauthenticated_field_types: tuple[int, ...] = ()  # after the authenticator; ignored


def _padded_length(n: int) -> int:
    return n + (-n % 4)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def encode_field(field_type: int, value: bytes) -> bytes:
    """Encode one field, zero-padded to a multiple of 4 octets and at least 16 (RFC 7822)."""
    body = _pad(value)
    body += b"\0" * max(0, _MIN_FIELD_LEN - _FIELD_HEADER.size - len(body))
    if _FIELD_HEADER.size + len(body) > 0xFFFF:
        raise ValueError(f"extension field value of {len(value)} bytes is too long")
    return _FIELD_HEADER.pack(field_type, _FIELD_HEADER.size + len(body)) + body


def build_request_fields(
    header: bytes,
    uid: bytes,
    cookie: bytes,
    c2s_key: bytes,
    *,
    placeholders: int = 0,
    aead_id: int = AEAD_AES_SIV_CMAC_256,
    nonce: bytes | None = None,
) -> bytes:
    """Extension fields of an NTS client request, to be appended to ``header`` as they are.

    Order: Unique Identifier, NTS Cookie, ``placeholders`` Cookie Placeholders as long as the
    cookie field (RFC 8915 §5.5), then the Authenticator, whose associated data is the header
    and the preceding fields and whose plaintext is empty (§5.6). ``nonce`` defaults to fresh
    random bytes of the algorithm's nonce length.
    """
    aead = aead_algorithm(aead_id)
    if len(header) != HEADER_LEN:
        raise ValueError(f"NTP header must be {HEADER_LEN} bytes, got {len(header)}")
    if len(uid) < MIN_UID_LENGTH:
        raise ValueError(f"unique identifier must be at least {MIN_UID_LENGTH} bytes")
    if not cookie:
        raise ValueError("cookie is empty")
    if not 0 <= placeholders <= MAX_PLACEHOLDERS:
        raise ValueError(f"placeholders must be 0..{MAX_PLACEHOLDERS}, got {placeholders}")
    if len(c2s_key) != aead.key_length:
        raise ValueError(f"{aead.name} needs a {aead.key_length}-byte key, got {len(c2s_key)}")
    if nonce is None:
        nonce = os.urandom(aead.nonce_length)
    if not _nonce_length_ok(aead, len(nonce)):
        raise ValueError(f"{aead.name} cannot take a {len(nonce)}-byte nonce")
    cookie_field = encode_field(FieldType.NTS_COOKIE, cookie)
    # The placeholder's value has the cookie field's padded length, so the fields match.
    placeholder = encode_field(FieldType.COOKIE_PLACEHOLDER, bytes(len(cookie_field) - 4))
    fields = encode_field(FieldType.UNIQUE_IDENTIFIER, uid) + cookie_field
    fields += placeholder * placeholders
    tag = aead.encrypt(c2s_key, nonce, b"", header + fields)
    authenticator = _authenticator_value(aead, nonce, tag)
    return fields + encode_field(FieldType.NTS_AUTHENTICATOR, authenticator)


def _nonce_length_ok(aead: AEADAlgorithm, length: int) -> bool:
    upper = aead.max_nonce_length
    return aead.min_nonce_length <= length and (upper is None or length <= upper)


def _authenticator_value(aead: AEADAlgorithm, nonce: bytes, ciphertext: bytes) -> bytes:
    padded_nonce = _pad(nonce)
    additional = max(0, aead.required_nonce_space - len(padded_nonce))
    return (_AUTH_LENGTHS.pack(len(nonce), len(ciphertext)) + padded_nonce + _pad(ciphertext)
            + bytes(additional))


def _parse_fields(data: bytes, start: int) -> list[tuple[int, ExtensionField]]:
    """(offset, field) pairs covering ``data[start:]`` exactly."""
    out: list[tuple[int, ExtensionField]] = []
    offset = start
    while offset < len(data):
        if len(data) - offset < _FIELD_HEADER.size:
            raise NTSReplyMalformed(f"{len(data) - offset} stray bytes at offset {offset}")
        field_type, length = _FIELD_HEADER.unpack_from(data, offset)
        if length < _FIELD_HEADER.size or length % 4 or offset + length > len(data):
            raise NTSReplyMalformed(
                f"bad extension field at offset {offset}: type 0x{field_type:04x} "
                f"length {length}"
            )
        out.append((offset, ExtensionField(field_type, bytes(data[offset + 4 : offset + length]))))
        offset += length
    return out


def _split_authenticator(value: bytes, aead: AEADAlgorithm) -> tuple[bytes, bytes]:
    if len(value) < _AUTH_LENGTHS.size:
        raise NTSReplyMalformed("authenticator shorter than its length fields")
    nonce_length, ciphertext_length = _AUTH_LENGTHS.unpack_from(value)
    nonce_start = _AUTH_LENGTHS.size
    ciphertext_start = nonce_start + _padded_length(nonce_length)
    if ciphertext_start + _padded_length(ciphertext_length) > len(value):
        raise NTSReplyMalformed(
            f"authenticator of {len(value)} bytes cannot hold a {nonce_length}-byte nonce "
            f"and {ciphertext_length} bytes of ciphertext"
        )
    if not _nonce_length_ok(aead, nonce_length):
        raise NTSReplyMalformed(f"{aead.name} cannot take a {nonce_length}-byte nonce")
    return (
        value[nonce_start : nonce_start + nonce_length],
        value[ciphertext_start : ciphertext_start + ciphertext_length],
    )


def is_nak_header(packet: bytes) -> bool:
    """True if the header is a Kiss-o'-Death with kiss code NTSN (RFC 8915 §5.7)."""
    return (
        len(packet) >= HEADER_LEN
        and packet[_STRATUM_OFFSET] == 0
        and packet[_REFID] == NAK_KISS_CODE
    )


def verify_reply(
    packet: bytes,
    uid: bytes,
    s2c_key: bytes,
    *,
    aead_id: int = AEAD_AES_SIV_CMAC_256,
) -> VerifiedReply:
    """Authenticate an NTS reply (header and extension fields) and extract its new cookies.

    Checks, in order (RFC 8915 §5.6-§5.7): an NTS NAK echoing ``uid`` raises
    :class:`NTSNak`; a reply with no extension field at all raises
    :class:`NTSNoAuthenticator`; otherwise the Unique Identifier before the authenticator must equal
    ``uid``; there must be exactly one authenticator; it must verify with ``s2c_key`` over
    every byte before it; its plaintext must parse as extension fields. Fields after the
    authenticator are unauthenticated and ignored. Origin timestamp and mode are the
    caller's to check. Raises an :class:`NTSReplyError` subclass.
    """
    aead = aead_algorithm(aead_id)
    if len(s2c_key) != aead.key_length:
        raise ValueError(f"{aead.name} needs a {aead.key_length}-byte key, got {len(s2c_key)}")
    if len(uid) < MIN_UID_LENGTH:
        raise ValueError(f"unique identifier must be at least {MIN_UID_LENGTH} bytes")
    if len(packet) < HEADER_LEN:
        raise NTSReplyMalformed(f"packet of {len(packet)} bytes has no full NTP header")
    fields = _parse_fields(packet, HEADER_LEN)
    expected_uid = encode_field(FieldType.UNIQUE_IDENTIFIER, uid)[4:]

    if is_nak_header(packet):
        uids = [f.value for _, f in fields if f.field_type == FieldType.UNIQUE_IDENTIFIER]
        if uids == [expected_uid]:
            raise NTSNak("server answered with an NTS NAK")
        raise NTSUIDMismatch("NTS NAK does not echo our unique identifier", nak=True)

    auth_indexes = [
        i for i, (_, f) in enumerate(fields) if f.field_type == FieldType.NTS_AUTHENTICATOR
    ]
    authenticated = fields[: auth_indexes[0]] if auth_indexes else fields
    uids = [f.value for _, f in authenticated if f.field_type == FieldType.UNIQUE_IDENTIFIER]
    if len(uids) > 1:
        raise NTSReplyMalformed(f"{len(uids)} unique identifier fields")
    if not fields:
        # Plain NTP answering our request (the caller matched its origin): the NTS fields
        # stripped on the way, or a server that ignores them. Unauthenticated, not foreign.
        raise NTSNoAuthenticator("reply carries no NTS fields: unauthenticated")
    if uids != [expected_uid]:
        raise NTSUIDMismatch("reply does not carry our unique identifier")
    if not auth_indexes:
        raise NTSNoAuthenticator("reply has no NTS authenticator")
    if len(auth_indexes) > 1:
        raise NTSReplyMalformed(f"{len(auth_indexes)} NTS authenticator fields")

    offset, authenticator = fields[auth_indexes[0]]
    nonce, ciphertext = _split_authenticator(authenticator.value, aead)
    try:
        plaintext = aead.decrypt(s2c_key, nonce, ciphertext, packet[:offset])
    except (InvalidTag, ValueError):
        raise NTSAuthFailed("NTS authenticator does not verify") from None
    inner = [f for _, f in _parse_fields(plaintext, 0)]
    return VerifiedReply(
        # An empty cookie could never be sent back (a request needs one): not a cookie.
        cookies=tuple(f.value for f in inner if f.field_type == FieldType.NTS_COOKIE and f.value),
        encrypted_fields=tuple(inner),
        unauthenticated_field_types=tuple(f.field_type for _, f in fields[auth_indexes[0] + 1:]),
    )
