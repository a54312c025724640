"""How well the kernel's view of the clock agrees with an NTP measurement."""

from __future__ import annotations

import bisect
import math

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
