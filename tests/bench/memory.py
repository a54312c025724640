#!/usr/bin/env python3
"""Memory of the exporter process: idle, with 1000 probes in flight, and over many probes.

    python tests/bench/memory.py [--quick] [--probes N]

- idle: VmRSS (/proc/PID/status) and open fds right after start, and after a warm-up.
- 1000 in flight: 1000 concurrent /probe requests (aiohttp client) with a module whose
  timeout is 5 s, against 1000 distinct silent UDP targets (sockets this script binds on
  127.0.0.1..127.0.0.50 that never answer), so no two requests share a burst and every
  probe stays in flight for its whole timeout; --probe.max-concurrent=2000.
- many probes: 200k (--quick: 20k) 1-sample probes against one chronyd -x (targets
  rotating over 127.0.0.1..127.0.0.50), driven by wrk in bounded chunks; RSS and fds at
  checkpoints, and the growth from the first tenth (20k; quick 2k) to the end.
Prints markdown tables; writes tests/bench/results/memory.json.
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
import signal  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import aiohttp  # noqa: E402

from tests.bench import common  # noqa: E402

IN_FLIGHT = 1000
SILENT_TIMEOUT = 5.0
TRACED_TIMEOUT = 25.0
TARGET_RSS_MB = 60.0
TARGET_GROWTH_PCT = 5.0
LOAD_THREADS = 2
LOAD_CONNECTIONS = 50


def bind_silent(n: int) -> list[socket.socket]:
    """n UDP sockets on 127.0.0.1..127.0.0.50 (kernel-chosen ports) that never answer."""
    socks = []
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((f"127.0.0.{i % common.N_ADDRESSES + 1}", 0))
        socks.append(s)
    return socks


async def in_flight_phase(exporter: common.Server, silent: list[socket.socket],
                          on_full: Callable[[], None] | None = None,
                          probe_timeout: float = SILENT_TIMEOUT) -> dict[str, Any]:
    """Fire IN_FLIGHT concurrent silent probes; sample RSS/fds/in-flight until all return.

    ``on_full`` is called once, when the exporter first reports IN_FLIGHT probes in flight.
    """
    pid = exporter.pid
    statuses: dict[int, int] = {}
    failures: dict[str, int] = {}
    samples: list[dict[str, Any]] = []
    timeout = aiohttp.ClientTimeout(total=probe_timeout + 30)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:

        async def one(sock: socket.socket) -> None:
            host, port = sock.getsockname()
            url = f"{exporter.base}/probe?module=silent&target={host}:{port}"
            try:
                async with session.get(url) as resp:
                    body = await resp.text()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                    for line in body.splitlines():
                        if line.startswith("probe_ntp_failure_info{"):
                            reason = line.split('"')[1]
                            failures[reason] = failures.get(reason, 0) + 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                key = -1
                statuses[key] = statuses.get(key, 0) + 1
                common.say(f"client error: {exc!r}")

        async def gauge() -> float:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s2, \
                    s2.get(exporter.base + "/metrics") as resp:
                body = await resp.text()
            return sum(common.metric_values(body, "ntp_probe_probes_in_flight").values())

        t0 = time.monotonic()
        tasks = [asyncio.create_task(one(s)) for s in silent]
        deadline = t0 + probe_timeout + 30
        while not all(t.done() for t in tasks) and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            st: dict[str, Any] = dict(common.proc_stats(pid))
            try:
                st["in_flight"] = int(await gauge())
            except (aiohttp.ClientError, TimeoutError):
                st["in_flight"] = -1
            st["t"] = round(time.monotonic() - t0, 2)
            samples.append(st)
            if on_full is not None and st["in_flight"] >= IN_FLIGHT:
                on_full()
                on_full = None
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    full = [x for x in samples if x["in_flight"] >= IN_FLIGHT]
    return {
        "statuses": statuses, "failure_reasons": failures, "samples": samples,
        "max_in_flight": max((x["in_flight"] for x in samples), default=0),
        "rss_kb_max": max((x["rss_kb"] for x in samples), default=0),
        "rss_kb_at_full": max((x["rss_kb"] for x in full), default=0),
        "fds_max": max((x["fds"] for x in samples), default=0),
        "threads_max": max((x["threads"] for x in samples), default=0),
        "seconds": round(time.monotonic() - t0, 2),
    }


def probes_done(base: str) -> float:
    status, body = common.http_get(base + "/metrics")
    if status != 200:
        raise SystemExit(f"/metrics failed: {status} {body[:200]}")
    values = common.metric_values(body, "ntp_probe_probes_total")
    return sum(v for k, v in values.items() if "module=\"load_" in k)


def load_phase(wrk: str | None, exporter: common.Server, chronyd_port: int, total: int,
               baseline_at: int, max_seconds: float, work: Any) -> dict[str, Any]:
    """Drive ``total`` probes in bounded wrk chunks; checkpoint RSS/fds/threads."""
    if wrk is None:
        raise SystemExit("wrk is needed for the load phase (apt-get install wrk as root)")
    script = common.wrk_rotate_script(work, chronyd_port, "load_")
    checkpoints: list[dict[str, Any]] = []
    start = time.monotonic()
    done = probes_done(exporter.base)
    rate = 0.0
    errors = 0
    while done < total and time.monotonic() - start < max_seconds:
        # About 20 checkpoints: chunks of total/20 probes at the rate seen so far (1 s first).
        seconds = 1 if rate == 0 else int(max(1, min(10, (total / 20) / rate)))
        t0 = time.monotonic()
        r = common.run_wrk(wrk, exporter.base, script, seconds, LOAD_THREADS, LOAD_CONNECTIONS)
        errors += r["errors"]
        new_done = probes_done(exporter.base)
        rate = max(100.0, (new_done - done) / (time.monotonic() - t0))
        done = new_done
        st: dict[str, Any] = common.proc_stats(exporter.pid)
        st["probes"] = int(done)
        st["elapsed_s"] = round(time.monotonic() - start, 1)
        checkpoints.append(st)
        common.say(f"  {int(done):,} probes, RSS {st['rss_kb'] / 1024:.1f} MB, "
                   f"fds {st['fds']}, {rate:,.0f}/s")
    base = next((c for c in checkpoints if c["probes"] >= baseline_at), None)
    end = checkpoints[-1] if checkpoints else None
    growth = None
    if base is not None and end is not None and base is not end:
        growth = 100.0 * (end["rss_kb"] - base["rss_kb"]) / base["rss_kb"]
    return {"checkpoints": checkpoints, "baseline": base, "end": end, "growth_pct": growth,
            "wrk_errors": errors, "seconds": round(time.monotonic() - start, 1),
            "completed": done >= total}


def _wait_file(path: Path, seconds: float = 60.0) -> bool:
    end = time.monotonic() + seconds
    last = -1
    while time.monotonic() < end:
        if path.exists():
            size = path.stat().st_size
            if size == last and size > 0:
                return True
            last = size
        time.sleep(0.5)
    return False


def tracemalloc_run(args: argparse.Namespace) -> int:
    """Attribution of the in-flight memory: the exporter under tracemalloc, snapshot when
    idle (after warm-up) and with IN_FLIGHT probes in flight, compared by line."""
    common.raise_fd_limit()
    silent: list[socket.socket] = []
    with common.started() as s:
        try:
            chronyd = common.start_chronyd(s)
            silent = bind_silent(IN_FLIGHT)
            snaps = common.private_dir("ntpp-bench-tracemalloc-")
            s.dirs.append(snaps)
            prefix = snaps / "snap"
            # Under tracemalloc the exporter is slower at taking 1000 requests in: a longer
            # probe timeout keeps the first ones in flight until the last arrive.
            modules: dict[str, Any] = {
                "silent": common.one_sample_module(f"{TRACED_TIMEOUT:g}s",
                                                   f"{TRACED_TIMEOUT:g}s"),
                "load_0": common.one_sample_module(),
            }
            exporter = common.start_exporter(s, modules, max_concurrent=2 * IN_FLIGHT,
                                             tracemalloc_out=prefix)
            for i in range(1, 51):
                common.http_get(f"{exporter.base}/probe?module=load_0&target=127.0.0.{i}:"
                                f"{chronyd.port}")
            os.kill(exporter.pid, signal.SIGUSR1)
            if not _wait_file(Path(f"{prefix}.1")):
                raise SystemExit("no idle snapshot")
            idle_rss = common.proc_stats(exporter.pid)["rss_kb"]
            result = asyncio.run(in_flight_phase(
                exporter, silent, on_full=lambda: os.kill(exporter.pid, signal.SIGUSR1),
                probe_timeout=TRACED_TIMEOUT))
            if not _wait_file(Path(f"{prefix}.2")):
                raise SystemExit(f"no in-flight snapshot; in-flight gauge max "
                                 f"{result['max_in_flight']}")
            flt = (tracemalloc.Filter(False, tracemalloc.__file__),
                   tracemalloc.Filter(False, "<frozen importlib._bootstrap>"))
            idle = tracemalloc.Snapshot.load(f"{prefix}.1").filter_traces(flt)
            full = tracemalloc.Snapshot.load(f"{prefix}.2").filter_traces(flt)
        finally:
            for sock in silent:
                with contextlib.suppress(OSError):
                    sock.close()
    total = sum(st.size_diff for st in full.compare_to(idle, "filename"))
    lines = [f"## memory attribution (tracemalloc; RSS idle {idle_rss / 1024:.1f} MB "
             f"-> max {result['rss_kb_max'] / 1024:.1f} MB under tracing)",
             "", f"traced Python allocations grew by {total / 1024:.0f} KiB with "
             f"{result['max_in_flight']} probes in flight "
             f"({total / max(1, result['max_in_flight']):.0f} B per probe)", "",
             "by package:"]
    groups: dict[str, list[int]] = {}
    for st in full.compare_to(idle, "filename"):
        name = st.traceback[0].filename
        key = ("ntp_probe" if "/ntp_probe/" in name else "aiohttp" if "/aiohttp/" in name
               else "asyncio" if "/asyncio/" in name else "other")
        g = groups.setdefault(key, [0, 0])
        g[0] += st.size_diff
        g[1] += st.count_diff
    for key, (size, count) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"    {size / 1024:9.0f} KiB  {count:+8d} blocks  {key} "
                     f"({size / max(1, result['max_in_flight']):.0f} B per probe)")
    lines += ["", "by file:"]
    for st in full.compare_to(idle, "filename")[:12]:
        lines.append(f"    {st.size_diff / 1024:9.0f} KiB  {st.count_diff:+8d} blocks  "
                     f"{st.traceback[0].filename}")
    lines += ["", "by line:"]
    for st in full.compare_to(idle, "lineno")[:20]:
        fr = st.traceback[0]
        lines.append(f"    {st.size_diff / 1024:9.0f} KiB  {st.count_diff:+8d} blocks  "
                     f"{fr.filename}:{fr.lineno}")
    lines += ["", "by call path (top 6, innermost last):"]
    for st in full.compare_to(idle, "traceback")[:6]:
        lines.append(f"  {st.size_diff / 1024:.0f} KiB {st.count_diff:+d} blocks:")
        for fr in list(st.traceback)[-6:]:
            lines.append(f"      {fr.filename}:{fr.lineno}")
    text = "\n".join(lines)
    print(text, flush=True)
    path = common.write_result("memory-tracemalloc", {"in_flight": result}, text)
    common.say(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="exporter memory: idle, 1000 in flight, load")
    ap.add_argument("--quick", action="store_true", help="20k probes in the load phase")
    ap.add_argument("--probes", type=int, help="probes in the load phase (default 200k)")
    ap.add_argument("--max-seconds", type=float, default=900.0,
                    help="upper bound for the load phase")
    ap.add_argument("--tracemalloc", action="store_true",
                    help="instead: attribute the in-flight memory with tracemalloc")
    args = ap.parse_args(argv)
    if args.tracemalloc:
        return tracemalloc_run(args)
    total = args.probes or (20_000 if args.quick else 200_000)
    baseline_at = total // 10
    common.raise_fd_limit()
    wrk = common.ensure_binary("wrk", "wrk")
    data: dict[str, Any] = {"quick": args.quick, "total": total, "baseline_at": baseline_at}
    silent: list[socket.socket] = []
    with common.started() as s:
        try:
            chronyd = common.start_chronyd(s)
            silent = bind_silent(IN_FLIGHT)
            modules: dict[str, Any] = {
                "silent": common.one_sample_module(f"{SILENT_TIMEOUT:g}s",
                                                   f"{SILENT_TIMEOUT:g}s"),
            }
            for t in range(LOAD_THREADS):
                modules[f"load_{t}"] = common.one_sample_module()
            # Phase 1, a fresh exporter: idle, then IN_FLIGHT silent probes at once.
            exporter = common.start_exporter(s, modules, max_concurrent=2 * IN_FLIGHT)
            time.sleep(1.0)
            data["idle_fresh"] = common.proc_stats(exporter.pid)
            for i in range(1, 51):  # warm-up: every code path of a success once per address
                common.http_get(f"{exporter.base}/probe?module=load_0&target=127.0.0.{i}:"
                                f"{chronyd.port}")
            data["idle_warm"] = common.proc_stats(exporter.pid)
            common.say(f"{IN_FLIGHT} silent probes in flight ...")
            data["in_flight"] = asyncio.run(in_flight_phase(exporter, silent))
            time.sleep(1.0)
            data["after_in_flight"] = common.proc_stats(exporter.pid)
            if exporter.proc.poll() is not None:
                raise SystemExit(f"exporter died:\n{exporter.log()}")
            s.stop(exporter.proc)
            # Phase 2, another fresh exporter, so the burst above cannot hide growth here.
            exporter = common.start_exporter(s, modules, max_concurrent=2 * IN_FLIGHT)
            time.sleep(1.0)
            data["load_idle"] = common.proc_stats(exporter.pid)
            work = common.private_dir("ntpp-bench-mem-")
            s.dirs.append(work)
            common.say(f"load: {total:,} probes (fresh exporter) ...")
            data["load"] = load_phase(wrk, exporter, chronyd.port, total, baseline_at,
                                      args.max_seconds, work)
            time.sleep(1.0)
            data["idle_after"] = common.proc_stats(exporter.pid)
            if exporter.proc.poll() is not None:
                raise SystemExit(f"exporter died:\n{exporter.log()}")
        finally:
            for sock in silent:
                with contextlib.suppress(OSError):
                    sock.close()

    def mb(kb: float) -> str:
        return f"{kb / 1024:.1f}"

    fl = data["in_flight"]
    load = data["load"]
    rows = [
        ["idle (fresh)", mb(data["idle_fresh"]["rss_kb"]), data["idle_fresh"]["fds"],
         data["idle_fresh"]["threads"], ""],
        ["idle (after 50 probes)", mb(data["idle_warm"]["rss_kb"]), data["idle_warm"]["fds"],
         data["idle_warm"]["threads"], ""],
        [f"{IN_FLIGHT} in flight (max)", mb(fl["rss_kb_max"]), fl["fds_max"],
         fl["threads_max"], f"in-flight gauge max {fl['max_in_flight']}, "
         f"statuses {fl['statuses']}, reasons {fl['failure_reasons']}"],
        ["after the in-flight burst", mb(data["after_in_flight"]["rss_kb"]),
         data["after_in_flight"]["fds"], data["after_in_flight"]["threads"], ""],
        ["load: fresh exporter, idle", mb(data["load_idle"]["rss_kb"]),
         data["load_idle"]["fds"], data["load_idle"]["threads"], ""],
    ]
    for c in load["checkpoints"]:
        rows.append([f"after {c['probes']:,} probes", mb(c["rss_kb"]), c["fds"], c["threads"],
                     f"{c['elapsed_s']} s"])
    rows.append(["idle at the end", mb(data["idle_after"]["rss_kb"]), data["idle_after"]["fds"],
                 data["idle_after"]["threads"], f"VmHWM {mb(data['idle_after']['hwm_kb'])} MB"])
    md = common.md_table(["state", "RSS MB", "fds", "threads", "notes"], rows)
    verdicts = []
    rss_fl = fl["rss_kb_max"] / 1024
    verdicts.append(f"RSS with {IN_FLIGHT} in flight: {rss_fl:.1f} MB vs target <= "
                    f"{TARGET_RSS_MB:.0f} MB -> " + ("MET" if rss_fl <= TARGET_RSS_MB
                                                     else "MISSED")
                    + ("" if fl["max_in_flight"] >= IN_FLIGHT else
                       f" (only {fl['max_in_flight']} seen in flight at once)"))
    g = load["growth_pct"]
    if g is not None and load["baseline"] is not None:
        verdicts.append(f"RSS growth from {load['baseline']['probes']:,} to "
                        f"{load['end']['probes']:,} probes: {g:+.2f}% vs target < "
                        f"{TARGET_GROWTH_PCT:.0f}% -> "
                        + ("MET" if g < TARGET_GROWTH_PCT else "MISSED"))
    if not load["completed"]:
        verdicts.append(f"load phase stopped at its time bound ({args.max_seconds:g} s)")
    verdicts.append(f"wrk errors in the load phase: {load['wrk_errors']}")
    text = f"## memory (load phase {total:,} probes)\n\n{md}\n\n" + "\n".join(
        f"- {v}" for v in verdicts)
    print(text, flush=True)
    data["verdicts"] = verdicts
    path = common.write_result("memory", data, text)
    common.say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
