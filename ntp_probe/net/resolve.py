"""Name resolution with blackbox_exporter's preferred_ip_protocol + fallback semantics."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from dataclasses import dataclass

from cachetools import TTLCache

_FAMILIES = {"ip4": socket.AF_INET, "ip6": socket.AF_INET6}
# getaddrinfo reports no TTL; a short fixed one keeps repeated scrapes off the resolver
# while still following DNS changes within a minute.
_CACHE_TTL = 60.0
_cache: TTLCache[tuple[str, int], str] = TTLCache(maxsize=4096, ttl=_CACHE_TTL)


class ResolveError(Exception):
    """The host has no usable address."""


@dataclass(frozen=True, slots=True)
class Resolved:
    """An address to probe and whether it came from the cache."""

    address: str
    family: int
    cached: bool

    @property
    def ip_protocol(self) -> int:
        """4 or 6, as in blackbox's probe_ip_protocol."""
        return 6 if self.family == socket.AF_INET6 else 4


async def _lookup(host: str, family: int) -> str | None:
    key = (host, family)
    hit = _cache.get(key)
    if hit is not None:
        return hit
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, family=family, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError):
        return None
    for fam, _, _, _, sockaddr in infos:
        if fam == family:
            address = str(sockaddr[0])
            _cache[key] = address
            return address
    return None


@functools.lru_cache(maxsize=4096)
def literal(host: str) -> Resolved | None:
    """An IP literal as a :class:`Resolved` (used as given, whatever the preference), else
    None. Cached: scrapes repeat the same targets, and parsing an address is not free."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    return Resolved(host, socket.AF_INET6 if ip.version == 6 else socket.AF_INET, cached=False)


async def resolve(host: str, preferred: str = "ip6", fallback: bool = True) -> Resolved:
    """Resolve ``host`` to one address of the preferred family, else (with fallback) the other.

    IP literals are used as given, whatever the preference.
    """
    resolved = literal(host)
    if resolved is not None:
        return resolved
    first = _FAMILIES[preferred]
    order = [first]
    if fallback:
        order.append(socket.AF_INET if first == socket.AF_INET6 else socket.AF_INET6)
    for family in order:
        was_cached = (host, family) in _cache
        address = await _lookup(host, family)
        if address is not None:
            return Resolved(address, family, cached=was_cached)
    wanted = preferred if not fallback else "ip4 or ip6"
    raise ResolveError(f"no {wanted} address for {host!r}")

