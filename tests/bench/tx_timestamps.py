#!/usr/bin/env python3
"""T1 from the kernel's transmit timestamp vs the clock read before the send, under load.

A chronyd -x on 127.0.0.1 shares this machine's clock, so every measured offset is pure
error. Queries alternate between a pump with kernel transmit timestamps and one without,
first on an idle machine, then with one bounded busy-loop process per core beside the
event loop (the scheduler then deschedules this process between its clock read and the
send). Prints |offset| error p50/p99/max per mode and load, in microseconds.

Run: ``python tests/bench/tx_timestamps.py [--quick]``. Loopback only; every process it
starts is bounded in time and stopped by PID.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script: the repository root must be importable (tests.bench.common, ntp_probe).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import asyncio
import os
import socket
import subprocess
from typing import Any

from ntp_probe.engine.context import ProbeLog
from ntp_probe.net.udp import Datagram, DatagramPump
from ntp_probe.proto.ntp import client as rules
from ntp_probe.proto.ntp import packet as ntp
from ntp_probe.proto.ntp.sample import Sample
from tests.bench import common

BUSY = "import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"


async def query(port: int, tx: bool) -> tuple[float, bool] | None:
    """One exchange with chronyd: (|offset| in seconds, whether T1 was the kernel's)."""
    client = rules.Client((common.LOOPBACK, port))

    def match(d: Datagram) -> tuple[ntp.Packet, int] | None:
        outcome = client.receive(d.data, d.source)
        return (outcome.packet, d.rx_ns) if isinstance(outcome, rules.Accepted) else None

    loop = asyncio.get_running_loop()
    nonce = rules.new_nonce()
    async with DatagramPump(socket.AF_INET, (common.LOOPBACK, port), match, ProbeLog(),
                            tx_timestamps=tx) as pump:
        t1_ns, got = await pump.exchange(client.request(nonce), loop.time() + 1.0)
    if got is None:
        return None
    p, t4_ns = got
    s = Sample(ntp.ts_from_unix_ns(t1_ns), p.receive_ts, p.transmit_ts,
               ntp.ts_from_unix_ns(t4_ns), p, t1_ns)
    return abs(s.offset), pump.last_tx_kernel


async def measure(port: int, n: int) -> dict[bool, list[float]]:
    errors: dict[bool, list[float]] = {True: [], False: []}
    for i in range(2 * n):
        tx = i % 2 == 0
        got = await query(port, tx)
        if got is not None and got[1] == tx:
            errors[tx].append(got[0] * 1e6)
    return errors


def summary_row(load: str, mode: str, values: list[float]) -> list[object]:
    values = sorted(values)
    if not values:
        return [load, mode, 0, "", "", ""]
    return [load, mode, len(values), common.fmt(common.percentile(values, 50), 2),
            common.fmt(common.percentile(values, 99), 2), common.fmt(values[-1], 2)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 queries per cell, not 2000")
    args = parser.parse_args()
    n = 200 if args.quick else 2000
    rows: list[list[object]] = []
    data: dict[str, Any] = {}
    with common.started() as s:
        chronyd = common.start_chronyd(s)
        idle = asyncio.run(measure(chronyd.port, n))
        cores = os.cpu_count() or 1
        seconds = 120 if not args.quick else 30
        for _ in range(cores):  # bounded: each exits by itself after `seconds`
            proc = subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=seconds)])
            s.procs.append(("busy-loop", proc))
        loaded = asyncio.run(measure(chronyd.port, n))
        for name, result in (("idle", idle), (f"{cores} busy-loop processes", loaded)):
            rows.append(summary_row(name, "kernel TX T1", result[True]))
            rows.append(summary_row(name, "user-space T1", result[False]))
            data[name] = {"kernel": result[True], "user": result[False]}
    table = common.md_table(["load", "T1 from", "n", "p50 us", "p99 us", "max us"], rows)
    print(table)
    common.write_result("tx_timestamps", {"rows": rows, "machine": common.machine()}, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
