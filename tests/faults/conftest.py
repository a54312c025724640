"""Fault-injection fixtures: a network namespace of the test's own, chronyd -x inside it.

This kernel has no netem, so loss is injected with nftables
(``numgen random``) inside the namespace and delay with a userspace UDP relay (in the
test module). Everything here is created by the test run itself and removed by name at
teardown, even when a test fails:

* one network namespace ``ntpp-faults-<pid>-<token>``;
* one veth pair, host side ``nph<pid><token>`` and namespace side ``npn<pid><token>``,
  addressed from a /30 of 198.18.0.0/15 (RFC 2544) that no interface on the host uses;
* chronyd processes started with ``ip netns exec NS chronyd -x -d -f CONF`` (``-x``: the
  system clock is never touched), each stopped by its own PID.

Requirements: root (CAP_NET_ADMIN), ``ip`` (iproute2), ``nft`` (nftables) and ``chronyd``
(chrony). Without them the tests skip with the reason; with
``NTP_PROBE_REQUIRE_INTEGRATION=1`` (CI) the skip becomes a failure, as for
:func:`tests.conftest.require_binary`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

from tests.conftest import (
    REQUIRE_INTEGRATION_ENV,
    integration_required,
    raw_ntp_query,
    require_binary,
    stop_process,
)

# The benchmarking range (RFC 2544): never routed, so nothing leaves the namespaces.
FAULT_RANGE = ipaddress.IPv4Network("198.18.0.0/15")
NTP_PORT = 123
CHRONYD_START_DEADLINE = 5.0
_CMD_TIMEOUT = 10.0
# Debian package for each tool, for the skip/fail message.
_PACKAGES = {"ip": "iproute2", "nft": "nftables"}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "faults: fault injection (loss, delay, reordering, server death) in a network "
        "namespace the test creates; needs root, iproute2, nftables and chrony",
    )


def _unavailable(reason: str) -> NoReturn:
    """Skip with ``reason``; fail instead when CI requires the integration tests."""
    if integration_required():
        pytest.fail(f"{reason} ({REQUIRE_INTEGRATION_ENV}=1 makes this fatal)", pytrace=False)
    pytest.skip(reason)


def require_root() -> None:
    """Namespaces, veth pairs and nftables need root (CAP_NET_ADMIN)."""
    if os.geteuid() != 0:
        _unavailable("fault-injection tests need root (network namespaces, veth, nftables)")


def require_tool(name: str) -> str:
    """The path of an administration tool (also looked up in the sbin dirs, which a
    non-login root PATH may lack); skip or fail as :func:`require_binary` does."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if path is not None:
        return path
    _unavailable(f"{name} not installed: apt-get install {_PACKAGES.get(name, name)}")


def run(argv: list[str], *, check: bool = True, stdin: str | None = None) -> str:
    """Run one administration command; on failure raise with its stderr."""
    proc = subprocess.run(
        argv, input=stdin, capture_output=True, text=True, timeout=_CMD_TIMEOUT, check=False
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip() or proc.stdout}"
        )
    return proc.stdout


# --- the namespace ----------------------------------------------------------------------


@dataclass
class Netns:
    """A network namespace with one veth pair to the host, both created by this test run."""

    ip: str  # path of the ip binary
    name: str
    host_if: str
    ns_if: str
    network: ipaddress.IPv4Network
    created: list[str] = field(default_factory=list)  # what teardown must remove

    @property
    def host_addr(self) -> str:
        """The host side of the /30 (.1): where the probe and the relays live."""
        return str(self.network.network_address + 1)

    @property
    def ns_addr(self) -> str:
        """The namespace side of the /30 (.2): where chronyd -x listens."""
        return str(self.network.network_address + 2)

    def exec_argv(self, *argv: str) -> list[str]:
        """``ip netns exec NAME argv...``."""
        return [self.ip, "netns", "exec", self.name, *argv]

    def nft(self, *args: str, stdin: str | None = None) -> str:
        """Run ``nft`` inside the namespace (never on the host)."""
        return run(self.exec_argv(require_tool("nft"), *args), stdin=stdin)


def _used_networks(ip: str) -> list[ipaddress.IPv4Network]:
    """Every IPv4 network configured on the host (to pick a /30 nobody uses)."""
    out: list[ipaddress.IPv4Network] = []
    for link in json.loads(run([ip, "-j", "-4", "addr", "show"]) or "[]"):
        for info in link.get("addr_info", []):
            out.append(
                ipaddress.IPv4Network(f"{info['local']}/{info['prefixlen']}", strict=False)
            )
    for route in json.loads(run([ip, "-j", "-4", "route", "show"]) or "[]"):
        dst = route.get("dst", "default")
        if dst != "default":
            out.append(ipaddress.IPv4Network(dst, strict=False))
    return out


def _pick_network(ip: str) -> ipaddress.IPv4Network:
    used = [n for n in _used_networks(ip) if n.overlaps(FAULT_RANGE)]
    rng = random.Random(secrets.randbits(64))
    count = FAULT_RANGE.num_addresses // 4
    for _ in range(1000):
        base = FAULT_RANGE.network_address + 4 * rng.randrange(count)
        candidate = ipaddress.IPv4Network(f"{base}/30")
        if not any(candidate.overlaps(n) for n in used):
            return candidate
    raise RuntimeError("no free /30 in 198.18.0.0/15")


def _remove(ns: Netns) -> list[str]:
    """Delete what :func:`create_netns` made, by name; return the problems (if any)."""
    problems: list[str] = []
    if "netns" in ns.created:
        # Deleting the namespace destroys the veth end inside it and so its host peer.
        try:
            run([ns.ip, "netns", "del", ns.name])
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            problems.append(str(exc))
    if "veth" in ns.created:
        # Normally gone with the namespace; delete it by name if it outlived it.
        shown = subprocess.run(
            [ns.ip, "link", "show", "dev", ns.host_if], capture_output=True, check=False
        )
        if shown.returncode == 0:
            gone = subprocess.run(
                [ns.ip, "link", "del", "dev", ns.host_if], capture_output=True, text=True,
                check=False,
            )
            if gone.returncode != 0 and "Cannot find device" not in gone.stderr:
                problems.append(f"ip link del {ns.host_if}: {gone.stderr.strip()}")
    return problems


def create_netns(ip: str) -> Netns:
    """A fresh namespace and veth pair (unique names: this pid plus a random token)."""
    token = secrets.token_hex(2)[:3]
    pid = os.getpid()
    ns = Netns(
        ip=ip,
        name=f"ntpp-faults-{pid}-{token}",
        host_if=f"nph{pid:x}{token}",  # at most 3 + 6 + 3 = 12 < IFNAMSIZ (15)
        ns_if=f"npn{pid:x}{token}",
        network=_pick_network(ip),
    )
    try:
        run([ip, "netns", "add", ns.name])
        ns.created.append("netns")
        run([ip, "link", "add", ns.host_if, "type", "veth", "peer", "name", ns.ns_if,
             "netns", ns.name])
        ns.created.append("veth")
        prefix = ns.network.prefixlen
        run([ip, "addr", "add", f"{ns.host_addr}/{prefix}", "dev", ns.host_if])
        run([ip, "link", "set", ns.host_if, "up"])
        run([ip, "-n", ns.name, "addr", "add", f"{ns.ns_addr}/{prefix}", "dev", ns.ns_if])
        run([ip, "-n", ns.name, "link", "set", ns.ns_if, "up"])
        run([ip, "-n", ns.name, "link", "set", "lo", "up"])
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        problems = _remove(ns)
        _unavailable(
            f"cannot set up a network namespace with a veth pair: {exc}"
            + (f"; cleanup: {problems}" if problems else "")
        )
    return ns


@pytest.fixture(scope="module")
def netns() -> Iterator[Netns]:
    """This module's own namespace + veth pair; deleted by name at teardown."""
    require_root()
    ip = require_tool("ip")
    ns = create_netns(ip)
    try:
        yield ns
    finally:
        problems = _remove(ns)
        assert not problems, f"netns/veth cleanup failed: {problems}"


# --- chronyd -x inside the namespace----------------------------------------------------


@dataclass
class NsChronyd:
    """A chronyd this test run started inside :class:`Netns`."""

    ns: Netns
    port: int
    dir: Path
    proc: subprocess.Popen[bytes]

    @property
    def target(self) -> str:
        return f"{self.ns.ns_addr}:{self.port}"

    def log(self) -> str:
        try:
            return (self.dir / "chronyd.log").read_text(errors="replace")
        except OSError:
            return ""


def chrony_config(ns: Netns, directory: Path, port: int) -> str:
    """A loopback-style chronyd -x server, bound to the namespace's address and open to the
    host's /30."""
    return "\n".join([
        f"port {port}",
        f"bindaddress {ns.ns_addr}",
        f"allow {ns.network}",
        "local stratum 8",
        "cmdport 0",
        f"bindcmdaddress {directory}/chronyd.sock",
        f"pidfile {directory}/chronyd.pid",
        f"driftfile {directory}/drift",
        "user root",
    ]) + "\n"


def stop_ns_chronyd(c: NsChronyd) -> None:
    """Stop by the PID we started (``ip netns exec`` execs chronyd: same PID), rm its dir."""
    stop_process(c.proc)
    shutil.rmtree(c.dir, ignore_errors=True)


def start_ns_chronyd(ns: Netns, port: int = NTP_PORT) -> NsChronyd:
    """``ip netns exec NS chronyd -x -d -f CONF``; wait (polling, with a deadline) until it
    answers from the host."""
    binary = require_binary("chronyd")
    directory = Path(tempfile.mkdtemp(prefix="ntpp-faults-chronyd-"))
    directory.chmod(0o700)  # chronyd refuses a command socket in a dir others can reach
    conf = directory / "chrony.conf"
    conf.write_text(chrony_config(ns, directory, port))
    with open(directory / "chronyd.log", "wb") as log:
        proc = subprocess.Popen(
            ns.exec_argv(binary, "-4", "-x", "-d", "-f", str(conf)),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=directory,
        )
    c = NsChronyd(ns, port, directory, proc)
    deadline = time.monotonic() + CHRONYD_START_DEADLINE
    why = "no answer within the deadline"
    while (polled := time.monotonic()) < deadline:
        if proc.poll() is not None:
            why = f"chronyd exited with {proc.returncode}"
            break
        if raw_ntp_query(ns.ns_addr, port, timeout=0.05) is not None:
            why = ""
            break
        # A closed port refuses at once: keep polls 10 ms apart rather than spin.
        time.sleep(max(0.0, polled + 0.01 - time.monotonic()))
    if why:
        log_text = c.log()
        stop_ns_chronyd(c)
        pytest.fail(f"chronyd in {ns.name} did not come up: {why}\n{log_text}", pytrace=False)
    pidfile = directory / "chronyd.pid"
    problem = ""
    if "Disabled control of system clock" not in c.log():
        problem = "chronyd did not confirm -x (clock control disabled)"
    elif not pidfile.exists() or int(pidfile.read_text().split()[0]) != proc.pid:
        problem = "chronyd's pidfile does not hold the PID we started"
    if problem:
        log_text = c.log()
        stop_ns_chronyd(c)
        pytest.fail(f"{problem}:\n{log_text}", pytrace=False)
    return c


@pytest.fixture(scope="module")
def ns_chronyd(netns: Netns) -> Iterator[NsChronyd]:
    """chronyd on port 123 inside the module's namespace."""
    c = start_ns_chronyd(netns)
    try:
        yield c
    finally:
        stop_ns_chronyd(c)


@pytest.fixture
def ns_chronyd_factory(netns: Netns) -> Iterator[Callable[[int], NsChronyd]]:
    """Extra chronyds in the namespace (on other ports), stopped by PID at test end."""
    started: list[NsChronyd] = []

    def factory(port: int) -> NsChronyd:
        c = start_ns_chronyd(netns, port)
        started.append(c)
        return c

    try:
        yield factory
    finally:
        for c in started:
            stop_ns_chronyd(c)


# --- nftables inside the namespace ------------------------------------------------------


def nft_counters(ns: Netns, family: str, table: str) -> dict[str, int]:
    """Packet counters of a table's rules, keyed by the rule's comment."""
    doc: dict[str, Any] = json.loads(ns.nft("-j", "list", "table", family, table))
    counters: dict[str, int] = {}
    for item in doc.get("nftables", []):
        rule = item.get("rule")
        if rule is None:
            continue
        for expr in rule.get("expr", []):
            if "counter" in expr:
                counters[rule.get("comment", str(rule.get("handle")))] = int(
                    expr["counter"]["packets"]
                )
    return counters
