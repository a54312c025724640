"""Sans-IO NTS Key Establishment records (RFC 8915 §4).

An NTS-KE message is a sequence of records, each ``C(1) | type(15) | body length(16) | body``,
terminated by one End of Message record. This module encodes a client request, decodes the
server's response incrementally (records may be split across TLS reads), and validates a
complete response into a :class:`KEResponse` or raises a :class:`KEFailure` whose ``reason``
is the probe failure reason.

Policy on the critical bit (RFC 8915 §4): it tells a receiver that does *not* understand a
record type to abort. It is therefore honoured for unknown types only; a known record type is
interpreted the same way whatever its critical bit says.

Everything read from the server is bounded (:class:`KELimits`): a hostile server can neither
make the decoder buffer without limit nor hand the prober thousands of cookies.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar

_HEADER = struct.Struct("!HH")
_U16 = struct.Struct("!H")
_CRITICAL = 0x8000
_TYPE_MASK = 0x7FFF
_MAX_BODY = 0xFFFF

NTPV4_PROTOCOL_ID = 0  # RFC 8915 §7.7: NTS Next Protocols registry
AEAD_AES_SIV_CMAC_256 = 15  # RFC 5116 registry; mandatory to implement (RFC 8915 §5.1)
DEFAULT_NTP_PORT = 123


class RecordType(IntEnum):
    """NTS-KE record types (RFC 8915 §4.1, registry §7.6)."""

    END_OF_MESSAGE = 0
    NEXT_PROTOCOL = 1
    ERROR = 2
    WARNING = 3
    AEAD_ALGORITHM = 4
    NEW_COOKIE = 5
    NTPV4_SERVER = 6
    NTPV4_PORT = 7


class ErrorCode(IntEnum):
    """NTS-KE Error record codes (RFC 8915 §4.1.3, registry §7.8)."""

    UNRECOGNIZED_CRITICAL_RECORD = 0
    BAD_REQUEST = 1
    INTERNAL_SERVER_ERROR = 2


@dataclass(frozen=True, slots=True)
class Record:
    """One NTS-KE record; ``record_type`` excludes the critical bit."""

    record_type: int
    body: bytes = b""
    critical: bool = False

    def encode(self) -> bytes:
        """Encode as ``C | type | length | body``."""
        if not 0 <= self.record_type <= _TYPE_MASK:
            raise ValueError(f"record type must be 0..32767, got {self.record_type}")
        if len(self.body) > _MAX_BODY:
            raise ValueError(f"record body of {len(self.body)} bytes exceeds 65535")
        first = self.record_type | (_CRITICAL if self.critical else 0)
        return _HEADER.pack(first, len(self.body)) + self.body


@dataclass(frozen=True, slots=True)
class KELimits:
    """Bounds on what a server's NTS-KE response may contain."""

    max_bytes: int = 32768  # whole response; chrony's normal answer is about 900 bytes
    max_records: int = 128
    max_cookies: int = 64  # servers SHOULD send 8 (RFC 8915 §4.1.6)
    max_cookie_length: int = 1024  # a cookie must still fit in an NTP request datagram


DEFAULT_LIMITS = KELimits()


class KEFailure(Exception):
    """An NTS-KE response that cannot be used; ``reason`` is the probe failure reason."""

    reason: ClassVar[str] = "nts_ke_malformed"


class KEMalformed(KEFailure):
    """The response breaks the record framing or RFC 8915 §4 rules."""

    reason = "nts_ke_malformed"


class KEErrorReceived(KEFailure):
    """The server sent an Error record (RFC 8915 §4.1.3)."""

    reason = "nts_ke_error"

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"server sent NTS-KE error {code} ({error_code_name(code)})")


class KEWarningReceived(KEFailure):
    """The server sent a Warning record (RFC 8915 §4.1.4); no warning codes are defined."""

    reason = "nts_ke_warning"

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"server sent NTS-KE warning {code}")


class KENoCommonProtocol(KEFailure):
    """The server's Next Protocol record is empty: it speaks none of the offered protocols."""

    reason = "nts_no_common_protocol"


class KENoCommonAEAD(KEFailure):
    """The server's AEAD Algorithm record is empty: no offered algorithm is supported."""

    reason = "nts_no_common_aead"


class KENoCookies(KEFailure):
    """The response negotiated NTPv4 but carried no cookie."""

    reason = "nts_no_cookies"


@dataclass(frozen=True, slots=True)
class KEResponse:
    """A validated NTS-KE response for NTPv4.

    ``server`` and ``port`` are None when the server did not negotiate them; the NTP exchange
    then goes to the address the KE connection used (RFC 8915 §4.1.7) and to port 123.
    """

    next_protocol: int
    aead_id: int
    cookies: tuple[bytes, ...]
    server: str | None = None
    port: int | None = None
    ignored_record_types: tuple[int, ...] = ()  # unknown non-critical records, in order

    @property
    def ntp_port(self) -> int:
        """The UDP port of the NTP exchange."""
        return DEFAULT_NTP_PORT if self.port is None else self.port


def error_code_name(code: int) -> str:
    """A readable name for an Error record code, ``unknown`` for unassigned codes."""
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return "unknown"


# --- request -------------------------------------------------------------------------


def encode_request(
    aead_ids: Sequence[int] = (AEAD_AES_SIV_CMAC_256,),
    *,
    server: str | None = None,
    port: int | None = None,
) -> bytes:
    """Encode a client NTS-KE request for NTPv4 (RFC 8915 §4).

    Records: Next Protocol [0] (critical, MUST per §4.1.2), AEAD Algorithm ``aead_ids`` in
    preference order (critical: the request is meaningless to a server that ignores it),
    then optionally NTPv4 Server and Port Negotiation (non-critical: they only state a
    preference the server may ignore, §4.1.7-§4.1.8), then End of Message (critical, §4.1.1).
    """
    if not aead_ids:
        raise ValueError("at least one AEAD algorithm must be offered")
    if len(set(aead_ids)) != len(aead_ids):
        raise ValueError(f"duplicate AEAD algorithm in {list(aead_ids)}")
    if any(not 0 <= a <= 0xFFFF for a in aead_ids):
        raise ValueError(f"AEAD algorithm ids must be 0..65535: {list(aead_ids)}")
    records = [
        Record(RecordType.NEXT_PROTOCOL, _U16.pack(NTPV4_PROTOCOL_ID), critical=True),
        Record(RecordType.AEAD_ALGORITHM, _u16_list(aead_ids), critical=True),
    ]
    if server is not None:
        if not is_valid_server_name(server):
            raise ValueError(f"not an IP address literal or host name: {server!r}")
        records.append(Record(RecordType.NTPV4_SERVER, server.encode("ascii")))
    if port is not None:
        if not 1 <= port <= 0xFFFF:
            raise ValueError(f"port must be 1..65535, got {port}")
        records.append(Record(RecordType.NTPV4_PORT, _U16.pack(port)))
    records.append(Record(RecordType.END_OF_MESSAGE, critical=True))
    return b"".join(r.encode() for r in records)


def _u16_list(values: Iterable[int]) -> bytes:
    return b"".join(_U16.pack(v) for v in values)


# --- response framing ----------------------------------------------------------------


class KEDecoder:
    """Incremental decoder for a server's NTS-KE record stream.

    Feed it the bytes of each TLS read; it returns the records completed so far and raises
    :class:`KEMalformed` on framing errors, on data after End of Message and when a bound of
    :class:`KELimits` is exceeded. Call :meth:`finish` when the stream ends. After an
    exception the decoder is spent: the connection must be dropped.
    """

    def __init__(self, limits: KELimits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._buffer = bytearray()
        self._records: list[Record] = []
        self._received = 0
        self._complete = False

    @property
    def complete(self) -> bool:
        """True once the End of Message record has been decoded."""
        return self._complete

    @property
    def records(self) -> tuple[Record, ...]:
        """Every record decoded so far, End of Message included."""
        return tuple(self._records)

    def feed(self, data: bytes) -> list[Record]:
        """Consume ``data``; return the records it completed, in order."""
        if not data:
            return []
        if self._complete:
            raise KEMalformed(f"{len(data)} bytes after End of Message")
        self._received += len(data)
        if self._received > self._limits.max_bytes:
            raise KEMalformed(f"response exceeds {self._limits.max_bytes} bytes")
        self._buffer += data
        new: list[Record] = []
        while len(self._buffer) >= _HEADER.size:
            first, length = _HEADER.unpack_from(self._buffer)
            consumed = self._received - len(self._buffer)
            if consumed + _HEADER.size + length > self._limits.max_bytes:
                # Fail on the declared length rather than after buffering the body.
                raise KEMalformed(f"record of {length} bytes exceeds the response limit")
            if len(self._buffer) < _HEADER.size + length:
                break
            record = Record(
                first & _TYPE_MASK,
                bytes(self._buffer[_HEADER.size : _HEADER.size + length]),
                bool(first & _CRITICAL),
            )
            del self._buffer[: _HEADER.size + length]
            self._records.append(record)
            new.append(record)
            if len(self._records) > self._limits.max_records:
                raise KEMalformed(f"response has more than {self._limits.max_records} records")
            if record.record_type == RecordType.END_OF_MESSAGE:
                if record.body:
                    raise KEMalformed(f"End of Message with a {len(record.body)}-byte body")
                self._complete = True
                if self._buffer:
                    raise KEMalformed(f"{len(self._buffer)} bytes after End of Message")
                break
        return new

    def finish(self) -> tuple[Record, ...]:
        """Declare the end of the stream; return all records or raise if EOM never came."""
        if not self._complete:
            if not self.records and not self._buffer:
                # Often not a broken server: its own session timeout (a slow path), or a
                # refusal by closing (a rate limit): said so, in the failure's words.
                raise KEMalformed("the server closed the session before sending any record")
            pending = f" ({len(self._buffer)} bytes of a partial record)" if self._buffer else ""
            raise KEMalformed(f"stream ended without End of Message{pending}")
        return self.records


# --- response validation -------------------------------------------------------------


def validate_response(
    records: Sequence[Record],
    offered_aead_ids: Sequence[int] = (AEAD_AES_SIV_CMAC_256,),
    limits: KELimits = DEFAULT_LIMITS,
) -> KEResponse:
    """Check a complete server response against RFC 8915 §4 and extract the NTPv4 parameters.

    Precedence: an Error record, then a Warning record, then an unknown critical record,
    then the negotiation checks. Raises a :class:`KEFailure` subclass.
    """
    if not records or records[-1].record_type != RecordType.END_OF_MESSAGE:
        raise KEMalformed("response does not end with End of Message")
    body = records[:-1]
    if any(r.record_type == RecordType.END_OF_MESSAGE for r in body):
        raise KEMalformed("End of Message before the last record")
    error = _first(body, RecordType.ERROR)
    if error is not None:
        raise KEErrorReceived(_single_u16(error, "error"))
    warning = _first(body, RecordType.WARNING)
    if warning is not None:
        raise KEWarningReceived(_single_u16(warning, "warning"))
    known = {int(t) for t in RecordType}
    ignored: list[int] = []
    for r in body:
        if r.record_type not in known:
            if r.critical:
                raise KEMalformed(f"unrecognized critical record type {r.record_type}")
            ignored.append(r.record_type)

    protocol = _negotiated(body, RecordType.NEXT_PROTOCOL, (NTPV4_PROTOCOL_ID,),
                           KENoCommonProtocol, "protocol")
    aead_id = _negotiated(body, RecordType.AEAD_ALGORITHM, offered_aead_ids, KENoCommonAEAD,
                          "AEAD algorithm")
    server = _optional_single(body, RecordType.NTPV4_SERVER)
    server_name: str | None = None
    if server is not None:
        server_name = _decode_server(server.body)
    port_record = _optional_single(body, RecordType.NTPV4_PORT)
    port: int | None = None
    if port_record is not None:
        port = _single_u16(port_record, "port")
        if port == 0:
            raise KEMalformed("port negotiation names port 0")

    cookies = tuple(r.body for r in body if r.record_type == RecordType.NEW_COOKIE)
    if not cookies:
        raise KENoCookies("no New Cookie record in the response")
    if len(cookies) > limits.max_cookies:
        raise KEMalformed(f"{len(cookies)} cookies, more than {limits.max_cookies}")
    for cookie in cookies:
        if not 0 < len(cookie) <= limits.max_cookie_length:
            raise KEMalformed(
                f"cookie of {len(cookie)} bytes, outside 1..{limits.max_cookie_length}"
            )
    return KEResponse(protocol, aead_id, cookies, server_name, port, tuple(ignored))


def parse_response(
    data: bytes,
    offered_aead_ids: Sequence[int] = (AEAD_AES_SIV_CMAC_256,),
    limits: KELimits = DEFAULT_LIMITS,
) -> KEResponse:
    """Decode and validate a whole response received in one piece."""
    decoder = KEDecoder(limits)
    decoder.feed(data)
    return validate_response(decoder.finish(), offered_aead_ids, limits)


def _single_u16(record: Record, what: str) -> int:
    if len(record.body) != _U16.size:
        raise KEMalformed(f"{what} record body is {len(record.body)} bytes, expected 2")
    value: int = _U16.unpack(record.body)[0]
    return value


def _first(records: Sequence[Record], kind: RecordType) -> Record | None:
    return next((r for r in records if r.record_type == kind), None)


def _optional_single(records: Sequence[Record], kind: RecordType) -> Record | None:
    found = [r for r in records if r.record_type == kind]
    if len(found) > 1:
        raise KEMalformed(f"{len(found)} {kind.name} records, at most one allowed")
    return found[0] if found else None


def _negotiated(
    records: Sequence[Record],
    kind: RecordType,
    offered: Sequence[int],
    empty_failure: type[KEFailure],
    what: str,
) -> int:
    """The one id the server picked; §4.1.2 and §4.1.5 allow at most one, from our offer."""
    record = _optional_single(records, kind)
    if record is None:
        raise KEMalformed(f"response has no {kind.name} record")
    if len(record.body) % 2:
        raise KEMalformed(f"{kind.name} record body has odd length {len(record.body)}")
    ids: list[int] = [v for (v,) in _U16.iter_unpack(record.body)]
    if not ids:
        raise empty_failure(f"the server supports no offered {what}")
    if len(ids) > 1:
        raise KEMalformed(f"server chose {len(ids)} values in {kind.name}: {ids}")
    if ids[0] not in offered:
        raise KEMalformed(f"server chose {what} {ids[0]}, which was not offered")
    return ids[0]


_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")


def is_valid_server_name(name: str) -> bool:
    """True for an IPv4 literal, an IPv6 literal without zone, or an ASCII host name.

    RFC 8915 §4.1.7: the body is an IP address literal or a fully qualified domain name in
    ASCII (internationalized names in A-label form); IPv6 zone identifiers are not allowed.
    """
    if not name or not name.isascii():
        return False
    if ":" in name:
        if "%" in name:
            return False
        try:
            ipaddress.IPv6Address(name)
        except ValueError:
            return False
        return True
    host = name[:-1] if name.endswith(".") else name
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
        return False
    if labels[-1].isdigit():
        # All-numeric final label: only a well-formed IPv4 literal is acceptable.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
    return True


def _decode_server(body: bytes) -> str:
    try:
        name = body.decode("ascii")
    except UnicodeDecodeError:
        raise KEMalformed("server negotiation body is not ASCII") from None
    if not is_valid_server_name(name):
        raise KEMalformed(f"server negotiation names an invalid host {name!r}")
    return name
