"""Nothing is sent outside policy, however the target is spelled; the memories that keep a
server from being pestered (KoD backoff, min_probe_interval, shared bursts) follow the
server reached, not the spelling; the min_probe_interval cache stays bounded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient

from ntp_probe.config.schema import Config
from ntp_probe.engine import coordinator as coordinator_module
from ntp_probe.engine.context import ProbeLog
from ntp_probe.engine.coordinator import Coordinator, _Cached
from ntp_probe.engine.result import Measurement, Reason
from ntp_probe.engine.targets import TargetError, parse_target
from ntp_probe.safety.guard import Guard
from ntp_probe.safety.policy import TargetPolicy, parse_rules
from tests.behaviour import fake_server
from tests.behaviour.fake_server import FakeNTPServer, Send, kod, reply, silent
from tests.behaviour.test_operate_web import config_text, metric, module_yaml, start
from tests.conftest import FakeClock, make_module

fake_ntp = fake_server.fake_ntp


@pytest.fixture
async def fake_ntp6() -> AsyncIterator[FakeNTPServer]:
    server = await FakeNTPServer.start(host="::1")
    try:
        yield server
    finally:
        server.close()


# --- never sent: unspecified, multicast, broadcast ------------------------------------------

@pytest.mark.parametrize("spelling", ["0.0.0.0:{p}", "[::]:{p}", "[::ffff:0.0.0.0]:{p}"])
async def test_unspecified_addresses_are_forbidden_whatever_the_policy(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer, spelling: str
) -> None:
    # No policy at all: 0.0.0.0 and :: would reach the server on 127.0.0.1 / ::1.
    client, _ = await start(aiohttp_client, tmp_path / "m.yaml", config_text(module_yaml("m")))
    target = spelling.format(p=fake_ntp.port)
    resp = await client.get("/probe", params={"target": target, "module": "m", "debug": "true"})
    text = await resp.text()
    assert "not a unicast address" in text and "verdict: failure (target_forbidden)" in text, text
    await fake_ntp.drain()
    assert fake_ntp.requests == []


@pytest.mark.parametrize("address", ["224.0.0.1", "239.255.255.250", "255.255.255.255",
                                     "ff02::101", "::ffff:224.0.0.1", "240.0.0.1"])
def test_multicast_broadcast_and_reserved_are_refused(address: str) -> None:
    assert "not a unicast address" in (Guard().refuse(address) or "")
    # Also when a permitted name resolves there.
    assert "not a unicast address" in (Guard().refuse("ntp.example", address) or "")


@pytest.mark.parametrize("raw", ["0x0", "0x7f.1", "017700000001", "0x7f000001"])
def test_numbers_the_resolver_would_read_as_addresses_are_rejected(raw: str) -> None:
    with pytest.raises(TargetError):
        parse_target(raw)


# --- one server, one memory ----------------------------------------------------------------

@pytest.mark.parametrize(("spelling", "canonical"), [
    ("[::ffff:127.0.0.1]:123", "127.0.0.1:123"),
    ("[::1%1]:123", "[::1]:123"),
    ("[::1%01]:123", "[::1]:123"),
    ("[::1%lo]", "[::1]"),
    ("[::1%nosuchif]", "[::1]"),  # a zone means nothing off link-local
    ("[fe80::1%01]:123", "[fe80::1%1]:123"),
])
def test_spellings_of_one_server_are_one_target(spelling: str, canonical: str) -> None:
    assert str(parse_target(spelling)) == canonical


def test_a_zone_past_any_interface_index_is_rejected() -> None:
    with pytest.raises(TargetError, match="is no interface index"):
        parse_target("[fe80::1%4294967296]:123")


@pytest.mark.parametrize("zone", ["nosuch0", "999999", "0"])
async def test_a_zone_that_names_no_interface_fails_the_probe_not_the_request(
    zone: str, aiohttp_client: AiohttpClient, tmp_path: Path,
) -> None:
    # The interface may come later (a VPN, a USB NIC): the request is well formed, and
    # its probe says why it sent nothing.
    client, _ = await start(aiohttp_client, tmp_path / "m.yaml", config_text(module_yaml("m")))
    resp = await client.get("/probe", params={"target": f"[fe80::1%{zone}]:123",
                                              "module": "m", "debug": "true"})
    text = await resp.text()
    assert resp.status == 200, text
    assert "probe_success 0" in text
    assert "verdict: failure (local_error)" in text
    assert f"fe80::1%{zone}: its zone names no interface of this host" in text
    assert "nothing sent" in text


async def test_kod_deny_holds_for_every_spelling_of_the_server(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer,
    fake_ntp6: FakeNTPServer,
) -> None:
    client, _ = await start(aiohttp_client, tmp_path / "m.yaml", config_text(module_yaml("m")))
    for server, spellings in (
        (fake_ntp, ["127.0.0.1:{p}", "[::ffff:127.0.0.1]:{p}", "[::ffff:7f00:1]:{p}"]),
        (fake_ntp6, ["[::1]:{p}", "[::1%1]:{p}", "[::1%01]:{p}", "[0:0::1%lo]:{p}"]),
    ):
        server.behaviour = lambda req: [Send(kod(req, b"DENY"))]
        for i, spelling in enumerate(spellings):
            resp = await client.get("/probe", params={"target": spelling.format(p=server.port),
                                                      "module": "m"})
            body = await resp.text()
            expected = "kod_deny" if i == 0 else "backoff"
            assert metric(body, "probe_ntp_failure_info", reason=expected) == 1, (spelling, body)
        await server.drain()
        assert len(server.requests) == 1


async def test_min_probe_interval_survives_a_reload_that_changed_nothing(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    text = config_text(module_yaml("m", extra="    min_probe_interval: 1h\n"))
    client, _ = await start(aiohttp_client, tmp_path / "m.yaml", text)
    params = {"target": f"127.0.0.1:{fake_ntp.port}", "module": "m"}
    await (await client.get("/probe", params=params)).text()
    assert (await client.post("/-/reload")).status == 200
    for spelling in (f"127.0.0.1:{fake_ntp.port}", f"[::ffff:127.0.0.1]:{fake_ntp.port}"):
        body = await (await client.get("/probe", params={**params, "target": spelling})).text()
        assert metric(body, "probe_ntp_result_age_seconds") is not None, body
    await fake_ntp.drain()
    assert len(fake_ntp.requests) == 1


async def test_a_reload_that_denies_the_target_is_not_answered_from_the_cache(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    path = tmp_path / "m.yaml"
    block = module_yaml("m", extra="    min_probe_interval: 1h\n")
    client, _ = await start(aiohttp_client, path, config_text(block))
    params = {"target": f"127.0.0.1:{fake_ntp.port}", "module": "m"}
    body = await (await client.get("/probe", params=params)).text()
    assert metric(body, "probe_success") == 1
    path.write_text("denied_targets: [127.0.0.0/8]\n" + config_text(block))
    assert (await client.post("/-/reload")).status == 200
    body = await (await client.get("/probe", params=params)).text()
    assert metric(body, "probe_ntp_failure_info", reason="target_forbidden") == 1, body
    assert metric(body, "probe_ntp_result_age_seconds") is None


async def polite_client(aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer,
                        *, samples: int = 1, interval: str = "10ms", cached: bool = True,
                        reply_timeout: str = "500ms",
                        ) -> Callable[[float | None], Awaitable[Any]]:
    """An exporter with module m (min_probe_interval 1h unless ``cached`` is False) on
    ``fake_ntp``; returns get(budget): a /probe request whose scrape-timeout header leaves
    ``budget`` seconds (None: no header)."""
    extra = "    min_probe_interval: 1h\n" if cached else ""
    block = module_yaml("m", samples=samples, extra=extra, reply_timeout=reply_timeout).replace(
        "sample_interval: 10ms", f"sample_interval: {interval}")
    client, _ = await start(aiohttp_client, tmp_path / "m.yaml", config_text(block))
    params = {"target": f"127.0.0.1:{fake_ntp.port}", "module": "m"}

    def get(budget: float | None) -> Any:
        # The budget is max(header - 0.5, header / 2): the header that gives ``budget``.
        headers = {} if budget is None else {
            "X-Prometheus-Scrape-Timeout-Seconds": f"{min(0.5 + budget, 2 * budget):.4f}"}
        return client.get("/probe", params=params, headers=headers)

    return get


async def test_a_scrape_timeout_of_100ms_probes_a_near_server(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    # A sidecar scraping the local daemon with scrape_timeout: 100ms: the probe's 50 ms
    # (45 once the verdict's margin is kept) is ample for a reply in a fraction of a
    # millisecond. A 50 ms floor under the first reply's window refused to send at all.
    get = await polite_client(aiohttp_client, tmp_path, fake_ntp, cached=False)
    body = await (await get(0.05)).text()
    assert metric(body, "probe_success") == 1, body
    assert metric(body, "probe_ntp_samples_sent") == 1


async def test_a_short_scrape_timeout_cannot_poison_the_cache(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    # Anyone can send a scrape-timeout header that leaves no time for a reply; that
    # failure must not be what the real scrapes get for the next hour.
    get = await polite_client(aiohttp_client, tmp_path, fake_ntp)
    body = await (await get(0.02)).text()  # 15 ms once the verdict's margin is kept
    assert metric(body, "probe_success") == 0, body
    body = await (await get(None)).text()
    assert metric(body, "probe_success") == 1, body
    assert metric(body, "probe_ntp_result_age_seconds") is None  # a fresh probe
    # The full result serves the short request in turn: no third burst.
    body = await (await get(0.02)).text()
    assert metric(body, "probe_success") == 1 and metric(
        body, "probe_ntp_result_age_seconds") is not None, body


async def test_a_burst_that_outlives_a_reload_does_not_refill_the_cache(
        fake_ntp: FakeNTPServer) -> None:
    coordinator = Coordinator()
    module = make_module(min_probe_interval=3600.0, reply_timeout=0.3)
    before = Config(modules={"t": module}, source="test")
    fake_ntp.behaviour = silent
    target = parse_target(fake_ntp.target)
    burst = asyncio.create_task(coordinator.probe(before, module, target, 2.0))
    await fake_ntp.wait_for_requests(1)
    # The reload denies the target while the burst still waits for its reply.
    after = Config(modules={"t": module}, source="test",
                   policy=TargetPolicy(denied=parse_rules(["127.0.0.0/8"], "denied_targets")))
    other = await coordinator.probe(after, module, parse_target("127.0.0.2:123"), 2.0)
    assert other.result.failure == "target_forbidden"
    assert (await burst).result.failure == "timeout"
    again = await coordinator.probe(after, module, target, 2.0)
    assert again.age is None and again.result.failure == "target_forbidden"


async def test_a_burst_of_a_module_a_reload_changed_does_not_displace_the_new_result(
        fake_ntp: FakeNTPServer) -> None:
    coordinator = Coordinator()
    old = make_module(min_probe_interval=3600.0, samples=3, interval=0.2)
    new = make_module(min_probe_interval=3600.0, samples=1)
    target = parse_target(fake_ntp.target)
    running = asyncio.create_task(coordinator.probe(
        Config(modules={"t": old}, source="test"), old, target, 2.0))
    await fake_ntp.wait_for_requests(1)
    config = Config(modules={"t": new}, source="test")  # the reload
    assert (await coordinator.probe(config, new, target, 2.0)).age is None
    assert (await running).result.success
    sent = len(fake_ntp.requests)
    again = await coordinator.probe(config, new, target, 2.0)
    assert again.age is not None, again  # the new module's result, not a fresh burst
    assert len(fake_ntp.requests) == sent


async def test_reloads_that_change_nothing_neither_start_nor_lose_bursts(
        fake_ntp: FakeNTPServer) -> None:
    # POST /-/reload is open to anyone (as in blackbox): a flood of reloads of the same file
    # must not let each scrape start a burst of its own, nor drop the result that serves
    # the interval.
    coordinator = Coordinator()
    module = make_module(min_probe_interval=3600.0)
    fake_ntp.behaviour = lambda req: [Send(reply(req), delay=0.2)]
    target = parse_target(fake_ntp.target)

    def reloaded() -> Config:
        return Config(modules={"t": module}, source="test")

    first = asyncio.create_task(coordinator.probe(reloaded(), module, target, 2.0))
    await fake_ntp.wait_for_requests(1)
    joined = await coordinator.probe(reloaded(), module, target, 2.0)
    assert joined.shared and joined.result.success, joined
    assert (await first).result.success
    again = await coordinator.probe(reloaded(), module, target, 2.0)
    assert again.age is not None and again.result.success
    await fake_ntp.drain()
    assert len(fake_ntp.requests) == 1


async def test_a_request_cancelled_as_its_result_arrives_still_counts_the_burst(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Its client hangs up in the loop pass between the burst's result and the request's
    # resumption: the burst ran, and the request that was to count it must still do so.
    coordinator = Coordinator()
    counted: list[str] = []
    coordinator.on_unclaimed = lambda module, result: counted.append(module)
    request: asyncio.Task[object] | None = None

    async def burst(*args: object, **kwargs: object) -> tuple[Measurement, ProbeLog]:
        assert request is not None
        asyncio.get_running_loop().call_soon(request.cancel)  # before its wake-up
        return Measurement(), ProbeLog()

    monkeypatch.setattr(coordinator_module, "run_probe", burst)
    module = make_module()
    request = asyncio.create_task(coordinator.probe(
        Config(modules={"t": module}, source="test"), module, parse_target("127.0.0.1:1"),
        1.0))
    with pytest.raises(asyncio.CancelledError):
        await request
    assert counted == [module.name]


async def test_rising_scrape_timeouts_cannot_force_a_burst_each(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    # Each header a little longer than the last: every budget is whole (the module's
    # burst takes about 0.56 s), so the first result serves all the others.
    get = await polite_client(aiohttp_client, tmp_path, fake_ntp)
    for i in range(10):
        body = await (await get(1.0 + i * 0.0001)).text()
        assert metric(body, "probe_success") == 1, body
    await fake_ntp.drain()
    assert len(fake_ntp.requests) == 1


async def test_rising_short_scrape_timeouts_force_only_a_few_bursts(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    # Budgets from 50 to 500 ms, each cut short (the burst needs 3 samples 0.3 s apart):
    # only those at more than twice the cached budget probe again.
    get = await polite_client(aiohttp_client, tmp_path, fake_ntp, samples=3, interval="300ms")
    fresh = 0
    for budget_ms in range(50, 501, 10):
        body = await (await get(budget_ms / 1000)).text()
        fresh += metric(body, "probe_ntp_result_age_seconds") is None
    assert fresh == 4  # 50, 110, 230, 470 ms


async def test_concurrent_falling_scrape_timeouts_start_at_most_two_bursts(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    # Ten requests at once, each with a shorter budget than the last and none long
    # enough for the whole burst (3 samples 0.3 s apart): each would fit no burst already
    # in flight; only two are started, the others share one.
    get = await polite_client(aiohttp_client, tmp_path, fake_ntp, samples=3, interval="300ms")

    async def scrape(budget: float) -> int:
        return int((await get(budget)).status)

    statuses = await asyncio.gather(*(scrape(1.5 - i * 0.05) for i in range(10)))
    assert statuses == [200] * 10
    await fake_ntp.drain()
    assert len(fake_ntp.requests) <= 6, len(fake_ntp.requests)


@pytest.mark.parametrize(("second_budget", "third_budget", "success"), [
    # The third request's 1.15 s is shorter than either burst's latest end, but the second
    # really ends after about 1 s (the server answers at once): sharing it succeeds, where
    # refusing at once would fail a healthy server.
    (1.2, 1.15, True),
    # 0.3 s, which the second burst (budget 1 s) outlasts: local_error, not a `timeout`
    # that would page NTPServerUnreachable for a server answering in a millisecond.
    (1.0, 0.3, False),
])
async def test_a_request_past_the_limit_of_bursts_shares_the_soonest_and_blames_no_one(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer,
    second_budget: float, third_budget: float, success: bool,
) -> None:
    # Bursts of three samples 0.5 s apart (each reply may take its 500 ms): the first
    # with the whole budget, the second with a shorter one; no third burst is sent.
    get = await polite_client(aiohttp_client, tmp_path, fake_ntp, samples=3, interval="300ms",
                              cached=False)
    first = asyncio.ensure_future(get(None))
    await fake_ntp.wait_for_requests(1)
    second = asyncio.ensure_future(get(second_budget))
    await fake_ntp.wait_for_requests(2)
    body = await (await get(third_budget)).text()
    assert metric(body, "probe_success") == (1 if success else 0), body
    if not success:
        assert 'probe_ntp_failure_info{reason="local_error"} 1' in body, body
    for burst in (first, second):
        assert metric(await (await burst).text(), "probe_success") == 1
    await fake_ntp.drain()
    assert len(fake_ntp.requests) == 6  # two bursts of three samples, no third


@pytest.mark.parametrize(("delay", "budgets", "first_ok", "third"), [
    # The server answers after 0.3 s. A has the whole budget; B, 0.2 s, times out; C, 1 s,
    # fits neither (A may take 1.5 s, B had too little). At the limit C shares A, the
    # burst with the largest budget, and gets its reply, not B's timeout (which would
    # blame a server that answered).
    (0.3, (None, 0.2, 1.0), True, "probe_success 1"),
    # Two bursts cut short by 0.4 s and 0.3 s time out on a server answering after 0.6 s;
    # a request with 1.5 s shares the larger: its timeout is not the server's silence for
    # a budget that would have had the reply. That burst over, it looks again with the
    # 1.1 s it has left, and gets the reply.
    (0.6, (0.4, 0.3, 1.5), False, "probe_success 1"),
    # With 0.45 s: nothing left to look again with (the shared burst took 0.4 s of it).
    (0.6, (0.4, 0.3, 0.45), False, 'probe_ntp_failure_info{reason="local_error"} 1'),
])
async def test_past_the_limit_a_request_is_not_handed_a_cut_down_bursts_timeout(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer, delay: float,
    budgets: tuple[float | None, float, float], first_ok: bool, third: str,
) -> None:
    get = await polite_client(aiohttp_client, tmp_path, fake_ntp, cached=False,
                              reply_timeout="1500ms")
    fake_ntp.behaviour = lambda req: [Send(reply(req), delay=delay)]
    first = asyncio.ensure_future(get(budgets[0]))
    await fake_ntp.wait_for_requests(1)
    second = asyncio.ensure_future(get(budgets[1]))
    await fake_ntp.wait_for_requests(2)
    body = await (await get(budgets[2])).text()
    assert third in body, body
    assert 'reason="timeout"' in await (await second).text()
    assert (metric(await (await first).text(), "probe_success") == 1) is first_ok
    await fake_ntp.drain()
    # A third burst only when the request looked again, after the one it shared ended.
    assert len(fake_ntp.requests) == (3 if third == "probe_success 1" and not first_ok else 2)
    if len(fake_ntp.requests) == 3:
        took = metric(body, "probe_duration_seconds")  # its whole wait, both looks
        assert took is not None and took > 0.9, body


@pytest.mark.parametrize(("reason", "duration", "ran_out"), [
    # A whole burst of 4 samples 0.5 s apart ends at 1.504 s of a 1.6 s budget: its leap
    # indicator 3 is the server's verdict, not a burst cut short (a request sharing it at
    # the limit must not probe again, nor read local_error).
    ("leap_unsynchronized", 1.504, False),
    ("timeout", 1.55, True), ("chrony_timeout", 1.6, True), ("nts_ke_tls", 1.59, True),
    ("no_majority", 1.58, True), ("no_majority", 0.4, False),  # early: the group's verdict
    ("timeout", 0.9, False),  # well within: silence, not the budget
    ("resolve", 1.58, True), ("resolve", 0.01, False),  # a lookup cut off; NXDOMAIN
])
def test_a_probe_ran_out_of_budget_only_by_a_reason_of_running_out(
        reason: str, duration: float, ran_out: bool) -> None:
    m = Measurement()
    m.fail(Reason(reason))
    m.duration = duration
    assert coordinator_module._ran_out(m, 1.6) is ran_out


async def test_a_scrape_does_not_share_a_burst_a_short_header_cut_down(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    # An outsider's 0.1 s budget allows one sample of three; the real scrape a moment
    # later, with the whole budget, must get all three, not that burst.
    get = await polite_client(aiohttp_client, tmp_path, fake_ntp, samples=3, interval="50ms",
                              cached=False)
    fake_ntp.behaviour = lambda req: [Send(reply(req), delay=0.04)]
    short = asyncio.ensure_future(get(0.1))
    await fake_ntp.wait_for_requests(1)
    body = await (await get(None)).text()
    assert metric(body, "probe_ntp_samples_sent") == 3, body
    assert metric(await (await short).text(), "probe_ntp_samples_sent") == 1


async def test_a_longer_budget_is_not_handed_the_timeout_of_a_shorter_ones_burst(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    # The server answers after 0.6 s. A scrape with 0.5 s times out; one with 0.9 s that
    # comes while it runs (more than half its budget, and over within it) runs its own
    # burst: that timeout is not the server's silence for 0.9 s.
    get = await polite_client(aiohttp_client, tmp_path, fake_ntp, cached=False,
                              reply_timeout="4s")
    fake_ntp.behaviour = lambda req: [Send(reply(req), delay=0.6)]
    shorter = asyncio.ensure_future(get(0.5))
    await fake_ntp.wait_for_requests(1)
    body = await (await get(0.9)).text()
    assert metric(body, "probe_success") == 1, body
    assert 'reason="timeout"' in await (await shorter).text()
    await fake_ntp.drain()
    assert len(fake_ntp.requests) == 2


async def test_a_burst_ending_last_does_not_replace_a_longer_budgets_result(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    get = await polite_client(aiohttp_client, tmp_path, fake_ntp, samples=3, interval="50ms")
    fake_ntp.behaviour = lambda req: [Send(reply(req), delay=0.04)]
    longer = asyncio.ensure_future(get(0.5))
    await fake_ntp.wait_for_requests(1)
    # The burst in flight may take 0.5 s, more than this budget: a burst of its own, which
    # ends last.
    shorter = asyncio.ensure_future(get(0.45))
    await (await longer).text()
    await (await shorter).text()
    sent = len(fake_ntp.requests)
    assert sent == 6
    # The 0.5 s result is kept: a 0.95 s budget is served it (0.45 s would be too short).
    body = await (await get(0.95)).text()
    assert metric(body, "probe_ntp_result_age_seconds") is not None, body
    assert len(fake_ntp.requests) == sent


# --- the min_probe_interval cache is bounded in time and bytes -----------------------------

async def test_cache_entries_live_as_long_as_their_interval(fake_ntp: FakeNTPServer) -> None:
    clock = FakeClock()
    coordinator = Coordinator(clock=clock)
    module = make_module(min_probe_interval=30.0)
    config = Config(modules={"t": module}, source="test")
    await coordinator.probe(config, module, parse_target(fake_ntp.target), 2.0)
    assert coordinator.cached_bytes > 0
    clock.advance(29)
    assert coordinator.cached_bytes > 0
    clock.advance(2)
    assert coordinator.cached_bytes == 0


async def test_cache_is_bounded_in_bytes(fake_ntp: FakeNTPServer) -> None:
    budget = 20_000
    coordinator = Coordinator(cache_bytes=budget)
    module = make_module(min_probe_interval=3600.0)
    config = Config(modules={"t": module}, source="test")
    for i in range(40):  # distinct servers: the same fake on 127.0.0.x is 40 targets
        await coordinator.probe(config, module, parse_target(f"127.0.0.{i + 1}:{fake_ntp.port}"),
                                0.2)
    assert 0 < coordinator.cached_bytes <= budget


def test_sizing_a_cache_entry_formats_no_log_line() -> None:
    # A cached probe's log is read by few; pricing its entry must not format it.
    formatted: list[str] = []

    def line() -> str:
        formatted.append("line")
        return "line"

    log = ProbeLog("t", "m")
    for _ in range(3):
        log(line)
    assert _Cached(make_module(), 0.0, Measurement(), log, 1.0).size() > 1024
    assert formatted == []


def test_a_budget_nearly_as_long_says_the_same_of_the_server() -> None:
    # Silent for 4.5 s of a 5 s budget is silent: its timeout stands for 5 s (two
    # Prometheus jobs with 5 s and 10 s scrape timeouts must both see a dead server).
    assert not coordinator_module._much_shorter(4.5, 5.0)
    assert coordinator_module._much_shorter(0.5, 1.0)
