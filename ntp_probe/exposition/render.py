"""Exposition: per-probe results rendered as text, and the exporter's own internals.

Per-probe metrics are written straight to the text format rather than through a fresh
prometheus_client registry: the result is built once and thrown away, and rendering
it directly costs a tenth of building Gauge objects per request (see DESIGN.md).
"""

from __future__ import annotations

import math

from ntp_probe.engine.result import ProbeResult

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# name -> help; the order here is the order of the exposition.
PROBE_METRICS: dict[str, str] = {
    "probe_success": "Whether the probe succeeded (1) or failed (0).",
    "probe_duration_seconds": "How long the probe took, in seconds.",
    "probe_dns_lookup_time_seconds": "How long resolving the target took, in seconds.",
    "probe_ip_protocol": "IP protocol of the probed address (4 or 6).",
    "probe_ip_addr_hash": "FNV-1a hash of the probed IP address (changes when it changes).",
    "probe_ntp_offset_seconds": (
        "Offset of the server's clock from the local clock, in seconds "
        "(positive: the server is ahead), from the sample with the smallest delay."
    ),
    "probe_ntp_rtt_seconds": "Round-trip delay of the selected sample, in seconds.",
    "probe_ntp_jitter_seconds": "RMS of the sample offsets against the selected one, in seconds.",
    "probe_ntp_offset_stddev_seconds": "Standard deviation of the sample offsets, in seconds.",
    "probe_ntp_stratum": "Stratum reported by the server.",
    "probe_ntp_leap_indicator": "Leap indicator (0 none, 1 insert, 2 delete, 3 unsynchronised).",
    "probe_ntp_precision_seconds": "Precision of the server's clock, in seconds.",
    "probe_ntp_root_delay_seconds": "Server's round-trip delay to its reference clock, in seconds.",
    "probe_ntp_root_dispersion_seconds": "Server's dispersion to its reference clock, in seconds.",
    "probe_ntp_root_distance_seconds": (
        "Bound on the error of the measured offset: (rtt + root delay)/2 + root dispersion, "
        "in seconds."
    ),
    "probe_ntp_reference_timestamp_seconds": (
        "When the server's clock was last set or corrected, as a Unix time "
        "(0 when the server reports none)."
    ),
    "probe_ntp_server_processing_seconds": (
        "Time the server held the request (T3 - T2), in seconds."
    ),
    "probe_ntp_samples_sent": "Requests sent in this probe.",
    "probe_ntp_samples_received": "Replies that passed the packet checks, Kiss-o'-Death included.",
    "probe_ntp_packet_loss_ratio": "1 - samples received / samples sent.",
    "probe_ntp_causality_violation_seconds": (
        "Positive part of |offset| - rtt/2: clock error that path asymmetry cannot explain, "
        "in seconds."
    ),
    "probe_ntp_backoff_remaining_seconds": (
        "Seconds until this server may be sent to again after a Kiss-o'-Death."
    ),
    "probe_ntp_result_age_seconds": (
        "Age of a result served again because of the module's min_probe_interval, in seconds."
    ),
    "probe_ntp_server_info": "Server identity: reference id and NTP version of its reply.",
    "probe_ntp_kiss_code_info": "Kiss-o'-Death code received from the server.",
    "probe_kernel_offset_seconds": (
        "Offset the kernel clock discipline is still slewing out, in seconds "
        "(positive: the clock is behind)."
    ),
    "probe_kernel_frequency_offset_ratio": (
        "Frequency correction applied by the kernel, as a ratio (1e-6 = 1 ppm)."
    ),
    "probe_kernel_maxerror_seconds": "Kernel's maximum error bound of the clock, in seconds.",
    "probe_kernel_esterror_seconds": "Kernel's estimated error of the clock, in seconds.",
    "probe_kernel_sync_status": "1 when the kernel clock is synchronised (no STA_UNSYNC, "
    "state not TIME_ERROR).",
    "probe_kernel_clock_state_info": "Kernel clock state from adjtimex's return value.",
    "probe_kernel_tai_offset_seconds": "TAI - UTC offset known to the kernel, in seconds.",
    "probe_kernel_time_constant": "Kernel PLL time constant (log2).",
    "probe_kernel_tick_seconds": "Length of a kernel clock tick, in seconds.",
    "probe_kernel_status_flags_info": "Kernel clock status bits that are set (STA_*).",
    "probe_kernel_divergence_seconds": (
        "|NTP offset - kernel offset|: disagreement between the NTP measurement and the "
        "kernel's view, in seconds."
    ),
    "probe_kernel_offset_within_maxerror": (
        "1 when |NTP offset| <= the kernel's maxerror (the kernel's error bound holds)."
    ),
    "probe_kernel_coherence_score": (
        "Agreement of NTP and kernel, 1 (within 1 ms) falling to 0.5 at 50 ms and "
        "decaying beyond."
    ),
    "probe_ntp_failure_info": "Why the probe failed (exactly one series on failure).",
}

FAILURE_REASONS = (
    "target_forbidden", "backoff", "resolve", "kod_rate", "kod_deny", "kod_rstr", "kod_other",
    "timeout", "invalid_reply", "stratum_unsynchronized", "leap_unsynchronized",
    "implausible_time", "reference_after_transmit", "stale_reference", "excess_root_distance",
    "causality_violation", "offset_exceeded", "kernel_unavailable",
)


def format_value(value: float) -> str:
    """A sample value as the text format writes it."""
    value = float(value)
    if value.is_integer():  # False for NaN and the infinities
        return str(int(value)) if -1e15 < value < 1e15 else repr(value)
    if math.isfinite(value):
        return repr(value)
    if value != value:
        return "NaN"
    return "+Inf" if value > 0 else "-Inf"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


# name -> (position in the exposition, its HELP and TYPE lines), built once.
_HEADERS = {
    name: (i, f"# HELP {name} {help_text}\n# TYPE {name} gauge\n")
    for i, (name, help_text) in enumerate(PROBE_METRICS.items())
}


def render(result: ProbeResult, result_age: float | None = None) -> str:
    """The result in the Prometheus text format (a fresh exposition per probe).

    ``result_age`` marks a result served again from the min_probe_interval cache.
    """
    samples = [
        ("probe_success", (), 1.0 if result.success else 0.0),
        ("probe_duration_seconds", (), result.duration),
        *result.gauges,
    ]
    if result_age is not None:
        samples.append(("probe_ntp_result_age_seconds", (), result_age))
    if result.failure is not None:
        samples.append(("probe_ntp_failure_info", (("reason", result.failure),), 1.0))
    try:
        # Stable sort: series of one family stay in the order the prober set them.
        samples.sort(key=lambda s: _HEADERS[s[0]][0])
    except KeyError as exc:
        raise KeyError(f"metric missing from the catalogue: {exc.args[0]}") from None
    out: list[str] = []
    previous = ""
    for name, labels, value in samples:
        if name != previous:
            out.append(_HEADERS[name][1])
            previous = name
        if labels:
            inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            out.append(f"{name}{{{inner}}} {format_value(value)}\n")
        else:
            out.append(f"{name} {format_value(value)}\n")
    return "".join(out)
