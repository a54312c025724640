"""Pure maths over NTP samples: offset, delay, clock filter, jitter, sanity checks.

Inputs are raw 64-bit NTP timestamps; every difference is taken with the era-safe
integer :func:`~ntp_probe.ntp.packet.ts_diff` before it becomes a float, so a float
never holds an absolute NTP time (RFC 5905 section 8).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from ntp_probe.proto.ntp.packet import (
    Leap,
    Packet,
    frac_to_seconds,
    ts_diff,
    ts_diff_ns,
)

MAX_STRATUM = 16  # RFC 5905: 16 means unsynchronised
MAX_DISPERSION = 16.0  # RFC 5905's MAXDISP, seconds: a server claiming this much knows nothing


# The coarsest server clock a negative delay is excused by: 1/16 s, four times the 15.6 ms
# tick of Windows' clock; a coarser claim is not a clock an NTP server keeps.
COARSEST_CLOCK = 2.0 ** -4


@dataclass(frozen=True)
class Sample:
    """One request/response exchange: T1..T4 as raw NTP timestamps plus the reply."""

    t1: int  # client transmit (local clock)
    t2: int  # server receive (server clock)
    t3: int  # server transmit (server clock)
    t4: int  # client receive (local clock)
    packet: Packet
    t1_unix_ns: int  # T1 as read from the local clock; anchors every era resolution

    @property
    def t3_unix_ns(self) -> int:
        """The server's transmit time in Unix ns, its era taken nearest the local T1."""
        return self.t1_unix_ns + ts_diff_ns(self.t3, self.t1)

    # cached_property (hence no slots): the clock filter, jitter, root distance and the
    # checks all read these, and each computation is two era-safe differences.
    @functools.cached_property
    def offset(self) -> float:
        """θ = ((T2-T1)+(T3-T4))/2 seconds; positive when the server is ahead."""
        return frac_to_seconds(ts_diff(self.t2, self.t1) + ts_diff(self.t3, self.t4)) / 2

    @functools.cached_property
    def measured_delay(self) -> float:
        """δ = (T4-T1)-(T3-T2) seconds as the timestamps give it: the round trip less the
        server's processing. Negative when the server's clock put more time between T2 and
        T3 than the round trip took: a clock coarser than a fast network's round trip, or
        one fuzzed below its precision (as ntpd does), does that by up to its precision."""
        return frac_to_seconds(ts_diff(self.t4, self.t1) - ts_diff(self.t3, self.t2))

    @functools.cached_property
    def delay(self) -> float:
        """δ, never below 0: RFC 5905 clamps a negative delay (at the local precision, a
        nanosecond here) instead of reporting an impossible round trip."""
        return max(self.measured_delay, 0.0)

    @property
    def causality_violation(self) -> float:
        """node_exporter's MinError: :func:`causality_violation` of this sample's offset
        and its measured delay."""
        return causality_violation(self.offset, self.measured_delay)

    @property
    def delay_tolerance(self) -> float:
        """How negative δ may be: the server's precision, a claim of its own, so taken as
        :data:`COARSEST_CLOCK` at the coarsest (a claimed 2^127 s would excuse anything)."""
        return min(self.packet.precision_seconds, COARSEST_CLOCK)

    @property
    def delay_plausible(self) -> bool:
        """Whether δ is no more negative than the server's precision explains. Beyond
        that, the server claims to have held the request longer than the round trip took."""
        return self.measured_delay >= -self.delay_tolerance

    @property
    def server_processing(self) -> float:
        """T3 - T2 seconds."""
        return frac_to_seconds(ts_diff(self.t3, self.t2))

    @property
    def root_distance(self) -> float:
        """(δ + root delay)/2 + root dispersion: the bound on this sample's error."""
        return root_distance(self.delay, self.packet)


def root_distance(delay: float, packet: Packet) -> float:
    """(rtt + root_delay)/2 + root_dispersion, as defined by the exporter's contract
    (``delay`` as :attr:`Sample.delay` gives it: never negative)."""
    return (delay + packet.root_delay_seconds) / 2 + packet.root_dispersion_seconds


def candidates(samples: Sequence[Sample]) -> Sequence[Sample]:
    """The samples the clock filter takes: those from a synchronised server (leap
    indicator not 3, stratum 1-15). RFC 5905's packet() (A.5.1.1) and chrony drop a reply
    from an unsynchronised server before the filter: it carries no time. When every reply
    is such, all of them, so that the selected one shows why the server fails."""
    synchronised = [s for s in samples if s.packet.leap != 3 and 0 < s.packet.stratum < 16]
    return synchronised if synchronised else samples


def select_best(samples: Sequence[Sample]) -> Sample:
    """The clock filter: the sample with the smallest delay (earliest on a tie)."""
    if not samples:
        raise ValueError("no samples")
    return min(samples, key=lambda s: s.delay)


def jitter(samples: Sequence[Sample], best: Sample) -> float:
    """RMS of the other samples' offsets against the selected one (RFC 5905 peer jitter)."""
    others = [s.offset - best.offset for s in samples if s is not best]
    if not others:
        return 0.0
    return math.sqrt(sum(d * d for d in others) / len(others))


def offset_stddev(samples: Sequence[Sample]) -> float:
    """Sample standard deviation of the offsets (0 for a single sample)."""
    n = len(samples)
    if n < 2:
        return 0.0
    mean = sum(s.offset for s in samples) / n
    return math.sqrt(sum((s.offset - mean) ** 2 for s in samples) / (n - 1))


def loss_ratio(sent: int, received: int) -> float:
    """1 - received/sent, clamped to [0, 1]; 0 when nothing was sent."""
    if sent <= 0:
        return 0.0
    return min(1.0, max(0.0, 1.0 - received / sent))


def causality_violation(offset: float, delay: float) -> float:
    """Positive part of |offset| - delay/2 (node_exporter's sanity rule).

    An offset larger than half the round trip cannot be explained by path asymmetry:
    one of the two clocks is wrong by at least this much. ``delay`` is the measured δ
    (:attr:`Sample.measured_delay`), negative ones included: the result is then
    max(T1 - T2, T3 - T4, 0), node_exporter's MinError, whatever the sign of δ (the
    clamped δ would understate it by half of a negative δ).
    """
    return max(0.0, abs(offset) - delay / 2)


@dataclass(frozen=True, slots=True)
class SanityLimits:
    """The module settings that the selected sample is checked against (0 = off).

    No defaults here: they belong to the configuration (config.NTPSettings).
    """

    max_stratum: int
    max_root_distance: float
    max_reference_age: float
    fail_if_offset_exceeds: float
    max_causality_violation: float
    min_plausible_unix: float


def reference_age(sample: Sample) -> float | None:
    """T3 - reference time in seconds, or None when the server gives no reference time.

    A zero reference timestamp means "never synchronised" (ntpd in orphan mode sends it);
    read naively it would be an instant in 2036 or 1900.
    """
    if sample.packet.reference_ts == 0:
        return None
    return frac_to_seconds(ts_diff(sample.t3, sample.packet.reference_ts))


def reference_unix(sample: Sample) -> float:
    """The reference time as Unix seconds (0 when the server reports none)."""
    ref = sample.packet.reference_ts
    if ref == 0:
        return 0.0
    return (sample.t3_unix_ns + ts_diff_ns(ref, sample.t3)) / 1e9


class Failed(str):
    """A failed sanity check: compares as its reason, and says why in ``why``."""

    why: str

    def __new__(cls, reason: str, why: str) -> Failed:
        failed = super().__new__(cls, reason)
        failed.why = why
        return failed


def _utc(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))


def check(sample: Sample, limits: SanityLimits) -> Failed | None:
    """Return the first failed sanity check for the selected sample, or None.

    The order is the contract's: stratum, leap, implausible time, reference after
    transmit, stale reference, root distance, causality, offset.
    """
    p = sample.packet
    if p.stratum == 0 or p.stratum >= MAX_STRATUM or p.stratum > limits.max_stratum:
        return Failed("stratum_unsynchronized", f"stratum {p.stratum}" + (
            f" > max_stratum {limits.max_stratum}" if 0 < p.stratum < MAX_STRATUM
            else " (unsynchronised)"))
    if p.leap == Leap.UNSYNCHRONIZED:
        return Failed("leap_unsynchronized", "leap indicator 3 (unsynchronised)")
    server_time = sample.t3_unix_ns / 1e9
    if server_time < limits.min_plausible_unix:
        return Failed("implausible_time", f"server time {_utc(server_time)} before "
                      f"min_plausible_time {_utc(limits.min_plausible_unix)}")
    age = reference_age(sample)
    if age is not None:
        if age < 0:
            return Failed("reference_after_transmit",
                          f"reference time {-age:.6f} s after the transmit time")
        if limits.max_reference_age > 0 and age > limits.max_reference_age:
            return Failed("stale_reference", f"reference time {age:.0f} s old > "
                          f"max_reference_age {limits.max_reference_age:g} s")
    header_distance = p.root_delay_seconds / 2 + p.root_dispersion_seconds
    if header_distance >= MAX_DISPERSION:
        # RFC 5905's packet test ("invalid header values"), whatever the module's limit.
        return Failed("excess_root_distance", f"root delay/2 + root dispersion "
                      f"{header_distance:.6f} s >= {MAX_DISPERSION:g} s (RFC 5905 MAXDISP)")
    if limits.max_root_distance > 0 and sample.root_distance > limits.max_root_distance:
        return Failed("excess_root_distance", f"root distance {sample.root_distance:.6f} s > "
                      f"max_root_distance {limits.max_root_distance:g} s")
    violation = sample.causality_violation
    if limits.max_causality_violation > 0 and violation > limits.max_causality_violation:
        measured = ("" if sample.measured_delay >= 0 else
                    f" (with the rtt as measured, {sample.measured_delay:.6f} s)")
        return Failed("causality_violation", f"|offset| - rtt/2 = {violation:.6f} s{measured} "
                      f"> max_causality_violation {limits.max_causality_violation:g} s")
    if limits.fail_if_offset_exceeds > 0 and abs(sample.offset) > limits.fail_if_offset_exceeds:
        return Failed("offset_exceeded", f"|offset| {abs(sample.offset):.6f} s > "
                      f"fail_if_offset_exceeds {limits.fail_if_offset_exceeds:g} s")
    return None
