"""A real Kiss-o'-Death RATE from ntpsec's ntpd on 127.0.0.1:123, and the backoff after it.

ntpsec's package conflicts with chrony, so it is not installed: ``apt-get download
ntpsec`` and ``dpkg-deb -x`` unpack it into a cache directory
(``$XDG_CACHE_HOME/ntp_probe-tests``, default ``~/.cache/ntp_probe-tests``), reused by
later runs. Without it (no apt lists, no network, not Debian) the tests skip, or fail
under ``NTP_PROBE_REQUIRE_INTEGRATION=1``.

Clock safety: ntpd always runs as
``setpriv --bounding-set=-sys_time -- ntpd -n ...`` (no CAP_SYS_TIME, checked in
/proc before any packet is sent), never with -g/-G/-q/-u, with ``disable ntp`` and
``disable kernel``. It binds UDP 123 only, so the test needs 127.0.0.1:123 free
(and root, or CAP_NET_BIND_SERVICE). It is stopped by its PID.

Readiness polls come from other loopback source addresses (127.0.0.2, .3, ...), one
address per poll: ntpd rate-limits per source address, so the polls leave the state
for 127.0.0.1, which the probes use, untouched.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

from ntp_probe.config.schema import Config, Module, NTPDSettings, NTPSettings
from ntp_probe.engine.coordinator import Coordinator, Outcome
from ntp_probe.engine.targets import parse_target
from ntp_probe.safety.kod import KodTable
from tests.conftest import (
    REQUIRE_INTEGRATION_ENV,
    gauges,
    integration_required,
    label_sets,
    probe,
    require_binary,
    stop_process,
    value,
)

pytestmark = pytest.mark.integration

NTP_PORT = 123
LOOPBACK = "127.0.0.1"
READY_DEADLINE = 5.0  # orphan mode reaches stratum 8 about 1 s after the start
POLL_INTERVAL = 0.05
CAP_SYS_TIME = 25
DOWNLOAD_TIMEOUT = 300.0
MAX_PROBES_UNTIL_KOD = 4


def unavailable(reason: str) -> NoReturn:
    """Skip, or fail when CI requires the integration tests."""
    if integration_required():
        pytest.fail(f"{reason} ({REQUIRE_INTEGRATION_ENV}=1 makes this fatal)", pytrace=False)
    pytest.skip(reason)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ntp_probe-tests"


def ntpsec_ntpd() -> Path:
    """ntpsec's ntpd unpacked from its Debian package into the cache (downloaded once)."""
    root = cache_dir() / "ntpsec"
    ntpd = root / "usr" / "sbin" / "ntpd"
    if not os.access(ntpd, os.X_OK):
        _download_ntpsec(root)
    if not os.access(ntpd, os.X_OK):
        unavailable(f"{ntpd} missing after unpacking ntpsec")
    try:
        version = subprocess.run([str(ntpd), "--version"], capture_output=True, text=True,
                                 timeout=10, stdin=subprocess.DEVNULL)
    except OSError as exc:
        unavailable(f"cannot run {ntpd}: {exc}")
    if version.returncode != 0 or "ntpsec" not in version.stdout + version.stderr:
        unavailable(f"{ntpd} --version failed (missing libraries? it needs libssl3, libcap2, "
                    f"libbsd0): {version.stdout}{version.stderr}")
    return ntpd


def unpack_deb(package: str, root: Path,
               finish: Callable[[Path], None] | None = None) -> None:
    """``apt-get download`` a Debian package and ``dpkg-deb -x`` it into ``root`` (a cache:
    never installed, so it cannot conflict with chrony); ``finish`` adjusts the unpacked
    tree before it is moved into place."""
    apt_get, dpkg_deb = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if apt_get is None or dpkg_deb is None:
        unavailable(f"{package} not cached and apt-get/dpkg-deb missing (not Debian?)")
    root.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix="download-") as work:
        try:
            got = subprocess.run([apt_get, "download", "-q", package], cwd=work,
                                 capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT,
                                 stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            unavailable(f"apt-get download {package} timed out")
        debs = sorted(Path(work).glob(f"{package}_*.deb"))
        if got.returncode != 0 or not debs:
            unavailable(f"apt-get download {package} failed (run apt-get update first?): "
                        + " ".join((got.stdout + got.stderr).split())[-500:])
        unpacked = Path(work) / package
        x = subprocess.run([dpkg_deb, "-x", str(debs[-1]), str(unpacked)], capture_output=True,
                           text=True, timeout=60, stdin=subprocess.DEVNULL)
        if x.returncode != 0:
            unavailable(f"dpkg-deb -x {debs[-1].name} failed: {x.stderr}")
        if finish is not None:
            finish(unpacked)
        if root.exists():
            shutil.rmtree(root)  # a partial earlier unpack
        os.replace(unpacked, root)


def _download_ntpsec(root: Path) -> None:
    unpack_deb("ntpsec", root)


def check_port_123_free() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((LOOPBACK, NTP_PORT))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                unavailable(f"{LOOPBACK}:{NTP_PORT} is taken by another process (an NTP "
                            "server?); ntpsec's ntpd can only listen on port 123")
            if exc.errno == errno.EACCES:
                unavailable(f"binding {LOOPBACK}:{NTP_PORT} needs root or "
                            "CAP_NET_BIND_SERVICE")
            raise


def ntp_query_from(source: str, timeout: float = POLL_INTERVAL) -> bytes | None:
    """One mode-3 request to 127.0.0.1:123 sent from ``source``; the matching reply or None.

    Independent of ntp_probe's codec on purpose.
    """
    nonce = secrets.randbits(64) | 1
    request = bytes([(4 << 3) | 3]) + bytes(39) + struct.pack("!Q", nonce)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        s.connect((LOOPBACK, NTP_PORT))
        deadline = time.monotonic() + timeout
        try:
            s.send(request)
            while (left := deadline - time.monotonic()) > 0:
                s.settimeout(left)
                data = s.recv(2048)
                if len(data) >= 48 and struct.unpack_from("!Q", data, 24)[0] == nonce:
                    return data
        except (TimeoutError, ConnectionRefusedError):
            pass
    return None


def loopback_conf(d: Path, *lines: str) -> str:
    """An ntp.conf that listens on loopback only and keeps ntpd's files in ``d``, then
    ``lines`` (shared by every ntpd test)."""
    return "\n".join([
        "interface ignore wildcard",
        "interface ignore all",
        f"interface listen {LOOPBACK}",
        f"statsdir {d}/",
        f"driftfile {d}/ntp.drift",
        *lines,
    ]) + "\n"


def ntp_conf(d: Path) -> str:
    """ntpd with `restrict default limited kod` and a tight discard rule: a real KoD RATE."""
    return loopback_conf(
        d,
        "restrict default kod limited nomodify noquery",
        f"restrict {LOOPBACK} kod limited",
        "restrict ::1",
        # kod = allowed KoD rate (packets/s); the default would mostly drop silently.
        "limit average 1 burst 2 kod 100",
        "disable ntp",
        "disable kernel",
        "tos orphan 8 orphanwait 0",
    )


@dataclass
class Ntpd:
    """A running ntpd and the directory that holds its configuration and log."""

    proc: subprocess.Popen[bytes]
    dir: Path

    def log(self) -> str:
        try:
            return (self.dir / "ntpd.log").read_text(errors="replace")
        except OSError:
            return ""


def _wait_exec(proc: subprocess.Popen[bytes], name: str, deadline: float) -> bool:
    """Poll until setpriv has exec'd ``name`` (same PID)."""
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if Path(f"/proc/{proc.pid}/comm").read_text().strip() == name:
                return True
        except OSError:
            return False
        time.sleep(0.005)  # poll interval, bounded by the deadline
    return False


def _cap_sys_time_cleared(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caps = {line.split(":")[0]: int(line.split()[1], 16) for line in status.splitlines()
            if line.startswith(("CapEff:", "CapBnd:", "CapPrm:"))}
    return all(not value & (1 << CAP_SYS_TIME) for value in caps.values()) and len(caps) == 3


def _wait_orphan(ntpd: Ntpd) -> str | None:
    """Poll (each time from a new loopback source) until stratum != 0; None when ready."""
    deadline = time.monotonic() + READY_DEADLINE
    source = 2
    while (started := time.monotonic()) < deadline:
        if ntpd.proc.poll() is not None:
            return f"ntpd exited with {ntpd.proc.returncode}"
        reply = ntp_query_from(f"127.0.0.{source}")
        source = source + 1 if source < 254 else 2
        if reply is not None and reply[1] != 0:
            return None
        time.sleep(max(0.0, started + POLL_INTERVAL - time.monotonic()))
    return f"no stratum != 0 reply within {READY_DEADLINE}s"


@pytest.fixture(scope="module")
def ntpd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ntpd]:
    setpriv = require_binary("setpriv")
    binary = ntpsec_ntpd()
    check_port_123_free()
    d = tmp_path_factory.mktemp("ntpsec")
    conf = d / "ntp.conf"
    conf.write_text(ntp_conf(d))
    # Never -g/-G/-q/-u; without CAP_SYS_TIME the kernel refuses any clock change.
    argv = [setpriv, "--bounding-set=-sys_time", "--", str(binary), "-n", "-c", str(conf),
            "-l", str(d / "ntpd.log"), "-p", str(d / "ntpd.pid")]
    with open(d / "stdout.log", "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, cwd=d)
    server = Ntpd(proc, d)
    try:
        # setpriv execs ntpd: the PID we hold becomes ntpd's own.
        if not _wait_exec(proc, "ntpd", time.monotonic() + READY_DEADLINE):
            pytest.fail(f"ntpd did not start: rc={proc.poll()}\n{server.log()}", pytrace=False)
        if not _cap_sys_time_cleared(proc.pid):
            pytest.fail("ntpd runs with CAP_SYS_TIME: refusing to go on")
        why = _wait_orphan(server)
        if why is not None:
            pytest.fail(f"ntpsec ntpd not ready: {why}\n{server.log()}", pytrace=False)
        if f"{LOOPBACK}:{NTP_PORT}" not in server.log():
            pytest.fail(f"ntpd does not listen on {LOOPBACK}:{NTP_PORT}:\n{server.log()}")
        pid_file = (d / "ntpd.pid").read_text().strip()
        assert pid_file == str(proc.pid), (pid_file, proc.pid)
        yield server
    finally:
        stop_process(proc)


async def test_an_orphan_master_without_associations_passes(ntpd: Ntpd) -> None:
    # ntpsec's way to run an isolated network's master (it has no local clock driver):
    # `tos orphan 8` and no server. It read no_sys_peer (NTPDaemonNoSelectableSource
    # paged), where chronyd's `local` master passes. ntpq, in the same test, agrees.
    from tests.integration.test_mode6_wire import ntpq, ntpq_variables  # no import cycle

    module = Module(name="ntpd", prober="ntpd", timeout=5.0,
                    ntpd=NTPDSettings(preferred_ip_protocol="ip4"))
    m, log = await probe(f"{LOOPBACK}:{NTP_PORT}", module)
    shown = ntpq_variables(ntpq("raw", "rv").split("Output set to raw", 1)[1])
    assert (shown["refid"], shown["leap"], shown["stratum"]) == ("127.0.0.1", "0", "8")
    assert "No association IDs returned" in ntpq("associations")
    assert m.failure is None, log.text()
    assert label_sets(m, "probe_ntpd_info")[0]["refid"] == "127.0.0.1"
    assert sum(value(m, "probe_ntpd_peers", **s) or 0
               for s in label_sets(m, "probe_ntpd_peers")) == 0


def kod_module() -> Module:
    return Module(
        name="local_burst",
        timeout=5.0,
        ntp=NTPSettings(samples=4, sample_interval=0.01, reply_timeout=0.5,
                        preferred_ip_protocol="ip4"),
    )


async def test_real_kod_rate_then_backoff(ntpd: Ntpd) -> None:
    module = kod_module()
    config = Config(modules={module.name: module}, source="test")
    table = KodTable()
    coordinator = Coordinator(kod=table)
    target = parse_target(f"{LOOPBACK}:{NTP_PORT}")

    outcomes: list[Outcome] = []
    for _ in range(MAX_PROBES_UNTIL_KOD):
        outcome = await coordinator.probe(config, module, target, module.timeout)
        outcomes.append(outcome)
        if outcome.result.failure == "kod_rate":
            break
        # No KoD yet: ntpd answered normally, so nothing may be backing off.
        assert outcome.result.failure != "backoff", outcome.log.text()
    summary = "\n\n".join(o.log.text() for o in outcomes) + ntpd.log()
    kod = outcomes[-1]
    result = kod.result
    assert result.failure == "kod_rate", summary

    # The burst stopped at the KoD: everything sent was answered, the KoD last.
    sent = value(result, "probe_ntp_samples_sent")
    received = value(result, "probe_ntp_samples_received")
    assert sent is not None and 1 <= sent < module.ntp.samples, summary
    assert received == sent, summary
    assert result.packets_sent == sent
    assert value(result, "probe_ntp_packet_loss_ratio") == 0
    assert [dict(lab) for n, lab, _ in gauges(result) if n == "probe_ntp_kiss_code_info"] == [
        {"code": "RATE"}
    ]
    sample_lines = [line for line in kod.log.lines if " sample " in line]
    assert len(sample_lines) == sent, summary
    assert "Kiss-o'-Death RATE" in sample_lines[-1], summary
    assert all("Kiss-o'-Death" not in line for line in sample_lines[:-1]), summary
    # ntpsec's KoD carries poll 0: the backoff starts at the 64 s minimum.
    assert value(result, "probe_ntp_backoff_remaining_seconds") == 64.0
    assert table.remaining(LOOPBACK, NTP_PORT) is not None
    if sent > 1:
        # The replies before the KoD were real orphan-mode answers: they are reported.
        assert value(result, "probe_ntp_stratum") == 8, summary

    # The next probe sends nothing at all.
    after = await coordinator.probe(config, module, target, module.timeout)
    assert after.result.failure == "backoff", after.log.text()
    assert after.result.packets_sent == 0
    assert value(after.result, "probe_ntp_samples_sent") in (None, 0)
    left = value(after.result, "probe_ntp_backoff_remaining_seconds")
    assert left is not None and 0 < left <= 64.0
    assert [dict(lab) for n, lab, _ in gauges(after.result)
            if n == "probe_ntp_kiss_code_info"] == [{"code": "RATE"}]
    assert "nothing sent" in after.log.text()
    assert ntpd.proc.poll() is None, ntpd.log()


def test_ntpd_never_gained_clock_control(ntpd: Ntpd) -> None:
    """ntpd tried to set the kernel's PLL and was refused (it has no CAP_SYS_TIME)."""
    assert ntpd.proc.poll() is None
    assert _cap_sys_time_cleared(ntpd.proc.pid)
    log = ntpd.log()
    assert "ntpsec" in log
    assert "-g" not in log.split("Command line:", 1)[-1].splitlines()[0].split()
