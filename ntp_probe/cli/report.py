"""Reporters: one probe's measurement as text for people, JSON for scripts, or the exposition."""

from __future__ import annotations

import json

from ntp_probe.engine.context import ProbeLog
from ntp_probe.engine.result import Measurement
from ntp_probe.engine.text import visible
from ntp_probe.exposition import families
from ntp_probe.exposition.render import render

FORMATS = ("text", "json", "prometheus")


def text(target: str, module: str, m: Measurement, log: ProbeLog) -> str:
    """The human-readable report: a headline, each report's rows, the probe's log."""
    # The headline says what was found, not only OK: the first lines of the first report
    # (the server and its offset; the kernel clock's state and whether it is synchronised).
    # Values may quote a daemon (its version, a refid): shown escaped, like the log lines.
    found = "; ".join(f"{k} {visible(v)}" for k, v in m.reports[0].rows()[:2]) \
        if m.reports else ""
    lines = [f"{target} (module {module}): "
             + ("OK" if m.success else f"FAILED: {m.failure}")
             + f" in {m.duration * 1000:.1f} ms" + (f": {found}" if found else "")]
    for report in m.reports:
        rows = report.rows()
        width = max((len(k) for k, _ in rows), default=0)  # one column per section
        lines += [f"  {k:<{width}} {visible(v)}" for k, v in rows]
    lines.append("log:")
    lines += ["  " + line for line in log.lines]
    return "\n".join(lines) + "\n"


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def as_json(target: str, module: str, m: Measurement, log: ProbeLog) -> str:
    """The report as one JSON document: metrics as {name, labels, value} objects, the same
    series in the same order as the exposition (``--format prometheus``, /probe)."""
    series = [{"name": families.SUCCESS.name, "labels": {}, "value": 1 if m.success else 0},
              {"name": families.DURATION.name, "labels": {}, "value": m.duration}]
    series += [{"name": family.name, "labels": dict(zip(family.labels, labels, strict=True)),
                "value": _number(value)}
               for family, labels, value in sorted(m.samples, key=lambda s: s[0].order)]
    if m.failure is not None:
        series.append({"name": families.FAILURE.name,
                       "labels": {"reason": m.failure.value}, "value": 1})
    return json.dumps({
        "target": target, "module": module, "success": m.success,
        "failure_reason": None if m.failure is None else m.failure.value,
        "failure_detail": m.failure_detail,
        "duration_seconds": m.duration,
        "metrics": series,
        "reports": {r.title: r.to_json() for r in m.reports},
        "log": log.lines,
    }, indent=2)


def report(fmt: str, target: str, module: str, m: Measurement, log: ProbeLog) -> str:
    """The measurement in ``fmt`` (one of :data:`FORMATS`)."""
    if fmt == "prometheus":
        return render(m)
    if fmt == "json":
        return as_json(target, module, m, log) + "\n"
    return text(target, module, m, log)
