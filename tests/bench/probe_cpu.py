#!/usr/bin/env python3
"""/probe probes per server CPU-second: ntp_probe beside Debian's blackbox_exporter ICMP.

    python tests/bench/probe_cpu.py [--quick] [--profile] [--rounds N] [--seconds S]

What is measured, per round (rounds alternate the two servers):
- ntp_probe: ``wrk -tT -cC -dS`` on ``/probe?module=ntp_fast&target=127.T.X.Y:PORT``, a
  1-sample ip4 module (the packaged ``ntp_fast`` shape). wrk thread T (1-based) walks its
  own address range 127.T.0.1, 127.T.0.2, ..., 127.T.255.254 (65,024 addresses, more
  than one thread sends in a run), so every request in flight names a DISTINCT target and
  the exporter's shared bursts (identical probes in flight share one) cannot stand in for
  work. One chronyd -x without bindaddress answers on every 127.x address. Probes are
  the exporter's own ``ntp_probe_probes_total`` (read from /metrics before and after),
  not wrk's request count; CPU is the exporter process's user + system time
  (/proc/PID/stat) over the same span. The exporter runs on the Python that runs this
  script (printed; see ``common.interpreter`` for why the build matters).
- blackbox_exporter: the same wrk, the same address walk, on
  ``/probe?module=icmp&target=127.T.X.Y``. blackbox counts no probes of its own, so its
  probes are wrk's completed requests (blackbox shares nothing: one request, one probe).
- Both: wrk's Lua counts the replies whose body says ``probe_success 1``.
The figure printed: probes per CPU-second of each server (median over rounds), and
their ratio (target >= 2x). ``--profile`` also records the exporter with py-spy during
one extra, uncounted run and prints its hot spots.

Loopback only; chronyd always -x; every wrk run is bounded by -d and a subprocess
timeout; everything started is stopped by PID on the way out. Installs wrk and
prometheus-blackbox-exporter from Debian (root only) and py-spy from pip (--profile)
when missing. Prints markdown; writes tests/bench/results/probe_cpu.json.
"""

from __future__ import annotations

import os
import sys

# Run as a script: the repository root must be importable (tests.bench.common, ntp_probe).
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from tests.bench import common  # noqa: E402
from tests.conftest import raw_ntp_query  # noqa: E402

TARGET_RATIO = 2.0
MODULE = "ntp_fast"
# Wait after wrk stops for the requests it abandoned to unwind (the exporter cancels a
# probe whose client hung up) before the CPU and the counter are read again.
SETTLE = 0.5

# Per wrk thread: its own second octet (127.T.x.y), y in 1..254 so that no address ends
# in .0 or .255. ``ok`` counts bodies saying probe_success 1, summed over threads in done.
WRK_LUA_DISTINCT = r"""
local threads = {}
local counter = 0
setup = function(thread)
  counter = counter + 1
  thread:set("tid", counter)
  table.insert(threads, thread)
end
local i = 0
ok = 0  -- a global: done() reads it from each thread with thread:get
request = function()
  local x = math.floor(i / 254) % 256
  local y = i % 254 + 1
  i = i + 1
  return wrk.format("GET", "__PATH__&target=127." .. tid .. "." .. x .. "." .. y .. "__PORT__")
end
response = function(status, headers, body)
  if string.find(body, "probe_success 1", 1, true) then ok = ok + 1 end
end
done = function(summary, latency, requests)
  local good = 0
  for _, t in ipairs(threads) do good = good + t:get("ok") end
  local e = summary.errors
  io.write(string.format('BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,' ..
    '"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,' ..
    '"mean_us":%.1f,"ok":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean, good))
end
"""


def distinct_script(d: Path, name: str, path: str, port_suffix: str) -> Path:
    """A wrk script giving each thread its own 127.T.x.y range (see the module docstring)."""
    script = d / f"distinct-{name}.lua"
    script.write_text(WRK_LUA_DISTINCT.replace("__PATH__", path)
                      .replace("__PORT__", port_suffix))
    return script


def probes_counted(base: str) -> tuple[float, float]:
    """(all probes, successful probes) from the exporter's ntp_probe_probes_total."""
    status, body = common.http_get(base + "/metrics")
    if status != 200:
        raise SystemExit(f"/metrics answered {status}: {body[:500]}")
    values = common.metric_values(body, "ntp_probe_probes_total")
    return (sum(values.values()),
            sum(v for k, v in values.items() if 'result="success"' in k))


def check_addresses(port: int, threads: int) -> None:
    """chronyd answers at both ends of every thread's range, or the run would measure
    timeouts."""
    for t in range(1, threads + 1):
        for address in (f"127.{t}.0.1", f"127.{t}.255.254"):
            if raw_ntp_query(address, port) is None:
                raise SystemExit(f"chronyd does not answer on {address}:{port}")


def measure_ours(wrk: str, exporter: common.Server, script: Path, seconds: int, threads: int,
                 connections: int, ours_pids: list[int],
                 headers: Sequence[str] = ()) -> dict[str, Any]:
    """One wrk run on ntp_probe: the exporter's own probe count and its CPU seconds."""
    before, before_ok = probes_counted(exporter.base)
    foreign = common.ForeignCpu(ours_pids)
    cpu0 = common.cpu_seconds(exporter.pid)
    r = common.run_wrk(wrk, exporter.base, script, seconds, threads, connections, headers)
    time.sleep(SETTLE)
    r["cpu_s"] = common.cpu_seconds(exporter.pid) - cpu0
    r["foreign_cpu_s"] = foreign.seconds()
    after, after_ok = probes_counted(exporter.base)
    r["probes"] = after - before
    r["probes_ok"] = after_ok - before_ok
    r["probes_per_cpu_s"] = r["probes"] / r["cpu_s"] if r["cpu_s"] > 0 else float("nan")
    return r


def measure_blackbox(wrk: str, bb: common.Server, script: Path, seconds: int, threads: int,
                     connections: int, ours_pids: list[int],
                     headers: Sequence[str] = ()) -> dict[str, Any]:
    """One wrk run on blackbox_exporter: completed requests (= probes) and its CPU seconds."""
    foreign = common.ForeignCpu(ours_pids)
    cpu0 = common.cpu_seconds(bb.pid)
    r = common.run_wrk(wrk, bb.base, script, seconds, threads, connections, headers)
    time.sleep(SETTLE)
    r["cpu_s"] = common.cpu_seconds(bb.pid) - cpu0
    r["foreign_cpu_s"] = foreign.seconds()
    r["probes"] = r["requests"]
    r["probes_ok"] = r["ok"]
    r["probes_per_cpu_s"] = r["probes"] / r["cpu_s"] if r["cpu_s"] > 0 else float("nan")
    return r


def profile_exporter(wrk: str, exporter: common.Server, script: Path, seconds: int,
                     threads: int, connections: int) -> dict[str, Any] | None:
    """py-spy the exporter during one extra (uncounted) wrk run; its hot spots."""
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    out = common.RESULTS / "probe_cpu-exporter.collapsed"
    spy = common.start_py_spy(exporter.pid, seconds, out)
    if spy is None:
        return None
    try:
        time.sleep(0.5)  # py-spy attaches before the load starts
        common.run_wrk(wrk, exporter.base, script, seconds, threads, connections)
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.wait(timeout=seconds + 30)
    finally:
        common.stop_process(spy)
    common.say(f"profile: {out}")
    return common.top_frames(out, n=25)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="/probe probes per CPU-second: ntp_probe vs "
                                             "blackbox_exporter ICMP, distinct targets")
    ap.add_argument("--quick", action="store_true", help="3 s wrk runs, one round")
    ap.add_argument("--seconds", type=int, help="wrk duration per run (default 8, quick 3)")
    ap.add_argument("--rounds", type=int, help="alternating rounds (default 3, quick 1)")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads (default 2, <= 254)")
    ap.add_argument("--connections", type=int, default=64,
                    help="wrk connections, i.e. requests in flight (default 64)")
    ap.add_argument("--gzip", action="store_true",
                    help="send Accept-Encoding: gzip, as Prometheus does, to both exporters")
    ap.add_argument("--profile", action="store_true",
                    help="also py-spy the exporter during one extra, uncounted run")
    args = ap.parse_args(argv)
    seconds = args.seconds or (3 if args.quick else 8)
    rounds = args.rounds or (1 if args.quick else 3)
    headers = ("Accept-Encoding: gzip",) if args.gzip else ()
    if not 1 <= args.threads <= 254 or args.connections < args.threads:
        ap.error("need 1 <= --threads <= 254 and --connections >= --threads")
    common.raise_fd_limit()
    wrk = common.ensure_binary("wrk", "wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed and cannot be (apt-get install wrk as root)")
    bb_bin = common.ensure_binary("prometheus-blackbox-exporter", "prometheus-blackbox-exporter")
    if bb_bin is None:
        raise SystemExit("prometheus-blackbox-exporter is not installed and cannot be")
    ours: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    profile = None
    with common.started() as s:
        chronyd = common.start_chronyd(s)
        check_addresses(chronyd.port, args.threads)
        exporter = common.start_exporter(s, {MODULE: common.one_sample_module()},
                                         max_concurrent=max(1000, 2 * args.connections))
        bb = common.start_blackbox(s, bb_bin)
        work = common.private_dir("ntpp-bench-probe-cpu-")
        s.dirs.append(work)
        status, body = common.http_get(
            f"{exporter.base}/probe?module={MODULE}&target=127.1.2.3:{chronyd.port}")
        if status != 200 or "probe_success 1" not in body:
            raise SystemExit(f"ntp_probe sanity probe failed ({status}):\n{body}\n"
                             f"{exporter.log()}")
        status, body = common.http_get(f"{bb.base}/probe?module=icmp&target=127.1.2.3")
        if status != 200 or "probe_success 1" not in body:
            raise SystemExit(f"blackbox ICMP sanity probe failed ({status}):\n{body}\n"
                             f"{bb.log()}")
        ours_script = distinct_script(work, "ntp_probe", f"/probe?module={MODULE}",
                                      f":{chronyd.port}")
        bb_script = distinct_script(work, "blackbox", "/probe?module=icmp", "")
        # Warm-up (not counted): imports, caches, the allocator's arenas, Go's heap.
        common.run_wrk(wrk, exporter.base, ours_script, 1, args.threads, args.connections)
        common.run_wrk(wrk, bb.base, bb_script, 1, args.threads, args.connections)
        # Busy CPU of anything else on the machine is reported beside each run: other work
        # sharing the cores makes every process's CPU time per unit of work grow.
        ours_pids = [exporter.pid, bb.pid, chronyd.proc.pid]
        for rnd in range(1, rounds + 1):
            common.say(f"round {rnd}/{rounds}: ntp_probe ...")
            ours.append(measure_ours(wrk, exporter, ours_script, seconds, args.threads,
                                     args.connections, ours_pids, headers))
            common.say(f"round {rnd}/{rounds}: blackbox_exporter icmp ...")
            theirs.append(measure_blackbox(wrk, bb, bb_script, seconds, args.threads,
                                           args.connections, ours_pids, headers))
        if args.profile:
            profile = profile_exporter(wrk, exporter, ours_script, seconds, args.threads,
                                       args.connections)
        if exporter.proc.poll() is not None:
            raise SystemExit(f"exporter died:\n{exporter.log()}")

    rows = []
    for name, runs in (("ntp_probe ntp_fast", ours), ("blackbox_exporter icmp", theirs)):
        for i, r in enumerate(runs, 1):
            rows.append([name, i, f"{r['requests']:,}", f"{r['probes']:,.0f}",
                         f"{r['probes_ok']:,.0f}", r["errors"], common.fmt(r["cpu_s"], 2),
                         common.fmt(r["probes_per_cpu_s"], 0),
                         common.fmt(1e6 / r["probes_per_cpu_s"], 0),
                         common.fmt(r["p50_us"] / 1e3, 2), common.fmt(r["p99_us"] / 1e3, 2),
                         common.fmt(r["foreign_cpu_s"], 1)])
    md = common.md_table(
        ["server", "round", "wrk requests", "probes counted", "probe_success 1", "wrk errors",
         "server CPU s", "probes/CPU-s", "CPU us/probe", "p50 ms", "p99 ms",
         "other load CPU s"], rows)
    ours_rate = statistics.median(r["probes_per_cpu_s"] for r in ours)
    bb_rate = statistics.median(r["probes_per_cpu_s"] for r in theirs)
    ratio = ours_rate / bb_rate
    lines = [
        f"probes counted (ntp_probe_probes_total): {sum(r['probes'] for r in ours):,.0f} in "
        f"{sum(r['cpu_s'] for r in ours):.2f} exporter CPU s",
        f"ntp_probe: {ours_rate:,.0f} probes per CPU-second (median of {len(ours)})",
        f"blackbox_exporter icmp: {bb_rate:,.0f} probes per CPU-second (median of "
        f"{len(theirs)})",
        f"ratio ntp_probe / blackbox = {ratio:.2f}x (target >= {TARGET_RATIO:g}x: "
        + ("MET" if ratio >= TARGET_RATIO else "MISSED") + ")",
        "per-round ratios: " + ", ".join(
            f"{a['probes_per_cpu_s'] / b['probes_per_cpu_s']:.2f}x"
            for a, b in zip(ours, theirs, strict=True)),
        f"the exporter ran on {common.interpreter()}",
        "requests sent Accept-Encoding: gzip, as Prometheus does" if args.gzip else
        "requests sent no Accept-Encoding (plain text; Prometheus asks for gzip: --gzip)",
        f"every request in flight names a distinct target: wrk thread T walks 127.T.0.1 .. "
        f"127.T.255.254 ({args.threads} threads, {args.connections} connections)",
        "'other load CPU s': busy CPU seconds on the machine during the run not spent by "
        "the two exporters, chronyd, wrk or this script (high values make that round "
        "unreliable)",
    ]
    text = (f"## probe_cpu (wrk -t{args.threads} -c{args.connections} -d{seconds}s, "
            f"{rounds} round(s))\n\n{md}\n\n" + "\n".join(f"- {x}" for x in lines))
    if profile and profile.get("self"):
        text += "\n\nprofile of the exporter under wrk (py-spy, self %):\n"
        text += "\n".join(f"    {pct:5.1f}%  {f}" for f, pct in profile["self"])
        text += "\n  inclusive %:\n"
        text += "\n".join(f"    {pct:5.1f}%  {f}" for f, pct in profile["inclusive"])
    print(text, flush=True)
    path = common.write_result("probe_cpu", {
        "quick": args.quick, "seconds": seconds, "rounds": rounds, "threads": args.threads,
        "connections": args.connections, "ours": ours, "blackbox": theirs,
        "ours_probes_per_cpu_s": ours_rate, "blackbox_probes_per_cpu_s": bb_rate,
        "ratio": ratio, "profile": profile,
    }, text)
    common.say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
