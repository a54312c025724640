"""Command line: ``ntp-probe [serve] [flags]`` and ``ntp-probe probe TARGET``.

Every flag can also come from an environment variable ``NTP_PROBE_<FLAG>``, the flag's
name in capitals with dots and dashes as underscores (``--web.listen-address`` ->
``NTP_PROBE_WEB_LISTEN_ADDRESS``); a flag on the command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from aiohttp import web

from ntp_probe import __version__
from ntp_probe.cli import logs, sdnotify
from ntp_probe.config.load import Config, ConfigError, load_config
from ntp_probe.engine.result import ProbeLog, ProbeResult
from ntp_probe.engine.runner import run_probe
from ntp_probe.engine.targets import TargetError, parse_target
from ntp_probe.exposition.internals import Internals
from ntp_probe.exposition.render import render
from ntp_probe.safety.guard import Guard
from ntp_probe.web.app import State, create_app
from ntp_probe.web.auth import WebConfigError, load_web_config
from ntp_probe.web.history import History

logger = logging.getLogger("ntp_probe")

DEFAULT_LISTEN = ":9559"


def _env_name(flag: str) -> str:
    return "NTP_PROBE_" + flag.lstrip("-").upper().replace(".", "_").replace("-", "_")


def _flag(parser: argparse.ArgumentParser, flag: str, default: Any, **kwargs: Any) -> None:
    env = _env_name(flag)
    value = os.environ.get(env, default)
    help_text = kwargs.pop("help", "")
    parser.add_argument(flag, default=value, help=f"{help_text} [env {env}]", **kwargs)


def _positive_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


def _bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _common(parser: argparse.ArgumentParser) -> None:
    _flag(parser, "--config.file", None, dest="config_file", metavar="FILE",
          help="modules file; replaces the packaged default modules")
    _flag(parser, "--log.level", "info", dest="log_level", choices=sorted(logs.LEVELS),
          help="log level")
    _flag(parser, "--log.format", "logfmt", dest="log_format", choices=("logfmt", "json"),
          help="log format")


def serve_parser() -> argparse.ArgumentParser:
    """Flags of the exporter (the default command)."""
    p = argparse.ArgumentParser(
        prog="ntp-probe",
        description="Prometheus exporter for NTP (blackbox_exporter style). "
        "Subcommands: serve (default), probe TARGET.",
    )
    _common(p)
    _flag(p, "--web.listen-address", DEFAULT_LISTEN, dest="listen", metavar="[HOST]:PORT",
          help="address to listen on")
    _flag(p, "--timeout-offset", "0.5", dest="timeout_offset", type=_positive_float,
          metavar="SECONDS", help="subtracted from Prometheus' scrape timeout")
    _flag(p, "--probe.max-concurrent", "100", dest="max_concurrent", type=_positive_int,
          metavar="N", help="probes in flight before /probe answers 503")
    _flag(p, "--web.config.file", None, dest="web_config_file", metavar="FILE",
          help="TLS and basic auth, in Prometheus exporter-toolkit format")
    _flag(p, "--history.limit", "100", dest="history_limit", type=_non_negative_int, metavar="N",
          help="recent probes kept for the landing page (failures: as many again)")
    _flag(p, "--config.check", "false", dest="config_check", type=_bool, nargs="?", const=True,
          metavar="BOOL", help="validate the configuration and exit 0 (valid) or 1")
    p.add_argument("--version", action="version", version=f"ntp-probe {__version__}")
    return p


def probe_parser() -> argparse.ArgumentParser:
    """Flags of ``ntp-probe probe``."""
    p = argparse.ArgumentParser(
        prog="ntp-probe probe",
        description="Run one probe and print the result; exit 0 on success, 1 on failure.",
    )
    p.add_argument("target", help="HOST, HOST:PORT, IP:PORT or [IPv6]:PORT")
    _flag(p, "--module", "ntp", help="module name")
    _flag(p, "--format", "text", dest="output_format", choices=("text", "json", "prometheus"),
          help="output format")
    _common(p)
    return p


def parse_listen(address: str) -> tuple[str | None, int]:
    """``:9559``, ``0.0.0.0:9559``, ``[::1]:9559`` -> (host or None for all, port)."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"invalid listen address {address!r} (expected [HOST]:PORT)")
    host = host.strip("[]")
    return (host or None), int(port_text)


def _load(path: str | None) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        logger.error("invalid configuration: %s", exc)
        return None


async def _serve(args: argparse.Namespace, config: Config) -> int:
    try:
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        logger.error("%s", exc)
        return 2
    try:
        web_config = load_web_config(args.web_config_file)
    except WebConfigError as exc:
        logger.error("invalid web configuration: %s", exc)
        return 1
    internals = Internals()
    internals.config_loaded(len(config.modules))
    state = State(config=config, internals=internals, timeout_offset=args.timeout_offset,
                  max_concurrent=args.max_concurrent, config_path=args.config_file,
                  history=History(args.history_limit), web_config=web_config)
    # handler_cancellation: a client that hangs up cancels its probe (and closes its socket).
    runner = web.AppRunner(create_app(state), access_log=None, handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True,
                           ssl_context=web_config.ssl_context)
        await site.start()
    except OSError as exc:
        logger.error("cannot listen on %s: %s", args.listen, exc.strerror or exc)
        await runner.cleanup()
        return 1
    logger.info("listening on %s%s with %d modules from %s (version %s)", args.listen,
                " (TLS)" if web_config.ssl_context else "", len(config.modules), config.source,
                __version__)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, state.reload)
    sdnotify.notify("READY=1")
    watchdog = sdnotify.start_watchdog()
    await stop.wait()
    logger.info("shutting down")
    sdnotify.notify("STOPPING=1")
    await sdnotify.stop_watchdog(watchdog)
    await runner.cleanup()
    return 0


def _text_report(target: str, module: str, result: ProbeResult, log: ProbeLog) -> str:
    def g(name: str) -> float | None:
        return result.value(name)

    lines = [f"{target} (module {module}): "
             + ("OK" if result.success else f"FAILED: {result.failure}")
             + f" in {result.duration * 1000:.1f} ms"]
    offset, rtt = g("probe_ntp_offset_seconds"), g("probe_ntp_rtt_seconds")
    if offset is not None and rtt is not None:
        server = next((dict(lab) for n, lab, _ in result.gauges if n == "probe_ntp_server_info"),
                      {})
        rows = [
            ("offset", f"{offset:+.9f} s"),
            ("delay (rtt)", f"{rtt:.9f} s"),
            ("jitter", f"{g('probe_ntp_jitter_seconds') or 0.0:.9f} s"),
            ("stratum", f"{g('probe_ntp_stratum'):.0f}"),
            ("refid", server.get("refid", "?")),
            ("leap", f"{g('probe_ntp_leap_indicator'):.0f}"),
            ("version", server.get("version", "?")),
            ("root distance", f"{g('probe_ntp_root_distance_seconds'):.9f} s"),
            ("samples", f"{g('probe_ntp_samples_received'):.0f} of "
                        f"{g('probe_ntp_samples_sent'):.0f} answered"),
        ]
        lines += [f"  {k:<14} {v}" for k, v in rows]
        for i, s in enumerate(result.details.get("samples", []), 1):
            mark = "*" if s["selected"] else " "
            lines.append(f"  {mark} sample {i}: offset {s['offset_seconds']:+.9f} s, "
                         f"rtt {s['rtt_seconds']:.9f} s")
    state = next((dict(lab) for n, lab, _ in result.gauges
                  if n == "probe_kernel_clock_state_info"), None)
    if state is not None:
        flags = [dict(lab)["flag"] for n, lab, _ in result.gauges
                 if n == "probe_kernel_status_flags_info"]
        rows = [("kernel state", f"{state['state']} ({'|'.join(flags) or 'no flags'})"),
                ("synchronised", "yes" if g("probe_kernel_sync_status") else "no"),
                ("kernel offset", f"{g('probe_kernel_offset_seconds'):+.9f} s"),
                ("maxerror", f"{g('probe_kernel_maxerror_seconds'):.6f} s"),
                ("frequency", f"{(g('probe_kernel_frequency_offset_ratio') or 0) * 1e6:+.3f} ppm")]
        divergence = g("probe_kernel_divergence_seconds")
        if divergence is not None:
            rows += [("divergence", f"{divergence:.9f} s"),
                     ("coherence", f"{g('probe_kernel_coherence_score'):.3f}")]
        lines += [f"  {k:<14} {v}" for k, v in rows]
    lines.append("log:")
    lines += ["  " + line for line in log.lines]
    return "\n".join(lines) + "\n"


async def _probe(args: argparse.Namespace, config: Config) -> int:
    module = config.modules.get(args.module)
    if module is None:
        print(f"unknown module {args.module!r} (known: {', '.join(config.modules)})",
              file=sys.stderr)
        return 2
    try:
        target = parse_target(args.target)
    except TargetError as exc:
        print(exc, file=sys.stderr)
        return 2
    log = ProbeLog(f"target={target} module={module.name}")
    guard = Guard(policies=tuple(p for p in (config.policy, module.policy) if p))
    result = await run_probe(target, module, module.timeout, log, guard)
    if args.output_format == "prometheus":
        sys.stdout.write(render(result))
    elif args.output_format == "json":
        metrics: dict[str, float] = {}
        for name, labels, value in result.gauges:
            key = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else "")
            metrics[key] = value
        print(json.dumps({
            "target": str(target), "module": module.name, "success": result.success,
            "failure_reason": result.failure, "duration_seconds": result.duration,
            "metrics": metrics, "samples": result.details.get("samples", []),
            "log": log.lines,
        }, indent=2))
    else:
        sys.stdout.write(_text_report(str(target), module.name, result, log))
    return 0 if result.success else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ntp-probe`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "probe":
        args = probe_parser().parse_args(argv[1:])
        logs.setup(args.log_level, args.log_format)
        config = _load(args.config_file)
        return 2 if config is None else asyncio.run(_probe(args, config))
    if argv and argv[0] == "serve":
        argv = argv[1:]
    args = serve_parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    config = _load(args.config_file)
    if args.config_check:
        if config is None:
            return 1
        try:
            load_web_config(args.web_config_file)
        except WebConfigError as exc:
            logger.error("invalid web configuration: %s", exc)
            return 1
        print(f"configuration OK: {len(config.modules)} modules from {config.source}")
        return 0
    if config is None:
        return 1
    return asyncio.run(_serve(args, config))
