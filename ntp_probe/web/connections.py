"""Keep idle and slow HTTP clients from taking the exporter down.

aiohttp waits for a new connection's first request for ever and keeps idle keep-alive
connections for about an hour, and accepts connections until the process runs out of
file descriptors; then nothing, not even /-/healthy, gets through. This module puts
every connection under a :class:`ConnectionGuard`:

- a connection must complete its request headers within ``header_timeout`` of
  connecting, and the next request's within ``idle_timeout`` of the last response;
  otherwise it is closed (the checks run on a timer, not per byte);
- at most ``max_connections`` are open; a new one beyond that evicts the oldest
  connection that is idle (no request begun) or slow (a request begun and not complete
  within a grace), so a real request still gets in; a connection whose request has just
  come in is never evicted for a newer one. When none can go, the new connection waits
  for a free slot, unread, in a short queue; when that is full too, the exporter stops
  accepting (:class:`Acceptor`) and new connections wait in the kernel's listen queue,
  as on Go's servers at their limit, instead of being reset;
- accepting out of descriptors (EMFILE) pauses accepting for a second and is logged
  once per interval as one line (asyncio's own accept loop logs a traceback each time).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import select
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, InvalidURLError, LineTooLong
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from ntp_probe.engine.tasks import drop_cancellation

logger = logging.getLogger("ntp_probe.web")

_LOG_INTERVAL = 10.0  # seconds between two log lines about the same kind of trouble

# A plain-HTTP request on a TLS port (an http:// scrape of an https:// exporter) gets Go's
# answer, as exporter-toolkit's servers give it: recognised by its first five bytes, which
# no TLS record starts with.
_HTTP_STARTS = (b"GET /", b"HEAD ", b"POST ", b"PUT /", b"OPTIO")
_NOT_TLS = b"HTTP/1.0 400 Bad Request\r\n\r\nClient sent an HTTP request to an HTTPS server.\n"
_PIECES_WAIT, _PIECE_INTERVAL = 20, 0.05  # how long the first five bytes may take in pieces


class FirstBytes:
    """Waits for the first bytes of TLS connections before their handshake, through one
    epoll set the event loop watches by its one descriptor: a connection that sends
    nothing costs no descriptor beyond its own (the transport, paused, owns that one, so
    the loop cannot watch it directly)."""

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._waiting: dict[int, asyncio.Future[None]] = {}

    def watch(self, fd: int) -> asyncio.Future[None]:
        """A future done when ``fd`` can be read (or is closed by its peer); the caller
        hands it to :meth:`forget`, before the descriptor is closed at the latest."""
        loop = asyncio.get_running_loop()
        if self._epoll is None:
            self._epoll = select.epoll()
            loop.add_reader(self._epoll.fileno(), self._ready)
        ready: asyncio.Future[None] = loop.create_future()
        self._waiting[fd] = ready
        self._epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLONESHOT)
        return ready

    @staticmethod
    def peek(fd: int) -> bytes:
        """Up to five bytes waiting on ``fd``, left there for TLS to read (b"" at end of
        file)."""
        return _peek(fd, 5)

    def forget(self, fd: int, ready: asyncio.Future[None]) -> None:
        """Stop waiting on ``fd`` for ``ready``: called before the descriptor is closed (it
        may be reused by the next connection at once)."""
        if self._waiting.get(fd) is ready:
            del self._waiting[fd]
            if self._epoll is not None:
                with contextlib.suppress(OSError):
                    self._epoll.unregister(fd)

    def _ready(self) -> None:
        assert self._epoll is not None
        for fd, _ in self._epoll.poll(0):
            ready = self._waiting.get(fd)
            if ready is not None and not ready.done():
                ready.set_result(None)

    def close(self) -> None:
        """Stop watching (at shutdown)."""
        if self._epoll is not None:
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                asyncio.get_running_loop().remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None


@dataclass(slots=True)
class _Conn:
    transport: asyncio.BaseTransport
    deadline: float  # loop time by which the next request's headers must be in
    busy: int = 0  # requests being served
    probing: int = 0  # of them, probes (a hang-up cancels those; other answers still go)
    # Loop time a request not yet dispatched began: its first bytes, or the connection's
    # admission (a client sends its request just after connecting). None: none begun.
    since: float | None = None
    partial: bool = False  # bytes of that request came, not yet its whole head
    tail: bytes = b""  # the last bytes received: a head's end may span two reads
    heard: bool = False  # anything came since it was admitted
    stalled: float | None = None  # loop time its answer stopped draining (client not reading)


@dataclass(slots=True)
class _Waiting:
    """A connection waiting for a slot, its bytes left in the socket."""

    transport: asyncio.BaseTransport
    since: float  # loop time it came
    fd: int  # -1: unknown
    tls: bool
    watch: asyncio.Future[None] | None = None  # until its first bytes come (or it closes)


# A connection admitted this long ago that has sent nothing, or whose whole request head
# came this long ago and is still not dispatched, is a silent or stuck client's.
_GRACE = 1.0
# A request head still incomplete after this long (a client sending it piece by piece)
# gives way to a waiting connection whose request is complete.
_PARTIAL_GRACE = 0.25
# Connections looked into (a system call each) per eviction, however many are open.
_MAX_LOOKS = 16
# A request head longer than this is not waited for: aiohttp answers it (431 or 400).
_HEAD_PEEK = 8192
_HEAD_END = b"\r\n\r\n"


def _peek(fd: int, size: int) -> bytes:
    """Up to ``size`` bytes waiting on ``fd``, left there (b"" at end of file;
    BlockingIOError when none)."""
    # A socket object over the same descriptor, detached again: it must not close it.
    sock = socket.socket(fileno=fd)
    try:
        return sock.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    finally:
        sock.detach()


def _waiting_bytes(transport: asyncio.BaseTransport) -> bytes | None:
    """What the client has sent and nobody has read yet, up to _HEAD_PEEK bytes (left in
    the socket); None when nothing; b"" when it closed (or reset)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        return _peek(sock.fileno(), _HEAD_PEEK)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""  # reset or gone: its own close is on the way


def _complete(data: bytes, tls: bool) -> bool:
    """Whether ``data`` (the start of what a client sent, not empty) holds a whole request
    head: for plain HTTP its blank line, for TLS its first record (the ClientHello; bytes
    that are not TLS are answered at once). A head longer than _HEAD_PEEK without its
    blank line is not whole: it is refused (431) once it gets a slot, but takes none."""
    if tls and data[0] == 0x16:  # a TLS handshake record
        return len(data) >= _HEAD_PEEK or (
            len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[3:5], "big"))
    return tls or _HEAD_END in data


class _Throttled:
    """A warning logged at most once per interval, with how often it was suppressed."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self._last = -_LOG_INTERVAL

    def __call__(self, detail: str = "") -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._last >= _LOG_INTERVAL:
            logger.warning("%s%s (%d times since the last report)", self.what,
                           f": {detail}" if detail else "", self.count)
            self.count = 0
            self._last = now


class ConnectionGuard:
    """Connection limits and timeouts for one listening server.

    Beyond ``max_connections`` a new connection waits, unread, for a slot (at most
    ``max_waiting`` of them; past that the acceptors stop accepting). A waiting connection
    whose whole request head is in its socket makes room: an idle connection, one whose
    answer has not drained for ``header_timeout``, or one sending its request too slowly
    or not at all is closed for it. Connections that send nothing, or only part of a
    request, never take a slot from anyone.
    """

    def __init__(self, *, max_connections: int, header_timeout: float,
                 idle_timeout: float, max_waiting: int = 16) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.max_waiting = max_waiting
        self._grace = min(_GRACE, header_timeout / 2)
        self._partial_grace = min(_PARTIAL_GRACE, self._grace)
        # Called before each TLS handshake for the context to use (the web config's,
        # built again when its certificate files change).
        self.before_tls: Callable[[], ssl.SSLContext | None] | None = None
        self.first_bytes = FirstBytes()
        self._conns: dict[_Proxy, _Conn] = {}  # insertion order: oldest first
        # Connections waiting for a slot, unread, in the order they came; and those of
        # them whose whole request head has come, in that order.
        self._waiting: dict[_Proxy, _Waiting] = {}
        self._ready: dict[_Proxy, None] = {}
        self._checker: asyncio.TimerHandle | None = None  # runs while any wait
        self._check_period = max(0.05, self._partial_grace)
        self._ready_wait = max(header_timeout, idle_timeout)
        self._by_handler: dict[object, _Proxy] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.evicted = 0
        self.refused = 0
        self.timed_out = 0
        # One throttle per event, so that each line's count is of what it says.
        full = "connection limit reached (--web.max-connections)"
        self._log_refused, self._log_waits, self._log_evicted = (
            _Throttled(full), _Throttled(full), _Throttled(full))
        self._log_accept = _Throttled("cannot accept connections")
        # Resumed when a connection closes, if they had paused.
        self.acceptors: list[Acceptor] = []
        self.incoming = 0  # accepted by an Acceptor, not yet seen by _opened

    @property
    def open(self) -> int:
        """Connections open now."""
        return len(self._conns)

    def wrap(self, factory: Callable[[], asyncio.Protocol],
             ssl_context: ssl.SSLContext | None = None) -> Callable[[], asyncio.Protocol]:
        """A protocol factory whose connections this guard watches; with ``ssl_context``
        the TLS handshake runs once the guard has admitted the TCP connection, so that
        connections that never finish it count against the limit and time out too."""
        def make() -> asyncio.Protocol:
            return _Proxy(self, factory(), ssl_context)
        return make

    def _now(self) -> float:
        # The loop's clock without asking for the running loop each time (a system call
        # on Python 3.11): this runs for every request.
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop.time()

    # --- connection life ---------------------------------------------------------------

    def _opened(self, proxy: _Proxy, transport: asyncio.BaseTransport) -> bool | None:
        """A new connection: True admitted (handed to aiohttp already), None waiting for a
        slot, False refused."""
        now = self._now()
        self.incoming = max(0, self.incoming - 1)
        if len(self._conns) < self.max_connections and not self._waiting:
            self._admit(proxy, transport, now)
            return True
        if len(self._waiting) >= self.max_waiting and not self._drop_unready_waiting(now):
            # Only for connections no Acceptor took (it stops accepting before this).
            self.refused += 1
            self._log_refused("every connection is busy and the queue for a free one is "
                              "full; new connection closed")
            return False
        self._wait(proxy, transport, now)
        self._admit_waiting()
        if proxy.conn is not None:
            return True
        self._log_waits("every connection is busy; a new one waits for a slot")
        return None

    def room(self) -> bool:
        """Whether a new connection can be taken now (admitted or queued); makes room by
        closing a waiting connection that has sent no whole request within a moment, or
        one holding a slot that has sent nothing at all within the grace (a flood of
        silent connections must not keep real ones in the kernel's queue)."""
        taken = len(self._conns) + len(self._waiting) + self.incoming
        if taken < self.max_connections + self.max_waiting:
            return True
        now = self._now()
        return self._drop_unready_waiting(now) or self._evict_silent(now)

    def _evict_silent(self, now: float) -> bool:
        looks = 0
        for proxy, conn in self._conns.items():
            if looks >= _MAX_LOOKS:
                break
            if (conn.busy or conn.heard or conn.since is None
                    or now - conn.since < self._grace):
                continue
            looks += 1
            if _waiting_bytes(conn.transport) is None:  # nothing came at all
                self._evict(proxy, conn)
                return True
        return False

    def _admit(self, proxy: _Proxy, transport: asyncio.BaseTransport, now: float,
               since: float | None = None) -> None:
        """Give ``proxy`` a slot; ``since``: when its request began, if before now."""
        # A TLS handshake counts as a request head coming in: one stalled in it gives way
        # as soon as one that is slow.
        conn = _Conn(transport, now + self.header_timeout, since=now if since is None else since,
                     partial=proxy.tls)
        self._conns[proxy] = conn
        proxy.conn = conn
        self._by_handler[proxy.inner] = proxy
        if self._sweeper is None:
            self._schedule(asyncio.get_running_loop())
        proxy.admitted(transport)

    def _wait(self, proxy: _Proxy, transport: asyncio.BaseTransport, now: float) -> None:
        """Queue ``proxy`` for a slot; its first bytes are watched for, not read."""
        sock = transport.get_extra_info("socket")
        waiting = _Waiting(transport, now, -1 if sock is None else sock.fileno(),
                           proxy.tls)
        if waiting.fd >= 0:
            with contextlib.suppress(OSError):  # closed already: it only times out
                waiting.watch = self.first_bytes.watch(waiting.fd)
                waiting.watch.add_done_callback(functools.partial(self._bytes_came, proxy))
        self._waiting[proxy] = waiting
        if self._checker is None:
            loop = asyncio.get_running_loop()
            self._checker = loop.call_later(self._check_period, self._check_waiting)

    def _bytes_came(self, proxy: _Proxy, watch: asyncio.Future[None]) -> None:
        waiting = self._waiting.get(proxy)
        if waiting is None or waiting.watch is not watch or watch.cancelled():
            return
        # Fired once (the socket stays readable: it is not read): from here the checker
        # looks again until the request's head is all there.
        self.first_bytes.forget(waiting.fd, watch)
        waiting.watch = None
        self._look(proxy, waiting)
        self._make_room()

    def _look(self, proxy: _Proxy, waiting: _Waiting) -> None:
        data = _waiting_bytes(waiting.transport)
        if data == b"":
            # Closed or reset without a request (a TCP health check, `nc -z`): gone now.
            self._unwait(proxy)
            waiting.transport.abort()  # type: ignore[attr-defined]
        elif data is not None and _complete(data, waiting.tls):
            self._ready[proxy] = None

    def _unwait(self, proxy: _Proxy) -> _Waiting | None:
        waiting = self._waiting.pop(proxy, None)
        if waiting is not None:
            self._ready.pop(proxy, None)
            if waiting.watch is not None:
                # Before the descriptor closes: it may be reused by the next connection.
                self.first_bytes.forget(waiting.fd, waiting.watch)
                waiting.watch.cancel()
        return waiting

    def _secured(self, proxy: _Proxy, transport: asyncio.BaseTransport) -> None:
        """TLS is up: the connection is now closed through its TLS transport, and its
        request comes next."""
        conn = self._conns.get(proxy)
        if conn is not None:
            conn.transport = transport
            conn.since, conn.partial = self._now(), False

    def _closed(self, proxy: _Proxy) -> None:
        self._unwait(proxy)
        if self._conns.pop(proxy, None) is not None:
            self._by_handler.pop(proxy.inner, None)
            self._admit_waiting()
        for acceptor in self.acceptors:
            acceptor.start()

    def _admit_waiting(self) -> None:
        """Hand free slots to the connections waiting: those whose request head has come
        first, in that order, then the oldest."""
        while self._waiting and len(self._conns) < self.max_connections:
            proxy = next(iter(self._ready or self._waiting))
            ready = proxy in self._ready
            waiting = self._unwait(proxy)
            if waiting is not None and not waiting.transport.is_closing():
                # One with no whole request yet has had its time since it came: it gives
                # way as soon as it is slow, however long it waited here.
                self._admit(proxy, waiting.transport, self._now(),
                            None if ready else waiting.since)

    def _make_room(self) -> None:
        """Evict idle, stuck and slow connections for the waiting ones whose request head
        has come."""
        self._admit_waiting()
        now = self._now()
        while self._ready and len(self._conns) >= self.max_connections:
            if not self._evict_one(now):
                break

    def _evict_one(self, now: float) -> bool:
        """Close the oldest connection that is stuck or slow (a client that stopped
        reading its answer, or sends its request too slowly or not at all), else the
        oldest idle one (a keep-alive client between requests, which reconnects); whether
        there was one."""
        looks = 0
        idle: tuple[_Proxy, _Conn] | None = None
        for proxy, conn in self._conns.items():
            if conn.busy:
                continue
            if conn.transport.get_write_buffer_size():  # type: ignore[attr-defined]
                # Its answer is still being sent: unless the client stopped reading it.
                if conn.stalled is None or now - conn.stalled < self.header_timeout:
                    continue
            elif conn.since is None:
                if idle is not None or looks >= _MAX_LOOKS:
                    continue
                looks += 1
                data = _waiting_bytes(conn.transport)
                if data is None:
                    idle = (proxy, conn)
                elif data:  # its next request is in the socket, not read yet
                    conn.since, conn.partial = now, not _complete(data, False)
                else:  # closed by the client, its end not read yet: gone anyway
                    self._evict(proxy, conn)
                    return True
                continue
            elif now - conn.since < (self._partial_grace if conn.partial else self._grace):
                continue  # a request is coming in
            self._evict(proxy, conn)
            return True
        if idle is not None:
            self._evict(*idle)
            return True
        return False

    def _evict(self, proxy: _Proxy, conn: _Conn) -> None:
        self.evicted += 1
        self._log_evicted("closing an idle or slow connection for one whose request has "
                          "come")
        self._drop(proxy, conn)

    def _drop_unready_waiting(self, now: float) -> bool:
        """Close the oldest waiting connection that has sent no whole request head within a
        moment (a client sends its request as it connects; the queue is watched for it):
        it would only time out. Whether there was one."""
        for proxy, waiting in self._waiting.items():
            if now - waiting.since < self._partial_grace:
                break  # the rest came later still
            if proxy not in self._ready:
                self._unwait(proxy)
                self.evicted += 1
                waiting.transport.abort()  # type: ignore[attr-defined]
                return True
        return False

    def _drop(self, proxy: _Proxy, conn: _Conn) -> None:
        # abort, not close: the descriptor must be free now, whatever the client does.
        self._closed(proxy)
        conn.transport.abort()  # type: ignore[attr-defined]

    # --- timeouts ------------------------------------------------------------------------

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        period = max(0.05, min(self.header_timeout, self.idle_timeout) / 4)
        self._sweeper = loop.call_later(period, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for proxy, conn in list(self._conns.items()):
            if not conn.busy and now >= conn.deadline:
                self.timed_out += 1
                self._drop(proxy, conn)
        if self._conns:
            self._schedule(loop)

    def _check_waiting(self) -> None:
        """While connections wait: time out those waiting too long, look again at those
        whose request head was not all there, and make room for those whose is."""
        self._checker = None
        now = self._now()
        for proxy, waiting in list(self._waiting.items()):
            # Its whole request sent, a client has met the header timeout: it waits as
            # long as an idle connection may (the slots may be held that long).
            limit = self._ready_wait if proxy in self._ready else self.header_timeout
            if now >= waiting.since + limit:
                self._unwait(proxy)
                self.timed_out += 1
                waiting.transport.abort()  # type: ignore[attr-defined]
            elif waiting.watch is None and proxy not in self._ready:
                self._look(proxy, waiting)
        self._make_room()
        if self._waiting:
            self._checker = asyncio.get_running_loop().call_later(self._check_period,
                                                                  self._check_waiting)
        for acceptor in self.acceptors:
            acceptor.start()

    def close(self) -> None:
        """Stop the timers and the first-bytes watch, close connections still waiting for
        a slot (at shutdown)."""
        for proxy, waiting in list(self._waiting.items()):
            self._unwait(proxy)
            waiting.transport.abort()  # type: ignore[attr-defined]
        self.first_bytes.close()
        for timer in (self._sweeper, self._checker):
            if timer is not None:
                timer.cancel()
        self._sweeper = self._checker = None

    # --- requests ------------------------------------------------------------------------

    def serving(self, request: web.Request, probe: bool = False) -> _Conn | None:
        """Mark the request's connection busy (never timed out or evicted) until
        :meth:`served`; returns what to hand :meth:`served` (None: not a guarded one).
        ``probe``: the request runs a probe, which the client's end of file cancels."""
        proxy = self._by_handler.get(request.protocol)
        conn = self._conns.get(proxy) if proxy is not None else None
        if conn is not None:
            conn.busy += 1
            conn.probing += probe
            conn.since = None
            conn.partial = False
            conn.tail = b""
        return conn

    def served(self, conn: _Conn, probe: bool = False) -> None:
        """The request is answered: the connection's next request has ``idle_timeout``."""
        conn.busy -= 1
        conn.probing -= probe
        now = self._now()
        conn.deadline = now + self.idle_timeout
        if self._ready and not conn.busy:
            # Once the answer is written (this same pass): an idle connection gives its
            # slot to one waiting with its request.
            asyncio.get_running_loop().call_soon(self._make_room)

    def answered(self, request: web.BaseRequest) -> None:
        """An answer is going out on the request's connection (every answer, the router's
        404s and 405s included, which no handler marks busy): the connection is idle
        from here, with ``idle_timeout`` for its next request."""
        proxy = self._by_handler.get(request.protocol)
        conn = self._conns.get(proxy) if proxy is not None else None
        if conn is not None and not conn.busy:
            conn.since = None
            conn.partial = False
            conn.deadline = self._now() + self.idle_timeout

    def writing_paused(self, conn: _Conn | None, paused: bool) -> None:
        """The connection's answer stopped draining (the client's window is full), or
        drains again."""
        if conn is not None:
            conn.stalled = self._now() if paused else None

    @property
    def recheck(self) -> float:
        """Seconds after which a full guard may have room again without a connection
        closing (a waiting connection's moment, or a silent one's grace, has passed)."""
        return self._check_period

    def accept_failed(self, exc: OSError) -> None:
        """A failed accept (out of descriptors): one line per interval."""
        self._log_accept(str(exc))


class Acceptor:
    """Accepts a listening socket's connections for a :class:`ConnectionGuard`, and stops
    accepting while the guard has no room: connections then wait in the kernel's listen
    queue (as Go's servers leave them at their limit) instead of being accepted only to
    be reset. asyncio's own accept loop cannot be paused through its public API."""

    def __init__(self, guard: ConnectionGuard, factory: Callable[[], asyncio.Protocol],
                 listening: socket.socket, per_pass: int) -> None:
        self._guard = guard
        self._factory = factory
        self._loop = asyncio.get_running_loop()
        # The listening socket's own descriptor, not a duplicate: the server closes it,
        # and close() detaches this object first.
        self._sock = socket.socket(listening.family, listening.type, fileno=listening.fileno())
        self._sock.setblocking(False)  # as asyncio leaves its servers' sockets
        self._per_pass = per_pass
        self._accepting = False
        self._recheck: asyncio.TimerHandle | None = None  # while full: look again
        self._backoff: asyncio.TimerHandle | None = None  # out of descriptors: wait
        self._tasks: set[asyncio.Task[Any]] = set()

    def listen(self, backlog: int) -> None:
        """Put the socket in listening state with a kernel queue of ``backlog``."""
        self._sock.listen(backlog)

    def start(self) -> None:
        """Accept whenever the guard has room (not before a back-off after running out of
        descriptors is over)."""
        if self._recheck is not None:
            self._recheck.cancel()
            self._recheck = None
        if not self._accepting and self._backoff is None and self._sock.fileno() >= 0:
            self._accepting = True
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def _stop_reading(self) -> None:
        if self._accepting:
            self._accepting = False
            self._loop.remove_reader(self._sock.fileno())

    def _full(self) -> None:
        # Looked at again when a connection closes, and a moment later (a waiting
        # connection that has sent nothing may give way by then).
        self._stop_reading()
        if self._recheck is None:
            self._recheck = self._loop.call_later(self._guard.recheck, self.start)

    def _back_off(self) -> None:
        self._stop_reading()
        if self._backoff is None:
            self._backoff = self._loop.call_later(_ACCEPT_RETRY, self._backed_off)

    def _backed_off(self) -> None:
        self._backoff = None
        self.start()

    def _accept(self) -> None:
        guard = self._guard
        for _ in range(self._per_pass):
            if not guard.room():
                self._full()
                return
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                # Out of descriptors or memory (Linux keeps reporting the socket ready):
                # try again in a while, as asyncio does.
                guard.accept_failed(exc)
                self._back_off()
                return
            conn.setblocking(False)
            guard.incoming += 1
            task = self._loop.create_task(self._connect(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self._factory, conn)
        except (OSError, RuntimeError) as exc:  # gone before its transport was made
            self._guard.incoming = max(0, self._guard.incoming - 1)
            conn.close()
            logger.debug("connection lost before it was served: %s", exc)

    def close(self) -> None:
        """Stop accepting (before the server closes the listening socket)."""
        for timer in (self._recheck, self._backoff):
            if timer is not None:
                timer.cancel()
        self._recheck = self._backoff = None
        if self._sock.fileno() >= 0:
            self._stop_reading()
        self._accepting = False
        for task in self._tasks:
            task.cancel()
        if self._sock.fileno() >= 0:
            self._sock.detach()


_ACCEPT_RETRY = 1.0  # seconds before accepting again after running out of descriptors


class _Proxy(asyncio.Protocol):
    """Stands between the transport and aiohttp's protocol, so the guard sees the
    connection open and close."""

    __slots__ = ("_early", "_forwarded", "_handshake", "_peeking", "_refused", "_ssl", "conn",
                 "guard", "inner")

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.guard = guard
        self.inner = inner
        self._ssl = ssl_context
        self._forwarded = False
        self._handshake: asyncio.Task[None] | None = None
        # What TLS delivered before the handshake's waiter woke us (the first request
        # often comes with the client's Finished): handed on, in order, once forwarded.
        self._early: list[bytes] = []
        self._refused = False  # plain HTTP on the TLS port: answered, the rest discarded
        self._peeking: tuple[int, asyncio.Future[None]] | None = None
        self.conn: _Conn | None = None  # set once admitted

    @property
    def tls(self) -> bool:
        """Whether the connection speaks TLS (its first bytes are a ClientHello)."""
        return self._ssl is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        admitted = self.guard._opened(self, transport)  # True: served already
        if admitted is None:
            # Waits for a slot, its bytes left in the socket. asyncio 3.11 registers the
            # reader after this call even when paused: paused again once it has.
            transport.pause_reading()  # type: ignore[attr-defined]
            asyncio.get_running_loop().call_soon(self._keep_paused, transport)
            return
        if not admitted:
            transport.abort()  # type: ignore[attr-defined]

    def _keep_paused(self, transport: asyncio.BaseTransport) -> None:
        if self.conn is None and not transport.is_closing():
            transport.resume_reading()  # type: ignore[attr-defined]
            transport.pause_reading()  # type: ignore[attr-defined]

    def admitted(self, transport: asyncio.BaseTransport) -> None:
        """The guard gave this connection a slot: serve it."""
        if self._ssl is None:
            self._forwarded = True
            self.inner.connection_made(transport)
            transport.resume_reading()  # type: ignore[attr-defined]  # if it waited
            return
        # Nothing may be read before TLS takes the transport over (start_tls resumes).
        transport.pause_reading()  # type: ignore[attr-defined]
        self._handshake = asyncio.get_running_loop().create_task(
            self._start_tls(transport, self._ssl))
        # Its frame holds this proxy, which holds it: a cancellation must not stay.
        self._handshake.add_done_callback(drop_cancellation)

    async def _start_tls(self, transport: asyncio.BaseTransport,
                         context: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        # The transport registers its reader after connection_made whether paused or not
        # (asyncio 3.11): toggled now, nothing is read from the socket until TLS resumes it.
        transport.resume_reading()  # type: ignore[attr-defined]
        transport.pause_reading()  # type: ignore[attr-defined]
        first_bytes, first = self.guard.first_bytes, b""
        try:
            fd = transport.get_extra_info("socket").fileno()
            ready = first_bytes.watch(fd)
        except OSError:  # closed already
            pass
        else:
            self._peeking = (fd, ready)
            try:
                await ready
                first = first_bytes.peek(fd)
                # The start of an HTTP method in pieces (a client writing byte by byte):
                # Go waits for the five bytes; here a while, then TLS decides.
                for _ in range(_PIECES_WAIT):
                    if not (0 < len(first) < 5 and any(m.startswith(first) for m in _HTTP_STARTS)):
                        break
                    await asyncio.sleep(_PIECE_INTERVAL)
                    first = first_bytes.peek(fd)
            except OSError:
                pass
            finally:
                first_bytes.forget(fd, ready)
                self._peeking = None
        if not first:
            transport.abort()  # type: ignore[attr-defined]
            return
        if first.startswith(_HTTP_STARTS):
            # Answered, then the request is read and dropped until the client closes (or
            # the header timeout does): closing with it unread would reset the connection
            # and could take the answer with it.
            self._refused = True
            transport.write(_NOT_TLS)  # type: ignore[attr-defined]
            transport.write_eof()  # type: ignore[attr-defined]
            transport.resume_reading()  # type: ignore[attr-defined]
            return
        if self.guard.before_tls is not None:
            context = self.guard.before_tls() or context
        try:
            secured = await loop.start_tls(
                transport, self, context, server_side=True,  # type: ignore[arg-type]
                ssl_handshake_timeout=self.guard.header_timeout)
        except (OSError, TimeoutError, ssl.SSLError, RuntimeError) as exc:
            # A failed or abandoned handshake: asyncio has closed what it could. Its waiter
            # holds this exception, whose traceback holds start_tls's frame, which holds the
            # waiter and the TLS protocol with its 256 KiB buffer: a cycle the exporter's
            # rare full collection would free only after a flood of handshakes had piled
            # hundreds of MB of them up. Cut.
            exc.__traceback__ = None
            self.guard._closed(self)
            transport.abort()  # type: ignore[attr-defined]
            return
        if secured is None or secured.is_closing():
            self.guard._closed(self)
            return
        self.guard._secured(self, secured)
        self._forwarded = True
        self.inner.connection_made(secured)
        early, self._early = self._early, []
        for data in early:
            self.inner.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard._closed(self)
        if self._forwarded:
            self.inner.connection_lost(exc)
        elif self._handshake is not None:
            if self._peeking is not None:
                # Now: the descriptor closes right after this, and may be reused at once.
                self.guard.first_bytes.forget(*self._peeking)
            self._handshake.cancel()  # still waiting for the first bytes: stop watching

    def data_received(self, data: bytes) -> None:
        if self._forwarded:
            conn = self.conn
            if conn is not None and not conn.busy:
                conn.heard = True
                if conn.since is None:
                    conn.since = self.guard._now()
                # Whether the request's head is still coming (a request cut between its
                # pieces reads as partial until aiohttp dispatches it, a moment later); its
                # blank line may come split across two reads.
                # (Only the joint is joined: no copy of the request per read.)
                conn.partial = _HEAD_END not in data and _HEAD_END not in conn.tail + data[:3]
                conn.tail = data[-3:] if len(data) >= 3 else (conn.tail + data)[-3:]
            self.inner.data_received(data)
        elif self._ssl is not None and not self._refused:
            self._early.append(data)

    def eof_received(self) -> bool | None:
        if not self._forwarded:
            return None  # closes the transport (the refused connection's end)
        self.inner.eof_received()
        close = getattr(self.inner, "close", None)
        conn = self.conn
        # A probe being run when the client's end of file comes: the client hung up
        # (curl -m, Prometheus at its scrape timeout, a closed socket: all send a FIN, as
        # a half-close does), and the probe is cancelled, as Go's servers cancel the
        # request's context. Closed now, as aiohttp does: its handler is cancelled.
        pending = conn is not None and conn.probing == 0 and (conn.busy > 0 or (
            conn.heard and conn.since is not None and not conn.partial))
        if self._ssl is not None or close is None or not pending:
            return None  # closed now: TLS has no half-close, and nothing is asked
        # The client is done sending, its request in (a half-close after it: `nc -N`, a
        # shell's printf | nc), and it asks no probe (or one not yet begun): answered,
        # then the connection closed; aiohttp would close it at once and drop the answer.
        close()  # aiohttp: no further requests; closes once its handler is done
        return True

    def pause_writing(self) -> None:
        self.guard.writing_paused(self.conn, True)
        if self._forwarded:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.guard.writing_paused(self.conn, False)
        if self._forwarded:
            self.inner.resume_writing()


_URL_CREDENTIALS = re.compile(r"\S*@\S*")
# Where aiohttp's message starts quoting the request's bytes (b'...' or bytearray(...)).
_RAW_BYTES = re.compile(r"""(?:^|\s)(?:b['"]|bytearray\()""")


def _client_fault(exc: BaseException | None) -> BaseException | None:
    """The request's own fault behind a logged exception, or None: an HTTP parse error, or
    what it wraps (a body read after the answer, undecodable or badly chunked, fails as
    RequestPayloadError caused by one)."""
    for _ in range(4):  # aiohttp wraps once or twice; a longer chain is not its shape
        if exc is None or isinstance(exc, HttpProcessingError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


class BadRequestFilter(logging.Filter):
    """aiohttp logs every malformed request (URL too long, bad bytes, a body that does not
    decode) at error level with a traceback: the client's fault, not the exporter's. One
    line at debug instead, as Go's server (blackbox) logs none: a scanner must not fill
    the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite records about HTTP parse errors; pass the rest unchanged."""
        logged = record.exc_info[1] if record.exc_info else None
        exc = _client_fault(logged)
        if exc is None and isinstance(logged, RequestPayloadError):
            exc = logged  # its message may quote the body: logged by its kind only
        if exc is not None:
            # aiohttp quotes the request's raw bytes, which may hold a password (basic
            # auth) or a cookie in any shape (folded, escaped, cut): never logged. Only
            # the kind of error and, where aiohttp's C parser words one before the
            # quoted bytes, its reason; a message in any other shape (the pure-Python
            # parser quotes lines plainly; an invalid URL is the URL itself) is not logged.
            text = " ".join(str(getattr(exc, "message", "")).split())
            quoted = _RAW_BYTES.search(text)
            reason = "" if quoted is None or isinstance(exc, InvalidURLError) else (
                _URL_CREDENTIALS.sub("<url>", text[:quoted.start()]).rstrip(" :"))
            what = f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__
            what = what[:200]
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.msg, record.args = "bad HTTP request answered 400: %s", (what,)
            record.exc_info, record.exc_text = None, None
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def quiet_bad_requests() -> None:
    """Install :class:`BadRequestFilter` on aiohttp's server logger (idempotent)."""
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, BadRequestFilter) for f in server_log.filters):
        server_log.addFilter(BadRequestFilter())


class _PlainErrors(RequestHandler):
    """aiohttp's request handler, answering a malformed request with a fixed line of its
    own: aiohttp's message quotes the request's raw bytes, an Authorization header's
    password among them, and spans several lines (Go's servers answer a fixed text)."""

    __slots__ = ()

    def handle_error(self, request: Any, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        """The 400 of a request that does not parse: one line, nothing of the request."""
        if status == 400 and isinstance(exc, HttpProcessingError):
            message = ("400 Bad Request: request line or header field too long\n"
                       if isinstance(exc, LineTooLong) else
                       f"400 Bad Request: malformed HTTP request ({type(exc).__name__})\n")
        response = super().handle_error(request, status, exc, message)
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response


def _plain_errors(server: web.Server) -> Callable[[], asyncio.Protocol]:
    """``server``'s protocol factory, its handlers answering malformed requests with
    :class:`_PlainErrors`' text (made by aiohttp, so that its handler arguments apply)."""
    def make() -> asyncio.Protocol:
        handler = server()
        if type(handler) is RequestHandler:  # the same slots: only the methods change
            handler.__class__ = _PlainErrors
        return handler
    return make


# The kernel's listen queue, whatever asyncio accepts per pass.
KERNEL_BACKLOG = 128


class GuardedSite(web.BaseSite):
    """aiohttp's TCPSite with every connection under a :class:`ConnectionGuard`."""

    __slots__ = ("_acceptors", "_guard", "_host", "_port", "_sock")

    def __init__(self, runner: web.BaseRunner, host: str | None, port: int,
                 guard: ConnectionGuard, *, ssl_context: Any = None,
                 backlog: int = 128, sock: socket.socket | None = None) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._guard = guard
        self._sock = sock  # a listening socket handed over (systemd socket activation)
        self._acceptors: list[Acceptor] = []

    @property
    def name(self) -> str:
        """The URL this site serves."""
        scheme = "https" if self._ssl_context else "http"
        if self._sock is not None and self._sock.family == socket.AF_UNIX:
            path = self._sock.getsockname()
            if isinstance(path, bytes):  # an abstract socket: "@name", as ss shows it
                path = "@" + path[1:].decode(errors="replace")
            return f"{scheme}+unix://{path}"
        if self._sock is not None:
            host, port = self._sock.getsockname()[:2]
        else:
            host, port = self._host or "0.0.0.0", self._port
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{port}"

    def urls(self) -> list[str]:
        """The URLs of the sockets listening once started: the port the kernel chose for
        port 0, and each address family of a host bound twice (``:9559``)."""
        scheme = "https" if self._ssl_context else "http"
        out = []
        server = self._server
        for listening in server.sockets if isinstance(server, asyncio.Server) else ():
            if listening.family not in (socket.AF_INET, socket.AF_INET6):
                return [self.name]
            host, port = listening.getsockname()[:2]
            out.append(f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}")
        return out or [self.name]

    async def start(self) -> None:
        """Listen."""
        await super().start()
        server = self._runner.server
        assert server is not None, "runner not set up"
        loop = asyncio.get_running_loop()
        factory = self._guard.wrap(_plain_errors(server), self._ssl_context)
        # Bound, not served by asyncio: the guard's acceptors accept (and stop accepting).
        if self._sock is not None:
            self._server = await loop.create_server(factory, sock=self._sock,
                                                    start_serving=False)
        else:
            self._server = await loop.create_server(
                factory, self._host, self._port, reuse_address=True, start_serving=False,
            )
        for listening in self._server.sockets:
            acceptor = Acceptor(self._guard, factory, listening,
                                self._backlog)
            # The kernel's queue takes no descriptor: it stays full-size, so a connection
            # waits there instead of being dropped (a client retrying after 1 s), however
            # few the exporter accepts per pass (what a low open-files limit keeps small).
            # A socket systemd hands over listens already, with the unit's Backlog=.
            if self._sock is None or not self._sock.getsockopt(socket.SOL_SOCKET,
                                                               socket.SO_ACCEPTCONN):
                acceptor.listen(max(self._backlog, KERNEL_BACKLOG))
            self._acceptors.append(acceptor)
            self._guard.acceptors.append(acceptor)
            acceptor.start()

    async def stop(self) -> None:
        """Stop accepting, then close the listening sockets."""
        for acceptor in self._acceptors:
            acceptor.close()
            if acceptor in self._guard.acceptors:
                self._guard.acceptors.remove(acceptor)
        self._acceptors.clear()
        await super().stop()
