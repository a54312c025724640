"""``python -m ntp_probe``."""

from ntp_probe.cli.main import console

console()
