"""The NTS-KE client's TLS: TLS 1.3 only, one ALPN protocol, exported keys (RFC 8915 §3, §5.1).

CPython's ssl module cannot export keying material, so this is pyOpenSSL, driven by the event
loop on a non-blocking socket: every OpenSSL call returns at once or raises WantRead/WantWrite,
and the connection then waits for the socket to become ready through the loop. No thread is
involved, so a server that stalls mid-handshake costs the loop nothing and the caller's
deadline (``asyncio.timeout_at`` around each step) cancels the wait cleanly; a blocking
handshake in a worker thread could not be interrupted and would outlive the probe.

Chain and identity are judged separately so that an expired certificate and a certificate
for another name read differently: the handshake finishes whatever the certificates (so
that they can still be reported), then OpenSSL verifies the chain the server sent against
the trust anchors (its first error: depth, X509_V_ERR code, OpenSSL's words; and, as Go's
verifier, the extended key usage of each certificate), and the name is checked with
``service_identity`` (RFC 6125, SAN only, IP addresses against IP SANs). What is judged
of a certificate (validity, key usage, names) is read from its DER by proto/certinfo.py,
as Go reads it: ``cryptography`` refuses whole certificates that OpenSSL and Go accept.
Deciding what to do with the verdicts is the caller's. No verify callback: pyOpenSSL makes
each one a cffi closure in memory both writable and executable, which systemd's
MemoryDenyWriteExecute= (set by the shipped units) refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import socket
import ssl
import time
from collections.abc import Callable

from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.hazmat import (
    DNS_ID,
    CertificatePattern,
    DNSPattern,
    IPAddress_ID,
    IPAddressPattern,
    verify_service_identity,
)

from ntp_probe.net import budget
from ntp_probe.proto import certinfo
from ntp_probe.proto.address import ip_address
from ntp_probe.proto.hostname import a_label

Log = Callable[[str], None]

# X509_V_ERR_* codes (OpenSSL's x509_vfy.h) that mean "not valid at this time" rather than
# "not trusted": an expired or not-yet-valid certificate of a chain that is otherwise sound.
X509_V_ERR_CERT_NOT_YET_VALID = 9
X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_ERR_UNSPECIFIED = 1
X509_V_ERR_INVALID_PURPOSE = 26
TIME_ERRORS = frozenset({X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED})
_READ_SIZE = 16384  # one TLS record's plaintext at most
# OpenSSL's words for the codes a monitored server is likely to cause (x509_vfy.h); the
# strings function itself is not in pyOpenSSL's public API.
_VERIFY_ERRORS = {
    2: "unable to get issuer certificate",
    7: "certificate signature failure",
    X509_V_ERR_CERT_NOT_YET_VALID: "certificate is not yet valid",
    X509_V_ERR_CERT_HAS_EXPIRED: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in certificate chain",
    20: "unable to get local issuer certificate",
    21: "unable to verify the first certificate",
    23: "certificate revoked",
    24: "invalid CA certificate",
    26: "unsupported certificate purpose",
}


# Of a certificate's subjectAltNames, how many (and how much of each) a mismatch's words
# show: a hostile certificate may carry thousands.
_SHOWN_NAMES, _SHOWN_NAME_LENGTH = 5, 64


def _names_of(conn: SSL.Connection, ip: bool) -> str:
    """' (it names a, b)': the names the peer's certificate holds, for a mismatch; those
    of the kind asked for (addresses when ``ip``, else host names) first."""
    try:
        patterns = _patterns(conn)
    except Exception:  # names that do not parse: the mismatch is said without them
        return ""
    names = []
    for p in patterns:
        name = getattr(p, "pattern", None)
        if name is not None:
            text = name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)
            names.append(text[:_SHOWN_NAME_LENGTH])
    if not names:
        return ""
    names.sort(key=lambda n: _looks_like_address(n) != ip)  # stable: the certificate's order
    more = f", ... ({len(names) - _SHOWN_NAMES} more)" if len(names) > _SHOWN_NAMES else ""
    return f" (it names {', '.join(names[:_SHOWN_NAMES])}{more})"


def _patterns(conn: SSL.Connection) -> list[CertificatePattern]:
    """The identities the peer's certificate names (its subjectAltName's DNS names, then
    its addresses) as service_identity matches them; raises either library's
    CertificateError for names that do not parse."""
    cert = conn.get_peer_certificate()
    if cert is None:
        return []
    read = _readable(cert)
    if isinstance(read, str) or read.problem is not None:
        raise certinfo.CertificateError(read if isinstance(read, str) else read.problem)
    return [*(DNSPattern.from_bytes(name) for name in read.dns_names),
            *(IPAddressPattern.from_bytes(address) for address in read.ip_addresses)]


def _looks_like_address(name: str) -> bool:
    try:
        ip_address(name)
    except ValueError:
        return False
    return True


class ConnectError(OSError):
    """The TCP connection could not be made."""


class HandshakeError(Exception):
    """TLS failed: the trust anchors could not be loaded, or the handshake or a later read
    or write failed (protocol version, alert, connection closed)."""


def verify_error_text(code: int) -> str:
    """A readable name for an X509_V_ERR code."""
    return _VERIFY_ERRORS.get(code, f"X509 verify error {code}")


def is_ip_literal(name: str) -> bool:
    """True when ``name`` is an IPv4 or IPv6 address rather than a host name."""
    try:
        ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return True


def _stamp(ca_file: str) -> tuple[int, int] | None:
    """When and how large the trust anchors' file is (the system bundle for ""), so that a
    replaced file is loaded again; None when it cannot be read."""
    path = ca_file or ssl.get_default_verify_paths().cafile
    try:
        info = os.stat(path) if path else None
    except OSError:
        return None
    return None if info is None else (info.st_mtime_ns, info.st_size)


@functools.lru_cache(maxsize=16)
def _context(ca_file: str, alpn: bytes, stamp: tuple[int, int] | None) -> SSL.Context:
    """A TLS 1.3 client context with these trust anchors, built once per file version:
    parsing a CA bundle takes milliseconds, on the event loop, on every probe otherwise."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.set_alpn_protos([alpn])
    try:
        if ca_file:
            ctx.load_verify_locations(ca_file)
        else:
            ctx.set_default_verify_paths()
    except SSL.Error as exc:
        raise HandshakeError(f"cannot load trust anchors from {ca_file!r}: "
                             f"{_describe(exc)}") from None
    # Every certificate given is an anchor, a private PKI's issuing CA too, as for Go's
    # roots (blackbox) and chrony's ntstrustedcerts; a chain then ends at the first anchor
    # met, so its expiry is that of the chain blackbox reports.
    store = ctx.get_cert_store()
    if store is not None:  # None only for a context without a store, never here
        store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    return ctx


_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----",
                              re.DOTALL)


@functools.lru_cache(maxsize=4)
def _anchors(path: str, stamp: tuple[int, int] | None
             ) -> tuple[tuple[crypto.X509, certinfo.Certificate], ...]:
    """The certificates of a trust anchors' file, parsed once per file version; one that
    cannot be read is left out, as OpenSSL leaves it out of the store."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return ()
    anchors = []
    for pem in _PEM_CERTIFICATE.findall(data):
        try:
            cert = crypto.load_certificate(crypto.FILETYPE_PEM, pem)
            anchors.append((cert, certinfo.read(
                crypto.dump_certificate(crypto.FILETYPE_ASN1, cert))))
        except (crypto.Error, certinfo.CertificateError):
            continue
    return tuple(anchors)


def _current_anchors(ca_file: str) -> crypto.X509Store | None:
    """A store of the trust anchors valid now (None when the file cannot be read).

    OpenSSL looks in the trust store first and builds one chain: an expired copy of a root
    there (same subject and key as a valid cross-signed one the server sends) fails a
    chain that Go's verifier (blackbox) and chrony accept by another path."""
    path = ca_file or ssl.get_default_verify_paths().cafile
    anchors = _anchors(path, _stamp(ca_file)) if path else ()
    if not anchors:
        return None
    now = time.time()
    store = crypto.X509Store()
    for anchor, read in anchors:
        if read.not_before <= now <= read.not_after:
            store.add_cert(anchor)
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    return store


class TLSClient:
    """One TLS 1.3 client connection. ``ca_file`` "" means the system trust store.

    Use :meth:`connect`, :meth:`handshake`, then :meth:`send` / :meth:`recv` and
    :meth:`export_keying_material`; :meth:`close` always. Each awaiting step is bounded by
    the caller.
    """

    def __init__(self, *, ca_file: str, alpn: bytes) -> None:
        self._ca_file = ca_file
        self._ctx = _context(ca_file, alpn, _stamp(ca_file))
        self._sock: socket.socket | None = None
        self._conn: SSL.Connection | None = None
        self.verify_errors: list[tuple[int, int, str]] = []  # (depth, code, message)
        self.identity_error: str | None = None
        self._verified: list[crypto.X509] = []

    def _verify_chain(self, conn: SSL.Connection) -> None:
        """Verify the chain the server sent against the context's trust anchors, at the
        current time, for a TLS server: as Go's verifier (blackbox), every certificate of
        the chain whose extended key usage is restricted must allow serverAuth."""
        sent = conn.get_peer_cert_chain() or []
        if not sent:
            self.verify_errors.append((0, X509_V_ERR_UNSPECIFIED, "no certificate"))
            return
        store = self._ctx.get_cert_store()
        if store is None:  # never for a client context
            self.verify_errors.append((0, X509_V_ERR_UNSPECIFIED, "no trust store"))
            return
        try:
            verified = crypto.X509StoreContext(store, sent[0], sent[1:]).get_verified_chain()
        except crypto.X509StoreContextError as exc:
            code, depth, message = exc.errors
            retry = None
            if code in TIME_ERRORS:
                # Another path, without the anchors that are out of date, may hold.
                current = _current_anchors(self._ca_file)
                if current is not None:
                    with contextlib.suppress(crypto.X509StoreContextError):
                        retry = crypto.X509StoreContext(current, sent[0],
                                                        sent[1:]).get_verified_chain()
            if retry is None:
                self.verify_errors.append((depth, code, str(message)))
                return
            verified = retry
        for depth, cert in enumerate(verified):
            why = _server_use_problem(cert)
            if why is not None:
                self.verify_errors.append((depth, X509_V_ERR_INVALID_PURPOSE, why))
                return
        self._verified = verified

    async def connect(self, address: str, port: int, family: int) -> None:
        """Open the TCP connection (Nagle off: NTS-KE is a few small request/response
        writes, and delayed ACKs would cost tens of milliseconds)."""
        sock = budget.open_socket(family, socket.SOCK_STREAM)  # within the probes' share
        sock.setblocking(False)
        self._sock = sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.get_running_loop().sock_connect(sock, (address, port))
        except OSError as exc:
            # asyncio's words ("Connect call failed (...)") hide the system's: the errno's.
            why = os.strerror(exc.errno) if exc.errno else exc.strerror or str(exc)
            raise ConnectError(exc.errno, why) from None

    async def handshake(self, server_name: str) -> None:
        """TLS handshake, then the identity check against ``server_name`` (a host name,
        sent as SNI, or an IP address, which RFC 6066 keeps out of SNI)."""
        if self._sock is None:
            raise RuntimeError("handshake before connect")
        conn = SSL.Connection(self._ctx, self._sock)  # VERIFY_NONE: verified after
        self._conn = conn
        ip = is_ip_literal(server_name)
        if not ip:
            # An absolute name: SNI carries no trailing dot (RFC 6066, section 3), and the
            # certificate names the host without it.
            server_name = a_label(server_name.removesuffix("."))
            conn.set_tlsext_host_name(server_name.encode("ascii"))
        conn.set_connect_state()
        while True:
            try:
                conn.do_handshake()
                break
            except SSL.WantReadError:
                await self._ready(write=False)
            except SSL.WantWriteError:
                await self._ready(write=True)
            except (SSL.Error, OSError) as exc:
                raise HandshakeError(_describe(exc)) from None
        self._verify_chain(conn)
        try:
            identity = (IPAddress_ID(server_name.split("%", 1)[0]) if ip
                        else DNS_ID(server_name))
            verify_service_identity(cert_patterns=_patterns(conn), obligatory_ids=[identity],
                                    optional_ids=[])
        except VerificationError:
            # Its repr of mismatch objects is no sentence for check's line: say it in words.
            self.identity_error = (f"the certificate does not name {server_name}"
                                   f"{_names_of(conn, ip)}")
        except CertificateError as exc:  # no subjectAltName at all: its words are plain
            self.identity_error = f"{server_name}: {exc}"
        except Exception as exc:  # a certificate that does not parse names nobody
            self.identity_error = (f"{server_name}: unreadable certificate names: "
                                   f"{type(exc).__name__}: {exc}")

    @property
    def version(self) -> str:
        """The protocol version, as OpenSSL names it (``TLSv1.3``)."""
        return self._connection.get_protocol_version_name()

    @property
    def cipher(self) -> str:
        """The cipher suite's IANA name (``TLS_AES_256_GCM_SHA384``)."""
        return self._connection.get_cipher_name() or ""

    @property
    def alpn(self) -> bytes:
        """The protocol the server selected, b"" for none."""
        return self._connection.get_alpn_proto_negotiated() or b""

    def peer_chain(self) -> list[certinfo.Certificate | str]:
        """The certificates the server sent, leaf first; one that cannot be read as Go
        reads it (OpenSSL is more lenient: a fractional GeneralizedTime, a duplicate
        extension) is the reason why, in its place."""
        return [_readable(c) for c in self._connection.get_peer_cert_chain() or []]

    def verified_chain(self) -> list[certinfo.Certificate | str]:
        """The chain OpenSSL built to a trust anchor, leaf first; empty when none."""
        return [] if self.verify_errors else [_readable(c) for c in self._verified]

    async def send(self, data: bytes) -> None:
        """Write all of ``data``."""
        conn = self._connection
        view = memoryview(data)
        while view:
            try:
                sent = conn.send(view)
            except SSL.WantWriteError:
                await self._ready(write=True)
                continue
            except SSL.WantReadError:
                await self._ready(write=False)
                continue
            except (SSL.Error, OSError) as exc:
                raise HandshakeError(_describe(exc)) from None
            view = view[sent:]

    async def recv(self) -> bytes:
        """The next plaintext bytes; b"" when the server closed the connection."""
        conn = self._connection
        while True:
            try:
                return conn.recv(_READ_SIZE)
            except SSL.WantReadError:
                await self._ready(write=False)
            except SSL.WantWriteError:
                await self._ready(write=True)
            except SSL.ZeroReturnError:
                return b""
            except SSL.SysCallError as exc:
                if exc.args and exc.args[0] == -1:  # EOF without close_notify
                    return b""
                raise HandshakeError(_describe(exc)) from None
            except (SSL.Error, OSError) as exc:
                raise HandshakeError(_describe(exc)) from None

    def export_keying_material(self, label: bytes, length: int, context: bytes) -> bytes:
        """RFC 8446 §7.5 exporter output."""
        return self._connection.export_keying_material(label, length, context)

    def close(self) -> None:
        """Close the connection without waiting for the server (idempotent)."""
        if self._conn is not None:
            with contextlib.suppress(SSL.Error, OSError):
                self._conn.shutdown()  # one close_notify; never waits for the reply
            self._conn = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            budget.give_back()

    @property
    def _connection(self) -> SSL.Connection:
        if self._conn is None:
            raise RuntimeError("no TLS connection")
        return self._conn

    async def _ready(self, *, write: bool) -> None:
        sock = self._sock
        if sock is None:
            raise HandshakeError("connection closed")
        loop = asyncio.get_running_loop()
        fd = sock.fileno()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        if write:
            loop.add_writer(fd, wake)
        else:
            loop.add_reader(fd, wake)
        try:
            await ready
        finally:
            if write:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)


def _server_use_problem(cert: crypto.X509) -> str | None:
    """Why ``cert`` may not be part of a TLS server's chain, by its extended key usage
    (none, serverAuth or anyExtendedKeyUsage will do); None when it may."""
    readable = _readable(cert)
    if isinstance(readable, str):
        return f"unreadable certificate: {readable}"
    if readable.problem is not None:
        return f"unreadable certificate: {readable.problem}"
    usage = readable.extended_key_usage
    if not usage or any(oid in usage for oid in _SERVER_USES):  # none listed: Go's "any"
        return None
    return verify_error_text(X509_V_ERR_INVALID_PURPOSE)


# serverAuth and anyExtendedKeyUsage (RFC 5280, 4.2.1.12)
_SERVER_USES = ("1.3.6.1.5.5.7.3.1", "2.5.29.37.0")


def _readable(cert: crypto.X509) -> certinfo.Certificate | str:
    """What the probe judges of ``cert``, read from its DER; or why it cannot be read."""
    return _read(crypto.dump_certificate(crypto.FILETYPE_ASN1, cert))


@functools.lru_cache(maxsize=32)  # a chain is judged, named and listed: each read once
def _read(der: bytes) -> certinfo.Certificate | str:
    try:
        return certinfo.read(der)
    except certinfo.CertificateError as exc:
        return str(exc)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SSL.Error) and exc.args and isinstance(exc.args[0], list):
        reasons = [str(e[2]) for e in exc.args[0] if isinstance(e, tuple) and len(e) == 3]
        if reasons:
            return "; ".join(reasons)
    if isinstance(exc, SSL.SysCallError) and exc.args:
        return str(exc.args[-1])
    return str(exc) or type(exc).__name__
