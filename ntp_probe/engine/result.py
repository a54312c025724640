"""What a prober fills in: gauges, the failure reason, a per-probe log and its deadline."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ntp_probe.safety.guard import Guard

Labels = tuple[tuple[str, str], ...]

_logger = logging.getLogger("ntp_probe.probe")


@dataclass(slots=True)
class ProbeResult:
    """The outcome of one probe, built by the prober and rendered by :mod:`exposition.render`.

    ``deadline`` is on the event loop's clock: the prober must have returned by then.
    ``guard`` says which addresses may be sent to (target policy, KoD backoff).
    ``failure`` holds the first failure reason set; later ones are ignored, so probers
    can call :meth:`fail` in the contract's order of checks.
    """

    deadline: float
    guard: Guard = field(default_factory=Guard)
    gauges: list[tuple[str, Labels, float]] = field(default_factory=list)
    failure: str | None = None
    success: bool = False
    duration: float = 0.0
    packets_sent: int = 0
    details: dict[str, Any] = field(default_factory=dict)

    def set(self, name: str, value: float, labels: Labels = ()) -> None:
        """Add one gauge sample (names must be in the metrics catalogue)."""
        self.gauges.append((name, labels, float(value)))

    def fail(self, reason: str) -> None:
        """Record a failure reason unless an earlier check already failed."""
        if self.failure is None:
            self.failure = reason

    def value(self, name: str, labels: Labels = ()) -> float | None:
        """The value of a gauge set earlier, or None."""
        for n, lab, v in self.gauges:
            if n == name and lab == labels:
                return v
        return None


class ProbeLog:
    """Per-probe log lines (for debug=true and the CLI), mirrored to the logger at DEBUG."""

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
