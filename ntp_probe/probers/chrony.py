"""The chrony prober: chronyd's own view over its command protocol, as ``chronyc`` shows it.

One probe asks TRACKING, N_SOURCES, then SOURCE_DATA and SOURCESTATS for each source, then
SERVER_STATS, over UDP (``host[:port]``, port 323) or over chronyd's unix socket when the
module names one. Every request has its own timeout and one retry with a new sequence
number (a late reply to the first attempt still answers it); a request is only sent when
its reply can still arrive before the probe's deadline (the shared pace of
probers.pacing), so a short deadline shortens the probe instead of
overrunning it, and what was obtained is reported. A command chronyd refuses (over UDP
chrony 4.3 answers SERVER_STATS with UNAUTH) is listed in
``probe_chrony_command_status_info`` and the rest is still emitted.

Values and signs are those of ``chronyc -c``: source offsets are local clock minus source
(positive: the local clock is ahead), the opposite sign to ``probe_ntp_offset_seconds``.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ntp_probe.config.schema import ChronySettings, Module
from ntp_probe.engine.context import ProbeContext
from ntp_probe.engine.result import NO_TIME, Measurement, Perf, Reason
from ntp_probe.engine.targets import Target
from ntp_probe.exposition.families import Family
from ntp_probe.net.budget import LocalSocketError
from ntp_probe.net.udp import Datagram, DatagramPump, SockAddr, Unreachable, sockaddr_for
from ntp_probe.probers import common
from ntp_probe.probers.pacing import Pace, least_window
from ntp_probe.proto import cmdmon
from ntp_probe.proto.address import zone_scope
from ntp_probe.proto.cmdmon import (
    AddressFamily,
    Command,
    LeapStatus,
    NSources,
    ServerStats,
    SourceData,
    SourceMode,
    SourceState,
    SourceStats,
    Status,
    Tracking,
)

DESCRIPTION = ("chronyd's own view over its command protocol (tracking, sources, sourcestats, "
               "serverstats), as chronyc shows it; UDP port 323 or chronyd's unix socket")

TRACKING_INFO = Family(
    "probe_chrony_tracking_info",
    "chronyd's reference: refid as 8 hex digits and its address (or refclock name), "
    "as chronyc tracking shows them.",
    ("refid", "address"),
)
TRACKING_STRATUM = Family("probe_chrony_tracking_stratum", "chronyd's stratum.")
TRACKING_REFERENCE_TIMESTAMP = Family(
    "probe_chrony_tracking_reference_timestamp_seconds",
    "When chronyd last updated its clock from its reference, as a Unix time.",
)
TRACKING_SYSTEM_TIME = Family(
    "probe_chrony_tracking_system_time_seconds",
    "chronyc's System time: the correction chronyd is still slewing out, in seconds "
    "(positive: the system clock is slow of NTP time).",
)
TRACKING_LAST_OFFSET = Family(
    "probe_chrony_tracking_last_offset_seconds",
    "Offset estimated at the last clock update, in seconds (positive: the local clock "
    "was ahead).",
)
TRACKING_RMS_OFFSET = Family("probe_chrony_tracking_rms_offset_seconds",
                             "Long-term average of the offsets, in seconds.")
TRACKING_FREQUENCY = Family(
    "probe_chrony_tracking_frequency_ppm",
    "Frequency error of the system clock that chronyd corrects, in ppm (positive: the "
    "clock would run fast).",
)
TRACKING_RESIDUAL_FREQUENCY = Family(
    "probe_chrony_tracking_residual_frequency_ppm",
    "Difference between the reference's frequency and the one in use, in ppm.",
)
TRACKING_SKEW = Family("probe_chrony_tracking_skew_ppm",
                       "Estimated error bound of the frequency, in ppm.")
TRACKING_ROOT_DELAY = Family("probe_chrony_tracking_root_delay_seconds",
                             "Round-trip delay to the stratum-1 reference, in seconds.")
TRACKING_ROOT_DISPERSION = Family("probe_chrony_tracking_root_dispersion_seconds",
                                  "Dispersion accumulated to the stratum-1 reference, in seconds.")
TRACKING_UPDATE_INTERVAL = Family("probe_chrony_tracking_update_interval_seconds",
                                  "Interval between the last two clock updates, in seconds.")
TRACKING_LEAP_STATUS = Family(
    "probe_chrony_tracking_leap_status",
    "Leap status (0 normal, 1 insert second, 2 delete second, 3 unsynchronised).",
)

SOURCE_INFO = Family(
    "probe_chrony_source_info",
    "One series per source: mode server|peer|refclock and state "
    "sync|candidate|outlier|falseticker|jittery|unusable (chronyc's * + - x ~ ?).",
    ("source", "mode", "state"),
)
SOURCE_STRATUM = Family("probe_chrony_source_stratum", "Stratum of the source.", ("source",))
SOURCE_POLL = Family("probe_chrony_source_poll_seconds",
                     "Polling interval of the source (2^poll), in seconds.", ("source",))
SOURCE_REACH = Family("probe_chrony_source_reach_ratio",
                      "Share of the last 8 polls that were answered (reachability register).",
                      ("source",))
SOURCE_LAST_RX_AGE = Family(
    "probe_chrony_source_last_rx_age_seconds",
    "Seconds since the last sample from the source (absent before the first one).",
    ("source",),
)
SOURCE_LAST_SAMPLE_OFFSET = Family(
    "probe_chrony_source_last_sample_offset_seconds",
    "Offset of the last sample, adjusted, in seconds, as chronyc sources shows it "
    "(local clock minus source: positive when the local clock is ahead).",
    ("source",),
)
SOURCE_LAST_SAMPLE_ERROR = Family("probe_chrony_source_last_sample_error_seconds",
                                  "Error margin of the last sample, in seconds.", ("source",))
SOURCES = Family("probe_chrony_sources",
                 "Number of sources in each state (every state, 0 included).", ("state",))

SOURCESTATS_SAMPLES = Family("probe_chrony_sourcestats_samples",
                             "Sample points chronyd keeps for the source.", ("source",))
SOURCESTATS_RUNS = Family("probe_chrony_sourcestats_runs",
                          "Runs of residuals with the same sign in the source's regression.",
                          ("source",))
SOURCESTATS_SPAN = Family("probe_chrony_sourcestats_span_seconds",
                          "Interval between the oldest and newest sample, in seconds.",
                          ("source",))
SOURCESTATS_FREQUENCY = Family("probe_chrony_sourcestats_frequency_ppm",
                               "Estimated residual frequency of the source, in ppm.",
                               ("source",))
SOURCESTATS_SKEW = Family("probe_chrony_sourcestats_skew_ppm",
                          "Estimated error bound of the source's frequency, in ppm.",
                          ("source",))
SOURCESTATS_OFFSET = Family(
    "probe_chrony_sourcestats_offset_seconds",
    "Estimated offset of the source, in seconds (local clock minus source: positive when "
    "the local clock is ahead).",
    ("source",),
)
SOURCESTATS_STDDEV = Family("probe_chrony_sourcestats_stddev_seconds",
                            "Estimated sample standard deviation of the source, in seconds.",
                            ("source",))

SERVERSTATS_NTP_RECEIVED = Family("probe_chrony_serverstats_ntp_packets_received_total",
                                  "NTP requests chronyd received.", type="counter")
SERVERSTATS_NTP_DROPPED = Family("probe_chrony_serverstats_ntp_packets_dropped_total",
                                 "NTP requests chronyd dropped (rate limiting).", type="counter")
SERVERSTATS_COMMAND_RECEIVED = Family(
    "probe_chrony_serverstats_command_packets_received_total",
    "Command requests chronyd received (this probe's own included).", type="counter",
)
SERVERSTATS_COMMAND_DROPPED = Family("probe_chrony_serverstats_command_packets_dropped_total",
                                     "Command requests chronyd dropped.", type="counter")
SERVERSTATS_LOG_DROPPED = Family(
    "probe_chrony_serverstats_client_log_records_dropped_total",
    "Client log records chronyd dropped for lack of memory (clientloglimit).", type="counter",
)
SERVERSTATS_NKE_ACCEPTED = Family(
    "probe_chrony_serverstats_nts_ke_connections_accepted_total",
    "NTS-KE connections chronyd accepted (chrony 4.0 and later).", type="counter",
)
SERVERSTATS_NKE_DROPPED = Family(
    "probe_chrony_serverstats_nts_ke_connections_dropped_total",
    "NTS-KE connections chronyd dropped (chrony 4.0 and later).", type="counter",
)
SERVERSTATS_AUTHENTICATED = Family(
    "probe_chrony_serverstats_authenticated_ntp_packets_total",
    "Authenticated (NTS or symmetric key) NTP requests chronyd received (chrony 4.0 and "
    "later).", type="counter",
)
SERVERSTATS_INTERLEAVED = Family(
    "probe_chrony_serverstats_interleaved_ntp_packets_total",
    "Interleaved NTP requests chronyd received (chrony 4.2 and later).", type="counter",
)
SERVERSTATS_TIMESTAMPS_HELD = Family(
    "probe_chrony_serverstats_ntp_timestamps_held",
    "Server timestamps chronyd holds for interleaved mode (chrony 4.2 and later).",
)
SERVERSTATS_TIMESTAMP_SPAN = Family(
    "probe_chrony_serverstats_ntp_timestamp_span_seconds",
    "Span of the timestamps held for interleaved mode, in seconds (chrony 4.2 and later).",
)
SERVERSTATS_DAEMON_RX = Family("probe_chrony_serverstats_ntp_daemon_rx_timestamps_total",
                               "NTP requests timestamped on receipt by chronyd itself "
                               "(chrony 4.4 and later).", type="counter")
SERVERSTATS_DAEMON_TX = Family("probe_chrony_serverstats_ntp_daemon_tx_timestamps_total",
                               "NTP replies timestamped on transmission by chronyd itself "
                               "(chrony 4.4 and later).", type="counter")
SERVERSTATS_KERNEL_RX = Family("probe_chrony_serverstats_ntp_kernel_rx_timestamps_total",
                               "NTP requests with a kernel receive timestamp "
                               "(chrony 4.4 and later).", type="counter")
SERVERSTATS_KERNEL_TX = Family("probe_chrony_serverstats_ntp_kernel_tx_timestamps_total",
                               "NTP replies with a kernel transmit timestamp "
                               "(chrony 4.4 and later).", type="counter")
SERVERSTATS_HW_RX = Family("probe_chrony_serverstats_ntp_hw_rx_timestamps_total",
                           "NTP requests with a hardware receive timestamp "
                           "(chrony 4.4 and later).", type="counter")
SERVERSTATS_HW_TX = Family("probe_chrony_serverstats_ntp_hw_tx_timestamps_total",
                           "NTP replies with a hardware transmit timestamp "
                           "(chrony 4.4 and later).", type="counter")

COMMAND_STATUS = Family(
    "probe_chrony_command_status_info",
    "How chronyd answered each command sent: ok, unauthorized, timeout, invalid or "
    "unsupported.",
    ("command", "status"),
)

REASONS = (
    Reason.TARGET_FORBIDDEN, Reason.BACKOFF, Reason.RESOLVE, Reason.LOCAL_ERROR,
    Reason.UNREACHABLE, Reason.CHRONY_SOCKET, Reason.CHRONY_TIMEOUT, Reason.CHRONY_UNAUTHORIZED,
    Reason.CHRONY_BAD_REPLY, Reason.LEAP_UNSYNCHRONIZED, Reason.TOO_FEW_SOURCES,
)

# Time kept back from the deadline to summarise and render.
_SUMMARY_MARGIN = 0.005
_ATTEMPTS = 2  # a request and one retry
_SELECTABLE = (SourceState.SYNC, SourceState.CANDIDATE)
# The reference id of chronyd's `local` reference (127.127.1.1), as chronyc prints it.
_LOCAL_REFID = "7F7F0101"


def _selection_rank(source: SourceData) -> int:
    """0 for the selected source, 1 for a candidate, 2 for any other state."""
    return _SELECTABLE.index(source.state) if source.state in _SELECTABLE else 2
# Each source costs two round trips: a daemon claiming millions (a hostile one) must not
# hold a probe to its deadline and its exposition to megabytes. chronyd with a pool of
# pools has tens.
MAX_SOURCES = 256
# chronyd's polls are -7 to 24 (log2 seconds); a wider value is no interval to export.
_MAX_POLL = 32


class CommandStatus(StrEnum):
    """How a command ended, the ``status`` label of ``probe_chrony_command_status_info``."""

    OK = "ok"
    UNAUTHORIZED = "unauthorized"
    TIMEOUT = "timeout"
    INVALID = "invalid"  # a reply that does not decode, or a status that refuses the request
    UNSUPPORTED = "unsupported"  # chronyd does not know the command, or speaks another version


# Statuses that mean chronyd (or this codec) does not know the request; every other refusal
# counts as invalid.
_UNSUPPORTED_STATUSES = frozenset({Status.INVALID, Status.BADPKTVERSION, Status.BADPKTLENGTH})

_TRACKING_FAILURE = {
    CommandStatus.TIMEOUT: Reason.CHRONY_TIMEOUT,
    CommandStatus.UNAUTHORIZED: Reason.CHRONY_UNAUTHORIZED,
    CommandStatus.INVALID: Reason.CHRONY_BAD_REPLY,
    CommandStatus.UNSUPPORTED: Reason.CHRONY_BAD_REPLY,
}

_TRACKING_GAUGES: tuple[tuple[Family, Callable[[Tracking], float]], ...] = (
    (TRACKING_STRATUM, lambda t: t.stratum),
    (TRACKING_REFERENCE_TIMESTAMP, lambda t: t.ref_time),
    (TRACKING_SYSTEM_TIME, lambda t: t.system_time),
    (TRACKING_LAST_OFFSET, lambda t: t.last_offset),
    (TRACKING_RMS_OFFSET, lambda t: t.rms_offset),
    (TRACKING_FREQUENCY, lambda t: t.frequency_ppm),
    (TRACKING_RESIDUAL_FREQUENCY, lambda t: t.residual_frequency_ppm),
    (TRACKING_SKEW, lambda t: t.skew_ppm),
    (TRACKING_ROOT_DELAY, lambda t: t.root_delay),
    (TRACKING_ROOT_DISPERSION, lambda t: t.root_dispersion),
    (TRACKING_UPDATE_INTERVAL, lambda t: t.update_interval),
    (TRACKING_LEAP_STATUS, lambda t: t.leap_status.value),
)
_SOURCE_GAUGES: tuple[tuple[Family, Callable[[SourceData], float | None]], ...] = (
    (SOURCE_STRATUM, lambda s: s.stratum),
    (SOURCE_POLL, lambda s: math.ldexp(1.0, s.poll) if abs(s.poll) <= _MAX_POLL else None),
    (SOURCE_REACH, lambda s: s.reach.bit_count() / 8),
    (SOURCE_LAST_RX_AGE, lambda s: s.last_rx_age),
    (SOURCE_LAST_SAMPLE_OFFSET, lambda s: s.offset),
    (SOURCE_LAST_SAMPLE_ERROR, lambda s: s.offset_error),
)
_SOURCESTATS_GAUGES: tuple[tuple[Family, Callable[[SourceStats], float]], ...] = (
    (SOURCESTATS_SAMPLES, lambda s: s.samples),
    (SOURCESTATS_RUNS, lambda s: s.runs),
    (SOURCESTATS_SPAN, lambda s: s.span),
    (SOURCESTATS_FREQUENCY, lambda s: s.residual_frequency_ppm),
    (SOURCESTATS_SKEW, lambda s: s.skew_ppm),
    (SOURCESTATS_OFFSET, lambda s: s.offset),
    (SOURCESTATS_STDDEV, lambda s: s.stddev),
)
# ServerStats field -> family; a field the daemon's reply type lacks (None) is not emitted.
_SERVERSTATS: tuple[tuple[Family, str], ...] = (
    (SERVERSTATS_NTP_RECEIVED, "ntp_hits"),
    (SERVERSTATS_NTP_DROPPED, "ntp_drops"),
    (SERVERSTATS_COMMAND_RECEIVED, "cmd_hits"),
    (SERVERSTATS_COMMAND_DROPPED, "cmd_drops"),
    (SERVERSTATS_LOG_DROPPED, "log_drops"),
    (SERVERSTATS_NKE_ACCEPTED, "nke_hits"),
    (SERVERSTATS_NKE_DROPPED, "nke_drops"),
    (SERVERSTATS_AUTHENTICATED, "ntp_auth_hits"),
    (SERVERSTATS_INTERLEAVED, "ntp_interleaved_hits"),
    (SERVERSTATS_TIMESTAMPS_HELD, "ntp_timestamps"),
    (SERVERSTATS_TIMESTAMP_SPAN, "ntp_span_seconds"),
    (SERVERSTATS_DAEMON_RX, "ntp_daemon_rx_timestamps"),
    (SERVERSTATS_DAEMON_TX, "ntp_daemon_tx_timestamps"),
    (SERVERSTATS_KERNEL_RX, "ntp_kernel_rx_timestamps"),
    (SERVERSTATS_KERNEL_TX, "ntp_kernel_tx_timestamps"),
    (SERVERSTATS_HW_RX, "ntp_hw_rx_timestamps"),
    (SERVERSTATS_HW_TX, "ntp_hw_tx_timestamps"),
)


@dataclass(frozen=True, slots=True)
class BadReply:
    """A datagram for the awaited request that does not decode."""

    why: str
    unsupported: bool  # a reply type or value this codec does not know (a newer chronyd)


Received = cmdmon.Reply | BadReply


@dataclass(slots=True)
class Collected:
    """What the probe obtained so far (kept when the deadline cuts it short)."""

    tracking: Tracking | None = None
    tracking_status: CommandStatus | None = None  # None: TRACKING was never sent
    n_sources: int | None = None
    unresolved: int = 0  # sources chronyd has no address for yet, left out as chronyc does
    # Each source's commands were sent and answered, and each source's data read (or
    # chronyd said the source is gone): only then are counts of sources whole.
    every_source_read: bool = False
    asked_every_source: bool = False  # up to MAX_SOURCES: the reading ran to its end
    unreadable: int = 0  # sources whose data came in a reply that could not be used
    gone: int = 0  # sources chronyd said were no more (NOSUCHSOURCE) when asked about them
    changed: bool = False  # the list changed under the reading (another number after it,
    # or a source's statistics of another address than its data)
    unconfirmed: bool = False  # sources went, and the number could not be asked again
    unauthorized: bool = False  # chronyd refused to tell this client about its sources
    sources: dict[int, SourceData] = field(default_factory=dict)
    sourcestats: dict[int, SourceStats] = field(default_factory=dict)
    # Sources under a name another source shows (two refclocks with one refid): counted in
    # the states and the success rule, without series of their own (they would repeat).
    unlisted: list[SourceData] = field(default_factory=list)
    serverstats: ServerStats | None = None
    statuses: dict[tuple[str, CommandStatus], None] = field(default_factory=dict)  # ordered set
    transport_failure: Reason | None = None  # the socket or the route failed
    transport_detail: str | None = None  # the system's words for it


@dataclass(frozen=True, slots=True)
class ChronyReport:
    """chronyd's view as the CLI shows it: tracking, sources, serverstats, command statuses."""

    server: str
    tracking: Tracking | None
    sources: tuple[tuple[SourceData, SourceStats | None], ...]
    serverstats: ServerStats | None
    commands: tuple[tuple[str, str], ...]
    unlisted: tuple[SourceData, ...] = ()  # counted, not shown: a name shown already
    complete: bool = False  # every source was read (no deadline or bad reply cut it short)

    @property
    def title(self) -> str:
        """Section name."""
        return "chrony"

    def rows(self) -> list[tuple[str, str]]:
        """Human-readable lines, with chronyc's names and signs."""
        rows = [("chronyd", self.server)]
        t = self.tracking
        if t is not None:
            rows += [
                ("reference", f"{t.refid} ({t.name})"),
                ("stratum", str(t.stratum)),
                # From the exact nanoseconds, as chronyc -c prints it (a float has ~0.2 us).
                ("ref time", f"{'-' if t.ref_time_ns < 0 else ''}"
                             f"{abs(t.ref_time_ns) // 1_000_000_000}."
                             f"{abs(t.ref_time_ns) % 1_000_000_000:09d}"),
                ("system time", f"{t.system_time:+.9f} s"),
                ("last offset", f"{t.last_offset:+.9f} s"),
                ("rms offset", f"{t.rms_offset:.9f} s"),
                ("frequency", f"{t.frequency_ppm:+.3f} ppm"),
                ("residual freq", f"{t.residual_frequency_ppm:+.3f} ppm"),
                ("skew", f"{t.skew_ppm:.3f} ppm"),
                ("root delay", f"{t.root_delay:.9f} s"),
                ("root dispersion", f"{t.root_dispersion:.9f} s"),
                ("update interval", f"{t.update_interval:.1f} s"),
                ("leap status", t.leap_status.name.lower()),
            ]
        for s, stats in self.sources:
            age = "-" if s.last_rx_age is None else f"{s.last_rx_age} s ago"
            line = (f"stratum {s.stratum}, poll 2^{s.poll} s, reach {s.reach:o}, "
                    f"last sample {age}: {s.offset:+.9f} s +/- {s.offset_error:.9f} s")
            if stats is not None:
                line += (f"; {stats.samples} samples, offset {stats.offset:+.9f} s, "
                         f"sd {stats.stddev:.9f} s")
            rows.append((f"{s.mode.symbol}{s.state.symbol} {s.name}", line))
        st = self.serverstats
        if st is not None:
            rows.append(("serverstats", f"ntp {st.ntp_hits} received, {st.ntp_drops} dropped; "
                                        f"command {st.cmd_hits} received, {st.cmd_drops} dropped"))
        if self.commands:
            rows.append(("commands", ", ".join(f"{c} {s}" for c, s in self.commands)))
        return rows

    @property
    def check_offset(self) -> float | None:
        """chronyd's System time, as chronyc prints it."""
        return None if self.tracking is None else self.tracking.system_time

    @property
    def selectable(self) -> int:
        """Sources in state sync or candidate."""
        return sum(1 for s in self.every_source if s.state in _SELECTABLE)

    @property
    def every_source(self) -> list[SourceData]:
        """The sources shown, then those under a name already shown."""
        return [s for s, _ in self.sources] + list(self.unlisted)

    def perfdata(self) -> list[Perf]:
        """System time, last and RMS offset, frequency, skew, root delay, dispersion and
        distance, stratum, source counts."""
        out = []
        t = self.tracking
        if t is not None:
            out += [
                Perf("offset", t.system_time, "s", checked=True),
                Perf("last_offset", t.last_offset, "s"),
                Perf("rms_offset", t.rms_offset, "s"), Perf("frequency_ppm", t.frequency_ppm),
                Perf("skew_ppm", t.skew_ppm), Perf("root_delay", t.root_delay, "s"),
                Perf("root_dispersion", t.root_dispersion, "s"),
                # chrony's own bound on the error (its maxdistance check).
                Perf("root_distance", t.root_delay / 2 + t.root_dispersion, "s"),
                Perf("stratum", float(t.stratum)),
            ]
        if self.complete:  # no invented zeros, nor a part read taken for the whole
            out += [Perf("sources", float(len(self.every_source))),
                    Perf("sources_selectable", float(self.selectable))]
        return out

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data, chronyc's values and signs."""
        t = self.tracking
        return {
            "chronyd": self.server,
            "tracking": None if t is None else {
                "refid": t.refid, "address": t.name, "stratum": t.stratum,
                "reference_timestamp_seconds": t.ref_time, "system_time_seconds": t.system_time,
                "last_offset_seconds": t.last_offset, "rms_offset_seconds": t.rms_offset,
                "frequency_ppm": t.frequency_ppm,
                "residual_frequency_ppm": t.residual_frequency_ppm, "skew_ppm": t.skew_ppm,
                "root_delay_seconds": t.root_delay, "root_dispersion_seconds": t.root_dispersion,
                "update_interval_seconds": t.update_interval, "leap_status": t.leap_status.value,
            },
            "sources": [_source_json(s, stats) for s, stats in self.sources],
            "serverstats": None if self.serverstats is None else {
                name: getattr(self.serverstats, name) for _, name in _SERVERSTATS
                if getattr(self.serverstats, name) is not None
            },
            "commands": [{"command": c, "status": s} for c, s in self.commands],
        }


def _source_json(s: SourceData, stats: SourceStats | None) -> dict[str, Any]:
    return {
        "source": s.name, "mode": s.mode.label, "state": s.state.label, "stratum": s.stratum,
        "poll": s.poll, "reach": s.reach, "last_rx_age_seconds": s.last_rx_age,
        "offset_seconds": s.offset, "measured_offset_seconds": s.measured_offset,
        "offset_error_seconds": s.offset_error,
        "stats": None if stats is None else {
            "samples": stats.samples, "runs": stats.runs, "span_seconds": stats.span,
            "frequency_ppm": stats.residual_frequency_ppm, "skew_ppm": stats.skew_ppm,
            "offset_seconds": stats.offset, "stddev_seconds": stats.stddev,
        },
    }


def report_of(m: Measurement) -> ChronyReport | None:
    """The chrony report in a measurement, if the probe got as far as talking to chronyd."""
    return next((r for r in m.reports if isinstance(r, ChronyReport)), None)


class Requests:
    """The request awaiting its reply, and those sent before it: the pump's matcher.

    A reply to an earlier request is late and ignored, but one to an earlier attempt of
    the request now awaited (a daemon slower than ``request_timeout``) answers it, as the
    ntpd prober takes a late answer to its first try.
    """

    __slots__ = ("_log", "_scope", "_source", "current", "expired", "retried", "undecodable")

    def __init__(self, log: Callable[[str], None], source: tuple[str, int] | None) -> None:
        self._log = log
        # The UDP address and port replies must come from; a datagram's source address
        # carries no zone (fe80::1%2), the scope id apart.
        self._source = None if source is None else (source[0].partition("%")[0], source[1])
        self._scope = None if source is None else zone_scope(source[0])
        self.current: tuple[Command, int] | None = None
        self.expired: list[tuple[Command, int]] = []
        self.retried: list[int] = []  # sequences of the awaited request's earlier attempts
        # Why the last datagram from the daemon's address that is no command reply at all
        # was ignored: the request's answer when nothing better comes (a chronyd speaking
        # another protocol version says no more than that).
        self.undecodable: str | None = None

    def match(self, d: Datagram) -> Received | None:
        """The awaited reply decoded (or why it does not decode); None to keep waiting."""
        if self._source is not None and ((str(d.source[0]), d.source[1]) != self._source or (
                self._scope is not None and len(d.source) > 3 and d.source[3] != self._scope)):
            self._log(f"datagram from {d.source[0]} port {d.source[1]} discarded: "
                      "not the target")
            return None
        current = self.current
        if current is None:
            self._log(f"datagram ignored: {self._late(d.data) or 'no request waiting'}")
            return None
        command, sequence = current
        echo = cmdmon.reply_echo(d.data)
        if echo is not None and echo[0] == command and echo[1] in self.retried:
            sequence = echo[1]  # a late reply to an earlier attempt of this request
        try:
            reply = cmdmon.decode_reply(d.data, command, sequence)
            if current[1] != sequence:  # said once it decoded, not before
                self._log(f"late reply to the earlier attempt (sequence {sequence:08x}) taken")
            return reply
        except cmdmon.ReplyMismatchError as exc:
            self._log(f"datagram ignored: {self._late(d.data) or exc}")
            return None
        except cmdmon.UnsupportedReplyError as exc:
            return BadReply(str(exc), unsupported=True)
        except cmdmon.CmdmonError as exc:
            if cmdmon.reply_echo(d.data) is None:
                # Not a command reply at all (garbage, or another protocol version's):
                # chronyc ignores it and keeps waiting, so one forged datagram cannot
                # stand in for chronyd's reply.
                self.undecodable = str(exc)
                self._log(f"datagram ignored: {exc}")
                return None
            return BadReply(str(exc), unsupported=False)

    def _late(self, data: bytes) -> str:
        """Why ``data`` is ignored when it answers an expired request, else ""."""
        echo = cmdmon.reply_echo(data)
        if echo is None:
            return ""
        for command, sequence in self.expired:
            if (command, sequence) == echo:
                return f"late reply to {command.name} sequence {sequence:08x}"
        return ""


def _describe(data: cmdmon.ReplyData | None) -> str:
    """One log line's worth of a decoded reply."""
    if isinstance(data, Tracking):
        return (f"refid {data.refid} ({data.name}) stratum {data.stratum} "
                f"leap {data.leap_status.value} system time {data.system_time:+.9f}s "
                f"frequency {data.frequency_ppm:+.3f}ppm skew {data.skew_ppm:.3f}ppm")
    if isinstance(data, NSources):
        return f"{data.n_sources} sources"
    if isinstance(data, SourceData):
        return (f"{data.mode.symbol}{data.state.symbol} {data.name} stratum {data.stratum} "
                f"poll {data.poll} reach {data.reach:o} offset {data.offset:+.9f}s "
                f"+/- {data.offset_error:.9f}s")
    if isinstance(data, SourceStats):
        return (f"{data.name} samples {data.samples} runs {data.runs} span {data.span}s "
                f"offset {data.offset:+.9f}s sd {data.stddev:.9f}s")
    if isinstance(data, ServerStats):
        return (f"{data.reply_type.name}: ntp {data.ntp_hits} received {data.ntp_drops} "
                f"dropped, command {data.cmd_hits} received {data.cmd_drops} dropped")
    return "no data"


def _status_of(status: Status) -> CommandStatus:
    if status is Status.SUCCESS:
        return CommandStatus.OK
    if status is Status.UNAUTH:
        return CommandStatus.UNAUTHORIZED
    if status in _UNSUPPORTED_STATUSES:
        return CommandStatus.UNSUPPORTED
    return CommandStatus.INVALID


class Session:
    """The commands of one probe over one pump, each with its timeout and one retry."""

    def __init__(self, pump: DatagramPump[Received], requests: Requests,
                 settings: ChronySettings, until: float, ctx: ProbeContext,
                 got: Collected) -> None:
        self._pump = pump
        self._requests = requests
        # Retries go at once; the pace only keeps requests whose reply cannot arrive.
        self._pace = Pace(0.0, settings.request_timeout, until)
        self._log = ctx.log
        self._loop = asyncio.get_running_loop()
        self.got = got
        self.last_status: Status | None = None  # chronyd's status in the last reply read

    async def ask(self, command: Command, index: int | None = None,
                  ) -> tuple[CommandStatus, cmdmon.ReplyData | None] | None:
        """Send ``command``, retry once; None when not even the first attempt fits before
        the deadline (nothing sent)."""
        name = command.name if index is None else f"{command.name} {index}"
        bad: BadReply | None = None
        path_error: Unreachable | None = None  # from a host on the path, not the target
        self._requests.retried = []  # a new request: no earlier attempt answers it
        for attempt in range(1, _ATTEMPTS + 1):
            if not await self._pace.wait():
                # No reply could come before the deadline: not sending is kinder to the
                # daemon than blaming it for a timeout that is ours.
                left = self._pace.until - self._loop.time()
                self._log(f"{name}: {'not sent' if attempt == 1 else 'no retry'}: "
                          f"{max(left, 0.0):.3f}s left, too little for a reply")
                if attempt == 1:
                    return None
                break
            try:
                result = await self._attempt(command, index, name, attempt)
            except OSError as exc:
                # No reply can come now (the failure reason says why): listed with every
                # command sent, as no answer, when this attempt or an earlier one went
                # (chronyd's socket removed between a request and its retry).
                if attempt > 1 or (isinstance(exc, Unreachable) and exc.sent):
                    self._record(command, CommandStatus.TIMEOUT)
                raise
            if isinstance(result, Unreachable):
                path_error = result
                continue
            if isinstance(result, cmdmon.Reply):
                self.last_status = result.status
                status = _status_of(result.status)
                self._record(command, status)
                return status, result.data
            if isinstance(result, BadReply):
                if result.unsupported:
                    self._record(command, CommandStatus.UNSUPPORTED)
                    return CommandStatus.UNSUPPORTED, None
                bad = result
        if bad is None and path_error is not None:
            # No reply overrode the ICMP error a host on the path sent: it is the answer.
            self._record(command, CommandStatus.TIMEOUT)
            raise path_error
        status = CommandStatus.INVALID if bad is not None else CommandStatus.TIMEOUT
        self._record(command, status)
        return status, None

    async def _attempt(self, command: Command, index: int | None, name: str,
                       attempt: int) -> Received | Unreachable | None:
        """One request and its wait: the datagram that answered it, the ICMP error a host
        on the path sent (the target's own errors are raised), or None."""
        sequence = secrets.randbits(32)
        payload = cmdmon.encode_request(command, sequence, index=index)
        requests = self._requests
        requests.current = (command, sequence)
        requests.undecodable = None
        self._log(lambda: f"-> {name} sequence {sequence:08x} attempt {attempt} "
                  f"({len(payload)} B)")
        pace, sent_at = self._pace, self._loop.time()
        try:
            _, received = await self._pump.exchange(payload,
                                                    min(sent_at + pace.timeout, pace.until))
        except Unreachable as exc:
            if exc.on_path is None:
                raise
            # From another host, and no reply came: maybe forged; a reply to the retry
            # overrides it, silence (or no time for a retry) does not.
            self._log(f"<- {name}: {exc.strerror} (attempt {attempt})")
            return exc
        finally:
            requests.current = None
            requests.expired.append((command, sequence))
            requests.retried.append(sequence)
        if received is None:
            if requests.undecodable is None:
                self._log(f"<- {name}: no reply in time (attempt {attempt})")
                return None
            received = BadReply(requests.undecodable, unsupported=False)
        else:
            pace.seen(self._loop.time() - sent_at)
        if isinstance(received, BadReply):
            self._log(f"<- {name}: bad reply: {received.why}")
        else:
            reply = received
            self._log(lambda: f"<- {name}: {reply.status.name}: {_describe(reply.data)}")
        return received

    async def _read_sources(self, count: int) -> bool:
        """SOURCE_DATA and SOURCESTATS of sources 0 .. count-1; False when chronyd stopped
        answering a SOURCE_DATA (the probe ends there; an unanswered SOURCESTATS only
        leaves that source's statistics out)."""
        got = self.got
        for index in range(count):
            for command in (Command.SOURCE_DATA, Command.SOURCESTATS):
                self.last_status = None
                answer = await self.ask(command, index)
                if answer is not None and answer[0] is CommandStatus.TIMEOUT and \
                        command is Command.SOURCESTATS:
                    # Dropped twice (cmdratelimit): chronyc's sources never asks for it, and
                    # neither the verdict nor the counts read it; the next source is read.
                    self._log(f"sourcestats of source {index}: no answer, left out")
                    continue
                if answer is None or answer[0] is CommandStatus.TIMEOUT:
                    return False
                data = answer[1]
                if isinstance(data, SourceData) and data.address.family is AddressFamily.ID:
                    # Not resolved yet (a name, a pool's empty place): chronyc's sources
                    # and sourcestats leave it out too (only -a shows it).
                    self._log(f"source {index} ({data.name}) has no address yet: left out")
                    got.unresolved += 1
                    break
                if isinstance(data, SourceData):
                    self._keep_source(index, data)
                elif command is Command.SOURCE_DATA and \
                        self.last_status is Status.NOSUCHSOURCE:
                    # Gone since N_SOURCES. chronyd numbers its sources without gaps, so
                    # every later one is gone too: not asked about, as chronyc stops here
                    # (the number is asked again at the end).
                    got.gone = count - index
                    self._log(f"source {index} and after: no such source")
                    return True
                elif command is Command.SOURCE_DATA and self.last_status is Status.UNAUTH:
                    # Sources closed to this client (chrony 4.7's opencommands without
                    # sources): none will be read; chronyc stops at its 501 too.
                    self._log("sources: not authorised, none read")
                    got.unauthorized = True
                    return True
                elif command is Command.SOURCE_DATA:
                    # A source is there, state unknown.
                    got.unreadable += 1
                elif isinstance(data, SourceStats) and index in got.sources:
                    if data.name != got.sources[index].name:
                        # Another source at this number than SOURCE_DATA named: the list
                        # changed between the two (deleted, added, a restart).
                        self._log(f"sourcestats of source {index} name {data.name}, not "
                                  f"{got.sources[index].name}: the list changed, left out")
                        got.changed = True
                    elif all(k.name != data.name for k in got.sourcestats.values()):
                        got.sourcestats[index] = data
        return True

    async def _count_again(self, before: int) -> bool:
        """Sources went away while they were read: ask how many there are now. A number
        other than before is a list that changed under the reading (chronyd restarted
        with another configuration, sources deleted): the counts are not of one list.
        False when chronyd did not answer (the probe ends, as after any such request)."""
        answer = await self.ask(Command.N_SOURCES)
        if answer is None or not isinstance(answer[1], NSources):
            # No time left to ask, no answer, or a refusal: whether the list is the one
            # read is not known, so neither are the counts (nor a verdict on them).
            self.got.unconfirmed = True
            return answer is None or answer[0] is not CommandStatus.TIMEOUT
        if answer[1].n_sources != before:
            self._log(f"chronyd now lists {answer[1].n_sources} sources, {before} when the "
                      "reading began: the list changed while it was read (a restart?), no "
                      "counts of its sources")
            self.got.changed = True
        return True

    def _record(self, command: Command, status: CommandStatus) -> None:
        self.got.statuses[(command.name.lower(), status)] = None

    def _keep_source(self, index: int, data: SourceData) -> None:
        """Keep a source's data. Two refclocks may go by one refid (chronyc lists both);
        one set of series per name, so the one further in the selection (sync, then
        candidate, else the first) is shown, and the other is counted only. Two sources
        at one address chronyd never has: a forged reply's repeat is left out."""
        got = self.got
        twin = next((i for i, k in got.sources.items() if k.name == data.name), None)
        if twin is None:
            got.sources[index] = data
            return
        shown, counted = got.sources[twin], data
        if not (shown.mode is SourceMode.REFCLOCK and data.mode is SourceMode.REFCLOCK):
            self._log(f"a second source at {data.name}: left out")
            got.unreadable += 1  # a source whose reply cannot be used: no counts as whole
            return
        if _selection_rank(data) < _selection_rank(shown):
            del got.sources[twin]
            got.sourcestats.pop(twin, None)
            got.sources[index] = data
            shown, counted = data, shown
        got.unlisted.append(counted)
        self._log(f"two sources named {data.name}: the {shown.state.label} one has the "
                  f"series, the {counted.state.label} one is only counted")

    async def run(self) -> None:
        """TRACKING, N_SOURCES, each source's SOURCE_DATA and SOURCESTATS, SERVER_STATS.

        A command that got no reply to either attempt ends the probe: chronyd is not
        answering, and every further command would only wait out its timeouts too.
        """
        got = self.got
        answer = await self.ask(Command.TRACKING)
        if answer is None:
            return
        got.tracking_status, data = answer
        if isinstance(data, Tracking):
            got.tracking = data
        if got.tracking_status is CommandStatus.TIMEOUT:
            return
        answer = await self.ask(Command.N_SOURCES)
        if answer is None or answer[0] is CommandStatus.TIMEOUT:
            return
        if isinstance(answer[1], NSources):
            got.n_sources = answer[1].n_sources
            if got.n_sources > MAX_SOURCES:
                self._log(f"chronyd reports {got.n_sources} sources: asking about the "
                          f"first {MAX_SOURCES}")
            if not await self._read_sources(min(got.n_sources, MAX_SOURCES)):
                return
            got.asked_every_source = True
            if got.gone and not await self._count_again(got.n_sources):
                return  # chronyd stopped answering
            # Counts only of every source: one not read (past the cap too) could be any.
            got.every_source_read = (not got.unreadable and not got.changed
                                     and not got.unconfirmed and not got.unauthorized
                                     and got.n_sources <= MAX_SOURCES)
        answer = await self.ask(Command.SERVER_STATS)
        if answer is not None and isinstance(answer[1], ServerStats):
            got.serverstats = answer[1]


def _bind_path(server: str) -> str:
    """Where the probe's end of the unix socket is bound: beside chronyd's socket, as
    chronyc does, since chronyd (which runs as _chrony, and under AppArmor on Debian and
    Ubuntu may only write in its own directory) must be able to send there."""
    directory = os.path.dirname(os.path.abspath(server))
    return os.path.join(directory, f"ntp_probe.{os.getpid()}.{secrets.token_hex(6)}.sock")


async def probe(target: Target, module: Module, ctx: ProbeContext) -> Measurement:
    """Ask chronyd what chronyc shows: tracking, sources, sourcestats, serverstats."""
    settings = module.chrony
    m, log = ctx.measurement, ctx.log
    until = ctx.deadline - _SUMMARY_MARGIN
    source: tuple[str, int] | None = None
    bind_path: str | None = None
    family: int
    dest: SockAddr
    if settings.socket:
        if common.refused(ctx, ctx.guard.refuse(target.host)):
            return m
        family, dest, bind_path = socket.AF_UNIX, settings.socket, _bind_path(settings.socket)
        server = f"unix socket {settings.socket}"
        log(f"target {target} only labels this probe and is not contacted: asking chronyd "
            f"on its {server}, replies to {bind_path}")
    else:
        port = target.port if target.port is not None else settings.port
        resolved = await common.prepare(
            target, port, ctx, preferred=settings.preferred_ip_protocol,
            fallback=settings.ip_protocol_fallback, until=until,
            window=least_window(settings.request_timeout))
        if resolved is None:
            return m
        family, source = resolved.family, (resolved.address, port)
        dest = sockaddr_for(resolved.address, port, family)
        server = f"{resolved.address} port {port}"
        log(f"asking chronyd on {server} (UDP)")
    got = Collected()
    requests = Requests(log, source)
    pump: DatagramPump[Received] | None = None
    try:
        pump = DatagramPump(family, dest, requests.match, log, bind_path=bind_path)
        async with pump:
            if bind_path is not None:
                # chronyd may run as another user (root probing _chrony's socket): it must
                # be able to write to our socket. The directory beside chronyd's socket is
                # not world-accessible (chronyd refuses to use one that is).
                os.chmod(bind_path, 0o666)
            await Session(pump, requests, settings, until, ctx, got).run()
    except Unreachable as exc:
        got.transport_failure = Reason.CHRONY_SOCKET if bind_path else Reason.UNREACHABLE
        got.transport_detail = f"{server}: {exc.strerror or exc}"
        log(got.transport_detail)
    except LocalSocketError as exc:  # no socket: this host's trouble
        got.transport_failure = Reason.LOCAL_ERROR
        got.transport_detail = str(exc.strerror or exc)
        log(f"local error, nothing sent: {got.transport_detail}")
    except OSError as exc:
        got.transport_failure = Reason.CHRONY_SOCKET if bind_path else Reason.UNREACHABLE
        where = f"reply socket {bind_path}" if bind_path else "local socket"
        got.transport_detail = f"{where}: {exc.strerror or exc}"
        log(got.transport_detail)
    finally:
        if pump is not None:
            m.packets_sent = pump.sent
        # Also when the runner's backstop cuts the probe off: what was obtained still counts.
        _conclude(got, settings, ctx, server)
    return m


def _emit(m: Measurement, got: Collected) -> None:
    """Every sample, in the families' declaration order."""
    t = got.tracking
    if t is not None:
        m.add(TRACKING_INFO, 1, t.refid, t.name)
        for family, read in _TRACKING_GAUGES:
            m.add(family, read(t))
    sources = [got.sources[i] for i in sorted(got.sources)]
    for s in sources:
        m.add(SOURCE_INFO, 1, s.name, s.mode.label, s.state.label)
    for family, read_source in _SOURCE_GAUGES:
        for s in sources:
            value = read_source(s)
            if value is not None:
                m.add(family, value, s.name)
    if got.every_source_read:  # counts of a partial read would be wrong, not partial
        counts = dict.fromkeys(SourceState, 0)
        for s in (*sources, *got.unlisted):
            counts[s.state] += 1
        for state, count in counts.items():
            m.add(SOURCES, count, state.label)
    stats = [got.sourcestats[i] for i in sorted(got.sourcestats)]
    for family, read_stats in _SOURCESTATS_GAUGES:
        for st in stats:
            m.add(family, read_stats(st), st.name)
    if got.serverstats is not None:
        for family, name in _SERVERSTATS:
            counter = getattr(got.serverstats, name)
            if counter is not None:
                m.add(family, counter)
    for command, status in got.statuses:
        m.add(COMMAND_STATUS, 1, command, status.value)


def _conclude(got: Collected, settings: ChronySettings, ctx: ProbeContext,
              server: str) -> None:
    m, log = ctx.measurement, ctx.log
    _emit(m, got)
    report = ChronyReport(
        server, got.tracking,
        tuple((got.sources[i], got.sourcestats.get(i)) for i in sorted(got.sources)),
        got.serverstats, tuple((c, s.value) for c, s in got.statuses), tuple(got.unlisted),
        got.every_source_read,
    )
    m.reports.append(report)
    if got.transport_failure is not None:
        m.fail(got.transport_failure, got.transport_detail)
    t = got.tracking
    if t is None:
        status = got.tracking_status
        if status is not None:
            m.fail(_TRACKING_FAILURE[status])
        elif not m.packets_sent and got.transport_failure is None:
            # Not sent at all: the deadline left no room for one request (not chronyd's
            # fault, nor its silence).
            m.fail(Reason.LOCAL_ERROR, NO_TIME)
        else:
            m.fail(Reason.CHRONY_TIMEOUT)
    elif t.leap_status is LeapStatus.UNSYNCHRONISED:
        m.fail(Reason.LEAP_UNSYNCHRONIZED)
    selectable = report.selectable
    obtained = len(got.sources) + len(got.unlisted)
    if got.n_sources is not None and obtained + got.unresolved < got.n_sources:
        log(f"{obtained} of {got.n_sources} sources obtained")
    if got.n_sources == 0 and t is not None and t.refid == _LOCAL_REFID and \
            t.leap_status is not LeapStatus.UNSYNCHRONISED:
        # `local` and no source configured: an isolated network's master, by design (one
        # whose sources all failed and fell back to local has sources to count).
        log("no source at all, serving the local reference: an isolated network's master, "
            "min_candidates not applied")
    elif selectable < settings.min_candidates:
        if got.n_sources is not None:  # else no count of them was read to state
            log(f"{selectable} sources in state sync or candidate, "
                f"min_candidates is {settings.min_candidates}")
        if got.n_sources is None:
            # Not how many sources there are: chronyd's answer to N_SOURCES says why.
            status = next((s for c, s in got.statuses if c == "n_sources"), None)
            log("the number of sources was not obtained: no verdict on them")
            m.fail(Reason.CHRONY_TIMEOUT if status is None else
                   _TRACKING_FAILURE.get(status, Reason.CHRONY_BAD_REPLY))
        elif got.every_source_read:
            m.fail(Reason.TOO_FEW_SOURCES)
        elif got.n_sources > MAX_SOURCES and got.asked_every_source and not got.unreadable:
            # The candidates may be among those past the cap: no verdict on chronyd's
            # sources, but that it lists more than are read.
            log(f"chronyd lists {got.n_sources} sources, more than the {MAX_SOURCES} read: "
                "chrony_bad_reply, not too_few_sources")
            m.fail(Reason.CHRONY_BAD_REPLY)
        elif got.unauthorized:
            log("chronyd does not tell this client its sources: chrony_unauthorized, not "
                "too_few_sources")
            m.fail(Reason.CHRONY_UNAUTHORIZED)
        elif got.changed:
            log("the list of sources changed while it was read: chrony_bad_reply, not "
                "too_few_sources")
            m.fail(Reason.CHRONY_BAD_REPLY)
        elif got.unreadable:
            # The sources not read may be the candidates: chronyd's replies, not their
            # states, are what is wrong.
            log(f"{got.unreadable} source{'s' if got.unreadable != 1 else ''} could not be "
                "read: chrony_bad_reply, not too_few_sources")
            m.fail(Reason.CHRONY_BAD_REPLY)
        else:
            # The sources not read may be the candidates: the deadline ended the reading, or
            # chronyd stopped answering (a source's request unanswered twice).
            log("the sources not obtained may be candidates: chrony_timeout, not too_few_sources")
            m.fail(Reason.CHRONY_TIMEOUT)
