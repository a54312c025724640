"""asyncio UDP for one NTP burst: one socket, kernel receive timestamps.

The socket is read with ``recvmsg`` from an event-loop reader callback (no threads,
no asyncio transport) so that the kernel's SO_TIMESTAMPNS receive time can be taken
as T4: a user-space timestamp taken after the event loop gets round to the datagram
is late by the loop's latency, which under load is milliseconds.

Replies are accepted only if they come from the target address and port, decode,
are mode 4 (server), echo the outstanding request's nonce as origin and carry a
non-zero transmit timestamp; everything else is discarded and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from dataclasses import dataclass

from ntp_probe.engine.result import ProbeLog
from ntp_probe.proto.ntp import packet as ntp

# Linux value on every architecture Python runs on here; Python's socket module does not
# export it.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")
_ANC_SIZE = socket.CMSG_SPACE(_TIMESPEC.size)
_MAX_DATAGRAM = 2048
_MAX_READS_PER_WAKEUP = 64
# IP_RECVERR / IPV6_RECVERR (Linux values; Python's socket module does not export them).
_RECVERR: dict[int, tuple[int, int]] = {
    socket.AF_INET: (socket.IPPROTO_IP, 11), socket.AF_INET6: (socket.IPPROTO_IPV6, 25),
}


@dataclass(frozen=True, slots=True)
class Reply:
    """An accepted reply and its receive time (Unix ns, local clock)."""

    packet: ntp.Packet
    t4_unix_ns: int
    kernel_timestamp: bool


class Exchange:
    """One burst's UDP socket. Use as an async context manager."""

    # Slots: a thousand probes in flight hold a thousand of these.
    __slots__ = (
        "_address", "_family", "_log", "_loop", "_peer", "_pending_nonce",
        "_port", "_seen", "_sock", "_sockaddr", "_waiter", "discarded", "kernel_timestamps",
    )

    def __init__(self, address: str, port: int, family: int, log: ProbeLog) -> None:
        self._address = address
        self._port = port
        self._family = family
        self._log = log
        self._loop = asyncio.get_running_loop()
        self._sock: socket.socket | None = None
        self._pending_nonce: int | None = None
        self._waiter: asyncio.Future[Reply | None] | None = None
        # nonce -> True once answered, False once its wait expired (one small dict, not two
        # sets: a thousand bursts in flight hold a thousand of these).
        self._seen: dict[int, bool] = {}
        self.discarded = 0
        self.kernel_timestamps = True

    async def __aenter__(self) -> Exchange:
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            except OSError:
                self.kernel_timestamps = False
                self._log("kernel receive timestamps unavailable: T4 from user space")
            sockaddr: tuple[str, int] | tuple[str, int, int, int]
            if self._family == socket.AF_INET6:
                infos = socket.getaddrinfo(
                    self._address, self._port, self._family, socket.SOCK_DGRAM, 0,
                    socket.AI_NUMERICHOST,
                )
                sockaddr = infos[0][4]  # type: ignore[assignment]  # AF_INET6 sockaddr
            else:
                sockaddr = (self._address, self._port)
            # Not connect()ed: a reply from another address or port (a multi-homed server
            # answering from its other address, a spoofer) must reach us to be logged as
            # discarded. IP_RECVERR still reports ICMP port-unreachable on an unconnected
            # socket, so a closed port fails fast.
            level, option = _RECVERR[self._family]
            with contextlib.suppress(OSError):  # without it, no fast failure; replies work
                sock.setsockopt(level, option, 1)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._sockaddr = sockaddr
        self._peer = sockaddr[:2]
        self._loop.add_reader(sock.fileno(), self._on_readable)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop reading and close the socket (idempotent)."""
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()

    async def request(self, payload: bytes, nonce: int, until: float) -> tuple[int, Reply | None]:
        """Send one request and wait until loop time ``until`` for its reply.

        Returns T1 (Unix ns, taken just before the send) and the reply, or None when no
        acceptable reply came in time (or the port was unreachable).
        """
        assert self._sock is not None, "Exchange used outside its context"
        waiter: asyncio.Future[Reply | None] = self._loop.create_future()
        self._waiter = waiter
        self._pending_nonce = nonce
        t1 = time.time_ns()
        try:
            self._sock.sendto(payload, self._sockaddr)
        except OSError as exc:
            self._pending_nonce = None
            self._log(f"send failed: {exc.strerror or exc}")
            return t1, None
        # A plain timer resolving the waiter is cheaper than an asyncio.timeout scope, and
        # it cannot turn an outside cancellation into a timeout by mistake.
        timer = self._loop.call_at(until, self._resolve, None)
        try:
            reply = await waiter
        finally:
            timer.cancel()
            self._pending_nonce = None
            self._waiter = None
        if reply is None:
            self._seen[nonce] = False
        return t1, reply

    def _on_readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        # Bounded: a flooding server must not keep the event loop in this callback; the
        # reader fires again on the next loop pass if more is queued.
        for _ in range(_MAX_READS_PER_WAKEUP):
            try:
                data, anc, _flags, source = sock.recvmsg(_MAX_DATAGRAM, _ANC_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._on_error(sock, exc)
                continue
            t4 = time.time_ns()
            kernel = False
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(cdata) >= 16:
                    sec, nsec = _TIMESPEC.unpack_from(cdata)
                    t4 = sec * 1_000_000_000 + nsec
                    kernel = True
            self._handle(data, source, t4, kernel)

    def _on_error(self, sock: socket.socket, exc: OSError) -> None:
        # Drain the error queue (IP_RECVERR), or the socket stays readable forever; only an
        # error about a datagram to the target counts.
        about_target = False
        while True:
            try:
                _, _, _, dest = sock.recvmsg(_MAX_DATAGRAM, 512, socket.MSG_ERRQUEUE)
            except OSError:
                break
            about_target = about_target or tuple(dest[:2]) == tuple(self._peer)
        if not about_target:
            self._log(f"socket error ignored: {exc.strerror or exc}")
            return
        if isinstance(exc, ConnectionRefusedError):
            self._log("ICMP port unreachable: nothing listens on the target port")
        else:
            self._log(f"ICMP error: {exc.strerror or exc}")
        self._resolve(None)

    def _resolve(self, reply: Reply | None) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(reply)

    def _discard(self, why: str) -> None:
        self.discarded += 1
        self._log(f"reply discarded: {why}")

    def _handle(self, data: bytes, source: tuple[object, ...], t4: int, kernel: bool) -> None:
        if tuple(source[:2]) != tuple(self._peer):
            self._discard(f"from {source[0]}:{source[1]}, not the target")
            return
        try:
            pkt = ntp.decode(data)
        except ntp.NTPDecodeError as exc:
            self._discard(f"malformed ({exc})")
            return
        if pkt.mode != ntp.Mode.SERVER:
            self._discard(f"mode {pkt.mode}, expected 4 (server)")
            return
        origin = pkt.origin_ts
        seen = self._seen.get(origin)
        if seen:
            self._discard("duplicate of an answered request")
            return
        if origin != self._pending_nonce:
            if seen is False:
                # Genuine but too late: the sample already counts as lost, and a server that
                # is merely slow must read as "timeout", not as sending invalid replies.
                self._log("late reply to an expired request ignored")
                return
            self._discard(f"origin {origin:016x} matches no request")
            return
        # A KoD need not carry timestamps; its origin check above is what authenticates it.
        if pkt.kiss_code is None and pkt.transmit_ts == 0:
            self._discard("transmit timestamp is zero")
            return
        if not kernel:
            self.kernel_timestamps = False
        self._seen[origin] = True
        self._resolve(Reply(pkt, t4, kernel))
