"""The NTP client's reply rules as a state machine: bytes in, a typed outcome out.

One :class:`Client` serves one burst towards one server. Each request carries a random
64-bit transmit timestamp (the nonce) and nothing else that identifies us. A reply
counts only if it comes from the server's address and port, decodes, is mode 4, echoes
the outstanding request's nonce as its origin and carries non-zero receive and transmit
timestamps (RFC 5905 section 8, RFC 9109; chrony's test 3). Everything else is
discarded with a reason; a reply to a request whose wait already ended is ``Late``, which
is not the server's fault.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import overload

from ntp_probe.proto.address import source_text, zone_scope
from ntp_probe.proto.ntp import packet as ntp

Address = tuple[object, ...]


@dataclass(frozen=True, slots=True)
class Accepted:
    """A reply to the outstanding request (possibly a Kiss-o'-Death)."""

    packet: ntp.Packet


@dataclass(frozen=True, slots=True)
class Discarded:
    """A datagram that is not a valid reply; ``reason`` says why, ``kind`` groups it
    (wrong source, malformed, wrong mode, duplicate, unknown origin, zero timestamps)."""

    reason: str
    kind: str = field(default="", compare=False)
    # From another host than the target: anyone can send those, so they never count
    # against the server (its verdict stays timeout when nothing else came).
    foreign: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class Late:
    """A genuine reply to a request whose wait already ended (it counts as lost)."""

    origin: int


@dataclass(frozen=True, slots=True)
class LateKoD:
    """A Kiss-o'-Death answering a request whose wait already ended: genuine (its origin
    is our nonce), so the burst must still stop and back off."""

    packet: ntp.Packet


Outcome = Accepted | Discarded | Late | LateKoD


def new_nonce() -> int:
    """A random 64-bit nonce, never zero (a zero origin would read as "unset")."""
    return secrets.randbits(64) or 1


class Client:
    """Request and reply matching for one burst towards ``server`` (address, port)."""

    # Slots: a thousand bursts in flight hold a thousand of these.
    __slots__ = ("_pending", "_scope", "_seen", "_source", "server", "version")

    def __init__(self, server: tuple[str, int], version: int = 4) -> None:
        self.server = server
        # A link-local address carries its zone (fe80::1%2); a datagram's source gives the
        # address without it and the zone as its scope id.
        self._source = (server[0].partition("%")[0], server[1])
        self._scope = zone_scope(server[0])
        self.version = version
        self._pending: int | None = None
        # nonce -> True once answered, False once its wait expired (one small dict, not
        # two sets).
        self._seen: dict[int, bool] = {}

    @property
    def pending(self) -> int | None:
        """The nonce of the request awaiting its reply, if any."""
        return self._pending

    def request(self, nonce: int) -> bytes:
        """The next request's bytes; its reply is awaited until :meth:`expire`."""
        if self._pending is not None:
            self.expire()
        self._pending = nonce
        return ntp.encode_request(nonce, self.version)

    def expire(self) -> None:
        """The wait for the outstanding request ended without a reply."""
        if self._pending is not None:
            self._seen[self._pending] = False
            self._pending = None

    def cancel(self) -> None:
        """The outstanding request never left (the send failed): forget it."""
        self._pending = None

    @overload
    def receive(self, data: bytes, source: Address) -> Outcome: ...

    @overload
    def receive(self, data: bytes, source: Address,
                authenticate: Callable[[bytes], Discarded | None]) -> Accepted | Discarded | Late:
        ...

    def receive(self, data: bytes, source: Address,
                authenticate: Callable[[bytes], Discarded | None] | None = None) -> Outcome:
        """Judge one datagram received on the burst's socket.

        A Kiss-o'-Death answering a request whose wait ended is :class:`LateKoD`, not
        :class:`Late`, unless ``authenticate`` is given.

        ``authenticate`` (NTS) judges the datagram once every other rule has found it the
        reply to the outstanding request, before it is marked answered: what it refuses
        leaves the request outstanding, so a forgery cannot use up the wait for the
        genuine reply.
        """
        other_link = self._scope is not None and len(source) > 3 and source[3] != self._scope
        if source[0] != self._source[0] or other_link:
            return Discarded(f"from {source_text(source)}, not the target", "from another host",
                             foreign=True)
        if source[1] != self._source[1]:
            return Discarded(f"from {source_text(source)}, not the target's port",
                             "not from the target's port")
        try:
            pkt = ntp.decode(data)
        except ntp.NTPDecodeError as exc:
            return Discarded(f"malformed ({exc})", "malformed")
        if pkt.mode != ntp.Mode.SERVER:
            return Discarded(f"mode {pkt.mode}, expected 4 (server)", "not mode 4")
        if pkt.version > 4:
            # As chrony and ntpdig: NTPv4 defines no later version, and a server answers a
            # request in the request's version.
            return Discarded(f"version {pkt.version}, newer than NTPv4", "version too new")
        if pkt.mac is not None:
            # Our requests carry no MAC: a reply with one is under a key we do not have, or
            # a crypto-NAK (4 bytes); RFC 5905's receive() drops both, as chronyd does.
            what = "a crypto-NAK" if len(pkt.mac) == 4 else f"a {len(pkt.mac)}-byte MAC"
            return Discarded(f"carries {what}, to a request without one", "carries a MAC")
        origin = pkt.origin_ts
        seen = self._seen.get(origin)
        if seen:
            return Discarded("duplicate of an answered request", "duplicate")
        if origin != self._pending:
            if seen is False:
                if pkt.kiss_code is not None and authenticate is None:
                    # A Kiss-o'-Death is honoured however late: its origin is our nonce,
                    # and a server that said go away must not be asked again (NTS, whose
                    # KoDs are unauthenticated, decides through its own hook).
                    self._seen[origin] = True
                    return LateKoD(pkt)
                # Genuine but too late: a server that is merely slow must read as
                # "timeout", not as sending invalid replies.
                return Late(origin)
            return Discarded(f"origin {origin:016x} matches no request",
                             "origin matches no request")
        # A KoD need not carry timestamps; its origin check above is what authenticates it.
        if pkt.kiss_code is None:
            if pkt.transmit_ts == 0:
                return Discarded("transmit timestamp is zero", "zero transmit timestamp")
            # No T2: read as an instant in 2036, it would make an offset of years.
            if pkt.receive_ts == 0:
                return Discarded("receive timestamp is zero", "zero receive timestamp")
        if authenticate is not None:
            refused = authenticate(data)
            if refused is not None:
                return refused
        self._seen[origin] = True
        self._pending = None
        return Accepted(pkt)
