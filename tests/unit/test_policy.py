"""Target policy: rule parsing, name/address checks, DNS-rebinding defence, config keys."""

from __future__ import annotations

import ipaddress
import re

import pytest
import yaml

from ntp_probe.config.load import config_to_yaml, parse_config
from ntp_probe.config.schema import ConfigError
from ntp_probe.safety.policy import (
    SAFE_DENIED,
    PolicyError,
    TargetPolicy,
    first_refusal,
    not_unicast,
    parse_rules,
)


def policy(allowed: tuple[str, ...] = (), denied: tuple[str, ...] = ()) -> TargetPolicy:
    return TargetPolicy(
        allowed=parse_rules(allowed, "allowed_targets"),
        denied=parse_rules(denied, "denied_targets"),
    )


# --- parse_rules ------------------------------------------------------------------------


def test_parse_rules_kinds() -> None:
    rules = parse_rules(
        ["10.0.0.0/8", "192.0.2.7", "2001:DB8::/32", "NTP.Example.Net.", "*.Example.ORG"], "k"
    )
    assert rules.networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.0.2.7/32"),
        ipaddress.ip_network("2001:db8::/32"),
    )
    assert rules.names == frozenset({"ntp.example.net"})
    assert rules.suffixes == (".example.org",)
    assert len(rules.source) == 5
    assert rules


def test_parse_rules_single_ipv6_address_is_a_host_network() -> None:
    rules = parse_rules(["2001:db8::1"], "k")
    assert rules.networks == (ipaddress.ip_network("2001:db8::1/128"),)
    assert rules.match_address("2001:db8::1")
    assert not rules.match_address("2001:db8::2")


def test_parse_rules_host_bits_are_tolerated() -> None:
    assert parse_rules(["10.1.2.3/8"], "k").networks == (ipaddress.ip_network("10.0.0.0/8"),)


def test_empty_rules_are_falsy() -> None:
    assert not parse_rules([], "k")
    assert not TargetPolicy().allowed


@pytest.mark.parametrize(
    ("items", "index"),
    [
        (["10.0.0.0/8", "10.0.0.0/33"], 1),
        (["not a host"], 0),
        (["ok.example", 5], 1),
        ([""], 0),
        (["   "], 0),
        (["*"], 0),
        (["*."], 0),
        (["*.bad domain"], 0),
        (["a..b"], 0),
        (["x" * 64 + ".example"], 0),
        ([None], 0),
    ],
)
def test_parse_rules_bad_entry_names_key_and_index(items: list[object], index: int) -> None:
    with pytest.raises(PolicyError) as exc:
        parse_rules(items, "modules.m.denied_targets")
    assert str(exc.value).startswith(f"modules.m.denied_targets[{index}]")


def test_policy_error_is_a_value_error() -> None:
    assert issubclass(PolicyError, ValueError)


# --- denied -----------------------------------------------------------------------------


def test_denied_cidr_refuses_ip_literal() -> None:
    p = policy(denied=("10.0.0.0/8",))
    assert p.check_name("10.1.2.3") is not None
    assert p.check_address("10.1.2.3", "10.1.2.3") is not None
    assert p.check_name("192.0.2.1") is None
    assert p.check_address("192.0.2.1", "192.0.2.1") is None


def test_denied_cidr_refuses_name_resolving_into_it() -> None:
    """DNS rebinding: an innocent-looking name that resolves into a denied network."""
    p = policy(denied=("127.0.0.0/8",))
    assert p.check_name("ntp.example.net") is None  # cannot tell before resolving
    why = p.check_address("ntp.example.net", "127.0.0.53")
    assert why is not None and "denied_targets" in why
    assert p.check_address("ntp.example.net", "192.0.2.1") is None


def test_denied_ipv6_cidr() -> None:
    p = policy(denied=("fc00::/7",))
    assert p.check_name("fd12::1") is not None
    assert p.check_address("h.example", "fd12:3456::1") is not None
    assert p.check_address("h.example", "2001:db8::1") is None


def test_ipv4_mapped_ipv6_matches_ipv4_cidr() -> None:
    p = policy(denied=("10.0.0.0/8",))
    assert p.check_name("::ffff:10.0.0.1") is not None
    assert p.check_address("h.example", "::ffff:10.0.0.1") is not None
    assert p.check_address("h.example", "::ffff:192.0.2.1") is None
    allow = policy(allowed=("192.0.2.0/24",))
    assert allow.check_address("h.example", "::ffff:192.0.2.9") is None
    assert allow.check_address("h.example", "::ffff:198.51.100.1") is not None


@pytest.mark.parametrize("address", [
    "64:ff9b::10.0.0.1",  # NAT64, well-known prefix (RFC 6052)
    "::ffff:0:10.0.0.1",  # IPv4-translated (RFC 2765)
    "::10.0.0.1",  # IPv4-compatible (deprecated)
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "2001:0:4136:e378:8000:63bf:f5ff:fffe",  # Teredo, client 10.0.0.1
])
def test_an_ipv4_address_carried_in_ipv6_is_denied_but_never_admits(address: str) -> None:
    deny = policy(denied=("10.0.0.0/8",))
    assert deny.check_name(address) is not None
    assert deny.check_address("h.example", address) is not None
    # Leading to an allowed host is no proof of being it (6to4 is a whole IPv6 site).
    allow = policy(allowed=("10.0.0.0/8",))
    assert allow.check_address("h.example", address) is not None
    assert allow.check_address("h.example", "::ffff:10.0.0.1") is None  # mapped: the host


@pytest.mark.parametrize("address", ["::", "::1", "2001:db8::a00:1", "64:ff9b:1::a00:1"])
def test_other_ipv6_addresses_carry_no_ipv4(address: str) -> None:
    # 64:ff9b:1::/48 (local use) places the IPv4 address by its operator's prefix length.
    assert policy(denied=("0.0.0.0/0",)).check_address("h.example", address) is None


@pytest.mark.parametrize("address", ["64:ff9b::224.0.0.1", "::ffff:0:255.255.255.255",
                                     "2002:e000:1::1"])
def test_an_ipv6_address_leading_to_multicast_or_broadcast_is_never_probed(address: str) -> None:
    assert not_unicast(address) is not None


def test_denied_ipv4_mapped_network_refuses_mapped_address() -> None:
    p = policy(denied=("::ffff:0:0/96",))
    assert p.check_name("::ffff:127.0.0.1") is not None


def test_a_rule_written_ipv4_mapped_is_the_ipv4_network() -> None:
    # A mapped target is probed at its IPv4 address (canonicalised before the check), so a
    # rule in the mapped form must name that IPv4 host, or it denies nothing.
    p = policy(denied=("::ffff:127.0.0.0/104",))
    assert p.check_address("127.0.0.2", "127.0.0.2") is not None
    assert p.check_address("mapped.test", "127.0.0.2") is not None
    assert p.check_address("other.test", "10.0.0.2") is None
    allowed = policy(allowed=("::ffff:127.0.0.3/128",))
    assert allowed.check_address("127.0.0.3", "127.0.0.3") is None
    assert allowed.check_address("127.0.0.4", "127.0.0.4") is not None
    assert parse_rules(["::ffff:127.0.0.0/104"], "k").networks == (
        ipaddress.ip_network("127.0.0.0/8"),)
    # Shorter IPv6 prefixes are IPv6 rules: ::/0 is every IPv6 address, not IPv4 too.
    assert policy(denied=("::/0",)).check_address("h.test", "192.0.2.1") is None


@pytest.mark.parametrize("rule", ["127.1", "10", "1.2.3", "2130706433", "0x7f000001",
                                  "0177.0.0.1", "127.000.000.001", "*.10", "0x7f.1"])
def test_a_rule_only_an_address_parser_would_read_is_refused(rule: str) -> None:
    # Targets so written are refused, so as a name such a rule would match nothing: a
    # denied_targets entry that denies nothing.
    why = r"denied_targets\[0\]: .* write an address as a\.b\.c\.d"
    with pytest.raises(PolicyError, match=why):
        parse_rules([rule], "denied_targets")


def test_an_international_name_rule_matches_its_ascii_form() -> None:
    rules = parse_rules(["Bücher.Example", "*.bücher.example"], "k")
    assert rules.match_name("xn--bcher-kva.example")
    assert rules.match_name("ntp.xn--bcher-kva.example")


def test_ipv4_cidr_does_not_match_unrelated_ipv6() -> None:
    p = policy(denied=("0.0.0.0/0",))
    assert p.check_address("h.example", "2001:db8::1") is None


def test_denied_name_refuses_by_name() -> None:
    p = policy(denied=("bad.example.net",))
    assert p.check_name("bad.example.net") is not None
    assert p.check_name("BAD.Example.NET.") is not None
    assert p.check_name("good.example.net") is None
    assert p.check_name("sub.bad.example.net") is None  # a plain name is not a wildcard


@pytest.mark.parametrize(
    ("host", "refused"),
    [
        ("a.example.net", True),
        ("a.b.example.net", True),
        ("A.EXAMPLE.NET.", True),
        ("example.net", False),
        ("badexample.net", False),
        ("example.net.evil.org", False),
    ],
)
def test_denied_wildcard(host: str, refused: bool) -> None:
    p = policy(denied=("*.example.net",))
    assert (p.check_name(host) is not None) is refused


def test_zone_index_is_ignored_for_matching() -> None:
    p = policy(denied=("fe80::/10",))
    assert p.check_name("fe80::1%eth0") is not None


# --- allowed ----------------------------------------------------------------------------


def test_allowed_names_only_admit_listed_names() -> None:
    p = policy(allowed=("ntp.example.net", "*.pool.example.org"))
    assert p.check_name("ntp.example.net") is None
    assert p.check_name("0.pool.example.org") is None
    assert p.check_name("a.b.pool.example.org") is None
    assert p.check_name("pool.example.org") is not None
    assert p.check_name("other.example.net") is not None
    # IP literals: no network is allowed, so none passes.
    assert p.check_name("192.0.2.1") is not None
    # An allowed name passes whatever public address it resolves to.
    assert p.check_address("ntp.example.net", "198.51.100.7") is None


def test_allowed_cidrs_admit_only_addresses_inside() -> None:
    p = policy(allowed=("192.0.2.0/24", "2001:db8::/32"))
    assert p.check_name("192.0.2.10") is None
    assert p.check_name("198.51.100.1") is not None
    assert p.check_name("2001:db8::5") is None
    assert p.check_name("2001:db9::5") is not None
    # A name is not judged before resolving (a network might admit its address) ...
    assert p.check_name("anything.example") is None
    # ... but by the address it resolved to.
    assert p.check_address("anything.example", "192.0.2.200") is None
    assert p.check_address("anything.example", "203.0.113.1") is not None


def test_allowed_name_resolving_to_denied_address_is_refused() -> None:
    p = policy(allowed=("ntp.example.net",), denied=("10.0.0.0/8",))
    assert p.check_name("ntp.example.net") is None
    assert p.check_address("ntp.example.net", "10.9.8.7") is not None
    assert p.check_address("ntp.example.net", "192.0.2.1") is None


def test_denied_wins_over_allowed_cidr() -> None:
    p = policy(allowed=("10.0.0.0/8",), denied=("10.1.0.0/16",))
    assert p.check_name("10.2.0.1") is None
    assert p.check_name("10.1.0.1") is not None


def test_denied_name_wins_over_allowed_wildcard() -> None:
    p = policy(allowed=("*.example.net",), denied=("bad.example.net",))
    assert p.check_name("good.example.net") is None
    assert p.check_name("bad.example.net") is not None


def test_empty_policy_permits_everything() -> None:
    p = TargetPolicy()
    assert p.check_name("127.0.0.1") is None
    assert p.check_name("anything.example") is None
    assert p.check_address("anything.example", "10.0.0.1") is None


def test_safe_denied_list_parses_and_covers_loopback_and_private() -> None:
    p = policy(denied=SAFE_DENIED)
    for address in ("127.0.0.1", "10.0.0.1", "192.168.1.1", "169.254.0.1", "::1", "fd00::1",
                    "::ffff:127.0.0.1"):
        assert p.check_name(address) is not None, address
    assert p.check_name("192.0.2.1") is None  # documentation range is not in the list


# --- first_refusal ----------------------------------------------------------------------


def test_first_refusal_over_global_and_module() -> None:
    glob = policy(denied=("10.0.0.0/8",))
    module = policy(allowed=("192.0.2.0/24",))
    both = [glob, module]
    assert first_refusal(both, "192.0.2.1", None) is None
    why = first_refusal(both, "10.0.0.1", None)
    assert why is not None and "denied_targets" in why  # the global one speaks first
    why = first_refusal(both, "198.51.100.1", None)
    assert why is not None and "allowed_targets" in why
    # By address, after resolving.
    assert first_refusal(both, "h.example", "192.0.2.3") is None
    assert first_refusal(both, "h.example", "10.0.0.3") is not None
    assert first_refusal(both, "h.example", "203.0.113.3") is not None
    assert first_refusal([], "10.0.0.1", None) is None


def test_first_refusal_module_can_only_narrow() -> None:
    glob = policy(allowed=("192.0.2.0/24",))
    module = policy(allowed=("198.51.100.0/24",))
    # Each policy must agree: no address is in both.
    assert first_refusal([glob, module], "192.0.2.1", None) is not None
    assert first_refusal([glob, module], "198.51.100.1", None) is not None


# --- config -----------------------------------------------------------------------------

CONFIG = """
allowed_targets: ["192.0.2.0/24", "*.example.net"]
denied_targets: ["192.0.2.128/25"]
modules:
  x:
    prober: ntp
    allowed_targets: [ntp.example.net, "2001:db8::/32"]
    denied_targets: ["10.0.0.0/8", "*.internal.example.net"]
  plain:
    prober: ntp
"""


def test_config_parses_global_and_module_policies() -> None:
    config = parse_config(CONFIG, "t")
    assert config.policy.allowed.networks == (ipaddress.ip_network("192.0.2.0/24"),)
    assert config.policy.allowed.suffixes == (".example.net",)
    assert config.policy.denied.networks == (ipaddress.ip_network("192.0.2.128/25"),)
    x = config.modules["x"]
    assert x.policy.allowed.names == frozenset({"ntp.example.net"})
    assert x.policy.denied.suffixes == (".internal.example.net",)
    assert not config.modules["plain"].policy.allowed
    assert not config.modules["plain"].policy.denied
    policies = [config.policy, x.policy]
    assert first_refusal(policies, "192.0.2.200", None) is not None  # global deny
    assert first_refusal(policies, "a.internal.example.net", None) is not None  # module deny
    assert first_refusal(policies, "ntp.example.net", "192.0.2.5") is None


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("modules:\n  x:\n    denied_targets: ['10.0.0.0/8', 'bad entry']\n",
         "modules.x.denied_targets[1]"),
        ("modules:\n  x:\n    allowed_targets: ['*.']\n", "modules.x.allowed_targets[0]"),
        ("modules:\n  x:\n    allowed_targets: 10.0.0.0/8\n", "modules.x.allowed_targets"),
        ("denied_targets: [ok.example, 300.1.1.1/8]\nmodules:\n  x: {}\n", "denied_targets[1]"),
        ("allowed_targets: [{a: b}]\nmodules:\n  x: {}\n", "allowed_targets[0]"),
        ("denied_target: []\nmodules:\n  x: {}\n", "denied_target"),
        ("modules:\n  x:\n    allow_targets: []\n", "modules.x.allow_targets"),
    ],
)
def test_config_bad_policy_names_key_path(text: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(text, "t")
    assert re.sub(r"^t:\d+:\d+: ", "", str(exc.value)).startswith(key), str(exc.value)


def test_config_to_yaml_round_trip_keeps_policies() -> None:
    config = parse_config(CONFIG, "t")
    text = config_to_yaml(config)
    data = yaml.safe_load(text)
    assert data["allowed_targets"] == ["192.0.2.0/24", "*.example.net"]
    assert data["denied_targets"] == ["192.0.2.128/25"]
    assert data["modules"]["x"]["allowed_targets"] == ["ntp.example.net", "2001:db8::/32"]
    assert data["modules"]["x"]["denied_targets"] == ["10.0.0.0/8", "*.internal.example.net"]
    assert "allowed_targets" not in data["modules"]["plain"]
    again = parse_config(text, "t2")
    assert again.policy == config.policy
    assert again.modules["x"].policy == config.modules["x"].policy
    assert again.modules["plain"].policy == config.modules["plain"].policy
