"""Byte-vector and property tests for the sans-IO NTP codec (ntp_probe.ntp.packet)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from ntp_probe.proto.ntp.packet import (
    ERA_SECONDS,
    HEADER_LEN,
    NTP_UNIX_DELTA,
    ExtensionField,
    Leap,
    Mode,
    NTPDecodeError,
    Packet,
    decode,
    encode_packet,
    encode_request,
    format_refid,
    frac_to_seconds,
    kiss_code,
    seconds_to_short,
    short_to_seconds,
    ts_diff,
    ts_diff_ns,
    ts_from_unix_ns,
    ts_to_unix_ns,
)

NS = 1_000_000_000
HEADER = struct.Struct("!BBbbII4sQQQQ")

UNIX_2024 = 1_704_067_200  # 2024-01-01T00:00:00Z
UNIX_ROLLOVER = 2_085_978_496  # 2036-02-07T06:28:16Z: NTP era 0 ends
UNIX_2100 = 4_102_444_800  # 2100-01-01T00:00:00Z
YEAR_NS = 365 * 86400 * NS


def header(
    *,
    li: int = 0,
    vn: int = 4,
    mode: int = 4,
    stratum: int = 2,
    poll: int = 6,
    precision: int = -20,
    root_delay: int = 0,
    root_disp: int = 0,
    refid: bytes = b"\x7f\x00\x00\x01",
    ref: int = 0,
    org: int = 0,
    rec: int = 0,
    xmt: int = 0,
) -> bytes:
    """A 48-byte header built with struct, independently of the codec's encoder."""
    first = (li << 6) | (vn << 3) | mode
    return HEADER.pack(
        first, stratum, poll, precision, root_delay, root_disp, refid, ref, org, rec, xmt
    )


def ef_bytes(field_type: int, value: bytes) -> bytes:
    """An extension field built by hand: type, length, value (caller pads)."""
    return struct.pack("!HH", field_type, 4 + len(value)) + value


# --- encode_request -------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5, 6, 7])
def test_encode_request_is_48_bytes_with_only_first_octet_and_transmit_set(version: int) -> None:
    nonce = 0x0123_4567_89AB_CDEF
    data = encode_request(nonce, version=version)
    assert len(data) == HEADER_LEN
    assert data[0] == (version << 3) | 3  # LI 0, chosen version, mode 3
    assert data[0] & 7 == Mode.CLIENT
    assert data[0] >> 6 == 0
    assert data[1:40] == bytes(39)
    assert data[40:48] == nonce.to_bytes(8, "big")


def test_encode_request_default_version_is_4() -> None:
    data = encode_request(1)
    assert data[0] == 0x23
    p = decode(data)
    assert (p.leap, p.version, p.mode, p.transmit_ts) == (0, 4, Mode.CLIENT, 1)
    assert p.origin_ts == p.receive_ts == p.reference_ts == 0


@pytest.mark.parametrize("version", [0, 8, -1])
def test_encode_request_rejects_bad_version(version: int) -> None:
    with pytest.raises(ValueError):
        encode_request(1, version=version)


@pytest.mark.parametrize("xmt", [-1, 1 << 64])
def test_encode_request_rejects_out_of_range_transmit(xmt: int) -> None:
    with pytest.raises(ValueError):
        encode_request(xmt)


def test_encode_request_max_transmit() -> None:
    assert encode_request((1 << 64) - 1)[40:] == b"\xff" * 8


def test_encode_request_appends_extension_fields() -> None:
    ef = ExtensionField(0x0104, b"\xaa" * 24)
    data = encode_request(7, extensions=(ef,))
    assert len(data) == HEADER_LEN + 28
    assert data[48:] == b"\x01\x04\x00\x1c" + b"\xaa" * 24
    assert decode(data).extensions == (ef,)


# --- decode: byte vectors -------------------------------------------------------------

# A stratum-2 server reply as chronyd 4.x sends it on loopback, built by hand:
#   LI 0, VN 4, mode 4; stratum 2; poll 0; precision -25;
#   root delay 0x0211 (~8.07 ms); root dispersion 0x0ab3 (~41.8 ms); refid 192.0.2.1;
#   reference 2024-05-17T11:59:02.5Z; origin = the client's nonce;
#   receive 2024-05-17T12:00:00.000125Z; transmit 2024-05-17T12:00:00.000137Z.
CHRONY_LIKE_REPLY = bytes.fromhex(
    "240200e7"
    "00000211"
    "00000ab3"
    "c0000201"
    "e9f1c506" "80000000"
    "12345678" "9abcdef0"
    "e9f1c540" "00083127"
    "e9f1c540" "0008f5c2"
)


def test_decode_realistic_server_reply() -> None:
    assert len(CHRONY_LIKE_REPLY) == 48
    p = decode(CHRONY_LIKE_REPLY)
    assert p.leap == Leap.NONE
    assert p.version == 4
    assert p.mode == Mode.SERVER
    assert p.stratum == 2
    assert p.poll == 0
    assert p.precision == -25
    assert p.precision_seconds == 2.0**-25
    assert p.root_delay == 0x0211
    assert p.root_delay_seconds == 0x0211 / 65536
    assert p.root_dispersion == 0x0AB3
    assert p.root_dispersion_seconds == 0x0AB3 / 65536
    assert p.refid == b"\xc0\x00\x02\x01"
    assert p.refid_text == "192.0.2.1"
    assert p.kiss_code is None
    assert p.reference_ts == 0xE9F1C506_80000000
    assert p.origin_ts == 0x12345678_9ABCDEF0
    assert p.receive_ts == 0xE9F1C540_00083127
    assert p.transmit_ts == 0xE9F1C540_0008F5C2
    assert p.extensions == ()
    assert p.mac is None
    # Absolute times, anchored at a local clock reading in the same era.
    pivot = 1_715_947_200 * NS
    assert ts_to_unix_ns(p.reference_ts, pivot) == (1_715_947_200 - 58) * NS + NS // 2
    assert ts_to_unix_ns(p.receive_ts, pivot) // 1000 == 1_715_947_200 * 1_000_000 + 125
    assert ts_to_unix_ns(p.transmit_ts, pivot) // 1000 == 1_715_947_200 * 1_000_000 + 136
    # Server processing time T3 - T2, era-safe integer difference.
    assert ts_diff(p.transmit_ts, p.receive_ts) == 0x8F5C2 - 0x83127
    # And the codec writes the very same bytes back.
    assert encode_packet(p) == CHRONY_LIKE_REPLY


def test_decode_hand_built_header_fields() -> None:
    data = header(
        li=Leap.UNSYNCHRONIZED,
        vn=3,
        mode=Mode.SYMMETRIC_PASSIVE,
        stratum=16,
        poll=-6,
        precision=-128,
        root_delay=0xFFFFFFFF,
        root_disp=0x00018000,
        refid=b"INIT",
        ref=1,
        org=2,
        rec=(1 << 64) - 1,
        xmt=1 << 63,
    )
    p = decode(data)
    assert p == Packet(
        leap=3,
        version=3,
        mode=2,
        stratum=16,
        poll=-6,
        precision=-128,
        root_delay=0xFFFFFFFF,
        root_dispersion=0x00018000,
        refid=b"INIT",
        reference_ts=1,
        origin_ts=2,
        receive_ts=(1 << 64) - 1,
        transmit_ts=1 << 63,
    )
    assert p.root_dispersion_seconds == 1.5


def test_decode_signed_poll_and_precision() -> None:
    p = decode(header(poll=127, precision=127))
    assert (p.poll, p.precision) == (127, 127)
    p = decode(bytes([0x24, 1, 0xFA, 0xE9]) + bytes(44))
    assert (p.poll, p.precision) == (-6, -23)


@pytest.mark.parametrize("length", range(HEADER_LEN))
def test_short_packets_raise(length: int) -> None:
    with pytest.raises(NTPDecodeError, match="short packet"):
        decode(CHRONY_LIKE_REPLY[:length])


def test_version_zero_raises() -> None:
    with pytest.raises(NTPDecodeError, match="version 0"):
        decode(header(vn=0))


@pytest.mark.parametrize("version", [1, 2, 3, 4, 5, 6, 7])
def test_versions_1_to_7_decode(version: int) -> None:
    assert decode(header(vn=version)).version == version


@pytest.mark.parametrize("mode", list(Mode))
def test_all_modes_decode(mode: Mode) -> None:
    assert decode(header(mode=mode)).mode == mode


# --- RFC 7822 extension fields and MACs -------------------------------------------------


def test_two_extension_fields_decode() -> None:
    ef1 = ef_bytes(0x0104, bytes(range(12)))  # 16 bytes: the minimum
    ef2 = ef_bytes(0x0204, bytes(range(100, 124)))  # 28 bytes: last EF without a MAC
    p = decode(header() + ef1 + ef2)
    assert p.extensions == (
        ExtensionField(0x0104, bytes(range(12))),
        ExtensionField(0x0204, bytes(range(100, 124))),
    )
    assert p.mac is None


@pytest.mark.parametrize("mac_len", [20, 24])
def test_trailer_of_mac_length_is_a_mac(mac_len: int) -> None:
    mac = bytes(range(1, mac_len + 1))
    p = decode(header() + mac)
    assert p.mac == mac
    assert p.extensions == ()


def test_four_byte_trailer_is_a_crypto_nak() -> None:
    p = decode(header() + b"\0\0\0\0")
    assert p.mac == b"\0\0\0\0"
    assert p.extensions == ()


@pytest.mark.parametrize("mac_len", [20, 24])
def test_mac_after_extension_field(mac_len: int) -> None:
    ef = ef_bytes(0x0104, b"\x11" * 12)
    mac = b"\x5a" * mac_len
    p = decode(header() + ef + mac)
    assert p.extensions == (ExtensionField(0x0104, b"\x11" * 12),)
    assert p.mac == mac


def test_mac_on_ntpv3_packet_is_accepted() -> None:
    p = decode(header(vn=3) + b"\x01" * 20)
    assert p.mac == b"\x01" * 20


@pytest.mark.parametrize(
    "length", [n for n in range(1, 25) if n not in (4, 20, 24)]
)
def test_trailer_of_other_short_length_raises(length: int) -> None:
    with pytest.raises(NTPDecodeError, match="neither a MAC nor an extension field"):
        decode(header() + b"\x01" * length)


def test_short_leftover_after_extension_field_raises() -> None:
    # RFC 7822: without a MAC the last EF must be at least 28 bytes; a 16-byte EF left
    # after a 28-byte one is neither a MAC nor a decodable EF.
    data = header() + ef_bytes(0x0104, bytes(24)) + ef_bytes(0x0204, bytes(12))
    with pytest.raises(NTPDecodeError):
        decode(data)


def test_lone_20_byte_extension_field_reads_as_mac() -> None:
    # The RFC 7822 ambiguity: 20 trailing bytes are a MAC, whatever they contain.
    trailer = ef_bytes(0x0104, bytes(16))
    p = decode(header() + trailer)
    assert p.extensions == ()
    assert p.mac == trailer


@pytest.mark.parametrize(
    ("flen", "available"),
    [
        (30, 32),  # not a multiple of 4
        (18, 28),  # not a multiple of 4, >= 16
        (12, 28),  # shorter than the 16-byte minimum
        (4, 28),  # header only
        (0, 28),  # zero length (would loop forever if accepted)
        (32, 28),  # overruns the buffer
        (0xFFFC, 28),  # overruns by a lot
    ],
)
def test_bad_extension_field_length_raises(flen: int, available: int) -> None:
    body = struct.pack("!HH", 0x0104, flen) + bytes(available - 4)
    with pytest.raises(NTPDecodeError, match="bad extension field"):
        decode(header() + body)


def test_overrunning_second_extension_field_raises() -> None:
    good = ef_bytes(0x0104, bytes(12))
    bad = struct.pack("!HH", 0x0204, 64) + bytes(28)
    with pytest.raises(NTPDecodeError, match="at byte 64"):
        decode(header() + good + bad)


@pytest.mark.parametrize("version", [1, 2, 3])
def test_extension_field_on_old_version_raises(version: int) -> None:
    data = header(vn=version) + ef_bytes(0x0104, bytes(24))
    with pytest.raises(NTPDecodeError, match=f"NTPv{version}"):
        decode(data)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"", b"\x01\x02\x00\x10" + bytes(12)),
        (b"abc", b"\x01\x02\x00\x10" + b"abc" + bytes(9)),
        (bytes(12), b"\x01\x02\x00\x10" + bytes(12)),
        (b"x" * 13, b"\x01\x02\x00\x14" + b"x" * 13 + bytes(3)),
        (b"y" * 16, b"\x01\x02\x00\x14" + b"y" * 16),
        (b"z" * 24, b"\x01\x02\x00\x1c" + b"z" * 24),
    ],
)
def test_extension_field_encode_pads(value: bytes, expected: bytes) -> None:
    out = ExtensionField(0x0102, value).encode()
    assert out == expected
    assert len(out) % 4 == 0
    assert len(out) >= 16


def test_encode_packet_with_extensions_and_mac_round_trips() -> None:
    p = Packet(
        leap=0, version=4, mode=4, stratum=1, poll=4, precision=-20, root_delay=0,
        root_dispersion=1, refid=b"GPS\0", reference_ts=5, origin_ts=6, receive_ts=7,
        transmit_ts=8,
        extensions=(ExtensionField(0x0104, b"a" * 12), ExtensionField(0x0204, b"b" * 24)),
        mac=b"\x99" * 20,
    )
    data = encode_packet(p)
    assert len(data) == 48 + 16 + 28 + 20
    assert decode(data) == p


# --- refid and kiss codes ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("stratum", "refid", "text"),
    [
        (0, b"RATE", "RATE"),
        (0, b"DENY", "DENY"),
        (1, b"GPS\0", "GPS"),
        (1, b"PPS\0", "PPS"),
        (1, b"X\0\0\0", "X"),
        (1, b"\x01\x02\x03\x04", "01020304"),
        (1, b"\0\0\0\0", "00000000"),
        (1, b"A B\0", "A B"),  # printable as isprint() reads it: space included
        (1, b"A\tB\0", "41094200"),
        (1, b"\0GPS", "00475053"),  # only trailing NULs are padding
        (0, b"\xffABC", "ff414243"),
        (2, b"\x7f\x7f\x01\x01", "127.127.1.1"),
        (3, b"\xc0\x00\x02\x01", "192.0.2.1"),
        (15, b"GPS\0", "71.80.83.0"),  # stratum 2-15 is always dotted
        (16, b"INIT", "INIT"),  # unsynchronised: text, as ntpd's REFID_ISTEXT
        (16, b"STEP", "STEP"),
        (255, b"XFAC", "XFAC"),
        (16, b"\0\0\0\0", "00000000"),
        (16, b"\x7f\0\0\x01", "7f000001"),
    ],
)
def test_format_refid(stratum: int, refid: bytes, text: str) -> None:
    assert format_refid(stratum, refid) == text


@pytest.mark.parametrize(
    ("stratum", "refid", "code"),
    [
        (0, b"RATE", "RATE"),
        (0, b"DENY", "DENY"),
        (0, b"RSTR", "RSTR"),
        (0, b"INIT", "INIT"),
        (0, b"X\0\0\0", "X"),  # NUL-padded short code
        (0, b"AB\0\0", "AB"),
        (0, b"A B ", "A B "),  # space is printable (isprint)
        (0, b"A\x7fB\0", None),
        (0, b"\0\0\0\0", None),  # an unsynchronised chrony, not a KoD
        (0, b"\x01\x02\x03\x04", None),
        (0, b"\0ABC", None),
        (0, b"A\0BC", None),
        (1, b"GPS\0", None),
        (1, b"RATE", None),  # KoD only at stratum 0
        (2, b"DENY", None),
        (16, b"RATE", None),
    ],
)
def test_kiss_code(stratum: int, refid: bytes, code: str | None) -> None:
    assert kiss_code(stratum, refid) == code
    p = decode(header(stratum=stratum, refid=refid))
    assert p.kiss_code == code


# --- timestamp conversions ------------------------------------------------------------


def test_ts_from_unix_ns_known_values() -> None:
    assert ts_from_unix_ns(0) == NTP_UNIX_DELTA << 32
    assert ts_from_unix_ns(UNIX_2024 * NS) == (UNIX_2024 + NTP_UNIX_DELTA) << 32
    assert ts_from_unix_ns(UNIX_ROLLOVER * NS) == 0
    assert ts_from_unix_ns((UNIX_ROLLOVER - 1) * NS) == 0xFFFFFFFF_00000000
    assert ts_from_unix_ns((UNIX_ROLLOVER + 1) * NS) == 0x00000001_00000000
    assert ts_from_unix_ns(UNIX_2100 * NS) == (UNIX_2100 + NTP_UNIX_DELTA - ERA_SECONDS) << 32
    assert ts_from_unix_ns(-NTP_UNIX_DELTA * NS) == 0  # 1900-01-01, start of era 0
    assert ts_from_unix_ns(NS // 2) == (NTP_UNIX_DELTA << 32) | 0x80000000
    assert ts_from_unix_ns(1) == (NTP_UNIX_DELTA << 32) | 4  # truncated: 4.29 -> 4
    assert ts_from_unix_ns(NS - 1) == (NTP_UNIX_DELTA << 32) | 0xFFFFFFFB


def test_ts_from_unix_ns_handles_negative_subsecond() -> None:
    # -0.5 s is 1969-12-31T23:59:59.5: second NTP_UNIX_DELTA - 1, fraction one half.
    assert ts_from_unix_ns(-NS // 2) == ((NTP_UNIX_DELTA - 1) << 32) | 0x80000000


INSTANTS_NS = [
    0,  # 1970
    UNIX_2024 * NS,
    UNIX_2024 * NS + NS // 2,
    UNIX_2024 * NS + NS // 4,
    (UNIX_ROLLOVER - 1) * NS,  # last second of era 0
    UNIX_ROLLOVER * NS - NS // 2,
    UNIX_ROLLOVER * NS,  # first instant of era 1
    (UNIX_ROLLOVER + 1) * NS,
    UNIX_2100 * NS,
]
PIVOT_SHIFTS_NS = [0, 1, -1, NS, -NS, 30 * YEAR_NS, -30 * YEAR_NS, 67 * YEAR_NS, -67 * YEAR_NS]


@pytest.mark.parametrize("unix_ns", INSTANTS_NS)
@pytest.mark.parametrize("shift", PIVOT_SHIFTS_NS)
def test_ts_round_trip_exact(unix_ns: int, shift: int) -> None:
    ts = ts_from_unix_ns(unix_ns)
    assert ts_to_unix_ns(ts, unix_ns + shift) == unix_ns


def test_ts_to_unix_ns_resolves_era_from_pivot() -> None:
    ts = 0x00000001_00000000  # second 1 of some era
    # Near 2036 the nearest era is era 1: one second after the rollover.
    assert ts_to_unix_ns(ts, UNIX_ROLLOVER * NS - 10 * YEAR_NS) == (UNIX_ROLLOVER + 1) * NS
    # Near 1900 it is era 0.
    assert ts_to_unix_ns(ts, -NTP_UNIX_DELTA * NS + YEAR_NS) == (1 - NTP_UNIX_DELTA) * NS


def test_ts_to_unix_ns_more_than_68_years_from_pivot_picks_wrong_era() -> None:
    # The documented limit: 1970 read against a 2100 pivot lands in era 1 (2106).
    assert ts_to_unix_ns(ts_from_unix_ns(0), UNIX_2100 * NS) == ERA_SECONDS * NS


def test_ts_diff_across_era_boundary() -> None:
    a = 0x00000001_00000000  # era 1, 1 s after the rollover
    b = 0xFFFFFFFF_00000000  # era 0, 1 s before it
    assert ts_diff(a, b) == 2 << 32
    assert ts_diff(b, a) == -(2 << 32)
    assert frac_to_seconds(ts_diff(a, b)) == 2.0
    assert ts_diff_ns(a, b) == 2 * NS
    assert ts_diff_ns(b, a) == -2 * NS


def test_ts_diff_small_values() -> None:
    assert ts_diff(0, (1 << 64) - 1) == 1
    assert ts_diff((1 << 64) - 1, 0) == -1
    assert ts_diff(5, 5) == 0
    assert ts_diff((1 << 63) - 1, 0) == (1 << 63) - 1
    assert ts_diff(1 << 63, 0) == -(1 << 63)  # exactly half the circle counts as negative


def test_ts_diff_ns_rounds_to_nearest() -> None:
    assert ts_diff_ns(1, 0) == 0
    assert ts_diff_ns(0, 1) == 0
    assert ts_diff_ns(5, 0) == 1  # 5 * 2**-32 s = 1.16 ns
    assert ts_diff_ns(0, 5) == -1
    assert ts_diff_ns(1 << 31, 0) == NS // 2
    assert ts_diff_ns(0, 1 << 31) == -NS // 2


def test_frac_to_seconds() -> None:
    assert frac_to_seconds(1 << 32) == 1.0
    assert frac_to_seconds(1 << 31) == 0.5
    assert frac_to_seconds(-(3 << 30)) == -0.75
    assert frac_to_seconds(0) == 0.0


def test_short_format_conversions() -> None:
    assert short_to_seconds(0) == 0.0
    assert short_to_seconds(0x00010000) == 1.0
    assert short_to_seconds(0x00008000) == 0.5
    assert short_to_seconds(0x00000001) == 2.0**-16
    assert short_to_seconds(0xFFFFFFFF) == 65536 - 2.0**-16
    assert seconds_to_short(1.0) == 0x00010000
    assert seconds_to_short(0.5) == 0x00008000
    assert seconds_to_short(2.0**-16) == 1
    assert seconds_to_short(2.0**-18) == 0  # rounds to nearest
    assert seconds_to_short(3 * 2.0**-18) == 1
    assert seconds_to_short(-1.0) == 0  # clamped
    assert seconds_to_short(1e9) == 0xFFFFFFFF  # clamped


# --- properties -------------------------------------------------------------------------

_any_ts = st.integers(min_value=0, max_value=(1 << 64) - 1)
_valid_header = st.builds(
    header,
    li=st.integers(0, 3),
    vn=st.integers(4, 7),
    mode=st.integers(0, 7),
    stratum=st.integers(0, 255),
    poll=st.integers(-128, 127),
    precision=st.integers(-128, 127),
    root_delay=st.integers(0, 0xFFFFFFFF),
    root_disp=st.integers(0, 0xFFFFFFFF),
    refid=st.binary(min_size=4, max_size=4),
    ref=_any_ts,
    org=_any_ts,
    rec=_any_ts,
    xmt=_any_ts,
)


def _raw_ef(field_type: int, length: int, fill: bytes) -> bytes:
    return struct.pack("!HH", field_type, length) + fill


_ef_like_tail = st.lists(
    st.builds(
        _raw_ef,
        st.integers(0, 0xFFFF),
        st.sampled_from([0, 4, 12, 16, 18, 20, 24, 28, 32, 36, 64, 0xFFFF]),
        st.binary(max_size=40),
    ),
    max_size=4,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=160),
        st.tuples(_valid_header, st.binary(max_size=120)).map(lambda t: t[0] + t[1]),
        st.tuples(_valid_header, _ef_like_tail, st.binary(max_size=28)).map(
            lambda t: t[0] + t[1] + t[2]
        ),
    )
)
def test_decode_arbitrary_bytes_returns_packet_or_raises_decode_error(data: bytes) -> None:
    try:
        p = decode(data)
    except NTPDecodeError:
        return
    assert isinstance(p, Packet)
    assert len(data) >= HEADER_LEN
    assert 1 <= p.version <= 7
    consumed = HEADER_LEN + sum(4 + len(ef.value) for ef in p.extensions)
    consumed += len(p.mac) if p.mac is not None else 0
    assert consumed == len(data)
    # Whatever decoded also re-encodes to the very same bytes.
    assert encode_packet(p) == data


@st.composite
def packets(draw: st.DrawFn) -> Packet:
    mac = draw(st.one_of(st.none(), st.sampled_from([4, 20, 24]).flatmap(
        lambda n: st.binary(min_size=n, max_size=n))))
    version = draw(st.integers(1, 7))
    extensions: tuple[ExtensionField, ...] = ()
    if version >= 4:
        n = draw(st.integers(0, 3))
        words = [draw(st.integers(3, 12)) for _ in range(n)]
        if n and (mac is None or len(mac) == 4):
            # The walk only reads an EF while more than 24 octets remain (RFC 7822): with no
            # MAC the last EF must be at least 28 octets, before a 4-octet crypto-NAK at
            # least 24, or the tail reads as a MAC.
            words[-1] = max(words[-1], 6 if mac is None else 5)
        extensions = tuple(
            ExtensionField(
                draw(st.integers(0, 0xFFFF)), draw(st.binary(min_size=4 * w, max_size=4 * w))
            )
            for w in words
        )
    return Packet(
        leap=draw(st.integers(0, 3)),
        version=version,
        mode=draw(st.integers(0, 7)),
        stratum=draw(st.integers(0, 255)),
        poll=draw(st.integers(-128, 127)),
        precision=draw(st.integers(-128, 127)),
        root_delay=draw(st.integers(0, 0xFFFFFFFF)),
        root_dispersion=draw(st.integers(0, 0xFFFFFFFF)),
        refid=draw(st.binary(min_size=4, max_size=4)),
        reference_ts=draw(_any_ts),
        origin_ts=draw(_any_ts),
        receive_ts=draw(_any_ts),
        transmit_ts=draw(_any_ts),
        extensions=extensions,
        mac=mac,
    )


@settings(max_examples=300, deadline=None)
@given(packets())
def test_decode_encode_round_trip(p: Packet) -> None:
    data = encode_packet(p)
    assert decode(data) == p
    assert encode_packet(decode(data)) == data


# Unix ns between 1900 and 2200 (eras 0..2) and a pivot less than 68 years away.
_MAX_SHIFT_NS = ((1 << 31) - 1) * NS
_unix_ns = st.integers(min_value=-NTP_UNIX_DELTA * NS, max_value=7_258_118_400 * NS)
_shift_ns = st.integers(min_value=-_MAX_SHIFT_NS, max_value=_MAX_SHIFT_NS)


@settings(max_examples=400, deadline=None)
@given(_unix_ns, _shift_ns)
def test_ts_round_trip_within_one_ns(unix_ns: int, shift: int) -> None:
    # ts_from_unix_ns truncates to 2**-32 s (~0.23 ns), so the round trip can lose at most
    # 1 ns, never gains, and never lands in the wrong era.
    back = ts_to_unix_ns(ts_from_unix_ns(unix_ns), unix_ns + shift)
    assert unix_ns - 1 <= back <= unix_ns


@settings(max_examples=300, deadline=None)
@given(st.integers(-NTP_UNIX_DELTA, 7_258_118_400), st.sampled_from([0, NS // 2, NS // 4]),
       _shift_ns)
def test_ts_round_trip_exact_for_dyadic_subseconds(secs: int, sub: int, shift: int) -> None:
    unix_ns = secs * NS + sub
    assert ts_to_unix_ns(ts_from_unix_ns(unix_ns), unix_ns + shift) == unix_ns


@settings(max_examples=300, deadline=None)
@given(_unix_ns)
def test_ts_round_trip_exact_with_itself_as_pivot(unix_ns: int) -> None:
    assert ts_to_unix_ns(ts_from_unix_ns(unix_ns), unix_ns) == unix_ns


def test_ts_round_trip_exact_for_any_nanosecond() -> None:
    # 1 ns -> fraction 4 (0.93 ns) -> read back against a whole-second pivot -> 0 ns.
    assert ts_to_unix_ns(ts_from_unix_ns(1), 0) == 1
    # The same timestamp read against two pivots in the same era must agree.
    ts = ts_from_unix_ns(UNIX_2024 * NS + 1)
    assert ts_to_unix_ns(ts, UNIX_2024 * NS) == ts_to_unix_ns(ts, UNIX_2024 * NS + 1)


@settings(max_examples=400, deadline=None)
@given(_any_ts, _any_ts)
def test_ts_diff_antisymmetric(a: int, b: int) -> None:
    d = ts_diff(a, b)
    assert -(1 << 63) <= d < (1 << 63)
    assert (b + d) % (1 << 64) == a
    assume(d != -(1 << 63))  # exactly half the circle has no positive counterpart
    assert ts_diff(b, a) == -d
