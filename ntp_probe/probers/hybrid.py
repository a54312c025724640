"""Hybrid: an NTP measurement and the kernel clock, read together and compared.

Composition, not a prober of its own: the ntp prober measures, the kernel prober reads
adjtimex, and this module says how well the two views of the local clock agree.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any

from ntp_probe.config.schema import Module
from ntp_probe.engine.context import ProbeContext
from ntp_probe.engine.result import Measurement, Perf
from ntp_probe.engine.targets import Target
from ntp_probe.exposition.families import Family
from ntp_probe.probers import kernel, ntp

DIVERGENCE = Family(
    "probe_kernel_divergence_seconds",
    "|NTP offset - kernel offset|: disagreement between the NTP measurement and the "
    "kernel's view, in seconds.",
)
WITHIN_MAXERROR = Family(
    "probe_kernel_offset_within_maxerror",
    "1 when |NTP offset| <= the kernel's maxerror (the kernel's error bound holds).",
)
COHERENCE = Family(
    "probe_kernel_coherence_score",
    "Agreement of NTP and kernel, 1 (within 1 ms) falling to 0.5 at 50 ms and decaying beyond.",
)

REASONS = (*ntp.REASONS, *kernel.REASONS)

# (divergence seconds, score): piecewise linear between these points, then decaying.
_POINTS = ((0.0, 1.0), (0.001, 1.0), (0.005, 0.9), (0.010, 0.7), (0.050, 0.5))
_XS = tuple(x for x, _ in _POINTS)
_DECAY = 0.050


def divergence(ntp_offset: float, kernel_offset: float) -> float:
    """|NTP offset - kernel offset| in seconds.

    Both are "how far the local clock is behind": the NTP offset as measured now, the
    kernel offset as what its PLL still has to slew out.
    """
    return abs(ntp_offset - kernel_offset)


def coherence_score(d: float) -> float:
    """1 for divergences up to 1 ms, falling through 0.9 (5 ms), 0.7 (10 ms), 0.5 (50 ms),
    then 0.5 * exp(-(d - 50 ms) / 50 ms): continuous everywhere (it underflows to 0 beyond
    about 37 s). NaN in, NaN out."""
    if math.isnan(d):
        return d
    d = abs(d)
    last_x, last_y = _POINTS[-1]
    if d >= last_x:
        return last_y * math.exp(-(d - last_x) / _DECAY)
    i = bisect.bisect_right(_XS, d)  # 1..len-1 since 0 <= d < last_x
    (x0, y0), (x1, y1) = _POINTS[i - 1], _POINTS[i]
    return y0 + (y1 - y0) * (d - x0) / (x1 - x0)


def within_maxerror(ntp_offset: float, maxerror: float) -> bool:
    """Whether the kernel's error bound holds: |NTP offset| <= kernel maxerror."""
    return abs(ntp_offset) <= maxerror


@dataclass(frozen=True, slots=True)
class CorrelationReport:
    """How the NTP and kernel views agree, as the CLI shows it."""

    divergence: float
    coherence: float
    within_maxerror: bool

    @property
    def title(self) -> str:
        """Section name."""
        return "correlation"

    def rows(self) -> list[tuple[str, str]]:
        """Human-readable lines."""
        return [("divergence", f"{self.divergence:.9f} s"),
                ("coherence", f"{self.coherence:.3f}"),
                ("within maxerror", "yes" if self.within_maxerror else "no")]

    @property
    def check_offset(self) -> float | None:
        """None: the NTP report's offset is the one checked."""
        return None

    def perfdata(self) -> list[Perf]:
        """Divergence and coherence."""
        return [Perf("divergence", self.divergence, "s"), Perf("coherence", self.coherence)]

    def to_json(self) -> dict[str, Any]:
        """JSON-ready data."""
        return {"divergence_seconds": self.divergence, "coherence_score": self.coherence,
                "offset_within_maxerror": self.within_maxerror}


async def probe(target: Target, module: Module, ctx: ProbeContext) -> Measurement:
    """The ntp prober's measurement, the kernel clock, and how they agree."""
    m = await ntp.probe(target, module, ctx)
    # The kernel is read however the NTP side ended (even with nothing sent: a forbidden
    # target, a backoff), so its series, and the alerts on them, do not depend on that.
    clock = kernel.read_clock(ctx, judged=False)  # the module's offset is the NTP one
    report = ntp.report_of(m)
    if clock is None or report is None or report.offset is None:
        return m
    d = divergence(report.offset, clock.offset)
    ok = within_maxerror(report.offset, clock.maxerror)
    score = coherence_score(d)
    m.add(DIVERGENCE, d)
    m.add(WITHIN_MAXERROR, 1 if ok else 0)
    m.add(COHERENCE, score)
    m.reports.append(CorrelationReport(d, score, ok))
    ctx.log(f"kernel correlation: divergence {d * 1e6:.3f}us, maxerror "
            f"{clock.maxerror * 1e6:.0f}us")
    return m
