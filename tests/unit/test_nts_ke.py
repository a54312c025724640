"""Byte-level tests for NTS-KE records (RFC 8915 §4): request encoding, incremental decoding,
response validation and bounds against hostile servers."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntp_probe.proto.nts.ke import (
    DEFAULT_LIMITS,
    ErrorCode,
    KEDecoder,
    KEErrorReceived,
    KEFailure,
    KELimits,
    KEMalformed,
    KENoCommonAEAD,
    KENoCommonProtocol,
    KENoCookies,
    KEResponse,
    KEWarningReceived,
    Record,
    RecordType,
    encode_request,
    error_code_name,
    is_valid_server_name,
    parse_response,
    validate_response,
)


def rec(rtype: int, body: bytes = b"", critical: bool = False) -> bytes:
    """A record built with struct, independently of the module's encoder."""
    return struct.pack("!HH", (0x8000 if critical else 0) | rtype, len(body)) + body


def u16(*values: int) -> bytes:
    return b"".join(struct.pack("!H", v) for v in values)


EOM = rec(0, critical=True)
COOKIES = [bytes([i]) * 100 for i in range(8)]


def chrony_response(*, port: int | None = 11126, extra: bytes = b"") -> bytes:
    """The shape chrony 4.3 answers with: NextProto, AEAD, Port, 8 cookies of 100 B, EOM."""
    out = rec(1, u16(0), True) + rec(4, u16(15), True)
    if port is not None:
        out += rec(7, u16(port), True)
    out += extra
    out += b"".join(rec(5, c) for c in COOKIES)
    return out + EOM


def response(*records: bytes) -> bytes:
    return b"".join(records) + EOM


BASE = (rec(1, u16(0), True), rec(4, u16(15), True), rec(5, b"c" * 100))


# --- request encoding -----------------------------------------------------------------


def test_default_request_bytes():
    assert encode_request() == bytes.fromhex("800100020000" "80040002000f" "80000000")


def test_request_with_preferences_server_and_port():
    data = encode_request([30, 15], server="ntp.example.org", port=4123)
    assert data == (
        bytes.fromhex("800100020000" "80040004001e000f")
        + bytes.fromhex("0006000f") + b"ntp.example.org"  # non-critical: a preference only
        + bytes.fromhex("00070002101b")
        + bytes.fromhex("80000000")
    )


def test_request_round_trips_through_decoder():
    decoder = KEDecoder()
    records = decoder.feed(encode_request([15, 17], server="::1", port=123))
    assert decoder.complete
    assert [(r.record_type, r.critical) for r in records] == [
        (1, True), (4, True), (6, False), (7, False), (0, True)
    ]
    assert records[1].body == u16(15, 17)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"aead_ids": []}, "at least one"),
        ({"aead_ids": [15, 15]}, "duplicate"),
        ({"aead_ids": [65536]}, "0..65535"),
        ({"aead_ids": [-1]}, "0..65535"),
        ({"server": "fe80::1%eth0"}, "host name"),
        ({"server": "bad host"}, "host name"),
        ({"server": "tíme.example"}, "host name"),
        ({"server": ""}, "host name"),
        ({"port": 0}, "port"),
        ({"port": 65536}, "port"),
    ],
)
def test_request_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        encode_request(**kwargs)


def test_record_encoding_sets_critical_bit_and_exact_length():
    assert Record(5, b"abc").encode() == bytes.fromhex("00050003") + b"abc"
    assert Record(0x1234, b"", critical=True).encode() == bytes.fromhex("92340000")
    assert Record(0x7FFF, critical=True).encode() == bytes.fromhex("ffff0000")


@pytest.mark.parametrize(("rtype", "body"), [(0x8000, b""), (-1, b""), (5, bytes(65536))])
def test_record_encoding_rejects_out_of_range(rtype, body):
    with pytest.raises(ValueError):
        Record(rtype, body).encode()


# --- incremental decoding -------------------------------------------------------------


def test_decoder_reads_chrony_response_in_one_piece():
    decoder = KEDecoder()
    records = decoder.feed(chrony_response())
    assert decoder.complete
    assert [r.record_type for r in records] == [1, 4, 7] + [5] * 8 + [0]
    assert [r.critical for r in records] == [True, True, True] + [False] * 8 + [True]
    assert records[2].body == u16(11126)
    assert decoder.finish() == tuple(records)


def test_decoder_split_at_every_byte_boundary():
    data = chrony_response()
    expected = KEDecoder().feed(data)
    for cut in range(len(data) + 1):
        decoder = KEDecoder()
        first = decoder.feed(data[:cut])
        assert decoder.complete is (cut == len(data))
        second = decoder.feed(data[cut:])
        assert first + second == expected, cut
        assert decoder.complete


def test_decoder_byte_by_byte_returns_each_record_when_its_last_byte_arrives():
    data = response(rec(1, u16(0), True), rec(5, b"xyz"))
    decoder = KEDecoder()
    completed_at = {}
    for i in range(len(data)):
        for r in decoder.feed(data[i : i + 1]):
            completed_at[r.record_type] = i
    # NextProto ends at byte 5, the cookie (4 + 3) at byte 12, EOM (4) at byte 16.
    assert completed_at == {1: 5, 5: 12, 0: 16}
    assert decoder.complete


@given(st.lists(st.integers(min_value=1, max_value=64), max_size=40))
def test_decoder_chunking_does_not_change_records(sizes):
    data = chrony_response()
    decoder = KEDecoder()
    got = []
    pos = 0
    for size in sizes:
        got += decoder.feed(data[pos : pos + size])
        pos += size
    got += decoder.feed(data[pos:])
    assert got == list(KEDecoder().feed(data))


def test_missing_end_of_message():
    data = chrony_response()[:-4]
    decoder = KEDecoder()
    decoder.feed(data)
    assert not decoder.complete
    with pytest.raises(KEMalformed, match="without End of Message"):
        decoder.finish()
    with pytest.raises(KEMalformed):
        parse_response(data)


def test_a_session_closed_before_any_record_says_so():
    # Often the server's own session timeout over a slow path, or a refusal by closing:
    # the words (check's line, failure_detail) must not only say "malformed".
    with pytest.raises(KEMalformed, match="closed the session before sending any record"):
        KEDecoder().finish()


def test_stream_ending_inside_a_record_reports_the_partial_bytes():
    decoder = KEDecoder()
    decoder.feed(rec(5, b"c" * 100)[:50])
    with pytest.raises(KEMalformed, match="50 bytes of a partial record"):
        decoder.finish()


def test_end_of_message_with_a_body_is_malformed():
    with pytest.raises(KEMalformed, match="End of Message with a 2-byte body"):
        KEDecoder().feed(rec(1, u16(0), True) + rec(0, u16(0), True))


def test_bytes_after_end_of_message_in_the_same_read():
    with pytest.raises(KEMalformed, match="after End of Message"):
        KEDecoder().feed(chrony_response() + b"\x00")


def test_bytes_after_end_of_message_in_a_later_read():
    decoder = KEDecoder()
    decoder.feed(chrony_response())
    assert decoder.feed(b"") == []
    with pytest.raises(KEMalformed, match="after End of Message"):
        decoder.feed(rec(5, b"late"))


# --- hostile sizes --------------------------------------------------------------------


def test_declared_record_length_beyond_the_limit_fails_before_the_body_arrives():
    decoder = KEDecoder(KELimits(max_bytes=1000))
    with pytest.raises(KEMalformed, match="exceeds the response limit"):
        decoder.feed(struct.pack("!HH", 5, 997))  # 4 + 997 > 1000


def test_record_exactly_at_the_byte_limit_is_accepted():
    body = rec(1, u16(0), True) + rec(4, u16(15), True)
    cookie_len = 1000 - len(body) - 4 - 4
    data = body + rec(5, b"k" * cookie_len) + EOM
    assert len(data) == 1000
    limits = KELimits(max_bytes=1000, max_cookie_length=1000)
    assert parse_response(data, limits=limits).cookies == (b"k" * cookie_len,)


def test_total_bytes_limit_with_many_small_records():
    data = rec(0x4000, b"x" * 996) * 40  # 40 unknown non-critical records, 40000 bytes
    decoder = KEDecoder()
    with pytest.raises(KEMalformed, match="exceeds"):
        for i in range(0, len(data), 1000):
            decoder.feed(data[i : i + 1000])


def test_single_read_beyond_the_byte_limit():
    with pytest.raises(KEMalformed, match="response exceeds 32768 bytes"):
        KEDecoder().feed(bytes(DEFAULT_LIMITS.max_bytes + 1))


def test_record_count_limit():
    data = rec(0x4000) * (DEFAULT_LIMITS.max_records + 1)
    with pytest.raises(KEMalformed, match="more than 128 records"):
        KEDecoder().feed(data)


def test_cookie_count_limit():
    data = response(*BASE[:2], *(rec(5, b"c" * 10) for _ in range(65)))
    with pytest.raises(KEMalformed, match="65 cookies"):
        parse_response(data)
    ok = response(*BASE[:2], *(rec(5, b"c" * 10) for _ in range(64)))
    assert len(parse_response(ok).cookies) == 64


def test_cookie_size_limits():
    with pytest.raises(KEMalformed, match="cookie of 1025 bytes"):
        parse_response(response(*BASE[:2], rec(5, b"c" * 1025)))
    with pytest.raises(KEMalformed, match="cookie of 0 bytes"):
        parse_response(response(*BASE[:2], rec(5, b"")))
    assert parse_response(response(*BASE[:2], rec(5, b"c" * 1024))).cookies == (b"c" * 1024,)


def test_custom_limits_apply():
    limits = KELimits(max_cookies=2, max_cookie_length=50)
    with pytest.raises(KEMalformed, match="3 cookies"):
        parse_response(response(*BASE[:2], *(rec(5, b"c") for _ in range(3))), limits=limits)
    with pytest.raises(KEMalformed, match="cookie of 51 bytes"):
        parse_response(response(*BASE[:2], rec(5, b"c" * 51)), limits=limits)


# --- validation: the normal case ------------------------------------------------------


def test_chrony_response_validates():
    result = parse_response(chrony_response())
    assert result == KEResponse(
        next_protocol=0, aead_id=15, cookies=tuple(COOKIES), server=None, port=11126
    )
    assert result.ntp_port == 11126


def test_port_defaults_to_123_and_server_to_none():
    result = parse_response(chrony_response(port=None))
    assert (result.server, result.port, result.ntp_port) == (None, None, 123)


@pytest.mark.parametrize("name", ["127.0.0.1", "::1", "2001:db8::123", "ntp.example.org",
                                  "ntp.example.org.", "time-1.example", "xn--tme-2na.example"])
def test_server_negotiation_accepts_addresses_and_names(name):
    data = response(*BASE, rec(6, name.encode(), True))
    assert parse_response(data).server == name


@pytest.mark.parametrize(
    "body",
    [b"", b"fe80::1%eth0", b"bad host", b"-lead.example", b"trail-.example", b"a..b",
     b"t\xc3\xadme.example", b"\xff", b"999.1.1.1", b"1:2:3", b"x" * 64 + b".example",
     b"a." * 127 + b"ab"],
)
def test_server_negotiation_rejects_invalid_hosts(body):
    with pytest.raises(KEMalformed, match="server negotiation"):
        parse_response(response(*BASE, rec(6, body)))


def test_is_valid_server_name_length_boundary():
    name = ".".join(["a" * 63] * 3 + ["b" * 61])  # 253 characters
    assert len(name) == 253
    assert is_valid_server_name(name)
    assert is_valid_server_name(name + ".")
    assert not is_valid_server_name(name + "b")


def test_aead_offer_order_and_choice():
    data = response(rec(1, u16(0), True), rec(4, u16(30)), rec(5, b"c"))
    assert parse_response(data, offered_aead_ids=(30, 15)).aead_id == 30
    with pytest.raises(KEMalformed, match="AEAD algorithm 30, which was not offered"):
        parse_response(data)


def test_unknown_non_critical_records_are_ignored_and_listed():
    data = chrony_response(extra=rec(1024) + rec(0x1234, b"zz"))
    assert parse_response(data).ignored_record_types == (1024, 0x1234)


def test_known_record_types_are_read_whatever_their_critical_bit():
    data = response(rec(1, u16(0)), rec(4, u16(15)), rec(5, b"c", True), rec(7, u16(1230)))
    result = parse_response(data)
    assert (result.cookies, result.port) == ((b"c",), 1230)


# --- validation: failures -------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "name"),
    [(0, "unrecognized_critical_record"), (1, "bad_request"), (2, "internal_server_error"),
     (9, "unknown")],
)
def test_error_record(code, name):
    with pytest.raises(KEErrorReceived) as info:
        parse_response(response(rec(2, u16(code), True)))
    assert info.value.code == code
    assert info.value.reason == "nts_ke_error"
    assert name in str(info.value)
    assert error_code_name(code) == name


def test_error_code_enum_values():
    assert [int(c) for c in ErrorCode] == [0, 1, 2]


def test_error_wins_over_everything_else():
    data = response(*BASE, rec(3, u16(5), True), rec(0x1234, b"", True), rec(2, u16(1), True))
    with pytest.raises(KEErrorReceived) as info:
        parse_response(data)
    assert info.value.code == ErrorCode.BAD_REQUEST


def test_error_with_a_bad_body_is_malformed():
    with pytest.raises(KEMalformed, match="error record body is 3 bytes"):
        parse_response(response(rec(2, b"\x00\x00\x01", True)))


def test_warning_record():
    with pytest.raises(KEWarningReceived) as info:
        parse_response(response(*BASE, rec(3, u16(7), True)))
    assert (info.value.code, info.value.reason) == (7, "nts_ke_warning")


def test_warning_wins_over_unknown_critical_record():
    with pytest.raises(KEWarningReceived):
        parse_response(response(rec(0x1234, b"", True), rec(3, u16(0), True)))


def test_unknown_critical_record_aborts():
    with pytest.raises(KEMalformed, match="unrecognized critical record type 4660") as info:
        parse_response(chrony_response(extra=rec(0x1234, b"", True)))
    assert info.value.reason == "nts_ke_malformed"


def test_no_common_protocol():
    with pytest.raises(KENoCommonProtocol) as info:
        parse_response(response(rec(1, b"", True)))
    assert info.value.reason == "nts_no_common_protocol"


def test_no_common_aead():
    # chrony 4.3 offered only [17]: next_protocol=0000, aead_algorithm empty, EOM.
    with pytest.raises(KENoCommonAEAD) as info:
        parse_response(response(rec(1, u16(0), True), rec(4, b"", True)), offered_aead_ids=(17,))
    assert info.value.reason == "nts_no_common_aead"


def test_no_cookies():
    with pytest.raises(KENoCookies) as info:
        parse_response(response(rec(1, u16(0), True), rec(4, u16(15), True)))
    assert info.value.reason == "nts_no_cookies"


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ((rec(4, u16(15)), rec(5, b"c")), "no NEXT_PROTOCOL"),
        ((rec(1, u16(0)), rec(5, b"c")), "no AEAD_ALGORITHM"),
        ((rec(1, u16(0)), rec(1, u16(0)), rec(4, u16(15)), rec(5, b"c")), "2 NEXT_PROTOCOL"),
        ((rec(1, u16(0)), rec(4, u16(15)), rec(4, u16(15)), rec(5, b"c")), "2 AEAD_ALGORITHM"),
        ((rec(1, u16(1)), rec(4, u16(15)), rec(5, b"c")), "protocol 1, which was not offered"),
        ((rec(1, u16(0, 0)), rec(4, u16(15)), rec(5, b"c")), "chose 2 values"),
        ((rec(1, u16(0)), rec(4, u16(15, 16)), rec(5, b"c")), "chose 2 values"),
        ((rec(1, b"\x00"), rec(4, u16(15)), rec(5, b"c")), "odd length"),
        ((*BASE, rec(7, u16(0))), "port 0"),
        ((*BASE, rec(7, b"\x00\x7b\x00")), "port record body is 3 bytes"),
        ((*BASE, rec(7, u16(123)), rec(7, u16(124))), "2 NTPV4_PORT"),
        ((*BASE, rec(6, b"a.example"), rec(6, b"b.example")), "2 NTPV4_SERVER"),
        ((*BASE, rec(3, b"", True)), "warning record body is 0 bytes"),
    ],
)
def test_malformed_responses(records, message):
    with pytest.raises(KEMalformed, match=message):
        parse_response(response(*records))


def test_validate_requires_end_of_message_last_and_only_last():
    records = list(KEDecoder().feed(chrony_response()))
    with pytest.raises(KEMalformed, match="does not end"):
        validate_response(records[:-1])
    with pytest.raises(KEMalformed, match="does not end"):
        validate_response([])
    eom = Record(RecordType.END_OF_MESSAGE, critical=True)
    with pytest.raises(KEMalformed, match="before the last"):
        validate_response([records[0], eom, *records[1:]])


# --- fuzz -----------------------------------------------------------------------------


@settings(max_examples=400)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=64))
def test_arbitrary_bytes_raise_only_ke_failures(data, chunk):
    decoder = KEDecoder()
    try:
        for i in range(0, len(data), chunk):
            decoder.feed(data[i : i + chunk])
        result = validate_response(decoder.finish())
    except KEFailure:
        return
    assert isinstance(result, KEResponse)


_record_strategy = st.builds(
    rec,
    st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 1024, 0x1234, 0x7FFF]),
    st.one_of(st.binary(max_size=8), st.sampled_from([u16(0), u16(15), b"127.0.0.1"])),
    st.booleans(),
)


@settings(max_examples=400)
@given(st.lists(_record_strategy, max_size=12))
def test_structured_record_soup_raises_only_ke_failures(records):
    try:
        result = parse_response(b"".join(records) + EOM)
    except KEFailure:
        return
    assert result.next_protocol == 0
    assert result.aead_id == 15
    assert result.cookies
