"""The shipped Icinga 2 CheckCommand (examples/icinga2/ntp-probe.conf), with Debian's
icinga2: its configuration validates, and a real Icinga runs ``ntp-probe check`` through it
against the session's chronyd and gets OK.

The daemon runs as the test's user, with every directory in the test's own, in a session
of its own whose process group is stopped at the end.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import Chronyd, require_binary
from tests.integration.test_exporter import exporter_command

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "icinga2" / "ntp-probe.conf"
DEADLINE = 20.0  # Icinga's start and its first check
PLUGIN_DIR = "/usr/lib/nagios/plugins"  # the Template Library's commands refer to it


def icinga(tmp: Path, body: str, *args: str) -> tuple[list[str], Path]:
    """The command line running icinga2 with ``body`` as its whole configuration, every
    directory in ``tmp`` and the test's user (not Debian's nagios)."""
    dirs = {name: tmp / name.lower() for name in ("DataDir", "CacheDir", "LogDir",
                                                  "SpoolDir", "InitRunDir")}
    for path in dirs.values():
        path.mkdir(exist_ok=True)
    # The example with this checkout's ntp-probe instead of /usr/local/bin's.
    command = ", ".join(f'"{word}"' for word in exporter_command())
    example = tmp / "ntp-probe.conf"
    example.write_text(EXAMPLE.read_text().replace('"/usr/local/bin/ntp-probe"', command))
    conf = tmp / "icinga2.conf"
    conf.write_text(f'const PluginDir = "{PLUGIN_DIR}"\ninclude <itl>\ninclude <plugins>\n'
                    f'include "{example}"\n{body}')
    user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    group = subprocess.run(["id", "-gn"], capture_output=True, text=True).stdout.strip()
    argv = [require_binary("icinga2"), "daemon", *args, "-c", str(conf),
            *(f"-D{name}={path}" for name, path in dirs.items()),
            f"-DRunAsUser={user}", f"-DRunAsGroup={group}"]
    return argv, dirs["LogDir"]


def test_the_example_validates_with_its_apply_rule(tmp_path: Path) -> None:
    argv, _ = icinga(tmp_path, 'object Host "ntp1" {\n  address = "192.0.2.1"\n'
                               '  check_command = "dummy"\n  vars.ntp_server = true\n}\n', "-C")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    # The example's apply rule made the host's NTP service.
    assert "Instantiated 1 Service." in done.stdout, done.stdout


def test_icinga_runs_the_check_through_the_command(tmp_path: Path, chronyd: Chronyd) -> None:
    log = tmp_path / "debug.log"
    body = (
        "object CheckerComponent \"checker\" { }\n"
        f'object FileLogger "debug" {{\n  path = "{log}"\n  severity = "debug"\n}}\n'
        'object Host "ntp1" {\n'
        f'  address = "{chronyd.host}"\n  check_command = "dummy"\n'
        "  enable_active_checks = false\n}\n"
        'object Service "ntp-time" {\n  host_name = "ntp1"\n  check_command = "ntp_probe"\n'
        f'  check_interval = 1s\n  vars.ntp_port = {chronyd.port}\n'
        '  vars.ntp_module = "ntp_fast"\n  vars.ntp_warning = "~:0.5"\n'
        '  vars.ntp_critical = "1"\n}\n')
    argv, _ = icinga(tmp_path, body)
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    ran = None
    try:
        deadline = time.monotonic() + DEADLINE
        while ran is None and time.monotonic() < deadline and proc.poll() is None:
            text = log.read_text(errors="replace") if log.exists() else ""
            ran = re.search(r"PID \d+ \((.*'check'.*)\) terminated with exit code (\d+)", text)
            time.sleep(0.1)  # poll interval, bounded by the deadline
    finally:
        # icinga2 forks its own helpers: the whole session's process group goes.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert ran is not None, log.read_text() if log.exists() else "no log"
    words = ran.group(1)
    # The Template Library's arguments, as ntp-probe check reads them.
    for expected in ("'check'", "'--module' 'ntp_fast'", f"'-H' '{chronyd.host}'",
                     f"'-p' '{chronyd.port}'", "'-w' '~:0.5'", "'-c' '1'"):
        assert expected in words, words
    assert ran.group(2) == "0", words  # OK: chronyd's offset is within the thresholds

