"""The chrony prober against real chronyd 4.x on loopback, compared with ``chronyc -c``.

The pair from test_cmdmon_wire.py: a server chronyd (``local stratum 8``) and a client chronyd
that uses it as its only source, both ``chronyd -x``. The prober asks the client over its unix
socket and over its UDP cmdport; ``chronyc -c`` runs against the same daemon in the same
test, between two probes: where the two probes agree, chronyc must print exactly what the
metrics say (same value, formatted as chronyc formats it); values chrony computes at report
time (System time, root dispersion, last sample age) must lie between the two probes'.
"""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ntp_probe.config.load import parse_config
from ntp_probe.config.schema import Module
from ntp_probe.engine.result import Measurement
from ntp_probe.exposition.render import render
from tests.conftest import Chronyd, label_sets, probe, require_binary, stop_process, value
from tests.integration import test_cmdmon_wire as wire
from tests.integration.test_cmdmon_wire import Client
from tests.integration.test_exporter import (
    parse_exposition,
    promtool_check,
    start_exporter,
)

pytestmark = pytest.mark.integration

# The module-scoped chronyd pair (server + client synchronised to it).
pair = wire.pair

COMPARE_DEADLINE = 10.0
MODE = {"server": "^", "peer": "=", "refclock": "#"}
STATE = {"sync": "*", "unusable": "?", "falseticker": "x", "jittery": "~", "candidate": "+",
         "outlier": "-"}
LEAP = {0: "Normal", 1: "Insert second", 2: "Delete second", 3: "Not synchronised"}
# chronyc -c tracking columns that chrony computes at report time.
TRACKING_SYSTEM_TIME, TRACKING_ROOT_DISPERSION = 4, 11
TRACKING_REF_TIME = 3
SOURCES_LAST_RX = 6


def chrony_module(client: Client | None = None, *, udp: bool = False, socket: str | None = None,
                  **keys: object) -> Module:
    """A chrony module for ``client``'s unix socket (or UDP cmdport), or for ``socket``."""
    settings = dict(keys)
    if udp:
        assert client is not None
        settings.setdefault("port", client.cmdport)
    else:
        if socket is None:
            assert client is not None
            socket = str(client.socket_path)
        settings["socket"] = f'"{socket}"'
    block = ", ".join(f"{k}: {v}" for k, v in settings.items())
    text = f"modules:\n  c:\n    prober: chrony\n    timeout: 3s\n    chrony: {{{block}}}\n"
    return parse_config(text, "test").modules["c"]


def chronyc(path: Path, command: str) -> list[str]:
    """``chronyc -c command`` against the unix socket at ``path``: its output columns."""
    done = subprocess.run([require_binary("chronyc"), "-c", "-h", str(path), command],
                          capture_output=True, text=True, timeout=10, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout.strip().split(",")


def entries(directory: Path) -> list[str]:
    """What is left in ``directory``."""
    return sorted(p.name for p in directory.iterdir())


def csv_rows(lines: list[str]) -> list[list[str]]:
    return [line.split(",") for line in lines]


def statuses(m: Measurement) -> dict[str, str]:
    return {s["command"]: s["status"] for s in label_sets(m, "probe_chrony_command_status_info")}


# --- the metrics, formatted as chronyc -c prints them (client.c print_report) -----------------


def tracking_rows(m: Measurement) -> list[list[str]]:
    [info] = label_sets(m, "probe_chrony_tracking_info")

    def g(name: str) -> float:
        v = value(m, f"probe_chrony_tracking_{name}")
        assert v is not None, name
        return v

    return [[
        info["refid"], info["address"], f"{g('stratum'):.0f}",
        f"{g('reference_timestamp_seconds'):.9f}", f"{g('system_time_seconds'):.9f}",
        f"{g('last_offset_seconds'):.9f}", f"{g('rms_offset_seconds'):.9f}",
        f"{g('frequency_ppm'):.3f}", f"{g('residual_frequency_ppm'):.3f}",
        f"{g('skew_ppm'):.3f}", f"{g('root_delay_seconds'):.9f}",
        f"{g('root_dispersion_seconds'):.9f}", f"{g('update_interval_seconds'):.1f}",
        LEAP[int(g("leap_status"))],
    ]]


def source_rows(m: Measurement) -> list[list[str]]:
    rows = []
    for info in label_sets(m, "probe_chrony_source_info"):
        src = {"source": info["source"]}

        def g(name: str, src: dict[str, str] = src) -> float:
            v = value(m, f"probe_chrony_source_{name}", **src)
            assert v is not None, name
            return v

        # chronyc prints the reachability register in octal; the metric is its popcount / 8.
        reach_bits = round(g("reach_ratio") * 8)
        rows.append([
            MODE[info["mode"]], STATE[info["state"]], info["source"], f"{g('stratum'):.0f}",
            f"{round(math.log2(g('poll_seconds')))}", str(reach_bits),
            f"{g('last_rx_age_seconds'):.0f}", f"{g('last_sample_offset_seconds'):.9f}",
            f"{g('last_sample_error_seconds'):.9f}",
        ])
    return rows


def chronyc_sources(lines: list[str]) -> list[list[str]]:
    """chronyc -c sources, reach as its popcount, the bracketed measured offset left out."""
    rows = []
    for line in lines:
        c = line.split(",")
        rows.append([*c[:5], str(int(c[5], 8).bit_count()), c[6], c[7], c[9]])
    return rows


def sourcestats_rows(m: Measurement) -> list[list[str]]:
    rows = []
    for info in label_sets(m, "probe_chrony_source_info"):
        src = {"source": info["source"]}

        def g(name: str, src: dict[str, str] = src) -> float:
            v = value(m, f"probe_chrony_sourcestats_{name}", **src)
            assert v is not None, name
            return v

        rows.append([
            info["source"], f"{g('samples'):.0f}", f"{g('runs'):.0f}",
            f"{g('span_seconds'):.0f}", f"{g('frequency_ppm'):.3f}", f"{g('skew_ppm'):.3f}",
            f"{g('offset_seconds'):.9f}", f"{g('stddev_seconds'):.9f}",
        ])
    return rows


async def assert_same_as_chronyc(
    client: Client, module: Module, target: str, command: str,
    rows: Callable[[Measurement], list[list[str]]],
    chronyc_rows: Callable[[list[str]], list[list[str]]] = csv_rows,
    varying: frozenset[int] = frozenset(), approximate: frozenset[int] = frozenset(),
) -> Measurement:
    """Probe, run ``chronyc -c command``, probe again, until the two probes agree on the
    steady columns; then chronyc must print those exactly, ``approximate`` ones within 1 us
    (a Unix time as a float metric keeps about 0.2 us), and ``varying`` ones between the
    two probes'. Returns the first probe's measurement."""
    skip = varying | approximate

    def steady(table: list[list[str]]) -> list[list[str]]:
        return [[v for i, v in enumerate(row) if i not in skip] for row in table]

    deadline = time.monotonic() + COMPARE_DEADLINE
    attempts = 0
    while time.monotonic() < deadline:
        attempts += 1
        first, log = await probe(target, module)
        assert first.failure is None, log.text()
        printed = chronyc_rows(client.chronyc_lines(command))
        second, _ = await probe(target, module)
        before, after = rows(first), rows(second)
        if steady(before) != steady(after) or any(
                b[i] != a[i] for b, a in zip(before, after, strict=True) for i in approximate):
            continue  # chronyd updated in between: try again
        assert steady(printed) == steady(before), f"chronyc -c {command}: {printed} {before}"
        for low_row, row, high_row in zip(before, printed, after, strict=True):
            for i in approximate:
                assert abs(float(row[i]) - float(low_row[i])) < 1e-6, (i, row, low_row)
            for i in varying:
                low, mid, high = float(low_row[i]), float(row[i]), float(high_row[i])
                assert min(low, high) <= mid <= max(low, high), (i, low_row, row, high_row)
        return first
    pytest.fail(f"{command}: no two stable probes in {attempts} attempts")


async def assert_tracking_and_sources_match(client: Client, module: Module, target: str) -> None:
    await assert_same_as_chronyc(
        client, module, target, "tracking", tracking_rows,
        varying=frozenset({TRACKING_SYSTEM_TIME, TRACKING_ROOT_DISPERSION}),
        approximate=frozenset({TRACKING_REF_TIME}))
    await assert_same_as_chronyc(client, module, target, "sources", source_rows,
                                 chronyc_sources, varying=frozenset({SOURCES_LAST_RX}))
    await assert_same_as_chronyc(client, module, target, "sourcestats", sourcestats_rows)


# --- tests -------------------------------------------------------------------------------------


async def test_unix_socket_matches_chronyc(pair: tuple[Client, Path]) -> None:
    client, _ = pair
    module = chrony_module(client)
    m, log = await probe("localhost", module)
    assert m.failure is None, log.text()
    assert statuses(m) == {"tracking": "ok", "n_sources": "ok", "source_data": "ok",
                           "sourcestats": "ok", "server_stats": "ok"}
    assert label_sets(m, "probe_chrony_tracking_info") == [
        {"refid": "7F000001", "address": "127.0.0.1"}]
    assert value(m, "probe_chrony_sources", state="sync") == 1
    assert m.packets_sent == 5
    # The target only labels the probe: no address was resolved or contacted.
    assert value(m, "probe_ip_protocol") is None
    assert "localhost only labels this probe and is not contacted" in log.text()
    assert not [name for name in entries(client.dir) if name.startswith("ntp_probe.")]
    await assert_tracking_and_sources_match(client, module, "localhost")


@pytest.mark.parametrize("which", ["client", "server"])
async def test_serverstats_match_chronyc(pair: tuple[Client, Path], which: str) -> None:
    client, server_socket = pair
    path = client.socket_path if which == "client" else server_socket
    module = chrony_module(socket=str(path))
    before, log = await probe("localhost", module)
    printed = [int(v) for v in chronyc(path, "serverstats")]
    after, _ = await probe("localhost", module)
    # chronyc 4.3's columns, and the counters they are.
    columns = ["ntp_packets_received", "ntp_packets_dropped", "command_packets_received",
               "command_packets_dropped", "client_log_records_dropped",
               "nts_ke_connections_accepted", "nts_ke_connections_dropped",
               "authenticated_ntp_packets", "interleaved_ntp_packets"]
    for name, shown in zip(columns, printed, strict=False):
        metric = f"probe_chrony_serverstats_{name}_total"
        low, high = value(before, metric), value(after, metric)
        assert low is not None and high is not None, (metric, log.text())
        assert low <= shown <= high, f"{name}: {low} <= {shown} <= {high}"
    assert value(before, "probe_chrony_serverstats_ntp_timestamps_held") is not None
    # Each command counts, chronyc's included: its count lies strictly between the probes'.
    cmd = "probe_chrony_serverstats_command_packets_received_total"
    assert (value(before, cmd) or 0) < printed[2] < (value(after, cmd) or 0)
    ntp = value(before, "probe_chrony_serverstats_ntp_packets_received_total")
    assert (ntp or 0) > 0 if which == "server" else ntp == 0  # the client has "port 0"
    assert "# TYPE probe_chrony_serverstats_ntp_packets_received_total counter" in render(before)


async def test_udp_gets_open_commands_and_serverstats_unauthorised(
    pair: tuple[Client, Path],
) -> None:
    client, _ = pair
    module = chrony_module(client, udp=True)
    target = "127.0.0.1"  # the port comes from the module
    m, log = await probe(target, module)
    assert m.failure is None, log.text()
    # chrony 4.3 answers SERVER_STATS over UDP with UNAUTH (so does chronyc's 501).
    assert statuses(m) == {"tracking": "ok", "n_sources": "ok", "source_data": "ok",
                           "sourcestats": "ok", "server_stats": "unauthorized"}
    assert client.chronyc("serverstats", host="127.0.0.1").stdout.startswith("501 Not auth")
    assert not [s for s in parse_exposition(render(m)) if "serverstats" in s]
    assert value(m, "probe_ip_protocol") == 4
    assert m.packets_sent == 5
    await assert_tracking_and_sources_match(client, module, target)
    # A port in the target wins over the module's.
    m, log = await probe(f"127.0.0.1:{client.cmdport}", chrony_module(client, udp=True, port=1))
    assert m.failure is None, log.text()


async def test_more_candidates_required_than_sources(pair: tuple[Client, Path]) -> None:
    client, _ = pair
    m, log = await probe("localhost", chrony_module(client, min_candidates=2))
    assert m.failure == "too_few_sources", log.text()
    assert value(m, "probe_chrony_tracking_leap_status") == 0
    assert value(m, "probe_chrony_sources", state="sync") == 1


async def test_unsynchronised_chronyd_without_sources(
    chronyd_factory: Callable[..., Chronyd],
) -> None:
    unsync = chronyd_factory(synchronised=False)
    m, log = await probe("localhost", chrony_module(socket=str(unsync.socket_path)))
    assert m.failure == "leap_unsynchronized", log.text()
    assert value(m, "probe_chrony_tracking_leap_status") == 3
    assert {s["state"]: value(m, "probe_chrony_sources", **s)
            for s in label_sets(m, "probe_chrony_sources")} == dict.fromkeys(STATE, 0)
    shown = chronyc(unsync.socket_path, "tracking")
    assert (shown[0], shown[2], shown[-1]) == ("00000000", "0", "Not synchronised")
    assert label_sets(m, "probe_chrony_tracking_info") == [
        {"refid": shown[0], "address": shown[1]}]


async def test_an_isolated_master_serving_its_local_reference_passes(
    chronyd_factory: Callable[..., Chronyd],
) -> None:
    # `local stratum 8` and no source configured: an isolated network's master, healthy by
    # design. It failed too_few_sources, and NTPProbeDown paged after 20 minutes.
    master = chronyd_factory(synchronised=True)
    m, log = await probe("localhost", chrony_module(socket=str(master.socket_path)))
    assert m.failure is None, log.text()
    shown = chronyc(master.socket_path, "tracking")
    assert (shown[0], shown[-1]) == ("7F7F0101", "Normal")
    assert sum(value(m, "probe_chrony_sources", **s) or 0
               for s in label_sets(m, "probe_chrony_sources")) == 0
    assert "an isolated network's master" in log.text()


@pytest.mark.parametrize("missing", ["chronyd.sock", "nowhere/chronyd.sock"])
async def test_missing_socket_is_a_socket_failure(tmp_path: Path, missing: str) -> None:
    m, log = await probe("localhost", chrony_module(socket=str(tmp_path / missing)))
    assert m.failure == "chrony_socket", log.text()
    assert statuses(m) == {}
    assert entries(tmp_path) == []  # no reply socket left behind


def test_exporter_exposition_passes_promtool(pair: tuple[Client, Path], tmp_path: Path) -> None:
    client, _ = pair
    config = tmp_path / "modules.yaml"
    config.write_text(
        "modules:\n"
        f"  chrony_unix:\n    prober: chrony\n    timeout: 3s\n"
        f"    chrony: {{socket: \"{client.socket_path}\"}}\n"
        f"  chrony_udp:\n    prober: chrony\n    timeout: 3s\n"
        f"    chrony: {{port: {client.cmdport}}}\n")
    e = start_exporter(tmp_path, (f"--config.file={config}",))
    try:
        for module, target in (("chrony_unix", "localhost"), ("chrony_udp", "127.0.0.1")):
            status, _, body = e.get(f"/probe?target={target}&module={module}")
            assert status == 200, body
            samples = parse_exposition(body)
            assert samples["probe_success"] == [({}, 1)], body
            assert samples["probe_chrony_tracking_stratum"] == [({}, 9)]
            check = promtool_check(body)
            assert check.returncode == 0, check.stdout + check.stderr + body
            statuses = {s["command"]: s["status"]
                        for s, _ in samples["probe_chrony_command_status_info"]}
            expected = "ok" if module == "chrony_unix" else "unauthorized"
            assert statuses["server_stats"] == expected, body
        _, _, text = e.get("/probe?target=localhost&module=chrony_unix&debug=true")
        assert "-> TRACKING sequence" in text and "<- TRACKING: SUCCESS" in text, text
    finally:
        stop_process(e.proc)
