"""The datagram pump: one socket per exchange, kernel receive timestamps, a matcher.

The socket is read with ``recvmsg`` from an event-loop reader callback (no threads, no
asyncio transport) so that the kernel's SO_TIMESTAMPNS receive time can be taken as the
arrival time: a user-space timestamp taken after the event loop gets round to the
datagram is late by the loop's latency, which under load is milliseconds.

What counts as the awaited reply is not decided here: each exchange passes a matcher
(a protocol's sans-IO state machine) that turns a datagram into a value, or None to
keep waiting. The pump serves UDP over IPv4 and IPv6 and datagrams over a unix socket.

The sockets are not handed to the event loop one by one: they share one epoll set per
loop, and only that set's descriptor is watched by the loop (see :class:`_Sockets`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar
from weakref import WeakKeyDictionary

from ntp_probe.net import budget
from ntp_probe.proto.address import ip_address, source_text

# Linux value on every architecture Python runs on here; Python's socket module does not
# export it.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")
_ANC_SIZE = socket.CMSG_SPACE(_TIMESPEC.size)
# Larger than any reply we accept, so that a datagram cut short (MSG_TRUNC) is seen as such.
MAX_DATAGRAM = 4096
_MAX_READS_PER_WAKEUP = 64
_MAX_EVENTS = 256  # sockets served per pass of the event loop
# IP_RECVERR / IPV6_RECVERR (Linux values; Python's socket module does not export them).
_RECVERR: dict[int, tuple[int, int]] = {
    socket.AF_INET: (socket.IPPROTO_IP, 11), socket.AF_INET6: (socket.IPPROTO_IPV6, 25),
}
_RECVERR_CMSGS = frozenset(_RECVERR.values())
# Kernel transmit timestamps (linux/net_tstamp.h): the software TX stamp of each datagram,
# delivered on the error queue, tied to its datagram by a counter (OPT_ID), no payload
# copy (OPT_TSONLY). As chrony does: T1 is then the moment the packet left, not the
# moment before the send call, which a descheduled process can make late.
SO_TIMESTAMPING = 37
_TX_FLAGS = (1 << 1) | (1 << 4) | (1 << 7) | (1 << 11)  # TX_SOFTWARE|SOFTWARE|OPT_ID|TSONLY
_EXTENDED_ERR = struct.Struct("=IBBBBII")  # struct sock_extended_err
_ORIGIN_ICMP = (2, 3)
_ORIGIN_TIMESTAMPING = 4
_ERR_ANC_SIZE = 512
_MAX_PENDING_TX = 64
_LOGGED_TOO_LONG = 3  # too-long datagrams logged one by one; the rest only counted

T = TypeVar("T")
Log = Callable[[str], None]
SockAddr = tuple[str, int] | tuple[str, int, int, int] | str


@dataclass(frozen=True, slots=True)
class Datagram:
    """One received datagram and when it arrived (Unix ns, local clock)."""

    data: bytes
    source: tuple[object, ...]
    rx_ns: int
    kernel_timestamp: bool


class Unreachable(OSError):
    """The destination cannot be reached: the send failed (``sent`` False), or an ICMP
    error came back about a datagram that did leave (``sent`` True); ``on_path`` names the
    host that sent it when that was not the target (a router, a firewall, a forger)."""

    def __init__(self, errno: int | None, why: str, *, sent: bool,
                 on_path: str | None = None) -> None:
        super().__init__(errno, why)
        self.sent = sent
        self.on_path = on_path


class _Sockets:
    """Every pump socket of one event loop in one epoll set; the loop watches only the set.

    Two reasons. A transmit timestamp or an ICMP error queued on a socket's error queue
    reports EPOLLERR, and some event loops (uvloop: libuv's poll handles) stop watching a
    descriptor for good on an error; the set's own descriptor only ever becomes readable.
    And a socket per probe costs one epoll_ctl here, without the loop's per-reader objects.
    """

    __slots__ = ("_callbacks", "_epoll")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[int], None]] = {}
        loop.add_reader(self._epoll.fileno(), self._ready)

    def add(self, fd: int, callback: Callable[[int], None]) -> None:
        """Call ``callback(events)`` whenever ``fd`` is readable (EPOLLIN in ``events``) or
        has an error queued (EPOLLERR)."""
        self._epoll.register(fd, select.EPOLLIN)
        self._callbacks[fd] = callback

    def remove(self, fd: int) -> None:
        """Stop watching ``fd`` (before it is closed)."""
        del self._callbacks[fd]
        self._epoll.unregister(fd)

    def _ready(self) -> None:
        # Level-triggered: a socket whose callback left data queued (bounded reads) is
        # reported again on the next loop pass.
        callbacks = self._callbacks
        for fd, events in self._epoll.poll(0, _MAX_EVENTS):
            callback = callbacks.get(fd)
            if callback is not None:
                callback(events)


_SETS: WeakKeyDictionary[asyncio.AbstractEventLoop, _Sockets] = WeakKeyDictionary()


def _sockets(loop: asyncio.AbstractEventLoop) -> _Sockets:
    found = _SETS.get(loop)
    if found is None:
        found = _SETS[loop] = _Sockets(loop)
    return found


def sockaddr_for(address: str, port: int, family: int) -> SockAddr:
    """The socket address of a numeric IPv4/IPv6 address (scope id resolved for IPv6)."""
    if family == socket.AF_INET6:
        infos = socket.getaddrinfo(address, port, family, socket.SOCK_DGRAM, 0,
                                   socket.AI_NUMERICHOST)
        return infos[0][4]  # type: ignore[return-value]  # an AF_INET6 sockaddr
    return (address, port)


def zone_index(address: str) -> str:
    """``address`` with its zone as the interface's index now (``fe80::1%eth0`` ->
    ``fe80::1%2``), the form the kernel and a datagram's source give; unchanged without a
    zone. Looked up for each probe, never kept: an interface recreated with another index
    (a VPN, a USB NIC) is found again. OSError (ENODEV) when the zone names no interface
    of this host."""
    host, sep, zone = address.partition("%")
    if not sep:
        return address
    try:
        index = int(zone) if zone.isdigit() else socket.if_nametoindex(zone)
        socket.if_indextoname(index)  # a number must name an interface too
    except (OSError, OverflowError, ValueError):
        raise OSError(errno.ENODEV, f"{address}: its zone names no interface of this "
                      "host") from None
    return f"{host}%{index}"


def _offender(sockaddr: bytes) -> str | None:
    """The address of whoever sent an ICMP error: the sockaddr the kernel appends to
    struct sock_extended_err (SO_EE_OFFENDER), or None when it gives none."""
    if len(sockaddr) < 2:
        return None
    family = int.from_bytes(sockaddr[:2], sys.byteorder)
    if family == socket.AF_INET and len(sockaddr) >= 8:
        return socket.inet_ntop(socket.AF_INET, sockaddr[4:8])
    if family == socket.AF_INET6 and len(sockaddr) >= 24:
        return socket.inet_ntop(socket.AF_INET6, sockaddr[8:24])
    return None


def _same_host(a: str, b: str) -> bool:
    """Whether two address texts name one host (IPv4-mapped IPv6 as its IPv4 address)."""
    def packed(text: str) -> bytes:
        ip = ip_address(text.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.packed
    try:
        return packed(a) == packed(b)
    except ValueError:
        return True  # not an address pair to judge: as before, trust the kernel's match


class DatagramPump(Generic[T]):
    """One datagram socket towards one destination. Use as an async context manager.

    ``matcher`` judges every datagram that arrives: a value ends the current wait, None
    keeps waiting (the matcher logs and counts what it discards). Unix sockets are bound
    to ``bind_path`` when given, since a unix datagram server can only answer a bound
    client.
    """

    __slots__ = ("_deferred", "_dest", "_family", "_log", "_loop", "_matcher", "_sock",
                 "_sockets", "_tx_stamps", "_waiter", "bind_path", "kernel_timestamps",
                 "last_tx_kernel", "sent", "source", "too_long", "truncated", "tx_wanted")

    def __init__(self, family: int, dest: SockAddr, matcher: Callable[[Datagram], T | None],
                 log: Log, bind_path: str | None = None, tx_timestamps: bool = False,
                 source: str = "") -> None:
        self._family = family
        self._dest = dest
        self._matcher = matcher
        self._log = log
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = None
        self._waiter: asyncio.Future[T | None] | None = None
        # An ICMP error from a host on the path, not the target: the wait's outcome only
        # if no reply comes before it ends (a forger cannot cut a working exchange short).
        self._deferred: Unreachable | None = None
        self.bind_path = bind_path
        self.source = source  # the local address to send from ("" = the kernel's choice)
        self.kernel_timestamps = True
        self.sent = 0  # datagrams that left: counted at the send, so a cut-off wait keeps it
        self.truncated = 0  # the destination host's datagrams discarded as too long
        self.too_long = 0  # every datagram discarded as too long, whoever sent it
        # Kernel transmit stamps cost a system call per send: only for an exchange whose T1
        # is used (NTP and NTS time samples, not the daemons' command protocols).
        self.tx_wanted = tx_timestamps and family != socket.AF_UNIX
        self._tx_stamps: dict[int, int] = {}  # send counter -> kernel TX time (Unix ns)
        self.last_tx_kernel = False  # whether the last exchange's T1 is the kernel's

    async def __aenter__(self) -> DatagramPump[T]:
        # Within the probes' share of the open-files limit; non-blocking from the start (no
        # separate system call to make it so).
        sock = budget.open_socket(self._family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        bound = False
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            except OSError:
                self.kernel_timestamps = False
                self._log("kernel receive timestamps unavailable: receive times from user space")
            if self._family == socket.AF_UNIX:
                if self.bind_path is not None:
                    sock.bind(self.bind_path)
                    bound = True
            else:
                if self.source:
                    # Through getaddrinfo: a link-local source's zone (fe80::1%eth0) becomes
                    # the scope id the kernel needs; the 2-tuple form would drop it.
                    try:
                        local = socket.getaddrinfo(self.source, 0, self._family,
                                                   socket.SOCK_DGRAM, 0, socket.AI_NUMERICHOST)
                    except socket.gaierror:
                        raise OSError(errno.ENODEV, f"source address {self.source}: its zone "
                                      "names no interface of this host") from None
                    sock.bind(local[0][4])
                # Not connect()ed: a reply from another address or port (a multi-homed
                # server answering from its other address, a spoofer) must reach us to be
                # logged as discarded. IP_RECVERR still reports ICMP errors on an
                # unconnected socket, so a closed port fails fast.
                level, option = _RECVERR[self._family]
                with contextlib.suppress(OSError):  # without it, no fast failure
                    sock.setsockopt(level, option, 1)
                if self.tx_wanted:
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING, _TX_FLAGS)
                    except OSError:
                        self.tx_wanted = False
                        self._log("kernel transmit timestamps unavailable: T1 from user space")
            # Out of descriptors, the loop's epoll set may not even be creatable: then
            # this socket must not stay open either.
            self._sockets = _sockets(self._loop)
            self._sockets.add(sock.fileno(), self._on_readable)
        except OSError:
            sock.close()
            budget.give_back()
            if bound and self.bind_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.bind_path)
            raise
        self._sock = sock
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop reading, close the socket and remove a bound unix path (idempotent)."""
        if self._sock is not None:
            if self.too_long > _LOGGED_TOO_LONG:
                self._log(f"{self.too_long - _LOGGED_TOO_LONG} more too-long datagrams not "
                          "logged one by one")
            self._sockets.remove(self._sock.fileno())
            self._sock.close()
            self._sock = None
            budget.give_back()
            if self.bind_path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(self.bind_path)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()

    async def exchange(self, payload: bytes, until: float) -> tuple[int, T | None]:
        """Send ``payload`` and wait until loop time ``until`` for the matcher's value.

        Returns the send time (Unix ns: the kernel's transmit timestamp where it gives
        one, else the clock read just before the send) and the value, or None when
        nothing matched in time. Raises :class:`Unreachable` when the send fails, at once
        when the destination host itself reports an ICMP error, and at the end of the
        wait when a host on the path did and no reply came.
        """
        if self._sock is None:
            raise RuntimeError("DatagramPump used outside its context")
        waiter: asyncio.Future[T | None] = self._loop.create_future()
        self._waiter = waiter
        self._deferred = None
        t1 = time.time_ns()
        try:
            self._sock.sendto(payload, self._dest)
        except BlockingIOError as exc:
            self._waiter = None
            if self._family != socket.AF_UNIX:
                raise Unreachable(exc.errno, f"send failed: {exc.strerror or exc}",
                                  sent=False) from None
            # The daemon's receive queue is full (a busy or stopped daemon, or many probes
            # at once): wait for room, as a blocking send would, within this wait's time.
            if not await self._send_when_room(payload, until):
                self._log("the daemon's socket queue stayed full: not sent")
                return t1, None
            self._waiter = waiter
            t1 = time.time_ns()
        except OSError as exc:
            self._waiter = None
            raise Unreachable(exc.errno, f"send failed: {exc.strerror or exc}",
                              sent=False) from None
        send_id = self.sent  # the kernel's OPT_ID counter: 0 for the first datagram
        self.sent += 1
        if self.tx_wanted:
            # The kernel mostly stamps a datagram within sendto itself. Taken now, the stamp
            # does not wake the event loop on its own a moment later.
            self._drain_errors(self._sock, until=send_id)
        # A plain timer resolving the waiter is cheaper than an asyncio.timeout scope, and
        # it cannot turn an outside cancellation into a timeout by mistake.
        timer = self._loop.call_at(until, self._expire)
        try:
            value = await waiter
        finally:
            timer.cancel()
            self._waiter = None
            self._deferred = None
            # An exception out of the wait (an ICMP error, a cancellation) holds this frame
            # in its traceback, and the waiter holds the exception: a reference cycle that
            # outlives the probe until a full collection, which the exporter runs rarely.
            del waiter, timer
        if self.tx_wanted:
            if send_id not in self._tx_stamps and self._sock is not None:
                self._drain_errors(self._sock)
            kernel_t1 = self._tx_stamps.pop(send_id, None)
            self.last_tx_kernel = kernel_t1 is not None
            if kernel_t1 is not None:
                t1 = kernel_t1
        return t1, value

    async def _send_when_room(self, payload: bytes, until: float) -> bool:
        """Send on a unix datagram socket whose peer's queue is full, retrying until loop
        time ``until``; whether it went. Polled: an unconnected unix socket reports
        itself writable whatever the peer's queue holds."""
        pause = 0.001
        while self._loop.time() + pause < until:
            await asyncio.sleep(pause)
            if self._sock is None:
                return False
            try:
                self._sock.sendto(payload, self._dest)
                return True
            except BlockingIOError:
                pause = min(pause * 2, 0.025)
        return False

    def _on_readable(self, events: int) -> None:
        sock = self._sock
        if sock is None:
            return
        if events & select.EPOLLERR:
            # Transmit timestamps and ICMP errors wait on the error queue: drain it, or
            # the socket stays ready and the loop spins.
            self._drain_errors(sock)
            if self._sock is None:
                return
        # The receive queue is tried even when only EPOLLERR came: a pending socket error
        # that is not on the error queue is cleared only by a receive that reports it.
        # Bounded: a flooding server must not keep the event loop in this callback; the
        # reader fires again on the next loop pass if more is queued.
        for _ in range(_MAX_READS_PER_WAKEUP):
            try:
                data, anc, flags, source = sock.recvmsg(MAX_DATAGRAM, _ANC_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # An ICMP error (IP_RECVERR): its details are on the error queue.
                if not self._drain_errors(sock):
                    self._log(f"socket error ignored: {exc.strerror or exc}")
                if self._sock is None:
                    return
                continue
            rx_ns = time.time_ns()
            kernel = False
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(cdata) >= 16:
                    sec, nsec = _TIMESPEC.unpack_from(cdata)
                    rx_ns = sec * 1_000_000_000 + nsec
                    kernel = True
            if flags & socket.MSG_TRUNC:
                # Counted against the server only when it came from the destination's
                # host: anyone may send the socket a long datagram.
                foreign = isinstance(source, tuple) and isinstance(self._dest, tuple) and (
                    source[0] != self._dest[0] or (  # or the same address on another link
                        len(source) > 3 and len(self._dest) > 3 and bool(self._dest[3])
                        and source[3] != self._dest[3]))
                if not foreign:
                    self.truncated += 1
                self.too_long += 1
                if self.too_long <= _LOGGED_TOO_LONG:  # a flood must not fill the log
                    where = source_text(source) if isinstance(source, tuple) else "the socket"
                    self._log(f"datagram from {where} discarded: longer than {MAX_DATAGRAM} "
                              f"bytes (truncated)"
                              + (", not from the destination" if foreign else ""))
                continue
            if not kernel:
                self.kernel_timestamps = False
            src = source if isinstance(source, tuple) else (source, 0)
            value = self._matcher(Datagram(data, src, rx_ns, kernel))
            if value is not None:
                self._resolve(value)
                # The awaited reply is in: stop here rather than pay for one more recvmsg
                # that would only fail with EAGAIN. The reader is level-triggered, so
                # anything else already queued is read on the next loop pass.
                return

    def _drain_errors(self, sock: socket.socket, until: int | None = None) -> bool:
        """Read the error queue: transmit timestamps, and ICMP errors (IP_RECVERR). Returns
        whether an ICMP error about the destination came; only those fail the exchange.

        With ``until``, stop once the transmit stamp of that send is in: whatever is
        queued behind it keeps the socket ready, and is read on the next loop pass."""
        about_dest = False
        for _ in range(_MAX_READS_PER_WAKEUP):
            try:
                _, anc, _, addr = sock.recvmsg(MAX_DATAGRAM, _ERR_ANC_SIZE, socket.MSG_ERRQUEUE)
            except OSError:
                break
            stamp = error = None
            offender = b""
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPING and len(cdata) >= 16:
                    sec, nsec = _TIMESPEC.unpack_from(cdata)  # the first: the software stamp
                    stamp = sec * 1_000_000_000 + nsec
                elif (level, kind) in _RECVERR_CMSGS and len(cdata) >= _EXTENDED_ERR.size:
                    error = _EXTENDED_ERR.unpack_from(cdata)
                    offender = cdata[_EXTENDED_ERR.size:]
            if error is None:
                continue
            errno_, origin, _, _, _, _, data = error
            if origin == _ORIGIN_TIMESTAMPING and stamp:
                if len(self._tx_stamps) < _MAX_PENDING_TX:
                    self._tx_stamps[data] = stamp
                if data == until:
                    break
            elif origin in _ORIGIN_ICMP and addr and tuple(addr[:2]) == tuple(self._dest[:2]):
                about_dest = True
                sender = _offender(offender)
                self._icmp(errno_, None if sender is None or _same_host(
                    sender, str(self._dest[0])) else sender)
        return about_dest

    def _icmp(self, errno_: int, on_path: str | None) -> None:
        """An ICMP error about the destination, from the target's host, or from
        ``on_path``: a router or firewall, or anyone who forged one."""
        if on_path is not None:
            kind = "port unreachable" if errno_ == errno.ECONNREFUSED else os.strerror(errno_)
            why = f"ICMP {kind} from {on_path}, not the target"
        elif errno_ == errno.ECONNREFUSED:
            why = "ICMP port unreachable: nothing listens on the target port"
        else:
            why = f"ICMP error: {os.strerror(errno_)}"
        if self._waiter is None or self._waiter.done():
            self._log(f"{why} (no request waiting)")
        elif on_path is None:
            self._waiter.set_exception(Unreachable(errno_, why, sent=True))
        else:
            self._log(f"{why}: the outcome unless a reply comes in time")
            self._deferred = Unreachable(errno_, why, sent=True, on_path=on_path)

    def _expire(self) -> None:
        """The wait is over: the deferred ICMP error if one came, else no reply."""
        if self._waiter is not None and not self._waiter.done():
            if self._deferred is not None:
                self._waiter.set_exception(self._deferred)
            else:
                self._waiter.set_result(None)

    def _resolve(self, value: T | None) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(value)
