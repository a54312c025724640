"""Hostile HTTP clients against the real exporter process: idle and slow connections, too
many of them, a low open-files limit, bad requests. Nothing takes /-/healthy down."""

from __future__ import annotations

import contextlib
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import stop_process
from tests.integration.test_exporter import Exporter, start_exporter

LOOPBACK = "127.0.0.1"
HEADER_TIMEOUT = 0.5
IDLE_TIMEOUT = 0.5
MAX_CONNECTIONS = 20


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Exporter]:
    e = start_exporter(tmp_path, (f"--web.max-connections={MAX_CONNECTIONS}",
                                  f"--web.read-header-timeout={HEADER_TIMEOUT}",
                                  f"--web.idle-timeout={IDLE_TIMEOUT}"))
    try:
        yield e
    finally:
        stop_process(e.proc)


def connect(port: int) -> socket.socket:
    s = socket.create_connection((LOOPBACK, port), timeout=5)
    s.settimeout(5)
    return s


def closed_by_server(s: socket.socket, deadline: float) -> bool:
    """Whether the server closes ``s`` before ``deadline`` (it reads until EOF or reset)."""
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if s.recv(4096) == b"":
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def healthy(port: int) -> bool:
    with connect(port) as s:
        s.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.startswith(b"HTTP/1.1 200") and data.endswith(b"OK\n")


def test_a_connection_that_never_sends_headers_is_closed(guarded: Exporter) -> None:
    idle = connect(guarded.port)
    slow = connect(guarded.port)
    slow.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n")  # never finished
    try:
        deadline = time.monotonic() + HEADER_TIMEOUT + 3.0
        assert closed_by_server(idle, deadline)
        assert closed_by_server(slow, deadline)
    finally:
        idle.close()
        slow.close()


def test_an_idle_keep_alive_connection_is_closed(guarded: Exporter) -> None:
    with connect(guarded.port) as s:
        s.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        assert closed_by_server(s, time.monotonic() + IDLE_TIMEOUT + 3.0)


def test_healthy_answers_while_idle_connections_fill_the_limit(guarded: Exporter) -> None:
    hogs = [connect(guarded.port) for _ in range(MAX_CONNECTIONS * 3)]
    try:
        # Every new connection evicts the oldest idle one: a real request still gets in.
        for _ in range(5):
            assert healthy(guarded.port)
    finally:
        for s in hogs:
            s.close()
    assert "connection limit reached" in guarded.log()


def start_limited(tmp_path: Path, nofile: int, args: tuple[str, ...]) -> Exporter:
    """The exporter under an open-files limit of ``nofile`` (prlimit), with ``args``."""
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        pytest.skip("prlimit (util-linux) not installed")
    from tests.integration import test_exporter

    original = test_exporter.exporter_command
    test_exporter.exporter_command = lambda: [prlimit, f"--nofile={nofile}:{nofile}",
                                              *original()]
    try:
        return start_exporter(tmp_path, args)
    finally:
        test_exporter.exporter_command = original


def test_a_low_open_files_limit_shrinks_the_connection_cap(tmp_path: Path) -> None:
    e = start_limited(tmp_path, 300, ("--web.max-connections=1000",))
    try:
        hogs = [connect(e.port) for _ in range(400)]  # more than the process may open
        try:
            assert healthy(e.port)
        finally:
            for s in hogs:
                s.close()
        log = e.log()
        assert "open-files limit 300 is too low" in log
        # The packaged modules have a group (16 sockets a probe: 1,600 for 100 probes).
        # 300 less 64 spare leaves 236, of which the probes' sockets get at most half: 118
        # for connections, a backlog of 14 (room for two accept passes, before the guard
        # closes the excess) and 90 connections, not a cap of almost nothing.
        assert ("and 1600 probe sockets (--probe.max-concurrent, groups and all_addresses): "
                "serving at most 90 connections, accepting 14 at a time") in log, log
        # The kernel's listen queue takes no descriptor: it stays at 128, so that a
        # connection waits there rather than being dropped (its client retrying in 1 s).
        ss = shutil.which("ss")
        if ss is not None:
            listing = subprocess.run([ss, "-Hlnt", f"sport = :{e.port}"], capture_output=True,
                                     text=True, timeout=30).stdout.split()
            assert listing[:3] == ["LISTEN", "0", "128"], listing
        assert "Traceback" not in log
    finally:
        stop_process(e.proc)


def test_bad_http_is_a_400_and_one_log_line(guarded: Exporter) -> None:
    with connect(guarded.port) as s:
        s.sendall(b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).split(b"\r\n")[0].endswith(b" 400 Bad Request")
    with connect(guarded.port) as s:
        s.sendall(b"GET /\x01\x02 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).split(b"\r\n")[0].endswith(b" 400 Bad Request")
    assert healthy(guarded.port)
    log = guarded.log()
    assert "Traceback" not in log
    assert "level=error" not in log


@pytest.mark.parametrize(("request_bytes", "says"), [
    # A bare-LF request: aiohttp's message quoted it whole, the password with it.
    (b"GET /metrics HTTP/1.1\nHost: x\nAuthorization: Basic YWxpY2U6czNjcmV0\n\n",
     b"400 Bad Request: malformed HTTP request"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Basic YWxpY2U6czNjcmV0" + b"A" * 9000
     + b"\r\n\r\n", b"400 Bad Request: request line or header field too long"),
    (b"GE T / HTTP/1.1\r\nHost: x\r\nAuthorization: Basic YWxpY2U6czNjcmV0\r\n\r\n",
     b"400 Bad Request: malformed HTTP request"),
])
def test_a_malformed_request_is_answered_without_its_bytes(
        guarded: Exporter, request_bytes: bytes, says: bytes) -> None:
    with connect(guarded.port) as s:
        s.sendall(request_bytes)
        answer = read_response(s)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0].endswith(b" 400 Bad Request"), answer[:300]
    assert b"x-content-type-options: nosniff" in head.lower()
    # One line of its own, nothing of the request: no credentials sent back.
    assert body.startswith(says) and body.count(b"\n") == 1, body
    assert b"YWxpY2U6czNjcmV0" not in answer


def test_every_answer_says_nosniff(guarded: Exporter) -> None:
    for request, status in (("GET /-/healthy", 200), ("HEAD /metrics", 200),
                            ("GET /no-such-page", 404), ("OPTIONS *", 404),
                            ("GET /probe", 400), ("POST /probe", 400), ("PUT /", 200),
                            ("GET /-/reload", 405), ("DELETE /-/reload", 405)):
        with connect(guarded.port) as s:
            s.sendall(f"{request} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                      "Connection: close\r\n\r\n".encode())
            head = s.recv(4096).split(b"\r\n\r\n")[0].lower()
        assert head.startswith(f"http/1.1 {status} ".encode()), (request, head)
        assert b"x-content-type-options: nosniff" in head, (request, head)


def read_response(s: socket.socket) -> bytes:
    """One whole HTTP response (the request asked for Connection: close)."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def test_a_connection_serving_a_probe_is_neither_timed_out_nor_evicted(
        guarded: Exporter) -> None:
    # The probe waits on a server that never answers for longer than the header and idle
    # timeouts, while idle connections beyond the limit evict the oldest idle ones: the
    # busy connection, the oldest of all, must still get its answer.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent, \
            connect(guarded.port) as s:
        silent.bind((LOOPBACK, 0))
        silent.settimeout(5)
        target = f"{LOOPBACK}:{silent.getsockname()[1]}"
        s.sendall(f"GET /probe?module=ntp&target={target} HTTP/1.1\r\nHost: x\r\n"
                  "X-Prometheus-Scrape-Timeout-Seconds: 2.5\r\n"
                  "Connection: close\r\n\r\n".encode())
        silent.recvfrom(512)  # the probe is in flight
        hogs = [connect(guarded.port) for _ in range(MAX_CONNECTIONS * 2)]
        try:
            response = read_response(s)
        finally:
            for hog in hogs:
                hog.close()
    assert response.startswith(b"HTTP/1.1 200 "), response[:200]
    assert b"\nprobe_success 0\n" in response
    assert b'probe_ntp_failure_info{reason="timeout"} 1' in response
    assert "connection limit reached" in guarded.log()


def fill_probe_slots(port: int, silent: list[socket.socket]) -> list[socket.socket]:
    """A connection per never-answering server in ``silent`` (distinct targets, so no
    burst is shared), each waiting on its probe (3.5 s budget); returns once every probe's
    first request has reached its server."""
    busy = []
    for server in silent:
        target = f"{LOOPBACK}:{server.getsockname()[1]}"
        s = connect(port)
        s.sendall(f"GET /probe?module=ntp&target={target} HTTP/1.1\r\nHost: x\r\n"
                  "X-Prometheus-Scrape-Timeout-Seconds: 3.5\r\n"
                  "Connection: close\r\n\r\n".encode())
        busy.append(s)
    for server in silent:
        server.recvfrom(512)
    return busy


def test_requests_beyond_the_limit_wait_for_a_slot_instead_of_being_reset(
        tmp_path: Path) -> None:
    # A low open-files limit: 8 connections, 7 probes in flight at most, 8 connections
    # waiting for a slot. With every probe slot taken, 40 clients connect at once: each
    # new connection used to evict the one before it, whose request had come in but was
    # not read yet (reset), and past the limit connections were reset; now they wait
    # (in the exporter's queue, then the kernel's) and every one is answered.
    e = start_limited(tmp_path, 64, ())
    try:
        assert "serving at most 8 connections, accepting 8 at a time" in e.log(), e.log()
        silent = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(7)]
        clients: list[socket.socket] = []
        busy: list[socket.socket] = []
        try:
            for server in silent:
                server.bind((LOOPBACK, 0))
                server.settimeout(5)
            busy = fill_probe_slots(e.port, silent)
            clients = [connect(e.port) for _ in range(40)]
            for s in clients:
                s.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answers = []
            for s in clients:
                try:
                    answers.append(read_response(s))
                except ConnectionResetError:
                    answers.append(b"reset")
        finally:
            for s in clients + busy + silent:
                s.close()
        assert [a[:15] for a in answers] == [b"HTTP/1.1 200 OK"] * 40, e.log()[-3000:]
        assert "Traceback" not in e.log()
    finally:
        stop_process(e.proc)


def test_silent_connections_beyond_the_limit_do_not_hold_up_a_request(
        tmp_path: Path) -> None:
    # Silent connections fill the limit and the queue behind it; a real request must
    # not wait behind them for the 10 s header timeout: idle ones are evicted for it, and
    # of those waiting, one with a request in its socket is let in first.
    e = start_exporter(tmp_path, ("--web.max-connections=4", "--probe.max-concurrent=3",
                                  "--web.read-header-timeout=10"))
    try:
        hogs = [connect(e.port) for _ in range(60)]
        try:
            for _ in range(3):
                assert healthy(e.port)  # its socket times out after 5 s
        finally:
            for s in hogs:
                s.close()
    finally:
        stop_process(e.proc)


# A child process that listens through an Acceptor, then takes every descriptor it may
# open: its accept fails (EMFILE) until the parent writes a line to its stdin, which
# makes it give them back. Each client gets b"hi" once accepted.
_OUT_OF_FDS = r"""
import asyncio, logging, os, resource, socket, sys
from ntp_probe.web.connections import Acceptor, ConnectionGuard

logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")

served = None

class Hi(asyncio.Protocol):
    def connection_made(self, transport):
        transport.write(b"hi")
        transport.close()
        served.set()

async def main():
    global served
    served = asyncio.Event()
    loop = asyncio.get_running_loop()
    guard = ConnectionGuard(max_connections=10, header_timeout=5, idle_timeout=5)
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    acceptor = Acceptor(guard, guard.wrap(Hi), listening, 8)
    acceptor.listen(16)
    released = asyncio.Event()
    hogs = []
    def release():
        loop.remove_reader(0)
        sys.stdin.readline()
        for fd in hogs:
            os.close(fd)
        released.set()
    loop.add_reader(0, release)
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    try:
        while True:
            hogs.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    print(listening.getsockname()[1], flush=True)
    acceptor.start()
    await released.wait()
    await asyncio.wait_for(served.wait(), 10)  # once the back-off (1 s) is over
    acceptor.close()
    listening.close()

asyncio.run(main())
"""


def test_accepting_out_of_descriptors_backs_off_and_resumes(tmp_path: Path) -> None:
    script = tmp_path / "out_of_fds.py"
    script.write_text(_OUT_OF_FDS)
    import sys

    child = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdin is not None
        assert child.stderr is not None
        port = int(child.stdout.readline())
        with socket.create_connection((LOOPBACK, port), timeout=10) as client:
            # The kernel completed the handshake; the child cannot accept it yet.
            line = child.stderr.readline().decode()
            assert "cannot accept connections: [Errno 24] Too many open files" in line, line
            child.stdin.write(b"go\n")
            child.stdin.flush()
            client.settimeout(10)
            assert client.recv(16) == b"hi"  # accepted once the back-off was over
        assert child.wait(timeout=30) == 0
        rest = child.stderr.read().decode()
        assert "Traceback" not in rest, rest
    finally:
        stop_process(child)


def test_clients_sending_part_of_a_request_do_not_hold_up_a_whole_one(
        tmp_path: Path) -> None:
    # Twenty clients send a request line and then nothing, against a limit of 3: they take
    # the slots and the queue, but only a connection whose whole request head has come
    # makes room, and a request still incomplete after a moment gives way to it. Before,
    # any bytes counted as a request: the real one waited behind all twenty, each holding
    # a slot for a second (6 s here, past the 5 s this client waits).
    e = start_exporter(tmp_path, ("--web.max-connections=3", "--probe.max-concurrent=2"))
    partial = []
    try:
        for _ in range(20):
            s = connect(e.port)
            s.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n")
            partial.append(s)
        for _ in range(3):
            assert healthy(e.port)  # its socket times out after 5 s
    finally:
        for s in partial:
            s.close()
        stop_process(e.proc)


# A request line alone, and a head of more than 8 KiB still without its blank line (it
# used to count as whole once that long).
@pytest.mark.parametrize("part", [
    b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n",
    b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n" + b"X-A: " + b"a" * 4100 + b"\r\nX-B: "
    + b"b" * 4100 + b"\r\n",
], ids=["request-line", "8-KiB-head"])
def test_a_keep_alive_connection_outlives_idle_ones_evicted_for_waiting_requests(
        tmp_path: Path, part: bytes) -> None:
    # A scraper's keep-alive connection idles between scrapes while clients sending part of
    # a request crowd the limit: the slow ones give way, not the scraper's connection.
    e = start_exporter(tmp_path, ("--web.max-connections=3", "--probe.max-concurrent=2"))
    partial: list[socket.socket] = []
    try:
        with connect(e.port) as scraper:
            def scrape() -> bytes:
                scraper.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
                return scraper.recv(4096)

            assert scrape().startswith(b"HTTP/1.1 200")
            for _ in range(12):
                s = connect(e.port)
                s.sendall(part)
                partial.append(s)
            # The scenario, not a wait for an event: they have been at it for longer than
            # a request takes to come in (a quarter of a second).
            time.sleep(0.5)
            for _ in range(3):
                assert healthy(e.port)  # each a whole request: room is made for it
                assert scrape().startswith(b"HTTP/1.1 200")  # on the same connection
    finally:
        for s in partial:
            s.close()
        stop_process(e.proc)


def test_a_client_that_half_closes_after_its_request_gets_the_answer(
        guarded: Exporter) -> None:
    # `printf 'GET ...' | nc -N`: the request, then shutdown(SHUT_WR). Go's server answers
    # it; aiohttp closed the connection at the client's end of file, answer unsent.
    for path in ("/-/healthy", "/metrics"):
        with connect(guarded.port) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            s.shutdown(socket.SHUT_WR)
            assert read_response(s).startswith(b"HTTP/1.1 200 OK"), path
    # The head's blank line in a read of its own: the head is whole all the same.
    for last in (b"\r\n", b"\n"):
        with connect(guarded.port) as s:
            head = b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n"
            s.sendall(head[:-len(last)])
            time.sleep(0.05)  # the client's pace, so that the server reads two pieces
            s.sendall(last)
            s.shutdown(socket.SHUT_WR)
            assert read_response(s).startswith(b"HTTP/1.1 200 OK"), last


def test_a_client_that_closes_its_connection_cancels_its_probe(tmp_path: Path) -> None:
    # curl -m, Prometheus at its scrape timeout and a closed socket end with a FIN, not a
    # reset: the burst stops there, as the README says (Go cancels the request's context).
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind((LOOPBACK, 0))
    silent.settimeout(5)
    config = tmp_path / "modules.yaml"
    config.write_text("modules:\n  slow:\n    timeout: 10s\n    ntp: {samples: 3, "
                      "sample_interval: 1s, reply_timeout: 200ms}\n")
    e = start_exporter(tmp_path, (f"--config.file={config}",))
    try:
        with connect(e.port) as s:
            s.sendall(f"GET /probe?module=slow&target={LOOPBACK}:{silent.getsockname()[1]} "
                      "HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            silent.recv(512)  # the burst's first request: the probe is under way
        # Closed (a FIN). Without the cancel, requests 2 and 3 come 1 s and 2 s later.
        silent.settimeout(2.5)
        with pytest.raises(TimeoutError):
            silent.recv(512)
        status, _, body = e.get(f"/logs?target={LOOPBACK}:{silent.getsockname()[1]}"
                                "&module=slow")
        assert status == 200 and "The client hung up" in body and "it was stopped" in body, body
    finally:
        stop_process(e.proc)
        silent.close()


def test_a_keep_alive_connection_answered_by_the_router_is_not_cut(
        guarded: Exporter) -> None:
    # 404s and 405s pass no route handler; the connection's header deadline used to run
    # on from its first request and cut it at --web.read-header-timeout (0.5 s here).
    with connect(guarded.port) as s:
        until = time.monotonic() + 3 * HEADER_TIMEOUT
        answered = 0
        while time.monotonic() < until:
            s.sendall(b"GET /no-such-page HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 404"), answered
            answered += 1
            time.sleep(HEADER_TIMEOUT / 5)  # a client pacing its requests (not a wait)
        assert answered >= 10


def send_queue_bytes(port: int) -> list[int]:
    """Bytes waiting in the exporter's send queue of each connection it has (ss)."""
    ss = shutil.which("ss")
    assert ss is not None
    out = subprocess.run([ss, "-Htn", f"sport = :{port}"], capture_output=True, text=True,
                         timeout=30).stdout
    return [int(line.split()[2]) for line in out.splitlines() if line.startswith("ESTAB")]


def test_clients_that_do_not_read_their_answers_give_way(tmp_path: Path) -> None:
    # Two clients pipeline /metrics requests and never read: once the socket buffers are
    # full their answers stop draining, and their connections are neither busy nor idle.
    # After --web.read-header-timeout without draining they give way to a whole request;
    # before, they held the slots until --web.idle-timeout (30 s), and a request waiting
    # for one was reset after the header timeout (1 s here).
    if shutil.which("ss") is None:
        pytest.skip("ss (iproute2) not installed")
    e = start_exporter(tmp_path, ("--web.max-connections=2", "--probe.max-concurrent=1",
                                  "--web.read-header-timeout=1"))
    hogs = []
    try:
        for _ in range(2):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            s.connect((LOOPBACK, e.port))
            s.setblocking(False)
            request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
            with contextlib.suppress(BlockingIOError):
                for _ in range(3000):  # bounded; stops when its send buffer is full
                    s.send(request)
            hogs.append(s)
        # Stalled: both send queues stop growing (polled, with a deadline).
        deadline, last = time.monotonic() + 20, [-1]
        while time.monotonic() < deadline:
            queued = send_queue_bytes(e.port)
            if len(queued) == 2 and min(queued) > 0 and queued == last:
                break
            last = queued
            time.sleep(0.2)  # poll interval, bounded by the deadline
        else:
            pytest.fail(f"the answers did not stall: {last}")
        assert healthy(e.port)  # its socket times out after 5 s
    finally:
        for s in hogs:
            s.close()
        stop_process(e.proc)


def test_a_client_that_closes_without_a_request_is_closed_at_once(tmp_path: Path) -> None:
    # A TCP health check (`nc -z`) connects and closes; a keep-alive client half-closes
    # after reading its answer. The exporter closes its side at once (Go's servers do),
    # not after the default header (10 s) or idle (30 s) timeout: kept open, such
    # connections held slots, and a storm of them locked /-/healthy out.
    e = start_exporter(tmp_path, ())
    try:
        with connect(e.port) as s:
            s.shutdown(socket.SHUT_WR)
            assert s.recv(4096) == b""  # within the 5 s socket timeout
        with connect(e.port) as s:
            s.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            s.shutdown(socket.SHUT_WR)
            assert s.recv(4096) == b""
    finally:
        stop_process(e.proc)


def test_a_storm_of_connections_closed_without_a_request_takes_no_slot(
        tmp_path: Path) -> None:
    # Against a limit of 3 and the default timeouts (10 s, 30 s): 60 connect-and-close
    # clients (health checks), each connection closed or reset before a request, then
    # /-/healthy must answer within its 5 s (they used to count as whole requests in the
    # queue, go first and hold the slots until the header timeout).
    e = start_exporter(tmp_path, ("--web.max-connections=3", "--probe.max-concurrent=2"))
    try:
        for i in range(60):
            s = connect(e.port)
            if i % 2:  # half of them reset
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        for _ in range(3):
            assert healthy(e.port)
    finally:
        stop_process(e.proc)
