"""The layering rules, the one prober registry, and the schema-driven configuration."""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import ntp_probe
from ntp_probe.config.load import (
    dump_block,
    load_config,
    module_to_dict,
    parse_block,
    parse_config,
)
from ntp_probe.config.schema import (
    BLOCKS,
    Address,
    Choice,
    Duration,
    Flag,
    IntList,
    IntRange,
    NTPSettings,
    Text,
    Time,
)
from ntp_probe.engine.registry import PROBERS, probe_function
from ntp_probe.engine.result import Reason
from ntp_probe.exposition import families
from ntp_probe.probers import hybrid, kernel, ntp
from ntp_probe.probers.common import ip_hash

PACKAGE = Path(__file__).resolve().parents[2] / "ntp_probe"


def imports_of(path: Path) -> set[str]:
    """Absolute module names a source file imports (relative imports are not used here)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def layer_files(layer: str) -> list[Path]:
    return sorted((PACKAGE / layer).rglob("*.py"))


# layer -> ntp_probe subpackages it must not import
FORBIDDEN = {
    "proto": ("net", "engine", "probers", "safety", "exposition", "config", "web", "cli"),
    "net": ("engine", "probers", "safety", "exposition", "config", "web", "cli"),
    "safety": ("net", "engine", "probers", "exposition", "config", "web", "cli"),
    "exposition": ("net", "probers", "proto", "safety", "config", "web", "cli"),
    "engine": ("web", "cli"),
    "probers": ("web", "cli"),
    "config": ("web", "cli", "net"),
    "web": ("probers", "proto", "net"),
    "cli": ("probers", "proto", "net"),
}


@pytest.mark.parametrize("layer", list(FORBIDDEN))
def test_layers_import_only_what_the_layout_allows(layer: str) -> None:
    bad = []
    for path in layer_files(layer):
        for name in imports_of(path):
            parts = name.split(".")
            if parts[0] == "ntp_probe" and len(parts) > 1 and parts[1] in FORBIDDEN[layer]:
                bad.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not bad, "\n".join(bad)


def test_a_check_or_a_probe_does_not_load_the_web_stack() -> None:
    # A Nagios check runs within its -t, its start-up included: aiohttp's import alone
    # took a third of a second.
    code = ("import sys; from ntp_probe.cli import main; "
            "rc = main.main(['check', 'no such target:x']); "
            "rc2 = main.main(['probe', 'no such target:x']); "
            "print(rc, rc2, sorted(m for m in sys.modules if m.split('.')[0] == 'aiohttp'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.stdout.strip().endswith("3 2 []"), (done.stdout, done.stderr)


def test_proto_is_sans_io() -> None:
    bad = [f"{p.relative_to(PACKAGE)}: {name}"
           for p in layer_files("proto") for name in imports_of(p)
           if name.split(".")[0] in ("asyncio", "socket", "selectors", "ssl", "subprocess")]
    assert not bad, bad


def test_a_prober_imports_another_only_to_compose_it() -> None:
    for path in layer_files("probers"):
        others = {n.split(".")[2] for n in imports_of(path)
                  if n.startswith("ntp_probe.probers.") and len(n.split(".")) > 2}
        # Shared helpers, not probers: the network preamble, the leap-file check, the pace.
        others -= {"common", "leapcheck", "pacing"}
        # nts_session is the nts prober's own work, split off so that its TLS stack is
        # imported on the first NTS probe only.
        allowed = {"hybrid": {"ntp", "kernel"}, "nts": {"ntp"}, "nts_session": {"ntp", "nts"},
                   "group": {"ntp"}}.get(path.stem, set())
        assert others <= allowed, f"{path.name} imports probers {sorted(others)}"


# --- the registry ---------------------------------------------------------------------

def test_every_family_in_the_registry_is_declared_once() -> None:
    declared = families.declared()
    for spec in PROBERS.values():
        assert set(spec.families) <= set(declared), spec.name
        assert len(spec.families) == len(set(spec.families)), spec.name
    registered = {f for spec in PROBERS.values() for f in spec.families}
    assert registered == set(declared)  # no family that no prober emits


def test_every_reason_belongs_to_a_prober() -> None:
    used = {r for spec in PROBERS.values() for r in spec.reasons}
    assert used == set(Reason)


def test_a_probe_its_deadline_cuts_off_fails_with_a_reason_of_its_prober() -> None:
    # A daemon's command port timing out is chrony_timeout or mode6_timeout, not the NTP
    # server's `timeout` (which pages as NTPServerUnreachable).
    assert PROBERS["chrony"].timeout is Reason.CHRONY_TIMEOUT
    assert PROBERS["ntpd"].timeout is Reason.MODE6_TIMEOUT
    assert PROBERS["ntp"].timeout is Reason.TIMEOUT
    for spec in PROBERS.values():
        assert spec.timeout in spec.reasons, spec.name


def test_modules_reach_their_probe_function() -> None:
    config = parse_config(
        "modules:\n  n: {prober: ntp}\n  k: {prober: kernel}\n"
        "  h: {prober: ntp, ntp: {kernel_correlation: true}}\n", "t")
    assert probe_function(config.modules["n"]) is ntp.probe
    assert probe_function(config.modules["k"]) is kernel.probe
    assert probe_function(config.modules["h"]) is hybrid.probe


def test_unknown_prober_lists_the_registry() -> None:
    with pytest.raises(ValueError, match="known: ntp, chrony, ntpd, ntp_group, nts, kernel"):
        parse_config("modules:\n  x: {prober: gps}\n", "t")


def test_a_settings_block_is_refused_for_a_prober_that_does_not_read_it() -> None:
    with pytest.raises(ValueError, match=r"modules\.k\.ntp: only for modules with prober: ntp"):
        parse_config("modules:\n  k: {prober: kernel, ntp: {samples: 2}}\n", "t")


# --- the schema -----------------------------------------------------------------------

def _other_value(kind: object, default: object) -> object:
    """A valid YAML value for a field of ``kind`` that differs from its default."""
    if isinstance(kind, IntRange):
        return kind.hi if default != kind.hi else kind.lo
    if isinstance(kind, Duration):
        # No default is 1.25 s (or 100 s), every maximum is longer, every minimum shorter.
        return "1.25s" if kind.minimum <= 1.25 else "100s"
    if isinstance(kind, Text):
        return "/run/test/some.sock"
    if isinstance(kind, Address):
        return "192.0.2.7"
    if isinstance(kind, Choice):
        return next(o for o in kind.options if o != default)
    if isinstance(kind, Flag):
        return not default
    if isinstance(kind, Time):
        return "2030-05-06T07:08:09Z"
    if isinstance(kind, IntList):
        return list(reversed(kind.options))
    raise AssertionError(f"no test value for {kind!r}")


@pytest.mark.parametrize("block", list(BLOCKS))
def test_every_field_is_read_and_written_back(block: str) -> None:
    """Each field: a non-default value in YAML is parsed, kept, and written back the same."""
    cls = BLOCKS[block]
    for f in dataclasses.fields(cls):
        kind = f.metadata["kind"]  # every field declares its kind
        raw = {f.name: _other_value(kind, f.default)}
        settings = parse_block(cls, raw, block)
        assert getattr(settings, f.name) != f.default, f.name
        again = parse_block(cls, dump_block(settings), block)
        assert again == settings, f.name


def test_module_to_dict_round_trips_through_the_parser() -> None:
    text = ("modules:\n  m:\n    prober: ntp\n    description: A test module\n"
            "    timeout: 3s\n    min_probe_interval: 30s\n"
            "    allowed_targets: [192.0.2.0/24]\n    ntp: {samples: 5, reply_timeout: 250ms}\n")
    module = parse_config(text, "t").modules["m"]
    again = parse_config(yaml.safe_dump({"modules": {"m": module_to_dict(module)}}), "t")
    assert again.modules["m"] == module


@pytest.mark.parametrize("bad", ["[a, b]", '"two\\nlines"', '"' + "x" * 201 + '"'])
def test_a_description_is_one_line_of_text(bad: str) -> None:
    with pytest.raises(ValueError, match=r"modules\.m\.description: expected one line"):
        parse_config(f"modules:\n  m:\n    description: {bad}\n", "t")


def test_packaged_modules_all_have_descriptions() -> None:
    assert all(m.description for m in load_config(None).modules.values())


def test_ntp_settings_defaults_match_the_packaged_ntp_module() -> None:
    assert load_config(None).modules["ntp"].ntp == NTPSettings()


# --- probe_ip_addr_hash ---------------------------------------------------------------

def fnv1a_32(data: bytes) -> int:
    h = 2166136261
    for byte in data:
        h ^= byte
        h = (h * 16777619) % (1 << 32)
    return h


@pytest.mark.parametrize(("address", "data"), [
    ("127.0.0.1", bytes([127, 0, 0, 1])),
    ("192.0.2.33", bytes([192, 0, 2, 33])),
    ("::ffff:127.0.0.1", bytes([127, 0, 0, 1])),  # Go's To4() makes it 4 bytes
    ("::1", bytes(15) + b"\x01"),
    ("2001:db8::1", bytes.fromhex("20010db8000000000000000000000001")),
    ("fe80::1%1", bytes.fromhex("fe800000000000000000000000000001")),
])
def test_ip_hash_is_blackbox_exporters(address: str, data: bytes) -> None:
    assert ip_hash(address) == fnv1a_32(data)


def test_the_tls_stack_is_imported_only_by_an_nts_probe() -> None:
    """pyOpenSSL, cryptography and service_identity (about 10 MB) are the NTS prober's
    alone: the exporter starts without them, and the first NTS probes (concurrent ones
    included) bring them."""
    heavy = ("OpenSSL", "cryptography", "service_identity")
    script = (
        "import asyncio, json, sys\n"
        "from ntp_probe.cli.main import main\n"
        "from ntp_probe.config.load import load_config\n"
        "from ntp_probe.engine.runner import run_probe\n"
        "from ntp_probe.engine.targets import parse_target\n"
        f"heavy = {heavy!r}\n"
        "before = [m for m in heavy if m in sys.modules]\n"
        "module = load_config(None).modules['nts']\n"
        "async def first_probes():\n"
        "    # Several at once, as Prometheus scrapes NTS targets after a start.\n"
        "    return await asyncio.gather(*(run_probe(parse_target(f'127.0.0.{i}:9'), module,\n"
        "                                            2.0) for i in range(1, 5)))\n"
        "results = asyncio.run(first_probes())\n"
        "assert all(m.failure is not None for m, _ in results), results\n"
        "print(json.dumps([before, [m for m in heavy if m in sys.modules]]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    before, after = json.loads(done.stdout)
    assert before == []
    assert after == list(heavy)


def test_the_version_is_written_once_and_not_read_from_metadata_at_run_time() -> None:
    """pyproject.toml takes the version from ``ntp_probe.__version__``; the exporter does
    not load importlib.metadata (and zipfile, email, csv with it) to read it back."""
    assert importlib.metadata.version("ntp-probe") == ntp_probe.__version__
    script = ("import sys\n"
              "import ntp_probe.cli.main, ntp_probe.cli.serve, ntp_probe.web.app\n"
              "print('importlib.metadata' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
