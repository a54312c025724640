"""What a probe produces: metric samples of declared families, one failure reason, reports.

A prober writes into the :class:`Measurement` its context hands it, so that whatever it
measured survives even when the runner's backstop cuts it off.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from ntp_probe.exposition.families import Family


class Reason(StrEnum):
    """Failure reasons, declared in the contract's order of precedence: when several
    checks fail, the one declared first is the probe's reason."""

    TARGET_FORBIDDEN = "target_forbidden"
    BACKOFF = "backoff"
    RESOLVE = "resolve"
    LOCAL_ERROR = "local_error"
    UNREACHABLE = "unreachable"
    NTS_KE_CONNECT = "nts_ke_connect"
    NTS_KE_TLS = "nts_ke_tls"
    NTS_ALPN_MISMATCH = "nts_alpn_mismatch"
    NTS_CERT_UNTRUSTED = "nts_cert_untrusted"
    NTS_CERT_EXPIRED = "nts_cert_expired"
    NTS_CERT_NAME_MISMATCH = "nts_cert_name_mismatch"
    NTS_KE_ERROR = "nts_ke_error"
    NTS_KE_MALFORMED = "nts_ke_malformed"
    NTS_NO_COMMON_AEAD = "nts_no_common_aead"
    NTS_NO_COOKIES = "nts_no_cookies"
    NTS_NAK = "nts_nak"
    NTS_AUTH_FAILED = "nts_auth_failed"
    CHRONY_SOCKET = "chrony_socket"
    CHRONY_TIMEOUT = "chrony_timeout"
    CHRONY_UNAUTHORIZED = "chrony_unauthorized"
    CHRONY_BAD_REPLY = "chrony_bad_reply"
    MODE6_TIMEOUT = "mode6_timeout"
    MODE6_ERROR = "mode6_error"
    MODE6_BAD_REPLY = "mode6_bad_reply"
    KOD_RATE = "kod_rate"
    KOD_DENY = "kod_deny"
    KOD_RSTR = "kod_rstr"
    KOD_OTHER = "kod_other"
    TIMEOUT = "timeout"
    INVALID_REPLY = "invalid_reply"
    STRATUM_UNSYNCHRONIZED = "stratum_unsynchronized"
    LEAP_UNSYNCHRONIZED = "leap_unsynchronized"
    IMPLAUSIBLE_TIME = "implausible_time"
    REFERENCE_AFTER_TRANSMIT = "reference_after_transmit"
    STALE_REFERENCE = "stale_reference"
    EXCESS_ROOT_DISTANCE = "excess_root_distance"
    CAUSALITY_VIOLATION = "causality_violation"
    OFFSET_EXCEEDED = "offset_exceeded"
    LEAP_MISMATCH = "leap_mismatch"
    NO_SYS_PEER = "no_sys_peer"
    TOO_FEW_SOURCES = "too_few_sources"
    NO_MAJORITY = "no_majority"
    FALSETICKERS = "falsetickers"
    KERNEL_UNAVAILABLE = "kernel_unavailable"


_RANK = {reason: i for i, reason in enumerate(Reason)}

# The detail of a probe that sent nothing because its budget (a short module timeout or
# scrape-timeout header) left no time for a first request and its reply: local_error,
# not the server's timeout, which would page as if it had been silent.
NO_TIME = "the probe's time budget left no room for a request and its reply: nothing sent"


@dataclass(frozen=True, slots=True)
class Perf:
    """One Nagios perfdata value: ``label=value[unit]``."""

    label: str
    value: float
    unit: str = ""  # "s", "%", "c" (a counter) or "" (a plain number)
    checked: bool = False  # the report's check_offset: the value -w and -c apply to


class Report(Protocol):
    """A prober's typed account of what it measured, for the CLI's reporters."""

    @property
    def title(self) -> str:
        """A short name for the section (``ntp``, ``kernel``)."""

    def rows(self) -> list[tuple[str, str]]:
        """(label, value) lines for the human-readable report."""

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data with real numbers."""

    @property
    def check_offset(self) -> float | None:
        """The offset ``ntp-probe check`` compares with its thresholds, in seconds, or
        None when this report has none (the server's offset for ntp, chronyd's System
        time for chrony, ntpd's sys offset for ntpd)."""

    def perfdata(self) -> list[Perf]:
        """Values for the Nagios plugin's perfdata."""


@runtime_checkable
class SeveralOffsets(Protocol):
    """A report whose check offset is the farthest off of several (all_addresses'): which
    one that is depends on check's -o, added to each before -w and -c judge it."""

    def farthest(self, added: float) -> float | None:
        """The offset (as measured) whose sum with ``added`` is farthest from zero."""


Sample = tuple[Family, tuple[str, ...], float]


class Measurement:
    """One probe's output: samples, the failure reason, counts and reports."""

    __slots__ = ("duration", "failure", "failure_detail", "packets_sent", "reports", "samples")

    def __init__(self) -> None:
        self.samples: list[Sample] = []
        self.failure: Reason | None = None
        self.failure_detail: str | None = None  # why, in words, where a prober said
        self.duration = 0.0
        self.packets_sent = 0  # requests that left this host (for the exporter's counter)
        self.reports: list[Report] = []

    @property
    def success(self) -> bool:
        """A probe succeeds when no check failed."""
        return self.failure is None

    def add(self, family: Family, value: float, *labels: str) -> None:
        """Add one sample; ``labels`` are the values of the family's labels, in order."""
        if len(labels) != len(family.labels):
            raise ValueError(f"{family.name} takes labels {family.labels}, got {labels}")
        self.samples.append((family, labels, value))

    def fail(self, reason: Reason, detail: str | None = None) -> None:
        """Record a failed check; the reason that ranks first in the contract's order wins,
        with its ``detail`` when given (the system's words: the CLI's lines show them)."""
        if self.failure is None or _RANK[reason] < _RANK[self.failure]:
            self.failure = reason
            self.failure_detail = detail
        elif reason is self.failure and self.failure_detail is None:
            self.failure_detail = detail

    def values(self, family: Family) -> list[tuple[tuple[str, ...], float]]:
        """(labels, value) of every sample of ``family`` (for tests and reports)."""
        return [(labels, value) for f, labels, value in self.samples if f is family]

    def value(self, family: Family) -> float | None:
        """The value of an unlabelled family's sample, or None when it was not set."""
        for f, _, value in self.samples:
            if f is family:
                return value
        return None
