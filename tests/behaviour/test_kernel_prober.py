"""The kernel prober and the hybrid module (NTP + kernel correlation), and the leap window.

The kernel side is the real adjtimex state of this machine, read-only (modes = 0). The
only patch in this file replaces ``adjtimex.read`` with one that raises KernelClockError,
because EPERM or a non-Linux system cannot be produced here. The NTP side is the
in-process fake NTP server on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from ntp_probe.cli import report
from ntp_probe.config.load import load_config
from ntp_probe.config.schema import Config, Module
from ntp_probe.engine.coordinator import Coordinator
from ntp_probe.engine.result import Measurement
from ntp_probe.engine.targets import parse_target
from ntp_probe.exposition.render import render
from ntp_probe.net import adjtimex
from ntp_probe.probers import hybrid as correlation
from ntp_probe.proto import timex
from ntp_probe.safety.guard import Guard
from ntp_probe.safety.policy import TargetPolicy, parse_rules
from tests.behaviour import fake_server
from tests.behaviour.fake_server import FakeNTPServer, answer, silent
from tests.conftest import gauges, probe

# The fixture, made visible to pytest in this module.
fake_ntp = fake_server.fake_ntp


def _kernel_problem() -> str | None:
    try:
        adjtimex.read()
    except timex.KernelClockError as exc:
        return str(exc)
    return None


KERNEL_PROBLEM = _kernel_problem()
pytestmark = pytest.mark.skipif(
    KERNEL_PROBLEM is not None, reason=f"kernel clock not readable here: {KERNEL_PROBLEM}"
)

CONFIG: Config = load_config(None)
KERNEL_GAUGES = (
    "probe_kernel_offset_seconds",
    "probe_kernel_frequency_offset_ratio",
    "probe_kernel_maxerror_seconds",
    "probe_kernel_esterror_seconds",
    "probe_kernel_sync_status",
    "probe_kernel_clock_state_info",
    "probe_kernel_tai_offset_seconds",
)
CORRELATION_GAUGES = (
    "probe_kernel_divergence_seconds",
    "probe_kernel_offset_within_maxerror",
    "probe_kernel_coherence_score",
)
# On loopback the measured offset is the injected one within half the round trip.
LOOPBACK_ERROR = 0.01
NTP_PHASE_LIMIT = 16.0  # the kernel caps maxerror at 16 s


def packaged(name: str) -> Module:
    return CONFIG.modules[name]


def with_ntp(module: Module, **settings: Any) -> Module:
    return dataclasses.replace(module, ntp=dataclasses.replace(module.ntp, **settings))


def names(result: Measurement) -> set[str]:
    return {name for name, _, _ in gauges(result)}


def series(result: Measurement, name: str) -> list[tuple[dict[str, str], float]]:
    return [(dict(labels), value) for n, labels, value in gauges(result) if n == name]


def value(result: Measurement, name: str) -> float:
    found = series(result, name)
    assert len(found) == 1, f"{name}: expected one series, got {found}"
    return found[0][1]


def exposition(result: Measurement) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Render as /probe would and parse it back."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(render(result)):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one patch: the kernel clock cannot be read (EPERM / not Linux)."""

    def read() -> timex.KernelClock:
        raise timex.KernelClockError("clock_adjtime: Operation not permitted (EPERM)")

    monkeypatch.setattr(adjtimex, "read", read)


# --- the kernel prober ---------------------------------------------------------------------


async def test_kernel_module_reports_every_gauge() -> None:
    module = packaged("kernel")
    assert module.prober == "kernel"
    result, log = await probe("localhost", module)
    clock = adjtimex.read()
    assert result.success, log.text()
    assert result.failure is None
    missing = set(KERNEL_GAUGES) - names(result)
    assert not missing, f"missing {sorted(missing)}"
    # Units: seconds and ratios, not the kernel's microseconds and scaled ppm.
    maxerror = value(result, "probe_kernel_maxerror_seconds")
    assert 0 <= maxerror <= NTP_PHASE_LIMIT
    assert maxerror == pytest.approx(clock.maxerror, abs=0.01)  # grows 500 us/s at most
    assert value(result, "probe_kernel_esterror_seconds") == pytest.approx(clock.esterror,
                                                                             abs=0.01)
    assert value(result, "probe_kernel_offset_seconds") == pytest.approx(clock.offset, abs=1e-3)
    assert value(result, "probe_kernel_frequency_offset_ratio") == pytest.approx(
        clock.frequency_ratio, abs=1e-9
    )
    assert abs(value(result, "probe_kernel_frequency_offset_ratio")) < 1e-3  # <= 500 ppm
    assert value(result, "probe_kernel_tai_offset_seconds") == clock.tai
    assert value(result, "probe_kernel_sync_status") == (1 if clock.synchronized else 0)
    assert series(result, "probe_kernel_clock_state_info") == [({"state": clock.state}, 1.0)]
    assert clock.state in timex.CLOCK_STATES.values()


async def test_status_flags_one_series_per_set_flag() -> None:
    result, _ = await probe("localhost", packaged("kernel"))
    clock = adjtimex.read()
    flags = series(result, "probe_kernel_status_flags_info")
    assert sorted(labels["flag"] for labels, _ in flags) == sorted(clock.flags)
    assert all(v == 1 for _, v in flags)
    assert len({labels["flag"] for labels, _ in flags}) == len(flags)
    # The rendered exposition carries them too (and the catalogue accepts every gauge).
    rendered = exposition(result)
    assert len(rendered.get("probe_kernel_status_flags_info", [])) == len(clock.flags)
    assert rendered["probe_success"] == [({}, 1.0)]
    assert "probe_ntp_failure_info" not in rendered


async def test_kernel_module_sends_no_packet(fake_ntp: FakeNTPServer) -> None:
    """Even a target that is a live NTP server is never contacted by the kernel prober."""
    result, log = await probe(fake_ntp.target, packaged("kernel"))
    assert result.success, log.text()
    await fake_ntp.drain()
    assert fake_ntp.requests == []
    assert result.packets_sent == 0
    assert not {n for n in names(result) if n.startswith("probe_ntp_")}
    assert "probe_dns_lookup_time_seconds" not in names(result)


async def test_the_module_policy_applies_to_the_kernel_prober_too() -> None:
    # Nothing is sent, but a module's allowed/denied targets are the module's whatever its
    # prober (as chrony's socket mode applies them): the target is refused by name.
    policy = TargetPolicy(denied=parse_rules(["badhost", "127.0.0.2/32"], "denied_targets"))
    for target in ("badhost", "127.0.0.2"):
        result, log = await probe(target, packaged("kernel"), guard=Guard(policies=(policy,)))
        assert result.failure == "target_forbidden", log.text()
        assert "probe_kernel_offset_seconds" not in names(result)
    result, log = await probe("localhost", packaged("kernel"), guard=Guard(policies=(policy,)))
    assert result.failure != "target_forbidden", log.text()


async def test_kernel_unavailable_fails_with_one_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    unavailable(monkeypatch)
    result, log = await probe("localhost", packaged("kernel"))
    assert not result.success
    assert result.failure == "kernel_unavailable"
    assert not {n for n in names(result) if n.startswith("probe_kernel_")}
    assert "Operation not permitted" in log.text()
    rendered = exposition(result)
    assert rendered["probe_success"] == [({}, 0.0)]
    assert rendered["probe_ntp_failure_info"] == [({"reason": "kernel_unavailable"}, 1.0)]


# --- hybrid: NTP + kernel correlation ------------------------------------------------------


def hybrid(**settings: Any) -> Module:
    module = packaged("hybrid")
    assert module.ntp.kernel_correlation
    return with_ntp(module, **settings)


def assert_correlation(result: Measurement, injected: float) -> None:
    ntp_offset = value(result, "probe_ntp_offset_seconds")
    kernel_offset = value(result, "probe_kernel_offset_seconds")
    maxerror = value(result, "probe_kernel_maxerror_seconds")
    assert ntp_offset == pytest.approx(injected, abs=LOOPBACK_ERROR)
    assert kernel_offset == pytest.approx(adjtimex.read().offset, abs=1e-3)
    d = value(result, "probe_kernel_divergence_seconds")
    assert d == pytest.approx(abs(ntp_offset - kernel_offset), abs=1e-12)
    assert value(result, "probe_kernel_offset_within_maxerror") == (
        1 if abs(ntp_offset) <= maxerror else 0
    )
    score = value(result, "probe_kernel_coherence_score")
    assert score == pytest.approx(correlation.coherence_score(d), rel=1e-9, abs=1e-300)
    if d > 0.05:  # independent of the implementation: the decay beyond 50 ms
        assert score == pytest.approx(0.5 * math.exp(-(d - 0.05) / 0.05), rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("injected", [0.25, -0.25, 20.0])
async def test_hybrid_correlates_ntp_with_kernel(fake_ntp: FakeNTPServer, injected: float) -> None:
    fake_ntp.behaviour = answer(offset=injected)
    # Causality off: the injected offsets are far beyond the local module's 1 ms.
    result, log = await probe(fake_ntp.target, hybrid(max_causality_violation=0.0))
    assert result.success, log.text()
    assert not set(KERNEL_GAUGES) - names(result)
    assert_correlation(result, injected)
    if abs(injected) > NTP_PHASE_LIMIT:
        # No kernel maxerror can cover 20 s: the kernel caps it at 16 s.
        assert value(result, "probe_kernel_offset_within_maxerror") == 0
    assert "kernel correlation" in log.text()


async def test_hybrid_on_this_machine_maxerror_16s(fake_ntp: FakeNTPServer) -> None:
    """This machine's kernel is undisciplined: maxerror stuck at 16 s, so 0.25 s is within
    it and 20 s is not."""
    if adjtimex.read().maxerror != NTP_PHASE_LIMIT:
        pytest.skip("the kernel clock is disciplined here (maxerror below 16 s)")
    for injected, within in ((0.25, 1), (20.0, 0)):
        fake_ntp.behaviour = answer(offset=injected)
        result, log = await probe(fake_ntp.target, hybrid(max_causality_violation=0.0))
        assert value(result, "probe_kernel_offset_within_maxerror") == within, log.text()


async def test_packaged_hybrid_agrees_with_a_good_server(fake_ntp: FakeNTPServer) -> None:
    result, log = await probe(fake_ntp.target, packaged("hybrid"))
    assert result.success, log.text()
    assert_correlation(result, 0.0)
    d = value(result, "probe_kernel_divergence_seconds")
    if d <= 1e-3:
        assert value(result, "probe_kernel_coherence_score") == 1.0
    rendered = exposition(result)
    for name in (*KERNEL_GAUGES, *CORRELATION_GAUGES, "probe_ntp_offset_seconds"):
        assert name in rendered, name


async def test_hybrid_reports_correlation_on_a_failed_sanity_check(
    fake_ntp: FakeNTPServer,
) -> None:
    """The packaged hybrid (1 ms causality) fails a 0.25 s offset but still exports the
    values that explain it."""
    fake_ntp.behaviour = answer(offset=0.25)
    result, log = await probe(fake_ntp.target, packaged("hybrid"))
    assert result.failure == "causality_violation", log.text()
    assert not result.success
    assert_correlation(result, 0.25)
    assert value(result, "probe_kernel_offset_within_maxerror") == (
        1 if adjtimex.read().maxerror >= 0.25 else 0
    )
    rendered = exposition(result)
    assert rendered["probe_ntp_failure_info"] == [({"reason": "causality_violation"}, 1.0)]


async def test_hybrid_silent_server_reports_kernel_but_no_correlation(
    fake_ntp: FakeNTPServer,
) -> None:
    fake_ntp.behaviour = silent
    module = hybrid(samples=1, reply_timeout=0.1)
    result, log = await probe(fake_ntp.target, module)
    assert result.failure == "timeout", log.text()
    assert len(fake_ntp.requests) == 1
    assert not set(KERNEL_GAUGES) - names(result), log.text()
    assert not set(CORRELATION_GAUGES) & names(result)
    assert "probe_ntp_offset_seconds" not in names(result)
    assert series(result, "probe_kernel_clock_state_info") == [
        ({"state": adjtimex.read().state}, 1.0)
    ]


async def test_hybrid_reports_the_kernel_when_nothing_was_sent(
    fake_ntp: FakeNTPServer,
) -> None:
    # A refused target (as a backoff or a failed lookup) sends nothing: the kernel's
    # series are there all the same, so alerts on them do not hang on the NTP side.
    policy = TargetPolicy(denied=parse_rules(["127.0.0.0/8"], "denied_targets"))
    result, log = await probe(fake_ntp.target, hybrid(), guard=Guard(policies=(policy,)))
    assert result.failure == "target_forbidden", log.text()
    assert not fake_ntp.requests
    assert not set(KERNEL_GAUGES) - names(result), log.text()
    assert not set(CORRELATION_GAUGES) & names(result)


async def test_hybrid_kernel_unavailable_keeps_ntp_metrics(
    fake_ntp: FakeNTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    unavailable(monkeypatch)
    result, log = await probe(fake_ntp.target, packaged("hybrid"))
    assert result.failure == "kernel_unavailable", log.text()
    assert not result.success
    assert "probe_ntp_offset_seconds" in names(result)
    assert not {n for n in names(result) if n.startswith("probe_kernel_")}
    rendered = exposition(result)
    assert rendered["probe_ntp_failure_info"] == [({"reason": "kernel_unavailable"}, 1.0)]


async def test_hybrid_ntp_failure_comes_before_kernel_unavailable(
    fake_ntp: FakeNTPServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    unavailable(monkeypatch)
    fake_ntp.behaviour = silent
    result, log = await probe(fake_ntp.target, hybrid(samples=1, reply_timeout=0.1))
    assert result.failure == "timeout", log.text()
    assert exposition(result)["probe_ntp_failure_info"] == [({"reason": "timeout"}, 1.0)]


# --- the leap-second window (node_exporter semantics in the `local` module) ----------------

LEAP_OFFSET = 0.3  # beyond local's 1 ms causality tolerance, within 1 s + 1 ms


async def test_local_fails_causality_without_a_leap(fake_ntp: FakeNTPServer) -> None:
    module = packaged("local")
    assert module.ntp.max_causality_violation == pytest.approx(1e-3)
    fake_ntp.behaviour = answer(offset=LEAP_OFFSET, leap=0)
    result, log = await probe(fake_ntp.target, module)
    assert result.failure == "causality_violation", log.text()
    assert "leap second" not in log.text()


@pytest.mark.parametrize("leap", [1, 2])
async def test_local_widens_causality_when_a_leap_is_announced(
    fake_ntp: FakeNTPServer, leap: int
) -> None:
    fake_ntp.behaviour = answer(offset=LEAP_OFFSET, leap=leap)
    result, log = await probe(fake_ntp.target, packaged("local"))
    assert result.success, log.text()
    assert value(result, "probe_ntp_leap_indicator") == leap
    assert value(result, "probe_ntp_causality_violation_seconds") > 1e-3
    assert "causality tolerance widened by 1 s" in log.text()


async def test_leap_widening_is_one_second_not_unlimited(fake_ntp: FakeNTPServer) -> None:
    fake_ntp.behaviour = answer(offset=1.5, leap=1)
    result, log = await probe(fake_ntp.target, packaged("local"))
    assert result.failure == "causality_violation", log.text()


async def test_leap_does_not_turn_on_a_disabled_causality_check(
    fake_ntp: FakeNTPServer,
) -> None:
    """The `ntp` module has the check off (0s): a leap must not switch it on at 1 s."""
    fake_ntp.behaviour = answer(offset=1.5, leap=1)
    module = with_ntp(packaged("ntp_fast"), preferred_ip_protocol="ip4")
    assert module.ntp.max_causality_violation == 0
    result, log = await probe(fake_ntp.target, module)
    assert result.success, log.text()


async def coordinated(coordinator: Coordinator, target: str, module: Module) -> Measurement:
    outcome = await coordinator.probe(CONFIG, module, parse_target(target), module.timeout)
    return outcome.result


async def test_fresh_coordinator_without_announcement_fails(fake_ntp: FakeNTPServer) -> None:
    fake_ntp.behaviour = answer(offset=LEAP_OFFSET, leap=0)
    result = await coordinated(Coordinator(), fake_ntp.target, packaged("local"))
    assert result.failure == "causality_violation"


async def test_coordinator_remembers_the_announcement_per_server(
    fake_ntp: FakeNTPServer,
) -> None:
    """After an announced probe, the same server is still widened once the bits are gone
    (we are before the announced midnight, so inside its window); another server is not."""
    coordinator = Coordinator()
    module = packaged("local")
    fake_ntp.behaviour = answer(offset=LEAP_OFFSET, leap=1)
    first = await coordinated(coordinator, fake_ntp.target, module)
    assert first.success, first.failure
    fake_ntp.behaviour = answer(offset=LEAP_OFFSET, leap=0)
    later = await coordinated(coordinator, fake_ntp.target, module)
    assert later.success, later.failure
    assert value(later, "probe_ntp_leap_indicator") == 0

    other = await FakeNTPServer.start(answer(offset=LEAP_OFFSET, leap=0))
    try:
        unrelated = await coordinated(coordinator, other.target, module)
    finally:
        other.close()
    assert unrelated.failure == "causality_violation"


async def test_the_cli_headline_says_what_the_kernel_clock_is() -> None:
    result, log = await probe("localhost", packaged("kernel"))
    clock = adjtimex.read()
    headline = report.text("localhost", "kernel", result, log).splitlines()[0]
    assert headline.startswith("localhost (module kernel): OK in ")
    assert f"kernel state {clock.state}" in headline
    assert f"synchronised {'yes' if clock.synchronized else 'no'}" in headline
    assert "is not contacted" in log.text()  # the target is ignored, and the log says so
