"""RFC 5905 intersection of correctness intervals: truechimers, falsetickers, midpoint."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ntp_probe.proto.ntp.select import Candidate, Selection, intersect

# Root distances like those of real servers: a few milliseconds.
D = 0.004


def cands(*pairs: tuple[float, float]) -> list[Candidate]:
    return [Candidate(f"s{i}", offset, dist) for i, (offset, dist) in enumerate(pairs)]


def test_all_agree() -> None:
    sel = intersect(cands((0.001, D), (-0.001, D), (0.0005, D)))
    assert sel.majority
    assert sel.truechimers == ("s0", "s1", "s2")
    assert sel.falsetickers == ()
    # All three agree: the intersection is the highest lower and the lowest upper endpoint.
    assert sel.low == pytest.approx(0.001 - D)
    assert sel.high == pytest.approx(-0.001 + D)
    assert sel.midpoint == pytest.approx(0.0)


@pytest.mark.parametrize("good", [2, 3, 4])
def test_one_falseticker(good: int) -> None:
    offsets = [0.0002 * i for i in range(good)]
    members = [Candidate(f"good{i}", o, D) for i, o in enumerate(offsets)]
    members.insert(1, Candidate("fake", 1.0, D))
    sel = intersect(members)
    assert sel.majority
    assert sel.falsetickers == ("fake",)
    assert sel.truechimers == tuple(f"good{i}" for i in range(good))
    assert sel.low == pytest.approx(max(offsets) - D)
    assert sel.high == pytest.approx(min(offsets) + D)
    assert sel.midpoint is not None
    assert abs(sel.midpoint) < 0.001


def test_two_falsetickers_among_five_that_agree_with_each_other() -> None:
    sel = intersect(
        [
            Candidate("a", 0.0, D),
            Candidate("fake1", 1.0, D),
            Candidate("b", 0.0002, D),
            Candidate("fake2", 1.0002, D),
            Candidate("c", -0.0001, D),
        ]
    )
    assert sel.truechimers == ("a", "b", "c")
    assert sel.falsetickers == ("fake1", "fake2")


def test_two_two_split_has_no_majority() -> None:
    sel = intersect(
        [
            Candidate("good1", 0.0, D),
            Candidate("good2", 0.0001, D),
            Candidate("fake1", 1.0, D),
            Candidate("fake2", 1.0002, D),
        ]
    )
    assert not sel.majority
    assert sel.low is None
    assert sel.high is None
    assert sel.midpoint is None
    assert sel.truechimers == ()
    assert sel.falsetickers == ("good1", "good2", "fake1", "fake2")


def test_common_shift_moves_midpoint_not_verdict() -> None:
    pairs = [(0.0, D), (1.0, D), (0.0003, D), (-0.0002, D)]
    base = intersect(cands(*pairs))
    shifted = intersect(cands(*[(o + 5.0, d) for o, d in pairs]))
    assert base.falsetickers == shifted.falsetickers == ("s1",)
    assert base.truechimers == shifted.truechimers
    assert base.midpoint is not None
    assert shifted.midpoint == pytest.approx(base.midpoint + 5.0)
    assert shifted.low == pytest.approx(base.low + 5.0)  # type: ignore[operator]
    assert shifted.high == pytest.approx(base.high + 5.0)  # type: ignore[operator]


def test_empty_input() -> None:
    sel = intersect([])
    assert sel == Selection(None, None, (), ())
    assert not sel.majority
    assert sel.midpoint is None


def test_single_member_is_its_own_majority() -> None:
    sel = intersect([Candidate("only", 0.25, 0.5)])
    assert sel.majority
    assert (sel.low, sel.high) == (-0.25, 0.75)
    assert sel.midpoint == 0.25
    assert sel.truechimers == ("only",)
    assert sel.falsetickers == ()


def test_accepts_any_iterable() -> None:
    sel = intersect(c for c in cands((0.0, D), (0.001, D)))
    assert sel.truechimers == ("s0", "s1")


def test_two_disjoint_members_have_no_majority() -> None:
    sel = intersect(cands((0.0, 0.5), (2.0, 0.5)))
    assert not sel.majority
    assert sel.falsetickers == ("s0", "s1")


def test_touching_intervals_do_not_make_an_intersection() -> None:
    # [0, 1] and [1, 2] share one point: an intersection must have positive width.
    sel = intersect(cands((0.5, 0.5), (1.5, 0.5)))
    assert not sel.majority


def test_interval_touching_the_intersection_is_a_truechimer() -> None:
    # s0 and s1 are [0, 2]; s2 = [2, 4] only touches them at 2, so one falseticker
    # is allowed, the intersection is [0, 2], and s2 contains one of its points.
    sel = intersect(cands((1.0, 1.0), (1.0, 1.0), (3.0, 1.0)))
    assert sel.majority
    assert (sel.low, sel.high) == (0.0, 2.0)
    assert sel.truechimers == ("s0", "s1", "s2")


def test_lower_endpoint_sorts_before_upper_at_equal_values() -> None:
    # A = [0, 1] touches B = [1, 2]; C = [1.5, 3] overlaps B. Sorting a lower endpoint
    # first at a tie (RFC 5905 "endpoint||type") makes 1 the first point where two
    # intervals meet, so the intersection is [1, 2] and A touches it.
    sel = intersect(cands((0.5, 0.5), (1.5, 0.5), (2.25, 0.75)))
    assert (sel.low, sel.high) == (1.0, 2.0)
    assert sel.truechimers == ("s0", "s1", "s2")


def test_overlap_rule_not_midpoint_rule() -> None:
    # All three intervals share [1.75, 2]. The offsets of s0 (1.0) and s2 (3.75) lie
    # outside it; ntpd keeps them because their intervals overlap it (the midpoint
    # rule of RFC 5905 appendix A.5.5.1 would drop them).
    sel = intersect(cands((1.0, 1.0), (2.0, 1.0), (3.75, 2.0)))
    assert (sel.low, sel.high) == (1.75, 2.0)
    assert sel.truechimers == ("s0", "s1", "s2")


def test_truechimers_can_exceed_n_minus_f() -> None:
    # No point is common to all three ([-1, 1], [0, 2], [1.5, 3.5]), so one
    # falseticker is allowed; the intersection [0, 2] is found from a and b,
    # and c overlaps it too.
    sel = intersect(cands((0.0, 1.0), (1.0, 1.0), (2.5, 1.0)))
    assert (sel.low, sel.high) == (0.0, 2.0)
    assert sel.truechimers == ("s0", "s1", "s2")


def test_clear_outlier_with_wide_interval_still_overlapping() -> None:
    # A server far off but with a huge root distance is not provably wrong.
    sel = intersect(cands((0.0, D), (0.001, D), (0.5, 0.6)))
    assert sel.truechimers == ("s0", "s1", "s2")
    assert sel.low == pytest.approx(0.001 - D)
    assert sel.high == pytest.approx(D)


def test_lowest_majority_point_to_highest_one() -> None:
    # a, b agree around 0 and d, e around 9.5; the wide w overlaps both groups.
    # With two falsetickers allowed, three intervals are open at 0 and at 10, and
    # ntpd's scan takes the span between them: everyone overlaps it.
    sel = intersect(
        [
            Candidate("a", 0.5, 0.5),
            Candidate("b", 0.5, 0.5),
            Candidate("w", 5.0, 5.0),
            Candidate("d", 9.5, 0.5),
            Candidate("e", 9.5, 0.5),
        ]
    )
    assert (sel.low, sel.high) == (0.0, 10.0)
    assert sel.truechimers == ("a", "b", "w", "d", "e")


def test_identical_members() -> None:
    sel = intersect(cands((0.1, D), (0.1, D), (0.1, D)))
    assert sel.low == pytest.approx(0.1 - D)
    assert sel.high == pytest.approx(0.1 + D)
    assert sel.falsetickers == ()


@pytest.mark.parametrize(
    "bad",
    [
        [Candidate("a", 0.0, D), Candidate("a", 0.1, D)],
        [Candidate("a", math.nan, D)],
        [Candidate("a", math.inf, D)],
        [Candidate("a", 0.0, 0.0)],
        [Candidate("a", 0.0, -D)],
        [Candidate("a", 0.0, math.nan)],
        [Candidate("a", 0.0, math.inf)],
    ],
)
def test_rejects_invalid_candidates(bad: list[Candidate]) -> None:
    with pytest.raises(ValueError, match="'a'"):
        intersect(bad)


# Offsets, distances and shifts on a 2**-10 s grid, small enough that every sum
# is exact in binary floating point: the property can then demand equality.
_GRID = 2.0**-10
_units = st.integers(min_value=-(2**20), max_value=2**20)
_members = st.lists(st.tuples(_units, st.integers(min_value=1, max_value=2**12)), max_size=9)


@given(_members, _units)
def test_common_shift_property(members: list[tuple[int, int]], shift_units: int) -> None:
    shift = shift_units * _GRID
    base = intersect(cands(*[(o * _GRID, d * _GRID) for o, d in members]))
    moved = intersect(cands(*[(o * _GRID + shift, d * _GRID) for o, d in members]))
    assert moved.majority == base.majority
    assert moved.truechimers == base.truechimers
    assert moved.falsetickers == base.falsetickers
    if base.low is None or base.high is None or base.midpoint is None:
        assert moved.low is None and moved.high is None and moved.midpoint is None
    else:
        assert moved.low == base.low + shift
        assert moved.high == base.high + shift
        assert moved.midpoint == base.midpoint + shift


@given(_members, st.randoms(use_true_random=False))
def test_partition_majority_and_order_independence(members: list[tuple[int, int]], rnd) -> None:
    listed = cands(*[(o * _GRID, d * _GRID) for o, d in members])
    sel = intersect(listed)
    ids = [c.id for c in listed]
    # Every candidate gets exactly one verdict, in input order.
    assert sorted(sel.truechimers + sel.falsetickers) == sorted(ids)
    assert [i for i in ids if i in sel.truechimers] == list(sel.truechimers)
    if sel.majority:
        assert sel.low is not None and sel.high is not None
        assert sel.low < sel.high
        assert 2 * len(sel.truechimers) > len(ids)
    else:
        assert sel.truechimers == ()
    shuffled = list(listed)
    rnd.shuffle(shuffled)
    again = intersect(shuffled)
    assert (again.low, again.high) == (sel.low, sel.high)
    assert set(again.truechimers) == set(sel.truechimers)
