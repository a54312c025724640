"""Keep idle and slow HTTP clients from taking the exporter down.

aiohttp waits for a new connection's first request for ever and keeps idle keep-alive
connections for about an hour, and accepts connections until the process runs out of
file descriptors; then nothing, not even /-/healthy, gets through. This module puts
every connection under a :class:`ConnectionGuard`:

- a connection must complete its request headers within ``header_timeout`` of
  connecting, and the next request's within ``idle_timeout`` of the last response;
  otherwise it is closed (the checks run on a timer, not per byte);
- at most ``max_connections`` are open; a new one beyond that evicts the oldest
  connection that is not serving a request (an idle or slow client), so a real request
  still gets in; when every connection is busy the new one is closed at once;
- the event loop's "socket.accept() out of system resource" errors, which asyncio logs
  with a traceback at every retry, are logged once per interval as one line.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from aiohttp.http_exceptions import HttpProcessingError, InvalidURLError
from aiohttp.web_protocol import RequestPayloadError

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
        # A socket object over the same descriptor, detached again: it must not close it.
        sock = socket.socket(fileno=fd)
        try:
            return sock.recv(5, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        finally:
            sock.detach()

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
    """Connection limits and timeouts for one listening server."""

    def __init__(self, *, max_connections: int, header_timeout: float,
                 idle_timeout: float) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        # Called before each TLS handshake for the context to use (the web config's,
        # built again when its certificate files change).
        self.before_tls: Callable[[], ssl.SSLContext | None] | None = None
        self.first_bytes = FirstBytes()
        self._conns: dict[_Proxy, _Conn] = {}  # insertion order: oldest first
        self._by_handler: dict[object, _Proxy] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self.evicted = 0
        self.refused = 0
        self.timed_out = 0
        self._log_full = _Throttled("connection limit reached (--web.max-connections)")
        self._log_accept = _Throttled("cannot accept connections")

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

    # --- connection life ---------------------------------------------------------------

    def _opened(self, proxy: _Proxy, transport: asyncio.BaseTransport) -> bool:
        loop = asyncio.get_running_loop()
        if len(self._conns) >= self.max_connections and not self._evict_one():
            self.refused += 1
            self._log_full("every connection is serving a request; new connection closed")
            return False
        self._conns[proxy] = _Conn(transport, loop.time() + self.header_timeout)
        self._by_handler[proxy.inner] = proxy
        if self._sweeper is None:
            self._schedule(loop)
        return True

    def _secured(self, proxy: _Proxy, transport: asyncio.BaseTransport) -> None:
        """TLS is up: the connection is now closed through its TLS transport."""
        conn = self._conns.get(proxy)
        if conn is not None:
            conn.transport = transport

    def _closed(self, proxy: _Proxy) -> None:
        self._conns.pop(proxy, None)
        self._by_handler.pop(proxy.inner, None)

    def _evict_one(self) -> bool:
        for proxy, conn in self._conns.items():
            if not conn.busy:
                self.evicted += 1
                self._log_full("closing the oldest idle connection for a new one")
                self._drop(proxy, conn)
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

    def close(self) -> None:
        """Stop the timer and the first-bytes watch (at shutdown)."""
        self.first_bytes.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    # --- requests ------------------------------------------------------------------------

    def serving(self, request: web.Request) -> _Conn | None:
        """Mark the request's connection busy (never timed out or evicted) until
        :meth:`served`; returns what to hand :meth:`served` (None: not a guarded one)."""
        proxy = self._by_handler.get(request.protocol)
        conn = self._conns.get(proxy) if proxy is not None else None
        if conn is not None:
            conn.busy += 1
        return conn

    def served(self, conn: _Conn) -> None:
        """The request is answered: the connection's next request has ``idle_timeout``."""
        conn.busy -= 1
        conn.deadline = asyncio.get_running_loop().time() + self.idle_timeout

    def exception_handler(self, loop: asyncio.AbstractEventLoop,
                          context: dict[str, Any]) -> None:
        """asyncio's exception handler, with accept errors reduced to one line per interval."""
        message = str(context.get("message", ""))
        if message.startswith("socket.accept()"):
            exc = context.get("exception")
            self._log_accept(str(exc) if exc else message)
            return
        loop.default_exception_handler(context)


class _Proxy(asyncio.Protocol):
    """Stands between the transport and aiohttp's protocol, so the guard sees the
    connection open and close."""

    __slots__ = ("_early", "_forwarded", "_handshake", "_peeking", "_refused", "_ssl", "guard",
                 "inner")

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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self.guard._opened(self, transport):
            transport.abort()  # type: ignore[attr-defined]
            return
        if self._ssl is None:
            self._forwarded = True
            self.inner.connection_made(transport)
            return
        # Nothing may be read before TLS takes the transport over (start_tls resumes).
        transport.pause_reading()  # type: ignore[attr-defined]
        self._handshake = asyncio.get_running_loop().create_task(
            self._start_tls(transport, self._ssl))

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
        except (OSError, TimeoutError, ssl.SSLError, RuntimeError):
            # A failed or abandoned handshake: asyncio has closed what it could.
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
            self.inner.data_received(data)
        elif self._ssl is not None and not self._refused:
            self._early.append(data)

    def eof_received(self) -> bool | None:
        # None closes the transport (the refused connection's end, once the client closed).
        return self.inner.eof_received() if self._forwarded else None

    def pause_writing(self) -> None:
        if self._forwarded:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
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


# The kernel's listen queue, whatever asyncio accepts per pass.
KERNEL_BACKLOG = 128


class GuardedSite(web.BaseSite):
    """aiohttp's TCPSite with every connection under a :class:`ConnectionGuard`."""

    __slots__ = ("_guard", "_host", "_port", "_sock")

    def __init__(self, runner: web.BaseRunner, host: str | None, port: int,
                 guard: ConnectionGuard, *, ssl_context: Any = None,
                 backlog: int = 128, sock: socket.socket | None = None) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._guard = guard
        self._sock = sock  # a listening socket handed over (systemd socket activation)

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

    async def start(self) -> None:
        """Listen."""
        await super().start()
        server = self._runner.server
        assert server is not None, "runner not set up"
        loop = asyncio.get_running_loop()
        factory = self._guard.wrap(server, self._ssl_context)
        if self._sock is not None:
            self._server = await loop.create_server(factory, sock=self._sock,
                                                    backlog=self._backlog)
        else:
            self._server = await loop.create_server(
                factory, self._host, self._port, backlog=self._backlog, reuse_address=True,
            )
        # asyncio accepts up to its backlog per pass (what a low open-files limit keeps
        # small); the kernel's queue takes no descriptor, so it stays full-size and a
        # connection waits there instead of being dropped (a client retrying after 1 s).
        for listening in self._server.sockets:
            with contextlib.suppress(OSError), socket.fromfd(
                    listening.fileno(), listening.family, listening.type) as dup:
                dup.listen(max(self._backlog, KERNEL_BACKLOG))  # the same socket, by its dup
