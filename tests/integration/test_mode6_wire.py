"""The mode 6 codec against ntpsec's real ntpd on 127.0.0.1:123, checked against ntpq.

ntpd comes from the Debian package unpacked into the test cache, exactly as in
test_ntpsec_kod.py (whose helpers this imports), and runs the same way: as
``setpriv --bounding-set=-sys_time -- ntpd -n ...`` (no CAP_SYS_TIME, checked in /proc
before any packet is sent), never with -g/-G/-q, with ``disable ntp`` and ``disable
kernel``. ntpq is the Python client in the same package; it needs ntpsec's ``ntp`` Python
package, which Debian ships as python3-ntp: that is unpacked into the cache too.

The codec talks over a plain blocking UDP socket; each test then asks ntpq the same
question and compares. Two SHM refclocks (units 2 and 3) give ntpd two associations;
nothing feeds them, so both stay unreachable ``reject``. ntpd creates their SHM segments:
the test refuses to start if the keys are already in use (someone's refclock) and removes
them afterwards. ntpd is stopped by its PID.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ntp_probe.proto import mode6
from ntp_probe.proto.mode6 import ErrorReply, Fragment, Mode6Error, Opcode, Reassembler, Response
from tests.conftest import require_binary, stop_process
from tests.integration.test_ntpsec_kod import (
    LOOPBACK,
    NTP_PORT,
    READY_DEADLINE,
    Ntpd,
    _cap_sys_time_cleared,
    _wait_exec,
    cache_dir,
    check_port_123_free,
    loopback_conf,
    ntpsec_ntpd,
    unavailable,
    unpack_deb,
)

pytestmark = pytest.mark.integration

SHM_UNITS = (2, 3)  # units >= 2 are created 0666; 0 and 1 would be root-only
SHM_KEY_BASE = 0x4E545030  # "NTP0": ntpd's SHM key for unit 0
IPC_RMID = 0
QUERY_TIMEOUT = 1.0
NTPQ_TIMEOUT = 30.0
LEAP_NAMES = ("leap_none", "leap_add_sec", "leap_del_sec", "leap_alarm")  # statustoa's


# --- ntpq --------------------------------------------------------------------------------


def python3_ntp() -> Path:
    """The dist-packages directory holding ntpsec's ``ntp`` package (downloaded once)."""
    root = cache_dir() / "python3-ntp"
    packages = root / "usr" / "lib" / "python3" / "dist-packages"
    if not (packages / "ntp" / "libntpc.so").exists():
        _download_python3_ntp(root)
    if not (packages / "ntp" / "packet.py").exists():
        unavailable(f"{packages}/ntp missing after unpacking python3-ntp")
    return packages


def _download_python3_ntp(root: Path) -> None:
    def place_library(unpacked: Path) -> None:
        # ntp/ntpc.py loads libntpc.so from its own directory first: put it there, so
        # nothing needs installing system-wide.
        libs = sorted(unpacked.glob("usr/lib/*/ntp/libntpc.so.*"))
        if not libs:
            unavailable("python3-ntp has no libntpc.so")
        package = unpacked / "usr" / "lib" / "python3" / "dist-packages" / "ntp"
        shutil.copyfile(libs[-1], package / "libntpc.so")

    unpack_deb("python3-ntp", root, place_library)


def ntpq(*commands: str) -> str:
    """Run ntpsec's ntpq against 127.0.0.1 with numeric addresses; its standard output."""
    script = cache_dir() / "ntpsec" / "usr" / "bin" / "ntpq"
    env = {**os.environ, "PYTHONPATH": str(python3_ntp())}
    argv = [sys.executable, str(script), "-n"]
    for command in commands:
        argv += ["-c", command]
    done = subprocess.run([*argv, LOOPBACK], capture_output=True, text=True, env=env,
                          timeout=NTPQ_TIMEOUT, stdin=subprocess.DEVNULL)
    assert done.returncode == 0 and not done.stderr.strip(), (done.stdout, done.stderr)
    return done.stdout


def ntpq_variables(text: str) -> dict[str, str]:
    """ntpq's raw-mode ``rv`` listing as name -> value; a plain regex, not the codec's parser."""
    return {name: value.strip('"')
            for name, value in re.findall(r'([\w.]+)=("[^"]*"|[^,\s]*)', text)}


# --- SHM segments ------------------------------------------------------------------------


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
    libc.shmctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    return libc


def shm_id(key: int) -> int:
    """The id of the SHM segment with ``key``, or -1 when there is none."""
    return int(_libc().shmget(key, 0, 0))


def remove_shm(key: int) -> None:
    """Remove the SHM segment with ``key`` if it exists."""
    ident = shm_id(key)
    if ident >= 0 and _libc().shmctl(ident, IPC_RMID, None) != 0:
        raise OSError(ctypes.get_errno(), f"shmctl(IPC_RMID) on key {key:#x}")


# --- the codec over a blocking socket ---------------------------------------------------


@dataclass
class Control:
    """One mode 6 client: a connected UDP socket and a sequence counter."""

    sock: socket.socket
    sequence: int = 0x4000
    fragments: list[Fragment] = field(default_factory=list)  # of the last response

    def send(self, datagram: bytes) -> None:
        """Send one datagram as it is (the error test builds one by hand)."""
        self.sock.send(datagram)

    def query(self, opcode: int, association: int = 0, names: Sequence[str] = (),
              timeout: float = QUERY_TIMEOUT) -> Response | ErrorReply:
        """One request, a new sequence number, the reassembled response or the error."""
        self.sequence += 1
        self.send(mode6.encode_request(opcode, self.sequence, association,
                                       mode6.variable_list(names)))
        return self.receive(opcode, association, timeout)

    def receive(self, opcode: int, association: int, timeout: float) -> Response | ErrorReply:
        """Datagrams for the current sequence until the response is complete."""
        reassembler = Reassembler()
        self.fragments = []
        deadline = time.monotonic() + timeout
        while not reassembler.complete:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"incomplete: gaps {reassembler.gaps()}")
            self.sock.settimeout(left)
            datagram = self.sock.recv(4096)
            try:
                reply = mode6.decode_reply(datagram, opcode=opcode, sequence=self.sequence,
                                           association=association)
            except Mode6Error:
                continue  # a late answer to an earlier request
            if isinstance(reply, ErrorReply):
                return reply
            if reassembler.add(reply):
                self.fragments.append(reply)
        return reassembler.response()

    def response(self, opcode: int, association: int = 0,
                 names: Sequence[str] = ()) -> Response:
        """:meth:`query` where an error reply fails the test."""
        reply = self.query(opcode, association, names)
        assert isinstance(reply, Response), reply
        return reply


def ntp_conf(d: Path) -> str:
    """Loopback only, never disciplining the clock, two unfed SHM refclocks."""
    return loopback_conf(
        d,
        "restrict default nomodify noquery",
        f"restrict {LOOPBACK} nomodify",  # mode 6 needs no noquery here
        "disable ntp",
        "disable kernel",
        "tos orphan 8 orphanwait 0",
        *(f"refclock shm unit {u} refid SHM{u} minpoll 3 maxpoll 3" for u in SHM_UNITS),
    )


@dataclass
class Server(Ntpd):
    """The running ntpd and a mode 6 client connected to it."""

    control: Control


def _wait_associations(control: Control, proc: subprocess.Popen[bytes]) -> str | None:
    """Poll READSTAT until both refclock associations exist; None when ready."""
    deadline = time.monotonic() + READY_DEADLINE
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return f"ntpd exited with {proc.returncode}"
        try:
            reply = control.query(Opcode.READSTAT, timeout=0.2)
        except TimeoutError:
            continue
        except ConnectionRefusedError:  # not bound yet: poll again shortly
            time.sleep(0.05)
            continue
        if isinstance(reply, Response) and len(mode6.decode_readstat(reply.data)) == 2:
            return None
    return f"no two associations within {READY_DEADLINE}s"


@contextlib.contextmanager
def safe_ntpd(d: Path, conf_text: str,
              shm_keys: list[int]) -> Iterator[tuple[subprocess.Popen[bytes], socket.socket]]:
    """ntpsec's ntpd on 127.0.0.1:123 with ``conf_text``, always under
    ``setpriv --bounding-set=-sys_time`` (checked in /proc before anything is sent), and a
    UDP socket connected to it; stopped by its PID and its SHM segments removed after."""
    setpriv = require_binary("setpriv")
    binary = ntpsec_ntpd()
    python3_ntp()
    check_port_123_free()
    taken = [f"{k:#x}" for k in shm_keys if shm_id(k) >= 0]
    if taken:
        unavailable(f"SHM segments {taken} already exist (another refclock user?)")
    conf = d / "ntp.conf"
    conf.write_text(conf_text)
    # Never -g/-G/-q/-u; without CAP_SYS_TIME the kernel refuses any clock change.
    argv = [setpriv, "--bounding-set=-sys_time", "--", str(binary), "-n", "-c", str(conf),
            "-l", str(d / "ntpd.log"), "-p", str(d / "ntpd.pid")]
    with open(d / "stdout.log", "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, cwd=d)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        if not _wait_exec(proc, "ntpd", time.monotonic() + READY_DEADLINE):
            pytest.fail(f"ntpd did not start: rc={proc.poll()}", pytrace=False)
        if not _cap_sys_time_cleared(proc.pid):
            pytest.fail("ntpd runs with CAP_SYS_TIME: refusing to go on")
        sock.connect((LOOPBACK, NTP_PORT))
        yield proc, sock
    finally:
        sock.close()
        stop_process(proc)
        for key in shm_keys:
            remove_shm(key)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("ntpsec-mode6")
    with safe_ntpd(d, ntp_conf(d), [SHM_KEY_BASE + u for u in SHM_UNITS]) as (proc, sock):
        srv = Server(proc, d, Control(sock))
        why = _wait_associations(srv.control, proc)
        if why is not None:
            pytest.fail(f"ntpsec ntpd not ready: {why}\n{srv.log()}", pytrace=False)
        yield srv


# --- the comparisons ---------------------------------------------------------------------


def _events(count: int) -> str:
    return "no events" if count == 0 else f"{count} event{'s' if count > 1 else ''}"


def test_system_variables_match_ntpq_rv(server: Server) -> None:
    before = server.control.response(Opcode.READVAR)
    raw = ntpq("raw", "rv")
    cooked = ntpq("rv")
    after = server.control.response(Opcode.READVAR)
    ours = mode6.parse_variables(before.data)
    theirs = ntpq_variables(raw.split("Output set to raw", 1)[1])
    assert theirs.pop("associd") == "0"
    # The status word ntpq saw is the one the codec saw just before or just after.
    status = int(theirs.pop("status"), 16)
    assert status in (before.status, after.status), (raw, before, after)

    assert list(ours) == list(theirs)  # the same variables, in the server's order
    for name in ("version", "processor", "system", "leap", "stratum", "precision", "refid",
                 "reftime", "tc", "mintc", "peer"):
        assert ours[name] == theirs[name], name
    assert "ntpsec" in ours["version"]
    assert mode6.to_int(ours["stratum"]) in (8, 16)  # orphan mode, or not there yet
    assert mode6.ntp_timestamp_to_unix(ours["reftime"], time.time()) is None  # never synced
    clock = mode6.ntp_timestamp_to_unix(ours["clock"], time.time())
    assert clock is not None and abs(clock - time.time()) < 5
    for name in ("rootdelay", "rootdisp", "offset", "sys_jitter", "clk_jitter"):
        seconds = mode6.ms_to_seconds(ours[name])
        assert seconds == pytest.approx(float(theirs[name]) / 1000, abs=0.01), name
    for name in ("frequency", "clk_wander"):
        assert mode6.ppm(ours[name]) == pytest.approx(float(theirs[name]), abs=1.0), name
    assert mode6.log2_seconds(ours["tc"]) == 2.0 ** int(theirs["tc"])

    # The status word ntpq printed, spelled out by ntpq (statustoa) and by the codec.
    header = cooked.splitlines()[0]
    word = int(header.split()[1].removeprefix("status="), 16)
    assert word in (before.status, after.status), (header, before, after)
    s = mode6.decode_system_status(word)
    assert header == (f"associd=0 status={word:04x} {LEAP_NAMES[s.leap]}, "
                      f"sync_{s.source_name}, {_events(s.event_count)}, {s.event_name},")


def test_association_list_matches_ntpq_as(server: Server) -> None:
    before = mode6.decode_readstat(server.control.response(Opcode.READSTAT).data)
    table = ntpq("as")
    after = mode6.decode_readstat(server.control.response(Opcode.READSTAT).data)
    rows = {}
    for line in table.splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[0].isdigit():
            # ind assid status conf reach auth condition [last_event] cnt
            rows[int(parts[1])] = (int(parts[2], 16), parts[3], parts[4], parts[6],
                                   int(parts[-1]))
    assert len(before) == 2 and sorted(rows) == sorted(a for a, _ in before), table
    for association, word in before:
        assert [a for a, _ in after if a == association], after
        # Events (mobilize, then clock_event) may land between the queries.
        ntpq_word = rows[association][0]
        assert ntpq_word in (word, dict(after)[association]), table
        status = mode6.decode_peer_status(ntpq_word)
        reach = "none" if status.broadcast else ("yes" if status.reachable else "no")
        assert rows[association] == (ntpq_word, "yes" if status.configured else "no", reach,
                                     status.selection_name, status.event_count)
        assert status.selection_name == "reject"  # nothing feeds the refclocks


def test_peer_variables_match_ntpq_rv_and_peers(server: Server) -> None:
    associations = mode6.decode_readstat(server.control.response(Opcode.READSTAT).data)
    peers = {}
    for line in ntpq("peers").splitlines():
        parts = line.split()
        remote = parts[0].lstrip("*+-#xo.") if parts else ""  # less the tally character
        if len(parts) == 10 and remote.startswith("SHM("):
            peers[remote] = parts
    assert len(peers) == 2, peers
    for association, _ in associations:
        reply = server.control.response(Opcode.READVAR, association)
        assert reply.association == association
        ours = mode6.parse_variables(reply.data)
        raw = ntpq("raw", f"rv {association}")
        cooked_header = ntpq(f"rv {association}").splitlines()[0]
        after = server.control.response(Opcode.READVAR, association)
        theirs = ntpq_variables(raw.split("Output set to raw", 1)[1])
        assert theirs.pop("associd") == str(association)
        # Events (mobilize, then clock_event) may land between the queries.
        assert int(theirs.pop("status"), 16) in (reply.status, after.status)
        # Compared up to the clock filter: an unfed refclock's filt* values can hold stray
        # bytes (a quote) that this test's plain regex reading of ntpq cannot get past.
        def head(names: list[str]) -> list[str]:
            return names[:next((i for i, n in enumerate(names) if n.startswith("filt")),
                               len(names))]

        assert head(list(ours)) == head(list(theirs))
        # Not unreach, flash, xmt or the filters: they move with every poll.
        for name in ("srcadr", "srcport", "dstadr", "refid", "stratum", "hpoll", "ppoll",
                     "reach", "precision", "srchost", "hmode"):
            assert ours[name] == theirs[name], name

        # The status word ntpq printed, spelled out by ntpq (statustoa) and by the codec.
        word = int(cooked_header.split()[1].removeprefix("status="), 16)
        status = mode6.decode_peer_status(word)
        flags = [n for n, on in (("conf", status.configured), ("authenb", status.auth_enabled),
                                 ("auth", status.authentic), ("reach", status.reachable),
                                 ("bcast", status.broadcast)) if on]
        assert cooked_header == (f"associd={association} status={word:04x} "
                                 + ", ".join([*flags, f"sel_{status.selection_name}",
                                              _events(status.event_count), status.event_name])
                                 + ",")

        # ntpq -pn: remote st t when poll reach delay offset jitter (ms, reach in octal)
        row = peers[ours["srchost"]]
        assert row[1] == f".{ours['refid']}."
        assert int(row[2]) == mode6.to_int(ours["stratum"])
        poll = min(mode6.log2_seconds(ours["hpoll"]), mode6.log2_seconds(ours["ppoll"]))
        assert int(row[5]) == poll
        reach = mode6.reach_register(ours["reach"])
        assert int(row[6], 8) == reach == 0
        assert mode6.reach_ratio(reach) == 0.0
        for column, name in ((7, "delay"), (8, "offset"), (9, "jitter")):
            assert mode6.ms_to_seconds(ours[name]) * 1000 == pytest.approx(
                float(row[column]), abs=1e-4), name


# ntpd's default system variables plus what ntpq's sysstats and iostats ask for: more
# answer than one 468-octet packet holds.
MANY_VARIABLES = (
    "leap", "stratum", "precision", "rootdelay", "rootdisp", "refid", "reftime", "tc", "peer",
    "offset", "frequency", "sys_jitter", "clk_jitter", "clock", "processor", "system", "version",
    "clk_wander", "mintc", "ss_uptime", "ss_numctlreq", "ss_reset", "ss_received", "ss_thisver",
    "ss_oldver", "ss_badformat", "ss_badauth", "ss_declined", "ss_restricted", "ss_limited",
    "ss_kodsent", "ss_processed", "iostats_reset", "total_rbuf", "free_rbuf", "used_rbuf",
    "rbuf_lowater", "io_dropped", "io_ignored", "io_received", "io_sent", "io_sendfailed",
    "io_wakeups", "io_goodwakeups",
)


def test_a_multi_fragment_response(server: Server) -> None:
    assert len(mode6.variable_list(MANY_VARIABLES)) <= mode6.MAX_DATA_LEN
    reply = server.control.response(Opcode.READVAR, 0, MANY_VARIABLES)
    fragments = sorted(server.control.fragments, key=lambda f: f.offset)
    assert reply.fragments == len(fragments) >= 2
    assert [f.more for f in fragments] == [True] * (len(fragments) - 1) + [False]
    assert [f.offset for f in fragments] == [i * mode6.MAX_DATA_LEN for i in range(len(fragments))]
    ours = mode6.parse_variables(reply.data)
    assert sorted(ours) == sorted(MANY_VARIABLES)
    # ntpq reassembles the same response: the same names, in the same (server's) order.
    raw = ntpq("raw", "rv 0 " + ",".join(MANY_VARIABLES))
    theirs = ntpq_variables(raw.split("Output set to raw", 1)[1])
    theirs.pop("associd", None)  # ntpq prints no header line for a named list
    theirs.pop("status", None)
    assert list(ours) == list(theirs)
    # Values that cannot change between the two reads (stratum can: ntpd enters orphan
    # mode on its own schedule).
    for name in ("version", "processor", "system"):
        assert ours[name] == theirs[name], name


def test_error_replies_from_the_daemon(server: Server) -> None:
    bad_assoc = server.control.query(Opcode.READVAR, 4242)
    assert isinstance(bad_assoc, ErrorReply) and bad_assoc.name == "badassoc"
    assert bad_assoc.association == 4242
    unknown = server.control.query(Opcode.READVAR, 0, ["no_such_variable"])
    assert isinstance(unknown, ErrorReply) and unknown.name == "unknownvar"
    # The codec refuses to build an over-long request; ntpd refuses one built by hand.
    with pytest.raises(ValueError):
        mode6.encode_readvar(1, 0, ["version"] * 62)
    control = server.control
    control.sequence += 1
    data = b",".join([b"version"] * 61)  # 487 octets
    header = bytes([0x16, Opcode.READVAR]) + control.sequence.to_bytes(2, "big") + bytes(6)
    control.send(header + len(data).to_bytes(2, "big") + data + bytes(-len(data) % 4))
    too_long = control.receive(Opcode.READVAR, 0, QUERY_TIMEOUT)
    assert isinstance(too_long, ErrorReply) and too_long.name == "badfmt"


def test_ntpd_never_gained_clock_control(server: Server) -> None:
    assert server.proc.poll() is None, server.log()
    assert _cap_sys_time_cleared(server.proc.pid)
    assert "-g" not in server.log().split("Command line:", 1)[-1].splitlines()[0].split()
