"""The ``ntp-probe`` console script (and ``python -m ntp_probe``), kept light: it takes the
signals an operator may send while the rest loads (a third of a second and more: the
probers, aiohttp), before importing any of it."""

from __future__ import annotations

# Only what the interpreter has loaded already (contextlib, os, sys) and signal: every
# millisecond before the handlers below is one in which a signal ends the process.
import contextlib
import os
import signal
import sys

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


def console() -> None:
    """Run the command line, then exit (it never returns). A check leaves as soon as its
    line is out: the interpreter's teardown (the NTS stack's libraries among what it
    unloads) would take up to a tenth of a second more of the -t that bounds the run."""
    command = sys.argv[1:2]
    checking = command == ["check"]
    try:
        if command in (["probe"], ["check"]):
            # timeout(1), a monitoring system's kill and a closed terminal end a one-off
            # probe as Ctrl-C does: its sockets (a chrony reply socket in chronyd's
            # directory) are closed and removed, and it says so in one line.
            for signum in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(signum, _as_interrupt)
        hangup = None if command in (["probe"], ["check"]) else EarlyHangup()
        from ntp_probe.cli.main import main

        code = main(hangup=hangup)
        if checking:
            import logging

            for stream in (sys.stdout, sys.stderr):
                _flush(stream)
            logging.shutdown()
    except KeyboardInterrupt:  # Ctrl-C while the command line loads (main takes it later)
        code = _interrupted(checking)
    if checking:
        os._exit(code)
    raise SystemExit(code)


def _as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _flush(stream: object) -> None:
    with contextlib.suppress(OSError, ValueError, AttributeError):  # closed, full, or gone
        stream.flush()  # type: ignore[attr-defined]


def _interrupted(checking: bool) -> int:
    """Say so in one line (a plugin's status line for a check) and give the exit status."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # a stream may be gone
        if checking:
            sys.stdout.write("NTP UNKNOWN: interrupted\n")
            _flush(sys.stdout)
        else:
            sys.stderr.write("ntp-probe: interrupted\n")
    return 3 if checking else INTERRUPTED
