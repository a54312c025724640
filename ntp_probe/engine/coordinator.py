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
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cachetools import TLRUCache

from ntp_probe.config.schema import Config, Module
from ntp_probe.engine.context import ProbeLog
from ntp_probe.engine.registry import PROBERS, server_key, timeout_reason
from ntp_probe.engine.result import Measurement, Reason
from ntp_probe.engine.runner import guard_for, run_probe
from ntp_probe.engine.targets import Target
from ntp_probe.engine.tasks import drop_cancellation
from ntp_probe.safety.guard import Guard
from ntp_probe.safety.kod import KodTable
from ntp_probe.safety.leap import LeapMemory

# (module name, host, port); entries also hold the Module, so that after a reload an entry
# made under a different definition is not mistaken for the new one.
_Key = tuple[str, str, int | None]
DEFAULT_CACHE_BYTES = 32 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class _Cached:
    module: Module
    stored: float  # time.monotonic()
    result: Measurement
    log: ProbeLog
    timeout: float  # the budget the probe had: it serves requests with no larger one

    def size(self) -> int:
        """Rough bytes held: the log lines dominate, then the samples. Estimated without
        formatting the lines, which most probes' logs never need."""
        return 1024 + 160 * self.log.line_count + 128 * len(self.result.samples)


def _expiry(_key: _Key, value: _Cached, now: float) -> float:
    return now + value.module.min_probe_interval


@dataclass(frozen=True, slots=True)
class Outcome:
    """A probe's result as one requester sees it."""

    result: Measurement
    log: ProbeLog
    age: float | None = None  # seconds, when served from the min_probe_interval cache
    shared: bool = False  # joined a burst another request started
    # The one requester per burst that counts it in the exporter's metrics: the one that
    # started it or, when that one hung up, the first still waiting.
    counted: bool = False
    # A request that joined a burst in flight: how long it waited (its probe's duration,
    # within its own budget, where the burst's may be longer).
    waited: float | None = None


_Result = tuple[Measurement, ProbeLog, bool]  # and whether this requester counts the burst


@dataclass(slots=True)
class _Flight:
    """One burst in flight and the requests waiting for it, each on a future of its own:
    a request that goes away cancels only its future, and the burst runs on while any
    other waits (what asyncio.shield gives, without its extra future and callbacks)."""

    module: Module
    config: Config  # the configuration it started under (a reload may replace it)
    timeout: float  # its budget
    ends: float  # when it is over at the latest, on the loop's clock (see _latest_end)
    task: asyncio.Task[None] = field(init=False)  # set once the flight exists: it runs it
    waiters: list[asyncio.Future[_Result]] = field(default_factory=list)
    orphaned: bool = False  # every requester left; it runs on to fill the cache
    log: ProbeLog = field(default_factory=ProbeLog)  # the burst's, shown to who left it


# Bursts of modules with min_probe_interval that run on after their last requester left
# (so that clients hanging up cannot make every request a burst), at most at once; past
# that such bursts are cancelled like any other.
MAX_ORPHANED_BURSTS = 64

# Bursts of one module and target in flight at once: one, and one more for a request whose
# budget none of them fits. Beyond that a request joins what is there, so that requests
# with ever other scrape-timeout headers cannot multiply the packets a server gets.
_MAX_FLIGHTS = 2
# The least time left with which a request handed a cut-short burst probes again: the
# shortest reply window and the probe's own margins (less could send nothing).
_LOOK_AGAIN = 0.1


def _joinable(flights: list[_Flight], module: Module, config: Config, now: float,
              timeout: float) -> tuple[_Flight | None, bool]:
    """The burst in flight a request of ``timeout`` should share (None: start one), and
    whether it is shared only for the limit of bursts in flight (it does not fit).

    A burst is shared when it is over within the request's budget and had at least that
    budget (or a whole burst's): a shorter scrape timeout gets a burst of its own, not a
    wait that would blame the server, and a scrape is not handed the timeout of a burst a
    shorter header cut down (an outsider's, or another Prometheus's). At the limit of
    bursts in flight, the one with the largest budget (the least cut down) is shared,
    however long it may take: bursts usually end well before their latest end, which
    allows for every reply's whole wait."""
    full = None
    fits: list[_Flight] = []
    same: list[_Flight] = []
    for f in flights:
        if f.module != module or not _same_world(f.config, config):
            continue
        same.append(f)
        if f.ends <= now + timeout:
            if full is None:
                full = _full_budget(module)
            if f.timeout >= full or f.timeout >= timeout:
                fits.append(f)
    if fits:
        return max(fits, key=lambda f: f.timeout), False
    if len(same) < _MAX_FLIGHTS:
        return None, False
    best: _Flight = max(same, key=lambda f: f.timeout)
    return best, True


# Reasons a probe reads when its budget ran out before its answer: a timeout of any kind,
# a key exchange or a lookup cut off, a group whose members timed out. Another verdict (a leap
# indicator, a falseticker) is the server's, whenever it came.
_RUN_OUT_REASONS = frozenset({Reason.TIMEOUT, Reason.CHRONY_TIMEOUT, Reason.MODE6_TIMEOUT,
                              Reason.NTS_KE_CONNECT, Reason.NTS_KE_TLS, Reason.NO_MAJORITY,
                              Reason.RESOLVE})


def _much_shorter(had: float, wanted: float) -> bool:
    """Whether a probe's budget ``had`` was short enough of ``wanted`` that its running
    out says nothing of the server for ``wanted``: silent for 90% of a budget is silent."""
    return had < 0.9 * wanted


def _ran_out(result: Measurement, budget: float) -> bool:
    """Whether ``result`` failed as its ``budget`` ran out: a reason of running out,
    reached at the end of the budget (a group's no_majority reached early is a verdict)."""
    return result.failure in _RUN_OUT_REASONS and result.duration >= max(0.9 * budget,
                                                                         budget - 0.1)


def _cut_short(result: Measurement, had: float, wanted: float) -> Measurement:
    """``result`` (a timeout) as a request with the larger budget ``wanted`` sees it: what
    was measured, and local_error, the burst having had only ``had``."""
    seen = Measurement()
    seen.samples, seen.reports = list(result.samples), list(result.reports)
    seen.packets_sent, seen.duration = result.packets_sent, result.duration
    seen.fail(Reason.LOCAL_ERROR, f"{_MAX_FLIGHTS} bursts of this module and target were in "
              f"flight; the one shared had a budget of {had:g}s, not this request's "
              f"{wanted:g}s, and failed as it ran out ({result.failure})")
    return seen


def _same_world(made: Config, now: Config | None) -> bool:
    """Whether a result made under ``made`` holds under ``now``: the same target policy,
    groups and leap file. A reload that changed none of them (a flood of them included)
    neither starts bursts nor loses results; the module is compared on its own."""
    if made is now:
        return True
    return now is not None and (made.policy, made.groups, made.leapfile) == (
        now.policy, now.groups, now.leapfile)


def _latest_end(module: Module, now: float, timeout: float) -> float:
    """When a probe of ``module`` started ``now`` is over at the latest."""
    return now + min(timeout, _full_budget(module))


def _full_budget(module: Module) -> float:
    """The budget with which a probe of ``module`` is never cut short: its own timeout, or
    the longest its burst can take when that is shorter."""
    longest = PROBERS[module.prober].longest
    return module.timeout if longest is None else min(module.timeout, longest(module))


class Coordinator:
    """Runs probes for the web layer; one instance per process."""

    def __init__(self, kod: KodTable | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.kod = kod if kod is not None else KodTable()
        self.leaps = LeapMemory()
        # Bursts in flight per key: usually one; see _MAX_FLIGHTS.
        self._flights: dict[_Key, list[_Flight]] = {}
        # Each entry lives as long as its module's min_probe_interval, and the cache is
        # bounded by an estimate of the bytes it holds, not by its number of entries.
        self._last: TLRUCache[_Key, _Cached] = TLRUCache(
            maxsize=cache_bytes, ttu=_expiry, timer=clock, getsizeof=_Cached.size)
        self._clock = clock
        # module name -> (module, guard) under the configuration object ``_guards_of``; a
        # reload replaces that object, and the guards are built again.
        self._guards: dict[str, tuple[Module, Guard]] = {}
        self._guards_of: Config | None = None
        # Told of the packets a cancelled burst had sent: no result counts them otherwise.
        self.on_cancelled: Callable[[Measurement], None] | None = None
        # Told of a request cancelled before its answer (its client hung up): its module,
        # target, seconds waited, the burst's log and what became of the burst.
        self.on_request_cancelled: Callable[[Module, Target, float, ProbeLog, str],
                                            None] | None = None
        # Told of a burst that ran to its end after every requester left (module name,
        # result): a probe run, which no request counts.
        self.on_unclaimed: Callable[[str, Measurement], None] | None = None
        self._orphans = 0  # bursts running on after every requester left

    @property
    def cached_bytes(self) -> int:
        """Estimated bytes held by the min_probe_interval cache (expired entries dropped)."""
        self._last.expire()
        return int(self._last.currsize)

    @property
    def orphaned_bursts(self) -> int:
        """Bursts running on after every requester left (see MAX_ORPHANED_BURSTS)."""
        return self._orphans

    @property
    def bursts_in_flight(self) -> int:
        """Distinct probes running now."""
        return sum(len(flights) for flights in self._flights.values())

    async def probe(self, config: Config, module: Module, target: Target,
                    timeout: float, *, again: bool = True) -> Outcome:
        """Probe ``target`` with ``module`` within ``timeout`` seconds (a request cancelled
        before its answer is told to :attr:`on_request_cancelled`). ``again``: whether a
        request handed a burst another's shorter budget cut short may look again."""
        # Keyed by the canonical target and the port it means, spelled out or not (a name
        # and its address are two keys); a reload that left the module, the policy, the
        # groups and the leap file as they were keeps its entries (they compare by value).
        key = (module.name, *server_key(module, target))
        if config is not self._guards_of:
            self._adopt(config)
        if module.min_probe_interval > 0:
            cached = self._last.get(key)
            # A result cut short by its budget (a scrape-timeout header anyone can send may
            # leave no time for a reply) is served only to requests with at most twice its
            # budget; a longer one probes afresh. So a short result never sticks, and the
            # budgets of the bursts in one interval at least double: a handful at most.
            if cached is not None and cached.module == module and (
                    cached.timeout >= _full_budget(module) or timeout <= 2 * cached.timeout):
                age = self._clock() - cached.stored
                if age < module.min_probe_interval:
                    return Outcome(cached.result, cached.log, age=age)
        loop = asyncio.get_running_loop()
        now = loop.time()
        flights = self._flights.get(key)
        # beyond: at the limit of bursts in flight, sharing one that may not fit this request.
        found, beyond = _joinable(flights, module, config, now, timeout) if flights else (
            None, False)
        shared = found is not None
        if found is None:
            guard = self._guard(config, module)
            found = _Flight(module, config, timeout, _latest_end(module, now, timeout),
                            log=ProbeLog(str(target), module.name))
            found.task = loop.create_task(self._run(key, found, target, module, timeout,
                                                    guard))
            # Its frame holds the flight that holds it: a cancellation must not stay.
            found.task.add_done_callback(drop_cancellation)
            self._flights.setdefault(key, []).append(found)
        flight = found
        waiter: asyncio.Future[_Result] = loop.create_future()
        flight.waiters.append(waiter)
        try:
            if shared:
                async with asyncio.timeout(timeout):
                    result, log, counted = await waiter
            else:
                # The burst keeps its own deadline; a second timeout here could only fire
                # alongside it when the loop is late, and throw its samples away.
                result, log, counted = await waiter
        except TimeoutError:
            # When the loop ran late, the burst's name took long to resolve, or the limit
            # of bursts in flight made this request share one that may outlast it.
            log = ProbeLog(str(target), module.name)
            log(f"joined the burst of an identical probe in flight, which outlasted this "
                f"request's timeout of {timeout:g}s (this log begins at that timeout)")
            result = Measurement()
            if beyond:
                # This exporter's limit (which keeps scrape timeouts from multiplying the
                # packets a server gets), not the server's silence: no timeout that pages
                # as NTPServerUnreachable.
                why = (f"{_MAX_FLIGHTS} bursts of this module and target were in flight, "
                       f"none sure to end within this request's budget of {timeout:g}s, and "
                       "the one shared outlasted it: nothing sent for it")
                log(f"{why}: local_error")
                result.fail(Reason.LOCAL_ERROR, why)
            else:
                result.fail(timeout_reason(module))
            result.duration = timeout
            counted = False
        except asyncio.CancelledError:
            fate = "it runs on for the other requests sharing it"
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Cancelled after its result came, before it resumed (its client hung up
                # at that moment): if it was the one to count the burst, it still does.
                fate = "it had just finished"
                result, _, counted = waiter.result()
                if counted and self.on_unclaimed is not None:
                    self.on_unclaimed(module.name, result)
            elif flight.task.done():
                fate = "it had ended"
            elif all(w.done() for w in flight.waiters if w is not waiter):
                if flight.orphaned:
                    # A request that joined it after its first ones left, left too.
                    fate = "it runs on to fill the min_probe_interval cache"
                elif module.min_probe_interval > 0 and self._orphans < MAX_ORPHANED_BURSTS:
                    # Run on: its result serves the next scrape. Cancelled, the burst
                    # would leave nothing cached, and clients that hang up at once could
                    # send a server a packet each, min_probe_interval or not.
                    flight.orphaned = True
                    self._orphans += 1
                    fate = "it runs on to fill the min_probe_interval cache"
                else:
                    fate = "it was stopped"
                    flight.task.cancel()
                    # Forget it now: a request arriving before the task unwinds must start
                    # a fresh burst, not join one that is being cancelled.
                    self._forget(key, flight)
            if self.on_request_cancelled is not None:
                self.on_request_cancelled(module, target, loop.time() - now, flight.log, fate)
            raise
        finally:
            flight.waiters.remove(waiter)
        if beyond and _much_shorter(flight.timeout, timeout) and _ran_out(result, flight.timeout):
            # A burst another request's shorter budget cut short, failed as its time ran
            # out (a timeout, a key exchange cut off): this request's budget might have had
            # the answer. Not the server's verdict, nor this request's. (One that failed
            # well within its budget, a group's no_majority of members that all answered,
            # is a verdict, passed on.) That burst is over: with time left, look again
            # (a burst of its own fits the limit now), once; else local_error.
            left = timeout - (loop.time() - now)
            if again and left >= _LOOK_AGAIN:
                retried = await self.probe(config, module, target, left, again=False)
                return dataclasses.replace(retried, waited=loop.time() - now)
            result = _cut_short(result, flight.timeout, timeout)
            log = ProbeLog(str(target), module.name)
            log(f"{result.failure_detail}: local_error")
        return Outcome(result, log, shared=shared, counted=counted,
                       waited=loop.time() - now if shared else None)

    def _forget(self, key: _Key, flight: _Flight) -> None:
        flights = self._flights.get(key)
        if flights is not None and flight in flights:
            flights.remove(flight)
            if not flights:
                del self._flights[key]

    def _adopt(self, config: Config) -> None:
        """A new configuration object (a reload): guards are built again, and results
        made under another target policy, leap file or group list are not served again."""
        old = self._guards_of
        if old is not None and not _same_world(old, config):
            self._last.clear()
        self._guards.clear()
        self._guards_of = config

    def _guard(self, config: Config, module: Module) -> Guard:
        # probe() has adopted ``config`` already.
        cached = self._guards.get(module.name)
        if cached is not None and cached[0] is module:
            return cached[1]
        guard = guard_for(config, module, self.kod, self.leaps)
        self._guards[module.name] = (module, guard)
        return guard

    async def _run(self, key: _Key, flight: _Flight, target: Target, module: Module,
                   timeout: float, guard: Guard) -> None:
        partial = Measurement()
        try:
            result, log = await run_probe(target, module, timeout, log=flight.log, guard=guard,
                                          measurement=partial)
        except asyncio.CancelledError:
            # The last request left, or the exporter is shutting down: whoever still
            # waits goes down with the burst rather than waiting for ever.
            for waiter in flight.waiters:
                waiter.cancel()
            if self.on_cancelled is not None:
                self.on_cancelled(partial)
            raise
        except Exception as exc:  # a prober's bug: every waiter gets it, as from the task
            for waiter in flight.waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
            return
        finally:
            self._forget(key, flight)
            if flight.orphaned:
                self._orphans -= 1
        # Not kept when a reload changed the world meanwhile (the target may be denied
        # now) or the module (no request is served it, and it would displace the new
        # module's result), nor over a result with a longer budget (bursts end in any order).
        kept = self._last.get(key) if module.min_probe_interval > 0 else None
        current = self._guards_of
        if module.min_probe_interval > 0 and current is not None and _same_world(
                flight.config, current) and current.modules.get(module.name) == module and (
                kept is None or kept.module != module or kept.timeout <= timeout):
            self._last[key] = _Cached(module, self._clock(), result, log, timeout)
        counted = False
        for waiter in flight.waiters:
            if not waiter.done():
                waiter.set_result((result, log, not counted))
                counted = True
        if not counted and self.on_unclaimed is not None:
            self.on_unclaimed(module.name, result)  # nobody took it: counted here
