"""``python -m ntp_probe``."""

from ntp_probe.cli.entry import console

console()
