"""Leap-second readiness of one server: its leap indicator against the exporter's leap file.

Shared by the probers that read a server's leap indicator (not a prober of its own). The
leap file comes with the configuration, through the probe's guard; without one (or with
an expired or badly hashed one) the verdict is ``unknown``.
"""

from __future__ import annotations

import time

from ntp_probe.engine.context import ProbeContext
from ntp_probe.engine.result import Measurement, Reason
from ntp_probe.exposition.families import Family
from ntp_probe.proto.leapfile import LeapVerdict, leap_verdict

LEAP_CHECK = Family(
    "probe_ntp_leap_check_info",
    "The server's leap indicator against the exporter's leap-seconds.list: ok, "
    "missing_announcement, unexpected_announcement, or unknown (no valid file, or an "
    "unsynchronised server).",
    ("verdict",),
)

_MISMATCHES = (LeapVerdict.MISSING_ANNOUNCEMENT, LeapVerdict.UNEXPECTED_ANNOUNCEMENT)
_MISMATCH_VALUES = frozenset(v.value for v in _MISMATCHES)


def mismatch_of_any(measurements: list[Measurement]) -> str | None:
    """The first mismatch verdict among several servers' (every address of one name),
    or None: clients that pick a server announcing the wrong leap are misled whichever
    address the other series describe."""
    for m in measurements:
        for (verdict,), _ in m.values(LEAP_CHECK):
            if verdict in _MISMATCH_VALUES:
                return verdict
    return None


def leap_check(ctx: ProbeContext, leap_indicator: int, server_unix_time: float, *,
               fail_on_mismatch: bool) -> None:
    """Add the verdict for ``leap_indicator`` read at ``server_unix_time`` (the server's
    clock, so that a leap is judged by the day the server is in); a mismatch fails the
    probe with ``leap_mismatch`` when ``fail_on_mismatch`` (the module's
    ntp.fail_on_leap_mismatch)."""
    verdict = leap_verdict(ctx.guard.leapfile, leap_indicator, server_unix_time,
                           local_time=time.time())
    ctx.measurement.add(LEAP_CHECK, 1, verdict.value)
    if verdict in _MISMATCHES:
        ctx.log(f"leap indicator {leap_indicator} against the leap file: {verdict.value}")
        if fail_on_mismatch:
            ctx.measurement.fail(Reason.LEAP_MISMATCH)
