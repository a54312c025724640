"""Probers: one module per kind, all with blackbox's ProbeFn signature.

``async def probe(target, module, ctx) -> Measurement``: write gauges and failed checks
into ``ctx.measurement`` as they happen, log what happened to ``ctx.log``, and return by
``ctx.deadline``. The kinds are listed in :mod:`ntp_probe.engine.registry`.
"""
