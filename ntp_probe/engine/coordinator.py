"""Between the web layer and the runner: shared bursts, min_probe_interval, KoD memory.

- Identical probes in flight at once (same module and target) share one burst: two
  Prometheus replicas, or a retrying client, do not double the packets a server sees.
- A module's ``min_probe_interval`` serves the last result again, with its age, until
  the interval has passed.
- A burst whose every requester went away (client disconnect) is cancelled, so its
  socket is closed at once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from cachetools import TTLCache

from ntp_probe.config.schema import Config, Module
from ntp_probe.engine.context import ProbeLog
from ntp_probe.engine.result import Measurement, Reason
from ntp_probe.engine.runner import guard_for, run_probe
from ntp_probe.engine.targets import Target
from ntp_probe.safety.guard import Guard
from ntp_probe.safety.kod import KodTable
from ntp_probe.safety.leap import LeapMemory

# (module name, target); entries also hold the Module object, so that after a reload an
# entry made under the old definition is not mistaken for the new one (hashing the frozen
# Module on every request would cost more than the whole lookup).
_Key = tuple[str, str]
# min_probe_interval results are kept at most this long, whatever the module says, so the
# cache cannot grow with the number of targets ever probed.
_MAX_CACHE_AGE = 3600.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """A probe's result as one requester sees it."""

    result: Measurement
    log: ProbeLog
    age: float | None = None  # seconds, when served from the min_probe_interval cache
    shared: bool = False  # joined a burst another request started


@dataclass(slots=True)
class _Flight:
    module: Module
    task: asyncio.Task[tuple[Measurement, ProbeLog]]
    waiters: int = 0


class Coordinator:
    """Runs probes for the web layer; one instance per process."""

    def __init__(self, kod: KodTable | None = None) -> None:
        self.kod = kod if kod is not None else KodTable()
        self.leaps = LeapMemory()
        self._flights: dict[_Key, _Flight] = {}
        self._last: TTLCache[_Key, tuple[Module, float, Measurement, ProbeLog]] = TTLCache(
            maxsize=65536, ttl=_MAX_CACHE_AGE
        )

    @property
    def bursts_in_flight(self) -> int:
        """Distinct probes running now."""
        return len(self._flights)

    async def probe(self, config: Config, module: Module, target: Target,
                    timeout: float) -> Outcome:
        """Probe ``target`` with ``module`` within ``timeout`` seconds."""
        key = (module.name, str(target))
        if module.min_probe_interval > 0:
            cached = self._last.get(key)
            if cached is not None and cached[0] is module:
                age = time.monotonic() - cached[1]
                if age < module.min_probe_interval:
                    return Outcome(cached[2], cached[3], age=age)
        flight = self._flights.get(key)
        shared = flight is not None and flight.module is module
        if flight is None or not shared:
            guard = guard_for(config, module, self.kod, self.leaps)
            flight = _Flight(module, asyncio.get_running_loop().create_task(
                self._run(key, target, module, timeout, guard)
            ))
            self._flights[key] = flight
        flight.waiters += 1
        try:
            if shared:
                async with asyncio.timeout(timeout):
                    result, log = await asyncio.shield(flight.task)
            else:
                # The burst keeps its own deadline; a second timeout here could only fire
                # alongside it when the loop is late, and throw its samples away.
                result, log = await asyncio.shield(flight.task)
        except TimeoutError:
            # Only a request that joined a longer burst can get here.
            log = ProbeLog(f"target={target} module={module.name}")
            log("joined a burst that outlasts this request's timeout")
            result = Measurement()
            result.fail(Reason.TIMEOUT)
            result.duration = timeout
        except asyncio.CancelledError:
            if flight.waiters == 1 and not flight.task.done():
                flight.task.cancel()
                # Forget it now: a request arriving before the task unwinds must start a
                # fresh burst, not join one that is being cancelled.
                if self._flights.get(key) is flight:
                    del self._flights[key]
            raise
        finally:
            flight.waiters -= 1
        return Outcome(result, log, shared=shared)

    async def _run(self, key: _Key, target: Target, module: Module, timeout: float,
                   guard: Guard) -> tuple[Measurement, ProbeLog]:
        try:
            result, log = await run_probe(target, module, timeout, guard=guard)
        finally:
            flight = self._flights.get(key)
            if flight is not None and flight.task is asyncio.current_task():
                del self._flights[key]
        if module.min_probe_interval > 0:
            self._last[key] = (module, time.monotonic(), result, log)
        return result, log
