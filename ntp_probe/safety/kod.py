"""Kiss-o'-Death memory: which server addresses asked us to slow down or go away.

Kept per (address, port) across scrapes, so a monitor honours a server's KoD even
though each scrape is a fresh probe (RFC 5905 section 7.4). While an address is
backing off, no packet is sent to it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TLRUCache

MIN_RATE_BACKOFF = 64.0  # RFC 5905's minimum poll interval


@dataclass(frozen=True, slots=True)
class Backoff:
    """An active backoff: why, until when (on the table's clock), and the step length."""

    code: str
    until: float
    step: float


class KodTable:
    """Backoff state per (address, port); entries vanish when they expire."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, maxsize: int = 65536) -> None:
        self._clock = clock
        # Entries expire at their ``until``; a RATE entry is kept a little longer than its
        # backoff so that a KoD right after expiry still doubles the step.
        self._table: TLRUCache[tuple[str, int], Backoff] = TLRUCache(
            maxsize=maxsize, ttu=lambda _k, v, now: v.until + v.step, timer=clock
        )
        # False while the table is known to be empty: nearly always, and every probe asks.
        # (Even the cache's own emptiness test first expires entries.)
        self._active = False
        # Bursts pausing between samples of a server, told when a backoff from it begins.
        self._watchers: dict[tuple[str, int], list[Callable[[], None]]] = {}

    def watch(self, address: str, port: int, told: Callable[[], None]) -> Callable[[], None]:
        """Call ``told`` when a backoff from this address begins (another probe got a KoD);
        returns the function that stops watching."""
        key = (address, port)
        self._watchers.setdefault(key, []).append(told)

        def unwatch() -> None:
            watchers = self._watchers.get(key)
            if watchers is not None and told in watchers:
                watchers.remove(told)
                if not watchers:
                    del self._watchers[key]
        return unwatch

    def remaining(self, address: str, port: int) -> tuple[str, float] | None:
        """(kiss code, seconds left) while backing off from this address, else None."""
        if not self._still_active():
            return None
        entry = self._table.get((address, port))
        if entry is None:
            return None
        left = entry.until - self._clock()
        return (entry.code, left) if left > 0 else None

    def record(
        self, address: str, port: int, code: str, poll: int, rate_cap: float, deny_hold: float
    ) -> float:
        """Remember a KoD; return the backoff in seconds (0 for codes that need none).

        RATE backs off from max(2**poll, 64 s), doubling on each further RATE up to
        ``rate_cap``, and never for less than that KoD's own poll asks; DENY and RSTR stop
        probing for ``deny_hold``. A backoff running longer is kept (its seconds left are
        returned): a RATE from a burst in flight, or a module with a shorter cap, does not
        turn a DENY's day into a minute.
        """
        key = (address, port)
        now = self._clock()
        previous = self._table.get(key)
        if code == "RATE":
            asked = max(2.0 ** max(min(poll, 17), 0), MIN_RATE_BACKOFF)
            if previous is not None and previous.code == "RATE":
                asked = max(previous.step * 2, asked)
            step = min(asked, rate_cap)
        elif code in ("DENY", "RSTR"):
            step = deny_hold
        else:
            return 0.0
        if step <= 0:
            return 0.0
        if previous is not None and previous.until > now + step:
            step = previous.until - now
        else:
            self._table[key] = Backoff(code, now + step, step)
        self._active = True
        for told in list(self._watchers.get(key, ())):
            told()
        return step

    def hold(self, address: str, port: int, code: str, seconds: float) -> None:
        """Back off from an address for ``seconds`` as for ``code`` (an NTS-KE server held
        back as long as the NTP server it named), unless a longer backoff runs."""
        if seconds <= 0:
            return
        key, until = (address, port), self._clock() + seconds
        previous = self._table.get(key)
        if previous is None or previous.until < until:
            self._table[key] = Backoff(code, until, seconds)
        self._active = True

    def clear(self, address: str, port: int) -> None:
        """Forget an address that answered normally after its backoff. A backoff still
        running stays: it came from a KoD another probe received while this one's burst
        ran, and that burst's earlier answers do not lift it."""
        if self._still_active():
            entry = self._table.get((address, port))
            if entry is not None and entry.until <= self._clock():
                del self._table[(address, port)]

    def _still_active(self) -> bool:
        if self._active and not self._table:
            self._active = False
        return self._active

    def __len__(self) -> int:
        return len(self._table)
