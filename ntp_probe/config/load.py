"""modules.yaml -> frozen dataclasses.

Strict on purpose: an unknown key, a bad duration or an out-of-range value is an
error that names the key (``modules.ntp.ntp.samples: ...``), because a typo that is
silently ignored turns into a monitor that checks less than its operator thinks.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ntp_probe.safety.policy import PolicyError, TargetPolicy, parse_rules

PROBER_KINDS = ("ntp", "kernel")
IP_PROTOCOLS = ("ip4", "ip6")

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|s|m|h|d|w|y)")
_UNIT_SECONDS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
    "d": 86400.0, "w": 604800.0, "y": 31536000.0,
}

_FORMAT_UNITS = (
    ("h", 3_600_000_000_000), ("m", 60_000_000_000), ("s", 1_000_000_000), ("ms", 1_000_000),
)


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


def parse_duration(value: object, key: str) -> float:
    """Parse a Prometheus-style duration (``1m30s``, ``500ms``, ``0``) into seconds."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{key}: expected a duration like 10s or 500ms, got {value!r}")
    if isinstance(value, (int, float)):
        if value == 0:
            return 0.0
        raise ConfigError(f"{key}: duration {value!r} needs a unit (e.g. {value}s)")
    text = value.strip()
    if text == "0":
        return 0.0
    pos, total, last_size = 0, 0.0, float("inf")
    for m in _DURATION_RE.finditer(text):
        size = _UNIT_SECONDS[m.group(2)]
        if m.start() != pos or size >= last_size:  # units must run from largest to smallest
            pos = -1
            break
        total += float(m.group(1)) * size
        pos, last_size = m.end(), size
    if pos != len(text) or not text:
        raise ConfigError(f"{key}: invalid duration {value!r} (use e.g. 10s, 1m30s, 500ms)")
    return total


def format_duration(seconds: float) -> str:
    """Seconds back to a compact duration string (for /config and debug output)."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    for unit, size in _FORMAT_UNITS:
        if ns % size == 0:
            return f"{ns // size}{unit}"
    whole, frac = divmod(ns, 1_000_000_000)
    return f"{whole}.{frac:09d}".rstrip("0") + "s"


def _parse_time(value: object, key: str) -> float:
    if isinstance(value, dt.datetime):
        stamp = value
    elif isinstance(value, dt.date):
        stamp = dt.datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            stamp = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(f"{key}: invalid RFC 3339 time {value!r}") from None
    else:
        raise ConfigError(f"{key}: expected an RFC 3339 time, got {value!r}")
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=dt.UTC)
    return stamp.timestamp()


@dataclass(frozen=True, slots=True)
class NTPSettings:
    """The ``ntp:`` block of a module; durations in seconds."""

    port: int = 123
    version: int = 4
    samples: int = 3
    sample_interval: float = 2.0
    preferred_ip_protocol: str = "ip6"
    ip_protocol_fallback: bool = True
    max_root_distance: float = 1.5
    max_stratum: int = 15
    max_reference_age: float = 36 * 3600.0
    fail_if_offset_exceeds: float = 0.0
    max_causality_violation: float = 0.0
    min_plausible_time: float = 1_704_067_200.0  # 2024-01-01T00:00:00Z
    reply_timeout: float = 1.0
    kod_rate_max_backoff: float = 3600.0
    kod_deny_backoff: float = 86400.0
    kernel_correlation: bool = False


@dataclass(frozen=True, slots=True)
class Module:
    """One named module: which prober runs and with what settings."""

    name: str
    prober: str = "ntp"
    timeout: float = 10.0
    ntp: NTPSettings = field(default_factory=NTPSettings)
    policy: TargetPolicy = field(default_factory=TargetPolicy)
    min_probe_interval: float = 0.0


@dataclass(frozen=True, slots=True)
class Config:
    """The whole loaded configuration."""

    modules: Mapping[str, Module]
    source: str  # file path, or "packaged default"
    policy: TargetPolicy = field(default_factory=TargetPolicy)


_DURATION_KEYS = {
    "sample_interval", "max_root_distance", "max_reference_age", "fail_if_offset_exceeds",
    "max_causality_violation", "reply_timeout", "kod_rate_max_backoff", "kod_deny_backoff",
}
# key -> (minimum, maximum) for integers
_INT_RANGES = {"port": (1, 65535), "version": (1, 4), "samples": (1, 64), "max_stratum": (1, 16)}


def _check_keys(raw: Mapping[str, Any], allowed: set[str], where: str) -> None:
    for key in raw:
        if key not in allowed:
            name = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"{name}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _parse_ntp(raw: object, where: str) -> NTPSettings:
    if raw is None:
        return NTPSettings()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    names = {f.name for f in fields(NTPSettings)}
    _check_keys(raw, names, where)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        k = f"{where}.{key}"
        if key in _DURATION_KEYS:
            values[key] = parse_duration(value, k)
        elif key in _INT_RANGES:
            lo, hi = _INT_RANGES[key]
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise ConfigError(f"{k}: expected an integer in {lo}..{hi}, got {value!r}")
            values[key] = value
        elif key == "preferred_ip_protocol":
            if value not in IP_PROTOCOLS:
                raise ConfigError(f"{k}: expected one of {', '.join(IP_PROTOCOLS)}, got {value!r}")
            values[key] = value
        elif key in ("ip_protocol_fallback", "kernel_correlation"):
            if not isinstance(value, bool):
                raise ConfigError(f"{k}: expected true or false, got {value!r}")
            values[key] = value
        elif key == "min_plausible_time":
            values[key] = _parse_time(value, k)
    settings = NTPSettings(**values)
    if settings.reply_timeout <= 0:
        raise ConfigError(f"{where}.reply_timeout: must be greater than 0")
    return settings


def _parse_module(name: str, raw: object) -> Module:
    where = f"modules.{name}"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    _check_keys(raw, {"prober", "timeout", "ntp", *_POLICY_KEYS, "min_probe_interval"}, where)
    prober = raw.get("prober", "ntp")
    if prober not in PROBER_KINDS:
        raise ConfigError(
            f"{where}.prober: unknown prober {prober!r} (known: {', '.join(PROBER_KINDS)})"
        )
    timeout = parse_duration(raw.get("timeout", "10s"), f"{where}.timeout")
    if timeout <= 0:
        raise ConfigError(f"{where}.timeout: must be greater than 0")
    if prober != "ntp" and "ntp" in raw:
        raise ConfigError(f"{where}.ntp: only for modules with prober: ntp")
    ntp = _parse_ntp(raw.get("ntp"), f"{where}.ntp")
    interval = parse_duration(raw.get("min_probe_interval", 0), f"{where}.min_probe_interval")
    return Module(name=name, prober=prober, timeout=timeout, ntp=ntp,
                  policy=_parse_policy(raw, where), min_probe_interval=interval)


_POLICY_KEYS = ("allowed_targets", "denied_targets")


def _parse_policy(raw: Mapping[str, Any], where: str) -> TargetPolicy:
    rules = []
    for key in _POLICY_KEYS:
        items = raw.get(key, [])
        k = f"{where}.{key}" if where else key
        if not isinstance(items, list):
            raise ConfigError(f"{k}: expected a list of CIDRs, host names or *.domains")
        try:
            rules.append(parse_rules(items, k))
        except PolicyError as exc:
            raise ConfigError(str(exc)) from None
    return TargetPolicy(allowed=rules[0], denied=rules[1])


def parse_config(text: str, source: str) -> Config:
    """Parse modules.yaml text; raise :class:`ConfigError` on any problem."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {' '.join(str(exc).split())}") from None
    except ValueError as exc:  # PyYAML constructors, e.g. an out-of-range timestamp
        raise ConfigError(f"{source}: invalid value: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with a 'modules' key")
    _check_keys(raw, {"modules", *_POLICY_KEYS}, "")
    modules_raw = raw.get("modules")
    if not isinstance(modules_raw, dict) or not modules_raw:
        raise ConfigError("modules: expected a non-empty mapping of module names")
    modules = {str(name): _parse_module(str(name), body) for name, body in modules_raw.items()}
    return Config(modules=modules, source=source, policy=_parse_policy(raw, ""))


def load_config(path: str | None) -> Config:
    """Load the given file, or the packaged default modules when path is None."""
    if path is None:
        text = resources.files("ntp_probe").joinpath("modules.yaml").read_text("utf-8")
        return parse_config(text, "packaged default")
    try:
        text = Path(path).read_text("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return parse_config(text, path)


def module_to_dict(module: Module) -> dict[str, Any]:
    """A module as YAML-ready data with durations written as strings."""
    ntp: dict[str, Any] = {}
    for f in fields(NTPSettings):
        value = getattr(module.ntp, f.name)
        if f.name in _DURATION_KEYS:
            value = format_duration(value)
        elif f.name == "min_plausible_time":
            value = dt.datetime.fromtimestamp(value, dt.UTC).isoformat().replace("+00:00", "Z")
        ntp[f.name] = value
    out: dict[str, Any] = {"prober": module.prober, "timeout": format_duration(module.timeout)}
    out.update(_policy_to_dict(module.policy))
    if module.min_probe_interval:
        out["min_probe_interval"] = format_duration(module.min_probe_interval)
    if module.prober == "ntp":
        out["ntp"] = ntp
    return out


def _policy_to_dict(policy: TargetPolicy) -> dict[str, list[str]]:
    out = {}
    if policy.allowed:
        out["allowed_targets"] = list(policy.allowed.source)
    if policy.denied:
        out["denied_targets"] = list(policy.denied.source)
    return out


def config_to_yaml(config: Config) -> str:
    """The loaded configuration as YAML (for /config and debug output)."""
    data: dict[str, Any] = dict(_policy_to_dict(config.policy))
    data["modules"] = {name: module_to_dict(m) for name, m in config.modules.items()}
    return yaml.safe_dump(data, sort_keys=False)
