"""When a prober's next request may go: spaced as the module asks, and only if its reply can
still arrive before the deadline.

A request whose reply cannot arrive in time would only blame the server for our short
deadline, so it is not sent, even the first. The reply is given at least
:data:`MIN_REPLY_WINDOW`, or four of the slowest round trips seen so far when that is
longer, but never more than the request's own timeout.
"""

from __future__ import annotations

import asyncio

# 20 ms: a LAN's, a metro network's or the local daemon's round trip many times over (a
# scrape timeout of 100 ms leaves a probe 45 ms); a budget shorter than that is one of a few
# milliseconds, which no request is worth.
MIN_REPLY_WINDOW = 0.02


def least_window(timeout: float) -> float:
    """The least time a first request with this reply (or request) ``timeout`` needs."""
    return min(MIN_REPLY_WINDOW, timeout)
# What a schedule's longest run adds for the loop's turn before each send and the verdict.
_SLACK = 0.05
_SLACK_PER_REQUEST = 0.01


def longest(requests: int, interval: float, timeout: float) -> float:
    """How long ``requests`` paced requests take at the most, before any deadline: each
    waits out its timeout, and the next goes no sooner than the interval and that wait."""
    step = max(interval, timeout)
    return (requests - 1) * step + timeout + _SLACK + _SLACK_PER_REQUEST * requests


def _wake(pause: asyncio.Future[None]) -> None:
    if not pause.done():
        pause.set_result(None)


class Pace:
    """The schedule of one burst (or one session of requests) over one deadline."""

    __slots__ = ("_next", "_pause", "interval", "timeout", "until", "worst_rtt")

    def __init__(self, interval: float, timeout: float, until: float) -> None:
        self.interval, self.timeout, self.until = interval, timeout, until
        self.worst_rtt = 0.0
        self._next = float("-inf")
        self._pause: asyncio.Future[None] | None = None  # the pause in progress, if any

    def interrupt(self) -> None:
        """End the pause in progress now (a Kiss-o'-Death came: the burst is over)."""
        if self._pause is not None:
            _wake(self._pause)

    def fits(self, send_at: float) -> bool:
        """Whether a request sent at ``send_at`` (loop time) can have its reply in time."""
        window = min(self.timeout, max(MIN_REPLY_WINDOW, 4 * self.worst_rtt))
        return send_at + window <= self.until

    def seen(self, rtt: float) -> None:
        """Note a round trip: a slow server's replies get a longer window."""
        if rtt > self.worst_rtt:
            self.worst_rtt = rtt

    async def wait(self) -> bool:
        """Sleep until the next request is due and return True, or return False at once
        when its reply could not arrive before the deadline."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        send_at = max(now, self._next)
        if not self.fits(send_at):
            return False
        if send_at > now:
            # A future and a timer rather than asyncio.sleep: interrupt() can end it.
            pause = self._pause = loop.create_future()
            timer = loop.call_at(send_at, _wake, pause)
            try:
                await pause
            finally:
                timer.cancel()
                self._pause = None
            # A busy loop wakes late: the request goes now, so the reply must still fit,
            # and the next is spaced from now (the interval is a minimum, not a grid).
            send_at = loop.time()
            if not self.fits(send_at):
                return False
        self._next = send_at + self.interval
        return True
