"""The pace of a burst: requests spaced by the interval, none sent that cannot be answered
before the deadline."""

from __future__ import annotations

import asyncio
import time

from ntp_probe.probers.pacing import MIN_REPLY_WINDOW, Pace


def test_a_reply_gets_the_minimum_window_then_four_round_trips() -> None:
    pace = Pace(2.0, timeout=1.0, until=100.0)
    assert pace.fits(100.0 - MIN_REPLY_WINDOW)
    assert not pace.fits(100.0 - MIN_REPLY_WINDOW + 0.001)
    pace.seen(0.1)  # a slow server: its next reply needs 0.4 s
    assert not pace.fits(99.7)
    assert pace.fits(99.6)
    pace.seen(0.05)  # a faster round trip does not shrink the window
    assert not pace.fits(99.7)


def test_the_window_never_exceeds_the_request_timeout() -> None:
    pace = Pace(0.0, timeout=0.2, until=100.0)
    pace.seen(5.0)
    assert pace.fits(99.8)
    assert not pace.fits(99.81)


async def test_wait_spaces_requests_and_refuses_one_that_cannot_be_answered() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    pace = Pace(0.05, timeout=1.0, until=start + 0.12)
    assert await pace.wait()  # the first goes at once
    assert await pace.wait()  # the second after the interval
    assert loop.time() >= start + 0.05 - 0.001  # the loop may wake a clock tick early
    # A third would go at +0.10, and its reply could not arrive by +0.12: refused.
    assert not await pace.wait()


async def test_a_late_wake_up_does_not_shorten_the_next_interval() -> None:
    loop = asyncio.get_running_loop()
    pace = Pace(0.05, timeout=1.0, until=loop.time() + 10)
    assert await pace.wait()
    # The loop is busy when the second request is due: it goes 0.04 s late.
    loop.call_later(0.04, time.sleep, 0.05)
    assert await pace.wait()
    second = loop.time()
    assert await pace.wait()
    assert loop.time() - second >= 0.05 - 0.001  # the loop may wake a clock tick early


async def test_a_late_wake_up_past_the_last_reply_window_sends_nothing() -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    pace = Pace(0.05, timeout=1.0, until=start + 0.2)
    assert await pace.wait()
    loop.call_later(0.01, time.sleep, 0.2)  # the due time passes while the loop is busy
    assert not await pace.wait()
