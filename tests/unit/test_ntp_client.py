"""proto.ntp.client: the reply rules as a state machine, driven with bytes alone."""

from __future__ import annotations

import struct

import pytest

from ntp_probe.proto.ntp import client as rules
from ntp_probe.proto.ntp import packet as ntp

SERVER = ("192.0.2.1", 123)
NONCE = 0x0123456789ABCDEF
TRANSMIT = 0xE6A1B2C3D4E5F607


def reply(origin: int = NONCE, *, mode: int = 4, transmit: int = TRANSMIT, stratum: int = 2,
          refid: bytes = b"\x7f\x00\x00\x01", leap: int = 0,
          receive: int = TRANSMIT - 100, version: int = 4) -> bytes:
    """A server reply built field by field (independently of the codec's encoder)."""
    first = (leap << 6) | (version << 3) | mode
    return struct.pack("!BBbbII4sQQQQ", first, stratum, 6, -20, 0, 0, refid, 0, origin,
                       receive, transmit)


def test_request_is_a_minimal_mode_3_packet_carrying_the_nonce() -> None:
    c = rules.Client(SERVER, version=3)
    data = c.request(NONCE)
    assert len(data) == 48
    assert data[0] == (3 << 3) | 3
    assert data[1:40] == bytes(39)
    assert struct.unpack("!Q", data[40:48])[0] == NONCE
    assert c.pending == NONCE


def test_the_reply_to_the_pending_request_is_accepted_once() -> None:
    c = rules.Client(SERVER)
    c.request(NONCE)
    outcome = c.receive(reply(), SERVER)
    assert isinstance(outcome, rules.Accepted)
    assert outcome.packet.origin_ts == NONCE and outcome.packet.transmit_ts == TRANSMIT
    assert c.pending is None
    again = c.receive(reply(), SERVER)
    assert again == rules.Discarded("duplicate of an answered request")


@pytest.mark.parametrize(("source", "why", "foreign"), [
    (("192.0.2.2", 123), "from 192.0.2.2:123, not the target", True),
    (("192.0.2.1", 1123), "from 192.0.2.1:1123, not the target's port", False),
])
def test_replies_from_elsewhere_are_discarded(source: tuple[str, int], why: str,
                                              foreign: bool) -> None:
    # Another host's datagram says nothing about the server (anyone may send one): it is
    # marked foreign, and does not count against it.
    c = rules.Client(SERVER)
    c.request(NONCE)
    outcome = c.receive(reply(), source)
    assert outcome == rules.Discarded(why)
    assert isinstance(outcome, rules.Discarded) and outcome.foreign is foreign
    assert c.pending == NONCE  # still waiting for the genuine reply
    assert isinstance(c.receive(reply(), SERVER), rules.Accepted)


@pytest.mark.parametrize(("trailer", "why"), [
    (bytes(4), "carries a crypto-NAK, to a request without one"),
    (b"\x00\x00\x00\x01" + bytes(16), "carries a 20-byte MAC, to a request without one"),
    (b"\x00\x00\x00\x01" + bytes(20), "carries a 24-byte MAC, to a request without one"),
])
def test_a_reply_with_a_mac_to_a_request_without_one_is_discarded(trailer: bytes,
                                                                   why: str) -> None:
    # RFC 5905's receive(): a crypto-NAK, or a MAC under a key the client does not have,
    # is not time to use (chronyd's client drops both); the genuine reply may still come.
    c = rules.Client(SERVER)
    c.request(NONCE)
    assert c.receive(reply() + trailer, SERVER) == rules.Discarded(why)
    assert c.pending == NONCE
    assert isinstance(c.receive(reply(), SERVER), rules.Accepted)


def test_ipv6_sources_compare_on_address_and_port_only() -> None:
    c = rules.Client(("2001:db8::1", 123))
    c.request(NONCE)
    assert isinstance(c.receive(reply(), ("2001:db8::1", 123, 0, 0)), rules.Accepted)


def test_a_link_local_server_answers_without_its_zone_in_the_source() -> None:
    c = rules.Client(("fe80::1%2", 123))
    c.request(NONCE)
    assert c.receive(reply(), ("fe80::1", 123, 0, 3)) == rules.Discarded(
        "from [fe80::1%3]:123, not the target")  # the same address on another link
    assert c.receive(reply(), ("2001:db8::9", 123, 0, 0)) == rules.Discarded(
        "from [2001:db8::9]:123, not the target")
    assert isinstance(c.receive(reply(), ("fe80::1", 123, 0, 2)), rules.Accepted)


def test_malformed_wrong_mode_and_zero_timestamps_are_discarded_with_reasons() -> None:
    c = rules.Client(SERVER)
    c.request(NONCE)
    short = c.receive(reply()[:47], SERVER)
    assert isinstance(short, rules.Discarded) and short.reason.startswith("malformed (")
    assert c.receive(reply(mode=3), SERVER) == rules.Discarded("mode 3, expected 4 (server)")
    assert c.receive(reply(transmit=0), SERVER) == rules.Discarded("transmit timestamp is zero")
    assert c.receive(reply(receive=0), SERVER) == rules.Discarded("receive timestamp is zero")
    for version in (5, 6, 7):
        assert c.receive(reply(version=version), SERVER) == rules.Discarded(
            f"version {version}, newer than NTPv4")
    assert c.pending == NONCE
    assert isinstance(c.receive(reply(version=3), SERVER), rules.Accepted)


def test_a_reply_with_a_foreign_origin_is_discarded() -> None:
    c = rules.Client(SERVER)
    c.request(NONCE)
    assert c.receive(reply(origin=NONCE + 1), SERVER) == rules.Discarded(
        f"origin {NONCE + 1:016x} matches no request")


def test_a_reply_after_its_wait_expired_is_late_not_invalid() -> None:
    c = rules.Client(SERVER)
    c.request(NONCE)
    c.expire()
    c.request(NONCE + 1)
    assert c.receive(reply(), SERVER) == rules.Late(NONCE)
    assert c.pending == NONCE + 1
    assert isinstance(c.receive(reply(origin=NONCE + 1), SERVER), rules.Accepted)


def test_a_late_kiss_o_death_is_still_honoured_but_not_under_nts() -> None:
    deny = reply(stratum=0, refid=b"DENY", leap=3)
    c = rules.Client(SERVER)
    c.request(NONCE)
    c.expire()
    c.request(NONCE + 1)
    late = c.receive(deny, SERVER)
    assert isinstance(late, rules.LateKoD) and late.packet.kiss_code == "DENY"
    assert c.pending == NONCE + 1  # the request waiting still waits
    assert c.receive(deny, SERVER) == rules.Discarded("duplicate of an answered request")
    # With an authentication hook (NTS), a late, unauthenticated KoD is only late.
    nts = rules.Client(SERVER)
    nts.request(NONCE)
    nts.expire()
    nts.request(NONCE + 1)
    assert nts.receive(deny, SERVER, lambda data: None) == rules.Late(NONCE)


def test_a_new_request_expires_the_previous_one() -> None:
    c = rules.Client(SERVER)
    c.request(NONCE)
    c.request(NONCE + 1)
    assert c.receive(reply(), SERVER) == rules.Late(NONCE)


def test_a_cancelled_request_matches_nothing() -> None:
    c = rules.Client(SERVER)
    c.request(NONCE)
    c.cancel()
    assert c.pending is None
    assert isinstance(c.receive(reply(), SERVER), rules.Discarded)


def test_a_kiss_of_death_needs_no_transmit_timestamp() -> None:
    c = rules.Client(SERVER)
    c.request(NONCE)
    outcome = c.receive(reply(stratum=0, refid=b"RATE", transmit=0), SERVER)
    assert isinstance(outcome, rules.Accepted)
    assert outcome.packet.kiss_code == "RATE"


def test_authentication_judges_only_the_reply_to_the_pending_request() -> None:
    judged: list[bytes] = []
    verdict: list[rules.Discarded | None] = [rules.Discarded("bad authenticator", "auth")]

    def authenticate(data: bytes) -> rules.Discarded | None:
        judged.append(data)
        return verdict[0]

    c = rules.Client(SERVER)
    c.request(NONCE)
    # What the NTP rules already refuse never reaches the authentication.
    for data, source in ((reply(), ("192.0.2.9", 123)), (reply(mode=2), SERVER),
                         (reply(origin=NONCE + 1), SERVER), (reply(transmit=0), SERVER)):
        assert isinstance(c.receive(data, source, authenticate), rules.Discarded)
    assert judged == []
    # A forgery it refuses leaves the request outstanding for the genuine reply.
    forged = reply(stratum=1)
    assert c.receive(forged, SERVER, authenticate) == rules.Discarded("bad authenticator")
    assert judged == [forged] and c.pending == NONCE
    verdict[0] = None
    outcome = c.receive(reply(), SERVER, authenticate)
    assert isinstance(outcome, rules.Accepted) and outcome.packet.stratum == 2
    assert c.pending is None
    # Answered: a copy is a duplicate, judged by the rules before any authentication.
    assert c.receive(reply(), SERVER, authenticate) == rules.Discarded(
        "duplicate of an answered request")
    assert len(judged) == 2


def test_nonces_are_random_and_never_zero() -> None:
    nonces = {rules.new_nonce() for _ in range(64)}
    assert len(nonces) == 64 and 0 not in nonces
    assert all(0 < n < 2**64 for n in nonces)


def test_the_codec_and_the_rules_agree_on_the_request() -> None:
    assert rules.Client(SERVER).request(NONCE) == ntp.encode_request(NONCE, 4)
