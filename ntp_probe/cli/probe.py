"""``ntp-probe probe TARGET``: one ad-hoc probe, reported on standard output."""

from __future__ import annotations

import argparse
import logging

from ntp_probe.cli import output, report
from ntp_probe.config.schema import Config
from ntp_probe.engine.registry import resolve_target
from ntp_probe.engine.runner import guard_for, run_probe
from ntp_probe.engine.targets import TargetError

# As configuration errors are: in the --log.format chosen (one line of logfmt or JSON).
logger = logging.getLogger("ntp_probe")


async def probe(args: argparse.Namespace, config: Config) -> int:
    """Run the probe; exit 0 on success, 1 on failure, 2 on bad arguments."""
    module = config.modules.get(args.module)
    if module is None:
        logger.error("unknown module %r (known: %s)", args.module, ", ".join(config.modules))
        return 2
    try:
        target = resolve_target(config, module, args.target)
    except TargetError as exc:
        logger.error("%s", exc)
        return 2
    m, log = await run_probe(target, module, module.timeout, guard=guard_for(config, module))
    if not output.write(report.report(args.output_format, str(target), module.name, m, log)):
        return 1
    return 0 if m.success else 1
