"""The adjtimex syscall, read-only: ``clock_adjtime(CLOCK_REALTIME)`` with ``modes = 0``.

A read needs no privilege at all; nothing here ever passes another mode, so the exporter
can never change the clock and must never be given CAP_SYS_TIME.
"""

from __future__ import annotations

import ctypes
import errno
import os
import sys

from ntp_probe.proto.timex import KernelClock, KernelClockError, Timex, decode

_CLOCK_REALTIME = 0

_libc: ctypes.CDLL | None = None


def _load_libc() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        # The interpreter's own symbols include the C library's: no search for the library
        # (find_library runs ldconfig, a subprocess, which must not happen in the event loop).
        lib = ctypes.CDLL(None, use_errno=True)
        lib.clock_adjtime.argtypes = [ctypes.c_int, ctypes.POINTER(Timex)]
        lib.clock_adjtime.restype = ctypes.c_int
        _libc = lib
    return _libc


def read() -> KernelClock:
    """Read the kernel clock state (modes = 0: a pure read, no privilege needed)."""
    if not sys.platform.startswith("linux"):
        raise KernelClockError(f"adjtimex is Linux-only (this is {sys.platform})")
    if ctypes.sizeof(ctypes.c_long) != 8:
        raise KernelClockError("struct timex layout is only known for 64-bit Linux")
    lib = _load_libc()
    tx = Timex()
    tx.modes = 0  # never anything else: this must stay a read
    rc = lib.clock_adjtime(_CLOCK_REALTIME, ctypes.byref(tx))
    if rc < 0:
        err = ctypes.get_errno()
        raise KernelClockError(f"clock_adjtime: {os.strerror(err)} ({errno.errorcode.get(err)})")
    return decode(tx, rc)
