"""cli.serve: the connection cap fitted to the open-files limit."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import weakref

import pytest

from ntp_probe.cli import serve
from ntp_probe.config.load import parse_config


def test_a_group_all_addresses_or_nts_probe_counts_every_socket_it_holds() -> None:
    # A group probe holds one socket per member at once (up to 16), an all_addresses
    # probe one per address: the descriptor budget must see them.
    plain = parse_config("modules:\n  n: {prober: ntp}\n", "t")
    group = parse_config("modules:\n  n: {prober: ntp}\n  g: {prober: ntp_group}\n", "t")
    every = parse_config("modules:\n  a:\n    ntp: {all_addresses: true, max_addresses: 5}\n",
                         "t")
    # An NTS probe counts the NTP exchange's socket before its key exchange opens one.
    nts = parse_config("modules:\n  s: {prober: nts}\n", "t")
    assert [serve.probe_sockets(c) for c in (plain, group, every, nts)] == [1, 16, 5, 2]


# (connections, backlog) and the probe sockets' share, enforced: what is left after the
# spare (a quarter of a very low limit), the connections and two accept passes.
@pytest.mark.parametrize(("soft", "expected"), [
    (32, "(2, 8) 6"),  # two at least: one for a probe, one for /-/healthy
    (64, "(8, 8) 24"),  # still serves: /metrics and /-/healthy must connect
    (1024, "(360, 60) 480"),
    (4096, "(512, 128) 3264"),  # enough: every probe socket fits
])
def test_a_low_limit_leaves_connections_half_of_the_room(soft: int, expected: str) -> None:
    # In a child: a lowered hard limit cannot be raised again without privileges.
    code = ("import resource, sys\n"
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {soft}))\n"
            "from ntp_probe.cli import serve\n"
            "from ntp_probe.net import budget\n"
            "print(serve._fit_open_files(512, 1600), budget._BUDGET.limit)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.strip() == expected, done.stderr
    if soft < 2432:  # 512 connections, 1600 probe sockets, 64 spare, two accept passes
        assert "open-files limit" in done.stderr  # said, with what to raise


async def test_the_exporter_collects_every_generation_now_and_then() -> None:
    # A garbage cycle that reached the oldest generation, which the exporter's thresholds
    # collect rarely, is freed by the periodic full collection.
    freed = asyncio.Event()

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    old = Cycle()
    gc.collect()  # now in the oldest generation
    weakref.finalize(old, freed.set)
    del old
    gc.disable()  # only the exporter's own collection may free it
    collector = asyncio.ensure_future(serve.collect_fully(0.01))
    try:
        async with asyncio.timeout(10):
            await freed.wait()
    finally:
        collector.cancel()
        gc.enable()
