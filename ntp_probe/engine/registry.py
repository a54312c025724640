"""The one prober registry: config, exposition, the CLI and the docs all consult it.

Each prober kind names its probe function (blackbox_exporter's ProbeFn signature), the
settings blocks a module of that kind may carry, the metric families it emits and the
failure reasons it can give.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from ntp_probe.config.schema import Config, Module
from ntp_probe.engine.context import ProbeContext
from ntp_probe.engine.result import Measurement, Reason
from ntp_probe.engine.targets import Target, parse_target
from ntp_probe.exposition import families as common
from ntp_probe.exposition.families import Family
from ntp_probe.probers import chrony, group, hybrid, kernel, leapcheck, ntp, ntpd, nts
from ntp_probe.probers import common as prepare

ProbeFn = Callable[[Target, Module, ProbeContext], Awaitable[Measurement]]

_COMMON = (common.SUCCESS, common.DURATION, common.RESULT_AGE, common.FAILURE)
_NETWORK = (common.DNS_LOOKUP, common.IP_PROTOCOL, common.IP_ADDR_HASH,
            prepare.BACKOFF_REMAINING, prepare.KISS_CODE)


def _families(module: object) -> tuple[Family, ...]:
    return tuple(v for v in vars(module).values() if isinstance(v, Family))


@dataclass(frozen=True, slots=True)
class ProberSpec:
    """One prober kind."""

    name: str
    probe: ProbeFn
    description: str
    settings: tuple[str, ...]  # the module's settings blocks this kind reads
    families: tuple[Family, ...]
    reasons: tuple[Reason, ...]
    # The port a target without one means (None: the target is not contacted), so that
    # host and host:default name the same server.
    default_port: Callable[[Module], int | None] = lambda module: None
    # How long a probe lasts at the most before its deadline cuts it (None: up to the
    # deadline), for the coordinator's choice to share a burst in flight.
    longest: Callable[[Module], float] | None = None
    # How a ``target`` parameter is read when it is not host[:port] (a group's name or
    # member list); None: parse_target.
    target: Callable[[Config, str], Target] | None = None
    # Keys of a shared ntp block this kind does not read: refused in its modules rather
    # than accepted and silently ignored.
    ntp_keys_unused: tuple[str, ...] = ()
    # The reason when the deadline cuts a probe off before it could say its own (a daemon's
    # command port timing out is not an NTP server's silence: NTPServerUnreachable).
    timeout: Reason = Reason.TIMEOUT
    # How long a request may wait for its reply at the most (the module's request or
    # reply timeout; None: the kind sends nothing): config refuses a module timeout that
    # could not fit the first request's window.
    reply_timeout: Callable[[Module], float] | None = None


PROBERS: Mapping[str, ProberSpec] = {
    spec.name: spec for spec in (
        ProberSpec(
            "ntp", ntp.probe,
            "NTP client burst against a server (with ntp.kernel_correlation: also the "
            "local kernel clock, compared)",
            ("ntp",),
            _COMMON + _NETWORK + _families(ntp) + _families(kernel) + _families(hybrid)
            + _families(leapcheck),
            (*hybrid.REASONS, Reason.LEAP_MISMATCH), default_port=lambda module: module.ntp.port,
            longest=ntp.longest, reply_timeout=lambda module: module.ntp.reply_timeout,
        ),
        ProberSpec(
            "chrony", chrony.probe, chrony.DESCRIPTION, ("chrony",),
            _COMMON + _NETWORK + _families(chrony), chrony.REASONS,
            default_port=lambda module: module.chrony.port, timeout=Reason.CHRONY_TIMEOUT,
            reply_timeout=lambda module: module.chrony.request_timeout,
        ),
        ProberSpec(
            "ntpd", ntpd.probe, ntpd.DESCRIPTION, ("ntpd",),
            _COMMON + _NETWORK + _families(ntpd), ntpd.REASONS,
            default_port=lambda module: module.ntpd.port, timeout=Reason.MODE6_TIMEOUT,
            reply_timeout=lambda module: module.ntpd.request_timeout,
        ),
        ProberSpec(
            "ntp_group", group.probe, group.DESCRIPTION, ("ntp", "ntp_group"),
            _COMMON + _families(group) + (prepare.BACKOFF_REMAINING, prepare.KISS_CODE),
            group.REASONS, target=group.resolve_target,
            longest=ntp.longest, timeout=Reason.NO_MAJORITY,  # no member measured in time
            reply_timeout=lambda module: module.ntp.reply_timeout,
            # A member is one server: every address of a name would need series per member
            # and address, which the group does not expose.
            ntp_keys_unused=("all_addresses", "max_addresses", "addresses_required",
                             "kernel_correlation"),
        ),
        ProberSpec(
            "nts", nts.probe, nts.DESCRIPTION, ("ntp", "nts"),
            _COMMON + _NETWORK + _families(ntp) + _families(nts) + _families(leapcheck),
            nts.REASONS,
            default_port=lambda module: module.nts.port,
            reply_timeout=lambda module: module.ntp.reply_timeout,
            # The NTP port comes from the KE (its port record, or 123): nts.port is the
            # KE's own.
            ntp_keys_unused=("all_addresses", "max_addresses", "addresses_required",
                             "kernel_correlation", "source_ip_address", "port"),
        ),
        ProberSpec(
            "kernel", kernel.probe, "the local kernel clock discipline state (adjtimex)", (),
            _COMMON + _families(kernel), kernel.REASONS, timeout=Reason.KERNEL_UNAVAILABLE,
        ),
    )
}


def server_key(module: Module, target: Target) -> tuple[str, int | None]:
    """The server a probe of ``target`` reaches: the target's canonical host (a group
    list's members in one order) and the port it means, whether or not it was spelled out."""
    port = target.port if target.port is not None else PROBERS[module.prober].default_port(module)
    if isinstance(target, group.GroupTarget) and "," in target.host:
        # An ad-hoc list is its set of members: listed in another order, it is the same
        # group (its probes share bursts and min_probe_interval results).
        return ",".join(sorted(str(member) for member in target.members)), port
    return target.host, port


def resolve_target(config: Config, module: Module, raw: str) -> Target:
    """The target a probe of ``module`` means by the ``target`` parameter ``raw``: host[:port],
    or what its prober reads there; raise TargetError when it means nothing."""
    read = PROBERS[module.prober].target
    return parse_target(raw) if read is None else read(config, raw)


def timeout_reason(module: Module) -> Reason:
    """The failure reason of a ``module`` probe its deadline cut off."""
    return PROBERS[module.prober].timeout


def probe_function(module: Module) -> ProbeFn:
    """The function that runs ``module``'s probes (hybrid when an ntp module asks for
    kernel correlation)."""
    if module.prober == "ntp" and module.ntp.kernel_correlation:
        return hybrid.probe
    return PROBERS[module.prober].probe
