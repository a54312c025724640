"""probers.hybrid's correlation (NTP vs kernel coherence) and the leap-second window it sits beside.

The coherence score (README, kernel metrics): with d the divergence, piecewise linear through
(0, 1), (1 ms, 1), (5 ms, 0.9), (10 ms, 0.7), (50 ms, 0.5), then
0.5 * exp(-(d - 50 ms) / 50 ms), continuous everywhere.

The leap-second window (guard.LeapMemory, node_exporter semantics) is tested here on
synthetic server times, since a behaviour test cannot put a fake server a day away
without tripping the causality check it is meant to widen.
"""

from __future__ import annotations

import datetime as dt
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ntp_probe.probers.hybrid import coherence_score, divergence, within_maxerror
from ntp_probe.safety.guard import Guard
from ntp_probe.safety.leap import LeapMemory

MS = 1e-3
BREAKPOINTS = (1 * MS, 5 * MS, 10 * MS, 50 * MS)
# Far enough that 0.5 * exp(-(d - 50 ms) / 50 ms) is still a normal double (> 0).
FINITE_RANGE = 30.0

finite_d = st.floats(min_value=0.0, max_value=FINITE_RANGE, allow_nan=False)


# --- coherence_score -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("d", "score"),
    [
        (0.0, 1.0),
        (0.5 * MS, 1.0),
        (1 * MS, 1.0),
        (3 * MS, 0.95),
        (5 * MS, 0.9),
        (7.5 * MS, 0.8),
        (10 * MS, 0.7),
        (30 * MS, 0.6),
        (50 * MS, 0.5),
        (100 * MS, 0.5 * math.exp(-1)),
        (150 * MS, 0.5 * math.exp(-2)),
    ],
)
def test_coherence_score_values(d: float, score: float) -> None:
    assert coherence_score(d) == pytest.approx(score, abs=1e-12)


@pytest.mark.parametrize("x", BREAKPOINTS)
def test_coherence_score_is_continuous_at_breakpoints(x: float) -> None:
    eps = 1e-12
    left, at, right = coherence_score(x - eps), coherence_score(x), coherence_score(x + eps)
    assert abs(left - at) < 1e-9
    assert abs(right - at) < 1e-9


def test_no_jump_at_50ms_unlike_the_seed_bands() -> None:
    """The seed exporter's bands jumped at 50 ms; the decay starts exactly at 0.5."""
    assert coherence_score(50 * MS - 1e-9) == pytest.approx(0.5, abs=1e-6)
    assert coherence_score(50 * MS + 1e-9) == pytest.approx(0.5, abs=1e-6)


@given(finite_d, finite_d)
def test_coherence_score_is_non_increasing(a: float, b: float) -> None:
    lo, hi = min(a, b), max(a, b)
    assert coherence_score(lo) >= coherence_score(hi)


@given(finite_d)
def test_coherence_score_is_symmetric_in_sign(d: float) -> None:
    assert coherence_score(-d) == coherence_score(d)


@given(finite_d)
def test_coherence_score_is_in_unit_interval(d: float) -> None:
    assert 0.0 < coherence_score(d) <= 1.0


@given(st.floats(min_value=FINITE_RANGE, max_value=1e12, allow_nan=False))
def test_coherence_score_far_away_is_tiny_but_never_negative(d: float) -> None:
    # Beyond ~37 s the exponential underflows to 0.0 in doubles: the limit, not a bug.
    assert 0.0 <= coherence_score(d) < 1e-100


def test_coherence_score_exact_one_up_to_one_ms() -> None:
    for d in (0.0, 1e-9, 0.25 * MS, 0.999 * MS, 1 * MS):
        assert coherence_score(d) == 1.0
    assert coherence_score(1 * MS + 1e-6) < 1.0


# --- divergence and within_maxerror -------------------------------------------------------


@pytest.mark.parametrize(
    ("ntp", "kernel", "d"),
    [
        (0.25, 0.0, 0.25),
        (0.0, 0.25, 0.25),
        (1 * MS, -2 * MS, 3 * MS),
        (-1 * MS, -1 * MS, 0.0),
        (-20.0, 0.5, 20.5),
    ],
)
def test_divergence(ntp: float, kernel: float, d: float) -> None:
    assert divergence(ntp, kernel) == pytest.approx(d, abs=1e-15)
    assert divergence(kernel, ntp) == pytest.approx(d, abs=1e-15)
    assert divergence(ntp, kernel) >= 0


@pytest.mark.parametrize(
    ("offset", "maxerror", "within"),
    [
        (0.0, 0.0, True),
        (0.25, 16.0, True),
        (-0.25, 16.0, True),
        (16.0, 16.0, True),  # the bound is inclusive
        (-16.0, 16.0, True),
        (20.0, 16.0, False),
        (-20.0, 16.0, False),
        (1e-3, 5e-4, False),
    ],
)
def test_within_maxerror(offset: float, maxerror: float, within: bool) -> None:
    assert within_maxerror(offset, maxerror) is within


# --- the leap-second window (guard.LeapMemory) ---------------------------------------------


def unix(text: str) -> float:
    return dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp()


SERVER = ("192.0.2.1", 123)
OTHER = ("192.0.2.1", 1123)
# The leap second at the end of 2016-12-31.
ANNOUNCED = unix("2016-12-31T12:00:00")
MIDNIGHT = unix("2017-01-01T00:00:00")


@pytest.mark.parametrize("leap", [1, 2])
def test_an_announcement_opens_the_window(leap: int) -> None:
    assert LeapMemory().near_leap(SERVER, leap, ANNOUNCED) is True


@pytest.mark.parametrize("leap", [0, 3])
def test_no_announcement_no_window(leap: int) -> None:
    memory = LeapMemory()
    assert memory.near_leap(SERVER, leap, ANNOUNCED) is False
    assert memory.near_leap(SERVER, leap, MIDNIGHT) is False


@pytest.mark.parametrize(
    ("when", "inside"),
    [
        ("2016-12-31T12:00:01", True),  # still announced, bits since cleared
        ("2016-12-31T23:59:59", True),
        ("2017-01-01T00:00:00", True),  # the leap itself
        ("2017-01-01T00:00:01", True),  # bits are gone right after the leap
        ("2017-01-01T23:59:59", True),  # up to 24 h after the midnight
        ("2017-01-02T00:00:00", False),  # the window is open at its end
        ("2017-01-02T00:00:01", False),
        ("2017-01-05T00:00:00", False),
    ],
)
def test_the_window_lasts_until_24h_after_the_announced_midnight(
    when: str, inside: bool
) -> None:
    memory = LeapMemory()
    assert memory.near_leap(SERVER, 1, ANNOUNCED)
    assert memory.near_leap(SERVER, 0, unix(when)) is inside


def test_the_window_opens_24h_before_the_midnight() -> None:
    memory = LeapMemory()
    memory.near_leap(SERVER, 1, ANNOUNCED)
    # A (reordered or stale) sample from before the window is not widened.
    assert memory.near_leap(SERVER, 0, unix("2016-12-30T23:59:59")) is False
    assert memory.near_leap(SERVER, 0, unix("2016-12-31T00:00:01")) is True


def test_the_memory_is_per_server_and_port() -> None:
    memory = LeapMemory()
    memory.near_leap(SERVER, 1, ANNOUNCED)
    assert memory.near_leap(OTHER, 0, ANNOUNCED + 60) is False
    assert memory.near_leap(("192.0.2.2", 123), 0, ANNOUNCED + 60) is False
    assert memory.near_leap(SERVER, 0, ANNOUNCED + 60) is True


def test_a_later_announcement_moves_the_midnight() -> None:
    memory = LeapMemory()
    memory.near_leap(SERVER, 1, ANNOUNCED)
    assert memory.near_leap(SERVER, 0, unix("2017-06-30T12:00:00")) is False
    assert memory.near_leap(SERVER, 1, unix("2017-06-30T12:00:00")) is True
    assert memory.near_leap(SERVER, 0, unix("2017-07-01T12:00:00")) is True
    assert memory.near_leap(SERVER, 0, unix("2017-01-01T12:00:00")) is False  # old window


def test_guard_without_memory_widens_only_while_announced() -> None:
    guard = Guard()
    assert guard.near_leap(*SERVER, 1, ANNOUNCED) is True
    assert guard.near_leap(*SERVER, 2, ANNOUNCED) is True
    assert guard.near_leap(*SERVER, 0, ANNOUNCED + 1) is False  # nothing remembered
    assert guard.near_leap(*SERVER, 3, ANNOUNCED) is False


def test_guard_with_memory_remembers() -> None:
    guard = Guard(leaps=LeapMemory())
    assert guard.near_leap(*SERVER, 1, ANNOUNCED) is True
    assert guard.near_leap(*SERVER, 0, MIDNIGHT + 3600) is True
    assert guard.near_leap(*OTHER, 0, MIDNIGHT + 3600) is False
