"""The exporter's own metrics, served on /metrics (prefix ``ntp_probe_``)."""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Collection, Iterator
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import gc_collector as _gc
from prometheus_client import platform_collector as _platform
from prometheus_client import process_collector as _process
from prometheus_client.core import GaugeMetricFamily

from ntp_probe import __version__
from ntp_probe.engine.result import Measurement


class LeapInstant(Protocol):
    """A scheduled leap second, as /metrics reads it."""

    @property
    def after(self) -> int:
        """Unix time of the midnight that follows it."""


class LeapSource(Protocol):
    """The loaded leap-seconds.list, as /metrics reads it (times in Unix seconds)."""

    @property
    def expires(self) -> int:
        """When the file expires."""

    @property
    def hash_valid(self) -> bool:
        """Whether its hash matches its contents."""

    def valid(self, now: float) -> bool:
        """Hash ok and not expired at ``now``."""

    def tai_offset(self, now: float) -> int | None:
        """TAI - UTC at ``now``."""

    def next_leap(self, now: float) -> LeapInstant | None:
        """The next scheduled leap second after ``now``, if any."""


class _LeapFileCollector:
    """The leap file's state, read at scrape time: validity and the next leap move with
    the clock, not with reloads. Only the HELP and TYPE lines without a file."""

    def __init__(self) -> None:
        self.source: LeapSource | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        source, now = self.source, time.time()
        families = (
            GaugeMetricFamily("ntp_probe_leapfile_expiry_timestamp_seconds",
                              "Unix time at which the loaded leap-seconds.list expires."),
            GaugeMetricFamily("ntp_probe_leapfile_valid",
                              "Whether the loaded leap-seconds.list has a matching hash and "
                              "has not expired."),
            GaugeMetricFamily("ntp_probe_leapfile_tai_offset_seconds",
                              "TAI - UTC now, according to the loaded leap-seconds.list "
                              "(absent when its hash does not match)."),
            GaugeMetricFamily("ntp_probe_leapfile_next_leap_timestamp_seconds",
                              "Unix time of the midnight after the next leap second the "
                              "loaded leap-seconds.list schedules (absent if none, or when "
                              "its hash does not match)."),
        )
        if source is not None:
            expiry, valid, tai, leap = families
            expiry.add_metric([], source.expires)
            valid.add_metric([], 1 if source.valid(now) else 0)
            # What a file whose hash fails says is vouched for by nothing (ntpd refuses
            # such a file): its TAI offset and next leap are not shown as facts.
            offset = source.tai_offset(now) if source.hash_valid else None
            if offset is not None:
                tai.add_metric([], offset)
            upcoming = source.next_leap(now) if source.hash_valid else None
            if upcoming is not None:
                leap.add_metric([], upcoming.after)
        yield from families


class Internals:
    """The exporter's own metrics, served on /metrics (prefix ``ntp_probe_``)."""

    def __init__(self) -> None:
        # No Go exporter has client_python's *_created series; they only add cardinality.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        _process.ProcessCollector(registry=r)
        _platform.PlatformCollector(registry=r)
        _gc.GCCollector(registry=r)
        Info("ntp_probe_build", "ntp_probe build information.", registry=r).info(
            {"version": __version__, "python_version": platform.python_version()}
        )
        self.probes = Counter(
            "ntp_probe_probes", "Probes run, by module and result.", ["module", "result"],
            registry=r,
        )
        self.duration = Histogram(
            "ntp_probe_probe_duration_seconds", "Probe duration, by module.", ["module"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.in_flight = Gauge(
            "ntp_probe_probes_in_flight",
            "/probe requests waiting for their answer (what --probe.max-concurrent limits).",
            registry=r
        )
        self.rejected = Counter(
            "ntp_probe_probes_rejected",
            "Probe requests answered 503 because --probe.max-concurrent probes were running.",
            registry=r,
        )
        self.module_unknown = Counter(
            "ntp_probe_module_unknown", "Probe requests naming an unknown module.", registry=r
        )
        self.modules_configured = Gauge(
            "ntp_probe_modules_configured", "Modules in the loaded configuration.", registry=r
        )
        self.reload_ok = Gauge(
            "ntp_probe_config_last_reload_successful",
            "Whether the last configuration load succeeded.", registry=r,
        )
        self.reload_time = Gauge(
            "ntp_probe_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load.", registry=r,
        )
        self.packets_sent = Counter(
            "ntp_probe_ntp_packets_sent",
            "Request datagrams probes sent to servers: NTP and NTS time requests, ntpd's "
            "mode 6 and chronyd's command requests.", registry=r
        )
        self._leapfile = _LeapFileCollector()
        r.register(self._leapfile)
        self._children: dict[tuple[str, bool], tuple[Counter, Histogram]] = {}
        self._loaded = False  # no configuration loaded yet: series come with first probes

    def config_loaded(self, modules: Collection[str]) -> None:
        """Record a successful (re)load of ``modules`` (their names). Each module's probe
        series exist from now on, at 0, so that rate() and increase() count its first
        probe too (a series born at 1 has no increase); those of a module no longer
        configured go (renaming modules must not pile up series for the process's life)."""
        self._loaded = True
        self.modules_configured.set(len(modules))
        self.reload_ok.set(1)
        self.reload_time.set(time.time())
        for module, success in [key for key in self._children if key[0] not in modules]:
            del self._children[module, success]
            self.probes.remove(module, "success" if success else "failure")
            with contextlib.suppress(KeyError):  # the module's two results share it
                self.duration.remove(module)
        for module in modules:
            for success in (True, False):
                self._series(module, success)

    def use_leapfile(self, source: LeapSource | None) -> None:
        """Expose the leap file a (re)load read, or none."""
        self._leapfile.source = source

    def config_failed(self) -> None:
        """Record a failed reload (the old configuration stays)."""
        self.reload_ok.set(0)

    def observe(self, module: str, result: Measurement) -> None:
        """Count a finished probe. One of a module a reload removed while it ran counts
        only its packets: its series went with the module and do not come back."""
        children = self._children.get((module, result.success))
        if children is None:
            if self._loaded:  # every configured module's series exist since the load
                self.count_packets(result)
                return
            children = self._series(module, result.success)
        children[0].inc()
        children[1].observe(result.duration)
        self.count_packets(result)

    def _series(self, module: str, success: bool) -> tuple[Counter, Histogram]:
        key = (module, success)
        children = self._children.get(key)
        if children is None:  # labels() takes a lock and builds a key: do it once per module
            children = (self.probes.labels(module, "success" if success else "failure"),
                        self.duration.labels(module))
            self._children[key] = children
        return children

    def count_packets(self, result: Measurement) -> None:
        """Count a probe's packets; alone for one cancelled before it finished (its client
        went away): not a probe result, but the servers saw its packets."""
        if result.packets_sent:
            self.packets_sent.inc(result.packets_sent)

    def render(self) -> bytes:
        """The /metrics exposition."""
        return generate_latest(self.registry)
