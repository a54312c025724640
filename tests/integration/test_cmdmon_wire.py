"""The cmdmon codec against real chronyd 4.x on loopback, compared with ``chronyc -c``.

A server chronyd (``local stratum 8``) and a client chronyd that uses it as its only source,
both ``chronyd -x`` (the clock is never touched). The test talks to the client's unix command
socket and its UDP cmdport on 127.0.0.1 with plain blocking sockets and the codec, and runs
``chronyc -c`` against the same socket in the same test: what the codec decodes, printed the
way chronyc prints it, must be exactly what chronyc printed.

The client polls every 1/8 s, so its reports change between reads: a comparison is only
made when two codec reads around one chronyc run agree, and retried otherwise.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from ntp_probe.proto import cmdmon
from ntp_probe.proto.cmdmon import (
    Command,
    LeapStatus,
    Reply,
    ReplyMismatchError,
    ReplyType,
    SelectData,
    ServerStats,
    SourceData,
    SourceMode,
    SourceState,
    SourceStats,
    Status,
    Tracking,
)
from tests.conftest import (
    LOOPBACK,
    free_udp_port,
    require_binary,
    start_chronyd,
    stop_chronyd,
    stop_process,
)

pytestmark = pytest.mark.integration

T = TypeVar("T")

SYNC_DEADLINE = 10.0  # seconds; the client selects its source in about 0.3 s here
COMPARE_DEADLINE = 10.0
REQUEST_TIMEOUT = 1.0
NS = 1_000_000_000
POLL = -3  # log2 seconds: fast enough to sync at once, slow enough for stable reads
NO_SAMPLE = 0xFFFFFFFF
NTP_UNIX_DELTA = 2_208_988_800

LEAP_TEXT = {
    LeapStatus.NORMAL: "Normal",
    LeapStatus.INSERT: "Insert second",
    LeapStatus.DELETE: "Delete second",
    LeapStatus.UNSYNCHRONISED: "Not synchronised",
}


# --- a plain blocking cmdmon client ----------------------------------------------------------


class CmdmonSocket:
    """One datagram socket to a chronyd command port or unix socket, speaking the codec."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def send_raw(self, data: bytes) -> None:
        self.sock.send(data)

    def receive(self, command: Command, sequence: int) -> Reply:
        """The reply to (command, sequence); stale replies to other requests are skipped."""
        deadline = time.monotonic() + REQUEST_TIMEOUT
        while True:
            self.sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            data = self.sock.recv(4096)
            try:
                return cmdmon.decode_reply(data, command, sequence)
            except ReplyMismatchError:
                continue

    def query(self, command: Command, index: int | None = None) -> Reply:
        sequence = secrets.randbits(32)
        self.send_raw(cmdmon.encode_request(command, sequence, index=index))
        return self.receive(command, sequence)

    def data(self, command: Command, kind: type[T], index: int | None = None) -> T:
        reply = self.query(command, index)
        assert reply.status is Status.SUCCESS, reply
        assert isinstance(reply.data, kind), reply
        return reply.data


@dataclass
class Client:
    """A client chronyd this module started, and sockets to its command interfaces."""

    proc: subprocess.Popen[bytes]
    dir: Path
    cmdport: int
    unix: CmdmonSocket
    udp: CmdmonSocket

    @property
    def socket_path(self) -> Path:
        return self.dir / "chronyd.sock"

    def log(self) -> str:
        return (self.dir / "chronyd.log").read_text(errors="replace")

    def chronyc(self, *args: str, host: str | None = None) -> subprocess.CompletedProcess[str]:
        """``chronyc -c`` against this chronyd (its unix socket unless ``host`` is given)."""
        if host is None:
            target = ["-h", str(self.socket_path)]
        else:
            target = ["-h", host, "-p", str(self.cmdport)]
        return subprocess.run(
            [require_binary("chronyc"), "-c", *target, *args],
            capture_output=True, text=True, timeout=10, check=False,
        )

    def chronyc_lines(self, *args: str) -> list[str]:
        done = self.chronyc(*args)
        assert done.returncode == 0, f"chronyc {args}: {done.stdout}{done.stderr}"
        return done.stdout.splitlines()


def client_config(directory: Path, server_port: int, cmdport: int) -> str:
    lines = [
        f"server {LOOPBACK} port {server_port} iburst minpoll {POLL} maxpoll {POLL}",
        "port 0",  # not an NTP server itself
        f"cmdport {cmdport}",
        f"bindcmdaddress {LOOPBACK}",
        f"bindcmdaddress {directory}/chronyd.sock",
        f"pidfile {directory}/chronyd.pid",
        f"driftfile {directory}/drift",
    ]
    if os.geteuid() == 0:
        lines.append("user root")
    return "\n".join(lines) + "\n"


def poll_until(what: str, probe: Callable[[], T | None], client: Client) -> T:
    """Call ``probe`` until it returns a value, or fail at the deadline with chronyd's log."""
    deadline = time.monotonic() + SYNC_DEADLINE
    while time.monotonic() < deadline:
        if client.proc.poll() is not None:
            pytest.fail(f"client chronyd exited with {client.proc.returncode}:\n{client.log()}")
        started = time.monotonic()
        result = probe()
        if result is not None:
            return result
        # Pace the polls (chronyd answers at once): at most one round per 20 ms.
        time.sleep(max(0.0, started + 0.02 - time.monotonic()))
    pytest.fail(f"{what} within {SYNC_DEADLINE} s; chronyd log:\n{client.log()}")


def start_client(server_port: int) -> tuple[Client, Callable[[], None]]:
    """Start a client chronyd with ``server_port`` on 127.0.0.1 as its source.

    Returns the client and a function that stops it by PID and removes its directory.
    """
    binary = require_binary("chronyd")
    require_binary("chronyc")
    directory = Path(tempfile.mkdtemp(prefix="ntpp-cmdmon-"))
    directory.chmod(0o700)  # chronyd refuses a command socket in a directory others can reach
    cmdport = free_udp_port()
    (directory / "chrony.conf").write_text(client_config(directory, server_port, cmdport))
    # -x: never touch the system clock. -d: foreground. -4: IPv4 only.
    argv = [binary, "-4", "-x", "-d", "-f", str(directory / "chrony.conf")]
    if os.geteuid() != 0:
        argv.insert(1, "-U")  # non-root needs -U, else "Not superuser"
    with open(directory / "chronyd.log", "wb") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=directory
        )
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def stop() -> None:
        unix.close()
        udp.close()
        stop_process(proc)
        shutil.rmtree(directory, ignore_errors=True)

    try:
        # chronyd sends unix-socket replies to the path the client bound (as chronyc does).
        unix.bind(str(directory / f"probe.{os.getpid()}.sock"))
        udp.connect((LOOPBACK, cmdport))
        client = Client(proc, directory, cmdport, CmdmonSocket(unix), CmdmonSocket(udp))

        def listening() -> bool | None:
            try:
                unix.connect(str(client.socket_path))
            except (FileNotFoundError, ConnectionRefusedError):
                return None
            return True

        poll_until("chronyd's command socket did not appear", listening, client)
        if "Disabled control of system clock" not in client.log():
            pytest.fail(f"chronyd did not confirm -x (clock control):\n{client.log()}")
    except BaseException:
        stop()
        raise
    return client, stop


def wait_synchronised(client: Client) -> Tracking:
    """Poll TRACKING until the client has selected its source (leap status normal)."""

    def synced() -> Tracking | None:
        t = client.unix.data(Command.TRACKING, Tracking)
        return t if t.leap_status is LeapStatus.NORMAL else None

    return poll_until("the client did not synchronise", synced, client)


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Client, Path]]:
    """A client chronyd synchronised to a server chronyd; yields (client, server socket)."""
    server = start_chronyd(synchronised=True)
    try:
        client, stop = start_client(server.port)
        try:
            wait_synchronised(client)
            yield client, server.socket_path
        finally:
            stop()
    finally:
        stop_chronyd(server)


# --- chronyc -c formatting of decoded values (client.c print_report in CSV mode) -------------


def csv_tracking(t: Tracking) -> str:
    return ",".join([
        t.refid, t.name, str(t.stratum),
        f"{t.ref_time_ns // NS}.{t.ref_time_ns % NS:09d}",
        f"{t.system_time:.9f}", f"{t.last_offset:.9f}", f"{t.rms_offset:.9f}",
        f"{t.frequency_ppm:.3f}", f"{t.residual_frequency_ppm:.3f}", f"{t.skew_ppm:.3f}",
        f"{t.root_delay:.9f}", f"{t.root_dispersion:.9f}", f"{t.update_interval:.1f}",
        LEAP_TEXT[t.leap_status],
    ])


def csv_source(s: SourceData) -> str:
    age = NO_SAMPLE if s.last_rx_age is None else s.last_rx_age
    return ",".join([
        s.mode.symbol, s.state.symbol, s.name, str(s.stratum), str(s.poll), f"{s.reach:o}",
        str(age), f"{s.offset:.9f}", f"{s.measured_offset:.9f}", f"{s.offset_error:.9f}",
    ])


def csv_sourcestats(s: SourceStats) -> str:
    return ",".join([
        s.name, str(s.samples), str(s.runs), str(s.span), f"{s.residual_frequency_ppm:.3f}",
        f"{s.skew_ppm:.3f}", f"{s.offset:.9f}", f"{s.stddev:.9f}",
    ])


def _options(o: int) -> list[str]:
    return ["N" if o & 1 else "-", "P" if o & 2 else "-", "T" if o & 4 else "-",
            "R" if o & 8 else "-", "-"]


def csv_selectdata(s: SelectData) -> str:
    return ",".join([
        s.state, s.name, "Y" if s.authenticated else "N", *_options(s.conf_options),
        *_options(s.eff_options), str(s.last_sample_ago), f"{s.score:.1f}",
        f"{s.lo_limit:.9f}", f"{s.hi_limit:.9f}", LEAP_TEXT[LeapStatus(s.leap)],
    ])


def read_all(client: Client, command: Command, kind: type, fmt: Callable[..., str]) -> list[str]:
    """Every source's report, formatted as chronyc prints it."""
    n = client.unix.data(Command.N_SOURCES, cmdmon.NSources).n_sources
    return [fmt(client.unix.data(command, kind, i)) for i in range(n)]


def assert_same_as_chronyc(
    client: Client, chronyc_cmd: str, read: Callable[[], list[str]],
    varying: frozenset[int] = frozenset(),
) -> None:
    """chronyc's output equals the codec's, whenever two codec reads around it agree.

    Columns in ``varying`` change continuously (chrony computes them at report time): there
    chronyc's number must lie between the two codec reads'.
    """

    def steady(lines: list[str]) -> list[list[str]]:
        return [[v for i, v in enumerate(line.split(",")) if i not in varying] for line in lines]

    deadline = time.monotonic() + COMPARE_DEADLINE
    attempts = 0
    while time.monotonic() < deadline:
        attempts += 1
        before = read()
        printed = client.chronyc_lines(chronyc_cmd)
        after = read()
        if steady(before) != steady(after):
            continue  # chronyd updated in between: try again
        assert steady(printed) == steady(before), f"chronyc -c {chronyc_cmd}: {printed} {before}"
        for low_line, line, high_line in zip(before, printed, after, strict=True):
            for i in varying:
                low, value, high = (float(x.split(",")[i]) for x in (low_line, line, high_line))
                assert min(low, high) <= value <= max(low, high), (i, low_line, line, high_line)
        return
    pytest.fail(f"{chronyc_cmd}: no two stable reads in {attempts} attempts")


# --- tests ---------------------------------------------------------------------------------------


def test_tracking_matches_chronyc(pair: tuple[Client, Path]) -> None:
    client, _ = pair
    t = client.unix.data(Command.TRACKING, Tracking)
    # Synchronised to the stratum-8 server on 127.0.0.1.
    assert (t.refid, t.name, t.stratum, t.leap_status) == (
        "7F000001", "127.0.0.1", 9, LeapStatus.NORMAL,
    )
    assert abs(t.ref_time - time.time()) < 60
    assert 0 <= t.root_delay < 0.01 and t.root_dispersion >= 0
    # System time (4) decays as chrony slews; root dispersion (11) grows with time.
    assert_same_as_chronyc(
        client, "tracking", lambda: [csv_tracking(client.unix.data(Command.TRACKING, Tracking))],
        varying=frozenset({4, 11}),
    )


def test_sources_match_chronyc(pair: tuple[Client, Path]) -> None:
    client, _ = pair
    assert client.unix.data(Command.N_SOURCES, cmdmon.NSources).n_sources == 1
    s = client.unix.data(Command.SOURCE_DATA, SourceData, 0)
    assert (s.name, s.mode, s.state, s.stratum, s.poll) == (
        "127.0.0.1", SourceMode.SERVER, SourceState.SYNC, 8, POLL,
    )
    assert s.reach & 1 and s.last_rx_age is not None and s.last_rx_age < 10
    assert abs(s.offset) < 0.01 and 0 < s.offset_error < 0.1
    assert_same_as_chronyc(
        client, "sources", lambda: read_all(client, Command.SOURCE_DATA, SourceData, csv_source)
    )


def test_sourcestats_match_chronyc(pair: tuple[Client, Path]) -> None:
    client, _ = pair
    s = client.unix.data(Command.SOURCESTATS, SourceStats, 0)
    assert (s.refid, s.name) == ("7F000001", "127.0.0.1")
    assert s.samples >= 1 and 1 <= s.runs <= s.samples
    assert_same_as_chronyc(
        client, "sourcestats",
        lambda: read_all(client, Command.SOURCESTATS, SourceStats, csv_sourcestats),
    )


def test_selectdata_matches_chronyc(pair: tuple[Client, Path]) -> None:
    client, _ = pair
    s = client.unix.data(Command.SELECT_DATA, SelectData, 0)
    assert (s.state, s.name) == ("*", "127.0.0.1")
    assert s.lo_limit <= s.hi_limit
    assert_same_as_chronyc(
        client, "selectdata",
        lambda: read_all(client, Command.SELECT_DATA, SelectData, csv_selectdata),
    )


# chronyc 4.3's serverstats columns (client.c process_cmd_serverstats), reply type 24.
SERVERSTATS_COLUMNS = [
    "ntp_hits", "ntp_drops", "cmd_hits", "cmd_drops", "log_drops", "nke_hits", "nke_drops",
    "ntp_auth_hits", "ntp_interleaved_hits", "ntp_timestamps", "ntp_span_seconds",
]


@pytest.mark.parametrize("which", ["client", "server"])
def test_serverstats_match_chronyc(pair: tuple[Client, Path], which: str) -> None:
    client, server_socket = pair
    path = client.socket_path if which == "client" else server_socket
    # Each command, chronyc's included, counts in cmd_hits; the server's NTP counters grow
    # with the client's polls: chronyc's counters lie between two codec reads around it.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sock:
        sock.bind(str(path.parent / f"probe-stats.{os.getpid()}.sock"))
        sock.connect(str(path))
        conn = CmdmonSocket(sock)
        before = conn.data(Command.SERVER_STATS, ServerStats)
        done = subprocess.run(
            [require_binary("chronyc"), "-c", "-h", str(path), "serverstats"],
            capture_output=True, text=True, timeout=10, check=False,
        )
        after = conn.data(Command.SERVER_STATS, ServerStats)
    assert done.returncode == 0, done.stdout + done.stderr
    printed = [int(v) for v in done.stdout.strip().split(",")]
    assert before.reply_type is ReplyType.SERVER_STATS3  # chrony 4.2-4.3
    assert len(printed) == len(SERVERSTATS_COLUMNS)
    for name, value in zip(SERVERSTATS_COLUMNS, printed, strict=True):
        low, high = getattr(before, name), getattr(after, name)
        assert low <= value <= high, f"{name}: {low} <= {value} <= {high}"
    assert before.cmd_hits < printed[2] < after.cmd_hits
    if which == "server":
        assert before.ntp_hits > 0  # the client's polls
    else:
        assert (before.ntp_hits, after.ntp_hits) == (0, 0)  # "port 0": not an NTP server
    # Type 24 has no timestamp-source counters (those came with type 25 in chrony 4.4).
    assert before.ntp_daemon_rx_timestamps is None and before.ntp_hw_tx_timestamps is None


def test_udp_open_commands_and_unauthorised_ones(pair: tuple[Client, Path]) -> None:
    client, _ = pair
    over_udp = client.udp.data(Command.TRACKING, Tracking)
    over_unix = client.unix.data(Command.TRACKING, Tracking)
    assert (over_udp.refid, over_udp.stratum, over_udp.address) == (
        over_unix.refid, over_unix.stratum, over_unix.address,
    )
    assert client.udp.data(Command.N_SOURCES, cmdmon.NSources).n_sources == 1
    # Only the unix socket may ask for these (cmdmon.c permissions): an empty UNAUTH reply.
    for command, index in ((Command.SERVER_STATS, None), (Command.SELECT_DATA, 0)):
        assert client.udp.query(command, index) == Reply(Status.UNAUTH, ReplyType.NULL, None)
    done = client.chronyc("serverstats", host=LOOPBACK)
    assert done.stdout.startswith("501 Not authorised"), done.stdout


def test_status_replies_from_chronyd(pair: tuple[Client, Path]) -> None:
    client, _ = pair
    no_such = client.unix.query(Command.SOURCE_DATA, 7)
    assert no_such == Reply(Status.NOSUCHSOURCE, ReplyType.NULL, None)
    # A request shorter than its reply is refused (anti-amplification), one as long is not.
    tracking_len = cmdmon.reply_length(ReplyType.TRACKING)
    for length, status in ((tracking_len - 1, Status.BADPKTLENGTH),
                           (tracking_len, Status.SUCCESS)):
        seq = secrets.randbits(32)
        client.unix.send_raw(cmdmon.encode_request(Command.TRACKING, seq)[:length])
        assert client.unix.receive(Command.TRACKING, seq).status is status, length
    # A protocol-5 request gets BADPKTVERSION (in protocol 6).
    seq = secrets.randbits(32)
    client.unix.send_raw(b"\x05" + cmdmon.encode_request(Command.TRACKING, seq)[1:])
    assert client.unix.receive(Command.TRACKING, seq) == Reply(
        Status.BADPKTVERSION, ReplyType.NULL, None
    )


# --- sign: a source whose clock is 1 s ahead ---------------------------------------------------

AHEAD = 1.0


def _ntp_ts(unix: float) -> int:
    return int((unix + NTP_UNIX_DELTA) * (1 << 32))


def _fake_ntp_server(sock: socket.socket, stop: threading.Event) -> None:
    """Answer every client request as a stratum-1 server whose clock is AHEAD seconds ahead."""
    sock.settimeout(0.05)
    while not stop.is_set():
        try:
            data, addr = sock.recvfrom(1024)
        except TimeoutError:
            continue
        if len(data) < 48 or data[0] & 7 != 3:
            continue
        now = time.time() + AHEAD
        # LI 0, VN 4, mode 4; stratum 1; the client's poll; precision 2**-20; refid "GPS".
        # The poll byte echoed as it came (chronyd may send a negative poll: 0xfa is -6).
        packet = struct.pack(
            ">BBBbII4sQ8sQQ", 0x24, 1, data[2], -20, 0, 0x10, b"GPS\0", _ntp_ts(now - 1),
            data[40:48], _ntp_ts(now), _ntp_ts(now),
        )
        sock.sendto(packet, addr)


def test_source_ahead_has_negative_offset() -> None:
    """chrony's source offsets are local minus source: a source 1 s ahead reads -1 s, and
    chronyc prints the same negative number."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind((LOOPBACK, 0))
    stop = threading.Event()
    thread = threading.Thread(target=_fake_ntp_server, args=(server, stop), daemon=True)
    thread.start()
    try:
        client, stop_client = start_client(server.getsockname()[1])
        try:

            def sampled() -> SourceData | None:
                s = client.unix.data(Command.SOURCE_DATA, SourceData, 0)
                return s if s.last_rx_age is not None else None

            s = poll_until("no sample from the fake server", sampled, client)
            assert s.measured_offset == pytest.approx(-AHEAD, abs=0.05)
            stats = client.unix.data(Command.SOURCESTATS, SourceStats, 0)
            assert stats.offset == pytest.approx(-AHEAD, abs=0.05)
            measured = float(client.chronyc_lines("sources")[0].split(",")[8])
            assert measured == pytest.approx(-AHEAD, abs=0.05)
        finally:
            stop_client()
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()
