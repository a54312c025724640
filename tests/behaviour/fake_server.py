"""An in-process fake NTP server on 127.0.0.1 that each test scripts.

The server runs on the test's own event loop. For every datagram it records a
:class:`Request` (raw bytes, decoded packet, source address, receive time) and asks the
test's *behaviour* what to send back: any number of :class:`Send` items, each an exact
datagram, optionally delayed (``loop.call_later``, never a sleep) and optionally sent
from a second socket bound to a different port (which a correct client must discard).

The reply builders model a server whose clock is ``time.time_ns() + offset_ns``:

* T2 (receive) is the server clock at the moment the request was read;
* T3 (transmit) is the server clock when the reply is built, plus ``processing``.

A ``Send.delay`` is applied *after* T3 is stamped, so it is network delay as the
client sees it: it lengthens the measured round trip.

Tests synchronise on the server with :meth:`FakeNTPServer.wait_for_requests` (an
awaitable condition with a deadline) and :meth:`FakeNTPServer.drain` (a marker datagram
round that proves every datagram sent before it has been read), never with sleeps.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from ntp_probe.proto.ntp import packet as ntp

LOOPBACK = "127.0.0.1"
NS = 1_000_000_000
DEFAULT_REFID = bytes([127, 0, 0, 1])
_DRAIN_MAGIC = b"fake-ntp-drain:"


@dataclass(frozen=True, slots=True)
class Request:
    """One datagram the fake server received."""

    index: int  # 0-based, in order of arrival
    data: bytes
    packet: ntp.Packet | None  # None when the datagram did not decode
    addr: tuple[str, int]
    received_ns: int  # time.time_ns() when read (the real, unshifted clock)
    received_mono: float  # loop.time() when read


@dataclass(frozen=True, slots=True)
class Send:
    """One datagram to send back to the requester."""

    data: bytes
    delay: float = 0.0  # seconds after the request was read
    from_other_port: bool = False  # send from a second socket (a different source port)


Behaviour = Callable[[Request], Iterable[Send]]


# --- reply builders -------------------------------------------------------------------


def server_ts(unix_ns: int, offset: float) -> int:
    """An NTP timestamp of the fake server's clock for the real instant ``unix_ns``."""
    return ntp.ts_from_unix_ns(unix_ns + round(offset * NS))


def reply_packet(
    req: Request,
    *,
    offset: float = 0.0,
    stratum: int = 2,
    leap: int = 0,
    version: int | None = None,
    mode: int = ntp.Mode.SERVER,
    poll: int = 6,
    precision: int = -20,
    refid: bytes = DEFAULT_REFID,
    root_delay: float = 0.001,
    root_dispersion: float = 0.001,
    reference_age: float = 10.0,
    reference_ts: int | None = None,
    processing: float = 0.0,
    origin: int | None = None,
    receive_ts: int | None = None,
    transmit_ts: int | None = None,
) -> ntp.Packet:
    """A correct server reply to ``req`` from a server whose clock is offset by ``offset`` s.

    ``reference_ts`` defaults to the server's clock ``reference_age`` seconds before now
    (a negative age puts the reference time in the future). ``processing`` adds that much
    to T3 - T2 without actually holding the reply. Every field can be overridden to build
    a bogus reply.
    """
    assert req.packet is not None, "cannot answer a request that did not decode"
    now_ns = time.time_ns()
    t2 = server_ts(req.received_ns, offset)
    t3 = server_ts(max(now_ns, req.received_ns) + round(processing * NS), offset)
    if reference_ts is None:
        reference_ts = server_ts(now_ns - round(reference_age * NS), offset)
    return ntp.Packet(
        leap=leap,
        version=req.packet.version if version is None else version,
        mode=mode,
        stratum=stratum,
        poll=poll,
        precision=precision,
        root_delay=ntp.seconds_to_short(root_delay),
        root_dispersion=ntp.seconds_to_short(root_dispersion),
        refid=refid,
        reference_ts=reference_ts,
        origin_ts=req.packet.transmit_ts if origin is None else origin,
        receive_ts=t2 if receive_ts is None else receive_ts,
        transmit_ts=t3 if transmit_ts is None else transmit_ts,
    )


def reply(req: Request, **fields: Any) -> bytes:
    """:func:`reply_packet`, encoded (same keyword arguments)."""
    return ntp.encode_packet(reply_packet(req, **fields))


def kod(
    req: Request, code: bytes = b"RATE", *, poll: int = 10, origin: int | None = None
) -> bytes:
    """A Kiss-o'-Death as ntpd sends it: LI 3, stratum 0, the code as refid, origin
    echoed (unless ``origin`` says otherwise), and every timestamp set to the client's
    nonce (there is no time in it)."""
    assert req.packet is not None
    nonce = req.packet.transmit_ts
    return ntp.encode_packet(
        replace(
            reply_packet(req, leap=3, stratum=0, refid=code, poll=poll, origin=origin),
            reference_ts=nonce,
            receive_ts=nonce,
            transmit_ts=nonce,
        )
    )


def wrong_origin(req: Request, **fields: Any) -> bytes:
    """A reply whose origin is not the request's nonce."""
    assert req.packet is not None
    bogus = req.packet.transmit_ts ^ 0xDEADBEEF_00000001
    return reply(req, origin=bogus, **fields)


def wrong_mode(req: Request, mode: int = ntp.Mode.CLIENT, **fields: Any) -> bytes:
    """A reply with a mode other than 4 (server)."""
    return reply(req, mode=mode, **fields)


def truncated(req: Request, length: int = 40, **fields: Any) -> bytes:
    """A reply cut short (the default 40 bytes lose the transmit timestamp)."""
    return reply(req, **fields)[:length]


def zero_transmit(req: Request, **fields: Any) -> bytes:
    """A reply whose transmit timestamp is zero."""
    return reply(req, transmit_ts=0, **fields)


def answer(**fields: Any) -> Behaviour:
    """A behaviour answering every request once, at once, with :func:`reply`."""

    def behaviour(req: Request) -> list[Send]:
        return [Send(reply(req, **fields))]

    return behaviour


def silent(req: Request) -> list[Send]:
    """A behaviour that never answers."""
    return []


# --- the server -----------------------------------------------------------------------


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, server: FakeNTPServer) -> None:
        self._server = server

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._server._on_datagram(data, (str(addr[0]), int(addr[1])))


class _SideProtocol(asyncio.DatagramProtocol):
    """The second socket: it only sends (anything it receives is ignored)."""


@dataclass
class FakeNTPServer:
    """A scriptable UDP NTP server; create with :meth:`start`, stop with :meth:`close`."""

    behaviour: Behaviour = field(default=answer())
    requests: list[Request] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _transport: asyncio.DatagramTransport | None = None
    _side: asyncio.DatagramTransport | None = None
    _handles: list[asyncio.TimerHandle] = field(default_factory=list)
    _waiters: list[tuple[int, asyncio.Future[None]]] = field(default_factory=list)
    _drains: dict[bytes, asyncio.Future[None]] = field(default_factory=dict)
    port: int = 0
    side_port: int = 0
    host: str = LOOPBACK

    @classmethod
    async def start(
        cls, behaviour: Behaviour | None = None, host: str = LOOPBACK, port: int = 0
    ) -> FakeNTPServer:
        """Bind ``host`` (127.0.0.1, or ::1) on ``port`` (0: an OS-chosen one), and a second
        socket for other-port sends."""
        server = cls() if behaviour is None else cls(behaviour=behaviour)
        server.host = host
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Protocol(server), local_addr=(host, port), family=family
        )
        server._transport = transport
        server.port = int(transport.get_extra_info("sockname")[1])
        side, _ = await loop.create_datagram_endpoint(
            _SideProtocol, local_addr=(host, 0), family=family
        )
        server._side = side
        server.side_port = int(side.get_extra_info("sockname")[1])
        assert server.side_port != server.port
        return server

    @property
    def target(self) -> str:
        """The ``host:port`` to probe."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def close(self) -> None:
        """Cancel pending delayed sends and close both sockets."""
        for handle in self._handles:
            handle.cancel()
        self._handles.clear()
        for _, fut in self._waiters:
            fut.cancel()
        for fut in self._drains.values():
            fut.cancel()
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        if self._side is not None:
            self._side.close()
            self._side = None

    def _on_datagram(self, data: bytes, addr: tuple[str, int]) -> None:
        if data.startswith(_DRAIN_MAGIC):
            fut = self._drains.pop(data, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
            return
        loop = asyncio.get_running_loop()
        received_ns = time.time_ns()
        try:
            pkt: ntp.Packet | None = ntp.decode(data)
        except ntp.NTPDecodeError:
            pkt = None
        req = Request(len(self.requests), data, pkt, addr, received_ns, loop.time())
        self.requests.append(req)
        for n, fut in self._waiters:
            if len(self.requests) >= n and not fut.done():
                fut.set_result(None)
        self._waiters = [(n, f) for n, f in self._waiters if not f.done()]
        if pkt is None:
            return
        try:
            sends = list(self.behaviour(req))
        except Exception as exc:  # surfaced by the fixture at teardown
            self.errors.append(exc)
            return
        for send in sends:
            if send.delay > 0:
                self._handles.append(loop.call_later(send.delay, self._send, send, addr))
            else:
                self._send(send, addr)

    def _send(self, send: Send, addr: tuple[str, int]) -> None:
        transport = self._side if send.from_other_port else self._transport
        if transport is not None:
            transport.sendto(send.data, addr)

    async def wait_for_requests(self, n: int, timeout: float = 2.0) -> None:
        """Return once ``n`` requests have been received; TimeoutError after ``timeout`` s."""
        if len(self.requests) >= n:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, fut))
        async with asyncio.timeout(timeout):
            await fut

    async def drain(self, timeout: float = 2.0) -> None:
        """Return once every datagram sent to the server before this call has been read.

        A marker datagram is sent from the side socket; loopback delivers in order, so
        when the marker is read, everything queued before it has been read too.
        """
        assert self._side is not None and self._transport is not None
        marker = _DRAIN_MAGIC + secrets.token_hex(8).encode()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._drains[marker] = fut
        self._side.sendto(marker, (self.host, self.port))
        async with asyncio.timeout(timeout):
            await fut


@pytest.fixture
async def fake_ntp() -> AsyncIterator[FakeNTPServer]:
    """A started :class:`FakeNTPServer` (answering correctly until a test sets
    ``behaviour``), closed at teardown; a behaviour that raised fails the test."""
    server = await FakeNTPServer.start()
    try:
        yield server
    finally:
        server.close()
    if server.errors:
        raise server.errors[0]


# --- forged ICMP errors ------------------------------------------------------------------


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def require_raw_socket() -> None:
    """Skip unless this process may open a raw socket (root) to forge ICMP errors."""
    if os.geteuid() != 0:
        pytest.skip("forging an ICMP error needs a raw socket (root)")


def forge_unreachable(client_addr: tuple[str, int], server_port: int, sender: str,
                      code: int = 3) -> None:
    """An ICMP destination unreachable (code 3: port, 1: host) about a request from
    ``client_addr`` to ``server_port`` on 127.0.0.1, sent from ``sender``: the IP and UDP
    headers of the request it quotes are all an off-path host needs to make one."""
    client, client_port = client_addr
    quoted_ip = bytes([0x45, 0, 0, 76, 0, 0, 0x40, 0, 64, 17, 0, 0]) + socket.inet_aton(
        client) + socket.inet_aton(LOOPBACK)
    quoted_udp = client_port.to_bytes(2, "big") + server_port.to_bytes(2, "big") + bytes(
        [0, 56, 0, 0])
    icmp = bytes([3, code, 0, 0, 0, 0, 0, 0]) + quoted_ip + quoted_udp
    icmp = icmp[:2] + _checksum(icmp).to_bytes(2, "big") + icmp[4:]
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as raw:
        raw.bind((sender, 0))
        raw.sendto(icmp, (client, 0))
