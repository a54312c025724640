"""Shared test helpers: required binaries, free loopback ports, a real chronyd on loopback.

chronyd is always started with ``-x`` (never touch the system clock), bound to 127.0.0.1
on a port picked at runtime, in a private 0700 directory, and stopped by the PID this
module started (never by name).

Integration tests skip with a clear reason when a binary is missing; with
``NTP_PROBE_REQUIRE_INTEGRATION=1`` (CI) the skip becomes a failure.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ntp_probe.config.schema import Module, NTPSettings
from ntp_probe.engine.context import ProbeLog
from ntp_probe.engine.registry import PROBERS
from ntp_probe.engine.result import Measurement
from ntp_probe.engine.runner import run_probe
from ntp_probe.engine.targets import Target, parse_target
from ntp_probe.net import adjtimex, resolve
from ntp_probe.net.resolve import HostsFile, ResolveError, Resolver
from ntp_probe.proto import timex
from ntp_probe.safety.guard import Guard
from ntp_probe.safety.policy import TargetPolicy

REQUIRE_INTEGRATION_ENV = "NTP_PROBE_REQUIRE_INTEGRATION"

# Binary -> how to get it (for the skip/fail message).
_INSTALL_HINTS = {
    "chronyd": "apt-get install chrony",
    "chronyc": "apt-get install chrony",
    "prometheus": "apt-get install prometheus",
    "promtool": "apt-get install prometheus",
    "icinga2": "apt-get install icinga2-bin icinga2-common",
}

LOOPBACK = "127.0.0.1"
# How long chronyd may take to answer its first query (about 54 ms measured here).
CHRONYD_START_DEADLINE = 5.0
_POLL_TIMEOUT = 0.05
_START_ATTEMPTS = 5


Pairs = tuple[tuple[str, str], ...]


class FakeClock:
    """A monotonic-like clock the test moves by hand."""

    def __init__(self, now: float = 5000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_module(*, samples: int = 1, interval: float = 0.01, reply_timeout: float = 0.5,
                timeout: float = 2.0, name: str = "t", policy: TargetPolicy | None = None,
                min_probe_interval: float = 0.0, **settings: Any) -> Module:
    """An ntp module for tests: IPv4 preferred, short intervals, the rest as given."""
    settings.setdefault("preferred_ip_protocol", "ip4")
    return Module(
        name=name, timeout=timeout,
        ntp=NTPSettings(samples=samples, sample_interval=interval, reply_timeout=reply_timeout,
                        **settings),
        policy=policy or TargetPolicy(), min_probe_interval=min_probe_interval,
    )


async def probe(target: str | Target, module: Module, *, timeout: float | None = None,
                guard: Guard | None = None,
                log: ProbeLog | None = None) -> tuple[Measurement, ProbeLog]:
    """run_probe with the module's timeout (or ``timeout``); returns the measurement and log.

    Every probe a test runs also checks the prober registry: the failure reason and every
    family emitted are among those its prober declares (the docs and the config read them)."""
    t = parse_target(target) if isinstance(target, str) else target
    m, got_log = await run_probe(t, module, module.timeout if timeout is None else timeout,
                                 log=log, guard=guard)
    spec = PROBERS[module.prober]
    assert m.failure is None or m.failure in spec.reasons, (
        f"prober {module.prober} failed {m.failure!r}, not among its registered reasons")
    undeclared = {f.name for f, _, _ in m.samples} - {f.name for f in spec.families}
    assert not undeclared, f"prober {module.prober} emitted undeclared {sorted(undeclared)}"
    return m, got_log


def gauges(m: Measurement) -> list[tuple[str, Pairs, float]]:
    """Every sample of a measurement as (metric name, ((label, value), ...), value)."""
    return [(f.name, tuple(zip(f.labels, labels, strict=True)), v) for f, labels, v in m.samples]


def names(m: Measurement) -> set[str]:
    """The metric names a measurement holds."""
    return {f.name for f, _, _ in m.samples}


def value(m: Measurement, name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` with exactly ``labels``, or None."""
    want = tuple(sorted(labels.items()))
    for n, pairs, v in gauges(m):
        if n == name and tuple(sorted(pairs)) == want:
            return v
    return None


def label_sets(m: Measurement, name: str) -> list[dict[str, str]]:
    """The label sets of every sample of ``name``."""
    return [dict(pairs) for n, pairs, _ in gauges(m) if n == name]


def ntp_samples(m: Measurement) -> list[dict[str, Any]]:
    """The NTP burst's samples as the JSON report gives them (offset, rtt, selected)."""
    for report in m.reports:
        data = report.to_json()
        if report.title == "ntp":
            return list(data["samples"])
    return []


def integration_required() -> bool:
    """True when CI asks for missing integration dependencies to be fatal."""
    return os.environ.get(REQUIRE_INTEGRATION_ENV, "") == "1"


def require_binary(name: str) -> str:
    """The path of ``name`` on PATH; otherwise skip (or fail when CI requires integration)."""
    path = shutil.which(name)
    if path is not None:
        return path
    hint = _INSTALL_HINTS.get(name, f"install {name}")
    reason = f"{name} not installed: {hint}"
    if integration_required():
        pytest.fail(f"{reason} ({REQUIRE_INTEGRATION_ENV}=1 makes this fatal)", pytrace=False)
    pytest.skip(reason)


def require_namespaces() -> None:
    """Skip (or fail when CI requires integration) unless this process may make network
    and mount namespaces: root, unshare (util-linux) and ip (iproute2)."""
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip"):
        return
    reason = "namespaces need root, unshare (util-linux) and ip (iproute2)"
    if integration_required():
        pytest.fail(f"{reason} ({REQUIRE_INTEGRATION_ENV}=1 makes this fatal)", pytrace=False)
    pytest.skip(reason)


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 that was free a moment ago (bind 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bind 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def raw_ntp_query(
    host: str, port: int, timeout: float = _POLL_TIMEOUT, version: int = 4
) -> bytes | None:
    """Send one hand-built mode-3 request; return the matching reply's bytes, or None.

    Deliberately independent of ntp_probe's codec: fixtures must not rely on the code
    under test to decide that a server is up.
    """
    nonce = secrets.randbits(64) | 1
    request = bytes([(version << 3) | 3]) + bytes(39) + struct.pack("!Q", nonce)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        try:
            s.send(request)
            deadline = time.monotonic() + timeout
            while True:
                s.settimeout(max(deadline - time.monotonic(), 1e-3))
                data = s.recv(2048)
                if len(data) >= 48 and struct.unpack_from("!Q", data, 24)[0] == nonce:
                    return data
        except (TimeoutError, ConnectionRefusedError):
            return None


@dataclass
class Chronyd:
    """A chronyd this test session started."""

    host: str
    port: int
    dir: Path
    proc: subprocess.Popen[bytes]
    synchronised: bool

    @property
    def target(self) -> str:
        """``host:port`` for ``/probe?target=`` and ``ntp-probe probe``."""
        return f"{self.host}:{self.port}"

    @property
    def socket_path(self) -> Path:
        """chronyc's command socket (``chronyc -h PATH``)."""
        return self.dir / "chronyd.sock"

    @property
    def log_path(self) -> Path:
        return self.dir / "chronyd.log"

    def log(self) -> str:
        """chronyd's own log so far (stderr with -d)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def chrony_config(directory: Path, port: int, *, synchronised: bool) -> str:
    """A loopback-only server; without ``local stratum`` it is
    an unsynchronised server (stratum 0, zero refid, LI 3)."""
    lines = [
        f"port {port}",
        f"bindaddress {LOOPBACK}",
        f"allow {LOOPBACK}",
    ]
    if synchronised:
        lines.append("local stratum 8")
    lines += [
        "cmdport 0",
        f"bindcmdaddress {directory}/chronyd.sock",
        f"pidfile {directory}/chronyd.pid",
        f"driftfile {directory}/drift",
    ]
    if os.geteuid() == 0:
        lines.append("user root")
    return "\n".join(lines) + "\n"


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> int:
    """Terminate one process we started (by its PID), kill it if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=timeout)
    return proc.returncode


def _spawn_chronyd(binary: str, directory: Path, port: int, synchronised: bool) -> Chronyd:
    conf = directory / "chrony.conf"
    conf.write_text(chrony_config(directory, port, synchronised=synchronised))
    # -x: never touch the system clock. -d: foreground, log to stderr. -4: IPv4 only.
    argv = [binary, "-4", "-x", "-d", "-f", str(conf)]
    if os.geteuid() != 0:
        argv.insert(1, "-U")  # non-root needs -U, else "Not superuser"
    with open(directory / "chronyd.log", "wb") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=directory
        )
    return Chronyd(LOOPBACK, port, directory, proc, synchronised)


def _wait_ready(c: Chronyd, deadline: float) -> str | None:
    """Poll until chronyd answers; return None when ready, else why it is not."""
    while (started := time.monotonic()) < deadline:
        if c.proc.poll() is not None:
            return f"chronyd exited with {c.proc.returncode}"
        if "Could not open NTP socket" in c.log():
            return "port taken"
        if raw_ntp_query(c.host, c.port) is not None:
            return None
        # A closed port refuses at once: keep polls at least 10 ms apart, not a busy loop.
        time.sleep(max(0.0, started + 0.01 - time.monotonic()))
    return "no answer within the deadline"


def start_chronyd(*, synchronised: bool = True) -> Chronyd:
    """Start a real ``chronyd -x`` on 127.0.0.1 and a free port; wait until it answers.

    Retries with another port when the chosen one was taken meanwhile.
    """
    binary = require_binary("chronyd")
    problems: list[str] = []
    for _ in range(_START_ATTEMPTS):
        directory = Path(tempfile.mkdtemp(prefix="ntpp-chronyd-"))
        directory.chmod(0o700)  # chronyd refuses a command socket in a dir others can reach
        c = _spawn_chronyd(binary, directory, free_udp_port(), synchronised)
        why = _wait_ready(c, time.monotonic() + CHRONYD_START_DEADLINE)
        if why is None:
            if "Disabled control of system clock" not in c.log():
                stop_process(c.proc)
                pytest.fail(f"chronyd did not confirm -x (clock control):\n{c.log()}")
            return c
        stop_process(c.proc)
        problems.append(f"port {c.port}: {why}\n{c.log()}")
        shutil.rmtree(directory, ignore_errors=True)
        if why != "port taken":
            break
    pytest.fail("could not start chronyd:\n" + "\n".join(problems), pytrace=False)


def stop_chronyd(c: Chronyd) -> None:
    """Stop a chronyd started by :func:`start_chronyd` and remove its directory."""
    stop_process(c.proc)
    shutil.rmtree(c.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def chronyd() -> Iterator[Chronyd]:
    """A synchronised chronyd (``local stratum 8``) shared by the session."""
    c = start_chronyd(synchronised=True)
    try:
        yield c
    finally:
        stop_chronyd(c)


@pytest.fixture
def chronyd_factory() -> Iterator[Callable[..., Chronyd]]:
    """Start extra chronyds; ``factory(synchronised=False)`` gives an unsynchronised one
    (stratum 0, zero refid, LI 3). All are stopped at the end of the test."""
    started: list[Chronyd] = []

    def factory(*, synchronised: bool = False) -> Chronyd:
        c = start_chronyd(synchronised=synchronised)
        started.append(c)
        return c

    try:
        yield factory
    finally:
        for c in started:
            stop_chronyd(c)


def _clock_fingerprint() -> tuple[float, float, int, float]:
    """(CLOCK_REALTIME - CLOCK_MONOTONIC, kernel frequency, status, offset), read-only."""
    clock = adjtimex.read()
    step = time.clock_gettime(time.CLOCK_REALTIME) - time.clock_gettime(time.CLOCK_MONOTONIC)
    return step, clock.frequency_ratio, clock.status, clock.offset


_asked_dns: list[str] = []


@pytest.fixture(scope="session", autouse=True)
def no_dns_with_test_names() -> Iterator[None]:
    """The machine's resolver never sees a name from the tests: in this process every
    getaddrinfo must be numeric (names come from hosts files the tests control, answered
    in-process, or from an injected lookup). A lookup that would reach DNS fails at once
    and fails the run."""
    real = socket.getaddrinfo

    def guarded(host: Any, *args: Any, **kwargs: Any) -> Any:
        text = host.decode() if isinstance(host, bytes) else host
        if text is not None:
            try:
                ipaddress.ip_address(str(text).split("%", 1)[0])
            except ValueError:
                _asked_dns.append(str(text))
                raise socket.gaierror(socket.EAI_NONAME,
                                      "name lookups are off in the tests") from None
        return real(host, *args, **kwargs)

    socket.getaddrinfo = guarded
    try:
        yield
    finally:
        socket.getaddrinfo = real
    assert not _asked_dns, f"tests tried to resolve names: {sorted(set(_asked_dns))}"


@pytest.fixture(scope="session", autouse=True)
def clock_untouched() -> Iterator[None]:
    """Fail the run if anything the suite started stepped or disciplined the clock.

    Every test starts chronyd with -x and ntpd without CAP_SYS_TIME; this checks it held.
    Where a time daemon already disciplines this machine the kernel state moves by itself,
    so only a step is looked for then.
    """
    if not sys.platform.startswith("linux"):
        yield
        return
    before = _clock_fingerprint()
    yield
    after = _clock_fingerprint()
    stepped = abs(after[0] - before[0])
    assert stepped < 0.5, f"the system clock was stepped by {stepped:.3f}s during the tests"
    if before[2] & timex.STA_UNSYNC:  # nothing disciplined the clock when we started
        assert after[1:] == before[1:], (
            f"the kernel clock discipline changed during the tests: (freq, status, offset) "
            f"{before[1:]} -> {after[1:]}"
        )


def crl_only_pem() -> str:
    """A PEM file holding a certificate revocation list and no certificate: it loads as
    trusted CAs, and trusts nothing."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    crl = (x509.CertificateRevocationListBuilder()
           .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")]))
           .last_update(now).next_update(now + datetime.timedelta(days=1))
           .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256()))
    return crl.public_bytes(serialization.Encoding.PEM).decode()


Hosts = Callable[[str], object]


def _no_dns(host: str, family: int) -> str:
    raise ResolveError(f"{host}: the test resolver has no such name")


@pytest.fixture
def hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Hosts]:
    """Installs a resolver reading a hosts file and never the machine's DNS; yields the
    function that writes the file."""
    path = tmp_path / "hosts"
    resolver = Resolver(getaddrinfo=_no_dns, hosts=HostsFile(str(path)))
    monkeypatch.setattr(resolve, "_default", resolver)
    yield path.write_text


@pytest.fixture
def stuck_resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Installs a resolver whose every lookup hangs until the test ends (a black-holed
    DNS); yields the hosts it was asked for."""
    release = threading.Event()
    asked: list[str] = []

    def stuck(host: str, family: int) -> str:
        asked.append(host)
        release.wait(timeout=5)
        raise ResolveError("released")

    monkeypatch.setattr(resolve, "_default", Resolver(getaddrinfo=stuck))
    yield asked
    release.set()
