"""Sans-IO NTPv4 codec (RFC 5905, RFC 7822 extension fields).

Nothing here touches a socket or a clock: callers pass bytes and integers in and
get bytes and dataclasses out, so the codec is tested with byte vectors alone.

Timestamps are kept as raw 64-bit NTP timestamp integers (32.32 fixed point,
modulo 2**64). Arithmetic between them goes through :func:`ts_diff`, which is
era-safe for any two instants less than 68 years apart; absolute times are only
converted to Unix time against a pivot (:func:`ts_to_unix_ns`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

HEADER_LEN = 48
NTP_UNIX_DELTA = 2_208_988_800  # seconds from 1900-01-01 (NTP era 0) to 1970-01-01
ERA_SECONDS = 1 << 32
_TS_MOD = 1 << 64
_FRAC = 1 << 32
_NS = 1_000_000_000

# RFC 7822: a MAC is a 4-byte key id plus a digest (crypto-NAK: key id only); anything
# longer than 24 octets after the header or the last extension field is an extension field.
_MAX_MAC_LEN = 24
_MAC_LENGTHS = (4, 20, 24)
_MIN_EF_LEN = 16
_MIN_LAST_EF_LEN = 28  # without a MAC, so that the last field cannot be read as one

_HEADER = struct.Struct("!BBbbII4sQQQQ")


class NTPDecodeError(ValueError):
    """Raised for any packet that is not a well-formed NTP message."""


class Mode(IntEnum):
    """NTP association modes (RFC 5905 figure 10)."""

    RESERVED = 0
    SYMMETRIC_ACTIVE = 1
    SYMMETRIC_PASSIVE = 2
    CLIENT = 3
    SERVER = 4
    BROADCAST = 5
    CONTROL = 6
    PRIVATE = 7


class Leap(IntEnum):
    """Leap indicator values."""

    NONE = 0
    INSERT = 1
    DELETE = 2
    UNSYNCHRONIZED = 3


@dataclass(frozen=True, slots=True)
class ExtensionField:
    """One RFC 7822 extension field; ``value`` excludes the 4-byte type/length header."""

    field_type: int
    value: bytes

    def encode(self, min_length: int = 16) -> bytes:
        """Encode with zero padding to a multiple of 4 and at least ``min_length`` octets."""
        body = self.value + b"\0" * (-len(self.value) % 4)
        length = max(4 + len(body), min_length)
        body += b"\0" * (length - 4 - len(body))
        return struct.pack("!HH", self.field_type, length) + body


@dataclass(frozen=True, slots=True)
class Packet:
    """A decoded NTP packet. Timestamps are raw 64-bit NTP timestamps."""

    leap: int
    version: int
    mode: int
    stratum: int
    poll: int
    precision: int
    root_delay: int  # raw NTP short format (16.16, unsigned)
    root_dispersion: int  # raw NTP short format
    refid: bytes
    reference_ts: int
    origin_ts: int
    receive_ts: int
    transmit_ts: int
    extensions: tuple[ExtensionField, ...] = ()
    mac: bytes | None = None

    @property
    def root_delay_seconds(self) -> float:
        """Root delay in seconds."""
        return short_to_seconds(self.root_delay)

    @property
    def root_dispersion_seconds(self) -> float:
        """Root dispersion in seconds."""
        return short_to_seconds(self.root_dispersion)

    @property
    def precision_seconds(self) -> float:
        """Server clock precision in seconds (2**precision)."""
        return 2.0**self.precision

    @property
    def kiss_code(self) -> str | None:
        """The kiss code if this is a Kiss-o'-Death packet, else None."""
        return kiss_code(self.stratum, self.refid)

    @property
    def refid_text(self) -> str:
        """The reference id as operators read it (see :func:`format_refid`)."""
        return format_refid(self.stratum, self.refid)


def encode_request(
    transmit_ts: int,
    version: int = 4,
    extensions: tuple[ExtensionField, ...] = (),
) -> bytes:
    """Encode a client (mode 3) request.

    Per draft-ietf-ntp-data-minimization every header field is zero except the
    leap/version/mode octet and the transmit timestamp, which the caller fills with
    a random nonce (the real T1 stays local).
    """
    if not 1 <= version <= 7:
        raise ValueError(f"NTP version must be 1..7, got {version}")
    if not 0 <= transmit_ts < _TS_MOD:
        raise ValueError("transmit timestamp must be an unsigned 64-bit integer")
    first = (0 << 6) | (version << 3) | Mode.CLIENT
    header = _HEADER.pack(first, 0, 0, 0, 0, 0, b"\0\0\0\0", 0, 0, 0, transmit_ts)
    return header + _encode_extensions(extensions, has_mac=False)


def _encode_extensions(extensions: tuple[ExtensionField, ...], has_mac: bool) -> bytes:
    last = len(extensions) - 1
    return b"".join(
        ef.encode(_MIN_EF_LEN if has_mac or i < last else _MIN_LAST_EF_LEN)
        for i, ef in enumerate(extensions)
    )


def encode_packet(p: Packet) -> bytes:
    """Encode any packet (used by servers, fakes and tests)."""
    first = ((p.leap & 3) << 6) | ((p.version & 7) << 3) | (p.mode & 7)
    out = _HEADER.pack(
        first,
        p.stratum & 0xFF,
        p.poll,
        p.precision,
        p.root_delay,
        p.root_dispersion,
        p.refid,
        p.reference_ts,
        p.origin_ts,
        p.receive_ts,
        p.transmit_ts,
    )
    out += _encode_extensions(p.extensions, has_mac=p.mac is not None)
    if p.mac is not None:
        out += p.mac
    return out


def decode(data: bytes) -> Packet:
    """Decode an NTP packet; raise :class:`NTPDecodeError` if it is malformed."""
    if len(data) < HEADER_LEN:
        raise NTPDecodeError(f"short packet: {len(data)} bytes, need {HEADER_LEN}")
    (first, stratum, poll, precision, root_delay, root_disp, refid, ref_ts, org_ts, rec_ts,
     xmt_ts) = _HEADER.unpack_from(data)
    version = (first >> 3) & 7
    if version == 0:
        raise NTPDecodeError("version 0 is not NTP")
    extensions: list[ExtensionField] = []
    mac: bytes | None = None
    offset = HEADER_LEN
    while len(data) - offset > _MAX_MAC_LEN:
        if version < 4:
            raise NTPDecodeError(f"NTPv{version} packet with {len(data) - offset} trailing bytes")
        ftype, flen = struct.unpack_from("!HH", data, offset)
        if flen < _MIN_EF_LEN or flen % 4 or offset + flen > len(data):
            raise NTPDecodeError(
                f"bad extension field at byte {offset}: type 0x{ftype:04x} length {flen}"
            )
        extensions.append(ExtensionField(ftype, bytes(data[offset + 4 : offset + flen])))
        offset += flen
    rest = len(data) - offset
    if rest:
        if rest not in _MAC_LENGTHS:
            raise NTPDecodeError(f"trailing {rest} bytes are neither a MAC nor an extension field")
        mac = bytes(data[offset:])
    return Packet(
        leap=first >> 6,
        version=version,
        mode=first & 7,
        stratum=stratum,
        poll=poll,
        precision=precision,
        root_delay=root_delay,
        root_dispersion=root_disp,
        refid=refid,
        reference_ts=ref_ts,
        origin_ts=org_ts,
        receive_ts=rec_ts,
        transmit_ts=xmt_ts,
        extensions=tuple(extensions),
        mac=mac,
    )


# --- formats -------------------------------------------------------------------------


def short_to_seconds(raw: int) -> float:
    """NTP short format (unsigned 16.16 fixed point) to seconds."""
    return raw / 65536.0


def seconds_to_short(seconds: float) -> int:
    """Seconds to NTP short format, clamped to the representable range."""
    return max(0, min(0xFFFFFFFF, round(seconds * 65536)))


def ts_from_unix_ns(unix_ns: int) -> int:
    """Unix time in integer nanoseconds to a 64-bit NTP timestamp (era folded away)."""
    secs, ns = divmod(unix_ns, _NS)
    frac = (ns << 32) // _NS
    return (((secs + NTP_UNIX_DELTA) % ERA_SECONDS) << 32) | frac


def ts_to_unix_ns(ts: int, pivot_unix_ns: int) -> int:
    """A 64-bit NTP timestamp to Unix nanoseconds, choosing the era nearest the pivot.

    Exact for any timestamp within 68 years of the pivot (RFC 5905 section 6).
    """
    pivot_ts = ts_from_unix_ns(pivot_unix_ns)
    return pivot_unix_ns + ts_diff_ns(ts, pivot_ts)


def ts_diff(a: int, b: int) -> int:
    """a - b as a signed count of 2**-32 s, modulo 2**64 (era-safe)."""
    d = (a - b) % _TS_MOD
    return d - _TS_MOD if d >= 1 << 63 else d


def ts_diff_ns(a: int, b: int) -> int:
    """a - b in integer nanoseconds (era-safe, rounded to nearest).

    2**-32 s is finer than 1 ns, so rounding to nearest makes a Unix-ns -> NTP -> Unix-ns
    round trip exact whatever the pivot.
    """
    return (ts_diff(a, b) * _NS + (1 << 31)) >> 32


def frac_to_seconds(frac: int) -> float:
    """A signed count of 2**-32 s to float seconds (for differences, never absolute times)."""
    return frac / _FRAC


# --- reference ids and kiss codes -------------------------------------------------------


def _printable_code(refid: bytes) -> str | None:
    # Printable as C's isprint() reads it (space included): a stratum-0 packet with such a
    # refid is a kiss code, whose timestamps must never be used.
    code = refid.rstrip(b"\0")
    if code and all(0x20 <= c <= 0x7E for c in code):
        return code.decode("ascii")
    return None


def kiss_code(stratum: int, refid: bytes) -> str | None:
    """Kiss code of a stratum-0 packet whose refid is printable ASCII, else None.

    An all-zero refid at stratum 0 is an unsynchronised server (chrony), not a KoD.
    """
    if stratum != 0:
        return None
    return _printable_code(refid)


def format_refid(stratum: int, refid: bytes) -> str:
    """Refid as text: ASCII for stratum 0/1 and 16 and above (ntpd's REFID_ISTEXT: an
    unsynchronised server's state, such as INIT or STEP), dotted IPv4 for stratum 2-15,
    hex when the text is not printable.

    At stratum 2-15 an IPv6 upstream's refid is the first 4 octets of its address's MD5;
    it is shown dotted as ntpq and chronyc do.
    """
    if stratum <= 1 or stratum >= 16:
        code = _printable_code(refid)
        return code if code is not None else refid.hex()
    return ".".join(str(b) for b in refid)
