"""The NTP prober against a real chronyd behind injected network faults.

chronyd (``-x``: the clock is never touched) runs in a network namespace this module
creates (see ``conftest.py``); the probe runs on the host and reaches it over a veth pair.
The faults (this kernel has no netem, so nftables does the dropping):

* loss: an nftables ``numgen random`` drop rule inside the namespace, with counters;
* delay, jitter, asymmetry, duplication and reordering: :class:`UDPRelay` below, an
  asyncio UDP relay on the host side of the veth that forwards to chronyd;
* server death: chronyd killed by its PID in the middle of a burst.

Host and namespace share one kernel clock, so the true offset between the probe and
chronyd is zero: every offset the probe reports is measurement error, which is what the
path asymmetry tests predict exactly.
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest

from ntp_probe.config.schema import Module
from ntp_probe.engine.context import Message, ProbeLog
from ntp_probe.engine.result import Measurement
from ntp_probe.engine.runner import run_probe
from ntp_probe.engine.targets import parse_target
from tests import conftest
from tests.conftest import gauges, ntp_samples
from tests.faults.conftest import (
    Netns,
    NsChronyd,
    nft_counters,
    require_tool,
)

pytestmark = [pytest.mark.integration, pytest.mark.faults]

SLACK = 0.25  # scheduling slack on top of a deadline (an upper bound, not a benchmark)

Delay = Callable[[], float]


def fixed(seconds: float) -> Delay:
    return lambda: seconds


def gaussian(mean: float, sd: float, clamp: float, rng: random.Random) -> Delay:
    """gauss(mean, sd) truncated to mean +/- clamp (so the bounds below are hard)."""
    return lambda: min(max(rng.gauss(mean, sd), mean - clamp), mean + clamp)


# --- the relay --------------------------------------------------------------------------


class _Front(asyncio.DatagramProtocol):
    def __init__(self, relay: UDPRelay) -> None:
        self._relay = relay

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._relay._from_client(data, (str(addr[0]), int(addr[1])))


class _Back(asyncio.DatagramProtocol):
    def __init__(self, relay: UDPRelay) -> None:
        self._relay = relay

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._relay._from_server(data)


class UDPRelay:
    """client <-> relay (host side of the veth) <-> chronyd (in the namespace).

    Each request is forwarded after ``request_delay()`` seconds, each reply after
    ``reply_delay()`` (``loop.call_later``: the delay is the fault, not synchronisation).
    ``duplicate_replies`` sends every reply twice; ``swap_reply_pairs`` holds every first
    reply of a pair until the next reply comes, then sends the newer one first.
    Replies go back to the client whose request carried their origin timestamp (read
    with plain byte offsets, independently of the codec under test).
    """

    def __init__(
        self,
        listen_host: str,
        upstream: tuple[str, int],
        *,
        request_delay: Delay | None = None,
        reply_delay: Delay | None = None,
        duplicate_replies: bool = False,
        swap_reply_pairs: bool = False,
    ) -> None:
        self.listen_host = listen_host
        self.upstream = upstream
        self.request_delay = request_delay or fixed(0.0)
        self.reply_delay = reply_delay or fixed(0.0)
        self.duplicate_replies = duplicate_replies
        self.swap_reply_pairs = swap_reply_pairs
        self.port = 0
        self.requests = 0  # datagrams from clients
        self.replies = 0  # datagrams from chronyd
        self.delivered = 0  # datagrams sent to clients
        self.held: tuple[bytes, tuple[str, int]] | None = None
        self._clients: dict[bytes, tuple[str, int]] = {}
        self._last_client: tuple[str, int] | None = None
        self._front: asyncio.DatagramTransport | None = None
        self._back: asyncio.DatagramTransport | None = None
        self._handles: list[asyncio.TimerHandle] = []

    @property
    def target(self) -> str:
        return f"{self.listen_host}:{self.port}"

    async def start(self) -> UDPRelay:
        loop = asyncio.get_running_loop()
        self._front, _ = await loop.create_datagram_endpoint(
            lambda: _Front(self), local_addr=(self.listen_host, 0)
        )
        self.port = int(self._front.get_extra_info("sockname")[1])
        self._back, _ = await loop.create_datagram_endpoint(
            lambda: _Back(self), local_addr=(self.listen_host, 0), remote_addr=self.upstream
        )
        return self

    def close(self) -> None:
        for handle in self._handles:
            handle.cancel()
        self._handles.clear()
        for transport in (self._front, self._back):
            if transport is not None:
                transport.close()
        self._front = self._back = None

    def _later(self, delay: float, callback: Callable[[], None]) -> None:
        if delay > 0:
            self._handles.append(asyncio.get_running_loop().call_later(delay, callback))
        else:
            callback()

    def _from_client(self, data: bytes, addr: tuple[str, int]) -> None:
        self.requests += 1
        self._last_client = addr
        if len(data) >= 48:
            self._clients[data[40:48]] = addr  # the request's transmit timestamp (nonce)
        self._later(self.request_delay(), functools.partial(self._to_server, data))

    def _to_server(self, data: bytes) -> None:
        if self._back is not None:
            self._back.sendto(data)

    def _from_server(self, data: bytes) -> None:
        self.replies += 1
        addr = self._clients.get(data[24:32], self._last_client) if len(data) >= 48 else None
        if addr is None:
            return
        batch = [(data, addr)]
        if self.swap_reply_pairs:
            if self.held is None:
                self.held = (data, addr)
                return
            batch.append(self.held)  # the newer reply first, then the one held back
            self.held = None
        for payload, client in batch:
            delay = self.reply_delay()
            for _ in range(2 if self.duplicate_replies else 1):
                self._later(delay, functools.partial(self._to_client, payload, client))

    def _to_client(self, data: bytes, addr: tuple[str, int]) -> None:
        if self._front is not None:
            self.delivered += 1
            self._front.sendto(data, addr)


# --- helpers ----------------------------------------------------------------------------


def make_module(*, samples: int, interval: float, reply_timeout: float,
                timeout: float) -> Module:
    return conftest.make_module(name="faults", samples=samples, interval=interval,
                                reply_timeout=reply_timeout, timeout=timeout)


async def probe(target: str, module: Module,
                log: ProbeLog | None = None) -> tuple[Measurement, ProbeLog]:
    return await conftest.probe(target, module, log=log)


def value(result: Measurement, name: str) -> float:
    v = conftest.value(result, name)
    assert v is not None, f"{name} not reported: {gauges(result)}"
    return v


def counts(result: Measurement) -> tuple[int, int, float]:
    return (
        int(value(result, "probe_ntp_samples_sent")),
        int(value(result, "probe_ntp_samples_received")),
        value(result, "probe_ntp_packet_loss_ratio"),
    )


def sample_details(result: Measurement) -> list[dict[str, object]]:
    return list(ntp_samples(result))


def sample_values(result: Measurement, key: str) -> list[float]:
    out = []
    for s in sample_details(result):
        v = s[key]
        assert isinstance(v, float)
        out.append(v)
    return out


RelayFactory = Callable[..., Awaitable[UDPRelay]]


@pytest.fixture
async def relay_factory(netns: Netns, ns_chronyd: NsChronyd) -> AsyncIterator[RelayFactory]:
    """Start relays to the namespace's chronyd; all are closed at test end."""
    relays: list[UDPRelay] = []

    async def factory(**options: Any) -> UDPRelay:
        relay = UDPRelay(netns.host_addr, (netns.ns_addr, ns_chronyd.port), **options)
        relays.append(relay)
        return await relay.start()

    try:
        yield factory
    finally:
        for relay in relays:
            relay.close()


# --- (a) loss ---------------------------------------------------------------------------

LOSS_TABLE = "ntpp_faults_loss"
LOSS_PERCENT = 30
LOSS_PROBES = 15
LOSS_SAMPLES = 20


@pytest.fixture
def lossy(netns: Netns, ns_chronyd: NsChronyd) -> Iterator[None]:
    """Drop LOSS_PERCENT % of the requests to chronyd, counting what arrives and what is
    dropped; the table lives in the test's namespace and is deleted at teardown."""
    require_tool("nft")
    netns.nft("-f", "-", stdin=f"""
table inet {LOSS_TABLE} {{
    chain input {{
        type filter hook input priority 0; policy accept;
        udp dport {ns_chronyd.port} counter comment "seen"
        udp dport {ns_chronyd.port} numgen random mod 100 < {LOSS_PERCENT} \\
            counter drop comment "dropped"
    }}
}}
""")
    try:
        yield
    finally:
        netns.nft("delete", "table", "inet", LOSS_TABLE)


async def test_loss_reported_equals_requests_dropped_by_nftables(
    netns: Netns, ns_chronyd: NsChronyd, lossy: None
) -> None:
    module = make_module(
        samples=LOSS_SAMPLES, interval=0.005, reply_timeout=0.1, timeout=5.0
    )
    results = await asyncio.gather(
        *(probe(ns_chronyd.target, module) for _ in range(LOSS_PROBES))
    )
    sent_total = received_total = 0
    for result, log in results:
        sent, received, loss = counts(result)
        # 20 samples at worst 100 ms each fit the 5 s timeout: the burst is never shortened.
        assert sent == LOSS_SAMPLES, log.text()
        assert 0 <= received <= sent
        assert loss == pytest.approx(1 - received / sent)
        assert log.text().count(": no reply (nonce") == sent - received, log.text()
        # At 30 % loss, losing all 20 samples has probability 3e-11.
        assert result.success, (result.failure, log.text())
        assert abs(value(result, "probe_ntp_offset_seconds")) < 0.005
        sent_total += sent
        received_total += received
    counters = nft_counters(netns, "inet", LOSS_TABLE)
    # Every request the probes sent reached the namespace (and nothing else did) ...
    assert counters["seen"] == sent_total, counters
    # ... and every lost sample is exactly one request nftables dropped: chronyd never saw
    # it, and nothing else lost a reply.
    assert sent_total - received_total == counters["dropped"], (counters, sent_total,
                                                                 received_total)
    ratio = (sent_total - received_total) / sent_total
    # n = 300, p = 0.3: sd 2.6 %; the band is 4.5 sd wide on each side.
    assert 0.18 <= ratio <= 0.42, ratio


# --- (b) symmetric delay with jitter -----------------------------------------------------

DELAY_MEAN = 0.100  # round trip
DELAY_CLAMP = 0.010  # per direction: the round trip stays within +/- 20 ms


async def test_symmetric_delay_with_jitter(relay_factory: RelayFactory) -> None:
    rng = random.Random(0x5EED)
    leg = gaussian(DELAY_MEAN / 2, 0.004, DELAY_CLAMP, rng)
    relay: UDPRelay = await relay_factory(request_delay=leg, reply_delay=leg)
    module = make_module(samples=4, interval=0.01, reply_timeout=1.0, timeout=5.0)
    result, log = await probe(relay.target, module)
    assert result.success, (result.failure, log.text())
    assert counts(result) == (4, 4, 0.0)
    assert relay.requests == relay.replies == relay.delivered == 4
    lo, hi = DELAY_MEAN - 2 * DELAY_CLAMP, DELAY_MEAN + 2 * DELAY_CLAMP + 0.01
    for rtt in sample_values(result, "rtt_seconds"):
        assert lo <= rtt <= hi, log.text()
    # Each leg is within 10 ms of the other's mean: the error (d_req - d_rep)/2 is < 10 ms.
    for offset in sample_values(result, "offset_seconds"):
        assert abs(offset) < 0.02, log.text()
    rtt = value(result, "probe_ntp_rtt_seconds")
    assert rtt == min(sample_values(result, "rtt_seconds"))  # the clock filter's pick
    assert lo <= rtt <= hi
    assert abs(value(result, "probe_ntp_offset_seconds")) < 0.02
    # The jitter the relay added shows up in the spread of the offsets.
    assert 0 < value(result, "probe_ntp_offset_stddev_seconds") < 0.02
    assert value(result, "probe_ntp_root_distance_seconds") >= rtt / 2


# --- (c) asymmetric delay ---------------------------------------------------------------

ASYMMETRY = 0.060


@pytest.mark.parametrize(("late_leg", "sign"), [("request", +1), ("reply", -1)])
async def test_asymmetric_delay_moves_offset_by_half_the_asymmetry(
    relay_factory: RelayFactory, late_leg: str, sign: int
) -> None:
    # theta = ((T2 - T1) + (T3 - T4)) / 2 with T2 = T1 + d_req, T4 = T3 + d_rep (true
    # offset 0): theta = (d_req - d_rep) / 2. A late request makes the server's T2 late,
    # so the server seems ahead (+30 ms); a late reply makes it seem behind (-30 ms).
    relay: UDPRelay = await relay_factory(
        request_delay=fixed(ASYMMETRY if late_leg == "request" else 0.0),
        reply_delay=fixed(ASYMMETRY if late_leg == "reply" else 0.0),
    )
    module = make_module(samples=3, interval=0.01, reply_timeout=1.0, timeout=5.0)
    result, log = await probe(relay.target, module)
    assert result.success, (result.failure, log.text())
    assert counts(result) == (3, 3, 0.0)
    offset = value(result, "probe_ntp_offset_seconds")
    rtt = value(result, "probe_ntp_rtt_seconds")
    assert sign * offset == pytest.approx(ASYMMETRY / 2, abs=0.006), log.text()
    assert ASYMMETRY <= rtt <= ASYMMETRY + 0.02, log.text()
    # The root distance still bounds the true error (the true offset is 0).
    root_distance = value(result, "probe_ntp_root_distance_seconds")
    assert abs(offset - 0.0) <= root_distance, (offset, root_distance)
    # ... and the causality gauge sees no violation: asymmetry explains it all.
    assert value(result, "probe_ntp_causality_violation_seconds") == 0.0


# --- (d) duplication and reordering ------------------------------------------------------

REORDER_SAMPLES = 7
REORDER_REPLY_TIMEOUT = 0.15


async def test_duplicated_and_swapped_replies_count_once_and_late_ones_are_unused(
    relay_factory: RelayFactory,
) -> None:
    # The relay holds reply 1 back; request 1 times out; request 2's reply comes and the
    # relay sends reply 2, reply 2, reply 1, reply 1. So samples 2, 4, 6 are answered (once
    # each, their duplicates discarded) and replies 1, 3, 5 arrive late, after their own
    # request expired; reply 7 is held until the end.
    relay: UDPRelay = await relay_factory(duplicate_replies=True, swap_reply_pairs=True)
    module = make_module(
        samples=REORDER_SAMPLES, interval=0.01, reply_timeout=REORDER_REPLY_TIMEOUT,
        timeout=5.0,
    )
    result, log = await probe(relay.target, module)
    text = log.text()
    assert result.success, (result.failure, text)
    sent, received, loss = counts(result)
    assert (sent, received) == (7, 3), text
    assert received <= sent
    assert loss == pytest.approx(4 / 7)
    for i in (1, 3, 5, 7):
        assert f"sample {i}: no reply" in text, text
    for i in (2, 4, 6):
        assert f"sample {i}: T1=" in text, text
    assert relay.requests == relay.replies == 7
    assert relay.delivered == 12 and relay.held is not None
    # The first few one by one, the rest counted by kind in one line.
    counted = re.search(r"(\d+) more datagrams not logged one by one: (.*)", text)
    tail = dict((kind, int(n)) for n, kind in re.findall(r"(\d+) ([a-z ]+)",
                                                         counted.group(2))) if counted else {}
    duplicates = text.count("reply discarded: duplicate of an answered request")
    # (Logged, not necessarily counted as discarded: a late genuine reply is a timeout.)
    lates = text.count("late reply to an expired request")
    assert duplicates + tail.get("duplicate", 0) == 3, text
    assert lates + tail.get("late", 0) == 6, text
    # A late reply used for its own (expired) request would show a round trip of at least
    # the reply timeout; used for the next request, an origin mismatch would have stopped it.
    assert len(sample_details(result)) == 3
    for rtt in sample_values(result, "rtt_seconds"):
        assert 0 <= rtt < REORDER_REPLY_TIMEOUT / 3, text
    assert abs(value(result, "probe_ntp_offset_seconds")) < 0.005


# --- (e) server killed mid-burst ----------------------------------------------------------

KILL_PORT = 11123
KILL_TIMEOUT = 3.0


class SignalLog(ProbeLog):
    """A probe log that sets an event when a line matches (to act mid-burst, no sleep)."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)
        self.seen = asyncio.Event()

    def __call__(self, message: Message, *, essential: bool = False) -> None:
        super().__call__(message, essential=essential)
        if self.pattern.search(message if isinstance(message, str) else message()):
            self.seen.set()


async def test_server_killed_mid_burst(
    netns: Netns, ns_chronyd_factory: Callable[[int], NsChronyd]
) -> None:
    server = ns_chronyd_factory(KILL_PORT)
    module = make_module(samples=10, interval=0.1, reply_timeout=0.2, timeout=KILL_TIMEOUT)
    log = SignalLog(r"^sample 1: T1=")
    loop = asyncio.get_running_loop()
    started = loop.time()
    task = asyncio.create_task(run_probe(parse_target(server.target), module, KILL_TIMEOUT, log))
    try:
        async with asyncio.timeout(KILL_TIMEOUT):
            await log.seen.wait()
    except TimeoutError:
        task.cancel()
        pytest.fail(f"no first reply from chronyd:\n{log.text()}\n{server.log()}")
    # The first reply is in; sample 2 is due 100 ms later. Kill chronyd (by its PID).
    server.proc.kill()
    server.proc.wait(timeout=5)
    lines_before_kill = len(log.lines)
    async with asyncio.timeout(KILL_TIMEOUT + SLACK):
        result, _ = await task
    elapsed = loop.time() - started
    text = log.text()
    assert elapsed <= KILL_TIMEOUT + SLACK, text
    assert result.duration <= KILL_TIMEOUT, text
    # The sample received before the kill passes every check, so the probe succeeds, with
    # loss. The dead port answers with ICMP port unreachable, which stops the burst at once
    # (nothing listens any more); where the kernel rate-limits those ICMP errors, the samples
    # in between wait out their reply timeout instead.
    sent, received, loss = counts(result)
    assert received == 1 and 2 <= sent <= 10, text
    assert loss == pytest.approx(1 - 1 / sent)
    assert result.success and result.failure is None, (result.failure, text)
    assert abs(value(result, "probe_ntp_offset_seconds")) < 0.005
    after = log.lines[lines_before_kill:]
    for i in range(2, sent):
        assert any(f"sample {i}: no reply" in line for line in after), text
    assert not any(": T1=" in line for line in after), text
    assert any(f"sample {sent}: ICMP port unreachable" in line and "burst stopped" in line
               for line in after) or sent == 10, text
