"""The NTP prober: one polite burst of client requests, the clock filter, the sanity checks."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ntp_probe.config.schema import Module, NTPSettings
from ntp_probe.engine.context import PrefixedLog, ProbeContext
from ntp_probe.engine.result import NO_TIME, Measurement, Perf, Reason
from ntp_probe.engine.targets import Target
from ntp_probe.exposition.families import Family
from ntp_probe.net.resolve import Resolved
from ntp_probe.net.udp import Datagram, DatagramPump, Unreachable, sockaddr_for
from ntp_probe.probers import common, leapcheck, pacing
from ntp_probe.probers.leapcheck import leap_check
from ntp_probe.probers.pacing import Pace
from ntp_probe.proto.ntp import client as rules
from ntp_probe.proto.ntp import packet as ntp
from ntp_probe.proto.ntp import sample as maths

OFFSET = Family(
    "probe_ntp_offset_seconds",
    "Offset of the server's clock from the local clock, in seconds "
    "(positive: the server is ahead), from the sample with the smallest delay.",
)
RTT = Family("probe_ntp_rtt_seconds", "Round-trip delay of the selected sample, in seconds.")
JITTER = Family("probe_ntp_jitter_seconds",
                "RMS of the sample offsets against the selected one, in seconds.")
OFFSET_STDDEV = Family("probe_ntp_offset_stddev_seconds",
                       "Standard deviation of the sample offsets, in seconds.")
STRATUM = Family("probe_ntp_stratum", "Stratum reported by the server.")
LEAP = Family("probe_ntp_leap_indicator",
              "Leap indicator (0 none, 1 insert, 2 delete, 3 unsynchronised).")
PRECISION = Family("probe_ntp_precision_seconds", "Precision of the server's clock, in seconds.")
ROOT_DELAY = Family("probe_ntp_root_delay_seconds",
                    "Server's round-trip delay to its reference clock, in seconds.")
ROOT_DISPERSION = Family("probe_ntp_root_dispersion_seconds",
                         "Server's dispersion to its reference clock, in seconds.")
ROOT_DISTANCE = Family(
    "probe_ntp_root_distance_seconds",
    "Bound on the error of the measured offset: (rtt + root delay)/2 + root dispersion, "
    "in seconds.",
)
REFERENCE_TIMESTAMP = Family(
    "probe_ntp_reference_timestamp_seconds",
    "When the server's clock was last set or corrected, as a Unix time "
    "(0 when the server reports none).",
)
SERVER_PROCESSING = Family("probe_ntp_server_processing_seconds",
                           "Time the server held the request (T3 - T2), in seconds.")
SAMPLES_SENT = Family("probe_ntp_samples_sent", "Requests sent in this probe.")
SAMPLES_RECEIVED = Family("probe_ntp_samples_received",
                          "Replies that passed the packet checks, Kiss-o'-Death included.")
PACKET_LOSS = Family("probe_ntp_packet_loss_ratio", "1 - samples received / samples sent.")
CAUSALITY = Family(
    "probe_ntp_causality_violation_seconds",
    "Positive part of |offset| - rtt/2: clock error that path asymmetry cannot explain, "
    "in seconds.",
)
TIMESTAMPING = Family(
    "probe_ntp_timestamping_info",
    "Where T1 (tx) and T4 (rx) were taken: kernel (the socket's timestamps) or user "
    "(the clock read around the system call), over the samples used.", ("tx", "rx"))
_PER_ADDRESS = ("address", "ip_protocol")
ADDRESS_UP = Family("probe_ntp_address_up",
                    "With all_addresses: whether the probe of this address succeeded.",
                    _PER_ADDRESS)
ADDRESS_OFFSET = Family("probe_ntp_address_offset_seconds",
                        "With all_addresses: this address's offset, in seconds.", _PER_ADDRESS)
ADDRESS_RTT = Family("probe_ntp_address_rtt_seconds",
                     "With all_addresses: this address's round-trip delay, in seconds.",
                     _PER_ADDRESS)
ADDRESS_STRATUM = Family("probe_ntp_address_stratum",
                         "With all_addresses: the stratum this address reports.", _PER_ADDRESS)
ADDRESS_FAILURE = Family("probe_ntp_address_failure_info",
                         "With all_addresses: why the probe of this address failed.",
                         ("address", "reason"))
SERVER_INFO = Family("probe_ntp_server_info",
                     "Server identity: reference id and NTP version of its reply.",
                     ("refid", "version"))

KOD_REASONS = {"RATE": Reason.KOD_RATE, "DENY": Reason.KOD_DENY, "RSTR": Reason.KOD_RSTR}
# An address's verdicts for which nothing was sent to it.
_NOTHING_SENT = frozenset({Reason.BACKOFF, Reason.TARGET_FORBIDDEN, Reason.LOCAL_ERROR})
REASONS = (
    Reason.TARGET_FORBIDDEN, Reason.BACKOFF, Reason.RESOLVE, Reason.LOCAL_ERROR,
    Reason.UNREACHABLE,
    Reason.KOD_RATE, Reason.KOD_DENY, Reason.KOD_RSTR, Reason.KOD_OTHER, Reason.TIMEOUT,
    Reason.INVALID_REPLY, Reason.STRATUM_UNSYNCHRONIZED, Reason.LEAP_UNSYNCHRONIZED,
    Reason.IMPLAUSIBLE_TIME, Reason.REFERENCE_AFTER_TRANSMIT, Reason.STALE_REFERENCE,
    Reason.EXCESS_ROOT_DISTANCE, Reason.CAUSALITY_VIOLATION, Reason.OFFSET_EXCEEDED,
)
LEAP_TOLERANCE = 1.0  # seconds added to max_causality_violation around a leap second
# Time kept back from the deadline to summarise the burst and render the reply.
_SUMMARY_MARGIN = 0.005
_LOGGED_DISCARDS = 5  # discarded datagrams logged one by one per burst; the rest counted


def longest(module: Module) -> float:
    """How long the module's burst lasts at the most, before its deadline (a group's
    members burst at once, so the same)."""
    s = module.ntp
    return pacing.longest(s.samples, s.sample_interval, s.reply_timeout)


@dataclass(frozen=True, slots=True)
class Reply:
    """An accepted reply and its receive time (Unix ns, local clock)."""

    packet: ntp.Packet
    t4_unix_ns: int
    kernel_timestamp: bool


@dataclass(slots=True)
class Burst:
    """What one burst collected."""

    sent: int = 0
    received: int = 0  # replies that passed the packet checks, KoD included
    discarded: int = 0
    samples: list[maths.Sample] = field(default_factory=list)
    numbers: list[int] = field(default_factory=list)  # each sample's number in the burst
    kod: ntp.Packet | None = None
    unreachable: str | None = None
    # Discards past the first few are counted by reason rather than logged one by one:
    # a junk-spraying server must not fill the log (or the cached result) with copies.
    logged: int = 0
    unlogged: dict[str, int] = field(default_factory=dict)  # reason kind -> count
    local_error: str | None = None
    tx_kernel: bool = True  # every sample's T1 from the kernel's transmit timestamp
    rx_kernel: bool = True  # every sample's T4 from the kernel's receive timestamp
    # (kiss code, seconds left): a KoD another probe of the server received stopped this
    # burst (two jobs scraping one server are what makes it send RATE).
    held_back: tuple[str, float] | None = None
    # Ends the pause between samples at once (set while the burst runs): a late KoD.
    interrupt: Callable[[], None] | None = None


@dataclass(frozen=True, slots=True)
class NTPReport:
    """The burst as the CLI shows it: the selected sample and every sample's offset."""

    server: str
    port: int
    sent: int
    received: int
    offset: float | None = None
    rtt: float | None = None
    jitter: float | None = None
    stratum: int | None = None
    refid: str | None = None
    leap: int | None = None
    version: int | None = None
    root_distance: float | None = None
    # (number in the burst as the log counts, offset, rtt, selected)
    samples: tuple[tuple[int, float, float, bool], ...] = ()
    # The selected sample's first failed check (stratum ... offset_exceeded), whatever
    # reason ranks first in the probe's verdict (a Kiss-o'-Death after it outranks it).
    failed_check: str | None = None
    kiss_code: str | None = None  # a Kiss-o'-Death's code (or the one a backoff keeps)
    precision: float | None = None  # the server's claimed clock precision, in seconds

    @property
    def title(self) -> str:
        """Section name."""
        return "ntp"

    def rows(self) -> list[tuple[str, str]]:
        """Human-readable lines."""
        rows = [("server", f"{self.server} port {self.port}")]
        if self.offset is not None and self.rtt is not None:
            rows += [
                ("offset", f"{self.offset:+.9f} s"),
                ("delay (rtt)", f"{self.rtt:.9f} s"),
                ("jitter", f"{self.jitter or 0.0:.9f} s"),
                ("stratum", str(self.stratum)),
                ("refid", str(self.refid)),
                ("leap", str(self.leap)),
                ("version", str(self.version)),
                ("root distance", f"{self.root_distance:.9f} s"),
            ]
        rows.append(("samples", f"{self.received} of {self.sent} answered"))
        if self.kiss_code is not None:
            rows.append(("kiss code", self.kiss_code))
        for i, offset, rtt, selected in self.samples:
            rows.append((f"{'*' if selected else ' '} sample {i}",
                         f"offset {offset:+.9f} s, rtt {rtt:.9f} s"))
        return rows

    @property
    def check_offset(self) -> float | None:
        """The server's offset."""
        return self.offset

    def perfdata(self) -> list[Perf]:
        """offset, delay, jitter, stratum, root distance, samples."""
        out = []
        if self.offset is not None and self.rtt is not None:
            out += [Perf("offset", self.offset, "s", checked=True), Perf("delay", self.rtt, "s"),
                    Perf("jitter", self.jitter or 0.0, "s"),
                    Perf("stratum", float(self.stratum or 0)),
                    Perf("root_distance", self.root_distance or 0.0, "s")]
        out += [Perf("samples_sent", float(self.sent)),
                Perf("samples_received", float(self.received))]
        return out

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {
            "server": self.server, "port": self.port, "samples_sent": self.sent,
            "samples_received": self.received, "offset_seconds": self.offset,
            "rtt_seconds": self.rtt, "jitter_seconds": self.jitter, "stratum": self.stratum,
            "refid": self.refid, "leap": self.leap, "version": self.version,
            "root_distance_seconds": self.root_distance, "kiss_code": self.kiss_code,
            "precision_seconds": self.precision,
            "samples": [{"sample": i, "offset_seconds": o, "rtt_seconds": r, "selected": s}
                        for i, o, r, s in self.samples],
        }


@dataclass(frozen=True, slots=True)
class AddressesReport:
    """All addresses of a name (all_addresses): each one's offset, and which one the check
    judges: with ``addresses_required: all`` the farthest off, since every address must
    be right; with ``any``, the NTP report's (the best address)."""

    required: str
    offsets: tuple[tuple[str, float | None], ...]  # (address, offset; None: no usable answer)
    failures: tuple[tuple[str, str | None], ...] = ()  # (address, its failure reason or None)

    @property
    def title(self) -> str:
        """Section name."""
        return "all_addresses"

    @property
    def check_offset(self) -> float | None:
        """The offset farthest from zero when every address must be right."""
        return self.farthest(0.0)

    def farthest(self, added: float) -> float | None:
        """The offset farthest from zero once ``added`` (check's -o) is added to each,
        when every address must be right."""
        known = [o for _, o in self.offsets if o is not None]
        return max(known, key=lambda o: abs(o + added)) if self.required == "all" and known \
            else None

    def rows(self) -> list[tuple[str, str]]:
        """Human-readable lines."""
        why = dict(self.failures)
        return [("addresses_required", self.required)] + [
            (address, (f"no usable answer ({why[address]})" if why.get(address) else
                       "no usable answer") if o is None else
             f"offset {o:+.9f} s" + (f", failed {why[address]}" if why.get(address) else ""))
            for address, o in self.offsets]

    def perfdata(self) -> list[Perf]:
        """Addresses probed and answered, and the farthest offset when it is judged."""
        out = [Perf("addresses", float(len(self.offsets))),
               Perf("addresses_answered",
                    float(sum(1 for _, o in self.offsets if o is not None)))]
        worst = self.check_offset
        if worst is not None:
            out.append(Perf("worst_offset", worst, "s", checked=True))
        return out

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data."""
        why = dict(self.failures)
        return {"addresses_required": self.required,
                "addresses": [{"address": a, "offset_seconds": o, "failure_reason": why.get(a)}
                              for a, o in self.offsets]}


def report_of(m: Measurement) -> NTPReport | None:
    """The NTP report in a measurement, if an NTP burst ran."""
    return next((r for r in m.reports if isinstance(r, NTPReport)), None)


def _matcher(client: rules.Client, burst: Burst,
             log: Callable[[str], None]) -> Callable[[Datagram], Reply | None]:
    def match(d: Datagram) -> Reply | None:
        outcome = client.receive(d.data, d.source)
        if isinstance(outcome, rules.Accepted):
            return Reply(outcome.packet, d.rx_ns, d.kernel_timestamp)
        if isinstance(outcome, rules.LateKoD):
            # Between samples or during the next one's wait: the burst stops at its next
            # step. Returned, it ends a wait in progress at once (the burst sees burst.kod
            # before it reads the reply); between samples nothing waits for it.
            if burst.kod is None:
                burst.kod = outcome.packet
                burst.received += 1
                log(f"Kiss-o'-Death {outcome.packet.kiss_code} answering an earlier request, "
                    f"poll {outcome.packet.poll}: burst stopped")
                interrupt(burst)
                return Reply(outcome.packet, d.rx_ns, d.kernel_timestamp)
            return None
        set_aside(burst, outcome, log)
        return None
    return match


def interrupt(burst: Burst) -> None:
    """End the burst's pause in progress, if any (a KoD came: it sends nothing more)."""
    if burst.interrupt is not None:
        burst.interrupt()


@contextlib.contextmanager
def kod_watched(burst: Burst, server: tuple[str, int], samples: int,
                ctx: ProbeContext) -> Iterator[None]:
    """While the burst runs, a KoD another probe gets from its server ends the burst's
    pause between samples at once (it sends nothing more then); a one-sample burst never
    pauses. Shared by the ntp and nts bursts."""
    unwatch = ctx.guard.watch_kod(server[0], server[1], functools.partial(
        interrupt, burst)) if samples > 1 else None
    try:
        yield
    finally:
        if unwatch is not None:
            unwatch()


def set_aside(burst: Burst, outcome: rules.Discarded | rules.Late,
              log: Callable[[str], None]) -> None:
    """A datagram that is not the awaited reply, into the burst's books: a discard from
    the target's host counts against the server, a late reply or a datagram from another
    host (anyone may send one) does not. The first few are logged one by one, the rest
    counted by kind. Shared by the ntp and nts bursts."""
    if isinstance(outcome, rules.Late):
        why, kind = "late reply to an expired request ignored", "late"
    else:
        if not outcome.foreign:
            burst.discarded += 1
        why, kind = f"reply discarded: {outcome.reason}", outcome.kind
    if burst.logged < _LOGGED_DISCARDS:
        burst.logged += 1
        log(why)
    else:
        burst.unlogged[kind] = burst.unlogged.get(kind, 0) + 1


def held_back(burst: Burst, server: tuple[str, int], i: int, ctx: ProbeContext) -> bool:
    """Whether a backoff began while the burst ran (a KoD another probe of the server
    received): then no more packets (RFC 5905, 7.4). Shared by the ntp and nts bursts."""
    backoff = ctx.guard.backoff(server[0], server[1])
    if backoff is None:
        return False
    burst.held_back = backoff
    ctx.log(f"another probe got a Kiss-o'-Death {backoff[0]} from {server[0]} port "
            f"{server[1]}: backing off {backoff[1]:.0f}s, burst stopped after {i} samples")
    return True


async def _run_burst(pump: DatagramPump[Reply], client: rules.Client, settings: NTPSettings,
                     burst: Burst, until: float, ctx: ProbeContext,
                     server: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    log = ctx.log
    pace = Pace(settings.sample_interval, settings.reply_timeout, until)
    burst.interrupt = pace.interrupt
    for i in range(settings.samples):
        # A KoD another probe got while the last sample was out (no pause to end then):
        # no pause, nothing more sent. One got during the pause ends it (Pace.interrupt).
        if i and held_back(burst, server, i, ctx):
            return
        if not await pace.wait():
            log(f"burst shortened to {i} of {settings.samples} samples to fit the timeout")
            return
        if burst.kod is not None:  # a late one, while the burst paused between samples
            return
        if i and held_back(burst, server, i, ctx):  # the first was admitted just now
            return
        nonce = rules.new_nonce()
        request = client.request(nonce)
        reply_until = min(loop.time() + settings.reply_timeout, until)
        try:
            t1_ns, reply = await pump.exchange(request, reply_until)
        except Unreachable as exc:
            burst.unreachable = exc.strerror or "unreachable"
            if exc.on_path is not None:
                # From another host, and no reply came: this sample is lost, the next
                # may get through (one forged packet must not end the burst).
                client.expire()
                log(f"sample {i + 1}: {burst.unreachable}")
                continue
            # Nothing listens, or the send failed: more requests would only fail too.
            client.cancel()
            log(f"sample {i + 1}: {burst.unreachable}: burst stopped")
            return
        if burst.kod is not None:  # a late one came during this wait
            client.expire()
            return
        if reply is None:
            client.expire()
            log(f"sample {i + 1}: no reply (nonce {nonce:016x})")
            continue
        burst.received += 1
        p = reply.packet
        s = take_sample(burst, i, p, t1_ns, reply.t4_unix_ns, pump.last_tx_kernel,
                        reply.kernel_timestamp, log)
        if burst.kod is not None:
            return
        if s is None:
            continue
        pace.seen(s.delay)
        # Formatted only if someone reads the log: most probes' logs are never read.
        log(functools.partial(_sample_line, i, s, pump.last_tx_kernel, reply.kernel_timestamp))


def take_sample(burst: Burst, i: int, p: ntp.Packet, t1_ns: int, t4_ns: int, tx_kernel: bool,
                rx_kernel: bool, log: Callable[[str], None]) -> maths.Sample | None:
    """A reply that passed the packet checks, into the burst: a Kiss-o'-Death stops it
    (``burst.kod`` set, None returned), a delay more negative than the server's precision
    explains is discarded (None), anything else is a sample (returned, and kept). Shared by
    the ntp and nts bursts."""
    if p.kiss_code is not None:
        burst.kod = p
        t1, t4 = ntp.ts_from_unix_ns(t1_ns), ntp.ts_from_unix_ns(t4_ns)
        log(f"sample {i + 1}: {_stamps(t1, p.receive_ts, p.transmit_ts, t4, t1_ns)} "
            f"Kiss-o'-Death {p.kiss_code} (stratum 0), poll {p.poll}: burst stopped")
        return None
    s = maths.Sample(ntp.ts_from_unix_ns(t1_ns), p.receive_ts, p.transmit_ts,
                     ntp.ts_from_unix_ns(t4_ns), p, t1_ns)
    if not s.delay_plausible:
        # The server claims to have held the request longer than the round trip took.
        burst.received -= 1
        burst.discarded += 1
        log(f"sample {i + 1}: {_stamps(s.t1, s.t2, s.t3, s.t4, t1_ns)} reply discarded: negative "
            f"delay {s.measured_delay * 1e6:.3f}us, beyond the server's precision "
            f"({s.delay_tolerance * 1e6:.3f}us)")
        return None
    burst.samples.append(s)
    burst.numbers.append(i + 1)
    burst.tx_kernel &= tx_kernel
    burst.rx_kernel &= rx_kernel
    return s


def _stamps(t1: int, t2: int, t3: int, t4: int, pivot_ns: int) -> str:
    """T1..T4 for the probe log: NTP timestamps in hex and as UTC (a zero one, as a
    Kiss-o'-Death may carry, without); ``pivot_ns`` resolves their eras."""
    return " ".join(f"T{n}={ts:016x}" + (f" ({_utc(ts, pivot_ns)})" if ts else "")
                    for n, ts in ((1, t1), (2, t2), (3, t3), (4, t4)))


def _sample_line(i: int, s: maths.Sample, tx_kernel: bool, rx_kernel: bool) -> str:
    p = s.packet
    return (f"sample {i + 1}: {_stamps(s.t1, s.t2, s.t3, s.t4, s.t1_unix_ns)} "
            f"({'kernel' if tx_kernel else 'user-space'} T1, "
            f"{'kernel' if rx_kernel else 'user-space'} T4) "
            f"offset={s.offset * 1e6:+.3f}us {delay_text(s)} "
            f"stratum={p.stratum} leap={p.leap} refid={p.refid_text}")


def delay_text(s: maths.Sample) -> str:
    """A sample's delay for the probe log, with the measured value when it was clamped."""
    if s.measured_delay >= 0:
        return f"delay={s.delay * 1e6:.3f}us"
    return (f"delay={s.delay * 1e6:.3f}us (measured {s.measured_delay * 1e6:.3f}us, within "
            f"the server's precision of {s.delay_tolerance * 1e6:.3f}us)")


def _utc(ts: int, pivot_ns: int) -> str:
    """An NTP timestamp as readable UTC, to the nanosecond (for the probe log)."""
    ns = ntp.ts_to_unix_ns(ts, pivot_ns)
    seconds, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{frac:09d}Z"


def _limits(settings: NTPSettings, near_leap: bool) -> maths.SanityLimits:
    causality = settings.max_causality_violation
    if causality > 0 and near_leap:
        # node_exporter's rule: a smearing or stepping server may be a second off around
        # a leap second without the local clock being wrong.
        causality += LEAP_TOLERANCE
    return maths.SanityLimits(
        max_stratum=settings.max_stratum,
        max_root_distance=settings.max_root_distance,
        max_reference_age=settings.max_reference_age,
        fail_if_offset_exceeds=settings.fail_if_offset_exceeds,
        max_causality_violation=causality,
        min_plausible_unix=settings.min_plausible_time,
    )


def _report(burst: Burst, settings: NTPSettings, ctx: ProbeContext,
            server: tuple[str, int]) -> None:
    # Samples are added in their families' declaration order, which is the exposition's:
    # the renderer then has nothing to sort.
    m, log = ctx.measurement, ctx.log
    m.packets_sent = burst.sent
    kiss = (burst.kod.kiss_code or "" if burst.kod is not None else
            burst.held_back[0] if burst.held_back is not None else None)
    if burst.kod is not None:
        code = burst.kod.kiss_code or ""
        m.add(common.KISS_CODE, 1, code)
        m.fail(KOD_REASONS.get(code, Reason.KOD_OTHER))
    elif burst.held_back is not None:
        # Another probe's KoD stopped this burst: it is backing off too, and says why it
        # sent fewer samples; with no answer yet, the backoff is its outcome.
        m.add(common.KISS_CODE, 1, burst.held_back[0])
        if not burst.samples:
            m.fail(Reason.BACKOFF)
    if not burst.samples:
        _add_counts(m, burst)
        m.reports.append(NTPReport(server[0], server[1], burst.sent, burst.received,
                                   kiss_code=kiss))
        if burst.local_error is not None and not burst.sent:
            m.fail(Reason.LOCAL_ERROR, burst.local_error)
        elif burst.unreachable is not None:  # a send error or an ICMP one: no route, ...
            m.fail(Reason.UNREACHABLE, burst.unreachable)
        elif not burst.sent and burst.kod is None and burst.held_back is None:
            m.fail(Reason.LOCAL_ERROR, NO_TIME)
        else:
            m.fail(Reason.INVALID_REPLY if burst.discarded else Reason.TIMEOUT)
        log("no usable reply" if burst.sent else "nothing sent, so no reply")
        return
    usable = maths.candidates(burst.samples)
    if len(usable) < len(burst.samples):
        log(f"{len(burst.samples) - len(usable)} of {len(burst.samples)} replies from an "
            "unsynchronised server (leap 3, or stratum 0 or 16 and up) left out of the "
            "selection")
    best = maths.select_best(usable)
    p = best.packet
    offset, delay = best.offset, best.delay
    # Each of these is computed from the packet on every read, and is used several times.
    refid, root_distance = p.refid_text, best.root_distance
    jitter = maths.jitter(usable, best)
    server_time = best.t3_unix_ns / 1e9
    near_leap = ctx.guard.near_leap(server[0], server[1], p.leap, server_time)
    # An unsynchronised server (stratum 0 without a kiss code, or 16 and up) vouches for
    # no leap, whatever its indicator says: judged as indicator 3, unknown.
    leap_check(ctx, p.leap if 0 < p.stratum < 16 else 3, server_time,
               fail_on_mismatch=settings.fail_on_leap_mismatch)
    m.add(OFFSET, offset)
    m.add(RTT, delay)
    m.add(JITTER, jitter)
    m.add(OFFSET_STDDEV, maths.offset_stddev(usable))
    m.add(STRATUM, p.stratum)
    m.add(LEAP, p.leap)
    m.add(PRECISION, p.precision_seconds)
    m.add(ROOT_DELAY, p.root_delay_seconds)
    m.add(ROOT_DISPERSION, p.root_dispersion_seconds)
    m.add(ROOT_DISTANCE, root_distance)
    m.add(REFERENCE_TIMESTAMP, maths.reference_unix(best))
    m.add(SERVER_PROCESSING, best.server_processing)
    _add_counts(m, burst)
    m.add(CAUSALITY, best.causality_violation)
    m.add(TIMESTAMPING, 1, "kernel" if burst.tx_kernel else "user",
          "kernel" if burst.rx_kernel else "user")
    m.add(SERVER_INFO, 1, refid, str(p.version))
    failed = maths.check(best, _limits(settings, near_leap))
    m.reports.append(NTPReport(
        server[0], server[1], burst.sent, burst.received, offset, delay, jitter, p.stratum,
        refid, p.leap, p.version, root_distance,
        tuple((n, s.offset, s.delay, s is best)
              for n, s in zip(burst.numbers, burst.samples, strict=True)),
        None if failed is None else str(failed), kiss, p.precision_seconds,
    ))
    if near_leap:
        log("within 24 h of an announced leap second: causality tolerance widened by 1 s")
    if failed is not None:
        log(f"check failed: {failed}: {failed.why}")
        m.fail(Reason(failed))
    log(functools.partial(_selected_line, offset, delay, root_distance))


def _add_counts(m: Measurement, burst: Burst) -> None:
    m.add(SAMPLES_SENT, burst.sent)
    m.add(SAMPLES_RECEIVED, burst.received)
    if burst.sent:  # nothing sent (a budget too short for one request): no loss to speak of
        m.add(PACKET_LOSS, maths.loss_ratio(burst.sent, burst.received))


def _selected_line(offset: float, delay: float, root_distance: float) -> str:
    return (f"selected sample: offset={offset * 1e6:+.3f}us rtt={delay * 1e6:.3f}us "
            f"root_distance={root_distance * 1e6:.3f}us")


async def probe(target: Target, module: Module, ctx: ProbeContext) -> Measurement:
    """Measure one NTP server: resolve, run the burst, report (with all_addresses: every
    address of the name, each with its own burst)."""
    settings = module.ntp
    if settings.all_addresses:
        port = target.port if target.port is not None else settings.port
        return await _probe_every_address(target, settings, port,
                                          ctx.deadline - _SUMMARY_MARGIN, ctx)
    found = await prepare(target, module, ctx)
    if found is not None:
        await burst(found, module, ctx)
    return ctx.measurement


async def prepare(target: Target, module: Module,
                  ctx: ProbeContext) -> tuple[Resolved, int] | None:
    """The first half of :func:`probe` (without all_addresses): the address and port the
    burst goes to, once the target policy allows it; None with the failure recorded."""
    settings = module.ntp
    port = target.port if target.port is not None else settings.port
    resolved = await common.prepare(target, port, ctx, preferred=settings.preferred_ip_protocol,
                                    fallback=settings.ip_protocol_fallback,
                                    until=ctx.deadline - _SUMMARY_MARGIN,
                                    window=pacing.least_window(settings.reply_timeout))
    return None if resolved is None else (resolved, port)


async def burst(server: tuple[Resolved, int], module: Module, ctx: ProbeContext) -> None:
    """The second half of :func:`probe`: the burst to a server :func:`prepare` admitted."""
    await _burst_to(server[0], server[1], module.ntp, ctx.deadline - _SUMMARY_MARGIN, ctx)


def samples_text(settings: NTPSettings) -> str:
    """The burst's plan for the log: "1 sample", or "up to 3 samples every 2s"."""
    if settings.samples == 1:
        return "1 sample"
    return f"up to {settings.samples} samples every {settings.sample_interval:g}s"


async def _burst_to(resolved: Resolved, port: int, settings: NTPSettings, until: float,
                    ctx: ProbeContext) -> None:
    log = ctx.log
    log(lambda: f"probing {resolved.address} port {port}, {samples_text(settings)}")
    burst = Burst()
    client = rules.Client((resolved.address, port), settings.version)
    pump: DatagramPump[Reply] | None = None
    try:
        if settings.source_ip_address:
            source_family = socket.AF_INET6 if ":" in settings.source_ip_address else \
                socket.AF_INET
            if source_family != resolved.family:
                raise OSError(errno.EAFNOSUPPORT, f"source_ip_address "
                              f"{settings.source_ip_address} cannot reach {resolved.address}")
            log(f"sending from {settings.source_ip_address}")
        pump = DatagramPump(resolved.family, sockaddr_for(resolved.address, port, resolved.family),
                            _matcher(client, burst, log), log, tx_timestamps=True,
                            source=settings.source_ip_address)
        server = (resolved.address, port)
        with kod_watched(burst, server, settings.samples, ctx):
            async with pump:
                await _run_burst(pump, client, settings, burst, until, ctx, server)
    except OSError as exc:
        # No socket (out of descriptors) or no usable scope: this host's trouble.
        log(f"local error, nothing sent: {exc.strerror or exc}")
        burst.local_error = exc.strerror or str(exc)
    finally:
        if pump is not None:
            burst.sent = pump.sent
            burst.discarded += pump.truncated  # a reply too long to be one, from anyone
        # Also when the runner's backstop cuts the burst off: what was sent and received
        # still counts.
        conclude(burst, settings, ctx, (resolved.address, port))


async def _probe_every_address(target: Target, settings: NTPSettings, port: int, until: float,
                               ctx: ProbeContext) -> Measurement:
    m, log = ctx.measurement, ctx.log
    found = await common.prepare_all(target, ctx, settings.max_addresses, until,
                                     preferred=settings.preferred_ip_protocol,
                                     fallback=settings.ip_protocol_fallback,
                                     window=pacing.least_window(settings.reply_timeout))
    if found is None:
        return m
    children = [ProbeContext(ctx.deadline, PrefixedLog(log, f"[{r.address}] "), ctx.guard)
                for r in found]

    async def one(resolved: Resolved, child: ProbeContext) -> None:
        admitted = common.admit(target, resolved, port, child)
        if admitted is not None:
            await _burst_to(admitted, port, settings, until, child)

    await asyncio.gather(*(one(r, c) for r, c in zip(found, children, strict=True)))
    for resolved, child in zip(found, children, strict=True):
        cm = child.measurement
        labels = (resolved.address, str(resolved.ip_protocol))
        m.packets_sent += cm.packets_sent
        m.add(ADDRESS_UP, 1 if cm.success else 0, *labels)
        report = report_of(cm)
        if report is not None and report.offset is not None and report.rtt is not None:
            m.add(ADDRESS_OFFSET, report.offset, *labels)
            m.add(ADDRESS_RTT, report.rtt, *labels)
            m.add(ADDRESS_STRATUM, float(report.stratum or 0), *labels)
        if cm.failure is not None:
            m.add(ADDRESS_FAILURE, 1, resolved.address, cm.failure.value)
    ok = [c.measurement for c in children if c.measurement.success]
    failed = [c.measurement for c in children if not c.measurement.success]
    # The unlabelled series describe the succeeding address with the smallest root
    # distance, so dashboards built for one address still work; with none succeeding, an
    # address that answered (its values show why it failed), else the first address.
    def distance(cm: Measurement) -> float:
        r = report_of(cm)
        return r.root_distance if r is not None and r.root_distance is not None else 1e9

    answered = [cm for cm in failed if (r := report_of(cm)) is not None and r.offset is not None]
    chosen = (min(ok, key=distance) if ok else min(answered, key=distance) if answered
              else children[0].measurement)
    every = [c.measurement for c in children]
    mismatch = leapcheck.mismatch_of_any(every)
    m.samples += [s for s in chosen.samples if s[0] is not common.BACKOFF_REMAINING
                  and (mismatch is None or s[0] is not leapcheck.LEAP_CHECK)]
    if mismatch is not None:  # whichever address announces the wrong leap, the name does
        m.add(leapcheck.LEAP_CHECK, 1, mismatch)
    kiss_codes_of_every(m, every, chosen)
    offsets, reasons = [], []
    for resolved, child in zip(found, children, strict=True):
        report = report_of(child.measurement)
        offsets.append((resolved.address, None if report is None else report.offset))
        failure = child.measurement.failure
        reasons.append((resolved.address, None if failure is None else failure.value))
    m.reports += chosen.reports
    # Last: the check judges the last report with an offset to judge.
    m.reports.append(AddressesReport(settings.addresses_required, tuple(offsets),
                                     tuple(reasons)))
    required_all = settings.addresses_required == "all"
    if failed and (required_all or not ok):
        # The name's verdict is an address's: said with the address, and the system's
        # words where that address's probe had them. An address nothing was sent to
        # (backed off, refused) gives it only when no address probed failed: one server's
        # Kiss-o'-Death must not hide that its siblings do not answer.
        failures = [(resolved.address, child.measurement) for resolved, child
                    in zip(found, children, strict=True) if child.measurement.failure]
        probed = [(a, cm) for a, cm in failures if cm.failure not in _NOTHING_SENT]
        for address, cm in probed or failures:
            assert cm.failure is not None
            m.fail(cm.failure, f"{address}: {cm.failure_detail}"
                   if cm.failure_detail else f"at {address}")
    if mismatch is not None and settings.fail_on_leap_mismatch:
        # The name's verdict is a mismatch, which the module asks to fail on: also when
        # other addresses succeed (addresses_required: any), as the verdict shown says.
        m.fail(Reason.LEAP_MISMATCH)
    log(f"{len(ok)} of {len(found)} addresses succeeded "
        f"(addresses_required: {settings.addresses_required})")
    return m


# Kiss codes that say a server is not synchronised yet, not that it refuses us.
_UNSYNCHRONISED_CODES = frozenset({"INIT", "STEP"})


def kiss_codes_of_every(m: Measurement, every: list[Measurement],
                        chosen: Measurement | None = None) -> None:
    """A Kiss-o'-Death or a backoff at any address (or group member) is the probe's to
    report, not only that of the ``chosen`` one whose series were copied already (the
    NTPKissOfDeath alert reads it): each code once, and the longest backoff left. INIT
    and STEP are not: they say that address or member is unsynchronised, which the
    probe as a whole is not (NTPServerUnsynchronised reads them)."""
    codes = set() if chosen is None else {labels for labels, _ in chosen.values(common.KISS_CODE)}
    backoffs = []
    for cm in every:
        if cm is not chosen:
            for labels, v in cm.values(common.KISS_CODE):
                if labels not in codes and labels[0] not in _UNSYNCHRONISED_CODES:
                    codes.add(labels)
                    m.add(common.KISS_CODE, v, *labels)
        left = cm.value(common.BACKOFF_REMAINING)
        if left is not None:
            backoffs.append(left)
    if backoffs:
        m.add(common.BACKOFF_REMAINING, max(backoffs))


def conclude(burst: Burst, settings: NTPSettings, ctx: ProbeContext,
             server: tuple[str, int]) -> None:
    """After a burst: the KoD memory, then every gauge and check (shared with NTS)."""
    m, log, guard = ctx.measurement, ctx.log, ctx.guard
    if burst.kod is not None:
        code = burst.kod.kiss_code or ""
        step = guard.record_kod(server[0], server[1], code, burst.kod.poll,
                                settings.kod_rate_max_backoff, settings.kod_deny_backoff)
        if step > 0:
            log(f"no packet to {server[0]} port {server[1]} for {step:.0f}s ({code})")
            m.add(common.BACKOFF_REMAINING, step)
    elif burst.held_back is not None:
        m.add(common.BACKOFF_REMAINING, burst.held_back[1])
    elif burst.samples:
        guard.answered(server[0], server[1])
    if burst.unlogged:
        log(f"{sum(burst.unlogged.values())} more datagrams not logged one by one: "
            + ", ".join(f"{n} {kind}" for kind, n in
                        sorted(burst.unlogged.items(), key=lambda item: -item[1])))
    _report(burst, settings, ctx, server)
