"""promtool on the shipped Prometheus files: config, relabeling (offline service
discovery), rules, rule unit tests, and the rule that every alert is unit-tested firing
and not firing (so a new alert without tests fails the suite).

Rule files are found, not listed: every prometheus/rules/*.yml is checked, and must have
its unit tests in prometheus/rules/tests/<name>_test.yml (which loads it).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import require_binary

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROM_DIR = ROOT / "prometheus"
SHIPPED_CONFIG = PROM_DIR / "prometheus.yml"
MIGRATION_CONFIG = PROM_DIR / "migration_relabel.yml"
RULE_FILES = sorted((PROM_DIR / "rules").glob("*.yml"))
RULE_TEST_FILES = sorted((PROM_DIR / "rules" / "tests").glob("*.yml"))
# Rule files this suite was written with; others (found by the glob) are checked the same way.
KNOWN_RULE_FILES = {"ntp_alerts.yml", "ntp_recording.yml", "ntp_daemon_alerts.yml",
                    "ntp_nts_alerts.yml", "ntp_fleet_alerts.yml"}
SEVERITIES = {"info", "warning", "critical"}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_binary("promtool"), *args], capture_output=True, text=True, timeout=60,
        cwd=cwd, stdin=subprocess.DEVNULL,
    )


def alerting_rules() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            out.extend(r for r in group["rules"] if "alert" in r)
    return out


def recording_rules() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            out.extend(r for r in group["rules"] if "record" in r)
    return out


def test_shipped_files_exist() -> None:
    assert {p.name for p in RULE_FILES} >= KNOWN_RULE_FILES
    assert list((PROM_DIR / "targets").glob("*.yml")), "example file_sd targets"


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_every_rule_file_has_its_unit_tests(path: Path) -> None:
    """rules/X.yml -> rules/tests/X_test.yml, and that test file loads X.yml."""
    tests = PROM_DIR / "rules" / "tests" / f"{path.stem}_test.yml"
    assert tests.is_file(), f"{path.name}: no unit tests at {tests.relative_to(ROOT)}"
    loaded = {(tests.parent / f).resolve() for f in yaml.safe_load(tests.read_text())["rule_files"]}
    assert path.resolve() in loaded, f"{tests.name} does not load {path.name}"


def test_every_unit_test_file_belongs_to_a_rule_file() -> None:
    stems = {p.stem for p in RULE_FILES}
    orphans = [p.name for p in RULE_TEST_FILES if p.name.removesuffix("_test.yml") not in stems]
    assert not orphans, f"unit tests without a rules/<name>.yml: {orphans}"


def test_shipped_config_loads_every_rule_file() -> None:
    """prometheus.yml's rule_files (a glob) cover every rules/*.yml."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    loaded = {p.resolve() for pattern in config["rule_files"] for p in PROM_DIR.glob(pattern)}
    assert loaded == {p.resolve() for p in RULE_FILES}


def test_check_config_shipped() -> None:
    done = promtool("check", "config", str(SHIPPED_CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in done.stdout + done.stderr


def test_check_config_rejects_a_broken_copy(tmp_path: Path) -> None:
    """The check above can fail: the same file with a missing rule file does."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    config["rule_files"] = [str(tmp_path / "missing.yml")]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    done = promtool("check", "config", str(path))
    assert done.returncode != 0


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_check_rules(path: Path) -> None:
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@pytest.mark.parametrize("path", RULE_TEST_FILES, ids=lambda p: p.name)
def test_rule_unit_tests(path: Path) -> None:
    done = promtool("test", "rules", path.name, cwd=path.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_rule_unit_tests_catch_a_changed_threshold(tmp_path: Path) -> None:
    """The unit tests bind the thresholds: moving the critical offset to 300 ms fails them."""
    shutil.copytree(PROM_DIR / "rules", tmp_path / "rules")
    alerts = tmp_path / "rules" / "ntp_alerts.yml"
    text = alerts.read_text()
    assert "abs(probe_ntp_offset_seconds)) > 0.100" in text
    alerts.write_text(text.replace("abs(probe_ntp_offset_seconds)) > 0.100",
                                   "abs(probe_ntp_offset_seconds)) > 0.300"))
    done = promtool("test", "rules", "ntp_alerts_test.yml", cwd=tmp_path / "rules" / "tests")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "alertname: NTPOffsetCritical" in done.stdout + done.stderr


@pytest.mark.parametrize(("old", "new", "alert"), [
    (") >= 2", ") >= 3", "NTPDaemonFewCandidates"),        # N, the value to adjust
    ("packets_dropped_total[10m]) > 1", "packets_dropped_total[10m]) > 5",
     "NTPDaemonPacketsDropped"),
    ('refid="POOL"', 'refid="none"', "NTPDaemonSourceUnreachable"),
])
def test_daemon_rule_unit_tests_catch_a_changed_rule(
    tmp_path: Path, old: str, new: str, alert: str
) -> None:
    """The daemon alerts' tests bind their thresholds and exclusions too."""
    shutil.copytree(PROM_DIR / "rules", tmp_path / "rules")
    rules = tmp_path / "rules" / "ntp_daemon_alerts.yml"
    text = rules.read_text()
    assert old in text
    rules.write_text(text.replace(old, new))
    done = promtool("test", "rules", "ntp_daemon_alerts_test.yml",
                    cwd=tmp_path / "rules" / "tests")
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"alertname: {alert}" in done.stdout + done.stderr


def test_every_alert_has_labels_and_annotations() -> None:
    alerts = alerting_rules()
    assert len(alerts) >= 20
    names = [a["alert"] for a in alerts]
    assert len(names) == len(set(names)), "alert names must be unique"
    for a in alerts:
        assert a.get("labels", {}).get("severity") in SEVERITIES, a["alert"]
        annotations = a.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), a["alert"]
        assert "for" in a, f"{a['alert']}: state `for:` explicitly (0m is fine)"


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TEST_FILES:
        for test in yaml.safe_load(path.read_text()).get("tests", []):
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {a["alert"] for a in alerting_rules()}
    assert not names - firing, f"alerts never tested firing: {sorted(names - firing)}"
    assert not names - quiet, f"alerts never tested not firing: {sorted(names - quiet)}"
    unknown = (firing | quiet) - names
    assert not unknown, f"tests of unknown alerts: {sorted(unknown)}"


def test_every_recording_rule_is_tested() -> None:
    tested: set[str] = set()
    for path in RULE_TEST_FILES:
        for test in yaml.safe_load(path.read_text()).get("tests", []):
            tested.update(case["expr"] for case in test.get("promql_expr_test", []))
    names = {r["record"] for r in recording_rules()}
    assert not names - tested, f"recording rules without a test: {sorted(names - tested)}"


def test_migration_relabel_config() -> None:
    done = promtool("check", "config", str(MIGRATION_CONFIG))
    assert done.returncode == 0, done.stdout + done.stderr


def test_migration_relabel_inside_the_shipped_config(tmp_path: Path) -> None:
    """The legacy metric_relabel_configs pasted into the shipped `ntp` job still validate."""
    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    migration = yaml.safe_load(MIGRATION_CONFIG.read_text())
    legacy = {j["job_name"]: j for j in migration["scrape_configs"]}
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    for job, old in (("ntp", "legacy_sapcc"), ("ntp_agent", "node_ntp_legacy")):
        jobs[job]["metric_relabel_configs"] = legacy[old]["metric_relabel_configs"]
    config["rule_files"] = [str(PROM_DIR / f) for f in config["rule_files"]]
    for job in config["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            sd["files"] = [str(PROM_DIR / f) for f in sd["files"]]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    done = promtool("check", "config", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


# --- relabeling, offline ----------------------------------------------------------------


def discover(jobs: list[str]) -> dict[str, list[dict[str, str]]]:
    """`promtool check service-discovery` for several jobs at once -> relabeled labels."""
    binary = require_binary("promtool")
    procs = {
        job: subprocess.Popen(
            [binary, "check", "service-discovery", "--timeout=1s", str(SHIPPED_CONFIG), job],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
        )
        for job in jobs
    }
    out = {}
    for job, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, stdout + stderr
        found = json.loads(stdout[stdout.index("["):])
        out[job] = [t["labels"] for t in found if t.get("labels")]
    return out


def test_relabeling_of_the_shipped_jobs() -> None:
    found = discover(["ntp", "ntp_file_sd", "ntp_agent", "ntp_shard_0", "ntp_shard_1",
                      "ntp_chrony", "ntp_ntpd", "ntp_chrony_agent"])

    config = yaml.safe_load(SHIPPED_CONFIG.read_text())
    shipped = {j["job_name"]: j for j in config["scrape_configs"]}
    static = shipped["ntp"]["static_configs"][0]["targets"]
    assert sorted(t["instance"] for t in found["ntp"]) == sorted(static)
    for t in found["ntp"]:
        assert t["__param_target"] == t["instance"]
        assert t["__address__"] == "ntp-probe:9559" and t["__metrics_path__"] == "/probe"
        assert (t["module"], t["__param_module"], t["group"]) == ("ntp", "ntp", "core")

    # file_sd: a group's `module` label picks the module; the others keep the job's.
    modules = {t["instance"]: (t["group"], t["module"], t["__param_module"])
               for t in found["ntp_file_sd"]}
    assert modules["ntp1.example.net"] == ("datacenter", "ntp", "ntp")
    assert modules["0.pool.example.org"] == ("pool", "ntp_fast", "ntp_fast")

    # agent: every node three times (local, hybrid, kernel), target fixed to the loopback.
    agent = sorted((t["instance"], t["module"]) for t in found["ntp_agent"])
    nodes = ["node1.example.net:9559", "node2.example.net:9559"]
    assert agent == sorted((n, m) for n in nodes for m in ("local", "hybrid", "kernel"))
    for t in found["ntp_agent"]:
        assert t["__param_module"] == t["module"] and t["__param_target"] == "127.0.0.1"
        assert t["__address__"] == t["instance"]

    # sharding: the two jobs split the sharded targets with no overlap, by hashmod.
    sharded_file = yaml.safe_load((PROM_DIR / "targets" / "sharded" / "example.yml").read_text())
    all_targets = sorted(t for group in sharded_file for t in group["targets"])
    shard = {t["instance"]: (i, t) for i in (0, 1) for t in found[f"ntp_shard_{i}"]}
    assert sorted(shard) == all_targets
    assert len(found["ntp_shard_0"]) + len(found["ntp_shard_1"]) == len(all_targets)
    for target, (i, labels) in shard.items():
        want = int.from_bytes(hashlib.md5(target.encode()).digest()[8:], "big") % 2
        assert i == want, target
        assert labels["__address__"] == f"ntp-probe-{i}:9559"
        assert labels["job"] == "ntp_sharded"

    # The daemons' jobs: central chrony (UDP 323) and ntpd as the static job; the chrony
    # agent like ntp_agent, its target fixed to the host's own daemon (unix socket).
    for job, module in (("ntp_chrony", "chrony_udp"), ("ntp_ntpd", "ntpd")):
        want = shipped[job]["static_configs"][0]["targets"]
        assert sorted(t["instance"] for t in found[job]) == sorted(want), job
        for t in found[job]:
            assert t["__param_target"] == t["instance"], job
            assert t["__address__"] == "ntp-probe:9559" and t["__metrics_path__"] == "/probe"
            assert (t["module"], t["__param_module"]) == (module, module), job
    assert all(t["instance"].endswith(":323") for t in found["ntp_chrony"])
    chrony_agent = sorted(t["instance"] for t in found["ntp_chrony_agent"])
    assert chrony_agent == nodes
    for t in found["ntp_chrony_agent"]:
        assert (t["module"], t["__param_module"], t["__param_target"]) == (
            "chrony", "chrony", "localhost")
        assert t["__address__"] == t["instance"] and t["__metrics_path__"] == "/probe"


def test_fleet_rule_tests_bind_the_consensus_threshold(tmp_path: Path) -> None:
    """Moving the exporter-clock threshold from 10 ms to 30 ms fails the fleet unit tests."""
    shutil.copytree(PROM_DIR / "rules", tmp_path / "rules")
    alerts = tmp_path / "rules" / "ntp_fleet_alerts.yml"
    text = alerts.read_text()
    assert "abs(probe_ntp_group_local_clock_offset_seconds) > 0.010" in text
    alerts.write_text(text.replace("abs(probe_ntp_group_local_clock_offset_seconds) > 0.010",
                                   "abs(probe_ntp_group_local_clock_offset_seconds) > 0.030"))
    done = promtool("test", "rules", "ntp_fleet_alerts_test.yml",
                    cwd=tmp_path / "rules" / "tests")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "alertname: NTPExporterClockOffConsensus" in done.stdout + done.stderr
