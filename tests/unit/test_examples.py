"""The shipped examples and Prometheus files are well-formed and say what they promise:
every YAML/JSON file parses, the systemd units are hardened without the clock capability,
the Kubernetes manifests drop every capability, the dashboard's panels and expressions
are consistent and only use metrics the exporter has, the compose file mounts files that
exist. No docker engine is needed (nothing is built).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ntp_probe.cli.main import serve_parser
from ntp_probe.config.load import load_config, module_to_dict, parse_config
from ntp_probe.config.schema import Config
from ntp_probe.exposition.families import declared
from ntp_probe.exposition.internals import Internals
from ntp_probe.safety.guard import Guard

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "prometheus"
EXAMPLES = ROOT / "examples"
DASHBOARD = PROM_DIR / "grafana" / "ntp_probe.json"
UNITS = sorted((EXAMPLES / "systemd").glob("*.service"))
K8S = EXAMPLES / "kubernetes"
PACKAGED_MODULES = set(load_config(None).modules)

YAML_FILES = sorted(
    p for d in (PROM_DIR, EXAMPLES) for p in d.rglob("*") if p.suffix in (".yml", ".yaml")
)
JSON_FILES = sorted(p for d in (PROM_DIR, EXAMPLES) for p in d.rglob("*.json"))


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


# --- everything parses -----------------------------------------------------------------


def test_the_files_are_there() -> None:
    names = {rel(p) for p in YAML_FILES + JSON_FILES + UNITS}
    for want in (
        "prometheus/prometheus.yml", "prometheus/rules/ntp_alerts.yml",
        "prometheus/rules/ntp_recording.yml", "prometheus/rules/ntp_daemon_alerts.yml",
        "prometheus/rules/ntp_nts_alerts.yml", "prometheus/rules/tests/ntp_nts_alerts_test.yml",
        "prometheus/rules/ntp_fleet_alerts.yml",
        "prometheus/rules/tests/ntp_fleet_alerts_test.yml",
        "prometheus/rules/tests/ntp_daemon_alerts_test.yml", "prometheus/grafana/ntp_probe.json",
        "prometheus/migration_relabel.yml", "examples/docker-compose.yml",
        "examples/kubernetes/ntp-probe.yaml", "examples/kubernetes/agent-daemonset.yaml",
        "examples/kubernetes/probe.yaml", "examples/systemd/ntp-probe.service",
        "examples/systemd/ntp-probe@.service",
    ):
        assert want in names, want
    assert (EXAMPLES / "Dockerfile").is_file()
    assert (EXAMPLES / "telegraf" / "ntp_probe.conf").is_file()


@pytest.mark.parametrize("path", YAML_FILES, ids=rel)
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{rel(path)} is empty"


@pytest.mark.parametrize("path", JSON_FILES, ids=rel)
def test_json_parses(path: Path) -> None:
    assert isinstance(json.loads(path.read_text()), dict)


# --- systemd ---------------------------------------------------------------------------


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """systemd unit -> {section: [(key, value)]} (keys may repeat, comments dropped)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            sections.setdefault(current, [])
            continue
        assert current is not None, f"line {number} outside a section: {raw}"
        key, sep, value = line.partition("=")
        assert sep, f"line {number} is not key=value: {raw}"
        sections[current].append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_systemd_unit_is_hardened(path: Path) -> None:
    unit = parse_unit(path.read_text())
    assert set(unit) == {"Unit", "Service", "Install"}
    service = unit["Service"]

    def one(key: str) -> str:
        got = values(service, key)
        assert len(got) == 1, f"{key}: {got}"
        return got[0]

    assert one("ExecStart").split()[0].endswith("/ntp-probe")
    assert one("Type") == "notify"
    assert one("DynamicUser") == "yes"
    assert one("CapabilityBoundingSet") == "" and one("AmbientCapabilities") == ""
    assert one("NoNewPrivileges") == "yes"
    assert one("ProtectSystem") == "strict"
    assert one("ProtectHome") == "yes" and one("PrivateTmp") == "yes"
    assert one("MemoryDenyWriteExecute") == "yes"
    assert one("RestrictAddressFamilies").split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Restart") == "on-failure"
    assert one("WatchdogSec") == "30s"
    # The kernel module's read-only clock_adjtime must stay allowed: no ~@clock, no
    # ProtectClock (its filter denies the whole @clock group).
    filters = values(service, "SystemCallFilter")
    assert "@system-service" in filters
    assert not any("~" in f and "@clock" in f for f in filters)
    assert any("clock_adjtime" in f.split() for f in filters)
    assert values(service, "ProtectClock") in ([], ["no"])
    # Nothing grants the clock-setting capability, in any key.
    for section in unit.values():
        for key, value in section:
            assert "CAP_SYS_TIME" not in value.upper(), (key, value)


VENV = "/opt/ntp-probe"  # where the README and the units' comments install the exporter


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_systemd_unit_runs_the_documented_venv_install(path: Path) -> None:
    text = path.read_text()
    service = parse_unit(text)["Service"]
    assert values(service, "ExecStart") == [f"{VENV}/bin/ntp-probe"]
    # ProtectHome=yes hides /home and /root: the venv must live outside them.
    assert values(service, "ProtectHome") == ["yes"]
    assert not VENV.startswith(("/home", "/root", "/run/user"))
    # Room for a socket per probe in flight besides the HTTP connections.
    assert values(service, "LimitNOFILE") == ["8192"]
    # There is no published package: nothing may tell people to install it by name.
    assert not re.search(r"pip install\s+ntp[-_]probe\b", text), path.name
    assert VENV in " ".join(line for line in text.splitlines() if line.startswith("#"))


def test_readme_installs_where_the_units_look() -> None:
    readme = (ROOT / "README.md").read_text()
    main_unit = (EXAMPLES / "systemd" / "ntp-probe.service").read_text()
    for command in (f"python3 -m venv {VENV}", f"{VENV}/bin/pip install"):
        assert command in readme and command in main_unit, command


def test_license_is_the_apache_license_pyproject_declares() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "Apache-2.0"}
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    # The whole text, not a pointer to it: all nine sections and the appendix.
    for heading in ("1. Definitions.", "9. Accepting Warranty or Additional Liability.",
                    "END OF TERMS AND CONDITIONS", "APPENDIX: How to apply"):
        assert heading in text, heading


def test_template_unit_takes_its_settings_from_the_instance_env_file() -> None:
    unit = parse_unit((EXAMPLES / "systemd" / "ntp-probe@.service").read_text())
    assert values(unit["Service"], "EnvironmentFile") == ["/etc/ntp-probe/%i.env"]
    assert "%i" in values(unit["Unit"], "Description")[0]


def test_socket_unit_activates_the_service_on_its_port(monkeypatch: pytest.MonkeyPatch) -> None:
    unit = parse_unit((EXAMPLES / "systemd" / "ntp-probe.socket").read_text())
    assert set(unit) == {"Unit", "Socket", "Install"}
    assert values(unit["Socket"], "ListenStream") == ["9559"]
    assert values(unit["Install"], "WantedBy") == ["sockets.target"]
    service = (EXAMPLES / "systemd" / "ntp-probe.service").read_text()
    assert "Environment=NTP_PROBE_WEB_LISTEN_ADDRESS=:9559" in service
    # The commented-out line the socket unit's comment says to uncomment turns it on.
    line = next(x for x in service.splitlines() if "NTP_PROBE_WEB_SYSTEMD_SOCKET" in x)
    name, _, value = line.removeprefix("#Environment=").partition("=")
    monkeypatch.setenv(name, value)
    assert serve_parser().parse_args([]).systemd_socket is True


def flag_env_names() -> set[str]:
    """NTP_PROBE_* for every `ntp-probe` flag (README: caps, dots and dashes as _)."""
    names = set()
    for action in serve_parser()._actions:
        for option in action.option_strings:
            if option.startswith("--") and option not in ("--help", "--version"):
                names.add("NTP_PROBE_" + option[2:].upper().replace(".", "_").replace("-", "_"))
    return names


def test_environment_variables_in_examples_are_real_flags() -> None:
    known = flag_env_names()
    assert "NTP_PROBE_WEB_LISTEN_ADDRESS" in known
    used = set()
    for path in [*UNITS, EXAMPLES / "systemd" / "example.env", EXAMPLES / "docker-compose.yml"]:
        used |= set(re.findall(r"\bNTP_PROBE_[A-Z_]+", path.read_text()))
    assert used, "the examples show the NTP_PROBE_* variables"
    assert not used - known, f"no such flag: {sorted(used - known)}"


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed (package systemd)")
    for path in UNITS:
        # verify wants ExecStart to exist; everything else is checked as shipped.
        text = re.sub(r"^ExecStart=\S+", "ExecStart=/bin/true", path.read_text(), flags=re.M)
        name = path.name.replace("@.service", "@test.service")
        if "@" in path.name:
            (tmp_path / path.name).write_text(text)
        (tmp_path / name).write_text(text)
        done = subprocess.run([analyze, "verify", str(tmp_path / name)], capture_output=True,
                              text=True, timeout=30, stdin=subprocess.DEVNULL)
        complaints = [line for line in (done.stdout + done.stderr).splitlines()
                      if str(tmp_path) in line]
        assert not complaints, "\n".join(complaints)


# --- Kubernetes --------------------------------------------------------------------------


def k8s_docs() -> list[dict[str, Any]]:
    return [d for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in k8s_docs() if d["kind"] == kind]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    result: list[dict[str, Any]] = spec["containers"] + spec.get("initContainers", [])
    return result


def test_kubernetes_kinds() -> None:
    kinds = sorted(d["kind"] for d in k8s_docs())
    for kind in ("ConfigMap", "DaemonSet", "Deployment", "Probe", "Service"):
        assert kind in kinds, kind
    for doc in k8s_docs():
        assert doc["apiVersion"] and doc["metadata"]["name"], doc


@pytest.mark.parametrize("kind", ["Deployment", "DaemonSet"])
def test_kubernetes_workloads_are_locked_down(kind: str) -> None:
    (workload,) = by_kind(kind)
    pod = workload["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"].get("runAsUser", 1) != 0
    for c in containers(workload):
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc.get("privileged", False) is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert "add" not in sc["capabilities"]
        assert c["livenessProbe"]["httpGet"]["path"] == "/-/healthy"
        assert c["readinessProbe"]["httpGet"]["path"] == "/-/ready"
    assert "SYS_TIME" not in json.dumps(workload)


def test_kubernetes_agent_uses_the_host_network_and_agent_modules() -> None:
    (ds,) = by_kind("DaemonSet")
    assert ds["spec"]["template"]["spec"]["hostNetwork"] is True
    (monitor,) = by_kind("PodMonitor")
    every = monitor["spec"]["podMetricsEndpoints"]
    # Every endpoint's job is ntp*, which NTPProbeScrapeFailed watches.
    for e in every:
        assert {"targetLabel": "job", "replacement": "ntp_agent"} in e["relabelings"], e
    assert [e["path"] for e in every].count("/metrics") == 1
    endpoints = [e for e in every if e["path"] != "/metrics"]
    modules = sorted(e["params"]["module"][0] for e in endpoints)
    assert modules == ["hybrid", "kernel", "local"]
    # Its ConfigMap restates the packaged modules it scrapes, unchanged.
    config = workload_config(ds)
    packaged = load_config(None).modules
    assert {name: config.modules[name] for name in modules} == {
        name: packaged[name] for name in modules}
    for e in endpoints:
        assert e["path"] == "/probe"
        assert e["params"]["target"][0] in ("127.0.0.1", "localhost")


def workload_config(workload: dict[str, Any]) -> Config:
    """The modules file a workload runs: its ConfigMap, mounted where --config.file reads."""
    container = containers(workload)[0]
    assert "--config.file=/etc/ntp-probe/modules.yaml" in container["args"]
    (mount,) = container["volumeMounts"]
    assert mount["mountPath"] == "/etc/ntp-probe"
    (volume,) = workload["spec"]["template"]["spec"]["volumes"]
    assert volume["name"] == mount["name"]
    (cm,) = [c for c in by_kind("ConfigMap")
             if c["metadata"]["name"] == volume["configMap"]["name"]]
    return parse_config(cm["data"]["modules.yaml"], "ConfigMap")


def test_the_agent_probes_its_own_node_only() -> None:
    # Its /probe listens on every node's address: nothing but loopback may be probed.
    (ds,) = by_kind("DaemonSet")
    config = workload_config(ds)
    guard = Guard(policies=(config.policy,))
    for allowed in ("127.0.0.1", "::1", "localhost"):
        assert guard.refuse(allowed) is None, allowed
    for refused in ("192.0.2.1", "10.0.0.1", "2001:db8::1"):
        assert guard.refuse(refused) is not None, refused
    assert guard.refuse("ntp.example.net", "192.0.2.1") is not None
    assert guard.refuse("localhost", "127.0.0.1") is None


def test_kubernetes_config_map_is_a_valid_modules_file() -> None:
    (deployment,) = by_kind("Deployment")
    config = workload_config(deployment)
    # The Probe resources use modules this ConfigMap defines.
    for probe in by_kind("Probe"):
        assert probe["apiVersion"] == "monitoring.coreos.com/v1"
        spec = probe["spec"]
        assert spec["module"] in config.modules, spec["module"]
        assert spec["prober"]["url"].endswith(":9559") and spec["prober"]["path"] == "/probe"
        assert spec["targets"]["staticConfig"]["static"]


def test_kubernetes_service_points_at_the_deployment() -> None:
    (svc,) = by_kind("Service")
    (deployment,) = by_kind("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["ports"][0]["port"] == 9559


# --- dashboard ---------------------------------------------------------------------------


def walk(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from walk(p.get("panels", []))


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def test_dashboard_structure() -> None:
    dash = dashboard()
    assert dash["schemaVersion"] >= 36
    panels = list(walk(dash["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    for name in ("job", "instance", "module"):
        assert variables[name]["type"] == "query"
    titles = [p["title"] for p in panels if p["type"] == "row"]
    assert any("Target" in t for t in titles), "a per-target drill-down row"
    assert any("Kernel" in t for t in titles)
    for p in panels:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t.get("expr", "").strip(), f"{p['title']}: target without expr"
            assert t["datasource"]["uid"] == "${DS_PROMETHEUS}"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_dashboard_panels_do_not_overlap() -> None:
    occupied: dict[tuple[int, int], str] = {}
    for p in dashboard()["panels"]:  # top level: collapsed rows hold their own layout
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in occupied, (p["title"], occupied[(x, y)])
                occupied[(x, y)] = p["title"]
        assert g["x"] + g["w"] <= 24


def test_dashboard_covers_the_fleet_and_kernel_metrics() -> None:
    exprs = " ".join(t["expr"] for p in walk(dashboard()["panels"]) for t in p.get("targets", []))
    for name in (
        "probe_success", "probe_ntp_offset_seconds", "probe_ntp_rtt_seconds",
        "probe_ntp_jitter_seconds", "probe_ntp_stratum", "probe_ntp_root_distance_seconds",
        "probe_ntp_failure_info", "probe_ntp_kiss_code_info", "probe_kernel_offset_seconds",
        "probe_kernel_maxerror_seconds", "probe_kernel_sync_status",
        "probe_kernel_divergence_seconds", "probe_kernel_coherence_score",
    ):
        assert name in exprs, name


def test_dashboard_covers_the_daemon_metrics() -> None:
    panels = list(walk(dashboard()["panels"]))
    exprs = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    for name in (
        # chrony: tracking, sources by state, reach
        "probe_chrony_tracking_system_time_seconds", "probe_chrony_tracking_frequency_ppm",
        "probe_chrony_tracking_skew_ppm", "probe_chrony_tracking_root_delay_seconds",
        "probe_chrony_tracking_root_dispersion_seconds", "probe_chrony_tracking_leap_status",
        "probe_chrony_source_info", "probe_chrony_sources", "probe_chrony_source_reach_ratio",
        # ntpd: system offset and jitter, peers by selection, packet counters
        "probe_ntpd_offset_seconds", "probe_ntpd_sys_jitter_seconds", "probe_ntpd_peer_info",
        "probe_ntpd_peers", "probe_ntpd_packets_received_total",
        "probe_ntpd_packets_dropped_total",
    ):
        assert name in exprs, name
    titles = [p["title"] for p in panels if p["type"] == "row"]
    assert any("chrony" in t for t in titles) and any("ntpd" in t for t in titles), titles
    # Daemon counters are only ever shown as rates.
    for p in panels:
        for target in p.get("targets", []):
            for counter in re.findall(r"probe_(?:chrony|ntpd)_[a-z0-9_]+_total", target["expr"]):
                assert f"rate({counter}" in target["expr"], (p["title"], counter)


def test_dashboard_covers_nts_fleet_and_leap() -> None:
    panels = list(walk(dashboard()["panels"]))
    exprs = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    for name in (
        # NTS: certificate expiry, authentication, KE phases
        "probe_ssl_earliest_cert_expiry", "probe_nts_authenticated",
        "probe_nts_ke_duration_seconds",
        # ntp_group and all_addresses
        "probe_ntp_group_truechimers", "probe_ntp_group_falsetickers",
        "probe_ntp_group_majority", "probe_ntp_group_local_clock_offset_seconds",
        "probe_ntp_address_up", "probe_ntp_address_offset_seconds",
        # leap seconds
        "ntp_probe_leapfile_valid", "ntp_probe_leapfile_expiry_timestamp_seconds",
        "ntp_probe_leapfile_next_leap_timestamp_seconds", "probe_ntp_leap_check_info",
    ):
        assert name in exprs, name
    titles = [p["title"] for p in panels if p["type"] == "row"]
    for word in ("NTS", "Fleet", "Leap"):
        assert any(word in t for t in titles), (word, titles)


# --- prometheus.yml: the daemon jobs and the modules they need --------------------------------


def scrape_jobs() -> dict[str, dict[str, Any]]:
    config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    return {j["job_name"]: j for j in config["scrape_configs"]}


def documented_daemon_modules() -> str:
    """The `modules:` block prometheus.yml documents in its comments for the daemon jobs."""
    lines = (PROM_DIR / "prometheus.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "#   modules:")
    block = []
    for line in lines[start:]:
        body = line.strip()
        if not body.startswith("#   ") and body != "#   modules:":
            break
        block.append(body[len("#   "):])
    return "\n".join(block) + "\n"


def job_modules(job: dict[str, Any]) -> set[str]:
    modules = set(job.get("params", {}).get("module", []))
    for static in job.get("static_configs", []):
        if "module" in static.get("labels", {}):
            modules.add(static["labels"]["module"])
    return modules


def test_prometheus_documents_valid_modules_for_the_daemon_jobs() -> None:
    config = parse_config(documented_daemon_modules(), "prometheus.yml comments")
    modules = config.modules
    assert set(modules) == {"chrony_udp", "chrony", "ntpd"}
    jobs = scrape_jobs()
    assert job_modules(jobs["ntp_chrony"]) == {"chrony_udp"}
    assert job_modules(jobs["ntp_ntpd"]) == {"ntpd"}
    assert job_modules(jobs["ntp_chrony_agent"]) == {"chrony"}
    assert jobs["ntp_chrony_agent"]["params"]["target"] == ["localhost"]
    text = documented_daemon_modules()
    assert "socket: /run/chrony/chronyd.sock" in text and "port: 323" in text
    # Every module a shipped job names is packaged or documented there.
    used = set().union(*(job_modules(j) for j in jobs.values()))
    assert not used - PACKAGED_MODULES - set(modules), sorted(used - PACKAGED_MODULES)


# --- metric names used by the shipped files exist ------------------------------------------

NAME = re.compile(r"(?<![\w:])((?:probe|ntp_probe)_[a-z0-9_]+)(?![\w:])")


def internal_names() -> set[str]:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                "info": ("_info",)}
    names = set()
    for family in Internals().registry.collect():
        names.add(family.name)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ()))
        names.update(s.name for s in family.samples)
    return names


def used_metric_names() -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}

    def add(where: str, text: str) -> None:
        for name in NAME.findall(text):
            used.setdefault(name, set()).add(where)

    for p in walk(dashboard()["panels"]):
        for t in p.get("targets", []):
            add(f"dashboard: {p['title']}", t["expr"])
    for v in dashboard()["templating"]["list"]:
        add("dashboard variables", json.dumps(v.get("query", "")))
    for path in sorted((PROM_DIR / "rules").glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                add(rel(path), rule["expr"])
    for job in yaml.safe_load((PROM_DIR / "migration_relabel.yml").read_text())["scrape_configs"]:
        for r in job.get("metric_relabel_configs", []):
            regex = r.get("regex", "")
            m = re.fullmatch(r"([a-z_]+)\(([a-z_|]+)\)", regex)
            for name in ([m.group(1) + alt for alt in m.group(2).split("|")] if m else [regex]):
                add("migration_relabel.yml", name)
    return used


def test_shipped_files_use_only_existing_metric_names() -> None:
    known = {f.name for f in declared()} | internal_names()
    used = used_metric_names()
    assert "probe_kernel_coherence_score" in used and "ntp_probe_probes_total" in used
    unknown = {name: sorted(where) for name, where in used.items() if name not in known}
    assert not unknown, unknown


# --- compose, Dockerfile, telegraf ----------------------------------------------------------


def test_compose_mounts_files_that_exist() -> None:
    compose = yaml.safe_load((EXAMPLES / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"ntp-probe", "prometheus", "grafana"} <= set(services)
    mounts = [v.split(":")[0] for s in services.values() for v in s.get("volumes", [])
              if v.startswith(".")]
    for source in mounts:
        assert (EXAMPLES / source).exists(), source
    dashboards = [m for m in mounts if m.endswith(".json")]
    assert [(EXAMPLES / m).resolve() for m in dashboards] == [DASHBOARD.resolve()]
    assert any("grafana-provisioning/dashboards" in m for m in mounts)
    assert any("grafana-provisioning/datasources" in m for m in mounts)
    build = services["ntp-probe"]["build"]
    assert (EXAMPLES / build["context"] / build["dockerfile"]).resolve() == (
        EXAMPLES / "Dockerfile").resolve()
    # The exporter's service name is the address the shipped prometheus.yml scrapes.
    assert "ntp-probe:9559" in (PROM_DIR / "prometheus.yml").read_text()


def test_the_compose_exporter_has_every_module_the_shipped_prometheus_yml_scrapes() -> None:
    """The demo mounts the shipped prometheus.yml, whose daemon jobs ask for modules the
    packaged defaults lack: without them those scrapes would get 400 (unknown module)."""
    service = yaml.safe_load((EXAMPLES / "docker-compose.yml").read_text())["services"][
        "ntp-probe"]
    mounts = dict(v.split(":")[:2] for v in service["volumes"])
    in_container = service["environment"]["NTP_PROBE_CONFIG_FILE"]
    source = next(s for s, target in mounts.items() if target == in_container)
    config = load_config(str(EXAMPLES / source))
    prom = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    scraped = {m for job in prom["scrape_configs"]
               for m in job.get("params", {}).get("module", [])}
    scraped |= {group["labels"]["module"] for job in prom["scrape_configs"]
                for group in job.get("static_configs", []) if "module" in group.get("labels", {})}
    assert {"chrony_udp", "chrony", "ntpd"} <= scraped
    assert scraped <= set(config.modules), scraped - set(config.modules)
    # Its copies of packaged modules are the packaged ones, setting for setting.
    packaged = load_config(None).modules
    for name in set(config.modules) & set(packaged):
        assert module_to_dict(config.modules[name]) == module_to_dict(packaged[name]), name


def test_grafana_provisioning_points_at_the_mounted_dashboard() -> None:
    compose = yaml.safe_load((EXAMPLES / "docker-compose.yml").read_text())
    grafana_mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    provider = yaml.safe_load(
        (EXAMPLES / "grafana-provisioning" / "dashboards" / "ntp_probe.yml").read_text()
    )["providers"][0]
    in_container = grafana_mounts["../prometheus/grafana/ntp_probe.json"]
    assert Path(in_container).parent == Path(provider["options"]["path"])
    datasources = yaml.safe_load(
        (EXAMPLES / "grafana-provisioning" / "datasources" / "prometheus.yml").read_text()
    )["datasources"]
    assert datasources[0]["type"] == "prometheus"
    assert datasources[0]["url"].startswith("http://prometheus:")


def test_dockerfile() -> None:
    text = (EXAMPLES / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))  # continuation lines
    instructions: list[tuple[str, str]] = []
    for line in joined.splitlines():
        if line:
            keyword, _, rest = line.partition(" ")
            assert keyword.isupper() and rest, line
            instructions.append((keyword, rest.strip()))
    get = dict(instructions)
    assert get["FROM"] == "python:3.11-slim"
    user = get["USER"].split(":")[0]
    assert user not in ("root", "0")
    assert get["EXPOSE"] == "9559"
    assert json.loads(get["ENTRYPOINT"]) == ["ntp-probe"]
    assert any(k == "RUN" and "pip install ." in v for k, v in instructions)
    for k, v in instructions:
        if k == "COPY":
            for source in v.split()[:-1]:
                assert (ROOT / source).exists(), source  # build context: the repository root


def test_telegraf_config() -> None:
    conf = tomllib.loads((EXAMPLES / "telegraf" / "ntp_probe.conf").read_text())
    inputs = conf["inputs"]["prometheus"]
    probes = [u for i in inputs for u in i["urls"] if "/probe?" in u]
    assert probes
    for url in probes:
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
        assert q["target"] and q["module"][0] in PACKAGED_MODULES, url
    assert any(u.endswith("/metrics") for i in inputs for u in i["urls"])
