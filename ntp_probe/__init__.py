"""ntp_probe: a blackbox_exporter-style Prometheus exporter for NTP."""

# The one place the version is written: pyproject.toml reads it from here when building.
# Not read back from the installed metadata: importlib.metadata would load 16 more modules
# (zipfile, email, csv, ...), about 0.75 MB, into every exporter process for one string.
__version__ = "0.1.0"
