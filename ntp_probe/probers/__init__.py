"""Probers: one module per kind, all with the same signature (like blackbox's ProbeFn).

``async def probe(target, module, result, log) -> bool``: fill ``result`` with gauges
and at most one failure reason, log what happened, return whether the probe succeeded,
and return by ``result.deadline``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from ntp_probe.config.load import Module
from ntp_probe.engine.result import ProbeLog, ProbeResult
from ntp_probe.engine.targets import Target
from ntp_probe.probers import kernel, ntp

ProbeFn = Callable[[Target, Module, ProbeResult, ProbeLog], Awaitable[bool]]

PROBERS: dict[str, ProbeFn] = {"ntp": ntp.probe, "kernel": kernel.probe}
