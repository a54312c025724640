"""The kernel prober: the local kernel clock discipline state (adjtimex, read-only).

The target is accepted for Prometheus' sake but never contacted: scrape it as
``target=localhost``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ntp_probe.config.schema import Module
from ntp_probe.engine.context import ProbeContext
from ntp_probe.engine.result import Measurement, Perf, Reason
from ntp_probe.engine.targets import Target
from ntp_probe.exposition.families import Family
from ntp_probe.probers import common

if TYPE_CHECKING:
    from ntp_probe.proto.timex import KernelClock

OFFSET = Family(
    "probe_kernel_offset_seconds",
    "Offset the kernel clock discipline is still slewing out, in seconds "
    "(positive: the clock is behind).",
)
FREQUENCY = Family("probe_kernel_frequency_offset_ratio",
                   "Frequency correction applied by the kernel, as a ratio (1e-6 = 1 ppm).")
MAXERROR = Family("probe_kernel_maxerror_seconds",
                  "Kernel's maximum error bound of the clock, in seconds.")
ESTERROR = Family("probe_kernel_esterror_seconds",
                  "Kernel's estimated error of the clock, in seconds.")
SYNC_STATUS = Family(
    "probe_kernel_sync_status",
    "1 when the kernel clock is synchronised (no STA_UNSYNC, state not TIME_ERROR).",
)
CLOCK_STATE = Family("probe_kernel_clock_state_info",
                     "Kernel clock state from adjtimex's return value.", ("state",))
TAI_OFFSET = Family("probe_kernel_tai_offset_seconds",
                    "TAI - UTC offset known to the kernel, in seconds.")
TIME_CONSTANT = Family("probe_kernel_time_constant", "Kernel PLL time constant (log2).")
TICK = Family("probe_kernel_tick_seconds", "Length of a kernel clock tick, in seconds.")
STATUS_FLAGS = Family("probe_kernel_status_flags_info",
                      "Kernel clock status bits that are set (STA_*).", ("flag",))

REASONS = (Reason.TARGET_FORBIDDEN, Reason.KERNEL_UNAVAILABLE)


@dataclass(frozen=True, slots=True)
class KernelReport:
    """The kernel clock as the CLI shows it."""

    clock: KernelClock
    # Whether its offset is the one ``check`` judges: in hybrid it is the NTP offset, and
    # the kernel's (0 under chrony, or any undisciplined kernel) is only shown.
    judged: bool = True

    @property
    def title(self) -> str:
        """Section name."""
        return "kernel"

    def rows(self) -> list[tuple[str, str]]:
        """Human-readable lines."""
        c = self.clock
        return [
            ("kernel state", f"{c.state} ({'|'.join(c.flags) or 'no flags'})"),
            ("synchronised", "yes" if c.synchronized else "no"),
            ("kernel offset", f"{c.offset:+.9f} s"),
            ("maxerror", f"{c.maxerror:.6f} s"),
            ("frequency", f"{c.frequency_ratio * 1e6:+.3f} ppm"),
        ]

    @property
    def check_offset(self) -> float | None:
        """The offset the kernel still slews out; None where another one is judged, and
        when the kernel is unsynchronised: then nothing disciplines the clock, and its
        offset (0) says nothing (check_ntp_time reads an unsynchronised server likewise)."""
        return self.clock.offset if self.judged and self.clock.synchronized else None

    def perfdata(self) -> list[Perf]:
        """Kernel offset, maxerror, esterror, frequency, sync."""
        c = self.clock
        return [Perf("kernel_offset", c.offset, "s", checked=self.check_offset is not None),
                Perf("maxerror", c.maxerror, "s"),
                Perf("esterror", c.esterror, "s"),
                Perf("frequency_ppm", c.frequency_ratio * 1e6),
                Perf("synchronised", 1.0 if c.synchronized else 0.0)]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data."""
        c = self.clock
        return {"state": c.state, "flags": list(c.flags), "synchronised": c.synchronized,
                "offset_seconds": c.offset, "frequency_ratio": c.frequency_ratio,
                "maxerror_seconds": c.maxerror, "esterror_seconds": c.esterror, "tai": c.tai}


def read_clock(ctx: ProbeContext, *, judged: bool = True) -> KernelClock | None:
    """Read and report the kernel clock; on failure log why and fail kernel_unavailable.
    ``judged``: whether ``check`` applies its thresholds to the kernel's offset."""
    # Imported on first use: ctypes costs memory an exporter without kernel probes never needs.
    from ntp_probe.net import adjtimex
    from ntp_probe.proto.timex import KernelClockError

    m, log = ctx.measurement, ctx.log
    try:
        clock = adjtimex.read()
    except KernelClockError as exc:
        log(f"kernel clock unavailable: {exc}")
        m.fail(Reason.KERNEL_UNAVAILABLE)
        return None
    log(
        f"kernel clock: {clock.state}, status {'|'.join(clock.flags) or '0'}, "
        f"offset {clock.offset * 1e6:+.3f}us, maxerror {clock.maxerror * 1e6:.0f}us, "
        f"frequency {clock.frequency_ratio * 1e6:+.3f}ppm"
    )
    m.add(OFFSET, clock.offset)
    m.add(FREQUENCY, clock.frequency_ratio)
    m.add(MAXERROR, clock.maxerror)
    m.add(ESTERROR, clock.esterror)
    m.add(SYNC_STATUS, 1 if clock.synchronized else 0)
    m.add(CLOCK_STATE, 1, clock.state)
    m.add(TAI_OFFSET, clock.tai)
    m.add(TIME_CONSTANT, clock.constant)
    m.add(TICK, clock.tick)
    for flag in clock.flags:
        m.add(STATUS_FLAGS, 1, flag)
    m.reports.append(KernelReport(clock, judged))
    return clock


async def probe(target: Target, module: Module, ctx: ProbeContext) -> Measurement:
    """Report the kernel clock state; succeeds when it could be read."""
    # Nothing is sent, but the module's policy is the module's, whatever its prober (as
    # for chrony's socket mode): a target it refuses is refused by name.
    if common.refused(ctx, ctx.guard.refuse(target.host)):
        return ctx.measurement
    ctx.log(f"target {target} is not contacted: this prober reads the local kernel clock")
    read_clock(ctx)
    return ctx.measurement
