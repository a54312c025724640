"""aiohttp application: routes only. NTP logic lives in the probers."""

from __future__ import annotations

import asyncio
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from ntp_probe.config.load import config_to_yaml, config_warnings, load_config, module_to_dict
from ntp_probe.config.schema import Config, ConfigError, Module
from ntp_probe.engine.context import ProbeLog
from ntp_probe.engine.coordinator import Coordinator
from ntp_probe.engine.registry import resolve_target
from ntp_probe.engine.runner import SCRAPE_TIMEOUT_HEADER, TimeoutHeaderError, probe_timeout
from ntp_probe.engine.targets import Target, TargetError
from ntp_probe.exposition.internals import Internals
from ntp_probe.exposition.render import CONTENT_TYPE, render
from ntp_probe.web import pages
from ntp_probe.web.auth import WebConfig, WebConfigError, load_web_config
from ntp_probe.web.connections import ConnectionGuard
from ntp_probe.web.history import Entry, History

logger = logging.getLogger("ntp_probe.web")

DEFAULT_MODULE = "ntp"


@dataclass(slots=True)
class State:
    """What the handlers share; ``config`` is replaced whole on reload."""

    config: Config
    internals: Internals
    timeout_offset: float = 0.5
    max_concurrent: int = 100
    # Why the limit is what it is, when not the flag's value as given (the 503's words).
    max_concurrent_note: str = ""
    in_flight: int = 0
    config_path: str | None = None
    web_config_path: str | None = None  # --web.config.file: users and headers reload too
    coordinator: Coordinator = field(default_factory=Coordinator)
    history: History = field(default_factory=History)
    web_config: WebConfig = field(default_factory=WebConfig)
    # Told of each configuration a reload takes (the server raises its open-files limit).
    on_config: Callable[[Config], None] | None = None
    reload_failure: tuple[float, str] | None = None  # (when, why) of a failed last reload
    _reloading: asyncio.Lock = field(default_factory=asyncio.Lock)
    _reloads: set[asyncio.Future[str | None]] = field(default_factory=set)
    _queued: asyncio.Future[str | None] | None = None  # a reload not yet reading the file
    # /config's text for one configuration: rendered once, off the event loop (thousands
    # of modules take seconds in PyYAML, and every request would wait).
    _config_yaml: tuple[Config, asyncio.Future[str]] | None = None

    def _cancelled(self, module: Module, target: Target, waited: float, log: ProbeLog,
                   fate: str) -> None:
        """A request whose client hung up (or the server is stopping): listed with the
        burst's log so far, as blackbox lists it, so that a scrape Prometheus gave up on
        can still be looked into."""
        note = (f"The client hung up after {waited:.3f} s, before the answer. The log is "
                f"the burst's: {fate}.")
        logger.debug("probe of %s (module %s) cancelled: the client hung up after %.3fs",
                     target, module.name, waited)
        self.history.add_cancelled(module.name, str(target), waited, log, module, note)

    def __post_init__(self) -> None:
        # The leap file was read with the configuration (off the event loop).
        self.internals.use_leapfile(self.config.leapfile)
        # Read when /metrics is scraped: no gauge update on every probe's way in and out.
        self.internals.in_flight.set_function(lambda: self.in_flight)
        self.coordinator.on_cancelled = self.internals.count_packets
        self.coordinator.on_request_cancelled = self._cancelled
        self.coordinator.on_unclaimed = self.internals.observe

    async def config_yaml(self) -> str:
        """The loaded configuration as YAML, rendered once per configuration."""
        config = self.config
        if self._config_yaml is None or self._config_yaml[0] is not config:
            rendering = asyncio.ensure_future(asyncio.to_thread(config_to_yaml, config))
            self._config_yaml = (config, rendering)
        return await asyncio.shield(self._config_yaml[1])

    async def reload(self) -> str | None:
        """Reload the configuration file; on error keep the old one and return why.

        The file is read and parsed in a thread: a slow disk or a huge file must not
        stall the probes in flight. Reloads run one at a time, and a reload goes on to the
        end when its caller goes away (a client of POST /-/reload that hung up). Callers
        that come while one waits to start share it: a flood of POST /-/reload is one more
        reload, not one each (a reload already reading may have missed the change, so one
        more always follows it).
        """
        task = self._queued
        if task is None:
            task = self._queued = asyncio.ensure_future(self._reload())
            self._reloads.add(task)
            task.add_done_callback(self._reloads.discard)
            task.add_done_callback(self._unqueue)
        return await asyncio.shield(task)

    async def _read_web_config(self) -> WebConfig | None:
        """--web.config.file read again with the modules (None when there is none)."""
        if self.web_config_path is None:
            return None
        # In a thread: checking the bcrypt hashes is deliberately slow.
        return await asyncio.to_thread(load_web_config, self.web_config_path)

    def _unqueue(self, task: asyncio.Future[str | None]) -> None:
        if self._queued is task:  # ended before it started (cancelled at shutdown)
            self._queued = None

    async def _reload(self) -> str | None:
        async with self._reloading:
            if self._queued is asyncio.current_task():
                self._queued = None  # reading now: later callers queue the next one
            # Both files or neither: a reload that could not take the web config (a
            # password rotation that failed) must say so, not answer OK. Both are read, so
            # that the answer names every problem at once, as --config.check does.
            problems: list[str] = []
            try:
                config = await asyncio.to_thread(load_config, self.config_path)
            except ConfigError as exc:
                for line in str(exc).splitlines():
                    logger.error("reload failed, keeping the previous configuration: %s", line)
                problems.append(str(exc))
            except Exception as exc:  # a loader bug: still a failed reload, still reported
                logger.exception("reload failed, keeping the previous configuration")
                problems.append(f"{self.config_path}: cannot be loaded: {type(exc).__name__}")
            try:
                web_config = await self._read_web_config()
            except WebConfigError as exc:
                logger.error("reload failed, keeping the previous configuration: web config: "
                             "%s", exc)
                why = str(exc)  # a YAML error names the file already
                problems.append(why if why.startswith(f"{self.web_config_path}:") else
                                f"{self.web_config_path}: {why}")
            if problems:
                return self._failed("; ".join(problems))
            if web_config is not None:
                later = self.web_config.restart_needed(web_config)
                if later:
                    # Nothing taken, and said so: a reload that answered OK would read as
                    # done to whoever automates it.
                    why = (f"{self.web_config_path}: a restart is needed for "
                           f"{'; '.join(later)}")
                    logger.error("reload failed, keeping the previous configuration: %s", why)
                    return self._failed(why)
                self.web_config.adopt(web_config)  # new users, passwords, headers: now
            self.config, self.reload_failure = config, None
            if self.on_config is not None:
                self.on_config(config)
            self.internals.config_loaded(tuple(config.modules))
            self.internals.use_leapfile(config.leapfile)
            logger.info("reloaded %d module%s from %s", len(config.modules),
                        "" if len(config.modules) == 1 else "s", config.source)
            for warning in config_warnings(config, time.time()):
                logger.warning("%s", warning)
            return None

    def _failed(self, why: str) -> str:
        """Record a failed reload (the old configuration stays); ``why`` back."""
        self.internals.config_failed()
        self.reload_failure = (time.time(), why)
        return why


STATE: web.AppKey[State] = web.AppKey("state", State)


def _bad_request(reason: str) -> web.Response:
    return web.Response(status=400, text=reason + "\n")


async def probe_handler(request: web.Request) -> web.Response:
    """GET /probe?target=&module=[&debug=true]."""
    state = request.app[STATE]
    query = request.query
    # The module first, as blackbox: an unknown one is counted even without a target.
    module_name = query.get("module", DEFAULT_MODULE) or DEFAULT_MODULE
    config = state.config
    module = config.modules.get(module_name)
    if module is None:
        state.internals.module_unknown.inc()
        return _bad_request(f"unknown module {module_name[:64]!r} "
                            f"(known: {', '.join(config.modules)})")
    raw_target = query.get("target", "")
    if not raw_target:
        return _bad_request("target parameter is missing")
    try:
        target = resolve_target(config, module, raw_target)
        timeout = probe_timeout(
            module.timeout, request.headers.get(SCRAPE_TIMEOUT_HEADER), state.timeout_offset
        )
    except (TargetError, TimeoutHeaderError) as exc:
        return _bad_request(str(exc))
    # Exactly "true", as blackbox reads it: a scrape config's debug=1 must still get the
    # exposition Prometheus can parse, not the debug page.
    debug = query.get("debug") == "true"
    if state.in_flight >= state.max_concurrent:
        state.internals.rejected.inc()
        limit = (f"{state.max_concurrent}{state.max_concurrent_note}"
                 if state.max_concurrent_note
                 else f"--probe.max-concurrent={state.max_concurrent}")
        return web.Response(status=503, text=f"too many probes in flight ({limit})\n")
    state.in_flight += 1
    try:
        outcome = await state.coordinator.probe(config, module, target, timeout)
    finally:
        state.in_flight -= 1
    result, log = outcome.result, outcome.log
    if outcome.counted:
        state.internals.observe(module_name, result)
    body = render(result, outcome.age, outcome.waited)
    # The log is the earlier probe's, or the shared burst's: said wherever it is shown.
    note = "" if outcome.age is None and not outcome.shared else (
        f"Served from the min_probe_interval cache: result age {outcome.age:.1f} s, nothing "
        "sent. The log is the earlier probe's." if outcome.age is not None else
        "Shared the burst of an identical probe already in flight: no extra packet was sent.")
    entry = state.history.add(module_name, str(target), result, log, body, module, note)
    if not debug:
        return _exposition(request, body.encode())
    return web.Response(text=pages.debug_text(entry, module_to_dict(module), body))


async def metrics_handler(request: web.Request) -> web.Response:
    """GET /metrics: the exporter's internals, rendered off the event loop: each module
    has 19 series, and thousands of modules take a second to render, which probes in
    flight would otherwise wait out (and read as their servers' timeouts)."""
    return _exposition(request, await asyncio.to_thread(request.app[STATE].internals.render))


def _exposition(request: web.Request, body: bytes) -> web.Response:
    """A text exposition, gzip-compressed when the scraper accepts it (Prometheus always
    does), as client_golang's handler answers."""
    accepted = request.headers.get("Accept-Encoding")
    if accepted and _accepts_gzip(accepted):
        # Compressed here, at once: aiohttp's own compression hands a body of more than
        # 4 KiB to a thread, and zlib's default 32 KiB window and memory level set up about
        # 256 KiB of state per stream. An exposition of a few KiB compresses as well with
        # an 8 KiB window, at a quarter of the cost (about 30 us).
        packer = zlib.compressobj(1, zlib.DEFLATED, 16 + 13, 4)
        return web.Response(body=packer.compress(body) + packer.flush(),
                            headers={"Content-Type": CONTENT_TYPE, "Content-Encoding": "gzip"})
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def _accepts_gzip(header: str) -> bool:
    for part in header.split(","):
        name, _, params = part.partition(";")
        if name.strip().lower() == "gzip":
            q = params.strip().lower().removeprefix("q=")
            try:
                return not params.strip() or float(q) > 0
            except ValueError:
                return False
    return False


async def healthy_handler(request: web.Request) -> web.Response:
    """GET /-/healthy and /-/ready."""
    return web.Response(text="OK\n")


async def reload_handler(request: web.Request) -> web.Response:
    """POST /-/reload: reload the config file; 500 with the reason if it is bad."""
    error = await request.app[STATE].reload()
    if error is not None:
        return web.Response(status=500, text=f"failed to reload config: {error}\n")
    return web.Response(text="OK\n")


async def config_handler(request: web.Request) -> web.Response:
    """GET /config: the loaded configuration as YAML."""
    return web.Response(text=await request.app[STATE].config_yaml(), content_type="text/plain")


def _as_kept(config: Config, raw: str, module_name: str | None) -> str:
    """A target as /probe keeps it in the history (``LOCALHOST:123``, ``::1`` and a group
    list with spaces are kept as ``localhost:123``, ``[::1]`` and without them), so that
    /logs finds a probe by the target as its request named it."""
    named = config.modules.get(module_name) if module_name is not None else None
    modules = [named] if named is not None else list(config.modules.values())
    for module in modules:
        try:
            return str(resolve_target(config, module, raw))
        except TargetError:
            continue
    return raw


async def logs_handler(request: web.Request) -> web.Response:
    """GET /logs?id=N, or ?target=T[&module=M] for the newest kept probe of a target (as
    blackbox_exporter 0.25): one recent probe's log and metrics; a page for browsers, the
    debug=true text for every other client (curl, scripts)."""
    wants_html = "text/html" in request.headers.get("Accept", "")

    def answer(status: int, title: str, text: str) -> web.Response:
        if wants_html:
            return web.Response(status=status, text=pages.message_page(title, text),
                                content_type="text/html", headers={"Vary": "Accept"})
        return web.Response(status=status, text=text + "\n", headers={"Vary": "Accept"})

    state = request.app[STATE]
    history = state.history
    if "id" not in request.query and "target" in request.query:
        target, module = request.query["target"], request.query.get("module") or None
        entry = history.latest(_as_kept(state.config, target, module), module)
        if entry is None:
            of = f" with module {module!r}" if module is not None else ""
            return answer(404, "No such probe",
                          f"no probe of target {target!r}{of} is in the history "
                          f"(--history.limit={history.limit})")
        return _log_answer(entry, wants_html)
    raw = request.query.get("id", "")
    # Bounded: int() of thousands of digits is refused by Python (a 500); any shorter
    # number is an id, if one never issued (404).
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 64):
        return answer(400, "Bad request", "id parameter must be a probe number (or give "
                      "target, and optionally module, for the newest probe of a target)")
    entry_id = int(raw)
    entry = history.get(entry_id)
    if entry is None and not history.issued(entry_id):
        # Ids restart at 0 with the process: an old link may name one never issued here.
        ran = history.issued_count
        return answer(404, "No such probe",
                      f"probe {entry_id} never ran: " + (
                          f"the probes since the exporter started are 0 to {ran - 1}" if ran
                          else "no probe has run since the exporter started"))
    if entry is None:
        return answer(404, "Probe no longer kept",
                      f"probe {entry_id} is no longer in the history "
                      f"(--history.limit={history.limit}: the last {history.limit} probes "
                      "and as many failures are kept)")
    return _log_answer(entry, wants_html)


def _log_answer(entry: Entry, wants_html: bool) -> web.Response:
    settings = module_to_dict(entry.definition) if entry.definition is not None else {}
    if wants_html:
        return web.Response(text=pages.log_page(entry, settings), content_type="text/html",
                            headers={"Vary": "Accept"})
    return web.Response(text=pages.debug_text(entry, settings), headers={"Vary": "Accept"})


async def index_handler(request: web.Request) -> web.Response:
    """GET /: landing page with a probe form, the recent probes and the modules."""
    state = request.app[STATE]
    return web.Response(text=pages.landing(state.config, state.history, DEFAULT_MODULE,
                                           state.reload_failure),
                        content_type="text/html")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _served(handler: Handler, guard: ConnectionGuard | None, probe: bool = False) -> Handler:
    """``handler`` as every route answers: its connection kept busy while it runs (not
    timed out or evicted), and no traceback ever reaching a client (an unexpected error is
    a one-line 500).

    A wrapper per route, not aiohttp middlewares: each middleware is one more coroutine
    per request (and one more held by every probe in flight), aiohttp's own current-app
    middleware included, which it leaves out when there are none.
    """
    async def serve(request: web.Request) -> web.StreamResponse:
        conn = guard.serving(request, probe) if guard is not None else None
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception as exc:
            logger.exception("error handling %s", request.path_qs)
            return web.Response(status=500, text=f"internal error: {type(exc).__name__}\n")
        finally:
            if conn is not None and guard is not None:
                guard.served(conn, probe)

    return serve


async def _nosniff(request: web.Request, response: web.StreamResponse) -> None:
    # Every answer, the router's 404s and 405s and auth's 401s included: never let a
    # browser guess that a text answer echoing a parameter is HTML.
    response.headers["X-Content-Type-Options"] = "nosniff"


def _nosniff_answered(guard: ConnectionGuard) -> Callable[..., Awaitable[None]]:
    """_nosniff, and the guard told that the connection's request is answered: the
    router's 404s and 405s pass no handler that would tell it (one signal for both, a
    coroutine fewer per request)."""
    async def answered(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["X-Content-Type-Options"] = "nosniff"
        guard.answered(request)

    return answered


def _busy(guard: ConnectionGuard) -> Callable[..., Awaitable[web.StreamResponse]]:
    """The guard's busy marking as a middleware, for when it must cover other middlewares."""

    @web.middleware
    async def busy(request: web.Request, handler: Handler) -> web.StreamResponse:
        probe = request.path == "/probe"
        conn = guard.serving(request, probe)
        try:
            return await handler(request)
        finally:
            if conn is not None:
                guard.served(conn, probe)

    return busy


def create_app(state: State, guard: ConnectionGuard | None = None) -> web.Application:
    """Build the application around shared state; ``guard`` watches the connections."""
    auth = state.web_config.middleware()
    headers = _nosniff if guard is None else _nosniff_answered(guard)
    if auth is None:
        app = web.Application()
    else:
        # The password check may wait in a queue: the connection is busy from before it,
        # or a flood of idle connections could evict a client waiting for its check.
        app = web.Application(middlewares=[*([_busy(guard)] if guard else []), auth])
        guard = None
    app.on_response_prepare.append(headers)
    if state.web_config.headers:
        app.on_response_prepare.append(state.web_config.add_headers)
    app[STATE] = state
    for path, handler in (("/probe", probe_handler), ("/metrics", metrics_handler),
                          ("/-/healthy", healthy_handler), ("/-/ready", healthy_handler),
                          ("/config", config_handler), ("/logs", logs_handler),
                          ("/", index_handler)):
        # Any method, as Go's handlers (blackbox registers these with HandleFunc): a POST
        # to /probe runs the probe; only /-/reload asks for one method.
        app.router.add_route("*", path, _served(handler, guard, handler is probe_handler))
    app.router.add_post("/-/reload", _served(reload_handler, guard))
    return app
