"""modules.yaml -> the schema's frozen dataclasses, and back to YAML for /config.

Strict on purpose: an unknown key, a bad duration or an out-of-range value is an
error that names the key (``modules.ntp.ntp.samples: ...``), because a typo that is
silently ignored turns into a monitor that checks less than its operator thinks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ntp_probe.config.schema import (
    BLOCKS,
    Config,
    ConfigError,
    Duration,
    Module,
    format_duration,
    parse_duration,
)
from ntp_probe.engine.registry import PROBERS
from ntp_probe.safety.policy import PolicyError, TargetPolicy, parse_rules

_POLICY_KEYS = ("allowed_targets", "denied_targets")
_MODULE_KEYS = ("prober", "description", "timeout", "min_probe_interval", *_POLICY_KEYS)
_MAX_DESCRIPTION = 200
_TIMEOUT = Duration(positive=True)


def _check_keys(raw: Mapping[str, Any], allowed: set[str] | tuple[str, ...], where: str) -> None:
    for key in raw:
        if key not in allowed:
            name = f"{where}.{key}" if where else str(key)
            raise ConfigError(f"{name}: unknown key (allowed: {', '.join(sorted(allowed))})")


def parse_block(cls: type[Any], raw: object, where: str) -> Any:
    """One settings block: every key must be a field of ``cls``, parsed by its kind."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    kinds = {f.name: f.metadata["kind"] for f in fields(cls)}
    _check_keys(raw, set(kinds), where)
    return cls(**{key: kinds[key].parse(value, f"{where}.{key}") for key, value in raw.items()})


def dump_block(settings: object) -> dict[str, Any]:
    """A settings block as YAML-ready data, written as it would be read."""
    return {f.name: f.metadata["kind"].dump(getattr(settings, f.name))
            for f in fields(settings)}  # type: ignore[arg-type]


def _parse_module(name: str, raw: object) -> Module:
    where = f"modules.{name}"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping")
    _check_keys(raw, (*_MODULE_KEYS, *BLOCKS), where)
    prober = raw.get("prober", "ntp")
    spec = PROBERS.get(prober) if isinstance(prober, str) else None
    if spec is None:
        raise ConfigError(
            f"{where}.prober: unknown prober {prober!r} (known: {', '.join(PROBERS)})"
        )
    description = raw.get("description", "")
    if not isinstance(description, str) or "\n" in description.strip() \
            or len(description) > _MAX_DESCRIPTION:
        raise ConfigError(f"{where}.description: expected one line of text "
                          f"(at most {_MAX_DESCRIPTION} characters)")
    blocks: dict[str, Any] = {}
    for block, cls in BLOCKS.items():
        if block in raw and block not in spec.settings:
            users = [p for p, s in PROBERS.items() if block in s.settings]
            raise ConfigError(f"{where}.{block}: only for modules with prober: "
                              f"{' or '.join(users)}")
        blocks[block] = parse_block(cls, raw.get(block), f"{where}.{block}")
    return Module(
        name=name, prober=prober, description=description.strip(),
        timeout=_TIMEOUT.parse(raw.get("timeout", "10s"), f"{where}.timeout"),
        policy=_parse_policy(raw, where),
        min_probe_interval=parse_duration(raw.get("min_probe_interval", 0),
                                          f"{where}.min_probe_interval"),
        **blocks,
    )


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
    _check_keys(raw, ("modules", *_POLICY_KEYS), "")
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
    out: dict[str, Any] = {"prober": module.prober}
    if module.description:
        out["description"] = module.description
    out["timeout"] = format_duration(module.timeout)
    out.update(_policy_to_dict(module.policy))
    if module.min_probe_interval:
        out["min_probe_interval"] = format_duration(module.min_probe_interval)
    for block in PROBERS[module.prober].settings:
        out[block] = dump_block(getattr(module, block))
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
