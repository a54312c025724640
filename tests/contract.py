"""Names from the public contract (the README's metric tables) that several test files
check the exporter against.

Written out here rather than taken from ntp_probe.exposition, so that a metric dropped or
renamed in the source fails the tests instead of silently changing what they expect.
"""

# Every per-probe series a probe with a valid sample reports; the KoD, failure, backoff
# and result-age series only appear when those apply.
VALID_SAMPLE_METRICS = (
    "probe_success", "probe_duration_seconds", "probe_dns_lookup_time_seconds",
    "probe_ip_protocol", "probe_ip_addr_hash", "probe_ntp_offset_seconds",
    "probe_ntp_rtt_seconds", "probe_ntp_jitter_seconds", "probe_ntp_offset_stddev_seconds",
    "probe_ntp_stratum", "probe_ntp_leap_indicator", "probe_ntp_precision_seconds",
    "probe_ntp_root_delay_seconds", "probe_ntp_root_dispersion_seconds",
    "probe_ntp_root_distance_seconds", "probe_ntp_reference_timestamp_seconds",
    "probe_ntp_server_processing_seconds", "probe_ntp_samples_sent",
    "probe_ntp_samples_received", "probe_ntp_packet_loss_ratio",
    "probe_ntp_causality_violation_seconds", "probe_ntp_server_info",
    "probe_ntp_timestamping_info",
)
