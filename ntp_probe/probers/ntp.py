"""The NTP prober: one burst of client requests, the clock filter, the sanity checks."""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field

from ntp_probe.config.load import Module, NTPSettings
from ntp_probe.engine.result import ProbeLog, ProbeResult
from ntp_probe.engine.targets import Target
from ntp_probe.net.resolve import ResolveError, literal, resolve
from ntp_probe.net.udp import Exchange
from ntp_probe.probers import correlation, kernel
from ntp_probe.proto.ntp import packet as ntp
from ntp_probe.proto.ntp import sample as maths

KOD_REASONS = {"RATE": "kod_rate", "DENY": "kod_deny", "RSTR": "kod_rstr"}
LEAP_TOLERANCE = 1.0  # seconds added to max_causality_violation around a leap second
Server = tuple[str, int]
# Time kept back from the deadline to summarise the burst and render the reply.
_SUMMARY_MARGIN = 0.005
# A request is only sent if a reply can still arrive: at least this long, or four
# round trips seen so far when that is longer (capped by reply_timeout).
_MIN_REPLY_WINDOW = 0.05


@dataclass(slots=True)
class Burst:
    """What one burst collected."""

    sent: int = 0
    received: int = 0  # replies that passed the packet checks, KoD included
    discarded: int = 0
    samples: list[maths.Sample] = field(default_factory=list)
    kod: ntp.Packet | None = None


def _fnv32a(text: str) -> int:
    h = 0x811C9DC5
    for b in text.encode():
        h = ((h ^ b) * 0x01000193) & 0xFFFFFFFF
    return h


def _nonce() -> int:
    # Never zero: a zero origin in the reply would be indistinguishable from "unset".
    return secrets.randbits(64) or 1


async def _run_burst(
    exchange: Exchange, settings: NTPSettings, burst: Burst, until: float, log: ProbeLog
) -> None:
    loop = asyncio.get_running_loop()
    next_send = loop.time()
    worst_delay = 0.0
    for i in range(settings.samples):
        now = loop.time()
        send_at = max(now, next_send)
        window = min(settings.reply_timeout, max(_MIN_REPLY_WINDOW, 4 * worst_delay))
        if i > 0 and send_at + window > until:
            log(f"burst shortened to {i} of {settings.samples} samples to fit the timeout")
            return
        if send_at > now:
            await asyncio.sleep(send_at - now)
        next_send = send_at + settings.sample_interval
        nonce = _nonce()
        request = ntp.encode_request(nonce, settings.version)
        reply_until = min(loop.time() + settings.reply_timeout, until)
        t1_ns, reply = await exchange.request(request, nonce, reply_until)
        burst.sent += 1
        if reply is None:
            log(f"sample {i + 1}: no reply (nonce {nonce:016x})")
            continue
        burst.received += 1
        p = reply.packet
        code = p.kiss_code
        if code is not None:
            burst.kod = p
            log(f"sample {i + 1}: Kiss-o'-Death {code} (stratum 0), poll {p.poll}: burst stopped")
            return
        t1 = ntp.ts_from_unix_ns(t1_ns)
        t4 = ntp.ts_from_unix_ns(reply.t4_unix_ns)
        s = maths.Sample(t1, p.receive_ts, p.transmit_ts, t4, p, t1_ns)
        if s.delay < 0:
            # The server claims to have held the request longer than the round trip took.
            burst.received -= 1
            burst.discarded += 1
            log(f"sample {i + 1}: reply discarded: negative delay {s.delay * 1e6:.3f}us")
            continue
        worst_delay = max(worst_delay, s.delay)
        burst.samples.append(s)
        log(
            f"sample {i + 1}: T1={t1:016x} T2={s.t2:016x} T3={s.t3:016x} T4={t4:016x} "
            f"({'kernel' if reply.kernel_timestamp else 'user-space'} T4) "
            f"offset={s.offset * 1e6:+.3f}us delay={s.delay * 1e6:.3f}us "
            f"stratum={p.stratum} leap={p.leap} refid={p.refid_text}"
        )


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


def _report(
    burst: Burst, settings: NTPSettings, result: ProbeResult, log: ProbeLog, server: Server
) -> None:
    result.set("probe_ntp_samples_sent", burst.sent)
    result.set("probe_ntp_samples_received", burst.received)
    result.set("probe_ntp_packet_loss_ratio", maths.loss_ratio(burst.sent, burst.received))
    if burst.kod is not None:
        code = burst.kod.kiss_code or ""
        result.set("probe_ntp_kiss_code_info", 1, (("code", code),))
        result.fail(KOD_REASONS.get(code, "kod_other"))
    if not burst.samples:
        result.fail("invalid_reply" if burst.discarded else "timeout")
        log("no usable reply")
        return
    best = maths.select_best(burst.samples)
    p = best.packet
    offset, delay = best.offset, best.delay
    result.set("probe_ntp_offset_seconds", offset)
    result.set("probe_ntp_rtt_seconds", delay)
    result.set("probe_ntp_jitter_seconds", maths.jitter(burst.samples, best))
    result.set("probe_ntp_offset_stddev_seconds", maths.offset_stddev(burst.samples))
    result.set("probe_ntp_stratum", p.stratum)
    result.set("probe_ntp_leap_indicator", p.leap)
    result.set("probe_ntp_precision_seconds", p.precision_seconds)
    result.set("probe_ntp_root_delay_seconds", p.root_delay_seconds)
    result.set("probe_ntp_root_dispersion_seconds", p.root_dispersion_seconds)
    result.set("probe_ntp_root_distance_seconds", best.root_distance)
    result.set("probe_ntp_reference_timestamp_seconds", maths.reference_unix(best))
    result.set("probe_ntp_server_processing_seconds", best.server_processing)
    result.set("probe_ntp_causality_violation_seconds", maths.causality_violation(offset, delay))
    result.set(
        "probe_ntp_server_info", 1, (("refid", p.refid_text), ("version", str(p.version)))
    )
    near_leap = result.guard.near_leap(server[0], server[1], p.leap, best.t3_unix_ns / 1e9)
    if near_leap:
        log("within 24 h of an announced leap second: causality tolerance widened by 1 s")
    reason = maths.check(best, _limits(settings, near_leap))
    if reason is not None:
        result.fail(reason)
    result.details["samples"] = [
        {
            "offset_seconds": s.offset,
            "rtt_seconds": s.delay,
            "stratum": s.packet.stratum,
            "leap": s.packet.leap,
            "refid": s.packet.refid_text,
            "selected": s is best,
        }
        for s in burst.samples
    ]
    log(
        f"selected sample: offset={offset * 1e6:+.3f}us rtt={delay * 1e6:.3f}us "
        f"root_distance={best.root_distance * 1e6:.3f}us"
    )


async def probe(target: Target, module: Module, result: ProbeResult, log: ProbeLog) -> bool:
    """Measure one NTP server: resolve, run the burst, report. Returns probe success."""
    settings = module.ntp
    port = target.port if target.port is not None else settings.port
    until = result.deadline - _SUMMARY_MARGIN
    guard = result.guard
    refusal = guard.refuse(target.host)
    if refusal is not None:
        log(f"target forbidden: {refusal}; nothing sent")
        result.fail("target_forbidden")
        return False
    started = time.perf_counter()
    resolved = literal(target.host)
    if resolved is None:
        try:
            async with asyncio.timeout_at(until):
                resolved = await resolve(
                    target.host, settings.preferred_ip_protocol, settings.ip_protocol_fallback
                )
        except (ResolveError, TimeoutError) as exc:
            result.set("probe_dns_lookup_time_seconds", time.perf_counter() - started)
            log(f"resolve {target.host}: {exc or 'timed out'}")
            result.fail("resolve")
            return False
    result.set("probe_dns_lookup_time_seconds", time.perf_counter() - started)
    # Checked again on the address: a permitted name may resolve to a denied address.
    refusal = guard.refuse(target.host, resolved.address)
    if refusal is not None:
        log(f"target forbidden: {refusal}; nothing sent")
        result.fail("target_forbidden")
        return False
    backoff = guard.backoff(resolved.address, port)
    if backoff is not None:
        code, left = backoff
        log(f"backing off after Kiss-o'-Death {code} from {resolved.address} port {port}: "
            f"{left:.0f}s left; nothing sent")
        result.set("probe_ntp_backoff_remaining_seconds", left)
        result.set("probe_ntp_kiss_code_info", 1, (("code", code),))
        result.fail("backoff")
        return False
    result.set("probe_ip_protocol", resolved.ip_protocol)
    result.set("probe_ip_addr_hash", _fnv32a(resolved.address))
    log(
        f"resolved {target.host} -> {resolved.address}"
        f"{' (cached)' if resolved.cached else ''}; probing port {port}, "
        f"up to {settings.samples} samples every {settings.sample_interval:g}s"
    )
    burst = Burst()
    try:
        async with Exchange(resolved.address, port, resolved.family, log) as exchange:
            await _run_burst(exchange, settings, burst, until, log)
            burst.discarded += exchange.discarded
    except OSError as exc:
        log(f"socket error: {exc.strerror or exc}")
    result.packets_sent = burst.sent
    if burst.kod is not None:
        code = burst.kod.kiss_code or ""
        step = guard.record_kod(resolved.address, port, code, burst.kod.poll,
                                settings.kod_rate_max_backoff, settings.kod_deny_backoff)
        if step > 0:
            log(f"no packet to {resolved.address} port {port} for {step:.0f}s ({code})")
            result.set("probe_ntp_backoff_remaining_seconds", step)
    elif burst.samples:
        guard.answered(resolved.address, port)
    _report(burst, settings, result, log, (resolved.address, port))
    if settings.kernel_correlation:
        _correlate(result, log)
    log("verdict: success" if result.failure is None else f"verdict: failure ({result.failure})")
    return result.failure is None


def _correlate(result: ProbeResult, log: ProbeLog) -> None:
    clock = kernel.read(result, log)
    offset = result.value("probe_ntp_offset_seconds")
    if clock is None or offset is None:
        return
    d = correlation.divergence(offset, clock.offset)
    result.set("probe_kernel_divergence_seconds", d)
    result.set("probe_kernel_offset_within_maxerror",
               1 if correlation.within_maxerror(offset, clock.maxerror) else 0)
    result.set("probe_kernel_coherence_score", correlation.coherence_score(d))
    log(f"kernel correlation: divergence {d * 1e6:.3f}us, maxerror "
        f"{clock.maxerror * 1e6:.0f}us")
