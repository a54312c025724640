"""Leap-second memory: which servers announced a leap, kept past the announcement."""

from __future__ import annotations

from cachetools import TTLCache

_DAY = 86400.0


class LeapMemory:
    """node_exporter's leap-second window: from a leap announcement until 24 h after the
    midnight it announced. The announcement bits are gone right after the leap, so the
    midnight is remembered per server."""

    def __init__(self) -> None:
        self._midnights: TTLCache[tuple[str, int], float] = TTLCache(maxsize=65536, ttl=3 * _DAY)
        self._active = False  # False while no announcement is remembered

    def near_leap(self, key: tuple[str, int], leap: int, server_unix: float) -> bool:
        """Record an announcement and say whether ``server_unix`` is in the window."""
        if leap in (1, 2):
            self._midnights[key] = (server_unix // _DAY + 1) * _DAY
            self._active = True
        elif not self._active:  # nearly always: no server announced a leap lately
            return False
        elif not self._midnights:  # (the cache's emptiness test expires entries first)
            self._active = False
            return False
        midnight = self._midnights.get(key)
        return midnight is not None and midnight - _DAY < server_unix < midnight + _DAY
