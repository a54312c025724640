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
            networks.append(ipaddress.ip_network(text, strict=False))
            continue
        except ValueError:
            pass
        if text.startswith("*."):
            rest = text[2:].rstrip(".")
            if not _valid_name(rest):
                raise PolicyError(f"{key}[{i}]: invalid wildcard domain {item!r}")
            suffixes.append("." + rest)
        elif _valid_name(text.rstrip(".")):
            names.add(text.rstrip("."))
        else:
            raise PolicyError(f"{key}[{i}]: not a CIDR, host name or *.domain: {item!r}")
    return Rules(tuple(networks), frozenset(names), tuple(suffixes), tuple(source))


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
