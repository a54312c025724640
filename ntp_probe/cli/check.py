"""``ntp-probe check TARGET``: one probe as a Nagios / Icinga plugin.

One status line, ``NTP OK|WARNING|CRITICAL|UNKNOWN: summary | perfdata``, and the
plugin exit codes: 0 OK, 1 WARNING (|offset| above -w), 2 CRITICAL (|offset| above -c,
the probe failed: its reason is in the line, or it gave no offset to judge), 3 UNKNOWN
(bad arguments, unknown module, bad configuration, or anything unexpected).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from decimal import Decimal
from typing import Any, NoReturn

from ntp_probe import __version__
from ntp_probe.cli import flags, output
from ntp_probe.config.load import load_config
from ntp_probe.config.schema import Config, ConfigError, Module
from ntp_probe.engine.registry import resolve_target
from ntp_probe.engine.result import Measurement, Perf, Reason, Report, SeveralOffsets
from ntp_probe.engine.runner import guard_for, run_probe
from ntp_probe.engine.targets import Target, TargetError, parse_target
from ntp_probe.engine.text import visible

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3
_STATES = {OK: "OK", WARNING: "WARNING", CRITICAL: "CRITICAL", UNKNOWN: "UNKNOWN"}
DEFAULT_WARNING = 0.010
DEFAULT_CRITICAL = 0.050
HOSTNAME_ENV = flags.env_name("--hostname")
_NEGATIVE = re.compile(r"-\d+(\.\d*)?([eE][-+]?\d+)?|-\.\d+([eE][-+]?\d+)?")
# A threshold range starting below zero (``-w -1:1``), which argparse would read as an option.
_NEGATIVE_RANGE = re.compile(r"-[\d.][^\s]*")
_THRESHOLD_FLAGS = ("-w", "--warning", "-c", "--critical")
# Short flags that take no value, so that another may follow in the same word (-qw).
_BARE_FLAGS = ("-q", "-v", "-4", "-6")


class Unknown(Exception):
    """A problem that makes the check's answer UNKNOWN (exit 3)."""


class _Parser(flags.Parser):
    """The shared flags' parser, reporting bad arguments (and bad NTP_PROBE_* variables) as
    a plugin's UNKNOWN, not argparse's exit 2."""

    def error(self, message: str) -> NoReturn:
        """Bad arguments: UNKNOWN."""
        raise SystemExit(_emit(UNKNOWN, f"NTP UNKNOWN: {_text(message)}"))

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        """After --help or --version: UNKNOWN, as the monitoring plugins exit."""
        if message:
            self._print_message(message)
        raise SystemExit(UNKNOWN if status == 0 else status)

    output_failed = UNKNOWN  # --help that cannot be written

    def parse_args(self, args: Any = None, namespace: Any = None) -> Any:
        """Parse; ``-o -0.2`` is an expected offset and ``-w -1:1`` a range, not options
        (with -4 and -6 defined, argparse reads every negative number as one)."""
        words = list(sys.argv[1:] if args is None else args)
        joined: list[str] = []
        while words:
            word = words.pop(0)
            flag = self._valued(word)
            negative = _NEGATIVE if flag in ("-o", "--time-offset") else (
                _NEGATIVE_RANGE if flag in _THRESHOLD_FLAGS else None)
            if negative is not None and words and negative.fullmatch(words[0]):
                # --warn=-1:1 for an abbreviation; -qw-1:1 for short flags run together.
                word = f"{word}{'=' if word.startswith('--') else ''}{words.pop(0)}"
            joined.append(word)
        return super().parse_args(joined, namespace)

    def _valued(self, word: str) -> str | None:
        """The option ``word`` ends with, when it takes the next word as its value as
        getopt would: a long option or its unambiguous abbreviation, or short flags run
        together (``-qw``) whose last takes a value; else None."""
        if word.startswith("--"):
            names = [n for n in self._option_string_actions
                     if n.startswith("--") and n.startswith(word)]
            return word if word in names else names[0] if len(names) == 1 else None
        if len(word) > 2 and word[0] == "-" and all(
                f"-{c}" in _BARE_FLAGS for c in word[1:-1]):
            return f"-{word[-1]}"
        return word


# check_ntp_peer's thresholds on other values than the offset: refused with a clear reason
# (taken with their value, so that the value is not read as the target).
_UNSUPPORTED = {"-W": "stratum", "-C": "stratum", "-j": "jitter", "-k": "jitter",
                "-m": "usable time sources", "-n": "usable time sources"}


def check_parser() -> argparse.ArgumentParser:
    """Flags of ``ntp-probe check``."""
    p = _Parser(prog="ntp-probe check",
                description="Run one probe and print one Nagios/Icinga plugin status line.",
                epilog="exit status: 0 OK, 1 WARNING, 2 CRITICAL (also when the probe fails), "
                "3 UNKNOWN (bad arguments or configuration; also after --help and --version, "
                "as the monitoring plugins).")
    p.add_argument("target", nargs="?", help="HOST, HOST:PORT, IP:PORT or [IPv6]:PORT")
    p.add_argument("-V", "--version", action="version", version=f"ntp-probe check {__version__}")
    # check_ntp_peer's spellings, so that an Icinga or Nagios command written for it works.
    # -H's variable yields to a target argument. -p has none: Kubernetes sets
    # NTP_PROBE_PORT=tcp://... in every pod of a namespace with a Service named ntp-probe.
    p.add_argument("-H", "--hostname", metavar="HOST",
                   help="the target, as check_ntp_peer takes it (instead of the argument) "
                   f"[env {HOSTNAME_ENV}]")
    p.add_argument("-p", "--port", metavar="PORT", help="the target's port")
    flags.flag(p, "--timeout", None, "-t", type=flags.positive_float, metavar="SECONDS",
               help="the whole run's time budget, start-up included, as check_ntp_time's "
               "alarm (default: the module's timeout)")
    p.add_argument("-o", "--time-offset", type=_seconds, default=0.0,
                   metavar="SECONDS", help="check_ntp_time's: added to the offset before -w "
                   "and -c judge it (a server known to be 1 s behind: -o 1)")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="UNKNOWN instead of CRITICAL when the server answered without an "
                   "offset to judge (check_ntp_time's: no answer at all stays CRITICAL)")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="accepted for check_ntp_time's commands: the one status line says all")
    family = p.add_mutually_exclusive_group()
    family.add_argument("-4", "--use-ipv4", dest="family", action="store_const", const="ip4",
                        help="IPv4 only (a name's IPv6 addresses are not tried)")
    family.add_argument("-6", "--use-ipv6", dest="family", action="store_const", const="ip6",
                        help="IPv6 only (a name's IPv4 addresses are not tried)")
    flags.flag(p, "--module", "ntp", help="module name")
    flags.flag(p, "--warning", None, "-w", type=threshold_range, metavar="RANGE",
               help=f"WARNING when |offset| is outside this Nagios range: N (0:N, |offset| "
               "above N), N: , ~:N, A:B, or @A:B (inside); seconds or durations (default "
               f"{DEFAULT_WARNING:g}; with only a -c at or below that bounding it from "
               "above, N, ~:N or A:N with A <= 0, a fifth of -c)")
    flags.flag(p, "--critical", None, "-c", type=threshold_range, metavar="RANGE",
               help=f"CRITICAL when |offset| is outside this Nagios range (as -w; default "
               f"{DEFAULT_CRITICAL:g}; with only a -w at or above that bounding it from "
               "above, five times -w)")
    flags.flag(p, "--config.file", None, dest="config_file", metavar="FILE",
               help="modules file (default: the packaged modules)")
    for spelling, what in _UNSUPPORTED.items():
        p.add_argument(spelling, dest=f"unsupported_{spelling[1]}", metavar="THRESHOLD",
                       help=f"check_ntp_peer's {what} threshold: not supported (UNKNOWN)")
    return p


def _seconds(text: str) -> float:
    """A finite number of seconds, negative allowed (an expected offset)."""
    return flags.number(text, float)


@dataclasses.dataclass(frozen=True, slots=True)
class Range:
    """A threshold in the Nagios plugin guidelines' range format: a value outside
    [start, end] alerts, or one inside it with ``@``."""

    start: float
    end: float
    inside: bool = False

    @classmethod
    def upto(cls, end: float) -> Range:
        """The plain threshold N: the range 0:N."""
        return cls(0.0, end)

    @property
    def plain(self) -> bool:
        """Whether it is a plain N (0:N)."""
        return self.start == 0 and not self.inside and math.isfinite(self.end)

    @property
    def upper_bound(self) -> bool:
        """Whether, on an absolute value, it only bounds it from above as a plain N does
        (``~:N``, ``-1:N``)."""
        return self.start <= 0 and not self.inside and math.isfinite(self.end)

    def alerts(self, value: float) -> bool:
        """Whether ``value`` reaches this threshold."""
        within = self.start <= value <= self.end
        return within if self.inside else not within

    def __str__(self) -> str:
        """As the perfdata carries it: a plain N as the number, others as a range."""
        if self.plain:
            return _threshold_number(self.end)
        start = "~" if self.start == -math.inf else _threshold_number(self.start)
        end = "" if self.end == math.inf else _threshold_number(self.end)
        return f"{'@' if self.inside else ''}{start}:{end}"


def _threshold_number(value: float) -> str:
    """Six decimals, as the monitoring plugins print thresholds; where six would print
    another threshold than the one applied (``-c 0.0000004``), every digit it has, never
    in exponent form (perfdata has none)."""
    text = f"{value:.6f}"
    return text if float(text) == value else format(Decimal(repr(value)), "f")


def threshold_range(text: str) -> Range:
    """``-w`` / ``-c``: a Nagios range (``N``, ``N:``, ``~:N``, ``A:B``, ``@A:B``), each
    bound in seconds or a duration; an empty bound is 0 before the colon, infinity after."""
    body = text.strip()
    inside = body.startswith("@")
    body = body.removeprefix("@")
    if ":" in body:
        low, _, high = body.partition(":")
        start = -math.inf if low == "~" else flags.seconds(low) if low else 0.0
        end = flags.seconds(high) if high else math.inf
    else:
        start, end = 0.0, flags.seconds(body)
    if start > end:
        raise argparse.ArgumentTypeError(f"range {text!r} starts above its end")
    return Range(start, end, inside)


def thresholds(args: argparse.Namespace) -> tuple[Range, Range]:
    """(warning, critical) from -w and -c. With one threshold given alone that bounds the
    offset from above (N, ~:N), the other keeps its default unless that would put it on
    the wrong side: then it keeps the defaults' ratio to the one given, so that both
    states stay reachable (``-w 0.1`` alone: -c 0.5). Any two given are taken as they
    are, as check_ntp_time takes them (CRITICAL is judged first)."""
    warning: Range | None = args.warning
    critical: Range | None = args.critical
    # In decimal: a float product would show (``-c 1e-10``: 2.0000000000000002e-11).
    ratio = Decimal(repr(DEFAULT_CRITICAL)) / Decimal(repr(DEFAULT_WARNING))
    if warning is None and critical is None:
        return Range.upto(DEFAULT_WARNING), Range.upto(DEFAULT_CRITICAL)
    if warning is None:
        assert critical is not None
        if critical.upper_bound and critical.end <= DEFAULT_WARNING:
            return Range.upto(float(Decimal(repr(critical.end)) / ratio)), critical
        return Range.upto(DEFAULT_WARNING), critical
    if critical is None:
        if warning.upper_bound and warning.end >= DEFAULT_CRITICAL:
            return warning, Range.upto(float(Decimal(repr(warning.end)) * ratio))
        return warning, Range.upto(DEFAULT_CRITICAL)
    return warning, critical


def _unsupported(args: argparse.Namespace) -> None:
    for spelling, what in _UNSUPPORTED.items():
        if getattr(args, f"unsupported_{spelling[1]}") is not None:
            raise Unknown(f"{spelling} ({what} threshold of check_ntp_peer) is not supported: "
                          "ntp-probe check judges the offset (-w, -c); the other values are "
                          "in its perfdata")


def _with_family(module: Module, family: str | None) -> Module:
    """``module`` restricted to one address family (-4, -6): each settings block that
    chooses a family prefers ``family`` and does not fall back to the other."""
    if family is None:
        return module
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(module):
        block = getattr(module, f.name)
        if (dataclasses.is_dataclass(block) and not isinstance(block, type)
                and hasattr(block, "preferred_ip_protocol")):
            changes[f.name] = dataclasses.replace(
                block, preferred_ip_protocol=family, ip_protocol_fallback=False)
    return dataclasses.replace(module, **changes)


def _family_fits(family: str | None, target: Target) -> None:
    """-4 or -6 with an address of the other family: UNKNOWN, as check_ntp_time cannot
    look such an address up either."""
    if family is None:
        return
    for host in target.hosts():  # a group's members too
        try:
            address = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:  # a name: the module's lookup keeps to the family
            continue
        if (address.version == 4) != (family == "ip4"):
            raise Unknown(f"-{family[2]} given, but {host} is an IPv{address.version} "
                          "address")


def _target_text(args: argparse.Namespace) -> str:
    """The target as the arguments give it: the argument or -H (or its variable, which a
    target argument overrides), with -p's port."""
    if args.target and args.hostname:
        raise Unknown("give the target once: as the argument or with -H")
    text = args.target or args.hostname or os.environ.get(HOSTNAME_ENV) or None
    if not text:
        raise Unknown("required: target (as the argument, or -H HOST)")
    if args.port is None:
        return str(text)
    if "," in text:
        raise Unknown(f"-p {args.port} names one port, and {text!r} is a list of servers: "
                      "give each member its port")
    try:
        target = parse_target(text)
    except TargetError as exc:
        raise Unknown(str(exc)) from None
    if target.port is not None:
        raise Unknown(f"the target {text!r} names a port already: -p {args.port} too")
    return f"{Target(target.host)}:{args.port}"  # checked with the target (1-65535)


# Past this a value is a server's nonsense (an ntpd reporting offset=1e308): left out of
# the perfdata (its U, "could not be determined", is more than Icinga 2 and many graphers
# parse), shown in %g in the status line, not in 300 digits.
_ABSURD = 1e12


def _number(value: float) -> str:
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def _offset_text(value: float) -> str:
    return f"{value:+.6f}" if abs(value) < _ABSURD else f"{value:+.6g}"


def _perf(item: Perf, warning: Range | None = None, critical: Range | None = None) -> str:
    label = item.label if item.label.replace("_", "").isalnum() else f"'{item.label}'"
    out = f"{label}={_number(item.value)}{item.unit}"
    if warning is not None and critical is not None:
        out += f";{warning};{critical}"
    return out


def _perfdata(m: Measurement, warning: Range, critical: Range, added: float = 0.0) -> str:
    checked = _judged(m)
    judged = None if checked is None else _judged_offset(checked, added)
    items = []
    for report in m.reports:
        for item in report.perfdata():
            if item.checked and report is checked and judged is not None:
                item = dataclasses.replace(item, value=judged + added)  # as judged
                if abs(item.value) < _ABSURD:
                    items.append(_perf(item, warning, critical))
            elif abs(item.value) < _ABSURD:  # NaN not
                items.append(_perf(item))
    items.append(_perf(Perf("time", m.duration, "s")))
    return " ".join(items)


def _judged_offset(report: Report, added: float) -> float | None:
    """The offset (as measured) -w and -c judge once ``added`` (-o) is added: of several
    (all_addresses'), the one farthest off after the addition."""
    if isinstance(report, SeveralOffsets):
        return report.farthest(added)
    return report.check_offset


def _judged(m: Measurement) -> Report | None:
    """The report whose offset -w and -c judge: the last that has one (a summary over
    the others, such as all_addresses', comes after them)."""
    return next((r for r in reversed(m.reports) if r.check_offset is not None), None)


def _text(text: str) -> str:
    """A status line's text: one line, and no '|', which would start the perfdata
    (a target or module name must not be able to inject values)."""
    return visible(" ".join(text.split())).replace("|", "/")


def _why_no_offset(m: Measurement) -> str:
    unsynchronised = [r.title for r in m.reports
                      if any(p.label == "synchronised" and p.value == 0 for p in r.perfdata())]
    return f": {unsynchronised[0]} clock unsynchronised" if unsynchronised else ""


# Failures that mean the server did not answer at all: CRITICAL even with -q (a KE server
# that completes no TLS session, a chronyd whose socket is not there, answer nothing).
_NO_ANSWER = frozenset({Reason.TIMEOUT, Reason.UNREACHABLE, Reason.MODE6_TIMEOUT,
                        Reason.CHRONY_TIMEOUT, Reason.CHRONY_SOCKET, Reason.NTS_KE_CONNECT,
                        Reason.NTS_KE_TLS, Reason.LOCAL_ERROR})


# Failures of a module's own checks against the local clock or leap file: the server's
# offset stands, and -q spares none of them (CRITICAL, as the module says).
_OFFSET_STANDS = frozenset({Reason.OFFSET_EXCEEDED, Reason.CAUSALITY_VIOLATION,
                            Reason.LEAP_MISMATCH})

# The servers of a probe over several (a group's members, a name's addresses): whether
# each is up, and why each failed.
_PARTS = (("probe_ntp_group_member_up", "probe_ntp_group_member_failure_info"),
          ("probe_ntp_address_up", "probe_ntp_address_failure_info"))


def _no_answer(m: Measurement) -> bool:
    """Whether the probe failed because nothing answered: its reason says so, or, over
    several servers (a group, a name's addresses), none of them answered (check_ntp_time
    polls every address of a name and says "No response" only when none did)."""
    for up, failed in _PARTS:
        parts = sum(1 for f, _, _ in m.samples if f.name == up)
        if parts:
            failures = [labels[1] for f, labels, _ in m.samples if f.name == failed]
            return len(failures) == parts and all(r in _NO_ANSWER for r in failures)
    return m.failure in _NO_ANSWER


def evaluate(target: str, module: Module, m: Measurement, warning: Range,
             critical: Range, *, expected: float = 0.0, quiet: bool = False) -> tuple[int, str]:
    """The plugin's state and status line for a finished probe; ``expected`` (-o) is
    added to the offset before it is judged, as check_ntp_time adds it (and shows the sum
    in the perfdata); ``quiet`` makes a failure UNKNOWN (-q)."""
    perfdata = _perfdata(m, warning, critical, expected)
    judged = _judged(m)
    offset = None if judged is None else _judged_offset(judged, expected)
    unknown_offset = UNKNOWN if quiet else CRITICAL
    if not m.success:
        # -q spares a server that answered without an offset to judge; one that did not
        # answer stays CRITICAL, as in check_ntp_time ("No response") and check_ntp_peer,
        # and so does an offset found that only the module's own check failed
        # (check_ntp_time's -q spares only an offset it could not find).
        state = CRITICAL if _no_answer(m) or (
            m.failure in _OFFSET_STANDS and offset is not None) else unknown_offset
        summary = f"{target} probe failed: {m.failure}"
        if m.failure_detail:
            summary += f" ({m.failure_detail})"
    elif offset is None:
        # As check_ntp_peer: an offset that cannot be judged is no OK (an ntpd whose
        # variables lack it).
        state, summary = unknown_offset, (f"{target} probe succeeded but gave no offset to "
                                          f"judge (module {module.name}){_why_no_offset(m)}")
    else:
        # Beyond the threshold, not at it: a plain -w N is the Nagios range 0:N.
        off = abs(offset + expected)
        state = CRITICAL if critical.alerts(off) else WARNING if warning.alerts(off) else OK
        summary = f"{target} offset {_offset_text(offset)} s (module {module.name})"
        if expected:
            summary += f", {_offset_text(offset + expected)} s with -o {expected:+.6f} s added"
    line = f"NTP {_STATES[state]}: {_text(summary)}"
    return state, f"{line} | {perfdata}" if perfdata else line


async def check(args: argparse.Namespace, config: Config,
                spent: float = 0.0) -> tuple[int, str]:
    """Run the probe the arguments describe; (exit code, status line). ``spent``: seconds
    of the time budget the process used before (its start-up)."""
    module = config.modules.get(args.module)
    if module is None:
        raise Unknown(f"unknown module {args.module!r} (known: {', '.join(config.modules)})")
    _unsupported(args)
    warning, critical = thresholds(args)
    module = _with_family(module, args.family)
    try:
        target = resolve_target(config, module, _target_text(args))
    except TargetError as exc:
        raise Unknown(str(exc)) from None
    _family_fits(args.family, target)
    timeout = module.timeout if args.timeout is None else args.timeout
    # -t bounds the whole run, as check_ntp_time's alarm does (a scheduler whose own
    # timeout equals it would kill the plugin): the start-up and the line's printing too.
    timeout = max(timeout - spent - _PRINT_MARGIN, _PRINT_MARGIN)
    m, _ = await run_probe(target, module, timeout, guard=guard_for(config, module))
    return evaluate(str(target), module, m, warning, critical, expected=args.time_offset,
                    quiet=args.quiet)


def main(argv: Sequence[str], before: Sequence[str] = ()) -> int:
    """``ntp-probe check``: print one status line, return the plugin's exit code.
    ``before``: the flags given before the command (only --config.file is one of check's)."""
    other = next((f for f in before if f != "--config.file"), None)
    if other is not None:  # else its value would read as the target
        return _emit(UNKNOWN, f"NTP UNKNOWN: check takes only --config.file before the "
                              f"command, not {other} (a plugin logs errors only)")
    args = check_parser().parse_args(argv)
    try:
        try:
            config = load_config(args.config_file)
        except ConfigError as exc:
            raise Unknown(f"invalid configuration: {str(exc).splitlines()[0]}") from None
        code, line = asyncio.run(check(args, config, spent=_spent()))
    except Unknown as exc:
        code, line = UNKNOWN, f"NTP UNKNOWN: {_text(str(exc))}"
    except Exception as exc:  # a plugin must answer UNKNOWN, never a traceback
        why = f"internal error: {type(exc).__name__}: {exc}"
        code, line = UNKNOWN, f"NTP UNKNOWN: {_text(why)}"
    return _emit(code, line)


_PRINT_MARGIN = 0.05  # seconds kept for the verdict and its line after the probe


def _spent() -> float:
    """Seconds since this process started (0 where /proc cannot say)."""
    try:
        with open("/proc/self/stat", encoding="ascii") as stat:
            # Field 22, starttime, in clock ticks after boot; the name (2) may hold spaces.
            started = int(stat.read().rsplit(")", 1)[1].split()[19])
        ticks = os.sysconf("SC_CLK_TCK")
        return max(time.clock_gettime(time.CLOCK_BOOTTIME) - started / ticks, 0.0)
    except (OSError, ValueError, IndexError, AttributeError):
        return 0.0


def _emit(code: int, line: str) -> int:
    """Print the status line; ``code``, or UNKNOWN when it cannot be written (stdout
    closed, a broken pipe, a full disk): never a traceback, which Nagios reads as WARNING."""
    return code if output.write(line + "\n") else UNKNOWN
