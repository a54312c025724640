"""ntp.all_addresses: every address of a name probed, each with its own burst.

The name's addresses come from a hosts file the test writes, read by a resolver the test
installs: a made-up name never reaches the machine's resolver.
"""

from __future__ import annotations

from typing import Any

import pytest

from ntp_probe.cli import check, report
from ntp_probe.engine.result import NO_TIME
from ntp_probe.engine.targets import Target
from ntp_probe.safety.guard import Guard
from ntp_probe.safety.kod import KodTable
from ntp_probe.safety.policy import TargetPolicy, parse_rules
from tests.behaviour import fake_server
from tests.behaviour.fake_server import FakeNTPServer, Send, answer, kod
from tests.conftest import Hosts, label_sets, make_module, probe, value

fake_ntp = fake_server.fake_ntp


async def test_every_address_is_probed_and_any_one_will_do(
    hosts: Hosts, fake_ntp: FakeNTPServer
) -> None:
    # 127.0.0.1 answers; nothing listens on 127.0.0.2 or ::1 at that port.
    hosts("127.0.0.1 multi.test\n127.0.0.2 multi.test\n::1 multi.test\n")
    module = make_module(all_addresses=True, addresses_required="any")
    result, log = await probe(Target("multi.test", fake_ntp.port), module)
    assert result.success, (result.failure, log.text())
    up = {labels["address"]: value(result, "probe_ntp_address_up", **labels)
          for labels in label_sets(result, "probe_ntp_address_up")}
    assert up == {"127.0.0.1": 1, "127.0.0.2": 0, "::1": 0}
    # The preferred family (ip4 here) comes first.
    assert label_sets(result, "probe_ntp_address_up")[2] == {"address": "::1",
                                                             "ip_protocol": "6"}
    failures = label_sets(result, "probe_ntp_address_failure_info")
    assert {(f["address"], f["reason"]) for f in failures} == {
        ("127.0.0.2", "unreachable"), ("::1", "unreachable")}
    # The unlabelled series describe the address that succeeded.
    assert value(result, "probe_ntp_offset_seconds") == value(
        result, "probe_ntp_address_offset_seconds", address="127.0.0.1", ip_protocol="4")
    assert value(result, "probe_ip_protocol") == 4
    assert result.packets_sent == 3
    assert "[127.0.0.2] sample 1: ICMP port unreachable" in log.text()
    # The answered sample's line is formatted late, when the log is read, still marked.
    assert "[127.0.0.1] sample 1: T1=" in log.text()
    await fake_ntp.drain()
    assert len(fake_ntp.requests) == 1


async def test_all_addresses_required_fails_on_one_dead_address(
    hosts: Hosts, fake_ntp: FakeNTPServer
) -> None:
    hosts("127.0.0.1 multi.test\n127.0.0.2 multi.test\n")
    result, log = await probe(Target("multi.test", fake_ntp.port),
                              make_module(all_addresses=True))
    assert result.failure == "unreachable", log.text()
    # The name's verdict says which address, in the system's words (check's line).
    assert result.failure_detail == (
        "127.0.0.2: ICMP port unreachable: nothing listens on the target port")
    assert value(result, "probe_ntp_address_up", address="127.0.0.1", ip_protocol="4") == 1
    assert "1 of 2 addresses succeeded (addresses_required: all)" in log.text()
    # The CLI's reports say why each address failed, not only that it gave no answer.
    addresses = next(r for r in result.reports if r.title == "all_addresses")
    assert ("127.0.0.2", "no usable answer (unreachable)") in addresses.rows()
    assert {"address": "127.0.0.2", "offset_seconds": None, "failure_reason": "unreachable"} \
        in addresses.to_json()["addresses"]


@pytest.mark.parametrize(("required", "judged"), [("all", 5.0), ("any", 0.0)])
async def test_the_check_judges_the_farthest_address_when_all_are_required(
    hosts: Hosts, fake_ntp: FakeNTPServer, required: str, judged: float
) -> None:
    # 127.0.0.2 runs 5 s ahead; 127.0.0.1, with the smaller root distance, is the best.
    skewed = await FakeNTPServer.start(answer(offset=5.0, root_dispersion=0.01),
                                       host="127.0.0.2", port=fake_ntp.port)
    try:
        fake_ntp.behaviour = answer(root_dispersion=0.0001)
        hosts("127.0.0.1 skew.test\n127.0.0.2 skew.test\n")
        module = make_module(all_addresses=True, addresses_required=required)
        result, log = await probe(Target("skew.test", fake_ntp.port), module)
    finally:
        skewed.close()
    assert result.success, log.text()
    code, line = check.evaluate("skew.test", module, result, check.Range.upto(0.01),
                                check.Range.upto(0.05))
    assert code == (2 if judged else 0), line
    offset = float(line.split(" offset ")[1].split()[0])
    assert offset == pytest.approx(judged, abs=0.005)
    assert "addresses=2 addresses_answered=2" in line
    # -o -5 (the name's servers known to run 5 s ahead): judged after adding it, the
    # address farthest off is now the other one, 5 s off either way.
    code, line = check.evaluate("skew.test", module, result, check.Range.upto(0.01),
                                check.Range.upto(0.05), expected=-5.0)
    assert code == 2, line
    assert float(line.split(" offset ")[1].split()[0]) == pytest.approx(0.0, abs=0.005)
    if required == "all":
        worst = float(line.split("worst_offset=")[1].split("s;")[0])
        assert worst == pytest.approx(-5.0, abs=0.005), line
    # The text report's headline still names the best address and its offset.
    headline = report.text("skew.test", "t", result, log).splitlines()[0]
    assert "server 127.0.0.1 port" in headline, headline


@pytest.mark.parametrize("required", ["any", "all"])
async def test_a_kiss_of_death_from_any_address_is_reported(
    hosts: Hosts, fake_ntp: FakeNTPServer, required: str
) -> None:
    # 127.0.0.1 answers well and is the address the unlabelled series describe; 127.0.0.2
    # says DENY. That is news for the probe (the NTPKissOfDeath alert reads the code).
    deny = await FakeNTPServer.start(lambda req: [Send(kod(req, b"DENY"))], host="127.0.0.2",
                                     port=fake_ntp.port)
    guard = Guard(kod=KodTable())
    hosts("127.0.0.1 kod.test\n127.0.0.2 kod.test\n")
    module = make_module(all_addresses=True, addresses_required=required)
    try:
        for _ in range(2):  # the KoD, then the backoff from it
            result, log = await probe(Target("kod.test", fake_ntp.port), module, guard=guard)
            assert result.success == (required == "any"), log.text()
            assert value(result, "probe_ntp_kiss_code_info", code="DENY") == 1, log.text()
            assert value(result, "probe_ntp_backoff_remaining_seconds") == pytest.approx(
                86400, abs=5)
            assert value(result, "probe_ntp_stratum") == 2  # still 127.0.0.1's values
    finally:
        deny.close()
    assert result.failure == (None if required == "any" else "backoff")
    assert len(deny.requests) == 1


@pytest.mark.parametrize("required", ["any", "all"])
async def test_an_address_backed_off_does_not_hide_a_silent_one(
    hosts: Hosts, fake_ntp: FakeNTPServer, required: str
) -> None:
    # 127.0.0.2 says DENY, then is backed off from for a day; 127.0.0.1 does not answer.
    # Nothing answers: the name's verdict is the silent address's timeout (which pages as
    # unreachable), not the backoff of the one nothing is sent to.
    fake_ntp.behaviour = lambda req: []
    deny = await FakeNTPServer.start(lambda req: [Send(kod(req, b"DENY"))], host="127.0.0.2",
                                     port=fake_ntp.port)
    guard = Guard(kod=KodTable())
    hosts("127.0.0.1 dual.test\n127.0.0.2 dual.test\n")
    module = make_module(all_addresses=True, addresses_required=required,
                         timeout=0.5, reply_timeout=0.2)
    try:
        for _ in range(2):  # the KoD, then the backoff from it
            result, log = await probe(Target("dual.test", fake_ntp.port), module, guard=guard)
            assert value(result, "probe_ntp_kiss_code_info", code="DENY") == 1, log.text()
    finally:
        deny.close()
    assert len(deny.requests) == 1
    assert result.failure == "timeout", log.text()
    assert result.failure_detail == "at 127.0.0.1"


async def test_with_no_address_succeeding_an_answering_one_is_described(
    hosts: Hosts, fake_ntp: FakeNTPServer
) -> None:
    # 127.0.0.1 is silent; 127.0.0.2 answers, unsynchronised: its values say why.
    fake_ntp.behaviour = lambda req: []
    unsynced = await FakeNTPServer.start(answer(stratum=16, leap=3), host="127.0.0.2",
                                         port=fake_ntp.port)
    hosts("127.0.0.1 half.test\n127.0.0.2 half.test\n")
    try:
        result, log = await probe(Target("half.test", fake_ntp.port),
                                  make_module(all_addresses=True, reply_timeout=0.3))
    finally:
        unsynced.close()
    assert result.failure == "timeout", log.text()
    assert value(result, "probe_ntp_stratum") == 16, log.text()
    assert value(result, "probe_ntp_samples_received") == 1


async def test_max_addresses_bounds_the_fan_out(hosts: Hosts,
                                                fake_ntp: FakeNTPServer) -> None:
    hosts("".join(f"127.0.0.{i} many.test\n" for i in range(1, 11)))
    module = make_module(all_addresses=True, max_addresses=3, addresses_required="any")
    result, log = await probe(Target("many.test", fake_ntp.port), module)
    assert len(label_sets(result, "probe_ntp_address_up")) == 3
    assert "has 10 addresses: probing the first 3" in log.text()


async def test_each_address_passes_the_policy(hosts: Hosts,
                                              fake_ntp: FakeNTPServer) -> None:
    hosts("127.0.0.1 multi.test\n127.0.0.2 multi.test\n")
    policy = TargetPolicy(denied=parse_rules(["127.0.0.2"], "denied_targets"))
    result, log = await probe(Target("multi.test", fake_ntp.port),
                              make_module(all_addresses=True, addresses_required="any"),
                              guard=Guard(policies=(policy,)))
    assert value(result, "probe_ntp_address_failure_info", address="127.0.0.2",
                 reason="target_forbidden") == 1
    assert result.packets_sent == 1, log.text()


async def test_max_addresses_keeps_the_preferred_family(hosts: Hosts,
                                                        fake_ntp: FakeNTPServer) -> None:
    hosts("".join(f"127.0.0.{i} mixed.test\n" for i in range(1, 4)) + "::1 mixed.test\n")
    module = make_module(all_addresses=True, max_addresses=2, addresses_required="any",
                         preferred_ip_protocol="ip6")
    result, log = await probe(Target("mixed.test", fake_ntp.port), module)
    assert [s["address"] for s in label_sets(result, "probe_ntp_address_up")] == [
        "::1", "127.0.0.1"], log.text()
    assert "probing the first 2 (ip6 first; max_addresses)" in log.text()


async def test_without_fallback_only_the_preferred_family_is_probed(
    hosts: Hosts, fake_ntp: FakeNTPServer
) -> None:
    hosts("127.0.0.1 mixed.test\n::1 mixed.test\n127.0.0.2 mixed.test\n::1 six.test\n")
    module = make_module(all_addresses=True, preferred_ip_protocol="ip4",
                         ip_protocol_fallback=False)
    result, log = await probe(Target("mixed.test", fake_ntp.port), module)
    assert [s["address"] for s in label_sets(result, "probe_ntp_address_up")] == [
        "127.0.0.1", "127.0.0.2"], log.text()
    # A name with no address of the preferred family then fails to resolve.
    result, log = await probe(Target("six.test", fake_ntp.port), module)
    assert result.failure == "resolve", log.text()
    assert "the hosts file lists no address of that family" in log.text()
    assert result.packets_sent == 0
    assert (value(result, "probe_ip_protocol"), value(result, "probe_ip_addr_hash")) == (0, 0)


@pytest.mark.parametrize("all_addresses", [False, True])
async def test_a_failed_resolution_reads_ip_protocol_and_hash_0_as_blackbox(
    hosts: Hosts, fake_ntp: FakeNTPServer, all_addresses: bool
) -> None:
    hosts("::1 six.test\n")
    for target, module in (
            ("nothere.test", make_module(all_addresses=all_addresses)),
            ("six.test", make_module(all_addresses=all_addresses, preferred_ip_protocol="ip4",
                                     ip_protocol_fallback=False))):
        result, log = await probe(Target(target, fake_ntp.port), module)
        assert result.failure == "resolve", log.text()
        assert value(result, "probe_ip_protocol") == 0
        assert value(result, "probe_ip_addr_hash") == 0


@pytest.mark.parametrize(("reply_timeout", "timeout"), [
    (0.5, 0.3),
    # 10 ms replies: 25 ms left for the lookup is room for one, so a lookup that did not
    # answer in it is the name's failure, as with any budget (not local_error).
    (0.01, 0.03),
])
async def test_a_lookup_that_runs_out_of_time_says_so(
        stuck_resolver: list[str], reply_timeout: float, timeout: float) -> None:
    result, log = await probe(Target("stuck.test", 123),
                              make_module(reply_timeout=reply_timeout), timeout=timeout)
    assert result.failure == "resolve", log.text()
    assert "resolve stuck.test: timed out" in log.text()


@pytest.mark.parametrize("all_addresses", [False, True])
@pytest.mark.parametrize("timeout", [
    0.004,  # less than the margin kept for the verdict: not even looked up
    0.02,  # looked up, but even an instant answer would leave no room for a request
])
async def test_a_lookup_with_no_time_for_a_request_after_it_is_no_resolve_failure(
    stuck_resolver: list[str], all_addresses: bool, timeout: float,
) -> None:
    # A scrape-timeout header of a few milliseconds: the name is not to blame, nor the
    # server; an IP target with that budget reads local_error too.
    result, log = await probe(Target("stuck.test", 123),
                              make_module(all_addresses=all_addresses), timeout=timeout)
    assert result.failure == "local_error", log.text()
    assert result.failure_detail == NO_TIME
    assert "no time left to look it up and send a request: nothing sent" in log.text()
    assert value(result, "probe_ip_addr_hash") == 0
    if timeout < 0.005:
        assert stuck_resolver == []  # no lookup started


@pytest.mark.parametrize(("lines", "silent_at", "answering", "preferred", "quiet_state"), [
    # One address answered (unsynchronised), another is silent: check_ntp_time says "No
    # response" (CRITICAL even under -q) only when no address answered: -q spares it.
    ("127.0.0.1 mixed.test\n127.0.0.2 mixed.test\n", "127.0.0.2", answer(leap=3), "ip4", 3),
    # fe80::1 (no interface: local_error, nothing sent) beside a silent ::1: the name's
    # verdict is the address probed, timeout, and -q keeps it CRITICAL.
    ("fe80::1 mixed.test\n::1 mixed.test\n", "::1", fake_server.silent, "ip6", 2),
])
async def test_a_quiet_check_of_a_name_judges_the_addresses_probed(
    hosts: Hosts, fake_ntp: FakeNTPServer, lines: str, silent_at: str, answering: Any,
    preferred: str, quiet_state: int,
) -> None:
    silent = await FakeNTPServer.start(fake_server.silent, host=silent_at, port=fake_ntp.port)
    try:
        fake_ntp.behaviour = answering
        hosts(lines)
        module = make_module(all_addresses=True, preferred_ip_protocol=preferred,
                             reply_timeout=0.2)
        result, log = await probe(Target("mixed.test", fake_ntp.port), module)
    finally:
        silent.close()
    assert result.failure == "timeout", log.text()
    args = (check.Range.upto(0.01), check.Range.upto(0.05))
    assert check.evaluate("mixed.test", module, result, *args, quiet=True)[0] == quiet_state
    assert check.evaluate("mixed.test", module, result, *args)[0] == 2


@pytest.mark.parametrize("all_addresses", [False, True])
@pytest.mark.parametrize(("target", "preferred"), [
    ("127.0.0.1", "ip6"), ("::1", "ip4"), ("::ffff:127.0.0.1", "ip6")])
async def test_without_fallback_a_literal_of_the_other_family_fails_as_in_blackbox(
        fake_ntp: FakeNTPServer, all_addresses: bool, target: str, preferred: str) -> None:
    # blackbox: "unable to find ip; no fallback", ip_protocol and hash 0; nothing sent.
    module = make_module(all_addresses=all_addresses, preferred_ip_protocol=preferred,
                         ip_protocol_fallback=False)
    result, log = await probe(Target(target, fake_ntp.port), module)
    assert result.failure == "resolve", log.text()
    assert f"is not an {preferred} address, and ip_protocol_fallback is off" in (
        result.failure_detail or "")
    assert value(result, "probe_ip_protocol") == 0
    assert value(result, "probe_ip_addr_hash") == 0
    await fake_ntp.drain()
    assert fake_ntp.requests == []


@pytest.mark.parametrize("all_addresses", [False, True])
async def test_a_link_local_target_without_its_interface_is_a_local_error(
        all_addresses: bool) -> None:
    # The kernel would send it out of whichever interface's route comes first; a silence
    # there would read timeout, blaming the server for the target's missing zone.
    module = make_module(all_addresses=all_addresses, preferred_ip_protocol="ip6")
    result, log = await probe(Target("fe80::1", 123), module)
    assert result.failure == "local_error", log.text()
    assert (result.failure_detail or "").endswith(  # all_addresses names the address first
        "the link-local address fe80::1 needs its interface (fe80::1%eth0): nothing sent")
    assert result.packets_sent == 0
