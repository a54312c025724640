"""source_ip_address with a link-local address, in a network namespace of the test's own.

The kernel binds a link-local address only with its interface (the scope id): the zone
written in the configuration must reach bind(). The namespace has only ``lo``, with
fe80::1 added to it; nothing outside it is touched.
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

# Run inside the namespace: a fake NTP server on [fe80::1%lo], probed from fe80::1%lo.
SCRIPT = """
import asyncio
from ntp_probe.engine.runner import run_probe
from ntp_probe.engine.targets import parse_target
from tests.behaviour.fake_server import FakeNTPServer
from tests.conftest import make_module

async def main() -> None:
    server = await FakeNTPServer.start(host="fe80::1%lo")
    try:
        module = make_module(source_ip_address="fe80::1%lo", preferred_ip_protocol="ip6")
        m, log = await run_probe(parse_target(f"[fe80::1%lo]:{server.port}"), module, 2.0)
        await server.drain()
        print(m.failure, [r.addr[0] for r in server.requests])
        print(log.text())
    finally:
        server.close()

asyncio.run(main())
"""


def test_a_link_local_source_address_is_bound_on_its_interface() -> None:
    require_namespaces()
    setup = "ip link set lo up && ip -6 addr add fe80::1/64 dev lo nodad && exec \"$@\""
    done = subprocess.run(
        ["unshare", "--net", "sh", "-c", setup, "sh", sys.executable, "-c", SCRIPT],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    first = done.stdout.splitlines()[0] if done.stdout else ""
    assert first == "None ['fe80::1']", (done.stdout, done.stderr)


# Run inside the namespace: a veth pair v0/v1 with fe80::1 on v0 and fe80::2 on v1, a fake
# NTP server on [fe80::2%v1], probed as [fe80::2%v0] (out of v0, into v1). One line of JSON
# per step.
ZONES = """
import asyncio, json, socket, subprocess
from ntp_probe.engine.runner import run_probe
from ntp_probe.engine.targets import parse_target
from ntp_probe.safety.guard import Guard
from ntp_probe.safety.kod import KodTable
from tests.behaviour.fake_server import FakeNTPServer, Send, kod
from tests.conftest import make_module

def link_up() -> None:
    for cmd in ("ip link add v0 type veth peer name v1", "ip link set v0 up",
                "ip link set v1 up", "ip -6 addr add fe80::1/64 dev v0 nodad",
                "ip -6 addr add fe80::2/64 dev v1 nodad"):
        subprocess.run(cmd.split(), check=True)

async def step(name, target, module, guard, server=None) -> None:
    before = len(server.requests) if server is not None else 0
    m, log = await run_probe(parse_target(target), module, 2.0, guard=guard)
    # A reply or a KoD came only to a request the server had read.
    received = len(server.requests) - before if server is not None else 0
    print(json.dumps({"step": name, "failure": m.failure and m.failure.value,
                      "detail": m.failure_detail, "sent": m.packets_sent,
                      "received": received, "log": log.text()}))

async def main() -> None:
    module = make_module(preferred_ip_protocol="ip6")
    guard = Guard(kod=KodTable())
    link_up()
    server = await FakeNTPServer.start(host="fe80::2%v1")
    port = server.port
    target = f"[fe80::2%v0]:{port}"
    await step("by name", target, module, guard, server)
    server.close()
    # The interface goes away and comes back with another index (a VPN reconnecting).
    old = socket.if_nametoindex("v0")
    subprocess.run("ip link del v0".split(), check=True)
    await step("interface gone", target, module, guard)
    link_up()
    assert socket.if_nametoindex("v0") != old
    server = await FakeNTPServer.start(host="fe80::2%v1", port=port)
    await step("interface back", target, module, guard, server)
    # One KoD memory for every spelling of the zone.
    server.behaviour = lambda req: [Send(kod(req, b"DENY"))]
    await step("kod by name", target, module, guard, server)
    index = socket.if_nametoindex("v0")
    await step("by index after kod", f"[fe80::2%{index}]:{port}", module, guard, server)
    server.close()

asyncio.run(main())
"""


def test_a_zone_is_looked_up_for_each_probe() -> None:
    """A target's zone names its interface when the probe runs, not when it was first
    parsed: an interface recreated with another index is found again, one that is gone
    fails the probe (local_error, nothing sent) rather than the request, and the zone's
    name and index share one KoD memory."""
    require_namespaces()
    done = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", ZONES],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    steps = {s["step"]: s for s in map(json.loads, done.stdout.splitlines())}
    assert len(steps) == 5, (done.stdout, done.stderr)
    assert steps["by name"]["failure"] is None, steps["by name"]["log"]
    assert (steps["by name"]["sent"], steps["by name"]["received"]) == (1, 1)
    gone = steps["interface gone"]
    assert gone["failure"] == "local_error", gone["log"]
    assert "fe80::2%v0: its zone names no interface of this host" in gone["detail"]
    assert gone["sent"] == 0
    back = steps["interface back"]
    assert (back["failure"], back["sent"], back["received"]) == (None, 1, 1), back["log"]
    assert steps["kod by name"]["failure"] == "kod_deny", steps["kod by name"]["log"]
    held = steps["by index after kod"]
    assert (held["failure"], held["sent"]) == ("backoff", 0), held["log"]
