"""Recent probes for the landing page and /logs, failures kept longer than successes."""

from __future__ import annotations

import bisect
import itertools
import time
from collections import deque
from dataclasses import dataclass

from ntp_probe.config.schema import Module
from ntp_probe.engine.context import ProbeLog
from ntp_probe.engine.result import Measurement, Report


@dataclass(frozen=True, slots=True)
class Entry:
    """One finished probe with its debug output."""

    id: int
    timestamp: float  # Unix time the probe finished
    module: str
    target: str
    success: bool
    reason: str | None
    duration: float
    log: ProbeLog  # joined into text only when someone opens /logs
    metrics: str
    reports: tuple[Report, ...] = ()  # the prober's typed reports (offset, rtt, ...)
    definition: Module | None = None  # the module as the probe ran it (a reload may change it)
    # Why this answer is not a probe of its own (served from the cache, or a shared
    # burst), shown with its log: otherwise the log reads as a fresh probe's.
    note: str = ""


# Longest exposition kept per entry: a daemon's probe with 256 sources is about 150 KB.
MAX_METRICS = 512 * 1024


class History:
    """The last ``limit`` probes, plus the last ``limit`` failures even once they fall out."""

    def __init__(self, limit: int = 100) -> None:
        self.limit = limit
        self._recent: deque[Entry] = deque(maxlen=limit)
        self._failures: deque[Entry] = deque(maxlen=limit)
        self._next_id = 0

    def add(self, module: str, target: str, m: Measurement, log: ProbeLog,
            metrics: str, definition: Module | None = None, note: str = "") -> Entry:
        """Record a probe and return its entry (an exposition over :data:`MAX_METRICS`
        is not kept: the history holds up to twice ``limit`` entries)."""
        if len(metrics) > MAX_METRICS:
            metrics = (f"# {len(metrics)} characters of metrics, not kept "
                       f"(more than {MAX_METRICS})\n")
        entry = Entry(self._next_id, time.time(), module, target, m.success,
                      None if m.failure is None else m.failure.value, m.duration, log, metrics,
                      tuple(m.reports), definition, note)
        self._next_id += 1
        if self.limit <= 0:
            return entry
        self._recent.append(entry)
        if not m.success:
            self._failures.append(entry)
        return entry

    def add_cancelled(self, module: str, target: str, duration: float, log: ProbeLog,
                      definition: Module | None = None, note: str = "") -> Entry:
        """Record a probe whose client hung up before the answer: a failure (reason
        ``cancelled``, which is no metric's), kept as failures are, as blackbox lists one."""
        entry = Entry(self._next_id, time.time(), module, target, False, "cancelled",
                      duration, log, "# no metrics: the client hung up before the answer\n",
                      (), definition, note)
        self._next_id += 1
        if self.limit > 0:
            self._recent.append(entry)
            self._failures.append(entry)
        return entry

    def listed(self, rows: int) -> tuple[list[Entry], int]:
        """What a page of at most about ``2 * rows`` rows lists, newest first: the newest
        ``rows`` of the recent ring, then up to ``rows`` failures not among them (failures
        are kept longer, and a page cut short must not drop them first); and how many
        kept entries are left out."""
        recent = list(itertools.islice(reversed(self._recent), rows))
        shown = {e.id for e in recent}
        failures = list(itertools.islice(
            (e for e in reversed(self._failures) if e.id not in shown), rows))
        # Failures still kept that have left the ring: those older than its first entry.
        first = self._recent[0].id if self._recent else self._next_id
        kept = len(self._recent) + bisect.bisect_left(self._failures, first, key=_entry_id)
        listed = recent + failures
        return listed, kept - len(listed)

    @property
    def issued_count(self) -> int:
        """Probes recorded since the exporter started; their ids are 0 .. count - 1."""
        return self._next_id

    def issued(self, entry_id: int) -> bool:
        """Whether a probe with this id ran since the exporter started (kept or not)."""
        return 0 <= entry_id < self._next_id

    def get(self, entry_id: int) -> Entry | None:
        """An entry by id, if still kept: found by position, not by walking the history
        (``--history.limit`` may keep a hundred thousand)."""
        recent = self._recent
        if recent:
            # Every probe enters the recent ring: its ids run without gaps.
            i = entry_id - recent[0].id
            if 0 <= i < len(recent):
                return recent[i]
        failures = self._failures  # ids ascending
        i = bisect.bisect_left(failures, entry_id, key=_entry_id)
        if i < len(failures) and failures[i].id == entry_id:
            return failures[i]
        return None

    def latest(self, target: str, module: str | None = None) -> Entry | None:
        """The newest kept probe of ``target`` (as the request named it), of ``module``
        when given."""
        for entry in itertools.chain(reversed(self._recent), reversed(self._failures)):
            if entry.target == target and (module is None or entry.module == module):
                return entry
        return None


def _entry_id(entry: Entry) -> int:
    return entry.id
