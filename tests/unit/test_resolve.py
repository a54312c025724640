"""net.resolve: bounded threads, coalesced lookups, brief negative caching, reasons.

The lookup function is replaced by one the test controls: a made-up name must never
reach the machine's resolver.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from pathlib import Path

import pytest

from ntp_probe.net.resolve import HostsFile, ResolveError, Resolver, literal, resolve, resolve_all


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


async def test_identical_lookups_in_flight_share_one_call() -> None:
    lookups = Lookups({("a.test", socket.AF_INET): "192.0.2.7"})
    lookups.release.clear()
    resolver = Resolver(threads=2, getaddrinfo=lookups)
    tasks = [asyncio.create_task(resolver.lookup("a.test", socket.AF_INET)) for _ in range(5)]
    await asyncio.sleep(0)
    lookups.release.set()
    results = await asyncio.gather(*tasks)
    assert results == [("192.0.2.7", False)] * 5
    assert lookups.calls == [("a.test", socket.AF_INET)]
    assert await resolver.lookup("a.test", socket.AF_INET) == ("192.0.2.7", True)
    assert len(lookups.calls) == 1


async def test_failures_are_cached_briefly_with_their_reason() -> None:
    lookups = Lookups({})
    resolver = Resolver(getaddrinfo=lookups)
    for _ in range(3):
        with pytest.raises(ResolveError, match="Name or service not known"):
            await resolver.lookup("dead.test", socket.AF_INET)
    assert len(lookups.calls) == 1


async def test_every_address_lookups_use_the_same_lookup_coalesced_and_cached() -> None:
    lookups = Lookups({("dual.test", socket.AF_INET6): "2001:db8::7",
                       ("dual.test", socket.AF_INET): "192.0.2.7"})
    lookups.release.clear()
    resolver = Resolver(threads=2, getaddrinfo=lookups)
    tasks = [asyncio.create_task(resolver.lookup_all("dual.test")) for _ in range(3)]
    await asyncio.sleep(0)
    lookups.release.set()
    want = ((socket.AF_INET6, "2001:db8::7"), (socket.AF_INET, "192.0.2.7"))
    assert await asyncio.gather(*tasks) == [want] * 3
    assert await resolver.lookup_all("dual.test") == want
    assert lookups.calls == [("dual.test", socket.AF_INET6), ("dual.test", socket.AF_INET)]
    # A name with no address: the reason, once, then from the brief negative cache.
    for _ in range(2):
        with pytest.raises(ResolveError, match="Name or service not known"):
            await resolver.lookup_all("dead.test")
    assert len(lookups.calls) == 4


async def test_a_giving_up_caller_does_not_cancel_the_shared_lookup() -> None:
    lookups = Lookups({("slow.test", socket.AF_INET): "192.0.2.9"})
    lookups.release.clear()
    resolver = Resolver(getaddrinfo=lookups)
    impatient = asyncio.create_task(resolver.lookup("slow.test", socket.AF_INET))
    patient = asyncio.create_task(resolver.lookup("slow.test", socket.AF_INET))
    await asyncio.sleep(0)
    impatient.cancel()
    lookups.release.set()
    assert await patient == ("192.0.2.9", False)
    assert impatient.cancelled()


async def test_stuck_lookups_hold_only_the_resolvers_own_threads() -> None:
    lookups = Lookups({("hosts.test", socket.AF_INET): "192.0.2.1"})
    lookups.release.clear()
    resolver = Resolver(threads=2, getaddrinfo=lookups)
    stuck = [asyncio.create_task(resolver.lookup(f"stuck{i}.test", socket.AF_INET))
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
    lookups = Lookups({("v4only.test", socket.AF_INET): "192.0.2.4"})
    resolver = Resolver(getaddrinfo=lookups)
    got = await resolve("v4only.test", "ip6", True, resolver)
    assert (got.address, got.ip_protocol) == ("192.0.2.4", 4)
    with pytest.raises(ResolveError) as caught:
        await resolve("v4only.test", "ip6", False, resolver)
    assert "ip6: Name or service not known" in str(caught.value)


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
    dead = [asyncio.create_task(resolver.lookup(f"dead{i}.test", socket.AF_INET))
            for i in range(8)]
    await asyncio.sleep(0)
    assert await asyncio.wait_for(resolver.lookup("NTP-Local.test.", socket.AF_INET), 1.0) == (
        "192.0.2.5", False)
    assert await resolver.lookup("alias.test", socket.AF_INET) == ("192.0.2.5", False)
    assert await resolver.lookup("ntp-local.test", socket.AF_INET6) == ("2001:db8::5", False)
    assert ("ntp-local.test", socket.AF_INET) not in lookups.calls
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
    with pytest.raises(ResolveError, match="hosts file lists no address of that family"):
        await resolve("v4only.test", "ip6", False, resolver)
    assert lookups.calls == []


async def test_a_queued_lookup_nobody_waits_for_is_dropped_before_it_runs() -> None:
    lookups = Lookups({("after.test", socket.AF_INET): "192.0.2.8"})
    lookups.release.clear()
    resolver = Resolver(threads=1, getaddrinfo=lookups)
    stuck = asyncio.create_task(resolver.lookup("stuck.test", socket.AF_INET))
    abandoned = asyncio.create_task(resolver.lookup("abandoned.test", socket.AF_INET))
    await asyncio.sleep(0)
    abandoned.cancel()  # its probe gave up while the lookup waited for the one thread
    with pytest.raises(asyncio.CancelledError):
        await abandoned
    lookups.release.set()
    with pytest.raises(ResolveError):
        await stuck
    # The pool runs in order: once this one is answered, the abandoned one was passed over.
    assert await resolver.lookup("after.test", socket.AF_INET) == ("192.0.2.8", False)
    assert [host for host, _ in lookups.calls] == ["stuck.test", "after.test"]


def test_the_hosts_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    hosts_path = tmp_path / "hosts"
    hosts_path.write_text("192.0.2.1 a.test\n")
    hosts = HostsFile(str(hosts_path))
    assert hosts.lookup("a.test", socket.AF_INET) == "192.0.2.1"
    hosts_path.write_text("192.0.2.22 a.test\n")
    hosts._checked = -10.0  # the next lookup looks at the file again
    assert hosts.lookup("a.test", socket.AF_INET) == "192.0.2.22"
    assert hosts.lookup("a.test", socket.AF_INET6) is None


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
    stuck = asyncio.create_task(resolver.lookup("stuck.test", socket.AF_INET))
    leaving = asyncio.create_task(resolver.lookup("good.test", socket.AF_INET))
    await asyncio.sleep(0)
    leaving.cancel()
    # Runs right after the leaver drops the queued lookup, before the pool's cancellation
    # comes back to the loop: it must not join the dropped lookup.
    staying = asyncio.create_task(resolver.lookup("good.test", socket.AF_INET))
    with pytest.raises(asyncio.CancelledError):
        await leaving
    lookups.release.set()
    assert await staying == ("192.0.2.8", False)
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
