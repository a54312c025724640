"""ntp.all_addresses in the real exporter process, with a name that has several addresses.

The exporter runs in a private mount namespace whose /etc/hosts, /etc/nsswitch.conf
(``hosts: files``) and /etc/resolv.conf (a nameserver on loopback) are the test's: the name
resolves without DNS, and the machine's files and resolver are never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Chronyd, free_tcp_port, integration_required, stop_process
from tests.integration.test_exporter import (
    START_DEADLINE,
    child_env,
    exporter_command,
    http_get,
    parse_exposition,
)

pytestmark = pytest.mark.integration

MODULES = """\
modules:
  every:
    timeout: 5s
    ntp:
      samples: 1
      reply_timeout: 1s
      all_addresses: true
      addresses_required: any
  all:
    timeout: 5s
    ntp:
      samples: 1
      reply_timeout: 1s
      all_addresses: true
"""


def skip_or_fail(reason: str) -> None:
    if integration_required():
        pytest.fail(f"{reason} (NTP_PROBE_REQUIRE_INTEGRATION=1 makes this fatal)",
                    pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def exporter_in_namespace(tmp_path: Path) -> Iterator[int]:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        skip_or_fail("a private mount namespace needs root and unshare (util-linux)")
    # multi.test: 127.0.0.1 (chronyd answers), 127.0.0.2 and ::1 (nothing listens there).
    (tmp_path / "hosts").write_text("127.0.0.1 localhost\n127.0.0.1 multi.test\n"
                                    "127.0.0.2 multi.test\n::1 multi.test\n")
    (tmp_path / "nsswitch.conf").write_text("hosts: files\n")
    (tmp_path / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    config = tmp_path / "modules.yaml"
    config.write_text(MODULES)
    port = free_tcp_port()
    mounts = " && ".join(f"mount --bind {tmp_path / name} /etc/{name}"
                         for name in ("hosts", "nsswitch.conf", "resolv.conf"))
    argv = ["unshare", "-m", "sh", "-c", f'{mounts} && exec "$0" "$@"', *exporter_command(),
            f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}"]
    with open(tmp_path / "exporter.log", "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=child_env())
    try:
        deadline = time.monotonic() + START_DEADLINE
        while not _up(port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("exporter did not start:\n"
                            + (tmp_path / "exporter.log").read_text(errors="replace"))
            time.sleep(0.05)  # poll interval, bounded by the deadline
        yield port
    finally:
        stop_process(proc)


def _up(port: int) -> bool:
    try:
        return http_get(f"http://127.0.0.1:{port}/-/healthy")[0] == 200
    except OSError:
        return False


def test_every_address_of_a_name(exporter_in_namespace: int, chronyd: Chronyd) -> None:
    base = f"http://127.0.0.1:{exporter_in_namespace}"
    status, _, body = http_get(f"{base}/probe?target=multi.test:{chronyd.port}&module=every")
    assert status == 200, body
    samples = parse_exposition(body)
    up = {labels["address"]: value for labels, value in samples["probe_ntp_address_up"]}
    assert up == {"127.0.0.1": 1, "127.0.0.2": 0, "::1": 0}, body
    assert samples["probe_success"] == [({}, 1)]
    assert samples["probe_ntp_stratum"] == [({}, 8)]  # the address that answered
    # With every address required, the dead ones fail the probe.
    _, _, body = http_get(f"{base}/probe?target=multi.test:{chronyd.port}&module=all")
    assert parse_exposition(body)["probe_success"] == [({}, 0)], body
