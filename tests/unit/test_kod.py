"""KodTable: Kiss-o'-Death backoff per (address, port), on an injected clock."""

from __future__ import annotations

import pytest

from ntp_probe.safety.guard import Guard
from ntp_probe.safety.kod import MIN_RATE_BACKOFF, KodTable
from tests.conftest import FakeClock

CAP = 3600.0
HOLD = 86400.0
ADDR = "192.0.2.1"
PORT = 123


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def table(clock: FakeClock) -> KodTable:
    return KodTable(clock=clock)


def rate(table: KodTable, poll: int = 3, cap: float = CAP, addr: str = ADDR,
         port: int = PORT) -> float:
    return table.record(addr, port, "RATE", poll, cap, HOLD)


@pytest.mark.parametrize(
    ("poll", "step"), [(0, 64.0), (3, 64.0), (6, 64.0), (7, 128.0), (8, 256.0), (10, 1024.0)]
)
def test_rate_starts_at_max_of_poll_and_64(table: KodTable, poll: int, step: float) -> None:
    assert MIN_RATE_BACKOFF == 64.0
    assert rate(table, poll=poll) == step
    entry = table.remaining(ADDR, PORT)
    assert entry == ("RATE", step)


def test_rate_negative_or_huge_poll(table: KodTable) -> None:
    assert rate(table, poll=-6) == 64.0
    assert rate(table, poll=30, addr="192.0.2.2") == CAP


def test_rate_doubles_on_further_rate(table: KodTable, clock: FakeClock) -> None:
    assert rate(table) == 64.0
    clock.advance(10)
    assert rate(table) == 128.0
    assert table.remaining(ADDR, PORT) == ("RATE", 128.0)
    clock.advance(1)
    assert rate(table) == 256.0


def test_further_rate_never_backs_off_less_than_its_poll_asks(table: KodTable,
                                                             clock: FakeClock) -> None:
    assert rate(table, poll=-6) == 64.0
    clock.advance(64.5)
    assert rate(table, poll=10) == 1024.0  # not the doubled 128 s
    clock.advance(1024.5)
    assert rate(table, poll=3) == 2048.0  # doubling goes on from there
    clock.advance(2048.5)
    assert rate(table, poll=10, cap=300.0) == 300.0


def test_rate_doubles_right_after_expiry(table: KodTable, clock: FakeClock) -> None:
    assert rate(table) == 64.0
    clock.advance(64.5)
    assert table.remaining(ADDR, PORT) is None  # the backoff is over ...
    assert rate(table) == 128.0  # ... but a RATE straight away still doubles
    assert table.remaining(ADDR, PORT) == ("RATE", 128.0)


def test_rate_restarts_long_after_expiry(table: KodTable, clock: FakeClock) -> None:
    assert rate(table) == 64.0
    assert rate(table) == 128.0
    clock.advance(128 + 128 + 1)  # past the backoff and the memory kept after it
    assert rate(table) == 64.0


def test_rate_capped(table: KodTable) -> None:
    steps = [rate(table, cap=500.0) for _ in range(6)]
    assert steps == [64.0, 128.0, 256.0, 500.0, 500.0, 500.0]


def test_rate_cap_below_minimum(table: KodTable) -> None:
    assert rate(table, cap=10.0) == 10.0
    assert table.remaining(ADDR, PORT) == ("RATE", 10.0)


@pytest.mark.parametrize("code", ["DENY", "RSTR"])
def test_deny_and_rstr_hold(table: KodTable, clock: FakeClock, code: str) -> None:
    assert table.record(ADDR, PORT, code, 3, CAP, HOLD) == HOLD
    assert table.remaining(ADDR, PORT) == (code, HOLD)
    clock.advance(HOLD - 1)
    assert table.remaining(ADDR, PORT) == (code, 1.0)
    # A second DENY does not double: it holds deny_hold again.
    assert table.record(ADDR, PORT, code, 3, CAP, HOLD) == HOLD
    clock.advance(HOLD + 0.001)
    assert table.remaining(ADDR, PORT) is None


def test_deny_configurable_and_zero_disables(table: KodTable) -> None:
    assert table.record(ADDR, PORT, "DENY", 3, CAP, 600.0) == 600.0
    assert table.record("192.0.2.9", PORT, "DENY", 3, CAP, 0.0) == 0.0
    assert table.remaining("192.0.2.9", PORT) is None


def test_rate_after_deny_starts_fresh(table: KodTable, clock: FakeClock) -> None:
    table.record(ADDR, PORT, "DENY", 3, CAP, HOLD)
    clock.advance(HOLD + 1)
    assert rate(table) == 64.0
    assert table.remaining(ADDR, PORT) == ("RATE", 64.0)


@pytest.mark.parametrize("code", ["INIT", "STEP", "AUTH", "XXXX", ""])
def test_other_codes_need_no_backoff(table: KodTable, code: str) -> None:
    assert table.record(ADDR, PORT, code, 10, CAP, HOLD) == 0.0
    assert table.remaining(ADDR, PORT) is None
    assert len(table) == 0


def test_other_code_leaves_existing_rate_alone(table: KodTable) -> None:
    rate(table)
    assert table.record(ADDR, PORT, "INIT", 3, CAP, HOLD) == 0.0
    assert table.remaining(ADDR, PORT) == ("RATE", 64.0)


def test_remaining_counts_down_then_none(table: KodTable, clock: FakeClock) -> None:
    rate(table)
    seen = []
    for _ in range(4):
        entry = table.remaining(ADDR, PORT)
        assert entry is not None
        seen.append(entry[1])
        clock.advance(20)
    assert seen == [64.0, 44.0, 24.0, 4.0]
    assert table.remaining(ADDR, PORT) is None
    clock.advance(-16)  # exactly at the end: no time left
    assert table.remaining(ADDR, PORT) is None


def test_clear_forgets(table: KodTable, clock: FakeClock) -> None:
    rate(table)
    rate(table)
    clock.advance(129)  # an answer after the 128 s backoff
    table.clear(ADDR, PORT)
    assert table.remaining(ADDR, PORT) is None
    assert len(table) == 0
    assert rate(table) == 64.0  # no doubling after a clear
    table.clear("198.51.100.1", 9)  # unknown keys are fine


def test_keys_are_per_address_and_port(table: KodTable, clock: FakeClock) -> None:
    rate(table, port=124)
    clock.advance(65)
    rate(table)
    assert table.remaining("192.0.2.2", PORT) is None
    assert rate(table) == 128.0  # doubled: its own step, not port 124's
    table.clear(ADDR, 124)  # port 124's backoff is over: only its state goes
    assert table.remaining(ADDR, PORT) == ("RATE", 128.0)
    assert len(table) == 1


def test_maxsize_bounds_memory(clock: FakeClock) -> None:
    table = KodTable(clock=clock, maxsize=3)
    for i in range(10):
        rate(table, addr=f"192.0.2.{i}")
    assert len(table) <= 3


def test_guard_delegates_to_table(table: KodTable, clock: FakeClock) -> None:
    guard = Guard(kod=table)
    assert guard.record_kod(ADDR, PORT, "RATE", 8, CAP, HOLD) == 256.0
    assert guard.backoff(ADDR, PORT) == ("RATE", 256.0)
    clock.advance(257)
    guard.answered(ADDR, PORT)  # after the backoff: the state goes
    assert len(table) == 0
    bare = Guard()
    assert bare.record_kod(ADDR, PORT, "RATE", 8, CAP, HOLD) == 0.0
    assert bare.backoff(ADDR, PORT) is None
    assert bare.refuse("127.0.0.1") is None


def test_a_table_emptied_by_expiry_backs_off_again_on_the_next_kod(
    table: KodTable, clock: FakeClock
) -> None:
    """The table remembers that it is empty (every probe asks it); a KoD after it emptied
    must still be honoured."""
    table.record("192.0.2.1", 123, "DENY", 0, 3600, 100)
    clock.advance(201)  # past the hold and the entry's own expiry (hold + step)
    assert table.remaining("192.0.2.1", 123) is None
    assert len(table) == 0
    table.record("192.0.2.2", 123, "DENY", 0, 3600, 100)
    left = table.remaining("192.0.2.2", 123)
    assert left is not None and left[0] == "DENY"
    clock.advance(101)
    table.clear("192.0.2.2", 123)
    assert len(table) == 0


def test_an_answer_does_not_lift_a_backoff_still_running() -> None:
    # The KoD came to another probe while this one's burst ran on answers.
    clock = FakeClock()
    table = KodTable(clock=clock)
    table.record("192.0.2.1", 123, "DENY", 0, 3600.0, 300.0)
    table.clear("192.0.2.1", 123)
    assert table.remaining("192.0.2.1", 123) == ("DENY", 300.0)
    clock.advance(301)
    table.clear("192.0.2.1", 123)
    assert len(table) == 0


def test_a_rate_does_not_shorten_a_running_deny(table: KodTable, clock: FakeClock) -> None:
    # A RATE from a burst already in flight comes after the DENY another probe got: the
    # server said go away for a day, and still did after the RATE.
    assert table.record(ADDR, PORT, "DENY", 3, CAP, HOLD) == HOLD
    clock.advance(10.0)
    assert rate(table) == HOLD - 10.0  # the longer backoff's seconds left
    assert table.remaining(ADDR, PORT) == ("DENY", HOLD - 10.0)


def test_a_shorter_cap_does_not_shorten_a_running_rate(table: KodTable) -> None:
    rate(table, poll=12, cap=HOLD)  # 4096 s, under a module's cap of a day
    assert rate(table, poll=3, cap=100.0) == 4096.0
    assert table.remaining(ADDR, PORT) == ("RATE", 4096.0)


def test_a_hold_does_not_shorten_a_running_backoff(table: KodTable) -> None:
    table.record(ADDR, PORT, "DENY", 3, CAP, HOLD)
    table.hold(ADDR, PORT, "RATE", 64.0)
    assert table.remaining(ADDR, PORT) == ("DENY", HOLD)
    table.hold("192.0.2.2", PORT, "RATE", 64.0)
    table.hold("192.0.2.2", PORT, "DENY", 128.0)  # a longer one replaces it
    assert table.remaining("192.0.2.2", PORT) == ("DENY", 128.0)
