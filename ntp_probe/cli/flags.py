"""Flags shared by the subcommands: each also read from an ``NTP_PROBE_<FLAG>`` variable.

The variable's name is the flag's in capitals, dots and dashes as underscores
(``--web.listen-address`` -> ``NTP_PROBE_WEB_LISTEN_ADDRESS``); a flag on the command line
wins. A variable that does not convert is reported like a bad flag, naming the variable; an
empty one counts as unset.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import TYPE_CHECKING, Any, NoReturn

from ntp_probe.cli import output
from ntp_probe.config.schema import MAX_DURATION, ConfigError, parse_duration

if TYPE_CHECKING:
    from _typeshed import SupportsWrite


def env_name(flag: str) -> str:
    """The environment variable that can set ``flag``."""
    return "NTP_PROBE_" + flag.lstrip("-").upper().replace(".", "_").replace("-", "_")


class Parser(argparse.ArgumentParser):
    """argparse, plus flags read from NTP_PROBE_* variables whose errors name the variable."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        # (the flag's spellings, the error) of each variable that does not convert
        self.env_errors: list[tuple[tuple[str, ...], str]] = []

    output_failed = 1  # exit status when --help or --version cannot be written
    error_status = 2  # for bad arguments: argparse's (the exporter's is kingpin's 1)

    def error(self, message: str) -> NoReturn:
        """Bad arguments: usage and the reason on standard error, exit ``error_status``."""
        self.print_usage(sys.stderr)
        self.exit(self.error_status, f"{self.prog}: error: {message}\n")

    def _print_message(self, message: str, file: SupportsWrite[str] | None = None) -> None:
        # --help into a closed pipe or a full disk: an exit status, not a traceback
        # (flushed here: a buffered write fails only at the interpreter's exit).
        try:
            super()._print_message(message, file)
            if file is not None and hasattr(file, "flush"):
                file.flush()
        except (OSError, ValueError):
            output.silence(file)
            raise SystemExit(self.output_failed) from None

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        """Parse; an invalid environment variable is an error like an invalid flag, unless
        the flag itself is on the command line (the flag wins)."""
        given = list(sys.argv[1:] if args is None else args)
        errors = [why for spellings, why in self.env_errors
                  if not any(_spells(a, spellings) for a in given)]
        if errors:
            self.error("; ".join(errors))
        return super().parse_args(given, namespace)


def _spells(arg: str, spellings: tuple[str, ...]) -> bool:
    """Whether the command-line word ``arg`` gives the flag of ``spellings`` as argparse
    reads it: ``--flag``, ``--flag=V``, ``-wV`` or an abbreviation such as ``--warn``."""
    name = arg.split("=", 1)[0]
    if name.startswith("--no-"):  # kingpin's negation gives the flag too
        name = "--" + name[5:]
    for spelling in spellings:
        if spelling.startswith("--"):
            if name == spelling or (name.startswith("--") and len(name) > 2
                                    and spelling.startswith(name)):
                return True
        elif arg.startswith(spelling):  # a short flag, its value attached or not
            return True
    return False


def flag(parser: Parser, name: str, default: Any, *aliases: str, **kwargs: Any) -> None:
    """Add the flag ``name`` (and its ``aliases``, e.g. ``-w``), its default taken from its
    environment variable when that is set."""
    env = env_name(name)
    # An empty variable is an unset one, as kingpin (blackbox, node_exporter) reads it.
    value = os.environ.get(env) or None
    if value is not None:
        convert, choices = kwargs.get("type"), kwargs.get("choices")
        try:
            converted = convert(value) if convert is not None else value
            if choices is not None and converted not in choices:
                raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}")
        except argparse.ArgumentTypeError as exc:
            parser.env_errors.append(((name, *aliases),
                                      f"environment variable {env}={value!r}: {exc}"))
        default = value
    help_text = kwargs.pop("help", "")
    shown = "" if default is None else f" (default: {default})"
    parser.add_argument(*aliases, name, default=default, help=f"{help_text}{shown} [env {env}]",
                        **kwargs)


def number(text: str, kind: type[float] | type[int]) -> float:
    """``text`` as a finite number of ``kind``, or argparse's type error."""
    try:
        value = kind(text)
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def seconds(text: str) -> float:
    """Seconds as a number (``0.5``, as blackbox's float flags) or a duration (``500ms``, ``2s``,
    as kingpin's duration flags and Prometheus' configs spell them)."""
    try:
        value = number(text, float)
    except argparse.ArgumentTypeError:
        try:
            return parse_duration(text.strip(), "")
        except ConfigError:
            raise argparse.ArgumentTypeError(
                f"expected seconds or a duration like 0.5s or 500ms, got {text!r}") from None
    if value > MAX_DURATION:  # as for a duration: no setting means more than a year
        raise argparse.ArgumentTypeError(f"{text} seconds is longer than 366 days")
    return value


def positive_float(text: str) -> float:
    """Seconds above 0, as a number or a duration."""
    value = seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds: {text}")
    return value
