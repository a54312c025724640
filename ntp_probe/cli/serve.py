"""``ntp-probe [serve]``: the exporter's HTTP server, signals and systemd notifications."""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import ipaddress
import logging
import os
import resource
import signal
import socket
from collections.abc import Callable

from aiohttp import web

from ntp_probe import __version__
from ntp_probe.cli import sdnotify
from ntp_probe.config.schema import MAX_GROUP_MEMBERS, Config
from ntp_probe.engine.runner import limit_probe_sockets
from ntp_probe.exposition.internals import Internals
from ntp_probe.web.app import State, create_app
from ntp_probe.web.auth import WebConfigError, load_web_config
from ntp_probe.web.connections import ConnectionGuard, GuardedSite, quiet_bad_requests
from ntp_probe.web.history import History

logger = logging.getLogger("ntp_probe")


# Descriptors kept free beside the HTTP connections and the probes' sockets: the listening
# socket, logs, the resolver's threads and the like (a quarter of a very low limit).
_SPARE_FDS = 64
# asyncio accepts up to the listen backlog in one pass, and sets up and closes what the
# guard refuses only in the passes after: room for two passes is kept beside the cap, and
# a low open-files limit gets a smaller backlog rather than a cap of almost nothing.
_LISTEN_BACKLOG = 128
_MIN_BACKLOG = 8
_SHUTDOWN_GRACE = 1.0
_SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): the first socket systemd passes
_GC_YOUNG_THRESHOLD = 50_000
# A full collection this often whatever the thresholds: with them a full one comes only
# when the old generation grew by a quarter, which any garbage cycle that reached it (kept
# alive by a cache until it expired) makes rarer as such garbage piles up. Known sources
# are mended; this bounds what an unknown one could hold to a minute's worth.
FULL_COLLECTION_INTERVAL = 60.0


async def collect_fully(interval: float) -> None:
    """Run the cyclic collector over every generation each ``interval`` seconds, until
    cancelled."""
    while True:
        await asyncio.sleep(interval)
        gc.collect()


def probe_sockets(config: Config) -> int:
    """The most sockets one probe of ``config`` holds at once: one, but one per member of
    a group, one per address of an all_addresses probe, and two for NTS (the key
    exchange's, and the NTP exchange's counted before it)."""
    most = 1
    for module in config.modules.values():
        if module.prober == "ntp_group":
            most = max(most, MAX_GROUP_MEMBERS)
        elif module.prober == "nts":
            most = max(most, 2)
        elif module.ntp.all_addresses:
            most = max(most, module.ntp.max_addresses)
    return most


def _raise_open_files(need: int) -> int:
    """Raise the soft open-files limit towards ``need`` (up to the hard limit); the soft
    limit now (RLIM_INFINITY included)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def _spare(soft: int) -> int:
    """Descriptors kept free: _SPARE_FDS, or a quarter of a very low limit."""
    return min(_SPARE_FDS, soft // 4)


def _probe_room(soft: int, connections: int, backlog: int) -> int | None:
    """The probe sockets the open-files limit leaves beside the connections, their accept
    passes and the spare (None: no limit)."""
    if soft == resource.RLIM_INFINITY:
        return None
    return max(1, soft - _spare(soft) - connections - 2 * backlog)


def _fit_open_files(max_connections: int, probe_fds: int) -> tuple[int, int]:
    """The connection cap and the listen backlog, kept below the open-files limit (raised
    towards the hard limit when it is too low), so that running out of descriptors cannot
    stop the exporter: with too few, connections and the probes' sockets (``probe_fds`` at
    most) share them, and a probe past its share fails on its own (local_error). The
    probes' share is enforced (:func:`limit_probe_sockets`)."""
    need = max_connections + probe_fds + _SPARE_FDS + 2 * _LISTEN_BACKLOG
    soft = _raise_open_files(need)
    if soft == resource.RLIM_INFINITY or soft >= need:
        limit_probe_sockets(_probe_room(soft, max_connections, _LISTEN_BACKLOG))
        return max_connections, _LISTEN_BACKLOG
    room = max(0, soft - _spare(soft))
    connections_room = room - min(probe_fds, room // 2)
    backlog = max(_MIN_BACKLOG, min(_LISTEN_BACKLOG, connections_room // 8))
    # Two at least: one for a probe, one for /metrics and /-/healthy.
    fitted = max(min(2, max_connections), min(max_connections, connections_room - 2 * backlog))
    limit_probe_sockets(_probe_room(soft, fitted, backlog))
    logger.warning("open-files limit %d is too low for --web.max-connections=%d and %d "
                   "probe sockets (--probe.max-concurrent, groups and all_addresses): "
                   "serving at most %d connections, accepting %d at a time (raise "
                   "LimitNOFILE / ulimit -n)", soft, max_connections, probe_fds, fitted,
                   backlog)
    return fitted, backlog


def unrestricted(host: str | None, config: Config) -> bool:
    """Whether the exporter listens on every address while no allowed_targets limits what
    it may be asked to probe (an open UDP reflector for whoever reaches the port)."""
    if host is not None and not _unspecified(host):
        return False
    return not config.policy.allowed and not all(
        m.policy.allowed for m in config.modules.values())


def listening_hosts(inherited: list[socket.socket],
                    listen: list[tuple[str | None, int]]) -> list[str | None]:
    """The addresses served on: systemd's sockets by where they are bound (the shipped
    unit's ListenStream=9559 is every address; a unix socket, which no one reaches over a
    network, is left out), else the --web.listen-address hosts."""
    if inherited:
        return [s.getsockname()[0] for s in inherited
                if s.family in (socket.AF_INET, socket.AF_INET6)]
    return [host for host, _ in listen]


def parse_listen(address: str) -> tuple[str | None, int]:
    """``:9559``, ``0.0.0.0:9559``, ``[::1]:9559`` -> (host or None for all, port)."""
    host, sep, port_text = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]") and len(host) > 2
    if (not sep or not (port_text.isascii() and port_text.isdigit())
            or int(port_text) > 65535 or len(port_text) > 5
            # An IPv6 address only in brackets, as Go's SplitHostPort wants it.
            or (not bracketed and any(c in host for c in ":[]"))):
        raise ValueError(f"invalid listen address {address!r} (expected [HOST]:PORT, "
                         "an IPv6 host in brackets)")
    if bracketed:
        host = host[1:-1]
    # A wildcard of either family is every address of both, as Go listens on one (a
    # dual-stack socket): [::] alone would leave IPv4 scrapers out, and on a host without
    # IPv6 serve no one.
    return (None if _unspecified(host) else host), int(port_text)


def _unspecified(host: str) -> bool:
    """Whether ``host`` is empty or an unspecified address however spelt (::0, 0:0::0)."""
    if not host:
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def systemd_sockets() -> list[socket.socket]:
    """The listening sockets systemd passed (LISTEN_PID/LISTEN_FDS, from fd 3 on).

    Raises OSError naming the descriptor when one of them is not a socket."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    out = []
    for fd in range(_SD_LISTEN_FDS_START, _SD_LISTEN_FDS_START + count):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            raise OSError(exc.errno, f"descriptor {fd} from LISTEN_FDS: "
                                     f"{exc.strerror or exc}") from None
        # A datagram socket, or a stream socket never bound (listen() would bind it to a
        # random port on every address), is a unit file's mistake, not a place to serve.
        if sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise OSError(errno.EPROTOTYPE, f"descriptor {fd} from LISTEN_FDS: not a stream "
                                            "socket (ListenStream= in the .socket unit)")
        name = sock.getsockname()
        if (name[1] == 0 if sock.family in (socket.AF_INET, socket.AF_INET6)
                else sock.family == socket.AF_UNIX and not name):
            sock.detach()
            raise OSError(errno.EDESTADDRREQ, f"descriptor {fd} from LISTEN_FDS: not bound "
                                              "to an address")
        out.append(sock)
    return out


async def serve(args: argparse.Namespace, config: Config,
                early_hup: Callable[[], bool] = lambda: False) -> int:
    """Serve until SIGINT/SIGTERM; SIGHUP reloads the configuration. ``early_hup`` says
    whether a SIGHUP came during start-up, before this could handle it: one reload then."""
    inherited: list[socket.socket] = []
    if args.systemd_socket:
        try:
            inherited = systemd_sockets()
        except OSError as exc:
            logger.error("--web.systemd-socket: %s", exc.strerror)
            return 1
        if not inherited:
            logger.error("--web.systemd-socket: systemd passed no socket (LISTEN_FDS)")
            return 1
    try:
        listen = [parse_listen(a) for a in args.listen]
    except ValueError as exc:
        logger.error("%s", exc)
        return 1
    for i, (given, parsed) in enumerate(zip(args.listen, listen, strict=True)):
        if parsed[0] is None and parsed in listen[:i]:
            # Two wildcards on one port (0.0.0.0:P and [::]:P): one address, every one of
            # both families; the bind error would name the first, which did bind.
            first = args.listen[listen.index(parsed)]
            logger.error("cannot listen on %s: %s already listens on every address of "
                         "both families on that port", given, first)
            return 1
    try:
        web_config = load_web_config(args.web_config_file)
    except WebConfigError as exc:
        logger.error("invalid web configuration: %s", exc)
        return 1
    internals = Internals()
    internals.config_loaded(tuple(config.modules))
    state = State(config=config, internals=internals, timeout_offset=args.timeout_offset,
                  max_concurrent=args.max_concurrent, config_path=args.config_file,
                  history=History(args.history_limit), web_config=web_config,
                  web_config_path=args.web_config_file)
    max_connections, backlog = _fit_open_files(
        args.max_connections, args.max_concurrent * probe_sockets(config))

    def reloaded(new: Config) -> None:
        # A reload may bring groups: their sockets need room too.
        need = (max_connections + args.max_concurrent * probe_sockets(new) + _SPARE_FDS
                + 2 * backlog)
        soft = _raise_open_files(need)
        limit_probe_sockets(_probe_room(soft, max_connections, backlog))
        if soft != resource.RLIM_INFINITY and soft < need:
            logger.warning("open-files limit %d is below the %d this configuration may need "
                           "(probes past it fail with local_error; raise LimitNOFILE / "
                           "ulimit -n)", soft, need)

    state.on_config = reloaded
    if max_connections < 2:
        logger.warning("--web.max-connections=1: while a probe runs, /metrics and "
                       "/-/healthy cannot connect")
    elif max_connections <= args.max_concurrent:
        # /metrics and /-/healthy are never limited: one connection is kept from probes.
        state.max_concurrent = max_connections - 1
        state.max_concurrent_note = (f": --probe.max-concurrent={args.max_concurrent}, held "
                                     f"below --web.max-connections={max_connections}")
        logger.warning("--web.max-connections=%d does not exceed --probe.max-concurrent=%d: "
                       "at most %d probes in flight (more get 503), so that /metrics and "
                       "/-/healthy can still connect", max_connections, args.max_concurrent,
                       state.max_concurrent)
    # Up to one accept pass of connections may wait for a slot: the descriptors fitted
    # for a second pass (_fit_open_files) hold them.
    guard = ConnectionGuard(max_connections=max_connections, header_timeout=args.header_timeout,
                            idle_timeout=args.idle_timeout, max_waiting=backlog)
    guard.before_tls = web_config.refresh_tls
    loop = asyncio.get_running_loop()
    quiet_bad_requests()
    # handler_cancellation: a client that hangs up cancels its probe (and closes its socket).
    # shutdown_timeout: at SIGTERM, probes in flight get this long, then are cancelled.
    runner = web.AppRunner(create_app(state, guard), access_log=None,
                           handler_cancellation=True, keepalive_timeout=args.idle_timeout,
                           shutdown_timeout=_SHUTDOWN_GRACE)
    await runner.setup()
    if inherited:
        sites = [GuardedSite(runner, None, 0, guard, ssl_context=web_config.ssl_context,
                             backlog=backlog,
                             sock=s) for s in inherited]
    else:
        sites = [GuardedSite(runner, host, port, guard, ssl_context=web_config.ssl_context,
                             backlog=backlog)
                 for host, port in listen]
    for site in sites:
        try:
            await site.start()
        except OSError as exc:
            logger.error("cannot listen on %s: %s", site.name, exc.strerror or exc)
            await runner.cleanup()
            return 1
    urls = [url for site in sites for url in site.urls()]
    logger.info("listening on %s with %d module%s from %s (version %s); landing page %s/",
                ", ".join(urls), len(config.modules), "" if len(config.modules) == 1 else "s",
                config.source, __version__, urls[0])
    if any(unrestricted(host, config) for host in listening_hosts(inherited, listen)):
        logger.warning("listening on every address with no allowed_targets: anyone who can "
                       "reach this port can make the exporter send NTP packets to any "
                       "address (see the README's target policy section)")
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[None]] = set()
    queued = False  # a reload is waiting to start: it will read the file as it is then
    gate = asyncio.Lock()

    async def reload_on_signal() -> None:
        nonlocal queued
        async with gate:
            queued = False
            if not stop.is_set():  # a SIGTERM handled after the SIGHUP, before this ran
                await state.reload()

    def on_sighup() -> None:
        nonlocal queued
        if queued:  # a storm of signals is one reload more, not one each
            return
        queued = True
        task = loop.create_task(reload_on_signal())
        reloads.add(task)  # a reference until it is done, or it may vanish mid-run
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_sighup)
    if early_hup():  # the file may have changed since it was read: read it again
        on_sighup()
    # asyncio's wake-up pipe fills under a signal storm; CPython's default then warns from
    # inside the C signal handler, which can deadlock the process (bpo-30050) and writes
    # tracebacks. A full pipe already means a wake-up is pending: nothing is lost.
    signal.set_wakeup_fd(signal.set_wakeup_fd(-1), warn_on_full_buffer=False)
    # Everything built so far (modules, the app, the config) lives as long as the process:
    # keep it out of the cyclic collector's full passes, which otherwise walk it every few
    # hundred probes (the probe history keeps objects alive long enough to reach gen 2).
    gc.collect()
    gc.freeze()
    # Reference counting frees nearly everything a probe allocates; what the young
    # collections mostly walk is the objects of the probes in flight, again and again.
    # Collecting after 50,000 allocations rather than 700 keeps cycles bounded (a few
    # dozen probes' worth) at a small fraction of the cost.
    gc.set_threshold(_GC_YOUNG_THRESHOLD, 20, 20)
    collector = loop.create_task(collect_fully(FULL_COLLECTION_INTERVAL))
    sdnotify.notify("READY=1")
    watchdog = sdnotify.start_watchdog()
    await stop.wait()
    collector.cancel()
    logger.info("shutting down")
    # From here a SIGHUP (logrotate, a configuration tool) neither reloads nor, once the
    # loop is closed and asyncio has put the default action back, ends the process by
    # signal instead of its clean exit.
    loop.remove_signal_handler(signal.SIGHUP)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sdnotify.notify("STOPPING=1")
    await sdnotify.stop_watchdog(watchdog)
    await runner.cleanup()
    guard.close()
    return 0
