"""The ntpd prober against ntpsec's real ntpd on 127.0.0.1:123, checked against ntpq.

ntpd and ntpq come from the Debian packages unpacked into the test cache, exactly as in
test_ntpsec_kod.py and test_mode6_wire.py (whose helpers this imports), and ntpd runs
the same way: ``setpriv --bounding-set=-sys_time -- ntpd -n ...`` (no CAP_SYS_TIME,
checked in /proc before any packet is sent), never with -g/-G/-q/-u, with ``disable ntp``
and ``disable kernel``. It is stopped by its PID.

Four SHM refclocks (units 4 to 7) give deterministic selection states: the test writes a
sample into each segment twice a second with offsets 0, +0.1 ms, +0.5 ms and +1 s. With
``tos minclock 2`` ntpd keeps two survivors (units 4 and 5: one sys.peer, one
candidate), prunes unit 6 as an outlier and rejects unit 7 as a falseticker. Feeding
starts only once ntpd is in orphan mode (leap 0): with ``disable ntp`` it never clears
the leap indicator again, so the order keeps leap at 0 with a sys.peer. The segments
are created by ntpd; the test refuses to start if their keys are in use and removes them.

``restrict ::1 noquery`` makes the same ntpd silent to mode 6 over IPv6 loopback, for
the noquery case. Each comparison asks the prober first and ntpq right after, in the
same test; values that move between the two (dispersion, counters) are compared with
the slack their movement allows.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ntp_probe.config.schema import Module, NTPDSettings
from ntp_probe.engine.result import Measurement
from ntp_probe.probers import ntpd as prober
from ntp_probe.proto import mode6
from ntp_probe.proto.mode6 import Opcode, Response
from tests.conftest import label_sets, probe, stop_process, value
from tests.integration.test_exporter import (
    parse_exposition,
    promtool_check,
    start_exporter,
)
from tests.integration.test_mode6_wire import (
    SHM_KEY_BASE,
    Control,
    ntpq,
    ntpq_variables,
    safe_ntpd,
)
from tests.integration.test_ntpsec_kod import (
    LOOPBACK,
    READY_DEADLINE,
    Ntpd,
    _cap_sys_time_cleared,
    loopback_conf,
)

pytestmark = pytest.mark.integration

# unit -> offset of the refclock's time from the local clock, seconds
SHM_OFFSETS = {4: 0.0, 5: 0.0001, 6: 0.0005, 7: 1.0}
SURVIVORS = (4, 5)  # one sys.peer, one candidate: which is which is ntpd's tie-break
FEED_INTERVAL = 0.5  # ntpd polls each refclock every second (minpoll 0)
# Orphan mode in about 1 s; then eight polls fill every reach register.
STATE_DEADLINE = 40.0
STATE_POLL = 0.2
LEAPFILE = Path("/usr/share/zoneinfo/leap-seconds.list")


class ShmTime(ctypes.Structure):
    """ntpd's ``struct shmTime`` (refclock_shm.c), 96 octets on LP64."""

    _fields_ = [
        ("mode", ctypes.c_int), ("count", ctypes.c_int),
        ("clock_sec", ctypes.c_long), ("clock_usec", ctypes.c_int),
        ("receive_sec", ctypes.c_long), ("receive_usec", ctypes.c_int),
        ("leap", ctypes.c_int), ("precision", ctypes.c_int), ("nsamples", ctypes.c_int),
        ("valid", ctypes.c_int), ("clock_nsec", ctypes.c_uint),
        ("receive_nsec", ctypes.c_uint), ("dummy", ctypes.c_int * 8),
    ]


class Feeder:
    """Writes one sample per segment every FEED_INTERVAL, in a thread, until stopped."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.shmget.argtypes = [ctypes.c_int, ctypes.c_size_t, ctypes.c_int]
        libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        libc.shmat.restype = ctypes.c_void_p
        libc.shmdt.argtypes = [ctypes.c_void_p]
        self._libc = libc
        self._addresses: list[int] = []
        self.segments: dict[int, ShmTime] = {}
        for unit in SHM_OFFSETS:
            ident = libc.shmget(SHM_KEY_BASE + unit, ctypes.sizeof(ShmTime), 0)
            address = libc.shmat(ident, None, 0) if ident >= 0 else None
            if address is None or address == ctypes.c_void_p(-1).value:
                self.close()
                raise OSError(ctypes.get_errno(), f"attaching SHM unit {unit}")
            self._addresses.append(address)
            self.segments[unit] = ShmTime.from_address(address)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shm-feeder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            for unit, offset in SHM_OFFSETS.items():
                now = time.time_ns()
                self._write(self.segments[unit], now + round(offset * 1e9), now)
            if self._stop.wait(FEED_INTERVAL):  # the pace of a refclock, not a wait for ntpd
                return

    @staticmethod
    def _write(s: ShmTime, clock_ns: int, receive_ns: int) -> None:
        # Mode 1: ntpd takes the sample only if count is unchanged across its read.
        s.mode = 1
        s.count += 1
        s.valid = 0
        s.clock_sec, s.clock_nsec = divmod(clock_ns, 1_000_000_000)
        s.clock_usec = s.clock_nsec // 1000
        s.receive_sec, s.receive_nsec = divmod(receive_ns, 1_000_000_000)
        s.receive_usec = s.receive_nsec // 1000
        s.leap = 0
        s.precision = -20
        s.count += 1
        s.valid = 1

    def close(self) -> None:
        """Stop the thread and detach every segment."""
        if hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join(timeout=5)
        self.segments.clear()
        for address in self._addresses:
            self._libc.shmdt(address)
        self._addresses.clear()


def ntp_conf(d: Path) -> str:
    """Loopback only, never disciplining the clock, four SHM refclocks polled every second."""
    return loopback_conf(
        d,
        *([f"leapfile {LEAPFILE}"] if LEAPFILE.exists() else []),
        "restrict default nomodify noquery",
        f"restrict {LOOPBACK} nomodify",
        "restrict ::1 nomodify noquery",  # mode 6 over IPv6 loopback goes unanswered
        "disable ntp",
        "disable kernel",
        "tos orphan 8 orphanwait 0 minclock 2 minsane 1",
        *(f"refclock shm unit {u} refid SHM{u} minpoll 0 maxpoll 0" for u in SHM_OFFSETS),
    )


@dataclass
class State:
    """What ntpd says, through the codec over a plain socket (not the prober)."""

    leap: int
    by_unit: dict[int, tuple[int, str, int]]  # unit -> (association, selection, reach)

    def settled(self) -> bool:
        """Leap 0, every reach register full, the expected selection per unit."""
        if self.leap != 0 or len(self.by_unit) != len(SHM_OFFSETS):
            return False
        if any(reach != 0xFF for _, _, reach in self.by_unit.values()):
            return False
        survivors = sorted(self.by_unit[u][1] for u in SURVIVORS)
        return (survivors == ["candidate", "sys.peer"] and self.by_unit[6][1] == "outlier"
                and self.by_unit[7][1] == "falsetick")


def read_state(control: Control) -> State | None:
    reply = control.query(Opcode.READVAR, 0, ["leap"], timeout=0.5)
    if not isinstance(reply, Response):
        return None
    leap = mode6.to_int(mode6.parse_variables(reply.data)["leap"])
    listing = control.query(Opcode.READSTAT, timeout=0.5)
    if not isinstance(listing, Response):
        return None
    by_unit = {}
    for association, _ in mode6.decode_readstat(listing.data):
        peer = control.query(Opcode.READVAR, association, ["srcadr", "reach"], timeout=0.5)
        if not isinstance(peer, Response):
            return None
        variables = mode6.parse_variables(peer.data)
        unit = int(variables["srcadr"].rsplit(".", 1)[1])
        by_unit[unit] = (association, mode6.decode_peer_status(peer.status).selection_name,
                         mode6.reach_register(variables["reach"]))
    return State(leap, by_unit)


def poll_state(control: Control, proc: subprocess.Popen[bytes], ready: str,
               deadline: float) -> State | None:
    """Poll until ``ready`` ("orphan" or "settled") holds; None at the deadline."""
    last = None
    while time.monotonic() < deadline and proc.poll() is None:
        started = time.monotonic()
        with contextlib.suppress(TimeoutError, ConnectionRefusedError):  # not up yet
            last = read_state(control) or last
        if last is not None and (last.settled() if ready == "settled" else last.leap == 0):
            return last
        time.sleep(max(0.0, started + STATE_POLL - time.monotonic()))  # poll interval
    return None


@dataclass
class Server(Ntpd):
    """The running ntpd and what it said when it was ready."""

    state: State


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    d = tmp_path_factory.mktemp("ntpsec-prober")
    keys = [SHM_KEY_BASE + u for u in SHM_OFFSETS]
    feeder: Feeder | None = None
    with safe_ntpd(d, ntp_conf(d), keys) as (proc, sock):
        try:
            control = Control(sock)
            if poll_state(control, proc, "orphan", time.monotonic() + READY_DEADLINE) is None:
                pytest.fail(f"ntpd not in orphan mode (leap 0):\n"
                            f"{(d / 'ntpd.log').read_text()}", pytrace=False)
            feeder = Feeder()
            state = poll_state(control, proc, "settled", time.monotonic() + STATE_DEADLINE)
            if state is None:
                pytest.fail(f"the SHM refclocks did not reach sys.peer/candidate/outlier/"
                            f"falsetick with full reach within {STATE_DEADLINE}s: "
                            f"{read_state(control)}", pytrace=False)
            yield Server(proc, d, state)
        finally:
            if feeder is not None:
                feeder.close()


def module(min_candidates: int = 1, request_timeout: float = 0.5) -> Module:
    return Module(name="ntpd", prober="ntpd", timeout=5.0,
                  ntpd=NTPDSettings(min_candidates=min_candidates,
                                    request_timeout=request_timeout,
                                    preferred_ip_protocol="ip4"))


async def probe_ntpd(target: str = LOOPBACK, *, min_candidates: int = 1,
                     request_timeout: float = 0.5) -> tuple[Measurement, str]:
    """One probe through the runner; the measurement and its log text."""
    m, log = await probe(target, module(min_candidates, request_timeout))
    return m, log.text()


def raw_rv(*command: str) -> dict[str, str]:
    """ntpq's raw ``rv`` listing as name -> value."""
    return ntpq_variables(ntpq("raw", *command).split("Output set to raw", 1)[1])


# --- the comparisons ------------------------------------------------------------------------


async def test_system_variables_match_ntpq_rv(server: Server) -> None:
    m, log = await probe_ntpd()
    theirs = raw_rv("rv")
    assert m.failure is None, log
    assert label_sets(m, "probe_ntpd_info") == [{"version": theirs["version"],
                                                 "refid": theirs["refid"]}]
    assert theirs["refid"] in ("SHM4", "SHM5")
    assert value(m, "probe_ntpd_leap_indicator") == int(theirs["leap"]) == 0
    assert value(m, "probe_ntpd_stratum") == int(theirs["stratum"]) == 1
    assert value(m, "probe_ntpd_poll_seconds") == 2 ** int(theirs["tc"])
    # ntpq's raw values are ntpd's milliseconds and ppm.
    for name, ours in (("offset", "probe_ntpd_offset_seconds"),
                       ("sys_jitter", "probe_ntpd_sys_jitter_seconds"),
                       ("clk_jitter", "probe_ntpd_clock_jitter_seconds"),
                       ("rootdelay", "probe_ntpd_root_delay_seconds")):
        assert value(m, ours) == pytest.approx(float(theirs[name]) / 1000, abs=2e-6), name
    for name, ours in (("frequency", "probe_ntpd_frequency_ppm"),
                       ("clk_wander", "probe_ntpd_clock_wander_ppm")):
        assert value(m, ours) == pytest.approx(float(theirs[name]), abs=1e-3), name
    # Root dispersion grows between polls: the two reads are well under a second apart.
    assert value(m, "probe_ntpd_root_dispersion_seconds") == pytest.approx(
        float(theirs["rootdisp"]) / 1000, abs=0.05)
    reftime = mode6.ntp_timestamp_to_unix(theirs["reftime"], time.time())
    assert reftime is not None
    assert value(m, "probe_ntpd_reference_timestamp_seconds") == pytest.approx(reftime, abs=3)
    if "expire" in theirs:
        assert value(m, "probe_ntpd_leapfile_expiry_timestamp_seconds") == (
            mode6.date_to_unix(theirs["expire"]))
    if "tai" in theirs:
        assert value(m, "probe_ntpd_tai_offset_seconds") == int(theirs["tai"])
    report = prober.report_of(m)
    assert report is not None and report.check_offset == value(m, "probe_ntpd_offset_seconds")


def _ntpq_as() -> dict[int, str]:
    """ntpq -c as: association -> condition (the selection name)."""
    rows = {}
    for line in ntpq("as").splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[0].isdigit():
            rows[int(parts[1])] = parts[6]
    return rows


def _ntpq_peers() -> tuple[dict[str, list[str]], str]:
    """ntpq -pn: remote (less its tally character) -> the row's columns; and ntpq's text.

    ntpq names a refclock SHM(N) when it has its srchost, and now and then shows its
    address 127.127.28.N instead: both are taken as SHM(N)."""
    rows = {}
    text = ntpq("peers")
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 10:
            continue
        remote = parts[0].lstrip("*+-#xo.")
        if remote.startswith("127.127.28."):
            remote = f"SHM({remote.rsplit('.', 1)[1]})"
        if remote.startswith("SHM("):
            rows[remote] = [parts[0][0], *parts[1:]]
    return rows, text


async def test_peers_match_ntpq_as_and_peers(server: Server) -> None:
    m, log = await probe_ntpd()
    conditions = _ntpq_as()
    table, text = _ntpq_peers()
    assert m.failure is None, log
    info = {int(d["assoc"]): d for d in label_sets(m, "probe_ntpd_peer_info")}
    assert sorted(info) == sorted(conditions) == sorted(a for a, _, _ in
                                                        server.state.by_unit.values())
    for unit, (association, _, _) in server.state.by_unit.items():
        ours = info[association]
        assert ours["selection"] == conditions[association], (unit, log)
        assert ours["peer"] == f"127.127.28.{unit}"
        assert ours["refid"] == f"SHM{unit}"
        # ntpq -pn: tally st t when poll reach delay offset jitter (ms, reach in octal)
        row = table.get(f"SHM({unit})")
        assert row is not None, (unit, text)
        tally = {"sys.peer": "*", "candidate": "+", "outlier": "-", "falsetick": "x"}
        assert row[0] == tally[ours["selection"]]
        assert row[1] == f".{ours['refid']}."
        labels = {"assoc": str(association), "peer": ours["peer"]}
        assert value(m, "probe_ntpd_peer_stratum", **labels) == int(row[2]) == 0
        assert value(m, "probe_ntpd_peer_poll_seconds", **labels) == int(row[5]) == 1
        assert value(m, "probe_ntpd_peer_reach_ratio", **labels) == (
            int(row[6], 8).bit_count() / 8) == 1.0
        assert value(m, "probe_ntpd_peer_reach_last", **labels) == 1
        for column, name in ((7, "delay"), (8, "offset"), (9, "jitter")):
            ours_ms = value(m, f"probe_ntpd_peer_{name}_seconds", **labels)
            assert ours_ms is not None
            assert ours_ms * 1000 == pytest.approx(float(row[column]), abs=2e-3), (unit, name)
        # What the feeder wrote, in seconds.
        offset = value(m, "probe_ntpd_peer_offset_seconds", **labels)
        assert offset == pytest.approx(SHM_OFFSETS[unit], abs=5e-6)
        # ntpq's rv ASSOC: the raw dispersion, in ms.
        raw = raw_rv(f"rv {association} dispersion,srcadr")
        assert raw["srcadr"] == ours["peer"]
        assert value(m, "probe_ntpd_peer_dispersion_seconds", **labels) == pytest.approx(
            float(raw["dispersion"]) / 1000, abs=0.05)

    counts = {labels[0]: v for labels, v in m.values(prober.PEERS)}
    assert counts == {"reject": 0, "falsetick": 1, "excess": 0, "outlier": 1,
                      "candidate": 1, "backup": 0, "sys.peer": 1, "pps.peer": 0}


async def test_counters_match_ntpq_sysstats_and_iostats(server: Server) -> None:
    m, log = await probe_ntpd()
    sysstats = raw_rv("sysstats")
    iostats = raw_rv("iostats")
    assert m.failure is None, log
    assert value(m, "probe_ntpd_uptime_seconds") == pytest.approx(
        int(sysstats["ss_uptime"]), abs=2)
    # ntpq asked after us: its totals are ours plus what arrived since (ntpq itself).
    for name, ours in (("ss_numctlreq", "probe_ntpd_control_requests_total"),
                       ("ss_received_r", "probe_ntpd_packets_received_total"),
                       ("ss_processed_r", "probe_ntpd_packets_processed_total"),
                       ("io_received", "probe_ntpd_io_packets_received_total"),
                       ("io_sent", "probe_ntpd_packets_sent_total")):
        stats = sysstats if name.startswith("ss_") else iostats
        ours_value = value(m, ours)
        assert ours_value is not None, name
        assert 0 <= int(stats[name]) - ours_value <= 40, (name, stats[name], ours_value)
    for name, ours in (("ss_limited_r", "probe_ntpd_packets_rate_limited_total"),
                       ("ss_kodsent_r", "probe_ntpd_kod_sent_total"),
                       ("io_dropped", "probe_ntpd_packets_dropped_total"),
                       ("total_rbuf", "probe_ntpd_receive_buffers")):
        stats = sysstats if name.startswith("ss_") else iostats
        assert value(m, ours) == int(stats[name]), name
    assert m.packets_sent == 2 + len(SHM_OFFSETS) + 3  # READSTAT, system, peers, stats


async def test_min_candidates_above_the_candidates_is_too_few_sources(server: Server) -> None:
    m, log = await probe_ntpd(min_candidates=2)  # the sys.peer and the candidate
    assert m.failure is None, log
    m, log = await probe_ntpd(min_candidates=3)
    assert m.failure == "too_few_sources", log
    assert "2 sys.peer or candidate, fewer than min_candidates 3" in log


async def test_noquery_is_mode6_timeout(server: Server) -> None:
    m, log = await probe_ntpd("[::1]:123", request_timeout=0.3)
    assert m.failure == "mode6_timeout", log
    assert m.packets_sent == 2  # READSTAT and its retry, then nothing more
    assert "noquery" in log
    # The same ntpd answers over 127.0.0.1: silence was the restrict rule.
    answered, log = await probe_ntpd()
    assert answered.failure is None, log


def test_through_the_exporter_with_promtool(server: Server, tmp_path: Path) -> None:
    config = tmp_path / "modules.yaml"
    config.write_text("modules:\n"
                      "  ntpd:\n"
                      "    prober: ntpd\n"
                      "    timeout: 5s\n"
                      "    ntpd:\n"
                      "      min_candidates: 2\n"
                      "      request_timeout: 500ms\n"
                      "      preferred_ip_protocol: ip4\n")
    exporter = start_exporter(tmp_path, (f"--config.file={config}",))
    try:
        status, content_type, body = exporter.get(
            f"/probe?target={LOOPBACK}&module=ntpd")
        assert status == 200, body
        assert content_type.startswith("text/plain"), content_type
        checked = promtool_check(body)
        assert checked.returncode == 0, checked.stdout + checked.stderr + body
        samples = parse_exposition(body)
        assert samples["probe_success"][0][1] == 1, body
        peers = {labels["selection"]: v for labels, v in samples["probe_ntpd_peers"]}
        assert peers["sys.peer"] == 1 and peers["falsetick"] == 1 and peers["reject"] == 0
        assert len(samples["probe_ntpd_peer_info"]) == len(SHM_OFFSETS)
        assert "# TYPE probe_ntpd_packets_received_total counter" in body
        assert "# TYPE probe_ntpd_uptime_seconds gauge" in body
        assert re.search(r"^probe_ntpd_offset_seconds ", body, re.M), body
        status, _, debug = exporter.get(f"/probe?target={LOOPBACK}&module=ntpd&debug=true")
        assert status == 200
        assert "-> READSTAT assoc 0" in debug and "<- READSTAT" in debug, debug
    finally:
        stop_process(exporter.proc)


def test_ntpd_never_gained_clock_control(server: Server) -> None:
    assert server.proc.poll() is None, server.log()
    assert _cap_sys_time_cleared(server.proc.pid)
    assert "-g" not in server.log().split("Command line:", 1)[-1].splitlines()[0].split()
