"""Target parameter parsing (ntp_probe.targets)."""

from __future__ import annotations

import pytest

from ntp_probe.engine.targets import Target, TargetError, parse_target
from ntp_probe.proto.address import ip_address


@pytest.mark.parametrize(
    ("raw", "host", "port", "text"),
    [
        ("host", "host", None, "host"),
        ("host:123", "host", 123, "host:123"),
        ("ntp.example.org:4123", "ntp.example.org", 4123, "ntp.example.org:4123"),
        ("1.2.3.4", "1.2.3.4", None, "1.2.3.4"),
        ("1.2.3.4:123", "1.2.3.4", 123, "1.2.3.4:123"),
        ("[2001:db8::1]:123", "2001:db8::1", 123, "[2001:db8::1]:123"),
        ("[::1]", "::1", None, "[::1]"),
        ("[::1]:1", "::1", 1, "[::1]:1"),
        ("[::1]:65535", "::1", 65535, "[::1]:65535"),
        ("2001:db8::1", "2001:db8::1", None, "[2001:db8::1]"),
        ("2001:DB8:0:0::1", "2001:db8::1", None, "[2001:db8::1]"),  # normalised
        ("::", "::", None, "[::]"),
        ("Example.COM.", "example.com.", None, "example.com."),
        ("Example.COM.:123", "example.com.", 123, "example.com.:123"),
        ("localhost", "localhost", None, "localhost"),
        ("_ntp.internal", "_ntp.internal", None, "_ntp.internal"),
        ("a-b.c-d", "a-b.c-d", None, "a-b.c-d"),
        ("  host:123  ", "host", 123, "host:123"),  # surrounding blanks ignored
        ("host:0123", "host", 123, "host:123"),
        # A link-local zone is kept as written (its interface is looked up for each
        # probe), a number without leading zeros.
        ("fe80::1%lo", "fe80::1%lo", None, "[fe80::1%lo]"),
        ("[fe80::1%eth9]:123", "fe80::1%eth9", 123, "[fe80::1%eth9]:123"),
        ("[fe80::1%007]:123", "fe80::1%7", 123, "[fe80::1%7]:123"),
    ],
)
def test_parse_target_valid(raw: str, host: str, port: int | None, text: str) -> None:
    t = parse_target(raw)
    assert t == Target(host, port)
    assert str(t) == text
    # str() of a parsed target parses back to the same target.
    assert parse_target(str(t)) == t


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ("", "invalid target '': it is empty"),
        ("   ", "it is empty"),
        ("host:", "invalid target 'host:': port '' is not 1-65535"),
        (":123", "the host is empty"),
        ("host:0", "port '0' is not 1-65535"),
        ("host:65536", "port '65536' is not 1-65535"),
        ("host:99999999999999999999", "is not 1-65535"),
        ("host:abc", "port 'abc' is not"),
        ("host:-1", "port '-1' is not"),
        ("host:+1", "port '+1' is not"),
        ("host: 1", "port ' 1' is not"),
        ("host:\u0663", "is not 1-65535"),  # an Arabic-Indic digit is not an ASCII port
        ("[::1", "'[' without ']'"),
        ("[::1]x", "unexpected 'x' after ']'"),
        ("[::1]:", "port '' is not"),
        ("[::1]:0", "port '0' is not"),
        ("[]:1", "brackets hold no IPv6 address"),
        ("[1.2.3.4]:1", "brackets hold no IPv6 address"),
        ("[host]:1", "brackets hold no IPv6 address"),
        ("[2001:db8::zz]:1", "brackets hold no IPv6 address"),
        ("http://x", "not a URL"),
        ("a b", "' ' is not allowed in a host name"),
        ("a\nb", "is not allowed in a host name"),
        ("localhost\n:123", "is not allowed in a host name"),  # $ matched before a final \n
        ("1.2.3.4.5", "an IPv4 address has four numbers"),
        ("1.2.3", "abbreviated IPv4 address"),
        ("999.1.1.1", "each of the four numbers is 0-255"),
        ("127.0.0.1.", "an IPv4 address has no trailing dot"),
        ("127.0.0.041", "an IPv4 address has no leading zeros"),  # 33 to glibc, 41 to some
        ("1.2.3.\u00b2", "is not allowed in a host name"),  # a digit to isdigit, not to int
        ("\u0661.2.3.4", "is not allowed in a host name"),  # Arabic-Indic one
        ("1234", "abbreviated IPv4 address"),
        ("host:12:34", "not an IPv6 address (a host with a port is host:port)"),
        ("2001:db8::g", "not an IPv6 address"),
        ("-host", "starts or ends with '-'"),
        ("host-", "starts or ends with '-'"),
        ("a..b", "empty label"),
        ("a" * 64, "is longer than 63 characters"),  # a label longer than 63 octets
        ("a." * 127 + "a", "at most 253 characters"),  # longer than 253 octets
        ("host%eth0", "'%' is not allowed in a host name"),
        ("ho$t", "'$' is not allowed"),
        ("bücher.example", "write an international name in its ASCII form, xn--"),
        ("127.0.0.1:123,127.0.0.2", "needs a module with prober: ntp_group"),
    ],
)
def test_parse_target_invalid(raw: str, fragment: str) -> None:
    with pytest.raises(TargetError) as exc:
        parse_target(raw)
    msg = str(exc.value)
    assert fragment in msg
    assert msg.startswith("invalid target ")
    assert "\n" not in msg  # one line, fit for an HTTP 400 body


def test_a_long_target_is_quoted_once_and_shortened() -> None:
    raw = "x" * 300
    with pytest.raises(TargetError) as exc:
        parse_target(raw)
    msg = str(exc.value)
    assert msg.count("xxxxxxxxxx") <= 7 and len(msg) < 160, msg


def test_target_error_is_value_error() -> None:
    assert issubclass(TargetError, ValueError)


def test_longest_valid_hostname() -> None:
    label = "a" * 63
    name = ".".join([label] * 3 + ["b" * 61])  # 253 octets
    assert len(name) == 253
    assert parse_target(name).host == name
    assert parse_target(name + ".").host == name + "."


def test_target_str_brackets_ipv6_only() -> None:
    assert str(Target("::1", 123)) == "[::1]:123"
    assert str(Target("::1")) == "[::1]"
    assert str(Target("1.2.3.4", 5)) == "1.2.3.4:5"
    assert str(Target("h")) == "h"


@pytest.mark.parametrize("raw", ["1.2.3.4%eth0", "1.2.3.4%eth0:123", "::1%", "fe80::1%a b",
                                 "fe80::1%x\ny", "[fe80::1%]:123",
                                 "[fe80::1%eth0\n]:123"])
def test_parse_target_rejects_bad_zone_ids(raw: str) -> None:
    with pytest.raises(TargetError):
        parse_target(raw)


def test_an_address_spelling_is_parsed_once_and_a_name_is_no_address() -> None:
    ip_address.cache_clear()
    first = ip_address("192.0.2.7")
    assert ip_address("192.0.2.7") is first  # the second read is the cached object
    assert ip_address.cache_info().hits == 1
    assert str(ip_address("2001:db8::1")) == "2001:db8::1"
    for not_an_address in ("ntp.example.net", "192.0.2.256", "01.2.3.4", ""):
        with pytest.raises(ValueError):
            ip_address(not_an_address)
