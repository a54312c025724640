"""source_ip_address with a link-local address, in a network namespace of the test's own.

The kernel binds a link-local address only with its interface (the scope id): the zone
written in the configuration must reach bind(). The namespace has only ``lo``, with
fe80::1 added to it; nothing outside it is touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import integration_required

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
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        reason = "a network namespace needs root, unshare (util-linux) and ip (iproute2)"
        if integration_required():
            pytest.fail(f"{reason} (NTP_PROBE_REQUIRE_INTEGRATION=1 makes this fatal)",
                        pytrace=False)
        pytest.skip(reason)
    setup = "ip link set lo up && ip -6 addr add fe80::1/64 dev lo nodad && exec \"$@\""
    done = subprocess.run(
        ["unshare", "--net", "sh", "-c", setup, "sh", sys.executable, "-c", SCRIPT],
        capture_output=True, text=True, timeout=60, check=False, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    first = done.stdout.splitlines()[0] if done.stdout else ""
    assert first == "None ['fe80::1']", (done.stdout, done.stderr)
