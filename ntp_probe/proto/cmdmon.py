"""Sans-IO codec for chrony's command and monitoring protocol ("cmdmon"), version 6.

This is what ``chronyc`` speaks to ``chronyd`` over UDP port 323 or the daemon's unix
datagram socket (chrony ``candm.h``, ``pktlength.c``, ``client.c``). Nothing here touches a
socket or a clock: callers build request bytes with :func:`encode_request`, send them
themselves, and hand each datagram received to :func:`decode_reply`.

Replies are decoded by their *reply type*, never by the daemon's version: SERVER_STATS is
answered with type 14 (chrony 3.x), 22 (4.0-4.1), 24 (4.2-4.3) or 25 (4.4+).

Values and signs are exactly what ``chronyc -c`` prints (seconds and ppm), so an operator sees
the same numbers in both places. In particular chrony's source offsets (``SourceData.offset``,
``SourceData.measured_offset``, ``SourceStats.offset``) are *local clock minus source*:
positive when the local clock is ahead, the opposite sign to RFC 5905's theta.

Every failure to decode raises :class:`CmdmonError` (or one of its two subclasses); no other
exception escapes :func:`decode_reply`, whatever the bytes.
"""

from __future__ import annotations

import ipaddress
import math
import struct
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import TypeVar

PROTO_VERSION = 6
# client.c accepts a BADPKTVERSION reply from a daemon speaking protocol 5 or later.
_OLDEST_VERSION_FOR_BADPKTVERSION = 5
PKT_TYPE_REQUEST = 1
PKT_TYPE_REPLY = 2

REQUEST_HEADER_LEN = 20
REPLY_HEADER_LEN = 28

# Anti-amplification padding (candm.h "Version 6", pktlength.c): chronyd answers a request only
# if it is at least as long as its reply (shorter gets STT_BADPKTLENGTH or silence), and drops
# requests longer than sizeof(CMD_Request) (528 B in chrony 3.5, 860 B in 4.x). A request sized
# for one version's reply breaks on the next (SERVER_STATS grew from 48 to 196 B), so every
# request is padded to one size that covers the longest reply of every read command in every
# version (CLIENT_ACCESSES_BY_INDEX3, 520 B) and stays under the smallest maximum.
REQUEST_LEN = 520

_U32 = 0xFFFFFFFF
_INDEX_MAX = 0x7FFFFFFF  # SOURCE_DATA's index is an int32 on the wire
# Timespec.tv_sec_high value meaning "a 32-bit time_t sent this" (candm.h TV_NOHIGHSEC).
_TV_NOHIGHSEC = 0x7FFFFFFF
_NSEC_MAX = 999_999_999
_NS = 1_000_000_000
# SourceData.since_sample when the source has no sample yet (sourcestats.c).
_NO_SAMPLE = 0xFFFFFFFF

# The Float format: a 7-bit signed exponent above a 25-bit signed coefficient.
_FLOAT_COEF_BITS = 25
_FLOAT_EXP_BITS = 7


class CmdmonError(ValueError):
    """A reply that is malformed, truncated, or not a well-formed answer to the request."""


class ReplyMismatchError(CmdmonError):
    """A well-formed reply to some other request (command or sequence differ).

    Such a datagram may be a late answer to an earlier attempt: callers may ignore it and
    keep waiting for theirs, as ``chronyc`` does.
    """


class UnsupportedReplyError(CmdmonError):
    """A reply type, status or enumerated value this codec does not know (a newer chronyd)."""


class Command(IntEnum):
    """Request codes (candm.h ``REQ_*``) of the read-only commands encoded here."""

    N_SOURCES = 14
    SOURCE_DATA = 15
    TRACKING = 33
    SOURCESTATS = 34
    SERVER_STATS = 54
    SELECT_DATA = 69


class ReplyType(IntEnum):
    """Reply codes (candm.h ``RPY_*``) this codec decodes; error replies are ``NULL``."""

    NULL = 1
    N_SOURCES = 2
    SOURCE_DATA = 3
    TRACKING = 5
    SOURCESTATS = 6
    SERVER_STATS = 14
    SERVER_STATS2 = 22
    SELECT_DATA = 23
    SERVER_STATS3 = 24
    SERVER_STATS4 = 25


# Reply codes chrony defines (candm.h, 1 .. N_REPLY_TYPES-1 on master) that answer other
# commands: receiving one is a wrong reply, not a newer protocol.
_CHRONY_REPLY_TYPES = range(1, 27)


class Status(IntEnum):
    """Command status codes (candm.h ``STT_*``)."""

    SUCCESS = 0
    FAILED = 1
    UNAUTH = 2
    INVALID = 3
    NOSUCHSOURCE = 4
    INVALIDTS = 5
    NOTENABLED = 6
    BADSUBNET = 7
    ACCESSALLOWED = 8
    ACCESSDENIED = 9
    NOHOSTACCESS = 10
    SOURCEALREADYKNOWN = 11
    TOOMANYSOURCES = 12
    NORTC = 13
    BADRTCFILE = 14
    INACTIVE = 15
    BADSAMPLE = 16
    INVALIDAF = 17
    BADPKTVERSION = 18
    BADPKTLENGTH = 19
    INVALIDNAME = 21


class AddressFamily(IntEnum):
    """chrony's IPAddr families (addressing.h ``IPADDR_*``)."""

    UNSPEC = 0
    INET4 = 1
    INET6 = 2
    ID = 3  # an unresolved source, identified by a number


class LeapStatus(IntEnum):
    """The reference's leap status in TRACKING (chrony ``NTP_Leap``)."""

    NORMAL = 0
    INSERT = 1
    DELETE = 2
    UNSYNCHRONISED = 3


class SourceMode(IntEnum):
    """SOURCE_DATA mode (candm.h ``RPY_SD_MD_*``)."""

    SERVER = 0
    PEER = 1
    REFCLOCK = 2

    @property
    def label(self) -> str:
        """``server``, ``peer`` or ``refclock``."""
        return self.name.lower()

    @property
    def symbol(self) -> str:
        """chronyc's mode column: ``^``, ``=`` or ``#``."""
        return _MODE_SYMBOLS[self]


_MODE_SYMBOLS = {SourceMode.SERVER: "^", SourceMode.PEER: "=", SourceMode.REFCLOCK: "#"}


class SourceState(IntEnum):
    """SOURCE_DATA state (candm.h ``RPY_SD_ST_*``), named after what chronyc shows.

    ``CANDIDATE`` is chrony's "unselected" (``+``: good and combined, just not the selected
    one); ``OUTLIER`` is chrony's "selectable" (``-``: usable but not combined).
    """

    SYNC = 0
    UNUSABLE = 1
    FALSETICKER = 2
    JITTERY = 3
    CANDIDATE = 4
    OUTLIER = 5

    @property
    def label(self) -> str:
        """``sync``, ``unusable``, ``falseticker``, ``jittery``, ``candidate`` or ``outlier``."""
        return self.name.lower()

    @property
    def symbol(self) -> str:
        """chronyc's state column: ``*``, ``?``, ``x``, ``~``, ``+`` or ``-``."""
        return _STATE_SYMBOLS[self]


_STATE_SYMBOLS = {
    SourceState.SYNC: "*",
    SourceState.UNUSABLE: "?",
    SourceState.FALSETICKER: "x",
    SourceState.JITTERY: "~",
    SourceState.CANDIDATE: "+",
    SourceState.OUTLIER: "-",
}


@dataclass(frozen=True)
class Address:
    """chrony's IPAddr as text: dotted quad, RFC 5952 IPv6 (as inet_ntop), ``ID#nnnnnnnnnn``
    for an unresolved source, ``[UNSPEC]`` for UNSPEC and for a family chrony does not know
    (chronyc's ``UTI_IPNetworkToHost`` makes it UNSPEC before printing): what chronyc
    prints, so that no source is named by an empty label."""

    family: AddressFamily
    text: str


class _NamedByRefid:
    """A reply about a source known by refid and address."""

    refid: str  # 8 uppercase hex digits, as chronyc prints it
    address: Address

    @property
    def name(self) -> str:
        """chronyc's name column: the refid as text where there is no address (a refclock,
        or an unsynchronised daemon's reference), otherwise the address. TRACKING's name
        may be empty (chronyc prints ``Reference ID : 00000000 ()``); a source's never is
        (an empty label is no label to PromQL): a refid without text is named by its hex
        digits (as SOURCE_DATA names the same refclock), no refid at all by the address's
        ``[UNSPEC]``."""
        if self.address.family is AddressFamily.UNSPEC:
            refid = int(self.refid, 16)
            return refid_text(refid) if isinstance(self, Tracking) else _refclock_name(refid)
        return self.address.text


@dataclass(frozen=True)
class NSources:
    """N_SOURCES: how many sources SOURCE_DATA/SOURCESTATS/SELECT_DATA can be asked about."""

    n_sources: int


@dataclass(frozen=True)
class Tracking(_NamedByRefid):
    """TRACKING, in the order and with the signs ``chronyc -c tracking`` prints.

    Times are in seconds, frequencies in ppm. ``system_time`` is chrony's current correction:
    positive when the system clock is *slow* of NTP time (chronyc "System time ... slow").
    ``last_offset`` is the offset applied at the last update: positive when the local clock
    was ahead. ``frequency_ppm`` is positive when the clock runs *fast* uncorrected.
    """

    refid: str  # 8 uppercase hex digits, as chronyc prints it
    address: Address
    stratum: int
    leap_status: LeapStatus
    ref_time_ns: int  # Unix time of the last clock update, exact
    system_time: float
    last_offset: float
    rms_offset: float
    frequency_ppm: float
    residual_frequency_ppm: float
    skew_ppm: float
    root_delay: float
    root_dispersion: float
    update_interval: float

    @property
    def ref_time(self) -> float:
        """``ref_time_ns`` in (float) seconds since the Unix epoch."""
        return self.ref_time_ns / _NS


@dataclass(frozen=True)
class SourceData:
    """SOURCE_DATA, as ``chronyc -c sources`` prints it.

    ``offset`` (chronyc's adjusted offset), ``measured_offset`` (the bracketed, measured one)
    are local clock minus source: positive when the local clock is ahead of the source.
    ``last_rx_age`` is seconds since the last sample, None before the first one (chronyc
    prints ``-``). ``reach`` is the raw 8-bit reachability register (chronyc prints it in
    octal). ``poll`` is log2 of the polling interval in seconds.
    """

    address: Address
    poll: int
    stratum: int
    state: SourceState
    mode: SourceMode
    flags: int
    reach: int
    last_rx_age: int | None
    offset: float
    measured_offset: float
    offset_error: float

    @property
    def name(self) -> str:
        """chronyc's name column: a refclock's refid as text (its hex digits when it has no
        printable byte, as SOURCESTATS names it), otherwise the address."""
        if self.mode is SourceMode.REFCLOCK and self.address.family is AddressFamily.INET4:
            return _refclock_name(int(ipaddress.IPv4Address(self.address.text)))
        return self.address.text


@dataclass(frozen=True)
class SourceStats(_NamedByRefid):
    """SOURCESTATS, as ``chronyc -c sourcestats`` prints it.

    ``offset`` is chrony's estimated offset, local clock minus source (positive: the local
    clock is ahead). ``span`` is in seconds; ``stddev`` and the offsets in seconds.
    """

    refid: str
    address: Address
    samples: int
    runs: int
    span: int
    stddev: float
    residual_frequency_ppm: float
    skew_ppm: float
    offset: float
    offset_error: float


@dataclass(frozen=True)
class SelectData(_NamedByRefid):
    """SELECT_DATA, as ``chronyc -c selectdata`` prints it.

    ``state`` is chrony's one-letter selection state (``*`` best, ``+`` combined, ``x``
    falseticker, ``N`` ignored, ...). ``lo_limit``/``hi_limit`` bound the source's offset
    interval in seconds, with the same sign as the source offsets.
    """

    refid: str
    address: Address
    state: str
    authenticated: bool
    leap: int
    conf_options: int
    eff_options: int
    last_sample_ago: int
    score: float
    lo_limit: float
    hi_limit: float


@dataclass(frozen=True)
class ServerStats:
    """SERVER_STATS counters; a counter the daemon's reply type lacks is None.

    Type 14 has the NTP/command/log counters; 22 adds NTS-KE and authenticated NTP;
    24 adds interleaved, timestamps held and their span; 25 makes all of them 64-bit and adds
    the daemon/kernel/hardware timestamp counts.
    """

    reply_type: ReplyType
    ntp_hits: int
    ntp_drops: int
    cmd_hits: int
    cmd_drops: int
    log_drops: int
    nke_hits: int | None = None
    nke_drops: int | None = None
    ntp_auth_hits: int | None = None
    ntp_interleaved_hits: int | None = None
    ntp_timestamps: int | None = None
    ntp_span_seconds: int | None = None
    ntp_daemon_rx_timestamps: int | None = None
    ntp_daemon_tx_timestamps: int | None = None
    ntp_kernel_rx_timestamps: int | None = None
    ntp_kernel_tx_timestamps: int | None = None
    ntp_hw_rx_timestamps: int | None = None
    ntp_hw_tx_timestamps: int | None = None


ReplyData = NSources | Tracking | SourceData | SourceStats | SelectData | ServerStats


@dataclass(frozen=True)
class Reply:
    """A decoded reply that answers the request: its status, and its data on success."""

    status: Status
    reply_type: ReplyType
    data: ReplyData | None  # None unless status is SUCCESS


# --- wire structures (candm.h, big-endian) ----------------------------------------------------

_REQUEST_HEADER = struct.Struct(">BBBBHHIII")
_REPLY_HEADER = struct.Struct(">BBBBHHHHHHIII")
_INDEX = struct.Struct(">I")
_IPADDR = "16sHH"
_TIMESPEC = "III"
_N_SOURCES = struct.Struct(">I")
_SOURCE_DATA = struct.Struct(">" + _IPADDR + "hHHHHHI" + "3I")
_TRACKING = struct.Struct(">I" + _IPADDR + "HH" + _TIMESPEC + "9I")
_SOURCESTATS = struct.Struct(">I" + _IPADDR + "3I" + "5I")
_SELECT_DATA = struct.Struct(">I" + _IPADDR + "BBBBHHI" + "3I")
# SERVER_STATS..SERVER_STATS3 are runs of u32 counters; SERVER_STATS4 of 21 {u32 high, u32 low}.
_SERVER_STATS_COUNTS = {
    ReplyType.SERVER_STATS: 5,
    ReplyType.SERVER_STATS2: 8,
    ReplyType.SERVER_STATS3: 11,
}
_SERVER_STATS4_WORDS = 21 * 2

_DATA_LEN = {
    ReplyType.NULL: 0,
    ReplyType.N_SOURCES: _N_SOURCES.size,
    ReplyType.SOURCE_DATA: _SOURCE_DATA.size,
    ReplyType.TRACKING: _TRACKING.size,
    ReplyType.SOURCESTATS: _SOURCESTATS.size,
    ReplyType.SELECT_DATA: _SELECT_DATA.size,
    ReplyType.SERVER_STATS: 4 * _SERVER_STATS_COUNTS[ReplyType.SERVER_STATS],
    ReplyType.SERVER_STATS2: 4 * _SERVER_STATS_COUNTS[ReplyType.SERVER_STATS2],
    ReplyType.SERVER_STATS3: 4 * _SERVER_STATS_COUNTS[ReplyType.SERVER_STATS3],
    ReplyType.SERVER_STATS4: 4 * _SERVER_STATS4_WORDS,
}

_EXPECTED_REPLIES: dict[Command, frozenset[ReplyType]] = {
    Command.N_SOURCES: frozenset({ReplyType.N_SOURCES}),
    Command.SOURCE_DATA: frozenset({ReplyType.SOURCE_DATA}),
    Command.TRACKING: frozenset({ReplyType.TRACKING}),
    Command.SOURCESTATS: frozenset({ReplyType.SOURCESTATS}),
    Command.SELECT_DATA: frozenset({ReplyType.SELECT_DATA}),
    Command.SERVER_STATS: frozenset(_SERVER_STATS_COUNTS) | {ReplyType.SERVER_STATS4},
}
_INDEXED = frozenset({Command.SOURCE_DATA, Command.SOURCESTATS, Command.SELECT_DATA})


def reply_length(reply_type: ReplyType) -> int:
    """The exact length in bytes of a reply of this type (pktlength.c ``PKL_ReplyLength``)."""
    return REPLY_HEADER_LEN + _DATA_LEN[reply_type]


# --- requests -------------------------------------------------------------------------------


def encode_request(
    command: Command, sequence: int, *, index: int | None = None, attempt: int = 0
) -> bytes:
    """One request, zero-padded to :data:`REQUEST_LEN` bytes.

    ``index`` (0-based source index) is required by SOURCE_DATA, SOURCESTATS and SELECT_DATA
    and refused by the others. ``sequence`` (u32) is echoed by the reply; pick it at random per
    request. ``attempt`` (u16) counts resends of the same sequence.
    """
    if not 0 <= sequence <= _U32:
        raise ValueError(f"sequence {sequence} is not a u32")
    if not 0 <= attempt <= 0xFFFF:
        raise ValueError(f"attempt {attempt} is not a u16")
    if (index is None) == (command in _INDEXED):
        need = "needs" if index is None else "takes no"
        raise ValueError(f"{command.name} {need} a source index")
    header = _REQUEST_HEADER.pack(
        PROTO_VERSION, PKT_TYPE_REQUEST, 0, 0, command, attempt, sequence, 0, 0
    )
    data = b""
    if index is not None:
        if not 0 <= index <= _INDEX_MAX:
            raise ValueError(f"source index {index} out of range")
        data = _INDEX.pack(index)
    return (header + data).ljust(REQUEST_LEN, b"\0")


# --- field decoders ----------------------------------------------------------------------------


def decode_float(raw: int) -> float:
    """chrony's 32-bit Float (candm.h, util.c ``UTI_FloatNetworkToHost``), exactly.

    The top 7 bits are a two's-complement exponent, the low 25 bits a two's-complement
    coefficient without hidden bit: value = coef * 2**(exp - 25). Both fit a double exactly.
    """
    exp = (raw >> _FLOAT_COEF_BITS) & ((1 << _FLOAT_EXP_BITS) - 1)
    if exp >= 1 << (_FLOAT_EXP_BITS - 1):
        exp -= 1 << _FLOAT_EXP_BITS
    coef = raw & ((1 << _FLOAT_COEF_BITS) - 1)
    if coef >= 1 << (_FLOAT_COEF_BITS - 1):
        coef -= 1 << _FLOAT_COEF_BITS
    return math.ldexp(coef, exp - _FLOAT_COEF_BITS)


def decode_timespec_ns(sec_high: int, sec_low: int, nsec: int) -> int:
    """chrony's Timespec as exact Unix nanoseconds (util.c ``UTI_TimespecNetworkToHost``).

    A ``sec_high`` of 0x7fffffff means a 32-bit sender (no high word); the 64-bit seconds are
    two's complement like time_t; nanoseconds above 999999999 are clamped, as chrony does.
    """
    if sec_high == _TV_NOHIGHSEC:
        sec_high = 0
    seconds = sec_high << 32 | sec_low
    if seconds >= 1 << 63:
        seconds -= 1 << 64
    return seconds * _NS + min(nsec, _NSEC_MAX)


def _refclock_name(refid: int) -> str:
    """A source known by its refid, named as chronyc does (its text), but never empty: the
    hex digits of a refid without text, ``[UNSPEC]`` for none at all (as for an address of
    no family)."""
    return refid_text(refid) or (format_refid(refid) if refid else "[UNSPEC]")


def refid_text(refid: int) -> str:
    """A refid as chronyc names it (util.c ``UTI_RefidToString``): its printable ASCII bytes."""
    return "".join(chr(b) for b in refid.to_bytes(4, "big") if 0x20 <= b <= 0x7E)


def format_refid(refid: int) -> str:
    """A refid as 8 uppercase hex digits, as chronyc prints it (``%08lX``)."""
    return f"{refid:08X}"


def decode_address(addr: bytes, family: int) -> Address:
    """chrony's IPAddr (16 address bytes, then the family) as :class:`Address`."""
    if family == AddressFamily.INET4:
        return Address(AddressFamily.INET4, str(ipaddress.IPv4Address(addr[:4])))
    if family == AddressFamily.INET6:
        return Address(AddressFamily.INET6, _ipv6_text(addr))
    if family == AddressFamily.ID:
        return Address(AddressFamily.ID, f"ID#{int.from_bytes(addr[:4], 'big'):010d}")
    return Address(AddressFamily.UNSPEC, "[UNSPEC]")


def _ipv6_text(addr: bytes) -> str:
    """IPv6 text as glibc's inet_ntop writes it: like RFC 5952, but with a dotted quad tail
    for IPv4-mapped (::ffff:a.b.c.d) and IPv4-compatible (::a.b.c.d) addresses."""
    v6 = ipaddress.IPv6Address(addr)
    tail = ipaddress.IPv4Address(addr[12:])
    if addr[:10] == bytes(10) and addr[10:12] == b"\xff\xff":
        return f"::ffff:{tail}"
    if addr[:12] == bytes(12) and addr[12:14] != bytes(2):
        return f"::{tail}"
    return str(v6)


# --- replies ------------------------------------------------------------------------------------


def _reply_header(data: bytes) -> tuple[int, int, int, int]:
    """(command, reply type, status, sequence) of a datagram that passes the header checks
    before the echo: length, packet type, reserved bytes, protocol version."""
    if len(data) < REPLY_HEADER_LEN:
        raise CmdmonError(f"reply of {len(data)} B is shorter than the {REPLY_HEADER_LEN} B header")
    (version, pkt_type, res1, res2, r_command, r_type, r_status,
     _pad1, _pad2, _pad3, r_sequence, _pad4, _pad5) = _REPLY_HEADER.unpack_from(data)
    if pkt_type != PKT_TYPE_REPLY or res1 or res2:
        raise CmdmonError(f"not a command reply (packet type {pkt_type}, reserved {res1}/{res2})")
    if version != PROTO_VERSION and not (
        version >= _OLDEST_VERSION_FOR_BADPKTVERSION and r_status == Status.BADPKTVERSION
    ):
        raise CmdmonError(f"protocol version {version}, expected {PROTO_VERSION}")
    return r_command, r_type, r_status, r_sequence


def reply_echo(data: bytes) -> tuple[int, int] | None:
    """The (command, sequence) a command reply echoes, or None when ``data`` is no reply
    (it fails the header checks :func:`decode_reply` makes before the echo)."""
    try:
        r_command, _, _, r_sequence = _reply_header(data)
    except CmdmonError:
        return None
    return r_command, r_sequence


def decode_reply(data: bytes, command: Command, sequence: int) -> Reply:
    """Decode one datagram received for the request (``command``, ``sequence``).

    Checks, as chronyc does (client.c): header length, protocol version, packet type,
    reserved bytes, then command and sequence echo (:class:`ReplyMismatchError`), then the
    status (a non-SUCCESS status gives a :class:`Reply` with no data, whatever its reply
    type), then the reply type, and that the reply is at least that type's length (a
    longer one, as from a later chronyd, is read as chronyc reads it). Unlike chronyc, which
    ignores a short reply and waits on, a short reply is a bad one: a daemon sending
    truncated replies reads chrony_bad_reply, not chrony_timeout. Unknown reply types and
    status codes raise :class:`UnsupportedReplyError`; anything else :class:`CmdmonError`.
    """
    r_command, r_type, r_status, r_sequence = _reply_header(data)
    if r_command != command or r_sequence != sequence:
        raise ReplyMismatchError(
            f"reply to command {r_command} sequence {r_sequence:#010x}, "
            f"expected {int(command)} sequence {sequence:#010x}"
        )
    try:
        status = Status(r_status)
    except ValueError:
        raise UnsupportedReplyError(f"unknown status {r_status}") from None
    if status is not Status.SUCCESS:
        # cmdmon.c answers every refused or failed command with an empty RPY_NULL; chronyc
        # reads the status before the type ("501 Not authorised" whatever the type says).
        return Reply(status, ReplyType.NULL, None)
    reply_type = _reply_type(r_type, command)
    expected = reply_length(reply_type)
    if len(data) < expected:
        raise CmdmonError(f"{reply_type.name} reply of {len(data)} B, expected {expected} B")
    return Reply(status, reply_type, _decode_data(reply_type, data, REPLY_HEADER_LEN))


def _reply_type(r_type: int, command: Command) -> ReplyType:
    """The reply type of a successful reply, checked against what may answer ``command``."""
    if r_type in _EXPECTED_REPLIES[command]:
        return ReplyType(r_type)
    if r_type in _CHRONY_REPLY_TYPES:
        raise CmdmonError(f"reply type {r_type} does not answer {command.name}")
    raise UnsupportedReplyError(f"unknown reply type {r_type} to {command.name}")


def _decode_data(reply_type: ReplyType, data: bytes, offset: int) -> ReplyData:
    if reply_type is ReplyType.N_SOURCES:
        return NSources(_N_SOURCES.unpack_from(data, offset)[0])
    if reply_type is ReplyType.TRACKING:
        return _decode_tracking(data, offset)
    if reply_type is ReplyType.SOURCE_DATA:
        return _decode_source_data(data, offset)
    if reply_type is ReplyType.SOURCESTATS:
        return _decode_sourcestats(data, offset)
    if reply_type is ReplyType.SELECT_DATA:
        return _decode_select_data(data, offset)
    return _decode_server_stats(reply_type, data, offset)


_E = TypeVar("_E", bound=IntEnum)


def _enum(kind: type[_E], value: int, what: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        raise UnsupportedReplyError(f"unknown {what} {value}") from None


def _decode_tracking(data: bytes, offset: int) -> Tracking:
    (ref_id, addr, family, _pad, stratum, leap, sec_high, sec_low, nsec,
     *floats) = _TRACKING.unpack_from(data, offset)
    values = [decode_float(f) for f in floats]
    return Tracking(
        refid=format_refid(ref_id),
        address=decode_address(addr, family),
        stratum=stratum,
        leap_status=_enum(LeapStatus, leap, "leap status"),
        ref_time_ns=decode_timespec_ns(sec_high, sec_low, nsec),
        system_time=values[0],
        last_offset=values[1],
        rms_offset=values[2],
        frequency_ppm=values[3],
        residual_frequency_ppm=values[4],
        skew_ppm=values[5],
        root_delay=values[6],
        root_dispersion=values[7],
        update_interval=values[8],
    )


def _decode_source_data(data: bytes, offset: int) -> SourceData:
    (addr, family, _pad, poll, stratum, state, mode, flags, reach, since_sample,
     orig_latest, latest, latest_err) = _SOURCE_DATA.unpack_from(data, offset)
    if reach > 0xFF:
        raise CmdmonError(f"reachability {reach:#x} exceeds the 8-bit register")
    return SourceData(
        address=decode_address(addr, family),
        poll=poll,
        stratum=stratum,
        state=_enum(SourceState, state, "source state"),
        mode=_enum(SourceMode, mode, "source mode"),
        flags=flags,
        reach=reach,
        last_rx_age=None if since_sample == _NO_SAMPLE else since_sample,
        offset=decode_float(latest),
        measured_offset=decode_float(orig_latest),
        offset_error=decode_float(latest_err),
    )


def _decode_sourcestats(data: bytes, offset: int) -> SourceStats:
    (ref_id, addr, family, _pad, n_samples, n_runs, span, sd, resid_freq, skew, est_offset,
     est_offset_err) = _SOURCESTATS.unpack_from(data, offset)
    return SourceStats(
        refid=format_refid(ref_id),
        address=decode_address(addr, family),
        samples=n_samples,
        runs=n_runs,
        span=span,
        stddev=decode_float(sd),
        residual_frequency_ppm=decode_float(resid_freq),
        skew_ppm=decode_float(skew),
        offset=decode_float(est_offset),
        offset_error=decode_float(est_offset_err),
    )


def _decode_select_data(data: bytes, offset: int) -> SelectData:
    (ref_id, addr, family, _pad, state_char, auth, leap, _pad2, conf_options, eff_options,
     last_sample_ago, score, lo_limit, hi_limit) = _SELECT_DATA.unpack_from(data, offset)
    if not 0x21 <= state_char <= 0x7E:
        raise CmdmonError(f"selection state {state_char:#04x} is not a printable letter")
    return SelectData(
        refid=format_refid(ref_id),
        address=decode_address(addr, family),
        state=chr(state_char),
        authenticated=bool(auth),
        leap=leap,
        conf_options=conf_options,
        eff_options=eff_options,
        last_sample_ago=last_sample_ago,
        score=decode_float(score),
        lo_limit=decode_float(lo_limit),
        hi_limit=decode_float(hi_limit),
    )


def _decode_server_stats(reply_type: ReplyType, data: bytes, offset: int) -> ServerStats:
    if reply_type is ReplyType.SERVER_STATS4:
        words = struct.unpack_from(f">{_SERVER_STATS4_WORDS}I", data, offset)
        c = [high << 32 | low for high, low in zip(words[::2], words[1::2], strict=True)]
        return ServerStats(
            reply_type, ntp_hits=c[0], ntp_drops=c[3], cmd_hits=c[2], cmd_drops=c[5],
            log_drops=c[6], nke_hits=c[1], nke_drops=c[4], ntp_auth_hits=c[7],
            ntp_interleaved_hits=c[8], ntp_timestamps=c[9], ntp_span_seconds=c[10],
            ntp_daemon_rx_timestamps=c[11], ntp_daemon_tx_timestamps=c[12],
            ntp_kernel_rx_timestamps=c[13], ntp_kernel_tx_timestamps=c[14],
            ntp_hw_rx_timestamps=c[15], ntp_hw_tx_timestamps=c[16],
        )  # c[17:21] are reserved
    n = _SERVER_STATS_COUNTS[reply_type]
    c = list(struct.unpack_from(f">{n}I", data, offset))
    if reply_type is ReplyType.SERVER_STATS:
        # chrony 3.x order: ntp_hits, cmd_hits, ntp_drops, cmd_drops, log_drops.
        return ServerStats(
            reply_type, ntp_hits=c[0], ntp_drops=c[2], cmd_hits=c[1], cmd_drops=c[3],
            log_drops=c[4],
        )
    # 4.0+ order: ntp, nke, cmd hits; ntp, nke, cmd drops; log drops; auth; then type 24's.
    stats = ServerStats(
        reply_type, ntp_hits=c[0], ntp_drops=c[3], cmd_hits=c[2], cmd_drops=c[5],
        log_drops=c[6], nke_hits=c[1], nke_drops=c[4], ntp_auth_hits=c[7],
    )
    if reply_type is ReplyType.SERVER_STATS2:
        return stats
    return replace(
        stats, ntp_interleaved_hits=c[8], ntp_timestamps=c[9], ntp_span_seconds=c[10]
    )
