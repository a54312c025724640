"""proto.timex and net.adjtimex: the ``struct timex`` layout, crafted buffers, a real read.

The layout is glibc's ``struct timex`` on LP64 Linux. x86_64 and aarch64 share this
LP64 layout (same type sizes and natural alignment; both are little-endian), so the
explicit offsets below hold on both. They are checked twice: against the ctypes
structure, and independently of ctypes by packing bytes at those offsets with
:mod:`struct` and decoding them with :func:`timex.decode_buffer`.

Nothing here ever calls adjtimex / clock_adjtime with ``modes`` other than 0: the only
syscalls are reads (a zeroed buffer, checked to be zero before the call).
"""

from __future__ import annotations

import ast
import ctypes
import ctypes.util
import inspect
import struct
import sys
import time
from typing import Any

import pytest

from ntp_probe.net import adjtimex
from ntp_probe.proto import timex

LP64 = ctypes.sizeof(ctypes.c_long) == 8
LINUX = sys.platform.startswith("linux")
needs_lp64 = pytest.mark.skipif(not LP64, reason="struct timex layout is LP64-only (64-bit)")
needs_linux = pytest.mark.skipif(
    not (LINUX and LP64), reason="adjtimex needs 64-bit Linux"
)

SIZE = 208
# glibc LP64 offsets (bits/timex.h), verified with a C offsetof program.
LONG_FIELDS = {
    "offset": 8, "freq": 16, "maxerror": 24, "esterror": 32, "constant": 48,
    "precision": 56, "tolerance": 64, "tick": 88, "ppsfreq": 96, "jitter": 104,
    "stabil": 120, "jitcnt": 128, "calcnt": 136, "errcnt": 144, "stbcnt": 152,
}
INT_FIELDS = {"status": 40, "shift": 112, "tai": 160}
TV_SEC, TV_USEC = 72, 80
EXPECTED_OFFSETS = {"modes": 0, **LONG_FIELDS, **INT_FIELDS, "time": 72}

STA_PLL, STA_INS, STA_DEL, STA_UNSYNC, STA_NANO = 0x0001, 0x0010, 0x0020, 0x0040, 0x2000


def pack(
    *, modes: int = 0, tv_sec: int = 0, tv_usec: int = 0, **values: int
) -> bytes:
    """A 208-byte ``struct timex`` image with explicit little-endian field offsets."""
    buf = bytearray(SIZE)
    struct.pack_into("<I", buf, 0, modes)
    for name, value in values.items():
        if name in LONG_FIELDS:
            struct.pack_into("<q", buf, LONG_FIELDS[name], value)
        elif name in INT_FIELDS:
            struct.pack_into("<i", buf, INT_FIELDS[name], value)
        else:
            raise KeyError(name)
    struct.pack_into("<q", buf, TV_SEC, tv_sec)
    struct.pack_into("<q", buf, TV_USEC, tv_usec)
    return bytes(buf)


def decode(rc: int = 0, **values: int) -> timex.KernelClock:
    return timex.decode_buffer(pack(**values), rc)


# --- layout ------------------------------------------------------------------------------


@needs_lp64
def test_struct_size_is_glibc_lp64() -> None:
    assert ctypes.sizeof(timex.Timex) == SIZE


@needs_lp64
@pytest.mark.parametrize(("name", "offset"), sorted(EXPECTED_OFFSETS.items()))
def test_field_offsets_match_glibc_lp64(name: str, offset: int) -> None:
    assert getattr(timex.Timex, name).offset == offset


@needs_lp64
def test_field_sizes_and_timeval() -> None:
    for name in LONG_FIELDS:
        assert getattr(timex.Timex, name).size == 8, name
    for name in ("modes", *INT_FIELDS):
        assert getattr(timex.Timex, name).size == 4, name
    assert timex.Timex.time.size == 16
    assert timex.Timex.time.offset + timex._Timeval.tv_usec.offset == TV_USEC
    # The reserved tail runs from after tai (164) to the end.
    reserved = timex.Timex._reserved
    assert reserved.offset == 164 and reserved.offset + reserved.size == SIZE


@needs_lp64
def test_every_field_decodes_from_its_explicit_offset() -> None:
    """Distinct values at every explicit offset come back in the right ctypes fields."""
    values = {name: 1000 + i for i, name in enumerate([*LONG_FIELDS, *INT_FIELDS])}
    tx = timex.Timex.from_buffer_copy(
        pack(modes=0x1234, tv_sec=1_700_000_000, tv_usec=123_456, **values)
    )
    assert tx.modes == 0x1234
    for name, value in values.items():
        assert getattr(tx, name) == value, name
    assert (tx.time.tv_sec, tx.time.tv_usec) == (1_700_000_000, 123_456)


# --- decoding crafted buffers --------------------------------------------------------------


@needs_lp64
def test_offset_micro_mode() -> None:
    assert decode(offset=1500).offset == pytest.approx(1.5e-3, abs=1e-15)


@needs_lp64
def test_offset_nano_mode() -> None:
    clock = decode(offset=1500, status=STA_NANO)
    assert clock.offset == pytest.approx(1.5e-6, abs=1e-18)
    assert clock.flags == ("NANO",)


@needs_lp64
@pytest.mark.parametrize(
    ("status", "raw", "seconds"),
    [(0, -1500, -1.5e-3), (STA_NANO, -1500, -1.5e-6), (0, -(2**40), -(2**40) * 1e-6)],
)
def test_negative_offsets(status: int, raw: int, seconds: float) -> None:
    assert decode(offset=raw, status=status).offset == pytest.approx(seconds, rel=1e-12)


@needs_lp64
@pytest.mark.parametrize(("raw", "ratio"), [(65536 * 12, 12e-6), (-65536 * 12, -12e-6),
                                            (32768, 0.5e-6), (0, 0.0)])
def test_frequency_is_scaled_ppm(raw: int, ratio: float) -> None:
    assert decode(freq=raw).frequency_ratio == pytest.approx(ratio, rel=1e-12, abs=1e-18)


@needs_lp64
def test_error_bounds_tick_precision_tolerance_and_tai() -> None:
    clock = decode(maxerror=16_000_000, esterror=250, tick=10_000, precision=1,
                   tolerance=32_768_000, constant=7, tai=37)
    assert clock.maxerror == pytest.approx(16.0)
    assert clock.esterror == pytest.approx(250e-6)
    assert clock.tick == pytest.approx(0.01)
    assert clock.precision == pytest.approx(1e-6)
    assert clock.tolerance_ratio == pytest.approx(500e-6)
    assert clock.constant == 7
    assert clock.tai == 37
    assert isinstance(clock.tai, int)


@needs_lp64
@pytest.mark.parametrize("raw", [20, 3, 7, 1500, 999_999, 16_000_000, -29])
def test_values_are_node_exporters_bit_for_bit(raw: int) -> None:
    # node_exporter divides the kernel's integers by 1e6 (1e9): one rounding. Equality,
    # not approx: a dashboard may join or compare the two exporters' series.
    clock = decode(offset=raw, maxerror=abs(raw), esterror=abs(raw), tick=abs(raw),
                   precision=abs(raw))
    assert clock.offset == raw / 1e6
    assert (clock.maxerror, clock.esterror, clock.tick, clock.precision) == (abs(raw) / 1e6,) * 4
    assert decode(offset=raw, status=STA_NANO).offset == raw / 1e9
    assert decode(esterror=20).esterror == 2e-05


@needs_lp64
def test_nano_mode_does_not_rescale_error_bounds() -> None:
    """STA_NANO changes offset (and time.tv_usec) only; maxerror/esterror stay in us."""
    clock = decode(maxerror=1000, esterror=500, status=STA_NANO)
    assert clock.maxerror == pytest.approx(1e-3)
    assert clock.esterror == pytest.approx(5e-4)


@needs_lp64
@pytest.mark.parametrize(
    ("rc", "name"),
    [(0, "TIME_OK"), (1, "TIME_INS"), (2, "TIME_DEL"), (3, "TIME_OOP"), (4, "TIME_WAIT"),
     (5, "TIME_ERROR")],
)
def test_clock_state_from_return_code(rc: int, name: str) -> None:
    clock = decode(rc)
    assert clock.state == name
    assert clock.return_code == rc
    assert timex.CLOCK_STATES[rc] == name


@needs_lp64
def test_unknown_return_code_is_named_not_raised() -> None:
    state = decode(7).state
    assert state == "UNKNOWN_7"
    assert state not in timex.CLOCK_STATES.values()


@needs_lp64
@pytest.mark.parametrize(
    ("rc", "status", "synchronized"),
    [
        (0, 0, True),
        (0, STA_PLL, True),
        (1, STA_PLL | STA_INS, True),  # a leap second pending is still synchronised
        (0, STA_UNSYNC, False),
        (0, STA_PLL | STA_UNSYNC | STA_NANO, False),
        (5, 0, False),  # TIME_ERROR without UNSYNC
        (5, STA_UNSYNC, False),  # this machine's state
    ],
)
def test_synchronized(rc: int, status: int, synchronized: bool) -> None:
    assert decode(rc, status=status).synchronized is synchronized


@needs_lp64
def test_flag_names_for_combined_bits() -> None:
    assert decode(status=STA_PLL | STA_UNSYNC | STA_NANO).flags == ("PLL", "UNSYNC", "NANO")
    assert decode(status=STA_INS | STA_DEL).flags == ("INS", "DEL")
    assert decode(status=0).flags == ()


@needs_lp64
def test_every_status_bit_has_its_name() -> None:
    names = ["PLL", "PPSFREQ", "PPSTIME", "FLL", "INS", "DEL", "UNSYNC", "FREQHOLD",
             "PPSSIGNAL", "PPSJITTER", "PPSWANDER", "PPSERROR", "CLOCKERR", "NANO", "MODE",
             "CLK"]
    for bit, name in enumerate(names):
        assert decode(status=1 << bit).flags == (name,), hex(1 << bit)
    assert decode(status=0xFFFF).flags == tuple(names)
    # Bits the kernel does not define are not invented into names.
    assert decode(status=0x10000 | STA_UNSYNC).flags == ("UNSYNC",)


@needs_lp64
@pytest.mark.parametrize("length", [0, 1, 128, SIZE - 1, SIZE + 1, 2 * SIZE])
def test_decode_buffer_rejects_wrong_lengths(length: int) -> None:
    with pytest.raises(ValueError, match="208"):
        timex.decode_buffer(bytes(length), 0)


# --- the real kernel (read-only) -----------------------------------------------------------


def _raw_kernel_read() -> tuple[bytes, int]:
    """clock_adjtime(CLOCK_REALTIME) into a zeroed 208-byte buffer: modes is 0, a read.

    Independent of :class:`timex.Timex`: the bytes are then decoded at explicit offsets.
    """
    name = ctypes.util.find_library("c")
    assert name is not None
    libc = ctypes.CDLL(name, use_errno=True)
    buf = ctypes.create_string_buffer(SIZE)
    assert struct.unpack_from("<I", buf.raw, 0)[0] == 0  # modes = 0: never a write
    rc = libc.clock_adjtime(ctypes.c_int(0), buf)
    assert rc >= 0, f"clock_adjtime read failed: errno {ctypes.get_errno()}"
    return buf.raw, rc


@needs_linux
def test_read_returns_a_plausible_state() -> None:
    clock = adjtimex.read()
    assert clock.state in timex.CLOCK_STATES.values()
    assert 0 <= clock.maxerror <= 16.0  # NTP_PHASE_LIMIT: the kernel caps maxerror at 16 s
    assert clock.esterror >= 0
    assert 0 < clock.tick < 1  # seconds (e.g. 0.01), not microseconds
    assert 0 < clock.tolerance_ratio < 1e-2  # 500 ppm on Linux
    assert clock.synchronized is (
        not clock.status & timex.STA_UNSYNC and clock.return_code != timex.TIME_ERROR
    )


@needs_linux
def test_read_agrees_with_explicit_offsets_of_a_raw_read() -> None:
    """The kernel's own bytes, decoded at the explicit offsets, match adjtimex.read()."""
    raw, rc = _raw_kernel_read()
    clock = adjtimex.read()
    (status,) = struct.unpack_from("<i", raw, 40)
    (tick,) = struct.unpack_from("<q", raw, 88)
    (tolerance,) = struct.unpack_from("<q", raw, 64)
    (freq,) = struct.unpack_from("<q", raw, 16)
    (tai,) = struct.unpack_from("<i", raw, 160)
    (tv_sec,) = struct.unpack_from("<q", raw, TV_SEC)
    (tv_usec,) = struct.unpack_from("<q", raw, TV_USEC)
    assert status == clock.status
    assert tick * 1e-6 == pytest.approx(clock.tick)
    assert tolerance / (65536 * 1e6) == pytest.approx(clock.tolerance_ratio)
    assert freq / (65536 * 1e6) == pytest.approx(clock.frequency_ratio, abs=1e-9)
    assert tai == clock.tai
    assert rc == clock.return_code
    # time at 72 is the wall clock; tv_usec is a sub-second fraction (us, or ns with NANO).
    assert abs(tv_sec - time.time()) < 5
    assert 0 <= tv_usec < (1_000_000_000 if status & STA_NANO else 1_000_000)
    # And decode_buffer of the kernel's bytes gives the same state as read().
    decoded = timex.decode_buffer(raw, rc)
    assert (decoded.status, decoded.tick, decoded.tai, decoded.state) == (
        clock.status, clock.tick, clock.tai, clock.state
    )


@needs_linux
def test_read_does_not_change_the_kernel_state() -> None:
    before = adjtimex.read()
    for _ in range(5):
        adjtimex.read()
    after = adjtimex.read()
    stable = ("frequency_ratio", "status", "constant", "tick", "tai", "tolerance_ratio",
              "return_code")
    assert {k: getattr(before, k) for k in stable} == {k: getattr(after, k) for k in stable}


class _ModesSpy:
    """Stands in for libc: checks modes == 0 before forwarding to the real clock_adjtime,
    and refuses (never forwards) anything else."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.modes: list[int] = []

    def clock_adjtime(self, clock_id: int, ref: Any) -> int:
        tx = ref._obj  # the Timex behind ctypes.byref()
        self.modes.append(tx.modes)
        if tx.modes != 0:
            raise AssertionError(f"clock_adjtime called with modes={tx.modes:#x}")
        return int(self._real.clock_adjtime(clock_id, ref))


@needs_linux
def test_read_passes_modes_zero_to_the_syscall(monkeypatch: pytest.MonkeyPatch) -> None:
    spy = _ModesSpy(adjtimex._load_libc())
    monkeypatch.setattr(adjtimex, "_libc", spy)
    clock = adjtimex.read()
    assert spy.modes == [0]
    assert clock.state in timex.CLOCK_STATES.values()


def test_source_never_sets_modes_to_anything_but_zero() -> None:
    tree = ast.parse(inspect.getsource(timex) + "\n" + inspect.getsource(adjtimex))
    assignments = 0
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        value: ast.expr | None = None
        if isinstance(node, ast.Assign):
            targets, value = list(node.targets), node.value
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets, value = [node.target], node.value
        for target in targets:
            name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
            if name == "modes":
                assignments += 1
                assert isinstance(node, ast.Assign), ast.unparse(node)
                assert isinstance(value, ast.Constant) and value.value == 0, ast.unparse(node)
        if isinstance(node, ast.Call):
            for kw in node.keywords:
                assert kw.arg != "modes", ast.unparse(node)
            if isinstance(node.func, ast.Name) and node.func.id == "Timex":
                assert not node.args and not node.keywords, ast.unparse(node)
    assert assignments >= 1  # read() sets modes = 0 explicitly
    # No ADJ_* write mode constants are even defined.
    assert "ADJ_" not in inspect.getsource(timex) + inspect.getsource(adjtimex)


@needs_linux
def test_reading_the_clock_searches_for_no_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """find_library runs ldconfig (a subprocess): never on the event loop's first probe."""
    import ctypes.util

    def no_search(name: str) -> str | None:
        raise AssertionError(f"find_library({name!r}) called")

    monkeypatch.setattr(ctypes.util, "find_library", no_search)
    monkeypatch.setattr(adjtimex, "_libc", None)
    assert adjtimex.read().state in timex.CLOCK_STATES.values()
