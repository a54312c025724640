"""``python -m ntp_probe``."""

from ntp_probe.cli.main import main

raise SystemExit(main())
