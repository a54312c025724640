"""Operating the real ``ntp-probe`` process: SIGHUP reload, log formats, systemd notify.

Every exporter started here is stopped by its PID (``stop_process``) in a ``finally``.
Probes go only to the session's chronyd on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Chronyd, free_tcp_port, free_udp_port, stop_process
from tests.integration.test_exporter import (
    Exporter,
    child_env,
    exporter_command,
    one,
    parse_exposition,
    start_exporter,
)

pytestmark = pytest.mark.integration

DEADLINE = 10.0
# The one bounded wait for an absence: no WATCHDOG=1 when WATCHDOG_PID names another
# process. With WATCHDOG_USEC=200000 a ping would come every 0.1 s, five in this window.
ABSENCE_WINDOW = 0.5


def modules(*names: str) -> str:
    return "modules:\n" + "".join(
        f"  {name}:\n    timeout: 2s\n    ntp:\n      samples: 1\n"
        f"      preferred_ip_protocol: ip4\n"
        for name in names
    )


def wait_for(condition: Callable[[], bool], what: str, e: Exporter) -> None:
    """Poll ``condition`` until it holds; fail with the exporter's log after DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if e.proc.poll() is not None:
            pytest.fail(f"exporter exited ({e.proc.returncode}) waiting for {what}:\n{e.log()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {DEADLINE} s\n{e.log()}")
        time.sleep(0.02)  # poll interval, bounded by the deadline


def reload_successful(e: Exporter) -> float:
    _, _, body = e.get("/metrics")
    return one(parse_exposition(body), "ntp_probe_config_last_reload_successful")


def probe_success(e: Exporter, target: str, module: str) -> tuple[int, float | None]:
    status, _, body = e.get(f"/probe?target={target}&module={module}")
    if status != 200:
        return status, None
    return status, one(parse_exposition(body), "probe_success")


# --- SIGHUP ----------------------------------------------------------------------------


def test_sighup_reload_good_then_bad(tmp_path: Path, chronyd: Chronyd) -> None:
    config = tmp_path / "modules.yaml"
    config.write_text(modules("first"))
    e = start_exporter(tmp_path, (f"--config.file={config}",))
    try:
        assert probe_success(e, chronyd.target, "first") == (200, 1)

        config.write_text(modules("second", "third"))
        e.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "second:" in e.get("/config")[2], "reload after SIGHUP", e)
        assert probe_success(e, chronyd.target, "second") == (200, 1)
        assert probe_success(e, chronyd.target, "first")[0] == 400
        _, _, body = e.get("/metrics")
        samples = parse_exposition(body)
        assert one(samples, "ntp_probe_config_last_reload_successful") == 1
        assert one(samples, "ntp_probe_modules_configured") == 2

        config.write_text(modules("fourth").replace("samples: 1", "sampels: 1"))
        e.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: reload_successful(e) == 0, "failed reload reported on /metrics", e)
        assert e.proc.poll() is None
        # The old configuration keeps serving.
        assert probe_success(e, chronyd.target, "second") == (200, 1)
        assert probe_success(e, chronyd.target, "fourth")[0] == 400
        _, _, body = e.get("/metrics")
        assert one(parse_exposition(body), "ntp_probe_modules_configured") == 2
        failed = [line for line in e.log().splitlines() if "reload failed" in line]
        assert len(failed) == 1, e.log()
        assert "level=error" in failed[0]
        assert "modules.fourth.ntp.sampels" in failed[0]

        # Fixing the file and signalling again recovers.
        config.write_text(modules("fourth"))
        e.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: reload_successful(e) == 1, "recovery after a good reload", e)
        assert probe_success(e, chronyd.target, "fourth") == (200, 1)
    finally:
        stop_process(e.proc)


def test_a_sighup_storm_is_a_few_reloads_and_no_traceback(tmp_path: Path) -> None:
    config = tmp_path / "modules.yaml"
    config.write_text(modules("first"))
    e = start_exporter(tmp_path, (f"--config.file={config}",))
    try:
        config.write_text(modules("last"))
        sent, until = 0, time.monotonic() + 2.0  # bounded: 2 s or 200,000 signals
        while time.monotonic() < until and sent < 200_000:
            os.kill(e.proc.pid, signal.SIGHUP)
            sent += 1
        # The file as it was after the storm is loaded, and the exporter still answers.
        wait_for(lambda: "last:" in e.get("/config")[2], "the reload after the storm", e)
        assert e.get("/-/healthy")[0] == 200
        log = e.log()
        assert "Traceback" not in log and "Exception ignored" not in log, log[-2000:]
        reloads = log.count("reloaded 1 module from")
        assert 1 <= reloads < sent, (reloads, sent)
    finally:
        stop_process(e.proc)


def test_a_sighup_after_sigterm_does_not_reload(tmp_path: Path) -> None:
    # Shutting down (probes in flight get their grace), a SIGHUP from logrotate or a
    # config tool must not start loading the files again.
    config = tmp_path / "modules.yaml"
    config.write_text(modules("first"))
    e = start_exporter(tmp_path, (f"--config.file={config}",))
    try:
        e.proc.send_signal(signal.SIGTERM)
        e.proc.send_signal(signal.SIGHUP)
        assert e.proc.wait(timeout=DEADLINE) == 0, e.log()
    finally:
        stop_process(e.proc)
    log = e.log()
    assert "shutting down" in log and "reloaded" not in log, log


# The real console entry point, with a SIGHUP sent to itself as soon as it can note one:
# before it imports the rest (the probers, aiohttp) and reads the files.
EARLY_HANGUP = """\
import os, signal, sys
from ntp_probe.cli import entry

class Noted(entry.EarlyHangup):
    def __init__(self):
        super().__init__()
        os.kill(os.getpid(), signal.SIGHUP)

entry.EarlyHangup = Noted
sys.argv[0] = "ntp-probe"
entry.console()
"""

# The real console entry point, interrupted (Ctrl-C) while it imports the command line.
INTERRUPTED_LOADING = """\
import sys
from ntp_probe.cli import entry

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "ntp_probe.cli.main":
            raise KeyboardInterrupt

sys.meta_path.insert(0, Interrupt())
entry.console()
"""


@pytest.mark.parametrize("command", ["probe", "check", "serve"])
def test_ctrl_c_while_loading_is_one_line(command: str) -> None:
    done = subprocess.run([sys.executable, "-c", INTERRUPTED_LOADING, command, "127.0.0.1"],
                          capture_output=True, text=True, timeout=30,
                          stdin=subprocess.DEVNULL, env=child_env())
    assert "Traceback" not in done.stderr, done.stderr
    if command == "check":  # a plugin's status line, whatever happens
        assert (done.returncode, done.stdout) == (3, "NTP UNKNOWN: interrupted\n"), done
    else:
        assert (done.returncode, done.stderr) == (130, "ntp-probe: interrupted\n"), done


def test_a_sighup_during_start_up_is_a_reload_once_serving(tmp_path: Path) -> None:
    # A config tool or logrotate signalling an exporter that is still starting: the
    # default action would end it (exit 129). It reloads once it serves instead.
    config = tmp_path / "modules.yaml"
    config.write_text(modules("first"))
    script = tmp_path / "early_hangup.py"
    script.write_text(EARLY_HANGUP)
    e = start_exporter(tmp_path, (f"--config.file={config}",),
                       command=[sys.executable, str(script)])
    try:
        wait_for(lambda: "reloaded 1 module from" in e.log(), "the early SIGHUP's reload", e)
        assert e.get("/-/healthy")[0] == 200
    finally:
        stop_process(e.proc)


@pytest.mark.parametrize("command", ["probe", "check"])
def test_ctrl_c_during_a_probe_ends_it_in_one_line(command: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.settimeout(DEADLINE)
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        proc = subprocess.Popen([*exporter_command(), command, target, "--module", "ntp"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=child_env())
        try:
            silent.recv(512)  # the probe's first request: it is under way
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=DEADLINE)
        finally:
            stop_process(proc)
    assert b"Traceback" not in err, err
    if command == "probe":
        assert proc.returncode == 130 and err.endswith(b"ntp-probe: interrupted\n"), err
    else:  # a plugin prints its one status line whatever happens
        assert (proc.returncode, out) == (3, b"NTP UNKNOWN: interrupted\n"), (out, err)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_ending_a_chrony_socket_probe_leaves_no_socket_file(
        tmp_path: Path, signum: int) -> None:
    # timeout(1) or a plugin timeout's kill: the reply socket the probe bound beside
    # chronyd's must go, as chronyc removes its own.
    daemon = tmp_path / "chronyd.sock"
    config = tmp_path / "modules.yaml"
    config.write_text(f"modules:\n  c:\n    prober: chrony\n    timeout: 5s\n"
                      f"    chrony: {{socket: {daemon}}}\n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as silent:
        silent.bind(str(daemon))
        silent.settimeout(DEADLINE)
        proc = subprocess.Popen(
            [*exporter_command(), "probe", "localhost", "--module", "c",
             f"--config.file={config}"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, env=child_env())
        try:
            silent.recv(1024)  # the first request: its reply socket is bound
            assert len(list(tmp_path.iterdir())) == 3
            proc.send_signal(signum)
            _, err = proc.communicate(timeout=DEADLINE)
        finally:
            stop_process(proc)
    assert b"Traceback" not in err, err
    assert proc.returncode == 130 and err.endswith(b"ntp-probe: interrupted\n"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chronyd.sock", "modules.yaml"]


@pytest.mark.parametrize(("argv", "says"), [
    (["127.0.0.1", "--module", "nope"], "unknown module 'nope'"),
    (["0x7f.1"], "invalid target"),
])
def test_the_probe_commands_errors_follow_the_log_format(argv: list[str], says: str) -> None:
    done = subprocess.run([*exporter_command(), "probe", *argv, "--log.format", "json"],
                          capture_output=True, text=True, env=child_env(),
                          stdin=subprocess.DEVNULL, timeout=DEADLINE)
    assert done.returncode == 2, done
    records = [json.loads(line) for line in done.stderr.splitlines()]
    assert len(records) == 1 and says in records[0]["msg"], done.stderr


# --- log formats -----------------------------------------------------------------------


def _log_lines(e: Exporter, config: Path) -> list[str]:
    """Start-up, a failed reload (error) and shutdown: several levels and loggers."""
    config.write_text("modules: [\n")
    e.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "reload failed" in e.log(), "reload failure logged", e)
    e.proc.send_signal(signal.SIGTERM)
    assert e.proc.wait(timeout=DEADLINE) == 0, e.log()
    return [line for line in e.log().splitlines() if line.strip()]


def test_log_format_json(tmp_path: Path) -> None:
    config = tmp_path / "modules.yaml"
    config.write_text(modules("only"))
    e = start_exporter(tmp_path, (f"--config.file={config}", "--log.format", "json"))
    try:
        lines = _log_lines(e, config)
    finally:
        stop_process(e.proc)
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(isinstance(r, dict) for r in records)
    assert all({"ts", "level", "logger", "msg"} <= r.keys() for r in records), records
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["ts"]) for r in records)
    levels = {r["msg"].split(" ")[0]: r["level"] for r in records}
    assert levels.get("listening") == "info", records
    assert levels.get("reload") == "error", records
    assert levels.get("shutting") == "info", records


def test_log_format_logfmt(tmp_path: Path) -> None:
    config = tmp_path / "modules.yaml"
    config.write_text(modules("only"))
    e = start_exporter(tmp_path, (f"--config.file={config}", "--log.format", "logfmt"))
    try:
        lines = _log_lines(e, config)
    finally:
        stop_process(e.proc)
    pattern = re.compile(
        r'ts=\S+ level=(debug|info|warn|error) logger=\S+( target=\S+ module=\S+)? '
        r'msg=("(?:[^"\\]|\\.)*"|\S+)'
    )
    assert all(pattern.fullmatch(line) for line in lines), lines
    assert any(line.startswith("ts=") and " level=info " in line and "listening on" in line
               for line in lines)
    assert any(" level=error " in line and "reload failed" in line for line in lines)
    assert not any(line.startswith("{") for line in lines)


def probe_log_records(tmp_path: Path, *args: str) -> tuple[str, list[dict[str, Any]]]:
    """One probe of a silent port by an exporter logging JSON with ``args``: the target
    and the log records of the probe's own lines (logger ntp_probe.probe)."""
    config = tmp_path / "modules.yaml"
    config.write_text(modules("only"))
    e = start_exporter(tmp_path, (f"--config.file={config}", "--log.format", "json", *args))
    target = f"127.0.0.1:{free_udp_port()}"
    try:
        e.get(f"/probe?target={target}&module=only")
        wait_for(lambda: "verdict" in e.log(), "the probe's lines in the log", e)
    finally:
        stop_process(e.proc)
    records = [json.loads(line) for line in e.log().splitlines() if line.startswith("{")]
    return target, [r for r in records if r["logger"] == "ntp_probe.probe"]


def test_probe_logs_carry_target_and_module_as_fields(tmp_path: Path) -> None:
    target, probe_lines = probe_log_records(tmp_path, "--log.level", "debug")
    assert probe_lines
    assert all(r["target"] == target and r["module"] == "only" for r in probe_lines)
    assert not any("target=" in r["msg"] or "module=only" in r["msg"] for r in probe_lines
                   if not r["msg"].startswith("probe "))


def test_log_prober_sets_the_level_of_probe_lines(tmp_path: Path) -> None:
    # blackbox_exporter's --log.prober: at info, every probe's lines reach the log at the
    # default --log.level; the last probe (default debug) is not there.
    _, probe_lines = probe_log_records(tmp_path, "--log.prober", "info")
    assert probe_lines and all(r["level"] == "info" for r in probe_lines), probe_lines
    config = tmp_path / "modules.yaml"
    target = f"127.0.0.1:{free_udp_port()}"
    quiet = start_exporter(tmp_path, (f"--config.file={config}",))
    try:
        assert quiet.get(f"/probe?target={target}&module=only")[0] == 200
    finally:
        stop_process(quiet.proc)
    assert "verdict" not in quiet.log() and "logger=ntp_probe.probe" not in quiet.log()


# --- sd_notify -------------------------------------------------------------------------


class NotifySocket:
    """The systemd side of sd_notify: a bound AF_UNIX datagram socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.received: list[str] = []

    def close(self) -> None:
        self.sock.close()

    def until(self, condition: Callable[[list[str]], bool], what: str,
              e: Exporter, timeout: float = DEADLINE) -> list[str]:
        """Receive datagrams until ``condition(all received)`` holds; fail after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not condition(self.received):
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"{what}: got only {self.received} in {timeout} s\n{e.log()}")
            self.sock.settimeout(left)
            try:
                self.received.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
        return self.received

    def for_window(self, seconds: float) -> list[str]:
        """Everything that arrives within ``seconds`` (the one wait-for-absence)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                self.received.append(self.sock.recv(4096).decode())
            except TimeoutError:
                break
        return self.received

    def pending(self) -> list[str]:
        """Whatever is queued now, without waiting."""
        self.sock.setblocking(False)
        try:
            while True:
                self.received.append(self.sock.recv(4096).decode())
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)
        return self.received


@pytest.fixture
def notify_path(tmp_path: Path) -> Iterator[str]:
    path = tmp_path / "notify.sock"
    if len(str(path)) >= 100:  # sun_path is 108 bytes
        path = Path("/tmp") / f"ntpp-notify-{secrets.token_hex(6)}.sock"
    try:
        yield str(path)
    finally:
        path.unlink(missing_ok=True)


def watchdogs(messages: list[str]) -> int:
    return sum(m == "WATCHDOG=1" for m in messages)


def test_sd_notify_ready_watchdog_stopping(tmp_path: Path, notify_path: str) -> None:
    ns = NotifySocket(notify_path)
    try:
        e = start_exporter(tmp_path, env={"NOTIFY_SOCKET": notify_path,
                                          "WATCHDOG_USEC": "200000"})
        try:
            got = ns.until(lambda m: "READY=1" in m and watchdogs(m) >= 2,
                           "READY=1 then two WATCHDOG=1", e)
            assert got[0] == "READY=1", got
            assert set(got) == {"READY=1", "WATCHDOG=1"}, got
            e.proc.send_signal(signal.SIGTERM)
            ns.until(lambda m: "STOPPING=1" in m, "STOPPING=1 on SIGTERM", e)
            assert e.proc.wait(timeout=DEADLINE) == 0, e.log()
        finally:
            stop_process(e.proc)
        got = ns.pending()
        assert got.count("READY=1") == 1 and got.count("STOPPING=1") == 1, got
        # Nothing after STOPPING=1: the watchdog stops with the service.
        assert got[-1] == "STOPPING=1", got
    finally:
        ns.close()


def test_sd_notify_watchdog_for_another_pid_is_not_pinged(
    tmp_path: Path, notify_path: str
) -> None:
    ns = NotifySocket(notify_path)
    try:
        e = start_exporter(tmp_path, env={
            "NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "200000",
            "WATCHDOG_PID": str(os.getpid()),  # this test process, not the exporter
        })
        try:
            ns.until(lambda m: "READY=1" in m, "READY=1", e)
            got = ns.for_window(ABSENCE_WINDOW)
            assert watchdogs(got) == 0, got
            assert e.proc.poll() is None
        finally:
            stop_process(e.proc)
    finally:
        ns.close()


def test_sd_notify_abstract_socket(tmp_path: Path) -> None:
    name = f"ntpp-test-{secrets.token_hex(8)}"
    ns = NotifySocket("\0" + name)
    try:
        e = start_exporter(tmp_path, env={"NOTIFY_SOCKET": "@" + name,
                                          "WATCHDOG_USEC": "200000"})
        try:
            got = ns.until(lambda m: "READY=1" in m and watchdogs(m) >= 1,
                           "READY=1 and WATCHDOG=1 on an abstract socket", e)
            assert got[0] == "READY=1", got
            e.proc.send_signal(signal.SIGTERM)
            ns.until(lambda m: "STOPPING=1" in m, "STOPPING=1", e)
            assert e.proc.wait(timeout=DEADLINE) == 0
        finally:
            stop_process(e.proc)
        assert "sd_notify" not in e.log()  # no send failures were logged
    finally:
        ns.close()


def test_sd_notify_unreachable_socket_is_not_fatal(tmp_path: Path) -> None:
    missing = str(tmp_path / "nobody-listens.sock")
    e = start_exporter(tmp_path, env={"NOTIFY_SOCKET": missing})
    try:
        assert e.get("/-/healthy")[0] == 200
        wait_for(lambda: "sd_notify" in e.log(), "the failed notify logged", e)
        assert "level=warn" in e.log()
    finally:
        stop_process(e.proc)


# --- regressions and bugs ------------------------------------------------------------


def test_sighup_with_a_non_utf8_file_is_a_failed_reload(tmp_path: Path) -> None:
    """Regression: a file that is not UTF-8 made SIGHUP raise inside the signal callback
    (UnicodeDecodeError out of load_config): reload_successful stayed 1, no 'reload
    failed' line."""
    config = tmp_path / "modules.yaml"
    config.write_text(modules("first"))
    e = start_exporter(tmp_path, (f"--config.file={config}",))
    try:
        config.write_bytes("modules:\n  caf\xe9:\n    timeout: 2s\n".encode("latin-1"))
        e.proc.send_signal(signal.SIGHUP)
        # Whatever the reload did, it has been logged once the log mentions the file.
        wait_for(lambda: "reload failed" in e.log() or "Traceback" in e.log(),
                 "reload attempt logged", e)
        assert "Traceback" not in e.log()
        assert reload_successful(e) == 0, e.log()
        failed = next(line for line in e.log().splitlines() if "reload failed" in line)
        assert str(config) in failed and "UTF-8" in failed, failed
        assert probe_success(e, f"127.0.0.1:{free_udp_port()}", "first")[0] == 200  # still served
    finally:
        stop_process(e.proc)


def test_warnings_are_logged_as_level_warn(tmp_path: Path) -> None:
    e = start_exporter(tmp_path, env={"NOTIFY_SOCKET": str(tmp_path / "nobody.sock")})
    try:
        wait_for(lambda: "sd_notify" in e.log(), "the failed notify logged", e)
    finally:
        stop_process(e.proc)
    line = next(line for line in e.log().splitlines() if "sd_notify" in line)
    assert " level=warn " in line, line


def test_sighup_with_deep_nesting_is_one_line_and_a_failed_reload(tmp_path: Path) -> None:
    """Regression: 3000 nested lists raised RecursionError inside the SIGHUP callback (an
    unhandled error in the log, reload_successful left at 1)."""
    config = tmp_path / "modules.yaml"
    config.write_text(modules("first"))
    e = start_exporter(tmp_path, (f"--config.file={config}",))
    try:
        config.write_text("modules: " + "[" * 3000 + "]" * 3000 + "\n")
        e.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "reload failed" in e.log() or "Traceback" in e.log(),
                 "reload attempt logged", e)
        assert "Traceback" not in e.log() and "RecursionError" not in e.log()
        assert reload_successful(e) == 0, e.log()
    finally:
        stop_process(e.proc)


def test_sigterm_with_a_probe_in_flight_exits_promptly(tmp_path: Path) -> None:
    """A probe without the scrape header runs as long as its module allows (here 5
    minutes, against a port that never answers); SIGTERM must not wait for it."""
    config = tmp_path / "modules.yaml"
    config.write_text("modules:\n  long:\n    timeout: 5m\n    ntp:\n      samples: 1\n"
                      "      reply_timeout: 5m\n      preferred_ip_protocol: ip4\n")
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound: no ICMP error
    silent.bind(("127.0.0.1", 0))
    target = f"127.0.0.1:{silent.getsockname()[1]}"
    e = start_exporter(tmp_path, (f"--config.file={config}",))
    def scrape() -> None:
        with contextlib.suppress(OSError):  # the exporter closes it on the way out
            e.get(f"/probe?target={target}&module=long")

    client = threading.Thread(target=scrape, daemon=True)
    try:
        client.start()
        wait_for(lambda: ntp_probes_in_flight(e) == 1, "the probe in flight", e)
        e.proc.send_signal(signal.SIGTERM)
        assert e.proc.wait(timeout=DEADLINE) == 0, e.log()
        client.join(timeout=DEADLINE)
    finally:
        stop_process(e.proc)
        silent.close()


def ntp_probes_in_flight(e: Exporter) -> float:
    _, _, body = e.get("/metrics")
    return one(parse_exposition(body), "ntp_probe_probes_in_flight")


# Execs the exporter with the socket on fd 3 and LISTEN_PID set to its own pid, as systemd
# does for a socket-activated service (exec keeps the pid).
SOCKET_ACTIVATION = """
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = "1"
os.execv(sys.argv[2], sys.argv[2:])
"""


def test_systemd_socket_activation(tmp_path: Path) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1000)  # the unit's Backlog=
    port = listener.getsockname()[1]
    command = exporter_command()
    log_path = tmp_path / "exporter.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", SOCKET_ACTIVATION, str(listener.fileno()), *command,
             "--web.systemd-socket"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            pass_fds=(listener.fileno(),), env=child_env(),
        )
    listener.close()
    e = Exporter(proc, port, log_path)
    try:
        wait_for(lambda: e.get("/-/healthy")[0] == 200, "healthy on the inherited socket", e)
        assert f"listening on http://127.0.0.1:{port}" in e.log()
        # The socket listens with the unit's backlog, not one the exporter chose.
        ss = shutil.which("ss")
        if ss is not None:
            listing = subprocess.run([ss, "-Hlnt", f"sport = :{port}"], capture_output=True,
                                     text=True, timeout=30).stdout.split()
            assert listing[:3] == ["LISTEN", "0", "1000"], listing
    finally:
        stop_process(proc)


@pytest.mark.parametrize(("passed", "why"), [
    ("file", "Socket operation on non-socket"),
    ("udp", "not a stream socket"),
    ("unbound", "not bound to an address"),  # listen() would bind a random port everywhere
    ("unbound unix", "not bound to an address"),
])
def test_systemd_socket_that_cannot_serve_is_a_clear_error(tmp_path: Path, passed: str,
                                                           why: str) -> None:
    path = tmp_path / "not-a-socket"
    path.write_text("")
    with contextlib.ExitStack() as stack:
        if passed == "file":
            fd = stack.enter_context(open(path, "rb")).fileno()
        else:
            kind = socket.SOCK_DGRAM if passed == "udp" else socket.SOCK_STREAM
            family = socket.AF_UNIX if passed == "unbound unix" else socket.AF_INET
            sock = stack.enter_context(socket.socket(family, kind))
            if passed == "udp":
                sock.bind(("127.0.0.1", 0))
            fd = sock.fileno()
        done = subprocess.run(
            [sys.executable, "-c", SOCKET_ACTIVATION, str(fd), *exporter_command(),
             "--web.systemd-socket"],
            capture_output=True, stdin=subprocess.DEVNULL, pass_fds=(fd,),
            env=child_env(), timeout=30)
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert f"--web.systemd-socket: descriptor 3 from LISTEN_FDS: {why}" in err, err
    assert "Traceback" not in err


def test_connections_no_more_than_probes_is_warned_about(tmp_path: Path) -> None:
    e = start_exporter(tmp_path, ("--web.max-connections=8", "--probe.max-concurrent=8"))
    try:
        assert ("--web.max-connections=8 does not exceed --probe.max-concurrent=8: at most 7 "
                "probes in flight (more get 503)" in e.log()), e.log()
    finally:
        stop_process(e.proc)
    e = start_exporter(tmp_path, ("--web.max-connections=9", "--probe.max-concurrent=8"))
    try:
        assert "does not exceed" not in e.log(), e.log()
    finally:
        stop_process(e.proc)


def test_a_503_names_the_limit_the_exporter_applies(tmp_path: Path) -> None:
    # Held below the connections' cap, the limit is not the flag's value: the 503 says both.
    e = start_exporter(tmp_path, ("--web.max-connections=2", "--probe.max-concurrent=8"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{silent.getsockname()[1]}"

        def wait() -> None:
            with contextlib.suppress(OSError):  # cut off when the exporter stops
                e.get(f"/probe?target={target}&module=ntp")

        waiting = threading.Thread(target=wait)
        try:
            waiting.start()
            deadline = time.monotonic() + DEADLINE
            while "ntp_probe_probes_in_flight 1.0" not in e.get("/metrics")[2]:
                assert time.monotonic() < deadline, "the probe never started"
                time.sleep(0.02)  # poll interval, bounded by the deadline
            status, _, body = e.get(f"/probe?target={target}&module=ntp")
            assert status == 503, body
            assert body == ("too many probes in flight (1: --probe.max-concurrent=8, held "
                            "below --web.max-connections=2)\n")
        finally:
            stop_process(e.proc)
            waiting.join(timeout=DEADLINE)


def test_an_ipv6_wildcard_listen_address_serves_ipv4_too(tmp_path: Path) -> None:
    # As Go listens on [::] (dual stack): an IPv4 scraper of [::]:PORT is served.
    other = free_tcp_port()
    e = start_exporter(tmp_path, (f"--web.listen-address=[::]:{other}",))
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{other}/-/healthy", timeout=5) as resp:
            assert resp.status == 200
    finally:
        stop_process(e.proc)


def test_several_listen_addresses(tmp_path: Path) -> None:
    other = free_tcp_port()
    e = start_exporter(tmp_path, (f"--web.listen-address=[::1]:{other}",
                                  "--web.listen-address=127.0.0.2:0"))
    try:
        assert e.get("/-/healthy")[0] == 200  # the address start_exporter adds
        with urllib.request.urlopen(f"http://[::1]:{other}/-/healthy", timeout=5) as resp:
            assert resp.status == 200
        # The log names the port the kernel chose for :0, which serves.
        listening = next(line for line in e.log().splitlines() if "listening on" in line)
        assert f"http://[::1]:{other}" in listening, listening
        chosen = re.search(r"http://127\.0\.0\.2:(\d+)", listening)
        assert chosen is not None and chosen.group(1) != "0", listening
        with urllib.request.urlopen(f"http://127.0.0.2:{chosen.group(1)}/-/healthy",
                                    timeout=5) as resp:
            assert resp.status == 200
    finally:
        stop_process(e.proc)


def test_two_wildcards_on_one_port_are_refused_naming_the_second() -> None:
    # 0.0.0.0:P already listens on every address of both families (as Go's): [::]:P is the
    # same address again, and the bind error named the first, which had bound.
    port = free_tcp_port()
    done = subprocess.run(
        [*exporter_command(), f"--web.listen-address=0.0.0.0:{port}",
         f"--web.listen-address=[::]:{port}"],
        capture_output=True, stdin=subprocess.DEVNULL, env=child_env(), timeout=30)
    err = done.stderr.decode()
    assert done.returncode == 1, err
    assert (f"cannot listen on [::]:{port}: 0.0.0.0:{port} already listens on every address "
            "of both families on that port") in err, err
    assert "Traceback" not in err
