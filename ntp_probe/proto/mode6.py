"""Sans-IO codec for ntpd's mode 6 control messages (RFC 9327, as ntpsec's ntpd and ntpq speak it).

Requests are built as bytes; each reply datagram is decoded and checked against the
request it answers; a :class:`Reassembler` puts the fragments of one response together;
the response data is then read as an association list (READSTAT) or as variable text
(READVAR), and the typed converters turn raw values into base units.

Nothing here touches a socket or a clock: the era pivot for timestamps is a parameter.
Every decoding function raises :class:`Mode6Error` and nothing else on malformed or hostile
input; request builders raise plain :class:`ValueError` for bad arguments (a caller's bug).
"""

from __future__ import annotations

import calendar
import math
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

HEADER_LEN = 12
MAX_DATA_LEN = 468  # CTL_MAX_DATA_LEN: data octets in one packet, either direction
MAX_FRAGMENTS = 32  # ntpq's MAXFRAGS
MAX_RESPONSE_LEN = MAX_FRAGMENTS * MAX_DATA_LEN
MODE_CONTROL = 6
REQUEST_VERSION = 2  # ntpq sends NTP_OLDVERSION + 1; ntpd echoes the request's version
_MIN_VERSION, _MAX_VERSION = 1, 4  # what ntpq accepts in replies

_HEADER = struct.Struct("!BBHHHHH")
_ASSOC = struct.Struct("!HH")
_RESPONSE, _ERROR, _MORE = 0x80, 0x40, 0x20
_OPCODE_MASK = 0x1F

NTP_UNIX_DELTA = 2_208_988_800  # seconds from 1900-01-01 (NTP era 0) to 1970-01-01
_FRAC = 1 << 32
_TS_MOD = 1 << 64
_MAX_PIVOT = 2.0**53  # seconds; keeps the pivot's 2**-32 s scaling finite (and rejects NaN)
_MAX_LOG2 = 64  # |poll| bound: ntpd uses 3..17, precision about -30; beyond is garbage


class Mode6Error(ValueError):
    """Malformed, mismatched or hostile mode 6 input (a datagram, a response, a value)."""


class Opcode(IntEnum):
    """Mode 6 opcodes (RFC 9327 section 2, ntpsec ``ntp_control.h``)."""

    READSTAT = 1
    READVAR = 2
    WRITEVAR = 3
    READCLOCK = 4
    WRITECLOCK = 5
    CONFIGURE = 8
    READ_MRU = 10
    READ_ORDLIST_A = 11
    REQ_NONCE = 12


class ErrorCode(IntEnum):
    """Error codes carried in the high byte of the status word when E=1 (``CERR_*``)."""

    UNSPEC = 0
    PERMISSION = 1
    BADFMT = 2
    BADOP = 3
    BADASSOC = 4
    UNKNOWNVAR = 5
    BADVALUE = 6
    ADMINPROH = 7  # ntpsec calls it CERR_RESTRICT; RFC 9327: administratively prohibited


# Names as ntpq prints them (ntpsec and ntp classic statustoa, without its "sync_"/"sel_"
# prefixes; the selection names are also ntpq's "condition" column), indexed by code.
SELECTION_NAMES = (
    "reject", "falsetick", "excess", "outlier", "candidate", "backup", "sys.peer", "pps.peer",
)
SYSTEM_SOURCE_NAMES = (
    "unspec", "pps", "lf_radio", "hf_radio", "uhf_radio", "local", "ntp", "other",
    "wristwatch", "telephone",
)
SYSTEM_EVENT_NAMES = (
    "unspecified", "freq_not_set", "freq_set", "spike_detect", "freq_mode", "clock_sync",
    "restart", "panic_stop", "no_sys_peer", "leap_armed", "leap_disarmed", "leap_event",
    "clock_step", "kern", "TAI", "stale_leapsecond_values",
)
PEER_EVENT_NAMES = (
    "unspecified", "mobilize", "demobilize", "unreachable", "reachable", "restart", "no_reply",
    "rate_exceeded", "access_denied", "leap_armed", "sys_peer", "clock_event", "bad_auth",
    "popcorn", "interleave_mode", "interleave_error",
)


def error_name(code: int) -> str:
    """The lower-case ``CERR_*`` name of an error code, or ``unknown`` outside 0..7."""
    try:
        return ErrorCode(code).name.lower()
    except ValueError:
        return "unknown"


# --- requests ----------------------------------------------------------------------------

_VARIABLE_NAME = re.compile(r"[!-~]+")  # printable ASCII, no space


def _check_u16(what: str, value: int) -> None:
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"{what} {value} is not a 16-bit value")


def encode_request(opcode: int, sequence: int, association: int = 0, data: bytes = b"") -> bytes:
    """One mode 6 request: version 2, status and offset 0, data zero-padded to 4 octets.

    Raises ValueError for an opcode outside 1..31, a sequence or association outside
    16 bits, or more than 468 octets of data (ntpd answers those with ``badfmt``).
    """
    if not 1 <= opcode <= _OPCODE_MASK:
        raise ValueError(f"opcode {opcode} outside 1..31")
    _check_u16("sequence", sequence)
    _check_u16("association", association)
    if len(data) > MAX_DATA_LEN:
        raise ValueError(f"request data of {len(data)} octets exceeds {MAX_DATA_LEN}")
    header = _HEADER.pack(
        (REQUEST_VERSION << 3) | MODE_CONTROL, opcode, sequence, 0, association, 0, len(data)
    )
    return header + data + bytes(-len(data) % 4)


def encode_readstat(sequence: int, association: int = 0) -> bytes:
    """READSTAT: with association 0, the list of associations and their status words."""
    return encode_request(Opcode.READSTAT, sequence, association)


def variable_list(names: Iterable[str]) -> bytes:
    """The request data naming ``names``: comma-separated ASCII, no padding.

    Raises ValueError for an empty name or one with a space, comma, '=' or non-ASCII.
    """
    out = []
    for name in names:
        if not _VARIABLE_NAME.fullmatch(name) or "," in name or "=" in name:
            raise ValueError(f"bad variable name {name!r}")
        out.append(name)
    return ",".join(out).encode("ascii")


def encode_readvar(sequence: int, association: int = 0, names: Iterable[str] = ()) -> bytes:
    """READVAR for the system (association 0) or a peer; no names asks for ntpd's default list.

    Raises ValueError when the names do not fit in 468 octets: see :func:`split_variables`.
    """
    return encode_request(Opcode.READVAR, sequence, association, variable_list(names))


def split_variables(names: Sequence[str], limit: int = MAX_DATA_LEN) -> list[list[str]]:
    """Split ``names`` into consecutive lists whose request data each fit in ``limit`` octets.

    Raises ValueError for a bad name or one that alone exceeds ``limit``.
    """
    chunks: list[list[str]] = []
    current: list[str] = []
    size = 0
    for name in names:
        length = len(variable_list([name]))
        if length > limit:
            raise ValueError(f"variable name {name!r} alone exceeds {limit} octets")
        if current and size + 1 + length > limit:
            chunks.append(current)
            current, size = [], 0
        size += length + (1 if current else 0)
        current.append(name)
    if current:
        chunks.append(current)
    return chunks


# --- replies -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    """The 12-octet header of a mode 6 packet, as on the wire (no checks beyond length)."""

    leap: int
    version: int
    mode: int
    response: bool
    error: bool
    more: bool
    opcode: int
    sequence: int
    status: int
    association: int
    offset: int
    count: int


@dataclass(frozen=True, slots=True)
class Fragment:
    """One checked, non-error reply datagram; ``data`` is cut to ``count`` (no pad, no MAC)."""

    header: Header
    data: bytes

    @property
    def offset(self) -> int:
        """Where this fragment's data starts within the whole response."""
        return self.header.offset

    @property
    def end(self) -> int:
        """Where this fragment's data ends within the whole response."""
        return self.header.offset + len(self.data)

    @property
    def more(self) -> bool:
        """More fragments follow (M bit): this is not the last one."""
        return self.header.more


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A checked reply with E=1: the server refused the request with ``code``."""

    code: int
    opcode: int
    sequence: int
    association: int  # ntpd echoes it for badassoc; may be stale for other errors

    @property
    def name(self) -> str:
        """The lower-case ``CERR_*`` name (``unknownvar``, ``badassoc``, ...)."""
        return error_name(self.code)


def decode_header(datagram: bytes) -> Header:
    """The header fields of any mode 6 packet; Mode6Error when shorter than 12 octets."""
    if len(datagram) < HEADER_LEN:
        raise Mode6Error(f"{len(datagram)} octets: shorter than the {HEADER_LEN}-octet header")
    lvm, rmeop, sequence, status, association, offset, count = _HEADER.unpack_from(datagram)
    return Header(
        leap=lvm >> 6, version=(lvm >> 3) & 7, mode=lvm & 7, response=bool(rmeop & _RESPONSE),
        error=bool(rmeop & _ERROR), more=bool(rmeop & _MORE), opcode=rmeop & _OPCODE_MASK,
        sequence=sequence, status=status, association=association, offset=offset, count=count,
    )


def decode_reply(
    datagram: bytes, *, opcode: int, sequence: int, association: int
) -> Fragment | ErrorReply:
    """Check one datagram against the request it should answer and decode it.

    The checks, in ntpq's order: version 1..4, mode 6, R set, sequence and opcode equal to
    the request's; then an E=1 reply is returned as :class:`ErrorReply` (its association is
    not checked: ntpd may leave a stale one in error replies); otherwise the association
    must be the request's, the datagram a multiple of 4 octets holding the padded data,
    count at most 468 and offset + count within :data:`MAX_RESPONSE_LEN`.
    Raises Mode6Error when a check fails.
    """
    h = decode_header(datagram)
    if not _MIN_VERSION <= h.version <= _MAX_VERSION:
        raise Mode6Error(f"version {h.version} outside {_MIN_VERSION}..{_MAX_VERSION}")
    if h.mode != MODE_CONTROL:
        raise Mode6Error(f"mode {h.mode}, not {MODE_CONTROL}")
    if not h.response:
        raise Mode6Error("a request, not a response (R bit clear)")
    if h.sequence != sequence:
        raise Mode6Error(f"sequence {h.sequence}, expected {sequence}")
    if h.opcode != opcode:
        raise Mode6Error(f"opcode {h.opcode}, expected {opcode}")
    if h.error:
        return ErrorReply(h.status >> 8, h.opcode, h.sequence, h.association)
    if h.association != association:
        raise Mode6Error(f"association {h.association}, expected {association}")
    if len(datagram) % 4:
        raise Mode6Error(f"{len(datagram)} octets: not padded to a multiple of 4")
    if h.count > MAX_DATA_LEN:
        raise Mode6Error(f"count {h.count} exceeds {MAX_DATA_LEN}")
    if len(datagram) < HEADER_LEN + h.count + (-h.count % 4):
        raise Mode6Error(f"count {h.count} but only {len(datagram) - HEADER_LEN} data octets")
    if h.offset + h.count > MAX_RESPONSE_LEN:
        raise Mode6Error(f"offset {h.offset} + count {h.count} exceeds {MAX_RESPONSE_LEN}")
    return Fragment(h, datagram[HEADER_LEN : HEADER_LEN + h.count])


@dataclass(frozen=True, slots=True)
class Response:
    """A reassembled response: all data in order, and the last fragment's status word."""

    data: bytes
    status: int
    association: int
    fragments: int


class Reassembler:
    """Collects the fragments of one response (one request's opcode and sequence).

    Fragments are keyed by offset. An identical repeat is a duplicate and ignored; a
    fragment of another response, a different fragment at the same offset, an overlap, a
    second last fragment (M clear), data beyond the last fragment's end, an empty fragment
    with M set, or more than ``max_fragments`` distinct fragments / ``max_length`` octets
    raise Mode6Error. A call that raises leaves the state unchanged, so a caller may drop
    that datagram and go on. Retry a request with a new sequence and a new Reassembler.
    """

    def __init__(
        self, max_fragments: int = MAX_FRAGMENTS, max_length: int = MAX_RESPONSE_LEN
    ) -> None:
        """Limits on distinct fragments and total octets; a hostile server cannot exceed them."""
        self.max_fragments = max_fragments
        self.max_length = max_length
        self._fragments: dict[int, Fragment] = {}  # by offset
        self._received = 0
        self._end: int | None = None
        self._last: Fragment | None = None
        self._key: tuple[int, int, int] | None = None  # opcode, sequence, association

    @property
    def complete(self) -> bool:
        """The last fragment has arrived and the data from 0 to its end has no hole."""
        return self._end is not None and self._received == self._end

    @property
    def last_seen(self) -> bool:
        """The fragment with the M bit clear has arrived."""
        return self._end is not None

    @property
    def fragment_count(self) -> int:
        """Distinct fragments held."""
        return len(self._fragments)

    def gaps(self) -> list[tuple[int, int]]:
        """Missing [start, end) ranges below the highest octet received (or the known end)."""
        ranges = sorted((f.offset, f.end) for f in self._fragments.values())
        holes: list[tuple[int, int]] = []
        at = 0
        for start, end in ranges:
            if start > at:
                holes.append((at, start))
            at = max(at, end)
        if self._end is not None and at < self._end:
            holes.append((at, self._end))
        return holes

    def add(self, fragment: Fragment) -> bool:
        """Take one fragment; True when it was new, False for a duplicate (ignored)."""
        h = fragment.header
        key = (h.opcode, h.sequence, h.association)
        if self._key is not None and key != self._key:
            raise Mode6Error(f"fragment of another response: {key}, expected {self._key}")
        if len(fragment.data) != h.count:
            raise Mode6Error("fragment data length differs from its count")
        known = self._fragments.get(fragment.offset)
        if known is not None:
            if known == fragment:
                return False
            raise Mode6Error(f"a different fragment at offset {fragment.offset}")
        if fragment.more and h.count == 0:
            raise Mode6Error("empty fragment with more to follow")
        if fragment.end > self.max_length:
            raise Mode6Error(f"response exceeds {self.max_length} octets")
        if len(self._fragments) >= self.max_fragments:
            raise Mode6Error(f"more than {self.max_fragments} fragments")
        end = self._end
        if not fragment.more:
            if end is not None:
                raise Mode6Error(f"a second last fragment (ending at {fragment.end}, not {end})")
            end = fragment.end
            if any(f.end > end for f in self._fragments.values()):
                raise Mode6Error(f"data beyond the last fragment's end {end}")
        elif end is not None and fragment.end > end:
            raise Mode6Error(f"data beyond the last fragment's end {end}")
        for f in self._fragments.values():
            if f.offset < fragment.end and fragment.offset < f.end:
                raise Mode6Error(
                    f"fragment [{fragment.offset}, {fragment.end}) overlaps [{f.offset}, {f.end})"
                )
        # All checks passed: commit.
        self._key = key
        self._fragments[fragment.offset] = fragment
        self._received += h.count
        if not fragment.more:
            self._end = end
            self._last = fragment
        return True

    def response(self) -> Response:
        """The whole response; Mode6Error while it is not :attr:`complete`."""
        if not self.complete or self._last is None:
            raise Mode6Error(f"incomplete response: missing {self.gaps() or 'the last fragment'}")
        data = b"".join(self._fragments[o].data for o in sorted(self._fragments))
        h = self._last.header
        return Response(data, h.status, h.association, len(self._fragments))


# --- response data -----------------------------------------------------------------------


def decode_readstat(data: bytes) -> list[tuple[int, int]]:
    """READSTAT data: (association id, peer status word) pairs, in the server's order."""
    if len(data) % _ASSOC.size:
        raise Mode6Error(f"association list of {len(data)} octets: not a multiple of 4")
    return list(_ASSOC.iter_unpack(data))


@dataclass(frozen=True, slots=True)
class SystemStatus:
    """System status word: leap(2) | clock source(6) | event count(4) | last event(4)."""

    leap: int
    source: int
    event_count: int
    event_code: int

    @property
    def source_name(self) -> str:
        """ntpq's name of the clock source (``unknown`` past 9)."""
        return _name(SYSTEM_SOURCE_NAMES, self.source)

    @property
    def event_name(self) -> str:
        """ntpq's name of the last system event."""
        return SYSTEM_EVENT_NAMES[self.event_code]


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """Peer status word: flags(5) | selection(3) | event count(4) | last event(4)."""

    configured: bool
    auth_enabled: bool
    authentic: bool
    reachable: bool
    broadcast: bool
    selection: int
    event_count: int
    event_code: int

    @property
    def selection_name(self) -> str:
        """ntpq's name of the selection code: ``reject`` ... ``sys.peer``, ``pps.peer``."""
        return SELECTION_NAMES[self.selection]

    @property
    def event_name(self) -> str:
        """ntpq's name of the last peer event."""
        return PEER_EVENT_NAMES[self.event_code]


def _name(names: tuple[str, ...], code: int) -> str:
    return names[code] if code < len(names) else "unknown"


def _check_word(word: int) -> None:
    if not 0 <= word <= 0xFFFF:
        raise Mode6Error(f"status word {word} is not 16 bits")


def decode_system_status(word: int) -> SystemStatus:
    """Split a system status word (the status field of replies for association 0)."""
    _check_word(word)
    return SystemStatus(word >> 14, (word >> 8) & 0x3F, (word >> 4) & 0xF, word & 0xF)


def decode_peer_status(word: int) -> PeerStatus:
    """Split a peer status word (READSTAT entries, status of replies for an association)."""
    _check_word(word)
    flags = word >> 8
    return PeerStatus(
        configured=bool(flags & 0x80), auth_enabled=bool(flags & 0x40),
        authentic=bool(flags & 0x20), reachable=bool(flags & 0x10),
        broadcast=bool(flags & 0x08), selection=flags & 7,
        event_count=(word >> 4) & 0xF, event_code=word & 0xF,
    )


def parse_variables(data: bytes) -> dict[str, str]:
    """READVAR text as name -> raw value, in the server's order.

    Pairs are separated by commas; a value that starts with a double quote runs to the
    closing quote, commas included, and loses the quotes. ntpd's line breaks (CR LF after
    a comma), NULs and octets >= 127 are dropped as ntpq does. A name without '=' maps to
    ""; empty items are skipped; a repeated name keeps its first place and its last value.
    Never raises: any text is some list.
    """
    text = bytes(b for b in data if 0 < b < 127).decode("ascii")
    out: dict[str, str] = {}
    at, size = 0, len(text)
    while at < size:
        comma = text.find(",", at)
        item_end = size if comma < 0 else comma
        name, equals, value = text[at:item_end].partition("=")
        value_at = item_end - len(value.lstrip())
        if equals and text.startswith('"', value_at):
            # Only a quote that opens a value quotes: ntpsec 1.2.2 leaks stray octets,
            # '"' among them, into unquoted values such as filtdelay.
            closing = text.find('"', value_at + 1)
            comma = -1 if closing < 0 else text.find(",", closing)
            item_end = size if comma < 0 else comma  # unterminated: the rest is the value
            value = text[value_at:item_end]
        name, value = name.strip(), value.strip()
        if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
            value = value[1:-1]
        if name:
            out[name] = value
        at = item_end + 1
    return out


# --- typed values ------------------------------------------------------------------------

_DECIMAL = re.compile(r"[+-]?\d+")
_HEX = re.compile(r"0[xX][0-9a-fA-F]+")
_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_TIMESTAMP = re.compile(r"0[xX]([0-9a-fA-F]{1,8})(?:\.([0-9a-fA-F]{1,8}))?")
_ISO_TIME = re.compile(r"(\d{4})-(\d\d)-(\d\d)(?:T(\d\d):(\d\d)(?::(\d\d))?Z?)?")
_COMPACT_TIME = re.compile(r"(\d{4})(\d\d)(\d\d)(\d\d)(\d\d)")  # ntp classic's ctl_putfs
_MAX_DIGITS = 40  # longer numbers are not anything ntpd prints


def to_int(value: str) -> int:
    """An integer as ntpd prints them: decimal (signed) or ``0x`` hex."""
    v = value.strip()
    if len(v) <= _MAX_DIGITS:
        if _HEX.fullmatch(v):
            return int(v[2:], 16)
        if _DECIMAL.fullmatch(v):
            return int(v, 10)
    raise Mode6Error(f"not an integer: {value[:_MAX_DIGITS]!r}")


def to_float(value: str) -> float:
    """A finite decimal number (integer, fixed or exponent form) or ``0x`` hex integer."""
    v = value.strip()
    if len(v) <= _MAX_DIGITS:
        if _HEX.fullmatch(v):
            return float(int(v[2:], 16))
        if _FLOAT.fullmatch(v):
            result = float(v)
            if math.isfinite(result):
                return result
    raise Mode6Error(f"not a number: {value[:_MAX_DIGITS]!r}")


def ms_to_seconds(value: str) -> float:
    """offset, delay, dispersion, jitter, rootdelay, rootdisp, rootdist, sys_jitter and
    clk_jitter are printed in milliseconds (ntpsec ``ntp_control.c``); returns seconds:
    the double nearest the printed value shifted three places (``x / 1000`` is one unit
    in the last place off for about a quarter of values, ``0.03`` -> 2.9999999999999997e-05)."""
    to_float(value)  # refuses what is not a finite number
    v = value.strip()
    if _HEX.fullmatch(v):
        return float(f"{int(v[2:], 16)}e-3")
    # The decimal exponent moved by three, then one correctly rounded conversion (an
    # exponent of any size: Python's int and float parsing take it).
    mantissa, _, exponent = v.lower().partition("e")
    return float(f"{mantissa}e{int(exponent or 0) - 3}")


def ppm(value: str) -> float:
    """frequency and clk_wander: parts per million, returned as printed."""
    return to_float(value)


def log2_seconds(value: str) -> float:
    """poll, ppoll, hpoll, tc and precision are log2 seconds; returns 2**value seconds."""
    exponent = to_int(value)
    if abs(exponent) > _MAX_LOG2:
        raise Mode6Error(f"log2 seconds {exponent} out of range")
    return math.ldexp(1.0, exponent)


def reach_register(value: str) -> int:
    """The 8-bit reach shift register; ntpd prints it in hex (``reach=0xff``)."""
    v = value.strip()
    if not _HEX.fullmatch(v) or len(v) > _MAX_DIGITS:
        raise Mode6Error(f"reach is not 0x hex: {value[:_MAX_DIGITS]!r}")
    reach = int(v[2:], 16)
    if reach > 0xFF:
        raise Mode6Error(f"reach {reach:#x} wider than 8 bits")
    return reach


def reach_ratio(reach: int) -> float:
    """Share of the last 8 polls that were answered."""
    return (reach & 0xFF).bit_count() / 8


def reach_last(reach: int) -> int:
    """1 when the latest poll was answered (bit 0 of the register), else 0."""
    return reach & 1


def ntp_timestamp_to_unix(value: str, pivot: float) -> float | None:
    """An NTP timestamp printed as ``0xSSSSSSSS.FFFFFFFF`` (reftime, clock) -> Unix seconds.

    The era is the one that puts the instant within 2**31 s of ``pivot`` (Unix seconds,
    normally the caller's clock), so 2036 and later read correctly. The all-zero timestamp
    means "never set" and gives None.
    """
    m = _TIMESTAMP.fullmatch(value.strip())
    if m is None:
        raise Mode6Error(f"not an NTP timestamp: {value[:_MAX_DIGITS]!r}")
    seconds, fraction = int(m[1], 16), int(m[2] or "0", 16)
    if seconds == 0 and fraction == 0:
        return None
    if not abs(pivot) < _MAX_PIVOT:
        raise Mode6Error(f"pivot {pivot} out of range")
    raw = (seconds << 32) | fraction
    pivot_raw = round((pivot + NTP_UNIX_DELTA) * _FRAC)
    diff = (raw - pivot_raw) % _TS_MOD
    if diff >= _TS_MOD // 2:
        diff -= _TS_MOD
    return pivot + diff / _FRAC


def date_to_unix(value: str) -> float:
    """leapsec/expire: ntpsec's ISO ``2026-06-28T00:00Z`` (seconds and time optional) or
    ntp classic's ``YYYYMMDDhhmm``, UTC, -> Unix seconds."""
    v = value.strip()
    m = _ISO_TIME.fullmatch(v) or _COMPACT_TIME.fullmatch(v)
    if m is None:
        raise Mode6Error(f"not a date: {value[:_MAX_DIGITS]!r}")
    fields = [int(g or "0") for g in m.groups()]
    year, month, day, hour, minute, second = (*fields, 0, 0, 0)[:6]
    if not (year >= 1 and 1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]
            and hour < 24 and minute < 60 and second < 60):
        raise Mode6Error(f"not a valid date: {v!r}")
    return float(calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0)))
