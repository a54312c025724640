"""Read-only view of the kernel clock discipline (Linux adjtimex / clock_adjtime).

A read (``modes = 0``) needs no privilege at all; nothing here ever passes another
mode, so the exporter can never change the clock and must never be given
CAP_SYS_TIME. Decoding is separate from the syscall so it is tested with crafted
buffers for every status and clock state.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

# <linux/timex.h> status bits.
STATUS_FLAGS = {
    0x0001: "PLL", 0x0002: "PPSFREQ", 0x0004: "PPSTIME", 0x0008: "FLL", 0x0010: "INS",
    0x0020: "DEL", 0x0040: "UNSYNC", 0x0080: "FREQHOLD", 0x0100: "PPSSIGNAL",
    0x0200: "PPSJITTER", 0x0400: "PPSWANDER", 0x0800: "PPSERROR", 0x1000: "CLOCKERR",
    0x2000: "NANO", 0x4000: "MODE", 0x8000: "CLK",
}
STA_UNSYNC = 0x0040
STA_NANO = 0x2000
# adjtimex's return value.
CLOCK_STATES = {0: "TIME_OK", 1: "TIME_INS", 2: "TIME_DEL", 3: "TIME_OOP", 4: "TIME_WAIT",
                5: "TIME_ERROR"}
TIME_ERROR = 5
_SCALED_PPM = 65536 * 1_000_000  # freq and tolerance are ppm with 16 fractional bits


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class Timex(ctypes.Structure):
    """glibc's ``struct timex`` on LP64 Linux (x86_64 and aarch64 share the layout)."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 11),
    ]


class KernelClockError(Exception):
    """The kernel clock state cannot be read here."""


@dataclass(frozen=True, slots=True)
class KernelClock:
    """The kernel's clock discipline state, in SI units."""

    offset: float  # seconds still being slewed out (positive: the clock is behind)
    frequency_ratio: float  # frequency correction, e.g. 1e-6 = 1 ppm fast
    maxerror: float  # seconds
    esterror: float  # seconds
    status: int
    constant: int  # PLL time constant (log2)
    precision: float  # seconds
    tolerance_ratio: float
    tick: float  # seconds per clock tick
    tai: int  # TAI - UTC, seconds
    return_code: int

    @property
    def flags(self) -> tuple[str, ...]:
        """Names of the status bits that are set."""
        return tuple(name for bit, name in STATUS_FLAGS.items() if self.status & bit)

    @property
    def state(self) -> str:
        """TIME_OK ... TIME_ERROR from adjtimex's return value."""
        return CLOCK_STATES.get(self.return_code, f"UNKNOWN_{self.return_code}")

    @property
    def synchronized(self) -> bool:
        """Not STA_UNSYNC and not TIME_ERROR."""
        return not self.status & STA_UNSYNC and self.return_code != TIME_ERROR


def decode(tx: Timex, return_code: int) -> KernelClock:
    """Convert a filled ``struct timex`` (STA_NANO aware) to :class:`KernelClock`."""
    # Divided, not multiplied by 1e-6: a division rounds once, so the values are
    # node_exporter's timex values bit for bit (20 us is 2e-05, not 1.9999999999999998e-05).
    per_second = 1e9 if tx.status & STA_NANO else 1e6
    return KernelClock(
        offset=tx.offset / per_second,
        frequency_ratio=tx.freq / _SCALED_PPM,
        maxerror=tx.maxerror / 1e6,
        esterror=tx.esterror / 1e6,
        status=tx.status,
        constant=tx.constant,
        precision=tx.precision / 1e6,
        tolerance_ratio=tx.tolerance / _SCALED_PPM,
        tick=tx.tick / 1e6,
        tai=tx.tai,
        return_code=return_code,
    )


def decode_buffer(buffer: bytes, return_code: int) -> KernelClock:
    """Decode raw ``struct timex`` bytes (for tests and captured states)."""
    if len(buffer) != ctypes.sizeof(Timex):
        raise ValueError(f"struct timex is {ctypes.sizeof(Timex)} bytes, got {len(buffer)}")
    return decode(Timex.from_buffer_copy(buffer), return_code)
