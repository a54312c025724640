"""The real exporter process and CLI against a real chronyd on loopback, checked with promtool.

Every process started here is stopped by its PID in a fixture teardown or ``finally``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ntp_probe.config.load import load_config
from tests.conftest import (
    LOOPBACK,
    Chronyd,
    free_tcp_port,
    free_udp_port,
    require_binary,
    stop_process,
)
from tests.contract import VALID_SAMPLE_METRICS

pytestmark = pytest.mark.integration

# Emitted only when at least one reply passed the packet checks.
MEASUREMENTS = tuple(
    name for name in VALID_SAMPLE_METRICS[5:]
    if name not in ("probe_ntp_samples_sent", "probe_ntp_samples_received",
                    "probe_ntp_packet_loss_ratio")
)
START_DEADLINE = 15.0
HTTP_TIMEOUT = 10.0

Samples = dict[str, list[tuple[dict[str, str], float]]]


# --- helpers ---------------------------------------------------------------------------


def exporter_command() -> list[str]:
    """The installed ``ntp-probe`` console script next to this interpreter (the
    editable install), else ``python -m ntp_probe``."""
    script = Path(sys.executable).parent / "ntp-probe"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "ntp_probe"]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment without any NTP_PROBE_* flag variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NTP_PROBE_")}
    env.update(extra or {})
    return env


def run_cli(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*exporter_command(), *args], capture_output=True, text=True, timeout=timeout,
        env=child_env(), stdin=subprocess.DEVNULL,
    )


def http_get(url: str, headers: Mapping[str, str] | None = None) -> tuple[int, str, str]:
    """GET -> (status, content type, body); HTTP errors are returned, not raised."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def parse_exposition(body: str) -> Samples:
    """Text exposition -> {sample name: [(labels, value)]} via prometheus_client's parser."""
    out: Samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def one(samples: Samples, name: str) -> float:
    series = samples.get(name, [])
    assert len(series) == 1, f"{name}: expected one series, got {series}"
    return series[0][1]


def promtool_check(body: str) -> subprocess.CompletedProcess[str]:
    promtool = require_binary("promtool")
    return subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, text=True, timeout=30
    )


def fnv1a_32(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:
        h = ((h ^ b) * 0x01000193) % 2**32
    return h


@dataclass
class Exporter:
    """A running ``ntp-probe`` serve process."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def get(self, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, str, str]:
        return http_get(self.base + path, headers)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _wait_healthy(proc: subprocess.Popen[bytes], port: int, deadline: float) -> bool:
    url = f"http://{LOOPBACK}:{port}/-/healthy"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=0.5) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.02)  # poll interval, bounded by the deadline
    return False


def start_exporter(
    tmp: Path,
    args: tuple[str, ...] = (),
    *,
    via_env: bool = False,
    env: Mapping[str, str] | None = None,
    command: Sequence[str] | None = None,
) -> Exporter:
    """Start ``ntp-probe`` listening on 127.0.0.1 and a free port; wait for /-/healthy.

    ``via_env`` passes the listen address as NTP_PROBE_WEB_LISTEN_ADDRESS instead of the
    flag; ``env`` adds variables; ``command`` runs instead of ``ntp-probe``. Retries with
    another port if the chosen one was taken.
    """
    problems = []
    for attempt in range(3):
        port = free_tcp_port()
        address = f"{LOOPBACK}:{port}"
        argv = [*(command or exporter_command()), *args]
        extra = dict(env or {})
        if via_env:
            extra["NTP_PROBE_WEB_LISTEN_ADDRESS"] = address
        if not via_env:
            argv.append(f"--web.listen-address={address}")
        log_path = tmp / f"exporter-{port}-{attempt}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=child_env(extra),
            )
        exporter = Exporter(proc, port, log_path)
        if _wait_healthy(proc, port, time.monotonic() + START_DEADLINE):
            return exporter
        stop_process(proc)
        problems.append(f"{argv}: rc={proc.returncode}\n{exporter.log()}")
        if "cannot listen" not in exporter.log():
            break
    pytest.fail("exporter did not become healthy:\n" + "\n".join(problems), pytrace=False)


@pytest.fixture(scope="module")
def exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exporter]:
    e = start_exporter(tmp_path_factory.mktemp("exporter"))
    try:
        yield e
    finally:
        stop_process(e.proc)


@pytest.fixture
def bad_config(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "modules:\n  mine:\n    prober: ntp\n    timeout: 5s\n"
        "    ntp:\n      samples: 1\n      sampels: 3\n"
    )
    return path


def packaged_modules_file() -> Path:
    return Path(str(resources.files("ntp_probe").joinpath("modules.yaml")))


# --- /probe ----------------------------------------------------------------------------


def test_probe_success_has_every_metric(exporter: Exporter, chronyd: Chronyd) -> None:
    status, ctype, body = exporter.get(f"/probe?target={chronyd.target}&module=ntp_fast")
    assert status == 200, body
    assert ctype.startswith("text/plain") and "version=0.0.4" in ctype
    samples = parse_exposition(body)
    assert one(samples, "probe_success") == 1, body
    missing = [name for name in VALID_SAMPLE_METRICS if name not in samples]
    assert not missing, f"missing {missing}\n{body}"
    assert "probe_ntp_failure_info" not in samples
    assert "probe_ntp_kiss_code_info" not in samples
    assert one(samples, "probe_ntp_stratum") == 8
    assert abs(one(samples, "probe_ntp_offset_seconds")) < 0.5e-3
    assert 0 < one(samples, "probe_ntp_rtt_seconds") < 0.1
    assert one(samples, "probe_ntp_samples_sent") == one(samples, "probe_ntp_samples_received")
    assert one(samples, "probe_ntp_samples_sent") == 1
    assert one(samples, "probe_ntp_packet_loss_ratio") == 0
    assert one(samples, "probe_ip_protocol") == 4
    # blackbox_exporter hashes the address's bytes (4 for IPv4), not its text.
    assert one(samples, "probe_ip_addr_hash") == fnv1a_32(bytes([127, 0, 0, 1]))
    assert samples["probe_ntp_server_info"] == [({"refid": "127.127.1.1", "version": "4"}, 1)]
    assert 0 < one(samples, "probe_duration_seconds") < 5


def test_promtool_accepts_success_body(exporter: Exporter, chronyd: Chronyd) -> None:
    _, _, body = exporter.get(f"/probe?target={chronyd.target}&module=local")
    assert "probe_success 1" in body
    check = promtool_check(body)
    assert check.returncode == 0, check.stdout + check.stderr + body


def test_promtool_accepts_closed_port_failure_body(exporter: Exporter) -> None:
    status, _, body = exporter.get(f"/probe?target=127.0.0.1:{free_udp_port()}&module=ntp_fast")
    assert status == 200
    samples = parse_exposition(body)
    assert one(samples, "probe_success") == 0
    assert samples["probe_ntp_failure_info"] == [({"reason": "unreachable"}, 1)]
    assert not [name for name in MEASUREMENTS if name in samples], body
    assert one(samples, "probe_ntp_packet_loss_ratio") == 1
    check = promtool_check(body)
    assert check.returncode == 0, check.stdout + check.stderr + body


def test_promtool_accepts_unsynchronised_failure_body(
    exporter: Exporter, chronyd_factory: Callable[..., Chronyd]
) -> None:
    unsync = chronyd_factory(synchronised=False)
    _, _, body = exporter.get(f"/probe?target={unsync.target}&module=ntp_fast")
    samples = parse_exposition(body)
    assert one(samples, "probe_success") == 0
    assert samples["probe_ntp_failure_info"] == [({"reason": "stratum_unsynchronized"}, 1)]
    assert "probe_ntp_kiss_code_info" not in samples
    assert one(samples, "probe_ntp_stratum") == 0
    assert one(samples, "probe_ntp_leap_indicator") == 3
    check = promtool_check(body)
    assert check.returncode == 0, check.stdout + check.stderr + body


def test_metrics_endpoint_counts_probes_and_passes_promtool(
    exporter: Exporter, chronyd: Chronyd
) -> None:
    def counters() -> tuple[float, float]:
        status, ctype, body = exporter.get("/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        samples = parse_exposition(body)
        ok = [v for lab, v in samples.get("ntp_probe_probes_total", [])
              if lab == {"module": "local", "result": "success"}]
        return (ok[0] if ok else 0.0), one(samples, "ntp_probe_ntp_packets_sent_total")

    ok_before, sent_before = counters()
    status, _, body = exporter.get(f"/probe?target={chronyd.target}&module=local")
    assert status == 200 and "probe_success 1" in body
    ok_after, sent_after = counters()
    assert ok_after - ok_before == 1
    assert sent_after - sent_before == 4  # the local module's four samples

    _, _, body = exporter.get("/metrics")
    samples = parse_exposition(body)
    assert one(samples, "ntp_probe_modules_configured") == len(load_config(None).modules)
    assert one(samples, "ntp_probe_config_last_reload_successful") == 1
    assert "ntp_probe_build_info" in samples
    check = promtool_check(body)
    assert check.returncode == 0, check.stdout + check.stderr + body


def test_scrape_timeout_header_shortens_the_default_module(
    exporter: Exporter, chronyd: Chronyd
) -> None:
    """The packaged `ntp` module (3 samples, 2 s apart) under a 2 s scrape: one sample
    fits in 2 - 0.5 s, the probe succeeds and answers within the budget."""
    started = time.monotonic()
    status, _, body = exporter.get(
        f"/probe?target={chronyd.target}", {"X-Prometheus-Scrape-Timeout-Seconds": "2"}
    )
    elapsed = time.monotonic() - started
    assert status == 200
    samples = parse_exposition(body)
    assert one(samples, "probe_success") == 1, body
    assert one(samples, "probe_ntp_samples_sent") == 1
    assert elapsed < 1.5


def test_debug_output_shows_kernel_timestamps(exporter: Exporter, chronyd: Chronyd) -> None:
    status, ctype, body = exporter.get(
        f"/probe?target={chronyd.target}&module=ntp_fast&debug=true"
    )
    assert status == 200 and ctype.startswith("text/plain")
    assert "(kernel T1, kernel T4)" in body
    assert "refid=127.127.1.1" in body
    assert "probe_success 1" in body
    assert "Module configuration:" in body


# --- process and configuration -----------------------------------------------------


def test_flags_from_environment(tmp_path: Path, chronyd: Chronyd) -> None:
    """NTP_PROBE_WEB_LISTEN_ADDRESS instead of the flag; NTP_PROBE_LOG_LEVEL/FORMAT too:
    the debug log of the process shows each packet with its kernel T4."""
    e = start_exporter(
        tmp_path, via_env=True,
        env={"NTP_PROBE_LOG_LEVEL": "debug", "NTP_PROBE_LOG_FORMAT": "json"},
    )
    try:
        status, _, body = e.get(f"/probe?target={chronyd.target}&module=ntp_fast")
        assert status == 200
        assert one(parse_exposition(body), "probe_success") == 1
        deadline = time.monotonic() + 5
        while "kernel T4" not in e.log() and time.monotonic() < deadline:
            time.sleep(0.02)  # poll the log file, bounded by the deadline
        records = [json.loads(line) for line in e.log().splitlines() if line.startswith("{")]
        packets = [r for r in records if "kernel T4" in r["msg"]]
        assert len(packets) == 1, e.log()
        assert packets[0]["level"] == "debug"
        # Target and module are fields of their own, not repeated inside msg.
        assert packets[0]["target"] == chronyd.target and packets[0]["module"] == "ntp_fast"
        assert "module=" not in packets[0]["msg"]
    finally:
        stop_process(e.proc)


def test_config_file_replaces_packaged_modules(tmp_path: Path, chronyd: Chronyd) -> None:
    config = tmp_path / "modules.yaml"
    config.write_text(
        "modules:\n  v3:\n    prober: ntp\n    timeout: 2s\n"
        "    ntp:\n      version: 3\n      samples: 2\n      sample_interval: 10ms\n"
    )
    e = start_exporter(tmp_path, (f"--config.file={config}",))
    try:
        _, _, body = e.get(f"/probe?target={chronyd.target}&module=v3")
        samples = parse_exposition(body)
        assert one(samples, "probe_success") == 1, body
        assert samples["probe_ntp_server_info"] == [({"refid": "127.127.1.1", "version": "3"}, 1)]
        assert one(samples, "probe_ntp_samples_received") == 2
        status, _, body = e.get(f"/probe?target={chronyd.target}&module=ntp_fast")
        assert status == 400 and "ntp_fast" in body
    finally:
        stop_process(e.proc)


def test_sigterm_stops_cleanly(tmp_path: Path) -> None:
    e = start_exporter(tmp_path)
    try:
        e.proc.send_signal(signal.SIGTERM)
        assert e.proc.wait(timeout=10) == 0, e.log()
    finally:
        stop_process(e.proc)
    assert "shutting down" in e.log()
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect((LOOPBACK, e.port))


def test_sigterm_lets_an_in_flight_probe_finish(tmp_path: Path, chronyd: Chronyd) -> None:
    config = tmp_path / "modules.yaml"
    config.write_text(
        "modules:\n  slow:\n    prober: ntp\n    timeout: 5s\n"
        "    ntp:\n      samples: 3\n      sample_interval: 300ms\n"
    )
    e = start_exporter(tmp_path, (f"--config.file={config}",))
    responses: list[tuple[int, str, str]] = []

    def scrape() -> None:
        responses.append(e.get(f"/probe?target={chronyd.target}&module=slow"))

    worker = threading.Thread(target=scrape)
    try:
        worker.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # wait until the probe is in flight
            _, _, body = e.get("/metrics")
            if one(parse_exposition(body), "ntp_probe_probes_in_flight") == 1:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the probe never showed as in flight")
        e.proc.send_signal(signal.SIGTERM)
        assert e.proc.wait(timeout=10) == 0, e.log()
        worker.join(timeout=10)
    finally:
        stop_process(e.proc)
        worker.join(timeout=10)
    assert len(responses) == 1, e.log()
    status, _, body = responses[0]
    assert status == 200
    samples = parse_exposition(body)
    assert one(samples, "probe_success") == 1, body
    assert one(samples, "probe_ntp_samples_received") == 3


def test_sighup_reloads_config_and_keeps_serving(tmp_path: Path) -> None:
    config = tmp_path / "modules.yaml"
    config.write_text("modules:\n  first:\n    ntp:\n      samples: 1\n")
    e = start_exporter(tmp_path, (f"--config.file={config}",))
    try:
        config.write_text("modules:\n  second:\n    ntp:\n      samples: 1\n")
        e.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        status = 0
        while time.monotonic() < deadline and e.proc.poll() is None:
            try:
                # 400 while `second` is unknown; 200 (a failed probe) once it is loaded.
                status, _, _ = e.get(f"/probe?target=127.0.0.1:{free_udp_port()}&module=second")
            except (urllib.error.URLError, ConnectionError):
                status = 0
            if status == 200:
                break
            time.sleep(0.02)  # poll for the reload, bounded by the deadline
        assert e.proc.poll() is None, f"exporter died on SIGHUP: rc={e.proc.returncode}"
        assert status == 200
    finally:
        stop_process(e.proc)


def test_config_check_accepts_packaged_config() -> None:
    done = run_cli("--config.check")
    assert done.returncode == 0, done.stderr
    assert "configuration OK" in done.stdout
    done = run_cli("--config.check", f"--config.file={packaged_modules_file()}")
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("yaml_text", "key"),
    [
        ("modules:\n  mine:\n    ntp:\n      sampels: 3\n", "modules.mine.ntp.sampels"),
        ("modules:\n  mine:\n    timout: 5s\n", "modules.mine.timout"),
        ("modules:\n  mine:\n    ntp:\n      reply_timeout: 5\n", "modules.mine.ntp.reply_timeout"),
    ],
)
def test_config_check_rejects_bad_file(tmp_path: Path, yaml_text: str, key: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    done = run_cli("--config.check", f"--config.file={path}")
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert key in done.stderr
    assert "configuration OK" not in done.stdout


def test_bad_config_file_at_startup_exits(tmp_path: Path, bad_config: Path) -> None:
    port = free_tcp_port()
    done = run_cli(f"--config.file={bad_config}", f"--web.listen-address={LOOPBACK}:{port}")
    assert done.returncode != 0
    assert "modules.mine.ntp.sampels" in done.stderr
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.connect((LOOPBACK, port))


# --- ntp-probe probe -------------------------------------------------------------------


def test_cli_probe_text(chronyd: Chronyd) -> None:
    done = run_cli("probe", chronyd.target, "--module", "ntp_fast")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert f"{chronyd.target} (module ntp_fast): OK" in out
    m = re.search(r"^\s+offset\s+([+-]\d+\.\d+) s$", out, re.M)
    assert m, out
    assert abs(float(m.group(1))) < 0.5e-3
    assert re.search(r"^\s+stratum\s+8$", out, re.M), out
    assert re.search(r"^\s+refid\s+127\.127\.1\.1$", out, re.M), out
    assert re.search(r"^\s+samples\s+1 of 1 answered$", out, re.M), out
    assert "(kernel T1, kernel T4)" in out  # the per-packet log follows the summary


def test_cli_probe_json(chronyd: Chronyd) -> None:
    done = run_cli("probe", chronyd.target, "--module", "ntp_fast", "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(done.stdout)
    assert data["success"] is True
    assert data["failure_reason"] is None
    assert data["target"] == chronyd.target and data["module"] == "ntp_fast"
    metrics = {(m["name"], tuple(sorted(m["labels"].items()))): m["value"]
               for m in data["metrics"]}
    stratum = metrics[("probe_ntp_stratum", ())]
    assert stratum == 8 and isinstance(stratum, int)  # integers stay integers
    assert metrics[("probe_ntp_server_info", (("refid", "127.127.1.1"), ("version", "4")))] == 1
    assert abs(metrics[("probe_ntp_offset_seconds", ())]) < 0.5e-3
    samples = data["reports"]["ntp"]["samples"]
    assert len(samples) == 1 and samples[0]["selected"] is True


def test_cli_probe_prometheus_passes_promtool(chronyd: Chronyd) -> None:
    done = run_cli("probe", chronyd.target, "--module", "local", "--format", "prometheus")
    assert done.returncode == 0, done.stdout + done.stderr
    samples = parse_exposition(done.stdout)
    assert one(samples, "probe_success") == 1
    assert one(samples, "probe_ntp_samples_received") == 4
    check = promtool_check(done.stdout)
    assert check.returncode == 0, check.stdout + check.stderr + done.stdout


def test_cli_probe_closed_port_exits_1() -> None:
    target = f"127.0.0.1:{free_udp_port()}"
    done = run_cli("probe", target, "--module", "ntp_fast")
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"{target} (module ntp_fast): FAILED: unreachable" in done.stdout
    done = run_cli("probe", target, "--module", "ntp_fast", "--format", "json")
    assert done.returncode == 1
    data = json.loads(done.stdout)
    assert data["success"] is False and data["failure_reason"] == "unreachable"
    assert data["failure_detail"].startswith("ICMP port unreachable"), data


def test_cli_check_against_chronyd_is_ok_with_perfdata(chronyd: Chronyd) -> None:
    done = run_cli("check", chronyd.target, "--module", "ntp_fast")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    status, _, perf = lines[0].partition(" | ")
    assert status.startswith(f"NTP OK: {chronyd.target} offset "), status
    values = dict(item.split("=", 1) for item in perf.split())
    assert values["offset"].endswith("s;0.010000;0.050000")
    assert abs(float(values["offset"].split("s")[0])) < 0.001
    assert values["stratum"] == "8"
    assert done.stderr == ""
