"""No garbage cycles from what clients do wrong. The exporter runs the cyclic collector's
oldest generation rarely (gc.freeze, high thresholds, a full pass a minute), so a cycle a
request leaves behind is memory a flood can pile up: these count what a collection would
free after such requests, with the collector off meanwhile."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509

from ntp_probe.config.load import load_config
from ntp_probe.engine.coordinator import Coordinator
from ntp_probe.engine.targets import parse_target
from ntp_probe.exposition.internals import Internals
from ntp_probe.web.app import State, create_app
from ntp_probe.web.connections import ConnectionGuard, GuardedSite
from tests.behaviour import fake_server
from tests.behaviour.fake_server import FakeNTPServer, silent
from tests.behaviour.test_nts_prober import _make_pki
from tests.behaviour.test_operate_web import poll

fake_ntp = fake_server.fake_ntp
LOOPBACK = "127.0.0.1"


async def garbage_after(action: Callable[[], Awaitable[None]],
                        times: int = 5) -> list[object]:
    """What a full collection frees after ``times`` runs of ``action`` (one run first, for
    what the first use of anything leaves)."""
    await action()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(times):
            await action()
        gc.collect()
        return list(gc.garbage)
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
        gc.enable()


def kinds(garbage: list[object]) -> set[str]:
    return {type(o).__name__ for o in garbage}


async def test_a_client_hanging_up_mid_probe_leaves_no_cycle(fake_ntp: FakeNTPServer) -> None:
    # The cancelled burst's task kept its CancelledError, whose traceback holds the frame
    # that holds the flight that holds the task: the whole probe stack with it.
    fake_ntp.behaviour = silent
    config = load_config(None)
    module = config.modules["ntp_fast"]
    coordinator = Coordinator()
    target = parse_target(fake_ntp.target)

    async def hang_up() -> None:
        request = asyncio.ensure_future(coordinator.probe(config, module, target, 5.0))
        await fake_ntp.wait_for_requests(len(fake_ntp.requests) + 1)
        request.cancel()  # the client hung up: the burst no one waits for is stopped
        with contextlib.suppress(asyncio.CancelledError):
            await request
        for _ in range(3):  # the burst's task unwinds
            await asyncio.sleep(0)

    assert kinds(await garbage_after(hang_up)) == set()


@pytest.fixture
async def tls_server(tmp_path: Path) -> AsyncIterator[tuple[int, ConnectionGuard]]:
    """The exporter's web server with TLS, in-process, on a free port: (port, the guard
    that watches its connections)."""
    _, cert, key = _make_pki(tmp_path, x509.SubjectAlternativeName(
        [x509.IPAddress(IPv4Address(LOOPBACK))]))
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner = web.AppRunner(create_app(State(config=load_config(None), internals=Internals())))
    await runner.setup()
    guard = ConnectionGuard(max_connections=16, header_timeout=1.0, idle_timeout=1.0)
    site = GuardedSite(runner, LOOPBACK, 0, guard, ssl_context=context)
    await site.start()
    try:
        yield int(site.urls()[0].rsplit(":", 1)[1]), guard
    finally:
        await runner.cleanup()
        guard.close()


async def test_a_failed_tls_handshake_leaves_no_cycle(
        tls_server: tuple[int, ConnectionGuard]) -> None:
    # A failed handshake's exception held start_tls's frame, with the TLS protocol and its
    # 256 KiB buffer: a flood of bad handshakes grew the exporter by hundreds of MB.
    async def connect() -> None:
        reader, writer = await asyncio.open_connection(LOOPBACK, tls_server[0])
        writer.write(b"\x16\x03\x01\x00\x05hello")
        await reader.read()  # until the server closes
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        # The server's side has unwound when the guard forgets the connection (its failed
        # handshake's handler does that last).
        await poll(lambda: tls_server[1].open == 0, "the failed handshake closed")

    # Left: CPython 3.11's transports (a bound method of their own) and aiohttp's request
    # parser, a few hundred bytes a connection, the same for any connection.
    left = kinds(await garbage_after(connect))
    assert not left & {"frame", "SSLProtocol", "SSLObject", "Future", "Task"}, left
