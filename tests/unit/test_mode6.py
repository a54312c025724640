"""ntpd mode 6 codec, by bytes.

The byte vectors under "verified exchanges" are what ntpsec 1.2.2's ntpd on 127.0.0.1:123
actually sent and answered (captured with three SHM refclocks at 0, +0.3 ms and +1 s).
"""

from __future__ import annotations

import itertools
import math
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntp_probe.proto import mode6
from ntp_probe.proto.mode6 import (
    ErrorReply,
    Fragment,
    Mode6Error,
    Reassembler,
    decode_reply,
)

SYS_VARS = "leap,stratum,refid,rootdelay,rootdisp,offset,leapsec,expire"
SYS_TEXT = (
    b"leap=3, stratum=1, rootdelay=0.000, rootdisp=937.582, refid=SHM0,\r\n"
    b"offset=0.000000, leapsec=2017-01-01T00:00Z, expire=2026-06-28T00:00Z\r\n"
)
PEER_VARS = "srcadr,reach,unreach,offset,delay,dispersion,jitter,hpoll,flash"
PEER_TEXT = (
    b"srcadr=127.127.28.0, hpoll=3, reach=0xf, unreach=0, delay=0.000000,\r\n"
    b"offset=0.000000, jitter=0.000000, dispersion=937.582500, flash=0x0\r\n"
)
H = bytes.fromhex

# --- verified exchanges (ntpsec 1.2.2) ---------------------------------------------------

SYS_REQUEST = H("16 02 1234 0000 0000 0000 003b") + SYS_VARS.encode() + b"\0"
SYS_REPLY = H("d6 82 1234 c416 0000 0000 0089") + SYS_TEXT + bytes(3)
READSTAT_REQUEST = H("16 01 1235 0000 0000 0000 0000")
READSTAT_REPLY = H("d6 81 1235 c416 0000 0000 000c 4569 9114 4568 9314 4567 961a")
PEER_REQUEST = H("16 02 1236 0000 4567 0000 003f") + PEER_VARS.encode() + b"\0"
PEER_REPLY = H("d6 82 1236 961a 4567 0000 0089") + PEER_TEXT + bytes(3)
ERR_UNKNOWNVAR = H("d6c2459f 0500 0000 01d4 0000")
ERR_BADASSOC = H("d6c245a0 0400 1092 01d4 0000")
FRAG1_HEADER = H("d6a2459ec4180000000001d4")
FRAG2_HEADER = H("d682459ec418000001d40102")


def test_system_readvar_request_is_byte_exact() -> None:
    assert len(SYS_REQUEST) == 72
    assert mode6.encode_readvar(0x1234, 0, SYS_VARS.split(",")) == SYS_REQUEST


def test_peer_readvar_request_is_byte_exact() -> None:
    assert len(PEER_REQUEST) == 76
    assert mode6.encode_readvar(0x1236, 17767, PEER_VARS.split(",")) == PEER_REQUEST


def test_readstat_request_is_byte_exact() -> None:
    assert mode6.encode_readstat(0x1235) == READSTAT_REQUEST


def test_system_readvar_reply() -> None:
    assert len(SYS_REPLY) == 152
    reply = decode_reply(SYS_REPLY, opcode=mode6.Opcode.READVAR, sequence=0x1234, association=0)
    assert isinstance(reply, Fragment)
    h = reply.header
    assert (h.response, h.error, h.more, h.opcode, h.version, h.mode) == (
        True, False, False, 2, 2, 6)
    assert (h.sequence, h.status, h.association, h.offset, h.count) == (0x1234, 0xC416, 0, 0, 137)
    assert reply.data == SYS_TEXT  # padding cut off

    variables = mode6.parse_variables(reply.data)
    # The server's order, not the request's.
    assert list(variables) == [
        "leap", "stratum", "rootdelay", "rootdisp", "refid", "offset", "leapsec", "expire"]
    assert variables["refid"] == "SHM0"
    assert mode6.to_int(variables["leap"]) == 3
    assert mode6.to_int(variables["stratum"]) == 1
    assert mode6.ms_to_seconds(variables["rootdisp"]) == pytest.approx(0.937582)
    assert mode6.ms_to_seconds(variables["rootdelay"]) == 0.0
    assert mode6.date_to_unix(variables["leapsec"]) == 1_483_228_800  # 2017-01-01
    assert mode6.date_to_unix(variables["expire"]) == 1_782_604_800  # 2026-06-28

    status = mode6.decode_system_status(h.status)
    assert (status.leap, status.source, status.event_count, status.event_code) == (3, 4, 1, 6)
    assert (status.source_name, status.event_name) == ("uhf_radio", "restart")


def test_readstat_reply() -> None:
    reply = decode_reply(READSTAT_REPLY, opcode=1, sequence=0x1235, association=0)
    assert isinstance(reply, Fragment)
    assocs = mode6.decode_readstat(reply.data)
    assert assocs == [(17769, 0x9114), (17768, 0x9314), (17767, 0x961A)]
    statuses = [mode6.decode_peer_status(word) for _, word in assocs]
    assert [(s.selection_name, s.event_name) for s in statuses] == [
        ("falsetick", "reachable"), ("outlier", "reachable"), ("sys.peer", "sys_peer")]
    for s in statuses:
        assert (s.configured, s.reachable, s.auth_enabled, s.authentic, s.broadcast) == (
            True, True, False, False, False)
        assert s.event_count == 1


def test_peer_readvar_reply() -> None:
    reply = decode_reply(PEER_REPLY, opcode=2, sequence=0x1236, association=17767)
    assert isinstance(reply, Fragment)
    # In a reply about an association the status field is that peer's status word.
    assert mode6.decode_peer_status(reply.header.status).selection_name == "sys.peer"
    v = mode6.parse_variables(reply.data)
    assert v["srcadr"] == "127.127.28.0"
    assert mode6.log2_seconds(v["hpoll"]) == 8.0
    reach = mode6.reach_register(v["reach"])
    assert reach == 0xF
    assert (mode6.reach_ratio(reach), mode6.reach_last(reach)) == (0.5, 1)
    assert mode6.to_int(v["unreach"]) == 0
    assert mode6.ms_to_seconds(v["dispersion"]) == pytest.approx(0.9375825)
    assert mode6.ms_to_seconds(v["offset"]) == 0.0
    assert mode6.to_int(v["flash"]) == 0
    # The same reply read as if it answered another association is refused.
    with pytest.raises(Mode6Error, match="association"):
        decode_reply(PEER_REPLY, opcode=2, sequence=0x1236, association=17768)


def _two_fragments() -> tuple[bytes, bytes, bytes]:
    """The verified two-fragment headers, carrying 726 octets of variable text."""
    text = b", ".join(b"var%02d=%d" % (i, 10 ** (i % 9)) for i in range(200))[:726]
    first = FRAG1_HEADER + text[:468]
    second = FRAG2_HEADER + text[468:] + bytes(2)
    return text, first, second


def test_two_fragment_reply_in_either_order() -> None:
    text, first, second = _two_fragments()
    assert (len(first), len(second)) == (480, 272)
    for order in ((first, second), (second, first)):
        r = Reassembler()
        for datagram in order:
            assert not r.complete
            fragment = decode_reply(datagram, opcode=2, sequence=0x459E, association=0)
            assert isinstance(fragment, Fragment)
            assert r.add(fragment) is True
        assert r.complete and r.gaps() == []
        response = r.response()
        assert response.data == text
        assert (response.status, response.association, response.fragments) == (0xC418, 0, 2)
    assert mode6.parse_variables(text)["var01"] == "10"


def test_error_replies() -> None:
    unknown = decode_reply(ERR_UNKNOWNVAR, opcode=2, sequence=0x459F, association=0)
    assert unknown == ErrorReply(code=5, opcode=2, sequence=0x459F, association=0)
    assert unknown.name == "unknownvar"
    bad = decode_reply(ERR_BADASSOC, opcode=2, sequence=0x45A0, association=4242)
    assert isinstance(bad, ErrorReply)
    assert (bad.code, bad.name, bad.association) == (4, "badassoc", 4242)
    # ntpd may leave a stale association in an error reply: still the error, not a mismatch.
    stale = decode_reply(ERR_BADASSOC, opcode=2, sequence=0x45A0, association=0)
    assert isinstance(stale, ErrorReply) and stale.name == "badassoc"
    # But it must answer our request.
    with pytest.raises(Mode6Error, match="sequence"):
        decode_reply(ERR_UNKNOWNVAR, opcode=2, sequence=0x45A0, association=0)
    with pytest.raises(Mode6Error, match="opcode"):
        decode_reply(ERR_UNKNOWNVAR, opcode=1, sequence=0x459F, association=0)


@pytest.mark.parametrize(
    ("code", "name"),
    [(0, "unspec"), (1, "permission"), (2, "badfmt"), (3, "badop"), (4, "badassoc"),
     (5, "unknownvar"), (6, "badvalue"), (7, "adminproh"), (8, "unknown"), (255, "unknown")],
)
def test_error_code_names(code: int, name: str) -> None:
    datagram = struct.pack("!BBHHHHH", 0x16, 0xC0 | 2, 9, code << 8, 0, 0, 0)
    reply = decode_reply(datagram, opcode=2, sequence=9, association=0)
    assert isinstance(reply, ErrorReply)
    assert (reply.code, reply.name) == (code, name)


# --- requests ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(6))
def test_request_data_padded_to_four_octets_not_counted(n: int) -> None:
    data = mode6.encode_request(2, 7, 0, b"a" * n)
    assert len(data) == 12 + n + (-n % 4)
    assert struct.unpack_from("!H", data, 10)[0] == n
    assert data[12 + n:] == bytes(-n % 4)


def test_empty_readvar_asks_for_the_default_list() -> None:
    assert mode6.encode_readvar(1) == H("160200010000000000000000")


def test_request_data_limit() -> None:
    assert len(mode6.encode_request(2, 1, 0, b"x" * 468)) == 480
    with pytest.raises(ValueError, match="468"):
        mode6.encode_request(2, 1, 0, b"x" * 469)
    with pytest.raises(ValueError, match="468"):
        mode6.encode_readvar(1, 0, [f"variable_{i:03d}" for i in range(40)])


@pytest.mark.parametrize(
    ("opcode", "sequence", "association"),
    [(0, 1, 0), (32, 1, 0), (2, -1, 0), (2, 0x10000, 0), (2, 1, -1), (2, 1, 0x10000)],
)
def test_request_fields_out_of_range(opcode: int, sequence: int, association: int) -> None:
    with pytest.raises(ValueError):
        mode6.encode_request(opcode, sequence, association)


@pytest.mark.parametrize("name", ["", "a,b", "a=b", "with space", "caf\u00e9", "tab\t"])
def test_bad_variable_names_refused(name: str) -> None:
    with pytest.raises(ValueError, match="variable name"):
        mode6.encode_readvar(1, 0, ["leap", name])


def test_split_variables_fits_each_request() -> None:
    names = [f"ss_variable_{i}" for i in range(100)]
    chunks = mode6.split_variables(names)
    assert len(chunks) > 1
    assert [n for c in chunks for n in c] == names
    for chunk in chunks:
        assert len(mode6.variable_list(chunk)) <= 468
    # Each chunk is as full as it can be: the next name would not have fitted.
    for chunk, following in itertools.pairwise(chunks):
        assert len(mode6.variable_list([*chunk, following[0]])) > 468
    assert mode6.split_variables(["a", "b", "c"], limit=3) == [["a", "b"], ["c"]]
    assert mode6.split_variables([]) == []
    with pytest.raises(ValueError):
        mode6.split_variables(["x" * 469])


# --- reply checks ------------------------------------------------------------------------


def _reply(*, first: int = 0x16, op: int = 0x82, seq: int = 5, status: int = 0, assoc: int = 0,
           offset: int = 0, data: bytes = b"", count: int | None = None,
           pad: bool = True) -> bytes:
    n = len(data) if count is None else count
    out = struct.pack("!BBHHHHH", first, op, seq, status, assoc, offset, n) + data
    return out + bytes(-len(out) % 4) if pad else out


def _fragment(offset: int, data: bytes, more: bool, *, seq: int = 5, status: int = 0) -> Fragment:
    op = 0x82 | (0x20 if more else 0)
    reply = decode_reply(_reply(op=op, seq=seq, status=status, offset=offset, data=data),
                         opcode=2, sequence=seq, association=0)
    assert isinstance(reply, Fragment)
    return reply


@pytest.mark.parametrize(
    ("datagram", "match"),
    [
        (b"", "shorter"),
        (_reply()[:11], "shorter"),
        (_reply(first=0x06), "version 0"),
        (_reply(first=0x2E), "version 5"),
        (_reply(first=0x13), "mode 3"),
        (_reply(op=0x02), "R bit"),
        (_reply(seq=6), "sequence"),
        (_reply(op=0x81), "opcode"),
        (_reply(assoc=3), "association"),
        (_reply(data=b"abc", pad=False), "multiple of 4"),
        (_reply(data=b"x" * 472, count=469), "count 469"),
        (_reply(data=b"abcd", count=5), "count 5"),
        (_reply(data=b"abcd", count=8), "count 8"),
        (_reply(offset=mode6.MAX_RESPONSE_LEN - 3, data=b"abcd"), "exceeds"),
    ],
)
def test_reply_checks(datagram: bytes, match: str) -> None:
    with pytest.raises(Mode6Error, match=match):
        decode_reply(datagram, opcode=2, sequence=5, association=0)


def test_reply_any_version_one_to_four_and_a_trailing_mac_is_cut() -> None:
    for version in range(1, 5):
        datagram = _reply(first=0xC0 | version << 3 | 6, data=b"ab") + bytes(20)
        reply = decode_reply(datagram, opcode=2, sequence=5, association=0)
        assert isinstance(reply, Fragment)
        assert reply.data == b"ab" and reply.header.leap == 3


# --- reassembly --------------------------------------------------------------------------

PIECES = [(0, b"a" * 468, True), (468, b"b" * 468, True), (936, b"c" * 10, False)]


@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_reassembly_out_of_order(order: tuple[int, ...]) -> None:
    r = Reassembler()
    for i in order:
        assert not r.complete
        with pytest.raises(Mode6Error, match="incomplete"):
            r.response()
        assert r.add(_fragment(*PIECES[i])) is True
    assert r.complete
    assert r.response().data == b"a" * 468 + b"b" * 468 + b"c" * 10


def test_duplicates_are_ignored_and_a_conflicting_one_refused() -> None:
    r = Reassembler()
    first = _fragment(*PIECES[0])
    assert r.add(first) is True
    assert r.add(first) is False
    assert r.fragment_count == 1
    with pytest.raises(Mode6Error, match="different fragment"):
        r.add(_fragment(0, b"z" * 468, True))
    with pytest.raises(Mode6Error, match="different fragment"):
        r.add(_fragment(0, b"a" * 468, True, status=1))
    for piece in PIECES[1:]:
        r.add(_fragment(*piece))
    assert r.add(_fragment(*PIECES[2])) is False
    assert r.response().data.startswith(b"a" * 468)


def test_missing_fragment_leaves_a_gap() -> None:
    r = Reassembler()
    r.add(_fragment(*PIECES[0]))
    r.add(_fragment(*PIECES[2]))
    assert r.last_seen and not r.complete
    assert r.gaps() == [(468, 936)]
    with pytest.raises(Mode6Error, match="incomplete"):
        r.response()
    # Without the last fragment the end is unknown: only holes below what arrived count.
    r2 = Reassembler()
    r2.add(_fragment(*PIECES[1]))
    assert not r2.last_seen and r2.gaps() == [(0, 468)]


def test_overlaps_are_refused_and_leave_the_state_unchanged() -> None:
    r = Reassembler()
    r.add(_fragment(0, b"a" * 100, True))
    for offset, length in [(50, 100), (99, 1)]:
        with pytest.raises(Mode6Error, match="overlaps"):
            r.add(_fragment(offset, b"x" * length, True))
    with pytest.raises(Mode6Error, match="overlaps"):
        r.add(_fragment(50, b"x" * 60, False))
    assert not r.last_seen and r.fragment_count == 1
    r.add(_fragment(100, b"b", False))
    assert r.response().data == b"a" * 100 + b"b"


def test_the_end_is_consistent() -> None:
    r = Reassembler()
    r.add(_fragment(200, b"a" * 100, True))
    with pytest.raises(Mode6Error, match="beyond the last fragment"):
        r.add(_fragment(0, b"b" * 100, False))  # ends at 100, yet data at 200 arrived
    r.add(_fragment(300, b"c", False))
    with pytest.raises(Mode6Error, match="second last fragment"):
        r.add(_fragment(0, b"d", False))
    with pytest.raises(Mode6Error, match="beyond the last fragment"):
        r.add(_fragment(400, b"e", True))
    assert r.gaps() == [(0, 200)]


def test_empty_fragment_rules() -> None:
    r = Reassembler()
    with pytest.raises(Mode6Error, match="empty fragment"):
        r.add(_fragment(0, b"", True))
    # An empty last fragment at 0 is an empty response (no associations, say).
    r.add(_fragment(0, b"", False))
    assert r.complete and r.response().data == b""


def test_fragment_of_another_response_refused() -> None:
    r = Reassembler()
    r.add(_fragment(0, b"a" * 4, True, seq=5))
    with pytest.raises(Mode6Error, match="another response"):
        r.add(_fragment(4, b"b", False, seq=6))


def test_limits_on_hostile_servers() -> None:
    r = Reassembler(max_fragments=3, max_length=1000)
    with pytest.raises(Mode6Error, match="exceeds 1000"):
        r.add(_fragment(600, b"x" * 401, True))
    for i in range(3):
        r.add(_fragment(i * 10, b"y" * 10, True))
    with pytest.raises(Mode6Error, match="more than 3 fragments"):
        r.add(_fragment(30, b"z", False))
    assert r.fragment_count == 3 and not r.complete
    # The default bound: 32 fragments of 468 octets.
    big = Reassembler()
    for i in range(32):
        big.add(_fragment(i * 468, b"q" * 468, i < 31))
    assert big.complete and len(big.response().data) == 32 * 468


# --- status words ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "name"),
    list(enumerate(["reject", "falsetick", "excess", "outlier", "candidate", "backup",
                    "sys.peer", "pps.peer"])),
)
def test_every_selection_code(code: int, name: str) -> None:
    status = mode6.decode_peer_status(0x9000 | code << 8 | 0x24)
    assert (status.selection, status.selection_name) == (code, name)
    assert (status.event_count, status.event_code, status.event_name) == (2, 4, "reachable")
    assert status.configured and status.reachable and not status.broadcast


@pytest.mark.parametrize(
    ("bit", "field"),
    [(0x80, "configured"), (0x40, "auth_enabled"), (0x20, "authentic"), (0x10, "reachable"),
     (0x08, "broadcast")],
)
def test_each_peer_flag(bit: int, field: str) -> None:
    status = mode6.decode_peer_status(bit << 8 | 0x07 << 8)
    flags = ("configured", "auth_enabled", "authentic", "reachable", "broadcast")
    assert {f: getattr(status, f) for f in flags} == {f: f == field for f in flags}
    assert status.selection_name == "pps.peer"


@pytest.mark.parametrize(
    ("source", "name"),
    [*enumerate(["unspec", "pps", "lf_radio", "hf_radio", "uhf_radio", "local", "ntp",
                 "other", "wristwatch", "telephone"]), (10, "unknown"), (63, "unknown")],
)
def test_every_clock_source(source: int, name: str) -> None:
    status = mode6.decode_system_status(0xC000 | source << 8)
    assert (status.leap, status.source, status.source_name) == (3, source, name)
    assert (status.event_count, status.event_name) == (0, "unspecified")


def test_system_status_fields_and_names() -> None:
    s = mode6.decode_system_status(0x06A5)  # leap 0, source 6 ntp, 10 events, last 5
    assert (s.leap, s.source_name, s.event_count, s.event_name) == (0, "ntp", 10, "clock_sync")
    assert mode6.decode_system_status(0x3F0F).source_name == "unknown"
    assert mode6.decode_system_status(0x3F0F).event_name == "stale_leapsecond_values"
    assert mode6.decode_system_status(0x4000).leap == 1
    with pytest.raises(Mode6Error):
        mode6.decode_system_status(0x10000)
    with pytest.raises(Mode6Error):
        mode6.decode_peer_status(-1)


def test_readstat_length_must_be_whole_entries() -> None:
    assert mode6.decode_readstat(b"") == []
    with pytest.raises(Mode6Error, match="multiple of 4"):
        mode6.decode_readstat(b"\x45\x67\x96")


# --- variable text -----------------------------------------------------------------------


def test_variables_quoted_commas_and_line_breaks() -> None:
    text = (b'version="ntpd ntpsec-1.2.2 2023-01-01T00:00:00Z, extra", processor="x86_64",\r\n'
            b'system="Linux/6.1.0", leap=0\r\n\0\0\0')
    assert mode6.parse_variables(text) == {
        "version": "ntpd ntpsec-1.2.2 2023-01-01T00:00:00Z, extra",
        "processor": "x86_64", "system": "Linux/6.1.0", "leap": "0"}


def test_stray_quote_in_an_unquoted_value() -> None:
    # ntpsec 1.2.2 leaks uninitialised octets into the filter lists of an unreachable
    # refclock (seen live: 0x22 0xb9 0xee). A quote there must not swallow what follows.
    text = (b"dispersion=15937.500000, keyid=0,\r\n"
            b"filtdelay= 0.00 0.\"\xb9\xee 0.00 0.00,\r\n"
            b"filtoffset= 0.00 0.\"\xb9\xee 0.00,\r\npmode=4,\r\n"
            b"filtdisp= 0.00 0.\"\xb9\xee 0.00 0\x04 16000.00,\r\n"
            b'flash=0x1200, mode=0, headway=0, srchost="SHM(2)", ntscookies=-1\r\n')
    v = mode6.parse_variables(text)
    assert list(v) == ["dispersion", "keyid", "filtdelay", "filtoffset", "pmode", "filtdisp",
                       "flash", "mode", "headway", "srchost", "ntscookies"]
    assert v["filtdelay"] == '0.00 0." 0.00 0.00'
    assert (v["flash"], v["srchost"], v["ntscookies"]) == ("0x1200", "SHM(2)", "-1")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b"", {}),
        (b'a= "x, y"tail, b=1', {"a": '"x, y"tail', "b": "1"}),
        (b'a="x", b="y, z"', {"a": "x", "b": "y, z"}),
        (b'a=x"y, b=2', {"a": 'x"y', "b": "2"}),
        (b"\r\n\0", {}),
        (b"a=1,,b=2, ,", {"a": "1", "b": "2"}),
        (b"flag, x = 5 ", {"flag": "", "x": "5"}),
        (b"a=1, b=2, a=3", {"a": "3", "b": "2"}),
        (b"=orphan, k=v", {"k": "v"}),
        (b'q="unterminated, still one', {"q": '"unterminated, still one'}),
        (b'e=""', {"e": ""}),
        (b'h="', {"h": '"'}),
        (b"x=a\xffb\x80c\x00d, y=1", {"x": "abcd", "y": "1"}),
        (b"k=v=w", {"k": "v=w"}),
        (b"future_var=0x1f, leap=0", {"future_var": "0x1f", "leap": "0"}),
    ],
)
def test_variable_parsing_edge_cases(text: bytes, expected: dict[str, str]) -> None:
    result = mode6.parse_variables(text)
    assert result == expected
    assert list(result) == list(expected)


# --- typed values ------------------------------------------------------------------------


def test_number_converters() -> None:
    assert mode6.to_int("-20") == -20
    assert mode6.to_int(" 0x1F ") == 31
    assert mode6.to_float("-12.345") == -12.345
    assert mode6.to_float("1e-3") == 0.001
    assert mode6.to_float("7") == 7.0
    assert mode6.ms_to_seconds("1000.000000") == 1.0
    assert mode6.ms_to_seconds("-0.2999") == -0.0002999
    # The double nearest the printed value, as ntpq's reader gets it: x / 1000 is one ulp
    # off for about a quarter of values.
    for printed, seconds in (("0.03", 3e-05), ("6e-05", 6e-08), ("0.009205", 9.205e-06),
                             ("-0.009205", -9.205e-06), ("0x10", 0.016), ("12.5E2", 1.25),
                             ("1e-999999999999999999999999999999999999", 0.0),
                             ("0.0e-9999999999999999999", 0.0), ("+5e+3", 5.0)):
        assert mode6.ms_to_seconds(printed) == seconds, printed
    assert mode6.ppm("-3.217") == -3.217
    assert mode6.log2_seconds("-20") == 2.0 ** -20
    assert mode6.log2_seconds("10") == 1024.0


@pytest.mark.parametrize(
    "value", ["", "abc", "1.2.3", "nan", "inf", "1e999", "0x", "--1", "1" * 41, "0x1g"])
def test_bad_numbers(value: str) -> None:
    with pytest.raises(Mode6Error):
        mode6.to_float(value)
    with pytest.raises(Mode6Error):
        mode6.ms_to_seconds(value)


@pytest.mark.parametrize("value", ["1.5", "", "0x", "1e3", "65", "-65"])
def test_bad_integers_and_poll(value: str) -> None:
    with pytest.raises(Mode6Error):
        mode6.log2_seconds(value)


def test_reach() -> None:
    assert mode6.reach_register("0xff") == 255
    assert (mode6.reach_ratio(0xFF), mode6.reach_last(0xFF)) == (1.0, 1)
    assert (mode6.reach_ratio(0xFE), mode6.reach_last(0xFE)) == (0.875, 0)
    assert mode6.reach_ratio(0) == 0.0
    for bad in ("0x100", "377", "ff", ""):
        with pytest.raises(Mode6Error):
            mode6.reach_register(bad)


ROLLOVER_2036 = 2_085_978_496  # Unix time when NTP era 0 ends


def test_timestamps_against_a_pivot() -> None:
    # 0xeeadf00b is 2026-11-22; the fraction 0x80000000 is half a second.
    assert mode6.ntp_timestamp_to_unix("0xeeadf00b.80000000", 1.8e9) == 1_795_387_787.5
    assert mode6.ntp_timestamp_to_unix("0xEEADF00B", 1.8e9) == 1_795_387_787.0
    # Just after the 2036 rollover the raw seconds are small; read against a pivot near
    # the rollover, on either side, they are in era 1, and before it in era 0.
    pivot_before, pivot_after = ROLLOVER_2036 - 100.0, ROLLOVER_2036 + 100.0
    for pivot in (pivot_before, pivot_after):
        assert mode6.ntp_timestamp_to_unix("0x00000010.00000000", pivot) == ROLLOVER_2036 + 16
        assert mode6.ntp_timestamp_to_unix("0xfffffff0.00000000", pivot) == ROLLOVER_2036 - 16
    assert mode6.ntp_timestamp_to_unix("0x00000000.00000000", 1.8e9) is None
    for bad in ("eeadf00b.26c12116", "0x123456789.0", "0x1.", "0x1.123456789", "1.5", ""):
        with pytest.raises(Mode6Error):
            mode6.ntp_timestamp_to_unix(bad, 1.8e9)
    with pytest.raises(Mode6Error):
        mode6.ntp_timestamp_to_unix("0x1.0", math.nan)


@pytest.mark.parametrize(
    ("value", "unix"),
    [("2026-06-28T00:00Z", 1_782_604_800), ("2026-06-28T00:00:30Z", 1_782_604_830),
     ("2026-06-28", 1_782_604_800), ("202606280000", 1_782_604_800),
     ("2016-12-31T23:59Z", 1_483_228_740)],
)
def test_dates(value: str, unix: int) -> None:
    assert mode6.date_to_unix(value) == unix


@pytest.mark.parametrize(
    "value", ["", "2026-13-01", "2026-02-30", "0000-01-01", "2026-06-28T24:00Z",
              "2026-06-28T00:60Z", "20260628", "June 28"])
def test_bad_dates(value: str) -> None:
    with pytest.raises(Mode6Error):
        mode6.date_to_unix(value)


# --- fuzz --------------------------------------------------------------------------------

_CONVERTERS = (mode6.to_int, mode6.to_float, mode6.ms_to_seconds, mode6.ppm, mode6.log2_seconds,
               mode6.reach_register, mode6.date_to_unix)


@settings(max_examples=1000, deadline=None)
@given(datagram=st.binary(max_size=600), opcode=st.integers(0, 31),
       sequence=st.integers(0, 0xFFFF), association=st.integers(0, 0xFFFF))
def test_fuzz_datagram_decoder_raises_only_mode6error(
    datagram: bytes, opcode: int, sequence: int, association: int
) -> None:
    try:
        reply = decode_reply(datagram, opcode=opcode, sequence=sequence, association=association)
    except Mode6Error:
        return
    assert isinstance(reply, Fragment | ErrorReply)


# Datagrams that pass the first checks (mode 6, R set, our sequence and opcode), so the
# fuzz also reaches the count, padding and reassembly rules.
_plausible = st.builds(
    lambda flags, status, assoc, offset, count, body: struct.pack(
        "!BBHHHHH", 0x16, 0x80 | flags | 2, 7, status, assoc, offset, count) + body,
    st.sampled_from([0, 0x20, 0x40, 0x60]), st.integers(0, 0xFFFF), st.sampled_from([0, 1]),
    st.one_of(st.integers(0, 0xFFFF), st.integers(0, 40)),
    st.one_of(st.integers(0, 0xFFFF), st.integers(0, 40)), st.binary(max_size=60),
)


@settings(max_examples=1000, deadline=None)
@given(datagrams=st.lists(_plausible, max_size=12))
def test_fuzz_plausible_datagrams_through_the_reassembler(datagrams: list[bytes]) -> None:
    r = Reassembler(max_fragments=8, max_length=200)
    for datagram in datagrams:
        try:
            reply = decode_reply(datagram, opcode=2, sequence=7, association=0)
            if isinstance(reply, Fragment):
                r.add(reply)
        except Mode6Error:
            continue
    try:
        response = r.response()
    except Mode6Error:
        assert not r.complete
        return
    assert len(response.data) <= 200 and response.fragments <= 8
    mode6.parse_variables(response.data)


@settings(max_examples=500, deadline=None)
@given(payload=st.binary(max_size=2000), cuts=st.lists(st.integers(1, 1999), max_size=8),
       seed=st.integers(0, 2**32), dups=st.integers(0, 4))
def test_fuzz_any_split_reassembles_exactly(
    payload: bytes, cuts: list[int], seed: int, dups: int
) -> None:
    # Fragments of at most 400 octets (a packet holds 468), plus the drawn cuts.
    bounds = sorted({*range(0, len(payload), 400), len(payload),
                     *(c for c in cuts if c < len(payload))})
    pieces = [
        _fragment(a, payload[a:b], b < len(payload)) for a, b in itertools.pairwise(bounds)
    ] or [_fragment(0, b"", False)]
    rng = random.Random(seed)
    sent = pieces + [rng.choice(pieces) for _ in range(dups)]
    rng.shuffle(sent)
    r = Reassembler()
    assert sum(r.add(p) for p in sent) == len(pieces)
    assert r.response().data == payload


@settings(max_examples=1000, deadline=None)
@given(data=st.binary(max_size=800))
def test_fuzz_variable_parser_and_association_list(data: bytes) -> None:
    variables = mode6.parse_variables(data)  # any text is some variable list
    for name, value in variables.items():
        assert name and name == name.strip() and "=" not in name
        assert all(0 < ord(c) < 127 for c in name + value)
    try:
        assert len(mode6.decode_readstat(data)) == len(data) // 4
    except Mode6Error:
        assert len(data) % 4


_numberish = st.one_of(
    st.text(max_size=50),
    st.from_regex(r"0[xX][0-9a-fA-F.]{0,20}", fullmatch=True),
    st.from_regex(r"[+-]?[0-9.eE+-]{0,30}", fullmatch=True),
    st.from_regex(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(T[0-9]{2}:[0-9]{2}Z)?", fullmatch=True),
)


@settings(max_examples=1000, deadline=None)
@given(text=_numberish, pivot=st.floats(allow_nan=True, allow_infinity=True))
def test_fuzz_converters_raise_only_mode6error(text: str, pivot: float) -> None:
    for convert in _CONVERTERS:
        try:
            value = convert(text)
        except Mode6Error:
            continue
        assert math.isfinite(value)  # nothing NaN or infinite ever reaches a gauge
    try:
        unix = mode6.ntp_timestamp_to_unix(text, pivot)
    except Mode6Error:
        return
    assert unix is None or abs(unix - pivot) <= 2.0**31 + 1
