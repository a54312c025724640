"""The IERS/NIST ``leap-seconds.list`` file, and whether a server's leap indicator fits it.

File format (as distributed by the IERS and NIST and shipped by tzdata):

* ``#$ <n>``: when the file was last updated, in NTP seconds (since 1900-01-01).
* ``#@ <n>``: when the file expires, in NTP seconds. Past it, the file cannot
  tell whether a leap second has since been scheduled.
* ``<ntp-seconds> <dtai> [# comment]``: from that instant on, TAI - UTC is
  ``dtai`` seconds. Every instant is a midnight UTC; the leap second is the last
  second of the day before, inserted when ``dtai`` grew by one and deleted when it
  shrank by one. The first line (1972-01-01) sets the initial offset.
* ``#h w1 w2 w3 w4 w5``: the SHA-1 of the file, as five 32-bit words in hex. The
  tools that write it drop leading zeros, so a word may have fewer than 8 digits.
* Any other line starting with ``#`` is a comment.

The hash covers, in file order and with nothing in between, the ASCII digits of
the ``#$`` line, of the ``#@`` line and of every data line up to its ``#``.

Times in the public API are Unix seconds (Unix = NTP - 2208988800).
"""

from __future__ import annotations

import datetime
import enum
import hashlib
import math
import re
from dataclasses import dataclass
from itertools import pairwise

NTP_UNIX_OFFSET = 2_208_988_800
"""Seconds from the NTP era 0 epoch (1900-01-01) to the Unix epoch (1970-01-01)."""

_DAY = 86_400
_UNIX_EPOCH_ORDINAL = datetime.date(1970, 1, 1).toordinal()

DEFAULT_ANNOUNCE_WINDOW = 31 * _DAY
"""How early a leap indicator may be set before the leap.

chrony, and ntpd driven by its leap file, set it on the last day only; servers
passing on a reference clock's or an upstream server's announcement (NIST's among
them) may set it from the first day of the leap month, up to 31 days ahead.
"""

DEFAULT_REQUIRED_WITHIN = _DAY
"""How close to the leap the leap indicator must be set: chrony sets it only on
the last day of the month, which is therefore the latest any server may start."""

_LEAP_INDICATOR_UNSYNCHRONISED = 3

# Numbers are bounded (an NTP timestamp in seconds has at most 20 digits; TAI - UTC a few):
# Python refuses to convert numbers of over 4300 digits.
_UPDATED = re.compile(r"#\$\s*([0-9]{1,20})\s*", re.ASCII)
_EXPIRES = re.compile(r"#@\s*([0-9]{1,20})\s*", re.ASCII)
_HASH = re.compile(r"#h\s*((?:[0-9a-fA-F]{1,8}\s+){4}[0-9a-fA-F]{1,8})\s*", re.ASCII)
_DATA = re.compile(r"([0-9]{1,20})\s+([0-9]{1,6})\s*(?:#.*)?", re.ASCII)


class LeapFileError(ValueError):
    """The text is not a well-formed leap-seconds.list file."""


class LeapVerdict(enum.StrEnum):
    """How a server's leap indicator compares with the leap file."""

    OK = "ok"
    MISSING_ANNOUNCEMENT = "missing_announcement"
    UNEXPECTED_ANNOUNCEMENT = "unexpected_announcement"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class LeapEntry:
    """From ``start`` (Unix seconds) on, TAI - UTC is ``tai_offset`` seconds."""

    start: int
    tai_offset: int


@dataclass(frozen=True, slots=True)
class Leap:
    """A scheduled leap second.

    ``after`` is the Unix time of the instant right after it (the midnight that
    starts the new TAI offset); ``direction`` is +1 for an inserted second and -1
    for a deleted one; ``tai_offset`` is TAI - UTC from ``after`` on.
    """

    after: int
    direction: int
    tai_offset: int

    @property
    def leap_indicator(self) -> int:
        """The NTP leap indicator that announces this leap: 1 insert, 2 delete."""
        return 1 if self.direction > 0 else 2


@dataclass(frozen=True, slots=True)
class LeapFile:
    """A parsed leap-seconds.list; times in Unix seconds."""

    updated: int
    expires: int
    entries: tuple[LeapEntry, ...]
    hash_valid: bool

    def expired(self, now: float) -> bool:
        """True from the expiry instant on."""
        return now >= self.expires

    def valid(self, now: float) -> bool:
        """True when the hash matches and the file has not expired at ``now``."""
        return self.hash_valid and not self.expired(now)

    def tai_offset(self, now: float) -> int | None:
        """TAI - UTC in seconds at ``now``; None before the first entry (1972)."""
        offset: int | None = None
        for entry in self.entries:
            if entry.start > now:
                break
            offset = entry.tai_offset
        return offset

    def next_leap(self, now: float) -> Leap | None:
        """The first leap whose ``after`` instant is later than ``now``, if listed."""
        for prev, entry in pairwise(self.entries):
            if entry.start > now:
                return Leap(entry.start, entry.tai_offset - prev.tai_offset, entry.tai_offset)
        return None


def parse_leapfile(text: str) -> LeapFile:
    """Parse and hash-check the text of a leap-seconds.list file.

    A missing or mismatching ``#h`` line gives ``hash_valid=False``. Raises
    LeapFileError when a line is neither a comment nor a well-formed ``#$``, ``#@``,
    ``#h`` or data line, when ``#$``, ``#@`` or ``#h`` appears twice, when ``#$`` or
    ``#@`` or every data line is missing, or when the data lines are not the first of a
    month at midnight, in increasing order, with TAI - UTC changing by exactly one second
    each time.
    """
    updated: int | None = None
    expires: int | None = None
    stated_hash: str | None = None
    digits: list[str] = []
    entries: list[LeapEntry] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#$"):
            _once(updated, "#$", number)
            value = _match(_UPDATED, line, number)[0]
            digits.append(value)
            updated = int(value) - NTP_UNIX_OFFSET
        elif line.startswith("#@"):
            _once(expires, "#@", number)
            value = _match(_EXPIRES, line, number)[0]
            digits.append(value)
            expires = int(value) - NTP_UNIX_OFFSET
        elif line.startswith("#h"):
            _once(stated_hash, "#h", number)
            words = _match(_HASH, line, number)[0].split()
            stated_hash = "".join(word.lower().zfill(8) for word in words)
        elif line.startswith("#"):
            continue
        else:
            ntp_seconds, dtai = _match(_DATA, line, number)
            digits.append(ntp_seconds + dtai)
            entries.append(LeapEntry(int(ntp_seconds) - NTP_UNIX_OFFSET, int(dtai)))
    if updated is None:
        raise LeapFileError("no '#$' (last update) line")
    if expires is None:
        raise LeapFileError("no '#@' (expiry) line")
    _check_entries(entries)
    computed = hashlib.sha1("".join(digits).encode("ascii"), usedforsecurity=False).hexdigest()
    return LeapFile(updated, expires, tuple(entries), stated_hash == computed)


def leap_verdict(
    leapfile: LeapFile | None,
    leap_indicator: int,
    server_time: float,
    *,
    announce_window: float = DEFAULT_ANNOUNCE_WINDOW,
    required_within: float = DEFAULT_REQUIRED_WITHIN,
    local_time: float | None = None,
) -> LeapVerdict:
    """Compare a server's leap indicator, read at ``server_time``, with the file.

    * ``unknown``: no file, a bad hash, a file expired at ``server_time`` or at
      ``local_time`` (the exporter's clock, by which its metrics call the file invalid), a server
      that is unsynchronised (indicator 3), or a question reaching past the expiry
      (the file vouches for no leap beyond it).
    * ``missing_announcement``: indicator 0 although the next leap is at most
      ``required_within`` ahead (the last day).
    * ``unexpected_announcement``: indicator 1 or 2 while no leap is due within
      ``announce_window``, or the due leap goes the other way.
    * ``ok``: otherwise.

    Raises ValueError when the indicator is not 0 to 3.
    """
    if leap_indicator not in (0, 1, 2, _LEAP_INDICATOR_UNSYNCHRONISED):
        raise ValueError(f"leap indicator {leap_indicator!r} is not 0 to 3")
    if (
        leapfile is None
        or not leapfile.valid(server_time)
        or (local_time is not None and not leapfile.valid(local_time))
        or leap_indicator == _LEAP_INDICATOR_UNSYNCHRONISED
    ):
        return LeapVerdict.UNKNOWN
    leap = leapfile.next_leap(server_time)
    ahead = math.inf if leap is None else leap.after - server_time
    if leap_indicator == 0:
        if ahead <= required_within:
            return LeapVerdict.MISSING_ANNOUNCEMENT
        horizon = required_within
    elif leap is not None and ahead <= announce_window:
        if leap.leap_indicator == leap_indicator:
            return LeapVerdict.OK
        return LeapVerdict.UNEXPECTED_ANNOUNCEMENT
    else:
        horizon = announce_window
    if server_time + horizon > leapfile.expires:
        return LeapVerdict.UNKNOWN
    return LeapVerdict.OK if leap_indicator == 0 else LeapVerdict.UNEXPECTED_ANNOUNCEMENT


def _once(seen: object, tag: str, number: int) -> None:
    if seen is not None:
        raise LeapFileError(f"line {number}: second {tag!r} line")


def _match(pattern: re.Pattern[str], line: str, number: int) -> tuple[str, ...]:
    match = pattern.fullmatch(line)
    if match is None:
        raise LeapFileError(f"line {number}: malformed: {line[:80]!r}")
    return match.groups()


def _check_entries(entries: list[LeapEntry]) -> None:
    if not entries:
        raise LeapFileError("no data lines")
    for entry in entries:
        # NTP and Unix epochs are both midnights, so the check works in either scale.
        if entry.start % _DAY:
            raise LeapFileError(f"entry at {entry.start} is not a midnight UTC")
        # A leap second ends a month (UTC's rule; ntpd refuses a file that says otherwise).
        try:
            day = datetime.date.fromordinal(_UNIX_EPOCH_ORDINAL + entry.start // _DAY)
        except (ValueError, OverflowError):
            raise LeapFileError(f"entry at {entry.start} is out of range") from None
        if day.day != 1:
            raise LeapFileError(f"entry at {entry.start} ({day.isoformat()}) is not the "
                                "first of a month")
    for prev, entry in pairwise(entries):
        if entry.start <= prev.start:
            raise LeapFileError(f"entry at {entry.start} is not after {prev.start}")
        if abs(entry.tai_offset - prev.tai_offset) != 1:
            raise LeapFileError(
                f"TAI - UTC goes from {prev.tai_offset} to {entry.tai_offset} at {entry.start}"
            )
