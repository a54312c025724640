"""ntp_probe: a blackbox_exporter-style Prometheus exporter for NTP."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ntp-probe")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"
