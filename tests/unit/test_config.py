"""modules.yaml parsing (ntp_probe.config): defaults, durations, strictness, round trip."""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path

import pytest

from ntp_probe.config.load import config_to_yaml, config_warnings, load_config, parse_config
from ntp_probe.config.schema import (
    SUN_PATH_MAX,
    UNIX_REPLY_NAME_MAX,
    Config,
    ConfigError,
    Module,
    NTPSettings,
    format_duration,
    parse_duration,
)
from ntp_probe.probers import chrony
from tests.conftest import crl_only_pem
from tests.unit.test_leapfile import REAL_ENTRIES, build

REPO_ROOT = Path(__file__).resolve().parents[2]
JAN_2024 = 1_704_067_200.0


def problem(error: object) -> str:
    """An error line without its FILE:LINE:COL prefix."""
    return re.sub(r"^[^:\n]+:\d+:\d+: ", "", str(error))


def parse(text: str) -> Config:
    return parse_config(text, "test.yaml")


def module_yaml(ntp_block: str = "", extra: str = "") -> str:
    """One module 'm' with the given (already indented) ntp: lines."""
    text = "modules:\n  m:\n    prober: ntp\n"
    text += extra
    if ntp_block:
        text += "    ntp:\n" + ntp_block
    return text


# --- packaged default ---------------------------------------------------------------


def test_packaged_default_modules() -> None:
    cfg = load_config(None)
    assert cfg.source == "packaged default"
    assert {"ntp", "ntp_fast", "local"} <= set(cfg.modules)


@pytest.mark.parametrize(("prober", "samples", "interval", "warned"), [
    ("ntp", 4, "10m", "every burst sends at most 1"),  # 10m for 10ms: loads, but warned
    ("ntp_group", 5, "1s", "every burst sends at most 2"),
    ("ntp", 3, "900ms", None),  # 1.8 s and the reply's window fit 2 s
    ("chrony", 9, "1h", None),  # its ntp block is not read
])
def test_a_burst_that_can_never_be_sent_whole_is_warned_about(
        prober: str, samples: int, interval: str, warned: str | None) -> None:
    block = "" if prober == "chrony" else (
        f"    ntp: {{samples: {samples}, sample_interval: {interval}}}\n")
    config = parse_config(f"modules:\n  m:\n    prober: {prober}\n    timeout: 2s\n{block}",
                          "t")
    warnings = config_warnings(config, 0)
    if warned is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warned in warnings[0], warnings
        assert f"{samples} samples every {interval}" in warnings[0]
    assert config_warnings(load_config(None), 0) == []  # the packaged modules: none


def test_packaged_ntp_module_matches_design() -> None:
    m = load_config(None).modules["ntp"]
    assert m.name == "ntp"
    assert m.prober == "ntp"
    assert m.timeout == 10.0
    n = m.ntp
    assert n.port == 123
    assert n.version == 4
    assert n.samples == 3
    assert n.sample_interval == 2.0
    assert n.preferred_ip_protocol == "ip6"
    assert n.ip_protocol_fallback is True
    assert n.max_root_distance == 1.5
    assert n.max_stratum == 15
    assert n.max_reference_age == 36 * 3600.0
    assert n.fail_if_offset_exceeds == 0.0
    assert n.max_causality_violation == 0.0
    assert n.min_plausible_time == JAN_2024
    assert n.reply_timeout == 1.0
    # The packaged module spells out exactly the dataclass defaults.
    assert n == NTPSettings()


def test_packaged_ntp_fast_module() -> None:
    m = load_config(None).modules["ntp_fast"]
    assert m.prober == "ntp"
    assert m.ntp.samples == 1
    assert m.ntp.reply_timeout == 1.0
    assert 0 < m.timeout <= 10.0


def test_packaged_local_module() -> None:
    m = load_config(None).modules["local"]
    assert m.prober == "ntp"
    assert m.ntp.samples == 4
    assert m.ntp.sample_interval == pytest.approx(0.010)
    assert m.ntp.max_causality_violation == pytest.approx(0.001)
    assert m.ntp.max_root_distance == pytest.approx(3.46608)
    assert m.ntp.preferred_ip_protocol == "ip4"
    # The whole burst fits inside the module timeout.
    n = m.ntp
    assert (n.samples - 1) * n.sample_interval + n.reply_timeout <= m.timeout


def test_repo_root_modules_yaml_is_the_packaged_one() -> None:
    root = (REPO_ROOT / "modules.yaml").read_text("utf-8")
    packaged = resources.files("ntp_probe").joinpath("modules.yaml").read_text("utf-8")
    assert root == packaged
    assert load_config(str(REPO_ROOT / "modules.yaml")).modules == load_config(None).modules


def test_load_config_from_file(tmp_path: Path) -> None:
    path = tmp_path / "m.yaml"
    path.write_text("modules:\n  only:\n    timeout: 3s\n", "utf-8")
    cfg = load_config(str(path))
    assert cfg.source == str(path)
    assert list(cfg.modules) == ["only"]
    assert cfg.modules["only"] == Module(name="only", timeout=3.0)


def test_load_config_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="cannot read") as exc:
        load_config(str(path))
    assert str(path) in str(exc.value)


# --- durations ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1m30s", 90.0),
        ("500ms", 0.5),
        ("0", 0.0),
        ("0s", 0.0),
        ("36h", 129600.0),
        ("10s", 10.0),
        ("1.5s", 1.5),
        ("3.46608s", 3.46608),
        ("1d", 86400.0),
        ("1w", 604800.0),
        ("1h2m3s", 3723.0),
        ("250us", 250e-6),
        ("  10s  ", 10.0),
        (0, 0.0),
        (0.0, 0.0),
    ],
)
def test_parse_duration_valid(text: object, seconds: float) -> None:
    assert parse_duration(text, "k") == pytest.approx(seconds, rel=1e-12)


@pytest.mark.parametrize(
    "value",
    ["abc", "10", "-1s", "", "s", "1.s", ".5s", "1 s", "10S", "1e3s", "0.0", "10s junk",
     "0.1ns", "0.4ns",  # would round to 0, which means "off" where 0 does
     5, 1.5, -1, True, False, None, [1], {"a": 1}],
)
def test_parse_duration_invalid(value: object) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_duration(value, "modules.x.timeout")
    assert problem(exc.value).startswith("modules.x.timeout: ")


def test_numeric_duration_error_suggests_unit() -> None:
    with pytest.raises(ConfigError, match="needs a unit"):
        parse_duration(5, "k")
    for value in (-5, float("inf"), float("nan")):  # no unit would make them durations
        with pytest.raises(ConfigError, match="expected a duration like 10s") as exc:
            parse_duration(value, "k")
        assert "needs a unit" not in str(exc.value)


def test_a_huge_unknown_key_is_shown_by_its_ends() -> None:
    # A 20,000-character key must not make a 20 KB log line or reload answer.
    key = "k" + "x" * 20_000 + "z"
    with pytest.raises(ConfigError) as exc:
        parse_config(f"modules:\n  m:\n    prober: ntp\n    ? {key}\n    : 1\n", "t")
    line = str(exc.value)
    assert len(line) < 600 and "unknown key" in line, line
    assert "modules.m.kxxx" in line and "xxxz: unknown key" in line and "characters)" in line


@pytest.mark.parametrize("value", ["1:23", "1:30.5"])
def test_a_base_60_number_is_refused_not_misread(value: str) -> None:
    # YAML 1.1 reads 1:23 as 83; Go's YAML (blackbox's) refuses it for a number.
    with pytest.raises(ConfigError, match=f"'{value}' is a base-60 number"):
        parse_config(f"modules:\n  m:\n    prober: ntp\n    ntp: {{port: {value}}}\n", "t")
    assert parse_config('modules:\n  m:\n    prober: ntp\n    ntp: {port: 123}\n',
                        "t").modules["m"].ntp.port == 123


@pytest.mark.parametrize("description", ["a\\rb", "a\\e[31mb", "a\\u202eb", "a\\u2028b",
                                         "clock \\ud83d\\udd70 here"])  # a split pair: 500s
def test_a_description_is_one_line_of_text(description: str) -> None:
    # It reaches the landing page, /config and logs: no carriage return, terminal escape
    # or bidi override.
    with pytest.raises(ConfigError, match="one line of text, no control characters"):
        parse_config(f'modules:\n  m:\n    prober: ntp\n    description: "{description}"\n',
                     "t")


@pytest.mark.parametrize("description", [
    "Serveur NTP\\u00a0: principal", "NTP\\u3000サーバー", "\\U0001F469\\u200d\\U0001F4BB",
    "tab\\there"])
def test_a_description_in_any_script_loads(description: str) -> None:
    # Non-breaking and ideographic spaces, joined emoji, a tab: text, not control.
    parse_config(f'modules:\n  m:\n    prober: ntp\n    description: "{description}"\n', "t")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0s"), (10.0, "10s"), (90.0, "90s"), (120.0, "2m"), (129600.0, "36h"),
     (0.5, "500ms"), (1.5, "1500ms"), (0.001, "1ms"), (3.46608, "3.46608s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text, "k") == seconds


@pytest.mark.parametrize("text", ["100ns", "1.2345678s", "1.5ns", "2.0000000004s"])
def test_format_duration_round_trips(text: str) -> None:
    # Durations are whole nanoseconds, so what the dump writes reads back exactly.
    seconds = parse_duration(text, "k")
    assert parse_duration(format_duration(seconds), "k") == seconds


# --- strictness ---------------------------------------------------------------------


def test_unknown_top_level_key() -> None:
    with pytest.raises(ConfigError, match="modulez") as exc:
        parse("modules:\n  m: {}\nmodulez: {}\n")
    assert "unknown key" in str(exc.value)


def test_unknown_module_key_names_full_path() -> None:
    with pytest.raises(ConfigError) as exc:
        parse(module_yaml(extra="    timout: 5s\n"))
    assert problem(exc.value).startswith("modules.m.timout: unknown key")


@pytest.mark.parametrize(("prober", "key", "value"), [
    ("nts", "source_ip_address", "192.0.2.1"),
    ("nts", "all_addresses", "true"),
    ("nts", "port", "4123"),  # the NTP port comes from the key exchange
    ("nts", "kernel_correlation", "true"),
    ("ntp_group", "kernel_correlation", "true"),
    ("ntp_group", "all_addresses", "true"),
    ("ntp_group", "addresses_required", "any"),
])
def test_ntp_keys_a_prober_does_not_use_are_refused(prober: str, key: str, value: str) -> None:
    # Accepted and then ignored, they would read as in force.
    with pytest.raises(ConfigError) as exc:
        parse(f"modules:\n  m:\n    prober: {prober}\n    ntp:\n      {key}: {value}\n")
    assert problem(exc.value) == f"modules.m.ntp.{key}: not used by prober: {prober}"
    # The same key in an ntp module is in force.
    parse(f"modules:\n  m:\n    prober: ntp\n    ntp:\n      {key}: {value}\n")


def test_unknown_ntp_key_names_full_path() -> None:
    text = "modules:\n  ntp:\n    ntp:\n      sampels: 3\n"
    with pytest.raises(ConfigError) as exc:
        parse(text)
    msg = str(exc.value)
    assert problem(msg).startswith("modules.ntp.ntp.sampels: unknown key")
    assert "samples" in msg  # the allowed keys are listed
    assert "\n" not in msg


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("version: 5", "version"),
        ("version: 0", "version"),
        ("port: 0", "port"),
        ("port: 65536", "port"),
        ("samples: 0", "samples"),
        ("samples: 65", "samples"),
        ("max_stratum: 0", "max_stratum"),
        ("max_stratum: 17", "max_stratum"),
        ("samples: true", "samples"),
        ("samples: 2.5", "samples"),
        ("port: '123'", "port"),
        ("preferred_ip_protocol: ip5", "preferred_ip_protocol"),
        ("ip_protocol_fallback: 'yes please'", "ip_protocol_fallback"),
        ("ip_protocol_fallback: 1", "ip_protocol_fallback"),
        ("sample_interval: 2", "sample_interval"),
        ("max_root_distance: -1s", "max_root_distance"),
        ("reply_timeout: 0s", "reply_timeout"),
        ("min_plausible_time: yesterday", "min_plausible_time"),
        ("min_plausible_time: 1704067200", "min_plausible_time"),
        # ISO 8601 forms that are not RFC 3339.
        ("min_plausible_time: '2024-W01-1'", "min_plausible_time"),
        ("min_plausible_time: '20240101T000000Z'", "min_plausible_time"),
        ("min_plausible_time: '2024-01-01T00:00'", "min_plausible_time"),
    ],
)
def test_bad_ntp_values_name_the_key(line: str, key: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(module_yaml(f"      {line}\n"))
    assert problem(exc.value).startswith(f"modules.m.ntp.{key}: ")


@pytest.mark.parametrize(
    ("line", "value"),
    [
        ("version: 1", 1),
        ("version: 4", 4),
        ("port: 1", 1),
        ("port: 65535", 65535),
        ("samples: 64", 64),
        ("max_stratum: 16", 16),
    ],
)
def test_int_range_bounds_accepted(line: str, value: int) -> None:
    cfg = parse(module_yaml(f"      {line}\n"))
    key = line.split(":")[0]
    assert getattr(cfg.modules["m"].ntp, key) == value


@pytest.mark.parametrize(
    "value",
    ["2024-01-01T00:00:00Z", "2024-01-01", "'2024-01-01T00:00:00+00:00'",
     "'2024-01-01T01:00:00+01:00'", "'2024-01-01T00:00:00'",
     "'2024-01-01t00:00:00z'",  # RFC 3339 allows T and Z in lower case
     "'2024-01-01T00:00:00.0000000000Z'"],  # and any number of fraction digits
)
def test_min_plausible_time_forms(value: str) -> None:
    cfg = parse(module_yaml(f"      min_plausible_time: {value}\n"))
    assert cfg.modules["m"].ntp.min_plausible_time == JAN_2024


def test_bad_prober() -> None:
    with pytest.raises(ConfigError) as exc:
        parse("modules:\n  m:\n    prober: http\n")
    assert problem(exc.value).startswith("modules.m.prober: unknown prober 'http'")


@pytest.mark.parametrize("timeout", ["0s", "0", "abc", "5"])
def test_bad_module_timeout(timeout: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(f"modules:\n  m:\n    timeout: {timeout}\n")
    assert problem(exc.value).startswith("modules.m.timeout: ")


def test_module_and_ntp_must_be_mappings() -> None:
    with pytest.raises(ConfigError, match=r"^test\.yaml:\d+:\d+: modules\.m: expected a mapping"):
        parse("modules:\n  m: [1, 2]\n")
    with pytest.raises(ConfigError,
                       match=r"^test\.yaml:\d+:\d+: modules\.m\.ntp: expected a mapping"):
        parse("modules:\n  m:\n    ntp: 3\n")


def test_empty_module_and_ntp_blocks_take_defaults() -> None:
    cfg = parse("modules:\n  a:\n  b: {}\n  c:\n    ntp:\n")
    for name in "abc":
        assert cfg.modules[name] == Module(name=name)


def test_bad_yaml() -> None:
    with pytest.raises(ConfigError) as exc:
        parse("modules:\n  m: {prober: [\n")
    msg = str(exc.value)
    assert re.match(r"test\.yaml:\d+:\d+: invalid YAML", msg), msg
    assert "\n" not in msg


@pytest.mark.parametrize(("text", "where", "char"), [
    ("modules:\n  a: {description: \"x\x00y\"}\n", "2:22", "0000"),
    ("\x00" * 64, "1:1", "0000"),
    ("modules:\n  a: {}\n# \x1b[1m\n", "3:3", "001B"),
    ("modules:\n  a: {description: \"x\x80y\"}\n", "2:22", "0080"),
])
def test_a_control_character_is_a_one_line_error_with_its_place(
        text: str, where: str, char: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse(text)
    assert str(exc.value) == (
        f"test.yaml:{where}: invalid YAML: control character U+{char} is not allowed")


@pytest.mark.parametrize(
    "text", ["modules: {}\n", "modules:\n", "modules: []\n", "modules: 3\n", "{}\n"]
)
def test_empty_or_missing_modules(text: str) -> None:
    with pytest.raises(ConfigError, match="modules"):
        parse(text)


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_top_level_must_be_mapping(text: str) -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse(text)


def test_partial_ntp_block_keeps_other_defaults() -> None:
    cfg = parse(module_yaml("      samples: 5\n      sample_interval: 250ms\n"))
    n = cfg.modules["m"].ntp
    assert (n.samples, n.sample_interval) == (5, 0.25)
    assert n == NTPSettings(samples=5, sample_interval=0.25)


def test_non_string_module_names_become_strings() -> None:
    cfg = parse("modules:\n  123: {}\n")
    assert list(cfg.modules) == ["123"]
    assert cfg.modules["123"].name == "123"


# --- round trip ---------------------------------------------------------------------


def test_config_to_yaml_round_trips_packaged_default() -> None:
    cfg = load_config(None)
    again = parse_config(config_to_yaml(cfg), "again")
    assert again.modules == cfg.modules
    assert list(again.modules) == list(cfg.modules)


def test_config_to_yaml_keeps_non_ascii_text_readable() -> None:
    # /config is read by people: a description in any script comes back as written, not
    # as \u escapes; what YAML cannot carry plainly (a control character) is still escaped.
    cfg = parse_config(
        'modules:\n  münchen: {description: "Zeit über NTP \u2014 \u65e5\u672c \\t"}\n', "t")
    text = config_to_yaml(cfg)
    assert "münchen:" in text and "Zeit über NTP — 日本" in text, text
    assert "\t" not in text
    assert parse_config(text, "again").modules == cfg.modules


def test_config_to_yaml_round_trips_custom_config() -> None:
    text = """
modules:
  custom:
    prober: ntp
    timeout: 1m30s
    ntp:
      port: 4123
      version: 3
      samples: 7
      sample_interval: 125ms
      preferred_ip_protocol: ip4
      ip_protocol_fallback: false
      max_root_distance: 3.46608s
      max_stratum: 3
      max_reference_age: 2d
      fail_if_offset_exceeds: 250ms
      max_causality_violation: 1ms
      min_plausible_time: 2025-06-30T12:34:56.5Z
      reply_timeout: 750ms
  bare: {}
"""
    cfg = parse(text)
    custom = cfg.modules["custom"]
    assert custom.timeout == 90.0
    assert custom.ntp.min_plausible_time == 1_751_286_896.5
    assert custom.ntp.max_reference_age == 172800.0
    again = parse_config(config_to_yaml(cfg), "again")
    assert again.modules == cfg.modules


# --- hostile and broken files: every error at once, with where it is -------------------------


def test_every_problem_is_reported_at_once_with_file_line_and_column() -> None:
    text = ("modules:\n"            # 1
            "  a:\n"                # 2
            "    prober: ntpp\n"    # 3
            "  b:\n"                # 4
            "    timout: 5s\n"      # 5
            "    ntp:\n"            # 6
            "      samples: 3\n"    # 7
            "      samples: 4\n"    # 8
            "      version: 9\n")   # 9
    with pytest.raises(ConfigError) as exc:
        parse(text)
    assert str(exc.value).splitlines() == [
        "test.yaml:3:5: modules.a.prober: unknown prober 'ntpp' (did you mean ntp?)",
        "test.yaml:5:5: modules.b.timout: unknown key (did you mean timeout?)",
        "test.yaml:8:7: duplicate key 'samples' (the later one would silently win)",
        "test.yaml:9:7: modules.b.ntp.version: expected an integer in 1..4, got 9",
    ]


def test_a_yaml_syntax_error_keeps_the_file_and_position() -> None:
    with pytest.raises(ConfigError) as exc:
        parse("modules:\n  a: [1, 2\n  b: 3\n")
    message = str(exc.value)
    assert re.match(r"test\.yaml:\d+:\d+: invalid YAML: ", message), message
    assert "\n" not in message


def test_aliases_are_refused_before_they_expand() -> None:
    bomb = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True))
    assert len(bomb) < 1000  # expanded, it would be 9**9 strings
    with pytest.raises(ConfigError, match=r"test\.yaml:2:\d+: invalid YAML: YAML aliases"):
        parse(bomb)


def test_deep_nesting_is_a_config_error_not_a_recursion_error() -> None:
    with pytest.raises(ConfigError, match="nested more than 32 levels deep"):
        parse("modules: " + "[" * 3000 + "]" * 3000 + "\n")


def test_error_messages_never_quote_more_than_a_line() -> None:
    with pytest.raises(ConfigError) as exc:
        parse("modules:\n  m:\n    timeout: '" + "9" * 10_000 + "s'\n")
    assert len(str(exc.value)) < 300


def test_an_nts_ca_file_is_relative_to_the_config_file_and_must_exist(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "ca.pem").write_text(_self_signed_pem())
    path = tmp_path / "modules.yaml"
    text = "modules:\n  n:\n    prober: nts\n    nts:\n      ca_file: {}\n"
    path.write_text(text.format("certs/ca.pem"))
    assert load_config(str(path)).modules["n"].nts.ca_file == str(tmp_path / "certs" / "ca.pem")
    path.write_text(text.format("certs/missing.pem"))
    with pytest.raises(ConfigError) as exc:
        load_config(str(path))
    assert "modules.n.nts.ca_file: " in str(exc.value), exc.value
    assert str(exc.value).endswith(": No such file or directory"), exc.value  # as it is
    path.write_text(text.format("certs"))
    with pytest.raises(ConfigError, match="certs' is not a file"):
        load_config(str(path))
    (tmp_path / "certs" / "junk.pem").write_text("not a certificate\n")
    path.write_text(text.format("certs/junk.pem"))
    with pytest.raises(ConfigError, match="holds no usable PEM certificate"):
        load_config(str(path))
    (tmp_path / "certs" / "crl.pem").write_text(crl_only_pem())
    path.write_text(text.format("certs/crl.pem"))
    with pytest.raises(ConfigError, match="holds no certificate"):
        load_config(str(path))


def test_config_dump_round_trips_relative_paths_from_another_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # --config.file sub/modules.yaml, from the directory above: the dump must name the
    # same files wherever it is saved (relative paths would now be relative to it).
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "ca.pem").write_text(_self_signed_pem())
    (sub / "leap.list").write_text(build(REAL_ENTRIES))
    (sub / "modules.yaml").write_text(
        "leapfile: leap.list\nmodules:\n  n:\n    prober: nts\n    nts:\n      ca_file: ca.pem\n")
    monkeypatch.chdir(tmp_path)
    config = load_config("sub/modules.yaml")
    assert config.modules["n"].nts.ca_file == str(sub / "ca.pem")
    assert config.leapfile_path == str(sub / "leap.list")
    (sub / "again.yaml").write_text(config_to_yaml(config))
    again = load_config("sub/again.yaml")
    assert dict(again.modules) == dict(config.modules)
    assert again.leapfile_path == config.leapfile_path


def _self_signed_pem() -> str:
    """A CA certificate in PEM, made here (the test needs a real one to load)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_a_chrony_socket_path_must_be_absolute() -> None:
    text = "modules:\n  c:\n    prober: chrony\n    chrony:\n      socket: {}\n"
    with pytest.raises(ConfigError) as exc:
        parse(text.format("run/chronyd.sock"))
    assert problem(exc.value) == ("modules.c.chrony.socket: expected an absolute path, "
                                  "got 'run/chronyd.sock'")
    assert parse(text.format("/run/chrony/chronyd.sock")).modules["c"].chrony.socket == (
        "/run/chrony/chronyd.sock")


def test_a_chrony_socket_path_must_leave_room_for_the_reply_socket() -> None:
    # The probe binds its reply socket beside chronyd's: a directory too long for that
    # name is refused at load, not a chrony_socket failure at every probe.
    text = "modules:\n  c:\n    prober: chrony\n    chrony:\n      socket: {}\n"
    fits = "/" + "d" * (SUN_PATH_MAX - 2 - UNIX_REPLY_NAME_MAX)
    assert parse(text.format(fits + "/chronyd.sock")).modules["c"].chrony.socket
    with pytest.raises(ConfigError, match="too long for a unix socket"):
        parse(text.format(fits + "d/chronyd.sock"))
    with pytest.raises(ConfigError, match="too long for a unix socket"):
        parse(text.format("/" + "s" * SUN_PATH_MAX))
    # The bound is the chrony prober's own longest reply name.
    assert len(os.path.basename(chrony._bind_path("/run/chrony/chronyd.sock"))) <= \
        UNIX_REPLY_NAME_MAX


@pytest.mark.parametrize(("line", "why"), [
    ("    timeout: 99999h\n", "modules.m.timeout: duration '99999h' is longer than 366 days"),
    ("    timeout: 6m\n", "modules.m.timeout: '6m' is longer than the maximum 5m"),
    ("    ntp:\n      reply_timeout: " + "1" * 400 + "s\n", "is longer than 366 days"),
    ("    ntp:\n      min_plausible_time: 0001-01-01T00:00:00+05:00\n",
     "is outside 1970-01-02..9999-01-01"),
])
def test_values_that_would_break_later_are_bounded_at_load(line: str, why: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(why)):
        parse("modules:\n  m:\n" + line)


@pytest.mark.parametrize(("value", "why"), [
    ("2024-02-30T00:00:00Z", "invalid RFC 3339 time '2024-02-30T00:00:00Z'"),
    ("2024-13-01T00:00:00Z", "invalid RFC 3339 time '2024-13-01T00:00:00Z'"),
    ("2024-01-01T00:00:00+25:00", "invalid RFC 3339 time '2024-01-01T00:00:00+25:00'"),
])
def test_an_impossible_unquoted_time_names_its_line_and_key(value: str, why: str) -> None:
    text = "modules:\n  m:\n    ntp:\n      min_plausible_time: " + value + "\n" \
        "  n:\n    timeout: 6m\n"
    with pytest.raises(ConfigError) as exc:
        parse(text)
    problems = str(exc.value)
    assert f":4:7: modules.m.ntp.min_plausible_time: {why}" in problems, problems
    assert "modules.n.timeout" in problems  # the rest of the file is still checked


@pytest.mark.parametrize("value", [
    # YAML 1.1's forms of an unquoted time, read as they always were (not RFC 3339's).
    "2024-01-01 01:00:00 +01:00", "2024-01-01T00:00:00 Z", "2024-01-01T01:00:00+01",
    "2024-1-1T00:00:00Z", "2024-01-01    00:00:00Z",
])
def test_an_unquoted_yaml_time_is_read_as_yaml_reads_it(value: str) -> None:
    cfg = parse(module_yaml(f"      min_plausible_time: {value}\n"))
    assert cfg.modules["m"].ntp.min_plausible_time == JAN_2024


def test_quoted_the_same_forms_must_be_rfc_3339() -> None:
    with pytest.raises(ConfigError, match="invalid RFC 3339 time"):
        parse(module_yaml("      min_plausible_time: '2024-1-1T00:00:00Z'\n"))


def test_an_unquoted_date_where_text_is_meant_is_written_back_as_that_text() -> None:
    # /config and a probe's debug output dump the configuration: a server name that reads
    # as a date is text kept with its time, which the dumper must write as text.
    config = parse_config("modules:\n  m:\n    prober: nts\n    nts:\n"
                          "      server_name: 2024-01-01\n", "t")
    text = config_to_yaml(config)
    assert "server_name: '2024-01-01'" in text, text
    assert parse_config(text, "again").modules["m"] == config.modules["m"]


def test_an_unquoted_date_is_text_where_text_is_meant() -> None:
    config = parse("modules:\n  m:\n    prober: ntp\n    description: 2024-12-01\n")
    assert config.modules["m"].description == "2024-12-01"


def test_names_are_taken_as_written_not_as_yaml_1_1_values() -> None:
    names = ["off", "yes", "010", "1_000", "~", "1", "true"]
    text = "modules:\n" + "".join(f"  {n}:\n    prober: ntp\n" for n in names)
    config = parse(text + "groups:\n  on: [127.0.0.1]\n")
    assert list(config.modules) == names  # "1" and "true" are not one key either
    assert list(config.groups) == ["on"]
    assert list(parse(config_to_yaml(config)).modules) == names  # /config round-trips


@pytest.mark.parametrize("name", ['""', '"nl\\nx"', '" padded"', '"tab\\t"', '"esc\\e[1m"'])
def test_a_module_name_no_request_could_use_is_refused(name: str) -> None:
    # An empty name is never chosen (module= empty means ntp); one with a newline would
    # split the 400's one-line list of modules.
    with pytest.raises(ConfigError, match="a module name must be non-empty printable text"):
        parse(f"modules:\n  {name}:\n    prober: ntp\n")


@pytest.mark.parametrize("address", ["224.0.0.1", "ff02::1", "255.255.255.255"])
def test_a_source_address_must_be_unicast(address: str) -> None:
    with pytest.raises(ConfigError, match="is not a unicast address"):
        parse(f"modules:\n  m:\n    ntp:\n      source_ip_address: '{address}'\n")


@pytest.mark.parametrize("address", ["::ffff:224.0.0.1", "::ffff:127.0.0.1"])
def test_a_source_address_is_not_ipv4_written_as_ipv6(address: str) -> None:
    # Sockets of either family could never bind it as given: every probe failed local_error.
    with pytest.raises(ConfigError, match="is IPv4 written as IPv6: write"):
        parse(f"modules:\n  m:\n    ntp:\n      source_ip_address: '{address}'\n")


def test_a_link_local_source_address_needs_its_interface() -> None:
    # The kernel binds fe80::1 only on a link: without the zone every probe failed
    # local_error ("Invalid argument").
    with pytest.raises(ConfigError, match="needs its interface"):
        parse("modules:\n  m:\n    ntp:\n      source_ip_address: 'fe80::1'\n")
    config = parse("modules:\n  m:\n    ntp:\n      source_ip_address: 'fe80::1%lo'\n")
    assert config.modules["m"].ntp.source_ip_address == "fe80::1%lo"
    assert parse("modules:\n  m:\n    ntp:\n      source_ip_address: 'fe80::1%1'\n")
    with pytest.raises(ConfigError, match="only goes with a link-local"):
        parse("modules:\n  m:\n    ntp:\n      source_ip_address: '::1%lo'\n")
    # An interface that is not there now may come later (its probes say so meanwhile).
    assert parse("modules:\n  m:\n    ntp:\n      source_ip_address: 'fe80::1%nosuch'\n")


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "modules.yaml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(str(fifo))  # would block for ever on a plain open()


def test_a_directory_is_refused_and_its_descriptor_closed(tmp_path: Path) -> None:
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(ConfigError, match="not a regular file"):
            load_config(str(tmp_path))
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_huge_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "modules.yaml"
    path.write_text("# " + "x" * (2 * 1024 * 1024) + "\n")
    with pytest.raises(ConfigError, match="larger than"):
        load_config(str(path))


@pytest.mark.parametrize("key", ["kod_rate_max_backoff", "kod_deny_backoff"])
def test_a_kiss_of_death_backoff_cannot_be_turned_off(key: str) -> None:
    # 0 (or 1ns) made every KoD go unheeded (RFC 5905, 7.4: the client MUST back off).
    for short in ("0s", "1ns", "63s"):
        with pytest.raises(ConfigError, match=rf"modules\.m\.ntp\.{key}: .* is shorter than "
                                              r"the minimum 64s \(a Kiss-o'-Death"):
            parse(f"modules:\n  m:\n    ntp:\n      {key}: {short}\n")
    assert parse(f"modules:\n  m:\n    ntp:\n      {key}: 64s\n").modules["m"].ntp


@pytest.mark.parametrize(("module", "ok"), [
    ("{prober: ntp, timeout: 30ms}", False),
    ("{prober: ntp, timeout: 39ms}", False),  # the probe's own margins come on top
    ("{prober: ntp, timeout: 30ms, ntp: {reply_timeout: 10ms}}", True),
    ("{prober: ntp, timeout: 40ms}", True),
    ("{prober: chrony, timeout: 30ms}", False),
    ("{prober: ntpd, timeout: 30ms, ntpd: {request_timeout: 10ms}}", True),
    ("{prober: kernel, timeout: 10ms}", True),
    ("{prober: ntp_group, timeout: 30ms}", False),
    ("{prober: nts, timeout: 30ms}", False),
    ("{prober: nts, timeout: 30ms, ntp: {reply_timeout: 10ms}}", True),
    ("{prober: chrony, timeout: 30ms, chrony: {request_timeout: 10ms}}", True),
])
def test_a_timeout_that_leaves_no_room_for_a_reply_is_refused(module: str, ok: bool) -> None:
    # No request would ever go (its reply could not arrive in time): every probe would fail
    # with timeout, blaming the server, while --config.check said OK.
    text = f"modules:\n  t: {module}\n"
    if ok:
        parse(text)
    else:
        with pytest.raises(ConfigError, match=r"modules\.t\.timeout: \d+ms leaves no room for "
                           r"a request and its reply: at least 40ms"):
            parse(text)


def test_a_key_with_a_newline_is_one_line_of_the_error() -> None:
    # A quoted key may hold a newline or a tab: each problem must stay one line (one log
    # record, check's one status line), with its place in the file.
    with pytest.raises(ConfigError) as caught:
        parse('modules:\n  a:\n    prober: ntp\n    "we\\"ird\\nkey\\tx": 1\n')
    lines = str(caught.value).splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("test.yaml:4:5: modules.a.we\"ird\\x0akey\\x09x: unknown key"), lines
