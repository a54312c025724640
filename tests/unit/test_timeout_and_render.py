"""Probe timeout rule (engine.runner) and per-probe exposition (exposition.render)."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from ntp_probe.engine.result import Measurement, Reason
from ntp_probe.engine.runner import TimeoutHeaderError, probe_timeout
from ntp_probe.exposition import families
from ntp_probe.exposition.families import Family, declared
from ntp_probe.exposition.render import format_value, render
from ntp_probe.probers import common, ntp
from tests.conftest import value
from tests.contract import VALID_SAMPLE_METRICS

# --- probe_timeout ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "header", "offset", "expected"),
    [
        (10.0, None, 0.5, 10.0),  # no header: the module timeout
        (5.0, None, 0.0, 5.0),
        (5.0, "10", 0.5, 5.0),  # module timeout is smaller
        (10.0, "3", 0.5, 2.5),  # header - offset is smaller
        # The offset would eat it all: half the header bounds it, the other half is left
        # for the answer (the whole header made scrapes time out now and then).
        (10.0, "0.3", 0.5, 0.15),
        (10.0, "0.5", 0.5, 0.25),  # offset equal to the header: same rule
        # Up to twice the offset, still half: header - offset would fall to nothing just
        # above the offset, a shorter probe for a longer scrape timeout.
        (10.0, "0.501", 0.5, 0.2505),
        (10.0, "0.75", 0.5, 0.375),
        (10.0, "1", 0.5, 0.5),  # where the two rules meet
        (10.0, "1.2", 0.5, 0.7),
        (0.1, "0.3", 0.5, 0.1),
        (10.0, "10", 0.0, 10.0),
        (10.0, " 4.5 ", 0.5, 4.0),  # surrounding blanks tolerated
        (10.0, "9.75", 0.25, 9.5),
        (10.0, "", 0.5, 10.0),  # an empty header is no header (blackbox)
        (10.0, "+3", 0.5, 2.5),  # as Go's ParseFloat reads it (blackbox)
        (10.0, "1e1", 0.5, 9.5),
        (10.0, "25E-1", 0.5, 2.0),
        (10.0, "  ", 0.5, 10.0),
    ],
)
def test_probe_timeout(module: float, header: str | None, offset: float, expected: float) -> None:
    assert probe_timeout(module, header, offset) == pytest.approx(expected)


@pytest.mark.parametrize(
    "header", ["abc", "1e", "e1", "1e1.5", "++3", "1_0",
               "-1", "0", "-0", "0.0", "nan", "NaN", "inf", "-inf", "Infinity", "1s",
               "0x10", "\u0663", "\uff15.5"]  # Arabic-Indic 3, fullwidth 5: not ASCII
)
def test_probe_timeout_invalid_header(header: str) -> None:
    with pytest.raises(TimeoutHeaderError) as exc:
        probe_timeout(10.0, header, 0.5)
    msg = str(exc.value)
    assert "X-Prometheus-Scrape-Timeout-Seconds" in msg
    assert repr(header) in msg


def test_timeout_header_error_is_value_error() -> None:
    assert issubclass(TimeoutHeaderError, ValueError)


def test_probe_timeout_never_exceeds_header_or_module() -> None:
    for header in ("0.01", "0.3", "0.5", "0.51", "1", "2.5", "9.9", "10", "60"):
        for module in (0.1, 1.0, 5.0, 10.0):
            t = probe_timeout(module, header, 0.5)
            assert 0 < t <= module and t < float(header)


def test_a_longer_scrape_timeout_never_gives_a_shorter_probe() -> None:
    budgets = [probe_timeout(10.0, f"{ms / 1000}", 0.5) for ms in range(1, 3001)]
    assert budgets == sorted(budgets)
    assert min(budgets[500:]) >= 0.25  # past the offset, never less than at it


# --- format_value -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.0, "1"),
        (0.0, "0"),
        (-0.0, "0"),
        (-3.0, "-3"),
        (123456789.0, "123456789"),
        (0.5, "0.5"),
        (-0.00125, "-0.00125"),
        (1e-05, "1e-05"),
        (1e16, "1e+16"),
        (float("nan"), "NaN"),
        (float("inf"), "+Inf"),
        (float("-inf"), "-Inf"),
    ],
)
def test_format_value(value: float, text: str) -> None:
    assert format_value(value) == text


@pytest.mark.parametrize("value", [0.1, 1 / 3, 2.0**-30, 1e300, -12345.678, 1e15, 3.46608])
def test_format_value_is_lossless(value: float) -> None:
    text = format_value(value)
    assert float(text) == value


def test_format_value_accepts_int() -> None:
    assert format_value(3) == "3"
    assert format_value(-7) == "-7"
    assert float(format_value(10**20)) == 1e20


@given(st.floats(allow_nan=False))
def test_every_float_survives_the_text_format(value: float) -> None:
    assert float(format_value(value)) == value


@given(st.text(), st.text())
def test_every_label_value_survives_the_text_format(refid: str, version: str) -> None:
    r = Measurement()
    r.add(ntp.SERVER_INFO, 1, refid, version)
    parsed = {f.name: f for f in text_string_to_metric_families(render(r))}
    assert parsed["probe_ntp_server_info"].samples[0].labels == {"refid": refid,
                                                                  "version": version}


# --- render -------------------------------------------------------------------------


def _failed_result() -> Measurement:
    r = Measurement()
    r.duration = 0.25
    r.add(ntp.STRATUM, 2)
    r.add(ntp.OFFSET, -0.00125)
    r.add(ntp.RTT, 0.0005)
    r.add(ntp.SERVER_INFO, 1, 'a"b\\c\nd', "4")
    r.fail(Reason.STALE_REFERENCE)
    r.fail(Reason.OFFSET_EXCEEDED)  # ranks after stale_reference: ignored
    return r


def test_render_failed_probe_exact_text() -> None:
    def h(family: Family) -> str:
        return family.help

    expected = (
        f"# HELP probe_success {h(families.SUCCESS)}\n"
        "# TYPE probe_success gauge\n"
        "probe_success 0\n"
        f"# HELP probe_duration_seconds {h(families.DURATION)}\n"
        "# TYPE probe_duration_seconds gauge\n"
        "probe_duration_seconds 0.25\n"
        f"# HELP probe_ntp_offset_seconds {h(ntp.OFFSET)}\n"
        "# TYPE probe_ntp_offset_seconds gauge\n"
        "probe_ntp_offset_seconds -0.00125\n"
        f"# HELP probe_ntp_rtt_seconds {h(ntp.RTT)}\n"
        "# TYPE probe_ntp_rtt_seconds gauge\n"
        "probe_ntp_rtt_seconds 0.0005\n"
        f"# HELP probe_ntp_stratum {h(ntp.STRATUM)}\n"
        "# TYPE probe_ntp_stratum gauge\n"
        "probe_ntp_stratum 2\n"
        f"# HELP probe_ntp_server_info {h(ntp.SERVER_INFO)}\n"
        "# TYPE probe_ntp_server_info gauge\n"
        'probe_ntp_server_info{refid="a\\"b\\\\c\\nd",version="4"} 1\n'
        f"# HELP probe_ntp_failure_info {h(families.FAILURE)}\n"
        "# TYPE probe_ntp_failure_info gauge\n"
        'probe_ntp_failure_info{reason="stale_reference"} 1\n'
    )
    assert render(_failed_result()) == expected


def test_render_one_failure_line_and_one_help_type_per_family() -> None:
    r = _failed_result()
    r.add(ntp.SERVER_INFO, 1, "GPS", "3")
    text = render(r)
    lines = text.splitlines()
    assert sum(1 for line in lines if line.startswith("probe_ntp_failure_info")) == 1
    helps = [line.split()[2] for line in lines if line.startswith("# HELP ")]
    types = [line.split()[2] for line in lines if line.startswith("# TYPE ")]
    assert len(helps) == len(set(helps))
    assert helps == types
    assert all(line.endswith(" gauge") for line in lines if line.startswith("# TYPE "))
    # Both server_info series sit under the one family header, in insertion order.
    i = lines.index("# TYPE probe_ntp_server_info gauge")
    assert lines[i + 1].startswith('probe_ntp_server_info{refid="a')
    assert lines[i + 2] == 'probe_ntp_server_info{refid="GPS",version="3"} 1'
    # Every sample line belongs to the family declared just before it.
    family = None
    for line in lines:
        if line.startswith("# TYPE "):
            family = line.split()[2]
        elif not line.startswith("#"):
            assert re.split(r"[{ ]", line, maxsplit=1)[0] == family
    assert text.endswith("\n")


def test_render_success_has_no_failure_info() -> None:
    r = Measurement()
    r.duration = 0.0125
    r.add(ntp.PACKET_LOSS, 0)
    text = render(r)
    assert r.success
    assert "probe_success 1\n" in text
    assert "probe_duration_seconds 0.0125\n" in text
    assert "probe_ntp_packet_loss_ratio 0\n" in text
    assert "failure_info" not in text


def test_render_follows_declaration_order_with_failure_last() -> None:
    r = Measurement()
    every = [f for f in declared()
             if f not in (families.SUCCESS, families.DURATION, families.FAILURE)]
    for family in reversed(every):
        r.add(family, 1, *(["x"] * len(family.labels)))
    r.fail(Reason.TIMEOUT)
    rendered = [line.split()[2] for line in render(r).splitlines() if line.startswith("# TYPE")]
    assert rendered == ["probe_success", "probe_duration_seconds",
                        *(f.name for f in every), "probe_ntp_failure_info"]


def test_render_special_values() -> None:
    r = Measurement()
    r.add(ntp.OFFSET, math.nan)
    r.add(ntp.RTT, math.inf)
    text = render(r)
    assert "probe_ntp_offset_seconds NaN\n" in text
    assert "probe_ntp_rtt_seconds +Inf\n" in text


def test_adding_a_sample_with_the_wrong_labels_fails_at_once() -> None:
    r = Measurement()
    with pytest.raises(ValueError, match="probe_ntp_server_info"):
        r.add(ntp.SERVER_INFO, 1, "GPS")


def test_families_are_valid_and_declared_once() -> None:
    with pytest.raises(ValueError, match="declared twice"):
        Family("probe_ntp_offset_seconds", "again")
    with pytest.raises(ValueError, match="invalid metric name"):
        Family("probe ntp", "bad")
    with pytest.raises(ValueError, match="invalid label name"):
        Family("probe_test_bad_label_info", "bad", ("__reserved",))
    with pytest.raises(ValueError, match="must end in _total"):
        Family("probe_test_counter", "bad", type="counter")
    names = [f.name for f in declared()]
    assert len(names) == len(set(names))


def test_every_contract_metric_is_declared() -> None:
    assert set(VALID_SAMPLE_METRICS) <= {f.name for f in declared()}


def test_failure_reasons_are_the_contract_in_its_order() -> None:
    contract = [
        "target_forbidden", "backoff", "resolve", "local_error", "unreachable", "nts_ke_connect",
        "nts_ke_tls", "nts_alpn_mismatch", "nts_cert_untrusted", "nts_cert_expired",
        "nts_cert_name_mismatch", "nts_ke_error", "nts_ke_malformed", "nts_no_common_aead",
        "nts_no_cookies", "nts_nak", "nts_auth_failed", "chrony_socket",
        "chrony_timeout", "chrony_unauthorized", "chrony_bad_reply", "mode6_timeout",
        "mode6_error", "mode6_bad_reply", "kod_rate", "kod_deny",
        "kod_rstr", "kod_other", "timeout", "invalid_reply", "stratum_unsynchronized",
        "leap_unsynchronized", "implausible_time", "reference_after_transmit",
        "stale_reference", "excess_root_distance", "causality_violation", "offset_exceeded",
        "leap_mismatch", "no_sys_peer", "too_few_sources", "no_majority", "falsetickers",
        "kernel_unavailable",
    ]
    assert [r.value for r in Reason] == contract


def test_fail_keeps_the_reason_that_ranks_first() -> None:
    r = Measurement()
    r.fail(Reason.TIMEOUT)
    r.fail(Reason.RESOLVE)  # ranks before timeout, although recorded later
    r.fail(Reason.EXCESS_ROOT_DISTANCE)
    assert r.failure is Reason.RESOLVE
    assert not r.success
    r.add(ntp.STRATUM, 3)
    assert value(r, "probe_ntp_stratum") == 3.0
    assert value(r, "probe_ntp_rtt_seconds") is None


def test_a_result_served_again_counts_its_backoff_down() -> None:
    # From the min_probe_interval cache 5 s later, a backoff that had 884 s left has 879:
    # the gauge says how long until the server may be sent to again, now.
    m = Measurement()
    m.fail(Reason.KOD_RATE)
    m.add(common.BACKOFF_REMAINING, 884.0)
    m.add(common.KISS_CODE, 1, "RATE")
    m.add(ntp.STRATUM, 0)
    fresh = parse(render(m))
    again = parse(render(m, 5.0))
    assert fresh["probe_ntp_backoff_remaining_seconds"] == 884.0
    assert again["probe_ntp_backoff_remaining_seconds"] == 879.0
    assert again["probe_ntp_result_age_seconds"] == 5.0
    assert again["probe_ntp_stratum"] == 0 and again["probe_ntp_kiss_code_info"] == 1
    assert parse(render(m, 900.0))["probe_ntp_backoff_remaining_seconds"] == 0.0


def parse(text: str) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
