"""Parse ``target`` parameters: ``host``, ``host:port``, ``1.2.3.4:123``, ``[2001:db8::1]:123``."""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from dataclasses import dataclass

from ntp_probe.proto.address import ip_address, needs_zone

# RFC 1123 host names (underscores tolerated: they occur in real internal zones).
# \Z, not $: $ also matches before a final newline ("localhost\n" would pass).
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}\.?\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?\Z"
)

_ZONE_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}\Z")


class TargetError(ValueError):
    """The target parameter cannot be parsed; the message is one line for a 400 reply."""


@dataclass(frozen=True, slots=True)
class Target:
    """A probe target as given; ``port`` is None when the target named none."""

    host: str
    port: int | None = None

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port is None else f"{host}:{self.port}"

    def hosts(self) -> tuple[str, ...]:
        """The hosts a probe of this target sends to (a group's: its members')."""
        return (self.host,)


def _parse_port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise TargetError(f"port {_short(text)} is not 1-65535")
    return int(text)


def _canonical_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
                       zone: str | None) -> str:
    """One spelling per destination: IPv4-mapped IPv6 as IPv4, a zone only where it means
    something (link-local). The zone stays as written (a number without leading zeros):
    which interface it names is looked up for each probe, so an interface that comes
    later or is recreated with another index (a VPN, a USB NIC) is found, and one that is
    not there fails that probe (local_error), not the request."""
    if zone is not None:
        if ip.version != 6 or not _ZONE_RE.match(zone):
            raise TargetError("a zone (%interface) only goes with an IPv6 address")
        if zone.isdigit():
            if int(zone) > 0xFFFFFFFF:
                raise TargetError(f"zone {_short(zone)} is no interface index")
            zone = str(int(zone))
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        if zone is not None and ip.is_link_local:
            return f"{ip}%{zone}"
    return str(ip)


def _check_host(host: str) -> str:
    if not host:
        raise TargetError("the host is empty")
    address, sep, zone = host.partition("%")
    try:
        ip = ip_address(address)
    except ValueError:
        pass
    else:
        return _canonical_address(ip, zone if sep else None)
    if not _HOSTNAME_RE.match(host) or host.replace(".", "").isdigit():
        raise TargetError(_why_not_a_name(host))
    try:
        socket.inet_aton(host)
    except OSError:
        pass
    else:  # 0x7f.1, 0x0: the resolver would read it as an address; make the writer say which
        raise TargetError("an IPv4 address in a non-standard form: write it as a.b.c.d")
    return host.lower()


_SHOWN = 64  # characters of a bad target quoted back


def _short(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


def _why_not_a_name(host: str) -> str:
    if host.isascii() and host.replace(".", "").isdigit():  # int() takes other digits
        numbers = host.rstrip(".").split(".")
        if len(numbers) < 4:
            return "looks like an abbreviated IPv4 address: write all four numbers, a.b.c.d"
        if len(numbers) > 4:
            return "an IPv4 address has four numbers"
        in_range = all(n.isdigit() and int(n) <= 255 for n in numbers)
        if host.endswith(".") and in_range:
            return "an IPv4 address has no trailing dot"
        if in_range:  # the C library reads 010 as octal 8, Go refuses it
            return "an IPv4 address has no leading zeros (010 reads as 8 in some tools)"
        return "not an IPv4 address: each of the four numbers is 0-255"
    if len(host.rstrip(".")) > 253:
        return "a host name has at most 253 characters"
    for label in host.rstrip(".").split("."):
        if not label:
            return "a host name has an empty label (two dots in a row, or a leading dot)"
        if len(label) > 63:
            return f"the label {_short(label)} is longer than 63 characters"
        bad = next((c for c in label if not (c.isascii() and (c.isalnum() or c in "-_"))), None)
        if bad is not None:
            if bad.isalnum():  # a letter of another script: the name is an IDN
                return (f"{bad!r} is not allowed in a host name (write an international "
                        "name in its ASCII form, xn--...)")
            return f"{bad!r} is not allowed in a host name"
        if label.startswith("-") or label.endswith("-"):
            return f"the label {_short(label)} starts or ends with '-'"
    return "not a host name or IP address"


@functools.lru_cache(maxsize=4096)  # scrapes repeat the same few targets
def parse_target(raw: str) -> Target:
    """Parse a target string; raise :class:`TargetError` with a one-line reason that
    quotes the target once, shortened."""
    try:
        return _parse(raw)
    except TargetError as exc:
        raise TargetError(f"invalid target {_short(raw.strip())}: {exc}") from None


def _parse(raw: str) -> Target:
    text = raw.strip()
    if "://" in text:
        raise TargetError("a target is host[:port], not a URL")
    if not text:
        raise TargetError("it is empty")
    if "," in text:
        raise TargetError("one server per target; a comma-separated list of members needs a "
                          "module with prober: ntp_group")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise TargetError("'[' without ']'")
        host, rest = text[1:end], text[end + 1 :]
        try:
            inner = ip_address(host.split("%", 1)[0])
        except ValueError:
            inner = None
        if inner is None or inner.version != 6:
            raise TargetError("brackets hold no IPv6 address")
        if rest and not rest.startswith(":"):
            raise TargetError(f"unexpected {_short(rest)} after ']'")
        port = _parse_port(rest[1:]) if rest else None
        return Target(_check_host(host), port)
    if text.count(":") > 1:  # a bare IPv6 address: no port possible
        try:
            ip_address(text.split("%", 1)[0])
        except ValueError:
            raise TargetError("not an IPv6 address (a host with a port is host:port)") from None
        return Target(_check_host(text), None)
    host, sep, port_text = text.partition(":")
    port = _parse_port(port_text) if sep else None
    return Target(_check_host(host), port)


def check_member(target: Target) -> Target:
    """A group member as parsed, or :class:`TargetError` for a link-local address without
    its interface: sent out of whichever interface's route comes first, it would fail
    every probe of the group (a single target fails local_error instead)."""
    if needs_zone(target.host):
        raise TargetError(f"member {str(target)!r}: a link-local address needs its "
                          f"interface ({target.host}%eth0)")
    return target
