"""The ntp_group prober: falsetickers across a group of servers, and the local clock against
their consensus.

Every member gets the module's polite NTP burst, concurrently, through the ntp prober with a
context of its own (same deadline, same guard: the target policy and the Kiss-o'-Death memory
apply to each member), so a member's failure stays that member's. The members that answered
with a usable sample are then put through the RFC 5905 intersection, each contributing
``[offset - root distance, offset + root distance]``.

All offsets are read against the same local clock within the same few seconds, so an error
of the exporter's own clock shifts every interval equally: the verdicts do not depend on it,
and the midpoint of the intersection measures it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import Any

from ntp_probe.config.schema import MAX_GROUP_MEMBERS, Config, Module, NTPSettings
from ntp_probe.engine.context import Log, PrefixedLog, ProbeContext
from ntp_probe.engine.result import Measurement, Perf, Reason
from ntp_probe.engine.targets import Target, TargetError, check_member, parse_target
from ntp_probe.exposition.families import Family
from ntp_probe.net.resolve import Resolved
from ntp_probe.probers import ntp
from ntp_probe.proto.ntp.sample import COARSEST_CLOCK
from ntp_probe.proto.ntp.select import Candidate, Selection, intersect

DESCRIPTION = ("falsetickers across a group of NTP servers (RFC 5905 selection), and the "
               "exporter's own clock against their consensus")

MEMBER_UP = Family("probe_ntp_group_member_up",
                   "Whether the member's own NTP probe succeeded (1) or failed (0).", ("member",))
MEMBER_OFFSET = Family(
    "probe_ntp_group_member_offset_seconds",
    "Offset of the member's clock from the local clock, in seconds (positive: the member "
    "is ahead).", ("member",))
MEMBER_ROOT_DISTANCE = Family(
    "probe_ntp_group_member_root_distance_seconds",
    "Half-width of the member's correctness interval, RFC 5905's root distance: "
    "(rtt + root delay)/2 + root dispersion + both clocks' precision + jitter, at least "
    "1 ms, in seconds.", ("member",))
MEMBER_SELECTION = Family(
    "probe_ntp_group_member_selection_info",
    "The member's state in the group's selection: truechimer, falseticker, unfit (answered "
    "but failed a check of its own) or unreachable (no usable answer).", ("member", "state"))
MEMBER_FAILURE = Family("probe_ntp_group_member_failure_info",
                        "Why the member's own NTP probe failed.", ("member", "reason"))
INTERSECTION_LOW = Family(
    "probe_ntp_group_intersection_low_seconds",
    "Lower end of the intersection: the lowest point where a majority of the candidates' "
    "intervals meet, relative to the local clock, in seconds (absent without a majority).")
INTERSECTION_HIGH = Family(
    "probe_ntp_group_intersection_high_seconds",
    "Upper end of the intersection: the highest point where a majority of the candidates' "
    "intervals meet, relative to the local clock, in seconds (absent without a majority).")
MAJORITY = Family("probe_ntp_group_majority",
                  "Whether a majority of the candidates (members that answered and passed "
                  "their own checks) share an intersection.")
TRUECHIMERS = Family("probe_ntp_group_truechimers",
                     "Members whose correctness interval overlaps the intersection (members "
                     "naming the same address and port count once).")
FALSETICKERS = Family("probe_ntp_group_falsetickers",
                      "Members that answered, passed their checks, and disagree with the "
                      "majority (every such member when there is no majority; members naming "
                      "the same address and port count once).")
LOCAL_CLOCK_OFFSET = Family(
    "probe_ntp_group_local_clock_offset_seconds",
    "Midpoint of the intersection: how far the truechimers' consensus is ahead of the "
    "exporter's own clock, in seconds (absent without a majority).")

REASONS = (Reason.TARGET_FORBIDDEN, Reason.BACKOFF, Reason.LOCAL_ERROR, Reason.NO_MAJORITY,
           Reason.FALSETICKERS)

# ntpd's MINDISTANCE: an interval is never narrower than this on either side.
MIN_DISTANCE = 0.001
# This host's clock precision: with the server's, part of RFC 5905's root distance (its
# peer dispersion starts at both), as ntpd's root_distance() and chrony's distance have.
LOCAL_PRECISION = time.clock_getres(time.CLOCK_REALTIME)

# Failures that say nothing against the time a member gave: checks against the local clock
# or the local leap file, and a Kiss-o'-Death that ended its burst after a valid sample (a
# request to slow down or go away, not a fault of that sample). A member failing only these
# still takes part in the selection, which is what judges its time.
_NOT_UNFIT = frozenset({Reason.OFFSET_EXCEEDED, Reason.CAUSALITY_VIOLATION,
                        Reason.LEAP_MISMATCH, Reason.KOD_RATE, Reason.KOD_DENY,
                        Reason.KOD_RSTR, Reason.KOD_OTHER})


def interval_half_width(report: ntp.NTPReport) -> float:
    """The member's correctness interval's half-width: RFC 5905's root distance λ, the
    exporter's root distance plus both clocks' precision and the member's jitter (a
    coarse clock, Windows' w32time at 2^-6 s, is no falseticker for its ticks), at least
    :data:`MIN_DISTANCE`. The server's precision is its own claim: counted up to
    :data:`~ntp_probe.proto.ntp.sample.COARSEST_CLOCK`."""
    precision = min(report.precision or 0.0, COARSEST_CLOCK)
    return max((report.root_distance or 0.0) + precision + LOCAL_PRECISION
               + (report.jitter or 0.0), MIN_DISTANCE)


@dataclass(frozen=True, slots=True)
class GroupTarget(Target):
    """A group to probe: ``host`` is its name (a configured group, or the canonical
    comma-separated member list) and ``members`` the servers in it."""

    members: tuple[Target, ...] = ()

    def hosts(self) -> tuple[str, ...]:
        """The members' hosts."""
        return tuple(member.host for member in self.members)

    def __str__(self) -> str:
        return self.host


def resolve_target(config: Config, raw: str) -> GroupTarget:
    """A ``target`` parameter as a group: a name from ``groups:``, or members separated
    by commas (each host or host:port); raise :class:`TargetError` with a one-line
    reason."""
    text = raw.strip()
    if "," not in text:
        found = config.group_named(text)
        if found is None:
            known = ", ".join(config.groups) or "none configured"
            raise TargetError(f"no group named {text[:64]!r} (known: {known}); give a group "
                              "name or a comma-separated list of two members or more")
        if ":" in text:
            # A port (or anything) after a group's name would be silently dropped.
            raise TargetError(f"{text[:64]!r}: a group is named alone, without a port (its "
                              "members have their own)")
        return GroupTarget(found, None,
                           tuple(parse_target(name) for name in config.groups[found]))
    parts = text.split(",")
    if len(parts) > MAX_GROUP_MEMBERS:
        raise TargetError(f"{len(parts)} members: a group has at most {MAX_GROUP_MEMBERS}")
    members: list[Target] = []
    for part in parts:
        if config.group_named(part) is not None:
            # Not a host to look up (a short name would go to DNS and read as unreachable).
            raise TargetError(f"{part.strip()[:64]!r} is a group: a comma-separated list "
                              "names servers; probe a group by its name alone")
        member = check_member(parse_target(part))
        if member in members:
            raise TargetError(f"member {str(member)!r} is listed twice")
        members.append(member)
    return GroupTarget(",".join(map(str, members)), None, tuple(members))


@dataclass(frozen=True, slots=True)
class MemberResult:
    """One member as the group saw it."""

    member: str
    state: str  # truechimer, falseticker, unfit, unreachable
    offset: float | None
    root_distance: float | None
    failure: str | None


@dataclass(frozen=True, slots=True)
class GroupReport:
    """The group's selection as the CLI shows it."""

    group: str
    members: tuple[MemberResult, ...]
    low: float | None
    high: float | None
    # As the selection counted them: members naming one server count once, as in the
    # metrics (counting the rows would count each spelling).
    truechimers: int
    falsetickers: int

    @property
    def title(self) -> str:
        """Section name."""
        return "ntp_group"

    @property
    def local_clock_offset(self) -> float | None:
        """How far the consensus is ahead of the local clock (None without a majority)."""
        if self.low is None or self.high is None:
            return None
        return (self.low + self.high) / 2

    def rows(self) -> list[tuple[str, str]]:
        """Human-readable lines."""
        rows = [("group", self.group)]
        for r in self.members:
            text = r.state
            if r.offset is not None and r.root_distance is not None:
                text += f", offset {r.offset:+.9f} s +- {r.root_distance:.9f} s"
            if r.failure is not None:
                text += f" ({r.failure})"
            rows.append((r.member, text))
        if self.low is None or self.high is None:
            rows.append(("intersection", "none: no majority"))
        else:
            rows.append(("intersection", f"[{self.low:+.9f}, {self.high:+.9f}] s"))
            rows.append(("local clock offset", f"{self.local_clock_offset:+.9f} s"))
        rows.append(("truechimers", str(self.truechimers)))
        rows.append(("falsetickers", str(self.falsetickers)))
        return rows

    @property
    def check_offset(self) -> float | None:
        """The local clock's offset from the consensus."""
        return self.local_clock_offset

    def perfdata(self) -> list[Perf]:
        """Local clock offset (with a majority), truechimers, falsetickers."""
        out = []
        if self.local_clock_offset is not None:
            out.append(Perf("local_clock_offset", self.local_clock_offset, "s",
                            checked=True))
        out += [Perf("truechimers", float(self.truechimers)),
                Perf("falsetickers", float(self.falsetickers))]
        return out

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {
            "group": self.group, "majority": self.low is not None,
            "intersection_low_seconds": self.low, "intersection_high_seconds": self.high,
            "local_clock_offset_seconds": self.local_clock_offset,
            "truechimers": self.truechimers, "falsetickers": self.falsetickers,
            "members": [{"member": r.member, "state": r.state, "offset_seconds": r.offset,
                         "root_distance_seconds": r.root_distance, "failure": r.failure}
                        for r in self.members],
        }


async def probe(target: Target, module: Module, ctx: ProbeContext) -> Measurement:
    """Probe every member concurrently, then select; a target that is not a
    :class:`GroupTarget` is a group of one."""
    m, log = ctx.measurement, ctx.log
    members = target.members if isinstance(target, GroupTarget) else (target,)
    log(f"group {target}: {len(members)} member{'s' if len(members) != 1 else ''}, "
        f"each with up to {module.ntp.samples} samples")
    children = [ProbeContext(ctx.deadline, PrefixedLog(log, f"[{member}] "), ctx.guard,
                             Measurement()) for member in members]
    # Members that resolve to the same address and port are one server under two
    # spellings: it gets one burst and one vote, as chrony keeps one source for them.
    servers: list[tuple[str, int] | None] = [None] * len(members)
    measured_by: dict[tuple[str, int], int] = {}

    async def one(i: int) -> None:
        found = await ntp.prepare(members[i], module, children[i])
        if found is None:
            return
        servers[i] = server = (found[0].address, found[1])
        if server not in measured_by:
            measured_by[server] = i
            measured = None
            try:
                measured = await _member_burst(found, module, children[i])
            finally:
                # Counted as each burst ends, also one a hang-up cut off: the packets went.
                if measured is None:
                    m.packets_sent += children[i].measurement.packets_sent
            if measured is not None:
                children[i] = replace(children[i], measurement=measured)

    await asyncio.gather(*(one(i) for i in range(len(members))))
    results: list[tuple[str, str, Measurement, float | None, float | None]] = []
    candidates: list[Candidate] = []
    for i, member in enumerate(members):
        name = str(member)
        server = servers[i]
        twin = measured_by[server] if server is not None else i
        owner, cm = str(members[twin]), children[twin].measurement
        if twin != i and server is not None:
            log(f"member {name}: the same server as {owner} ({server[0]} port {server[1]}): "
                "measured once, counted once in the selection")
        report = ntp.report_of(cm)
        if report is None or report.offset is None:
            results.append((name, owner, cm, None, None))
            continue
        distance = interval_half_width(report)
        results.append((name, owner, cm, report.offset, distance))
        # Judged by every check its sample failed, not only the one ranking first: a
        # Kiss-o'-Death outranks an unsynchronised server's leap_unsynchronized.
        fit = report.failed_check is None or Reason(report.failed_check) in _NOT_UNFIT
        if twin == i and fit and (cm.failure is None or cm.failure in _NOT_UNFIT):
            candidates.append(Candidate(name, report.offset, distance))
    selection = intersect(candidates)
    states = dict.fromkeys(selection.truechimers, "truechimer")
    states.update(dict.fromkeys(selection.falsetickers, "falseticker"))
    summary = []
    for name, owner, cm, offset, width in results:
        state = states.get(owner, "unreachable" if offset is None else "unfit")
        failure = cm.failure.value if cm.failure is not None else None
        m.add(MEMBER_UP, 1 if cm.success else 0, name)
        if offset is not None and width is not None:
            m.add(MEMBER_OFFSET, offset, name)
            m.add(MEMBER_ROOT_DISTANCE, width, name)
        m.add(MEMBER_SELECTION, 1, name, state)
        if failure is not None:
            m.add(MEMBER_FAILURE, 1, name, failure)
        summary.append(MemberResult(name, state, offset, width, failure))
        log(f"member {name}: {state}" + (f" ({failure})" if failure else ""))
    # A member's Kiss-o'-Death or backoff is the group's to report: NTPKissOfDeath reads it.
    ntp.kiss_codes_of_every(m, [child.measurement for child in children])
    _conclude(m, selection, module.ntp_group.max_falsetickers, len(members), log)
    local = [str(member) for member, child in zip(members, children, strict=True)
             if child.measurement.failure is Reason.LOCAL_ERROR]
    if local:
        # This host could not measure them (out of sockets): no verdict on the group,
        # whose selection lacks them, and none that blames its servers.
        log(f"not measured for a local error: {', '.join(local)}: local_error")
        m.fail(Reason.LOCAL_ERROR, f"not measured: {', '.join(local)}")
    refused = [child.measurement.failure for child in children]
    if all(f is Reason.TARGET_FORBIDDEN for f in refused):
        # The exporter's own policy refused every member: no verdict on the servers (a
        # no_majority would page for a configuration choice).
        log("every member is refused by the target policy: target_forbidden")
        m.fail(Reason.TARGET_FORBIDDEN)
    elif all(f in (Reason.TARGET_FORBIDDEN, Reason.BACKOFF) for f in refused):
        # Nothing was sent: every member asked us to back off (or is refused). No verdict
        # on the servers either; the Kiss-o'-Death alert says why.
        log("every member is backed off from (or refused): backoff")
        m.fail(Reason.BACKOFF)
    m.reports.append(GroupReport(str(target), tuple(summary), selection.low, selection.high,
                                 len(selection.truechimers), len(selection.falsetickers)))
    return m


@dataclass(slots=True)
class _MemberFlight:
    """A member's burst in flight for one group probe, which others may share."""

    started: float
    deadline: float
    guard: object
    done: asyncio.Future[Measurement]


# Member bursts in flight, by (the module's NTP settings, address, port): concurrent group
# probes whose lists name the same server share its burst, as identical probes share one,
# so lists that differ in their other members cannot multiply the packets a server gets.
_member_flights: dict[tuple[NTPSettings, str, int], list[_MemberFlight]] = {}
# Bursts to one member server in flight at once for group probes: beyond, a probe shares
# one (the coordinator's limit for identical probes, applied to members).
MAX_MEMBER_FLIGHTS = 2
# Group probes with the same budget reach a shared member moments apart: a burst started
# that much earlier counts as having had the later probe's budget.
_BUDGET_SLACK = 0.01


async def _member_burst(found: tuple[Resolved, int], module: Module,
                        ctx: ProbeContext) -> Measurement | None:
    """Measure a member: share a burst another group probe has in flight to the same
    server with the same settings, when it ends within this probe's deadline (its
    measurement is returned), else run one (None: ``ctx.measurement`` has it)."""
    key = (module.ntp, found[0].address, found[1])
    loop = asyncio.get_running_loop()
    whole = ntp.longest(module)
    while True:
        now = loop.time()
        # Over within our deadline, with at least our budget or a whole burst's (not a
        # burst a shorter scrape-timeout header cut down: its timeout is not the server's
        # silence for ours), and under the same policy and KoD memory.
        same = [f for f in _member_flights.get(key, ()) if f.guard is ctx.guard]
        need = min(whole, ctx.deadline - now) - _BUDGET_SLACK
        usable = [f for f in same if f.deadline <= ctx.deadline
                  and f.deadline - f.started >= need]
        beyond = not usable and len(same) >= MAX_MEMBER_FLIGHTS
        if not usable and not beyond:
            break
        # The longest burst that fits; at the limit of bursts in flight to the server (so
        # that lists with ever other scrape timeouts cannot multiply its packets), the one
        # with the largest budget (the least cut down), however long.
        flight = (max(usable, key=lambda f: f.deadline) if usable
                  else max(same, key=lambda f: f.deadline - f.started))
        try:
            if beyond:
                async with asyncio.timeout_at(ctx.deadline):
                    measured = await asyncio.shield(flight.done)
            else:
                measured = await asyncio.shield(flight.done)
        except TimeoutError:
            why = (f"{len(same)} bursts to {found[0].address} port {found[1]} were in flight "
                   "for other group probes, and the one shared outlasted this probe: "
                   "nothing sent for it")
            ctx.log(f"{why}: local_error")
            ctx.measurement.fail(Reason.LOCAL_ERROR, why)
            return None
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not flight.done.cancelled() or (task is not None and task.cancelling()):
                raise  # this probe was cancelled (also when that burst's was, at once)
            # That burst's probe was cancelled (its client hung up): look again, another
            # waiting probe may have started one; else measure the member ourselves.
            continue
        if beyond and measured.failure is Reason.TIMEOUT and \
                flight.deadline - flight.started < ctx.deadline - now:
            # Cut short by another probe's shorter budget: its timeout is not the server's
            # silence for this probe's longer one. That burst is over: look again, and
            # measure the member here when there is room now.
            ctx.log(f"the burst to {found[0].address} port {found[1]} shared at the limit "
                    f"had a budget of {flight.deadline - flight.started:.3g}s, less than "
                    "this probe's, and timed out: looking again")
            continue
        ctx.log(f"measured by a burst another group probe has in flight to "
                f"{found[0].address} port {found[1]}: no extra packet was sent")
        return measured
    flight = _MemberFlight(now, ctx.deadline, ctx.guard, loop.create_future())
    _member_flights.setdefault(key, []).append(flight)  # the list as it is now
    try:
        await ntp.burst(found, module, ctx)
    except BaseException:
        flight.done.cancel()
        raise
    else:
        flight.done.set_result(ctx.measurement)
    finally:
        flights = _member_flights[key]
        flights.remove(flight)
        if not flights:
            del _member_flights[key]
    return None


def _conclude(m: Measurement, selection: Selection, max_falsetickers: int, members: int,
              log: Log) -> None:
    truechimers, falsetickers = len(selection.truechimers), len(selection.falsetickers)
    low, high, midpoint = selection.low, selection.high, selection.midpoint
    m.add(MAJORITY, 1 if selection.majority else 0)
    m.add(TRUECHIMERS, truechimers)
    m.add(FALSETICKERS, falsetickers)
    if low is None or high is None or midpoint is None:
        log("no intersection shared by a majority of the candidates (the members that "
            "answered and passed their own checks)")
        m.fail(Reason.NO_MAJORITY, f"{truechimers + falsetickers} of {members} members "
               "usable, no majority of them agrees" if truechimers + falsetickers else
               f"none of {members} members usable")
        return
    m.add(INTERSECTION_LOW, low)
    m.add(INTERSECTION_HIGH, high)
    m.add(LOCAL_CLOCK_OFFSET, midpoint)
    log(f"intersection [{low * 1e6:+.3f}us, {high * 1e6:+.3f}us]: the consensus is "
        f"{midpoint * 1e6:+.3f}us from the local clock; {truechimers} truechimers, "
        f"{falsetickers} falsetickers")
    if falsetickers > max_falsetickers:
        m.fail(Reason.FALSETICKERS, f"{falsetickers} of {members} members, "
               f"max_falsetickers {max_falsetickers}: {', '.join(selection.falsetickers)}")
