#!/usr/bin/env python3
"""Soak: a steady mix of requests against the real exporter for a bounded time, watching
its fds, RSS and threads for growth.

    python tests/bench/soak.py [--duration SECONDS] [--quick] [--rate N]

Default 10 minutes (--quick: 20 s) at a fixed open-loop rate (default 150 requests/s,
at most 200 outstanding), mixing:
  ok      1-sample probes of chronyd -x over 127.0.0.1..127.0.0.50 (success)
  multi   4-sample probes (10 ms apart) of the same
  closed  probes of a closed UDP port (ICMP port unreachable: failure)
  silent  probes of sockets that never answer, module timeout 1 s (failure: timeout)
  debug   ok probes with debug=true
  metrics GET /metrics;  index GET /;  bad  unknown module (400)
Every few seconds: /proc/PID/fd count, VmRSS and Threads (/proc/PID/status). At the end,
the first and the last third of the samples are compared: "flat" or "GROWING".
Prints markdown tables; writes tests/bench/results/soak.json.
"""

from __future__ import annotations

import os
import sys

# Run as a script: the repository root must be importable (tests.bench.common, ntp_probe).
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import aiohttp  # noqa: E402

from tests.bench import common  # noqa: E402

MIX = {"ok": 55, "multi": 10, "closed": 8, "silent": 8, "debug": 7, "metrics": 6,
       "index": 3, "bad": 3}
MAX_OUTSTANDING = 200
RSS_SLACK = 1.05  # last third's max RSS may exceed the first third's by 5%
FDS_SLACK = 1.10


class Soak:
    def __init__(self, exporter: common.Server, chronyd_port: int, closed_port: int,
                 silent: list[socket.socket]) -> None:
        self.exporter = exporter
        self.chronyd_port = chronyd_port
        self.closed_port = closed_port
        self.silent = [s.getsockname() for s in silent]
        self.counts: dict[str, int] = dict.fromkeys(MIX, 0)
        self.unexpected: dict[str, int] = dict.fromkeys(MIX, 0)
        self.examples: list[str] = []
        self.latency_ms: dict[str, list[float]] = {k: [] for k in MIX}
        self.skipped = 0
        self.outstanding = 0
        self.samples: list[dict[str, Any]] = []
        self._i = 0

    def url(self, kind: str) -> str:
        self._i += 1
        addr = f"127.0.0.{self._i % common.N_ADDRESSES + 1}"
        base = self.exporter.base
        if kind in ("ok", "debug"):
            url = f"{base}/probe?module=ok&target={addr}:{self.chronyd_port}"
            return url + ("&debug=true" if kind == "debug" else "")
        if kind == "multi":
            return f"{base}/probe?module=multi&target={addr}:{self.chronyd_port}"
        if kind == "closed":
            return f"{base}/probe?module=ok&target={addr}:{self.closed_port}"
        if kind == "silent":
            host, port = self.silent[self._i % len(self.silent)]
            return f"{base}/probe?module=silent&target={host}:{port}"
        if kind == "metrics":
            return f"{base}/metrics"
        if kind == "index":
            return f"{base}/"
        return f"{base}/probe?module=no_such_module&target={addr}"

    @staticmethod
    def expected(kind: str, status: int, body: str) -> bool:
        if kind in ("ok", "multi"):
            return status == 200 and "\nprobe_success 1" in "\n" + body
        if kind in ("closed", "silent"):
            return status == 200 and "\nprobe_success 0" in "\n" + body
        if kind == "debug":
            return status == 200 and "Logs for the probe" in body
        if kind == "metrics":
            return status == 200 and "ntp_probe_probes_total" in body
        if kind == "index":
            return status == 200 and "<html" in body
        return status == 400

    async def one(self, session: aiohttp.ClientSession, kind: str) -> None:
        self.outstanding += 1
        t0 = time.perf_counter()
        try:
            async with session.get(self.url(kind)) as resp:
                body = await resp.text()
                ok = self.expected(kind, resp.status, body)
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, status, body = False, -1, repr(exc)
        finally:
            self.outstanding -= 1
        self.counts[kind] += 1
        self.latency_ms[kind].append((time.perf_counter() - t0) * 1e3)
        if not ok:
            self.unexpected[kind] += 1
            if len(self.examples) < 10:
                self.examples.append(f"{kind}: {status} {body[:200]!r}")

    async def sampler(self, interval: float, end: float) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        while loop.time() < end:
            st: dict[str, Any] = common.proc_stats(self.exporter.pid)
            st["t"] = round(loop.time() - t0, 1)
            st["outstanding"] = self.outstanding
            self.samples.append(st)
            await asyncio.sleep(interval)

    async def run(self, duration: float, rate: float, interval: float) -> None:
        loop = asyncio.get_running_loop()
        rng = random.Random(6)
        kinds, weights = list(MIX), list(MIX.values())
        timeout = aiohttp.ClientTimeout(total=30)
        connector = aiohttp.TCPConnector(limit=MAX_OUTSTANDING)
        end = loop.time() + duration
        tasks: set[asyncio.Task[None]] = set()
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            sampler = asyncio.create_task(self.sampler(interval, end))
            next_t = loop.time()
            while loop.time() < end:
                if self.outstanding < MAX_OUTSTANDING:
                    kind = rng.choices(kinds, weights)[0]
                    t = asyncio.create_task(self.one(session, kind))
                    tasks.add(t)
                    t.add_done_callback(tasks.discard)
                else:
                    self.skipped += 1
                next_t += 1.0 / rate
                await asyncio.sleep(max(0.0, next_t - loop.time()))
            await sampler
            if tasks:
                await asyncio.wait(tasks, timeout=30)
            for t in tasks:
                t.cancel()


def thirds(samples: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    n = len(samples)
    k = max(1, n // 3)
    return [samples[:k], samples[k:n - k], samples[n - k:]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="bounded soak of the exporter")
    ap.add_argument("--duration", type=float, help="seconds (default 600; --quick 20)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rate", type=float, default=150.0, help="requests per second")
    ap.add_argument("--interval", type=float, help="seconds between samples")
    args = ap.parse_args(argv)
    duration = args.duration or (20.0 if args.quick else 600.0)
    duration = max(6.0, min(duration, 6 * 3600.0))
    interval = args.interval or max(1.0, min(10.0, duration / 30))
    common.raise_fd_limit()
    silent: list[socket.socket] = []
    with common.started() as s:
        try:
            chronyd = common.start_chronyd(s)
            for i in range(common.N_ADDRESSES):
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind((f"127.0.0.{i + 1}", 0))
                silent.append(sock)
            closed_port = chronyd.port
            while closed_port == chronyd.port:
                closed_port = common.free_port(socket.SOCK_DGRAM, "")
            modules = {
                "ok": common.one_sample_module(),
                "multi": {"prober": "ntp", "timeout": "2s",
                          "ntp": {"samples": 4, "sample_interval": "10ms",
                                  "reply_timeout": "500ms", "preferred_ip_protocol": "ip4"}},
                "silent": common.one_sample_module("1s", "1s"),
            }
            exporter = common.start_exporter(s, modules, max_concurrent=1000)
            soak = Soak(exporter, chronyd.port, closed_port, silent)
            time.sleep(0.5)
            before = common.proc_stats(exporter.pid)
            common.say(f"soak {duration:g} s at {args.rate:g} req/s, sample every "
                       f"{interval:g} s ...")
            t0 = time.monotonic()
            asyncio.run(soak.run(duration, args.rate, interval))
            elapsed = time.monotonic() - t0
            time.sleep(1.5)
            after = common.proc_stats(exporter.pid)
            alive = exporter.proc.poll() is None
            healthy = common.http_get(exporter.base + "/-/healthy")[0] == 200
        finally:
            for sock in silent:
                with contextlib.suppress(OSError):
                    sock.close()

    parts = thirds(soak.samples)
    rows = []
    for name, part in zip(("first third", "middle third", "last third"), parts, strict=True):
        if not part:
            continue
        rows.append([name, len(part),
                     f"{statistics.mean(x['rss_kb'] for x in part) / 1024:.1f}",
                     f"{max(x['rss_kb'] for x in part) / 1024:.1f}",
                     f"{statistics.median(x['fds'] for x in part):.0f}",
                     max(x["fds"] for x in part), max(x["threads"] for x in part),
                     f"{statistics.mean(x['outstanding'] for x in part):.1f}"])
    rows.insert(0, ["idle before the load", 1, f"{before['rss_kb'] / 1024:.1f}",
                    f"{before['rss_kb'] / 1024:.1f}", before["fds"], before["fds"],
                    before["threads"], 0])
    rows.append(["1.5 s after the end", 1, f"{after['rss_kb'] / 1024:.1f}",
                 f"{after['rss_kb'] / 1024:.1f}", after["fds"], after["fds"],
                 after["threads"], 0])
    md = common.md_table(["samples", "n", "RSS mean MB", "RSS max MB", "fds median",
                          "fds max", "threads max", "client outstanding"], rows)
    first, last = parts[0], parts[2]
    verdicts = {}
    rss_first = max(x["rss_kb"] for x in first)
    rss_last = max(x["rss_kb"] for x in last)
    verdicts["rss"] = rss_last <= rss_first * RSS_SLACK
    fds_first = statistics.median(x["fds"] for x in first)
    fds_last = statistics.median(x["fds"] for x in last)
    # Each outstanding request holds a TCP connection (and a probe a UDP socket) in the
    # exporter, and the client's keep-alive pool follows the peak: allow for that.
    out_first = statistics.mean(x["outstanding"] for x in first)
    out_last = statistics.mean(x["outstanding"] for x in last)
    verdicts["fds"] = fds_last <= fds_first * FDS_SLACK + 5 + 2 * max(0.0, out_last - out_first)
    verdicts["fds_idle"] = after["fds"] <= before["fds"]
    verdicts["threads"] = max(x["threads"] for x in last) <= max(x["threads"] for x in first)
    lines = [
        f"RSS max first third {rss_first / 1024:.1f} MB -> last third {rss_last / 1024:.1f} MB "
        f"({100 * (rss_last - rss_first) / rss_first:+.1f}%): "
        + ("flat" if verdicts["rss"] else "GROWING"),
        f"fds median first third {fds_first:.0f} -> last third {fds_last:.0f} (client "
        f"outstanding {out_first:.1f} -> {out_last:.1f}): "
        + ("flat" if verdicts["fds"] else "GROWING"),
        f"fds idle: {before['fds']} before the load, {after['fds']} 1.5 s after it: "
        + ("no leak" if verdicts["fds_idle"] else "LEAK"),
        "threads: " + ("flat" if verdicts["threads"] else "GROWING"),
        f"exporter alive {alive}, healthy {healthy}; {elapsed:.0f} s, "
        f"{sum(soak.counts.values()):,} requests, {soak.skipped} skipped (client cap)",
    ]
    kind_rows = []
    for kind in MIX:
        lat = common.summary(soak.latency_ms[kind])
        kind_rows.append([kind, f"{soak.counts[kind]:,}", soak.unexpected[kind],
                          common.fmt(lat["p50"], 2), common.fmt(lat["p99"], 2),
                          common.fmt(lat["max"], 2)])
    md2 = common.md_table(["kind", "requests", "unexpected", "p50 ms", "p99 ms", "max ms"],
                          kind_rows)
    text = (f"## soak ({duration:g} s at {args.rate:g} req/s, sampled every {interval:g} s)\n\n"
            f"{md}\n\n" + "\n".join(f"- {x}" for x in lines) + f"\n\n{md2}")
    if soak.examples:
        text += "\n\nunexpected examples:\n" + "\n".join(f"    {e}" for e in soak.examples)
    print(text, flush=True)
    path = common.write_result("soak", {
        "duration": duration, "rate": args.rate, "interval": interval, "elapsed": elapsed,
        "samples": soak.samples, "before": before, "after": after, "verdicts": verdicts,
        "counts": soak.counts,
        "unexpected": soak.unexpected, "examples": soak.examples, "skipped": soak.skipped,
        "alive": alive, "healthy": healthy,
        "latency_ms": {k: common.summary(v) for k, v in soak.latency_ms.items()},
    }, text)
    common.say(f"wrote {path}")
    return 0 if alive and healthy and all(verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
