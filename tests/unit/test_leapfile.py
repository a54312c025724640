"""leap-seconds.list parsing, hash check, TAI offset, next leap, and the leap verdict."""

from __future__ import annotations

import calendar
import hashlib
import struct
from pathlib import Path

import pytest

from ntp_probe.proto.leapfile import (
    NTP_UNIX_OFFSET,
    Leap,
    LeapEntry,
    LeapFile,
    LeapFileError,
    LeapVerdict,
    leap_verdict,
    parse_leapfile,
)

SYSTEM_FILE = Path("/usr/share/zoneinfo/leap-seconds.list")

# The IERS file of 2025-07-07 (tzdata 2025b), comments trimmed; its "#h" line is
# the published one, so this checks the hash rule against a hash we did not compute.
IERS_2025 = """\
#	Updated through IERS Bulletin C 70
#$	3960835200
#	File expires on 28 June 2026
#@	3991593600
#NTP Time      DTAI    Day Month Year
#
2272060800      10      # 1 Jan 1972
2287785600      11      # 1 Jul 1972
2303683200      12      # 1 Jan 1973
2335219200      13      # 1 Jan 1974
2366755200      14      # 1 Jan 1975
2398291200      15      # 1 Jan 1976
2429913600      16      # 1 Jan 1977
2461449600      17      # 1 Jan 1978
2492985600      18      # 1 Jan 1979
2524521600      19      # 1 Jan 1980
2571782400      20      # 1 Jul 1981
2603318400      21      # 1 Jul 1982
2634854400      22      # 1 Jul 1983
2698012800      23      # 1 Jul 1985
2776982400      24      # 1 Jan 1988
2840140800      25      # 1 Jan 1990
2871676800      26      # 1 Jan 1991
2918937600      27      # 1 Jul 1992
2950473600      28      # 1 Jul 1993
2982009600      29      # 1 Jul 1994
3029443200      30      # 1 Jan 1996
3076704000      31      # 1 Jul 1997
3124137600      32      # 1 Jan 1999
3345062400      33      # 1 Jan 2006
3439756800      34      # 1 Jan 2009
3550089600      35      # 1 Jul 2012
3644697600      36      # 1 Jul 2015
3692217600      37      # 1 Jan 2017
#
#h	49db2447 571e5e1b 2f002a53 9c8da8e4 39b8e49e
"""


def _data(text: str) -> list[tuple[int, int]]:
    pairs = [line.split("#")[0].split() for line in text.splitlines() if line[:1].isdigit()]
    return [(int(t), int(d)) for t, d in pairs]


REAL_ENTRIES = _data(IERS_2025)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> int:
    """Unix seconds of a UTC calendar time."""
    return calendar.timegm((year, month, day, hour, minute, second))


def ntp(unix: int) -> int:
    return unix + 2_208_988_800


def hash_words(updated: int, expires: int, entries: list[tuple[int, int]]) -> tuple[int, ...]:
    """SHA-1 over the decimal digits of update, expiry and each entry, as 5 words."""
    text = f"{updated}{expires}" + "".join(f"{t}{d}" for t, d in entries)
    return struct.unpack(">5I", hashlib.sha1(text.encode()).digest())


def build(
    entries: list[tuple[int, int]],
    *,
    updated: int = ntp(utc(2026, 7, 6)),
    expires: int = ntp(utc(2027, 6, 28)),
    word_format: str = "{:08x}",
    words: tuple[int, ...] | None = None,
) -> str:
    """A leap-seconds.list text with a hash computed here, not by the module."""
    if words is None:
        words = hash_words(updated, expires, entries)
    lines = ["#\tsynthetic test file", f"#$\t{updated}", f"#@\t{expires}", "#"]
    lines += [f"{t}\t{d}\t# entry" for t, d in entries]
    lines += ["#", "#h\t" + " ".join(word_format.format(w) for w in words), ""]
    return "\n".join(lines)


LEAP_2027 = utc(2027, 1, 1)
INSERT_2027 = [*REAL_ENTRIES, (ntp(LEAP_2027), 38)]
DELETE_2027 = [*REAL_ENTRIES, (ntp(LEAP_2027), 36)]


@pytest.fixture
def insert_file() -> LeapFile:
    return parse_leapfile(build(INSERT_2027))


@pytest.fixture
def delete_file() -> LeapFile:
    return parse_leapfile(build(DELETE_2027))


@pytest.fixture
def quiet_file() -> LeapFile:
    """Valid until 2027-06-28 with no leap after 2017."""
    return parse_leapfile(build(REAL_ENTRIES))


# --- parsing and hash ---------------------------------------------------------------


def test_published_file_parses_with_its_published_hash() -> None:
    f = parse_leapfile(IERS_2025)
    assert f.hash_valid
    assert f.updated == utc(2025, 7, 7)
    assert f.expires == utc(2026, 6, 28)
    assert len(f.entries) == 28
    assert f.entries[0] == LeapEntry(utc(1972, 1, 1), 10)
    assert f.entries[-1] == LeapEntry(utc(2017, 1, 1), 37)


def test_epoch_offset() -> None:
    assert NTP_UNIX_OFFSET == 2_208_988_800


def test_built_file_hash_is_valid(insert_file: LeapFile) -> None:
    assert insert_file.hash_valid
    assert insert_file.entries[-1] == LeapEntry(LEAP_2027, 38)


def test_crlf_line_endings() -> None:
    assert parse_leapfile(IERS_2025.replace("\n", "\r\n")).hash_valid


def test_hash_words_without_leading_zeros_and_in_upper_case() -> None:
    # The writers drop leading zeros; find an expiry whose hash has such a word.
    expires = ntp(utc(2027, 6, 28))
    while min(hash_words(ntp(utc(2026, 7, 6)), expires, INSERT_2027)) >= 0x1000_0000:
        expires += 86_400
    text = build(INSERT_2027, expires=expires, word_format="{:X}")
    assert any(len(w) < 8 for w in text.rsplit("#h", 1)[1].split())
    assert parse_leapfile(text).hash_valid


def test_comments_are_not_hashed() -> None:
    text = IERS_2025.replace("# 1 Jan 2017", "# first of January 2017, 0 h")
    assert parse_leapfile(text).hash_valid


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("3692217600      37", "3694896000      37"),  # a data line's date (1 Feb 2017)
        ("#@\t3991593600", "#@\t3991680000"),  # the expiry: extending it must show
        ("#$\t3960835200", "#$\t3960921600"),  # the update time
        ("49db2447 571e5e1b", "49db2447 571e5e1c"),  # the hash itself
    ],
)
def test_broken_hash(old: str, new: str) -> None:
    assert old in IERS_2025
    f = parse_leapfile(IERS_2025.replace(old, new))
    assert not f.hash_valid


def test_dropped_data_line_breaks_hash() -> None:
    text = IERS_2025.replace("3644697600      36      # 1 Jul 2015\n", "")
    with pytest.raises(LeapFileError):
        # 35 -> 37 is no single leap: rejected before the hash even matters.
        parse_leapfile(text)
    text = IERS_2025.replace("3692217600      37      # 1 Jan 2017\n", "")
    assert not parse_leapfile(text).hash_valid


def test_missing_hash_line_is_not_valid() -> None:
    text = "\n".join(line for line in IERS_2025.splitlines() if not line.startswith("#h"))
    f = parse_leapfile(text)
    assert not f.hash_valid
    assert not f.valid(utc(2026, 1, 1))
    assert len(f.entries) == 28


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("2272060800      10", "2272060800      ten", "line 7"),
        ("2272060800      10", "2272060800", "line 7"),
        ("#\n#h", "garbage\n#h", "malformed"),
        ("#@\t3991593600", "#@\t", "malformed"),
        ("#@\t3991593600", "#@\t3991593600 x", "malformed"),
        ("#$\t3960835200", "#$\tsoon", "malformed"),
        ("#$\t3960835200", "#$\t" + "9" * 5000, "malformed"),  # beyond int()'s 4300 digits
        ("3692217600      37", "3692217600      " + "3" * 5000, "malformed"),
        ("#$\t3960835200", "#$\t\u0663\u0669\u0666", "malformed"),  # Arabic-Indic digits
        ("39b8e49e", "", "malformed"),
        ("39b8e49e", "39b8e49e0", "malformed"),
        ("39b8e49e", "39b8e49g", "malformed"),
        ("#\n#h", "#@\t3991593600\n#h", "second '#@'"),
        ("#\n#h", "#$\t3960835200\n#h", "second '#\\$'"),
        ("#\n#h", "#h 1 2 3 4 5\n#h", "second '#h'"),
        ("#@\t3991593600", "#", "no '#@'"),
        ("#$\t3960835200", "#", "no '#\\$'"),
        ("3692217600      37", "3692217601      37", "midnight"),
        # 2 Jan 2017: a leap second ends a month (ntpd refuses such a file too)
        ("3692217600      37", "3692304000      37", "2017-01-02.*first of a month"),
        ("3692217600      37", "261408988800      37", "out of range"),  # year 10183
        ("3692217600      37", "3644697600      37", "not after"),
        ("3692217600      37", "3692217600      36", "from 36 to 36"),
        ("3692217600      37", "3692217600      39", "from 36 to 39"),
    ],
)
def test_malformed_files(old: str, new: str, message: str) -> None:
    assert old in IERS_2025
    with pytest.raises(LeapFileError, match=message):
        parse_leapfile(IERS_2025.replace(old, new))


def test_file_without_data_lines() -> None:
    with pytest.raises(LeapFileError, match="no data"):
        parse_leapfile("#$ 3960835200\n#@ 3991593600\n#h 1 2 3 4 5\n")


def test_error_is_a_value_error() -> None:
    assert issubclass(LeapFileError, ValueError)


@pytest.mark.skipif(not SYSTEM_FILE.exists(), reason="no tzdata leap-seconds.list")
def test_system_file() -> None:
    f = parse_leapfile(SYSTEM_FILE.read_text(encoding="ascii"))
    assert f.hash_valid
    assert f.expires > utc(2026, 1, 1)
    # History does not change, whichever release of the file this is.
    assert f.tai_offset(utc(2016, 12, 31, 23, 59, 59)) == 36
    assert f.tai_offset(utc(2017, 1, 1)) == 37
    assert f.next_leap(utc(2016, 6, 1)) == Leap(utc(2017, 1, 1), 1, 37)


# --- queries ------------------------------------------------------------------------


def test_expiry() -> None:
    f = parse_leapfile(IERS_2025)
    assert not f.expired(f.expires - 0.5)
    assert f.expired(f.expires)
    assert f.valid(utc(2026, 6, 27, 23, 59, 59))
    assert not f.valid(utc(2026, 6, 28))
    assert not f.valid(utc(2026, 11, 22))


def test_tai_offset() -> None:
    f = parse_leapfile(IERS_2025)
    assert f.tai_offset(utc(1971, 12, 31)) is None
    assert f.tai_offset(utc(1972, 1, 1)) == 10
    assert f.tai_offset(utc(1972, 6, 30, 23, 59, 59)) == 10
    assert f.tai_offset(utc(1972, 7, 1)) == 11
    assert f.tai_offset(utc(2017, 1, 1) - 0.001) == 36
    assert f.tai_offset(utc(2025, 12, 1)) == 37


def test_tai_offset_after_a_delete(delete_file: LeapFile) -> None:
    assert delete_file.tai_offset(LEAP_2027 - 1) == 37
    assert delete_file.tai_offset(LEAP_2027) == 36


def test_next_leap() -> None:
    f = parse_leapfile(IERS_2025)
    assert f.next_leap(0) == Leap(utc(1972, 7, 1), 1, 11)
    assert f.next_leap(utc(1960, 1, 1)) == Leap(utc(1972, 7, 1), 1, 11)
    assert f.next_leap(utc(2016, 12, 31, 23, 59, 59)) == Leap(utc(2017, 1, 1), 1, 37)
    # At the instant after a leap, that leap is history.
    assert f.next_leap(utc(2015, 7, 1)) == Leap(utc(2017, 1, 1), 1, 37)
    assert f.next_leap(utc(2017, 1, 1)) is None


def test_next_leap_direction(insert_file: LeapFile, delete_file: LeapFile) -> None:
    now = utc(2026, 12, 1)
    insert = insert_file.next_leap(now)
    delete = delete_file.next_leap(now)
    assert insert == Leap(LEAP_2027, 1, 38)
    assert delete == Leap(LEAP_2027, -1, 36)
    assert insert is not None and insert.leap_indicator == 1
    assert delete is not None and delete.leap_indicator == 2


# --- verdict ------------------------------------------------------------------------

OK = LeapVerdict.OK
MISSING = LeapVerdict.MISSING_ANNOUNCEMENT
UNEXPECTED = LeapVerdict.UNEXPECTED_ANNOUNCEMENT
UNKNOWN = LeapVerdict.UNKNOWN


def test_verdict_values() -> None:
    assert [v.value for v in LeapVerdict] == [
        "ok",
        "missing_announcement",
        "unexpected_announcement",
        "unknown",
    ]


@pytest.mark.parametrize(
    ("when", "li", "verdict"),
    [
        # The last day: every server must announce (chrony starts only now).
        (utc(2026, 12, 31, 12), 0, MISSING),
        (utc(2026, 12, 31, 12), 1, OK),
        (utc(2026, 12, 31, 12), 2, UNEXPECTED),
        (utc(2026, 12, 31), 0, MISSING),
        (utc(2026, 12, 31, 23, 59, 59), 0, MISSING),
        # Before the last day: not announcing yet is fine (chrony) ...
        (utc(2026, 12, 30, 23, 59, 59), 0, OK),
        (utc(2026, 12, 20), 0, OK),
        # ... and so is announcing a month ahead (ntpd following upstream/refclock).
        (utc(2026, 12, 20), 1, OK),
        (utc(2026, 12, 1), 1, OK),
        (utc(2026, 12, 20), 2, UNEXPECTED),
        # Earlier than a month ahead: the announcement is spurious.
        (utc(2026, 11, 30, 23, 59, 59), 1, UNEXPECTED),
        (utc(2026, 11, 22), 1, UNEXPECTED),
        (utc(2026, 11, 22), 0, OK),
        # After the leap: still announcing is wrong.
        (LEAP_2027, 1, UNEXPECTED),
        (LEAP_2027 + 3600, 1, UNEXPECTED),
        (LEAP_2027, 0, OK),
        # Unsynchronised servers say nothing about leaps.
        (utc(2026, 12, 31, 12), 3, UNKNOWN),
        (utc(2026, 11, 22), 3, UNKNOWN),
    ],
)
def test_verdict_insert(insert_file: LeapFile, when: int, li: int, verdict: LeapVerdict) -> None:
    assert leap_verdict(insert_file, li, when) is verdict


@pytest.mark.parametrize(
    ("when", "li", "verdict"),
    [
        (utc(2026, 12, 31, 12), 2, OK),
        (utc(2026, 12, 31, 12), 1, UNEXPECTED),
        (utc(2026, 12, 31, 12), 0, MISSING),
        (utc(2026, 12, 10), 2, OK),
        (utc(2026, 12, 10), 0, OK),
        (utc(2026, 11, 10), 2, UNEXPECTED),
    ],
)
def test_verdict_delete(delete_file: LeapFile, when: int, li: int, verdict: LeapVerdict) -> None:
    assert leap_verdict(delete_file, li, when) is verdict


@pytest.mark.parametrize(
    ("when", "li", "verdict"),
    [
        (utc(2026, 12, 31, 12), 0, OK),
        (utc(2026, 12, 31, 12), 1, UNEXPECTED),
        (utc(2026, 12, 31, 12), 2, UNEXPECTED),
        (utc(2027, 3, 1), 0, OK),
        (utc(2027, 3, 1), 1, UNEXPECTED),
        # Within a month of expiry the file cannot rule out a leap it does not know.
        (utc(2027, 6, 10), 1, UNKNOWN),
        (utc(2027, 6, 10), 2, UNKNOWN),
        (utc(2027, 6, 10), 0, OK),
        (utc(2027, 6, 27, 12), 0, UNKNOWN),
        # Expired.
        (utc(2027, 6, 28), 0, UNKNOWN),
        (utc(2027, 7, 1), 1, UNKNOWN),
    ],
)
def test_verdict_nothing_scheduled(
    quiet_file: LeapFile, when: int, li: int, verdict: LeapVerdict
) -> None:
    assert leap_verdict(quiet_file, li, when) is verdict


@pytest.mark.parametrize("li", [0, 1, 2, 3])
def test_verdict_unknown_without_a_trustworthy_file(li: int) -> None:
    now = utc(2026, 12, 31, 12)
    broken = parse_leapfile(build(INSERT_2027, words=(1, 2, 3, 4, 5)))
    assert not broken.hash_valid
    assert leap_verdict(broken, li, now) is UNKNOWN
    assert leap_verdict(None, li, now) is UNKNOWN
    # The real file, expired in June 2026, cannot judge December 2026.
    assert leap_verdict(parse_leapfile(IERS_2025), li, now) is UNKNOWN


def test_verdict_unknown_when_the_file_has_expired_by_the_exporters_clock(
        insert_file: LeapFile) -> None:
    # A server months behind still reads the file as current: the exporter's own clock,
    # by which /metrics calls the file invalid, says it is not.
    behind = utc(2026, 12, 31, 12)
    assert leap_verdict(insert_file, 1, behind) is OK
    assert leap_verdict(insert_file, 1, behind, local_time=insert_file.expires + 1) is UNKNOWN
    assert leap_verdict(insert_file, 1, behind, local_time=behind) is OK


def test_verdict_windows_are_adjustable(insert_file: LeapFile) -> None:
    noon = utc(2026, 12, 31, 12)
    assert leap_verdict(insert_file, 0, noon, required_within=6 * 3600) is OK
    assert leap_verdict(insert_file, 0, noon + 7 * 3600, required_within=6 * 3600) is MISSING
    assert leap_verdict(insert_file, 1, utc(2026, 12, 20), announce_window=86_400) is UNEXPECTED
    early = utc(2026, 10, 15)
    assert leap_verdict(insert_file, 1, early, announce_window=90 * 86_400) is OK


@pytest.mark.parametrize("li", [-1, 4])
def test_verdict_rejects_bad_indicator(insert_file: LeapFile, li: int) -> None:
    with pytest.raises(ValueError, match="leap indicator"):
        leap_verdict(insert_file, li, utc(2026, 12, 31))
