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


def format_value(value: float) -> str:
    """A sample value as the text format writes it."""
    value = float(value)
    if value.is_integer():  # False for NaN and the infinities
        return str(int(value)) if -1e15 < value < 1e15 else repr(value)
    if math.isfinite(value):
        return repr(value)
    if value != value:
        return "NaN"
    return "+Inf" if value > 0 else "-Inf"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _order(sample: tuple[common.Family, tuple[str, ...], float]) -> int:
    return sample[0].order


def render(m: Measurement, result_age: float | None = None) -> str:
    """The measurement in the Prometheus text format (a fresh exposition per probe).

    ``result_age`` marks a result served again from the min_probe_interval cache.
    """
    out = [
        common.SUCCESS.header, f"probe_success {1 if m.success else 0}\n",
        common.DURATION.header, f"probe_duration_seconds {format_value(m.duration)}\n",
    ]
    samples = list(m.samples)
    if result_age is not None:
        samples.append((common.RESULT_AGE, (), result_age))
    # Stable sort: series of one family stay in the order the prober added them.
    samples.sort(key=_order)
    previous = None
    for family, labels, value in samples:
        if family is not previous:
            out.append(family.header)
            previous = family
        if labels:
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in zip(family.labels, labels,
                                                                    strict=True))
            out.append(f"{family.name}{{{inner}}} {format_value(value)}\n")
        else:
            out.append(f"{family.name} {format_value(value)}\n")
    if m.failure is not None:
        out.append(common.FAILURE.header)
        out.append(f'probe_ntp_failure_info{{reason="{m.failure.value}"}} 1\n')
    return "".join(out)
