"""What a prober is given: its deadline, the guard (policy and memories), its log, its output."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from ntp_probe.engine.result import Measurement
from ntp_probe.engine.text import visible
from ntp_probe.safety.guard import Guard

_logger = logging.getLogger("ntp_probe.probe")


Message = str | Callable[[], str]


def _text(message: Message) -> str:
    return message if isinstance(message, str) else message()


class Log:
    """Where a prober writes its lines: call it with a line, or with a function that makes
    one (formatted only if the log is read). ``essential`` lines survive a full log."""

    __slots__ = ()

    def __call__(self, message: Message, *, essential: bool = False) -> None:
        raise NotImplementedError


class ProbeLog(Log):
    """Per-probe log lines (for debug=true, /logs and the CLI), mirrored to the logger at
    :attr:`level` (DEBUG; ``--log.prober`` sets it, as blackbox_exporter's).

    A line is stored as (milliseconds since the start, message) and stamped only when the
    log is read: most probes' logs are never read.
    """

    __slots__ = ("_debug", "_entries", "_start", "fields", "suppressed")

    level: ClassVar[int] = logging.DEBUG  # the level lines are mirrored to the logger at

    # A server flooding junk must not grow one probe's log without bound; lines marked
    # essential (the verdict) are kept beyond it.
    MAX_LINES = 500

    def __init__(self, target: str = "", module: str = "") -> None:
        self._entries: list[tuple[float, Message]] = []
        self.suppressed = 0
        # Logged as fields of their own (logfmt keys target= and module=, JSON members),
        # not inside msg; LogRecord reserves "module", hence the prefix.
        self.fields = {"probe_target": target, "probe_module": module}
        self._start = time.perf_counter()
        self._debug = _logger.isEnabledFor(ProbeLog.level)

    def __call__(self, message: Message, *, essential: bool = False) -> None:
        """Add a line stamped with the time since the probe started. A costly line can be
        given as a function: it is formatted only if the log is read."""
        entries = self._entries
        if len(entries) >= self.MAX_LINES and not essential:
            self.suppressed += 1
            return
        entries.append((time.perf_counter(), message))
        if self._debug:
            _logger.log(ProbeLog.level, "%s", _text(message), extra=self.fields)

    @property
    def line_count(self) -> int:
        """Lines kept (counted without formatting any)."""
        return len(self._entries)

    @property
    def lines(self) -> list[str]:
        """The lines kept, each stamped with the milliseconds since the probe started."""
        start = self._start
        # Lines quote what servers sent (a daemon's variables, a refid): shown escaped.
        return [f"{(at - start) * 1000:9.3f}ms {visible(_text(message))}"
                for at, message in self._entries]

    def text(self) -> str:
        """All lines, newline-terminated."""
        text = "".join(line + "\n" for line in self.lines)
        if self.suppressed:
            text += f"... {self.suppressed} more lines not kept\n"
        return text


class PrefixedLog(Log):
    """Part of a probe (one address, one group member) logging into the probe's log, each
    line marked with ``prefix``."""

    __slots__ = ("_parent", "_prefix")

    def __init__(self, parent: Log, prefix: str) -> None:
        self._parent, self._prefix = parent, prefix

    def __call__(self, message: Message, *, essential: bool = False) -> None:
        """Add the line to the parent log, marked."""
        prefix = self._prefix
        self._parent(prefix + message if isinstance(message, str)
                     else lambda: prefix + message(), essential=essential)


@dataclass(slots=True)
class ProbeContext:
    """The inputs of one probe, and the measurement it writes into.

    ``deadline`` is on the event loop's clock: the prober must have returned by then.
    ``guard`` says which addresses may be sent to and remembers what servers told us.
    """

    deadline: float
    log: Log = field(default_factory=ProbeLog)
    guard: Guard = field(default_factory=Guard)
    measurement: Measurement = field(default_factory=Measurement)
