"""Behaviour of the NTP prober against an in-process fake server on 127.0.0.1.

Each test scripts the server's answers and checks what ``run_probe`` reports: the
measurement, the failure reason (the first failing check in the contract's order), which gauges
are emitted and the packet accounting.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ntp_probe.cli import report
from ntp_probe.config.load import load_config
from ntp_probe.engine.context import PrefixedLog, ProbeContext, ProbeLog
from ntp_probe.engine.result import NO_TIME, Measurement
from ntp_probe.engine.runner import probe_timeout, run_probe
from ntp_probe.engine.targets import parse_target
from ntp_probe.exposition.render import render
from ntp_probe.probers import ntp as ntp_prober
from ntp_probe.proto.ntp import packet as ntp
from tests.behaviour import fake_server
from tests.behaviour.fake_server import (
    LOOPBACK,
    FakeNTPServer,
    Request,
    Send,
    answer,
    forge_unreachable,
    kod,
    reply,
    require_raw_socket,
    silent,
    truncated,
    wrong_mode,
    wrong_origin,
    zero_transmit,
)
from tests.conftest import make_module, names, ntp_samples, probe, value

# The fixture, made visible to pytest in this module.
fake_ntp = fake_server.fake_ntp

# Gauges that exist only when at least one reply passed the packet checks.
MEASUREMENT_GAUGES = (
    "probe_ntp_offset_seconds",
    "probe_ntp_rtt_seconds",
    "probe_ntp_jitter_seconds",
    "probe_ntp_offset_stddev_seconds",
    "probe_ntp_stratum",
    "probe_ntp_leap_indicator",
    "probe_ntp_precision_seconds",
    "probe_ntp_root_delay_seconds",
    "probe_ntp_root_dispersion_seconds",
    "probe_ntp_root_distance_seconds",
    "probe_ntp_reference_timestamp_seconds",
    "probe_ntp_server_processing_seconds",
    "probe_ntp_causality_violation_seconds",
    "probe_ntp_server_info",
)
# On loopback the measured offset is off by at most half the selected sample's round trip
# (T2 and T3 are stamped between T1 and T4), plus timestamp rounding. An idle machine's round
# trip is well under 2 ms, so this is "within 1 ms"; a loaded one stretches it, not the rule.
ROUNDING = 2e-6
SLACK = 0.15  # scheduling slack on top of a deadline (an upper bound, not a benchmark)


def assert_no_measurement(result: Measurement) -> None:
    leaked = names(result) & set(MEASUREMENT_GAUGES)
    assert not leaked, f"measurement gauges emitted without a usable reply: {sorted(leaked)}"


def assert_measurement(result: Measurement) -> None:
    missing = set(MEASUREMENT_GAUGES) - names(result)
    assert not missing, f"measurement gauges missing: {sorted(missing)}"


def assert_offset(result: Measurement, injected: float) -> None:
    """The reported offset is the injected one, within half the reported round trip."""
    rtt = value(result, "probe_ntp_rtt_seconds")
    assert rtt is not None and 0 <= rtt < 0.05, rtt
    error = offset_of(result) - injected
    assert abs(error) <= rtt / 2 + ROUNDING, f"offset off by {error:+.6f}s with rtt {rtt:.6f}s"


def offset_of(result: Measurement) -> float:
    offset = value(result, "probe_ntp_offset_seconds")
    assert offset is not None, "no offset reported"
    return offset


def counts(result: Measurement) -> tuple[float | None, float | None, float | None]:
    return (
        value(result, "probe_ntp_samples_sent"),
        value(result, "probe_ntp_samples_received"),
        value(result, "probe_ntp_packet_loss_ratio"),
    )


# --- measurement -----------------------------------------------------------------------


@pytest.mark.parametrize("injected", [0.25, -1000.0])
async def test_injected_offset_is_measured(fake_ntp: FakeNTPServer, injected: float) -> None:
    fake_ntp.behaviour = answer(offset=injected)
    result, log = await probe(fake_ntp.target, make_module(samples=3))
    assert result.success, (result.failure, log.text())
    assert result.failure is None
    assert_offset(result, injected)
    rtt = value(result, "probe_ntp_rtt_seconds")
    assert rtt is not None and 0 <= rtt < 0.05
    assert counts(result) == (3, 3, 0)
    assert f"port {fake_ntp.port}, up to 3 samples every " in log.text()
    assert value(result, "probe_ip_protocol") == 4
    assert value(result, "probe_ntp_stratum") == 2
    assert value(result, "probe_ntp_server_info", refid="127.0.0.1", version="4") == 1
    assert_measurement(result)
    if sys.platform.startswith("linux"):
        assert "(kernel T1, kernel T4)" in log.text()
        assert value(result, "probe_ntp_timestamping_info", tx="kernel", rx="kernel") == 1
        # Each stamp also readable, in UTC to the nanosecond.
        assert re.search(r"T1=[0-9a-f]{16} \(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z\)",
                         log.text())


async def test_offset_across_the_ntp_era_boundary(fake_ntp: FakeNTPServer) -> None:
    # A server 13 years ahead is past 2036-02-07: its timestamps are in NTP era 1.
    injected = 13 * 365.25 * 86400
    fake_ntp.behaviour = answer(offset=injected)
    result, log = await probe(fake_ntp.target, make_module(samples=2))
    assert result.success, (result.failure, log.text())
    assert_offset(result, injected)
    ref = value(result, "probe_ntp_reference_timestamp_seconds")
    assert ref is not None and abs(ref - (time.time() + injected - 10.0)) < 2.0


@pytest.mark.parametrize("leap", [1, 2])
async def test_leap_warning_is_not_a_failure(fake_ntp: FakeNTPServer, leap: int) -> None:
    fake_ntp.behaviour = answer(leap=leap)
    result, log = await probe(fake_ntp.target, make_module())
    assert result.success, (result.failure, log.text())
    assert value(result, "probe_ntp_leap_indicator") == leap


async def test_zero_reference_time_is_not_stale(fake_ntp: FakeNTPServer) -> None:
    fake_ntp.behaviour = answer(reference_ts=0)
    result, log = await probe(fake_ntp.target, make_module())
    assert result.success, (result.failure, log.text())
    assert value(result, "probe_ntp_reference_timestamp_seconds") == 0


@pytest.mark.parametrize(
    ("stratum", "refid", "text"),
    [
        (1, b"GPS\0", "GPS"),
        (2, bytes([192, 0, 2, 7]), "192.0.2.7"),
        (3, b"\x0a\0\0\x01", "10.0.0.1"),
    ],
)
async def test_server_info_refid(
    fake_ntp: FakeNTPServer, stratum: int, refid: bytes, text: str
) -> None:
    fake_ntp.behaviour = answer(stratum=stratum, refid=refid)
    result, log = await probe(fake_ntp.target, make_module())
    assert result.success, (result.failure, log.text())
    assert value(result, "probe_ntp_server_info", refid=text, version="4") == 1


async def test_reported_values_come_from_the_reply(fake_ntp: FakeNTPServer) -> None:
    # The server holds the request 2 ms (T3 = T2 + 2 ms) and sends the reply 3 ms after
    # reading the request, so the claimed processing fits inside the round trip.
    fake_ntp.behaviour = lambda req: [
        Send(
            reply(req, stratum=3, root_delay=0.25, root_dispersion=0.125, precision=-10,
                  processing=0.002, reference_age=100.0),
            delay=0.003,
        )
    ]
    result, log = await probe(fake_ntp.target, make_module())
    assert result.success, (result.failure, log.text())
    assert value(result, "probe_ntp_stratum") == 3
    assert value(result, "probe_ntp_root_delay_seconds") == pytest.approx(0.25, abs=1e-4)
    assert value(result, "probe_ntp_root_dispersion_seconds") == pytest.approx(0.125, abs=1e-4)
    assert value(result, "probe_ntp_precision_seconds") == 2.0**-10
    processing = value(result, "probe_ntp_server_processing_seconds")
    assert processing is not None and 0.002 <= processing < 0.01
    rtt = value(result, "probe_ntp_rtt_seconds")
    assert rtt is not None
    distance = value(result, "probe_ntp_root_distance_seconds")
    assert distance == pytest.approx((rtt + 0.25) / 2 + 0.125, abs=1e-4)
    ref = value(result, "probe_ntp_reference_timestamp_seconds")
    assert ref is not None and abs(ref - (time.time() - 100.0)) < 2.0


# --- Kiss-o'-Death ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "reason"),
    [(b"RATE", "kod_rate"), (b"DENY", "kod_deny"), (b"RSTR", "kod_rstr"), (b"XYZW", "kod_other")],
)
async def test_kod_stops_the_burst(fake_ntp: FakeNTPServer, code: bytes, reason: str) -> None:
    fake_ntp.behaviour = lambda req: [Send(kod(req, code))]
    result, log = await probe(fake_ntp.target, make_module(samples=3))
    await fake_ntp.drain()
    assert len(fake_ntp.requests) == 1, log.text()
    assert not result.success
    assert result.failure == reason
    assert value(result, "probe_ntp_kiss_code_info", code=code.decode()) == 1
    assert counts(result) == (1, 1, 0)
    assert_no_measurement(result)


async def test_replies_of_an_unsynchronised_server_are_left_out_of_the_selection(
        fake_ntp: FakeNTPServer) -> None:
    # One backend of an address synchronised (its reply held 20 ms), the rest not (leap 3,
    # stratum 16, at once): RFC 5905's packet() and chrony drop the unsynchronised replies
    # before the clock filter. They were selected (the smallest delay) and failed the probe,
    # or, the other way round, fed the jitter.
    def behaviour(req: Request) -> list[Send]:
        if req.index == 0:
            return [Send(reply(req, offset=0.25), delay=0.02)]
        return [Send(reply(req, offset=-0.5, leap=3, stratum=16, refid=b"STEP"))]

    fake_ntp.behaviour = behaviour
    result, log = await probe(fake_ntp.target, make_module(samples=4))
    assert result.failure is None, log.text()
    assert_offset(result, 0.25)
    assert value(result, "probe_ntp_stratum") == 2
    assert value(result, "probe_ntp_rtt_seconds") >= 0.02  # type: ignore[operator]
    assert value(result, "probe_ntp_jitter_seconds") == 0  # the one usable sample
    assert value(result, "probe_ntp_offset_stddev_seconds") == 0
    assert counts(result) == (4, 4, 0)
    assert "3 of 4 replies from an unsynchronised server" in log.text()
    # Every reply unsynchronised: the selected one shows why the server fails.
    fake_ntp.behaviour = lambda req: [Send(reply(req, leap=3, stratum=16, refid=b"STEP"))]
    result, log = await probe(fake_ntp.target, make_module(samples=2))
    assert result.failure == "stratum_unsynchronized", log.text()
    assert value(result, "probe_ntp_stratum") == 16


async def test_kod_after_a_good_sample_keeps_the_measurement(fake_ntp: FakeNTPServer) -> None:
    def behaviour(req: Request) -> list[Send]:
        if req.index == 0:
            return [Send(reply(req, offset=0.25))]
        return [Send(kod(req, b"RATE"))]

    fake_ntp.behaviour = behaviour
    result, log = await probe(fake_ntp.target, make_module(samples=3))
    await fake_ntp.drain()
    assert len(fake_ntp.requests) == 2, log.text()
    assert result.failure == "kod_rate"
    assert re.search(r"sample 2: T1=[0-9a-f]{16} \(\S+Z\) T2=\S+ .*T4=\S+ \(\S+Z\) "
                     r"Kiss-o'-Death RATE", log.text()), log.text()
    assert_offset(result, 0.25)
    assert counts(result) == (2, 2, 0)


@pytest.mark.parametrize("spoof", ["wrong_origin", "other_port"])
async def test_spoofed_kod_does_not_stop_the_burst(fake_ntp: FakeNTPServer, spoof: str) -> None:
    def behaviour(req: Request) -> list[Send]:
        assert req.packet is not None
        if spoof == "wrong_origin":
            bogus = Send(kod(req, b"DENY", origin=req.packet.transmit_ts ^ 1))
        else:
            bogus = Send(kod(req, b"DENY"), from_other_port=True)
        return [bogus, Send(reply(req, offset=0.25), delay=0.005)]

    fake_ntp.behaviour = behaviour
    result, log = await probe(fake_ntp.target, make_module(samples=3))
    assert result.success, (result.failure, log.text())
    assert "probe_ntp_kiss_code_info" not in names(result)
    assert counts(result) == (3, 3, 0)
    assert_offset(result, 0.25)


@pytest.mark.parametrize("leap", [0, 3])
async def test_stratum_0_zero_refid_is_unsynchronized_not_kod(
    fake_ntp: FakeNTPServer, leap: int
) -> None:
    # An unsynchronised chrony: stratum 0, refid 0 (and LI 3).
    fake_ntp.behaviour = answer(stratum=0, refid=b"\0\0\0\0", leap=leap, offset=0.25)
    result, _ = await probe(fake_ntp.target, make_module(samples=2))
    assert result.failure == "stratum_unsynchronized"
    assert not any(name == "probe_ntp_kiss_code_info" for name in names(result))
    assert_measurement(result)
    assert value(result, "probe_ntp_stratum") == 0
    assert_offset(result, 0.25)
    assert counts(result) == (2, 2, 0)


# --- packet checks ---------------------------------------------------------------------


async def test_wrong_origin_is_discarded_and_the_genuine_reply_used(
    fake_ntp: FakeNTPServer,
) -> None:
    fake_ntp.behaviour = lambda req: [
        Send(wrong_origin(req, offset=100.0)),
        Send(reply(req, offset=0.25)),
    ]
    result, log = await probe(fake_ntp.target, make_module())
    assert result.success, (result.failure, log.text())
    assert_offset(result, 0.25)
    assert counts(result) == (1, 1, 0)
    assert "matches no request" in log.text()


async def test_a_burst_of_junk_spanning_several_reads_does_not_hide_the_reply(
    fake_ntp: FakeNTPServer,
) -> None:
    # More than one wakeup reads (64), fewer than the socket buffer holds.
    flood = 150
    fake_ntp.behaviour = lambda req: [
        *(Send(wrong_origin(req, offset=100.0)) for _ in range(flood)),
        Send(reply(req, offset=0.25)),
    ]
    result, log = await probe(fake_ntp.target, make_module(reply_timeout=2.0), timeout=5.0)
    assert result.success, (result.failure, log.lines[-3:])
    assert_offset(result, 0.25)
    # The log stays compact: a few discards one by one, the rest counted by kind.
    text = log.text()
    assert text.count("reply discarded: origin") == 5
    assert f"{flood - 5} more datagrams not logged one by one: {flood - 5} origin matches " \
        "no request" in text
    assert len(log.lines) < 20


def test_the_probe_log_is_bounded_but_keeps_its_verdict() -> None:
    log = ProbeLog()
    for i in range(ProbeLog.MAX_LINES + 7):
        log(f"line {i}")
    log("verdict: success", essential=True)
    assert len(log.lines) == ProbeLog.MAX_LINES + 1
    assert log.lines[-1].endswith("verdict: success")
    assert log.suppressed == 7
    assert log.text().endswith("verdict: success\n... 7 more lines not kept\n")


def test_a_costly_line_is_formatted_only_when_the_log_is_read() -> None:
    calls: list[int] = []

    def line() -> str:
        calls.append(1)
        return "sample 1: costly"

    log = ProbeLog()
    PrefixedLog(log, "[192.0.2.1] ")(line)
    assert calls == []
    assert log.lines[0].endswith("[192.0.2.1] sample 1: costly")
    assert calls == [1]


async def test_ipv6_target_is_measured_and_checked() -> None:
    server = await FakeNTPServer.start(answer(offset=0.25), host="::1")
    try:
        result, log = await probe(server.target, make_module(samples=2))
        assert result.success, (result.failure, log.text())
        assert_offset(result, 0.25)
        assert value(result, "probe_ip_protocol") == 6
        # A reply from another port of the same IPv6 host is still discarded and logged.
        server.behaviour = lambda req: [Send(reply(req), from_other_port=True)]
        result, log = await probe(server.target, make_module(samples=1, reply_timeout=0.2))
        assert result.failure == "invalid_reply"
        assert "not the target" in log.text()
    finally:
        server.close()


async def test_ipv6_closed_port_fails_fast() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    log = ProbeLog()
    result, _ = await run_probe(parse_target(f"[::1]:{port}"), make_module(reply_timeout=2.0),
                             5.0, log)
    assert result.failure == "unreachable"
    # The ICMP error ended the wait and the burst: no 2 s reply timeout sat out, no second
    # request sent to a port where nothing listens.
    assert "ICMP port unreachable" in log.text()
    assert counts(result) == (1, 0, 1)


@pytest.mark.parametrize("code", [3, 1], ids=["port", "host"])
async def test_an_unreachable_from_another_host_yields_to_a_reply(fake_ntp: FakeNTPServer,
                                                                  code: int) -> None:
    require_raw_socket()

    def forged_then_genuine(req: Request) -> list[Send]:
        forge_unreachable(req.addr, fake_ntp.port, "127.0.0.9", code)
        return [Send(reply(req), delay=0.05)]

    fake_ntp.behaviour = forged_then_genuine
    result, log = await probe(fake_ntp.target, make_module(reply_timeout=1.0))
    assert result.success, (result.failure, log.text())
    assert "from 127.0.0.9, not the target: the outcome unless a reply comes in time" in (
        log.text())


async def test_an_unreachable_from_the_path_counts_when_no_reply_comes(
    fake_ntp: FakeNTPServer,
) -> None:
    # What a firewall's reject on the way looks like: no reply, an error from another host.
    require_raw_socket()

    def rejected(req: Request) -> list[Send]:
        forge_unreachable(req.addr, fake_ntp.port, "127.0.0.9")
        return []

    fake_ntp.behaviour = rejected
    result, log = await probe(fake_ntp.target, make_module(samples=2, reply_timeout=0.2))
    assert result.failure == "unreachable", log.text()
    assert "sample 2: ICMP port unreachable from 127.0.0.9, not the target" in log.text()
    assert counts(result) == (2, 0, 1.0)  # each sample tried: the error may be forged


async def test_a_forged_unreachable_and_a_lost_reply_cost_one_sample(
    fake_ntp: FakeNTPServer,
) -> None:
    require_raw_socket()

    def first_lost_and_forged(req: Request) -> list[Send]:
        if req.index == 0:
            forge_unreachable(req.addr, fake_ntp.port, "127.0.0.9", code=1)
            return []
        return [Send(reply(req))]

    fake_ntp.behaviour = first_lost_and_forged
    result, log = await probe(fake_ntp.target, make_module(samples=2, reply_timeout=0.2))
    assert result.success, (result.failure, log.text())
    assert counts(result) == (2, 1, 0.5)


JUNK: dict[str, Callable[[Request], bytes]] = {
    "wrong_origin": lambda req: wrong_origin(req),
    "wrong_mode_client": lambda req: wrong_mode(req, ntp.Mode.CLIENT),
    "wrong_mode_broadcast": lambda req: wrong_mode(req, ntp.Mode.BROADCAST),
    "truncated": lambda req: truncated(req, 40),
    "zero_transmit": lambda req: zero_transmit(req),
    # Longer than any reply can be: cut short by the socket, never decoded.
    "oversized": lambda req: reply(req) + bytes(5000),
}


@pytest.mark.parametrize("junk", sorted(JUNK))
async def test_junk_alone_is_invalid_reply(fake_ntp: FakeNTPServer, junk: str) -> None:
    make = JUNK[junk]
    fake_ntp.behaviour = lambda req: [Send(make(req))]
    result, log = await probe(fake_ntp.target, make_module(reply_timeout=0.2))
    assert not result.success
    assert result.failure == "invalid_reply", log.text()
    assert counts(result) == (1, 0, 1)
    assert_no_measurement(result)
    assert " discarded" in log.text()


@pytest.mark.parametrize("junk", sorted(JUNK))
async def test_junk_then_genuine_reply_succeeds(fake_ntp: FakeNTPServer, junk: str) -> None:
    make = JUNK[junk]
    fake_ntp.behaviour = lambda req: [Send(make(req)), Send(reply(req, offset=-0.5))]
    result, log = await probe(fake_ntp.target, make_module())
    assert result.success, (result.failure, log.text())
    assert_offset(result, -0.5)
    assert counts(result) == (1, 1, 0)


async def test_reply_from_another_port_is_logged_and_reported_invalid(
    fake_ntp: FakeNTPServer,
) -> None:
    fake_ntp.behaviour = lambda req: [Send(reply(req), from_other_port=True)]
    result, log = await probe(fake_ntp.target, make_module(reply_timeout=0.2))
    assert "reply discarded" in log.text()
    assert result.failure == "invalid_reply"


async def test_junk_from_another_host_does_not_blame_a_silent_server(
    fake_ntp: FakeNTPServer,
) -> None:
    # Anyone may spray the probe's socket: a silent server stays 'timeout' (unreachable
    # alerts), not 'invalid_reply', and the junk is still logged.
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind(("127.0.0.2", 0))
    try:
        def spray(req: Request) -> list[Send]:
            other.sendto(reply(req), req.addr)  # a perfect reply, from the wrong host
            return []

        fake_ntp.behaviour = spray
        result, log = await probe(fake_ntp.target, make_module(reply_timeout=0.2))
    finally:
        other.close()
    assert "reply discarded: from 127.0.0.2:" in log.text()
    assert result.failure == "timeout", log.text()


async def test_reply_from_another_port_does_not_displace_the_genuine_one(
    fake_ntp: FakeNTPServer,
) -> None:
    fake_ntp.behaviour = lambda req: [
        Send(reply(req, offset=100.0), from_other_port=True),
        Send(reply(req, offset=0.25), delay=0.01),
    ]
    result, log = await probe(fake_ntp.target, make_module())
    assert result.success, (result.failure, log.text())
    assert_offset(result, 0.25)
    assert counts(result) == (1, 1, 0)


# The copy comes at once, during the pause between requests, or while the next is pending.
@pytest.mark.parametrize("copy_delay", [0.0, 0.005, 0.02])
async def test_duplicated_replies_count_once(fake_ntp: FakeNTPServer, copy_delay: float) -> None:
    def behaviour(req: Request) -> list[Send]:
        data = reply(req, offset=0.25)
        return [Send(data), Send(data, delay=copy_delay)]

    fake_ntp.behaviour = behaviour
    result, log = await probe(fake_ntp.target, make_module(samples=3))
    assert result.success, (result.failure, log.text())
    assert counts(result) == (3, 3, 0)
    assert_offset(result, 0.25)


async def test_partial_loss(fake_ntp: FakeNTPServer) -> None:
    def behaviour(req: Request) -> list[Send]:
        return [] if req.index == 1 else [Send(reply(req))]

    fake_ntp.behaviour = behaviour
    result, log = await probe(fake_ntp.target, make_module(samples=4, reply_timeout=0.1))
    assert result.success, (result.failure, log.text())
    assert counts(result) == (4, 3, 0.25)
    await fake_ntp.drain()
    assert len(fake_ntp.requests) == 4
    # Each sample keeps its number in the burst, as the log counts them.
    assert [s["sample"] for s in ntp_samples(result)] == [1, 3, 4]
    assert "sample 2: no reply" in log.text()
    rows = [k for k, _ in result.reports[0].rows() if "sample " in k]
    assert [r.split()[-1] for r in rows] == ["1", "3", "4"]


@pytest.mark.parametrize(
    "samples",
    [
        1,
        2,
    ],
)
async def test_only_late_replies_is_a_timeout(fake_ntp: FakeNTPServer, samples: int) -> None:
    # Every reply comes 150 ms after its request; each request waits only 100 ms.
    fake_ntp.behaviour = lambda req: [Send(reply(req), delay=0.15)]
    result, log = await probe(fake_ntp.target, make_module(samples=samples, reply_timeout=0.1))
    assert counts(result) == (samples, 0, 1), log.text()
    assert_no_measurement(result)
    assert result.failure == "timeout", log.text()


async def test_negative_delay_is_discarded(fake_ntp: FakeNTPServer) -> None:
    # The server claims to have held the request for 1 s; the round trip took far less.
    fake_ntp.behaviour = answer(processing=1.0)
    result, log = await probe(fake_ntp.target, make_module())
    assert not result.success
    assert result.failure == "invalid_reply", log.text()
    assert counts(result) == (1, 0, 1)
    assert_no_measurement(result)
    # The one refusal whose four timestamps are all known: the log shows them.
    assert re.search(r"sample 1: T1=[0-9a-f]{16} \(\S+Z\) T2=\S+ \(\S+Z\) T3=\S+ \(\S+Z\) "
                     r"T4=\S+ \(\S+Z\) reply discarded: negative delay", log.text()), log.text()


async def test_negative_delay_within_server_precision_is_kept(fake_ntp: FakeNTPServer) -> None:
    # A server whose clock ticks every 2**-4 s (62.5 ms, coarser than Windows' 15.6 ms)
    # puts a tick between T2 and T3: the measured delay is the loopback round trip less
    # 50 ms. RFC 5905 clamps such a delay instead of dropping the reply.
    fake_ntp.behaviour = answer(processing=0.05, precision=-4)
    result, log = await probe(fake_ntp.target, make_module())
    assert result.success, (result.failure, log.text())
    assert counts(result) == (1, 1, 0)
    assert value(result, "probe_ntp_rtt_seconds") == 0.0
    # Half the tick shows in the offset: the error the server's precision allows.
    assert offset_of(result) == pytest.approx(0.025, abs=0.01)
    assert "within the server's precision" in log.text(), log.text()


async def test_negative_delay_sample_is_not_used(fake_ntp: FakeNTPServer) -> None:
    def behaviour(req: Request) -> list[Send]:
        if req.index == 0:
            return [Send(reply(req, offset=0.25, processing=1.0))]
        return [Send(reply(req, offset=0.25))]

    fake_ntp.behaviour = behaviour
    result, log = await probe(fake_ntp.target, make_module(samples=2))
    assert result.success, (result.failure, log.text())
    # The bogus sample's offset would be 0.25 - 0.5 s.
    assert_offset(result, 0.25)
    assert counts(result) == (2, 1, 0.5)


async def test_min_delay_sample_is_selected(fake_ntp: FakeNTPServer) -> None:
    # Requests 0 and 2 are answered 50 ms late by a clock 3 s ahead; 1 and 3 at once.
    def behaviour(req: Request) -> list[Send]:
        if req.index % 2 == 0:
            return [Send(reply(req, offset=3.0), delay=0.05)]
        return [Send(reply(req, offset=0.25))]

    fake_ntp.behaviour = behaviour
    result, log = await probe(fake_ntp.target, make_module(samples=4))
    assert result.success, (result.failure, log.text())
    assert counts(result) == (4, 4, 0)
    assert_offset(result, 0.25)
    rtt = value(result, "probe_ntp_rtt_seconds")
    assert rtt is not None and rtt < 0.04
    jitter = value(result, "probe_ntp_jitter_seconds")
    assert jitter is not None and jitter > 1.0
    selected = [s for s in ntp_samples(result) if s["selected"]]
    assert len(selected) == 1 and selected[0]["offset_seconds"] == offset_of(result)


# --- sanity checks -----------------------------------------------------------------------

SECONDS_SINCE_2020 = time.time() - dt.datetime(2020, 1, 1, tzinfo=dt.UTC).timestamp()


@pytest.mark.parametrize(
    ("fields", "settings", "reason"),
    [
        pytest.param({"stratum": 16}, {}, "stratum_unsynchronized", id="stratum16"),
        pytest.param({"stratum": 5}, {"max_stratum": 4}, "stratum_unsynchronized",
                     id="above-max-stratum"),
        pytest.param({"leap": 3}, {}, "leap_unsynchronized", id="leap3"),
        pytest.param({"reference_age": -10.0}, {}, "reference_after_transmit", id="ref-future"),
        pytest.param({"reference_age": 37 * 3600.0}, {}, "stale_reference", id="stale"),
        pytest.param({"root_dispersion": 2.0}, {}, "excess_root_distance", id="root-disp"),
        pytest.param({"offset": -SECONDS_SINCE_2020}, {}, "implausible_time", id="year2020"),
        pytest.param({"offset": 0.25}, {"fail_if_offset_exceeds": 0.1}, "offset_exceeded",
                     id="offset-exceeded"),
        pytest.param({"offset": 0.25}, {"max_causality_violation": 0.001},
                     "causality_violation", id="causality"),
        # The contract's order: the first failing check wins.
        pytest.param({"stratum": 16, "leap": 3, "offset": -SECONDS_SINCE_2020}, {},
                     "stratum_unsynchronized", id="order-stratum-before-leap"),
        pytest.param({"leap": 3, "offset": -SECONDS_SINCE_2020}, {}, "leap_unsynchronized",
                     id="order-leap-before-implausible"),
        pytest.param({"offset": -SECONDS_SINCE_2020, "reference_age": -10.0}, {},
                     "implausible_time", id="order-implausible-before-reference"),
        pytest.param({"reference_age": -10.0, "root_dispersion": 2.0}, {},
                     "reference_after_transmit", id="order-ref-future-before-distance"),
        pytest.param({"reference_age": 37 * 3600.0, "root_dispersion": 2.0}, {},
                     "stale_reference", id="order-stale-before-distance"),
        pytest.param({"root_dispersion": 2.0, "offset": 0.25},
                     {"max_causality_violation": 0.001, "fail_if_offset_exceeds": 0.1},
                     "excess_root_distance", id="order-distance-before-causality"),
        pytest.param({"offset": 0.25},
                     {"max_causality_violation": 0.001, "fail_if_offset_exceeds": 0.1},
                     "causality_violation", id="order-causality-before-offset"),
    ],
)
async def test_sanity_check_failures_keep_the_gauges(
    fake_ntp: FakeNTPServer, fields: dict[str, Any], settings: dict[str, Any], reason: str
) -> None:
    fake_ntp.behaviour = answer(**fields)
    result, log = await probe(fake_ntp.target, make_module(**settings))
    assert not result.success
    assert result.failure == reason, log.text()
    assert f"check failed: {reason}: " in log.text()  # with the values that failed it
    # One failure series, whatever else failed too.
    assert render(result).count("probe_ntp_failure_info{") == 1
    assert_measurement(result)
    assert counts(result) == (1, 1, 0)
    assert_offset(result, fields.get("offset", 0.0))


async def test_excess_root_distance_reports_the_distance(fake_ntp: FakeNTPServer) -> None:
    fake_ntp.behaviour = answer(root_dispersion=2.0)
    result, _ = await probe(fake_ntp.target, make_module())
    assert result.failure == "excess_root_distance"
    assert value(result, "probe_ntp_root_dispersion_seconds") == pytest.approx(2.0, abs=1e-4)
    distance = value(result, "probe_ntp_root_distance_seconds")
    assert distance is not None and distance > 2.0


async def test_offset_within_limit_passes(fake_ntp: FakeNTPServer) -> None:
    fake_ntp.behaviour = answer(offset=0.25)
    result, log = await probe(fake_ntp.target, make_module(fail_if_offset_exceeds=0.5))
    assert result.success, (result.failure, log.text())


# --- deadlines -------------------------------------------------------------------------


async def test_silent_server_times_out_within_the_probe_timeout(fake_ntp: FakeNTPServer) -> None:
    fake_ntp.behaviour = silent
    module = make_module(samples=3, reply_timeout=1.0, timeout=10.0)
    timeout = probe_timeout(module.timeout, "1.0", 0.5)
    assert timeout == 0.5
    started = time.monotonic()
    result, log = await probe(fake_ntp.target, module, timeout=timeout)
    elapsed = time.monotonic() - started
    assert elapsed < timeout + SLACK, log.text()
    assert not result.success
    assert result.failure == "timeout"
    sent, received, loss = counts(result)
    # Under heavy CPU load this can fail: the backstop race pinned down by
    assert sent is not None and sent >= 1, f"samples_sent missing:\n{log.text()}"
    assert received == 0 and loss == 1
    assert_no_measurement(result)
    await fake_ntp.wait_for_requests(1)


async def test_a_burst_cut_off_keeps_its_accounting(fake_ntp: FakeNTPServer) -> None:
    """What the runner's backstop does to a prober that overruns: cancel it. The samples
    sent and received before that still count (and reach ntp_probe_ntp_packets_sent_total)."""
    def behaviour(req: Request) -> list[Send]:
        return [Send(reply(req, offset=0.25))] if req.index == 0 else []

    fake_ntp.behaviour = behaviour
    module = make_module(samples=3, interval=0.01, reply_timeout=5.0, timeout=10.0)
    log = ProbeLog()
    ctx = ProbeContext(deadline=asyncio.get_running_loop().time() + module.timeout, log=log)
    task = asyncio.create_task(ntp_prober.probe(parse_target(fake_ntp.target), module, ctx))
    await fake_ntp.wait_for_requests(2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    m = ctx.measurement
    assert counts(m) == (2, 1, 0.5), log.text()
    assert m.packets_sent == 2
    assert_offset(m, 0.25)


async def test_no_request_is_sent_when_its_reply_cannot_arrive_in_time(
    fake_ntp: FakeNTPServer,
) -> None:
    # 20 ms, less the verdict's margin, leaves less than the shortest reply window: sending
    # would only blame the server, and so would a timeout for a request never sent (it
    # pages as NTPServerUnreachable).
    module = make_module(samples=1, reply_timeout=1.0, timeout=0.02)
    result, log = await probe(fake_ntp.target, module)
    assert result.failure == "local_error"
    assert result.failure_detail == NO_TIME
    # Nothing sent, nothing lost: a loss ratio of 0 would read as a healthy path.
    assert counts(result) == (0, 0, None)
    assert "burst shortened to 0 of 1 samples" in log.text()
    assert "nothing sent, so no reply" in log.text()  # not "no usable reply"
    await fake_ntp.drain()
    assert fake_ntp.requests == []


@pytest.mark.parametrize(("burst", "reason"), [
    # The first send failed (no route: "Network is unreachable"): nothing went out, and
    # the verdict is the network's, not a time budget that was long enough.
    (ntp_prober.Burst(unreachable="send failed: Network is unreachable"), "unreachable"),
    (ntp_prober.Burst(), "local_error"),  # nothing sent, nothing failed: no time for it
    (ntp_prober.Burst(local_error="Too many open files"), "local_error"),
])
def test_a_burst_that_sent_nothing_says_why(burst: ntp_prober.Burst, reason: str) -> None:
    ctx = ProbeContext(deadline=0.0)
    ntp_prober._report(burst, make_module().ntp, ctx, ("192.0.2.1", 123))
    assert ctx.measurement.failure == reason
    assert ctx.measurement.failure_detail == (burst.unreachable or burst.local_error or NO_TIME)


async def test_burst_is_shortened_to_fit_the_timeout(fake_ntp: FakeNTPServer) -> None:
    module = make_module(samples=5, interval=1.0, reply_timeout=0.5, timeout=1.5)
    started = time.monotonic()
    result, log = await probe(fake_ntp.target, module)
    elapsed = time.monotonic() - started
    assert elapsed < module.timeout + SLACK, log.text()
    assert result.success, (result.failure, log.text())
    sent, received, loss = counts(result)
    assert sent is not None and 1 <= sent < 5
    assert received == sent and loss == 0
    await fake_ntp.drain()
    assert len(fake_ntp.requests) == sent


async def test_closed_port_fails_fast_as_unreachable() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        port = int(s.getsockname()[1])
    module = make_module(samples=3, reply_timeout=1.0, timeout=3.0)
    log = ProbeLog()
    result, _ = await run_probe(parse_target(f"{LOOPBACK}:{port}"), module, module.timeout, log)
    assert not result.success
    # ICMP port unreachable ends the burst at once instead of after three reply timeouts
    # (which would end as "timeout", three requests sent).
    assert result.failure == "unreachable", log.text()
    assert counts(result) == (1, 0, 1)
    assert_no_measurement(result)
    assert "port unreachable" in log.text()
    assert "burst stopped" in log.text()


# --- the request on the wire ------------------------------------------------------------


@pytest.mark.parametrize("version", [3, 4])
async def test_requests_are_minimal_with_random_nonces(
    fake_ntp: FakeNTPServer, version: int
) -> None:
    result, log = await probe(fake_ntp.target, make_module(samples=3, version=version))
    assert result.success, (result.failure, log.text())
    await fake_ntp.drain()
    assert len(fake_ntp.requests) == 3
    now_ts = ntp.ts_from_unix_ns(time.time_ns())
    nonces = []
    for req in fake_ntp.requests:
        assert len(req.data) == ntp.HEADER_LEN
        assert req.data[0] == (version << 3) | ntp.Mode.CLIENT  # LI 0, version, mode 3
        assert req.data[1:40] == bytes(39), "a header field other than transmit is set"
        nonce = int.from_bytes(req.data[40:48], "big")
        assert nonce != 0
        # The real T1 stays local: the transmit field is not (close to) the time.
        assert abs(ntp.ts_diff(nonce, now_ts)) > 3600 << 32
        nonces.append(nonce)
    assert len(set(nonces)) == 3
    # One socket per burst: every request from the same loopback address and port.
    assert len({req.addr for req in fake_ntp.requests}) == 1
    assert fake_ntp.requests[0].addr[0] == LOOPBACK


@pytest.mark.parametrize("module_name", ["local", "hybrid"])
@pytest.mark.parametrize(("age", "failure"), [
    (130_000.0, None),  # 36.1 h: past 36 h, within node_exporter's 2^17 s
    (131_500.0, "stale_reference"),  # past 2^17 s: node_ntp_sanity is 0 too
])
async def test_the_local_modules_reference_age_is_node_exporters(
        fake_ntp: FakeNTPServer, module_name: str, age: float, failure: str | None) -> None:
    # node_exporter's NTP library (beevik/ntp) calls a reference older than 2^17 s stale;
    # `local` and `hybrid` stand in for node_ntp_sanity, so they draw the line there too.
    fake_ntp.behaviour = answer(reference_age=age)
    module = load_config(None).modules[module_name]
    result, log = await probe(fake_ntp.target, replace(
        module, ntp=replace(module.ntp, kernel_correlation=False)))
    assert result.failure == failure, log.text()


LOCAL_ERROR_SCRIPT = """
import asyncio, json, os, resource
from ntp_probe.config.load import load_config
from ntp_probe.engine.runner import run_probe
from ntp_probe.engine.targets import parse_target

async def main():
    module = load_config(None).modules["ntp_fast"]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    hog = []
    try:
        while True:
            hog.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    for _ in range(int(os.environ["LEAVE_FREE"])):
        os.close(hog.pop())
    m, log = await run_probe(parse_target("127.0.0.1:9"), module, 2.0)
    free = 0  # descriptors free after the probe: what it opened, it must have closed
    try:
        while True:
            hog.append(os.open("/dev/null", os.O_RDONLY))
            free += 1
    except OSError:
        pass
    for fd in hog:
        os.close(fd)
    print(json.dumps({"failure": m.failure, "sent": m.packets_sent, "log": log.text(),
                      "free": free}))

asyncio.run(main())
"""


@pytest.mark.parametrize("leave_free", [0, 1], ids=["no-socket", "socket-but-no-epoll-set"])
def test_no_socket_for_the_probe_is_a_local_error_not_the_servers(leave_free: int) -> None:
    """Out of descriptors: no socket at all, or a socket but not the event loop's epoll
    set for it (the first probe creates that set). Either way this host's trouble, and
    nothing left open."""
    done = subprocess.run([sys.executable, "-W", "always::ResourceWarning", "-c",
                           LOCAL_ERROR_SCRIPT], capture_output=True,
                          text=True, timeout=30, env={**os.environ,
                                                      "LEAVE_FREE": str(leave_free)})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["failure"] == "local_error", out["log"]
    assert out["sent"] == 0
    assert "local error, nothing sent: Too many open files" in out["log"]
    assert out["free"] == leave_free
    assert "ResourceWarning" not in done.stderr  # closed, not left to the collector


async def test_probes_are_sent_from_the_source_ip_address(fake_ntp: FakeNTPServer) -> None:
    result, log = await probe(fake_ntp.target, make_module(source_ip_address="127.0.0.2"))
    assert result.success, (result.failure, log.text())
    await fake_ntp.drain()
    assert [r.addr[0] for r in fake_ntp.requests] == ["127.0.0.2"]
    assert "sending from 127.0.0.2" in log.text()


async def test_a_source_address_of_the_other_family_is_a_local_error(
    fake_ntp: FakeNTPServer,
) -> None:
    result, log = await probe(fake_ntp.target, make_module(source_ip_address="::1"))
    assert result.failure == "local_error", log.text()
    await fake_ntp.drain()
    assert fake_ntp.requests == []


async def test_a_source_zone_naming_no_interface_says_so() -> None:
    # Accepted at load (the interface may come later); each probe says why it sent nothing.
    result, log = await probe("[::1]:123", make_module(source_ip_address="fe80::1%nosuch0"))
    assert result.failure == "local_error", log.text()
    assert "fe80::1%nosuch0: its zone names no interface of this host" in log.text()


@pytest.mark.parametrize("case", ["answered", "kod_after_a_sample", "silent"])
async def test_an_ntp_probe_adds_its_series_in_exposition_order(
    fake_ntp: FakeNTPServer, case: str
) -> None:
    """The renderer sorts only what a prober added out of order: the ntp burst, the path
    of nearly every probe, adds in declaration order and so costs no sort."""
    def behaviour(req: Request) -> list[Send]:
        if case == "silent":
            return []
        if case == "kod_after_a_sample" and req.index == 1:
            return [Send(kod(req, b"RATE"))]
        return [Send(reply(req))]

    fake_ntp.behaviour = behaviour
    result, log = await probe(fake_ntp.target, make_module(samples=2),
                              timeout=1.0)
    orders = [family.order for family, _, _ in result.samples]
    assert len(orders) >= 6, log.text()
    assert orders == sorted(orders), [family.name for family, _, _ in result.samples]


@pytest.mark.parametrize("leap", [0, 3])
async def test_json_output_holds_the_expositions_series(fake_ntp: FakeNTPServer,
                                                        leap: int) -> None:
    # `probe --format json` and `--format prometheus` print the same result: the same
    # series in the same order, probe_success, the duration and the failure included.
    fake_ntp.behaviour = answer(leap=leap)
    result, log = await probe(fake_ntp.target, make_module())
    data = json.loads(report.as_json(fake_ntp.target, "m", result, log))
    exposition = [(s.name, s.labels) for family in text_string_to_metric_families(render(result))
                  for s in family.samples]
    assert [(s["name"], s["labels"]) for s in data["metrics"]] == exposition
    assert (data["metrics"][-1]["name"] == "probe_ntp_failure_info") == (leap == 3)


async def test_the_cli_report_names_a_kiss_of_death(fake_ntp: FakeNTPServer) -> None:
    # The text and JSON reports, not only the log and the metrics, say which code came.
    fake_ntp.behaviour = lambda req: [Send(kod(req, b"RATE"))]
    result, log = await probe(fake_ntp.target, make_module())
    assert result.failure == "kod_rate", log.text()
    ntp_report = ntp_prober.report_of(result)
    assert ntp_report is not None
    assert ("kiss code", "RATE") in ntp_report.rows()
    assert ntp_report.to_json()["kiss_code"] == "RATE"


def test_the_text_report_aligns_each_sections_values_past_its_longest_label() -> None:
    # 'certificate chain verified', 'sys.peer or candidate': longer than the usual 14.
    @dataclass(frozen=True)
    class Section:
        title: str = "s"
        check_offset: float | None = None

        def rows(self) -> list[tuple[str, str]]:
            return [("short", "a"), ("certificate chain verified", "b")]

        def to_json(self) -> dict[str, Any]:
            return {}

        def perfdata(self) -> list[Any]:
            return []

    m = Measurement()
    m.reports.append(Section())
    lines = report.text("t", "m", m, ProbeLog()).splitlines()
    values = [line.index(v) for line in lines[1:] for v in (" a", " b") if line.endswith(v)]
    assert len(values) == 2 and values[0] == values[1], lines
