"""Flags and their NTP_PROBE_* variables: defaults shown, errors that name what was wrong."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from ntp_probe.cli.check import check_parser
from ntp_probe.cli.main import (
    DEFAULT_LISTEN,
    command_first,
    listen_addresses,
    main,
    probe_parser,
    serve_parser,
)
from ntp_probe.cli.serve import listening_hosts, parse_listen, unrestricted
from ntp_probe.config.load import parse_config


def test_an_invalid_environment_variable_is_named(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NTP_PROBE_HISTORY_LIMIT", "abc")
    with pytest.raises(SystemExit) as exit_:
        serve_parser().parse_args([])
    assert exit_.value.code == 1  # the exporter's start-up errors are 1, as kingpin's
    err = capsys.readouterr().err
    assert "environment variable NTP_PROBE_HISTORY_LIMIT='abc': expected an integer" in err
    assert "_non_negative_int" not in err


def test_an_invalid_choice_from_the_environment_is_named(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("NTP_PROBE_LOG_LEVEL", "loud")
    with pytest.raises(SystemExit):
        serve_parser().parse_args([])
    assert "NTP_PROBE_LOG_LEVEL='loud': expected one of debug" in capsys.readouterr().err


def test_environment_values_are_used_and_flags_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NTP_PROBE_HISTORY_LIMIT", "7")
    assert serve_parser().parse_args([]).history_limit == 7
    assert serve_parser().parse_args(["--history.limit=9"]).history_limit == 9


def test_an_empty_variable_counts_as_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    # As kingpin reads it (blackbox, node_exporter): `Environment=NTP_PROBE_X=` in a unit.
    for name in ("NTP_PROBE_HISTORY_LIMIT", "NTP_PROBE_CONFIG_FILE", "NTP_PROBE_LOG_LEVEL",
                 "NTP_PROBE_TIMEOUT_OFFSET"):
        monkeypatch.setenv(name, "")
    args = serve_parser().parse_args([])
    assert (args.history_limit, args.config_file, args.log_level, args.timeout_offset) == (
        100, None, "info", 0.5)


@pytest.mark.parametrize("bad", ["nan", "inf", "-1", "x", "-1s", "1e400s", "2 s", "s", "1e300",
                                 "367d"])
def test_seconds_flags_must_be_finite(bad: str) -> None:
    with pytest.raises(SystemExit):
        serve_parser().parse_args([f"--timeout-offset={bad}"])


@pytest.mark.parametrize(("flag", "dest"), [
    ("--timeout-offset", "timeout_offset"), ("--web.read-header-timeout", "header_timeout"),
    ("--web.idle-timeout", "idle_timeout")])
@pytest.mark.parametrize(("text", "value"), [("0.25", 0.25), ("250ms", 0.25), ("2s", 2.0),
                                             ("1m30s", 90.0)])
def test_seconds_flags_take_numbers_and_durations(flag: str, dest: str, text: str,
                                                  value: float) -> None:
    # blackbox's --timeout-offset is a number of seconds; kingpin's duration flags and
    # Prometheus' configs spell seconds as durations: both mean the same here.
    assert getattr(serve_parser().parse_args([flag, text]), dest) == value


def test_help_shows_defaults_and_variables() -> None:
    text = serve_parser().format_help()
    for needle in ("(default: :9559)", "(default: 100)", "(default: 512)",
                   "NTP_PROBE_WEB_MAX_CONNECTIONS"):
        assert needle in " ".join(text.split()), needle


def test_probe_help_lists_the_modules_and_exit_codes() -> None:
    text = probe_parser().format_help()
    for name in ("ntp", "ntp_fast", "local", "kernel", "hybrid"):
        assert f"\n  {name} " in text
    assert "exit status: 0 the probe succeeded, 1 it failed" in text


@pytest.mark.parametrize(("host", "text", "warned"), [
    (None, "modules:\n  m: {}\n", True),
    ("0.0.0.0", "modules:\n  m: {}\n", True),
    ("::", "modules:\n  m: {}\n  n: {allowed_targets: [192.0.2.0/24]}\n", True),
    ("127.0.0.1", "modules:\n  m: {}\n", False),
    (None, "allowed_targets: [192.0.2.0/24]\nmodules:\n  m: {}\n", False),
    (None, "modules:\n  m: {allowed_targets: [ntp.example]}\n", False),
])
def test_listening_everywhere_without_allowed_targets_is_warned_about(
        host: str | None, text: str, warned: bool) -> None:
    assert unrestricted(host, parse_config(text, "t")) is warned


def test_systemd_sockets_are_judged_by_where_they_are_bound(tmp_path: Path) -> None:
    # The shipped unit's ListenStream=9559 is every address: the open-door warning must
    # come under socket activation too. Bound, never listening: nothing is exposed here.
    config = parse_config("modules:\n  m: {}\n", "t")
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as everywhere, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as loopback, \
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        everywhere.bind(("::", 0))
        loopback.bind(("127.0.0.1", 0))
        unix.bind(str(tmp_path / "s"))
        assert listening_hosts([loopback, unix], [(None, 9559)]) == ["127.0.0.1"]
        hosts = listening_hosts([loopback, everywhere, unix], [])
        assert hosts == ["127.0.0.1", "::"]
        assert any(unrestricted(host, config) for host in hosts)
    assert listening_hosts([], [(None, 9559), ("127.0.0.1", 9559)]) == [None, "127.0.0.1"]


@pytest.mark.parametrize(("env", "want"), [
    (None, [DEFAULT_LISTEN]),
    ("", [DEFAULT_LISTEN]),  # set but empty: the default, not no listener at all
    (" , ", [DEFAULT_LISTEN]),
    ("127.0.0.1:1, [::1]:2", ["127.0.0.1:1", "[::1]:2"]),
])
def test_listen_addresses_from_the_variable(monkeypatch: pytest.MonkeyPatch, env: str | None,
                                            want: list[str]) -> None:
    if env is None:
        monkeypatch.delenv("NTP_PROBE_WEB_LISTEN_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("NTP_PROBE_WEB_LISTEN_ADDRESS", env)
    assert listen_addresses(None) == want
    assert listen_addresses([":1"]) == [":1"]  # a flag wins


@pytest.mark.parametrize(("address", "parsed"), [
    (":9559", (None, 9559)),
    # Wildcards of either family are every address, as Go listens on them (dual stack).
    ("0.0.0.0:9559", (None, 9559)),
    ("[::1]:9559", ("::1", 9559)),
    ("[::]:0", (None, 0)),
    ("[::0]:9559", (None, 9559)), ("[0:0:0:0:0:0:0:0]:9559", (None, 9559)),
    ("localhost:80", ("localhost", 80)),
])
def test_listen_addresses(address: str, parsed: tuple[str | None, int]) -> None:
    assert parse_listen(address) == parsed


@pytest.mark.parametrize("address", [
    "9559", "[::1:9559", "::1]:9559", "::1:9559", "[]:9559", "host:", "host:65536",
    "host:\u0663", "host:+80", "host:000009559",
])
def test_bad_listen_addresses(address: str) -> None:
    with pytest.raises(ValueError, match="invalid listen address"):
        parse_listen(address)


def test_a_count_too_large_to_be_meant_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        serve_parser().parse_args(["--history.limit", "99999999999999999999"])
    assert "must be at most 1000000000" in capsys.readouterr().err


def test_a_flag_given_overrides_its_invalid_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NTP_PROBE_TIMEOUT_OFFSET", "abc")
    assert serve_parser().parse_args(["--timeout-offset", "1"]).timeout_offset == 1.0
    assert serve_parser().parse_args(["--timeout-offset=2"]).timeout_offset == 2.0
    with pytest.raises(SystemExit):
        serve_parser().parse_args([])  # without the flag, the variable is the value: refused


@pytest.mark.parametrize("argv", [["-w0.02"], ["-w", "0.02"], ["--warn=0.02"],
                                  ["--warning", "0.02"], ["--w=0.02"]])
def test_every_spelling_of_a_given_flag_overrides_its_invalid_variable(
        monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    monkeypatch.setenv("NTP_PROBE_WARNING", "bad")
    assert check_parser().parse_args(["127.0.0.1", *argv]).warning.end == 0.02


@pytest.mark.parametrize(("argv", "field", "value"), [
    # getopt takes the next word as the value of an option that needs one, a negative
    # number included, however the option is spelled.
    (["--warn", "-1:1"], "warning", -1.0), (["--crit", "-0.5:1"], "critical", -0.5),
    (["--time-o", "-0.5"], "time_offset", -0.5), (["-qw", "-1:1"], "warning", -1.0),
    (["-4c", "-1:1"], "critical", -1.0), (["-vo", "-0.5"], "time_offset", -0.5),
])
def test_check_takes_a_negative_value_after_any_spelling_of_its_flag(
        argv: list[str], field: str, value: float) -> None:
    got = getattr(check_parser().parse_args(["127.0.0.1", *argv]), field)
    assert (got if field == "time_offset" else got.start) == value


@pytest.mark.parametrize("argv", [["--config.chec"], ["--log.l", "info"],
                                  ["--web.listen", "127.0.0.1:1"], ["--history", "3"]])
def test_the_exporter_refuses_abbreviated_flags(argv: list[str],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    # As kingpin does: a typo is an error, and a flag added later cannot change what an
    # abbreviation in a unit file means.
    with pytest.raises(SystemExit) as exit_:
        serve_parser().parse_args(argv)
    assert exit_.value.code == 1
    assert "unrecognized arguments" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        probe_parser().parse_args(["127.0.0.1", "--modul", "ntp"])


def test_kingpins_negated_boolean_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    # A flag on the command line wins over its variable, also an invalid one.
    monkeypatch.setenv("NTP_PROBE_CONFIG_CHECK", "bogus")
    assert serve_parser().parse_args(["--no-config.check"]).config_check is False
    monkeypatch.setenv("NTP_PROBE_CONFIG_CHECK", "true")
    assert serve_parser().parse_args([]).config_check is True
    args = serve_parser().parse_args(["--no-config.check", "--no-web.systemd-socket"])
    assert (args.config_check, args.systemd_socket) == (False, False)
    assert serve_parser().parse_args(["--web.systemd-socket"]).systemd_socket is True


def test_an_empty_web_config_flag_is_no_web_config(capsys: pytest.CaptureFixture[str]) -> None:
    # exporter-toolkit's default is "": a unit's --web.config.file=${VAR} with VAR unset.
    assert main(["--config.check", "--web.config.file="]) == 0
    assert "configuration OK" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "run"), [
    (["--config.file", "m.yaml", "probe", "t"], ["probe", "--config.file", "m.yaml", "t"]),
    (["--log.level=debug", "--config.file=m.yaml", "check", "-H", "h"],
     ["check", "--log.level=debug", "--config.file=m.yaml", "-H", "h"]),
    (["--log.format", "json", "serve"], ["serve", "--log.format", "json"]),
    # Only the shared flags move with it; anything else before a command stays an error.
    (["--web.listen-address", ":1", "probe", "t"], ["--web.listen-address", ":1", "probe", "t"]),
    (["--config.file", "probe"], ["--config.file", "probe"]),  # a file named probe
    (["--config.file", "probe", "check"], ["check", "--config.file", "probe"]),
    (["probe", "--config.file", "m.yaml", "t"], ["probe", "--config.file", "m.yaml", "t"]),
])
def test_the_shared_flags_may_come_before_the_command(argv: list[str], run: list[str]) -> None:
    assert command_first(argv) == run


@pytest.mark.parametrize("flag", [["--log.level", "debug"], ["--log.format=json"]])
def test_a_log_flag_before_check_is_named_not_taken_for_the_target(
        flag: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # check logs errors only: its value read as the target, and the real target was
    # called an unrecognised argument.
    assert main([*flag, "check", "192.0.2.1:123", "--module", "ntp_fast"]) == 3
    line = capsys.readouterr().out
    assert line.startswith("NTP UNKNOWN: check takes only --config.file before the command, "
                           f"not {flag[0].split('=')[0]}"), line


def test_a_probe_with_its_config_file_named_first_runs_as_a_probe(tmp_path: Path) -> None:
    # A configuration error is 2 for probe (1 for the exporter): the command ran.
    (tmp_path / "bad.yaml").write_text("modules: [\n")
    assert main(["--config.file", str(tmp_path / "bad.yaml"), "probe", "127.0.0.1"]) == 2
    assert main(["--config.file", str(tmp_path / "bad.yaml")]) == 1
