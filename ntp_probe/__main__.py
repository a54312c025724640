"""``python -m ntp_probe``."""

from ntp_probe.cli import main

raise SystemExit(main())
