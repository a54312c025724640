#!/usr/bin/env python3
"""/probe throughput and latency of the real exporter process, with wrk, beside Debian's
prometheus-blackbox-exporter (ICMP) on loopback.

    python tests/bench/http_load.py [--quick] [--profile] [--rounds N]

- ours: ``wrk -t2 -c50 -d5s`` on /probe with a 1-sample ip4 module; a Lua script picks
  the target per request, rotating over 127.0.0.1 ... 127.0.0.50 (one chronyd -x without
  bindaddress). Each wrk thread uses its own (identical) module, so two threads never ask
  for the same (module, target) at once and the exporter's coalescing of identical probes
  cannot stand in for per-probe work (the exporter's own count of unshared probes is
  printed beside wrk's count of requests).
- blackbox: the same wrk on ``/probe?module=icmp&target=127.0.0.1`` (falls back to
  tcp_connect to the exporter's port when ICMP does not work here, and says so).
- /metrics latency: sequential GETs on a keep-alive connection, idle and while /probe is
  saturated by wrk.
Installs wrk and prometheus-blackbox-exporter from Debian when missing (root only).
Prints markdown tables; writes tests/bench/results/http.json.
"""

from __future__ import annotations

import os
import sys

# Run as a script: the repository root must be importable (tests.bench.common, ntp_probe).
_HERE = os.path.dirname(os.path.realpath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

import argparse  # noqa: E402
import http.client  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from tests.bench import common  # noqa: E402

TARGET_RATIO = 1.5
WRK_THREADS = 2
WRK_CONNECTIONS = 50

class MetricsSampler(threading.Thread):
    """Sequential GET /metrics on one keep-alive connection, every ``interval`` seconds."""

    def __init__(self, port: int, interval: float, stop_after: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.interval = interval
        self.stop_after = stop_after
        self.latencies_ms: list[float] = []
        self.errors = 0
        self.halt = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection(common.LOOPBACK, self.port, timeout=10)
        end = time.monotonic() + self.stop_after
        try:
            while not self.halt.is_set() and time.monotonic() < end:
                t0 = time.perf_counter()
                try:
                    conn.request("GET", "/metrics")
                    resp = conn.getresponse()
                    resp.read()
                    if resp.status != 200:
                        self.errors += 1
                    else:
                        self.latencies_ms.append((time.perf_counter() - t0) * 1e3)
                except OSError:
                    self.errors += 1
                    conn.close()
                    conn = http.client.HTTPConnection(common.LOOPBACK, self.port, timeout=10)
                self.halt.wait(self.interval)
        finally:
            conn.close()


def probes_total(base: str) -> float:
    status, body = common.http_get(base + "/metrics")
    if status != 200:
        return float("nan")
    return sum(common.metric_values(body, "ntp_probe_probes_total").values())


def probe_failures(base: str) -> dict[str, float]:
    _, body = common.http_get(base + "/metrics")
    return {k: v for k, v in common.metric_values(body, "ntp_probe_probes_total").items()
            if 'result="success"' not in k}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="wrk /probe: ntp_probe vs blackbox_exporter")
    ap.add_argument("--quick", action="store_true", help="2 s wrk runs, one round")
    ap.add_argument("--seconds", type=int, help="wrk duration per run (default 5, quick 2)")
    ap.add_argument("--rounds", type=int, help="alternating rounds (default 3, quick 1)")
    ap.add_argument("--profile", action="store_true",
                    help="also py-spy the exporter during one extra saturated run")
    args = ap.parse_args(argv)
    seconds = args.seconds or (2 if args.quick else 5)
    rounds = args.rounds or (1 if args.quick else 3)
    common.raise_fd_limit()
    wrk = common.ensure_binary("wrk", "wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed and cannot be (apt-get install wrk as root)")
    bb_bin = common.ensure_binary("prometheus-blackbox-exporter", "prometheus-blackbox-exporter")
    ours_runs: list[dict[str, Any]] = []
    bb_runs: list[dict[str, Any]] = []
    notes: list[str] = []
    data: dict[str, Any] = {"quick": args.quick, "seconds": seconds, "rounds": rounds}
    with common.started() as s:
        chronyd = common.start_chronyd(s)
        modules = {f"bench_{t}": common.one_sample_module() for t in range(WRK_THREADS)}
        exporter = common.start_exporter(s, modules, max_concurrent=1000)
        work = common.private_dir("ntpp-bench-wrk-")
        s.dirs.append(work)
        status, body = common.http_get(
            f"{exporter.base}/probe?module=bench_0&target=127.0.0.7:{chronyd.port}")
        if status != 200 or "probe_success 1" not in body:
            raise SystemExit(f"sanity probe failed ({status}):\n{body}\n{exporter.log()}")
        rotate = common.wrk_rotate_script(work, chronyd.port, "bench_")
        done_only = common.wrk_done_script(work)

        bb = None
        bb_path = ""
        if bb_bin is None:
            notes.append("prometheus-blackbox-exporter not installed: no peer figures")
        else:
            bb = common.start_blackbox(s, bb_bin)
            bb_path = "/probe?module=icmp&target=127.0.0.1"
            status, body = common.http_get(bb.base + bb_path)
            if status != 200 or "probe_success 1" not in body:
                notes.append(f"blackbox ICMP probe failed here ({status}); fell back to "
                             f"tcp_connect to the exporter's port")
                bb_path = f"/probe?module=tcp_connect&target=127.0.0.1:{exporter.port}"
                status, body = common.http_get(bb.base + bb_path)
                if status != 200 or "probe_success 1" not in body:
                    notes.append(f"blackbox tcp_connect failed too ({status}): no peer")
                    bb = None
            data["blackbox_probe"] = bb_path

        # /metrics latency, idle.
        idle = MetricsSampler(exporter.port, 0.01, stop_after=2.0 if args.quick else 4.0)
        idle.start()
        idle.join()

        # Warm-up (not counted).
        common.run_wrk(wrk, exporter.base, rotate, 1)
        if bb is not None:
            common.run_wrk(wrk, bb.base + bb_path, done_only, 1)

        busy_ms: list[float] = []
        busy_errors = 0
        for rnd in range(rounds):
            before_total, cpu0 = probes_total(exporter.base), common.cpu_seconds(exporter.pid)
            foreign = common.ForeignCpu([exporter.pid, chronyd.proc.pid]
                                        + ([bb.pid] if bb is not None else []))
            sampler = MetricsSampler(exporter.port, 0.05, stop_after=seconds + 5)
            sampler.start()
            common.say(f"round {rnd + 1}: wrk on ntp_probe /probe ...")
            r = common.run_wrk(wrk, exporter.base, rotate, seconds, WRK_THREADS,
                               WRK_CONNECTIONS)
            sampler.halt.set()
            sampler.join()
            r["exporter_cpu_s"] = common.cpu_seconds(exporter.pid) - cpu0
            r["foreign_cpu_s"] = foreign.seconds()
            r["probes_counted"] = probes_total(exporter.base) - before_total
            r["cpu_us_per_request"] = 1e6 * r["exporter_cpu_s"] / max(1, r["requests"])
            r["rss_kb"] = common.proc_stats(exporter.pid)["rss_kb"]
            ours_runs.append(r)
            busy_ms.extend(sampler.latencies_ms)
            busy_errors += sampler.errors
            if bb is not None:
                common.say(f"round {rnd + 1}: wrk on blackbox_exporter {bb_path} ...")
                cpu0 = common.cpu_seconds(bb.pid)
                foreign = common.ForeignCpu([exporter.pid, chronyd.proc.pid, bb.pid])
                rb = common.run_wrk(wrk, bb.base + bb_path, done_only, seconds, WRK_THREADS,
                                    WRK_CONNECTIONS)
                rb["exporter_cpu_s"] = common.cpu_seconds(bb.pid) - cpu0
                rb["foreign_cpu_s"] = foreign.seconds()
                rb["cpu_us_per_request"] = 1e6 * rb["exporter_cpu_s"] / max(1, rb["requests"])
                rb["rss_kb"] = common.proc_stats(bb.pid)["rss_kb"]
                bb_runs.append(rb)

        failures = probe_failures(exporter.base)
        profile = None
        if args.profile:
            out = common.RESULTS / "http-exporter.collapsed"
            common.RESULTS.mkdir(parents=True, exist_ok=True)
            spy = common.start_py_spy(exporter.pid, seconds, out)
            if spy is not None:
                time.sleep(0.5)
                common.run_wrk(wrk, exporter.base, rotate, seconds, WRK_THREADS,
                               WRK_CONNECTIONS)
                try:
                    spy.wait(timeout=seconds + 30)
                except subprocess.TimeoutExpired:
                    common.stop_process(spy)
                profile = common.top_frames(out)
        if exporter.proc.poll() is not None:
            raise SystemExit(f"exporter died:\n{exporter.log()}")

    def median(runs: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in runs) if runs else float("nan")

    rows = []
    for name, runs in (("ntp_probe /probe (1 sample, 50 targets)", ours_runs),
                       (f"blackbox_exporter {bb_path}", bb_runs)):
        for i, r in enumerate(runs, 1):
            rows.append([name, i, f"{r['requests']:,}", common.fmt(r["rps"], 0),
                         common.fmt(r["p50_us"] / 1e3, 2), common.fmt(r["p90_us"] / 1e3, 2),
                         common.fmt(r["p99_us"] / 1e3, 2), common.fmt(r["p999_us"] / 1e3, 2),
                         common.fmt(r["max_us"] / 1e3, 2), r["errors"],
                         common.fmt(r["cpu_us_per_request"], 0), f"{r['rss_kb'] / 1024:.1f}",
                         common.fmt(r["foreign_cpu_s"], 1)])
    md = common.md_table(
        ["server", "round", "requests", "req/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms",
         "max ms", "errors", "server CPU us/req", "RSS MB", "other load CPU s"], rows)
    ours_rps, bb_rps = median(ours_runs, "rps"), median(bb_runs, "rps")
    lines = [f"ntp_probe median {ours_rps:,.0f} req/s, server CPU "
             f"{median(ours_runs, 'cpu_us_per_request'):,.0f} us/request"]
    ratio = None
    if bb_runs:
        ratio = ours_rps / bb_rps
        lines.append(f"blackbox_exporter median {bb_rps:,.0f} req/s, server CPU "
                     f"{median(bb_runs, 'cpu_us_per_request'):,.0f} us/request; ratio "
                     f"ours/blackbox (medians) = {ratio:.2f}x vs target >= {TARGET_RATIO}x -> "
                     + ("MET" if ratio >= TARGET_RATIO else "MISSED"))
        lines.append("per-round ratios: " + ", ".join(
            f"{a['rps'] / b['rps']:.2f}x" for a, b in zip(ours_runs, bb_runs, strict=False)))
        lines.append("'other load CPU s': busy CPU seconds on the machine during the run "
                     "not spent by chronyd, the two exporters, wrk or this script (other "
                     "work sharing the 2 cores; high values make that round unreliable)")
    done = sum(r["requests"] for r in ours_runs)
    counted = sum(r["probes_counted"] for r in ours_runs)
    lines.append(f"wrk completed {done:,} /probe requests; the exporter counted {counted:,.0f} "
                 f"unshared probes (coalesced ones are not counted; the difference is within "
                 f"the {WRK_CONNECTIONS} requests in flight when wrk stops)")
    lines.append("non-success probes counted by the exporter over the whole run: "
                 + (", ".join(f"{k} {v:.0f}" for k, v in failures.items()) or "none"))
    idle_s = common.summary(idle.latencies_ms)
    busy_s = common.summary(busy_ms)
    md2 = common.md_table(
        ["/metrics", "n", "p50 ms", "p90 ms", "p99 ms", "max ms", "errors"],
        [["idle", idle_s["n"], common.fmt(idle_s["p50"], 2), common.fmt(idle_s["p90"], 2),
          common.fmt(idle_s["p99"], 2), common.fmt(idle_s["max"], 2), idle.errors],
         ["/probe saturated", busy_s["n"], common.fmt(busy_s["p50"], 2),
          common.fmt(busy_s["p90"], 2), common.fmt(busy_s["p99"], 2),
          common.fmt(busy_s["max"], 2), busy_errors]])
    text = (f"## http (wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{seconds}s, {rounds} "
            f"round(s))\n\n{md}\n\n" + "\n".join(f"- {x}" for x in lines + notes)
            + f"\n\n{md2}")
    if profile and profile.get("self"):
        text += "\n\nprofile of the exporter under wrk (py-spy, self %):\n"
        text += "\n".join(f"    {pct:5.1f}%  {f}" for f, pct in profile["self"][:15])
        text += "\n  inclusive %:\n"
        text += "\n".join(f"    {pct:5.1f}%  {f}" for f, pct in profile["inclusive"][:30])
    print(text, flush=True)
    data.update({"ours": ours_runs, "blackbox": bb_runs, "ratio": ratio, "notes": notes,
                 "metrics_idle_ms": idle_s, "metrics_busy_ms": busy_s,
                 "failures": failures, "profile": profile})
    path = common.write_result("http", data, text)
    common.say(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
