"""The NTP prober against a real chronyd on loopback (``chronyd -x``: the clock is untouched).

chronyd with `local stratum 8` answers as stratum 8 with refid 127.127.1.1 (its local
reference), leap 0, zero root delay and dispersion; without ``local stratum`` it answers
stratum 0 with a zero refid and LI 3, which is not a Kiss-o'-Death.
"""

from __future__ import annotations

import re
import secrets
import socket
import subprocess
import time
from collections.abc import Callable

import pytest

from ntp_probe.config.load import load_config, parse_config
from ntp_probe.config.schema import Config, Module
from ntp_probe.engine.context import ProbeLog
from ntp_probe.engine.result import Measurement
from ntp_probe.engine.runner import probe_timeout, run_probe
from ntp_probe.engine.targets import parse_target
from ntp_probe.proto.ntp import packet as ntp
from tests.conftest import Chronyd, gauges, ntp_samples, require_binary

pytestmark = pytest.mark.integration

MEASUREMENT_GAUGES = (
    "probe_ntp_offset_seconds", "probe_ntp_rtt_seconds", "probe_ntp_jitter_seconds",
    "probe_ntp_offset_stddev_seconds", "probe_ntp_stratum", "probe_ntp_leap_indicator",
    "probe_ntp_precision_seconds", "probe_ntp_root_delay_seconds",
    "probe_ntp_root_dispersion_seconds", "probe_ntp_root_distance_seconds",
    "probe_ntp_reference_timestamp_seconds", "probe_ntp_server_processing_seconds",
    "probe_ntp_causality_violation_seconds", "probe_ntp_server_info",
)


@pytest.fixture(scope="module")
def packaged() -> Config:
    return load_config(None)


def value(result: Measurement, name: str) -> float:
    """The single (label-free or labelled) value of a gauge; fails if absent or repeated."""
    found = [v for n, _, v in gauges(result) if n == name]
    assert len(found) == 1, f"{name}: expected one series, got {found} in {gauges(result)}"
    return found[0]


def labels(result: Measurement, name: str) -> dict[str, str]:
    found = [dict(lab) for n, lab, _ in gauges(result) if n == name]
    assert len(found) == 1, f"{name}: expected one series, got {found}"
    return found[0]


def names(result: Measurement) -> set[str]:
    return {n for n, _, _ in gauges(result)}


async def probe(
    c: Chronyd, module: Module, budget: float | None = None
) -> tuple[Measurement, ProbeLog]:
    """run_probe against ``c`` with the module's timeout, or ``budget`` seconds."""
    log = ProbeLog(c.target, module.name)
    result, _ = await run_probe(
        parse_target(c.target), module, module.timeout if budget is None else budget, log
    )
    return result, log


def assert_healthy_stratum8(result: Measurement, log: ProbeLog, samples: int) -> None:
    text = "\n".join(log.lines)
    assert result.success, f"failure={result.failure}\n{text}"
    assert result.failure is None
    assert abs(value(result, "probe_ntp_offset_seconds")) < 0.5e-3, text
    rtt = value(result, "probe_ntp_rtt_seconds")
    assert 0 < rtt < 0.1, text
    assert value(result, "probe_ntp_stratum") == 8
    assert value(result, "probe_ntp_leap_indicator") == 0
    assert value(result, "probe_ntp_root_delay_seconds") == 0
    assert value(result, "probe_ntp_root_dispersion_seconds") == 0
    # Root distance is (rtt + 0)/2 + 0 for chrony's local reference.
    assert value(result, "probe_ntp_root_distance_seconds") == pytest.approx(rtt / 2)
    # T3 - T2 (excluded from the rtt): chrony holds a request for microseconds.
    assert 0 <= value(result, "probe_ntp_server_processing_seconds") < 0.01
    assert 0 < value(result, "probe_ntp_precision_seconds") < 1e-3
    # chrony's reference time is when its local reference last updated: recent, not future.
    ref = value(result, "probe_ntp_reference_timestamp_seconds")
    assert time.time() - 3600 < ref <= time.time() + 1, ref
    assert labels(result, "probe_ntp_server_info") == {"refid": "127.127.1.1", "version": "4"}
    assert value(result, "probe_ntp_samples_sent") == samples
    assert value(result, "probe_ntp_samples_received") == samples
    assert value(result, "probe_ntp_packet_loss_ratio") == 0
    assert value(result, "probe_ip_protocol") == 4
    assert "probe_ntp_kiss_code_info" not in names(result)
    assert result.packets_sent == samples
    sample_lines = [line for line in log.lines if re.search(r"sample \d+: T1=", line)]
    assert len(sample_lines) == samples, text
    # T4 must come from the kernel's SO_TIMESTAMPNS, not from user space.
    assert all("(kernel T1, kernel T4)" in line for line in sample_lines), text


async def test_local_module_succeeds(chronyd: Chronyd, packaged: Config) -> None:
    result, log = await probe(chronyd, packaged.modules["local"])
    assert_healthy_stratum8(result, log, samples=4)
    assert len(ntp_samples(result)) == 4
    assert sum(s["selected"] for s in ntp_samples(result)) == 1
    # The selected sample is the one with the smallest delay (clock filter).
    best = min(ntp_samples(result), key=lambda s: s["rtt_seconds"])
    assert best["selected"]
    assert best["rtt_seconds"] == value(result, "probe_ntp_rtt_seconds")
    assert value(result, "probe_ntp_jitter_seconds") >= 0
    assert value(result, "probe_ntp_causality_violation_seconds") < 1e-3  # local's limit


async def test_ntp_fast_module_succeeds(chronyd: Chronyd, packaged: Config) -> None:
    result, log = await probe(chronyd, packaged.modules["ntp_fast"])
    assert_healthy_stratum8(result, log, samples=1)
    assert value(result, "probe_ntp_jitter_seconds") == 0
    assert value(result, "probe_ntp_offset_stddev_seconds") == 0


async def test_probes_really_reach_chronyd(chronyd: Chronyd, packaged: Config) -> None:
    """chronyd's own counters see every request of a `local` burst."""
    chronyc = require_binary("chronyc")

    def received() -> int:
        out = subprocess.run(
            [chronyc, "-h", str(chronyd.socket_path), "-n", "serverstats"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout
        m = re.search(r"NTP packets received\s*:\s*(\d+)", out)
        assert m, out
        return int(m.group(1))

    before = received()
    result, _ = await probe(chronyd, packaged.modules["local"])
    assert result.success
    assert received() - before == 4


async def test_packaged_ntp_module_shortened_by_scrape_timeout(
    chronyd: Chronyd, packaged: Config
) -> None:
    """3 samples 2 s apart cannot fit a 2 s scrape (1.5 s after the offset): one is sent,
    the probe succeeds, and it ends inside its budget."""
    module = packaged.modules["ntp"]
    timeout = probe_timeout(module.timeout, "2", 0.5)
    assert timeout == pytest.approx(1.5)
    started = time.monotonic()
    result, log = await probe(chronyd, module, timeout)
    elapsed = time.monotonic() - started
    assert_healthy_stratum8(result, log, samples=1)
    assert any("burst shortened to 1 of 3 samples" in line for line in log.lines), log.lines
    assert elapsed < timeout
    assert result.duration < timeout


def test_raw_chronyd_reply_decodes(chronyd: Chronyd) -> None:
    """A request from encode_request over a plain socket; chrony's reply through decode()."""
    nonce = secrets.randbits(64) | 1
    request = ntp.encode_request(nonce, 4)
    assert len(request) == 48
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        s.connect((chronyd.host, chronyd.port))
        s.send(request)
        data = s.recv(2048)
    assert len(data) == 48  # no extension fields, no MAC
    reply = ntp.decode(data)
    assert reply.mode == ntp.Mode.SERVER
    assert reply.version == 4
    assert reply.stratum == 8
    assert reply.leap == ntp.Leap.NONE
    assert reply.refid == bytes.fromhex("7f7f0101")
    assert reply.refid_text == "127.127.1.1"
    assert reply.kiss_code is None
    assert reply.origin_ts == nonce
    assert reply.transmit_ts != 0
    assert reply.receive_ts != 0
    assert reply.reference_ts != 0
    assert ntp.ts_diff(reply.transmit_ts, reply.receive_ts) >= 0
    assert reply.poll == 0  # chrony echoes the request's poll
    assert reply.precision < 0
    assert reply.root_delay == 0 and reply.root_dispersion == 0
    assert reply.extensions == () and reply.mac is None
    # The server's transmit time, read against our clock, is now (same clock, loopback).
    t3 = ntp.ts_to_unix_ns(reply.transmit_ts, time.time_ns()) / 1e9
    assert abs(t3 - time.time()) < 1.0
    # Re-encoding the decoded packet gives chrony's bytes back.
    assert ntp.encode_packet(reply) == data


def test_raw_chronyd_answers_version_3(chronyd: Chronyd) -> None:
    nonce = secrets.randbits(64) | 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        s.connect((chronyd.host, chronyd.port))
        s.send(ntp.encode_request(nonce, 3))
        reply = ntp.decode(s.recv(2048))
    assert (reply.version, reply.mode, reply.origin_ts) == (3, 4, nonce)


async def test_version_3_module_succeeds(chronyd: Chronyd) -> None:
    config = parse_config(
        "modules:\n  v3:\n    prober: ntp\n    timeout: 2s\n"
        "    ntp:\n      version: 3\n      samples: 1\n      reply_timeout: 500ms\n",
        "test",
    )
    result, log = await probe(chronyd, config.modules["v3"])
    assert result.success, (result.failure, log.lines)
    assert labels(result, "probe_ntp_server_info") == {"refid": "127.127.1.1", "version": "3"}
    assert value(result, "probe_ntp_stratum") == 8


async def test_unsynchronised_chronyd_fails_stratum_unsynchronized(
    chronyd_factory: Callable[..., Chronyd], packaged: Config
) -> None:
    unsync = chronyd_factory(synchronised=False)
    result, log = await probe(unsync, packaged.modules["ntp_fast"])
    text = "\n".join(log.lines)
    assert not result.success
    assert result.failure == "stratum_unsynchronized", text
    # Not a Kiss-o'-Death: a zero refid at stratum 0 is an unsynchronised server.
    assert "probe_ntp_kiss_code_info" not in names(result)
    assert "Kiss-o'-Death" not in text
    # The reply passed the packet checks, so the measurement gauges are still emitted.
    missing = set(MEASUREMENT_GAUGES) - names(result)
    assert not missing, missing
    assert value(result, "probe_ntp_stratum") == 0
    assert value(result, "probe_ntp_leap_indicator") == 3
    assert value(result, "probe_ntp_root_delay_seconds") == 1.0
    assert value(result, "probe_ntp_root_dispersion_seconds") == 1.0
    assert value(result, "probe_ntp_reference_timestamp_seconds") == 0
    assert abs(value(result, "probe_ntp_offset_seconds")) < 0.5e-3
    assert labels(result, "probe_ntp_server_info") == {"refid": "00000000", "version": "4"}
    assert value(result, "probe_ntp_samples_sent") == 1
    assert value(result, "probe_ntp_samples_received") == 1
    assert value(result, "probe_ntp_packet_loss_ratio") == 0


def test_raw_unsynchronised_chronyd_reply(chronyd_factory: Callable[..., Chronyd]) -> None:
    unsync = chronyd_factory(synchronised=False)
    nonce = secrets.randbits(64) | 1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2.0)
        s.connect((unsync.host, unsync.port))
        s.send(ntp.encode_request(nonce))
        reply = ntp.decode(s.recv(2048))
    assert (reply.leap, reply.version, reply.mode, reply.stratum) == (3, 4, 4, 0)
    assert reply.refid == bytes(4)
    assert reply.kiss_code is None
    assert reply.reference_ts == 0
    assert reply.origin_ts == nonce and reply.transmit_ts != 0

