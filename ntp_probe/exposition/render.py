"""Per-probe exposition: a measurement rendered straight to the Prometheus text format.

Not through a fresh prometheus_client registry: the measurement is built once and thrown
away, and writing the text directly costs a tenth of building Gauge objects per request.
The families' HELP and TYPE lines are rendered once, when they are declared.
"""

from __future__ import annotations

import math

from ntp_probe.engine.result import Measurement
from ntp_probe.exposition import families as common

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Integral values below this are written as integers, larger ones in exponent form.
_EXACT = 10**15
_SUCCESS = (common.SUCCESS.header + "probe_success 0\n", common.SUCCESS.header
            + "probe_success 1\n")
_DURATION = common.DURATION.header + "probe_duration_seconds "


def format_value(value: float) -> str:
    """A sample value as the text format writes it."""
    if type(value) is int and -_EXACT < value < _EXACT:
        # Counts, codes and hashes: most of a probe's values, and str() is all they need.
        return str(value)
    value = float(value)
    if value.is_integer():  # False for NaN and the infinities
        return str(int(value)) if -_EXACT < value < _EXACT else repr(value)
    if math.isfinite(value):
        return repr(value)
    if value != value:
        return "NaN"
    return "+Inf" if value > 0 else "-Inf"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _order(sample: tuple[common.Family, tuple[str, ...], float]) -> int:
    return sample[0].order


def render(m: Measurement, result_age: float | None = None,
           duration: float | None = None) -> str:
    """The measurement in the Prometheus text format (a fresh exposition per probe).

    ``result_age`` marks a result served again from the min_probe_interval cache;
    ``duration``, when given, is the probe_duration_seconds shown instead of the
    measurement's (a request that shared a burst: its own wait, within its own budget).
    """
    shown = m.duration if duration is None else duration
    out = [_SUCCESS[m.success], f"{_DURATION}{format_value(shown)}\n"]
    samples = m.samples
    if result_age is not None:
        # Countdowns as they stand now, not as when the result was measured.
        samples = [(f, labels, max(v - result_age, 0.0) if f.countdown else v)
                   for f, labels, v in samples]
        samples.append((common.RESULT_AGE, (), result_age))
    # Probers add samples in declaration order almost always: sort (stable, so series of
    # one family keep the order the prober added them) only when they are not.
    last = -1
    for family, _, _ in samples:
        if family.order < last:
            samples = sorted(samples, key=_order)
            break
        last = family.order
    previous = None
    append = out.append
    for family, labels, value in samples:
        if family is not previous:
            append(family.header)
            previous = family
        if labels:
            inner = _escape(labels[0])
            for join, label in zip(family.label_joins, labels[1:], strict=True):
                inner += join + _escape(label)
            append(f'{family.prefix}{inner}"}} {format_value(value)}\n')
        else:
            append(f"{family.prefix}{format_value(value)}\n")
    if m.failure is not None:
        append(common.FAILURE.header)
        append(f'probe_ntp_failure_info{{reason="{m.failure.value}"}} 1\n')
    return "".join(out)
