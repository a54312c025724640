"""Metric families: each prober declares what it emits (name, type, help, labels).

A family is declared once, at import, as a module-level constant of the prober that owns
it; a measurement can only hold samples of a declared family, so an unknown or misspelt
metric name fails when the module is imported (in the test suite), never at scrape time.
The exposition lists families in the order they were declared.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

MetricType = Literal["gauge", "counter"]

_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

_DECLARED: dict[str, Family] = {}


@dataclass(frozen=True, slots=True, eq=False)
class Family:
    """One metric family of the per-probe exposition."""

    name: str
    help: str
    labels: tuple[str, ...] = ()
    type: MetricType = "gauge"
    # Seconds left until something (a backoff's end): a result served again from the
    # min_probe_interval cache shows it less the result's age, as it stands now.
    countdown: bool = False
    # Position in the exposition, the pre-rendered HELP/TYPE lines and the start of a
    # sample line (``name `` or ``name{label="``), set at declaration: rendering a probe
    # then only formats values.
    order: int = field(init=False)
    header: str = field(init=False)
    prefix: str = field(init=False)
    label_joins: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise ValueError(f"invalid metric name {self.name!r}")
        if self.type == "counter" and not self.name.endswith("_total"):
            raise ValueError(f"counter {self.name!r} must end in _total")
        for label in self.labels:
            if not _LABEL_RE.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"{self.name}: invalid label name {label!r}")
        if self.name in _DECLARED:
            raise ValueError(f"metric {self.name!r} declared twice")
        help_text = self.help.replace("\\", "\\\\").replace("\n", "\\n")
        object.__setattr__(self, "order", len(_DECLARED))
        object.__setattr__(
            self, "header", f"# HELP {self.name} {help_text}\n# TYPE {self.name} {self.type}\n"
        )
        if self.labels:
            object.__setattr__(self, "prefix", f'{self.name}{{{self.labels[0]}="')
        else:
            object.__setattr__(self, "prefix", f"{self.name} ")
        # What goes between one label value and the next label's value.
        object.__setattr__(self, "label_joins", tuple(f'",{k}="' for k in self.labels[1:]))
        _DECLARED[self.name] = self


def declared() -> tuple[Family, ...]:
    """Every family declared so far, in exposition order."""
    return tuple(_DECLARED.values())


# Emitted for every probe, whatever its prober (blackbox_exporter's names).
SUCCESS = Family("probe_success", "Whether the probe succeeded (1) or failed (0).")
DURATION = Family("probe_duration_seconds", "How long the probe took, in seconds.")
DNS_LOOKUP = Family("probe_dns_lookup_time_seconds",
                    "How long resolving the target took, in seconds.")
IP_PROTOCOL = Family("probe_ip_protocol", "IP protocol of the probed address (4 or 6).")
IP_ADDR_HASH = Family(
    "probe_ip_addr_hash",
    "FNV-1a hash of the probed IP address's bytes, as blackbox_exporter computes it "
    "(changes when the address changes).",
)
RESULT_AGE = Family(
    "probe_ntp_result_age_seconds",
    "Age of a result served again because of the module's min_probe_interval, in seconds.",
)
FAILURE = Family("probe_ntp_failure_info",
                 "Why the probe failed (exactly one series on failure).", ("reason",))
