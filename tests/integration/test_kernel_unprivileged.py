"""The kernel prober for real: as an unprivileged user with no capabilities, and in the
real exporter process (kernel and hybrid modules, the latter against a real chronyd).

Reading the kernel clock (adjtimex / clock_adjtime with modes = 0) needs no privilege;
the exporter must never need CAP_SYS_TIME. The unprivileged run uses ``setpriv
--reuid=nobody --regid=nogroup --clear-groups --inh-caps=-all --bounding-set=-all``, which
only root can do.

This machine's kernel clock is undisciplined (TIME_ERROR, STA_UNSYNC, maxerror 16 s): the
hybrid probe still succeeds, because its verdict is the NTP server's; the kernel's state is
reported in probe_kernel_sync_status / probe_kernel_clock_state_info for alerting.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import ntp_probe
import ntp_probe.cli.main  # its third-party imports are what the nobody child needs
from ntp_probe.net import adjtimex
from tests.conftest import Chronyd, integration_required, require_binary, stop_process
from tests.integration.test_exporter import (
    Exporter,
    child_env,
    one,
    parse_exposition,
    promtool_check,
    start_exporter,
)

pytestmark = pytest.mark.integration

PROJECT_ROOT = Path(ntp_probe.__file__).resolve().parent.parent
NOBODY_UID = 65534
CHILD_TIMEOUT = 30.0
# Proves who the child runs as: uid, gid, groups, effective and bounding capabilities.
IDENTITY_CHECK = (
    "import os, ntp_probe.cli.main\n"
    "status = dict(line.split(':\\t', 1) for line in open('/proc/self/status').read()"
    ".splitlines() if ':\\t' in line)\n"
    "print(os.getuid(), os.geteuid(), os.getgid(), len(os.getgroups()), "
    "int(status['CapEff'], 16), int(status['CapBnd'], 16), ntp_probe.__file__)\n"
)
KERNEL_GAUGES = (
    "probe_kernel_offset_seconds", "probe_kernel_frequency_offset_ratio",
    "probe_kernel_maxerror_seconds", "probe_kernel_esterror_seconds",
    "probe_kernel_sync_status", "probe_kernel_clock_state_info",
    "probe_kernel_tai_offset_seconds",
)
CORRELATION_GAUGES = (
    "probe_kernel_divergence_seconds", "probe_kernel_offset_within_maxerror",
    "probe_kernel_coherence_score",
)


def skip_or_fail(reason: str) -> None:
    if integration_required():
        pytest.fail(f"{reason} (NTP_PROBE_REQUIRE_INTEGRATION=1 makes this fatal)",
                    pytrace=False)
    pytest.skip(reason)


@dataclass
class Nobody:
    """How to run this interpreter as nobody with no capabilities."""

    prefix: list[str]
    env: dict[str, str]
    note: str

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.prefix, sys.executable, *args], capture_output=True, text=True,
            timeout=CHILD_TIMEOUT, env=self.env, cwd="/", stdin=subprocess.DEVNULL,
        )


def _third_party_packages() -> set[Path]:
    """Top-level site-packages entries the CLI imports (ntp_probe itself excluded)."""
    roots = {Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
    found: set[Path] = set()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if not file:
            continue
        path = Path(file)
        for root in roots:
            if root in path.parents:
                top = root / path.relative_to(root).parts[0]
                if not top.name.startswith(("__editable__", "_distutils_hack")):
                    found.add(top)
    return found


def _link_or_copy(src: str, dst: str) -> object:
    """Hard-link when on the same filesystem (instant, and the files are read only
    here), else copy."""
    try:
        os.link(src, dst)
    except OSError:
        return shutil.copy2(src, dst)
    return dst


def _identity_ok(nobody: Nobody) -> tuple[bool, str]:
    probe = nobody.run("-c", IDENTITY_CHECK)
    return probe.returncode == 0, (probe.stdout + probe.stderr).strip()


@pytest.fixture(scope="module")
def nobody() -> Iterator[Nobody]:
    """setpriv to nobody; when this interpreter's site-packages are not readable by nobody
    (e.g. a pyenv under /root, mode 0700), a nobody-readable copy (hard links where
    possible) of the packages the CLI imports goes on PYTHONPATH. ntp_probe itself is
    always the source tree under test."""
    if os.geteuid() != 0:
        skip_or_fail("only root can setpriv to nobody")
    setpriv = require_binary("setpriv")
    prefix = [setpriv, "--reuid=nobody", "--regid=nogroup", "--clear-groups",
              "--inh-caps=-all", "--bounding-set=-all", "--"]
    direct = Nobody(prefix, child_env({"PYTHONPATH": str(PROJECT_ROOT)}), "direct")
    trivial = direct.run("-c", "print(1)")
    if trivial.returncode != 0 or trivial.stdout.strip() != "1":
        skip_or_fail(f"{sys.executable} cannot be run by nobody: "
                     f"{(trivial.stdout + trivial.stderr).strip()}")
    ok, output = _identity_ok(direct)
    if ok:
        yield direct
        return
    copy = Path(tempfile.mkdtemp(prefix="ntpp-nobody-"))
    try:
        copy.chmod(0o755)
        for top in _third_party_packages():
            if top.is_dir():
                shutil.copytree(top, copy / top.name, copy_function=_link_or_copy,
                                dirs_exist_ok=True)
            else:
                _link_or_copy(str(top), str(copy / top.name))
        env = child_env({"PYTHONPATH": f"{copy}{os.pathsep}{PROJECT_ROOT}"})
        copied = Nobody(prefix, env, f"site-packages copied to {copy} ({output[-200:]})")
        ok, output2 = _identity_ok(copied)
        if not ok:
            skip_or_fail(f"nobody cannot import ntp_probe with {sys.executable}: {output2}")
        yield copied
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def test_child_really_is_nobody_without_capabilities(nobody: Nobody) -> None:
    ok, output = _identity_ok(nobody)
    assert ok, output
    uid, euid, gid, groups, cap_eff, cap_bnd, source = output.split()[-7:]
    assert (int(uid), int(euid), int(gid)) == (NOBODY_UID, NOBODY_UID, NOBODY_UID), output
    assert int(groups) <= 1, output  # --clear-groups (getgroups may echo the gid)
    assert int(cap_eff) == 0 and int(cap_bnd) == 0, output
    assert Path(source).resolve() == Path(ntp_probe.__file__).resolve(), output


def test_kernel_probe_as_nobody_without_capabilities(nobody: Nobody) -> None:
    run = nobody.run("-m", "ntp_probe", "probe", "localhost", "--module", "kernel",
                     "--format", "json")
    assert run.returncode == 0, f"{nobody.note}\n{run.stdout}\n{run.stderr}"
    report = json.loads(run.stdout)
    assert report["success"] is True, report
    assert report["failure_reason"] is None
    metrics = {m["name"] + ("{" + ",".join(f'{k}="{v}"' for k, v in m["labels"].items()) + "}"
                            if m["labels"] else ""): m["value"] for m in report["metrics"]}
    for name in ("probe_kernel_maxerror_seconds", "probe_kernel_offset_seconds",
                 "probe_kernel_sync_status"):
        assert name in metrics, metrics
    # The unprivileged read sees the same kernel as root does.
    clock = adjtimex.read()
    assert metrics["probe_kernel_maxerror_seconds"] == pytest.approx(clock.maxerror, abs=0.05)
    assert metrics[f'probe_kernel_clock_state_info{{state="{clock.state}"}}'] == 1
    assert not any(name.startswith("probe_ntp_") for name in metrics), metrics


# --- the real exporter process --------------------------------------------------------------


@pytest.fixture(scope="module")
def exporter() -> Iterator[Exporter]:
    directory = Path(tempfile.mkdtemp(prefix="ntpp-kernel-exporter-"))
    e = start_exporter(directory)
    try:
        yield e
    finally:
        stop_process(e.proc)
        shutil.rmtree(directory, ignore_errors=True)


def test_exporter_kernel_module(exporter: Exporter) -> None:
    status, ctype, body = exporter.get("/probe?module=kernel&target=localhost")
    assert status == 200, body
    assert ctype.startswith("text/plain")
    samples = parse_exposition(body)
    assert one(samples, "probe_success") == 1, body
    missing = [name for name in KERNEL_GAUGES if name not in samples]
    assert not missing, f"missing {missing}\n{body}"
    clock = adjtimex.read()
    assert one(samples, "probe_kernel_maxerror_seconds") == pytest.approx(clock.maxerror,
                                                                          abs=0.05)
    assert samples["probe_kernel_clock_state_info"] == [({"state": clock.state}, 1.0)]
    flags = sorted(labels["flag"] for labels, _ in samples.get(
        "probe_kernel_status_flags_info", []))
    assert flags == sorted(clock.flags)
    assert "probe_ntp_failure_info" not in samples
    assert not [name for name in samples if name.startswith("probe_ntp_")], body
    check = promtool_check(body)
    assert check.returncode == 0, check.stdout + check.stderr + body


def test_exporter_hybrid_against_chronyd(exporter: Exporter, chronyd: Chronyd) -> None:
    status, _, body = exporter.get(f"/probe?module=hybrid&target={chronyd.target}")
    assert status == 200, body
    samples = parse_exposition(body)
    clock = adjtimex.read()
    # The NTP side is fine, so the probe succeeds even with an unsynchronised kernel.
    assert one(samples, "probe_success") == 1, body
    assert one(samples, "probe_ntp_stratum") == 8
    assert one(samples, "probe_ntp_samples_received") == 4
    missing = [name for name in (*KERNEL_GAUGES, *CORRELATION_GAUGES) if name not in samples]
    assert not missing, f"missing {missing}\n{body}"
    assert one(samples, "probe_kernel_sync_status") == (1 if clock.synchronized else 0)
    ntp_offset = one(samples, "probe_ntp_offset_seconds")
    kernel_offset = one(samples, "probe_kernel_offset_seconds")
    d = one(samples, "probe_kernel_divergence_seconds")
    assert d == pytest.approx(abs(ntp_offset - kernel_offset), abs=1e-9)
    assert one(samples, "probe_kernel_offset_within_maxerror") == (
        1 if abs(ntp_offset) <= one(samples, "probe_kernel_maxerror_seconds") else 0
    )
    if d <= 1e-3:  # chronyd on loopback against an undisciplined kernel: microseconds
        assert one(samples, "probe_kernel_coherence_score") == 1
    check = promtool_check(body)
    assert check.returncode == 0, check.stdout + check.stderr + body
