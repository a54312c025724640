"""End to end: the SHIPPED prometheus/prometheus.yml, rules and dashboard against a real
Prometheus scraping the real exporter, which probes the session's chronyd on loopback.

The daemon jobs read a second chronyd (a client of the session's, with a UDP cmdport and
a unix socket, from test_cmdmon_wire.py) and an in-process fake ntpd answering mode 6
(the healthy ntpd of tests/behaviour/test_ntpd_prober.py). The exporter runs with the
packaged modules plus the daemon modules prometheus.yml documents in its comments (the
unix socket path substituted, and a request timeout that fits 1 s scrapes), and a leap file
of its own (valid for a year, one leap second scheduled) so that the leap panels do not
depend on this machine's tzdata.

The shipped configuration is loaded as YAML and changed only where this machine needs it:
addresses (the exporter, the chronyd target, target files in a temp dir), 1 s intervals,
absolute rule file paths and no Alertmanager. Every relabel_config is kept as shipped
(only its placeholder exporter address is substituted), so these tests check the
relabeling users copy. The jobs of prometheus/migration_relabel.yml run alongside.

Prometheus scrapes for the first time about 5.7 s after it starts (measured on this machine kind):
everything below polls with a deadline. Every process is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.behaviour.test_ntpd_prober import FakeNtpd, healthy
from tests.conftest import LOOPBACK, Chronyd, free_tcp_port, require_binary, stop_process
from tests.integration.test_cmdmon_wire import Client, start_client, wait_synchronised
from tests.integration.test_exporter import Exporter, start_exporter
from tests.unit.test_examples import documented_daemon_modules
from tests.unit.test_leapfile import REAL_ENTRIES, build, utc
from tests.unit.test_leapfile import ntp as ntp_seconds

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "prometheus"
SHIPPED_CONFIG = PROM_DIR / "prometheus.yml"
MIGRATION_CONFIG = PROM_DIR / "migration_relabel.yml"
DASHBOARD = PROM_DIR / "grafana" / "ntp_probe.json"
PACKAGED_MODULES = ROOT / "ntp_probe" / "modules.yaml"
# Every rule file, as prometheus.yml's `rules/*.yml` loads them.
RULE_FILES = tuple(sorted((PROM_DIR / "rules").glob("*.yml")))
# Rule files whose every alert has an entry in ALERT_EXPECTS_DATA; alerts of other rule
# files are only evaluated here (they must not fail): add their expectations below.
RULE_FILES_WITH_EXPECTATIONS = {"ntp_alerts.yml", "ntp_recording.yml", "ntp_daemon_alerts.yml"}

# Placeholder exporter addresses in the shipped files.
EXPORTER_PLACEHOLDERS = ("ntp-probe:9559", "ntp-probe-0:9559", "ntp-probe-1:9559")
SHIPPED_JOBS = {"ntp", "ntp_file_sd", "ntp_probe", "ntp_agent", "ntp_shard_0", "ntp_shard_1",
                "ntp_chrony", "ntp_ntpd", "ntp_chrony_agent"}
READY_DEADLINE = 10.0
# A scrape that misses its 1 s timeout on a busy machine marks that target's series stale
# for a moment: queries that expect data poll for it this long.
QUERY_DEADLINE = 10.0
DATA_DEADLINE = 25.0  # from Prometheus' start: first scrape ~5.7 s, two scrapes for rate()
ALERT_DEADLINE = 10.0
HTTP_TIMEOUT = 5.0

# Metrics whose dashboard expressions may legitimately return nothing here: no server
# sends a Kiss-o'-Death on loopback, and the shipped jobs probe no NTS server, no
# ntp_group and no name with all_addresses. An expression naming one of them may be empty
# only while one of the metrics it names has no series at all; everything else must
# return data.
DASHBOARD_MAY_BE_EMPTY = {
    "probe_ntp_kiss_code_info",
    "probe_ssl_earliest_cert_expiry", "probe_nts_authenticated", "probe_nts_ke_duration_seconds",
    "probe_ntp_group_truechimers", "probe_ntp_group_falsetickers", "probe_ntp_group_majority",
    "probe_ntp_group_local_clock_offset_seconds", "probe_ntp_group_member_selection_info",
    "probe_ntp_address_up", "probe_ntp_address_offset_seconds", "probe_ntp_address_failure_info",
}

# Alert expressions and what they must return against this setup (True: data, False:
# nothing). chronyd is healthy, one sharded target never answers (timeout), and every
# group has fewer than two healthy servers. None: not asserted here (see the comments).
ALERT_EXPECTS_DATA: dict[str, bool | None] = {
    "NTPServerUnreachable": True,        # the silent target: reason timeout
    "NTPProbeFailed": False,             # timeout is left to NTPServerUnreachable
    "NTPProbeFlapping": False,           # the silent target fails every scrape: no change
    "NTPProbeDown": True,                # the silent target (no other alert fires yet)
    "NTPKissOfDeath": False,
    "NTPOffsetHigh": False,
    "NTPOffsetCritical": False,
    "NTPServerUnsynchronised": False,
    "NTPRootDistanceHigh": False,
    "NTPUpstreamChanged": False,
    "NTPGroupDegraded": True,            # each group has one healthy server
    "NTPKernelUnsynchronised": None,     # decided from probe_kernel_sync_status below
    "NTPKernelDivergence": None,         # depends on what the kernel is slewing
    "NTPKernelErrorBoundViolated": False,  # loopback offsets are far below any maxerror
    "NTPProbeConfigReloadFailed": False,
    # Every target answers, but on a busy machine one scrape may miss its 1 s timeout
    # (and `for: 5m` would hold the alert back): checked through /api/v1/alerts below.
    "NTPProbeScrapeFailed": None,
    # The daemons: a synchronised chronyd with one source (sync), read over UDP and over
    # its unix socket, and a healthy fake ntpd (a sys.peer, a candidate, an outlier).
    "NTPDaemonUnsynchronised": False,
    "NTPDaemonNoSelectableSource": False,
    "NTPDaemonNoSystemPeer": False,      # the fake ntpd has its sys.peer
    "NTPDaemonSourceUnreachable": False,
    "NTPDaemonFewCandidates": True,      # chronyd's one source is fewer than 2
    "NTPDaemonFalseticker": False,
    "NTPDaemonPacketsDropped": False,
}


# Every group has one healthy server (the chronyd), so each is "degraded" (< 2).
DEGRADED_GROUPS = {"core", "e2e", "e2e_fast", "fleet"}


# --- Prometheus HTTP API ---------------------------------------------------------------


def api(base: str, path: str, params: dict[str, str] | None = None) -> dict[str, Any]:
    url = base + path + ("?" + urllib.parse.urlencode(params) if params else "")
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()
    data: dict[str, Any] = json.loads(body)
    assert isinstance(data, dict), data
    return data


def query(base: str, expr: str) -> dict[str, Any]:
    """/api/v1/query -> the whole answer (status, data or error)."""
    return api(base, "/api/v1/query", {"query": expr})


def series(base: str, expr: str) -> list[dict[str, Any]]:
    answer = query(base, expr)
    assert answer["status"] == "success", (expr, answer)
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def answer_with_data(base: str, expr: str, deadline: float = QUERY_DEADLINE) -> dict[str, Any]:
    """/api/v1/query, repeated until it returns data, fails to evaluate, or time is up."""
    end = time.monotonic() + deadline
    while True:
        answer = query(base, expr)
        if answer["status"] != "success" or answer["data"]["result"]:
            return answer
        if time.monotonic() > end:
            return answer
        time.sleep(0.1)  # poll interval, bounded by the deadline


def present(base: str, expr: str, count: int = 1) -> list[dict[str, Any]]:
    """The series of ``expr`` once there are at least ``count`` of them (or at the deadline)."""
    end = time.monotonic() + QUERY_DEADLINE
    while True:
        result = series(base, expr)
        if len(result) >= count or time.monotonic() > end:
            return result
        time.sleep(0.1)  # poll interval, bounded by the deadline


def labels_of(result: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [r["metric"] for r in result]


def value_of(r: dict[str, Any]) -> float:
    return float(r["value"][1])


# --- the stack -------------------------------------------------------------------------


def hashmod(value: str, modulus: int) -> int:
    """Prometheus' relabel hashmod: the last 8 bytes of the MD5, big-endian, mod N."""
    return int.from_bytes(hashlib.md5(value.encode()).digest()[8:], "big") % modulus


def _substitute(value: Any, mapping: dict[str, str]) -> Any:
    if isinstance(value, str):
        return mapping.get(value, value)
    if isinstance(value, list):
        return [_substitute(v, mapping) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, mapping) for k, v in value.items()}
    return value


class FakeNtpdThread:
    """The behaviour tests' healthy fake ntpd, on its own event loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fake-ntpd",
                                       daemon=True)
        self.fake = FakeNtpd(behaviour=healthy)

    def start(self) -> str:
        """Start serving on 127.0.0.1 and a free port; return ``host:port``."""
        self.thread.start()
        endpoint = self.loop.create_datagram_endpoint(lambda: self.fake,
                                                      local_addr=(LOOPBACK, 0))
        transport, _ = asyncio.run_coroutine_threadsafe(endpoint, self.loop).result(5)
        self.fake.transport = transport
        return f"{LOOPBACK}:{self.fake.port}"

    def stop(self) -> None:
        if self.thread.is_alive():
            if self.fake.transport is not None:
                self.loop.call_soon_threadsafe(self.fake.transport.close)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
        self.loop.close()


def leap_file(tmp: Path) -> Path:
    """A valid leap-seconds.list: expires in about a year and a half, and schedules one
    leap second at the start of the year after next (so none is due on any day near now:
    a synchronised server's leap indicator 0 reads ok)."""
    year = time.gmtime().tm_year
    text = build([*REAL_ENTRIES, (ntp_seconds(utc(year + 2, 1, 1)), 38)],
                 updated=ntp_seconds(utc(year, 1, 1)), expires=ntp_seconds(utc(year + 2, 6, 28)))
    path = tmp / "leap-seconds.list"
    path.write_text(text)
    return path


def exporter_modules(tmp: Path, chrony_client: Client) -> Path:
    """The packaged modules plus prometheus.yml's documented daemon modules (the chrony
    socket moved to the test's chronyd): the --config.file the daemon jobs need."""
    config = yaml.safe_load(PACKAGED_MODULES.read_text())
    daemon = yaml.safe_load(documented_daemon_modules())["modules"]
    assert daemon["chrony"]["chrony"]["socket"] == "/run/chrony/chronyd.sock"
    daemon["chrony"]["chrony"]["socket"] = str(chrony_client.socket_path)
    # 1 s scrapes leave a probe about half a second: a request is only sent when its whole
    # request_timeout still fits, so shorten it (loopback answers in well under 1 ms).
    for module in daemon.values():
        module[module["prober"]]["request_timeout"] = "100ms"
    assert not set(daemon) & set(config["modules"])
    config["modules"].update(daemon)
    config["leapfile"] = str(leap_file(tmp))
    path = tmp / "modules.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class Stack:
    prom_base: str
    prom_proc: subprocess.Popen[bytes]
    prom_log: Path
    exporter: Exporter
    chronyd: Chronyd
    silent_target: str
    config: dict[str, Any]
    shipped: dict[str, Any]
    chrony_client: Client
    ntpd_target: str

    @property
    def exporter_address(self) -> str:
        return f"{LOOPBACK}:{self.exporter.port}"

    def log(self) -> str:
        return self.prom_log.read_text(errors="replace")[-4000:]


def build_config(
    tmp: Path, exporter_address: str, chronyd: Chronyd, silent_target: str,
    daemon_targets: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The shipped configuration, adapted to this machine (see the module docstring)."""
    shipped = yaml.safe_load(SHIPPED_CONFIG.read_text())
    migration = yaml.safe_load(MIGRATION_CONFIG.read_text())
    address_map = dict.fromkeys(EXPORTER_PLACEHOLDERS, exporter_address)
    config: dict[str, Any] = copy.deepcopy(shipped)
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config.pop("alerting", None)  # no Alertmanager here (and no DNS lookups for one)
    config["rule_files"] = [str(PROM_DIR / f) for f in shipped["rule_files"]]

    targets_dir = tmp / "targets"
    (targets_dir / "sharded").mkdir(parents=True)
    (targets_dir / "e2e.yml").write_text(yaml.safe_dump([
        {"targets": [chronyd.target], "labels": {"group": "e2e"}},
        {"targets": [chronyd.target], "labels": {"group": "e2e_fast", "module": "ntp_fast"}},
    ]))
    (targets_dir / "sharded" / "e2e.yml").write_text(yaml.safe_dump([
        {"targets": [chronyd.target, silent_target], "labels": {"group": "fleet"}},
    ]))

    jobs = config["scrape_configs"] + copy.deepcopy(migration["scrape_configs"])
    for job in jobs:
        job.pop("scrape_interval", None)
        job.pop("scrape_timeout", None)
        if "relabel_configs" in job:
            job["relabel_configs"] = _substitute(job["relabel_configs"], address_map)
        name = job["job_name"]
        for sd in job.get("file_sd_configs", []):
            sharded = any("sharded" in f for f in sd["files"])
            sd["files"] = [str(targets_dir / ("sharded/*.yml" if sharded else "*.yml"))]
            sd.pop("refresh_interval", None)
        for static in job.get("static_configs", []):
            probes_servers = any(
                r.get("target_label") == "__param_target" for r in job.get("relabel_configs", [])
            )
            server = (daemon_targets or {}).get(name, chronyd.target)
            static["targets"] = [server if probes_servers else exporter_address]
        params = job.get("params", {})
        if "target" in params:  # agent-style jobs: the exporter probes "its" local daemon
            params["target"] = [chronyd.target]
        assert name in SHIPPED_JOBS or name in {
            j["job_name"] for j in migration["scrape_configs"]
        }, name
    config["scrape_configs"] = jobs
    return config


def start_prometheus(
    tmp: Path, config: dict[str, Any]
) -> tuple[subprocess.Popen[bytes], str, Path]:
    binary = require_binary("prometheus")
    config_path = tmp / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    problems = []
    for attempt in range(3):
        port = free_tcp_port()
        base = f"http://{LOOPBACK}:{port}"
        log_path = tmp / f"prometheus-{attempt}.log"
        data_dir = tmp / f"data-{attempt}"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [binary, f"--config.file={config_path}", f"--storage.tsdb.path={data_dir}",
                 f"--web.listen-address={LOOPBACK}:{port}", "--log.level=info"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + READY_DEADLINE
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(base + "/-/ready", timeout=1) as resp:
                    if resp.status == 200:
                        return proc, base, log_path
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.02)  # poll interval, bounded by the deadline
        stop_process(proc)
        text = log_path.read_text(errors="replace")
        problems.append(f"port {port}: rc={proc.returncode}\n{text[-3000:]}")
        if "address already in use" not in text:
            break
    pytest.fail("prometheus did not become ready:\n" + "\n".join(problems), pytrace=False)


def wait_until(
    check: Callable[[], str | None], deadline: float, stack_log: Callable[[], str]
) -> None:
    """Poll ``check`` (None = done, else what is missing) until the monotonic deadline."""
    missing: str | None = "not checked"
    while time.monotonic() < deadline:
        missing = check()
        if missing is None:
            return
        time.sleep(0.1)  # poll interval, bounded by the deadline
    pytest.fail(f"not within the deadline: {missing}\n--- prometheus log ---\n{stack_log()}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, chronyd: Chronyd) -> Iterator[Stack]:
    require_binary("prometheus")
    tmp = tmp_path_factory.mktemp("prom-e2e")
    # The daemons: a chronyd synchronised to the session's, and a fake ntpd.
    client, stop_client = start_client(chronyd.port)
    ntpd = FakeNtpdThread()
    exporter: Exporter | None = None
    prom: subprocess.Popen[bytes] | None = None
    # A silent NTP "server": a socket we hold (so nobody else can take the port) and never
    # read. Probes of it fail with reason timeout.
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        wait_synchronised(client)
        ntpd_target = ntpd.start()
        exporter = start_exporter(tmp, (f"--config.file={exporter_modules(tmp, client)}",))
        silent.bind((LOOPBACK, 0))
        silent_addr = f"{LOOPBACK}:{silent.getsockname()[1]}"
        exporter_address = f"{LOOPBACK}:{exporter.port}"
        daemon_targets = {"ntp_chrony": f"{LOOPBACK}:{client.cmdport}", "ntp_ntpd": ntpd_target}
        config = build_config(tmp, exporter_address, chronyd, silent_addr, daemon_targets)
        started = time.monotonic()
        prom, base, log_path = start_prometheus(tmp, config)
        s = Stack(base, prom, log_path, exporter, chronyd, silent_addr, config,
                  yaml.safe_load(SHIPPED_CONFIG.read_text()), client, ntpd_target)

        # Everything the tests read: one series per job and module, two scrapes for rate(),
        # and the recording rules evaluated once.
        needed = [
            f'probe_success{{job="ntp", instance="{chronyd.target}"}}',
            'probe_success{job="ntp_file_sd", group="e2e"}',
            'probe_success{job="ntp_file_sd", group="e2e_fast"}',
            'probe_success{job="ntp_agent", module="local"}',
            'probe_success{job="ntp_agent", module="hybrid"}',
            'probe_success{job="ntp_agent", module="kernel"}',
            f'probe_success{{job="ntp_sharded", instance="{silent_addr}"}}',
            f'probe_success{{job="ntp_sharded", instance="{chronyd.target}"}}',
            'ntp_probe_build_info{job="ntp_probe"}',
            "ntp_drift_seconds",
            "node_ntp_sanity",
            "count_over_time(probe_success[1m]) > 1",
            "rate(ntp_probe_probes_total[1m])",
            "job:probe_success:ratio",
            "module_result:ntp_probe_probes:rate5m",
            'probe_success{job="ntp_chrony"}',
            'probe_success{job="ntp_ntpd"}',
            'probe_success{job="ntp_chrony_agent"}',
            "rate(probe_chrony_serverstats_ntp_packets_received_total[1m])",
            "rate(probe_ntpd_packets_received_total[1m])",
        ]

        def check() -> str | None:
            if prom is not None and prom.poll() is not None:
                pytest.fail(f"prometheus exited ({prom.returncode}):\n{s.log()}")
            for expr in needed:
                if not series(base, expr):
                    return f"no data yet for {expr}"
            return None

        wait_until(check, started + DATA_DEADLINE, s.log)
        yield s
    finally:
        if prom is not None:
            stop_process(prom)
        if exporter is not None:
            stop_process(exporter.proc)
        silent.close()
        ntpd.stop()
        stop_client()
        shutil.rmtree(tmp, ignore_errors=True)


# --- scrape configuration ------------------------------------------------------------


def test_config_keeps_the_shipped_relabeling(stack: Stack) -> None:
    """Guard for this test itself: only placeholders were substituted."""
    shipped = {j["job_name"]: j for j in stack.shipped["scrape_configs"]}
    used = {j["job_name"]: j for j in stack.config["scrape_configs"]}
    assert set(shipped) == SHIPPED_JOBS
    back = dict.fromkeys([stack.exporter_address], "PLACEHOLDER")
    for name, job in shipped.items():
        want = _substitute(job.get("relabel_configs", []), dict.fromkeys(EXPORTER_PLACEHOLDERS,
                                                                         "PLACEHOLDER"))
        assert _substitute(used[name].get("relabel_configs", []), back) == want, name


def test_static_job_relabels_target_into_instance(stack: Stack) -> None:
    result = present(stack.prom_base, 'probe_success{job="ntp"}')
    assert labels_of(result) == [{
        "__name__": "probe_success", "job": "ntp", "instance": stack.chronyd.target,
        "module": "ntp", "group": "core",
    }]
    assert value_of(result[0]) == 1
    offset = series(
        stack.prom_base, f'probe_ntp_offset_seconds{{instance="{stack.chronyd.target}"}}'
    )
    assert {r["metric"]["job"] for r in offset} >= {"ntp", "ntp_file_sd", "ntp_sharded"}
    assert all(abs(value_of(r)) < 0.01 for r in offset), offset
    stratum = present(stack.prom_base, 'probe_ntp_stratum{job="ntp"}')
    assert [value_of(r) for r in stratum] == [8]

    targets = api(stack.prom_base, "/api/v1/targets", {"state": "active"})["data"]["activeTargets"]
    ntp = [t for t in targets if t["scrapePool"] == "ntp"]
    assert len(ntp) == 1 and ntp[0]["health"] == "up", ntp
    url = urllib.parse.urlsplit(ntp[0]["scrapeUrl"])
    assert url.netloc == stack.exporter_address and url.path == "/probe"
    assert urllib.parse.parse_qs(url.query) == {"module": ["ntp"], "target": [stack.chronyd.target]}


def test_file_sd_job_carries_group_and_per_group_module(stack: Stack) -> None:
    result = present(stack.prom_base, 'probe_success{job="ntp_file_sd"}', 2)
    got = sorted((r["metric"]["group"], r["metric"]["module"], r["metric"]["instance"],
                  value_of(r)) for r in result)
    assert got == [("e2e", "ntp", stack.chronyd.target, 1.0),
                   ("e2e_fast", "ntp_fast", stack.chronyd.target, 1.0)]
    # ntp_fast really ran: one sample (the `ntp` module under a 1 s scrape also fits one,
    # so check the module label reached the exporter through the scrape URL as well).
    sent = present(
        stack.prom_base, 'probe_ntp_samples_sent{job="ntp_file_sd", group="e2e_fast"}'
    )
    assert [value_of(r) for r in sent] == [1]
    targets = api(stack.prom_base, "/api/v1/targets", {"state": "active"})["data"]["activeTargets"]
    modules = sorted(urllib.parse.parse_qs(urllib.parse.urlsplit(t["scrapeUrl"]).query)["module"][0]
                     for t in targets if t["scrapePool"] == "ntp_file_sd")
    assert modules == ["ntp", "ntp_fast"]


def test_exporter_self_job(stack: Stack) -> None:
    up = present(stack.prom_base, 'up{job="ntp_probe"}')
    assert [(r["metric"]["instance"], value_of(r)) for r in up] == [(stack.exporter_address, 1)]
    reload_ok = present(
        stack.prom_base, 'ntp_probe_config_last_reload_successful{job="ntp_probe"}'
    )
    assert [value_of(r) for r in reload_ok] == [1]


def test_agent_job_probes_local_daemon_and_kernel(stack: Stack) -> None:
    result = present(stack.prom_base, 'probe_success{job="ntp_agent"}', 3)
    got = sorted((r["metric"]["module"], r["metric"]["instance"], value_of(r)) for r in result)
    assert got == [(m, stack.exporter_address, 1.0) for m in ("hybrid", "kernel", "local")]
    # hybrid: NTP against the daemon plus the kernel; kernel: adjtimex only, no NTP.
    def agent(name: str, module: str) -> str:
        return f'{name}{{job="ntp_agent", module="{module}"}}'

    assert present(stack.prom_base, agent("probe_ntp_offset_seconds", "hybrid"))
    assert present(stack.prom_base, agent("probe_kernel_divergence_seconds", "hybrid"))
    assert present(stack.prom_base, agent("probe_kernel_sync_status", "kernel"))
    assert not series(stack.prom_base, agent("probe_ntp_offset_seconds", "kernel"))
    assert not series(stack.prom_base, agent("probe_kernel_sync_status", "local"))


def test_sharding_puts_every_target_on_exactly_one_replica(stack: Stack) -> None:
    targets = api(stack.prom_base, "/api/v1/targets")["data"]
    active = [t for t in targets["activeTargets"] if t["scrapePool"].startswith("ntp_shard_")]
    by_target = {t["labels"]["instance"]: t for t in active}
    assert sorted(by_target) == sorted([stack.chronyd.target, stack.silent_target])
    assert len(active) == 2, active
    for target, t in by_target.items():
        assert t["scrapePool"] == f"ntp_shard_{hashmod(target, 2)}", (target, t["scrapePool"])
        assert t["labels"]["job"] == "ntp_sharded" and t["labels"]["group"] == "fleet"
    dropped = [t for t in targets["droppedTargets"]
               if t["discoveredLabels"].get("job", "").startswith("ntp_shard_")]
    assert sorted(t["discoveredLabels"]["__address__"] for t in dropped) == sorted(by_target)
    success = {r["metric"]["instance"]: value_of(r)
               for r in present(stack.prom_base, 'probe_success{job="ntp_sharded"}', 2)}
    assert success == {stack.chronyd.target: 1, stack.silent_target: 0}
    reason = present(
        stack.prom_base, f'probe_ntp_failure_info{{instance="{stack.silent_target}"}}'
    )
    assert [r["metric"]["reason"] for r in reason] == ["timeout"]


def test_daemon_jobs_read_chronyd_and_ntpd(stack: Stack) -> None:
    """ntp_chrony (UDP cmdport), ntp_chrony_agent (unix socket) and ntp_ntpd (mode 6)."""
    result = present(stack.prom_base, 'probe_success{job=~"ntp_chrony|ntp_chrony_agent|ntp_ntpd"}',
                     3)
    got = sorted((r["metric"]["job"], r["metric"]["module"], r["metric"]["instance"], value_of(r))
                 for r in result)
    assert got == sorted([
        ("ntp_chrony", "chrony_udp", f"{LOOPBACK}:{stack.chrony_client.cmdport}", 1.0),
        ("ntp_chrony_agent", "chrony", stack.exporter_address, 1.0),
        ("ntp_ntpd", "ntpd", stack.ntpd_target, 1.0),
    ])
    # chronyd's one source, the session's chronyd, is selected, over UDP and the socket.
    for job in ("ntp_chrony", "ntp_chrony_agent"):
        sources = present(stack.prom_base, f'probe_chrony_source_info{{job="{job}"}}')
        assert [(r["metric"]["source"], r["metric"]["state"]) for r in sources] == [
            (LOOPBACK, "sync")], job
        leap = present(stack.prom_base, f'probe_chrony_tracking_leap_status{{job="{job}"}}')
        assert [value_of(r) for r in leap] == [0], job
    # serverstats: over the unix socket only (chrony 4.3 refuses them over UDP).
    assert present(stack.prom_base,
                   'probe_chrony_serverstats_ntp_packets_received_total{job="ntp_chrony_agent"}')
    peers = present(stack.prom_base, 'probe_ntpd_peers{job="ntp_ntpd"} > 0', 3)
    assert sorted(r["metric"]["selection"] for r in peers) == ["candidate", "outlier", "sys.peer"]


def test_migration_relabel_renames_to_legacy_names(stack: Stack) -> None:
    drift = present(stack.prom_base, 'ntp_drift_seconds{job="legacy_sapcc"}')
    assert [r["metric"]["server"] for r in drift] == [stack.chronyd.target]
    assert abs(value_of(drift[0])) < 0.01
    for name, want in (("ntp_server_reachable", 1), ("ntp_stratum", 8), ("ntp_leap", 0)):
        got = present(stack.prom_base, f'{name}{{job="legacy_sapcc"}}')
        assert [value_of(r) for r in got] == [want], name
    assert present(stack.prom_base, 'ntp_root_distance_seconds{job="legacy_sapcc"}')
    assert not series(stack.prom_base, 'probe_ntp_offset_seconds{job="legacy_sapcc"}')

    for name, want in (("node_ntp_sanity", 1), ("node_ntp_stratum", 8), ("node_ntp_leap", 0)):
        got = present(stack.prom_base, f'{name}{{job="node_ntp_legacy"}}')
        assert [value_of(r) for r in got] == [want], name
    for name in ("node_ntp_offset_seconds", "node_ntp_rtt_seconds", "node_timex_sync_status",
                 "node_timex_maxerror_seconds", "node_timex_estimated_error_seconds"):
        assert present(stack.prom_base, f'{name}{{job="node_ntp_legacy"}}'), name
    # Renamed, not copied; metrics without an old name keep theirs.
    for name in ("probe_success", "probe_ntp_offset_seconds", "probe_kernel_sync_status"):
        assert not series(stack.prom_base, f'{name}{{job="node_ntp_legacy"}}'), name
    assert present(stack.prom_base, 'probe_ntp_jitter_seconds{job="node_ntp_legacy"}')


# --- dashboard -------------------------------------------------------------------------


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels", []))


def dashboard_exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in _panels(dash["panels"]) for t in p.get("targets", [])]


def grafana_to_promql(expr: str) -> str:
    """Template variables -> match-all regexes, Grafana intervals -> 1m."""
    expr = re.sub(r"\$\{?__(rate_interval|interval|range)\}?", "1m", expr)
    return re.sub(r"\$\{?(job|module|instance)\}?", ".*", expr)


def test_dashboard_expressions_parse_and_return_data(stack: Stack) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) > 30
    problems = []
    for title, expr in exprs:
        promql = grafana_to_promql(expr)
        assert "$" not in promql, (title, expr)
        named = [n for n in DASHBOARD_MAY_BE_EMPTY if re.search(rf"(?<![\w:]){n}(?![\w:])", expr)]
        absent = [n for n in named if not series(stack.prom_base, f"count({n})")]
        may_be_empty = "vector(0)" not in expr and bool(absent)
        answer = (query if may_be_empty else answer_with_data)(stack.prom_base, promql)
        if answer["status"] != "success":
            problems.append(f"{title}: {promql}: {answer.get('error')}")
            continue
        if not answer["data"]["result"] and not may_be_empty:
            problems.append(f"{title}: {promql}: no data")
    assert not problems, "\n".join(problems)


def test_leap_file_and_leap_check(stack: Stack) -> None:
    """The exporter's leap file on /metrics, and a synchronised server's verdict against it:
    the inputs of the dashboard's leap row and of the leap alerts."""
    base = stack.prom_base
    valid = present(base, 'ntp_probe_leapfile_valid{job="ntp_probe"}')
    assert [value_of(r) for r in valid] == [1]
    expiry = present(base, 'ntp_probe_leapfile_expiry_timestamp_seconds{job="ntp_probe"}')
    assert [value_of(r) > time.time() + 365 * 86400 for r in expiry] == [True]
    leap = present(base, 'ntp_probe_leapfile_next_leap_timestamp_seconds{job="ntp_probe"}')
    assert [value_of(r) > time.time() + 365 * 86400 for r in leap] == [True]
    verdicts = present(
        base, f'probe_ntp_leap_check_info{{job="ntp", instance="{stack.chronyd.target}"}}'
    )
    assert [(r["metric"]["verdict"], value_of(r)) for r in verdicts] == [("ok", 1)]


def test_dashboard_variables_find_the_targets(stack: Stack) -> None:
    dash = json.loads(DASHBOARD.read_text())
    found = {}
    for var in dash["templating"]["list"]:
        if var["type"] != "query":
            continue
        m = re.fullmatch(r"label_values\((.+), (\w+)\)", var["query"]["query"])
        assert m, var["query"]
        selector, label = grafana_to_promql(m.group(1)), m.group(2)
        answer = api(stack.prom_base, f"/api/v1/label/{label}/values", {"match[]": selector})
        assert answer["status"] == "success", answer
        found[var["name"]] = set(answer["data"])
    assert {"ntp", "ntp_file_sd", "ntp_agent", "ntp_sharded"} <= found["job"]
    assert {"ntp", "ntp_fast", "local", "hybrid", "kernel"} <= found["module"]
    assert {stack.chronyd.target, stack.silent_target, stack.exporter_address} <= found["instance"]


# --- rules -----------------------------------------------------------------------------


def rules(names: set[str] | None = None) -> list[dict[str, Any]]:
    """The rules of every rule file (or of the files named)."""
    out = []
    for path in RULE_FILES:
        if names is not None and path.name not in names:
            continue
        for group in yaml.safe_load(path.read_text())["groups"]:
            out.extend(group["rules"])
    return out


def kernel_is_unsynchronised(stack: Stack) -> bool:
    sync = present(stack.prom_base, 'probe_kernel_sync_status{job="ntp_agent", module="kernel"}')
    assert len(sync) == 1, sync
    return value_of(sync[0]) == 0


def test_every_rule_loaded_and_healthy(stack: Stack) -> None:
    def check() -> str | None:
        groups = api(stack.prom_base, "/api/v1/rules")["data"]["groups"]
        loaded = {r["name"]: r for g in groups for r in g["rules"]}
        wanted = {r.get("alert") or r["record"] for r in rules()}
        if set(loaded) != wanted:
            return f"rules loaded: {sorted(loaded)}"
        bad = {n: r.get("lastError") for n, r in loaded.items() if r["health"] != "ok"}
        return f"unhealthy rules: {bad}" if bad else None

    wait_until(check, time.monotonic() + ALERT_DEADLINE, stack.log)


def test_recording_rules_return_data(stack: Stack) -> None:
    # Recording rules of other rule files only have to evaluate (their inputs may not exist
    # on this machine).
    known = {r.get("record") for r in rules(RULE_FILES_WITH_EXPECTATIONS)}
    problems = []
    for rule in rules():
        if "record" not in rule:
            continue
        if rule["record"] not in known:
            answer = query(stack.prom_base, rule["expr"])
            if answer["status"] != "success":
                problems.append(f"{rule['record']}: {answer.get('error')}")
            continue
        answer = answer_with_data(stack.prom_base, rule["expr"])
        if answer["status"] != "success" or not answer["data"]["result"]:
            problems.append(f"{rule['record']}: {answer}")
            continue
        # The recorded series exists too (the rule was evaluated by Prometheus itself).
        if not present(stack.prom_base, rule["record"]):
            problems.append(f"{rule['record']}: not recorded")
    assert not problems, "\n".join(problems)


def test_alert_expressions_against_real_series(stack: Stack) -> None:
    kernel_unsynced = kernel_is_unsynchronised(stack)
    expectations = dict(ALERT_EXPECTS_DATA, NTPKernelUnsynchronised=kernel_unsynced)
    alerts = [r for r in rules() if "alert" in r]
    known = [r["alert"] for r in rules(RULE_FILES_WITH_EXPECTATIONS) if "alert" in r]
    assert set(known) <= set(expectations), sorted(set(known) - set(expectations))
    assert set(expectations) <= {r["alert"] for r in alerts}, "expectations of unknown alerts"
    problems = []
    for rule in alerts:
        want = expectations.get(rule["alert"])  # other rule files: must evaluate, no more
        answer = (answer_with_data if want else query)(stack.prom_base, rule["expr"])
        if answer["status"] != "success":
            problems.append(f"{rule['alert']}: {answer.get('error')}")
            continue
        got = answer["data"]["result"]
        if want is not None and bool(got) != want:
            problems.append(f"{rule['alert']}: expected {'data' if want else 'nothing'}, got {got}")
    assert not problems, "\n".join(problems)


def test_alerts_go_pending_with_the_right_labels(stack: Stack) -> None:
    kernel_unsynced = kernel_is_unsynchronised(stack)
    found: dict[str, list[dict[str, str]]] = {}

    def check() -> str | None:
        found.clear()
        for alert in api(stack.prom_base, "/api/v1/alerts")["data"]["alerts"]:
            found.setdefault(alert["labels"]["alertname"], []).append(alert["labels"])
        wanted = {"NTPServerUnreachable", "NTPGroupDegraded", "NTPDaemonFewCandidates"}
        missing = wanted - set(found)
        if kernel_unsynced and "NTPKernelUnsynchronised" not in found:
            missing.add("NTPKernelUnsynchronised")
        groups = {a["group"] for a in found.get("NTPGroupDegraded", [])}
        if groups != DEGRADED_GROUPS:
            missing.add(f"NTPGroupDegraded for {sorted(DEGRADED_GROUPS - groups)}")
        return f"alerts missing: {missing}; active: {sorted(found)}" if missing else None

    wait_until(check, time.monotonic() + ALERT_DEADLINE, stack.log)
    assert found["NTPServerUnreachable"] == [{
        "alertname": "NTPServerUnreachable", "severity": "warning", "job": "ntp_sharded",
        "instance": stack.silent_target, "module": "ntp_fast", "group": "fleet",
    }]  # the reason is the summary's (not a label: a changing one would restart "for")
    assert not {"NTPProbeFailed", "NTPOffsetHigh", "NTPOffsetCritical", "NTPKissOfDeath",
                "NTPServerUnsynchronised", "NTPProbeScrapeFailed", "NTPDaemonUnsynchronised",
                "NTPDaemonNoSelectableSource", "NTPDaemonSourceUnreachable",
                "NTPDaemonFalseticker", "NTPDaemonPacketsDropped"} & set(found)
    few = {(a["job"], a["module"]) for a in found["NTPDaemonFewCandidates"]}
    assert few == {("ntp_chrony", "chrony_udp"), ("ntp_chrony_agent", "chrony")}, few
    if kernel_unsynced:
        # Once per node, though the kernel and hybrid modules both read the kernel state.
        kernel = [a for a in found["NTPKernelUnsynchronised"] if a["job"] == "ntp_agent"]
        assert len(kernel) == 1 and "module" not in kernel[0], kernel
