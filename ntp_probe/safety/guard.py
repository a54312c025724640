"""What a prober must ask before it sends, and what it remembers between probes.

Probers receive a :class:`Guard` on their result object; it holds the policies that
apply (global, then the module's), the process-wide KoD table, the leap-second
memory and the leap-seconds.list loaded with the configuration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ntp_probe.proto.leapfile import LeapFile
from ntp_probe.safety.kod import KodTable
from ntp_probe.safety.leap import LeapMemory
from ntp_probe.safety.policy import TargetPolicy, first_refusal, not_unicast


@dataclass(frozen=True, slots=True)
class Guard:
    """Policies and KoD memory for one probe; the default permits everything."""

    policies: tuple[TargetPolicy, ...] = ()
    kod: KodTable | None = None
    leaps: LeapMemory | None = None
    leapfile: LeapFile | None = None  # what a server's leap indicator is compared with

    def refuse(self, host: str, address: str | None = None) -> str | None:
        """Why ``host`` (resolved to ``address``, if known) must not be probed, or None.

        Unspecified, multicast and broadcast destinations are refused whatever the
        policies say: 0.0.0.0 and :: reach the local host, and the others reach many."""
        why = not_unicast(host if address is None else address)
        if why is not None:
            return why
        return first_refusal(self.policies, host, address) if self.policies else None

    def backoff(self, address: str, port: int) -> tuple[str, float] | None:
        """(kiss code, seconds left) while this address must not be sent to."""
        return self.kod.remaining(address, port) if self.kod is not None else None

    def record_kod(self, address: str, port: int, code: str, poll: int, rate_cap: float,
                   deny_hold: float) -> float:
        """Remember a KoD from this address; return the backoff it started (seconds)."""
        if self.kod is None:
            return 0.0
        return self.kod.record(address, port, code, poll, rate_cap, deny_hold)

    def watch_kod(self, address: str, port: int,
                  told: Callable[[], None]) -> Callable[[], None] | None:
        """Call ``told`` when a backoff from this address begins; returns the function
        that stops watching (None: no KoD memory, nothing to watch)."""
        return self.kod.watch(address, port, told) if self.kod is not None else None

    def hold(self, address: str, port: int, code: str, seconds: float) -> None:
        """Back off from this address too, for ``seconds``, as for a KoD ``code``."""
        if self.kod is not None:
            self.kod.hold(address, port, code, seconds)

    def near_leap(self, address: str, port: int, leap: int, server_unix: float) -> bool:
        """Whether the server's time is within 24 h of a leap second it announced."""
        if self.leaps is None:  # no memory: only while the announcement is visible
            return leap in (1, 2)
        return self.leaps.near_leap((address, port), leap, server_unix)

    def answered(self, address: str, port: int) -> None:
        """The address answered normally: forget any earlier backoff."""
        if self.kod is not None:
            self.kod.clear(address, port)
