"""What a prober is given: its deadline, the guard (policy and memories), its log, its output."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from ntp_probe.engine.result import Measurement
from ntp_probe.safety.guard import Guard

_logger = logging.getLogger("ntp_probe.probe")


class ProbeLog:
    """Per-probe log lines (for debug=true, /logs and the CLI), mirrored to the logger at
    DEBUG."""

    __slots__ = ("_debug", "_start", "context", "lines", "suppressed")

    # A server flooding junk must not grow one probe's log without bound.
    MAX_LINES = 500

    def __init__(self, context: str = "") -> None:
        self.lines: list[str] = []
        self.suppressed = 0
        self.context = context
        self._start = time.perf_counter()
        self._debug = _logger.isEnabledFor(logging.DEBUG)

    def __call__(self, message: str) -> None:
        """Add a line stamped with the time since the probe started."""
        if len(self.lines) >= self.MAX_LINES:
            self.suppressed += 1
            return
        elapsed_ms = (time.perf_counter() - self._start) * 1000
        self.lines.append(f"{elapsed_ms:9.3f}ms {message}")
        if self._debug:
            _logger.debug("%s %s", self.context, message)

    def text(self) -> str:
        """All lines, newline-terminated."""
        text = "".join(line + "\n" for line in self.lines)
        if self.suppressed:
            text += f"... {self.suppressed} more lines not kept\n"
        return text


@dataclass(slots=True)
class ProbeContext:
    """The inputs of one probe, and the measurement it writes into.

    ``deadline`` is on the event loop's clock: the prober must have returned by then.
    ``guard`` says which addresses may be sent to and remembers what servers told us.
    """

    deadline: float
    log: ProbeLog = field(default_factory=ProbeLog)
    guard: Guard = field(default_factory=Guard)
    measurement: Measurement = field(default_factory=Measurement)
