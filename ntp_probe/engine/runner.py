"""Run one probe under its deadline: the glue between the web/CLI layers and the probers."""

from __future__ import annotations

import asyncio
import math
import re
import time

from ntp_probe.config.load import Module
from ntp_probe.engine.result import ProbeLog, ProbeResult
from ntp_probe.engine.targets import Target
from ntp_probe.probers import PROBERS
from ntp_probe.safety.guard import Guard

SCRAPE_TIMEOUT_HEADER = "X-Prometheus-Scrape-Timeout-Seconds"
_BACKSTOP_GRACE = 0.1
_NUMBER_RE = re.compile(r"\d+(?:\.\d*)?|\.\d+")


class TimeoutHeaderError(ValueError):
    """The scrape-timeout header is not a positive number."""


def probe_timeout(module_timeout: float, header: str | None, offset: float) -> float:
    """blackbox's rule: min(module timeout, header - offset); the module timeout alone
    without the header.

    When the offset would eat the whole scrape timeout, the header's own value is the
    bound instead, so a probe still never outlives its scrape.
    """
    if header is None:
        return module_timeout
    try:
        if not _NUMBER_RE.fullmatch(header.strip()):
            raise ValueError(header)
        scrape = float(header)
    except ValueError:
        raise TimeoutHeaderError(f"invalid {SCRAPE_TIMEOUT_HEADER} header {header!r}") from None
    if not math.isfinite(scrape) or scrape <= 0:
        raise TimeoutHeaderError(f"invalid {SCRAPE_TIMEOUT_HEADER} header {header!r}")
    budget = scrape - offset if scrape - offset > 0 else scrape
    return min(module_timeout, budget)


async def run_probe(
    target: Target, module: Module, timeout: float, log: ProbeLog,
    guard: Guard | None = None,
) -> ProbeResult:
    """Run the module's prober against ``target``; never takes longer than ``timeout``."""
    loop = asyncio.get_running_loop()
    started = time.perf_counter()
    result = ProbeResult(deadline=loop.time() + timeout, guard=guard or Guard())
    log(f"probe {target} module={module.name} prober={module.prober} timeout={timeout:g}s")
    try:
        # The backstop is for a prober that ignores its deadline. It fires a little after the
        # deadline so that, when the loop is late, the prober's own deadline handling (which
        # keeps the samples collected so far) runs first instead of both firing together.
        async with asyncio.timeout_at(result.deadline + _BACKSTOP_GRACE):
            ok = await PROBERS[module.prober](target, module, result, log)
        result.success = ok and result.failure is None
    except TimeoutError:
        # Probers honour the deadline themselves; this is the backstop.
        result.success = False
        result.fail("timeout")
        log("probe deadline reached")
    if not result.success and result.failure is None:
        raise RuntimeError(f"prober {module.prober} failed without a reason")
    result.duration = time.perf_counter() - started
    return result
