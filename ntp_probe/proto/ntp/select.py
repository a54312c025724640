"""Falseticker detection: the RFC 5905 intersection of correctness intervals.

Each candidate server contributes its correctness interval
``[offset - root_distance, offset + root_distance]``: if the server is honest, the
true time, relative to the local clock, lies somewhere inside it. The selection
algorithm (RFC 5905 section 11.2.1, the intersection part of ``clock_select``) finds
the interval on which a majority of those intervals agree:

1. Put both endpoints of each of the ``n`` intervals on one list, tagged lower (-1)
   and upper (+1), and sort it by value, a lower endpoint before an upper one at
   equal values ("endpoint||type", RFC 5905 A.5.5.1).
2. For ``f = 0, 1, ...`` while ``2f < n`` (fewer than half may be falsetickers):

   * scan up from the lowest endpoint, counting one more open interval at each
     lower endpoint and one fewer at each upper one; the first endpoint at which
     ``n - f`` intervals are open is ``low``;
   * scan down from the highest endpoint the same way, mirrored; the first
     endpoint at which ``n - f`` intervals are open is ``high``;
   * stop as soon as ``high > low``: ``[low, high]`` is the intersection.

3. If no ``f`` gives ``high > low`` there is no majority, and every candidate is a
   falseticker.

Two intervals that merely touch give ``high == low``, which does not count. As in
ntpd, ``[low, high]`` spans from the lowest to the highest point where ``n - f``
intervals meet, even if fewer meet somewhere in between: so a chain of touching
intervals, [0, 1], [1, 2], [2, 3], is a majority of two on [1, 2] (the RFC's sort puts a
lower endpoint first at a tie; ntpd keeps ties in insertion order and may not, an exact
tie of floats that measurements do not produce).

A candidate is a truechimer when its interval contains points of ``[low, high]``
(RFC 5905 section 11.2.1). This is the rule ntpd and ntpsec apply: the interval
must overlap the intersection, so a server whose own offset lies just outside it
still counts. The RFC's appendix code also counts midpoints while scanning; ntpd
dropped that and so does this module.

The midpoint of ``[low, high]`` is the group's consensus offset: how far the
truechimers' time is ahead of the local clock. Shifting every offset by the same
amount (an error of the local clock) shifts the intersection and the midpoint by
that amount and leaves every verdict unchanged.

Fit checks (stratum, reachability, loops, maximum distance) and the cluster step
come before and after this in ntpd; they are the caller's business.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_LOWER = -1
_UPPER = 1


@dataclass(frozen=True, slots=True)
class Candidate:
    """One server's measurement, in seconds relative to the local clock."""

    id: str
    offset: float
    root_distance: float


@dataclass(frozen=True, slots=True)
class Selection:
    """The outcome of :func:`intersect`.

    ``low`` and ``high`` bound the intersection; both are None when there is no
    majority. ``truechimers`` and ``falsetickers`` hold candidate ids in input
    order and together cover every candidate.
    """

    low: float | None
    high: float | None
    truechimers: tuple[str, ...]
    falsetickers: tuple[str, ...]

    @property
    def majority(self) -> bool:
        """True when more than half of the candidates share an intersection."""
        return self.low is not None

    @property
    def midpoint(self) -> float | None:
        """The consensus offset: the centre of the intersection, or None."""
        if self.low is None or self.high is None:
            return None
        return (self.low + self.high) / 2


def intersect(candidates: Iterable[Candidate]) -> Selection:
    """Split candidates into truechimers and falsetickers (RFC 5905 section 11.2.1).

    Raises ValueError for a duplicate id, a non-finite offset, or a root distance
    that is not finite and positive (ntpd floors it at 1 ms; a zero-width interval
    could never share an intersection of positive width).
    """
    cands = tuple(candidates)
    _validate(cands)
    n = len(cands)
    endpoints = sorted(
        [(c.offset - c.root_distance, _LOWER) for c in cands]
        + [(c.offset + c.root_distance, _UPPER) for c in cands]
    )
    for allow in range((n + 1) // 2):
        need = n - allow
        low = _first_point_with(endpoints, need, _LOWER)
        high = _first_point_with(endpoints[::-1], need, _UPPER)
        if low is not None and high is not None and high > low:
            true = tuple(c.id for c in cands if _overlaps(c, low, high))
            false = tuple(c.id for c in cands if not _overlaps(c, low, high))
            return Selection(low, high, true, false)
    return Selection(None, None, (), tuple(c.id for c in cands))


def _validate(cands: Sequence[Candidate]) -> None:
    seen: set[str] = set()
    for c in cands:
        if c.id in seen:
            raise ValueError(f"duplicate candidate id {c.id!r}")
        seen.add(c.id)
        if not math.isfinite(c.offset):
            raise ValueError(f"candidate {c.id!r}: offset {c.offset!r} is not finite")
        if not (math.isfinite(c.root_distance) and c.root_distance > 0):
            raise ValueError(
                f"candidate {c.id!r}: root distance {c.root_distance!r} must be finite and > 0"
            )


def _first_point_with(
    endpoints: Sequence[tuple[float, int]], need: int, opening: int
) -> float | None:
    """The first endpoint, walking the list in order, at which ``need`` intervals are open.

    ``opening`` is the endpoint type that enters an interval in the walking
    direction: the lower endpoint walking up, the upper one walking down.
    """
    count = 0
    for value, kind in endpoints:
        count += 1 if kind == opening else -1
        if count >= need:
            return value
    return None


def _overlaps(c: Candidate, low: float, high: float) -> bool:
    return not (c.offset + c.root_distance < low or c.offset - c.root_distance > high)
