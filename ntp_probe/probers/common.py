"""What every network prober does before it sends: policy, resolve, policy, backoff, IP gauges.

The order matters: a forbidden name is refused before it is even resolved; a permitted
name is checked again on the address it resolved to (a name pointed at an internal
address is still refused); a server that sent a Kiss-o'-Death is not sent to while its
backoff lasts; only then are the address's gauges set, as blackbox_exporter does.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

from ntp_probe.engine.context import ProbeContext
from ntp_probe.engine.result import NO_TIME, Reason
from ntp_probe.engine.targets import Target
from ntp_probe.exposition import families as common
from ntp_probe.exposition.families import Family
from ntp_probe.net.resolve import (
    FAMILIES,
    Resolved,
    ResolveError,
    literal_of,
    resolve,
    resolve_all,
)
from ntp_probe.net.udp import zone_index
from ntp_probe.probers.pacing import MIN_REPLY_WINDOW
from ntp_probe.proto.address import ip_address, needs_zone

_T = TypeVar("_T")

BACKOFF_REMAINING = Family(
    "probe_ntp_backoff_remaining_seconds",
    "Seconds until this server may be sent to again after a Kiss-o'-Death.",
    countdown=True,
)
KISS_CODE = Family("probe_ntp_kiss_code_info", "Kiss-o'-Death code received from the server.",
                   ("code",))


@functools.lru_cache(maxsize=4096)  # scrapes repeat the same addresses
def ip_hash(address: str) -> int:
    """blackbox_exporter's probe_ip_addr_hash: FNV-1a (32 bit) over the address's bytes,
    4 for IPv4 (IPv4-mapped IPv6 included), 16 for IPv6."""
    ip = ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    h = 0x811C9DC5
    for b in ip.packed:
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def refused(ctx: ProbeContext, refusal: str | None) -> bool:
    """Record and log a refusal by the target policy; whether there was one."""
    if refusal is None:
        return False
    ctx.log(f"target forbidden: {refusal}; nothing sent")
    ctx.measurement.fail(Reason.TARGET_FORBIDDEN, refusal)
    return True


async def prepare(target: Target, port: int, ctx: ProbeContext, *, preferred: str = "ip6",
                  fallback: bool = True, until: float | None = None,
                  window: float = MIN_REPLY_WINDOW) -> Resolved | None:
    """Resolve ``target`` and check that it may be sent to now; None (with the failure
    recorded and logged) when it may not. ``window``: the least time a first request and
    its reply need after the lookup (less left reads local_error, not resolve)."""
    if refused(ctx, ctx.guard.refuse(target.host)):
        return None
    started = time.perf_counter()
    try:
        resolved = literal_of(target.host, preferred, fallback)
    except ResolveError as exc:
        _unresolved(target, str(exc), ctx)
        return None
    if resolved is None:
        resolved = await _looked_up(target, ctx, resolve(target.host, preferred, fallback),
                                    ctx.deadline if until is None else until, window)
        if resolved is None:
            return None
    else:
        ctx.measurement.add(common.DNS_LOOKUP, time.perf_counter() - started)
    ctx.log(f"resolved {target.host} -> {resolved.address}"
            f"{' (cached)' if resolved.cached else ''}")
    return admit(target, resolved, port, ctx)


def _unresolved(target: Target, why: str, ctx: ProbeContext) -> None:
    """``target`` has no address to probe: failure ``resolve``, and IP gauges of 0, as
    blackbox's read when its resolution fails (dashboards that show the IP version or join
    on the hash see the failure, not a gap)."""
    ctx.log(f"resolve {target.host}: {why}")
    ctx.measurement.add(common.IP_PROTOCOL, 0)
    ctx.measurement.add(common.IP_ADDR_HASH, 0)
    ctx.measurement.fail(Reason.RESOLVE, why)


async def _looked_up(target: Target, ctx: ProbeContext, lookup: Coroutine[Any, Any, _T],
                     until: float, window: float) -> _T | None:
    """``lookup``'s answer by ``until``, with its time as probe_dns_lookup_time_seconds;
    None (failure ``resolve`` recorded and logged) when it fails or runs out of time, or
    ``local_error`` when the budget left too little for a lookup and a request anyway."""
    started = time.perf_counter()
    room = until - asyncio.get_running_loop().time()
    try:
        if room <= 0:
            raise TimeoutError
        async with asyncio.timeout_at(until):
            found = await lookup
    except (ResolveError, TimeoutError) as exc:
        if room <= 0:
            lookup.close()  # never awaited: not even started
        m = ctx.measurement
        m.add(common.DNS_LOOKUP, time.perf_counter() - started)
        if isinstance(exc, TimeoutError) and room < window:
            # A scrape-timeout header of a few milliseconds: even an instant answer would
            # have left no time for a request, so neither the resolver nor the server is
            # to blame (as for an IP target with that budget).
            ctx.log(f"resolve {target.host}: no time left to look it up and send a "
                    "request: nothing sent")
            m.add(common.IP_PROTOCOL, 0)
            m.add(common.IP_ADDR_HASH, 0)
            m.fail(Reason.LOCAL_ERROR, NO_TIME)
            return None
        _unresolved(target, str(exc) or "timed out", ctx)
        return None
    ctx.measurement.add(common.DNS_LOOKUP, time.perf_counter() - started)
    return found


def admit(target: Target, resolved: Resolved, port: int,
          ctx: ProbeContext) -> Resolved | None:
    """The checks on a resolved address (see :func:`allowed`): the address to send to (a
    zone as its interface's index), or None with the failure recorded. The IP gauges once
    the policy permits the address, a backoff included (as blackbox, right after
    resolution: a dashboard joined on them keeps the target through a KoD's 24 hours)."""
    if refused(ctx, ctx.guard.refuse(target.host, resolved.address)):
        return None
    ctx.measurement.add(common.IP_PROTOCOL, resolved.ip_protocol)
    ctx.measurement.add(common.IP_ADDR_HASH, ip_hash(resolved.address))
    return _sendable(resolved, port, ctx)


def allowed(host: str, resolved: Resolved, port: int, ctx: ProbeContext) -> Resolved | None:
    """The policy again on the address (a permitted name may point at a denied address),
    then its interface and any KoD backoff from that server: the address to send to, or
    None with the failure recorded when it may not be sent to."""
    if refused(ctx, ctx.guard.refuse(host, resolved.address)):
        return None
    return _sendable(resolved, port, ctx)


def _sendable(resolved: Resolved, port: int, ctx: ProbeContext) -> Resolved | None:
    """``resolved`` with its zone as the interface's index, unless it has no usable
    interface or a KoD backoff holds the server back (the failure recorded). The backoff
    is looked up by the index, so that every spelling of the zone shares one memory."""
    address = resolved.address
    if needs_zone(address):
        # The kernel would pick whichever interface's route comes first, and a silence
        # there would blame the server.
        why = (f"the link-local address {address} needs its interface ({address}%eth0): "
               "nothing sent")
        ctx.log(why)
        ctx.measurement.fail(Reason.LOCAL_ERROR, why)
        return None
    if "%" in address:
        try:
            address = zone_index(address)
        except OSError as exc:
            why = f"{exc.strerror}: nothing sent"
            ctx.log(why)
            ctx.measurement.fail(Reason.LOCAL_ERROR, why)
            return None
        resolved = Resolved(address, resolved.family, resolved.cached)
    return resolved if _no_backoff(address, port, ctx) else None


def _no_backoff(address: str, port: int, ctx: ProbeContext) -> bool:
    """Whether no KoD backoff holds the server back (when one does, the failure is
    recorded)."""
    m, log = ctx.measurement, ctx.log
    backoff = ctx.guard.backoff(address, port)
    if backoff is not None:
        code, left = backoff
        # (An NTS-KE server is held back for the KoD of the NTP server it named.)
        log(f"backing off {address} port {port} after a Kiss-o'-Death {code}: "
            f"{left:.0f}s left; nothing sent")
        m.add(BACKOFF_REMAINING, left)
        m.add(KISS_CODE, 1, code)
        m.fail(Reason.BACKOFF, f"Kiss-o'-Death {code} from {address} port {port}, "
               f"{left:.0f}s left")
        return False
    return True


async def prepare_all(target: Target, ctx: ProbeContext, limit: int, until: float, *,
                      preferred: str = "ip6", fallback: bool = True,
                      window: float = MIN_REPLY_WINDOW) -> list[Resolved] | None:
    """Every address of ``target`` (at most ``limit``), after the policy by name; None
    (with the failure recorded) when there is none or the name is refused. Each address
    still has to pass :func:`admit`.

    The preferred family comes first, so that ``limit`` keeps its addresses; without
    ``fallback`` only its addresses are probed, as blackbox uses only them (an IP literal
    of the other family fails, as in blackbox)."""
    if refused(ctx, ctx.guard.refuse(target.host)):
        return None
    try:
        literal_of(target.host, preferred, fallback)
    except ResolveError as exc:
        _unresolved(target, str(exc), ctx)
        return None
    family = FAMILIES[preferred]
    # Without fallback only the preferred family is asked for (the other's answer, slow
    # or lost, must not hold up a probe that never uses it).
    found = await _looked_up(target, ctx, resolve_all(
        target.host, family=None if fallback else family, log=ctx.log), until, window)
    if found is None:
        return None
    if not fallback:
        skipped = [r for r in found if r.family != family]
        found = [r for r in found if r.family == family]
        if not found:
            ctx.log(f"{target.host}: {len(skipped)} addresses, none {preferred} "
                    "(ip_protocol_fallback is off)")
            _unresolved(target, f"no {preferred} address", ctx)
            return None
        if skipped:
            ctx.log(f"{target.host}: {len(skipped)} addresses not {preferred} left out "
                    "(ip_protocol_fallback is off)")
    found.sort(key=lambda r: r.family != family)  # stable: the resolver's order within
    if len(found) > limit:
        ctx.log(f"{target.host} has {len(found)} addresses: probing the first {limit} "
                f"({preferred} first; max_addresses)")
    found = found[:limit]
    ctx.log(f"resolved {target.host} -> {', '.join(r.address for r in found)}")
    return found
