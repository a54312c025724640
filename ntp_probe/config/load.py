"""modules.yaml -> the schema's frozen dataclasses, and back to YAML for /config.

Strict on purpose: an unknown key, a duplicate key, a bad duration or an out-of-range
value is an error, because a typo that is silently ignored turns into a monitor that
checks less than its operator thinks. Every problem is reported at once, each as
``FILE:LINE:COL: key.path: what is wrong (did you mean ...?)``.

The file is hostile input too (it may come from a config generator, or an attacker
with write access to a watched directory): YAML aliases are refused (a few hundred
bytes of nested aliases expand to gigabytes), nesting and size are bounded, and no
error message quotes more than a line of a value.
"""

from __future__ import annotations

import datetime as dt
import difflib
import os
import re
import ssl
import stat
import time
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from importlib import resources
from typing import Any

import yaml

from ntp_probe.config.schema import (
    BLOCKS,
    MAX_GROUP_MEMBERS,
    Config,
    ConfigError,
    Duration,
    Module,
    UnquotedTime,
    format_duration,
    group_key,
    show,
)
from ntp_probe.engine.registry import PROBERS
from ntp_probe.engine.targets import TargetError, check_member, parse_target
from ntp_probe.engine.text import visible
from ntp_probe.probers.pacing import MIN_REPLY_WINDOW, least_window
from ntp_probe.proto.hostname import a_label
from ntp_probe.proto.leapfile import LeapFile, LeapFileError, parse_leapfile
from ntp_probe.safety.policy import PolicyError, TargetPolicy, parse_rules

_POLICY_KEYS = ("allowed_targets", "denied_targets")
_MODULE_KEYS = ("prober", "description", "timeout", "min_probe_interval", *_POLICY_KEYS)
_MAX_DESCRIPTION = 200
# A probe never needs longer; a longer timeout only keeps an abandoned request (no scrape
# header) and the shutdown waiting.
MAX_TIMEOUT = 300.0
_TIMEOUT = Duration(positive=True, maximum=MAX_TIMEOUT)
_INTERVAL = Duration()
MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 32
_MAX_PROBLEMS = 50
_TOP_KEYS = ("modules", "groups", "leapfile", *_POLICY_KEYS)
# A group name is a target parameter of its own: no comma (that separates members), no
# colon (that would read as a port).
_GROUP_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# Where tzdata puts the IERS/NIST file; used when it exists and the key is not set.
DEFAULT_LEAPFILE = "/usr/share/zoneinfo/leap-seconds.list"


# --- YAML with positions -------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Position:
    """Where a node starts in the file (1-based line and column)."""

    line: int
    column: int


class Node(dict[Any, Any]):
    """A YAML mapping that remembers where it and each of its keys are."""

    def __init__(self) -> None:
        super().__init__()
        self.position: Position | None = None
        self.key_positions: dict[Any, Position] = {}


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases, with bounded nesting and no duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self.duplicates: list[tuple[str, Position]] = []

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.MarkedYAMLError(None, None, "YAML aliases (*name) are not allowed",
                                       event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.MarkedYAMLError(None, None,
                                           f"nested more than {MAX_DEPTH} levels deep",
                                           self.peek_event().start_mark)  # type: ignore[no-untyped-call]
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Node:
        out = Node()
        out.position = _position(node.start_mark)
        self.flatten_mapping(node)
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise yaml.MarkedYAMLError(None, None, "mapping keys must be plain values",
                                           key_node.start_mark)
            # Every key here is a name: taken as written, as blackbox (YAML 1.2 into Go
            # strings) reads it, not as YAML 1.1 would (a module "off" read as False).
            key = key_node.value
            if key in out:
                self.duplicates.append((str(key), _position(key_node.start_mark)))
            out[key] = self.construct_object(value_node, deep=True)
            out.key_positions[key] = _position(key_node.start_mark)
        return out


_Loader.add_constructor("tag:yaml.org,2002:map", _Loader.construct_mapping)


def _no_base_60(kind: str) -> Any:
    base = getattr(yaml.SafeLoader, f"construct_yaml_{kind}")

    def construct(loader: _Loader, node: Any) -> Any:
        # YAML 1.1 reads 1:23 as 83 (base 60); Go's YAML, which blackbox reads its files
        # with, refuses it for a number: a port or count silently misread is worse.
        if ":" in str(node.value):
            raise yaml.MarkedYAMLError(None, None, f"{node.value!r} is a base-60 number in "
                                       "YAML 1.1 (1:23 reads as 83): quote it if text is "
                                       "meant", node.start_mark)
        return base(loader, node)

    return construct


_Loader.add_constructor("tag:yaml.org,2002:int", _no_base_60("int"))
_Loader.add_constructor("tag:yaml.org,2002:float", _no_base_60("float"))


def _timestamp(loader: _Loader, node: Any) -> UnquotedTime:
    # An unquoted date or time stays text, as Go's YAML reads it into a string field,
    # with what YAML 1.1 reads in it: the schema then checks it with its key and line
    # (PyYAML's conversion raised "day is out of range for month" with neither, and read
    # `description: 2024-12-01` as a date).
    text = UnquotedTime(node.value)
    try:
        stamp = yaml.SafeLoader.construct_yaml_timestamp(loader, node)
    except (ValueError, OverflowError):
        return text
    if not isinstance(stamp, dt.datetime):  # a date alone: its midnight, UTC
        stamp = dt.datetime(stamp.year, stamp.month, stamp.day)
    text.stamp = stamp
    return text


_Loader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp)


def _position(mark: Any) -> Position:
    return Position(mark.line + 1, mark.column + 1)


# --- problems ------------------------------------------------------------------------

# Bidirectional embeddings, overrides and isolates: they reorder the text around them.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _one_line_of_text(text: str) -> bool:
    """No control character (a tab aside), lone surrogate (a JSON-escaped pair YAML
    leaves split: no UTF-8 can carry it), line or paragraph separator, or bidi control."""
    return not any(
        (unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") and c != "\t")
        or c in _BIDI_CONTROLS
        for c in text)


_MAX_PATH_SHOWN = 200  # characters of a key's path shown in a problem's line


class _Problems:
    """The errors found so far, each with where it is."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: list[str] = []

    def add(self, position: Position | None, path: str, message: str) -> None:
        where = self.source if position is None else \
            f"{self.source}:{position.line}:{position.column}"
        # One line each, however the file spells its keys (a quoted key may hold a newline):
        # a log record or check's status line per problem, not a fragment without a place.
        # A key of 20,000 characters is shown by its ends: the line stays a line.
        if len(path) > _MAX_PATH_SHOWN:
            half = _MAX_PATH_SHOWN // 2
            path = f"{path[:half]}...({len(path) - 2 * half} characters)...{path[-half:]}"
        self.lines.append(visible(f"{where}: {path + ': ' if path else ''}{message}"))

    def raise_if_any(self) -> None:
        if self.lines:
            shown = sorted(self.lines, key=_line_order)[:_MAX_PROBLEMS]
            if len(self.lines) > _MAX_PROBLEMS:
                shown.append(f"... and {len(self.lines) - _MAX_PROBLEMS} more problems")
            raise ConfigError("\n".join(shown))


def _line_order(line: str) -> tuple[int, int]:
    """Sort key: a problem's line and column (problems without a position first)."""
    parts = line.split(":", 3)
    try:
        return int(parts[1]), int(parts[2])
    except (IndexError, ValueError):
        return 0, 0


def _at(raw: object, key: Any) -> Position | None:
    if isinstance(raw, Node):
        return raw.key_positions.get(key, raw.position)
    return None


def _join(where: str, key: object) -> str:
    return f"{where}.{key}" if where else str(key)


def _unknown_keys(raw: Mapping[Any, Any], allowed: tuple[str, ...] | set[str], where: str,
                  problems: _Problems) -> None:
    for key in raw:
        if key in allowed:
            continue
        close = difflib.get_close_matches(str(key), list(allowed), n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else \
            f" (allowed: {', '.join(sorted(allowed))})"
        problems.add(_at(raw, key), _join(where, key), f"unknown key{hint}")


def _strip_key(message: str, path: str) -> str:
    """A kind's message without the key path it starts with (the problem line adds it)."""
    return message[len(path) + 2:] if message.startswith(path + ": ") else message


def _value(kind: Any, raw: Mapping[Any, Any], key: str, where: str, problems: _Problems,
           default: Any) -> Any:
    path = _join(where, key)
    if key not in raw:
        return default
    try:
        return kind.parse(raw[key], path)
    except ConfigError as exc:
        problems.add(_at(raw, key), path, _strip_key(str(exc), path))
        return default


# --- the schema, walked ----------------------------------------------------------------

def _parse_block(cls: type[Any], raw: object, where: str, problems: _Problems,
                 at: Position | None = None) -> Any:
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        problems.add(at, where, "expected a mapping")
        return cls()
    kinds = {f.name: (f.metadata["kind"], f.default) for f in fields(cls)}
    _unknown_keys(raw, set(kinds), where, problems)
    values = {key: _value(kind, raw, key, where, problems, default)
              for key, (kind, default) in kinds.items() if key in raw}
    return cls(**values)


def parse_block(cls: type[Any], raw: object, where: str) -> Any:
    """One settings block: every key must be a field of ``cls``, parsed by its kind."""
    problems = _Problems("config")
    settings = _parse_block(cls, raw, where, problems)
    problems.raise_if_any()
    return settings


def dump_block(settings: object) -> dict[str, Any]:
    """A settings block as YAML-ready data, written as it would be read."""
    return {f.name: f.metadata["kind"].dump(getattr(settings, f.name))
            for f in fields(settings)}  # type: ignore[arg-type]


def _parse_module(name: str, raw: object, problems: _Problems,
                  at: Position | None, base: str = "") -> Module | None:
    where = f"modules.{name}"
    if not name or not name.isprintable() or name != name.strip():
        # module= must be able to name it, and a 400's one-line reason list it.
        problems.add(at, f"modules.{show(name)}", "a module name must be non-empty "
                     "printable text without surrounding spaces")
        return None
    if raw is None:
        raw = Node()
    if not isinstance(raw, dict):
        problems.add(at, where, "expected a mapping")
        return None
    _unknown_keys(raw, (*_MODULE_KEYS, *BLOCKS), where, problems)
    prober = raw.get("prober", "ntp")
    spec = PROBERS.get(prober) if isinstance(prober, str) else None
    if spec is None:
        close = difflib.get_close_matches(str(prober), list(PROBERS), n=1, cutoff=0.6)
        problems.add(_at(raw, "prober"), f"{where}.prober",
                     f"unknown prober {show(prober)}"
                     + (f" (did you mean {close[0]}?)" if close else
                        f" (known: {', '.join(PROBERS)})"))
        return None
    description = raw.get("description", "")
    # One line of text: a carriage return, a terminal escape or a bidi override would
    # reach the landing page, /config and logs (any script's letters, spaces and emoji
    # are welcome).
    if not isinstance(description, str) or not _one_line_of_text(description.strip()) \
            or len(description) > _MAX_DESCRIPTION:
        problems.add(_at(raw, "description"), f"{where}.description",
                     "expected one line of text, no control characters (at most "
                     f"{_MAX_DESCRIPTION} characters)")
        description = ""
    blocks: dict[str, Any] = {}
    for block, cls in BLOCKS.items():
        if block in raw and block not in spec.settings:
            users = [p for p, s in PROBERS.items() if block in s.settings]
            problems.add(_at(raw, block), f"{where}.{block}",
                         f"only for modules with prober: {' or '.join(users)}")
            continue
        blocks[block] = _parse_block(cls, raw.get(block), f"{where}.{block}", problems,
                                     _at(raw, block))
    if prober == "nts" and blocks["ntp"].version != 4:
        # NTS authenticates with NTPv4 extension fields; another version cannot carry them.
        problems.add(_at(raw, "ntp"), f"{where}.ntp.version", "must be 4 for prober: nts")
    if prober == "nts" and blocks["nts"].ca_file:
        # Relative to the config file, as the leap file; checked now, not at the first probe.
        # Made absolute: /config's dump, saved elsewhere, must name the same file.
        ca_file = os.path.abspath(os.path.join(base, blocks["nts"].ca_file))
        why = ca_file_problem(ca_file)
        if why is not None:
            nts_raw = raw.get("nts")
            problems.add(_at(nts_raw, "ca_file") if isinstance(nts_raw, dict) else None,
                         f"{where}.nts.ca_file", why)
        blocks["nts"] = replace(blocks["nts"], ca_file=ca_file)
    if prober == "nts" and blocks["nts"].server_name:
        why = server_name_problem(blocks["nts"].server_name)
        if why is not None:
            nts_raw = raw.get("nts")
            problems.add(_at(nts_raw, "server_name") if isinstance(nts_raw, dict) else None,
                         f"{where}.nts.server_name", why)
    ntp_raw = raw.get("ntp")
    if isinstance(ntp_raw, dict):
        for key in spec.ntp_keys_unused:
            if key in ntp_raw:
                problems.add(_at(ntp_raw, key), f"{where}.ntp.{key}",
                             f"not used by prober: {prober}")
    module = Module(
        name=name, prober=prober, description=description.strip(),
        timeout=_value(_TIMEOUT, raw, "timeout", where, problems, 10.0),
        policy=_parse_policy(raw, where, problems),
        min_probe_interval=_value(_INTERVAL, raw, "min_probe_interval", where, problems, 0.0),
        **blocks,
    )
    room = _reply_room(module)
    if room is not None and module.timeout < room:
        # No request would ever be sent (its reply could not arrive in time), and every
        # probe would fail, blaming the server.
        problems.add(_at(raw, "timeout"), f"{where}.timeout",
                     f"{format_duration(module.timeout)} leaves no room for a request and "
                     f"its reply: at least {format_duration(room)} "
                     f"({format_duration(MIN_REPLY_WINDOW)} for the reply, or the request "
                     f"timeout when shorter, and {format_duration(_START_ROOM)} for the "
                     "probe's own)")
    return module


# What a probe spends before its first request may go, and keeps back at the end for its
# verdict (the probers' margins, a few milliseconds), on top of the reply's window.
_START_ROOM = 0.02


def _reply_room(module: Module) -> float | None:
    """The least module timeout with which a first request is sent: its reply window
    (pacing) and the probers' own margins, or None for a prober that sends nothing."""
    reply_timeout = PROBERS[module.prober].reply_timeout
    if reply_timeout is None:
        return None
    return least_window(reply_timeout(module)) + _START_ROOM


def server_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be what a certificate names (and SNI carries), or None: it must
    be a host name (internationalised ones in their IDNA form) or an IP address."""
    try:
        ascii_name = a_label(name)
    except UnicodeError as exc:
        return f"{name[:64]!r} is not a host name ({exc})"
    try:
        target = parse_target(ascii_name)
    except TargetError as exc:
        return str(exc).replace("invalid target", "not a host name or address:", 1)
    if name != name.strip():
        return f"{name[:64]!r}: no spaces around the name (SNI would carry them)"
    if target.port is not None or "%" in name or name.startswith("["):
        return f"{name[:64]!r}: a host name or an address only, without brackets, port or zone"
    return None


def ca_file_problem(path: str) -> str | None:
    """Why ``path`` cannot serve as trusted CAs (not a file, no PEM certificate), or None."""
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError as exc:  # missing, or in a directory this user cannot enter
        return f"{show(path)}: {exc.strerror or exc}"
    if not regular:
        return f"{show(path)} is not a file"
    try:
        context = ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        return f"{show(path)} holds no usable PEM certificate ({exc})"
    if not context.cert_store_stats()["x509"]:  # a CRL alone loads, and trusts nothing
        return f"{show(path)} holds no certificate"
    return None


def _parse_policy(raw: Mapping[str, Any], where: str, problems: _Problems) -> TargetPolicy:
    rules = []
    for key in _POLICY_KEYS:
        items = raw.get(key, [])
        k = _join(where, key)
        if not isinstance(items, list):
            problems.add(_at(raw, key), k, "expected a list of CIDRs, host names or *.domains")
            items = []
        try:
            rules.append(parse_rules(items, k))
        except PolicyError as exc:
            problems.add(_at(raw, key), "", str(exc))  # names the entry: key[index]
            rules.append(parse_rules([], k))
    return TargetPolicy(allowed=rules[0], denied=rules[1])


def _yaml_error(exc: yaml.YAMLError, source: str, text: str = "") -> ConfigError:
    if isinstance(exc, yaml.reader.ReaderError):
        # A character YAML does not allow (a NUL from a half-written file, an escape code):
        # PyYAML gives its index only.
        before = text[:exc.position]
        line, column = before.count("\n") + 1, exc.position - before.rfind("\n")
        return ConfigError(f"{source}:{line}:{column}: invalid YAML: control character "
                           f"U+{exc.character:04X} is not allowed")
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    text = " ".join(f"{context + ': ' if context else ''}{problem}".split())
    if mark is None:
        return ConfigError(f"{source}: invalid YAML: {text}")
    return ConfigError(f"{source}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {text}")


def _load_yaml(text: str, source: str) -> tuple[Any, list[tuple[str, Position]]]:
    """The document and its duplicate keys; ConfigError when it is no YAML to use."""
    if len(text) > MAX_FILE_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_FILE_BYTES} bytes")
    try:
        loader = _Loader(text)  # its reader refuses control characters at once
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source, text) from None
    try:
        return loader.get_single_data(), loader.duplicates
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    except (ValueError, OverflowError) as exc:  # constructors, e.g. an out-of-range date
        raise ConfigError(f"{source}: invalid value: {show(str(exc))}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None
    finally:
        loader.dispose()


def read_yaml(text: str, source: str) -> Any:
    """YAML read as the modules file is (keys as written, no aliases, bounded nesting), for
    the other files in YAML; a duplicate key is an error too."""
    raw, duplicates = _load_yaml(text, source)
    if duplicates:
        key, at = duplicates[0]
        raise ConfigError(f"{source}:{at.line}:{at.column}: duplicate key {show(key)}")
    return raw


def parse_config(text: str, source: str) -> Config:
    """Parse modules.yaml text; raise :class:`ConfigError` naming every problem."""
    raw, duplicates = _load_yaml(text, source)
    problems = _Problems(source)
    for key, position in duplicates:
        problems.add(position, "", f"duplicate key {show(key)} (the later one would "
                     "silently win)")
    if not isinstance(raw, dict):
        problems.add(Position(1, 1), "", "expected a mapping with a 'modules' key")
        problems.raise_if_any()
        raise AssertionError  # unreachable: a problem was added
    _unknown_keys(raw, _TOP_KEYS, "", problems)
    modules_raw = raw.get("modules")
    modules: dict[str, Module] = {}
    if not isinstance(modules_raw, dict) or not modules_raw:
        problems.add(_at(raw, "modules"), "modules",
                     "expected a non-empty mapping of module names")
    else:
        for name, body in modules_raw.items():
            module = _parse_module(str(name), body, problems, _at(modules_raw, name),
                                   os.path.dirname(source))
            if module is not None:
                modules[str(name)] = module
    policy = _parse_policy(raw, "", problems)
    groups = _parse_groups(raw, problems)
    leapfile_path, leapfile = _parse_leapfile(raw, os.path.dirname(source), problems)
    problems.raise_if_any()
    return Config(modules=modules, source=source, policy=policy, groups=groups,
                  leapfile_path=leapfile_path, leapfile=leapfile)


def _parse_groups(raw: Mapping[str, Any], problems: _Problems) -> dict[str, tuple[str, ...]]:
    """``groups: {NAME: [member, ...]}``: each member a target, kept in canonical form."""
    if raw.get("groups") is None:
        return {}
    groups_raw = raw["groups"]
    if not isinstance(groups_raw, dict):
        problems.add(_at(raw, "groups"), "groups",
                     "expected a mapping of group names to lists of members")
        return {}
    out: dict[str, tuple[str, ...]] = {}
    group_names = {group_key(name) for name in groups_raw if isinstance(name, str)}
    for name, members in groups_raw.items():
        where, at = f"groups.{name}", _at(groups_raw, name)
        if not isinstance(name, str) or not _GROUP_NAME_RE.fullmatch(name):
            problems.add(at, where, "a group name is 1 to 64 letters, digits, '_', '.' or '-'")
            continue
        twin = next((g for g in out if group_key(g) == group_key(name)), None)
        if twin is not None:
            problems.add(at, where, f"the same name as group {twin} (group names ignore case)")
            continue
        if not isinstance(members, list) or not members:
            problems.add(at, where, "expected a non-empty list of members (host or host:port)")
            continue
        if len(members) > MAX_GROUP_MEMBERS:
            problems.add(at, where, f"{len(members)} members: a group has at most "
                         f"{MAX_GROUP_MEMBERS}")
            continue
        canonical: list[str] = []
        for i, member in enumerate(members):
            try:
                if not isinstance(member, str):
                    raise TargetError(f"expected host or host:port, got {show(member)}")
                if group_key(member) in group_names:
                    raise TargetError(f"{show(member)} is a group: groups do not nest (a "
                                      "member is a server, host or host:port)")
                if "," in member:
                    raise TargetError(f"{show(member)}: one member per item (a YAML list: "
                                      "[a, b] or one '- host' line each)")
                text = str(check_member(parse_target(member)))
            except TargetError as exc:
                problems.add(at, f"{where}[{i}]", str(exc))
                continue
            if text in canonical:
                problems.add(at, f"{where}[{i}]", f"{text} is listed twice")
                continue
            canonical.append(text)
        out[name] = tuple(canonical)
    return out


def read_leapfile(path: str) -> LeapFile:
    """Read and hash-check a leap-seconds.list; a file that cannot be read or parsed is a
    :class:`ConfigError` (a mismatching hash is not: the file says so itself)."""
    try:
        return parse_leapfile(read_config_file(path))
    except LeapFileError as exc:
        raise ConfigError(f"{path}: not a leap-seconds.list file: {exc}") from None


def leapfile_warning(config: Config, now: float) -> str | None:
    """Why the loaded leap file cannot vouch for leap seconds at ``now`` (its hash, its
    expiry), or None: it loads, but every leap check reads unknown."""
    leapfile = config.leapfile
    if leapfile is None:
        return None
    if not leapfile.hash_valid:
        why = "its #h hash is missing or does not match its contents"
    elif leapfile.expired(now):
        why = f"it expired on {time.strftime('%Y-%m-%d', time.gmtime(leapfile.expires))}"
    else:
        return None
    return (f"leap file {config.leapfile_path}: {why}; leap checks read unknown until a "
            "current file is loaded (update tzdata, or the file named by leapfile:)")


def config_warnings(config: Config, now: float) -> list[str]:
    """What is odd in a configuration that loads: the leap file's (see
    :func:`leapfile_warning`), and modules whose burst can never be sent whole."""
    warnings = [w for w in (leapfile_warning(config, now),) if w is not None]
    for module in config.modules.values():
        spec = PROBERS[module.prober]
        room = _reply_room(module)
        if room is None or "ntp" not in spec.settings or "samples" in spec.ntp_keys_unused:
            continue
        s = module.ntp
        need = (s.samples - 1) * s.sample_interval + room
        if s.samples > 1 and module.timeout < need:
            # Loads, as a scrape-timeout header may shorten any burst; but this one is
            # always short, which is likely a unit mixed up (10m for 10ms).
            fits = 1 + int((module.timeout - room) // s.sample_interval)
            warnings.append(
                f"module {module.name!r}: {s.samples} samples every "
                f"{format_duration(s.sample_interval)} need at least {need:.2f}s, "
                f"more than its timeout of {format_duration(module.timeout)}: every burst "
                f"sends at most {fits} (ntp.samples, ntp.sample_interval, timeout)")
    return warnings


def _parse_leapfile(raw: Mapping[str, Any], base: str,
                    problems: _Problems) -> tuple[str, LeapFile | None]:
    """The leap file in use: the one named (relative to the config file's directory), or
    tzdata's when the key is absent and it exists; ``""`` turns the check off."""
    if "leapfile" not in raw:
        try:
            return DEFAULT_LEAPFILE, read_leapfile(DEFAULT_LEAPFILE)
        except ConfigError:
            # Nobody asked for it: without tzdata the leap check is simply off.
            return "", None
    value = raw["leapfile"]
    if not isinstance(value, str) or "\n" in value:
        problems.add(_at(raw, "leapfile"), "leapfile",
                     f"expected a file path or \"\", got {show(value)}")
        return "", None
    if not value:
        return "", None
    path = os.path.abspath(os.path.join(base, value))  # as ca_file: the dump names the file
    try:
        return path, read_leapfile(path)
    except ConfigError as exc:
        problems.add(_at(raw, "leapfile"), "leapfile", str(exc))
        return "", None


def read_config_file(path: str) -> str:
    """The text of a config file: a regular file, bounded in size, UTF-8.

    Opened without blocking, so a FIFO (or a device) named by mistake or malice is an
    error at once instead of a read that never returns.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        # Checked before fdopen, which refuses a directory itself (and leaks the descriptor).
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{path}: not a regular file")
        with os.fdopen(fd, "rb") as f:
            fd = -1  # f owns it now
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        if fd >= 0:
            os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None


def load_config(path: str | None) -> Config:
    """Load the given file, or the packaged default modules when path is None.

    Blocking: in the event loop, run it in a thread.
    """
    if path is None:
        text = resources.files("ntp_probe").joinpath("modules.yaml").read_text("utf-8")
        return parse_config(text, "packaged default")
    return parse_config(read_config_file(path), path)


def module_to_dict(module: Module) -> dict[str, Any]:
    """A module as YAML-ready data with durations written as strings."""
    out: dict[str, Any] = {"prober": module.prober}
    if module.description:
        out["description"] = module.description
    out["timeout"] = format_duration(module.timeout)
    out.update(_policy_to_dict(module.policy))
    out["min_probe_interval"] = format_duration(module.min_probe_interval)  # 0s: off
    for block in PROBERS[module.prober].settings:
        out[block] = dump_block(getattr(module, block))
    for key in PROBERS[module.prober].ntp_keys_unused:
        del out["ntp"][key]  # not in force for this prober (and refused if written)
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
    if config.groups:
        data["groups"] = {name: list(members) for name, members in config.groups.items()}
    data["leapfile"] = config.leapfile_path
    data["modules"] = {name: module_to_dict(m) for name, m in config.modules.items()}
    # Text in any script is shown as written (people read /config); control characters
    # stay escaped.
    return dump_yaml(data, allow_unicode=True)


# libyaml's emitter where PyYAML has it: the same text, many times faster.
class _Dumper(getattr(yaml, "CSafeDumper", yaml.SafeDumper)):  # type: ignore[misc]
    """The safe dumper, which also writes an unquoted time kept as text (a server_name
    that reads as a date) as the text it is."""


_Dumper.add_representer(UnquotedTime, lambda dumper, data: dumper.represent_str(str(data)))


def dump_yaml(data: object, **options: Any) -> str:
    """``data`` as YAML, keys in their order (for /config and a probe's debug output)."""
    return str(yaml.dump(data, Dumper=_Dumper, sort_keys=False, **options))
