"""Writing to standard output when it may not be writable (closed, a broken pipe, a full
disk): a failure to write is reported by exit status, never by a traceback."""

from __future__ import annotations

import contextlib
import os
import select
import sys

_WAIT = 1.0  # seconds between two looks at a full non-blocking descriptor


def write(text: str) -> bool:
    """Write ``text`` to standard output and flush; False when that failed."""
    out = sys.stdout
    try:
        if out is None:
            return False
        try:
            fd = out.fileno()
        except (OSError, ValueError, AttributeError):  # not a file (a test's capture)
            fd = None
        if fd is not None:
            # Straight to the descriptor, every byte: the buffered writer reports a write
            # cut short by a reader that went away (more than 64 KiB into a pipe) as done.
            out.flush()
            encoding = getattr(out, "encoding", None) or "utf-8"
            try:
                data = text.encode(encoding)
            except (UnicodeEncodeError, LookupError):  # an ASCII-only stdout
                data = text.encode("ascii", "replace")
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(fd, view):]
                except BlockingIOError:  # a non-blocking descriptor, full: wait for room
                    select.select([], [fd], [], _WAIT)
            return True
        try:
            out.write(text)
        except UnicodeEncodeError:  # an ASCII-only stdout and non-ASCII text
            out.write(text.encode("ascii", "replace").decode("ascii"))
        out.flush()
        return True
    except (OSError, ValueError):
        silence(out)
        return False


def silence(out: object) -> None:
    """Nothing more can be written to ``out``: the interpreter's own flush at exit must not
    fail again and print a traceback, so its descriptor now leads to /dev/null."""
    fileno = getattr(out, "fileno", None)
    if fileno is not None:
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), fileno())
