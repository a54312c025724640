"""aiohttp application: routes only. NTP logic lives in the probers."""

from __future__ import annotations

import html
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import yaml
from aiohttp import web

from ntp_probe import __version__
from ntp_probe.config import Config, module_to_dict
from ntp_probe.metrics import CONTENT_TYPE, Internals, render
from ntp_probe.result import ProbeLog
from ntp_probe.runner import SCRAPE_TIMEOUT_HEADER, TimeoutHeaderError, probe_timeout, run_probe
from ntp_probe.targets import TargetError, parse_target

logger = logging.getLogger("ntp_probe.web")

DEFAULT_MODULE = "ntp"


@dataclass(slots=True)
class State:
    """What the handlers share; ``config`` is replaced whole on reload."""

    config: Config
    internals: Internals
    timeout_offset: float = 0.5
    max_concurrent: int = 100
    in_flight: int = 0


STATE: web.AppKey[State] = web.AppKey("state", State)


def _bad_request(reason: str) -> web.Response:
    return web.Response(status=400, text=reason + "\n")


async def probe_handler(request: web.Request) -> web.Response:
    """GET /probe?target=&module=[&debug=true]."""
    state = request.app[STATE]
    query = request.query
    raw_target = query.get("target", "")
    if not raw_target:
        return _bad_request("target parameter is missing")
    module_name = query.get("module", DEFAULT_MODULE) or DEFAULT_MODULE
    module = state.config.modules.get(module_name)
    if module is None:
        state.internals.module_unknown.inc()
        return _bad_request(f"unknown module {module_name!r}")
    try:
        target = parse_target(raw_target)
        timeout = probe_timeout(
            module.timeout, request.headers.get(SCRAPE_TIMEOUT_HEADER), state.timeout_offset
        )
    except (TargetError, TimeoutHeaderError) as exc:
        return _bad_request(str(exc))
    debug = query.get("debug", "").lower() in ("true", "1", "yes")
    if state.in_flight >= state.max_concurrent:
        state.internals.rejected.inc()
        return web.Response(
            status=503,
            text=f"too many probes in flight (--probe.max-concurrent={state.max_concurrent})\n",
        )
    state.in_flight += 1
    state.internals.in_flight.inc()
    try:
        log = ProbeLog(f"target={target} module={module_name}")
        result = await run_probe(target, module, timeout, log)
    finally:
        state.in_flight -= 1
        state.internals.in_flight.dec()
    state.internals.observe(module_name, result)
    body = render(result)
    if not debug:
        return web.Response(body=body.encode(), headers={"Content-Type": CONTENT_TYPE})
    text = (
        "Logs for the probe:\n" + log.text()
        + "\n\nMetrics that would have been returned:\n" + body
        + "\n\nModule configuration:\n"
        + yaml.safe_dump({module_name: module_to_dict(module)}, sort_keys=False)
    )
    return web.Response(text=text)


async def metrics_handler(request: web.Request) -> web.Response:
    """GET /metrics: the exporter's internals."""
    body = request.app[STATE].internals.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def healthy_handler(request: web.Request) -> web.Response:
    """GET /-/healthy and /-/ready."""
    return web.Response(text="OK\n")


async def index_handler(request: web.Request) -> web.Response:
    """GET /: a landing page with links."""
    state = request.app[STATE]
    modules = "".join(
        f"<li><code>{html.escape(name)}</code></li>" for name in state.config.modules
    )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>ntp_probe</title></head><body>"
        f"<h1>ntp_probe {html.escape(__version__)}</h1>"
        "<p>Probe an NTP server: <a href='probe?target=127.0.0.1&amp;module=ntp_fast&amp;"
        "debug=true'>probe?target=127.0.0.1&amp;module=ntp_fast&amp;debug=true</a></p>"
        "<p><a href='metrics'>Metrics</a></p>"
        f"<h2>Modules</h2><ul>{modules}</ul></body></html>"
    )
    return web.Response(text=page, content_type="text/html")


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """No traceback ever reaches a client: unexpected errors become a one-line 500."""
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception as exc:
        logger.exception("error handling %s", request.path_qs)
        return web.Response(status=500, text=f"internal error: {type(exc).__name__}\n")


def create_app(state: State) -> web.Application:
    """Build the application around shared state."""
    app = web.Application(middlewares=[error_middleware])
    app[STATE] = state
    app.router.add_get("/probe", probe_handler)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/-/healthy", healthy_handler)
    app.router.add_get("/-/ready", healthy_handler)
    app.router.add_get("/", index_handler)
    return app
