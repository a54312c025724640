"""The ntpd prober: ntpd's own view of its clock and peers over mode 6 (what ``ntpq`` shows).

One probe sends, in order of importance so that a short deadline loses the least:
READSTAT (the associations and their peer status words), READVAR of the system variables
(ntpd's default list, as ``ntpq -c rv``), one READVAR per association (as ``ntpq -pn``), and
the READVARs of ``ntpq -c sysstats`` and ``ntpq -c iostats``. Each request gets its own
sequence number, ``request_timeout`` and one retry, and is only sent when its reply can
arrive before the deadline. A server that stays silent through a retry (``restrict ...
noquery`` drops mode 6 silently, ``limited`` rate-limits it) is sent nothing more.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ntp_probe.config.schema import Module, NTPDSettings
from ntp_probe.engine.context import ProbeContext
from ntp_probe.engine.result import NO_TIME, Measurement, Perf, Reason
from ntp_probe.engine.targets import Target
from ntp_probe.exposition.families import Family
from ntp_probe.net.budget import LocalSocketError
from ntp_probe.net.udp import Datagram, DatagramPump, Unreachable, sockaddr_for
from ntp_probe.probers import common
from ntp_probe.probers.pacing import Pace, least_window
from ntp_probe.proto import mode6
from ntp_probe.proto.address import ip_address, zone_scope
from ntp_probe.proto.mode6 import ErrorCode, ErrorReply, Mode6Error, Opcode, Reassembler, Response

DESCRIPTION = ("ntpd's own view over mode 6 control messages (what ntpq shows): system "
               "variables, peers and their selection, packet counters")

# --- system -----------------------------------------------------------------------------------

INFO = Family("probe_ntpd_info", "ntpd's version string and system reference id.",
              ("version", "refid"))
LEAP = Family("probe_ntpd_leap_indicator",
              "ntpd's leap indicator (0 none, 1 insert, 2 delete, 3 unsynchronised).")
STRATUM = Family("probe_ntpd_stratum", "ntpd's stratum.")
OFFSET = Family("probe_ntpd_offset_seconds",
                "ntpd's combined offset of the system peers from the local clock, in seconds.")
SYS_JITTER = Family("probe_ntpd_sys_jitter_seconds",
                    "ntpd's system jitter (of the combined peers), in seconds.")
CLOCK_JITTER = Family("probe_ntpd_clock_jitter_seconds",
                      "ntpd's clock jitter (of the local clock discipline), in seconds.")
FREQUENCY = Family("probe_ntpd_frequency_ppm",
                   "Frequency correction of the local clock, in parts per million.")
CLOCK_WANDER = Family("probe_ntpd_clock_wander_ppm",
                      "Frequency wander of the local clock, in parts per million.")
ROOT_DELAY = Family("probe_ntpd_root_delay_seconds",
                    "ntpd's round-trip delay to its primary reference, in seconds.")
ROOT_DISPERSION = Family("probe_ntpd_root_dispersion_seconds",
                         "ntpd's dispersion to its primary reference, in seconds.")
POLL = Family("probe_ntpd_poll_seconds", "ntpd's system poll interval (2^tc), in seconds.")
REFERENCE_TIMESTAMP = Family(
    "probe_ntpd_reference_timestamp_seconds",
    "When ntpd last updated its clock, as a Unix time (0 when it reports none).",
)
LEAPFILE_EXPIRY = Family("probe_ntpd_leapfile_expiry_timestamp_seconds",
                         "When ntpd's leap-second file expires, as a Unix time (when reported).")
TAI_OFFSET = Family("probe_ntpd_tai_offset_seconds",
                    "TAI - UTC offset known to ntpd, in seconds (when reported).")

# --- peers ------------------------------------------------------------------------------------

_PEER = ("assoc", "peer")
PEER_INFO = Family(
    "probe_ntpd_peer_info",
    "One association of ntpd: its peer address, reference id and selection state "
    "(ntpq's names).",
    ("assoc", "peer", "refid", "selection"),
)
PEER_STRATUM = Family("probe_ntpd_peer_stratum", "The peer's stratum.", _PEER)
PEER_OFFSET = Family("probe_ntpd_peer_offset_seconds",
                     "The peer's offset from the local clock, as ntpd measures it, in seconds.",
                     _PEER)
PEER_DELAY = Family("probe_ntpd_peer_delay_seconds",
                    "Round-trip delay to the peer, in seconds.", _PEER)
PEER_DISPERSION = Family("probe_ntpd_peer_dispersion_seconds",
                         "The peer's dispersion, in seconds.", _PEER)
PEER_JITTER = Family("probe_ntpd_peer_jitter_seconds", "The peer's jitter, in seconds.", _PEER)
PEER_POLL = Family("probe_ntpd_peer_poll_seconds",
                   "Poll interval towards the peer (as ntpq's poll column), in seconds.", _PEER)
PEER_REACH_RATIO = Family("probe_ntpd_peer_reach_ratio",
                          "Share of the last 8 polls of the peer that were answered.", _PEER)
PEER_REACH_LAST = Family("probe_ntpd_peer_reach_last",
                         "1 when the peer answered the latest poll, else 0.", _PEER)
PEERS = Family("probe_ntpd_peers",
               "Number of ntpd's associations in each selection state.", ("selection",))

# ntpd with a pool and its peers has tens of associations.
MAX_ASSOCIATIONS = 256

# --- sysstats / iostats -----------------------------------------------------------------------

UPTIME = Family("probe_ntpd_uptime_seconds", "Seconds since ntpd started.")
SYSSTATS_RESET = Family("probe_ntpd_sysstats_reset_seconds",
                        "Seconds over which the sysstats packet counters were accumulated.")
IOSTATS_RESET = Family("probe_ntpd_iostats_reset_seconds",
                       "Seconds since the iostats counters were reset.")
RECEIVE_BUFFERS = Family("probe_ntpd_receive_buffers", "Receive buffers allocated.")
RECEIVE_BUFFERS_FREE = Family("probe_ntpd_receive_buffers_free", "Receive buffers free.")
RECEIVE_BUFFERS_USED = Family("probe_ntpd_receive_buffers_used", "Receive buffers in use.")


def _counter(name: str, help_text: str) -> Family:
    return Family(name, help_text, type="counter")


CONTROL_REQUESTS = _counter("probe_ntpd_control_requests_total",
                            "Mode 6 control requests ntpd received.")
PACKETS_RECEIVED = _counter("probe_ntpd_packets_received_total", "NTP packets ntpd received.")
PACKETS_CURRENT_VERSION = _counter("probe_ntpd_packets_current_version_total",
                                   "Received packets of the current NTP version.")
PACKETS_OLD_VERSION = _counter("probe_ntpd_packets_old_version_total",
                               "Received packets of an older NTP version.")
PACKETS_VERSION1 = _counter("probe_ntpd_packets_version1_total", "Received NTPv1 packets.")
PACKETS_VERSION1_CLIENT = _counter("probe_ntpd_packets_version1_client_total",
                                   "Received NTPv1 client packets.")
PACKETS_VERSION1_MODE0 = _counter("probe_ntpd_packets_version1_mode0_total",
                                  "Received NTPv1 packets with mode 0.")
PACKETS_VERSION1_SYMMETRIC = _counter("probe_ntpd_packets_version1_symmetric_total",
                                      "Received NTPv1 symmetric active packets.")
PACKETS_BAD_FORMAT = _counter("probe_ntpd_packets_bad_format_total",
                              "Received packets of bad length or format.")
PACKETS_BAD_AUTH = _counter("probe_ntpd_packets_bad_auth_total",
                            "Received packets that failed authentication.")
PACKETS_DECLINED = _counter("probe_ntpd_packets_declined_total", "Received packets declined.")
PACKETS_RESTRICTED = _counter("probe_ntpd_packets_restricted_total",
                              "Received packets refused by a restrict rule.")
PACKETS_RATE_LIMITED = _counter("probe_ntpd_packets_rate_limited_total",
                                "Received packets over the rate limit.")
KOD_SENT = _counter("probe_ntpd_kod_sent_total", "Kiss-o'-Death replies sent.")
PACKETS_PROCESSED = _counter("probe_ntpd_packets_processed_total",
                             "Received packets processed for time.")
PACKETS_DROPPED = _counter("probe_ntpd_packets_dropped_total",
                           "Received packets dropped for want of a buffer.")
PACKETS_IGNORED = _counter("probe_ntpd_packets_ignored_total",
                           "Received packets ignored (on a socket ntpd does not use).")
IO_PACKETS_RECEIVED = _counter("probe_ntpd_io_packets_received_total",
                               "Packets read from ntpd's sockets.")
PACKETS_SENT = _counter("probe_ntpd_packets_sent_total", "Packets ntpd sent.")
PACKET_SEND_FAILURES = _counter("probe_ntpd_packet_send_failures_total",
                                "Packets ntpd failed to send.")
INPUT_WAKEUPS = _counter("probe_ntpd_input_wakeups_total", "ntpd's input wakeups.")
USEFUL_INPUT_WAKEUPS = _counter("probe_ntpd_useful_input_wakeups_total",
                                "ntpd's input wakeups that found a packet.")
RECEIVE_BUFFER_REFILLS = _counter("probe_ntpd_receive_buffer_refills_total",
                                  "Receive buffer refills at the low-water mark.")

# The READVAR lists of ntpq's sysstats (two requests, the second with the "_r" variants)
# and iostats, with where each value goes.
_UPTIME_VARIABLES = {"ss_uptime": UPTIME, "ss_numctlreq": CONTROL_REQUESTS}
_SYSSTATS = {
    "ss_reset": SYSSTATS_RESET, "ss_received": PACKETS_RECEIVED,
    "ss_thisver": PACKETS_CURRENT_VERSION, "ss_oldver": PACKETS_OLD_VERSION,
    "ss_ver1": PACKETS_VERSION1, "ss_ver1client": PACKETS_VERSION1_CLIENT,
    "ss_ver1zero": PACKETS_VERSION1_MODE0, "ss_ver1symm": PACKETS_VERSION1_SYMMETRIC,
    "ss_badformat": PACKETS_BAD_FORMAT, "ss_badauth": PACKETS_BAD_AUTH,
    "ss_declined": PACKETS_DECLINED, "ss_restricted": PACKETS_RESTRICTED,
    "ss_limited": PACKETS_RATE_LIMITED, "ss_kodsent": KOD_SENT,
    "ss_processed": PACKETS_PROCESSED,
}
_IOSTATS = {
    "iostats_reset": IOSTATS_RESET, "total_rbuf": RECEIVE_BUFFERS,
    "free_rbuf": RECEIVE_BUFFERS_FREE, "used_rbuf": RECEIVE_BUFFERS_USED,
    "rbuf_lowater": RECEIVE_BUFFER_REFILLS, "io_dropped": PACKETS_DROPPED,
    "io_ignored": PACKETS_IGNORED, "io_received": IO_PACKETS_RECEIVED, "io_sent": PACKETS_SENT,
    "io_sendfailed": PACKET_SEND_FAILURES, "io_wakeups": INPUT_WAKEUPS,
    "io_goodwakeups": USEFUL_INPUT_WAKEUPS,
}
_STATS_REQUESTS = ((*_UPTIME_VARIABLES,), (*_SYSSTATS, *(f"{n}_r" for n in _SYSSTATS)),
                   (*_IOSTATS,))

REASONS = (
    Reason.TARGET_FORBIDDEN, Reason.BACKOFF, Reason.RESOLVE, Reason.LOCAL_ERROR,
    Reason.UNREACHABLE, Reason.MODE6_TIMEOUT, Reason.MODE6_ERROR, Reason.MODE6_BAD_REPLY,
    Reason.LEAP_UNSYNCHRONIZED, Reason.NO_SYS_PEER, Reason.TOO_FEW_SOURCES,
)

_SYS_PEER, _PPS_PEER, _CANDIDATE, _BACKUP = 6, 7, 4, 5
_ORPHAN_REFID = "127.0.0.1"  # an orphan parent's reference id (LOOPBACKADR), as ntpq shows it
# ntpsec's NTP_MAXPOLL_UNK: a peer's ppoll before its first packet (ntpq shows hpoll then).
_POLL_UNKNOWN = "99"
# pps.peer is the system peer when it is a PPS source: it counts as one.
_SYSTEM_PEER_CODES = (_SYS_PEER, _PPS_PEER)
# Which associations to read first when there are too many to read all: selection code ->
# rank (system peers, then candidates, then backups; the rest after).
_READ_ORDER = {_SYS_PEER: 0, _PPS_PEER: 0, _CANDIDATE: 1, _BACKUP: 2}
_LEAP_ALARM = 3
_EVENT_RESTART = 6  # the system status word's last event: the daemon (re)started
_LOGGED_ASSOCIATIONS = 64  # listed in READSTAT's log line
# Time kept back from the deadline to summarise and render the reply.
_SUMMARY_MARGIN = 0.005
_LOGGED_VARIABLES = 8  # a reply's log line shows this many variables, then a count
_LOGGED_VALUE = 40  # characters of one value in the log


def _seconds(value: float, sign: str = "") -> str:
    """Seconds to the nanosecond; an absurd value (ntpd's text can say 1e308) in
    exponent form rather than three hundred digits."""
    return f"{value:{sign}.9f}" if abs(value) < 1e9 else f"{value:{sign}.6e}"


@dataclass(frozen=True, slots=True)
class PeerRow:
    """One association as ``ntpq -pn`` shows it (seconds, not milliseconds)."""

    assoc: int
    address: str
    refid: str
    selection: str
    stratum: int | None = None
    offset: float | None = None
    delay: float | None = None
    jitter: float | None = None
    reach: int | None = None


@dataclass(frozen=True, slots=True)
class NTPDReport:
    """ntpd's view as the CLI shows it: the system variables, then one row per peer."""

    server: str
    port: int
    requests: int
    version: str | None = None
    refid: str | None = None
    leap: int | None = None
    stratum: int | None = None
    offset: float | None = None
    sys_jitter: float | None = None
    root_delay: float | None = None
    root_dispersion: float | None = None
    sys_peer: int | None = None
    candidates: int | None = None
    peers: tuple[PeerRow, ...] = ()

    @property
    def title(self) -> str:
        """Section name."""
        return "ntpd"

    def rows(self) -> list[tuple[str, str]]:
        """Human-readable lines."""
        rows = [("server", f"{self.server} port {self.port}"),
                ("requests", f"{self.requests} sent")]
        if self.version is not None:
            rows += [("version", self.version), ("refid", str(self.refid)),
                     ("leap", str(self.leap)), ("stratum", str(self.stratum))]
        if self.offset is not None:
            rows.append(("offset", f"{_seconds(self.offset, '+')} s"))
        if self.sys_jitter is not None:
            rows.append(("sys jitter", f"{_seconds(self.sys_jitter)} s"))
        if self.root_dispersion is not None:
            rows.append(("root dispersion", f"{_seconds(self.root_dispersion)} s"))
        if self.candidates is not None:
            rows.append(("sys.peer", "none" if self.sys_peer is None else f"assoc {self.sys_peer}"))
            rows.append(("sys.peer or candidate", str(self.candidates)))
        for p in self.peers:
            stratum = "" if p.stratum is None else f", stratum {p.stratum}"
            measured = ("" if p.offset is None else
                        f", offset {_seconds(p.offset, '+')} s, delay "
                        f"{_seconds(p.delay or 0.0)} s, jitter {_seconds(p.jitter or 0.0)} s")
            reach = "" if p.reach is None else f", reach {p.reach:03o}"
            rows.append((f"peer {p.assoc}", f"{p.address or '?'} refid {p.refid or '?'} "
                                            f"{p.selection}{stratum}{measured}{reach}"))
        return rows

    @property
    def check_offset(self) -> float | None:
        """ntpd's system offset."""
        return self.offset

    def perfdata(self) -> list[Perf]:
        """offset, sys jitter, root dispersion, stratum, peers, sys.peer or candidate."""
        out = []
        if self.offset is not None:
            out.append(Perf("offset", self.offset, "s", checked=True))
        if self.sys_jitter is not None:
            out.append(Perf("sys_jitter", self.sys_jitter, "s"))
        if self.root_dispersion is not None:
            out.append(Perf("root_dispersion", self.root_dispersion, "s"))
        if self.stratum is not None:
            out.append(Perf("stratum", float(self.stratum)))
        if self.candidates is not None:
            out += [Perf("peers", float(len(self.peers))),
                    Perf("candidates", float(self.candidates))]
        return out

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {
            "server": self.server, "port": self.port, "requests": self.requests,
            "version": self.version, "refid": self.refid, "leap": self.leap,
            "stratum": self.stratum, "offset_seconds": self.offset,
            "sys_jitter_seconds": self.sys_jitter, "root_delay_seconds": self.root_delay,
            "root_dispersion_seconds": self.root_dispersion, "sys_peer": self.sys_peer,
            "candidates": self.candidates,
            "peers": [{"assoc": p.assoc, "peer": p.address, "refid": p.refid,
                       "selection": p.selection, "stratum": p.stratum,
                       "offset_seconds": p.offset, "delay_seconds": p.delay,
                       "jitter_seconds": p.jitter, "reach": p.reach} for p in self.peers],
        }


def report_of(m: Measurement) -> NTPDReport | None:
    """The ntpd report in a measurement, if the probe got that far."""
    return next((r for r in m.reports if isinstance(r, NTPDReport)), None)


@dataclass(slots=True)
class _Try:
    """One request on the wire: what a reply must echo, and its fragments so far."""

    opcode: int
    sequence: int
    association: int
    reassembler: Reassembler = field(default_factory=Reassembler)
    bad: int = 0  # datagrams for this request that failed a check


@dataclass(slots=True)
class _Collected:
    """What the probe obtained so far; reported even when the probe is cut off."""

    words: dict[int, int] | None = None  # association -> latest peer status word
    to_read: list[int] | None = None  # the associations to ask about, in that order
    system: dict[str, str] | None = None
    system_status: int = 0
    peers: dict[int, dict[str, str]] = field(default_factory=dict)
    stats: dict[str, str] = field(default_factory=dict)
    # To tell a daemon restarted during the probe: when READSTAT answered, the system
    # status then, and when the uptime was read with the system status that came with it.
    first_status: tuple[float, int] | None = None
    uptime_status: tuple[float, int] | None = None


def _summary(variables: dict[str, str]) -> str:
    shown = [f"{k}={v[:_LOGGED_VALUE]}" for k, v in list(variables.items())[:_LOGGED_VARIABLES]]
    more = len(variables) - len(shown)
    return ", ".join(shown) + (f", ... ({more} more)" if more > 0 else "")


def _names_text(names: Sequence[str]) -> str:
    if not names:
        return "default variables"
    if len(names) <= _LOGGED_VARIABLES:
        return ",".join(names)
    return f"{len(names)} variables: {','.join(names[:3])},..."


class _Session:
    """Requests to one ntpd: sequence numbers, the matcher, retries, the deadline."""

    def __init__(self, server: tuple[str, int], settings: NTPDSettings, until: float,
                 ctx: ProbeContext) -> None:
        self.server = server
        self.server_ip = ip_address(server[0].split("%", 1)[0])
        self.server_scope = zone_scope(server[0])  # link-local: the interface it is on
        # Retries go at once; the pace only keeps requests whose reply cannot arrive.
        self.pace = Pace(0.0, settings.request_timeout, until)
        self.ctx = ctx
        self.sequence = secrets.randbelow(0x10000)
        self.current: _Try | None = None
        # The first try of a request being retried: its reply, complete later than
        # request_timeout, is as good as the retry's (ntpq waits seconds).
        self.previous: _Try | None = None
        self.earlier: set[int] = set()  # sequences of requests no longer awaited
        # Send nothing more: the server is silent or unreachable, or the deadline left no
        # time for a request (none later can fit either: time only moves on, and the
        # reply window only grows).
        self.stopped = False
        # Requests in a row whose every answer failed the checks (see request()).
        self.garbage = 0

    def match(self, d: Datagram) -> Response | ErrorReply | None:
        """The pump's matcher: a complete response or an error reply ends the wait."""
        log = self.ctx.log
        if not self._from_server(d.source):
            log(f"datagram from {d.source[0]} port {d.source[1]} discarded: not the server")
            return None
        t = self.current
        if t is None:
            log("late reply to an earlier request ignored" if self._late(d.data)
                else f"datagram discarded ({len(d.data)} bytes): no request waiting")
            return None
        if self.previous is not None and self._sequence(d.data) == self.previous.sequence:
            t = self.previous
        try:
            reply = mode6.decode_reply(d.data, opcode=t.opcode, sequence=t.sequence,
                                       association=t.association)
        except Mode6Error as exc:
            # The header is read again only for what failed: a late reply is no garbling.
            if self._late(d.data):
                log("late reply to an earlier request ignored")
                return None
            t.bad += 1
            log(f"reply discarded ({len(d.data)} bytes): {exc}")
            return None
        if isinstance(reply, ErrorReply):
            if t is self.previous:
                # The retry may still be answered: a late error to the first try must not
                # beat it (ntpq ignores replies to an earlier sequence altogether).
                log(f"late error {reply.name} to the first try (seq {t.sequence:#06x}) "
                    "ignored: waiting for the retry's answer")
                return None
            return reply
        try:
            if not t.reassembler.add(reply):
                log(f"duplicate fragment at offset {reply.offset} ignored")
                return None
        except Mode6Error as exc:
            t.bad += 1
            log(f"fragment discarded: {exc}")
            return None
        return t.reassembler.response() if t.reassembler.complete else None

    def _from_server(self, source: tuple[object, ...]) -> bool:
        try:
            ip = ip_address(str(source[0]).split("%", 1)[0])
        except ValueError:
            return False
        return ip == self.server_ip and source[1] == self.server[1] and (
            self.server_scope is None or len(source) < 4 or source[3] == self.server_scope)

    def _late(self, data: bytes) -> bool:
        try:
            h = mode6.decode_header(data)
        except Mode6Error:
            return False
        return h.mode == mode6.MODE_CONTROL and h.response and h.sequence in self.earlier

    @staticmethod
    def _sequence(data: bytes) -> int | None:
        """The sequence number of a control response, None for anything else."""
        try:
            h = mode6.decode_header(data)
        except Mode6Error:
            return None
        return h.sequence if h.mode == mode6.MODE_CONTROL and h.response else None

    def _unreachable(self, exc: Unreachable) -> None:
        """The ICMP error that ends the probe: nothing more is sent."""
        self.stopped = True
        self.ctx.log(f"<- {exc.strerror or 'unreachable'}: nothing more sent")
        self.ctx.measurement.fail(Reason.UNREACHABLE, exc.strerror or None)

    async def request(self, pump: DatagramPump[Response | ErrorReply], opcode: Opcode,
                      association: int = 0, names: Sequence[str] = (), *,
                      required: bool = True) -> Response | ErrorReply | None:
        """Send one request (and one retry): the response, the error reply, or None when
        there is none (the failure is recorded and logged) or no time was left to ask.
        A request not ``required`` (the counters: the verdict does not read them) that
        gets no usable reply is logged, not a failure."""
        m, log = self.ctx.measurement, self.ctx.log
        loop, pace = asyncio.get_running_loop(), self.pace
        what = f"{opcode.name} assoc {association}"
        last: _Try | None = None
        path_error: Unreachable | None = None  # from a host on the path, not the target
        garbled = False  # some try got fragments or datagrams that failed a check
        fragments = 0  # fragments that passed the checks, over the tries
        no_time = False  # the retry was not sent: no reply could have come in time
        for _ in range(2):
            if self.stopped:
                break
            if not await pace.wait():
                self.stopped = no_time = True
                log(f"{what}: {'retry ' if last else ''}not sent, nor any request after it: "
                    "no reply could arrive before the deadline")
                break
            self.sequence = (self.sequence + 1) & 0xFFFF
            t = _Try(opcode, self.sequence, association)
            self.current, self.previous = t, last
            payload = mode6.encode_request(opcode, t.sequence, association,
                                           mode6.variable_list(names))
            log(functools.partial(_request_line, what, t.sequence, last is not None, opcode,
                                  names))
            now = loop.time()
            try:
                _, reply = await pump.exchange(payload, min(now + pace.timeout, pace.until))
            except Unreachable as exc:
                if exc.on_path is None:
                    self._unreachable(exc)
                    return None
                # From another host, and no reply came: maybe forged; a reply to the retry
                # overrides it, silence (or no time for a retry) does not.
                log(f"<- {what} seq {t.sequence:#06x}: {exc.strerror}")
                path_error = exc
                reply = None
            finally:
                self.current = self.previous = None
                self.earlier.add(t.sequence)
            if reply is not None:
                self.garbage = 0
                pace.seen(loop.time() - now)
                if isinstance(reply, ErrorReply):
                    log(f"<- {what} seq {t.sequence:#06x}: error {reply.name} ({reply.code})")
                return reply
            last = t
            r = t.reassembler
            garbled = garbled or bool(r.fragment_count or t.bad)
            fragments += r.fragment_count
            log(f"<- {what} seq {t.sequence:#06x}: no complete reply"
                + (f" ({r.fragment_count} fragments, missing {r.gaps() or 'the last'})"
                   if r.fragment_count else "")
                + (f" ({t.bad} datagrams discarded)" if t.bad else ""))
        if last is None:
            return None
        if path_error is not None and not garbled:
            self._unreachable(path_error)
            return None
        if garbled:
            reason = Reason.MODE6_BAD_REPLY
            self.garbage = self.garbage + 1 if not fragments else 0
            if self.garbage >= 2:
                # Two requests in a row got nothing that passed as mode 6 (an NTP server
                # answering mode 4, a hostile echo): the verdict is made, and more
                # requests would only load it. (One may be a daemon's bad list.)
                self.stopped = True
                log("no datagram from the server passed as a mode 6 reply to two requests "
                    "in a row: nothing more sent")
        elif no_time:
            log("no reply, and no time left for a retry")
            reason = Reason.MODE6_TIMEOUT
        else:
            # restrict ... noquery drops mode 6 without a word.
            self.stopped = True
            log("server silent (ntpd's restrict noquery or limited?): nothing more sent")
            reason = Reason.MODE6_TIMEOUT
        if required:
            m.fail(reason)
        else:
            log(f"{what}: no usable reply ({reason.value}): left out, no failure (the "
                "verdict does not read it)")
        return None


def _request_line(what: str, sequence: int, retry: bool, opcode: Opcode,
                  names: Sequence[str]) -> str:
    return (f"-> {what} seq {sequence:#06x}{' (retry)' if retry else ''}: "
            f"{_names_text(names) if opcode == Opcode.READVAR else 'association list'}")


def _decode_variables(reply: Response, what: str, ctx: ProbeContext) -> dict[str, str]:
    variables = mode6.parse_variables(reply.data)
    ctx.log(lambda: f"<- {what}: status {reply.status:#06x}, {len(reply.data)} bytes in "
            f"{reply.fragments} fragment{'s' if reply.fragments != 1 else ''}, "
            f"{len(variables)} variables: {_summary(variables)}")
    return variables


async def _read_stats(session: _Session, pump: DatagramPump[Response | ErrorReply],
                      names: Sequence[str], got: _Collected, ctx: ProbeContext) -> int | None:
    """READVAR of a sysstats/iostats list; on unknownvar (an older or newer ntpd) one
    variable at a time, as ntpq does, the unknown ones left out. Any other error, or no
    usable reply, leaves the list's counters out: the verdict does not read them, so it
    is no failure. The system status of the last reply read, or None."""
    reply = await session.request(pump, Opcode.READVAR, 0, names, required=False)
    if isinstance(reply, Response):
        got.stats.update(_decode_variables(reply, "READVAR assoc 0", ctx))
        return reply.status
    if not isinstance(reply, ErrorReply):
        return None
    if reply.code != ErrorCode.UNKNOWNVAR:
        ctx.log(f"counters {_names_text(names)} refused: left out")
        return None
    ctx.log("unknown variable in the list: asking one at a time")
    status = None
    for name in names:
        one = await session.request(pump, Opcode.READVAR, 0, (name,), required=False)
        if isinstance(one, Response):
            got.stats.update(_decode_variables(one, "READVAR assoc 0", ctx))
            status = one.status
        elif isinstance(one, ErrorReply):
            if one.code != ErrorCode.UNKNOWNVAR:
                ctx.log(f"counter {name} refused: it and the list's rest left out")
                break
        else:
            break  # unanswered (recorded) or out of time
    return status


async def _collect(session: _Session, pump: DatagramPump[Response | ErrorReply],
                   got: _Collected, ctx: ProbeContext) -> None:
    m, log = ctx.measurement, ctx.log
    reply = await session.request(pump, Opcode.READSTAT)
    loop = asyncio.get_running_loop()
    if isinstance(reply, Response):
        got.first_status = (loop.time(), reply.status)
        try:
            associations = mode6.decode_readstat(reply.data)
        except Mode6Error as exc:
            log(f"<- READSTAT: {exc}")
            m.fail(Reason.MODE6_BAD_REPLY)
        else:
            if any(a == 0 for a, _ in associations):
                # Association 0 is the system itself, never a peer.
                log("<- READSTAT lists association 0: ignored")
                associations = [(a, w) for a, w in associations if a != 0]
            got.words = dict(associations)  # all of them: the counts and the verdict
            # Read those furthest in the selection first (ntpd lists the newest first, and
            # the configured servers, the system peer among them, last): a deadline that
            # cuts the reading short leaves out the rejected ones, not the system peer.
            words = got.words
            got.to_read = sorted(words, key=lambda a: _READ_ORDER.get(
                mode6.decode_peer_status(words[a]).selection, 3))
            if len(associations) > MAX_ASSOCIATIONS:
                # Each costs a round trip and a dozen series: a daemon listing thousands (a
                # hostile one) must not hold the probe to its deadline or flood Prometheus.
                log(f"<- READSTAT lists {len(associations)} associations: reading "
                    f"{MAX_ASSOCIATIONS}, the system peer and candidates first")
                del got.to_read[MAX_ASSOCIATIONS:]
            status = reply.status
            listed = associations[:_LOGGED_ASSOCIATIONS]  # a hostile list stays a line
            log(lambda: f"<- READSTAT: status {status:#06x}, {len(associations)} associations"
                + "".join(f"{', ' if i else ': '}{a} "
                          f"{mode6.decode_peer_status(w).selection_name}"
                          for i, (a, w) in enumerate(listed))
                + (f", ... ({len(associations) - len(listed)} more)"
                   if len(associations) > len(listed) else ""))
    elif isinstance(reply, ErrorReply):
        m.fail(Reason.MODE6_ERROR)

    reply = await session.request(pump, Opcode.READVAR)
    if isinstance(reply, Response):
        got.system = _decode_variables(reply, "READVAR assoc 0", ctx)
        got.system_status = reply.status
    elif isinstance(reply, ErrorReply):
        m.fail(Reason.MODE6_ERROR)

    words = got.words or {}
    for association in got.to_read if got.to_read is not None else list(words):
        # The verdict reads the system variables and READSTAT's selections; a peer's own
        # variables it needs only for a system peer or candidate (read first). A server
        # that stops answering (restrict limited) at a rejected peer fails nothing.
        needed = got.system is None or got.words is None or mode6.decode_peer_status(
            words.get(association, 0)).selection in (*_SYSTEM_PEER_CODES, _CANDIDATE)
        reply = await session.request(pump, Opcode.READVAR, association, required=needed)
        if isinstance(reply, Response):
            got.peers[association] = _decode_variables(reply, f"READVAR assoc {association}",
                                                       ctx)
            words[association] = reply.status  # newer than READSTAT's: what ntpq -pn shows
        elif isinstance(reply, ErrorReply):
            if reply.code == ErrorCode.BADASSOC:
                # Demobilised since READSTAT (a pool or manycast association): not an error.
                log(f"association {association} went away")
            else:
                m.fail(Reason.MODE6_ERROR)

    for names in _STATS_REQUESTS:
        if session.stopped:
            return
        read = await _read_stats(session, pump, names, got, ctx)
        if names is _STATS_REQUESTS[0] and read is not None:
            got.uptime_status = (loop.time(), read)


def _count(value: str) -> int:
    """A counter or an uptime: ntpd prints them unsigned; a negative one (only a hostile
    server sends it) would read as a counter reset."""
    count = mode6.to_int(value)
    if count < 0:
        raise Mode6Error(f"a count cannot be negative: {value.strip()[:32]!r}")
    return count


def _convert(variables: dict[str, str], name: str, convert: Callable[[str], Any],
             ctx: ProbeContext) -> Any:
    """The variable converted, or None when absent or unreadable (logged)."""
    raw = variables.get(name)
    if raw is None:
        return None
    try:
        return convert(raw)
    except Mode6Error as exc:
        ctx.log(f"variable {name} ignored: {exc}")
        return None


# Longest text kept from a variable for a label: a host name is at most 253 characters,
# ntpd's version string far less. A hostile server's 15 KB values, times 256 associations,
# would otherwise make one scrape tens of megabytes (and the history keeps it).
MAX_LABEL_TEXT = 256


def _text(value: str) -> str:
    return value if len(value) <= MAX_LABEL_TEXT else value[:MAX_LABEL_TEXT - 3] + "..."


def _emit_system(variables: dict[str, str], status: int, ctx: ProbeContext) -> dict[str, Any]:
    m = ctx.measurement
    values: dict[str, Any] = {}
    leap = _convert(variables, "leap", mode6.to_int, ctx)
    if leap is None or not 0 <= leap <= 3:
        leap = mode6.decode_system_status(status).leap
    values["leap"] = leap
    values["version"] = _text(variables.get("version", ""))
    values["refid"] = _text(variables.get("refid", ""))
    m.add(INFO, 1, values["version"], values["refid"])
    m.add(LEAP, leap)
    gauges: tuple[tuple[str, Family, Callable[[str], Any]], ...] = (
        ("stratum", STRATUM, mode6.to_int),
        ("offset", OFFSET, mode6.ms_to_seconds),
        ("sys_jitter", SYS_JITTER, mode6.ms_to_seconds),
        ("clk_jitter", CLOCK_JITTER, mode6.ms_to_seconds),
        ("frequency", FREQUENCY, mode6.ppm),
        ("clk_wander", CLOCK_WANDER, mode6.ppm),
        ("rootdelay", ROOT_DELAY, mode6.ms_to_seconds),
        ("rootdisp", ROOT_DISPERSION, mode6.ms_to_seconds),
        ("tc", POLL, mode6.log2_seconds),
        ("expire", LEAPFILE_EXPIRY, mode6.date_to_unix),
        ("tai", TAI_OFFSET, mode6.to_int),
    )
    for name, family, convert in gauges:
        value = _convert(variables, name, convert, ctx)
        values[name] = value
        if value is not None:
            m.add(family, value)
    # The all-zero timestamp (never set) is reported as 0; an unreadable one not at all.
    reftime = _convert(variables, "reftime",
                       lambda v: mode6.ntp_timestamp_to_unix(v, time.time()) or 0.0, ctx)
    if reftime is not None:
        m.add(REFERENCE_TIMESTAMP, reftime)
    return values


def _emit_peer(association: int, variables: dict[str, str], word: int,
               ctx: ProbeContext) -> PeerRow:
    m = ctx.measurement
    address = _text(variables.get("srcadr", ""))
    if address in ("", "0.0.0.0", "::") and variables.get("srchost"):
        # A pool (or a name not resolved yet) has no address; ntpq -p shows its srchost.
        address = _text(variables["srchost"])
    refid = _text(variables.get("refid", ""))
    selection = mode6.decode_peer_status(word).selection_name
    labels = (str(association), address)
    m.add(PEER_INFO, 1, *labels, refid, selection)
    stratum = _convert(variables, "stratum", mode6.to_int, ctx)
    measured = {name: _convert(variables, name, mode6.ms_to_seconds, ctx)
                for name in ("offset", "delay", "dispersion", "jitter")}
    polls = [p for p in (_convert(variables, n, mode6.log2_seconds, ctx)
                         for n in ("hpoll", "ppoll")
                         if variables.get(n, "").strip() != _POLL_UNKNOWN) if p is not None]
    reach = _convert(variables, "reach", mode6.reach_register, ctx)
    for family, value in ((PEER_STRATUM, stratum), (PEER_OFFSET, measured["offset"]),
                          (PEER_DELAY, measured["delay"]),
                          (PEER_DISPERSION, measured["dispersion"]),
                          (PEER_JITTER, measured["jitter"]),
                          # ntpq's poll column: the shorter of ours and the peer's.
                          (PEER_POLL, min(polls) if polls else None),
                          (PEER_REACH_RATIO, None if reach is None else mode6.reach_ratio(reach)),
                          (PEER_REACH_LAST, None if reach is None else mode6.reach_last(reach))):
        if value is not None:
            m.add(family, value, *labels)
    return PeerRow(association, address, refid, selection, stratum, measured["offset"],
                   measured["delay"], measured["jitter"], reach)


def _emit_stats(stats: dict[str, str], ctx: ProbeContext) -> None:
    m = ctx.measurement
    for table in (_UPTIME_VARIABLES, _SYSSTATS, _IOSTATS):
        for name, family in table.items():
            # ntpsec's "_r" variables count since the start, the plain ones since the
            # hourly reset: a Prometheus counter wants the former, when the daemon has it.
            total = f"{name}_r" if table is _SYSSTATS and f"{name}_r" in stats else name
            value = _convert(stats, total, _count, ctx)
            if value is not None:
                m.add(family, value)


def _conclude(got: _Collected, settings: NTPDSettings, server: tuple[str, int], sent: int,
              ctx: ProbeContext) -> None:
    m, log = ctx.measurement, ctx.log
    m.packets_sent = sent
    system: dict[str, Any] = {}
    if got.system is not None:
        system = _emit_system(got.system, got.system_status, ctx)
    rows = tuple(_emit_peer(a, v, (got.words or {}).get(a, 0), ctx)
                 for a, v in got.peers.items())
    _emit_stats(got.stats, ctx)
    sys_peer: int | None = None
    candidates: int | None = None
    if got.words is not None:
        codes = {a: mode6.decode_peer_status(w).selection for a, w in got.words.items()}
        for code, name in enumerate(mode6.SELECTION_NAMES):
            m.add(PEERS, sum(1 for c in codes.values() if c == code), name)
        sys_peer = next((a for a, c in codes.items() if c in _SYSTEM_PEER_CODES), None)
        candidates = sum(1 for c in codes.values() if c in (*_SYSTEM_PEER_CODES, _CANDIDATE))
    m.reports.append(NTPDReport(
        server[0], server[1], sent, system.get("version"), system.get("refid"),
        system.get("leap"), system.get("stratum"), system.get("offset"),
        system.get("sys_jitter"), system.get("rootdelay"), system.get("rootdisp"),
        sys_peer, candidates, rows,
    ))
    restarted = _restarted(got)
    if restarted is not None:
        log(restarted)
        m.fail(Reason.MODE6_BAD_REPLY, "ntpd restarted during the probe")
    if got.system is None:
        if m.failure is None and not sent:
            # Not ntpd's fault: this probe's budget (a short scrape-timeout header).
            log("nothing sent: the deadline left no time to ask")
            m.fail(Reason.LOCAL_ERROR, NO_TIME)
        elif m.failure is None:
            log("system variables not read: the deadline left no time to ask")
            m.fail(Reason.MODE6_TIMEOUT)
    elif system["leap"] == _LEAP_ALARM:
        log("leap indicator 3: ntpd is not synchronised")
        m.fail(Reason.LEAP_UNSYNCHRONIZED)
    if candidates is not None and not got.words and system.get("refid") == _ORPHAN_REFID \
            and system.get("leap") != _LEAP_ALARM:
        # Orphan mode and no association at all: an isolated network's master, by design
        # (ntpsec has no local clock driver; one whose servers all failed has associations).
        log("no association at all, orphan mode (refid 127.0.0.1): an isolated network's "
            "master, no sys.peer wanted and min_candidates not applied")
    elif candidates is not None:
        if sys_peer is None:
            log("no sys.peer")
            m.fail(Reason.NO_SYS_PEER)
        if candidates < settings.min_candidates:
            log(f"{candidates} sys.peer or candidate, fewer than min_candidates "
                f"{settings.min_candidates}")
            m.fail(Reason.TOO_FEW_SOURCES)


def _restarted(got: _Collected) -> str | None:
    """Why the answers are of two daemons (one restarted while it was read), or None.

    ntpd's uptime, read last, shorter than the time since its READSTAT answered says it
    started since; a whole-second uptime may also read so for a daemon started just
    before the probe, so the system status must also have changed as a restart changes
    it: leap bits back to 3 (unsynchronised), or its last event become a restart (code 6;
    an orphan-mode daemon or a quick one is at leap 0 again within the probe). A young
    daemon synchronising meanwhile (3 to 0, restart to another event) is none; the event
    counter says nothing (ntpd sets it back to 1 whenever an event of another kind
    follows, restart or not)."""
    if got.first_status is None or got.uptime_status is None:
        return None
    (first_at, first), (then_at, then) = got.first_status, got.uptime_status
    try:
        uptime = _count(got.stats.get("ss_uptime", ""))
    except Mode6Error:
        return None
    leap_reset = then >> 14 == _LEAP_ALARM and first >> 14 != _LEAP_ALARM
    restart_event = then & 0xF == _EVENT_RESTART and first & 0xF != _EVENT_RESTART
    if uptime >= then_at - first_at or not (leap_reset or restart_event):
        return None
    return (f"ntpd restarted during the probe: uptime {uptime}s, read "
            f"{then_at - first_at:.3f}s after READSTAT answered, system status {first:#06x} "
            f"then {then:#06x}: its answers mix two daemons (mode6_bad_reply)")


async def probe(target: Target, module: Module, ctx: ProbeContext) -> Measurement:
    """Ask one ntpd for its system, peers and counters over mode 6; report."""
    settings = module.ntpd
    port = target.port if target.port is not None else settings.port
    until = ctx.deadline - _SUMMARY_MARGIN
    resolved = await common.prepare(target, port, ctx, preferred=settings.preferred_ip_protocol,
                                    fallback=settings.ip_protocol_fallback, until=until,
                                    window=least_window(settings.request_timeout))
    m, log = ctx.measurement, ctx.log
    if resolved is None:
        return m
    server = (resolved.address, port)
    log(f"asking ntpd at {resolved.address} port {port} over mode 6, "
        f"{settings.request_timeout:g}s per request, one retry")
    session = _Session(server, settings, until, ctx)
    got = _Collected()
    pump: DatagramPump[Response | ErrorReply] | None = None
    try:
        pump = DatagramPump(resolved.family, sockaddr_for(resolved.address, port, resolved.family),
                            session.match, log)
        async with pump:
            await _collect(session, pump, got, ctx)
    except LocalSocketError as exc:  # no socket: this host's trouble
        log(f"local error, nothing sent: {exc.strerror or exc}")
        m.fail(Reason.LOCAL_ERROR, str(exc.strerror or exc))
    except OSError as exc:
        log(f"local socket error: {exc.strerror or exc}")
        m.fail(Reason.UNREACHABLE, str(exc.strerror or exc))
    finally:
        # Also when the runner's backstop cuts the probe off: what was obtained counts.
        _conclude(got, settings, server, pump.sent if pump is not None else 0, ctx)
    return m
