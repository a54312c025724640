"""net.udp.DatagramPump: unix datagram sockets, truncated datagrams, unreachable peers."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ntp_probe.engine.context import ProbeLog
from ntp_probe.net.budget import limit_probe_sockets
from ntp_probe.net.udp import MAX_DATAGRAM, Datagram, DatagramPump, Unreachable

LOOPBACK = "127.0.0.1"


@pytest.fixture
def private_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ntpp-pump-") as d:
        Path(d).chmod(0o700)
        yield Path(d)


def echo_server(path: Path) -> socket.socket:
    """A unix datagram server that answers every request with b"re:" + request."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.setblocking(False)
    loop = asyncio.get_running_loop()

    def on_readable() -> None:
        data, source = s.recvfrom(4096)
        s.sendto(b"re:" + data, source)

    loop.add_reader(s.fileno(), on_readable)
    return s


def stop(s: socket.socket) -> None:
    asyncio.get_running_loop().remove_reader(s.fileno())
    s.close()


async def test_exchange_over_a_unix_datagram_socket(private_dir: Path) -> None:
    server = echo_server(private_dir / "server.sock")
    client_path = private_dir / "client.sock"
    seen: list[Datagram] = []

    def match(d: Datagram) -> bytes | None:
        seen.append(d)
        return d.data if d.data.startswith(b"re:") else None

    try:
        loop = asyncio.get_running_loop()
        async with DatagramPump(socket.AF_UNIX, str(private_dir / "server.sock"), match,
                                ProbeLog(), bind_path=str(client_path)) as pump:
            assert client_path.exists()  # bound, so the server can answer
            t1, value = await pump.exchange(b"hello", loop.time() + 2.0)
        assert value == b"re:hello"
        assert t1 > 0 and seen[0].rx_ns >= t1
        assert not client_path.exists()  # the bound path is removed on close
    finally:
        stop(server)


async def test_no_match_waits_until_the_deadline(private_dir: Path) -> None:
    server = echo_server(private_dir / "server.sock")
    try:
        loop = asyncio.get_running_loop()
        never: DatagramPump[bytes] = DatagramPump(
            socket.AF_UNIX, str(private_dir / "server.sock"), lambda d: None, ProbeLog(),
            bind_path=str(private_dir / "c.sock"))
        async with never as pump:
            _, value = await pump.exchange(b"x", loop.time() + 0.05)
        assert value is None
    finally:
        stop(server)


async def test_a_send_that_fails_is_unreachable_and_not_sent(private_dir: Path) -> None:
    loop = asyncio.get_running_loop()
    async with DatagramPump(socket.AF_UNIX, str(private_dir / "nobody-here.sock"),
                            lambda d: d.data, ProbeLog(),
                            bind_path=str(private_dir / "c.sock")) as pump:
        with pytest.raises(Unreachable) as caught:
            await pump.exchange(b"x", loop.time() + 1.0)
    assert caught.value.sent is False
    assert "send failed" in str(caught.value)


async def test_icmp_port_unreachable_ends_the_wait_as_unreachable() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        port = s.getsockname()[1]
    loop = asyncio.get_running_loop()
    # Unreachable, not a timeout: the ICMP error, not the 5 s deadline, ended the wait.
    async with DatagramPump(socket.AF_INET, (LOOPBACK, port), lambda d: d.data,
                            ProbeLog()) as pump:
        with pytest.raises(Unreachable) as caught:
            await pump.exchange(b"x", loop.time() + 5.0)
    assert caught.value.sent is True
    assert "port unreachable" in str(caught.value)


async def test_an_error_or_a_cancellation_out_of_the_wait_leaves_no_reference_cycle() -> None:
    # The exporter runs the collector's oldest generation rarely: a cycle per probe ended
    # by an ICMP error or cancelled (the exception, the wait's frame in its traceback, the
    # waiter holding the exception) outlived the probe, and a flood of such probes grew
    # the exporter's memory.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        closed = s.getsockname()[1]
    loop = asyncio.get_running_loop()

    async def unreachable() -> None:
        async with DatagramPump(socket.AF_INET, (LOOPBACK, closed), lambda d: d.data,
                                ProbeLog()) as pump:
            with contextlib.suppress(Unreachable):
                await pump.exchange(b"x", loop.time() + 5.0)

    async def cancelled(silent: socket.socket) -> None:
        async with DatagramPump(socket.AF_INET, silent.getsockname(), lambda d: d.data,
                                ProbeLog()) as pump:
            task = asyncio.ensure_future(pump.exchange(b"x", loop.time() + 5.0))
            await asyncio.sleep(0)  # one pass: the send is done, the wait begun
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((LOOPBACK, 0))
        await unreachable()
        await cancelled(silent)
        gc.collect()
        gc.disable()
        try:
            for _ in range(5):
                await unreachable()
                await cancelled(silent)
            assert gc.collect() == 0
        finally:
            gc.enable()


async def test_the_transmit_stamp_is_read_at_the_send_and_wakes_nothing() -> None:
    # The kernel stamps a loopback datagram within sendto: read right away, the stamp
    # never makes the socket ready, so a peer that stays silent causes no wakeup at all.
    wakeups: list[int] = []

    class Counting(DatagramPump[bytes]):
        def _on_readable(self, events: int) -> None:
            wakeups.append(events)
            super()._on_readable(events)

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((LOOPBACK, 0))
        loop = asyncio.get_running_loop()
        async with Counting(socket.AF_INET, silent.getsockname(), lambda d: d.data,
                            ProbeLog(), tx_timestamps=True) as pump:
            if not pump.tx_wanted:
                pytest.skip("this kernel gives no transmit timestamps")
            _, value = await pump.exchange(b"x", loop.time() + 0.05)
        assert value is None
        assert silent.recv(16) == b"x"  # it did leave
        assert pump.last_tx_kernel  # T1 is the kernel's stamp
        assert wakeups == []
        # Unasked (the daemons' command protocols, which use no T1): no stamp is taken.
        async with DatagramPump(socket.AF_INET, silent.getsockname(), lambda d: d.data,
                                ProbeLog()) as plain:
            await plain.exchange(b"y", loop.time() + 0.05)
        assert not plain.tx_wanted and not plain.last_tx_kernel


@pytest.mark.parametrize("sender", [LOOPBACK, "127.0.0.2"])
async def test_a_truncated_datagram_is_discarded_and_logged(sender: str) -> None:
    # Counted against the destination only when it sent it: anyone may send a long one.
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind((LOOPBACK, 0))
    server.setblocking(False)
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind((sender, 0))
    port = server.getsockname()[1]
    loop = asyncio.get_running_loop()
    seen: list[int] = []

    def match(d: Datagram) -> bytes:
        seen.append(len(d.data))
        return d.data

    def on_request() -> None:
        _, source = server.recvfrom(64)
        for _ in range(10):  # cut short by the receiver
            other.sendto(b"L" * (MAX_DATAGRAM + 100), source)
        server.sendto(b"ok", source)

    loop.add_reader(server.fileno(), on_request)
    log = ProbeLog()
    try:
        async with DatagramPump(socket.AF_INET, (LOOPBACK, port),
                                match, log) as pump:
            _, value = await pump.exchange(b"x", loop.time() + 2.0)
    finally:
        loop.remove_reader(server.fileno())
        server.close()
        other.close()
    assert value == b"ok"
    assert seen == [2]  # the long datagram never reached the matcher
    text = log.text()
    # Three logged one by one, naming the sender; the rest counted (a flood must not fill
    # the probe's log).
    assert text.count(f"datagram from {sender}:") == 3, text
    assert "7 more too-long datagrams not logged one by one" in text, text
    assert pump.truncated == (10 if sender == LOOPBACK else 0)


async def test_pumps_in_flight_together_each_get_their_own_outcome(private_dir: Path) -> None:
    """Many sockets share one readiness set: an ICMP error queued on one socket, or a
    socket closed mid-run, must not stall or confuse the others."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((LOOPBACK, 0))
        closed_port = s.getsockname()[1]
    server = echo_server(private_dir / "server.sock")
    loop = asyncio.get_running_loop()

    async def echo(i: int) -> bytes | None:
        async with DatagramPump(socket.AF_UNIX, str(private_dir / "server.sock"),
                                lambda d: d.data, ProbeLog(),
                                bind_path=str(private_dir / f"c{i}.sock")) as pump:
            _, value = await pump.exchange(b"%d" % i, loop.time() + 2.0)
            return value

    async def refused() -> str:
        async with DatagramPump(socket.AF_INET, (LOOPBACK, closed_port), lambda d: d.data,
                                ProbeLog()) as pump:
            with pytest.raises(Unreachable) as caught:
                await pump.exchange(b"x", loop.time() + 2.0)
            return str(caught.value)

    try:
        # 8: a unix datagram server queues 10 (net.unix.max_dgram_qlen) before sends fail.
        echoes, refusals = await asyncio.gather(asyncio.gather(*(echo(i) for i in range(8))),
                                                asyncio.gather(*(refused() for _ in range(5))))
        assert echoes == [b"re:%d" % i for i in range(8)]
        assert all("port unreachable" in r for r in refusals)
        # And again after all of them closed: nothing of theirs is still watched.
        assert await echo(99) == b"re:99"
    finally:
        stop(server)


def full_server(path: Path) -> socket.socket:
    """A unix datagram server nobody reads, its receive queue filled to the brim."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    server.setblocking(False)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as filler:
        filler.setblocking(False)
        for _ in range(100_000):
            try:
                filler.sendto(b"queued", str(path))
            except BlockingIOError:
                return server
    raise AssertionError("the queue never filled")


@pytest.mark.parametrize("room_later", [True, False])
async def test_a_full_daemon_queue_is_waited_on_not_a_send_failure(
        private_dir: Path, room_later: bool) -> None:
    # A busy or stopped chronyd, or many probes at once, fill its socket's queue (ten
    # datagrams by default): a send that finds no room waits for it, as chronyc's blocking
    # send does; it is no socket failure.
    path = private_dir / "server.sock"
    server = full_server(path)
    loop = asyncio.get_running_loop()

    def serve() -> None:  # drains the queue, answers what has a return address
        while True:
            try:
                data, source = server.recvfrom(4096)
            except BlockingIOError:
                return
            if source:
                server.sendto(b"re:" + data, source)

    if room_later:
        loop.call_later(0.05, loop.add_reader, server.fileno(), serve)
    log = ProbeLog()
    try:
        async with DatagramPump(socket.AF_UNIX, str(path),
                                lambda d: d.data if d.data.startswith(b"re:") else None, log,
                                bind_path=str(private_dir / "c.sock")) as pump:
            _, value = await pump.exchange(b"x", loop.time() + (2.0 if room_later else 0.2))
        if room_later:
            assert (value, pump.sent) == (b"re:x", 1)
        else:
            assert (value, pump.sent) == (None, 0)
            assert "the daemon's socket queue stayed full: not sent" in log.text()
    finally:
        if room_later:
            loop.remove_reader(server.fileno())
        server.close()


async def test_past_the_probe_socket_budget_a_pump_is_refused(private_dir: Path) -> None:
    # The server keeps descriptors for its connections: past the probes' share a pump gets
    # EMFILE at once (the probe fails local_error) instead of the process running out.
    path = private_dir / "server.sock"
    server = echo_server(path)
    limit_probe_sockets(1)
    try:
        async with DatagramPump(socket.AF_UNIX, str(path), lambda d: d.data, ProbeLog(),
                                bind_path=str(private_dir / "a.sock")):
            with pytest.raises(OSError) as refused:
                async with DatagramPump(socket.AF_UNIX, str(path), lambda d: d.data,
                                        ProbeLog(), bind_path=str(private_dir / "b.sock")):
                    pass
            assert refused.value.errno == errno.EMFILE
        async with DatagramPump(socket.AF_UNIX, str(path), lambda d: d.data, ProbeLog(),
                                bind_path=str(private_dir / "b.sock")):
            pass  # the first one's socket is closed: room again
    finally:
        limit_probe_sockets(None)
        stop(server)
