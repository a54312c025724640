"""Fuzzing: codec properties that tests/unit/test_packet.py lacks, and real probes against a
fake server that answers every request with a storm of mutated replies.

The fuzz's one safety property: no reply that fails the packet checks (source address and
port, mode 4, origin == the outstanding request's nonce, non-zero receive and transmit
timestamps) is ever used. Every bogus reply here carries server timestamps shifted by hours,
so using one would show as an offset hours away from the genuine server's. A mutation that
keeps the origin and every other check but changes T2/T3 is indistinguishable from a genuine
reply, so such "valid but different" replies are only ever sent from another source port or
with a wrong origin. Mutations that keep the origin and the genuine timestamps but change
header fields (leap, version, stratum, root delay, ...) may be used: they must then fail or
pass the sanity checks, never change the offset.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ntp_probe.config.schema import Module, NTPSettings
from ntp_probe.engine.context import ProbeLog
from ntp_probe.engine.result import Measurement, Reason
from ntp_probe.engine.runner import run_probe
from ntp_probe.engine.targets import parse_target
from ntp_probe.exposition.render import render
from ntp_probe.proto.ntp import packet as ntp
from ntp_probe.proto.ntp.sample import Sample
from tests.behaviour import fake_server
from tests.behaviour.fake_server import FakeNTPServer, Request, Send, reply_packet
from tests.conftest import ntp_samples, value

# The fixture, made visible to pytest in this module.
fake_ntp = fake_server.fake_ntp

NS = 1_000_000_000
UNIX_ROLLOVER_2036 = 2_085_978_496  # 2036-02-07T06:28:16Z: NTP era 0 ends
UNIX_ROLLOVER_2106 = UNIX_ROLLOVER_2036 + (1 << 32)  # 2106-02-07: era 1 ends
HALF_ERA_NS = ((1 << 31) - 1) * NS  # just under 68 years: the codec's stated exact range

# --- codec properties -------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(nonce=st.integers(0, (1 << 64) - 1), version=st.integers(1, 4))
def test_encode_request_decode_round_trip_all_versions(nonce: int, version: int) -> None:
    data = ntp.encode_request(nonce, version)
    # Independently of the decoder: LI 0, the version, mode 3; only the nonce after it.
    assert data[0] == (version << 3) | 3
    assert data[1:40] == bytes(39)
    assert struct.unpack("!Q", data[40:48])[0] == nonce
    assert ntp.decode(data) == ntp.Packet(
        leap=0, version=version, mode=ntp.Mode.CLIENT, stratum=0, poll=0, precision=0,
        root_delay=0, root_dispersion=0, refid=bytes(4), reference_ts=0, origin_ts=0,
        receive_ts=0, transmit_ts=nonce,
    )
    assert ntp.encode_packet(ntp.decode(data)) == data


def _near(unix_s: int, spread_ns: int) -> st.SearchStrategy[int]:
    return st.integers(unix_s * NS - spread_ns, unix_s * NS + spread_ns)


# Instants anywhere in 1900..2200, plus dense coverage of both rollovers (2036 and 2106).
_instants = st.one_of(
    st.integers(-ntp.NTP_UNIX_DELTA * NS, 7_258_118_400 * NS),
    _near(UNIX_ROLLOVER_2036, 10 * NS),
    _near(UNIX_ROLLOVER_2106, 10 * NS),
    _near(UNIX_ROLLOVER_2036, 400 * 86400 * NS),
    _near(UNIX_ROLLOVER_2106, 400 * 86400 * NS),
)
# Pivot shifts anywhere within 68 years; small ones, and ones that put the pivot on the
# other side of a nearby rollover, are drawn often.
_shifts = st.one_of(
    st.integers(-HALF_ERA_NS, HALF_ERA_NS),
    st.integers(-10 * NS, 10 * NS),
    st.sampled_from([HALF_ERA_NS, -HALF_ERA_NS, 0, 1, -1]),
)


@settings(max_examples=500, deadline=None)
@given(unix_ns=_instants, shift=_shifts)
def test_timestamp_round_trip_is_exact_across_eras(unix_ns: int, shift: int) -> None:
    # 2**-32 s is finer than 1 ns: Unix ns -> NTP -> Unix ns is exact for every pivot
    # within 68 years, whichever era the instant and the pivot are in.
    assert ntp.ts_to_unix_ns(ntp.ts_from_unix_ns(unix_ns), unix_ns + shift) == unix_ns


@settings(max_examples=300, deadline=None)
@given(
    rollover=st.sampled_from([UNIX_ROLLOVER_2036, UNIX_ROLLOVER_2106]),
    before=st.integers(1, 30 * 365 * 86400 * NS),
    after=st.integers(0, 30 * 365 * 86400 * NS),
)
def test_instants_either_side_of_a_rollover_stay_ordered(
    rollover: int, before: int, after: int
) -> None:
    # One era apart in raw form (the later one wrapped to a small number), yet read
    # against either instant as pivot both come back exactly, and their difference is exact.
    a_ns, b_ns = rollover * NS - before, rollover * NS + after
    a, b = ntp.ts_from_unix_ns(a_ns), ntp.ts_from_unix_ns(b_ns)
    assert b < a  # the later instant really wrapped
    for pivot in (a_ns, b_ns):
        assert ntp.ts_to_unix_ns(a, pivot) == a_ns
        assert ntp.ts_to_unix_ns(b, pivot) == b_ns
    assert abs(ntp.ts_diff_ns(b, a) - (b_ns - a_ns)) <= 1


@settings(max_examples=300, deadline=None)
@given(ts=st.integers(0, (1 << 64) - 1), pivot=_instants)
def test_any_raw_timestamp_reads_within_half_an_era_of_the_pivot(ts: int, pivot: int) -> None:
    unix_ns = ntp.ts_to_unix_ns(ts, pivot)
    assert abs(unix_ns - pivot) <= (1 << 31) * NS
    # ... and it is the same instant: back to NTP it is off by under 2 ns of fraction.
    assert abs(ntp.ts_diff(ntp.ts_from_unix_ns(unix_ns), ts)) <= 8


@settings(max_examples=300, deadline=None)
@given(
    t1_ns=st.one_of(_near(UNIX_ROLLOVER_2036, 5 * NS), _near(UNIX_ROLLOVER_2106, 5 * NS)),
    server_ahead_ns=st.integers(-(1 << 30) * NS, (1 << 30) * NS),
    out_ns=st.integers(0, 2 * NS),
    hold_ns=st.integers(0, NS),
    back_ns=st.integers(0, 2 * NS),
)
def test_offset_and_delay_exact_across_eras(
    t1_ns: int, server_ahead_ns: int, out_ns: int, hold_ns: int, back_ns: int
) -> None:
    # A server up to 34 years ahead or behind, a client next to a rollover: T1..T4 may sit
    # in different eras; offset and delay still come out of the integer maths exactly.
    t2_ns = t1_ns + server_ahead_ns + out_ns
    t3_ns = t2_ns + hold_ns
    t4_ns = t1_ns + out_ns + hold_ns + back_ns
    packet = ntp.decode(ntp.encode_request(1))
    s = Sample(
        ntp.ts_from_unix_ns(t1_ns), ntp.ts_from_unix_ns(t2_ns), ntp.ts_from_unix_ns(t3_ns),
        ntp.ts_from_unix_ns(t4_ns), packet, t1_ns,
    )
    expected_offset = (server_ahead_ns + (out_ns - back_ns) / 2) / NS
    # Four truncations of under 2**-32 s each, plus float rounding of ~1e9 s values.
    assert s.offset == pytest.approx(expected_offset, abs=2e-9, rel=1e-15)
    assert s.delay == pytest.approx((out_ns + back_ns) / NS, abs=2e-9)
    assert s.t3_unix_ns == pytest.approx(t3_ns, abs=1)


# --- the probe fuzz -----------------------------------------------------------------------

GENUINE_OFFSET = 0.25  # the genuine server is 250 ms ahead
FUZZ_SEED = int(os.environ.get("NTP_PROBE_FUZZ_SEED", "20251122"))
FUZZ_PROBES = 48
FUZZ_SAMPLES = 5
HOSTILE_EVERY = 8  # every 8th probe gets nothing usable at all (3 samples, to stay quick)
REPLY_TIMEOUT = 0.1
MIN_MUTATED_TOTAL = 2000
ROUNDING = 2e-6
# Of every request: probability that the genuine reply is sent; that a header mutation
# with the right origin and genuine timestamps is sent; that a real KoD is sent.
P_GENUINE = 0.72
P_HEADER = 0.12
P_KOD = 0.02


def _is_kod(stratum: int, refid: bytes) -> bool:
    """RFC 5905 KoD, decided here independently of the codec."""
    code = refid.rstrip(b"\0")
    return stratum == 0 and bool(code) and all(0x21 <= c <= 0x7E for c in code)


@dataclass
class Plan:
    """What the fake server sent for one request."""

    nonce: int
    genuine: bool = False  # the genuine reply, right origin, main port
    header: bool = False  # a header mutation: right origin, genuine timestamps, main port
    kod: bool = False  # a Kiss-o'-Death with the right origin, main port
    mutated: int = 0  # replies that must all be discarded

    @property
    def acceptable(self) -> bool:
        return self.genuine or self.header or self.kod


Mutation = Callable[[Request, random.Random, list[int]], Send]


def _bogus(req: Request, rng: random.Random, **fields: object) -> ntp.Packet:
    """A reply whose T2/T3 are hours away from the genuine server's (T3 - T2 kept)."""
    shift = rng.choice((-1, 1)) * rng.uniform(1.0, 48.0) * 3600
    if rng.random() < 0.3:  # sometimes with odd header fields too
        fields.setdefault("stratum", rng.randrange(1, 16))
        fields.setdefault("leap", rng.randrange(4))
        fields.setdefault("poll", rng.randrange(-6, 18))
    return reply_packet(req, offset=GENUINE_OFFSET + shift, **fields)  # type: ignore[arg-type]


def _nonce(req: Request) -> int:
    assert req.packet is not None
    return req.packet.transmit_ts


def _other_origin(req: Request, rng: random.Random) -> int:
    nonce = _nonce(req)
    if rng.random() < 0.5:
        return nonce ^ (1 << rng.randrange(64))  # one bit off
    return (nonce ^ rng.randrange(1, 1 << 64)) % (1 << 64)  # never equal: the XOR is non-zero


def m_wrong_origin(req: Request, rng: random.Random, old: list[int]) -> Send:
    return Send(ntp.encode_packet(_bogus(req, rng, origin=_other_origin(req, rng))))


def m_zero_origin(req: Request, rng: random.Random, old: list[int]) -> Send:
    return Send(ntp.encode_packet(_bogus(req, rng, origin=0)))


def m_expired_origin(req: Request, rng: random.Random, old: list[int]) -> Send:
    # The nonce of an earlier request (of this probe or another): expired, answered or
    # never ours; in every case not the one outstanding.
    origin = rng.choice(old) if old else _other_origin(req, rng)
    return Send(ntp.encode_packet(_bogus(req, rng, origin=origin)))


def m_bit_flips(req: Request, rng: random.Random, old: list[int]) -> Send:
    data = bytearray(ntp.encode_packet(_bogus(req, rng)))
    origin_bit = rng.randrange(24 * 8, 32 * 8)  # at least one flip in the origin field
    others = [b for b in range(len(data) * 8) if b != origin_bit]
    for bit in [origin_bit, *rng.sample(others, rng.randrange(0, 12))]:
        data[bit // 8] ^= 0x80 >> (bit % 8)
    return Send(bytes(data))


def m_truncated(req: Request, rng: random.Random, old: list[int]) -> Send:
    return Send(ntp.encode_packet(_bogus(req, rng))[: rng.randrange(ntp.HEADER_LEN)])


def m_bad_trailer(req: Request, rng: random.Random, old: list[int]) -> Send:
    # 1..24 trailing octets that are neither a MAC (4, 20, 24) nor room for an EF.
    n = rng.choice([n for n in range(1, 25) if n not in (4, 20, 24)])
    return Send(ntp.encode_packet(_bogus(req, rng)) + rng.randbytes(n))


def m_bad_extension(req: Request, rng: random.Random, old: list[int]) -> Send:
    # More than 24 trailing octets whose first extension field has an impossible length.
    available = rng.randrange(28, 68, 4)
    length = rng.choice([0, 4, 8, 12, 13, 17, 30, 31, available + 4, 0xFFFC])
    tail = struct.pack("!HH", rng.randrange(1 << 16), length) + rng.randbytes(available - 4)
    return Send(ntp.encode_packet(_bogus(req, rng)) + tail)


def m_garbage_tail(req: Request, rng: random.Random, old: list[int]) -> Send:
    packet = _bogus(req, rng, origin=_other_origin(req, rng))
    return Send(ntp.encode_packet(packet) + rng.randbytes(rng.randrange(0, 100)))


def m_oversized(req: Request, rng: random.Random, old: list[int]) -> Send:
    packet = _bogus(req, rng, origin=_other_origin(req, rng))
    return Send(ntp.encode_packet(packet) + rng.randbytes(3000))


def m_wrong_mode(req: Request, rng: random.Random, old: list[int]) -> Send:
    data = bytearray(ntp.encode_packet(_bogus(req, rng)))  # right origin
    data[0] = (data[0] & ~7) | rng.choice([0, 1, 2, 3, 5, 6, 7])
    return Send(bytes(data))


def m_version_zero(req: Request, rng: random.Random, old: list[int]) -> Send:
    data = bytearray(ntp.encode_packet(_bogus(req, rng)))  # right origin
    data[0] &= ~0x38
    return Send(bytes(data))


def m_zero_transmit(req: Request, rng: random.Random, old: list[int]) -> Send:
    return Send(ntp.encode_packet(_bogus(req, rng, transmit_ts=0)))  # right origin


def m_zero_receive(req: Request, rng: random.Random, old: list[int]) -> Send:
    return Send(ntp.encode_packet(_bogus(req, rng, receive_ts=0)))  # right origin


def m_other_port(req: Request, rng: random.Random, old: list[int]) -> Send:
    # Valid in every respect, right origin included, but from another source port.
    return Send(ntp.encode_packet(_bogus(req, rng)), from_other_port=True)


def m_kod_wrong_origin(req: Request, rng: random.Random, old: list[int]) -> Send:
    code = rng.choice([b"RATE", b"DENY", b"RSTR", b"INIT"])
    return Send(fake_server.kod(req, code, origin=_other_origin(req, rng)))


def m_random_bytes(req: Request, rng: random.Random, old: list[int]) -> Send:
    return Send(rng.randbytes(rng.randrange(0, 120)))


def m_random_server_like(req: Request, rng: random.Random, old: list[int]) -> Send:
    # Looks like a v4 server reply; every other octet random (origin included).
    return Send(bytes([0x24]) + rng.randbytes(47))


MUTATIONS: dict[str, Mutation] = {
    "wrong_origin": m_wrong_origin,
    "zero_origin": m_zero_origin,
    "expired_origin": m_expired_origin,
    "bit_flips": m_bit_flips,
    "truncated": m_truncated,
    "bad_trailer": m_bad_trailer,
    "bad_extension": m_bad_extension,
    "garbage_tail": m_garbage_tail,
    "oversized": m_oversized,
    "wrong_mode": m_wrong_mode,
    "version_zero": m_version_zero,
    "zero_transmit": m_zero_transmit,
    "zero_receive": m_zero_receive,
    "other_port": m_other_port,
    "kod_wrong_origin": m_kod_wrong_origin,
    "random_bytes": m_random_bytes,
    "random_server_like": m_random_server_like,
}


def _header_mutation(req: Request, rng: random.Random) -> bytes:
    """Right origin and genuine T2/T3, other header fields changed: may be used."""
    fields: dict[str, object] = {}
    if rng.random() < 0.5:
        fields["leap"] = rng.randrange(4)
    if rng.random() < 0.5:
        fields["version"] = rng.randrange(1, 8)
    if rng.random() < 0.5:
        fields["stratum"] = rng.choice([0, 1, 3, 15, 16, rng.randrange(256)])
    if rng.random() < 0.3:
        fields["poll"] = rng.randrange(-128, 128)
    if rng.random() < 0.3:
        fields["precision"] = rng.randrange(-128, 128)
    if rng.random() < 0.3:
        fields["root_delay"] = rng.choice([0.0, 0.5, 3.0, 70000.0])
    if rng.random() < 0.3:
        fields["root_dispersion"] = rng.choice([0.0, 0.5, 3.0, 70000.0])
    if rng.random() < 0.3:
        fields["reference_ts"] = rng.choice([0, rng.randrange(1 << 64)])
    stratum = fields.get("stratum", 2)
    assert isinstance(stratum, int)
    refid = rng.randbytes(4) if rng.random() < 0.5 else fake_server.DEFAULT_REFID
    if _is_kod(stratum, refid):
        refid = bytes(4)  # stratum 0 with a zero refid: unsynchronised, not a KoD
    packet = reply_packet(req, offset=GENUINE_OFFSET, refid=refid, **fields)  # type: ignore[arg-type]
    if packet.version >= 4 and rng.random() < 0.2:  # a well-formed RFC 7822 field
        packet = replace(packet, extensions=(ntp.ExtensionField(0x0104, rng.randbytes(24)),))
    if rng.random() < 0.2:  # a MAC-length trailer
        packet = replace(packet, mac=rng.randbytes(rng.choice([4, 20, 24])))
    return ntp.encode_packet(packet)


class Storm:
    """The fake server's behaviour: a storm of mutated replies, sometimes the genuine one."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.plans: dict[int, Plan] = {}
        self.kinds: dict[str, int] = dict.fromkeys(MUTATIONS, 0)
        self.mutated = 0
        self.hostile = False  # when set: nothing usable at all, only mutations
        self._old: list[int] = []

    def __call__(self, req: Request) -> list[Send]:
        rng = self.rng
        plan = Plan(_nonce(req))
        self.plans[req.index] = plan
        sends: list[Send] = []
        for _ in range(rng.randrange(8, 21)):
            kind = rng.choice(list(MUTATIONS))
            send = MUTATIONS[kind](req, rng, self._old)
            if rng.random() < 0.3:  # some land later, while other samples wait
                send = replace(send, delay=rng.uniform(0.0, 0.03))
            sends.append(send)
            self.kinds[kind] += 1
        plan.mutated = len(sends)
        self.mutated += len(sends)
        # Replies that may be used go out at once (their T3 is stamped as they are built),
        # at a random place among the mutations. Built last: T3 is as late as possible.
        usable: list[Send] = []
        if not self.hostile and rng.random() < P_HEADER:
            plan.header = True
            usable.append(Send(_header_mutation(req, rng)))
        if not self.hostile and rng.random() < P_KOD:
            plan.kod = True
            usable.append(Send(fake_server.kod(req, rng.choice([b"RATE", b"DENY", b"RSTR",
                                                                 b"XYZ"]))))
        if not self.hostile and rng.random() < P_GENUINE:
            plan.genuine = True
            genuine = fake_server.reply(req, offset=GENUINE_OFFSET)
            usable.append(Send(genuine))
            if rng.random() < 0.3:  # a plain duplicate (whichever copy comes first is used)
                usable.append(Send(genuine))
            if rng.random() < 0.3:  # the genuine bytes from the wrong port
                usable.append(Send(genuine, from_other_port=True))
        for send in usable:
            sends.insert(rng.randrange(len(sends) + 1), send)
        self._old.append(plan.nonce)
        return sends


def _fuzz_module(version: int, samples: int) -> Module:
    return Module(
        name="fuzz",
        timeout=3.0,
        ntp=NTPSettings(
            version=version,
            samples=samples,
            sample_interval=0.002,
            reply_timeout=REPLY_TIMEOUT,
            preferred_ip_protocol="ip4",
        ),
    )


def _check_probe(result: Measurement, log: ProbeLog, plans: list[Plan], where: str) -> int:
    """Every invariant of one fuzzed probe; returns samples_received."""
    text = f"{where}\n{log.text()}"
    # Exactly one outcome: success, or one failure reason from the catalogue.
    assert result.success == (result.failure is None), text
    assert result.failure is None or result.failure in set(Reason), text
    exposition = render(result)
    failure_lines = [x for x in exposition.splitlines() if x.startswith("probe_ntp_failure_info{")]
    assert len(failure_lines) == (0 if result.success else 1), exposition
    assert f"probe_success {1 if result.success else 0}\n" in exposition

    sent = int(value(result, "probe_ntp_samples_sent") or 0)
    received = int(value(result, "probe_ntp_samples_received") or 0)
    assert sent == len(plans), text  # every request reached the server, none invented
    assert 0 <= received <= sent, text
    assert value(result, "probe_ntp_packet_loss_ratio") == pytest.approx(
        1 - received / sent if sent else 0.0
    )
    # Only a request that got a usable reply from the right port can count as received.
    assert received <= sum(p.acceptable for p in plans), text

    if result.failure is not None and result.failure.startswith("kod_"):
        assert any(p.kod for p in plans), f"KoD failure with no genuine KoD sent: {text}"
    if result.success:
        assert any(p.genuine or p.header for p in plans), text
    if not any(p.acceptable for p in plans):
        # Nothing usable came, and discarded replies did: invalid_reply, no measurement.
        assert result.failure == "invalid_reply", text

    samples = ntp_samples(result)
    offset = value(result, "probe_ntp_offset_seconds")
    assert (offset is not None) == bool(samples), text
    for s in samples:
        # A genuine reply is off by at most half its round trip (causality); a bogus one
        # would be hours off. 1 ms on an idle machine, the causality bound on a busy one.
        rtt = s["rtt_seconds"]
        assert 0 <= rtt < REPLY_TIMEOUT + 0.05, text
        tolerance = max(0.001, rtt / 2 + ROUNDING)
        assert abs(s["offset_seconds"] - GENUINE_OFFSET) <= tolerance, (
            f"a spoofed reply was used: offset {s['offset_seconds']!r}\n{text}"
        )
    if offset is not None:
        selected_rtt = value(result, "probe_ntp_rtt_seconds")
        assert selected_rtt is not None
        assert abs(offset - GENUINE_OFFSET) <= max(0.001, selected_rtt / 2 + ROUNDING), text
    return received


async def test_fuzzed_replies_are_never_accepted(fake_ntp: FakeNTPServer) -> None:
    storm = Storm(random.Random(FUZZ_SEED))
    fake_ntp.behaviour = storm
    sent_total = received_total = acceptable_total = successes = 0
    reasons: dict[str, int] = {}
    for i in range(FUZZ_PROBES):
        storm.hostile = i % HOSTILE_EVERY == HOSTILE_EVERY - 1
        module = _fuzz_module(1 + i % 4, 3 if storm.hostile else FUZZ_SAMPLES)
        first = len(fake_ntp.requests)
        log = ProbeLog()
        where = (f"probe {i} (NTP_PROBE_FUZZ_SEED={FUZZ_SEED}, version {module.ntp.version}, "
                 f"hostile {storm.hostile})")
        try:
            result, _ = await run_probe(parse_target(fake_ntp.target), module, module.timeout, log)
        except Exception as exc:  # the property: nothing escapes run_probe
            pytest.fail(f"{where}: run_probe raised {exc!r}\n{log.text()}")
        await fake_ntp.drain()  # every request of this probe has been read and planned
        plans = [storm.plans[r.index] for r in fake_ntp.requests[first:]]
        received_total += _check_probe(result, log, plans, where)
        sent_total += len(plans)
        acceptable_total += sum(p.acceptable for p in plans)
        successes += result.success
        if result.failure is not None:
            reasons[result.failure] = reasons.get(result.failure, 0) + 1
    # The fuzz was not vacuous: thousands of mutations of every kind, a mix of outcomes ...
    assert storm.mutated >= MIN_MUTATED_TOTAL, storm.mutated
    assert all(n > 0 for n in storm.kinds.values()), storm.kinds
    assert successes > 0, reasons
    assert reasons.get("invalid_reply", 0) >= FUZZ_PROBES // HOSTILE_EVERY, reasons
    # ... and the genuine replies got through the storm (liveness; some slack for a
    # machine so loaded that a reply misses its 100 ms window).
    assert received_total >= 0.9 * acceptable_total, (received_total, acceptable_total)
    assert fake_ntp.errors == []
