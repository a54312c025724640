"""The NTS prober's work: the key exchange over TLS, then the authenticated burst.

Imported by :mod:`ntp_probe.probers.nts` on the first NTS probe (see there): it brings the
TLS and AEAD stack that nothing else in the exporter needs.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from ntp_probe.config.schema import Module, NTPSettings, NTSSettings
from ntp_probe.engine.context import ProbeContext
from ntp_probe.engine.result import NO_TIME, Measurement, Reason
from ntp_probe.engine.targets import Target
from ntp_probe.net.budget import LocalSocketError, Reservation
from ntp_probe.net.resolve import Resolved, ResolveError, resolve
from ntp_probe.net.tls import TIME_ERRORS, ConnectError, HandshakeError, TLSClient
from ntp_probe.net.udp import Datagram, DatagramPump, Unreachable, sockaddr_for
from ntp_probe.probers import common, ntp
from ntp_probe.probers.nts import (
    AEAD_ALGORITHM,
    AUTHENTICATED,
    CERT_IDENTITY_VERIFIED,
    CERT_VERIFIED,
    COOKIES_RECEIVED,
    KE_DURATION,
    NTP_SERVER_INFO,
    SSL_EARLIEST_EXPIRY,
    SSL_LAST_CHAIN_EXPIRY,
    SSL_LAST_CHAIN_INFO,
    TLS_CIPHER,
    TLS_VERSION,
    NTSReport,
)
from ntp_probe.probers.pacing import MIN_REPLY_WINDOW, Pace, least_window
from ntp_probe.proto import certinfo
from ntp_probe.proto.ntp import client as rules
from ntp_probe.proto.ntp import packet as ntppkt
from ntp_probe.proto.nts import ef, ke

ALPN = b"ntske/1"
NTS_VERSION = 4  # NTS extension fields exist in NTPv4 only
_SUMMARY_MARGIN = 0.005  # kept back from the deadline to summarise and render
# A cookie-carrying request stays under about 1 KiB of extension fields, which chrony
# accepts (it drops larger requests silently); this caps the placeholders below 7 when
# cookies are large.
_MAX_COOKIE_FIELD_BYTES = 1024
_UID_LENGTH = 32
# A KE failure from proto/nts/ke.py -> the probe's reason. A warning (no codes are defined)
# and "no common next protocol" are the server refusing us, like an error record.
_KE_REASONS = {
    "nts_ke_malformed": Reason.NTS_KE_MALFORMED,
    "nts_ke_error": Reason.NTS_KE_ERROR,
    "nts_ke_warning": Reason.NTS_KE_ERROR,
    "nts_no_common_protocol": Reason.NTS_KE_ERROR,
    "nts_no_common_aead": Reason.NTS_NO_COMMON_AEAD,
    "nts_no_cookies": Reason.NTS_NO_COOKIES,
}
# What a KE phase that runs out of time reads as.
_PHASE_TIMEOUT = {"connect": Reason.NTS_KE_CONNECT, "tls": Reason.NTS_KE_TLS,
                  "records": Reason.TIMEOUT}
_PHASE_WORDS = {"connect": "the TCP connection was not set up in time",
                "tls": "the TLS handshake did not finish in time",
                "records": "the key exchange's records did not all come in time"}


@dataclass(slots=True)
class _State:
    """What the probe learned, for its report."""

    ke_server: str
    ke_port: int
    server_name: str
    tls_version: str | None = None
    cipher: str | None = None
    cert_verified: bool | None = None
    identity_verified: bool | None = None
    earliest_expiry: float | None = None
    aead: int | None = None
    cookies_received: int = 0
    ntp_server: str | None = None
    ntp_port: int | None = None


@dataclass(slots=True)
class _Session:
    """Keys and cookies of one KE, and what the burst's replies did with them."""

    c2s: bytes
    s2c: bytes
    aead: int
    cookies: list[bytes]
    server: str | None  # negotiated NTP server name or address; None: the KE address
    port: int
    uid: bytes | None = None  # the outstanding request's unique identifier
    auth_failed: int = 0
    uid_mismatch: int = 0
    nak: bool = False
    # A NAK echoed the outstanding request's identifier; it stands if no authentic reply
    # follows within the reply timeout.
    nak_pending: bool = False
    cookies_returned: int = 0
    # Every cookie this session was given: one a server hands out again (the one just
    # spent, or one copy many times) is not kept, so that no cookie goes out twice and two
    # requests can never be linked by it (RFC 8915, section 5.7).
    seen: set[bytes] = field(default_factory=set)

    def keep(self, cookies: Iterable[bytes]) -> int:
        """Add the cookies not seen before to the unused ones; returns how many were
        repeats, dropped."""
        repeats = 0
        for cookie in cookies:
            if cookie in self.seen:
                repeats += 1
            else:
                self.seen.add(cookie)
                self.cookies.append(cookie)
        return repeats


@dataclass(frozen=True, slots=True)
class _Reply:
    """An authenticated reply."""

    packet: ntppkt.Packet
    t4_unix_ns: int
    kernel_timestamp: bool
    cookies: tuple[bytes, ...] = ()


# --- NTS-KE ----------------------------------------------------------------------------


def _certificates(client: TLSClient, ctx: ProbeContext,
                  state: _State) -> tuple[Reason, str] | None:
    """Write the certificate gauges and log the chain; the reason to stop, with its words,
    if any."""
    m, log = ctx.measurement, ctx.log
    sent = client.peer_chain()
    unreadable: str | None = None
    for depth, cert in enumerate(sent):
        if isinstance(cert, str):
            unreadable = unreadable or f"certificate {depth} cannot be read ({cert})"
            log(f"certificate {depth}: cannot be read ({cert})")
            continue
        try:
            labels = certinfo.leaf_labels(cert.der)
        except certinfo.CertificateError as exc:  # judged readable: only its names are lost
            issuer = subject = f"(cannot be read: {exc})"
        else:
            _, issuer, subject, _ = labels
            if depth == 0:
                m.add(SSL_LAST_CHAIN_INFO, 1, *labels)
        log(f"certificate {depth}: subject {subject}, issuer {issuer}, notAfter "
            f"{datetime.fromtimestamp(cert.not_after, UTC).isoformat()}")
    chain = [c for c in sent if not isinstance(c, str)]
    if chain:
        state.earliest_expiry = min(c.not_after for c in chain)
        m.add(SSL_EARLIEST_EXPIRY, state.earliest_expiry)
        verified = [c for c in client.verified_chain() if not isinstance(c, str)] or chain
        m.add(SSL_LAST_CHAIN_EXPIRY, min(c.not_after for c in verified))
    for depth, code, text in client.verify_errors:
        log(f"certificate chain: depth {depth}: error {code} ({text})")
    state.cert_verified = not client.verify_errors
    state.identity_verified = client.identity_error is None
    m.add(CERT_VERIFIED, 1 if state.cert_verified else 0)
    m.add(CERT_IDENTITY_VERIFIED, 1 if state.identity_verified else 0)
    if client.identity_error is not None:
        log(f"certificate identity: {client.identity_error}")  # it names the name
    other = [(d, t) for d, code, t in client.verify_errors if code not in TIME_ERRORS]
    if other or unreadable:  # what cannot be read cannot be judged either
        return Reason.NTS_CERT_UNTRUSTED, (
            f"depth {other[0][0]}: {other[0][1]}" if other else str(unreadable))
    if client.verify_errors:
        depth, _, text = client.verify_errors[0]
        return Reason.NTS_CERT_EXPIRED, f"depth {depth}: {text}"
    if client.identity_error is not None:
        return Reason.NTS_CERT_NAME_MISMATCH, client.identity_error
    return None


def _log_record(log: Callable[[str], None], direction: str, record: ke.Record) -> None:
    try:
        name = ke.RecordType(record.record_type).name
    except ValueError:
        name = "unknown"
    body = record.body.hex() if len(record.body) <= 8 else f"{record.body[:8].hex()}..."
    log(f"KE {direction} record type={record.record_type} ({name}) "
        f"critical={record.critical} length={len(record.body)} body={body}")


async def _key_exchange(resolved: Resolved, port: int, nts: NTSSettings, ctx: ProbeContext,
                        state: _State, until: float) -> _Session | None:
    """Run NTS-KE; the session, or None with the failure recorded."""
    m, log = ctx.measurement, ctx.log
    try:
        client = TLSClient(ca_file=nts.ca_file, alpn=ALPN)
    except HandshakeError as exc:
        log(f"TLS setup failed: {exc}")
        m.fail(Reason.NTS_KE_TLS, f"TLS setup: {exc}")
        return None
    phase = "connect"
    # The phase under way: one that ends in a failure still says how long it ran.
    timing: str | None = phase
    started = time.perf_counter()
    try:
        async with asyncio.timeout_at(until):
            await client.connect(resolved.address, port, resolved.family)
            now = time.perf_counter()
            m.add(KE_DURATION, now - started, "connect")
            log(f"NTS-KE: connected to {resolved.address} port {port} "
                f"in {(now - started) * 1e3:.3f}ms")
            phase = timing = "tls"
            started = now
            await client.handshake(state.server_name)
            now = time.perf_counter()
            m.add(KE_DURATION, now - started, "tls")
            timing = None
            # blackbox's spelling (TLS 1.3), in the report as in the metric
            state.tls_version, state.cipher = _blackbox_version(client.version), client.cipher
            log(f"NTS-KE: {state.tls_version} {state.cipher}, ALPN "
                f"{client.alpn.decode(errors='replace') or '(none)'}, handshake "
                f"{(now - started) * 1e3:.3f}ms")
            m.add(TLS_VERSION, 1, state.tls_version)
            m.add(TLS_CIPHER, 1, state.cipher)
            stop = _certificates(client, ctx, state)
            if client.alpn != ALPN:
                log(f"server did not select ALPN {ALPN.decode()}: no KE request sent")
                m.fail(Reason.NTS_ALPN_MISMATCH, "the server selected no ALPN protocol"
                       if not client.alpn else f"the server selected ALPN {client.alpn!r}")
                return None
            if stop is not None:
                log(f"certificate not accepted ({stop[0]}): no KE request sent")
                m.fail(*stop)
                return None
            # From here: the certificate checks above are not the KE records' time.
            phase = timing = "records"
            started = time.perf_counter()
            request = ke.encode_request(nts.aead)
            decoder = ke.KEDecoder()
            for record in ke.KEDecoder().feed(request):
                _log_record(log, "sent", record)
            await client.send(request)
            while not decoder.complete:
                data = await client.recv()
                if not data:
                    break
                for record in decoder.feed(data):
                    _log_record(log, "received", record)
            records = decoder.finish()
            m.add(KE_DURATION, time.perf_counter() - started, "records")
            timing = None
            response = ke.validate_response(records, nts.aead)
            # Counted once the response is accepted: a refused one's cookies are none the
            # probe may use (RFC 8915 4.1.3). Each cookie once: it is sent once only.
            state.cookies_received = len(set(response.cookies))
            m.add(COOKIES_RECEIVED, state.cookies_received)
            state.aead = response.aead_id
            m.add(AEAD_ALGORITHM, response.aead_id)
            key_length = ef.aead_algorithm(response.aead_id).key_length
            c2s, s2c = (client.export_keying_material(
                ef.EXPORTER_LABEL, key_length, ef.exporter_context(response.aead_id, d))
                for d in (ef.Direction.C2S, ef.Direction.S2C))
    except TimeoutError:
        log(f"NTS-KE {phase} phase timed out")
        m.fail(_PHASE_TIMEOUT[phase], _PHASE_WORDS[phase])
        return None
    except ConnectError as exc:
        log(f"NTS-KE connect to {resolved.address} port {port} failed: {exc.strerror}")
        m.fail(Reason.NTS_KE_CONNECT, f"{resolved.address} port {port}: {exc.strerror}")
        return None
    except LocalSocketError as exc:
        log(f"local error, nothing sent: {exc.strerror or exc}")
        m.fail(Reason.LOCAL_ERROR, str(exc.strerror or exc))
        return None
    except HandshakeError as exc:
        log(f"NTS-KE TLS failed during {phase}: {exc}")
        # A server that speaks none of our ALPN protocols says so with a fatal alert; one
        # that picks a protocol we did not offer (http/1.1) OpenSSL refuses as a bad
        # extension (its ALPN check's words: TLS servers send no other malformed one).
        why = str(exc)
        m.fail(Reason.NTS_ALPN_MISMATCH if "no application protocol" in why
               or "bad extension" in why else Reason.NTS_KE_TLS, why)
        return None
    except ke.KEFailure as exc:
        log(f"NTS-KE response rejected ({exc.reason}): {exc}")
        m.add(COOKIES_RECEIVED, 0)
        m.fail(_KE_REASONS.get(exc.reason, Reason.NTS_KE_MALFORMED), str(exc))
        return None
    finally:
        if timing is not None:
            m.add(KE_DURATION, time.perf_counter() - started, timing)
        client.close()
    log(f"NTS-KE: AEAD {response.aead_id}, {len(response.cookies)} cookies of "
        f"{len(response.cookies[0])} bytes, NTP server {response.server or '(same address)'} "
        f"port {response.ntp_port}")
    session = _Session(c2s, s2c, response.aead_id, [], response.server, response.ntp_port)
    repeats = session.keep(response.cookies)
    if repeats:
        log(f"NTS-KE: {repeats} repeated cookies dropped (a cookie is sent once only)")
    return session


def _blackbox_version(openssl_name: str) -> str:
    """OpenSSL's ``TLSv1.3`` as blackbox_exporter writes it (``TLS 1.3``)."""
    return openssl_name.replace("TLSv", "TLS ", 1) if openssl_name.startswith("TLSv") \
        else openssl_name


# --- the authenticated burst ----------------------------------------------------------


def _matcher(client: rules.Client, burst: ntp.Burst, session: _Session,
             log: Callable[[str], None]) -> Callable[[Datagram], _Reply | None]:
    # What authenticating the reply found: the cookies it returns.
    cookies: tuple[bytes, ...] = ()

    def authenticate(data: bytes) -> rules.Discarded | None:
        nonlocal cookies
        uid = session.uid
        if uid is None:  # the request is being sent: nothing of ours can be answered yet
            return rules.Discarded("no request of this session is waiting", "no request")
        try:
            cookies = ef.verify_reply(data, uid, session.s2c, aead_id=session.aead).cookies
        except ef.NTSNak:
            # A NAK is not authenticated: anyone who saw the request can send one. As RFC
            # 8915 (5.7) asks, an authentic reply is still awaited; the NAK stands if none
            # comes.
            session.nak_pending = True
            return rules.Discarded("NTS NAK (kiss code NTSN, our uid echoed), not "
                                   "authenticated: waiting for an authentic reply", "nts nak")
        except ef.NTSUIDMismatch as exc:
            session.uid_mismatch += 1
            return rules.Discarded(str(exc), "unique identifier mismatch")
        except ef.NTSReplyError as exc:
            session.auth_failed += 1
            return rules.Discarded(str(exc), "authentication failed")
        return None

    def match(d: Datagram) -> _Reply | None:
        outcome = client.receive(d.data, d.source, authenticate)
        if isinstance(outcome, rules.Accepted):
            return _Reply(outcome.packet, d.rx_ns, d.kernel_timestamp, cookies)
        ntp.set_aside(burst, outcome, log)
        return None
    return match


def _placeholders(session: _Session, still_needed: int, cookie_length: int) -> int:
    """Placeholders that bring the unused cookies up to what the rest of the burst needs.

    The reply returns one cookie for the one this request spends, plus one per
    placeholder (RFC 8915, 5.7)."""
    field_bytes = len(ef.encode_field(ef.FieldType.NTS_COOKIE, bytes(cookie_length)))
    fit = max(0, _MAX_COOKIE_FIELD_BYTES // field_bytes - 1)
    return max(0, min(still_needed - len(session.cookies) - 1, ef.MAX_PLACEHOLDERS, fit))


async def _run_burst(pump: DatagramPump[_Reply], client: rules.Client, settings: NTPSettings,
                     burst: ntp.Burst, session: _Session, until: float,
                     ctx: ProbeContext, server: tuple[str, int]) -> None:
    loop = asyncio.get_running_loop()
    log = ctx.log
    pace = Pace(settings.sample_interval, settings.reply_timeout, until)
    burst.interrupt = pace.interrupt
    for i in range(settings.samples):
        # A KoD another probe got while the last sample was out (no pause to end then):
        # no pause, nothing more sent. One got during the pause ends it (Pace.interrupt).
        if i and ntp.held_back(burst, server, i, ctx):
            return
        if not session.cookies:
            log(f"no unused cookie left: burst stopped after {i} samples")
            return
        if not await pace.wait():
            log(f"burst shortened to {i} of {settings.samples} samples to fit the timeout")
            return
        if i and ntp.held_back(burst, server, i, ctx):
            return
        nonce = rules.new_nonce()
        header = client.request(nonce)
        cookie = session.cookies.pop(0)  # used once, never again
        placeholders = _placeholders(session, settings.samples - i - 1, len(cookie))
        session.uid = os.urandom(_UID_LENGTH)
        session.nak_pending = False
        request = header + ef.build_request_fields(
            header, session.uid, cookie, session.c2s, placeholders=placeholders,
            aead_id=session.aead)
        log(f"sample {i + 1}: request of {len(request)} bytes: cookie of {len(cookie)} bytes, "
            f"{placeholders} placeholders, uid {session.uid[:8].hex()}..., nonce {nonce:016x}")
        reply_until = min(loop.time() + settings.reply_timeout, until)
        try:
            t1_ns, reply = await pump.exchange(request, reply_until)
        except Unreachable as exc:
            burst.unreachable = exc.strerror or "unreachable"
            if exc.on_path is not None:
                # From another host, and no reply came: this sample is lost, the next
                # may get through (one forged packet must not end the burst).
                client.expire()
                log(f"sample {i + 1}: {burst.unreachable}")
                continue
            # Nothing listens, or the send failed: more requests would only fail too.
            client.cancel()
            log(f"sample {i + 1}: {burst.unreachable}: burst stopped")
            return
        finally:
            session.uid = None
        if reply is None:
            client.expire()
            if session.nak_pending:
                session.nak = True
                burst.received += 1  # the server answered, with a NAK
                log(f"sample {i + 1}: NTS NAK and no authentic reply: the server rejected "
                    f"the cookie or the authenticator; burst stopped")
                return
            log(f"sample {i + 1}: no authenticated reply")
            continue
        burst.received += 1
        p = reply.packet
        repeats = session.keep(reply.cookies)
        session.cookies_returned += len(reply.cookies) - repeats
        if repeats:
            log(f"sample {i + 1}: {repeats} repeated cookies (given before, or twice in "
                "this reply) dropped (a cookie is sent once only)")
        s = ntp.take_sample(burst, i, p, t1_ns, reply.t4_unix_ns, pump.last_tx_kernel,
                            reply.kernel_timestamp, log)
        if burst.kod is not None:
            return
        if s is None:
            continue
        pace.seen(s.delay)
        log(f"sample {i + 1}: authenticated reply of {len(reply.cookies) - repeats} new "
            f"cookies, T1={s.t1:016x} T2={s.t2:016x} T3={s.t3:016x} T4={s.t4:016x} "
            f"offset={s.offset * 1e6:+.3f}us {ntp.delay_text(s)} "
            f"stratum={p.stratum} refid={p.refid_text}")


async def _ntp_server(session_server: str | None, ke_address: Resolved, ctx: ProbeContext,
                      settings: NTPSettings, until: float) -> Resolved | None:
    """Where the NTP exchange goes: the KE connection's address unless KE named a server;
    a named server is checked by name against the policy and resolved (the caller checks
    the address with common.allowed, as for a target)."""
    if session_server is None:
        return ke_address
    m, log = ctx.measurement, ctx.log
    if common.refused(ctx, ctx.guard.refuse(session_server)):
        return None
    room = until - asyncio.get_running_loop().time()
    try:
        async with asyncio.timeout_at(until):  # a literal too, by the module's family
            return await resolve(session_server.rstrip("."), settings.preferred_ip_protocol,
                                 settings.ip_protocol_fallback)
    except (ResolveError, TimeoutError) as exc:
        if isinstance(exc, TimeoutError) and room < least_window(settings.reply_timeout):
            # As for a target's name: the budget, not the name, left no room.
            log(f"resolve negotiated NTP server {session_server}: no time left to look it "
                "up and send a request: nothing sent")
            m.fail(Reason.LOCAL_ERROR, NO_TIME)
            return None
        why = f"negotiated NTP server {session_server}: {str(exc) or 'timed out'}"
        log(f"resolve {why}")
        m.fail(Reason.RESOLVE, why)
        return None


async def _authenticated_burst(server: Resolved, port: int, settings: NTPSettings,
                               session: _Session, burst: ntp.Burst, until: float,
                               ctx: ProbeContext, reservation: Reservation) -> None:
    """The module's burst over NTS; concluded (gauges, reasons, KoD memory) by the NTP
    prober's own rules, whatever cut it short."""
    m, log = ctx.measurement, ctx.log
    log(f"probing {server.address} port {port} over NTS, {ntp.samples_text(settings)}")
    client = rules.Client((server.address, port), NTS_VERSION)
    pump: DatagramPump[_Reply] | None = None
    try:
        reservation.release()  # the pump's socket takes its place, in this same step
        pump = DatagramPump(server.family, sockaddr_for(server.address, port, server.family),
                            _matcher(client, burst, session, log), log, tx_timestamps=True)
        with ntp.kod_watched(burst, (server.address, port), settings.samples, ctx):
            async with pump:
                await _run_burst(pump, client, settings, burst, session, until, ctx,
                                 (server.address, port))
    except OSError as exc:
        # No socket (out of descriptors): this host's trouble, as for the ntp prober.
        log(f"local error, nothing sent: {exc.strerror or exc}")
        burst.local_error = exc.strerror or str(exc)
    finally:
        if pump is not None:
            burst.sent = pump.sent
            burst.discarded += pump.truncated  # a reply too long to be one, from anyone
        if session.nak:
            m.add(common.KISS_CODE, 1, "NTSN")  # a Kiss-o'-Death like any other
            m.fail(Reason.NTS_NAK)
        elif not burst.samples and session.auth_failed:
            m.fail(Reason.NTS_AUTH_FAILED)
        if session.auth_failed or session.uid_mismatch:
            log(f"{session.auth_failed} replies failed authentication, "
                f"{session.uid_mismatch} did not carry our unique identifier")
        log(f"{session.cookies_returned} new cookies received in replies; "
            f"{len(session.cookies)} unused cookies dropped")
        ntp.conclude(burst, settings, ctx, (server.address, port))


def _hold_back_key_exchange(burst: ntp.Burst | None, ke: tuple[str, int],
                            server: tuple[str, int], ctx: ProbeContext) -> None:
    """While the NTP server is backed off (a Kiss-o'-Death this burst or another probe
    got), the NTS-KE server is held back as long: each scrape would otherwise still cost
    it a TLS handshake and fresh cookies. A normal answer clears both."""
    if ke == server:
        return
    backoff = ctx.guard.backoff(server[0], server[1])
    if backoff is not None:
        code, left = backoff
        ctx.guard.hold(ke[0], ke[1], code, left)
        ctx.log(f"no NTS-KE with {ke[0]} port {ke[1]} for {left:.0f}s either")
    elif burst is not None and burst.samples:
        ctx.guard.answered(ke[0], ke[1])


async def probe(target: Target, module: Module, ctx: ProbeContext) -> Measurement:
    """Probe one NTS server: KE and certificates, then the authenticated burst."""
    settings, nts = module.ntp, module.nts
    ke_port = target.port if target.port is not None else nts.port
    loop = asyncio.get_running_loop()
    until = ctx.deadline - _SUMMARY_MARGIN
    resolved = await common.prepare(target, ke_port, ctx, preferred=settings.preferred_ip_protocol,
                                    fallback=settings.ip_protocol_fallback, until=until,
                                    window=MIN_REPLY_WINDOW)
    m = ctx.measurement
    if resolved is None:
        return m
    if until - loop.time() < MIN_REPLY_WINDOW:
        # Not even a first round trip could end in time (a scrape-timeout header of a few
        # milliseconds): nothing sent, and no KE reason that would blame the server.
        ctx.log("no time left for a key exchange: nothing sent")
        m.fail(Reason.LOCAL_ERROR, NO_TIME)
        return m
    state = _State(resolved.address, ke_port, nts.server_name or target.host)
    try:
        # The NTP exchange's socket, counted before the key exchange takes the server's
        # handshake and cookies: past the probes' share, nothing is sent at all.
        reservation = Reservation()
    except LocalSocketError as exc:
        ctx.log(f"local error, nothing sent: {exc.strerror or exc}")
        m.fail(Reason.LOCAL_ERROR, str(exc.strerror or exc))
        return m
    burst: ntp.Burst | None = None
    try:
        session = await _key_exchange(resolved, ke_port, nts, ctx, state,
                                      min(loop.time() + nts.ke_timeout, until))
        if session is None:
            return m
        # Named before it is checked: a refused or unresolvable server is shown too.
        port = session.port
        state.ntp_server, state.ntp_port = session.server or resolved.address, port
        m.add(NTP_SERVER_INFO, 1, state.ntp_server, str(port))
        server = await _ntp_server(session.server, resolved, ctx, settings, until)
        if server is None:
            return m
        # The negotiated server passes the same checks as a target: policy, KoD backoff.
        admitted = common.allowed(session.server or target.host, server, port, ctx)
        if admitted is None:
            _hold_back_key_exchange(None, (state.ke_server, ke_port), (server.address, port),
                                    ctx)
            return m
        server = admitted
        burst = ntp.Burst()
        await _authenticated_burst(server, port, settings, session, burst, until, ctx,
                                   reservation)
        _hold_back_key_exchange(burst, (state.ke_server, ke_port), (server.address, port),
                                ctx)
    finally:
        reservation.release()
        # Also when the runner's backstop cut the burst: the samples taken were
        # authenticated, and the NTP conclusion (which ran first) has their offset.
        authenticated = len(burst.samples) if burst is not None else 0
        # A Kiss-o'-Death counts too: in NTS it is honoured only once authenticated.
        kod = burst is not None and burst.kod is not None
        m.add(AUTHENTICATED, 1 if authenticated or kod else 0)
        concluded = ntp.report_of(m) if burst is not None else None
        m.reports.append(NTSReport(
            state.ke_server, state.ke_port, state.server_name, state.tls_version, state.cipher,
            state.cert_verified, state.identity_verified, state.earliest_expiry, state.aead,
            state.cookies_received, state.ntp_server, state.ntp_port, authenticated,
            concluded.offset if concluded is not None else None,
            concluded.samples if concluded is not None else ()))
    return m
