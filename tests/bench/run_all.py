#!/usr/bin/env python3
"""Run every benchmark and print all their tables.

    python tests/bench/run_all.py [--quick] [--only engine,http_load,probe_cpu,memory,soak]
                                  [--soak-duration SECONDS]

Benchmarks (each also runs alone: ``python tests/bench/NAME.py [--quick]``; none is
collected by pytest, and none is a timed assertion):
  engine.py  in-process queries/s and |offset| p50/p99/max at concurrency 1/100/1000:
             ntp_probe's Exchange and run_probe beside ntplib in a thread pool
  http_load.py wrk on /probe of the real exporter vs Debian's blackbox_exporter ICMP probe;
             /metrics latency idle and with /probe saturated
  probe_cpu.py /probe probes per server CPU-second, ntp_probe (1 sample) vs blackbox_exporter
             ICMP, every request in flight on a distinct 127.T.x.y target; the exporter's
             own probe counter; ratio (target >= 2x)
  memory.py  exporter RSS/fds idle, with 1000 probes in flight, and over 200k probes
             (--quick 20k); ``memory.py --tracemalloc`` attributes the in-flight memory
  soak.py    bounded soak (here 60 s, --quick 20 s; alone: 10 min or --duration) of mixed
             probes, failures, timeouts, debug, /metrics and /; fds, RSS, threads flat?
Rules they keep: loopback only (127.0.0.0/8); chronyd always with -x, in a 0700 temp dir,
on a free port, with no bindaddress (it answers 127.0.0.1..127.0.0.50) and
``allow 127.0.0.0/8``; everything they start is stopped by PID in ``finally``; every
loop is bounded in time and count. Missing tools are installed when root: Debian's wrk
and prometheus-blackbox-exporter (with /usr/sbin/policy-rc.d exiting 101 first, so no
daemon starts), pip's ntplib (and py-spy for --profile); what was installed is printed.
Results: tests/bench/results/<name>.json (gitignored), each with its markdown table.
Options of the scripts not exposed here: engine.py/http_load.py/probe_cpu.py --profile (py-spy
hot spots).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BENCHES = ("engine", "http_load", "probe_cpu", "memory", "soak")
# Upper bounds per script (seconds), beyond their own internal bounds.
TIME_BOUND = {"engine": 600, "http_load": 900, "probe_cpu": 600, "memory": 1500, "soak": 300}


def run(name: str, argv: list[str], bound: float) -> int:
    """Run one benchmark script; SIGTERM it at its bound (it then stops what it started)."""
    cmd = [sys.executable, str(HERE / f"{name}.py"), *argv]
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, cwd=HERE.parents[1])
    try:
        return proc.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        print(f"=== {name}: over its {bound:.0f} s bound, stopping it", flush=True)
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            return proc.wait(timeout=60)
    except KeyboardInterrupt:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        raise


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="run all benchmarks in tests/bench")
    ap.add_argument("--quick", action="store_true", help="small, fast versions of each")
    ap.add_argument("--only", default=",".join(BENCHES),
                    help=f"comma-separated subset of {','.join(BENCHES)}")
    ap.add_argument("--soak-duration", type=float,
                    help="soak seconds (default 60; --quick 20)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(unknown)}")
    soak_seconds = args.soak_duration or (20.0 if args.quick else 60.0)
    started = time.time()
    codes = {}
    for name in names:
        extra = ["--quick"] if args.quick else []
        bound = float(TIME_BOUND[name])
        if name == "soak":
            extra = ["--duration", f"{soak_seconds:g}"]
            bound = soak_seconds + TIME_BOUND["soak"]
        codes[name] = run(name, extra, bound)
    print("\n\n# All benchmark tables\n", flush=True)
    installed: list[str] = []
    for name in names:
        path = RESULTS / f"{name}.json"
        if not path.exists() or path.stat().st_mtime < started:
            print(f"## {name}: no result (exit code {codes[name]})\n")
            continue
        data = json.loads(path.read_text())
        installed += data.get("installed", [])
        print(data.get("markdown", f"## {name}: no table"))
        print(f"\n(exit code {codes[name]}; {path.relative_to(HERE.parents[1])})\n", flush=True)
    print("installed during this run: " + (", ".join(installed) if installed else "nothing"))
    return max(codes.values(), default=0)


if __name__ == "__main__":
    sys.exit(main())
