"""Behaviour of the ntp_group prober and the leap check against in-process fake NTP servers
on 127.0.0.1, each on its own port, answering at chosen offsets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from aiohttp.web import Application, Request
from pytest_aiohttp import AiohttpClient

from ntp_probe.config.load import load_config, parse_config
from ntp_probe.config.schema import Config, Module, NTPGroupSettings, NTPSettings
from ntp_probe.engine.context import ProbeContext, ProbeLog
from ntp_probe.engine.coordinator import Coordinator
from ntp_probe.engine.registry import resolve_target
from ntp_probe.engine.result import Measurement, Reason
from ntp_probe.engine.runner import guard_for, limit_probe_sockets, run_probe
from ntp_probe.engine.targets import TargetError
from ntp_probe.exposition.internals import Internals
from ntp_probe.probers import group, ntp
from ntp_probe.probers.leapcheck import LEAP_CHECK
from ntp_probe.safety.guard import Guard
from ntp_probe.safety.kod import KodTable
from ntp_probe.safety.policy import TargetPolicy, parse_rules
from ntp_probe.web.app import State, create_app
from tests.behaviour.fake_server import FakeNTPServer, Send, answer, kod, reply
from tests.behaviour.test_operate_web import poll
from tests.conftest import Hosts, free_udp_port, label_sets, probe, value
from tests.unit.test_leapfile import REAL_ENTRIES, build, utc
from tests.unit.test_leapfile import ntp as ntp_seconds

Client = TestClient[Request, Application]
Start = Callable[..., Awaitable[FakeNTPServer]]

# Consensus offsets are read against the real local clock within milliseconds: this much
# scheduling noise is allowed, far below the shifts the tests use.
TOLERANCE = 0.005


@pytest.fixture
async def servers() -> AsyncIterator[Start]:
    """Start fake servers answering at ``offset`` (and other reply fields); all closed at
    the end of the test."""
    started: list[FakeNTPServer] = []

    async def start(**fields: Any) -> FakeNTPServer:
        server = await FakeNTPServer.start(answer(**fields))
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.close()
    for server in started:
        if server.errors:
            raise server.errors[0]


def group_module(max_falsetickers: int = 0, policy: TargetPolicy | None = None) -> Module:
    """Two quick samples per member, IPv4."""
    return Module(
        name="g", prober="ntp_group", timeout=2.0,
        ntp=NTPSettings(samples=2, sample_interval=0.01, reply_timeout=0.3,
                        preferred_ip_protocol="ip4"),
        ntp_group=NTPGroupSettings(max_falsetickers=max_falsetickers),
        policy=policy or TargetPolicy(),
    )


async def probe_group(members: list[str], module: Module | None = None,
                      config: Config | None = None) -> Measurement:
    module = module or group_module()
    config = config or Config(modules={"g": module}, source="test")
    target = resolve_target(config, module, ",".join(members))
    m, _ = await run_probe(target, module, module.timeout, guard=guard_for(config, module))
    return m


def states(m: Measurement) -> dict[str, str]:
    return {labels["member"]: labels["state"]
            for labels in label_sets(m, "probe_ntp_group_member_selection_info")}


def the_report(m: Measurement) -> group.GroupReport:
    report = next(r for r in m.reports if isinstance(r, group.GroupReport))
    assert report.title == "ntp_group"
    return report


async def test_one_falseticker_among_four(servers: Start) -> None:
    good = [await servers(offset=0.0) for _ in range(3)]
    bad = await servers(offset=1.0)
    m = await probe_group([s.target for s in [*good, bad]])
    assert states(m) == {**{s.target: "truechimer" for s in good}, bad.target: "falseticker"}
    assert m.failure is Reason.FALSETICKERS
    assert m.failure_detail == f"1 of 4 members, max_falsetickers 0: {bad.target}"
    assert value(m, "probe_ntp_group_majority") == 1
    assert value(m, "probe_ntp_group_truechimers") == 3
    assert value(m, "probe_ntp_group_falsetickers") == 1
    offset = value(m, "probe_ntp_group_local_clock_offset_seconds")
    assert offset is not None and abs(offset) < TOLERANCE
    bad_offset = value(m, "probe_ntp_group_member_offset_seconds", member=bad.target)
    assert bad_offset is not None and abs(bad_offset - 1.0) < TOLERANCE
    low = value(m, "probe_ntp_group_intersection_low_seconds")
    high = value(m, "probe_ntp_group_intersection_high_seconds")
    assert low is not None and high is not None and low < 0 < high < 0.5
    # Every member answered: each is up, none has a failure series of its own.
    assert all(value(m, "probe_ntp_group_member_up", member=s.target) == 1
               for s in [*good, bad])
    assert not label_sets(m, "probe_ntp_group_member_failure_info")
    assert m.packets_sent == 8  # two samples to each of four members
    assert the_report(m).check_offset == offset


async def test_one_server_under_two_spellings_is_measured_once_and_votes_once(
        servers: Start) -> None:
    # A liar named twice would otherwise outvote the one honest server.
    liar, honest = await servers(offset=0.5), await servers(offset=0.0)
    alias = f"localhost:{liar.port}"
    m = await probe_group([liar.target, alias, honest.target])
    assert states(m) == {liar.target: "falseticker", alias: "falseticker",
                         honest.target: "falseticker"}
    assert m.failure is Reason.NO_MAJORITY
    assert value(m, "probe_ntp_group_falsetickers") == 2
    # The CLI's report and check's perfdata count as the metrics do, not per spelling.
    report = the_report(m)
    assert (report.truechimers, report.falsetickers) == (0, 2)
    assert ("falsetickers", "2") in report.rows()
    assert {p.label: p.value for p in report.perfdata()}["falsetickers"] == 2
    assert report.to_json()["falsetickers"] == 2
    assert value(m, "probe_ntp_group_member_offset_seconds", member=alias) == value(
        m, "probe_ntp_group_member_offset_seconds", member=liar.target)
    assert m.packets_sent == 4  # two samples to each of the two servers
    assert len(liar.requests) == 2


async def test_a_coarse_clock_is_no_falseticker_for_its_ticks(servers: Start) -> None:
    # 8 ms off with a claimed precision of 2^-6 s (15.6 ms: Windows' w32time): RFC 5905's
    # root distance, as ntpd's and chrony's, counts both clocks' precision, and chronyd
    # selects such a server (state D, large distance, not x).
    good = [await servers(offset=0.0), await servers(offset=0.0005)]
    coarse = await servers(offset=0.008, precision=-6)
    m = await probe_group([s.target for s in [*good, coarse]])
    assert states(m) == {s.target: "truechimer" for s in [*good, coarse]}, m.failure_detail
    assert m.failure is None
    width = value(m, "probe_ntp_group_member_root_distance_seconds", member=coarse.target)
    assert width is not None and 2**-6 < width < 2**-6 + 0.005  # the precision counts
    # Past what its precision explains it is still a falseticker.
    far = await servers(offset=0.05, precision=-6)
    m = await probe_group([s.target for s in [*good, far]])
    assert states(m)[far.target] == "falseticker"


async def test_max_falsetickers_tolerates_one(servers: Start) -> None:
    members = [await servers(offset=o) for o in (0.0, 0.0, 0.0, -2.0, 0.0)]
    m = await probe_group([s.target for s in members], group_module(max_falsetickers=1))
    assert m.success, m.failure
    assert value(m, "probe_ntp_group_falsetickers") == 1
    assert states(m)[members[3].target] == "falseticker"


async def test_a_two_two_split_has_no_majority(servers: Start) -> None:
    members = [await servers(offset=o) for o in (0.0, 0.0, 1.0, 1.0)]
    m = await probe_group([s.target for s in members])
    assert m.failure is Reason.NO_MAJORITY
    assert m.failure_detail == "4 of 4 members usable, no majority of them agrees"
    assert value(m, "probe_ntp_group_majority") == 0
    assert set(states(m).values()) == {"falseticker"}
    assert value(m, "probe_ntp_group_falsetickers") == 4
    for absent in ("probe_ntp_group_intersection_low_seconds",
                   "probe_ntp_group_local_clock_offset_seconds"):
        assert value(m, absent) is None
    assert the_report(m).check_offset is None


async def test_a_common_shift_moves_the_consensus_not_the_verdicts(servers: Start) -> None:
    """Every honest member 0.5 s ahead is what an exporter 0.5 s behind sees."""
    shift = 0.5
    good = [await servers(offset=shift) for _ in range(3)]
    bad = await servers(offset=shift + 1.0)
    m = await probe_group([s.target for s in [*good, bad]])
    assert states(m) == {**{s.target: "truechimer" for s in good}, bad.target: "falseticker"}
    offset = value(m, "probe_ntp_group_local_clock_offset_seconds")
    assert offset is not None and abs(offset - shift) < TOLERANCE


async def test_a_dead_member_is_unreachable_and_only_its_own_failure(servers: Start) -> None:
    good = [await servers(offset=0.0) for _ in range(3)]
    dead = f"127.0.0.1:{free_udp_port()}"  # nothing listens: ICMP port unreachable
    m = await probe_group([*(s.target for s in good), dead])
    assert m.success, m.failure
    assert states(m)[dead] == "unreachable"
    assert value(m, "probe_ntp_group_member_up", member=dead) == 0
    assert label_sets(m, "probe_ntp_group_member_failure_info") == [
        {"member": dead, "reason": "unreachable"}]
    assert value(m, "probe_ntp_group_member_offset_seconds", member=dead) is None
    assert value(m, "probe_ntp_group_truechimers") == 3


async def test_a_member_failing_its_own_checks_is_unfit(servers: Start) -> None:
    good = [await servers(offset=0.0) for _ in range(3)]
    unsynchronised = await servers(offset=0.0, leap=3)
    m = await probe_group([s.target for s in [*good, unsynchronised]])
    assert m.success, m.failure
    assert states(m)[unsynchronised.target] == "unfit"
    assert label_sets(m, "probe_ntp_group_member_failure_info") == [
        {"member": unsynchronised.target, "reason": "leap_unsynchronized"}]


async def test_the_target_policy_applies_to_each_member(servers: Start) -> None:
    good = [await servers(offset=0.0) for _ in range(3)]
    forbidden = await servers(offset=0.0)
    policy = TargetPolicy(denied=parse_rules([f"{forbidden.host}/32"], "denied_targets"))
    m = await probe_group([s.target for s in [*good, forbidden]], group_module(policy=policy))
    # Every member shares the address, so the policy refuses them all, one by one.
    assert set(states(m).values()) == {"unreachable"}
    assert {labels["reason"] for labels in
            label_sets(m, "probe_ntp_group_member_failure_info")} == {"target_forbidden"}
    assert not forbidden.requests and not any(s.requests for s in good)
    # The exporter's own policy, not the servers: no no_majority, which pages.
    assert m.failure is Reason.TARGET_FORBIDDEN
    assert value(m, "probe_ntp_group_majority") == 0


async def test_a_members_kiss_of_death_is_the_groups_and_every_member_backed_off_is_backoff(
        servers: Start) -> None:
    # NTPKissOfDeath reads the probe's kiss codes: a member's must show. Once every member
    # is backed off, nothing is sent: backoff, not a no_majority that pages for 24 h.
    rate, deny = await servers(), await servers()
    rate.behaviour = lambda req: [Send(kod(req, b"RATE"))]
    deny.behaviour = lambda req: [Send(kod(req, b"DENY"))]
    module = group_module()
    config = Config(modules={"g": module}, source="test")
    target = resolve_target(config, module, f"{rate.target},{deny.target}")
    guard = Guard(kod=KodTable())
    m, log = await probe(target, module, guard=guard)
    assert {labels["reason"] for labels in label_sets(
        m, "probe_ntp_group_member_failure_info")} == {"kod_rate", "kod_deny"}
    assert label_sets(m, "probe_ntp_kiss_code_info") == [{"code": "RATE"}, {"code": "DENY"}]
    assert value(m, "probe_ntp_backoff_remaining_seconds") == pytest.approx(86400.0, abs=5)
    sent = len(rate.requests) + len(deny.requests)
    m, log = await probe(target, module, guard=guard)
    assert m.failure is Reason.BACKOFF, log.text()
    assert len(rate.requests) + len(deny.requests) == sent
    assert {labels["code"] for labels in label_sets(m, "probe_ntp_kiss_code_info")} == {
        "RATE", "DENY"}
    # One member backed off in a healthy group: the probe passes, the code still shows.
    # A member saying INIT (not synchronised yet) is its own affair: NTPServerUnsynchronised
    # reads INIT and STEP, and would page for the whole group.
    starting = await servers()
    starting.behaviour = lambda req: [Send(kod(req, b"INIT"))]
    good = [await servers(offset=0.0) for _ in range(3)]
    target = resolve_target(config, module, ",".join(
        [deny.target, starting.target, *(g.target for g in good)]))
    m, log = await probe(target, module, guard=guard)
    assert m.failure is None, log.text()
    assert label_sets(m, "probe_ntp_kiss_code_info") == [{"code": "DENY"}]
    assert {"member": starting.target, "reason": "kod_other"} in label_sets(
        m, "probe_ntp_group_member_failure_info")


async def test_a_kiss_of_death_after_a_valid_sample_keeps_the_members_vote(
        servers: Start) -> None:
    # Rate-limited after its first answer: that answer is valid time and votes, or a
    # three-member group would be left two voters by a server asking us to slow down.
    good = [await servers(offset=0.0) for _ in range(2)]
    limited = await servers(offset=0.0)
    first = limited.behaviour
    limited.behaviour = lambda req: (first(req) if req.index == 0
                                     else [Send(kod(req, b"RATE"))])
    m = await probe_group([s.target for s in [*good, limited]])
    assert len(limited.requests) == 2
    assert label_sets(m, "probe_ntp_group_member_failure_info") == [
        {"member": limited.target, "reason": "kod_rate"}]
    assert states(m)[limited.target] == "truechimer"
    assert value(m, "probe_ntp_group_truechimers") == 3
    assert m.success, m.failure


async def test_a_kiss_of_death_does_not_make_an_unfit_member_vote(servers: Start) -> None:
    # Three unsynchronised servers (leap indicator 3) that rate-limit after one answer:
    # the KoD outranks leap_unsynchronized in each one's verdict, but their samples failed
    # a check of the server and must not outvote the one honest member.
    honest = await servers(offset=0.0)
    liars = [await servers(offset=0.25, leap=3) for _ in range(3)]
    unsynchronised = answer(offset=0.25, leap=3)
    for liar in liars:
        liar.behaviour = lambda req: (unsynchronised(req) if req.index == 0
                                      else [Send(kod(req, b"RATE"))])
    m = await probe_group([s.target for s in [honest, *liars]])
    assert states(m) == {honest.target: "truechimer",
                         **{liar.target: "unfit" for liar in liars}}
    assert {labels["reason"] for labels in label_sets(
        m, "probe_ntp_group_member_failure_info")} == {"kod_rate"}
    offset = value(m, "probe_ntp_group_local_clock_offset_seconds")
    assert offset is not None and abs(offset) < TOLERANCE
    assert m.success, m.failure


async def test_a_list_in_another_order_shares_the_burst(servers: Start) -> None:
    # Reordering an ad-hoc list must not buy a burst at each member per order: the
    # at-most-two-bursts-per-target rule holds for the set of members.
    members = [await servers(offset=0.0) for _ in range(3)]
    module = group_module()
    config = Config(modules={"g": module}, source="test")
    coordinator = Coordinator()
    orders = [members, members[::-1], [members[1], members[0], members[2]]]
    targets = [resolve_target(config, module, ",".join(s.target for s in order))
               for order in orders]
    outcomes = await asyncio.gather(*(coordinator.probe(config, module, t, 2.0)
                                      for t in targets * 3))
    assert all(o.result.success for o in outcomes)
    # One burst of 2 samples per member for the nine requests (at most two bursts would
    # be allowed; they all start together, so one serves them).
    assert [len(s.requests) for s in members] == [2, 2, 2]
    assert sum(o.shared for o in outcomes) == 8


async def test_falling_budgets_cannot_multiply_a_shared_members_bursts(
        servers: Start) -> None:
    # Five lists that differ in their other member, each with a shorter budget than the
    # last: none fits a burst already in flight to the shared member (each ends later
    # than the next probe's deadline). Two bursts reach it at most; the later probes share
    # the one that may end soonest, which ends in time here.
    shared, *others = [await servers(offset=0.0) for _ in range(6)]
    module = group_module()
    config = Config(modules={"g": module}, source="test")
    coordinator = Coordinator()
    outcomes = []
    for other, budget in zip(others, (2.0, 1.8, 1.6, 1.4, 1.2), strict=False):
        target = resolve_target(config, module, f"{shared.target},{other.target}")
        outcomes.append(asyncio.ensure_future(coordinator.probe(config, module, target,
                                                                budget)))
        await asyncio.sleep(0)  # in this order
    done = await asyncio.gather(*outcomes)
    assert all(o.result.success for o in done), [o.log.text() for o in done]
    assert len(shared.requests) <= 2 * 2, len(shared.requests)


async def staggered(first_member: FakeNTPServer, texts: list[str],
                    budgets: tuple[float, float, float]) -> list[Any]:
    """Three group probes of ``texts`` with ``budgets``: the first two each have their
    burst to ``first_member`` out before the next starts (the limit of bursts in flight
    is reached when the third comes); their outcomes."""
    module = group_module()
    config = Config(modules={"g": module}, source="test")
    coordinator = Coordinator()
    outcomes = []
    for i, (text, budget) in enumerate(zip(texts, budgets, strict=True)):
        target = resolve_target(config, module, text)
        outcomes.append(asyncio.ensure_future(coordinator.probe(config, module, target,
                                                                budget)))
        if i < 2:
            await first_member.wait_for_requests(i + 1)
    return list(await asyncio.gather(*outcomes))


@pytest.mark.parametrize("budgets", [
    # A (2 s) and B (0.2 s, which times out) each burst to the member; C (1 s) fits
    # neither and, at the limit, shares A's, the burst with the largest budget.
    (2.0, 0.2, 1.0),
    # A (0.2 s) and B (0.15 s) both time out; C (3 s) shares A's, sees it cut down, and
    # measures the member itself: not a local_error that fails a healthy group.
    (0.2, 0.15, 3.0),
])
async def test_past_the_member_limit_a_cut_down_bursts_timeout_is_not_passed_on(
        servers: Start, budgets: tuple[float, float, float]) -> None:
    slow = await servers(offset=0.0)  # answers after 0.25 s
    slow.behaviour = lambda req: [Send(reply(req), delay=0.25)]
    fast = [await servers(offset=0.0) for _ in range(2)]
    texts = [f"{slow.target},{fast[0].target}", f"{slow.target},{fast[1].target}",
             f"{slow.target},{fast[0].target},{fast[1].target}"]
    _, short, late = await staggered(slow, texts, budgets)
    assert value(short.result, "probe_ntp_group_member_up", member=slow.target) == 0
    assert states(late.result)[slow.target] == "truechimer", late.log.text()
    assert late.result.success, late.log.text()


async def test_a_member_burst_a_shorter_budget_cuts_down_is_not_shared(
        servers: Start) -> None:
    # The member answers after 0.25 s. A group probe with 0.2 s times out on it; a probe
    # of another list with 0.38 s (less than twice that) measures it itself.
    slow = await servers(offset=0.0)
    slow.behaviour = lambda req: [Send(reply(req), delay=0.25)]
    fast = [await servers(offset=0.0) for _ in range(2)]
    module = group_module()
    config = Config(modules={"g": module}, source="test")
    coordinator = Coordinator()
    first, second = (resolve_target(config, module, f"{slow.target},{f.target}")
                     for f in fast)
    shorter = asyncio.ensure_future(coordinator.probe(config, module, first, 0.2))
    await slow.wait_for_requests(1)
    longer = await coordinator.probe(config, module, second, 0.38)
    assert states(longer.result)[slow.target] == "truechimer", longer.log.text()
    assert value((await shorter).result, "probe_ntp_group_member_up",
                 member=slow.target) == 0


async def test_past_the_limit_a_groups_verdict_is_passed_on(servers: Start) -> None:
    # Two members that answer (after 0.25 s) but disagree: no_majority is the group's
    # verdict, reached well within the bursts' budgets. A request sharing one of them at
    # the limit of bursts gets it, not a local_error as if the burst had been cut short.
    members = [await servers(offset=o) for o in (0.0, 1.0)]
    for member, offset in zip(members, (0.0, 1.0), strict=True):
        member.behaviour = (lambda o: lambda req: [Send(reply(req, offset=o), delay=0.25)])(
            offset)
    text = ",".join(m.target for m in members)
    *_, late = await staggered(members[0], [text] * 3, (0.5, 0.4, 3.0))
    assert late.result.failure is Reason.NO_MAJORITY, late.log.text()


async def test_lists_sharing_a_member_share_its_burst(servers: Start) -> None:
    # Ten lists that differ in their other member, probed at once: the shared member gets
    # one burst, not ten (the other members vary, so each list is a target of its own).
    shared, *others = [await servers(offset=0.0) for _ in range(11)]
    module = group_module()
    config = Config(modules={"g": module}, source="test")
    coordinator = Coordinator()
    targets = [resolve_target(config, module, f"{shared.target},{other.target}")
               for other in others]
    outcomes = await asyncio.gather(*(coordinator.probe(config, module, t, 2.0)
                                      for t in targets))
    assert all(o.result.success for o in outcomes), [o.log.text() for o in outcomes]
    assert len(shared.requests) == 2  # one burst of two samples
    assert all(len(o.requests) == 2 for o in others)
    # Each packet is counted once, by the probe that sent it.
    assert sum(o.result.packets_sent for o in outcomes) == 2 + 2 * len(others)
    assert sum("measured by a burst another group probe has in flight" in o.log.text()
               for o in outcomes) == len(others) - 1
    assert not group._member_flights  # nothing left behind


async def test_a_shared_member_burst_whose_probe_is_cancelled_is_measured_once_again(
        servers: Start) -> None:
    # The first list's client hangs up while three others wait on its burst to the shared
    # member: one of them measures the member again, and the other two share that burst.
    shared, first_other, *others = [await servers(offset=0.0) for _ in range(5)]
    shared.behaviour = lambda req: [Send(reply(req), delay=0.2)]
    module = group_module()
    config = Config(modules={"g": module}, source="test")
    guard = guard_for(config, module)

    def start(other: FakeNTPServer) -> asyncio.Task[tuple[Measurement, ProbeLog]]:
        target = resolve_target(config, module, f"{shared.target},{other.target}")
        return asyncio.create_task(run_probe(target, module, 2.0, guard=guard))

    first = start(first_other)
    await shared.wait_for_requests(1)
    followers = [start(other) for other in others]
    for other in others:
        await other.wait_for_requests(1)  # each follower is under way, waiting on the first
    first.cancel()
    results = await asyncio.gather(*followers)
    assert all(m.success for m, _ in results), [log.text() for _, log in results]
    assert all(states(m)[shared.target] == "truechimer" for m, _ in results)
    # The first burst's one request, then one burst of two samples for the three.
    assert len(shared.requests) == 3
    assert not group._member_flights


async def test_a_burst_and_its_sharer_cancelled_at_once_send_nothing_more(
        servers: Start) -> None:
    # Both clients hang up in the same turn of the loop: the sharer must not take the
    # shared burst's end for its cue to measure the member itself, for nobody.
    shared, one, two = [await servers(offset=0.0) for _ in range(3)]
    shared.behaviour = lambda req: [Send(reply(req), delay=0.2)]
    module = group_module()
    config = Config(modules={"g": module}, source="test")
    guard = guard_for(config, module)
    tasks = [asyncio.create_task(run_probe(
        resolve_target(config, module, f"{shared.target},{other.target}"), module, 2.0,
        guard=guard)) for other in (one, two)]
    await shared.wait_for_requests(1)
    await two.wait_for_requests(1)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await shared.drain()
    assert len(shared.requests) == 1
    assert not group._member_flights
    leftover = [t for t in asyncio.all_tasks() if "_member_burst" in repr(t.get_coro())
                or "probe.<locals>.one" in repr(t.get_coro())]
    assert leftover == []


async def test_a_cancelled_group_probe_counts_the_packets_it_sent(servers: Start) -> None:
    # Its client hung up mid-burst: the packets went out, and /metrics counts them.
    slow, quick = await servers(offset=0.0), await servers(offset=0.0)
    slow.behaviour = lambda req: [Send(reply(req), delay=0.5)]
    module = group_module()
    config = Config(modules={"g": module}, source="test")
    coordinator = Coordinator()
    counted: list[int] = []
    coordinator.on_cancelled = lambda m: counted.append(m.packets_sent)
    target = resolve_target(config, module, f"{slow.target},{quick.target}")
    request = asyncio.create_task(coordinator.probe(config, module, target, 2.0))
    await slow.wait_for_requests(1)
    await quick.wait_for_requests(2)
    request.cancel()
    await poll(lambda: bool(counted), "the cancelled burst counted")
    assert counted[0] >= 3  # the quick member's two, and the slow member's first


def test_a_group_is_bounded_and_names_known_groups() -> None:
    config = parse_config("groups:\n  eu: [192.0.2.1, '192.0.2.2:123']\n"
                          "modules:\n  g: {prober: ntp_group}\n", "t")
    module = config.modules["g"]
    target = resolve_target(config, module, "eu")
    assert isinstance(target, group.GroupTarget) and str(target) == "eu"
    assert [str(t) for t in target.members] == ["192.0.2.1", "192.0.2.2:123"]
    listed = resolve_target(config, module, "192.0.2.1, 192.0.2.3:1123")
    assert str(listed) == "192.0.2.1,192.0.2.3:1123"
    with pytest.raises(TargetError, match=r"no group named 'us'.*known: eu"):
        resolve_target(config, module, "us")
    with pytest.raises(TargetError, match="17 members: a group has at most 16"):
        resolve_target(config, module, ",".join(f"192.0.2.{i}" for i in range(1, 18)))
    with pytest.raises(TargetError, match="listed twice"):
        resolve_target(config, module, "192.0.2.1,192.0.2.1")
    with pytest.raises(TargetError, match="a link-local address needs its interface"):
        resolve_target(config, module, "192.0.2.1,[fe80::1]:123")
    # An interface not there yet is each probe's matter (local_error), not the list's.
    listed = resolve_target(config, module, "192.0.2.1,[fe80::1%nosuch0]:123")
    assert str(listed) == "192.0.2.1,[fe80::1%nosuch0]:123"
    with pytest.raises(TargetError, match="invalid target"):
        resolve_target(config, module, "192.0.2.1,,192.0.2.2")
    # A group's name in a list is not a host name to look up.
    # Group names ignore case (a port or a trailing dot too, in a list).
    assert str(resolve_target(config, module, "EU")) == "eu"
    # A port after a group's name would be dropped without a word: a 400, as any target
    # that does not parse.
    for spelling in ("eu:abc", "eu:99999", "eu:123"):
        with pytest.raises(TargetError, match="a group is named alone, without a port"):
            resolve_target(config, module, spelling)
    for spelling in ("eu", " EU", "eu:123", "Eu."):
        with pytest.raises(TargetError, match=r"is a group: .*by its name alone"):
            resolve_target(config, module, f"192.0.2.9,{spelling}")


async def test_a_group_through_the_web(servers: Start, aiohttp_client: AiohttpClient) -> None:
    good = [await servers(offset=0.0) for _ in range(2)]
    bad = await servers(offset=3.0)
    members = ", ".join(f"'{s.target}'" for s in [*good, bad])
    config = parse_config(
        f"leapfile: ''\ngroups:\n  trio: [{members}]\nmodules:\n"
        "  g:\n    prober: ntp_group\n    timeout: 2s\n"
        "    ntp: {samples: 1, reply_timeout: 300ms, preferred_ip_protocol: ip4}\n"
        "    ntp_group: {max_falsetickers: 1}\n", "t")
    client: Client = await aiohttp_client(create_app(State(config=config,
                                                           internals=Internals())))
    response = await client.get("/probe", params={"module": "g", "target": "trio"})
    body = await response.text()
    assert response.status == 200, body
    assert "probe_success 1" in body
    assert (f'probe_ntp_group_member_selection_info{{member="{bad.target}",'
            'state="falseticker"} 1') in body
    unknown = await client.get("/probe", params={"module": "g", "target": "quartet"})
    assert unknown.status == 400
    assert "no group named 'quartet'" in await unknown.text()


# --- leap readiness -----------------------------------------------------------------------

def leap_config(tmp_path: Path, text: str, **ntp_settings: object) -> Config:
    path = tmp_path / "leap-seconds.list"
    path.write_text(text)
    settings = ", ".join(f"{k}: {str(v).lower()}" for k, v in ntp_settings.items())
    return parse_config(f"leapfile: {path}\nmodules:\n  n:\n    prober: ntp\n"
                        f"    ntp: {{samples: 1, preferred_ip_protocol: ip4, {settings}}}\n",
                        str(tmp_path / "modules.yaml"))


async def probe_with_leap_check(server: FakeNTPServer, config: Config,
                                target: str | None = None) -> Measurement:
    """An ntp probe: its report step checks the server's leap indicator against the file."""
    module = config.modules["n"]
    ctx = ProbeContext(asyncio.get_running_loop().time() + module.timeout,
                       guard=guard_for(config, module))
    m = await ntp.probe(resolve_target(config, module, target or server.target), module, ctx)
    assert ntp.report_of(m) is not None
    return m


# Dates relative to now: the fake servers answer with the real time, and the /metrics
# collector reads the real clock, so fixed dates would make these tests fail one day.
YEAR = time.gmtime().tm_year
UPDATED, EXPIRES = ntp_seconds(utc(YEAR, 1, 1)), utc(YEAR + 2, 6, 28)
# No leap scheduled after 2017, valid for another year and a half or more.
QUIET = build(REAL_ENTRIES, updated=UPDATED, expires=ntp_seconds(EXPIRES))


async def test_an_announcement_the_file_does_not_schedule(servers: Start,
                                                          tmp_path: Path) -> None:
    server = await servers(leap=1)
    m = await probe_with_leap_check(server, leap_config(tmp_path, QUIET))
    assert m.values(LEAP_CHECK) == [(("unexpected_announcement",), 1)]
    assert m.success  # reported only, by default


async def test_every_address_of_a_name_is_leap_checked(servers: Start, tmp_path: Path,
                                                       hosts: Hosts) -> None:
    # 127.0.0.1 is the best address and right; 127.0.0.2 announces a leap the file does
    # not schedule. Clients that pick it are misled: the name's verdict says so.
    good = await servers(leap=0, root_dispersion=0.0001)
    wrong = await FakeNTPServer.start(answer(leap=1, root_dispersion=0.01), host="127.0.0.2",
                                      port=good.port)
    hosts("127.0.0.1 two.test\n127.0.0.2 two.test\n")
    config = leap_config(tmp_path, QUIET, all_addresses="true")
    try:
        m = await probe_with_leap_check(good, config, f"two.test:{good.port}")
    finally:
        wrong.close()
    assert m.values(LEAP_CHECK) == [(("unexpected_announcement",), 1)]
    assert m.value(ntp.ROOT_DISPERSION) == pytest.approx(0.0001, abs=2e-5)  # still the best's


async def test_a_mismatch_at_any_address_fails_the_name_when_asked(
        servers: Start, tmp_path: Path, hosts: Hosts) -> None:
    # addresses_required: any lets the wrong address fail alone, but the name's verdict
    # is the mismatch, and fail_on_leap_mismatch asks to fail on it.
    good = await servers(leap=0, root_dispersion=0.0001)
    wrong = await FakeNTPServer.start(answer(leap=1, root_dispersion=0.01), host="127.0.0.2",
                                      port=good.port)
    hosts("127.0.0.1 two.test\n127.0.0.2 two.test\n")
    config = leap_config(tmp_path, QUIET, all_addresses="true", addresses_required="any",
                         fail_on_leap_mismatch=True)
    try:
        m = await probe_with_leap_check(good, config, f"two.test:{good.port}")
    finally:
        wrong.close()
    assert m.values(LEAP_CHECK) == [(("unexpected_announcement",), 1)]
    assert m.failure is Reason.LEAP_MISMATCH


@pytest.mark.parametrize("stratum", [16, 0])
async def test_an_unsynchronised_server_vouches_for_no_leap(servers: Start, tmp_path: Path,
                                                            stratum: int) -> None:
    # Stratum 0 with a zero refid: chrony's unsynchronised answer, not a Kiss-o'-Death.
    server = await servers(leap=1, stratum=stratum, refid=bytes(4))
    m = await probe_with_leap_check(server, leap_config(tmp_path, QUIET,
                                                        fail_on_leap_mismatch=True))
    assert m.values(LEAP_CHECK) == [(("unknown",), 1)]
    assert m.failure is Reason.STRATUM_UNSYNCHRONIZED


async def test_fail_on_leap_mismatch(servers: Start, tmp_path: Path) -> None:
    server = await servers(leap=1)
    config = leap_config(tmp_path, QUIET, fail_on_leap_mismatch=True)
    m = await probe_with_leap_check(server, config)
    assert m.failure is Reason.LEAP_MISMATCH


async def test_no_announcement_and_none_due_is_ok(servers: Start, tmp_path: Path) -> None:
    server = await servers(leap=0)
    m = await probe_with_leap_check(server, leap_config(tmp_path, QUIET,
                                                        fail_on_leap_mismatch=True))
    assert m.values(LEAP_CHECK) == [(("ok",), 1)]
    assert m.success


@pytest.mark.parametrize("text", [
    build(REAL_ENTRIES, expires=ntp_seconds(utc(2026, 6, 28))),  # expired
    build(REAL_ENTRIES, words=(1, 2, 3, 4, 5)),  # broken hash
], ids=["expired", "broken-hash"])
async def test_an_invalid_file_cannot_judge(servers: Start, tmp_path: Path, text: str) -> None:
    server = await servers(leap=1)
    m = await probe_with_leap_check(server, leap_config(tmp_path, text,
                                                        fail_on_leap_mismatch=True))
    assert m.values(LEAP_CHECK) == [(("unknown",), 1)]
    assert m.success


async def test_leapfile_series_on_metrics_after_start_and_reload(
    tmp_path: Path, aiohttp_client: AiohttpClient
) -> None:
    leapfile = tmp_path / "leap-seconds.list"
    leap = utc(YEAR + 2, 1, 1)
    leapfile.write_text(build([*REAL_ENTRIES, (ntp_seconds(leap), 38)], updated=UPDATED,
                              expires=ntp_seconds(EXPIRES)))
    config_path = tmp_path / "modules.yaml"
    config_path.write_text("leapfile: leap-seconds.list\nmodules:\n  n: {prober: ntp}\n")
    state = State(config=load_config(str(config_path)), internals=Internals(),
                  config_path=str(config_path))
    client: Client = await aiohttp_client(create_app(state))

    async def metrics() -> dict[str, float]:
        text = await (await client.get("/metrics")).text()
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line.startswith("ntp_probe_leapfile_")}

    assert await metrics() == {
        "ntp_probe_leapfile_expiry_timestamp_seconds": EXPIRES,
        "ntp_probe_leapfile_valid": 1.0,
        "ntp_probe_leapfile_tai_offset_seconds": 37.0,
        "ntp_probe_leapfile_next_leap_timestamp_seconds": leap,
    }
    # A reload reads the file again: now with a broken hash. What it says is vouched for
    # by nothing (ntpd refuses such a file): no TAI offset, no next leap from it.
    leapfile.write_text(build([*REAL_ENTRIES, (ntp_seconds(leap), 38)], updated=UPDATED,
                              expires=ntp_seconds(EXPIRES), words=(1, 2, 3, 4, 5)))
    assert (await client.post("/-/reload")).status == 200
    assert await metrics() == {
        "ntp_probe_leapfile_expiry_timestamp_seconds": EXPIRES,
        "ntp_probe_leapfile_valid": 0.0,
    }
    # A named file that is no longer a leap file fails the reload and keeps the old one.
    leapfile.write_text("not a leap file\n")
    response = await client.post("/-/reload")
    assert response.status == 500
    assert "leapfile" in await response.text()
    assert (await metrics())["ntp_probe_leapfile_valid"] == 0.0
    # Turned off: no samples, only the families' HELP lines.
    config_path.write_text("leapfile: ''\nmodules:\n  n: {prober: ntp}\n")
    assert (await client.post("/-/reload")).status == 200
    assert await metrics() == {}


async def test_members_this_host_could_not_measure_are_no_verdict_on_the_group(
        servers: Start) -> None:
    # Out of probe sockets (the open-files limit's share), a member fails local_error: the
    # group's verdict is the exporter's local_error, not a no_majority blamed on servers.
    members = [await servers(offset=0.0) for _ in range(3)]
    limit_probe_sockets(2)
    try:
        m = await probe_group([s.target for s in members])
    finally:
        limit_probe_sockets(None)
    failures = [labels["reason"] for labels in
                label_sets(m, "probe_ntp_group_member_failure_info")]
    assert failures == ["local_error"]
    assert m.failure is Reason.LOCAL_ERROR
