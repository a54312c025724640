"""The nts prober against real chrony NTS servers (chronyd -x, loopback only).

Certificates are made here with ``cryptography``: a test CA signing a good certificate
(SAN localhost, 127.0.0.1), one for another name and an expired one; a second CA that no
module trusts stands for an untrusted chain.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ntp_probe.config.schema import Module, NTPSettings, NTSSettings
from ntp_probe.engine.result import Reason
from tests.conftest import (
    LOOPBACK,
    free_tcp_port,
    free_udp_port,
    label_sets,
    probe,
    raw_ntp_query,
    require_binary,
    stop_process,
    value,
)

pytestmark = pytest.mark.integration

_START_DEADLINE = 10.0


@dataclass
class CA:
    """A certificate authority: its key, its certificate, and the PEM file."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    path: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(directory: Path, cn: str) -> CA:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    path = directory / f"{cn}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return CA(key, cert, path)


def make_leaf(ca: CA, directory: Path, stem: str, *, dns: str, ip: str | None,
              not_after: dt.datetime) -> tuple[Path, Path, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(dns)]
    if ip is not None:
        names.append(x509.IPAddress(IPv4Address(ip)))
    cert = (x509.CertificateBuilder().subject_name(_name(dns)).issuer_name(ca.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_after - dt.timedelta(days=60)).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(ca.key, hashes.SHA256()))
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path, cert


@dataclass
class NTSServer:
    """A chronyd serving NTS with one certificate."""

    ke_port: int
    ntp_port: int
    proc: subprocess.Popen[bytes]
    dir: Path
    cert: x509.Certificate

    @property
    def target(self) -> str:
        return f"{LOOPBACK}:{self.ke_port}"


def _ke_listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex((LOOPBACK, port)) == 0


def start_nts_server(base: Path, stem: str, cert_path: Path, key_path: Path,
                     cert: x509.Certificate) -> NTSServer:
    binary = require_binary("chronyd")
    directory = base / stem
    directory.mkdir(mode=0o700)
    ke_port, ntp_port = free_tcp_port(), free_udp_port()
    lines = [
        f"port {ntp_port}", f"bindaddress {LOOPBACK}", f"allow {LOOPBACK}", "local stratum 8",
        "cmdport 0", f"bindcmdaddress {directory}/chronyd.sock",
        f"pidfile {directory}/chronyd.pid", f"driftfile {directory}/drift",
        f"ntsserverkey {key_path}", f"ntsservercert {cert_path}", f"ntsport {ke_port}",
        f"ntsdumpdir {directory}",
    ]
    if os.geteuid() == 0:
        lines.append("user root")
    conf = directory / "chrony.conf"
    conf.write_text("\n".join(lines) + "\n")
    # -x: never touch the system clock; -4: NTS-KE would listen on [::] too otherwise.
    argv = [binary, "-4", "-x", "-d", "-f", str(conf)]
    if os.geteuid() != 0:
        argv.insert(1, "-U")
    with open(directory / "chronyd.log", "wb") as log:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, cwd=directory)
    server = NTSServer(ke_port, ntp_port, proc, directory, cert)
    deadline = time.monotonic() + _START_DEADLINE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if raw_ntp_query(LOOPBACK, ntp_port) is not None and _ke_listening(ke_port):
            text = (directory / "chronyd.log").read_text(errors="replace")
            assert "Disabled control of system clock" in text, text
            return server
        time.sleep(0.02)  # a poll interval, not a synchronisation: readiness is checked above
    stop_process(proc)
    pytest.fail("chronyd NTS server did not start:\n"
                + (directory / "chronyd.log").read_text(errors="replace"))


@dataclass
class Fixture:
    ca: CA
    other_ca: CA
    good: NTSServer
    wrong_name: NTSServer
    expired: NTSServer


@pytest.fixture(scope="module")
def servers() -> Iterator[Fixture]:
    base = Path(tempfile.mkdtemp(prefix="ntpp-nts-"))
    base.chmod(0o700)
    started: list[NTSServer] = []
    try:
        ca = make_ca(base, "ntp-probe-test-ca")
        other = make_ca(base, "ntp-probe-other-ca")
        now = dt.datetime.now(dt.UTC)
        good = make_leaf(ca, base, "good", dns="localhost", ip=LOOPBACK,
                         not_after=now + dt.timedelta(days=30))
        wrong = make_leaf(ca, base, "wrong", dns="time.example.net", ip=None,
                          not_after=now + dt.timedelta(days=30))
        expired = make_leaf(ca, base, "expired", dns="localhost", ip=LOOPBACK,
                            not_after=now - dt.timedelta(days=2))
        for stem, (c, k, cert) in (("good", good), ("wrong", wrong), ("expired", expired)):
            started.append(start_nts_server(base, stem, c, k, cert))
        yield Fixture(ca, other, *started)
    finally:
        for s in started:
            stop_process(s.proc)
        shutil.rmtree(base, ignore_errors=True)


def nts_module(ca: CA, *, samples: int = 3, server_name: str = "", aead: tuple[int, ...] = (15,),
               timeout: float = 5.0) -> Module:
    return Module(
        name="nts", prober="nts", timeout=timeout,
        ntp=NTPSettings(samples=samples, sample_interval=0.01, reply_timeout=0.5,
                        preferred_ip_protocol="ip4"),
        nts=NTSSettings(ca_file=str(ca.path), server_name=server_name, aead=aead,
                        ke_timeout=2.0),
    )


async def test_good_certificate_authenticated_burst(servers: Fixture) -> None:
    m, log = await probe(servers.good.target, nts_module(servers.ca, server_name="localhost"))
    assert m.failure is None, log.text()
    assert value(m, "probe_nts_authenticated") == 1
    assert value(m, "probe_nts_cert_verified") == 1
    assert value(m, "probe_nts_cert_identity_verified") == 1
    assert value(m, "probe_nts_aead_algorithm") == 15
    assert value(m, "probe_nts_cookies_received") == 8  # chrony hands out 8
    assert value(m, "probe_nts_ntp_server_info", server=LOOPBACK,
                 port=str(servers.good.ntp_port)) == 1
    assert value(m, "probe_tls_version_info", version="TLS 1.3") == 1
    assert value(m, "probe_ntp_samples_received") == 3
    assert value(m, "probe_ntp_stratum") == 8
    offset = value(m, "probe_ntp_offset_seconds")
    assert offset is not None and abs(offset) < 0.05
    expiry = servers.good.cert.not_valid_after_utc.timestamp()
    assert value(m, "probe_ssl_earliest_cert_expiry") == expiry
    # The verified chain ends in the CA, which outlives the leaf: the leaf is the earliest.
    assert value(m, "probe_ssl_last_chain_expiry_timestamp_seconds") == expiry
    # The leaf chronyd served, labelled as blackbox_exporter labels it.
    assert label_sets(m, "probe_ssl_last_chain_info") == [{
        "fingerprint_sha256": servers.good.cert.fingerprint(hashes.SHA256()).hex(),
        "issuer": "CN=ntp-probe-test-ca", "subject": "CN=localhost",
        "subjectalternative": "localhost"}]
    for phase in ("connect", "tls", "records"):
        d = value(m, "probe_nts_ke_duration_seconds", phase=phase)
        assert d is not None and 0 < d < 2
    report = next(r for r in m.reports if r.title == "nts")
    assert report.check_offset == offset
    text = log.text()
    assert "KE received record type=5 (NEW_COOKIE)" in text
    assert text.count("authenticated reply") == 3
    assert "uid" in text and "placeholders" in text


async def test_ip_target_checks_the_ip_san(servers: Fixture) -> None:
    m, log = await probe(servers.good.target, nts_module(servers.ca, samples=1))
    assert m.failure is None, log.text()
    assert value(m, "probe_nts_cert_identity_verified") == 1


async def test_more_samples_than_cookies_refills_with_placeholders(servers: Fixture) -> None:
    module = nts_module(servers.ca, samples=10, timeout=8.0)
    m, log = await probe(servers.good.target, module)
    assert m.failure is None, log.text()
    assert value(m, "probe_ntp_samples_received") == 10
    assert "1 placeholders" in log.text() or "2 placeholders" in log.text()


async def test_wrong_name(servers: Fixture) -> None:
    m, log = await probe(servers.wrong_name.target, nts_module(servers.ca))
    assert m.failure is Reason.NTS_CERT_NAME_MISMATCH, log.text()
    assert value(m, "probe_nts_cert_verified") == 1
    assert value(m, "probe_nts_cert_identity_verified") == 0
    assert value(m, "probe_nts_authenticated") == 0
    assert value(m, "probe_ntp_samples_sent") is None  # nothing sent past the handshake
    assert "no KE request sent" in log.text()


async def test_name_given_for_another_host(servers: Fixture) -> None:
    m, log = await probe(servers.good.target,
                         nts_module(servers.ca, server_name="time.example.org"))
    assert m.failure is Reason.NTS_CERT_NAME_MISMATCH, log.text()


async def test_expired_certificate_still_reports_its_expiry(servers: Fixture) -> None:
    m, log = await probe(servers.expired.target, nts_module(servers.ca))
    assert m.failure is Reason.NTS_CERT_EXPIRED, log.text()
    assert value(m, "probe_nts_cert_verified") == 0
    assert value(m, "probe_nts_cert_identity_verified") == 1
    expiry = value(m, "probe_ssl_earliest_cert_expiry")
    assert expiry == servers.expired.cert.not_valid_after_utc.timestamp()
    assert expiry < time.time()
    assert "error 10 (certificate has expired)" in log.text()


async def test_untrusted_ca(servers: Fixture) -> None:
    m, log = await probe(servers.good.target, nts_module(servers.other_ca))
    assert m.failure is Reason.NTS_CERT_UNTRUSTED, log.text()
    assert value(m, "probe_nts_cert_verified") == 0
    assert value(m, "probe_ssl_earliest_cert_expiry") == \
        servers.good.cert.not_valid_after_utc.timestamp()


async def test_no_common_aead(servers: Fixture) -> None:
    m, log = await probe(servers.good.target, nts_module(servers.ca, aead=(17,)))
    assert m.failure is Reason.NTS_NO_COMMON_AEAD, log.text()


async def test_closed_ke_port() -> None:
    with tempfile.TemporaryDirectory() as d:
        ca = make_ca(Path(d), "unused-ca")
        m, log = await probe(f"{LOOPBACK}:{free_tcp_port()}", nts_module(ca))
    assert m.failure is Reason.NTS_KE_CONNECT, log.text()
    assert m.failure_detail is not None and m.failure_detail.endswith(
        "Connection refused"), m.failure_detail
    assert value(m, "probe_nts_authenticated") == 0
    assert value(m, "probe_ssl_earliest_cert_expiry") is None

