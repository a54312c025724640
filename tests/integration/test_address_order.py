"""The order of a name's addresses, in a network and mount namespace of the test's own.

blackbox_exporter probes the first address of the preferred family in the order Go's
resolver gives, RFC 6724's destination rules; the C library sorts by RFC 3484's older
table instead. The namespace's ``lo`` carries addresses of several scopes and prefixes
(and one route), and a hosts file of its own lists names whose addresses come in an
order those rules change; nothing outside the namespace is touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_namespaces

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

SETUP = """set -e
ip link set lo up
ip addr add 198.51.100.1/24 dev lo
ip -6 addr add 2001:db8::1/64 dev lo nodad
ip -6 addr add fd00::1/64 dev lo nodad
ip -6 route add 2001:db8:0:5::/64 dev lo
mount --bind "$1/hosts" /etc/hosts
mount --bind "$1/nsswitch.conf" /etc/nsswitch.conf
mount --bind "$1/resolv.conf" /etc/resolv.conf
shift
exec "$@"
"""

HOSTS = """\
198.51.100.7 v4.test
10.1.2.3 v4.test
127.0.0.7 v4.test
169.254.1.1 v4.test
127.0.0.1 v4.test
2001:db8:0:5::7 v6.test
fe80::7 v6.test
fd00::7 v6.test
2001:db8::7 v6.test
2001:db8:9::7 v6.test
fd00::7 ula.test
2001:db8::7 ula.test
"""

SCRIPT = """
import asyncio, json, socket
from ntp_probe.net.resolve import HostsFile, Resolver

async def main() -> None:
    # The C library asks DNS first here, so the exporter's resolver asks the C library.
    files, libc_first = Resolver(hosts=HostsFile("/etc/hosts")), Resolver()
    for name, family in (("v4.test", socket.AF_INET), ("v6.test", socket.AF_INET6),
                         ("ula.test", socket.AF_INET6)):
        libc = []
        for info in socket.getaddrinfo(name, 123, family, socket.SOCK_DGRAM):
            if info[4][0] not in libc:
                libc.append(info[4][0])
        print(json.dumps({
            "name": name, "libc": libc,
            "hosts": [a for _, a in (await files.lookup_all(name, family))[0]],
            "getaddrinfo": [a for _, a in (await libc_first.lookup_all(name, family))[0]]}))

asyncio.run(main())
"""


def test_a_names_addresses_come_in_go_s_rfc_6724_order(tmp_path: Path) -> None:
    require_namespaces()
    (tmp_path / "hosts").write_text(HOSTS)
    # DNS first, but the namespace's resolver is no one (nothing listens on its
    # loopback): every name is answered from the hosts file by the C library.
    (tmp_path / "nsswitch.conf").write_text("hosts: dns files\n")
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    done = subprocess.run(
        ["unshare", "--mount", "--net", "sh", "-c", SETUP, "sh", str(tmp_path),
         sys.executable, "-c", SCRIPT],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    found = {entry["name"]: entry for entry in map(json.loads, done.stdout.splitlines())}
    assert len(found) == 3, (done.stdout, done.stderr)
    # Rule 1: no route last; rule 8: the loopback (link scope) addresses before the global
    # one; no rule 9 for IPv4 (Go's choice), so 127.0.0.7 stays before 127.0.0.1, where the
    # C library puts 127.0.0.1 first. blackbox's ICMP probe picks 127.0.0.7.
    assert found["v4.test"]["hosts"] == [
        "127.0.0.7", "127.0.0.1", "198.51.100.7", "10.1.2.3", "169.254.1.1"]
    assert found["v4.test"]["libc"][0] == "127.0.0.1"
    # Rule 6: a unique local address (precedence 3) after global ones (40); rule 9:
    # 2001:db8::7 shares 64 bits with its source 2001:db8::1, 2001:db8:0:5::7 only 61;
    # rule 1: a link-local address without its interface, and one without a route, last.
    assert found["v6.test"]["hosts"] == [
        "2001:db8::7", "2001:db8:0:5::7", "fd00::7", "fe80::7", "2001:db8:9::7"]
    assert found["v6.test"]["libc"][0] == "fd00::7"
    # What the C library sorted by the older table is sorted again.
    assert found["ula.test"]["libc"] == ["fd00::7", "2001:db8::7"]
    assert found["ula.test"]["getaddrinfo"] == ["2001:db8::7", "fd00::7"]
    assert found["ula.test"]["hosts"] == ["2001:db8::7", "fd00::7"]
