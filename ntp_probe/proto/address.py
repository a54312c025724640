"""IP address text, parsed once per spelling.

One probe of an address literal reads it several times: the target parameter, the
unicast rule and the policies, the socket family, the address hash. Python's
``ipaddress`` parses text in pure Python, so each spelling is parsed once here.
"""

from __future__ import annotations

import functools
import ipaddress

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=4096)
def ip_address(text: str) -> IPAddress:
    """``ipaddress.ip_address(text)``, cached; ValueError when ``text`` is no address
    (a zone, ``%eth0``, is not part of it)."""
    return ipaddress.ip_address(text)


# IPv6 prefixes whose addresses carry an IPv4 address in their last 32 bits (RFC 6052's
# well-known NAT64 prefix; RFC 2765 IPv4-translated addresses), besides the mapped, 6to4 and
# Teredo forms ipaddress knows. A network's own NAT64 prefix (RFC 8215's 64:ff9b:1::/48
# among them) places the IPv4 address by its length, which only its operator knows: deny
# that prefix by its IPv6 CIDR.
_LAST_32_BITS = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("::ffff:0:0:0/96"))
_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated IPv4-compatible ::a.b.c.d


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address leads to through a translator or tunnel (mapped,
    well-known NAT64, IPv4-translated, IPv4-compatible, 6to4, Teredo's client), or None: a
    policy denying IPv4 networks must see it, or 64:ff9b::10.0.0.1 would reach a denied
    10.0.0.1."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    if any(ip in net for net in _LAST_32_BITS) or (ip in _COMPATIBLE and int(ip) > 1):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def needs_zone(address: str) -> bool:
    """Whether ``address`` is an IPv6 link-local address written without its interface
    (``fe80::1``, not ``fe80::1%eth0``): no route says which interface it is on."""
    if "%" in address or ":" not in address:
        return False
    try:
        return ip_address(address).is_link_local
    except ValueError:
        return False


def zone_scope(address: str) -> int | None:
    """The scope id of a link-local address's numeric zone (``fe80::1%2`` -> 2), the one
    a datagram's source gives apart from its address; None without a numeric zone."""
    _, _, zone = address.partition("%")
    return int(zone) if zone.isdigit() else None


def source_text(source: tuple[object, ...]) -> str:
    """A datagram's source address as text: ``host:port``, ``[v6]:port``, and
    ``[fe80::1%3]:port`` with the interface index of a link-local source."""
    host = str(source[0])
    port = source[1] if len(source) > 1 else 0
    if ":" not in host:
        return f"{host}:{port}"
    scope = source[3] if len(source) > 3 else 0
    return f"[{host}{f'%{scope}' if scope else ''}]:{port}"
