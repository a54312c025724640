"""Byte-level tests for the NTS extension fields of NTPv4 (RFC 8915 §5.3-§5.7).

The tests play the server with ``cryptography``'s AESSIV directly and build replies with
struct, so the module's own encoder is not used to check itself."""

from __future__ import annotations

import struct

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from hypothesis import given, settings
from hypothesis import strategies as st

from ntp_probe.proto.nts.ef import (
    AEAD_ALGORITHMS,
    EXPORTER_LABEL,
    AEADAlgorithm,
    Direction,
    ExtensionField,
    FieldType,
    NTSAuthFailed,
    NTSNak,
    NTSNoAuthenticator,
    NTSReplyError,
    NTSReplyMalformed,
    NTSUIDMismatch,
    VerifiedReply,
    aead_algorithm,
    build_request_fields,
    encode_field,
    exporter_context,
    is_nak_header,
    verify_reply,
)

C2S = bytes(range(32))
S2C = bytes(range(100, 132))
UID = bytes(range(200, 232))
COOKIE = b"K" * 100
NONCE = bytes.fromhex("00112233445566778899aabbccddeeff")
AUTH_OFFSET = 48 + 36  # in a server_reply(): header, then the 36-byte UID field
# Client request header: LI=0 VN=4 mode=3, all zero but the transmit timestamp.
REQUEST_HEADER = bytes([0x23]) + bytes(39) + bytes.fromhex("e9f0a1b2c3d4e5f6")


def ef(ftype: int, value: bytes) -> bytes:
    value += b"\0" * (-len(value) % 4)
    return struct.pack("!HH", ftype, 4 + len(value)) + value


def reply_header(*, li: int = 0, stratum: int = 2, refid: bytes = b"\x7f\x7f\x01\x01") -> bytes:
    first = (li << 6) | (4 << 3) | 4
    return (struct.pack("!BBbbII4s", first, stratum, 0, -20, 0, 0, refid)
            + bytes(8) + REQUEST_HEADER[40:48] + bytes(16))


def authenticator(key: bytes, nonce: bytes, plaintext: bytes, ad: bytes) -> bytes:
    ct = AESSIV(key).encrypt(plaintext, [ad, nonce])
    body = struct.pack("!HH", len(nonce), len(ct)) + nonce + b"\0" * (-len(nonce) % 4)
    return ef(0x0404, body + ct + b"\0" * (-len(ct) % 4))


def server_reply(
    *,
    uid: bytes = UID,
    cookies: tuple[bytes, ...] = (b"N" * 100,),
    key: bytes = S2C,
    header: bytes | None = None,
    extra_inner: bytes = b"",
) -> bytes:
    """What a server sends: header, echoed UID, authenticator with the new cookies inside."""
    head = (reply_header() if header is None else header) + ef(0x0104, uid)
    plaintext = b"".join(ef(0x0204, c) for c in cookies) + extra_inner
    return head + authenticator(key, bytes(range(16)), plaintext, head)


def nak(uid: bytes = UID) -> bytes:
    """chrony's 84-byte NAK: LI=3 VN=4 mode=4 stratum 0 refid NTSN, the UID echoed."""
    header = bytes.fromhex("e40000e7" "00000000" "00000000") + b"NTSN" + bytes(32)
    return header + ef(0x0104, uid)


# --- AEAD table, exporter, RFC 5297 ---------------------------------------------------


def test_exporter_label_and_contexts():
    assert EXPORTER_LABEL == b"EXPORTER-network-time-security"
    assert exporter_context(15, Direction.C2S) == bytes.fromhex("0000000f00")
    assert exporter_context(15, Direction.S2C) == bytes.fromhex("0000000f01")
    assert exporter_context(30, Direction.S2C) == bytes.fromhex("0000001e01")


def test_aead_table():
    assert {a: (v.name, v.key_length) for a, v in AEAD_ALGORITHMS.items()} == {
        15: ("AEAD_AES_SIV_CMAC_256", 32),
        16: ("AEAD_AES_SIV_CMAC_384", 48),
        17: ("AEAD_AES_SIV_CMAC_512", 64),
    }
    assert aead_algorithm(15).nonce_length == 16
    assert aead_algorithm(15).required_nonce_space == 16
    with pytest.raises(ValueError, match="unsupported AEAD algorithm 30"):
        aead_algorithm(30)


def test_required_nonce_space_follows_the_maximum_nonce_length():
    # A GCM-SIV-like entry (nonce of exactly 12) needs no additional padding after 12 bytes.
    siv = aead_algorithm(15)
    gcm_like = AEADAlgorithm(30, "x", 16, 12, 12, 12, siv.encrypt, siv.decrypt)
    assert gcm_like.required_nonce_space == 12
    odd = AEADAlgorithm(99, "y", 16, 10, 10, 10, siv.encrypt, siv.decrypt)
    assert odd.required_nonce_space == 12  # rounded up to a multiple of 4


def test_rfc5297_a1_deterministic_vector():
    key = bytes.fromhex("fffefdfcfbfaf9f8f7f6f5f4f3f2f1f0f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    ad = bytes.fromhex("101112131415161718191a1b1c1d1e1f2021222324252627")
    plaintext = bytes.fromhex("112233445566778899aabbccddee")
    expected = bytes.fromhex("85632d07c6e8f37f950acd320a2ecc93" "40c02b9690c4dc04daef7f6afe5c")
    assert AESSIV(key).encrypt(plaintext, [ad]) == expected


def test_rfc5297_a2_nonce_based_vector_nonce_is_last_ad_component():
    key = bytes.fromhex("7f7e7d7c7b7a79787776757473727170404142434445464748494a4b4c4d4e4f")
    ad1 = bytes.fromhex(
        "00112233445566778899aabbccddeeffdeaddadadeaddadaffeeddccbbaa99887766554433221100"
    )
    ad2 = bytes.fromhex("102030405060708090a0")
    nonce = bytes.fromhex("09f911029d74e35bd84156c5635688c0")
    plaintext = b"this is some plaintext to encrypt using SIV-AES"
    expected = bytes.fromhex(
        "7bdb6e3b432667eb06f4d14bff2fbd0fcb900f2fddbe404326601965c889bf17"
        "dba77ceb094fa663b7a3f748ba8af829ea64ad544a272e9c485b62a3fd5c0d"
    )
    assert AESSIV(key).encrypt(plaintext, [ad1, ad2, nonce]) == expected
    # The table's encrypt(key, nonce, plaintext, ad) is AESSIV over [ad, nonce].
    siv = aead_algorithm(15)
    assert siv.encrypt(key, nonce, plaintext, ad2) == AESSIV(key).encrypt(plaintext, [ad2, nonce])
    assert siv.decrypt(key, nonce, siv.encrypt(key, nonce, b"", ad1), ad1) == b""


def test_empty_plaintext_gives_a_bare_16_byte_tag():
    # An NTS request encrypts nothing; cryptography < 45.0.7 fails here.
    assert len(AESSIV(C2S).encrypt(b"", [b"ad", NONCE])) == 16


# --- encoding -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (b"", bytes.fromhex("0104 0010") + bytes(12)),
        (b"abcde", bytes.fromhex("0104 0010") + b"abcde" + bytes(7)),
        (b"x" * 13, bytes.fromhex("0104 0014") + b"x" * 13 + bytes(3)),
        (b"u" * 32, bytes.fromhex("0104 0024") + b"u" * 32),
    ],
)
def test_encode_field_pads_to_four_and_sixteen(value, encoded):
    assert encode_field(0x0104, value) == encoded


def test_encode_field_rejects_oversized_value():
    with pytest.raises(ValueError, match="too long"):
        encode_field(0x0204, bytes(65532))


def test_request_fields_layout():
    fields = build_request_fields(REQUEST_HEADER, UID, COOKIE, C2S, placeholders=2, nonce=NONCE)
    uid_ef = bytes.fromhex("01040024") + UID
    cookie_ef = bytes.fromhex("02040068") + COOKIE
    placeholder = bytes.fromhex("03040068") + bytes(100)
    before = uid_ef + cookie_ef + placeholder * 2
    assert fields[: len(before)] == before
    auth = fields[len(before) :]
    tag = AESSIV(C2S).encrypt(b"", [REQUEST_HEADER + before, NONCE])
    assert auth == bytes.fromhex("04040028" "0010" "0010") + NONCE + tag
    # The server side: the authenticator verifies over header + preceding fields.
    assert AESSIV(C2S).decrypt(auth[24:40], [REQUEST_HEADER + before, auth[8:24]]) == b""


@pytest.mark.parametrize(("placeholders", "size"), [(0, 228), (3, 540), (7, 956)])
def test_request_sizes_match_chrony_observations(placeholders, size):
    fields = build_request_fields(REQUEST_HEADER, UID, COOKIE, C2S, placeholders=placeholders)
    assert len(REQUEST_HEADER + fields) == size


def test_placeholder_matches_padded_cookie_field_length():
    fields = build_request_fields(REQUEST_HEADER, UID, b"c" * 101, C2S, placeholders=1)
    cookie_type, cookie_len = struct.unpack_from("!HH", fields, 36)
    holder_type, holder_len = struct.unpack_from("!HH", fields, 36 + cookie_len)
    assert (cookie_type, cookie_len, holder_type, holder_len) == (0x0204, 108, 0x0304, 108)
    assert fields[36 + cookie_len + 4 : 36 + 2 * cookie_len] == bytes(104)


def test_nonce_is_drawn_fresh_when_not_given():
    a = build_request_fields(REQUEST_HEADER, UID, COOKIE, C2S)
    b = build_request_fields(REQUEST_HEADER, UID, COOKIE, C2S)
    auth_a, auth_b = a[140:], b[140:]
    assert struct.unpack_from("!HH", auth_a, 4) == (16, 16)
    assert auth_a[8:24] != auth_b[8:24]
    assert a[:140] == b[:140]


def test_short_nonce_gets_additional_padding_to_sixteen():
    fields = build_request_fields(REQUEST_HEADER, UID, COOKIE, C2S, nonce=b"n" * 5)
    auth = fields[140:]
    # 4 header + 4 lengths + nonce 5 padded to 8 + 8 more padding + tag 16.
    assert struct.unpack_from("!HHHH", auth) == (0x0404, 40, 5, 16)
    assert auth[8:16] == b"n" * 5 + bytes(3)
    tag = auth[16:32]
    assert auth[32:] == bytes(8)
    assert tag == AESSIV(C2S).encrypt(b"", [REQUEST_HEADER + fields[:140], b"n" * 5])


def test_larger_siv_keys_are_table_driven():
    key = bytes(64)
    fields = build_request_fields(REQUEST_HEADER, UID, COOKIE, key, aead_id=17, nonce=NONCE)
    tag = fields[-16:]
    assert tag == AESSIV(key).encrypt(b"", [REQUEST_HEADER + fields[:140], NONCE])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"header": bytes(47)}, "48 bytes"),
        ({"uid": bytes(31)}, "at least 32"),
        ({"cookie": b""}, "cookie is empty"),
        ({"placeholders": 8}, "0..7"),
        ({"placeholders": -1}, "0..7"),
        ({"c2s_key": bytes(16)}, "32-byte key"),
        ({"nonce": b""}, "0-byte nonce"),
        ({"aead_id": 30}, "unsupported"),
    ],
)
def test_request_rejects_bad_arguments(kwargs, message):
    args = {"header": REQUEST_HEADER, "uid": UID, "cookie": COOKIE, "c2s_key": C2S} | kwargs
    with pytest.raises(ValueError, match=message):
        build_request_fields(**args)


# --- verifying replies ----------------------------------------------------------------


def test_round_trip_with_the_test_as_server():
    fields = build_request_fields(REQUEST_HEADER, UID, COOKIE, C2S, placeholders=3)
    request = REQUEST_HEADER + fields
    # Server: find the authenticator, check it with the C2S key, answer with 4 cookies.
    offset = 48
    while struct.unpack_from("!H", request, offset)[0] != 0x0404:
        offset += struct.unpack_from("!H", request, offset + 2)[0]
    nl, cl = struct.unpack_from("!HH", request, offset + 4)
    nonce = request[offset + 8 : offset + 8 + nl]
    ct = request[offset + 8 + nl : offset + 8 + nl + cl]
    assert AESSIV(C2S).decrypt(ct, [request[:offset], nonce]) == b""
    assert request[52:84] == UID
    new = tuple(bytes([i]) * 100 for i in range(4))
    reply = server_reply(cookies=new)
    result = verify_reply(reply, UID, S2C)
    assert result == VerifiedReply(
        cookies=new,
        encrypted_fields=tuple(ExtensionField(0x0204, c) for c in new),
    )


def test_unauthenticated_fields_after_the_authenticator_are_ignored():
    reply = server_reply() + ef(0x0204, b"F" * 100) + ef(0x7777, b"")
    result = verify_reply(reply, UID, S2C)
    assert result.cookies == (b"N" * 100,)
    assert result.unauthenticated_field_types == (0x0204, 0x7777)


def test_other_encrypted_fields_are_returned():
    reply = server_reply(extra_inner=ef(0x5555, b"hello"))
    result = verify_reply(reply, UID, S2C)
    assert result.encrypted_fields[-1] == ExtensionField(0x5555, b"hello" + bytes(3))


def test_reply_with_no_new_cookie_verifies_with_an_empty_tuple():
    assert verify_reply(server_reply(cookies=()), UID, S2C).cookies == ()


def test_every_single_byte_change_is_rejected():
    reply = server_reply(cookies=(b"N" * 100, b"M" * 100))
    for i in range(len(reply)):
        tampered = bytearray(reply)
        tampered[i] ^= 0x01
        with pytest.raises(NTSReplyError):
            verify_reply(bytes(tampered), UID, S2C)


def test_tampered_associated_data_fails_authentication():
    reply = bytearray(server_reply())
    reply[2] ^= 0xFF  # poll, in the header
    with pytest.raises(NTSAuthFailed) as info:
        verify_reply(bytes(reply), UID, S2C)
    assert info.value.reason == "nts_auth_failed"


def test_tampered_ciphertext_and_tag_fail_authentication():
    for where in (AUTH_OFFSET + 8 + 16, len(server_reply()) - 1):  # SIV tag, last byte
        reply = bytearray(server_reply())
        reply[where] ^= 0x80
        with pytest.raises(NTSAuthFailed):
            verify_reply(bytes(reply), UID, S2C)


def test_tampered_nonce_fails_authentication():
    reply = bytearray(server_reply())
    reply[AUTH_OFFSET + 8] ^= 0x01
    with pytest.raises(NTSAuthFailed):
        verify_reply(bytes(reply), UID, S2C)


def test_wrong_key_fails_authentication():
    with pytest.raises(NTSAuthFailed):
        verify_reply(server_reply(key=bytes(32)), UID, S2C)


def test_uid_mismatch():
    with pytest.raises(NTSUIDMismatch) as info:
        verify_reply(server_reply(uid=bytes(32)), UID, S2C)
    assert (info.value.reason, info.value.nak) == ("nts_uid_mismatch", False)


def test_missing_uid_is_a_mismatch():
    head = reply_header()
    reply = head + authenticator(S2C, NONCE, ef(0x0204, b"c" * 100), head)
    with pytest.raises(NTSUIDMismatch):
        verify_reply(reply, UID, S2C)


def test_a_reply_without_any_nts_field_is_unauthenticated_not_foreign():
    # The caller has matched its origin: our request's answer, stripped of NTS.
    with pytest.raises(NTSNoAuthenticator, match="no NTS fields"):
        verify_reply(reply_header(), UID, S2C)


def test_uid_only_after_the_authenticator_is_not_authenticated():
    head = reply_header()
    reply = head + authenticator(S2C, NONCE, b"", head) + ef(0x0104, UID)
    with pytest.raises(NTSUIDMismatch):
        verify_reply(reply, UID, S2C)


def test_two_uid_fields_are_malformed():
    head = reply_header() + ef(0x0104, UID) + ef(0x0104, UID)
    with pytest.raises(NTSReplyMalformed, match="2 unique identifier"):
        verify_reply(head + authenticator(S2C, NONCE, b"", head), UID, S2C)


def test_no_authenticator():
    with pytest.raises(NTSNoAuthenticator) as info:
        verify_reply(reply_header() + ef(0x0104, UID), UID, S2C)
    assert info.value.reason == "nts_auth_failed"


def test_two_authenticators_are_malformed():
    reply = server_reply()
    second = authenticator(S2C, NONCE, b"", reply)
    with pytest.raises(NTSReplyMalformed, match="2 NTS authenticator"):
        verify_reply(reply + second, UID, S2C)


@pytest.mark.parametrize(
    ("auth_value", "error"),
    [
        (b"\x00\x10", NTSReplyMalformed),  # shorter than its length fields
        (struct.pack("!HH", 16, 16) + bytes(28), NTSReplyMalformed),  # 32 bytes do not fit
        (struct.pack("!HH", 0, 16) + bytes(16), NTSReplyMalformed),  # empty nonce
        (struct.pack("!HH", 16, 4) + bytes(20), NTSAuthFailed),  # ciphertext shorter than tag
        (struct.pack("!HH", 16, 16) + bytes(32), NTSAuthFailed),  # zero tag
    ],
)
def test_bad_authenticator_bodies(auth_value, error):
    head = reply_header() + ef(0x0104, UID)
    with pytest.raises(error):
        verify_reply(head + ef(0x0404, auth_value), UID, S2C)


def test_authenticator_with_extra_padding_still_verifies():
    head = reply_header() + ef(0x0104, UID)
    nonce = bytes(range(16))
    ct = AESSIV(S2C).encrypt(ef(0x0204, b"c" * 100), [head, nonce])
    body = struct.pack("!HH", 16, len(ct)) + nonce + ct + bytes(12)
    assert verify_reply(head + ef(0x0404, body), UID, S2C).cookies == (b"c" * 100,)


@pytest.mark.parametrize(
    "tail",
    [
        b"\x01\x04",  # two stray bytes
        struct.pack("!HH", 0x0104, 0),  # length below its own header
        struct.pack("!HH", 0x0104, 18) + bytes(14),  # length not a multiple of 4
        struct.pack("!HH", 0x0104, 64) + bytes(20),  # runs past the end
    ],
)
def test_broken_field_framing_is_malformed(tail):
    with pytest.raises(NTSReplyMalformed):
        verify_reply(reply_header() + tail, UID, S2C)


def test_short_packet_is_malformed():
    with pytest.raises(NTSReplyMalformed, match="no full NTP header"):
        verify_reply(reply_header()[:47], UID, S2C)


def test_authenticated_plaintext_that_is_not_fields_is_malformed():
    head = reply_header() + ef(0x0104, UID)
    with pytest.raises(NTSReplyMalformed):
        verify_reply(head + authenticator(S2C, NONCE, b"\x02\x04\x00", head), UID, S2C)


def test_verify_rejects_caller_errors():
    with pytest.raises(ValueError, match="32-byte key"):
        verify_reply(server_reply(), UID, S2C[:16])
    with pytest.raises(ValueError, match="at least 32"):
        verify_reply(server_reply(), UID[:16], S2C)
    with pytest.raises(ValueError, match="unsupported"):
        verify_reply(server_reply(), UID, S2C, aead_id=30)


# --- NTS NAK --------------------------------------------------------------------------


def test_nak_with_our_uid():
    packet = nak()
    assert len(packet) == 84
    assert is_nak_header(packet)
    with pytest.raises(NTSNak) as info:
        verify_reply(packet, UID, S2C)
    assert info.value.reason == "nts_nak"


def test_nak_with_another_uid_is_ignored_as_a_mismatch():
    with pytest.raises(NTSUIDMismatch) as info:
        verify_reply(nak(uid=bytes(32)), UID, S2C)
    assert info.value.nak is True


def test_nak_without_uid_is_a_mismatch():
    with pytest.raises(NTSUIDMismatch) as info:
        verify_reply(nak()[:48], UID, S2C)
    assert info.value.nak is True


@pytest.mark.parametrize(
    ("stratum", "refid", "expected"),
    [(0, b"NTSN", True), (0, b"RATE", False), (1, b"NTSN", False), (0, b"ntsn", False)],
)
def test_is_nak_header(stratum, refid, expected):
    assert is_nak_header(reply_header(li=3, stratum=stratum, refid=refid)) is expected


def test_other_kiss_codes_are_not_naks():
    packet = reply_header(li=3, stratum=0, refid=b"RATE") + ef(0x0104, UID)
    with pytest.raises(NTSNoAuthenticator):
        verify_reply(packet, UID, S2C)


def test_field_type_values():
    assert [int(t) for t in FieldType] == [0x0104, 0x0204, 0x0304, 0x0404]


# --- fuzz -----------------------------------------------------------------------------


@settings(max_examples=400)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_reply_errors(data):
    with pytest.raises(NTSReplyError):
        verify_reply(data, UID, S2C)


@settings(max_examples=400)
@given(st.binary(max_size=300), st.booleans())
def test_arbitrary_fields_after_our_uid_raise_only_reply_errors(tail, as_nak):
    header = nak()[:48] if as_nak else reply_header()
    with pytest.raises(NTSReplyError):
        verify_reply(header + ef(0x0104, UID) + tail, UID, S2C)


@settings(max_examples=200)
@given(st.binary(max_size=120))
def test_arbitrary_authenticator_values_raise_only_reply_errors(value):
    head = reply_header() + ef(0x0104, UID)
    with pytest.raises(NTSReplyError):
        verify_reply(head + ef(0x0404, value), UID, S2C)
