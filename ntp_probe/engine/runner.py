"""Run one probe under its deadline: the glue between the web/CLI layers and the probers."""

from __future__ import annotations

import asyncio
import math
import re
import time

from ntp_probe.config.schema import Config, Module
from ntp_probe.engine.context import ProbeContext, ProbeLog
from ntp_probe.engine.registry import probe_function, timeout_reason
from ntp_probe.engine.result import Measurement
from ntp_probe.engine.targets import Target
from ntp_probe.net import budget
from ntp_probe.safety.guard import Guard
from ntp_probe.safety.kod import KodTable
from ntp_probe.safety.leap import LeapMemory

SCRAPE_TIMEOUT_HEADER = "X-Prometheus-Scrape-Timeout-Seconds"
_BACKSTOP_GRACE = 0.1
# A decimal as Go's strconv.ParseFloat (blackbox's) reads one: a sign and an exponent
# allowed (+3, 1e1); ASCII digits only, no inf, nan, hex or digit separators.
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


class TimeoutHeaderError(ValueError):
    """The scrape-timeout header is not a positive number."""


def probe_timeout(module_timeout: float, header: str | None, offset: float) -> float:
    """blackbox's rule: min(module timeout, header - offset); the module timeout alone
    without the header.

    The offset leaves at most half the scrape timeout: below twice the offset, half the
    scrape timeout is the bound, the other half left for the answer to reach the scraper.
    So a probe never outlives its scrape (blackbox falls back to the module timeout when
    the offset eats it all) and a longer scrape timeout never gives a shorter probe
    (``header - offset`` alone would fall to nothing just above the offset). An empty
    header counts as none, as in blackbox.
    """
    if header is None or not header.strip():
        return module_timeout
    try:
        if not _NUMBER_RE.fullmatch(header.strip()):
            raise ValueError(header)
        scrape = float(header)
    except ValueError:
        raise TimeoutHeaderError(f"invalid {SCRAPE_TIMEOUT_HEADER} header {header!r}") from None
    if not math.isfinite(scrape) or scrape <= 0:
        raise TimeoutHeaderError(f"invalid {SCRAPE_TIMEOUT_HEADER} header {header!r}")
    return min(module_timeout, max(scrape - offset, scrape / 2))


def limit_probe_sockets(limit: int | None) -> None:
    """At most ``limit`` probe sockets open at once (None: no limit): what the open-files
    limit leaves the probes, so that they cannot take the server's descriptors."""
    budget.limit_probe_sockets(limit)


def guard_for(config: Config, module: Module, kod: KodTable | None = None,
              leaps: LeapMemory | None = None) -> Guard:
    """The guard for a probe of ``module``: the global policy, then the module's, and the
    configuration's leap file. Without ``kod`` (a one-off probe: the CLI's), a Kiss-o'-Death
    memory of its own, so that the probe reports the backoff a KoD starts as /probe does."""
    return Guard(policies=tuple(p for p in (config.policy, module.policy) if p),
                 kod=kod if kod is not None else KodTable(), leaps=leaps,
                 leapfile=config.leapfile)


async def run_probe(target: Target, module: Module, timeout: float, log: ProbeLog | None = None,
                    guard: Guard | None = None,
                    measurement: Measurement | None = None) -> tuple[Measurement, ProbeLog]:
    """Run the module's prober against ``target``; never takes longer than ``timeout``.

    The prober writes into ``measurement`` (a fresh one if None): a caller that cancels
    the probe still reads there what was sent before it stopped."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    if log is None:
        log = ProbeLog(str(target), module.name)
    ctx = ProbeContext(deadline=loop.time() + timeout, log=log,
                       guard=guard if guard is not None else Guard(),
                       measurement=measurement if measurement is not None else Measurement())
    ctx.log(lambda: f"probe {target} module={module.name} prober={module.prober} "
            f"timeout={timeout:g}s")
    try:
        # The backstop is for a prober that ignores its deadline. It fires a little after the
        # deadline so that, when the loop is late, the prober's own deadline handling runs
        # first. Probers write into ctx.measurement as they go, so what they measured before
        # the backstop fired is kept.
        async with asyncio.timeout_at(ctx.deadline + _BACKSTOP_GRACE):
            await probe_function(module)(target, module, ctx)
    except TimeoutError:
        ctx.measurement.fail(timeout_reason(module))
        ctx.log("probe deadline reached")
    m = ctx.measurement
    m.duration = time.perf_counter() - started
    # Essential: kept even when a flood of junk filled the log.
    ctx.log("verdict: success" if m.failure is None else f"verdict: failure ({m.failure})",
            essential=True)
    return m, log
