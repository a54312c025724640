"""The ``ntp-probe`` console script (and ``python -m ntp_probe``), kept light: it takes the
signals an operator may send while the rest loads (a third of a second and more: the
probers, aiohttp), before importing any of it."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from typing import NoReturn

INTERRUPTED = 130  # a shell's status for a process ended by SIGINT


class EarlyHangup:
    """Notes a SIGHUP that comes while the exporter starts (before its own handler), which
    would otherwise end the process: the exporter reloads once it serves."""

    def __init__(self) -> None:
        self.seen = False
        signal.signal(signal.SIGHUP, self._note)

    def _note(self, signum: int, frame: object) -> None:
        self.seen = True

    def __call__(self) -> bool:
        return self.seen


def console() -> NoReturn:
    """Run the command line, then exit. A check leaves as soon as its line is out: the
    interpreter's teardown (the NTS stack's libraries among what it unloads) would take up
    to a tenth of a second more of the -t that bounds the whole run."""
    command = sys.argv[1:2]
    checking = command == ["check"]
    hangup = None if command in (["probe"], ["check"]) else EarlyHangup()
    try:
        from ntp_probe.cli.main import main

        code = main(hangup=hangup)
    except KeyboardInterrupt:  # Ctrl-C while the command line loads
        code = _interrupted(checking)
    if checking:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                stream.flush()
        logging.shutdown()
        os._exit(code)
    raise SystemExit(code)


def _interrupted(checking: bool) -> int:
    """Say so in one line (a plugin's status line for a check) and give the exit status."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # a stream may be gone
        if checking:
            sys.stdout.write("NTP UNKNOWN: interrupted\n")
            return 3
        sys.stderr.write("ntp-probe: interrupted\n")
    return 3 if checking else INTERRUPTED
