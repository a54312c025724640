"""The chrony prober against an in-process fake chronyd command port on 127.0.0.1.

The fake answers with bytes this file builds from chrony's wire layout (candm.h), not with
the codec under test, so a codec and prober that agree on a mistake cannot pass together.
Delays are scripted with ``loop.call_later`` (network delay as the prober sees it); the
tests synchronise on the requests the fake received, never on sleeps.
"""

from __future__ import annotations

import asyncio
import ipaddress
import math
import re
import socket
import struct
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from ntp_probe.config.load import parse_config
from ntp_probe.config.schema import Config, Module
from ntp_probe.engine.coordinator import Coordinator
from ntp_probe.engine.result import NO_TIME, Measurement
from ntp_probe.engine.runner import guard_for
from ntp_probe.engine.targets import parse_target
from ntp_probe.exposition.render import render
from ntp_probe.net.budget import limit_probe_sockets
from ntp_probe.net.udp import Datagram
from ntp_probe.probers import chrony
from ntp_probe.proto.cmdmon import Command
from tests.behaviour.fake_server import forge_unreachable, require_raw_socket
from tests.conftest import free_udp_port, label_sets, names, probe, value

LOOPBACK = "127.0.0.1"

# candm.h request codes and reply types, as the fake chronyd knows them.
TRACKING, N_SOURCES, SOURCE_DATA, SOURCESTATS, SERVER_STATS = 33, 14, 15, 34, 54
RPY_NULL, RPY_N_SOURCES, RPY_SOURCE_DATA, RPY_TRACKING, RPY_SOURCESTATS = 1, 2, 3, 5, 6
RPY_SERVER_STATS3 = 24
STT_SUCCESS, STT_UNAUTH, STT_NOSUCHSOURCE = 0, 2, 4
REQUEST_LEN = 520

SOURCE_STATES = ("sync", "unusable", "falseticker", "jittery", "candidate", "outlier")


# --- chrony's wire format, written out independently of ntp_probe.proto.cmdmon -------------


def cfloat(x: float) -> int:
    """chrony's 32-bit Float: 7-bit signed exponent, 25-bit signed coefficient (util.c)."""
    if x == 0:
        return 0
    mantissa, exponent = math.frexp(abs(x))  # abs(x) = mantissa * 2**exponent
    coef, exp = round(mantissa * 2**24), exponent + 1
    if coef == 1 << 24:
        coef, exp = coef >> 1, exp + 1
    if x < 0:
        coef = -coef & 0x1FFFFFF
    return (exp & 0x7F) << 25 | coef


def ipv4(text: str) -> bytes:
    """chrony's IPAddr for an IPv4 address: 16 address bytes, family 1, padding; for
    ``ID#n``, an unresolved source's identifier (family 3)."""
    if text.startswith("ID#"):
        return struct.pack(">I", int(text[3:])).ljust(16, b"\0") + struct.pack(">HH", 3, 0)
    return bytes(int(p) for p in text.split(".")).ljust(16, b"\0") + struct.pack(">HH", 1, 0)


@dataclass(frozen=True)
class Req:
    """One request the fake received."""

    n: int  # arrival order, 0-based
    command: int
    sequence: int
    index: int | None  # SOURCE_DATA / SOURCESTATS source index
    length: int
    addr: tuple[str, int]


def header(req: Req, reply_type: int, status: int = STT_SUCCESS) -> bytes:
    return struct.pack(">BBBBHHHHHHIII", 6, 2, 0, 0, req.command, reply_type, status,
                       0, 0, 0, req.sequence, 0, 0)


def refused(req: Req, status: int) -> bytes:
    """chronyd's answer to a refused command: an empty RPY_NULL with the status."""
    return header(req, RPY_NULL, status)


@dataclass(frozen=True)
class FakeSource:
    address: str
    state: int  # RPY_SD_ST_*: 0 sync, 4 candidate, 2 falseticker, ...
    mode: int = 0  # RPY_SD_MD_*: 0 server, 1 peer, 2 refclock (its refid as the address)
    stratum: int = 2
    poll: int = 6
    reach: int = 0o377
    since_sample: int = 12
    offset: float = -0.00025
    measured_offset: float = -0.000251
    error: float = 0.0005
    samples: int = 8
    runs: int = 5
    span: int = 448
    stddev: float = 0.0000625
    frequency: float = -0.125
    skew: float = 0.5
    est_offset: float = -0.0001220703125


@dataclass
class FakeChronyd:
    """What the fake reports: chronyc's values, written in chrony's wire layout."""

    stratum: int = 3
    leap: int = 0
    refid: int = 0xC0000201
    ref_time_high: int = 0
    ref_time: int = 1_790_000_000
    ref_time_nsec: int = 500_000_000
    system_time: float = 0.0009765625  # chronyc: 0.000976562 seconds slow of NTP time
    last_offset: float = -0.00048828125
    rms_offset: float = 0.000732421875
    frequency: float = -12.5
    residual_frequency: float = 0.015625
    skew: float = 0.125
    root_delay: float = 0.015625
    root_dispersion: float = 0.0029296875
    update_interval: float = 64.0
    sources: list[FakeSource] = field(default_factory=lambda: [
        FakeSource("192.0.2.1", state=0),
        FakeSource("192.0.2.2", state=4, stratum=3, reach=0o17, offset=0.001953125),
    ])
    serverstats: tuple[int, ...] = (1000, 3, 77, 10, 2, 1, 0, 5, 6, 7, 8)
    n_sources: int | None = None  # what N_SOURCES claims; None: len(sources)

    def tracking(self, req: Req) -> bytes:
        floats = (self.system_time, self.last_offset, self.rms_offset, self.frequency,
                  self.residual_frequency, self.skew, self.root_delay, self.root_dispersion,
                  self.update_interval)
        return header(req, RPY_TRACKING) + struct.pack(
            ">I20sHHIII9I", self.refid, ipv4("192.0.2.1"), self.stratum, self.leap,
            self.ref_time_high, self.ref_time, self.ref_time_nsec, *(cfloat(f) for f in floats))

    def answer(self, req: Req) -> bytes:
        """chronyd's reply to ``req``."""
        if req.command == TRACKING:
            return self.tracking(req)
        if req.command == N_SOURCES:
            claimed = len(self.sources) if self.n_sources is None else self.n_sources
            return header(req, RPY_N_SOURCES) + struct.pack(">I", claimed)
        if req.command == SERVER_STATS:
            return header(req, RPY_SERVER_STATS3) + struct.pack(">11I", *self.serverstats)
        assert req.index is not None
        if req.index >= len(self.sources):
            return refused(req, STT_NOSUCHSOURCE)
        s = self.sources[req.index]
        if req.command == SOURCE_DATA:
            return header(req, RPY_SOURCE_DATA) + struct.pack(
                ">20shHHHHHI3I", ipv4(s.address), s.poll, s.stratum, s.state, s.mode, 0, s.reach,
                s.since_sample, cfloat(s.measured_offset), cfloat(s.offset), cfloat(s.error))
        # A refclock's statistics name it by refid, with no address (as chronyd does).
        refid, address = ((int(ipaddress.IPv4Address(s.address)), bytes(20)) if s.mode == 2
                          else (0, ipv4(s.address)))
        return header(req, RPY_SOURCESTATS) + struct.pack(
            ">I20s3I5I", refid, address, s.samples, s.runs, s.span, cfloat(s.stddev),
            cfloat(s.frequency), cfloat(s.skew), cfloat(s.est_offset), cfloat(0.0001))


# What to send back for a request: (datagram, delay in seconds) pairs.
Behaviour = Callable[[Req], Iterable[tuple[bytes, float]]]


class FakeCommandPort(asyncio.DatagramProtocol):
    """A UDP command port on 127.0.0.1 that records requests and runs the test's behaviour."""

    def __init__(self) -> None:
        self.chronyd = FakeChronyd()
        self.behaviour: Behaviour = lambda req: [(self.chronyd.answer(req), 0.0)]
        self.requests: list[Req] = []
        self.errors: list[BaseException] = []
        self.transport: Any = None  # asyncio's datagram transport (no common base class)
        self.port = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.port = transport.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        version, pkt_type, _, _, command, _, sequence = struct.unpack_from(">BBBBHHI", data)
        index = None
        if command in (SOURCE_DATA, SOURCESTATS):
            index = struct.unpack_from(">I", data, 20)[0]
        req = Req(len(self.requests), command, sequence, index, len(data), addr)
        self.requests.append(req)
        assert (version, pkt_type) == (6, 1)
        try:
            for datagram, delay in self.behaviour(req):
                self._send_later(datagram, addr, delay)
        except Exception as exc:  # surfaced at teardown
            self.errors.append(exc)

    def _send_later(self, datagram: bytes, addr: tuple[str, int], delay: float) -> None:
        assert self.transport is not None
        if delay <= 0:
            self.transport.sendto(datagram, addr)
        else:
            asyncio.get_running_loop().call_later(delay, self._send_now, datagram, addr)

    def _send_now(self, datagram: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(datagram, addr)

    def commands(self) -> list[tuple[int, int | None]]:
        return [(r.command, r.index) for r in self.requests]


@pytest.fixture
async def fake() -> AsyncIterator[FakeCommandPort]:
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(
        FakeCommandPort, local_addr=(LOOPBACK, 0))
    try:
        yield protocol
    finally:
        transport.close()
    if protocol.errors:
        raise protocol.errors[0]


def chrony_module(*, timeout: str = "2s", request_timeout: str = "100ms", **chrony_keys: Any,
                  ) -> Module:
    keys = "".join(f", {k}: {v}" for k, v in chrony_keys.items())
    text = (f"modules:\n  c:\n    prober: chrony\n    timeout: {timeout}\n"
            f"    chrony: {{request_timeout: {request_timeout}{keys}}}\n")
    return parse_config(text, "test").modules["c"]


def statuses(m: Measurement) -> dict[str, str]:
    return {s["command"]: s["status"] for s in label_sets(m, "probe_chrony_command_status_info")}


def sent_lines(log: str, command: str) -> list[tuple[str, str]]:
    """(sequence, attempt) of each request for ``command`` the probe log shows."""
    return [(m[1], m[2]) for m in re.finditer(
        rf"-> {command} sequence ([0-9a-f]{{8}}) attempt (\d)", log)]


def entries(directory: Path) -> list[str]:
    """What is left in ``directory``."""
    return sorted(p.name for p in directory.iterdir())


# --- tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("high", "low", "nsec", "text"), [
    (0, 1_796_230_089, 722_889_395, "1796230089.722889395"),
    # Before 1970 (a hostile or broken daemon): -2^32 s + 5 ns, the sign before both parts.
    (0xFFFFFFFF, 0, 5, "-4294967295.999999995"),
])
async def test_the_text_report_shows_the_reference_time_to_the_nanosecond(
        fake: FakeCommandPort, high: int, low: int, nsec: int, text: str) -> None:
    # As chronyc -c prints it: a float of 1.8e9 seconds has no nanoseconds to spare.
    fake.chronyd.ref_time_high, fake.chronyd.ref_time = high, low
    fake.chronyd.ref_time_nsec = nsec
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module())
    report = chrony.report_of(m)
    assert report is not None, log.text()
    assert ("ref time", text) in report.rows()


async def test_an_unanswered_sourcestats_leaves_only_its_statistics_out(
        fake: FakeCommandPort) -> None:
    # chronyd's cmdratelimit dropping a SOURCESTATS (and its retry): chronyc's sources never
    # asks for it, and neither the verdict nor the counts read it.
    fake.behaviour = lambda req: [] if (req.command, req.index) == (SOURCESTATS, 0) else [
        (fake.chronyd.answer(req), 0.0)]
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module(min_candidates=2))
    assert m.failure is None, log.text()
    assert "sourcestats of source 0: no answer, left out" in log.text()
    assert value(m, "probe_chrony_sources", state="sync") == 1
    assert value(m, "probe_chrony_sources", state="candidate") == 1
    assert label_sets(m, "probe_chrony_sourcestats_samples") == [{"source": "192.0.2.2"}]
    assert {"command": "sourcestats", "status": "timeout"} in label_sets(
        m, "probe_chrony_command_status_info")
    assert (SERVER_STATS, None) in fake.commands()


async def test_healthy_daemon_is_reported_as_chronyc_shows_it(fake: FakeCommandPort) -> None:
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module())
    assert m.failure is None, log.text()
    d = fake.chronyd
    assert label_sets(m, "probe_chrony_tracking_info") == [
        {"refid": "C0000201", "address": "192.0.2.1"}]
    expected = {
        "probe_chrony_tracking_stratum": 3,
        "probe_chrony_tracking_reference_timestamp_seconds": 1_790_000_000.5,
        "probe_chrony_tracking_system_time_seconds": d.system_time,
        "probe_chrony_tracking_last_offset_seconds": d.last_offset,
        "probe_chrony_tracking_rms_offset_seconds": d.rms_offset,
        "probe_chrony_tracking_frequency_ppm": d.frequency,
        "probe_chrony_tracking_residual_frequency_ppm": d.residual_frequency,
        "probe_chrony_tracking_skew_ppm": d.skew,
        "probe_chrony_tracking_root_delay_seconds": d.root_delay,
        "probe_chrony_tracking_root_dispersion_seconds": d.root_dispersion,
        "probe_chrony_tracking_update_interval_seconds": 64,
        "probe_chrony_tracking_leap_status": 0,
    }
    for name, want in expected.items():
        assert value(m, name) == want, name  # exact: all are exact chrony Floats
    assert label_sets(m, "probe_chrony_source_info") == [
        {"source": "192.0.2.1", "mode": "server", "state": "sync"},
        {"source": "192.0.2.2", "mode": "server", "state": "candidate"},
    ]
    two = {"source": "192.0.2.2"}
    assert value(m, "probe_chrony_source_stratum", **two) == 3
    assert value(m, "probe_chrony_source_poll_seconds", **two) == 64
    assert value(m, "probe_chrony_source_reach_ratio", **two) == 0.5  # 0o17: 4 of 8
    assert value(m, "probe_chrony_source_last_rx_age_seconds", **two) == 12
    # chrony's sign, as chronyc prints it: local clock minus source.
    assert value(m, "probe_chrony_source_last_sample_offset_seconds", **two) == 0.001953125
    # 0.0005 is no exact chrony Float: 24 bits of precision.
    assert value(m, "probe_chrony_source_last_sample_error_seconds", **two) == pytest.approx(
        0.0005, rel=1e-7)
    assert {s["state"]: value(m, "probe_chrony_sources", **s)
            for s in label_sets(m, "probe_chrony_sources")} == {
        "sync": 1, "candidate": 1, "unusable": 0, "falseticker": 0, "jittery": 0, "outlier": 0}
    assert value(m, "probe_chrony_sourcestats_samples", source="192.0.2.1") == 8
    assert value(m, "probe_chrony_sourcestats_span_seconds", source="192.0.2.1") == 448
    assert value(m, "probe_chrony_sourcestats_offset_seconds",
                 source="192.0.2.1") == -0.0001220703125
    assert value(m, "probe_chrony_serverstats_ntp_packets_received_total") == 1000
    assert value(m, "probe_chrony_serverstats_command_packets_received_total") == 77
    assert value(m, "probe_chrony_serverstats_ntp_timestamp_span_seconds") == 8
    # Type 24 has no timestamp-source counters (chrony 4.4's type 25 does).
    assert "probe_chrony_serverstats_ntp_hw_rx_timestamps_total" not in names(m)
    assert statuses(m) == {"tracking": "ok", "n_sources": "ok", "source_data": "ok",
                           "sourcestats": "ok", "server_stats": "ok"}
    assert fake.commands() == [(TRACKING, None), (N_SOURCES, None), (SOURCE_DATA, 0),
                               (SOURCESTATS, 0), (SOURCE_DATA, 1), (SOURCESTATS, 1),
                               (SERVER_STATS, None)]
    assert {r.length for r in fake.requests} == {REQUEST_LEN}
    assert m.packets_sent == len(fake.requests)
    text = render(m)
    assert "# TYPE probe_chrony_serverstats_ntp_packets_received_total counter" in text
    report = chrony.report_of(m)
    assert report is not None and report.check_offset == d.system_time
    perf = {p.label: p.value for p in report.perfdata()}
    assert perf["root_distance"] == d.root_delay / 2 + d.root_dispersion
    assert (perf["sources"], perf["sources_selectable"]) == (2, 2)
    # debug=true: one line per request sent and per reply decoded.
    assert len(re.findall(r"^ *[\d.]+ms -> ", log.text(), flags=re.M)) == 7
    assert len(re.findall(r"^ *[\d.]+ms <- ", log.text(), flags=re.M)) == 7


async def test_first_attempts_dropped_retries_get_through(fake: FakeCommandPort) -> None:
    seen: set[tuple[int, int | None]] = set()

    def drop_first_attempt(req: Req) -> list[tuple[bytes, float]]:
        key = (req.command, req.index)
        if key not in seen:
            seen.add(key)
            return []
        return [(fake.chronyd.answer(req), 0.0)]

    fake.behaviour = drop_first_attempt
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module())
    assert m.failure is None, log.text()
    assert set(statuses(m).values()) == {"ok"}
    assert len(label_sets(m, "probe_chrony_source_info")) == 2
    assert len(fake.requests) == 14 and m.packets_sent == 14
    attempts = sent_lines(log.text(), "TRACKING")
    assert [a for _, a in attempts] == ["1", "2"]
    assert attempts[0][0] != attempts[1][0]  # the retry has a new sequence number


async def test_silent_daemon_times_out_within_the_deadline(fake: FakeCommandPort) -> None:
    fake.behaviour = lambda req: []
    module = chrony_module(timeout="1s", request_timeout="200ms")
    m, log = await probe(f"{LOOPBACK}:{fake.port}", module)
    assert m.failure == "chrony_timeout"  # not the runner's backstop: "timeout"
    assert len(sent_lines(log.text(), "TRACKING")) == 2, log.text()
    # chronyd does not answer: nothing more is asked.
    assert fake.commands() == [(TRACKING, None)] * 2 and m.packets_sent == 2
    assert statuses(m) == {"tracking": "timeout"}
    assert not [n for n in names(m) if n.startswith("probe_chrony_tracking")]
    assert "probe deadline reached" not in log.text()


async def test_a_longer_reply_is_read_as_chronyc_reads_it(fake: FakeCommandPort) -> None:
    # A later chronyd may append fields to a reply: chronyc reads what it knows.
    def behaviour(req: Req) -> list[tuple[bytes, float]]:
        data = fake.chronyd.answer(req)
        return [(data + bytes(8) if req.command == TRACKING else data, 0.0)]

    fake.behaviour = behaviour
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module())
    assert m.failure is None, log.text()
    assert statuses(m)["tracking"] == "ok"
    assert value(m, "probe_chrony_tracking_stratum") == 3


@pytest.mark.parametrize("garbage", [
    pytest.param(lambda req: b"\x17" * 104, id="noise"),
    pytest.param(lambda req: FakeChronyd().tracking(req)[:-4], id="truncated"),
])
async def test_garbage_tracking_replies_are_bad_replies(
    fake: FakeCommandPort, garbage: Callable[[Req], bytes]
) -> None:
    def behaviour(req: Req) -> list[tuple[bytes, float]]:
        data = garbage(req) if req.command == TRACKING else fake.chronyd.answer(req)
        return [(data, 0.0)]

    fake.behaviour = behaviour
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module())
    assert m.failure == "chrony_bad_reply", log.text()
    assert len(sent_lines(log.text(), "TRACKING")) == 2  # garbage is retried once
    assert statuses(m)["tracking"] == "invalid"
    assert "probe_chrony_tracking_info" not in names(m)
    # What chronyd did answer is still reported.
    assert len(label_sets(m, "probe_chrony_source_info")) == 2
    assert statuses(m)["server_stats"] == "ok"


@pytest.mark.parametrize("noise", [b"\x17" * 100, b"\x06", b"\x06\x02\x00\x00",
                                   b"\x05\x02" + b"\0" * 102])
async def test_datagrams_that_are_no_reply_do_not_hide_the_reply_after_them(
    fake: FakeCommandPort, noise: bytes
) -> None:
    # As chronyc: what is not a command reply at all (noise, another protocol version) is
    # ignored, so one forged datagram ahead of chronyd's reply cannot fail the probe.
    fake.behaviour = lambda req: [(noise, 0.0), (fake.chronyd.answer(req), 0.01)]
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module())
    assert m.failure is None, log.text()
    assert set(statuses(m).values()) == {"ok"}
    assert len(sent_lines(log.text(), "TRACKING")) == 1
    assert "datagram ignored: " in log.text()


async def test_unauthorised_tracking_is_reported_with_the_rest(fake: FakeCommandPort) -> None:
    def behaviour(req: Req) -> list[tuple[bytes, float]]:
        if req.command == TRACKING:
            return [(refused(req, STT_UNAUTH), 0.0)]
        return [(fake.chronyd.answer(req), 0.0)]

    fake.behaviour = behaviour
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module())
    assert m.failure == "chrony_unauthorized", log.text()
    assert len(sent_lines(log.text(), "TRACKING")) == 1  # an answer: no retry
    assert statuses(m) == {"tracking": "unauthorized", "n_sources": "ok", "source_data": "ok",
                           "sourcestats": "ok", "server_stats": "ok"}
    assert value(m, "probe_chrony_sources", state="sync") == 1
    assert value(m, "probe_chrony_serverstats_ntp_packets_received_total") == 1000


async def test_sources_closed_to_the_client_are_unauthorised_not_a_bad_reply(
        fake: FakeCommandPort) -> None:
    # chrony 4.7's `opencommands` without sources: SOURCE_DATA answers UNAUTH (chronyc: 501).
    # Each source was asked about and counted unreadable: chrony_bad_reply, as if chronyd's
    # replies were broken, after two refused requests per source.
    fake.chronyd.sources = [FakeSource(f"192.0.2.{i}", state=0 if i == 1 else 4)
                            for i in range(1, 6)]

    def behaviour(req: Req) -> list[tuple[bytes, float]]:
        if req.command in (SOURCE_DATA, SOURCESTATS):
            return [(refused(req, STT_UNAUTH), 0.0)]
        return [(fake.chronyd.answer(req), 0.0)]

    fake.behaviour = behaviour
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module())
    assert m.failure == "chrony_unauthorized", log.text()
    assert [r.index for r in fake.requests if r.command == SOURCE_DATA] == [0]  # then stops
    assert not label_sets(m, "probe_chrony_sources")  # how many are selectable: unknown
    assert value(m, "probe_chrony_tracking_stratum") == 3  # the rest is reported
    # With no candidates asked for, nothing fails.
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module(min_candidates=0))
    assert m.failure is None, log.text()


async def test_a_late_reply_to_the_first_attempt_answers_the_request(
        fake: FakeCommandPort) -> None:
    # A chronyd slower than request_timeout: its answer to attempt 1 comes while the retry
    # waits, and answers the request (as the ntpd prober takes a late first-try reply);
    # the retry is never answered. Before, every such daemon failed chrony_timeout.
    held: list[Req] = []

    def behaviour(req: Req) -> list[tuple[bytes, float]]:
        if req.command != TRACKING:
            return [(fake.chronyd.answer(req), 0.0)]
        if not held:
            held.append(req)
            return [(replace(fake.chronyd, stratum=14).tracking(req), 0.4)]
        return []

    fake.behaviour = behaviour
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module(request_timeout="300ms"))
    assert m.failure is None, log.text()
    assert value(m, "probe_chrony_tracking_stratum") == 14
    first, second = sent_lines(log.text(), "TRACKING")
    assert f"late reply to the earlier attempt (sequence {first[0]}) taken" in log.text()
    assert f"{held[0].sequence:08x}" == first[0] != second[0]
    assert statuses(m)["tracking"] == "ok"


async def test_a_late_reply_to_an_earlier_request_answers_nothing(
        fake: FakeCommandPort) -> None:
    # TRACKING's answer, late, arrives while N_SOURCES waits: ignored as late.
    held: list[Req] = []

    def behaviour(req: Req) -> list[tuple[bytes, float]]:
        if req.command == TRACKING and not held:
            held.append(req)
            return []
        if req.command == N_SOURCES and len(held) == 1:
            held.append(req)
            return [(fake.chronyd.tracking(held[0]), 0.0),
                    (fake.chronyd.answer(req), 0.05)]
        return [(fake.chronyd.answer(req), 0.0)]

    fake.behaviour = behaviour
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module(request_timeout="300ms"))
    assert m.failure is None, log.text()
    assert f"late reply to TRACKING sequence {held[0].sequence:08x}" in log.text()
    assert value(m, "probe_chrony_sources", state="sync") == 1


def test_only_a_reply_echoing_an_expired_request_reads_as_late() -> None:
    lines: list[str] = []
    requests = chrony.Requests(lines.append, None)
    expired = Req(0, TRACKING, 0x1234, None, 0, (LOOPBACK, 323))
    requests.expired.append((Command.TRACKING, expired.sequence))

    def arrive(data: bytes) -> None:
        assert requests.match(Datagram(data, (LOOPBACK, 323), 0, False)) is None

    arrive(b"\x17" * 104)  # noise: no chronyd reply at all
    arrive(FakeChronyd().tracking(replace(expired, sequence=0x9999)))  # answers nothing of ours
    arrive(FakeChronyd().tracking(expired))
    assert lines == ["datagram ignored: no request waiting"] * 2 + [
        "datagram ignored: late reply to TRACKING sequence 00001234"]


async def test_a_deadline_shorter_than_request_timeout_still_asks(fake: FakeCommandPort) -> None:
    # A scrape timeout below request_timeout leaves less than one whole timeout, but
    # plenty of time for a loopback reply: the requests go (the shared pace's rule).
    m, log = await probe(f"{LOOPBACK}:{fake.port}",
                         chrony_module(timeout="1s", request_timeout="2s"))
    assert m.failure is None, log.text()
    assert statuses(m)["tracking"] == "ok"
    assert value(m, "probe_chrony_sources", state="sync") == 1


async def test_short_deadline_reports_the_sources_obtained(fake: FakeCommandPort) -> None:
    fake.chronyd.sources = [FakeSource(f"192.0.2.{i}", state=4) for i in range(1, 41)]
    # Every reply takes 10 ms: 83 commands cannot fit in 500 ms.
    fake.behaviour = lambda req: [(fake.chronyd.answer(req), 0.01)]
    module = chrony_module(timeout="500ms", request_timeout="100ms")
    m, log = await probe(f"{LOOPBACK}:{fake.port}", module)
    # The prober kept its own deadline: the runner's backstop did not have to end it.
    assert "probe deadline reached" not in log.text()
    text = log.text()
    assert re.search(r"(SOURCE_DATA|SOURCESTATS) \d+: not sent: 0\.\d+s left", text), text
    obtained = label_sets(m, "probe_chrony_source_info")
    assert 0 < len(obtained) < 40
    # Counts of the part read would be wrong counts (alerts read them): none.
    assert value(m, "probe_chrony_sources", state="candidate") is None
    report = chrony.report_of(m)
    assert report is not None
    assert not {"sources", "sources_selectable"} & {p.label for p in report.perfdata()}
    assert value(m, "probe_chrony_tracking_stratum") == 3
    assert (SERVER_STATS, None) not in fake.commands()
    assert "server_stats" not in statuses(m)  # never sent, so not listed
    assert m.packets_sent == len(fake.requests)
    assert f"{len(obtained)} of 40 sources obtained" in text
    assert m.failure is None  # tracking answered, candidates enough


async def test_a_deadline_that_cuts_the_sources_short_is_no_verdict_on_them(
    fake: FakeCommandPort
) -> None:
    # The one candidate comes last; the deadline ends the reading before it.
    fake.chronyd.sources = [FakeSource(f"192.0.2.{i}", state=2) for i in range(1, 40)] + [
        FakeSource("192.0.2.40", state=4)]
    fake.behaviour = lambda req: [(fake.chronyd.answer(req), 0.01)]
    m, log = await probe(f"{LOOPBACK}:{fake.port}",
                         chrony_module(timeout="500ms", request_timeout="100ms"))
    assert m.failure == "chrony_timeout", log.text()
    assert "not too_few_sources" in log.text()
    # Read whole, the same daemon is judged on its sources.
    fake.behaviour = lambda req: [(fake.chronyd.answer(req), 0.0)]
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module(min_candidates=2))
    assert m.failure == "too_few_sources", log.text()


@pytest.mark.parametrize("unreadable", [
    FakeSource("192.0.2.3", state=0, reach=0x1FF),  # beyond the 8-bit register: bad reply
    FakeSource("192.0.2.3", state=9),  # a state this codec does not know: unsupported
])
async def test_an_unreadable_source_leaves_the_counts_out(fake: FakeCommandPort,
                                                          unreadable: FakeSource) -> None:
    # The counts are whole only when every source was read: the source whose reply could
    # not be used may be the one in sync (NTPDaemonNoSelectableSource reads the counts).
    fake.chronyd.sources = [FakeSource("192.0.2.1", state=4), FakeSource("192.0.2.2", state=2),
                            unreadable]
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module())
    assert m.failure is None, log.text()  # the one candidate is enough
    assert "2 of 3 sources obtained" in log.text()
    assert value(m, "probe_chrony_sources", state="sync") is None, log.text()
    assert value(m, "probe_chrony_sources", state="candidate") is None
    report = chrony.report_of(m)
    assert report is not None and "sources" not in {p.label for p in report.perfdata()}
    # Too few candidates read: chronyd's reply is what is wrong, not its sources.
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module(min_candidates=2))
    assert m.failure == "chrony_bad_reply", log.text()
    assert "1 source could not be read" in log.text()


async def test_a_source_gone_since_n_sources_keeps_the_counts_whole(
        fake: FakeCommandPort) -> None:
    # chronyd removed a source between N_SOURCES and its SOURCE_DATA (NOSUCHSOURCE): the
    # sources there are were all read.
    fake.chronyd.sources = [FakeSource("192.0.2.1", state=4), FakeSource("192.0.2.2", state=2)]
    fake.chronyd.n_sources = 3  # the third is refused: STT_NOSUCHSOURCE
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module())
    assert m.failure is None, log.text()
    assert value(m, "probe_chrony_sources", state="candidate") == 1, log.text()
    assert value(m, "probe_chrony_sources", state="falseticker") == 1


async def test_a_list_of_sources_that_changed_while_read_has_no_counts(
        fake: FakeCommandPort) -> None:
    # chronyd restarted with another configuration while its sources were read: N_SOURCES
    # said 5 (the old daemon), the new one has 2, and the rest read as gone. Counting the
    # two as every source would pass a verdict on a list nobody has.
    fake.chronyd.sources = [FakeSource("192.0.2.1", state=0), FakeSource("192.0.2.2", state=4)]
    asked: list[int] = []

    def behaviour(req: Any) -> list[tuple[bytes, float]]:
        if req.command == N_SOURCES:
            asked.append(req.index)
            fake.chronyd.n_sources = 5 if len(asked) == 1 else None
        return [(fake.chronyd.answer(req), 0.0)]

    fake.behaviour = behaviour
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module(min_candidates=3))
    assert len(asked) == 2, log.text()
    assert "chronyd now lists 2 sources, 5 when the reading began" in log.text()
    assert label_sets(m, "probe_chrony_sources") == [], log.text()
    assert m.failure == "chrony_bad_reply", log.text()


@pytest.mark.parametrize(("sources", "leap", "failure"), [
    (0, 0, None),  # `local`, no source at all: an isolated network's master
    (1, 0, "too_few_sources"),  # its one source failed: fell back to `local`
    (0, 3, "leap_unsynchronized"),
])
async def test_only_a_master_without_sources_needs_no_candidates(
        fake: FakeCommandPort, sources: int, leap: int, failure: str | None) -> None:
    fake.chronyd.refid, fake.chronyd.leap = 0x7F7F0101, leap
    fake.chronyd.sources = [FakeSource(f"192.0.2.{i + 1}", state=1) for i in range(sources)]
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module())
    assert m.failure == failure, log.text()


async def test_statistics_of_another_source_than_its_data_are_left_out(
        fake: FakeCommandPort) -> None:
    # `chronyc delete` between a source's SOURCE_DATA and its SOURCESTATS: the next source
    # moves up to that number, and its statistics were shown under the deleted one's
    # index (the CLI printed them on its line; no source_info for their label to join).
    fake.chronyd.sources = [FakeSource("192.0.2.1", state=0), FakeSource("192.0.2.2", state=4),
                            FakeSource("192.0.2.3", state=4)]

    def behaviour(req: Any) -> list[tuple[bytes, float]]:
        answer = fake.chronyd.answer(req)
        if (req.command, req.index) == (SOURCE_DATA, 0):
            del fake.chronyd.sources[0]
        return [(answer, 0.0)]

    fake.behaviour = behaviour
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module())
    shown = {labels["source"] for labels in label_sets(m, "probe_chrony_source_info")}
    assert {labels["source"] for labels in label_sets(m, "probe_chrony_sourcestats_samples")
            } <= shown, log.text()
    assert label_sets(m, "probe_chrony_sources") == []  # not the counts of one list
    assert "sourcestats of source 0 name 192.0.2.2, not 192.0.2.1: the list changed" in \
        log.text()


async def test_no_source_is_asked_about_after_one_that_is_no_more(
        fake: FakeCommandPort) -> None:
    # chronyd numbers its sources without gaps: after NOSUCHSOURCE every later index is
    # gone too, and chronyc stops asking there. A forged or stale count of 256 must not
    # cost 512 requests.
    fake.chronyd.sources = []
    fake.chronyd.n_sources = 256
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module())
    assert fake.commands() == [(TRACKING, None), (N_SOURCES, None), (SOURCE_DATA, 0),
                               (N_SOURCES, None), (SERVER_STATS, None)], log.text()
    assert "source 0 and after: no such source" in log.text()
    assert m.failure == "too_few_sources", log.text()  # the count is the same again


async def test_a_count_asked_again_and_unanswered_ends_the_probe_as_chrony_timeout(
        fake: FakeCommandPort) -> None:
    # chronyd stopped answering after a source went: the number asked again gets no reply.
    # That is its silence (chrony_timeout), not a list that changed (chrony_bad_reply), and
    # nothing more is sent to it (no SERVER_STATS).
    fake.chronyd.sources = [FakeSource("192.0.2.1", state=0), FakeSource("192.0.2.2", state=4)]
    fake.chronyd.n_sources = 5
    asked: list[int] = []

    def behaviour(req: Any) -> list[tuple[bytes, float]]:
        if req.command == N_SOURCES:
            asked.append(req.index)
            if len(asked) > 1:
                return []
        return [(fake.chronyd.answer(req), 0.0)]

    fake.behaviour = behaviour
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module(min_candidates=3))
    assert m.failure == "chrony_timeout", log.text()
    assert len(asked) == 3, log.text()  # the first, then the re-ask and its retry
    assert (SERVER_STATS, None) not in fake.commands(), log.text()
    assert label_sets(m, "probe_chrony_sources") == [], log.text()


async def test_hostile_source_values_are_contained(fake: FakeCommandPort) -> None:
    fake.chronyd.sources = [
        FakeSource("192.0.2.1", state=0, poll=2000),  # 2**2000 s: no float holds it
        FakeSource("192.0.2.2", state=4, poll=-32768),
        FakeSource("192.0.2.1", state=4),  # the first source's address again
    ]
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module())
    assert m.failure is None, log.text()
    assert label_sets(m, "probe_chrony_source_poll_seconds") == []
    assert [s["source"] for s in label_sets(m, "probe_chrony_source_info")] == [
        "192.0.2.1", "192.0.2.2"]
    assert len(label_sets(m, "probe_chrony_sourcestats_samples")) == 2
    assert "a second source at 192.0.2.1: left out" in log.text()
    # chronyd never has two sources at one address: the repeat is a reply that cannot be
    # used, so the counts would not be of every source.
    assert value(m, "probe_chrony_sources", state="candidate") is None
    render(m, None)  # and it renders
    # A repeated source does not count twice towards min_candidates either.
    fake.chronyd.sources = [FakeSource("192.0.2.1", state=0)] * 3
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module(min_candidates=2))
    assert m.failure == "chrony_bad_reply", log.text()


async def test_two_refclocks_with_one_refid_are_both_counted(fake: FakeCommandPort) -> None:
    # chronyd takes two refclocks with one refid (chronyc lists "#? GPS" and "#* GPS"):
    # one set of series per name, the selected one's; both count towards the verdict.
    gps = "71.80.83.0"  # refid "GPS"
    fake.chronyd.sources = [FakeSource(gps, state=1, mode=2, samples=0),
                            FakeSource(gps, state=0, mode=2, samples=7)]
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module())
    assert m.failure is None, log.text()
    assert label_sets(m, "probe_chrony_source_info") == [
        {"source": "GPS", "mode": "refclock", "state": "sync"}]
    assert value(m, "probe_chrony_sourcestats_samples", source="GPS") == 7  # its own stats
    assert value(m, "probe_chrony_sources", state="sync") == 1
    assert value(m, "probe_chrony_sources", state="unusable") == 1
    assert "two sources named GPS: the sync one has the series" in log.text()
    render(m, None)
    # Two candidates of one name both count towards min_candidates.
    fake.chronyd.sources = [FakeSource(gps, state=4, mode=2)] * 2
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module(min_candidates=2))
    assert m.failure is None, log.text()


@pytest.mark.parametrize(("n_sources", "reason"), [
    ("timeout", "chrony_timeout"), ("unauthorized", "chrony_unauthorized"),
    ("malformed", "chrony_bad_reply"),
])
async def test_sources_never_counted_are_no_verdict_on_them(
        fake: FakeCommandPort, n_sources: str, reason: str) -> None:
    # Tracking answered, N_SOURCES did not: how many sources there are is unknown, so the
    # reason is chronyd's answer to N_SOURCES, not too_few_sources.
    def behaviour(req: Req) -> list[tuple[bytes, float]]:
        if req.command != N_SOURCES:
            return [(fake.chronyd.answer(req), 0.0)]
        if n_sources == "timeout":
            return []
        if n_sources == "unauthorized":
            return [(refused(req, STT_UNAUTH), 0.0)]
        return [(header(req, RPY_N_SOURCES), 0.0)]  # its count cut off

    fake.behaviour = behaviour
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module())
    assert m.failure == reason, log.text()
    assert value(m, "probe_chrony_tracking_stratum") == 3


async def test_a_daemon_claiming_millions_of_sources_is_asked_about_a_few(
    fake: FakeCommandPort
) -> None:
    fake.chronyd.n_sources = 0xFFFFFFFF
    fake.chronyd.sources = [FakeSource(str(ipaddress.IPv4Address(0x0A000001 + i)), state=1)
                            for i in range(chrony.MAX_SOURCES + 10)]
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module(timeout="10s"))
    assert f"asking about the first {chrony.MAX_SOURCES}" in log.text()
    asked = [r for r in fake.requests if r.command in (SOURCE_DATA, SOURCESTATS)]
    assert max(r.index or 0 for r in asked) == chrony.MAX_SOURCES - 1
    assert len(asked) == 2 * chrony.MAX_SOURCES
    assert (SERVER_STATS, None) in fake.commands()
    # The sources past the cap were not read: no counts that would pass for all of them.
    assert not label_sets(m, "probe_chrony_sources"), log.text()
    # With none selectable among those read, no too_few_sources either: the candidates
    # may be among the others.
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module(timeout="10s",
                                                                  min_candidates=1000))
    assert m.failure == "chrony_bad_reply", log.text()  # (the log is past its cap here)


async def test_an_icmp_error_from_another_host_leaves_the_retry_to_decide(
    fake: FakeCommandPort
) -> None:
    require_raw_socket()

    def first_lost_and_forged(req: Req) -> list[tuple[bytes, float]]:
        if req.n == 0:
            forge_unreachable(req.addr, fake.port, "127.0.0.9")
            return []
        return [(fake.chronyd.answer(req), 0.0)]

    fake.behaviour = first_lost_and_forged
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module())
    assert m.failure is None, log.text()
    assert "from 127.0.0.9, not the target (attempt 1)" in log.text()
    assert len(sent_lines(log.text(), "TRACKING")) == 2

    # Silence on the retry does not override the error: a router's "no route" stays one.
    def forged_then_silent(req: Req) -> list[tuple[bytes, float]]:
        if req.command == TRACKING and req.sequence == fake.requests[0].sequence:
            forge_unreachable(req.addr, fake.port, "127.0.0.9")
        return []

    fake.requests.clear()
    fake.behaviour = forged_then_silent
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module())
    assert m.failure == "unreachable", log.text()
    assert len(sent_lines(log.text(), "TRACKING")) == 2
    assert statuses(m) == {"tracking": "timeout"}  # sent, and listed: no answer came


async def test_a_command_sent_to_a_closed_port_is_listed(fake: FakeCommandPort) -> None:
    # "for every command sent": the ICMP port unreachable that ends the probe leaves the
    # command listed, as no answer (the reason, unreachable, says why).
    port = free_udp_port()
    m, log = await probe(f"{LOOPBACK}:{port}", chrony_module())
    assert m.failure == "unreachable", log.text()
    assert statuses(m) == {"tracking": "timeout"}


async def test_a_reply_from_another_port_is_discarded(fake: FakeCommandPort) -> None:
    loop = asyncio.get_running_loop()
    other, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                   local_addr=(LOOPBACK, 0))
    try:
        def behaviour(req: Req) -> list[tuple[bytes, float]]:
            if req.command == TRACKING and req.n == 0:
                # A spoofer answers first, from another port; the real daemon stays silent.
                other.sendto(replace(fake.chronyd, stratum=1).tracking(req), req.addr)
                return []
            return [(fake.chronyd.answer(req), 0.0)]

        fake.behaviour = behaviour
        m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module())
    finally:
        other.close()
    assert "discarded: not the target" in log.text()
    assert value(m, "probe_chrony_tracking_stratum") == 3
    assert len(sent_lines(log.text(), "TRACKING")) == 2


async def test_a_budget_too_short_for_any_request_sends_nothing_and_blames_no_one(
        fake: FakeCommandPort) -> None:
    # A scrape-timeout header of a few milliseconds (config refuses such a module timeout;
    # the header can still give one): nothing sent, and not chronyd's chrony_timeout.
    m, log = await probe(f"{LOOPBACK}:{fake.port}", replace(chrony_module(), timeout=0.02))
    assert m.failure == "local_error", log.text()
    assert m.failure_detail == NO_TIME
    assert not fake.requests


async def test_too_few_candidates(fake: FakeCommandPort) -> None:
    fake.chronyd.sources = [FakeSource("192.0.2.1", state=2), FakeSource("192.0.2.2", state=0)]
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module(min_candidates=2))
    assert m.failure == "too_few_sources", log.text()
    assert value(m, "probe_chrony_sources", state="falseticker") == 1


async def test_unsynchronised_daemon_fails_on_leap_status(fake: FakeCommandPort) -> None:
    fake.chronyd.leap, fake.chronyd.sources = 3, []
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module())
    # Both checks fail; the leap status ranks first.
    assert m.failure == "leap_unsynchronized", log.text()
    assert value(m, "probe_chrony_tracking_leap_status") == 3
    assert sum(value(m, "probe_chrony_sources", state=s) or 0 for s in SOURCE_STATES) == 0


async def test_socket_mode_checks_the_policy_and_sends_nothing(tmp_path: Path) -> None:
    text = (f"denied_targets: [forbidden.example]\nmodules:\n  c:\n    prober: chrony\n"
            f"    chrony: {{socket: {tmp_path / 'chronyd.sock'}}}\n")
    config = parse_config(text, "test")
    module = config.modules["c"]
    m, log = await probe("forbidden.example", module, guard=guard_for(config, module))
    assert m.failure == "target_forbidden", log.text()
    assert m.packets_sent == 0 and entries(tmp_path) == []
    m, log = await probe("allowed.example", module, guard=guard_for(config, module))
    assert m.failure == "chrony_socket", log.text()  # nothing listens there
    # No count of sources was read, so none is stated ("0 sources in state sync ...").
    assert "sources in state sync" not in log.text()
    # The system's words go with the reason (check's line shows them).
    assert m.failure_detail is not None and "No such file or directory" in m.failure_detail, \
        log.text()
    assert "allowed.example only labels this probe and is not contacted" in log.text()
    assert entries(tmp_path) == []  # the reply socket was removed


async def test_a_command_sent_before_the_socket_went_is_listed_as_unanswered(
        tmp_path: Path) -> None:
    # chronyd stalled, then stopped (its socket removed) between TRACKING's attempts: the
    # retry cannot be sent, but the first attempt was, and went unanswered.
    path = tmp_path / "chronyd.sock"
    daemon = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    daemon.bind(str(path))
    daemon.setblocking(False)
    loop = asyncio.get_running_loop()
    received = asyncio.Event()

    def stop() -> None:
        daemon.recv(4096)
        loop.remove_reader(daemon.fileno())
        daemon.close()
        path.unlink()
        received.set()

    loop.add_reader(daemon.fileno(), stop)
    try:
        m, log = await probe("local", chrony_module(socket=str(path)))
    finally:
        if not received.is_set():
            loop.remove_reader(daemon.fileno())
            daemon.close()
    assert received.is_set()
    assert m.failure == "chrony_socket", log.text()
    assert statuses(m) == {"tracking": "timeout"}, log.text()


def test_a_link_local_daemon_answers_without_its_zone_in_the_source() -> None:
    # fe80::1%2 is the target; the datagram's source names the zone as its scope id only.
    lines: list[str] = []
    requests = chrony.Requests(lines.append, ("fe80::1%2", 323))
    requests.match(Datagram(b"x", ("fe80::1", 323, 0, 2), 0, False))
    requests.match(Datagram(b"x", ("fe80::2", 323, 0, 2), 0, False))
    requests.match(Datagram(b"x", ("fe80::1", 323, 0, 3), 0, False))  # another link
    assert lines == ["datagram ignored: no request waiting",
                     "datagram from fe80::2 port 323 discarded: not the target",
                     "datagram from fe80::1 port 323 discarded: not the target"]


async def test_a_source_without_an_address_yet_is_left_out_as_chronyc_does(
        fake: FakeCommandPort) -> None:
    # chronyd started before DNS answered: the unresolved names are ID#n entries, which
    # `chronyc sources` does not list.
    fake.chronyd.sources.insert(0, FakeSource("ID#0000000001", state=1))
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module())
    assert m.failure is None, log.text()
    assert {s["source"] for s in label_sets(m, "probe_chrony_source_info")} == {
        "192.0.2.1", "192.0.2.2"}
    assert value(m, "probe_chrony_sources", state="unusable") == 0
    assert "source 0 (ID#0000000001) has no address yet: left out" in log.text()
    assert (SOURCESTATS, 0) not in fake.commands()  # not asked about: nothing to show
    assert "sources obtained" not in log.text()


async def test_no_source_counts_in_the_perfdata_when_none_were_read(
        fake: FakeCommandPort) -> None:
    fake.behaviour = lambda req: []  # chronyd silent: nothing was learnt about sources
    m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module(timeout="500ms"))
    assert m.failure == "chrony_timeout", log.text()
    report = chrony.report_of(m)
    assert report is not None
    assert not {"sources", "sources_selectable"} & {p.label for p in report.perfdata()}


async def test_no_socket_left_is_a_local_error(fake: FakeCommandPort) -> None:
    # Past the probes' share of the open-files limit: this host's trouble, not the
    # daemon's (over UDP it read 'unreachable', over the unix socket 'chrony_socket').
    limit_probe_sockets(0)
    try:
        m, log = await probe(f"{LOOPBACK}:{fake.port}", chrony_module())
    finally:
        limit_probe_sockets(None)
    assert m.failure == "local_error", log.text()
    assert not fake.requests


async def test_a_request_whose_shared_burst_outlasts_it_is_a_local_error() -> None:
    # At the limit of bursts in flight, none sure to end within a short request's budget:
    # it shares the soonest, which outlasts it here. That is this exporter's limit, not
    # chronyd's silence (neither chrony_timeout nor the NTP `timeout` that pages as
    # NTPServerUnreachable).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        module = chrony_module(timeout="5s", request_timeout="2s",
                               port=silent.getsockname()[1])
        config = Config(modules={"c": module}, source="test")
        coordinator = Coordinator()
        target = parse_target("127.0.0.1")
        long = [asyncio.ensure_future(coordinator.probe(config, module, target, budget))
                for budget in (5.0, 4.0)]  # the limit of bursts in flight
        await asyncio.sleep(0)  # one pass: each has started its burst
        try:
            out = await coordinator.probe(config, module, target, 0.3)
            assert out.result.failure == "local_error", out.log.text()
            assert out.result.failure_detail == (
                "2 bursts of this module and target were in flight, none sure to end within "
                "this request's budget of 0.3s, and the one shared outlasted it: nothing "
                "sent for it")
            assert "outlasted this request's timeout" in out.log.text()
        finally:
            for task in long:
                task.cancel()
            await asyncio.gather(*long, return_exceptions=True)
