"""Politeness: target policy and Kiss-o'-Death backoff, against the in-process fake server.

Whenever a probe must not send, the fake server is drained (a marker datagram proves that
everything sent before it has been read) and must have seen no request at all.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from ntp_probe.config.schema import Config, Module
from ntp_probe.engine.coordinator import Coordinator
from ntp_probe.engine.result import Measurement
from ntp_probe.engine.targets import Target, parse_target
from ntp_probe.exposition.render import render
from ntp_probe.safety.guard import Guard
from ntp_probe.safety.kod import KodTable
from ntp_probe.safety.policy import TargetPolicy, parse_rules
from tests import conftest
from tests.behaviour import fake_server
from tests.behaviour.fake_server import FakeNTPServer, Request, Send, answer, kod, reply
from tests.conftest import FakeClock, gauges, probe, value

fake_ntp = fake_server.fake_ntp

DEFAULT_DENY_HOLD = 86400.0


def make_policy(allowed: tuple[str, ...] = (), denied: tuple[str, ...] = ()) -> TargetPolicy:
    return TargetPolicy(allowed=parse_rules(allowed, "allowed_targets"),
                        denied=parse_rules(denied, "denied_targets"))


def make_module(**kw: Any) -> Module:
    return conftest.make_module(name="polite", **kw)


def kod_behaviour(code: bytes, poll: int = 3) -> Callable[[Request], list[Send]]:
    def behaviour(req: Request) -> list[Send]:
        return [Send(kod(req, code, poll=poll))]

    return behaviour


async def assert_nothing_sent(server: FakeNTPServer, before: int, result: Measurement) -> None:
    await server.drain()
    assert len(server.requests) == before, "a packet reached the server"
    assert result.packets_sent == 0
    assert value(result, "probe_ntp_samples_sent") is None


def kiss_codes(result: Measurement) -> list[str]:
    return [dict(labels)["code"] for name, labels, _ in gauges(result)
            if name == "probe_ntp_kiss_code_info"]


def failure_series(result: Measurement) -> list[str]:
    return [line for line in render(result).splitlines()
            if line.startswith("probe_ntp_failure_info{")]


# --- target policy ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "policy",
    [
        make_policy(denied=("127.0.0.0/8",)),
        make_policy(allowed=("192.0.2.0/24",)),
        make_policy(allowed=("ntp.example.net",)),
        make_policy(denied=("127.0.0.1",)),
    ],
    ids=["denied-cidr", "allowed-cidr-elsewhere", "allowed-name-only", "denied-single-ip"],
)
async def test_forbidden_target_sends_nothing(fake_ntp: FakeNTPServer,
                                              policy: TargetPolicy) -> None:
    result, log = await probe(fake_ntp.target, make_module(samples=3),
                              guard=Guard(policies=(policy,)))
    assert result.failure == "target_forbidden"
    assert not result.success
    assert failure_series(result) == ['probe_ntp_failure_info{reason="target_forbidden"} 1']
    assert "probe_success 0" in render(result)
    assert "target forbidden" in log.text()
    await assert_nothing_sent(fake_ntp, 0, result)


@pytest.mark.parametrize(
    "policy",
    [
        make_policy(allowed=("127.0.0.0/8",)),
        make_policy(allowed=("127.0.0.1",), denied=("10.0.0.0/8", "*.example.net")),
        make_policy(denied=("::1/128", "192.0.2.0/24")),
    ],
    ids=["allowed-cidr", "allowed-ip-with-other-denials", "denied-elsewhere"],
)
async def test_permitted_target_is_probed(fake_ntp: FakeNTPServer, policy: TargetPolicy) -> None:
    result, _ = await probe(fake_ntp.target, make_module(), guard=Guard(policies=(policy,)))
    assert result.failure is None and result.success
    assert len(fake_ntp.requests) == 1
    assert result.packets_sent == 1


async def test_name_allowed_but_resolving_into_denied_cidr(fake_ntp: FakeNTPServer) -> None:
    """DNS rebinding: 'localhost' is allowed by name, but its address is denied."""
    policy = make_policy(allowed=("localhost",), denied=("127.0.0.0/8",))
    target = Target("localhost", fake_ntp.port)
    result, log = await probe(target, make_module(samples=2), guard=Guard(policies=(policy,)))
    assert result.failure == "target_forbidden"
    assert "127.0.0.1" in log.text()
    # It was resolved (that is how the address became known), then refused.
    assert value(result, "probe_dns_lookup_time_seconds") is not None
    await assert_nothing_sent(fake_ntp, 0, result)


async def test_name_allowed_resolving_to_permitted_address(fake_ntp: FakeNTPServer) -> None:
    policy = make_policy(allowed=("localhost",), denied=("10.0.0.0/8",))
    result, _ = await probe(Target("localhost", fake_ntp.port), make_module(),
                            guard=Guard(policies=(policy,)))
    assert result.success, result.failure
    assert len(fake_ntp.requests) == 1


async def test_global_and_module_policies_both_apply(fake_ntp: FakeNTPServer) -> None:
    coordinator = Coordinator(kod=KodTable())
    target = parse_target(fake_ntp.target)
    open_module = make_module()
    closed_module = make_module(policy=make_policy(denied=("127.0.0.0/8",)))
    open_config = Config(modules={"m": open_module}, source="t")
    closed_config = Config(modules={"m": open_module}, source="t",
                           policy=make_policy(allowed=("192.0.2.0/24",)))
    # Module policy refuses under a permissive global policy.
    out = await coordinator.probe(open_config, closed_module, target, 2.0)
    assert out.result.failure == "target_forbidden"
    # Global policy refuses a module without its own rules.
    out = await coordinator.probe(closed_config, open_module, target, 2.0)
    assert out.result.failure == "target_forbidden"
    await fake_ntp.drain()
    assert fake_ntp.requests == []
    # Control: both permissive -> probed.
    out = await coordinator.probe(open_config, open_module, target, 2.0)
    assert out.result.success, out.result.failure
    assert len(fake_ntp.requests) == 1


# --- Kiss-o'-Death ----------------------------------------------------------------------


async def test_kod_rate_capped_by_module(fake_ntp: FakeNTPServer) -> None:
    fake_ntp.behaviour = kod_behaviour(b"RATE", poll=12)
    module = make_module(kod_rate_max_backoff=100.0)
    result, _ = await probe(fake_ntp.target, module, guard=Guard(kod=KodTable()))
    assert result.failure == "kod_rate"
    assert value(result, "probe_ntp_backoff_remaining_seconds") == 100.0


async def test_backoff_is_per_port(fake_ntp: FakeNTPServer) -> None:
    fake_ntp.behaviour = kod_behaviour(b"RATE")
    guard = Guard(kod=KodTable())
    first, _ = await probe(fake_ntp.target, make_module(), guard=guard)
    assert first.failure == "kod_rate"
    other = await FakeNTPServer.start()
    try:
        result, _ = await probe(other.target, make_module(), guard=guard)
        assert result.success, result.failure
        assert len(other.requests) == 1
        assert value(result, "probe_ntp_backoff_remaining_seconds") is None
    finally:
        other.close()
    # The first port is still backing off.
    again, _ = await probe(fake_ntp.target, make_module(), guard=guard)
    assert again.failure == "backoff"
    assert again.failure_detail is not None and again.failure_detail.startswith(
        f"Kiss-o'-Death RATE from 127.0.0.1 port {fake_ntp.port}, "), again.failure_detail


async def test_kod_deny_hold_configurable(fake_ntp: FakeNTPServer) -> None:
    fake_ntp.behaviour = kod_behaviour(b"DENY")
    module = make_module(kod_deny_backoff=600.0)
    result, _ = await probe(fake_ntp.target, module, guard=Guard(kod=KodTable()))
    assert result.failure == "kod_deny"
    assert value(result, "probe_ntp_backoff_remaining_seconds") == 600.0


async def test_a_deny_arriving_after_its_wait_is_still_honoured(fake_ntp: FakeNTPServer) -> None:
    def late_deny(req: Request) -> list[Send]:
        if req.index == 0:  # after the 100 ms reply timeout, while sample 2 waits
            return [Send(kod(req, b"DENY"), delay=0.15)]
        return [Send(reply(req), delay=0.3)]

    fake_ntp.behaviour = late_deny
    guard = Guard(kod=KodTable())
    module = make_module(samples=3, interval=0.01, reply_timeout=0.1)
    result, log = await probe(fake_ntp.target, module, guard=guard)
    assert result.failure == "kod_deny", log.text()
    assert kiss_codes(result) == ["DENY"]
    assert len(fake_ntp.requests) == 2  # the burst stopped at the DENY
    again, _ = await probe(fake_ntp.target, module, guard=guard)
    assert again.failure == "backoff"
    await assert_nothing_sent(fake_ntp, 2, again)


async def test_a_late_kod_ends_the_wait_in_progress(fake_ntp: FakeNTPServer) -> None:
    def late_rate(req: Request) -> list[Send]:
        if req.index == 0:  # after its 1 s reply timeout, while sample 2 waits
            return [Send(kod(req, b"RATE"), delay=1.2)]
        return []  # sample 2 is never answered: only the KoD can end its wait early

    fake_ntp.behaviour = late_rate
    module = make_module(samples=3, interval=0.01, reply_timeout=1.0)
    result, log = await probe(fake_ntp.target, module, guard=Guard(kod=KodTable()))
    assert result.failure == "kod_rate", log.text()
    assert len(fake_ntp.requests) == 2
    # Sample 2's wait would last until about 2 s; the KoD at 1.2 s stops the burst there.
    assert result.duration < 1.8, log.text()


async def test_a_rate_arriving_between_samples_stops_the_burst(fake_ntp: FakeNTPServer) -> None:
    def late_rate(req: Request) -> list[Send]:
        if req.index == 0:  # after the 100 ms reply timeout, before sample 2 at 300 ms
            return [Send(kod(req, b"RATE"), delay=0.2)]
        return [Send(reply(req))]

    fake_ntp.behaviour = late_rate
    module = make_module(samples=3, interval=20.0, reply_timeout=0.1, timeout=45.0)
    result, log = await probe(fake_ntp.target, module, guard=Guard(kod=KodTable()))
    assert result.failure == "kod_rate", log.text()
    assert "Kiss-o'-Death RATE answering an earlier request" in log.text()
    await fake_ntp.drain()
    assert len(fake_ntp.requests) == 1  # no second sample was sent
    # Nor was the pause waited out: the probe ended at the KoD (0.2 s), not at 20 s.
    assert result.duration < 10, log.text()


async def test_a_kod_another_probe_gets_ends_a_bursts_pause(fake_ntp: FakeNTPServer) -> None:
    # Probe A pauses 20 s between samples; probe B gets a RATE from the same server meanwhile.
    # A sends nothing more (as before), and no longer waits out its pause to end.
    fake_ntp.behaviour = lambda req: [Send(kod(req, b"RATE") if req.index == 1 else reply(req))]
    guard = Guard(kod=KodTable())
    pausing = make_module(samples=3, interval=20.0, reply_timeout=0.2, timeout=45.0)
    first = asyncio.create_task(probe(fake_ntp.target, pausing, guard=guard))
    await fake_ntp.wait_for_requests(1)
    other, log = await probe(fake_ntp.target, make_module(), guard=guard)
    assert other.failure == "kod_rate", log.text()
    result, log = await first
    assert result.failure is None and "another probe got a Kiss-o'-Death RATE" in log.text()
    assert len(fake_ntp.requests) == 2
    assert result.duration < 10, log.text()  # not the 20 s pause


async def test_a_kod_another_probe_gets_while_a_sample_is_out_stops_the_burst_at_once(
        fake_ntp: FakeNTPServer) -> None:
    # The RATE is recorded (as another probe's would be) while the first request is out,
    # before its reply: no pause is in progress to end, and the next 20 s one must not run.
    table = KodTable()

    def rate_recorded_meanwhile(req: Request) -> list[Send]:
        table.record(fake_ntp.host, fake_ntp.port, "RATE", 0, 3600.0, 86400.0)
        return [Send(reply(req))]

    fake_ntp.behaviour = rate_recorded_meanwhile
    pausing = make_module(samples=3, interval=20.0, reply_timeout=0.5, timeout=30.0)
    result, log = await probe(fake_ntp.target, pausing, guard=Guard(kod=table))
    assert "another probe got a Kiss-o'-Death RATE" in log.text(), log.text()
    assert len(fake_ntp.requests) == 1 and result.failure is None
    assert result.duration < 10.0, log.text()  # not the 20 s pause


async def test_other_kiss_code_does_not_back_off(fake_ntp: FakeNTPServer) -> None:
    fake_ntp.behaviour = kod_behaviour(b"INIT")
    table = KodTable()
    guard = Guard(kod=table)
    first, _ = await probe(fake_ntp.target, make_module(), guard=guard)
    assert first.failure == "kod_other"
    assert kiss_codes(first) == ["INIT"]
    assert value(first, "probe_ntp_backoff_remaining_seconds") is None
    assert len(table) == 0
    fake_ntp.behaviour = answer()
    second, _ = await probe(fake_ntp.target, make_module(), guard=guard)
    assert second.success, second.failure
    assert len(fake_ntp.requests) == 2


async def test_expired_backoff_then_normal_answer_clears_state(fake_ntp: FakeNTPServer) -> None:
    clock = FakeClock()
    table = KodTable(clock=clock)
    guard = Guard(kod=table)
    fake_ntp.behaviour = kod_behaviour(b"RATE")
    first, _ = await probe(fake_ntp.target, make_module(), guard=guard)
    assert value(first, "probe_ntp_backoff_remaining_seconds") == 64.0

    clock.advance(30)
    during, _ = await probe(fake_ntp.target, make_module(), guard=guard)
    assert during.failure == "backoff"
    assert value(during, "probe_ntp_backoff_remaining_seconds") == 34.0
    await assert_nothing_sent(fake_ntp, 1, during)
    # The address is known and permitted: its IP gauges stay (dashboards join on them).
    assert value(during, "probe_ip_protocol") == 4
    assert value(during, "probe_ip_addr_hash") == value(first, "probe_ip_addr_hash")

    clock.advance(35)  # past the 64 s backoff
    fake_ntp.behaviour = answer()
    after, _ = await probe(fake_ntp.target, make_module(), guard=guard)
    assert after.success, after.failure
    assert len(fake_ntp.requests) == 2
    assert len(table) == 0  # the normal answer cleared the state

    # A new RATE starts from the minimum again, not doubled.
    fake_ntp.behaviour = kod_behaviour(b"RATE")
    again, _ = await probe(fake_ntp.target, make_module(), guard=guard)
    assert value(again, "probe_ntp_backoff_remaining_seconds") == 64.0


async def test_rate_right_after_expiry_doubles(fake_ntp: FakeNTPServer) -> None:
    clock = FakeClock()
    guard = Guard(kod=KodTable(clock=clock))
    fake_ntp.behaviour = kod_behaviour(b"RATE")
    first, _ = await probe(fake_ntp.target, make_module(), guard=guard)
    assert value(first, "probe_ntp_backoff_remaining_seconds") == 64.0
    clock.advance(65)
    second, _ = await probe(fake_ntp.target, make_module(), guard=guard)
    assert second.failure == "kod_rate"
    assert value(second, "probe_ntp_backoff_remaining_seconds") == 128.0
    assert len(fake_ntp.requests) == 2


async def test_forbidden_wins_over_backoff(fake_ntp: FakeNTPServer) -> None:
    table = KodTable()
    table.record("127.0.0.1", fake_ntp.port, "RATE", 3, 3600.0, 86400.0)
    guard = Guard(policies=(make_policy(denied=("127.0.0.0/8",)),), kod=table)
    result, _ = await probe(fake_ntp.target, make_module(), guard=guard)
    assert result.failure == "target_forbidden"
    assert failure_series(result) == ['probe_ntp_failure_info{reason="target_forbidden"} 1']
    assert value(result, "probe_ntp_backoff_remaining_seconds") is None
    # Also by address (a name resolving into the denied network).
    by_name, _ = await probe(Target("localhost", fake_ntp.port), make_module(), guard=guard)
    assert by_name.failure == "target_forbidden"
    await assert_nothing_sent(fake_ntp, 0, result)


async def test_coordinator_keeps_kod_state_across_probes(fake_ntp: FakeNTPServer) -> None:
    fake_ntp.behaviour = kod_behaviour(b"RATE")
    coordinator = Coordinator()
    module = make_module(samples=3)
    config = Config(modules={"polite": module}, source="t")
    target = parse_target(fake_ntp.target)
    first = await coordinator.probe(config, module, target, 2.0)
    assert first.result.failure == "kod_rate"
    assert len(coordinator.kod) == 1
    second = await coordinator.probe(config, module, target, 2.0)
    assert second.result.failure == "backoff"
    assert second.result.packets_sent == 0
    # Another target name for the same address and port shares the backoff.
    third = await coordinator.probe(config, module, Target("localhost", fake_ntp.port), 2.0)
    assert third.result.failure == "backoff"
    await assert_nothing_sent(fake_ntp, 1, third.result)


@pytest.mark.parametrize("first_answered", [True, False])
async def test_a_kod_another_probe_got_stops_a_running_burst(
        fake_ntp: FakeNTPServer, first_answered: bool) -> None:
    # Two jobs scraping one server are what makes it send RATE or DENY: a burst already
    # running sends nothing more once the other probe got the KoD, and its own earlier
    # answers do not lift the backoff.
    table = KodTable()
    guard = Guard(kod=table)
    if not first_answered:
        fake_ntp.behaviour = lambda req: []
    module = make_module(samples=3, interval=0.3, reply_timeout=0.1)
    running = asyncio.create_task(probe(fake_ntp.target, module, guard=guard))
    await fake_ntp.wait_for_requests(1)
    table.record("127.0.0.1", fake_ntp.port, "DENY", 0, 3600.0, DEFAULT_DENY_HOLD)
    result, log = await running
    await fake_ntp.drain()
    assert len(fake_ntp.requests) == 1, log.text()
    assert "burst stopped after 1 samples" in log.text()
    assert table.remaining("127.0.0.1", fake_ntp.port) is not None
    if first_answered:
        assert result.success, result.failure  # what it measured before stands
    else:
        assert result.failure == "backoff"
        assert failure_series(result) == ['probe_ntp_failure_info{reason="backoff"} 1']
    # Either way it is backing off now, and says why it sent fewer samples than asked.
    assert kiss_codes(result) == ["DENY"]
    left = value(result, "probe_ntp_backoff_remaining_seconds")
    assert left is not None and 0 < left <= DEFAULT_DENY_HOLD
