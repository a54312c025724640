"""The configuration schema: frozen dataclasses whose fields carry how they are parsed.

Every settings field declares its kind (duration, integer range, choice, flag, time)
with :func:`setting`; one generic parser and one generic writer walk the fields, so a
field cannot be accepted and then ignored, nor shown in /config differently from how it
was read.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ntp_probe.proto.leapfile import LeapFile
from ntp_probe.safety.policy import TargetPolicy


class ConfigError(ValueError):
    """A configuration problem; the message names the offending key."""


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|us|µs|ns|s|m|h|d|w|y)")
_UNIT_SECONDS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
    "d": 86400.0, "w": 604800.0, "y": 31536000.0,
}
_FORMAT_UNITS = (
    ("h", 3_600_000_000_000), ("m", 60_000_000_000), ("s", 1_000_000_000), ("ms", 1_000_000),
)
# No setting is meaningful beyond a year; anything longer is a typo (and 1e400s is inf).
MAX_DURATION = 366 * 86400.0


def parse_duration(value: object, key: str) -> float:
    """Parse a Prometheus-style duration (``1m30s``, ``500ms``, ``0``) into seconds."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{key}: expected a duration like 10s or 500ms, got {show(value)}")
    if isinstance(value, (int, float)):
        if value == 0:
            return 0.0
        if value < 0 or value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"{key}: expected a duration like 10s or 500ms, got "
                              f"{show(value)}")
        raise ConfigError(f"{key}: duration {show(value)} needs a unit (e.g. {value}s)")
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
        raise ConfigError(f"{key}: invalid duration {show(value)} (use e.g. 10s, 1m30s, 500ms)")
    if not math.isfinite(total) or total > MAX_DURATION:
        raise ConfigError(f"{key}: duration {show(value)} is longer than 366 days")
    # Whole nanoseconds, as the dump writes them: a finer value would read back otherwise,
    # and one that rounds to 0 would read as "off" where 0 means that.
    ns = round(total * 1e9)
    if total > 0 and ns == 0:
        raise ConfigError(f"{key}: duration {show(value)} is shorter than a nanosecond")
    return ns / 1e9


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


def show(value: object) -> str:
    """A value quoted in an error message, never longer than a line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --- field kinds -----------------------------------------------------------------------

_KOD_WHY = " (a Kiss-o'-Death is honoured at least for RFC 5905's shortest poll, 64 s)"


@dataclass(frozen=True, slots=True)
class Duration:
    """A duration in seconds: 0 allowed unless ``positive``, at least ``minimum`` (and
    then its ``why``), at most ``maximum``."""

    positive: bool = False
    maximum: float = MAX_DURATION
    minimum: float = 0.0
    why: str = ""

    def parse(self, value: object, key: str) -> float:
        """Parse and check."""
        seconds = parse_duration(value, key)
        if self.positive and seconds <= 0:
            raise ConfigError(f"{key}: must be greater than 0")
        if seconds < self.minimum:
            raise ConfigError(f"{key}: {show(value)} is shorter than the minimum "
                              f"{format_duration(self.minimum)}{self.why}")
        if seconds > self.maximum:
            raise ConfigError(f"{key}: {show(value)} is longer than the maximum "
                              f"{format_duration(self.maximum)}")
        return seconds

    def dump(self, value: Any) -> object:
        """As written in YAML."""
        return format_duration(value)


@dataclass(frozen=True, slots=True)
class IntRange:
    """An integer in ``lo..hi``."""

    lo: int
    hi: int

    def parse(self, value: object, key: str) -> int:
        """Parse and check."""
        if isinstance(value, bool) or not isinstance(value, int) or not self.lo <= value <= self.hi:
            raise ConfigError(f"{key}: expected an integer in {self.lo}..{self.hi}, "
                              f"got {show(value)}")
        return value

    def dump(self, value: Any) -> object:
        """As written in YAML."""
        return value


@dataclass(frozen=True, slots=True)
class Choice:
    """One of a few strings."""

    options: tuple[str, ...]

    def parse(self, value: object, key: str) -> str:
        """Parse and check."""
        if value not in self.options:
            raise ConfigError(f"{key}: expected one of {', '.join(self.options)}, "
                              f"got {show(value)}")
        return str(value)

    def dump(self, value: Any) -> object:
        """As written in YAML."""
        return value


@dataclass(frozen=True, slots=True)
class Flag:
    """true or false."""

    def parse(self, value: object, key: str) -> bool:
        """Parse and check."""
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {show(value)}")
        return value

    def dump(self, value: Any) -> object:
        """As written in YAML."""
        return value


# Dates a clock check can sensibly name; outside them the conversions overflow.
_MIN_TIME = dt.datetime(1970, 1, 2, tzinfo=dt.UTC)
_MAX_TIME = dt.datetime(9999, 1, 1, tzinfo=dt.UTC)


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}"
                      r"(?:[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})?)?")


class UnquotedTime(str):
    """An unquoted YAML 1.1 timestamp, kept as its text (where text is meant, a
    description, it is that), with the time YAML 1.1 reads in it: None when it names no
    real time (2024-02-30), for :class:`Time` to refuse with its key and line."""

    stamp: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class Time:
    """An RFC 3339 time, as Unix seconds."""

    def parse(self, value: object, key: str) -> float:
        """Parse and check."""
        if isinstance(value, UnquotedTime) and value.stamp is not None:
            stamp = value.stamp  # YAML 1.1's forms, as the file has always been read
        elif isinstance(value, str):
            # RFC 3339 (its T and Z in either case; no offset is UTC, as YAML 1.1 reads
            # an unquoted time), or a date alone; not the other forms fromisoformat takes
            # (week dates, the basic format, minutes without seconds).
            text = value.strip()
            try:
                if not _RFC3339.fullmatch(text):
                    raise ValueError
                stamp = dt.datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
            except ValueError:
                raise ConfigError(f"{key}: invalid RFC 3339 time {show(value)} (e.g. "
                                  "2024-01-01T00:00:00Z)") from None
        else:
            raise ConfigError(f"{key}: expected an RFC 3339 time, got {show(value)}")
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=dt.UTC)
        try:
            in_range = _MIN_TIME <= stamp <= _MAX_TIME
        except OverflowError:
            in_range = False
        if not in_range:
            raise ConfigError(f"{key}: time {show(value)} is outside 1970-01-02..9999-01-01")
        return stamp.timestamp()

    def dump(self, value: Any) -> object:
        """As written in YAML."""
        return dt.datetime.fromtimestamp(value, dt.UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class Text:
    """A string; empty allowed unless ``required``; one line; with ``absolute``, a path
    from the root (a relative one would depend on the exporter's working directory)."""

    required: bool = False
    max_length: int = 4096
    absolute: bool = False

    def parse(self, value: object, key: str) -> str:
        """Parse and check."""
        if not isinstance(value, str) or "\n" in value or len(value) > self.max_length \
                or (self.required and not value):
            raise ConfigError(f"{key}: expected one line of text, got {show(value)}")
        if self.absolute and value and not value.startswith("/"):
            raise ConfigError(f"{key}: expected an absolute path, got {show(value)}")
        return value

    def dump(self, value: Any) -> object:
        """As written in YAML."""
        return value


# A unix socket path's room (sun_path, its NUL included), and the longest name the chrony
# prober binds for its replies beside the daemon's socket (ntp_probe.PID.12HEX.sock).
SUN_PATH_MAX = 107
UNIX_REPLY_NAME_MAX = len("ntp_probe.4194304.0123456789ab.sock")


@dataclass(frozen=True, slots=True)
class UnixSocketPath(Text):
    """An absolute path to a daemon's unix datagram socket, short enough for the socket
    and for the reply socket the probe binds in the same directory."""

    absolute: bool = True

    def parse(self, value: object, key: str) -> str:
        """Parse and check."""
        path = Text.parse(self, value, key)  # (slots dataclasses break super())
        if not path:
            return path
        directory = path.rsplit("/", 1)[0] or "/"
        reply = len(directory.rstrip("/").encode()) + 1 + UNIX_REPLY_NAME_MAX
        if len(path.encode()) > SUN_PATH_MAX or reply > SUN_PATH_MAX:
            raise ConfigError(f"{key}: {show(value)} is too long for a unix socket: the probe "
                              f"binds its reply socket beside it, at most {SUN_PATH_MAX} "
                              f"bytes (a directory of up to "
                              f"{SUN_PATH_MAX - 1 - UNIX_REPLY_NAME_MAX} bytes)")
        return path


@dataclass(frozen=True, slots=True)
class IntList:
    """A non-empty list of distinct integers, each one of ``options``; order is kept (it is
    a preference)."""

    options: tuple[int, ...]
    max_items: int = 8

    def parse(self, value: object, key: str) -> tuple[int, ...]:
        """Parse and check."""
        allowed = ", ".join(map(str, self.options))
        if not isinstance(value, list) or not 1 <= len(value) <= self.max_items:
            raise ConfigError(f"{key}: expected a list of 1..{self.max_items} of {allowed}, "
                              f"got {show(value)}")
        for item in value:
            # 16.0 == 16 in Python: only a real integer is one of the options.
            if type(item) is not int or item not in self.options:
                raise ConfigError(f"{key}: {show(item)} is not one of {allowed}")
        if len(set(value)) != len(value):
            raise ConfigError(f"{key}: duplicate entries in {show(value)}")
        return tuple(value)

    def dump(self, value: Any) -> object:
        """As written in YAML."""
        return list(value)


@dataclass(frozen=True, slots=True)
class Address:
    """An IP address literal, or empty for none."""

    def parse(self, value: object, key: str) -> str:
        """Parse and check."""
        if value == "":
            return ""
        try:
            address = ipaddress.ip_address(value if isinstance(value, str) else "")
        except ValueError:
            raise ConfigError(f"{key}: expected an IP address, got {show(value)}") from None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            raise ConfigError(f"{key}: {address} is IPv4 written as IPv6: write "
                              f"{address.ipv4_mapped}")
        if address.is_multicast or address == ipaddress.IPv4Address("255.255.255.255"):
            # A source address is one of this host's own: a group or broadcast address
            # could never be bound as one.
            raise ConfigError(f"{key}: {address} is not a unicast address")
        zone = address.scope_id if isinstance(address, ipaddress.IPv6Address) else None
        if isinstance(address, ipaddress.IPv6Address) and address.is_link_local and not zone:
            # The kernel binds a link-local address only on its link: name it.
            raise ConfigError(f"{key}: the link-local {address} needs its interface, as in "
                              f"{address}%eth0")
        if zone and not address.is_link_local:
            raise ConfigError(f"{key}: a zone (%interface) only goes with a link-local "
                              f"address, not {address}")
        # A zone naming no interface now is not refused: the interface may come later (a
        # VPN, a USB NIC), and the configuration may be checked on another host. Each
        # probe then says so (local_error).
        return str(address)

    def dump(self, value: Any) -> object:
        """As written in YAML."""
        return value


Kind = Duration | IntRange | Choice | Flag | Time | Text | Address | IntList


def setting(default: Any, kind: Kind) -> Any:
    """A settings field: its default and how it is parsed and written."""
    return field(default=default, metadata={"kind": kind})


# --- settings blocks -------------------------------------------------------------------

IP_PROTOCOLS = ("ip4", "ip6")


@dataclass(frozen=True, slots=True)
class NTPSettings:
    """The ``ntp:`` block of a module; durations in seconds."""

    port: int = setting(123, IntRange(1, 65535))
    version: int = setting(4, IntRange(1, 4))
    samples: int = setting(3, IntRange(1, 64))
    sample_interval: float = setting(2.0, Duration())
    preferred_ip_protocol: str = setting("ip6", Choice(IP_PROTOCOLS))
    ip_protocol_fallback: bool = setting(True, Flag())
    max_root_distance: float = setting(1.5, Duration())
    max_stratum: int = setting(15, IntRange(1, 16))
    max_reference_age: float = setting(36 * 3600.0, Duration())
    fail_if_offset_exceeds: float = setting(0.0, Duration())
    max_causality_violation: float = setting(0.0, Duration())
    min_plausible_time: float = setting(1_704_067_200.0, Time())  # 2024-01-01T00:00:00Z
    reply_timeout: float = setting(1.0, Duration(positive=True))
    # A KoD is always honoured (RFC 5905, 7.4: the client MUST back off, or stop): never
    # for less than the shortest poll interval.
    kod_rate_max_backoff: float = setting(3600.0, Duration(minimum=64.0, why=_KOD_WHY))
    kod_deny_backoff: float = setting(86400.0, Duration(minimum=64.0, why=_KOD_WHY))
    kernel_correlation: bool = setting(False, Flag())
    # blackbox's key: the local address probes are sent from (multi-homed hosts, NAT).
    source_ip_address: str = setting("", Address())
    # Every A and AAAA address of the target, each with its own burst, concurrently.
    all_addresses: bool = setting(False, Flag())
    max_addresses: int = setting(8, IntRange(1, 64))
    addresses_required: str = setting("all", Choice(("all", "any")))
    fail_on_leap_mismatch: bool = setting(False, Flag())


@dataclass(frozen=True, slots=True)
class ChronySettings:
    """The ``chrony:`` block: chronyd's command protocol (what ``chronyc`` speaks)."""

    port: int = setting(323, IntRange(1, 65535))
    # A unix socket path (chronyd's bindcmdaddress, /run/chrony/chronyd.sock): when set, the
    # probe talks to it and the target only labels the probe.
    socket: str = setting("", UnixSocketPath())
    min_candidates: int = setting(1, IntRange(0, 1000))
    request_timeout: float = setting(0.5, Duration(positive=True, maximum=60.0))
    preferred_ip_protocol: str = setting("ip4", Choice(IP_PROTOCOLS))
    ip_protocol_fallback: bool = setting(True, Flag())


@dataclass(frozen=True, slots=True)
class NTPDSettings:
    """The ``ntpd:`` block: ntpd's mode 6 control messages (what ``ntpq`` speaks)."""

    port: int = setting(123, IntRange(1, 65535))
    min_candidates: int = setting(1, IntRange(0, 1000))
    request_timeout: float = setting(0.5, Duration(positive=True, maximum=60.0))
    preferred_ip_protocol: str = setting("ip4", Choice(IP_PROTOCOLS))
    ip_protocol_fallback: bool = setting(True, Flag())


# Each member costs a polite burst of its own; a group beyond this is a fleet, not a group.
MAX_GROUP_MEMBERS = 16


@dataclass(frozen=True, slots=True)
class NTPGroupSettings:
    """The ``ntp_group:`` block: what the group's selection must find (the members' bursts
    use the module's ``ntp:`` block)."""

    max_falsetickers: int = setting(0, IntRange(0, MAX_GROUP_MEMBERS))


# The AEAD algorithms the NTS client implements (RFC 5116 registry ids): the AES-SIV-CMAC
# family. GCM-SIV (30) is left out: chrony 4.4-4.6.0 derive its keys differently.
NTS_AEAD_IDS = (15, 16, 17)


@dataclass(frozen=True, slots=True)
class NTSSettings:
    """The ``nts:`` block: NTS-KE (RFC 8915); the ``ntp:`` block's burst settings apply too."""

    port: int = setting(4460, IntRange(1, 65535))  # NTS-KE's TCP port
    ca_file: str = setting("", Text())  # "" = the system trust store
    server_name: str = setting("", Text())  # "" = the target host
    aead: tuple[int, ...] = setting((15,), IntList(NTS_AEAD_IDS))
    ke_timeout: float = setting(3.0, Duration(positive=True, maximum=60.0))


# Settings block name -> its class; a module may carry the blocks its prober reads.
BLOCKS: Mapping[str, type[Any]] = {"ntp": NTPSettings, "chrony": ChronySettings,
                                   "ntpd": NTPDSettings, "ntp_group": NTPGroupSettings,
                                   "nts": NTSSettings}


@dataclass(frozen=True, slots=True)
class Module:
    """One named module: which prober runs and with what settings."""

    name: str
    prober: str = "ntp"
    timeout: float = 10.0
    ntp: NTPSettings = field(default_factory=NTPSettings)
    chrony: ChronySettings = field(default_factory=ChronySettings)
    ntpd: NTPDSettings = field(default_factory=NTPDSettings)
    ntp_group: NTPGroupSettings = field(default_factory=NTPGroupSettings)
    nts: NTSSettings = field(default_factory=NTSSettings)
    policy: TargetPolicy = field(default_factory=TargetPolicy)
    min_probe_interval: float = 0.0
    description: str = ""  # one line for the landing page and /config


@dataclass(frozen=True, slots=True)
class Config:
    """The whole loaded configuration."""

    modules: Mapping[str, Module]
    source: str  # file path, or "packaged default"
    policy: TargetPolicy = field(default_factory=TargetPolicy)
    # Group name -> its members, as canonical targets (host or host:port).
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # The leap-seconds.list in use ("" when none) and what it said when loaded.
    leapfile_path: str = ""
    leapfile: LeapFile | None = None

    def group_named(self, name: str) -> str | None:
        """The configured group ``name`` means, if any: group names ignore case, a port
        and a trailing dot (so that no member or target that names a group is taken for a
        host and looked up)."""
        key = group_key(name)
        return next((g for g in self.groups if group_key(g) == key), None)


def group_key(name: str) -> str:
    """What tells groups apart: the name without case, surrounding spaces, port or
    trailing dot."""
    host = name.strip()
    if host.count(":") == 1:  # host:port (an IPv6 address has more colons)
        host = host.split(":", 1)[0]
    return host.rstrip(".").lower()
