"""Target policy: which hosts and addresses a module may send packets to.

Rules are CIDRs (``10.0.0.0/8``, ``2001:db8::/32``, or a single address), host names
(``ntp.example.net``) or wildcard domains (``*.example.net``: any name below it). A
target is checked twice: by name before resolving, and by the address it resolved
to, so a name that an attacker points at an internal address (DNS rebinding) is
still refused by a denied CIDR.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ntp_probe.proto.address import embedded_ipv4, ip_address

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class PolicyError(ValueError):
    """A rule that is neither a CIDR nor a host name pattern."""


@dataclass(frozen=True, slots=True)
class Rules:
    """A parsed rule list."""

    networks: tuple[IPNetwork, ...] = ()
    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()  # ".example.net" for "*.example.net"
    source: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.source)

    def match_name(self, host: str) -> bool:
        """Whether a host name (not an address) matches a name or wildcard rule."""
        name = host.lower().rstrip(".")
        return name in self.names or any(name.endswith(s) for s in self.suffixes)

    def match_address(self, address: str, *, carried: bool = False) -> bool:
        """Whether an IP address lies in one of the networks. An IPv4-mapped address is
        also its IPv4 address (it is that host); with ``carried`` (for denying), so is the
        IPv4 address any other IPv6 form carries (64:ff9b::a.b.c.d, 6to4, ...), which
        leads there but is no proof of being it, so it never admits."""
        try:
            ip = ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
        if isinstance(ip, ipaddress.IPv6Address):
            inner = embedded_ipv4(ip) if carried else ip.ipv4_mapped
            if inner is not None:
                candidates.append(inner)
        return any(
            c in net for c in candidates for net in self.networks if net.version == c.version
        )


def parse_rules(items: Iterable[object], key: str) -> Rules:
    """Parse a list of rules; raise :class:`PolicyError` naming ``key`` on a bad one."""
    networks: list[IPNetwork] = []
    names: set[str] = set()
    suffixes: list[str] = []
    source: list[str] = []
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise PolicyError(f"{key}[{i}]: expected a CIDR, host name or *.domain, got {item!r}")
        text = item.strip().lower()
        source.append(text)
        try:
            networks.append(_unmapped(ipaddress.ip_network(text, strict=False)))
            continue
        except ValueError:
            pass
        name = _ascii_name(text[2:] if text.startswith("*.") else text)
        if name is None:
            raise PolicyError(f"{key}[{i}]: not a CIDR, host name or *.domain: {item!r}")
        if name.replace(".", "").isdigit() or _inet_aton_reads(name):
            # 127.1, 10, 0x7f000001: never a target's name (targets so written are refused),
            # so the rule would match nothing, and a denial deny nothing.
            raise PolicyError(f"{key}[{i}]: {item!r} is no host name and no CIDR: write an "
                              "address as a.b.c.d (or a.b.c.d/len)")
        if text.startswith("*."):
            suffixes.append("." + name)
        else:
            names.add(name)
    return Rules(tuple(networks), frozenset(names), tuple(suffixes), tuple(source))


def _unmapped(network: IPNetwork) -> IPNetwork:
    """An IPv6 network inside ::ffff:0:0/96 as the IPv4 network it names: a target written
    as an IPv4-mapped address is probed at (and checked as) its IPv4 address."""
    if isinstance(network, ipaddress.IPv6Network) and network.prefixlen >= 96 and \
            network.network_address.ipv4_mapped is not None:
        return ipaddress.IPv4Network(
            (network.network_address.ipv4_mapped, network.prefixlen - 96))
    return network


def _ascii_name(text: str) -> str | None:
    """A host name rule as targets spell it (an international name in its xn-- form, no
    trailing dot), or None when it is not a host name."""
    name = text.rstrip(".")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    return name if _valid_name(name) else None


def _inet_aton_reads(name: str) -> bool:
    """Whether the C library would read ``name`` as an IPv4 address (0x7f.1, 0177.0.0.1)."""
    try:
        socket.inet_aton(name)
    except OSError:
        return False
    return True


def _valid_name(name: str) -> bool:
    labels = name.split(".")
    return bool(name) and all(
        label and len(label) <= 63 and all(c.isalnum() or c in "-_" for c in label)
        for label in labels
    )


def _is_address(host: str) -> bool:
    try:
        ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class TargetPolicy:
    """Allowed and denied rules; several policies (global, module) must all agree."""

    allowed: Rules = Rules()
    denied: Rules = Rules()

    def __bool__(self) -> bool:
        """Whether the policy has any rule at all (an empty one permits everything)."""
        return bool(self.allowed or self.denied)

    def check_name(self, host: str) -> str | None:
        """Refusal reason for the target as named, or None (the address is checked later)."""
        if _is_address(host):
            return self.check_address(host, host)
        if self.denied.match_name(host):
            return f"{host} matches denied_targets"
        if self.allowed and not self.allowed.networks and not self.allowed.match_name(host):
            # Only name rules: no address could admit it, so do not even resolve it.
            return f"{host} is not in allowed_targets"
        return None

    def check_address(self, host: str, address: str) -> str | None:
        """Refusal reason for ``host`` resolved to ``address``, or None."""
        if self.denied.match_address(address, carried=True):
            return f"{address} matches denied_targets"
        if not self.allowed:
            return None
        if not _is_address(host) and self.allowed.match_name(host):
            return None
        if self.allowed.match_address(address):
            return None
        return f"{host} ({address}) is not in allowed_targets"


_NOT_UNICAST = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8",  # "this network": 0.0.0.0 reaches the local host
    "224.0.0.0/4",  # multicast
    "240.0.0.0/4",  # reserved, and 255.255.255.255, the limited broadcast
    "::/128",  # unspecified: reaches the local host
    "ff00::/8",  # multicast
))


@functools.lru_cache(maxsize=4096)
def not_unicast(address: str) -> str | None:
    """Why ``address`` is no single remote host (unspecified, multicast, broadcast,
    reserved), whatever any policy says; None for a unicast address or a name."""
    try:
        ip = ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and (inner := embedded_ipv4(ip)) is not None:
        candidates.append(inner)  # 64:ff9b::224.0.0.1 leads to a multicast group too
    for net in _NOT_UNICAST:
        if any(c.version == net.version and c in net for c in candidates):
            return f"{address} is not a unicast address ({net}): never probed"
    return None


def first_refusal(policies: Sequence[TargetPolicy], host: str, address: str | None) -> str | None:
    """The first refusal among ``policies`` (by name when ``address`` is None)."""
    for policy in policies:
        why = policy.check_name(host) if address is None else policy.check_address(host, address)
        if why is not None:
            return why
    return None


# Addresses an internet-facing exporter should never be made to probe: loopback, private,
# link-local, shared, documentation, multicast and reserved ranges (README: "Target policy").
SAFE_DENIED = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4",
    "240.0.0.0/4", "::/128", "::1/128", "fc00::/7", "fe80::/10", "ff00::/8",
)
