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
