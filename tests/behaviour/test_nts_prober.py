"""The nts prober against in-process fakes: an NTS-KE server (pyOpenSSL, TLS 1.3, driven by
the event loop) with a test CA, and an NTS NTP server that builds replies with proto/nts.

Each failure a real server is unlikely to produce on demand (NAK, tampered authenticator,
foreign unique identifier, malformed and hostile KE records, a stalled KE) is told apart by
its reason.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import errno
import hashlib
import os
import random
import socket
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Literal

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from ntp_probe.config.load import parse_config
from ntp_probe.config.schema import NTS_AEAD_IDS, ConfigError, Module, NTPSettings, NTSSettings
from ntp_probe.engine.context import ProbeContext, ProbeLog
from ntp_probe.engine.result import NO_TIME, Reason
from ntp_probe.net import budget
from ntp_probe.net.budget import limit_probe_sockets
from ntp_probe.net.resolve import Resolved
from ntp_probe.net.tls import TLSClient
from ntp_probe.net.udp import DatagramPump
from ntp_probe.probers import nts_session
from ntp_probe.probers.nts import NTSReport
from ntp_probe.proto.nts import ef, ke
from ntp_probe.safety.guard import Guard
from ntp_probe.safety.kod import KodTable
from ntp_probe.safety.policy import TargetPolicy, parse_rules
from tests.conftest import LOOPBACK, label_sets, probe, value

Records = Callable[[int], bytes]  # NTP port -> the KE response bytes
PKI = tuple[Path, Path, Path]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _make_pki(d: Path, san: x509.ExtensionType, *extra: x509.ExtensionType) -> PKI:
    """(CA file, server certificate, server key) in ``d``: a CA and a leaf with ``san``
    (and the ``extra`` extensions)."""
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("fake-ca")).issuer_name(_name("fake-ca"))
          .public_key(ca_key.public_key()).serial_number(1)
          .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=9))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(_name("fake")).issuer_name(ca.subject)
               .public_key(key.public_key()).serial_number(2)
               .not_valid_before(now - dt.timedelta(days=1))
               .not_valid_after(now + dt.timedelta(days=5))
               .add_extension(san, critical=False))
    for extension in extra:
        builder = builder.add_extension(extension, critical=False)
    leaf = builder.sign(ca_key, hashes.SHA256())
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (d / "leaf.key").write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    return d / "ca.pem", d / "leaf.pem", d / "leaf.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    """(CA file, server certificate, server key): a CA and a leaf for 127.0.0.1."""
    return _make_pki(tmp_path_factory.mktemp("pki"),
                     x509.SubjectAlternativeName([x509.IPAddress(IPv4Address(LOOPBACK))]))


@dataclass
class FakeNTS:
    """What the fakes do; tests change the fields."""

    ke_port: int = 0
    ntp_port: int = 0
    records: Records | None = None  # None: a normal response
    # ok | nak | tamper | uid | plain | rate (an authenticated KoD) | nak_then_ok (a forged
    # NAK ahead of the authentic reply) | empty_cookie (the reply's new cookie is empty) |
    # spent_cookie (the reply "returns" the cookie its request spent)
    ntp_mode: str = "ok"
    ke_one_cookie: bool = False  # the KE response gives one cookie eight times
    ke_connections: int = 0
    withhold: int = 0  # requests answered only along with the next answered one (late)
    withheld: list[bytes] = field(default_factory=list)
    keys: dict[bytes, tuple[bytes, bytes]] = field(default_factory=dict)  # cookie -> keys
    requests: list[bytes] = field(default_factory=list)
    on_request: Callable[[], None] | None = None  # called as each NTP request arrives
    server_names: list[bytes | None] = field(default_factory=list)  # each ClientHello's SNI


def normal_response(ntp_port: int, cookies: list[bytes]) -> bytes:
    recs = [ke.Record(1, b"\0\0", True), ke.Record(4, b"\0\x0f", True),
            ke.Record(7, struct.pack("!H", ntp_port), True)]
    recs += [ke.Record(5, c) for c in cookies]
    recs.append(ke.Record(0, b"", True))
    return b"".join(r.encode() for r in recs)


async def _io(sock: socket.socket, op: Callable[[], bytes | int | None]) -> bytes | int | None:
    loop = asyncio.get_running_loop()
    while True:
        try:
            return op()
        except (SSL.WantReadError, SSL.WantWriteError):
            ready: asyncio.Future[None] = loop.create_future()

            def wake(ready: asyncio.Future[None] = ready) -> None:
                if not ready.done():
                    ready.set_result(None)

            loop.add_reader(sock.fileno(), wake)
            try:
                await ready
            finally:
                loop.remove_reader(sock.fileno())


async def _serve_ke(fake: FakeNTS, ctx: SSL.Context, sock: socket.socket) -> None:
    fake.ke_connections += 1
    conn = SSL.Connection(ctx, sock)
    conn.set_accept_state()
    try:
        await _io(sock, lambda: conn.do_handshake())
        buf = b""
        while not buf.endswith(b"\x80\x00\x00\x00"):
            buf += await _io(sock, lambda: conn.recv(4096))  # type: ignore[operator]
        c2s, s2c = (conn.export_keying_material(ef.EXPORTER_LABEL, 32,
                                                ef.exporter_context(15, d))
                    for d in (ef.Direction.C2S, ef.Direction.S2C))
        cookies = ([os.urandom(100)] * 8 if fake.ke_one_cookie
                   else [os.urandom(100) for _ in range(8)])
        for c in cookies:
            fake.keys[c] = (c2s, s2c)
        data = (fake.records(fake.ntp_port) if fake.records is not None
                else normal_response(fake.ntp_port, cookies))
        conn.sendall(data)
        conn.shutdown()
    except (SSL.Error, OSError):
        pass
    finally:
        sock.close()


class _NTPServer(asyncio.DatagramProtocol):
    def __init__(self, fake: FakeNTS) -> None:
        self.fake = fake
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        fake = self.fake
        fake.requests.append(data)
        if fake.on_request is not None:
            fake.on_request()
        fields: dict[int, bytes] = {}
        off = 48
        while off < len(data):
            t, n = struct.unpack_from("!HH", data, off)
            fields.setdefault(t, data[off + 4:off + n])
            off += n
        uid, cookie = fields[ef.FieldType.UNIQUE_IDENTIFIER], fields[ef.FieldType.NTS_COOKIE]
        _, s2c = fake.keys[cookie[:100]]
        now = int((time.time() + 2208988800) * 2**32)
        origin = struct.unpack_from("!Q", data, 40)[0]
        if fake.ntp_mode in ("nak", "nak_then_ok"):
            # LI 3, mode 4, stratum 0, kiss code NTSN: the UID echoed, no authenticator.
            header = struct.pack("!BBbbII4sQQQQ", 0xE4, 0, 0, -20, 0, 0, b"NTSN", 0, origin,
                                 0, 0)
            assert self.transport is not None
            self.transport.sendto(header + ef.encode_field(0x0104, uid[:32]), addr)
            if fake.ntp_mode == "nak":
                return
        header = struct.pack("!BBbbII4sQQQQ", 0x24, 2, 0, -20, 0, 0, b"GPS\0", now, origin,
                             now, now)
        if fake.ntp_mode == "rate":  # LI 3, stratum 0, kiss code RATE, poll 2^4
            header = struct.pack("!BBbbII4sQQQQ", 0xE4, 0, 4, -20, 0, 0, b"RATE", 0, origin,
                                 now, now)
        if fake.ntp_mode == "plain":  # the NTS fields stripped on the way
            assert self.transport is not None
            self.transport.sendto(header, addr)
            return
        uid_field = ef.encode_field(0x0104, os.urandom(32) if fake.ntp_mode == "uid" else uid[:32])
        new_cookie = cookie[:100] if fake.ntp_mode == "spent_cookie" else os.urandom(100)
        fake.keys[new_cookie] = fake.keys[cookie[:100]]
        plaintext = (struct.pack("!HH", ef.FieldType.NTS_COOKIE, 4)  # a field with no body
                     if fake.ntp_mode == "empty_cookie"
                     else ef.encode_field(ef.FieldType.NTS_COOKIE, new_cookie))
        nonce = os.urandom(16)
        ct = ef.aead_algorithm(15).encrypt(s2c, nonce, plaintext, header + uid_field)
        if fake.ntp_mode == "tamper":
            ct = ct[:-1] + bytes([ct[-1] ^ 1])
        auth = struct.pack("!HH", 16, len(ct)) + nonce + ct
        assert self.transport is not None
        answer = header + uid_field + ef.encode_field(0x0404, auth)
        if len(fake.requests) <= fake.withhold:
            fake.withheld.append(answer)
            return
        for late in fake.withheld:  # genuine, authenticated, and too late
            self.transport.sendto(late, addr)
        fake.withheld.clear()
        self.transport.sendto(answer, addr)


@contextlib.asynccontextmanager
async def running_fake(cert: Path, key: Path,
                       alpn: bytes | None = b"ntske/1") -> AsyncIterator[FakeNTS]:
    """The fake NTS-KE and NTS NTP servers, presenting ``cert`` (and selecting ``alpn``;
    None: a server that ignores ALPN)."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.use_certificate_chain_file(str(cert))  # the leaf, and any intermediates after it
    ctx.use_privatekey_file(str(key))
    if alpn is not None:
        ctx.set_alpn_select_callback(lambda conn, protos: alpn)
    loop = asyncio.get_running_loop()
    fake = FakeNTS()
    ctx.set_tlsext_servername_callback(lambda conn: fake.server_names.append(
        conn.get_servername()))
    transport, _ = await loop.create_datagram_endpoint(lambda: _NTPServer(fake),
                                                       local_addr=(LOOPBACK, 0))
    fake.ntp_port = transport.get_extra_info("sockname")[1]
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen()
    listener.setblocking(False)
    fake.ke_port = listener.getsockname()[1]
    tasks: set[asyncio.Task[None]] = set()

    async def accept() -> None:
        while True:
            sock, _ = await loop.sock_accept(listener)
            sock.setblocking(False)
            task = asyncio.create_task(_serve_ke(fake, ctx, sock))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    acceptor = asyncio.create_task(accept())
    try:
        yield fake
    finally:
        acceptor.cancel()
        for t in list(tasks):
            t.cancel()
        listener.close()
        transport.close()


@pytest.fixture
async def fake(pki: PKI) -> AsyncIterator[FakeNTS]:
    async with running_fake(pki[1], pki[2]) as fake:
        yield fake


def module(ca: Path, *, samples: int = 2, timeout: float = 2.0, ke_timeout: float = 1.0,
           reply_timeout: float = 0.2, server_name: str = "") -> Module:
    return Module(name="nts", prober="nts", timeout=timeout,
                  ntp=NTPSettings(samples=samples, sample_interval=0.01,
                                  reply_timeout=reply_timeout,
                                  preferred_ip_protocol="ip4"),
                  nts=NTSSettings(ca_file=str(ca), ke_timeout=ke_timeout,
                                  server_name=server_name))


async def test_a_budget_too_short_for_a_key_exchange_sends_nothing_and_blames_no_one(
        fake: FakeNTS, pki: PKI) -> None:
    # A scrape-timeout header of a few milliseconds: no KE round trip could end in time,
    # so no connection is made, and nts_ke_connect or nts_ke_tls would be untrue.
    m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(pki[0], timeout=0.02))
    assert m.failure is Reason.LOCAL_ERROR, log.text()
    assert m.failure_detail == NO_TIME
    assert fake.ke_connections == 0


async def test_authenticated_burst_uses_each_cookie_once(fake: FakeNTS, pki: PKI) -> None:
    m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(pki[0], samples=3))
    assert m.failure is None, log.text()
    # The CLI's report spells the version as the metric does (blackbox's TLS 1.3).
    assert value(m, "probe_tls_version_info", version="TLS 1.3") == 1
    nts_report = next(r for r in m.reports if isinstance(r, NTSReport))
    assert nts_report.to_json()["tls_version"] == "TLS 1.3"
    assert value(m, "probe_nts_authenticated") == 1
    assert value(m, "probe_ntp_stratum") == 2
    cookies = [r[48 + 36 + 4:48 + 36 + 104] for r in fake.requests]
    assert len(cookies) == 3 and len(set(cookies)) == 3
    uids = {r[52:84] for r in fake.requests}
    assert len(uids) == 3


@pytest.mark.parametrize(("samples", "placeholders"), [(9, 0), (10, 1)])
async def test_placeholders_ask_only_for_the_cookies_the_burst_lacks(
    fake: FakeNTS, pki: PKI, samples: int, placeholders: int
) -> None:
    # The KE gives 8 cookies, and every reply returns one for the cookie its request
    # spent, plus one per placeholder: 9 samples need none, 10 need one, once.
    m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(pki[0], samples=samples,
                                                               timeout=5.0))
    assert m.failure is None, log.text()
    sent = sum(_field_types(r).count(ef.FieldType.COOKIE_PLACEHOLDER) for r in fake.requests)
    assert (len(fake.requests), sent) == (samples, placeholders)


async def test_late_replies_are_counted_not_logged_one_by_one(fake: FakeNTS, pki: PKI) -> None:
    # Seven requests (of the KE's eight cookies) go unanswered until the eighth, whose
    # answer comes after theirs: a server (or a replayer) sending many late replies must
    # not fill the probe's log.
    fake.withhold = 7
    m, log = await probe(f"{LOOPBACK}:{fake.ke_port}",
                         module(pki[0], samples=8, timeout=5.0, reply_timeout=0.05))
    assert m.failure is None, log.text()
    assert value(m, "probe_ntp_samples_received") == 1
    text = log.text()
    assert text.count("late reply to an expired request ignored") == 5, text
    assert "2 more datagrams not logged one by one: 2 late" in text, text


def _field_types(request: bytes) -> list[int]:
    types, off = [], 48
    while off < len(request):
        t, n = struct.unpack_from("!HH", request, off)
        types.append(t)
        off += n
    return types


@pytest.mark.parametrize(("mode", "reason"), [
    ("nak", Reason.NTS_NAK),
    ("tamper", Reason.NTS_AUTH_FAILED),
    ("uid", Reason.INVALID_REPLY),
    ("plain", Reason.NTS_AUTH_FAILED),
])
async def test_replies_that_must_not_count(fake: FakeNTS, pki: PKI, mode: str,
                                           reason: Reason) -> None:
    fake.ntp_mode = mode
    m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(pki[0]))
    assert m.failure is reason, log.text()
    assert value(m, "probe_nts_authenticated") == 0
    assert value(m, "probe_ntp_offset_seconds") is None
    if mode == "nak":
        assert len(fake.requests) == 1  # the burst stops at the NAK
        assert label_sets(m, "probe_ntp_kiss_code_info") == [{"code": "NTSN"}]


async def test_a_nak_followed_by_an_authentic_reply_does_not_end_the_burst(
        fake: FakeNTS, pki: PKI) -> None:
    # A NAK is not authenticated: one forged by anyone who saw the request must not turn a
    # working server into nts_nak (RFC 8915, 5.7: wait for an authentic reply).
    fake.ntp_mode = "nak_then_ok"
    m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(pki[0], samples=3))
    assert m.failure is None, log.text()
    assert value(m, "probe_nts_authenticated") == 1
    assert len(fake.requests) == 3
    assert "not authenticated: waiting for an authentic reply" in log.text()


async def test_an_empty_cookie_in_a_reply_is_not_kept(fake: FakeNTS, pki: PKI) -> None:
    # The KE gives 8 cookies; the replies' new ones are empty and cannot be sent back: the
    # burst ends when the good ones are used up (it used to be a 500 at the ninth sample).
    fake.ntp_mode = "empty_cookie"
    m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(pki[0], samples=10))
    assert m.failure is None, log.text()
    assert len(fake.requests) == 8
    assert "no unused cookie left: burst stopped after 8 samples" in log.text()


@pytest.mark.parametrize("where", ["replies", "ke"])
async def test_a_cookie_handed_out_again_is_never_sent_twice(fake: FakeNTS, pki: PKI,
                                                            where: str) -> None:
    # RFC 8915, 5.7: one cookie in two requests links them. A server that gives back the
    # cookie just spent, or a KE that repeats one cookie, must not make us send it again.
    if where == "replies":
        fake.ntp_mode = "spent_cookie"
    else:
        fake.ke_one_cookie = True
    m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(pki[0], samples=10,
                                                               timeout=5.0))
    assert m.failure is None, log.text()
    sent = [r[48 + 36 + 4:48 + 36 + 104] for r in fake.requests]
    assert len(sent) == len(set(sent)), log.text()
    assert "(a cookie is sent once only)" in log.text()
    # Replies that only return spent cookies leave the KE's eight; one repeated cookie
    # from the KE is one, and each reply brings a fresh one.
    assert len(sent) == (8 if where == "replies" else 10)
    assert value(m, "probe_nts_cookies_received") == (8 if where == "replies" else 1)


def _records(*recs: ke.Record) -> Records:
    return lambda port: b"".join(r.encode() for r in recs)


EOM = ke.Record(0, b"", True)
NP = ke.Record(1, b"\0\0", True)
AEAD = ke.Record(4, b"\0\x0f", True)


@pytest.mark.parametrize(("records", "reason"), [
    (_records(ke.Record(2, b"\0\x01", True), EOM), Reason.NTS_KE_ERROR),
    (_records(NP, AEAD, ke.Record(2, b"\0\x01", True), ke.Record(5, b"c" * 50), EOM),
     Reason.NTS_KE_ERROR),  # cookies beside an error are none to use
    (_records(NP, ke.Record(4, b"", True), EOM), Reason.NTS_NO_COMMON_AEAD),
    (_records(NP, AEAD, EOM), Reason.NTS_NO_COOKIES),
    (_records(NP, AEAD, ke.Record(5, b"c" * 50)), Reason.NTS_KE_MALFORMED),  # no EOM
    (_records(NP, AEAD, ke.Record(0x1234, b"", True), ke.Record(5, b"c" * 50), EOM),
     Reason.NTS_KE_MALFORMED),
    (lambda port: b"\x00\x05\xff\xff" + b"x" * 100, Reason.NTS_KE_MALFORMED),
])
async def test_ke_responses(fake: FakeNTS, pki: PKI, records: Records,
                            reason: Reason) -> None:
    fake.records = records
    m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(pki[0]))
    assert m.failure is reason, log.text()
    assert m.failure_detail, "the KE rejection's words are the failure's detail"
    assert fake.requests == []  # no NTP packet after a failed KE
    # A refused response's cookies are none the probe may use (RFC 8915 4.1.3).
    assert value(m, "probe_nts_cookies_received") == 0
    # Every phase has its time, the records' too when the response is refused or cut
    # short (it came and went with the kind of fault).
    assert {labels["phase"] for labels in label_sets(m, "probe_nts_ke_duration_seconds")} \
        == {"connect", "tls", "records"}


async def test_fuzzed_ke_records_never_crash(fake: FakeNTS, pki: PKI) -> None:
    rng = random.Random(8915)
    for _ in range(40):
        recs = []
        for _ in range(rng.randint(0, 12)):
            kind = rng.choice([0, 1, 2, 3, 4, 5, 6, 7, 1024, rng.randint(0, 0x7FFF)])
            body = rng.randbytes(rng.choice([0, 1, 2, 3, 4, 20, 200]))
            if kind == 4 and body == b"\0\x0f":
                body = b"\0\x10"
            recs.append(ke.Record(kind, body, rng.random() < 0.5))
        raw = b"".join(r.encode() for r in recs)
        if rng.random() < 0.3:
            raw = raw[: rng.randint(0, len(raw))]
        fake.records = lambda port, raw=raw: raw
        m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(pki[0], samples=1))
        assert m.failure is not None and m.failure.value.startswith("nts_"), log.text()


async def test_stalled_ke_server_is_cut_off_by_the_deadline(pki: PKI) -> None:
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen()  # accepts the TCP connection, never speaks TLS
    try:
        m, log = await probe(f"{LOOPBACK}:{listener.getsockname()[1]}",
                             module(pki[0], timeout=0.5, ke_timeout=10.0))
    finally:
        listener.close()
    # The probe's deadline ended the handshake (the runner's backstop would say timeout).
    assert m.failure is Reason.NTS_KE_TLS, log.text()
    assert "tls phase timed out" in log.text()
    assert m.failure_detail == "the TLS handshake did not finish in time"  # check's line


def test_config_reads_the_nts_block() -> None:
    config = parse_config("modules:\n  n:\n    prober: nts\n    nts: {aead: [16, 15], "
                          "port: 4461}\n", "t")
    assert config.modules["n"].nts.aead == (16, 15)
    with pytest.raises(ConfigError, match="not one of"):
        parse_config("modules:\n  n:\n    prober: nts\n    nts: {aead: [30]}\n", "t")
    # 16.0 == 16, but a float would reach the wire format as one (a 500 at every scrape).
    with pytest.raises(ConfigError, match=r"16\.0 is not one of"):
        parse_config("modules:\n  n:\n    prober: nts\n    nts: {aead: [16.0, 15]}\n", "t")
    assert set(NTS_AEAD_IDS) == set(ef.AEAD_ALGORITHMS)


@pytest.mark.parametrize("name", ["..", ".", "a b", "*.example", "x" * 64 + ".example",
                                  "127.0.0.1.", "[::1]", "ntp.example:4460", "fe80::1%1",
                                  "::1%lo", " localhost", "localhost "])
def test_a_server_name_no_certificate_can_carry_is_refused_at_load(name: str) -> None:
    # Each was a 500 (IDNA) or a name mismatch blamed on the server's certificate.
    with pytest.raises(ConfigError, match=r"nts\.server_name"):
        parse_config(f"modules:\n  n:\n    prober: nts\n    nts: {{server_name: '{name}'}}\n",
                     "t")


@pytest.mark.parametrize("name", ["ntp.example.", "NTP.Example", "bücher.example", "192.0.2.1",
                                  "2001:db8::1"])
def test_host_names_and_addresses_are_server_names(name: str) -> None:
    config = parse_config(f"modules:\n  n:\n    prober: nts\n    nts: {{server_name: '{name}'}}\n",
                          "t")
    assert config.modules["n"].nts.server_name == name


def test_trust_anchors_are_loaded_once_per_version_of_their_file(pki: PKI,
                                                                 tmp_path: Path) -> None:
    # Parsing a CA bundle takes milliseconds on the event loop: not on every probe.
    ca = tmp_path / "ca.pem"
    ca.write_bytes(pki[0].read_bytes())
    first = TLSClient(ca_file=str(ca), alpn=b"ntske/1")
    assert TLSClient(ca_file=str(ca), alpn=b"ntske/1")._ctx is first._ctx
    ca.write_bytes(pki[0].read_bytes() + b"\n")  # replaced: loaded again
    assert TLSClient(ca_file=str(ca), alpn=b"ntske/1")._ctx is not first._ctx


async def test_no_socket_for_the_burst_is_a_local_error_not_the_servers(
    fake: FakeNTS, pki: PKI, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Out of descriptors once the key exchange is done (exhausting them for real would
    # starve the test's own fake servers): this host's trouble, not the server's.
    class NoSocket(DatagramPump[Any]):
        async def __aenter__(self) -> NoSocket:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(nts_session, "DatagramPump", NoSocket)
    m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(pki[0]))
    assert m.failure is Reason.LOCAL_ERROR, log.text()
    assert fake.requests == [] and m.packets_sent == 0


async def test_a_certificate_whose_names_do_not_parse_is_refused_not_a_500(
        tmp_path: Path) -> None:
    # A subjectAltName cut short (a dNSName of 5 bytes with 2 there): the identity check
    # cannot read it (it raised and the scrape was a 500).
    bad_san = x509.UnrecognizedExtension(x509.OID_SUBJECT_ALTERNATIVE_NAME, b"\x30\x04\x82\x05ab")
    ca, cert, key = _make_pki(tmp_path, bad_san)
    async with running_fake(cert, key) as fake:
        m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(ca))
    # OpenSSL does not build the chain of such a certificate either: the chain's verdict,
    # which ranks first, or the name's; never an exception.
    assert m.failure in (Reason.NTS_CERT_UNTRUSTED, Reason.NTS_CERT_NAME_MISMATCH), log.text()
    assert "unreadable certificate names: CertificateError: truncated" in log.text()
    assert value(m, "probe_nts_cert_identity_verified") == 0
    assert value(m, "probe_ssl_earliest_cert_expiry") is not None


async def test_an_absolute_server_name_matches_without_its_dot(tmp_path: Path) -> None:
    ca, cert, key = _make_pki(tmp_path, x509.SubjectAlternativeName([x509.DNSName("localhost")]))
    async with running_fake(cert, key) as fake:
        m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(ca, server_name="localhost."))
    assert m.failure is None, log.text()


async def test_a_name_mismatch_lists_names_of_the_kind_asked_for_first(tmp_path: Path) -> None:
    # Six host names and the address 127.0.0.2: asked for 127.0.0.1, the address the
    # certificate does name shows among the five listed, and the name is said once.
    names = [x509.DNSName(f"ntp-{i}.example") for i in range(6)]
    ca, cert, key = _make_pki(tmp_path, x509.SubjectAlternativeName(
        [*names, x509.IPAddress(IPv4Address("127.0.0.2"))]))
    async with running_fake(cert, key) as fake:
        m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(ca))
    assert m.failure is Reason.NTS_CERT_NAME_MISMATCH, log.text()
    assert m.failure_detail == (
        "the certificate does not name 127.0.0.1 (it names 127.0.0.2, ntp-0.example, "
        "ntp-1.example, ntp-2.example, ntp-3.example, ... (2 more))")


async def test_a_kiss_of_death_holds_back_the_key_exchange_too(fake: FakeNTS, pki: PKI) -> None:
    # During the backoff no NTP packet goes out, and no TLS handshake that would cost the
    # server fresh cookies either.
    fake.ntp_mode = "rate"
    mod = module(pki[0])
    guard = Guard(kod=KodTable())
    m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", mod, guard=guard)
    assert m.failure is Reason.KOD_RATE, log.text()
    assert "no NTS-KE with 127.0.0.1 port" in log.text()
    # The KoD was authenticated (an unauthenticated one is not honoured): the reply was.
    assert value(m, "probe_nts_authenticated") == 1
    connections, requests = fake.ke_connections, len(fake.requests)
    m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", mod, guard=guard)
    assert m.failure is Reason.BACKOFF, log.text()
    assert (fake.ke_connections, len(fake.requests)) == (connections, requests)


async def test_a_kod_another_probe_got_holds_back_the_key_exchange_too(
        fake: FakeNTS, pki: PKI) -> None:
    # A DENY recorded for the NTP server while the burst pauses (another probe got it):
    # the burst stops at once, not after its 20 s pause, and the next probe makes no TLS
    # handshake either.
    mod = module(pki[0], samples=3, timeout=30.0)
    mod = replace(mod, ntp=replace(mod.ntp, sample_interval=20.0))
    table = KodTable()
    guard = Guard(kod=table)
    running = asyncio.create_task(probe(f"{LOOPBACK}:{fake.ke_port}", mod, guard=guard))
    deadline = asyncio.get_running_loop().time() + 3.0
    while not fake.requests:  # a poll with a deadline: the first request is out
        assert asyncio.get_running_loop().time() < deadline, "no request came"
        await asyncio.sleep(0.005)
    table.record(LOOPBACK, fake.ntp_port, "DENY", 0, 3600.0, 86400.0)
    m, log = await running
    assert m.failure is None and len(fake.requests) == 1, log.text()
    assert m.duration < 10.0, log.text()  # the pause ended, a long way short of its 20 s
    assert "no NTS-KE with 127.0.0.1 port" in log.text()
    connections = fake.ke_connections
    m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", mod, guard=guard)
    assert m.failure is Reason.BACKOFF, log.text()
    assert fake.ke_connections == connections


async def test_a_kod_another_probe_got_while_a_sample_was_out_ends_the_burst_at_once(
        fake: FakeNTS, pki: PKI) -> None:
    # The DENY is recorded as the first request arrives, before its reply: no pause is in
    # progress for the KoD to end, and the next one (20 s) must not run.
    mod = module(pki[0], samples=3, timeout=30.0)
    mod = replace(mod, ntp=replace(mod.ntp, sample_interval=20.0))
    table = KodTable()

    def deny_recorded_meanwhile() -> None:
        table.record(LOOPBACK, fake.ntp_port, "DENY", 0, 3600.0, 86400.0)

    fake.on_request = deny_recorded_meanwhile
    m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", mod, guard=Guard(kod=table))
    assert m.failure is None and len(fake.requests) == 1, log.text()
    assert "another probe got a Kiss-o'-Death DENY" in log.text()
    assert m.duration < 10.0, log.text()  # not the 20 s pause


async def test_a_backoff_found_after_the_key_exchange_holds_it_back(fake: FakeNTS,
                                                                     pki: PKI) -> None:
    # Another probe (a plain ntp one) got the DENY: the first NTS probe learns the NTP
    # server from a key exchange and stops there; the next makes no handshake at all.
    table = KodTable()
    table.record(LOOPBACK, fake.ntp_port, "DENY", 0, 3600.0, 86400.0)
    guard = Guard(kod=table)
    m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(pki[0]), guard=guard)
    assert m.failure is Reason.BACKOFF and not fake.requests, log.text()
    assert "no NTS-KE with 127.0.0.1 port" in log.text()
    connections = fake.ke_connections
    m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(pki[0]), guard=guard)
    assert m.failure is Reason.BACKOFF, log.text()
    assert fake.ke_connections == connections


async def test_a_refused_negotiated_server_is_named(fake: FakeNTS, pki: PKI) -> None:
    # The KE names 127.0.0.66, which the policy denies: target_forbidden, and the series
    # says which server was refused (the target itself is allowed).
    def records(ntp_port: int) -> bytes:
        recs = [ke.Record(1, b"\0\0", True), ke.Record(4, b"\0\x0f", True),
                ke.Record(6, b"127.0.0.66", True), ke.Record(7, struct.pack("!H", ntp_port), True),
                ke.Record(5, os.urandom(100)), ke.Record(0, b"", True)]
        return b"".join(r.encode() for r in recs)

    fake.records = records
    denied = TargetPolicy(denied=parse_rules(["127.0.0.66/32"], "denied_targets"))
    m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(pki[0]),
                         guard=Guard(policies=(denied,)))
    assert m.failure is Reason.TARGET_FORBIDDEN, log.text()
    # check's line says it is the negotiated server that was refused, not the target.
    assert m.failure_detail is not None and "127.0.0.66" in m.failure_detail
    assert label_sets(m, "probe_nts_ntp_server_info") == [
        {"server": "127.0.0.66", "port": str(fake.ntp_port)}]
    assert not fake.requests


async def test_a_server_that_speaks_no_offered_alpn_is_an_alpn_mismatch(pki: PKI) -> None:
    # As GnuTLS servers (chronyd) answer a ClientHello without ntske/1: a fatal TLS alert,
    # no_application_protocol (120), in a plaintext alert record.
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 120]))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        m, log = await probe(f"{LOOPBACK}:{port}", module(pki[0]))
    finally:
        server.close()
        await server.wait_closed()
    assert m.failure is Reason.NTS_ALPN_MISMATCH, log.text()
    assert "no application protocol" in log.text()
    # The TLS library's words reach `check`'s line and the JSON report.
    assert m.failure_detail is not None and "no application protocol" in m.failure_detail


@pytest.mark.parametrize(("server_name", "sent"), [
    ("faß.test", b"xn--fa-hia.test"),  # IDNA 2008, as the certificate is matched (not fass)
    ("NTP.Example.", b"ntp.example"),  # no trailing dot (RFC 6066), lower case
    (LOOPBACK, None),  # an address: no SNI (RFC 6066)
])
async def test_sni_asks_for_the_name_the_certificate_is_matched_against(
        fake: FakeNTS, pki: PKI, server_name: str, sent: bytes | None) -> None:
    m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(pki[0], server_name=server_name))
    assert fake.server_names == [sent], log.text()
    if sent is not None:  # the certificate names 127.0.0.1 only
        assert m.failure is Reason.NTS_CERT_NAME_MISMATCH, log.text()
        assert m.failure_detail is not None and sent.decode() in m.failure_detail
        # In words, with what the certificate does name (not a Python repr).
        assert m.failure_detail.endswith(
            f"the certificate does not name {sent.decode()} (it names {LOOPBACK})"
        ), m.failure_detail


async def test_a_server_that_selects_no_protocol_is_an_alpn_mismatch(pki: PKI) -> None:
    # A TLS server that ignores ALPN (a plain HTTPS or TLS endpoint on the KE port).
    async with running_fake(pki[1], pki[2], alpn=None) as fake:
        m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(pki[0]))
    assert m.failure is Reason.NTS_ALPN_MISMATCH, log.text()
    assert m.failure_detail == "the server selected no ALPN protocol"
    assert not fake.requests


async def test_a_server_that_selects_a_protocol_not_offered_is_an_alpn_mismatch(
        pki: PKI) -> None:
    # An HTTPS server on the NTS-KE port picking http/1.1 from a ClientHello that offered
    # only ntske/1: OpenSSL refuses it as a bad ALPN extension.
    async with running_fake(pki[1], pki[2], alpn=b"http/1.1") as fake:
        m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(pki[0]))
    assert m.failure is Reason.NTS_ALPN_MISMATCH, log.text()
    assert not fake.requests


async def test_a_certificate_cryptography_cannot_read_is_untrusted_not_a_500(
        tmp_path: Path) -> None:
    # Two subjectAltName extensions: OpenSSL completes the handshake, cryptography refuses
    # to load the certificate (DuplicateExtension). Made by renaming a second extension's
    # OID in the DER (which also breaks the signature: the chain is untrusted anyway).
    dns = x509.SubjectAlternativeName([x509.DNSName("localhost")])
    ca, cert, key = _make_pki(tmp_path, dns, x509.UnrecognizedExtension(
        x509.ObjectIdentifier("2.5.29.99"), dns.public_bytes()))
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    der = leaf.public_bytes(serialization.Encoding.DER)
    assert der.count(b"\x06\x03\x55\x1d\x63") == 1
    twice = x509.load_der_x509_certificate(der.replace(b"\x06\x03\x55\x1d\x63",
                                                       b"\x06\x03\x55\x1d\x11"))
    with pytest.raises(x509.DuplicateExtension):
        _ = twice.extensions
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(
        twice.public_bytes(serialization.Encoding.DER)) + b"-----END CERTIFICATE-----\n")
    async with running_fake(cert, key) as fake:
        m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(ca, server_name="localhost"))
    assert m.failure is Reason.NTS_CERT_UNTRUSTED, log.text()
    assert m.failure_detail is not None and m.failure_detail.startswith("depth 0: "), \
        m.failure_detail  # the chain's words, in check's line and the JSON
    assert ("unreadable certificate names: CertificateError: duplicate extension 2.5.29.17"
            in log.text())
    assert value(m, "probe_nts_cert_identity_verified") == 0
    assert value(m, "probe_ssl_earliest_cert_expiry") is not None


async def test_a_certificate_whose_validity_cryptography_cannot_read_is_untrusted(
        tmp_path: Path) -> None:
    # notAfter as a GeneralizedTime with fractional seconds: OpenSSL reads it, cryptography
    # does not load the certificate at all.
    ca, cert, key = _make_pki(tmp_path, x509.SubjectAlternativeName(
        [x509.IPAddress(IPv4Address(LOOPBACK))]))
    der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(
        serialization.Encoding.DER)
    # notAfter becomes a GeneralizedTime four bytes longer, and so do Validity,
    # tbsCertificate and Certificate (SEQUENCEs with long-form lengths, 0x81 or 0x82).
    at = der.index(b"\x30\x1e\x17\x0d")
    not_after = der[at + 19:at + 32]
    assert der[at + 17:at + 19] == b"\x17\x0d" and not_after.endswith(b"Z")
    validity = (b"\x30\x22" + der[at + 2:at + 17] + b"\x18\x11"
                + b"20" + not_after[:-1] + b".5Z")

    def header(offset: int) -> tuple[bytes, int]:
        """A SEQUENCE's header at ``offset``, grown by 4, and its length."""
        width = der[offset + 1] - 0x80
        assert der[offset] == 0x30 and width in (1, 2)
        size = int.from_bytes(der[offset + 2:offset + 2 + width], "big") + 4
        assert size < 256 ** width  # the length keeps its width
        return der[offset:offset + 2] + size.to_bytes(width, "big"), 2 + width

    cert_header, cert_width = header(0)
    tbs_header, tbs_width = header(cert_width)
    patched = (cert_header + tbs_header + der[cert_width + tbs_width:at] + validity
               + der[at + 32:])
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(patched)
                     + b"-----END CERTIFICATE-----\n")
    async with running_fake(cert, key) as fake:
        m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(ca))
    assert m.failure is Reason.NTS_CERT_UNTRUSTED, log.text()
    assert "certificate 0: cannot be read (" in log.text()


async def test_a_certificate_cryptography_cannot_load_but_go_reads_is_judged_as_go_does(
        tmp_path: Path) -> None:
    # A '*' in a PrintableString (as some wildcard certificates, and Windows CryptoAPI's,
    # carry): OpenSSL and Go (blackbox) accept the certificate, cryptography refuses to
    # load it at all. Its validity, key usage and names are read from the DER: trusted,
    # with its expiry and labels (it read as untrusted, its gauges absent).
    ca, cert, key = _make_pki(tmp_path, x509.SubjectAlternativeName(
        [x509.IPAddress(IPv4Address(LOOPBACK))]))
    leaf = x509.load_pem_x509_certificate(cert.read_bytes())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x.example",
                                            _type=x509.name._ASN1Type.PrintableString)])
    ca_key = ec.generate_private_key(ec.SECP256R1())  # a CA of this test's own, to sign
    ca_cert = (x509.CertificateBuilder().subject_name(_name("wild-ca"))
               .issuer_name(_name("wild-ca")).public_key(ca_key.public_key()).serial_number(1)
               .not_valid_before(leaf.not_valid_before_utc)
               .not_valid_after(leaf.not_valid_after_utc)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .sign(ca_key, hashes.SHA256()))
    built = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
             .public_key(leaf.public_key()).serial_number(2)
             .not_valid_before(leaf.not_valid_before_utc).not_valid_after(leaf.not_valid_after_utc)
             .add_extension(leaf.extensions[0].value, critical=False)
             .sign(ca_key, hashes.SHA256()))
    tbs = built.tbs_certificate_bytes
    assert tbs.count(b"\x13\x09x.example") == 1
    tbs = tbs.replace(b"\x13\x09x.example", b"\x13\x09*.example")

    def der(tag: int, body: bytes) -> bytes:
        if len(body) < 128:
            return bytes((tag, len(body))) + body
        return bytes((tag, 0x82)) + len(body).to_bytes(2, "big") + body

    signature = ca_key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    ecdsa_sha256 = bytes.fromhex("300a06082a8648ce3d040302")
    patched = der(0x30, tbs + ecdsa_sha256 + der(0x03, b"\0" + signature))
    with pytest.raises(ValueError):
        x509.load_der_x509_certificate(patched)
    ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert.write_bytes(b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(patched)
                     + b"-----END CERTIFICATE-----\n")
    async with running_fake(cert, key) as fake:
        m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(ca))
    assert m.failure is None, log.text()
    assert value(m, "probe_nts_cert_verified") == 1
    assert value(m, "probe_nts_cert_identity_verified") == 1
    assert value(m, "probe_ssl_earliest_cert_expiry") == leaf.not_valid_after_utc.timestamp()
    assert label_sets(m, "probe_ssl_last_chain_info") == [
        {"fingerprint_sha256": hashlib.sha256(patched).hexdigest(), "issuer": "CN=wild-ca",
         "subject": "CN=*.example", "subjectalternative": ""}]


def _cert(subject: str, issuer: x509.Certificate | None, issuer_key: ec.EllipticCurvePrivateKey
          | None, days: int, *, ca: bool, usage: x509.ObjectIdentifier | Literal[""] | None = None,
          printable: bool = False) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A certificate valid for ``days`` from yesterday, self-signed without an issuer;
    its CN a PrintableString when ``printable``; ``usage`` "" lists no key usage at all."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject,
                                         _type=x509.name._ASN1Type.PrintableString)]
                     ) if printable else _name(subject)
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer.subject if issuer else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=1))
               .not_valid_after(now + dt.timedelta(days=days)))
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None),
                                        critical=True)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(IPv4Address(LOOPBACK))]), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage] if usage else []),
                                        critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256()), key


@pytest.mark.parametrize(("anchors", "chain_ends"), [
    ("intermediate", "leaf"),  # the issuing CA alone is a trust anchor, as in Go and chrony
    ("root+intermediate", "leaf"),  # the chain stops at the first anchor, as blackbox's does
    ("root", "root"),
])
async def test_any_certificate_in_ca_file_is_a_trust_anchor(
        tmp_path: Path, anchors: str, chain_ends: str) -> None:
    root, root_key = _cert("root", None, None, 10, ca=True)
    inter, inter_key = _cert("intermediate", root, root_key, 365, ca=True)
    leaf, leaf_key = _cert("leaf", inter, inter_key, 30, ca=False)
    pem = serialization.Encoding.PEM
    (tmp_path / "chain.pem").write_bytes(leaf.public_bytes(pem) + inter.public_bytes(pem))
    (tmp_path / "leaf.key").write_bytes(leaf_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    certs = {"root": root, "intermediate": inter}
    (tmp_path / "ca.pem").write_bytes(b"".join(certs[name].public_bytes(pem)
                                               for name in anchors.split("+")))
    async with running_fake(tmp_path / "chain.pem", tmp_path / "leaf.key") as fake:
        m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(tmp_path / "ca.pem"))
    assert m.failure is None, log.text()
    assert value(m, "probe_nts_cert_verified") == 1
    # blackbox's definition: the earliest notAfter of the verified chain.
    ends = {"leaf": leaf, "root": root}[chain_ends]
    assert value(m, "probe_ssl_last_chain_expiry_timestamp_seconds") == \
        ends.not_valid_after_utc.timestamp()
    assert value(m, "probe_ssl_earliest_cert_expiry") == leaf.not_valid_after_utc.timestamp()


async def test_an_expired_copy_of_a_root_does_not_hide_a_valid_cross_signed_path(
        tmp_path: Path) -> None:
    # The trust file holds root A and an expired self-signed root B; the server sends
    # leaf, intermediate (issued by B) and B cross-signed by A, valid. OpenSSL takes the
    # store's B first and reads "expired"; Go's verifier (blackbox) and chrony find the
    # path through A, and so must the probe.
    now = dt.datetime.now(dt.UTC)
    pem = serialization.Encoding.PEM
    root_a, a_key = _cert("root A", None, None, 900, ca=True)
    b_key = ec.generate_private_key(ec.SECP256R1())

    def root_b(issuer: x509.Certificate | None, signer: ec.EllipticCurvePrivateKey,
               start: dt.datetime, end: dt.datetime) -> x509.Certificate:
        return (x509.CertificateBuilder().subject_name(_name("root B"))
                .issuer_name(issuer.subject if issuer else _name("root B"))
                .public_key(b_key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start).not_valid_after(end)
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .sign(signer, hashes.SHA256()))

    expired_b = root_b(None, b_key, now - dt.timedelta(days=400), now - dt.timedelta(days=1))
    cross_b = root_b(root_a, a_key, now - dt.timedelta(days=1), now + dt.timedelta(days=800))
    inter, inter_key = _cert("intermediate", cross_b, b_key, 365, ca=True)
    leaf, leaf_key = _cert("leaf", inter, inter_key, 30, ca=False)
    (tmp_path / "chain.pem").write_bytes(b"".join(
        c.public_bytes(pem) for c in (leaf, inter, cross_b)))
    (tmp_path / "leaf.key").write_bytes(leaf_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    # First in the file, an anchor cryptography refuses to load (a '*' in a
    # PrintableString) and OpenSSL takes: the other anchors are still read.
    odd = _cert("x.example", None, None, 900, ca=True, printable=True)[0]
    odd_der = odd.public_bytes(serialization.Encoding.DER).replace(b"\x13\x09x.example",
                                                                   b"\x13\x09*.example")
    with pytest.raises(ValueError):
        x509.load_der_x509_certificate(odd_der)
    (tmp_path / "ca.pem").write_bytes(
        b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(odd_der)
        + b"-----END CERTIFICATE-----\n" + root_a.public_bytes(pem) + expired_b.public_bytes(pem))
    async with running_fake(tmp_path / "chain.pem", tmp_path / "leaf.key") as fake:
        m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(tmp_path / "ca.pem"))
    assert m.failure is None, log.text()
    assert value(m, "probe_nts_cert_verified") == 1
    # With only the expired root there is no other path: expired, as Go says too.
    (tmp_path / "ca.pem").write_bytes(expired_b.public_bytes(pem))
    async with running_fake(tmp_path / "chain.pem", tmp_path / "leaf.key") as fake:
        m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(tmp_path / "ca.pem"))
    assert m.failure is Reason.NTS_CERT_EXPIRED, log.text()


# Run in a child whose memory may never become executable once writable (the kernel's
# PR_SET_MDWE, what systemd's MemoryDenyWriteExecute=yes in the shipped units sets up).
_UNDER_MDWE = """
import ctypes, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, REFUSE_EXEC_GAIN
    sys.exit(77)
from ntp_probe.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


async def test_a_probe_needs_no_writable_executable_memory(fake: FakeNTS, pki: PKI,
                                                           tmp_path: Path) -> None:
    # pyOpenSSL's verify callback was a cffi closure in W+X memory: under the shipped
    # systemd units every NTS probe was a 500 (MemoryError).
    config = tmp_path / "modules.yaml"
    config.write_text("modules:\n  nts:\n    prober: nts\n    timeout: 5s\n"
                      f"    nts: {{ca_file: '{pki[0]}'}}\n"
                      "    ntp: {samples: 1, preferred_ip_protocol: ip4}\n")
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _UNDER_MDWE, "probe", f"{LOOPBACK}:{fake.ke_port}",
        "--module", "nts", "--config.file", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(child.communicate(), 60)
    if child.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3 or later)")
    assert b"Traceback" not in err and b"MemoryError" not in out + err, (out, err)
    assert child.returncode == 0, (out, err)
    assert len(fake.requests) == 1  # authenticated, and the burst went out


SERVER_AUTH = x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH


@pytest.mark.parametrize(("leaf_usage", "ca_usage", "verified"), [
    (SERVER_AUTH, None, 1), (None, SERVER_AUTH, 1), (CLIENT_AUTH, None, 0),
    (SERVER_AUTH, CLIENT_AUTH, 0), ("", None, 1)])
async def test_a_chain_for_another_purpose_is_untrusted(
        tmp_path: Path, leaf_usage: x509.ObjectIdentifier | Literal[""] | None,
        ca_usage: x509.ObjectIdentifier | None, verified: int) -> None:
    # As Go's verifier (blackbox): a certificate of the chain whose extended key usage
    # leaves out serverAuth, the leaf's or an intermediate CA's, makes it no server's; an
    # empty list Go takes as no restriction.
    root, root_key = _cert("root", None, None, 10, ca=True)
    inter, inter_key = _cert("intermediate", root, root_key, 9, ca=True, usage=ca_usage)
    leaf, leaf_key = _cert("leaf", inter, inter_key, 5, ca=False, usage=leaf_usage)
    pem = serialization.Encoding.PEM
    (tmp_path / "chain.pem").write_bytes(leaf.public_bytes(pem) + inter.public_bytes(pem))
    (tmp_path / "leaf.key").write_bytes(leaf_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (tmp_path / "ca.pem").write_bytes(root.public_bytes(pem))
    async with running_fake(tmp_path / "chain.pem", tmp_path / "leaf.key") as fake:
        m, log = await probe(f"{LOOPBACK}:{fake.ke_port}", module(tmp_path / "ca.pem"))
    assert value(m, "probe_nts_cert_verified") == verified, log.text()
    assert m.failure is (None if verified else Reason.NTS_CERT_UNTRUSTED), log.text()


async def probe_with_sockets(limit: int, fake: FakeNTS, pki: PKI) -> Any:
    """A probe of ``fake`` with ``limit`` probe sockets left in the open-files share."""
    limit_probe_sockets(limit)
    try:
        return await probe(f"{LOOPBACK}:{fake.ke_port}", module(pki[0]))
    finally:
        limit_probe_sockets(None)


# 0: the KE's TCP socket counts too, and its refusal is this host's trouble, not a 500 or
# the server's fault. 1: the KE's TLS connection would fit, the NTP exchange's socket
# after it would not; the server must not pay a handshake and cookies for a probe that
# cannot send its requests, so the second socket is counted before the first.
@pytest.mark.parametrize("limit", [0, 1])
async def test_no_room_for_both_sockets_is_a_local_error_and_nothing_sent(
        fake: FakeNTS, pki: PKI, limit: int) -> None:
    m, log = await probe_with_sockets(limit, fake, pki)
    assert m.failure is Reason.LOCAL_ERROR, log.text()
    assert fake.ke_connections == 0 and fake.requests == []
    assert budget.in_use() == 0


async def test_room_for_both_sockets_probes_and_gives_them_back(fake: FakeNTS,
                                                                pki: PKI) -> None:
    m, log = await probe_with_sockets(2, fake, pki)
    assert m.failure is None, log.text()
    assert budget.in_use() == 0


@pytest.mark.parametrize(("room", "reason"), [(0.02, Reason.LOCAL_ERROR),
                                               (0.2, Reason.RESOLVE)])
async def test_the_negotiated_servers_lookup_with_no_room_left_is_no_resolve_failure(
        stuck_resolver: list[str], room: float, reason: Reason) -> None:
    # After the key exchange, a budget that leaves no room for a lookup and a request is
    # the exporter's (local_error), as for a target's name; with room, the name's (resolve).
    loop = asyncio.get_running_loop()
    ctx = ProbeContext(deadline=loop.time() + 5, log=ProbeLog())
    found = await nts_session._ntp_server(
        "stuck.test", Resolved(LOOPBACK, socket.AF_INET, False), ctx,
        NTPSettings(reply_timeout=0.2), loop.time() + room)
    assert found is None and ctx.measurement.failure is reason
