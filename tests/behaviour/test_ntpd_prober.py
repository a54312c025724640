"""The ntpd prober against an in-process fake mode 6 server on 127.0.0.1.

The fake server runs on the test's event loop and answers each request with datagrams
the test builds byte by byte (headers packed here, not by the codec under test): a
healthy ntpd with three associations, then the ways a real one or the path between
goes wrong. Delays are ``loop.call_later`` in the server, never sleeps in the test.
The prober is called directly with its context, without the runner's backstop, so
that a probe overrunning its deadline would show.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from ntp_probe.cli import report
from ntp_probe.config.schema import Module, NTPDSettings
from ntp_probe.engine.context import ProbeContext, ProbeLog
from ntp_probe.engine.result import NO_TIME, Measurement
from ntp_probe.engine.targets import parse_target
from ntp_probe.net.budget import limit_probe_sockets
from ntp_probe.probers import ntpd
from tests.behaviour.fake_server import forge_unreachable, require_raw_socket
from tests.conftest import free_udp_port, gauges, label_sets, names, value

LOOPBACK = "127.0.0.1"
READSTAT, READVAR = 1, 2
MAX_DATA = 468
SYS_PEER, CANDIDATE, OUTLIER = 17767, 17768, 17769
# Peer status words: configured + reachable, selection code in bits 8..10, one event.
PEER_WORDS = {SYS_PEER: 0x961A, CANDIDATE: 0x9414, OUTLIER: 0x9314}
SYSTEM_STATUS = 0x0618  # leap_none, sync_ntp, 1 event, no_sys_peer
SYSTEM_VARIABLES = (
    b'version="ntpd ntpsec-1.2.2", processor="x86_64", leap=0, stratum=2,\r\n'
    b"precision=-23, rootdelay=1.250, rootdisp=3.500, refid=192.0.2.1,\r\n"
    b"reftime=0xeeb92503.13ade12e, tc=6, peer=17767, offset=-0.250000,\r\n"
    b"frequency=-12.345, sys_jitter=0.125000, clk_jitter=0.002000, clk_wander=0.004,\r\n"
    b"leapsec=2017-01-01T00:00Z, expire=2026-06-28T00:00Z, tai=37, mintc=0"
)
PEER_ADDRESSES = {SYS_PEER: "192.0.2.1", CANDIDATE: "192.0.2.2", OUTLIER: "192.0.2.3"}


def peer_variables(association: int) -> bytes:
    """One peer's READVAR text; offsets in ms as ntpd prints them."""
    n = association - SYS_PEER
    return (f"srcadr={PEER_ADDRESSES[association]}, srcport=123, leap=0, stratum={n + 1},\r\n"
            f"refid=10.0.0.{n}, reach=0x{0xFF >> n:x}, unreach=0, hpoll=6, ppoll={6 - n},\r\n"
            f"delay={10 + n}.500000, offset={n}.250000, jitter=0.{n}50000,\r\n"
            f"dispersion={n}.125000, flash=0x0").encode()


UPTIME_VARIABLES = b"ss_uptime=3600, ss_numctlreq=42"
SYSSTATS_VARIABLES = (
    b"ss_reset=600, ss_received=100, ss_thisver=90, ss_oldver=10, ss_badformat=1,\r\n"
    b"ss_badauth=2, ss_declined=3, ss_restricted=4, ss_limited=5, ss_kodsent=6,\r\n"
    b"ss_processed=80, ss_reset_r=3600, ss_received_r=1000, ss_thisver_r=900,\r\n"
    b"ss_oldver_r=100, ss_badformat_r=11, ss_badauth_r=12, ss_declined_r=13,\r\n"
    b"ss_restricted_r=14, ss_limited_r=15, ss_kodsent_r=16, ss_processed_r=800,\r\n"
    b"ss_ver1=0, ss_ver1_r=7, ss_ver1client=0, ss_ver1client_r=0, ss_ver1zero=0,\r\n"
    b"ss_ver1zero_r=0, ss_ver1symm=0, ss_ver1symm_r=0"
)
IOSTATS_VARIABLES = (
    b"iostats_reset=3600, total_rbuf=10, free_rbuf=9, used_rbuf=1, rbuf_lowater=2,\r\n"
    b"io_dropped=3, io_ignored=4, io_received=1100, io_sent=1200, io_sendfailed=5,\r\n"
    b"io_wakeups=2000, io_goodwakeups=1900"
)


@dataclass(frozen=True, slots=True)
class Request:
    """One mode 6 request the fake received, decoded by hand."""

    opcode: int
    sequence: int
    association: int
    names: tuple[str, ...]
    at: float  # loop.time() when read


def header(req: Request, *, count: int, offset: int = 0, more: bool = False,
           error: bool = False, status: int = 0, association: int | None = None) -> bytes:
    """A reply header: version 2, mode 6, R set; E and M as asked."""
    flags = 0x80 | (0x40 if error else 0) | (0x20 if more else 0) | req.opcode
    return struct.pack("!BBHHHHH", (2 << 3) | 6, flags, req.sequence, status,
                       req.association if association is None else association, offset, count)


def fragments(req: Request, data: bytes, status: int, size: int = MAX_DATA) -> list[bytes]:
    """The response split as ntpd splits it, in order, each padded to 4 octets."""
    chunks = [data[i:i + size] for i in range(0, len(data), size)] or [b""]
    return [header(req, count=len(c), offset=i * size, more=i < len(chunks) - 1, status=status)
            + c + bytes(-len(c) % 4) for i, c in enumerate(chunks)]


def error_reply(req: Request, code: int) -> bytes:
    """E=1 with the error code in the status word's high byte."""
    return header(req, count=0, error=True, status=code << 8)


def healthy(req: Request) -> list[bytes]:
    """What a synchronised ntpd with a sys.peer, a candidate and an outlier answers."""
    if req.opcode == READSTAT:
        data = b"".join(struct.pack("!HH", a, w) for a, w in PEER_WORDS.items())
        return fragments(req, data, SYSTEM_STATUS)
    if req.association in PEER_WORDS:
        return fragments(req, peer_variables(req.association), PEER_WORDS[req.association])
    if req.association != 0:
        return [error_reply(req, 4)]  # badassoc
    if not req.names:
        return fragments(req, SYSTEM_VARIABLES, SYSTEM_STATUS)
    known = {}
    for text in (UPTIME_VARIABLES, SYSSTATS_VARIABLES, IOSTATS_VARIABLES):
        for item in text.replace(b"\r\n", b"").split(b","):
            name, _, raw = item.strip().partition(b"=")
            known[name.decode()] = raw.decode()
    if any(n not in known for n in req.names):
        return [error_reply(req, 5)]  # unknownvar
    body = ", ".join(f"{n}={known[n]}" for n in req.names).encode()
    return fragments(req, body, SYSTEM_STATUS)


Behaviour = Callable[[Request], list[bytes]]


def system_variables(text: bytes) -> Behaviour:
    """A healthy ntpd whose system READVAR (ntpq -c rv) answers ``text``."""
    def behaviour(req: Request) -> list[bytes]:
        if req.opcode == READVAR and req.association == 0 and not req.names:
            return fragments(req, text, SYSTEM_STATUS)
        return healthy(req)
    return behaviour


@dataclass
class FakeNtpd(asyncio.DatagramProtocol):
    """A mode 6 server: records every request, sends what ``behaviour`` returns."""

    behaviour: Behaviour = healthy
    delay: float = 0.0  # added before every reply (network or server latency)
    requests: list[Request] = field(default_factory=list)
    transport: asyncio.DatagramTransport | None = None
    last_addr: tuple[str, int] = ("", 0)  # where the latest request came from

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        self.last_addr = addr
        _, flags, sequence, _, association, _, count = struct.unpack_from("!BBHHHHH", data)
        text = data[12:12 + count].decode()
        req = Request(flags & 0x1F, sequence, association,
                      tuple(text.split(",")) if text else (), loop.time())
        self.requests.append(req)
        for datagram in self.behaviour(req):
            if self.delay:
                loop.call_later(self.delay, self._send, datagram, addr)
            else:
                self._send(datagram, addr)

    def _send(self, datagram: bytes, addr: tuple[str, int]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(datagram, addr)

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])


@pytest.fixture
async def server() -> AsyncIterator[FakeNtpd]:
    loop = asyncio.get_running_loop()
    fake = FakeNtpd()
    transport, _ = await loop.create_datagram_endpoint(lambda: fake, local_addr=(LOOPBACK, 0))
    fake.transport = transport
    try:
        yield fake
    finally:
        transport.close()


@dataclass
class Outcome:
    """One probe's result as the tests look at it."""

    m: Measurement
    log: str
    started: float
    deadline: float
    returned: float


async def run(server: FakeNtpd, *, timeout: float = 2.0, request_timeout: float = 0.2,
              min_candidates: int = 1) -> Outcome:
    """Probe the fake server with the prober itself (no runner backstop)."""
    loop = asyncio.get_running_loop()
    module = Module(name="ntpd", prober="ntpd", timeout=timeout,
                    ntpd=NTPDSettings(request_timeout=request_timeout,
                                      min_candidates=min_candidates))
    started = loop.time()
    log = ProbeLog()
    ctx = ProbeContext(deadline=started + timeout, log=log)
    m = await ntpd.probe(parse_target(f"{LOOPBACK}:{server.port}"), module, ctx)
    return Outcome(m, log.text(), started, ctx.deadline, loop.time())


def selections(m: Measurement) -> dict[str, float]:
    return {dict(pairs)["selection"]: v for n, pairs, v in gauges(m) if n == "probe_ntpd_peers"}


def peer_value(m: Measurement, name: str, association: int) -> float | None:
    return value(m, name, assoc=str(association), peer=PEER_ADDRESSES[association])


# --- a healthy ntpd -----------------------------------------------------------------------


async def test_healthy_ntpd_in_base_units(server: FakeNtpd) -> None:
    out = await run(server)
    m = out.m
    assert m.failure is None, out.log
    # READSTAT, system READVAR, one READVAR per association, sysstats (2), iostats.
    assert [(r.opcode, r.association) for r in server.requests] == [
        (READSTAT, 0), (READVAR, 0), (READVAR, SYS_PEER), (READVAR, CANDIDATE),
        (READVAR, OUTLIER), (READVAR, 0), (READVAR, 0), (READVAR, 0)]
    assert m.packets_sent == len(server.requests) == 8
    # Every request a new sequence number.
    assert len({r.sequence for r in server.requests}) == 8
    assert server.requests[1].names == ()  # ntpd's default list, as ntpq -c rv
    assert server.requests[5].names == ("ss_uptime", "ss_numctlreq")
    assert "ss_received_r" in server.requests[6].names
    assert server.requests[7].names[0] == "iostats_reset"

    assert label_sets(m, "probe_ntpd_info") == [
        {"version": "ntpd ntpsec-1.2.2", "refid": "192.0.2.1"}]
    assert value(m, "probe_ntpd_leap_indicator") == 0
    assert value(m, "probe_ntpd_stratum") == 2
    assert value(m, "probe_ntpd_offset_seconds") == pytest.approx(-0.00025)
    assert value(m, "probe_ntpd_sys_jitter_seconds") == pytest.approx(0.000125)
    assert value(m, "probe_ntpd_clock_jitter_seconds") == pytest.approx(0.000002)
    assert value(m, "probe_ntpd_frequency_ppm") == pytest.approx(-12.345)
    assert value(m, "probe_ntpd_clock_wander_ppm") == pytest.approx(0.004)
    assert value(m, "probe_ntpd_root_delay_seconds") == pytest.approx(0.00125)
    assert value(m, "probe_ntpd_root_dispersion_seconds") == pytest.approx(0.0035)
    assert value(m, "probe_ntpd_poll_seconds") == 64
    assert value(m, "probe_ntpd_reference_timestamp_seconds") == pytest.approx(
        0xEEB92503 - 2_208_988_800 + 0x13ADE12E / 2**32)
    assert value(m, "probe_ntpd_leapfile_expiry_timestamp_seconds") == 1782604800
    assert value(m, "probe_ntpd_tai_offset_seconds") == 37

    info = {d["assoc"]: d for d in label_sets(m, "probe_ntpd_peer_info")}
    assert info == {
        str(SYS_PEER): {"assoc": str(SYS_PEER), "peer": "192.0.2.1", "refid": "10.0.0.0",
                        "selection": "sys.peer"},
        str(CANDIDATE): {"assoc": str(CANDIDATE), "peer": "192.0.2.2", "refid": "10.0.0.1",
                         "selection": "candidate"},
        str(OUTLIER): {"assoc": str(OUTLIER), "peer": "192.0.2.3", "refid": "10.0.0.2",
                       "selection": "outlier"},
    }
    assert peer_value(m, "probe_ntpd_peer_offset_seconds", CANDIDATE) == pytest.approx(0.00125)
    assert peer_value(m, "probe_ntpd_peer_delay_seconds", OUTLIER) == pytest.approx(0.0125)
    assert peer_value(m, "probe_ntpd_peer_jitter_seconds", OUTLIER) == pytest.approx(0.00025)
    assert peer_value(m, "probe_ntpd_peer_dispersion_seconds", CANDIDATE) == pytest.approx(
        0.001125)
    assert peer_value(m, "probe_ntpd_peer_stratum", OUTLIER) == 3
    # ntpq's poll column: the shorter of hpoll and ppoll.
    assert peer_value(m, "probe_ntpd_peer_poll_seconds", SYS_PEER) == 64
    assert peer_value(m, "probe_ntpd_peer_poll_seconds", OUTLIER) == 16
    # reach 0xff, 0x7f, 0x3f: every poll answered, 7 of 8, 6 of 8.
    assert peer_value(m, "probe_ntpd_peer_reach_ratio", SYS_PEER) == 1.0
    assert peer_value(m, "probe_ntpd_peer_reach_ratio", CANDIDATE) == 7 / 8
    assert peer_value(m, "probe_ntpd_peer_reach_ratio", OUTLIER) == 6 / 8
    assert peer_value(m, "probe_ntpd_peer_reach_last", OUTLIER) == 1

    assert selections(m) == {"reject": 0, "falsetick": 0, "excess": 0, "outlier": 1,
                             "candidate": 1, "backup": 0, "sys.peer": 1, "pps.peer": 0}

    # Counters: the "_r" totals (since the start), not the hourly ones.
    assert value(m, "probe_ntpd_uptime_seconds") == 3600
    assert value(m, "probe_ntpd_control_requests_total") == 42
    assert value(m, "probe_ntpd_packets_received_total") == 1000
    assert value(m, "probe_ntpd_packets_processed_total") == 800
    assert value(m, "probe_ntpd_packets_rate_limited_total") == 15
    assert value(m, "probe_ntpd_kod_sent_total") == 16
    assert value(m, "probe_ntpd_packets_version1_total") == 7
    assert value(m, "probe_ntpd_packets_dropped_total") == 3
    assert value(m, "probe_ntpd_packets_sent_total") == 1200
    assert value(m, "probe_ntpd_receive_buffers_used") == 1
    counters = {f.name for f, _, _ in m.samples if f.type == "counter"}
    assert "probe_ntpd_packets_received_total" in counters
    assert "probe_ntpd_uptime_seconds" not in counters

    report = ntpd.report_of(m)
    assert report is not None and report.title == "ntpd"
    assert report.check_offset == pytest.approx(-0.00025)
    assert report.sys_peer == SYS_PEER and report.candidates == 2
    assert {p.label for p in report.perfdata()} >= {"offset", "stratum", "candidates"}
    assert report.to_json()["peers"][0]["peer"] == "192.0.2.1"
    # One line per request and one per decoded reply.
    assert out.log.count("ms -> ") == 8 and out.log.count("ms <- ") == 8, out.log
    assert "... (" in out.log  # long variable lists are summarised
    assert m.success, out.log


async def test_min_candidates_above_the_candidates_is_too_few_sources(
        server: FakeNtpd) -> None:
    assert (await run(server, min_candidates=2)).m.failure is None
    out = await run(server, min_candidates=3)
    assert out.m.failure == "too_few_sources", out.log
    assert "2 sys.peer or candidate, fewer than min_candidates 3" in out.log


async def test_no_sys_peer_and_unsynchronised(server: FakeNtpd) -> None:
    def no_sys_peer(req: Request) -> list[bytes]:
        if req.opcode == READSTAT:
            data = struct.pack("!HH", CANDIDATE, PEER_WORDS[CANDIDATE])
            return fragments(req, data, SYSTEM_STATUS)
        return healthy(req)

    server.behaviour = no_sys_peer
    out = await run(server)
    assert out.m.failure == "no_sys_peer", out.log
    assert selections(out.m)["sys.peer"] == 0

    def unsynchronised(req: Request) -> list[bytes]:
        if req.opcode == READVAR and req.association == 0 and not req.names:
            return fragments(req, SYSTEM_VARIABLES.replace(b"leap=0", b"leap=3"), 0xC618)
        return no_sys_peer(req)

    server.behaviour = unsynchronised
    out = await run(server)
    # Both checks fail; the contract's order names the leap indicator.
    assert out.m.failure == "leap_unsynchronized", out.log
    assert value(out.m, "probe_ntpd_leap_indicator") == 3


@pytest.mark.parametrize(("refid", "associations", "failure"), [
    (b"127.0.0.1", False, None),  # orphan mode, no association: an isolated master
    (b"127.0.0.1", True, "no_sys_peer"),  # its servers failed: it fell back to orphan mode
    (b"192.0.2.1", False, "no_sys_peer"),
])
async def test_only_an_orphan_master_without_associations_needs_no_peer(
        server: FakeNtpd, refid: bytes, associations: bool, failure: str | None) -> None:
    # ntpsec's way to run an isolated network's master (it has no local clock driver):
    # `tos orphan 8` and no server; ntpq shows refid 127.0.0.1 and no association. It read
    # no_sys_peer and paged NTPDaemonNoSelectableSource, where chronyd's `local` did not.
    variables = SYSTEM_VARIABLES.replace(b"refid=192.0.2.1", b"refid=" + refid)

    def orphan(req: Request) -> list[bytes]:
        if req.opcode == READSTAT:
            data = struct.pack("!HH", CANDIDATE, 0x9014) if associations else b""
            return fragments(req, data, SYSTEM_STATUS)
        if req.opcode == READVAR and req.association == 0 and not req.names:
            return fragments(req, variables, SYSTEM_STATUS)
        return healthy(req)

    server.behaviour = orphan
    out = await run(server)
    assert out.m.failure == failure, out.log


async def test_an_absurd_offset_reads_in_exponent_form_in_the_report(server: FakeNtpd) -> None:
    # ntpd's values are text: a hostile one said offset=1e308 (ms), and the CLI's report
    # printed a row of three hundred digits.
    def absurd(req: Request) -> list[bytes]:
        if req.opcode == READVAR and req.association == 0 and not req.names:
            return fragments(req, SYSTEM_VARIABLES.replace(b"offset=-0.250000",
                                                           b"offset=1e308"), SYSTEM_STATUS)
        return healthy(req)

    server.behaviour = absurd
    out = await run(server)
    rows = dict(out.m.reports[0].rows())
    assert rows["offset"] == "+1.000000e+305 s", rows


# --- retries, silence, errors ---------------------------------------------------------------


async def test_answer_only_to_the_retry(server: FakeNtpd) -> None:
    seen: set[tuple[int, int, tuple[str, ...]]] = set()

    def second_time_only(req: Request) -> list[bytes]:
        key = (req.opcode, req.association, req.names)
        if key not in seen:
            seen.add(key)
            return []
        return healthy(req)

    server.behaviour = second_time_only
    out = await run(server, timeout=5.0, request_timeout=0.1)
    assert out.m.failure is None, out.log
    assert len(server.requests) == 16 and out.m.packets_sent == 16
    # Each retry is a new request: a new sequence number, the same question.
    for first, retry in zip(server.requests[::2], server.requests[1::2], strict=True):
        assert (first.opcode, first.association, first.names) == (
            retry.opcode, retry.association, retry.names)
        assert retry.sequence != first.sequence
        assert retry.at - first.at >= 0.1 - 0.01  # not before the request timed out
    assert out.log.count("(retry)") == 8
    assert len(label_sets(out.m, "probe_ntpd_peer_info")) == 3


async def test_a_budget_too_short_for_any_request_sends_nothing_and_blames_no_one(
        server: FakeNtpd) -> None:
    # A scrape-timeout header of a few milliseconds: no request could get its reply in
    # time, so none is sent, and mode6_timeout (ntpd's silence) would be untrue.
    out = await run(server, timeout=0.02)
    assert out.m.failure == "local_error", out.log
    assert out.m.failure_detail == NO_TIME
    assert server.requests == []


async def test_silence_is_mode6_timeout_within_the_deadline(server: FakeNtpd) -> None:
    server.behaviour = lambda req: []
    out = await run(server, timeout=2.0, request_timeout=0.3)
    assert out.m.failure == "mode6_timeout", out.log
    # READSTAT and its retry, then nothing more: a silent server gets nothing else.
    assert [(r.opcode, r.association) for r in server.requests] == [(READSTAT, 0)] * 2
    assert out.m.packets_sent == 2
    assert out.returned <= out.deadline
    assert "noquery" in out.log
    assert not label_sets(out.m, "probe_ntpd_info")
    assert not label_sets(out.m, "probe_ntpd_peers")


async def test_silence_with_a_short_deadline_never_overruns(server: FakeNtpd) -> None:
    server.behaviour = lambda req: []
    out = await run(server, timeout=0.3, request_timeout=0.5)
    assert out.m.failure == "mode6_timeout", out.log
    assert out.returned <= out.deadline
    assert len(server.requests) == 1  # no time left for a retry
    # Said as such: not blamed on a silent server (restrict noquery).
    assert "no time left for a retry" in out.log and "noquery" not in out.log


async def test_nothing_listening_is_unreachable() -> None:
    loop = asyncio.get_running_loop()
    module = Module(name="ntpd", prober="ntpd", timeout=2.0,
                    ntpd=NTPDSettings(request_timeout=0.5))
    log = ProbeLog()
    ctx = ProbeContext(deadline=loop.time() + 2.0, log=log)
    m = await ntpd.probe(parse_target(f"{LOOPBACK}:{free_udp_port()}"), module, ctx)
    assert m.failure == "unreachable", log.text()
    assert m.failure_detail is not None and m.failure_detail.startswith(
        "ICMP port unreachable"), m.failure_detail
    assert m.packets_sent == 1  # the ICMP error ends the probe: no retry, nothing else


async def test_error_reply_is_mode6_error_with_its_name(server: FakeNtpd) -> None:
    def refuse_system(req: Request) -> list[bytes]:
        if req.opcode == READVAR and req.association == 0 and not req.names:
            return [error_reply(req, 7)]
        return healthy(req)

    server.behaviour = refuse_system
    out = await run(server)
    assert out.m.failure == "mode6_error", out.log
    assert "error adminproh (7)" in out.log
    # The rest was still asked and reported.
    assert len(label_sets(out.m, "probe_ntpd_peer_info")) == 3
    assert value(out.m, "probe_ntpd_packets_received_total") == 1000
    assert not label_sets(out.m, "probe_ntpd_info")


async def test_a_negative_counter_is_left_out(server: FakeNtpd) -> None:
    # ntpd prints its counters unsigned: a negative one (a hostile server's) would read as
    # a counter reset in Prometheus.
    def negative(req: Request) -> list[bytes]:
        if req.opcode == READVAR and req.association == 0 and req.names:
            body = ", ".join(f"{n}=-{i + 1}" for i, n in enumerate(req.names)).encode()
            return fragments(req, body, SYSTEM_STATUS)
        return healthy(req)

    server.behaviour = negative
    out = await run(server)
    assert out.m.failure is None, out.log
    assert not [n for n in names(out.m) if n.endswith("_total") or "uptime" in n], out.log
    assert "a count cannot be negative" in out.log


@pytest.mark.parametrize(("silent_at", "failure"), [
    (OUTLIER, None), (CANDIDATE, "mode6_timeout"), (SYS_PEER, "mode6_timeout")])
async def test_a_server_silent_past_the_verdicts_peers_fails_nothing(
        server: FakeNtpd, silent_at: int, failure: str | None) -> None:
    # ntpsec's restrict ... limited drops requests past its rate: at a rejected peer (read
    # last) the verdict's inputs are all in; at the system peer or a candidate they are not.
    silent: list[Request] = []

    def limited(req: Request) -> list[bytes]:
        if (req.opcode == READVAR and req.association == silent_at) or silent:
            silent.append(req)
            return []
        return healthy(req)

    server.behaviour = limited
    out = await run(server)
    assert out.m.failure == failure, out.log
    assert "nothing more sent" in out.log
    if failure is None:
        assert "left out, no failure" in out.log
        assert value(out.m, "probe_ntpd_peers", selection="outlier") == 1  # READSTAT's


@pytest.mark.parametrize("how", ["refused", "refused one at a time", "silent", "garbled"])
async def test_counters_that_cannot_be_read_are_left_out_not_a_failure(server: FakeNtpd,
                                                                       how: str) -> None:
    # The verdict reads the system variables and the peers, never the counters: ntpd
    # refusing the sysstats/iostats lists (adminproh), or not answering them (a lost
    # multi-fragment reply, a deadline), costs their series only.
    def counters(req: Request) -> list[bytes]:
        if req.opcode == READVAR and req.association == 0 and req.names:
            if how == "silent":
                return []
            if how == "garbled":
                return [b"\x16\x82" + bytes(10)]  # a response header, nothing that fits
            if how == "refused one at a time" and len(req.names) > 1:
                return [error_reply(req, 5)]  # unknownvar: asked again one by one
            return [error_reply(req, 7)]
        return healthy(req)

    server.behaviour = counters
    out = await run(server)
    assert out.m.failure is None, out.log
    if how.startswith("refused"):
        assert "refused" in out.log and "error adminproh (7)" in out.log
    else:
        assert "left out, no failure" in out.log, out.log
    assert value(out.m, "probe_ntpd_packets_received_total") is None
    assert len(label_sets(out.m, "probe_ntpd_peer_info")) == 3
    assert label_sets(out.m, "probe_ntpd_info")


async def test_an_association_gone_since_readstat_is_no_error(server: FakeNtpd) -> None:
    def outlier_gone(req: Request) -> list[bytes]:
        if req.opcode == READVAR and req.association == OUTLIER:
            return [error_reply(req, 4)]
        return healthy(req)

    server.behaviour = outlier_gone
    out = await run(server)
    assert out.m.failure is None, out.log
    assert "error badassoc (4)" in out.log
    assert sorted(d["assoc"] for d in label_sets(out.m, "probe_ntpd_peer_info")) == [
        str(SYS_PEER), str(CANDIDATE)]


@pytest.mark.parametrize(("first", "status", "restarted"), [
    (SYSTEM_STATUS, 0xC016, True),  # leap back to 3: a restart (and uptime 0)
    # The event counter back at 1: ntpd does that whenever another kind of event follows
    # (two clock steps, then a clock sync), no restart.
    (0x062C, 0x0615, False),
    (SYSTEM_STATUS, SYSTEM_STATUS, False),  # started just before the probe: uptime 0
    (0xC016, 0x0016, False),  # a young daemon synchronising meanwhile: no restart
    # Its last event become a restart: an ntpd back at leap 0 within the probe (orphan
    # mode, orphanwait 0) restarted all the same.
    (SYSTEM_STATUS, 0x0016, True),
    (0x0016, 0x0016, False),  # a daemon started just before: its restart event both times
    (0x0016, 0x0615, False),
])
async def test_a_daemon_restarted_during_the_probe_is_no_success(
        server: FakeNtpd, first: int, status: int, restarted: bool) -> None:
    # The uptime, read last, comes from an ntpd started since READSTAT answered (uptime 0,
    # its status word changed as a restart changes it): the answers mix two daemons.
    def restart(req: Request) -> list[bytes]:
        if req.names == ("ss_uptime", "ss_numctlreq"):
            return fragments(req, b"ss_uptime=0, ss_numctlreq=1", status)
        if req.opcode == READSTAT:
            data = b"".join(struct.pack("!HH", a, w) for a, w in PEER_WORDS.items())
            return fragments(req, data, first)
        return healthy(req)

    server.behaviour = restart
    out = await run(server)
    if restarted:
        assert out.m.failure == "mode6_bad_reply", out.log
        assert out.m.failure_detail == "ntpd restarted during the probe"
        assert "its answers mix two daemons" in out.log
    else:
        assert out.m.failure is None, out.log
    assert value(out.m, "probe_ntpd_uptime_seconds") == 0


async def test_an_icmp_error_from_another_host_leaves_the_retry_to_decide(
    server: FakeNtpd
) -> None:
    require_raw_socket()
    forged: list[Request] = []

    def first_lost_and_forged(req: Request) -> list[bytes]:
        if not forged:
            forged.append(req)
            forge_unreachable(server.last_addr, server.port, "127.0.0.9")
            return []
        return healthy(req)

    server.behaviour = first_lost_and_forged
    out = await run(server)
    assert out.m.failure is None, out.log
    assert "from 127.0.0.9, not the target" in out.log
    assert "(retry)" in out.log

    # Silence on the retry does not override the error: a router's "no route" stays one.
    forged.clear()

    def forged_then_silent(req: Request) -> list[bytes]:
        if not forged:
            forged.append(req)
            forge_unreachable(server.last_addr, server.port, "127.0.0.9")
        return []

    server.behaviour = forged_then_silent
    out = await run(server)
    assert out.m.failure == "unreachable", out.log
    assert "(retry)" in out.log


async def test_thousands_of_associations_are_read_only_up_to_the_cap(server: FakeNtpd) -> None:
    # ntpd lists the newest associations first: the configured servers, the system peer
    # among them, come last. Those past the cap still count, and the system peer is read.
    listed = range(1, 1001)

    def word(association: int) -> int:
        return PEER_WORDS[SYS_PEER if association == 1000 else CANDIDATE]

    def many(req: Request) -> list[bytes]:
        if req.opcode == READSTAT:
            data = b"".join(struct.pack("!HH", a, word(a)) for a in listed)
            return fragments(req, data, SYSTEM_STATUS)
        if req.opcode == READVAR and req.association in listed:
            return fragments(req, peer_variables(SYS_PEER), word(req.association))
        return healthy(req)

    server.behaviour = many
    out = await run(server, timeout=10.0, min_candidates=1000)
    assert out.m.failure is None, out.log
    assert f"1000 associations: reading {ntpd.MAX_ASSOCIATIONS}, the system peer" in out.log
    asked = [r.association for r in server.requests if r.opcode == READVAR and r.association]
    assert len(asked) == ntpd.MAX_ASSOCIATIONS and asked[0] == 1000
    assert len(label_sets(out.m, "probe_ntpd_peer_info")) == ntpd.MAX_ASSOCIATIONS
    assert selections(out.m)["sys.peer"] == 1 and selections(out.m)["candidate"] == 999
    assert "... (936 more)" in out.log  # the log lists the first 64, not a megabyte line


async def test_the_system_peer_and_candidates_are_read_first(server: FakeNtpd) -> None:
    # ntpd lists the newest associations first and the configured servers last: a deadline
    # that cuts the reading short must leave out the rejected ones, not the system peer.
    words = {1: OUTLIER, 2: CANDIDATE, 3: OUTLIER, 4: SYS_PEER, 5: CANDIDATE}

    def listed(req: Request) -> list[bytes]:
        if req.opcode == READSTAT:
            data = b"".join(struct.pack("!HH", a, PEER_WORDS[w]) for a, w in words.items())
            return fragments(req, data, SYSTEM_STATUS)
        if req.opcode == READVAR and req.association in words:
            selection = words[req.association]
            return fragments(req, peer_variables(selection), PEER_WORDS[selection])
        return healthy(req)

    server.behaviour = listed
    out = await run(server)
    assert out.m.failure is None, out.log
    asked = [r.association for r in server.requests if r.opcode == READVAR and r.association]
    assert asked == [4, 2, 5, 1, 3]


async def test_association_0_in_the_list_is_no_peer(server: FakeNtpd) -> None:
    # Association 0 is the system: listed by a hostile server, it is neither read as a
    # peer nor counted (here it would be the only sys.peer).
    def with_zero(req: Request) -> list[bytes]:
        if req.opcode == READSTAT:
            data = struct.pack("!HHHH", 0, PEER_WORDS[SYS_PEER], CANDIDATE,
                               PEER_WORDS[CANDIDATE])
            return fragments(req, data, SYSTEM_STATUS)
        return healthy(req)

    server.behaviour = with_zero
    out = await run(server)
    assert out.m.failure == "no_sys_peer", out.log
    assert "association 0: ignored" in out.log
    assert [r.association for r in server.requests if r.opcode == READVAR] == [0, CANDIDATE,
                                                                               0, 0, 0]
    assert selections(out.m)["sys.peer"] == 0


async def test_a_late_error_to_the_first_try_does_not_beat_the_retry(server: FakeNtpd) -> None:
    # The first READSTAT's error comes while the retry waits; the retry's answer comes
    # after it: the retry's answer stands, as ntpq would read it.
    loop = asyncio.get_running_loop()
    tries: list[Request] = []

    def error_first(req: Request) -> list[bytes]:
        if req.opcode != READSTAT:
            return healthy(req)
        tries.append(req)
        if len(tries) == 1:
            loop.call_later(0.3, server._send, error_reply(req, 5), server.last_addr)
        else:
            for datagram in healthy(req):
                loop.call_later(0.15, server._send, datagram, server.last_addr)
        return []

    server.behaviour = error_first
    out = await run(server, timeout=5.0, request_timeout=0.2)
    assert out.m.failure is None, out.log
    assert "late error unknownvar to the first try" in out.log
    assert len(label_sets(out.m, "probe_ntpd_peer_info")) == 3


async def test_a_complete_reply_after_request_timeout_still_counts(server: FakeNtpd) -> None:
    # A slow ntpd answers each request after request_timeout: the reply to the first try,
    # complete while the retry waits, is as good as the retry's (ntpq waits seconds).
    server.delay = 0.3
    out = await run(server, timeout=10.0, request_timeout=0.2)
    assert out.m.failure is None, out.log
    assert len(label_sets(out.m, "probe_ntpd_peer_info")) == 3
    assert len(server.requests) == 16  # each request and its retry, none more


async def test_unknown_stats_variable_asks_one_at_a_time(server: FakeNtpd) -> None:
    def old_daemon(req: Request) -> list[bytes]:
        # An ntpd without the NTPv1 counters and without the "_r" totals.
        if any(n.startswith("ss_ver1") or n.endswith("_r") for n in req.names):
            return [error_reply(req, 5)]
        return healthy(req)

    server.behaviour = old_daemon
    out = await run(server)
    assert out.m.failure is None, out.log
    singles = [r.names for r in server.requests if len(r.names) == 1]
    assert len(singles) == 30  # every name of the sysstats list, one at a time
    assert "unknown variable in the list: asking one at a time" in out.log
    # Without the totals, the plain counters are reported.
    assert value(out.m, "probe_ntpd_packets_received_total") == 100
    assert value(out.m, "probe_ntpd_packets_version1_total") is None
    assert value(out.m, "probe_ntpd_packets_dropped_total") == 3


# --- fragments and garbage --------------------------------------------------------------------


LONG_SYSTEM = SYSTEM_VARIABLES + b", " + b", ".join(
    f"x_padding_{i}=\"{'z' * 40}\"".encode() for i in range(16))


async def test_fragments_out_of_order_are_reassembled(server: FakeNtpd) -> None:
    def reversed_system(req: Request) -> list[bytes]:
        if req.opcode == READVAR and req.association == 0 and not req.names:
            return fragments(req, LONG_SYSTEM, SYSTEM_STATUS, size=450)[::-1]
        return healthy(req)

    assert 900 < len(LONG_SYSTEM) <= 1350  # three fragments of 450
    server.behaviour = reversed_system
    out = await run(server)
    assert out.m.failure is None, out.log
    assert "in 3 fragments" in out.log
    assert value(out.m, "probe_ntpd_offset_seconds") == pytest.approx(-0.00025)
    assert value(out.m, "probe_ntpd_tai_offset_seconds") == 37
    assert len(server.requests) == 8  # no retry was needed


async def test_a_missing_fragment_is_mode6_bad_reply(server: FakeNtpd) -> None:
    def middle_lost(req: Request) -> list[bytes]:
        if req.opcode == READVAR and req.association == 0 and not req.names:
            first, _, last = fragments(req, LONG_SYSTEM, SYSTEM_STATUS, size=450)
            return [first, last]
        return healthy(req)

    server.behaviour = middle_lost
    out = await run(server, request_timeout=0.1)
    assert out.m.failure == "mode6_bad_reply", out.log
    system = [r for r in server.requests if r.opcode == READVAR and r.association == 0
              and not r.names]
    assert len(system) == 2  # asked again, with a new sequence
    assert system[0].sequence != system[1].sequence
    assert "missing [(450, 900)]" in out.log
    # The server does answer: the peers and counters were still read.
    assert len(label_sets(out.m, "probe_ntpd_peer_info")) == 3
    assert value(out.m, "probe_ntpd_uptime_seconds") == 3600


async def test_garbage_is_discarded_and_the_reply_still_used(server: FakeNtpd) -> None:
    def garbage_first(req: Request) -> list[bytes]:
        junk = [b"\x00" * 3, b"\xff" * 48, struct.pack("!BBH", 0x16, 0x81, req.sequence)]
        return junk + healthy(req)

    server.behaviour = garbage_first
    out = await run(server)
    assert out.m.failure is None, out.log
    assert out.log.count("reply discarded") == 3 * 8
    assert len(server.requests) == 8


async def test_only_garbage_is_mode6_bad_reply(server: FakeNtpd) -> None:
    def garbage_readstat(req: Request) -> list[bytes]:
        if req.opcode == READSTAT:
            return [b"\x16\x81garbage!"]
        return healthy(req)

    server.behaviour = garbage_readstat
    out = await run(server, request_timeout=0.1)
    assert out.m.failure == "mode6_bad_reply", out.log
    assert [r.opcode for r in server.requests[:2]] == [READSTAT, READSTAT]
    # Without the association list the system is still read; no peer is known.
    assert value(out.m, "probe_ntpd_stratum") == 2
    assert not label_sets(out.m, "probe_ntpd_peers")


async def test_a_server_answering_no_mode_6_is_left_alone_after_two_requests(
    server: FakeNtpd,
) -> None:
    # An NTP server answering everything with mode 4: the verdict is made after the
    # association list and the system variables; asking for the counters would only add
    # load (and hold the scrape to its deadline).
    server.behaviour = lambda req: [bytes([0x24, 2, 0, 0]) + bytes(44)]
    out = await run(server, request_timeout=0.1)
    assert out.m.failure == "mode6_bad_reply", out.log
    assert [r.opcode for r in server.requests] == [READSTAT, READSTAT, READVAR, READVAR]
    assert "nothing more sent" in out.log


# --- the deadline -----------------------------------------------------------------------------


async def test_a_deadline_too_short_for_every_association(server: FakeNtpd) -> None:
    many = {SYS_PEER + i: (0x961A if i == 0 else 0x9414) for i in range(12)}

    def twelve_peers(req: Request) -> list[bytes]:
        if req.opcode == READSTAT:
            data = b"".join(struct.pack("!HH", a, w) for a, w in many.items())
            return fragments(req, data, SYSTEM_STATUS)
        if req.association in many:
            address = f"198.51.100.{req.association - SYS_PEER}".encode()
            body = peer_variables(SYS_PEER).replace(b"192.0.2.1", address)
            return fragments(req, body, many[req.association])
        return healthy(req)

    server.behaviour = twelve_peers
    server.delay = 0.04
    out = await run(server, timeout=0.5, request_timeout=0.5)
    read = label_sets(out.m, "probe_ntpd_peer_info")
    assert 0 < len(read) < 12, out.log
    # READSTAT covered all twelve: the counts and the verdict need no peer READVAR.
    assert selections(out.m)["candidate"] == 11 and selections(out.m)["sys.peer"] == 1
    assert out.m.failure is None, out.log
    # Logged once, not once per association left.
    assert out.log.count("no reply could arrive before the deadline") == 1, out.log
    assert out.returned <= out.deadline
    # Nothing was sent that could not be answered in time.
    assert all(r.at + server.delay <= out.deadline for r in server.requests)
    assert value(out.m, "probe_ntpd_uptime_seconds") is None  # the counters come last


async def test_a_peer_poll_not_known_yet_is_no_error(server: FakeNtpd) -> None:
    # ntpsec's ppoll=99 (NTP_MAXPOLL_UNK) until the peer's first packet: ntpq shows hpoll.
    def fresh_peers(req: Request) -> list[bytes]:
        if req.association == SYS_PEER:
            body = peer_variables(SYS_PEER).replace(b"ppoll=6", b"ppoll=99")
            return fragments(req, body, PEER_WORDS[SYS_PEER])
        return healthy(req)

    server.behaviour = fresh_peers
    out = await run(server)
    assert out.m.failure is None, out.log
    assert peer_value(out.m, "probe_ntpd_peer_poll_seconds", SYS_PEER) == 64
    assert "ppoll ignored" not in out.log, out.log


async def test_unknown_and_unreadable_variables_are_tolerated(server: FakeNtpd) -> None:
    server.behaviour = system_variables(
        SYSTEM_VARIABLES.replace(b"offset=-0.250000", b"offset=fast")
        + b', future_var=1, quoted="a, b=c", bare_flag')
    out = await run(server)
    assert out.m.failure is None, out.log
    assert value(out.m, "probe_ntpd_offset_seconds") is None
    assert "variable offset ignored" in out.log
    assert value(out.m, "probe_ntpd_stratum") == 2
    assert value(out.m, "probe_ntpd_tai_offset_seconds") == 37
    report = ntpd.report_of(out.m)
    assert report is not None and report.check_offset is None


async def test_a_hostile_version_string_reaches_no_terminal_raw(server: FakeNtpd) -> None:
    # ntpq shows such text escaped (cat -v style); the CLI's report and the probe log too.
    server.behaviour = system_variables(
        SYSTEM_VARIABLES.replace(b"ntpd ntpsec-1.2.2", b"\x1b[2J\x1b]0;pwned\x07"))
    out = await run(server)
    assert out.m.failure is None, out.log
    text = report.text("t", "ntpd", out.m, ProbeLog())
    assert "\x1b" not in text and "\\x1b[2J\\x1b]0;pwned\\x07" in text, text
    assert "\x1b" not in out.log


def test_a_pool_association_is_named_by_its_srchost_as_ntpq_shows_it() -> None:
    ctx = ProbeContext(0.0)
    ntpd._emit_peer(17773, {"srcadr": "0.0.0.0", "srchost": "pool.example.net",
                            "refid": "POOL"}, 0x8811, ctx)
    ntpd._emit_peer(17774, {"srcadr": "192.0.2.9", "srchost": "ntp.example.net",
                            "refid": "GPS"}, 0x9614, ctx)
    assert [s["peer"] for s in label_sets(ctx.measurement, "probe_ntpd_peer_info")] == [
        "pool.example.net", "192.0.2.9"]


def test_a_link_local_ntpd_answers_from_its_own_link_only() -> None:
    session = ntpd._Session(("fe80::1%2", 123), NTPDSettings(), 0.0, ProbeContext(0.0))
    assert session._from_server(("fe80::1", 123, 0, 2))
    assert not session._from_server(("fe80::1", 123, 0, 3))  # the same address, another link
    assert not session._from_server(("fe80::2", 123, 0, 2))


def test_a_hostile_ntpds_long_values_are_cut_in_labels() -> None:
    ctx = ProbeContext(0.0)
    ntpd._emit_peer(17773, {"srcadr": "a" * 15000, "refid": "b" * 15000}, 0x9614, ctx)
    (labels,) = label_sets(ctx.measurement, "probe_ntpd_peer_info")
    assert len(labels["peer"]) == len(labels["refid"]) == ntpd.MAX_LABEL_TEXT
    assert labels["peer"].endswith("...")


async def test_no_socket_left_is_a_local_error(server: FakeNtpd) -> None:
    # Past the probes' share of the open-files limit: this host's trouble, not the
    # server's (it read 'unreachable').
    limit_probe_sockets(0)
    try:
        out = await run(server)
    finally:
        limit_probe_sockets(None)
    assert out.m.failure == "local_error", out.log
    assert not server.requests
