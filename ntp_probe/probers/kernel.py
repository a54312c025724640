"""The kernel prober: the local kernel clock discipline state (adjtimex, read-only).

The target is accepted for Prometheus' sake but never contacted: scrape it as
``target=localhost``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ntp_probe.config.load import Module
from ntp_probe.engine.result import ProbeLog, ProbeResult
from ntp_probe.engine.targets import Target

if TYPE_CHECKING:
    from ntp_probe.proto.timex import KernelClock


def report(clock: KernelClock, result: ProbeResult) -> None:
    """Set the probe_kernel_* gauges from a kernel clock reading."""
    result.set("probe_kernel_offset_seconds", clock.offset)
    result.set("probe_kernel_frequency_offset_ratio", clock.frequency_ratio)
    result.set("probe_kernel_maxerror_seconds", clock.maxerror)
    result.set("probe_kernel_esterror_seconds", clock.esterror)
    result.set("probe_kernel_sync_status", 1 if clock.synchronized else 0)
    result.set("probe_kernel_clock_state_info", 1, (("state", clock.state),))
    result.set("probe_kernel_tai_offset_seconds", clock.tai)
    result.set("probe_kernel_time_constant", clock.constant)
    result.set("probe_kernel_tick_seconds", clock.tick)
    for flag in clock.flags:
        result.set("probe_kernel_status_flags_info", 1, (("flag", flag),))


def read(result: ProbeResult, log: ProbeLog) -> KernelClock | None:
    """Read and report the kernel clock; on failure log it and fail kernel_unavailable."""
    # Imported on first use: ctypes costs memory an exporter without kernel probes never needs.
    from ntp_probe.net import adjtimex
    from ntp_probe.proto.timex import KernelClockError

    try:
        clock = adjtimex.read()
    except KernelClockError as exc:
        log(f"kernel clock unavailable: {exc}")
        result.fail("kernel_unavailable")
        return None
    log(
        f"kernel clock: {clock.state}, status {'|'.join(clock.flags) or '0'}, "
        f"offset {clock.offset * 1e6:+.3f}us, maxerror {clock.maxerror * 1e6:.0f}us, "
        f"frequency {clock.frequency_ratio * 1e6:+.3f}ppm"
    )
    report(clock, result)
    return clock


async def probe(target: Target, module: Module, result: ProbeResult, log: ProbeLog) -> bool:
    """Report the kernel clock state; succeeds when it could be read."""
    return read(result, log) is not None
