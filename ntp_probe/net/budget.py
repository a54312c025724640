"""How many sockets probes may hold at once: what the open-files limit leaves them beside
the server's connections. Past it a probe's socket is refused at once (EMFILE), the probe
fails local_error, and the process never runs out of descriptors, which would stop it
accepting connections (/-/healthy's included)."""

from __future__ import annotations

import errno
import socket
from dataclasses import dataclass


@dataclass(slots=True)
class _Budget:
    limit: int | None = None  # sockets open at once at most (None: no limit)
    open: int = 0


_BUDGET = _Budget()


class LocalSocketError(OSError):
    """No socket for the probe: this host's trouble (the budget, or the system's limits),
    never the server's."""


def limit_probe_sockets(limit: int | None) -> None:
    """At most ``limit`` probe sockets open at once (None: no limit)."""
    _BUDGET.limit = limit


def take() -> None:
    """Count one more probe socket, or raise :class:`LocalSocketError` (EMFILE) past the
    budget; :func:`give_back` when it is closed."""
    budget = _BUDGET
    if budget.limit is not None and budget.open >= budget.limit:
        raise LocalSocketError(errno.EMFILE, f"{budget.open} probe sockets open, all the "
                               "open-files limit leaves room for (raise LimitNOFILE / "
                               "ulimit -n)")
    budget.open += 1


def open_socket(family: int, kind: int) -> socket.socket:
    """A probe socket counted against the budget (:func:`give_back` when it is closed);
    :class:`LocalSocketError` past the budget or when the system gives none."""
    take()
    try:
        return socket.socket(family, kind)
    except OSError as exc:
        give_back()
        raise LocalSocketError(exc.errno, exc.strerror) from None


def give_back() -> None:
    """A probe socket counted by :func:`take` is closed."""
    _BUDGET.open -= 1


class Reservation:
    """A probe socket counted now and opened later: a probe that needs a second socket
    once a first has done its work (NTS: the key exchange's TLS connection, then the NTP
    exchange's socket) finds out before it sends anything, not after."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        take()  # LocalSocketError past the budget
        self.held = True

    def release(self) -> None:
        """Give it back: the socket it stood for is about to be opened, or never will be
        (idempotent)."""
        if self.held:
            self.held = False
            give_back()


def in_use() -> int:
    """Probe sockets open now."""
    return _BUDGET.open
