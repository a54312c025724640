"""net.resolve: bounded threads, coalesced lookups, brief negative caching, reasons.

The lookup function is replaced by one the test controls: a made-up name must never
reach the machine's resolver.
"""

from __future__ import annotations

import asyncio
import gc
import math
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ntp_probe.net.resolve import (
    FAMILIES,
    OTHER_FAMILY_AFTER,
    OTHER_FAMILY_GRACE,
    HostsFile,
    ResolveError,
    Resolver,
    literal,
    resolve,
    resolve_all,
)

ROOT = Path(__file__).resolve().parents[2]


class Lookups:
    """A getaddrinfo stand-in: answers from a table, optionally holding until released."""

    def __init__(self, table: dict[tuple[str, int], str]) -> None:
        self.table = table
        self.calls: list[tuple[str, int]] = []
        self.release = threading.Event()
        self.release.set()
        self.lock = threading.Lock()

    def __call__(self, host: str, family: int) -> str:
        with self.lock:
            self.calls.append((host, family))
        if not self.release.wait(timeout=5):
            raise ResolveError("test lookup never released")
        try:
            return self.table[(host, family)]
        except KeyError:
            raise ResolveError("Name or service not known") from None


class Dropping:
    """A getaddrinfo stand-in whose queries of ``family`` are lost (they fail once
    released, as the C library's timeout would end them); the other family answers
    ``address``, except for the names in ``failing``."""

    def __init__(self, family: int, address: str, failing: tuple[str, ...] = ()) -> None:
        self.family, self.address, self.failing = family, address, failing
        self.released = threading.Event()

    def __call__(self, host: str, family: int) -> str:
        if family == self.family:
            self.released.wait(timeout=10)
            raise ResolveError("Temporary failure in name resolution")
        if host in self.failing:
            raise ResolveError("Temporary failure in name resolution (SERVFAIL)")
        return self.address


async def test_identical_lookups_in_flight_share_one_call() -> None:
    lookups = Lookups({("a.test", socket.AF_INET): "192.0.2.7"})
    lookups.release.clear()
    resolver = Resolver(threads=2, getaddrinfo=lookups)
    tasks = [asyncio.create_task(resolver.lookup_all("a.test", socket.AF_INET))
             for _ in range(5)]
    await asyncio.sleep(0)
    lookups.release.set()
    results = await asyncio.gather(*tasks)
    found = ((socket.AF_INET, "192.0.2.7"),)
    assert results == [(found, False)] * 5
    assert lookups.calls == [("a.test", socket.AF_INET)]
    assert await resolver.lookup_all("a.test", socket.AF_INET) == (found, True)
    assert len(lookups.calls) == 1


async def test_failures_are_cached_briefly_with_their_reason() -> None:
    lookups = Lookups({})
    resolver = Resolver(getaddrinfo=lookups)
    for _ in range(3):
        with pytest.raises(ResolveError, match="Name or service not known"):
            await resolver.lookup_all("dead.test", socket.AF_INET)
    assert len(lookups.calls) == 1


async def test_failed_lookups_leave_no_reference_cycles() -> None:
    # The exporter runs the collector's oldest generation rarely (gc.freeze, high
    # thresholds): a cycle per name that did not resolve, kept by the failure cache until
    # it expired and old by then, grew the exporter by kilobytes a name under a flood.
    resolver = Resolver(getaddrinfo=Lookups({}))
    for i in range(5):  # the pool's threads and the loop's machinery, once
        with pytest.raises(ResolveError):
            await resolve(f"warm{i}.test", resolver=resolver)
    gc.collect()
    gc.disable()
    try:
        for i in range(20):
            with pytest.raises(ResolveError, match="Name or service not known"):
                await resolve(f"gone{i}.test", resolver=resolver)
        resolver._failures.expire(math.inf)  # as if their time were up
        assert gc.collect() == 0
    finally:
        gc.enable()


async def test_every_address_lookups_ask_each_family_once_coalesced_and_cached() -> None:
    lookups = Lookups({("dual.test", socket.AF_INET6): "2001:db8::7",
                       ("dual.test", socket.AF_INET): "192.0.2.7"})
    lookups.release.clear()
    resolver = Resolver(threads=2, getaddrinfo=lookups)
    tasks = [asyncio.create_task(resolve_all("dual.test", resolver)) for _ in range(3)]
    await asyncio.sleep(0)
    lookups.release.set()
    for found in await asyncio.gather(*tasks):
        assert [(r.address, r.family) for r in found] == [
            ("2001:db8::7", socket.AF_INET6), ("192.0.2.7", socket.AF_INET)]
    again = await resolve_all("dual.test", resolver)
    assert all(r.cached for r in again)
    assert sorted(lookups.calls) == sorted([("dual.test", socket.AF_INET6),
                                            ("dual.test", socket.AF_INET)])
    # A name with no address: the reasons, once, then from the brief negative cache.
    for _ in range(2):
        with pytest.raises(ResolveError, match="ip6: Name or service not known; ip4: "):
            await resolve_all("dead.test", resolver)
    assert len(lookups.calls) == 4


async def test_an_unanswered_family_does_not_hide_the_other_familys_answer() -> None:
    # getaddrinfo asked for both at once fails as a whole when one query is dropped; blackbox
    # (Go) keeps the answer of the family that came: so do the two lookups here.
    dropping = Dropping(socket.AF_INET, "2001:db8::8")
    released = dropping.released
    resolver = Resolver(getaddrinfo=dropping)
    try:
        # ip6 preferred: its answer is taken without waiting for the A query; without
        # fallback the A query is not even asked for (blackbox asks for one family only).
        got = await asyncio.wait_for(resolve("v6.test", "ip6", True, resolver), 2.0)
        assert got.address == "2001:db8::8"
        got = await asyncio.wait_for(resolve("v6.test", "ip6", False, resolver), 2.0)
        assert got.address == "2001:db8::8"
        found = await asyncio.wait_for(
            resolve_all("v6.test", resolver, family=socket.AF_INET6), 2.0)
        assert [r.address for r in found] == ["2001:db8::8"]
        released.set()  # now the A query fails
        # ip4 preferred falls back to the AAAA answer; every-address lookups keep it too.
        got = await resolve("v6.test", "ip4", True, resolver)
        assert (got.address, got.ip_protocol) == ("2001:db8::8", 6)
        assert [r.address for r in await resolve_all("v6.test", resolver)] == ["2001:db8::8"]
    finally:
        released.set()


async def test_a_preferred_answer_in_time_asks_nothing_of_the_other_family() -> None:
    # A resolver that drops AAAA queries held a thread for the C library's 10 s per
    # probe of such a name even when the A answer was cached: 16 such names starved every
    # other lookup. The other family is asked only when the preferred one has not
    # answered with an address within OTHER_FAMILY_AFTER.
    lookups = Lookups({("v4.test", socket.AF_INET): "192.0.2.4"})
    resolver = Resolver(getaddrinfo=lookups)
    for _ in range(2):  # from DNS, then from the cache
        got = await resolve("v4.test", "ip4", True, resolver)
        assert got.address == "192.0.2.4"
    assert lookups.calls == [("v4.test", socket.AF_INET)]
    # A preferred family that is slow (here: not answered within the delay) gets the other
    # asked too, and its answer is still taken when it comes first.
    lookups.table[("slow.test", socket.AF_INET)] = "192.0.2.9"
    lookups.table[("slow.test", socket.AF_INET6)] = "2001:db8::9"
    lookups.release.clear()
    asking = asyncio.create_task(resolve("slow.test", "ip4", True, resolver))
    # Past the delay both are asked (a poll with a deadline).
    deadline = asyncio.get_running_loop().time() + OTHER_FAMILY_AFTER + 2.0
    while ("slow.test", socket.AF_INET6) not in lookups.calls:
        assert asyncio.get_running_loop().time() < deadline, lookups.calls
        await asyncio.sleep(0.01)
    lookups.release.set()
    assert (await asking).address == "192.0.2.9"


async def test_every_address_keeps_the_answered_family_and_says_what_it_left_out() -> None:
    # all_addresses: one family answered, the other's query lost. The probe's whole
    # deadline went by and the name failed resolve, its answered addresses thrown away;
    # the other family now gets OTHER_FAMILY_GRACE more, and what is left out is logged.
    dropping = Dropping(socket.AF_INET, "2001:db8::8", failing=("servfail.test",))
    released = dropping.released
    resolver = Resolver(getaddrinfo=dropping)
    lines: list[str] = []
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        found = await asyncio.wait_for(resolve_all("v6.test", resolver, log=lines.append),
                                       OTHER_FAMILY_GRACE + 2.0)
        assert [r.address for r in found] == ["2001:db8::8"]
        assert loop.time() - started < OTHER_FAMILY_GRACE + 1.0
        assert lines == [f"resolve v6.test: ip4: no answer {OTHER_FAMILY_GRACE:g}s after the "
                         "other family's: any such addresses are not probed"]
    finally:
        released.set()
    lines.clear()
    resolver._all[("servfail.test", socket.AF_INET)] = ((socket.AF_INET, "192.0.2.1"),)
    found = await resolve_all("servfail.test", resolver, log=lines.append)
    assert [r.address for r in found] == ["192.0.2.1"]
    assert lines == ["resolve servfail.test: ip6: Temporary failure in name resolution "
                     "(SERVFAIL): any such addresses are not probed"]
    # A family the resolver says has no address (NODATA) is no news: not logged.
    lines.clear()
    resolver._all[("v4only.test", socket.AF_INET)] = ((socket.AF_INET, "192.0.2.2"),)
    resolver._failures[("v4only.test", socket.AF_INET6)] = ResolveError(
        "No address associated with hostname", no_address=True)
    found = await resolve_all("v4only.test", resolver, log=lines.append)
    assert [r.address for r in found] == ["192.0.2.2"] and lines == []


async def test_a_lost_preferred_query_does_not_hide_the_other_familys_answer() -> None:
    # The default preference (ip6) with a resolver that drops AAAA: the A answer came,
    # but the preferred lookup was awaited first, to the C library's timeout, and the
    # probe failed resolve. The preferred family now gets OTHER_FAMILY_GRACE more once
    # the other has answered.
    dropping = Dropping(socket.AF_INET6, "192.0.2.6")
    released = dropping.released
    resolver = Resolver(getaddrinfo=dropping)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        got = await asyncio.wait_for(resolve("half6.test", "ip6", True, resolver), 5.0)
        assert (got.address, got.ip_protocol) == ("192.0.2.6", 4)
        assert loop.time() - started < OTHER_FAMILY_AFTER + OTHER_FAMILY_GRACE + 1.0
    finally:
        released.set()


@pytest.mark.parametrize("preferred", ["ip4", "ip6"])
async def test_a_slow_preferred_answer_is_waited_for_when_the_other_family_has_none(
        preferred: str) -> None:
    # A cold cache: the preferred family answers after 0.6 s, the other says at once it
    # has no address (NODATA) or fails. Its failure must not end the wait for the
    # preferred answer (the name failed resolve after 0.25 s).
    family = FAMILIES[preferred]
    answer = "192.0.2.8" if family == socket.AF_INET else "2001:db8::8"

    def slow_preferred(host: str, asked: int) -> str:
        if asked != family:
            raise ResolveError("No address associated with hostname", no_address=True)
        threading.Event().wait(OTHER_FAMILY_AFTER + 0.35)  # the resolver's own slowness
        return answer

    got = await asyncio.wait_for(resolve("slow.test", preferred, True,
                                         Resolver(getaddrinfo=slow_preferred)), 5.0)
    assert got.address == answer


async def test_lost_queries_of_one_family_leave_the_others_threads_free() -> None:
    # Each family has threads of its own: lookups stuck on dropped AAAA queries (more
    # than there are threads) do not delay an A lookup.
    dropping = Dropping(socket.AF_INET6, "192.0.2.7")
    released = dropping.released
    resolver = Resolver(threads=4, getaddrinfo=dropping)
    stuck = [asyncio.create_task(resolver.lookup_all(f"half6-{i}.test", socket.AF_INET6))
             for i in range(6)]
    try:
        found, _ = await asyncio.wait_for(resolver.lookup_all("fast.test", socket.AF_INET), 2.0)
        assert found == ((socket.AF_INET, "192.0.2.7"),)
    finally:
        released.set()
        await asyncio.gather(*stuck, return_exceptions=True)


async def test_a_giving_up_caller_does_not_cancel_the_shared_lookup() -> None:
    lookups = Lookups({("slow.test", socket.AF_INET): "192.0.2.9"})
    lookups.release.clear()
    resolver = Resolver(getaddrinfo=lookups)
    impatient = asyncio.create_task(resolver.lookup_all("slow.test", socket.AF_INET))
    patient = asyncio.create_task(resolver.lookup_all("slow.test", socket.AF_INET))
    await asyncio.sleep(0)
    impatient.cancel()
    lookups.release.set()
    assert await patient == (((socket.AF_INET, "192.0.2.9"),), False)
    assert impatient.cancelled()


async def test_stuck_lookups_hold_only_the_resolvers_own_threads() -> None:
    lookups = Lookups({("hosts.test", socket.AF_INET): "192.0.2.1"})
    lookups.release.clear()
    resolver = Resolver(threads=2, getaddrinfo=lookups)
    stuck = [asyncio.create_task(resolver.lookup_all(f"stuck{i}.test", socket.AF_INET))
             for i in range(2)]
    await asyncio.sleep(0)
    # The event loop's default executor is untouched by the stuck lookups.
    loop = asyncio.get_running_loop()
    assert await asyncio.wait_for(loop.run_in_executor(None, lambda: 42), 2.0) == 42
    lookups.release.set()
    for task in stuck:
        with pytest.raises(ResolveError):
            await task


async def test_resolve_prefers_then_falls_back_and_says_why() -> None:
    lookups = Lookups({("v4only.test", socket.AF_INET): "192.0.2.4",
                       ("dual.test", socket.AF_INET): "192.0.2.5",
                       ("dual.test", socket.AF_INET6): "2001:db8::5"})
    resolver = Resolver(getaddrinfo=lookups)
    got = await resolve("v4only.test", "ip6", True, resolver)
    assert (got.address, got.ip_protocol) == ("192.0.2.4", 4)
    # Without fallback only the preferred family is asked for, as blackbox asks: the
    # other's answer, slow or lost, cannot hold the probe up.
    lookups.table[("fresh4.test", socket.AF_INET)] = "192.0.2.6"
    with pytest.raises(ResolveError, match="Name or service not known"):
        await resolve("fresh4.test", "ip6", False, resolver)
    assert [call for call in lookups.calls if call[0] == "fresh4.test"] == [
        ("fresh4.test", socket.AF_INET6)]
    for preferred, address in (("ip6", "2001:db8::5"), ("ip4", "192.0.2.5")):
        assert (await resolve("dual.test", preferred, False, resolver)).address == address
    with pytest.raises(ResolveError, match="Name or service not known"):
        await resolve("dead.test", "ip6", True, resolver)


async def test_a_mapped_ipv6_answer_is_ipv4_whatever_the_preference() -> None:
    # An AAAA of ::ffff:127.0.0.2 is reached over IPv4: a module that wants IPv6 only must
    # not probe it, and one that prefers IPv4 takes it first (blackbox: To4() != nil).
    lookups = Lookups({("mapped.test", socket.AF_INET6): "::ffff:127.0.0.2"})
    resolver = Resolver(getaddrinfo=lookups)
    with pytest.raises(ResolveError, match="no ip6 address"):
        await resolve("mapped.test", "ip6", False, resolver)
    got = await resolve("mapped.test", "ip4", True, resolver)
    assert (got.address, got.ip_protocol) == ("127.0.0.2", 4)
    with pytest.raises(ResolveError):  # ip4 only: only A is asked for, and there is none
        await resolve("mapped.test", "ip4", False, resolver)


async def test_the_fallback_is_the_last_address_of_the_other_family_as_in_blackbox() -> None:
    # blackbox's chooseProtocol keeps overwriting its fallback: the last one wins, and
    # probe_ip_addr_hash is meant to agree across exporters.
    resolver = Resolver(getaddrinfo=Lookups({}))
    resolver._all[("multi4.test", socket.AF_INET)] = (
        (socket.AF_INET, "127.0.0.2"), (socket.AF_INET, "127.0.0.3"), (socket.AF_INET, "127.0.0.5"))
    assert (await resolve("multi4.test", "ip6", True, resolver)).address == "127.0.0.5"
    assert (await resolve("multi4.test", "ip4", True, resolver)).address == "127.0.0.2"


def test_literals_are_used_as_given() -> None:
    got = literal("2001:db8::1")
    assert got is not None and got.ip_protocol == 6 and got.address == "2001:db8::1"
    assert literal("ntp.example") is None


async def test_names_in_the_hosts_file_never_wait_behind_dead_lookups(tmp_path: Path) -> None:
    hosts_path = tmp_path / "hosts"
    hosts_path.write_text("# comment\n192.0.2.5  ntp-local.test alias.test  # trailing\n"
                          "2001:db8::5 ntp-local.test\nnot-an-ip  broken.test\n")
    lookups = Lookups({})
    lookups.release.clear()  # every lookup that reaches the threads hangs
    resolver = Resolver(threads=2, getaddrinfo=lookups, hosts=HostsFile(str(hosts_path)))
    dead = [asyncio.create_task(resolver.lookup_all(f"dead{i}.test", socket.AF_INET))
            for i in range(8)]
    await asyncio.sleep(0)
    both = ((socket.AF_INET, "192.0.2.5"), (socket.AF_INET6, "2001:db8::5"))
    found = await asyncio.wait_for(resolve_all("NTP-Local.test.", resolver), 1.0)
    assert sorted((r.family, r.address) for r in found) == sorted(both)
    assert await resolver.lookup_all("alias.test", socket.AF_INET) == (
        ((socket.AF_INET, "192.0.2.5"),), False)
    assert not [call for call in lookups.calls if call[0] == "ntp-local.test"]
    lookups.release.set()
    for task in dead:
        with pytest.raises(ResolveError):
            await task


async def test_a_name_in_the_hosts_file_is_not_asked_of_dns_for_its_other_family(
        tmp_path: Path) -> None:
    # localhost with ip6 preferred: an IPv4-only hosts entry must not send the AAAA
    # question into a pool that a flood of dead names keeps busy.
    hosts_path = tmp_path / "hosts"
    hosts_path.write_text("127.0.0.1 v4only.test\n")
    lookups = Lookups({})
    resolver = Resolver(getaddrinfo=lookups, hosts=HostsFile(str(hosts_path)))
    got = await resolve("v4only.test", "ip6", True, resolver)
    assert (got.address, got.ip_protocol) == ("127.0.0.1", 4)
    with pytest.raises(ResolveError, match="the hosts file lists no address of that family"):
        await resolve("v4only.test", "ip6", False, resolver)
    assert lookups.calls == []


async def test_a_queued_lookup_nobody_waits_for_is_dropped_before_it_runs() -> None:
    lookups = Lookups({("after.test", socket.AF_INET): "192.0.2.8"})
    lookups.release.clear()
    resolver = Resolver(threads=1, getaddrinfo=lookups)
    stuck = asyncio.create_task(resolver.lookup_all("stuck.test", socket.AF_INET))
    abandoned = asyncio.create_task(resolver.lookup_all("abandoned.test", socket.AF_INET))
    await asyncio.sleep(0)
    abandoned.cancel()  # its probe gave up while the lookup waited for the one thread
    with pytest.raises(asyncio.CancelledError):
        await abandoned
    lookups.release.set()
    with pytest.raises(ResolveError):
        await stuck
    # The pool runs in order: once this one is answered, the abandoned one was passed over.
    assert await resolver.lookup_all("after.test", socket.AF_INET) == (
        ((socket.AF_INET, "192.0.2.8"),), False)
    assert [host for host, _ in lookups.calls] == ["stuck.test", "after.test"]


def test_the_hosts_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    hosts_path = tmp_path / "hosts"
    hosts_path.write_text("192.0.2.1 a.test\n")
    hosts = HostsFile(str(hosts_path))
    assert hosts.lookup_all("a.test") == ((socket.AF_INET, "192.0.2.1"),)
    hosts_path.write_text("192.0.2.22 a.test\n")
    hosts._checked = -10.0  # the next lookup looks at the file again
    assert hosts.lookup_all("a.test") == ((socket.AF_INET, "192.0.2.22"),)


async def test_hosts_file_addresses_without_a_route_come_last(tmp_path: Path) -> None:
    # As getaddrinfo sorts them (RFC 6724, rule 1): a name whose first listed address
    # cannot be reached (here the broadcast address, which no plain socket may connect
    # to) is probed at its next one, the one blackbox and the C library pick.
    hosts_path = tmp_path / "hosts"
    hosts_path.write_text("255.255.255.255 multi.test\n127.0.0.2 multi.test\n"
                          "127.0.0.3 multi.test\n")
    resolver = Resolver(getaddrinfo=Lookups({}), hosts=HostsFile(str(hosts_path)))
    found, _ = await resolver.lookup_all("multi.test", socket.AF_INET)
    assert [a for _, a in found] == ["127.0.0.2", "127.0.0.3", "255.255.255.255"]
    assert (await resolve("multi.test", "ip4", resolver=resolver)).address == "127.0.0.2"


def test_the_hosts_file_reads_mapped_ipv4_as_ipv4_and_no_zones(tmp_path: Path) -> None:
    # Replies come from 127.0.0.1 (or ::ffff:127.0.0.1), never from "::ffff:7f00:1"; and
    # a zone in the file would bypass the canonical spelling of targets.
    hosts_path = tmp_path / "hosts"
    hosts_path.write_text("::ffff:127.0.0.1 mapped.test\nfe80::1%lo zoned.test\n")
    hosts = HostsFile(str(hosts_path))
    assert hosts.lookup_all("mapped.test") == ((socket.AF_INET, "127.0.0.1"),)
    assert hosts.lookup_all("zoned.test") == ()


async def test_a_caller_arriving_as_the_last_one_gives_up_gets_its_own_lookup() -> None:
    lookups = Lookups({("good.test", socket.AF_INET): "192.0.2.8"})
    lookups.release.clear()
    resolver = Resolver(threads=1, getaddrinfo=lookups)
    stuck = asyncio.create_task(resolver.lookup_all("stuck.test", socket.AF_INET))
    leaving = asyncio.create_task(resolver.lookup_all("good.test", socket.AF_INET))
    await asyncio.sleep(0)
    leaving.cancel()
    # Runs right after the leaver drops the queued lookup, before the pool's cancellation
    # comes back to the loop: it must not join the dropped lookup.
    staying = asyncio.create_task(resolver.lookup_all("good.test", socket.AF_INET))
    with pytest.raises(asyncio.CancelledError):
        await leaving
    lookups.release.set()
    assert await staying == (((socket.AF_INET, "192.0.2.8"),), False)
    with pytest.raises(ResolveError):
        await stuck


async def test_an_ipv4_mapped_answer_is_ipv4() -> None:
    lookups = Lookups({("mapped.test", socket.AF_INET6): "::ffff:192.0.2.9",
                       ("mapped.test", socket.AF_INET): "192.0.2.9"})
    resolver = Resolver(getaddrinfo=lookups)
    got = await resolve("mapped.test", "ip6", True, resolver)
    assert (got.address, got.family) == ("192.0.2.9", socket.AF_INET)
    assert [(r.address, r.family) for r in await resolve_all("mapped.test", resolver)] == [
        ("192.0.2.9", socket.AF_INET)]


async def test_a_literal_of_the_other_family_without_fallback_is_no_address() -> None:
    # As blackbox: an NTS key exchange's server record, resolved here, obeys the module too.
    for host, preferred in (("127.0.0.1", "ip6"), ("::1", "ip4"), ("::ffff:127.0.0.1", "ip6")):
        with pytest.raises(ResolveError) as exc:
            await resolve(host, preferred, fallback=False)
        assert exc.value.no_address and "ip_protocol_fallback is off" in str(exc.value)
        assert (await resolve(host, preferred, fallback=True)).address == host.removeprefix(
            "::ffff:")


def test_addresses_stay_as_found_when_no_socket_can_ask_the_routing_table() -> None:
    # Out of descriptors, the order cannot be judged: the name still resolves.
    script = (
        "import os, resource, socket\n"
        "from ntp_probe.net.resolve import _rfc6724_sorted\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))\n"
        "held = []\n"
        "try:\n"
        "    while True:\n"
        "        held.append(os.open('/dev/null', os.O_RDONLY))\n"
        "except OSError:\n"
        "    pass\n"
        "found = ((socket.AF_INET, '255.255.255.255'), (socket.AF_INET, '127.0.0.7'))\n"
        "print(_rfc6724_sorted(found) == found)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=30, check=False, cwd=ROOT, env={**os.environ,
                                                                  "PYTHONPATH": str(ROOT)})
    assert done.stdout.strip() == "True", done.stderr
