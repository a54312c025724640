"""Command line: ``ntp-probe [serve] [flags]``, ``ntp-probe probe TARGET`` and
``ntp-probe check TARGET`` (a Nagios / Icinga plugin: :mod:`ntp_probe.cli.check`).

Every flag can also come from an environment variable ``NTP_PROBE_<FLAG>``, the flag's
name in capitals with dots and dashes as underscores (``--web.listen-address`` ->
``NTP_PROBE_WEB_LISTEN_ADDRESS``); a flag on the command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections.abc import Sequence

from ntp_probe import __version__
from ntp_probe.cli import check, logs, output, report
from ntp_probe.cli.entry import EarlyHangup
from ntp_probe.cli.flags import Parser, env_name, flag, number, positive_float, seconds
from ntp_probe.cli.probe import probe
from ntp_probe.config.load import config_warnings, load_config
from ntp_probe.config.schema import Config, ConfigError
from ntp_probe.engine.context import ProbeLog

logger = logging.getLogger("ntp_probe")

DEFAULT_LISTEN = ":9559"


def _non_negative_float(text: str) -> float:
    value = seconds(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not negative: {text}")
    return value


# Counts beyond this are typos, and would overflow the C sizes they become (a deque's maxlen).
_MAX_COUNT = 1_000_000_000


def _count(text: str, least: int) -> int:
    value = int(number(text, int))
    if value < least:
        raise argparse.ArgumentTypeError(
            f"must be at least 1: {text}" if least else f"must not be negative: {text}")
    if value > _MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be at most {_MAX_COUNT}: {text}")
    return value


def _positive_int(text: str) -> int:
    return _count(text, 1)


def _non_negative_int(text: str) -> int:
    return _count(text, 0)


def _bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _negation(parser: Parser, name: str, dest: str) -> None:
    """kingpin's --no-FLAG for a boolean flag (it overrides the flag's variable too)."""
    parser.add_argument(f"--no-{name[2:]}", dest=dest, action="store_false",
                        help=f"the opposite of {name}")


def _common(parser: Parser) -> None:
    flag(parser, "--config.file", None, dest="config_file", metavar="FILE",
          help="modules file; replaces the packaged default modules")
    flag(parser, "--log.level", "info", dest="log_level", choices=sorted(logs.LEVELS),
          help="log level")
    flag(parser, "--log.format", "logfmt", dest="log_format", choices=("logfmt", "json"),
          help="log format")


def serve_parser() -> argparse.ArgumentParser:
    """Flags of the exporter (the default command)."""
    # No abbreviations (--config.chec): kingpin refuses them, and a flag added later
    # would change what one means. (check takes them, as the plugins' getopt_long does.)
    p = Parser(
        prog="ntp-probe", allow_abbrev=False,
        description="Prometheus exporter for NTP (blackbox_exporter style). "
        "Subcommands: serve (default), probe TARGET, check TARGET (Nagios/Icinga plugin).",
    )
    p.error_status = 1  # as kingpin exits on a bad flag: every start-up error is 1
    _common(p)
    env = env_name("--web.listen-address")
    p.add_argument("--web.listen-address", dest="listen", action="append", metavar="[HOST]:PORT",
                   help=f"address to listen on; repeat the flag for several (default: "
                   f"{DEFAULT_LISTEN}) [env {env}, comma-separated]")
    flag(p, "--web.systemd-socket", "false", dest="systemd_socket", type=_bool, nargs="?",
          const=True, metavar="BOOL",
          help="listen on the sockets systemd passes (socket activation) instead")
    _negation(p, "--web.systemd-socket", "systemd_socket")
    flag(p, "--timeout-offset", "0.5", dest="timeout_offset", type=_non_negative_float,
          metavar="SECONDS", help="subtracted from Prometheus' scrape timeout (at most half "
          "of it)")
    flag(p, "--probe.max-concurrent", "100", dest="max_concurrent", type=_positive_int,
          metavar="N", help="probes in flight before /probe answers 503")
    flag(p, "--log.prober", "debug", dest="log_prober", choices=sorted(logs.LEVELS),
          help="level at which each probe's log lines are written to the log (they appear "
          "when --log.level lets that level through)")
    flag(p, "--web.config.file", None, dest="web_config_file", metavar="FILE",
          help="TLS and basic auth, in Prometheus exporter-toolkit format")
    flag(p, "--web.max-connections", "512", dest="max_connections", type=_positive_int,
          metavar="N", help="HTTP connections served at once; beyond it a new one waits "
          "for a slot, and one whose request has come makes room by closing an idle or slow "
          "one (kept below the open-files limit)")
    flag(p, "--web.read-header-timeout", "10", dest="header_timeout", type=positive_float,
          metavar="SECONDS", help="a new connection must send its request headers within this")
    flag(p, "--web.idle-timeout", "30", dest="idle_timeout", type=positive_float,
          metavar="SECONDS", help="an idle keep-alive connection is closed after this")
    flag(p, "--history.limit", "100", dest="history_limit", type=_non_negative_int, metavar="N",
          help="recent probes kept for the landing page (failures: as many again)")
    flag(p, "--config.check", "false", dest="config_check", type=_bool, nargs="?", const=True,
          metavar="BOOL", help="validate the configuration and exit 0 (valid) or 1")
    _negation(p, "--config.check", "config_check")
    p.add_argument("--version", action="version", version=f"ntp-probe {__version__}")
    return p


def probe_parser() -> argparse.ArgumentParser:
    """Flags of ``ntp-probe probe``."""
    modules = load_config(None).modules
    listing = "\n".join(f"  {name:<10} {m.description}" for name, m in modules.items())
    p = Parser(
        prog="ntp-probe probe", allow_abbrev=False,
        description="Run one probe and print the result.",
        epilog=f"packaged modules (a --config.file replaces them):\n{listing}\n\n"
        "exit status: 0 the probe succeeded, 1 it failed (the reason is printed),\n"
        "2 bad arguments or configuration, 130 interrupted.",
    )
    p.add_argument("target", help="HOST, HOST:PORT, IP:PORT or [IPv6]:PORT")
    flag(p, "--module", "ntp", help="module name")
    flag(p, "--format", "text", dest="output_format", choices=report.FORMATS,
          help="output format")
    _common(p)
    return p


def listen_addresses(given: list[str] | None) -> list[str]:
    """The addresses to listen on: the flags given, else the variable's comma-separated
    list, else :9559 (also when the variable holds no address: never none at all)."""
    if given:
        return given
    env = os.environ.get(env_name("--web.listen-address"), "")
    return [a.strip() for a in env.split(",") if a.strip()] or [DEFAULT_LISTEN]


def _load(path: str | None, *, serving: bool = True) -> Config | None:
    try:
        config = load_config(path)
    except ConfigError as exc:
        # One log line per problem: each names its file, line and key.
        for line in str(exc).splitlines():
            logger.error("invalid configuration: %s", line)
        return None
    # For the exporter and --config.check; an ad-hoc probe's leap verdict says it itself.
    for warning in config_warnings(config, time.time()) if serving else ():
        logger.warning("%s", warning)
    return config


_COMMANDS = ("serve", "probe", "check")
_SHARED_FLAGS = ("--config.file", "--log.level", "--log.format")


def _leading(argv: list[str]) -> int:
    """How many words of ``argv`` are shared flags (with their values) before a command;
    0 when no command follows them."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in _SHARED_FLAGS:
            i += 2  # the flag and its value
        elif "=" in word and word.split("=", 1)[0] in _SHARED_FLAGS:
            i += 1
        else:
            break
    return i if 0 < i < len(argv) and argv[i] in _COMMANDS else 0


def command_first(argv: list[str]) -> list[str]:
    """``argv`` with its command first: the flags every command takes (``--config.file``,
    ``--log.level``, ``--log.format``) may come before it, as git's global options do
    (``ntp-probe --config.file X probe T`` is ``ntp-probe probe --config.file X T``)."""
    i = _leading(argv)
    return [argv[i], *argv[:i], *argv[i + 1:]] if i else argv


def main(argv: Sequence[str] | None = None, hangup: EarlyHangup | None = None) -> int:
    """The command line's work: the exit status of ``ntp-probe ARGV``; ``hangup``: the
    console script's note of a SIGHUP that came while it loaded (the exporter's)."""
    given = list(sys.argv[1:] if argv is None else argv)
    argv = command_first(given)
    if argv and argv[0] == "check":
        # A plugin's output is its one status line: logging goes to stderr, errors only.
        logs.setup("error", "logfmt")
        before = [w.split("=", 1)[0] for w in given[:_leading(given)] if w.startswith("--")]
        return check.main(argv[1:], before=before)
    # A Ctrl-C anywhere in here is the console script's to report (cli/entry.py).
    return _main(argv, hangup)


def _main(argv: list[str], hangup: EarlyHangup | None) -> int:
    if argv and argv[0] == "probe":
        args = probe_parser().parse_args(argv[1:])
        logs.setup(args.log_level, args.log_format)
        config = _load(args.config_file, serving=False)
        return 2 if config is None else asyncio.run(probe(args, config))
    if hangup is None:
        hangup = EarlyHangup()
    # The web stack (aiohttp: a third of a second to import) only for the exporter: a
    # Nagios check runs within its -t, start-up included.
    from ntp_probe.cli.serve import serve
    from ntp_probe.web.auth import WebConfigError, load_web_config

    if argv and argv[0] == "serve":
        argv = argv[1:]
    args = serve_parser().parse_args(argv)
    args.listen = listen_addresses(args.listen)
    # An empty value is no web config, as exporter-toolkit reads its default "" (a unit's
    # --web.config.file=${VAR} with VAR unset).
    args.web_config_file = args.web_config_file or None
    logs.setup(args.log_level, args.log_format)
    ProbeLog.level = logs.LEVELS[args.log_prober]
    config = _load(args.config_file)
    if args.config_check:
        valid = config is not None
        try:  # also when the modules file failed: every problem in one run
            load_web_config(args.web_config_file)
        except WebConfigError as exc:
            logger.error("invalid web configuration: %s", exc)
            valid = False
        if config is None or not valid:
            return 1
        count = len(config.modules)
        if not output.write(f"configuration OK: {count} module{'' if count == 1 else 's'} "
                            f"from {config.source}\n"):
            return 1
        return 0
    if config is None:
        return 1
    return asyncio.run(serve(args, config, hangup))
