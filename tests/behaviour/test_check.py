"""``ntp-probe check``: the Nagios/Icinga plugin's states, status line and perfdata."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ntp_probe.cli import check
from ntp_probe.cli import probe as probe_cli
from ntp_probe.cli.main import main
from ntp_probe.config.load import parse_config
from ntp_probe.config.schema import Config
from ntp_probe.engine.result import Measurement, Perf
from ntp_probe.net import adjtimex
from ntp_probe.proto import timex
from tests.behaviour import fake_server
from tests.behaviour.fake_server import FakeNTPServer, Send, answer, kod
from tests.conftest import Hosts, free_udp_port, stop_process

fake_ntp = fake_server.fake_ntp

CONFIG = parse_config(
    "modules:\n  one:\n    timeout: 2s\n    ntp:\n      samples: 1\n"
    "      preferred_ip_protocol: ip4\n      reply_timeout: 500ms\n", "test")
# label=value[UOM][;warn;crit[;min;max]] (the plugin development guidelines)
PERF_RE = re.compile(r"^[a-z_]+=-?[0-9.]+(s|%|c)?(;[0-9.]*){0,4}$")


async def run(target: str, *extra: str, config: Config = CONFIG) -> tuple[int, str]:
    args = check.check_parser().parse_args([target, "--module", "one", *extra])
    return await check.check(args, config)


async def test_the_probe_cli_reports_the_backoff_a_kiss_of_death_starts(
        fake_ntp: FakeNTPServer, capsys: pytest.CaptureFixture[str]) -> None:
    # As /probe does: the CLI's one-off probe has a KoD memory of its own, so its output
    # has probe_ntp_backoff_remaining_seconds (the README: the same series as /probe).
    fake_ntp.behaviour = lambda req: [Send(kod(req, b"DENY"))]
    args = argparse.Namespace(module="one", target=fake_ntp.target, output_format="prometheus")
    assert await probe_cli.probe(args, CONFIG) == 1
    out = capsys.readouterr().out
    assert "probe_ntp_backoff_remaining_seconds 86400" in out, out
    assert 'probe_ntp_kiss_code_info{code="DENY"} 1' in out, out


def split(line: str) -> tuple[str, list[str]]:
    status, _, perf = line.partition(" | ")
    return status, perf.split()


@pytest.mark.parametrize(("offset", "state", "code"), [
    (0.0, "OK", 0), (0.02, "WARNING", 1), (-0.02, "WARNING", 1), (0.2, "CRITICAL", 2),
])
async def test_the_offset_against_the_thresholds(fake_ntp: FakeNTPServer, offset: float,
                                                 state: str, code: int) -> None:
    fake_ntp.behaviour = answer(offset=offset)
    got, line = await run(fake_ntp.target)
    status, perf = split(line)
    assert got == code, line
    assert status.startswith(f"NTP {state}: {fake_ntp.target} offset ")
    assert "\n" not in line
    assert all(PERF_RE.match(p) for p in perf), perf
    offset_perf = next(p for p in perf if p.startswith("offset="))
    assert offset_perf.endswith("s;0.010000;0.050000")
    assert float(offset_perf.split("=")[1].split("s")[0]) == pytest.approx(offset, abs=0.005)
    assert any(p.startswith("stratum=") for p in perf) and any(p.startswith("delay=")
                                                               for p in perf)


async def test_thresholds_can_be_set(fake_ntp: FakeNTPServer) -> None:
    fake_ntp.behaviour = answer(offset=0.02)
    code, line = await run(fake_ntp.target, "-w", "0.1", "-c", "0.5")
    assert code == 0, line
    assert "offset=" in line and ";0.100000;0.500000" in line


@pytest.mark.parametrize(("given", "offset", "code", "perf"), [
    # One threshold alone is judged with, as check_ntp_time does; the other keeps its
    # default, or the defaults' ratio (5) to the one given where the default would be on
    # the wrong side: both states stay reachable.
    (["-c", "0.005"], 0.0, 0, ";0.001000;0.005000"),
    (["-c", "0.005"], 0.003, 1, ";0.001000;0.005000"),
    (["-c", "0.005"], 0.02, 2, ";0.001000;0.005000"),
    (["-c", "0.5"], 0.02, 1, ";0.010000;0.500000"),
    (["-w", "0.1"], 0.02, 0, ";0.100000;0.500000"),
    (["-w", "0.1"], 0.2, 1, ";0.100000;0.500000"),
    (["-w", "0.1"], 0.7, 2, ";0.100000;0.500000"),
    (["-w", "0.001"], 0.02, 1, ";0.001000;0.050000"),
    (["-w", "0.02"], 0.07, 2, ";0.020000;0.050000"),  # -c keeps its default
    (["-c", "0.03"], 0.02, 1, ";0.010000;0.030000"),  # -w keeps its default
    # A range that only bounds |offset| from above is one threshold as a plain N is.
    (["-w", "~:0.1"], 0.2, 1, ";~:0.100000;0.500000"),
    (["-w", "-0.1:0.1"], 0.2, 1, ";-0.100000:0.100000;0.500000"),
])
async def test_one_threshold_alone(fake_ntp: FakeNTPServer, given: list[str], offset: float,
                                   code: int, perf: str) -> None:
    fake_ntp.behaviour = answer(offset=offset)
    got, line = await run(fake_ntp.target, *given)
    assert got == code and perf in line, line


@pytest.mark.parametrize(("given", "shown"), [
    # Derived in decimal: a float product printed 0.35000000000000003 and
    # 0.000000000020000000000000002 (every digit, so as to show what is applied).
    ({"warning": "0.07"}, ("0.070000", "0.350000")),
    ({"critical": "1e-10"}, ("0.00000000002", "0.0000000001")),
])
def test_a_derived_threshold_is_the_decimal_it_reads_as(given: dict[str, str],
                                                       shown: tuple[str, str]) -> None:
    args: dict[str, check.Range | None] = {"warning": None, "critical": None}
    args.update({k: check.threshold_range(v) for k, v in given.items()})
    warning, critical = check.thresholds(argparse.Namespace(**args))
    assert (str(warning), str(critical)) == shown


async def test_check_ntp_time_address_family_flags(fake_ntp: FakeNTPServer,
                                                   hosts: Hosts) -> None:
    fake_ntp.behaviour = answer(offset=0.0)
    hosts("127.0.0.1 four.test\n")
    target = f"four.test:{fake_ntp.port}"
    code, line = await run(target, "-4")
    assert code == 0, line
    # -6 allows no IPv4 address, not even through the fallback the module would take.
    code, line = await run(target, "-6")
    assert code == 2 and "probe failed: resolve (no address for 'four.test' (ip6: " in line, line
    assert len(fake_ntp.requests) == 1
    # An address of the other family cannot be probed with it either.
    with pytest.raises(check.Unknown, match=r"^-6 given, but 127\.0\.0\.1 is an IPv4 address$"):
        await run(fake_ntp.target, "-6")
    with pytest.raises(check.Unknown, match="::1 is an IPv6 address"):
        await run(f"[::1]:{fake_ntp.port}", "-4")
    assert len(fake_ntp.requests) == 1


async def test_a_failed_probe_is_critical_with_its_reason(fake_ntp: FakeNTPServer) -> None:
    fake_ntp.behaviour = answer(leap=3)
    code, line = await run(fake_ntp.target)
    assert code == 2
    assert line.startswith(f"NTP CRITICAL: {fake_ntp.target} probe failed: leap_unsynchronized")


async def test_check_ntp_peers_host_port_and_timeout_flags(fake_ntp: FakeNTPServer) -> None:
    # An Icinga or Nagios command written for check_ntp_peer (-H HOST -p PORT -t SECONDS)
    # works as it is.
    fake_ntp.behaviour = answer(offset=0.0)
    args = check.check_parser().parse_args(["-H", fake_ntp.host, "-p", str(fake_ntp.port),
                                            "--module", "one", "-t", "5"])
    code, line = await check.check(args, CONFIG)
    assert code == 0 and line.startswith(f"NTP OK: {fake_ntp.target} offset "), line
    # An IPv6 address takes the port in brackets, as the target does.
    assert check._target_text(check.check_parser().parse_args(
        ["-H", "::1", "-p", "4123"])) == "[::1]:4123"
    # -t is the probe's budget: a server that never answers is given up on after it, not
    # after the module's 2 s (the probe's own duration, in the perfdata, says which).
    fake_ntp.behaviour = lambda req: []
    args = check.check_parser().parse_args([fake_ntp.target, "--module", "one",
                                            "-t", "0.3"])
    code, line = await check.check(args, CONFIG)
    assert code == 2 and "probe failed: timeout" in line, line
    duration = float(next(p for p in split(line)[1] if p.startswith("time="))[5:-1])
    assert duration <= 0.3, line


def exit_code(argv: list[str]) -> int:
    """main()'s exit code, whether it returns it or argparse raises it."""
    try:
        return main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)


def test_the_timeout_bounds_the_whole_run_start_up_included(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # check_ntp_time's -t is an alarm over its whole run: the process's start-up (0.8 s
    # here, as if a loaded host took that long to import) comes out of the probe's budget.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # never answers
        silent.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        monkeypatch.setattr(check, "_spent", lambda: 0.8)
        assert exit_code(["check", target, "-t", "1"]) == 2
    line = capsys.readouterr().out
    assert "probe failed: timeout" in line, line
    duration = float(next(p for p in split(line)[1] if p.startswith("time="))[5:-1])
    assert duration <= 0.25, line  # 1 - 0.8 - the margin for printing, not 1 s


async def test_the_console_script_leaves_a_check_as_soon_as_its_line_is_out(
        fake_ntp: FakeNTPServer) -> None:
    # The interpreter's teardown would take up to a tenth of a second more of -t: a check
    # exits right after its line (an atexit hook stands in for the teardown).
    fake_ntp.behaviour = answer(offset=0.0)
    script = ("import atexit, sys\n"
              "atexit.register(lambda: print('teardown', flush=True))\n"
              "from ntp_probe.cli.entry import console\n"
              "sys.argv = ['ntp-probe', *sys.argv[1:]]\n"
              "console()\n")
    argv = [fake_ntp.target, "--module", "ntp_fast", "-4"]
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", script, "check", *argv], capture_output=True,
        text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and done.stdout.startswith("NTP OK: "), done
    assert "teardown" not in done.stdout, done.stdout
    # Any other command ends as usual.
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", script, "probe", *argv[:3]],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("teardown"), done


def test_the_start_up_time_is_read_from_the_process() -> None:
    spent = check._spent()
    assert 0.0 < spent < time.clock_gettime(time.CLOCK_BOOTTIME)


@pytest.mark.parametrize(("argv", "why"), [
    (["check", "127.0.0.1", "--module", "nope"], "unknown module 'nope' (known: ntp"),
    (["check", "127.0.0.1", "-w", "0.2:0.1"], "range '0.2:0.1' starts above its end"),
    (["check", "127.0.0.1", "-c", "@"], "expected seconds or a duration"),
    (["check", "127.0.0.1", "-w", "soon"], "expected seconds or a duration"),
    (["check", "0x7f.1"], "non-standard form"),
    (["check"], "required: target"),
    (["check", "127.0.0.1", "-H", "127.0.0.2"], "give the target once"),
    (["check", "-H", "127.0.0.1:123", "-p", "123"], "names a port already: -p 123 too"),
    (["check", "-H", "[::1]:123", "-p", "123"], "names a port already"),
    (["check", "-H", "127.0.0.1,127.0.0.2", "-p", "123", "--module", "group"],
     "-p 123 names one port, and '127.0.0.1,127.0.0.2' is a list of servers"),
    (["check", "-H", "127.0.0.1", "-p", "99999"], "port '99999' is not 1-65535"),
    (["check", "-H", "127.0.0.1", "-t", "0"], "-t"),
])
def test_bad_arguments_are_unknown(argv: list[str], why: str,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(argv) == 3
    out = capsys.readouterr().out
    assert out.startswith("NTP UNKNOWN: ") and why in out and out.count("\n") == 1, out


@pytest.mark.parametrize(("argv", "says"), [
    (["check", "--help"], "usage: ntp-probe check"), (["check", "-V"], "ntp-probe check 0."),
    (["check", "--version"], "ntp-probe check 0.")])
def test_help_and_version_exit_unknown_as_plugins_do(argv: list[str], says: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(argv) == 3
    assert capsys.readouterr().out.startswith(says)


@pytest.mark.parametrize("flag", ["-W", "-C", "-j", "-k", "-m", "-n"])
def test_check_ntp_peers_other_thresholds_are_refused_clearly(
        flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Taken with their value: "3" is not read as the target.
    assert exit_code(["check", "-H", "127.0.0.1", "-p", "9", flag, "3"]) == 3
    out = capsys.readouterr().out
    assert out.startswith(f"NTP UNKNOWN: {flag} (") and "not supported" in out, out


async def test_host_and_timeout_come_from_variables_too(
        fake_ntp: FakeNTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_ntp.behaviour = lambda req: []
    monkeypatch.setenv("NTP_PROBE_HOSTNAME", "192.0.2.1")  # a target argument wins over it
    # What Kubernetes sets in every pod of a namespace with a Service named ntp-probe: -p
    # has no variable, so it is no port.
    monkeypatch.setenv("NTP_PROBE_PORT", "tcp://10.96.0.12:9559")
    monkeypatch.setenv("NTP_PROBE_TIMEOUT", "0.2")
    args = check.check_parser().parse_args([fake_ntp.target, "--module", "one"])
    code, line = await check.check(args, CONFIG)
    assert code == 2 and f"{fake_ntp.target} probe failed: timeout" in line, line
    duration = float(next(p for p in split(line)[1] if p.startswith("time="))[5:-1])
    assert duration <= 0.2, line
    # With no argument, the variable names the target.
    monkeypatch.setenv("NTP_PROBE_HOSTNAME", fake_ntp.target)
    args = check.check_parser().parse_args(["--module", "one"])
    code, line = await check.check(args, CONFIG)
    assert code == 2 and f"{fake_ntp.target} probe failed: timeout" in line, line


@pytest.mark.parametrize(("extra", "offset", "code", "says"), [
    # check_ntp_time's -o is added to the offset before -w and -c judge it (its
    # offset = calc_offset(...) + time_offset): a server 0.2 s ahead is OK with -o -0.2.
    # (Thresholds of 50 and 200 ms: the fake server's own noise under load stays far
    # below them.)
    (["-o", "-0.2"], 0.2, 0, "+0.000"),
    (["-o", "0.2"], 0.2, 2, "+0.400"),
    (["-o", "-0.1", "-v"], 0.2, 1, "+0.100"),
    (["-o", "0.2"], -0.2, 0, "+0.000"),  # 0.2 s behind
])
async def test_check_ntp_times_time_offset(fake_ntp: FakeNTPServer, extra: list[str],
                                           offset: float, code: int, says: str) -> None:
    fake_ntp.behaviour = answer(offset=offset)
    got, line = await run(fake_ntp.target, "-w", "0.05", "-c", "0.2", *extra)
    assert got == code, line
    status, perfdata = split(line)
    raw = float(status.split(" offset ")[1].split()[0])
    added = re.search(r", ([+-][0-9.]+) s with -o ", status)
    assert added is not None, line
    # Near 0 the sum's sign is the measurement's noise: compared as numbers.
    assert raw == pytest.approx(offset, abs=0.005), line
    assert float(added.group(1)) == pytest.approx(float(says), abs=0.005), line
    # The perfdata holds the value judged, as check_ntp_time's does.
    judged = float(next(p for p in perfdata if p.startswith("offset="))[7:].split("s;")[0])
    assert judged == pytest.approx(float(says), abs=0.005), line


async def test_quiet_makes_a_failure_unknown(fake_ntp: FakeNTPServer) -> None:
    # check_ntp_time's -q: UNKNOWN rather than CRITICAL when no offset can be had.
    fake_ntp.behaviour = answer(leap=3)
    code, line = await run(fake_ntp.target, "-q")
    assert code == 3 and "probe failed: leap_unsynchronized" in line, line
    code, line = await run(fake_ntp.target)
    assert code == 2, line
    # An offset that only the module's own check failed is no offset that could not be
    # found: -q leaves it CRITICAL, within -c too (check_ntp_time never says UNKNOWN for
    # an offset it found).
    fake_ntp.behaviour = answer(offset=2.0)
    strict = parse_config("modules:\n  s:\n    prober: ntp\n"
                          "    ntp: {samples: 1, fail_if_offset_exceeds: 10ms}\n", "test")
    code, line = await run(fake_ntp.target, "-q", "--module", "s", config=strict)
    assert code == 2 and "probe failed: offset_exceeded" in line, line
    code, line = await run(fake_ntp.target, "-q", "--module", "s", "-c", "3", config=strict)
    assert code == 2, line  # the module's verdict on an offset found: -q spares none of it
    # A server that does not answer at all stays CRITICAL, as check_ntp_time's "No
    # response from NTP server" does under -q: or a dead server would stop paging.
    fake_ntp.behaviour = fake_server.silent
    code, line = await run(fake_ntp.target, "-q", "-t", "0.3")
    assert code == 2 and "probe failed: timeout" in line, line
    code, line = await run(f"127.0.0.1:{free_udp_port()}", "-q")
    assert code == 2 and "probe failed: unreachable (ICMP port unreachable: " in line, line
    # Nor does a chronyd whose socket is not there, or a group none of whose members
    # answered (its reason, no_majority, is the group's; its members' say why).
    config = parse_config(
        "modules:\n  c:\n    prober: chrony\n    chrony: {socket: /nonexistent/chronyd.sock}\n"
        "  g:\n    prober: ntp_group\n    timeout: 2s\n"
        "    ntp: {samples: 1, reply_timeout: 200ms}\n", "test")
    args = check.check_parser().parse_args(["127.0.0.1", "--module", "c", "-q"])
    code, line = await check.check(args, config)
    assert code == 2 and "probe failed: chrony_socket" in line, line
    members = f"{fake_ntp.target},127.0.0.1:{free_udp_port()}"
    args = check.check_parser().parse_args([members, "--module", "g", "-q"])
    code, line = await check.check(args, config)
    assert code == 2 and "probe failed: no_majority" in line, line
    fake_ntp.behaviour = answer(leap=3)  # one member answers, unsynchronised: -q spares it
    code, line = await check.check(args, config)
    assert code == 3 and "probe failed: no_majority" in line, line


@pytest.mark.parametrize(("warning", "critical", "offset", "code", "perf"), [
    # The Nagios plugin guidelines' ranges, judged on |offset| as check_ntp_time does.
    ("~:0.5", "~:1", 0.02, 0, ";~:0.500000;~:1.000000"),
    ("-1:1", "-2:2", 0.02, 0, ";-1.000000:1.000000;-2.000000:2.000000"),
    ("@0:0.5", "1", 0.02, 1, ";@0.000000:0.500000;1.000000"),  # alert inside
    ("10:", "20:", 0.02, 2, ";10.000000:;20.000000:"),  # |offset| below 20 s: critical
    ("0.001:0.1", "0:0.2", 0.02, 0, ";0.001000:0.100000;0.200000"),
    ("1", "0.5", 0.7, 2, ";1.000000;0.500000"),  # -w above -c: taken as given
    ("1", "0.5", 0.02, 0, ";1.000000;0.500000"),
    ("0", "0", 0.02, 2, ";0.000000;0.000000"),  # 0:0: any offset reaches it
    ("10ms", "~:50ms", 0.02, 1, ";0.010000;~:0.050000"),
])
async def test_threshold_ranges(fake_ntp: FakeNTPServer, warning: str, critical: str,
                                offset: float, code: int, perf: str) -> None:
    fake_ntp.behaviour = answer(offset=offset)
    got, line = await run(fake_ntp.target, "-w", warning, "-c", critical)
    assert got == code, line
    assert re.search(r" offset=[0-9.]+s" + re.escape(perf) + "( |$)", line), line


def test_a_threshold_finer_than_six_decimals_is_printed_as_applied() -> None:
    m = Measurement()
    m.reports.append(Judged(0.000003))
    got, line = check.evaluate("t", CONFIG.modules["one"], m, check.Range.upto(2e-7),
                               check.Range.upto(1e-6))
    assert got == 2 and "offset=0.000003s;0.0000002;0.000001 " in line, line
    got, line = check.evaluate("t", CONFIG.modules["one"], m, check.Range.upto(1e-12),
                               check.Range(1e-10, math.inf))
    assert "offset=0.000003s;0.000000000001;0.0000000001: " in line, line  # never "0."


async def test_minus_4_and_6_apply_to_a_groups_members(fake_ntp: FakeNTPServer) -> None:
    config = parse_config("modules:\n  g:\n    prober: ntp_group\n    timeout: 2s\n"
                          "    ntp: {samples: 1, reply_timeout: 500ms}\n", "test")
    members = f"{fake_ntp.target},127.0.0.2:{fake_ntp.port}"
    args = check.check_parser().parse_args([members, "--module", "g", "-6"])
    with pytest.raises(check.Unknown, match=r"^-6 given, but 127\.0\.0\.1 is an IPv4 address$"):
        await check.check(args, config)
    assert not fake_ntp.requests


def test_flags_come_from_ntp_probe_variables_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # As for the other subcommands (the docker-compose and systemd examples set them).
    path = tmp_path / "modules.yaml"
    path.write_text("modules:\n  mine: {}\n")
    monkeypatch.setenv("NTP_PROBE_CONFIG_FILE", str(path))
    monkeypatch.setenv("NTP_PROBE_MODULE", "nope")
    assert exit_code(["check", "127.0.0.1"]) == 3
    assert "unknown module 'nope' (known: mine)" in capsys.readouterr().out
    monkeypatch.setenv("NTP_PROBE_WARNING", "soon")
    assert exit_code(["check", "127.0.0.1"]) == 3
    out = capsys.readouterr().out
    assert out.startswith("NTP UNKNOWN: environment variable NTP_PROBE_WARNING='soon'"), out


def test_a_bad_config_file_is_unknown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "modules.yaml"
    path.write_text("modules:\n  m:\n    prober: nope\n")
    assert exit_code(["check", "127.0.0.1", "--config.file", str(path)]) == 3
    assert capsys.readouterr().out.startswith("NTP UNKNOWN: invalid configuration: ")


def test_input_cannot_start_the_perfdata(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    # Nagios splits the line at its first '|': text from the command line or the config
    # must not inject values there.
    assert exit_code(["check", "a|offset=99s b"]) == 3
    out = capsys.readouterr().out
    assert out.startswith("NTP UNKNOWN: ") and "|" not in out, out
    path = tmp_path / "modules.yaml"
    path.write_text("modules:\n  'x|offset=9s':\n    prober: kernel\n")
    exit_code(["check", "localhost", "--config.file", str(path), "--module", "x|offset=9s"])
    out = capsys.readouterr().out
    assert out.count("|") == 1 and "(module x/offset=9s)" in out, out


def kernel_clock(*, status: int, return_code: int, offset: float = 0.0002) -> timex.KernelClock:
    """A kernel clock state this machine's own cannot be put in (nothing may discipline it
    here): synchronised or not, as a time daemon leaves it."""
    return timex.KernelClock(offset=offset, frequency_ratio=1e-6, maxerror=0.01,
                             esterror=0.001, status=status, constant=7, precision=1e-9,
                             tolerance_ratio=5e-4, tick=0.01, tai=37, return_code=return_code)


def test_the_thresholds_go_with_the_value_they_judge(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # The kernel module judges a synchronised kernel's offset: its perfdata carries -w, -c.
    clock = kernel_clock(status=0x0001 | timex.STA_NANO, return_code=0)  # PLL, TIME_OK
    monkeypatch.setattr(adjtimex, "read", lambda: clock)
    assert exit_code(["check", "localhost", "--module", "kernel", "-w", "0.0001",
                      "-c", "1"]) == 1
    status, perf = split(capsys.readouterr().out.strip())
    assert status == "NTP WARNING: localhost offset +0.000200 s (module kernel)"
    assert "kernel_offset=0.0002s;0.000100;1.000000" in perf, perf
    assert not any(";" in p for p in perf if not p.startswith("kernel_offset="))


def test_an_unsynchronised_kernel_has_no_offset_to_judge(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # STA_UNSYNC or TIME_ERROR: nothing disciplines the clock, its offset says nothing.
    for status, code in ((timex.STA_UNSYNC, 0), (0x0001, timex.TIME_ERROR)):
        clock = kernel_clock(status=status, return_code=code, offset=0.0)
        monkeypatch.setattr(adjtimex, "read", lambda c=clock: c)
        assert exit_code(["check", "localhost", "--module", "kernel"]) == 2
        status_line, perf = split(capsys.readouterr().out.strip())
        assert status_line == ("NTP CRITICAL: localhost probe succeeded but gave no offset to "
                               "judge (module kernel): kernel clock unsynchronised")
        assert "synchronised=0" in perf and "kernel_offset=0s" in perf, perf


async def test_hybrid_judges_the_servers_offset_not_the_kernels(fake_ntp: FakeNTPServer) -> None:
    # The kernel's offset is 0 under chrony or on any undisciplined kernel: judged, every
    # hybrid check would be OK however far the server is.
    fake_ntp.behaviour = answer(offset=0.2)
    config = parse_config(
        "modules:\n  one:\n    timeout: 2s\n    ntp:\n      samples: 1\n"
        "      preferred_ip_protocol: ip4\n      reply_timeout: 500ms\n"
        "      kernel_correlation: true\n", "test")
    code, line = await run(fake_ntp.target, config=config)
    status, perf = split(line)
    # The server's offset (0.2 s give or take the exchange's few microseconds) is judged.
    assert code == 2 and status.startswith(f"NTP CRITICAL: {fake_ntp.target} offset +0."), line
    offset_perf = next(p for p in perf if p.startswith("offset="))
    assert offset_perf.endswith(";0.010000;0.050000"), perf
    assert float(offset_perf[7:].split("s")[0]) == pytest.approx(0.2, abs=0.005), perf
    assert any(re.fullmatch(r"kernel_offset=-?[0-9.]+s", p) for p in perf), perf


@dataclass(frozen=True)
class Judged:
    """A report whose offset is exactly what the test says."""

    check_offset: float
    title: str = "fixed"

    def rows(self) -> list[tuple[str, str]]:
        return []

    def to_json(self) -> dict[str, Any]:
        return {}

    def perfdata(self) -> list[Perf]:
        return [Perf("offset", self.check_offset, "s", checked=True)]


@pytest.mark.parametrize(("offset", "state"), [
    (0.01, 0), (-0.01, 0), (0.0100001, 1), (0.05, 1), (-0.0500001, 2)])
def test_an_offset_at_a_threshold_has_not_reached_it(offset: float, state: int) -> None:
    # A plain -w N is the Nagios range 0:N (check_ntp_time's reading): N itself is inside.
    m = Measurement()
    m.reports.append(Judged(offset))
    got, line = check.evaluate("t", CONFIG.modules["one"], m, check.Range.upto(0.01),
                               check.Range.upto(0.05))
    assert got == state, line


@pytest.mark.parametrize("absurd", [1e308, -1e300, math.inf])
def test_a_servers_absurd_offset_is_no_line_of_hundreds_of_digits(absurd: float) -> None:
    # An ntpd reporting offset=1e308: CRITICAL, shown in %g, and no perfdata for it (its
    # U, "could not be determined", Icinga 2 does not parse), not 300 digits.
    m = Measurement()
    m.reports.append(Judged(absurd))
    got, line = check.evaluate("t", CONFIG.modules["one"], m, check.Range.upto(0.01),
                               check.Range.upto(0.05))
    assert got == 2 and len(line) < 200, line
    assert f"t offset {absurd:+.6g} s" in line and "offset=" not in line.split("|")[1], line


def test_a_success_with_no_offset_to_judge_is_critical() -> None:
    # An ntpd whose system variables lack the offset: as check_ntp_peer, no OK for what
    # cannot be judged.
    m = Measurement()
    got, line = check.evaluate("t", CONFIG.modules["one"], m, check.Range.upto(0.01),
                               check.Range.upto(0.05))
    assert m.success
    assert (got, line) == (2, "NTP CRITICAL: t probe succeeded but gave no offset to judge "
                              "(module one) | time=0s")


def run_unwritable(argv: list[str], stdout: str) -> subprocess.CompletedProcess[bytes]:
    """``python -m ntp_probe ARGV`` with a standard output that cannot be written: closed,
    /dev/full, or a pipe nobody reads; checks that no traceback was printed."""
    command = [sys.executable, "-m", "ntp_probe", *argv]
    if stdout == "closed":
        done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              preexec_fn=lambda: os.close(1), timeout=60)
    elif stdout == "full":
        with open("/dev/full", "wb") as full:
            done = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, timeout=60)
    else:
        read, write = os.pipe()
        os.close(read)
        try:
            done = subprocess.run(command, stdout=write, stderr=subprocess.PIPE, timeout=60)
        finally:
            os.close(write)
    assert b"Traceback" not in done.stderr and b"Exception ignored" not in done.stderr, (
        done.stderr)
    return done


# (--help with no stdout at all goes to stderr, as argparse does: not a failure.)
@pytest.mark.parametrize(("stdout", "argv"), [
    ("closed", ["0x7f.1"]), ("full", ["0x7f.1"]), ("broken pipe", ["0x7f.1"]),
    ("full", ["--help"]), ("broken pipe", ["--help"]),
])
def test_a_status_line_that_cannot_be_written_is_unknown_without_a_traceback(
        stdout: str, argv: list[str]) -> None:
    done = run_unwritable(["check", *argv], stdout)
    # argparse itself ignores a failed write of --help from Python 3.11.4 on (exit 0).
    assert done.returncode == 3 or (argv == ["--help"] and done.returncode == 0), done.stderr


@pytest.mark.parametrize("argv", [["--help"], ["probe", "--help"], ["--version"],
                                  ["--config.check"], ["probe", "0.0.0.0"]])
@pytest.mark.parametrize("stdout", ["full", "broken pipe"])
def test_every_command_fails_quietly_when_stdout_cannot_be_written(
        stdout: str, argv: list[str]) -> None:
    done = run_unwritable(argv, stdout)
    # argparse itself ignores a failed write of --help/--version from Python 3.11.4 on.
    assert done.returncode == 1 or (argv[-1].startswith("--") and done.returncode == 0), (
        done.returncode, done.stderr)


def test_output_cut_short_by_a_reader_that_leaves_is_a_failure() -> None:
    # More than a pipe holds (64 KiB), to a reader that stops after 1,000 bytes (| head):
    # the buffered writer reported such a write as done, and the command exited 0.
    code = ("import sys\nfrom ntp_probe.cli import output\n"
            "sys.exit(0 if output.write('x' * 300_000) else 1)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and len(proc.stdout.read(1000)) == 1000
        proc.stdout.close()
        assert proc.wait(timeout=60) == 1
        assert proc.stderr is not None and proc.stderr.read() == b""
    finally:
        stop_process(proc)


def test_output_to_a_full_non_blocking_pipe_waits_for_room() -> None:
    # A parent that set O_NONBLOCK on the pipe (some CI runners do): a full pipe is no
    # failure, the rest goes once the reader catches up.
    code = ("import sys\nfrom ntp_probe.cli import output\n"
            "sys.exit(0 if output.write('x' * 300_000) else 1)\n")
    read, write = os.pipe()
    os.set_blocking(write, False)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=write, stderr=subprocess.PIPE)
    os.close(write)
    try:
        got = 0
        with os.fdopen(read, "rb") as reader:
            while chunk := reader.read(65536):
                got += len(chunk)
        assert proc.wait(timeout=60) == 0 and got == 300_000
    finally:
        stop_process(proc)
