"""--web.config.file on the real exporter process: TLS, basic auth, extra headers.

The certificate is made here with the ``openssl`` CLI (self-signed, CN=localhost,
subjectAltName IP:127.0.0.1) and used as the client's only CA. Every exporter started
here is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import logging
import os
import select
import shutil
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import bcrypt
import pytest

from ntp_probe.web.auth import WebConfigError, load_web_config
from tests.conftest import (
    LOOPBACK,
    crl_only_pem,
    free_tcp_port,
    require_binary,
    stop_process,
)
from tests.integration.test_exporter import child_env, exporter_command, parse_exposition

pytestmark = pytest.mark.integration

USER = "alice"
PASSWORD = "s3cret:with colon"
Y_USER = "bob"  # htpasswd writes $2y$ hashes: accept them as exporter-toolkit does
Y_PASSWORD = "hunter2"
HEADERS = {"X-Frame-Options": "deny", "X-Content-Type-Options": "nosniff"}
START_DEADLINE = 15.0
HTTP_TIMEOUT = 10.0

# A module that may probe nothing on loopback: /probe answers at once and sends nothing.
MODULES = """
modules:
  fenced:
    prober: ntp
    timeout: 2s
    denied_targets: ["127.0.0.0/8"]
    ntp:
      samples: 1
      preferred_ip_protocol: ip4
"""


def bcrypt_hash(password: str, prefix: str = "$2b$") -> str:
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    return prefix + hashed[4:]


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@dataclass
class Pki:
    dir: Path
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def make_pki(d: Path, *, rsa: bool = False, signer: Pki | None = None,
             name: str = "localhost") -> Pki:
    """A certificate for 127.0.0.1 and its key in ``d`` (EC unless ``rsa``), self-signed
    or signed by ``signer``."""
    openssl = require_binary("openssl")
    cert, key = d / "cert.pem", d / "key.pem"
    new_key = (["-newkey", "rsa:2048"] if rsa else
               ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"])
    signed = [] if signer is None else ["-CA", str(signer.cert), "-CAkey", str(signer.key)]
    run = subprocess.run(
        [openssl, "req", "-x509", *new_key, *signed, "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "2", "-subj", f"/CN={name}",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, run.stderr
    return Pki(d, cert, key)


def write_web_config(path: Path, *, tls: bool, users: bool = True) -> Path:
    """A web config in ``path``'s directory; cert/key paths relative to that directory."""
    lines = []
    if tls:
        lines += ["tls_server_config:", "  cert_file: cert.pem", "  key_file: key.pem"]
    if users:
        lines += ["basic_auth_users:", f"  {USER}: '{bcrypt_hash(PASSWORD)}'",
                  f"  {Y_USER}: '{bcrypt_hash(Y_PASSWORD, '$2y$')}'"]
    lines += ["http_server_config:", "  headers:"]
    lines += [f"    {k}: {v}" for k, v in HEADERS.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Response:
    status: int
    headers: Mapping[str, str]
    body: str


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    scheme: str
    log_path: Path
    context: ssl.SSLContext | None

    def url(self, path: str, scheme: str | None = None) -> str:
        return f"{scheme or self.scheme}://{LOOPBACK}:{self.port}{path}"

    def get(self, path: str, headers: Mapping[str, str] | None = None,
            scheme: str | None = None, method: str = "GET") -> Response:
        request = urllib.request.Request(self.url(path, scheme), headers=dict(headers or {}),
                                         method=method)
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT,
                                        context=self.context) as resp:
                return Response(resp.status, dict(resp.headers), resp.read().decode())
        except urllib.error.HTTPError as exc:
            return Response(exc.code, dict(exc.headers), exc.read().decode())

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(tmp: Path, web_config: Path, context: ssl.SSLContext | None,
                 args: tuple[str, ...] = ()) -> Server:
    """Start ``ntp-probe`` with ``--web.config.file`` (and ``args``); poll /-/healthy
    (authenticated)."""
    modules = tmp / "modules.yaml"
    modules.write_text(MODULES)
    scheme = "https" if context is not None else "http"
    problems = []
    for attempt in range(3):
        port = free_tcp_port()
        log_path = tmp / f"exporter-{port}-{attempt}.log"
        argv = [*exporter_command(), f"--config.file={modules}",
                f"--web.config.file={web_config}", f"--web.listen-address={LOOPBACK}:{port}",
                *args]
        with open(log_path, "wb") as log:
            # cwd is not the web config's directory: relative cert paths must still work.
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, env=child_env(), cwd="/")
        server = Server(proc, port, scheme, log_path, context)
        deadline = time.monotonic() + START_DEADLINE
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if server.get("/-/healthy", basic(USER, PASSWORD)).status == 200:
                    return server
            except (urllib.error.URLError, OSError, http.client.HTTPException):
                pass
            time.sleep(0.02)  # poll interval, bounded by the deadline
        stop_process(proc)
        problems.append(f"{argv}: rc={proc.returncode}\n{server.log()}")
        if "cannot listen" not in server.log():
            break
    pytest.fail("exporter did not become healthy:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture(scope="module")
def tls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    web = write_web_config(pki.dir / "web.yml", tls=True)
    context = ssl.create_default_context(cafile=str(pki.cert))
    server = start_server(tmp_path_factory.mktemp("tls-exporter"), web, context)
    try:
        yield server
    finally:
        stop_process(server.proc)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("auth-exporter")
    web = write_web_config(tmp / "web.yml", tls=False)
    server = start_server(tmp, web, None)
    try:
        yield server
    finally:
        stop_process(server.proc)


def assert_headers(resp: Response) -> None:
    for name, value in HEADERS.items():
        assert resp.headers.get(name) == value, (name, resp.headers)


# --- TLS + basic auth ------------------------------------------------------------------


def test_https_metrics_with_password(tls_server: Server) -> None:
    resp = tls_server.get("/metrics", basic(USER, PASSWORD))
    assert resp.status == 200, resp.body
    assert "ntp_probe_build_info" in resp.body
    assert_headers(resp)


def test_https_probe_with_password(tls_server: Server) -> None:
    resp = tls_server.get("/probe?target=127.0.0.1:9&module=fenced", basic(USER, PASSWORD))
    assert resp.status == 200, resp.body
    samples = parse_exposition(resp.body)
    assert samples["probe_success"] == [({}, 0.0)]
    assert samples["probe_ntp_failure_info"] == [({"reason": "target_forbidden"}, 1.0)]
    assert "probe_ntp_samples_sent" not in samples
    assert_headers(resp)


def test_https_2y_hash_accepted(tls_server: Server) -> None:
    resp = tls_server.get("/metrics", basic(Y_USER, Y_PASSWORD))
    assert resp.status == 200, resp.body


@pytest.mark.parametrize(
    "headers",
    [
        basic(USER, "wrong"),
        basic(USER, PASSWORD + "x"),
        basic("mallory", PASSWORD),
        basic(Y_USER, PASSWORD),  # another user's password
        {},
        {"Authorization": "Bearer abc"},
        {"Authorization": "Basic !!!not-base64"},
        {"Authorization": "Basic " + base64.b64encode(USER.encode()).decode()},  # no colon
    ],
    ids=["wrong-password", "password-suffix", "unknown-user", "other-users-password",
         "no-auth", "bearer", "bad-base64", "no-colon"],
)
@pytest.mark.parametrize("path", ["/metrics", "/probe?target=127.0.0.1:9&module=fenced"])
def test_https_unauthorized(tls_server: Server, headers: dict[str, str], path: str) -> None:
    resp = tls_server.get(path, headers)
    assert resp.status == 401, resp.body
    assert resp.headers.get("WWW-Authenticate", "").startswith("Basic"), resp.headers
    assert "probe_success" not in resp.body
    assert_headers(resp)


def test_configured_headers_are_on_the_routers_answers_too(tls_server: Server) -> None:
    # aiohttp's 404 and 405 are raised past every handler: the headers come from the
    # response signal, as exporter-toolkit sets them before any handler.
    missing = tls_server.get("/no-such-page", basic(USER, PASSWORD))
    assert missing.status == 404
    assert_headers(missing)
    not_allowed = tls_server.get("/-/reload", basic(USER, PASSWORD))
    assert not_allowed.status == 405
    assert_headers(not_allowed)


def test_auth_scheme_is_case_insensitive(tls_server: Server) -> None:
    token = basic(USER, PASSWORD)["Authorization"].split(" ", 1)[1]
    resp = tls_server.get("/metrics", {"Authorization": f"basic {token}"})
    assert resp.status == 200


def test_plain_http_to_the_tls_port_gets_gos_400(tls_server: Server) -> None:
    # What exporter-toolkit's Go servers answer, so that an http:// scrape of an https://
    # exporter says why it fails.
    resp = tls_server.get("/metrics", basic(USER, PASSWORD), scheme="http")
    assert (resp.status, resp.body) == (400, "Client sent an HTTP request to an HTTPS server.\n")
    # A request with a large body still gets the answer: the rest is read and dropped, not
    # left to reset the connection under it.
    with socket.create_connection((LOOPBACK, tls_server.port), timeout=HTTP_TIMEOUT) as s:
        s.sendall(b"POST /-/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n\r\n")
        s.sendall(b"x" * 300_000)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.0 400 Bad Request\r\n"), data[:200]
    # A client that writes its request line in pieces gets the same answer (Go waits for
    # the five bytes it decides on).
    with socket.create_connection((LOOPBACK, tls_server.port), timeout=HTTP_TIMEOUT) as s:
        s.sendall(b"G")
        time.sleep(0.2)  # the pause between the pieces is the point of the test
        s.sendall(b"ET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.0 400 Bad Request\r\n"), data[:200]
    # The server is still fine afterwards, over TLS.
    assert tls_server.get("/metrics", basic(USER, PASSWORD)).status == 200


def test_a_renewed_certificate_is_served_without_a_restart(pki: Pki, tmp_path: Path) -> None:
    # As exporter-toolkit reads its files for each connection: cert-manager and the like
    # replace the files, and the exporter must not serve the old certificate until it
    # expires. A pair that does not match is refused and the old one kept meanwhile.
    live = tmp_path / "live"
    live.mkdir()
    for name in ("cert.pem", "key.pem"):
        shutil.copy(pki.dir / name, live / name)
    web = write_web_config(live / "web.yml", tls=True, users=False)
    server = start_server(tmp_path, web, ssl.create_default_context(cafile=str(pki.cert)))

    def served() -> str:
        return ssl.get_server_certificate((LOOPBACK, server.port), timeout=HTTP_TIMEOUT)

    def wait_for_cert(pem: str) -> None:
        deadline = time.monotonic() + 10
        while served().strip() != pem.strip() and time.monotonic() < deadline:
            time.sleep(0.1)  # poll interval, bounded by the deadline
        assert served().strip() == pem.strip()

    try:
        old = (live / "cert.pem").read_text()
        assert served().strip() == old.strip()
        (tmp_path / "renewed").mkdir()
        renewed = make_pki(tmp_path / "renewed")
        # A certificate whose key has not arrived yet: refused, the old pair stays.
        shutil.copy(renewed.cert, live / "cert.new")
        os.replace(live / "cert.new", live / "cert.pem")
        deadline = time.monotonic() + 10
        while "do not load" not in server.log() and time.monotonic() < deadline:
            served()  # a new connection looks at the files
            time.sleep(0.1)  # poll interval, bounded by the deadline
        assert "do not load" in server.log(), server.log()
        assert served().strip() == old.strip()
        shutil.copy(renewed.key, live / "key.new")
        os.replace(live / "key.new", live / "key.pem")
        wait_for_cert(renewed.cert.read_text())
        assert "TLS files changed: new connections use them" in server.log()
        # Renewed with another key type (EC to RSA, key first as certbot writes in place):
        # the RSA certificate is served, not the EC one beside it.
        (tmp_path / "rsa").mkdir()
        rsa = make_pki(tmp_path / "rsa", rsa=True)
        shutil.copy(rsa.key, live / "key.pem")
        shutil.copy(rsa.cert, live / "cert.pem")
        wait_for_cert(rsa.cert.read_text())
    finally:
        stop_process(server.proc)


def test_a_client_ca_taken_out_of_the_bundle_is_no_longer_trusted(
        pki: Pki, tmp_path: Path) -> None:
    # mTLS: rotating client_ca_file from one CA to another must lock out clients of the
    # old one (exporter-toolkit reads the file for each connection).
    cas, clients = [], []
    for i in (1, 2):
        (tmp_path / f"ca{i}").mkdir()
        cas.append(make_pki(tmp_path / f"ca{i}", name=f"ca{i}"))
        (tmp_path / f"client{i}").mkdir()
        clients.append(make_pki(tmp_path / f"client{i}", signer=cas[-1], name=f"client{i}"))
    live = tmp_path / "live"
    live.mkdir()
    for name in ("cert.pem", "key.pem"):
        shutil.copy(pki.dir / name, live / name)
    shutil.copy(cas[0].cert, live / "ca.pem")
    web = live / "web.yml"
    web.write_text("tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n"
                   "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.pem\n")

    def context(client: Pki) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(pki.cert))
        ctx.load_cert_chain(str(client.cert), str(client.key))
        return ctx

    def admitted(client: Pki) -> bool:
        request = urllib.request.Request(f"https://{LOOPBACK}:{server.port}/-/healthy")
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT,
                                        context=context(client)) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError, http.client.HTTPException):
            return False

    server = start_server(tmp_path, web, context(clients[0]))
    try:
        assert admitted(clients[0]) and not admitted(clients[1])
        shutil.copy(cas[1].cert, live / "ca.new")
        os.replace(live / "ca.new", live / "ca.pem")
        deadline = time.monotonic() + 10
        while not admitted(clients[1]) and time.monotonic() < deadline:
            time.sleep(0.1)  # poll interval, bounded by the deadline
        assert admitted(clients[1])
        assert not admitted(clients[0])
    finally:
        stop_process(server.proc)


def test_a_reload_takes_new_passwords_and_headers(tmp_path: Path) -> None:
    # exporter-toolkit reads the file for each request: a rotated password must not need
    # a restart. What cannot change in place (auth turned off) is logged and kept.
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  {USER}: '{bcrypt_hash(PASSWORD)}'\n"
                   "http_server_config:\n  headers:\n    X-Frame-Options: deny\n")
    server = start_server(tmp_path, web, None)
    try:
        web.write_text(f"basic_auth_users:\n  {USER}: '{bcrypt_hash('rotated')}'\n"
                       "http_server_config:\n  headers:\n    X-Frame-Options: sameorigin\n")
        assert server.get("/-/reload", basic(USER, PASSWORD), method="POST").status == 200
        assert server.get("/metrics", basic(USER, PASSWORD)).status == 401
        fresh = server.get("/metrics", basic(USER, "rotated"))
        assert fresh.status == 200 and fresh.headers.get("X-Frame-Options") == "sameorigin"
        web.write_text("")  # auth off: needs a restart, so the reload fails and says so
        refused = server.get("/-/reload", basic(USER, "rotated"), method="POST")
        assert refused.status == 500 and "turning basic auth on or off" in refused.body \
            and "a restart is needed for" in refused.body, refused
        assert server.get("/metrics").status == 401
        web.write_text("basic_auth_users: [\n")  # broken: a failed reload, the old one kept
        failed = server.get("/-/reload", basic(USER, "rotated"), method="POST")
        assert failed.status == 500 and failed.body.count(str(web)) == 1, failed  # once
        # Both files bad: the answer names the problems of both, as --config.check does.
        (tmp_path / "modules.yaml").write_text("modules:\n  m: {prober: ntp, tiemout: 5s}\n")
        both = server.get("/-/reload", basic(USER, "rotated"), method="POST")
        assert both.status == 500 and "tiemout" in both.body and str(web) in both.body, both
        assert "reload failed, keeping the previous configuration: web config" in server.log()
        after = server.get("/metrics", basic(USER, "rotated"))
        assert after.status == 200
        assert "ntp_probe_config_last_reload_successful 0" in after.body
    finally:
        stop_process(server.proc)


def test_https_rejects_untrusted_client_view(tls_server: Server) -> None:
    """A client trusting only the system CAs cannot verify the self-signed cert: the
    exporter serves the configured certificate, not some other one."""
    request = urllib.request.Request(tls_server.url("/metrics"), headers=basic(USER, PASSWORD))
    with pytest.raises(urllib.error.URLError) as exc:
        urllib.request.urlopen(request, timeout=HTTP_TIMEOUT,
                               context=ssl.create_default_context())
    assert isinstance(exc.value.reason, ssl.SSLCertVerificationError)


# --- basic auth without TLS ------------------------------------------------------------


def test_basic_auth_without_tls(auth_server: Server) -> None:
    ok = auth_server.get("/metrics", basic(USER, PASSWORD))
    assert ok.status == 200
    assert "ntp_probe_build_info" in ok.body
    assert_headers(ok)
    probe = auth_server.get("/probe?target=127.0.0.1:9&module=fenced", basic(Y_USER, Y_PASSWORD))
    assert probe.status == 200
    assert "probe_success 0" in probe.body
    denied = auth_server.get("/metrics")
    assert denied.status == 401
    assert denied.headers.get("WWW-Authenticate", "").startswith("Basic")
    assert_headers(denied)
    wrong = auth_server.get("/metrics", basic(USER, "nope"))
    assert wrong.status == 401


def test_a_client_waiting_for_its_password_check_keeps_its_connection(tmp_path: Path) -> None:
    # A password check that outlasts the header and idle timeouts (bcrypt cost 13: about
    # half a second here): the connection waiting for its check is busy, not idle, so the
    # guard must not close it. (Eviction spares busy connections by the same mark; the
    # hostile-clients tests show that with a probe.)
    slow = bcrypt.hashpw(b"slow-password", bcrypt.gensalt(rounds=13)).decode()
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  slow: '{slow}'\n  {USER}: '{bcrypt_hash(PASSWORD)}'\n")
    server = start_server(tmp_path, web, None, ("--web.read-header-timeout=0.3",
                                                "--web.idle-timeout=0.3"))
    try:
        with socket.create_connection((LOOPBACK, server.port), timeout=30) as s:
            token = base64.b64encode(b"slow:slow-password").decode()
            s.sendall(f"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Basic {token}\r\n"
                      "Connection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200 "), data[:200]
        assert b"ntp_probe_build_info" in data
        # A half-close while the check runs (`printf ... | nc -N`) is no hang-up: only a
        # probe is cancelled by the client's end of file. Answered, right or wrong password.
        for password, status in ((b"slow-password", b"200"), (b"wrong", b"401")):
            with socket.create_connection((LOOPBACK, server.port), timeout=30) as s:
                token = base64.b64encode(b"slow:" + password).decode()
                s.sendall(f"GET /-/healthy HTTP/1.1\r\nHost: x\r\nAuthorization: Basic "
                          f"{token}\r\n\r\n".encode())
                # The client's behaviour, not a synchronisation: its end of file comes 50 ms
                # on, well inside the half-second check (a FIN with the request would be
                # read before the check begins).
                time.sleep(0.05)
                s.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 " + status + b" "), (password, data[:200])
    finally:
        stop_process(server.proc)


def test_a_silent_tls_connection_holds_one_descriptor(pki: Pki, tmp_path: Path) -> None:
    # The connection cap is fitted to the open-files limit at one descriptor per
    # connection: waiting for a TLS client's first bytes must not take a second one.
    web = write_web_config(pki.dir / "web-fds.yml", tls=True)
    context = ssl.create_default_context(cafile=str(pki.cert))
    server = start_server(tmp_path, web, context)
    fds = Path(f"/proc/{server.proc.pid}/fd")
    assert server.get("/-/healthy", basic(USER, PASSWORD)).status == 200
    before = len(list(fds.iterdir()))
    silent = [socket.create_connection((LOOPBACK, server.port), timeout=10) for _ in range(20)]
    try:
        deadline = time.monotonic() + 10
        while len(list(fds.iterdir())) < before + 20 and time.monotonic() < deadline:
            time.sleep(0.05)  # poll interval, bounded by the deadline
        # A request after them: by its answer, every silent one is being watched.
        assert server.get("/-/healthy", basic(USER, PASSWORD)).status == 200
        assert len(list(fds.iterdir())) <= before + 20 + 2  # + the watch's epoll, + slack
    finally:
        for s in silent:
            s.close()
        stop_process(server.proc)


def test_tls_connections_that_never_finish_the_handshake_are_limited_and_timed_out(
        pki: Pki, tmp_path: Path) -> None:
    # Silent TCP connections to the TLS port: before the handshake they must already count
    # against --web.max-connections and --web.read-header-timeout, or enough of them use up
    # every descriptor (asyncio alone gives a handshake 60 s).
    web = write_web_config(pki.dir / "web-limits.yml", tls=True)  # beside its cert files
    context = ssl.create_default_context(cafile=str(pki.cert))
    server = start_server(tmp_path, web, context, ("--web.read-header-timeout=0.3",
                                                   "--web.max-connections=8"))
    fds = Path(f"/proc/{server.proc.pid}/fd")
    fds_before = len(list(fds.iterdir()))
    silent = [socket.create_connection((LOOPBACK, server.port), timeout=10) for _ in range(20)]
    try:
        assert server.get("/-/healthy", basic(USER, PASSWORD)).status == 200
        deadline = time.monotonic() + 10
        open_ones = list(silent)
        while open_ones and time.monotonic() < deadline:
            ready, _, _ = select.select(open_ones, [], [], 0.2)
            for s in ready:
                try:
                    closed = s.recv(1) == b""
                except OSError:
                    closed = True
                if closed:
                    open_ones.remove(s)
        assert not open_ones, f"{len(open_ones)} silent connections still open"
        assert server.get("/-/healthy", basic(USER, PASSWORD)).status == 200
        # Nothing is left open for them (each was watched for its first bytes). At most as
        # many as before: the health check's own connection may have been open then.
        while len(list(fds.iterdir())) > fds_before and time.monotonic() < deadline:
            time.sleep(0.05)  # poll interval, bounded by the deadline
        assert len(list(fds.iterdir())) <= fds_before
    finally:
        for s in silent:
            s.close()
        stop_process(server.proc)


# --- --config.check --------------------------------------------------------------------

# name -> (web config body, the key the error must name); relative to the pki directory.
# Each of these runs the real CLI (a fresh interpreter, started all at once).
BAD_WEB_CONFIGS = {
    "unknown-top-key": ("tls_server_cfg:\n  cert_file: cert.pem\n", "tls_server_cfg"),
    "unknown-tls-key": (
        "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n  cert_fiel: x\n",
        "tls_server_config.cert_fiel",
    ),
    "missing-key-file": ("tls_server_config:\n  cert_file: cert.pem\n", "key_file"),
    "bad-bcrypt-hash": (f"basic_auth_users:\n  {USER}: plaintext\n", f"basic_auth_users.{USER}"),
    "missing-cert-file": (
        "tls_server_config:\n  cert_file: missing.pem\n  key_file: key.pem\n",
        "tls_server_config.cert_file",
    ),
}
# More bad cases, checked in-process with load_web_config (same code path, no start-up cost).
MORE_BAD_WEB_CONFIGS = {
    "unknown-http-key": ("http_server_config:\n  header: {A: b}\n", "http_server_config.header"),
    "missing-key-path": (
        "tls_server_config:\n  cert_file: cert.pem\n  key_file: missing.pem\n",
        "tls_server_config.key_file",
    ),
    "bad-min-version": (
        "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n  min_version: TLS9\n",
        "tls_server_config.min_version",
    ),
    "key-is-not-a-key": (
        "tls_server_config:\n  cert_file: cert.pem\n  key_file: cert.pem\n",
        "tls_server_config",
    ),
    # exporter-toolkit refuses it too: a CA file alone would check no client certificate.
    "client-ca-without-client-auth": (
        "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n"
        "  client_ca_file: cert.pem\n",
        "tls_server_config.client_ca_file: set without a client_auth_type"),
    # OpenSSL 3 (security level 1 and up) offers nothing below TLS 1.2: nothing would connect.
    "max-version-below-tls12": (
        "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n"
        "  max_version: TLS11\n", "tls_server_config.max_version TLS11"),
    "users-not-a-mapping": ("basic_auth_users: [alice]\n", "basic_auth_users"),
    "user-with-colon": (f"basic_auth_users:\n  'a:b': '{bcrypt_hash(PASSWORD)}'\n",
                        "basic_auth_users.a:b"),
    "client-ca-not-pem": (
        "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n"
        "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: key.pem\n",
        "tls_server_config.client_ca_file",
    ),
    "min-above-max-version": (
        "tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n"
        "  min_version: TLS13\n  max_version: TLS12\n",
        "tls_server_config: min_version TLS13 is above max_version TLS12",
    ),
    "header-value-with-newline": (
        'http_server_config:\n  headers: {Content-Security-Policy: "a\\r\\nSet-Cookie: x"}\n',
        "http_server_config.headers.Content-Security-Policy",
    ),
    "header-name-not-a-token": ('http_server_config:\n  headers: {"X Bad": a}\n',
                                "http_server_config.headers"),
    "header-value-not-text": (
        "http_server_config:\n  headers: {Strict-Transport-Security: off}\n",
        "http_server_config.headers.Strict-Transport-Security: expected text, got False"),
    # exporter-toolkit's list: a Content-Length set here would cut every response short.
    "header-not-configurable": ('http_server_config:\n  headers: {Content-Length: "5"}\n',
                                "http_server_config.headers: 'Content-Length' cannot be"),
    "header-value-not-allowed": ("http_server_config:\n  headers: {X-Frame-Options: allowall}\n",
                                 "http_server_config.headers.X-Frame-Options: expected one of"),
    # Spelled exactly as exporter-toolkit has them, names and values, or a config that
    # works here fails in a Go exporter.
    "header-name-in-another-case": (
        "http_server_config:\n  headers: {x-frame-options: deny}\n",
        "http_server_config.headers: 'x-frame-options' cannot be configured (one of "
        "Strict-Transport-Security, X-Content-Type-Options, X-Frame-Options, "
        "X-XSS-Protection, Content-Security-Policy): did you mean 'X-Frame-Options'?"),
    "header-value-in-another-case": (
        "http_server_config:\n  headers: {X-Frame-Options: DENY}\n",
        "http_server_config.headers.X-Frame-Options: expected one of deny, sameorigin, got "
        "'DENY'"),
    # exporter-toolkit's key, but aiohttp serves HTTP/1.1 only: say so, do not pretend.
    "http2-on": ("http_server_config:\n  http2: true\n", "http_server_config.http2"),
}


@pytest.fixture(scope="module")
def config_checks(pki: Pki) -> dict[str, tuple[int, str, str]]:
    """Run ``--config.check`` on every case at once (each run is a fresh interpreter):
    name -> (exit code, stdout, stderr)."""
    paths = {"good": write_web_config(pki.dir / "good.yml", tls=True)}
    for name, (body, _) in BAD_WEB_CONFIGS.items():
        paths[name] = pki.dir / f"{name}.yml"
        paths[name].write_text(body)
    procs = {
        name: subprocess.Popen(
            [*exporter_command(), "--config.check", f"--web.config.file={path}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(),
            stdin=subprocess.DEVNULL, cwd="/",
        )
        for name, path in paths.items()
    }
    results = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=30)
            results[name] = (proc.returncode, out.decode(errors="replace"),
                             err.decode(errors="replace"))
    finally:
        for proc in procs.values():
            stop_process(proc)
    return results


def test_config_check_accepts_good_web_config(
    config_checks: dict[str, tuple[int, str, str]],
) -> None:
    rc, out, err = config_checks["good"]
    assert rc == 0, out + err
    assert "configuration OK" in out


@pytest.mark.parametrize("name", list(BAD_WEB_CONFIGS))
def test_config_check_rejects_bad_web_config(
    config_checks: dict[str, tuple[int, str, str]], name: str,
) -> None:
    rc, out, err = config_checks[name]
    key = BAD_WEB_CONFIGS[name][1]
    assert rc == 1, out + err
    assert key in out + err, out + err
    assert "configuration OK" not in out


def test_config_check_names_the_problems_of_both_files(tmp_path: Path) -> None:
    # Every problem in one run: not the modules file's, then the web config's next time.
    modules = tmp_path / "modules.yaml"
    modules.write_text("modules:\n  m:\n    prober: ntp\n    tiemout: 5s\n")
    web = tmp_path / "web.yml"
    web.write_text("tls_srver_config: {}\n")
    done = subprocess.run([*exporter_command(), "--config.check", f"--config.file={modules}",
                           f"--web.config.file={web}"], capture_output=True, text=True,
                          env=child_env(), stdin=subprocess.DEVNULL, timeout=30)
    assert done.returncode == 1, done
    assert "tiemout" in done.stderr and "tls_srver_config" in done.stderr, done.stderr
    assert "configuration OK" not in done.stdout


@pytest.mark.parametrize("name", list(MORE_BAD_WEB_CONFIGS))
def test_load_web_config_rejects(pki: Pki, name: str) -> None:
    body, key = MORE_BAD_WEB_CONFIGS[name]
    path = pki.dir / f"{name}.yml"
    path.write_text(body)
    with pytest.raises(WebConfigError) as exc:
        load_web_config(str(path))
    assert str(exc.value).startswith(key), str(exc.value)


def test_http2_false_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text("http_server_config:\n  http2: false\n")
    assert load_web_config(str(path)).ssl_context is None


def test_a_user_named_like_a_yaml_boolean_keeps_the_name(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users:\n  yes: '{bcrypt_hash(PASSWORD)}'\n")
    assert list(load_web_config(str(path)).users) == ["yes"]
    path.write_text("basic_auth_users:\n  a: x\n  a: y\n")
    with pytest.raises(WebConfigError, match="duplicate key 'a'"):
        load_web_config(str(path))


def test_a_client_ca_file_holding_only_a_crl_is_refused(pki: Pki) -> None:
    (pki.dir / "crl-only.pem").write_text(crl_only_pem())
    path = pki.dir / "crl-ca.yml"
    path.write_text("tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n"
                    "  client_auth_type: RequireAndVerifyClientCert\n"
                    "  client_ca_file: crl-only.pem\n")
    with pytest.raises(WebConfigError, match=r"client_ca_file: .* holds no certificate"):
        load_web_config(str(path))


def test_tls12_offers_gos_aead_suites_only(pki: Pki) -> None:
    # exporter-toolkit's defaults: no CBC with SHA-256/384, no DHE (Python's list has them).
    path = pki.dir / "suites.yml"
    path.write_text("tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n")
    context = load_web_config(str(path)).ssl_context
    assert context is not None
    tls12 = {c["name"] for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 and all(("GCM" in n or "CHACHA20" in n) and n.startswith("ECDHE")
                         for n in tls12), tls12
    assert "ECDHE-RSA-AES128-GCM-SHA256" in tls12


def test_a_min_version_openssl_will_not_offer_is_said(pki: Pki) -> None:
    # exporter-toolkit's TLS10 and TLS11 load, but OpenSSL 3 offers neither above security
    # level 0: a warning says TLS 1.2 is the minimum in effect, rather than nothing.
    path = pki.dir / "tls10.yml"
    path.write_text("tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n"
                    "  min_version: TLS10\n")
    class Kept(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    handler = Kept()
    # On the logger itself, at its own level: an earlier test in this process may have set
    # up the exporter's logging (the root's handlers and level), which caplog relies on.
    logger = logging.getLogger("ntp_probe.web")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        context = load_web_config(str(path)).ssl_context
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert context is not None
    said = [r.getMessage() for r in handler.records if "min_version TLS10" in r.getMessage()]
    assert bool(said) == (context.security_level >= 1), said
    if said:
        assert "TLS 1.2 is the minimum in effect" in said[0]


def test_a_password_in_another_encoding_than_utf8_logs_in(tmp_path: Path) -> None:
    # Go compares the password's bytes: a Latin-1 client's 'p\xe4ss' matches its hash.
    secret = "p\xe4ss".encode("latin-1")
    hashed = bcrypt.hashpw(secret, bcrypt.gensalt(rounds=4)).decode()
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users:\n  latin: '{hashed}'\n")
    config = load_web_config(str(path))
    header = "Basic " + base64.b64encode(b"latin:" + secret).decode()
    assert asyncio.run(config.authorized(header))
    wrong = "Basic " + base64.b64encode(b"latin:" + "p\xe4ss".encode()).decode()
    assert not asyncio.run(config.authorized(wrong))


def test_an_empty_client_auth_type_is_no_client_cert(pki: Pki) -> None:
    # exporter-toolkit reads "" as NoClientCert; a file written for it loads here too.
    path = pki.dir / "empty-auth.yml"
    path.write_text("tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n"
                    "  client_auth_type: ''\n")
    context = load_web_config(str(path)).ssl_context
    assert context is not None and context.verify_mode == ssl.CERT_NONE


def test_files_exporter_toolkit_accepts_load(pki: Pki) -> None:
    # Empty paths (a template's): no TLS at all, plain HTTP, whatever else the block says.
    path = pki.dir / "empty-paths.yml"
    path.write_text("tls_server_config:\n  cert_file: ''\n  key_file: ''\n"
                    "  min_version: TLS13\n")
    assert load_web_config(str(path)).ssl_context is None
    # A client check without client_ca_file: Go's server checks against the system roots.
    path.write_text("tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n"
                    "  client_auth_type: RequireAndVerifyClientCert\n")
    context = load_web_config(str(path)).ssl_context
    assert context is not None and context.verify_mode == ssl.CERT_REQUIRED
    # OWASP's advice, X-XSS-Protection: 0, unquoted: text to Go's YAML as here.
    path.write_text("http_server_config:\n  headers: {X-XSS-Protection: 0}\n")
    assert load_web_config(str(path)).headers == {"X-XSS-Protection": "0"}


def test_only_min_version_is_no_conflict(pki: Pki) -> None:
    path = pki.dir / "min-only.yml"
    path.write_text("tls_server_config:\n  cert_file: cert.pem\n  key_file: key.pem\n"
                    "  min_version: TLS13\n")
    context = load_web_config(str(path)).ssl_context
    assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_3


def test_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "web.fifo"
    os.mkfifo(path)
    with pytest.raises(WebConfigError) as exc:
        load_web_config(str(path))  # would block for ever if opened for a plain read
    assert "not a regular file" in str(exc.value)


def test_load_web_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(WebConfigError) as exc:
        load_web_config(str(tmp_path / "no-such-web-config.yml"))
    assert "no-such-web-config.yml" in str(exc.value)


def test_tls_clients_beyond_the_connection_limit_wait_their_turn(
        pki: Pki, tmp_path: Path) -> None:
    # 12 clients at once against a limit of 2: those beyond it wait for a slot, their
    # ClientHello left unread in the socket, and then make their handshake; none is reset
    # (each new connection used to evict the one before it, handshake and all).
    from concurrent.futures import ThreadPoolExecutor

    web = write_web_config(pki.dir / "web-queue.yml", tls=True)
    context = ssl.create_default_context(cafile=str(pki.cert))
    server = start_server(tmp_path, web, context, ("--web.max-connections=2",
                                                   "--probe.max-concurrent=1"))
    try:
        def fetch(_: int) -> int | str:
            try:
                return server.get("/-/healthy", basic(USER, PASSWORD)).status
            except (OSError, http.client.HTTPException, urllib.error.URLError) as exc:
                return repr(exc)

        with ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(fetch, range(12)))
        assert statuses == [200] * 12, statuses
        assert "Traceback" not in server.log()
    finally:
        stop_process(server.proc)
