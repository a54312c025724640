#!/usr/bin/env python3
"""The exporter under attack: how long /-/healthy and a probe take while an outsider tries
to take it down. Prints the figures; asserts nothing (the test suite checks behaviour).

Scenarios, each against a real ``ntp-probe`` process on 127.0.0.1 (never another address),
with the open-files limit at systemd's default (1024):
  idle     1100 connections that never send a byte, plus 100 that send a header byte by
           byte (slowloris), held while /-/healthy and probes are timed
  bcrypt   300 concurrent wrong passwords against basic auth (cost 10) while an
           authenticated probe is timed
  dns      16 probes of names whose DNS server never answers (a private mount namespace:
           its own hosts file and resolv.conf, a black hole on 127.0.0.1:53) while a probe
           of a name in the hosts file is timed
  yaml     a 500-byte YAML alias bomb: --config.check, and POST /-/reload while /-/healthy
           is timed

Run: ``python tests/bench/attacks.py [--quick] [--only idle,bcrypt,dns,yaml]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script: the repository root must be importable (tests.bench.common, ntp_probe).
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import argparse
import base64
import contextlib
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tests.bench import common

NOFILE = 1024  # systemd's default LimitNOFILE
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi",
                                                               strict=True))


def timed(url: str, n: int, headers: dict[str, str] | None = None,
          timeout: float = 10.0) -> dict[str, Any]:
    """n sequential GETs: latency figures (ms) and how many failed."""
    took, failed = [], 0
    for _ in range(n):
        started = time.monotonic()
        request = urllib.request.Request(url, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as resp:
                body = resp.read().decode()
                ok = resp.status == 200 and ("probe_success 1" in body or body == "OK\n")
        except (OSError, urllib.error.URLError):
            ok = False
        took.append((time.monotonic() - started) * 1000)
        failed += not ok
    took.sort()
    return {"n": n, "failed": failed, "p50_ms": common.percentile(took, 50),
            "max_ms": took[-1]}


def row(scenario: str, what: str, r: dict[str, Any]) -> list[object]:
    return [scenario, what, r["n"], r["failed"], common.fmt(r["p50_ms"]),
            common.fmt(r["max_ms"])]


def start(s: common.Started, args: list[str], prefix: list[str] | None = None,
          modules: dict[str, Any] | None = None,
          auth: dict[str, str] | None = None) -> common.Server:
    """The exporter with the open-files limit at NOFILE (and an optional command prefix);
    ``auth`` is the header that gets through its basic auth, when it has some."""
    d = common.private_dir("ntpp-bench-attack-")
    s.dirs.append(d)
    config = common.write_modules(d, modules or {"one": common.one_sample_module()})
    prlimit = shutil.which("prlimit") or "/usr/bin/prlimit"

    def argv(port: int) -> list[str]:
        return [*(prefix or []), prlimit, f"--nofile={NOFILE}:{NOFILE}", "--",
                *common.exporter_command(), f"--config.file={config}",
                f"--web.listen-address={common.LOOPBACK}:{port}", "--log.level=warn", *args]

    return common._start_server(s, "ntp-probe", argv, d, health_headers=auth)


def hold(port: int, n: int, slow: int, stop: threading.Event) -> list[socket.socket]:
    """n idle connections and ``slow`` slowloris ones (a header byte every 0.5 s)."""
    idle = []
    for _ in range(n):
        try:
            idle.append(socket.create_connection((common.LOOPBACK, port), timeout=2))
        except OSError:
            break
    slow_socks = []
    for _ in range(slow):
        try:
            slow_socks.append(socket.create_connection((common.LOOPBACK, port), timeout=2))
        except OSError:
            break

    def drip() -> None:
        header = b"GET /-/healthy HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
        for i in range(len(header)):
            if stop.wait(0.5):
                return
            for sock in slow_socks:
                with contextlib.suppress(OSError):
                    sock.send(header[i:i + 1])

    threading.Thread(target=drip, daemon=True).start()
    return idle + slow_socks


def idle_attack(s: common.Started, chrony_port: int, n: int, rows: list[list[object]]) -> None:
    srv = start(s, [])
    probe = f"{srv.base}/probe?target=127.0.0.1:{chrony_port}&module=one"
    rows.append(row("idle", "/-/healthy before", timed(srv.base + "/-/healthy", n)))
    stop = threading.Event()
    socks = hold(srv.port, 1100, 100, stop)
    try:
        rows.append(row("idle", f"/-/healthy, {len(socks)} connections held",
                        timed(srv.base + "/-/healthy", n)))
        rows.append(row("idle", "probe, same", timed(probe, n)))
    finally:
        stop.set()
        for sock in socks:
            sock.close()
    s.stop(srv.proc)


def bcrypt_attack(s: common.Started, chrony_port: int, n: int,
                  rows: list[list[object]]) -> None:
    bcrypt = common.ensure_module("bcrypt", "bcrypt")
    if bcrypt is None:
        rows.append(["bcrypt", "skipped: bcrypt not importable", 0, "", "", ""])
        return
    d = common.private_dir("ntpp-bench-webcfg-")
    s.dirs.append(d)
    hashed = bcrypt.hashpw(b"right", bcrypt.gensalt(rounds=10)).decode()
    (d / "web.yml").write_text(f"basic_auth_users:\n  alice: '{hashed}'\n")
    good = {"Authorization": "Basic " + base64.b64encode(b"alice:right").decode()}
    srv = start(s, [f"--web.config.file={d / 'web.yml'}"], auth=good)
    probe = f"{srv.base}/probe?target=127.0.0.1:{chrony_port}&module=one"
    rows.append(row("bcrypt", "authenticated probe before", timed(probe, n, good)))
    statuses: list[int] = []

    def wrong(i: int) -> None:
        bad = {"Authorization": "Basic " + base64.b64encode(f"alice:w{i}".encode()).decode()}
        try:
            with urllib.request.urlopen(urllib.request.Request(srv.base + "/metrics",
                                                               headers=bad), timeout=30):
                statuses.append(200)
        except urllib.error.HTTPError as exc:
            statuses.append(exc.code)
        except OSError:
            statuses.append(0)

    with ThreadPoolExecutor(max_workers=300) as pool:
        flood = [pool.submit(wrong, i) for i in range(300)]
        rows.append(row("bcrypt", "authenticated probe, 300 wrong passwords",
                        timed(probe, n, good)))
        for f in flood:
            f.result()
    rows.append(["bcrypt", f"answers to the flood: {statuses.count(401)} x 401, "
                 f"{statuses.count(429)} x 429, {statuses.count(0)} errors", 300, "", "", ""])
    s.stop(srv.proc)


def dns_attack(s: common.Started, chrony_port: int, n: int, rows: list[list[object]]) -> None:
    if shutil.which("unshare") is None or not common.is_root():
        rows.append(["dns", "skipped: needs root and unshare", 0, "", "", ""])
        return
    hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        hole.bind(("127.0.0.1", 53))  # swallows every query: a resolver that never answers
    except OSError as exc:
        rows.append(["dns", f"skipped: cannot bind 127.0.0.1:53 ({exc})", 0, "", "", ""])
        return
    d = common.private_dir("ntpp-bench-dns-")
    s.dirs.append(d)
    (d / "hosts").write_text("127.0.0.1 localhost\n127.0.0.1 ntp-local.test\n")
    (d / "nsswitch.conf").write_text("hosts: files dns\n")
    (d / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:5 attempts:2\n")
    mounts = " && ".join(f"mount --bind {d / name} /etc/{name}"
                         for name in ("hosts", "nsswitch.conf", "resolv.conf"))
    prefix = ["unshare", "-m", "sh", "-c", f'{mounts} && exec "$0" "$@"']
    try:
        srv = start(s, [], prefix=prefix, modules={"one": common.one_sample_module(
            timeout="5s")})
        local = f"{srv.base}/probe?target=ntp-local.test:{chrony_port}&module=one"
        rows.append(row("dns", "probe of a hosts-file name before", timed(local, n)))
        with ThreadPoolExecutor(max_workers=16) as pool:
            dead = [pool.submit(common.http_get,
                                f"{srv.base}/probe?target=dead{i}.test&module=one", 15.0)
                    for i in range(16)]
            rows.append(row("dns", "same, 16 probes of dead names in flight",
                            timed(local, n)))
            for f in dead:
                f.result()
        s.stop(srv.proc)
    finally:
        hole.close()


def yaml_attack(s: common.Started, n: int, rows: list[list[object]]) -> None:
    d = common.private_dir("ntpp-bench-yaml-")
    s.dirs.append(d)
    bomb = d / "bomb.yaml"
    bomb.write_text(BOMB)
    started = time.monotonic()
    check = subprocess.run([*common.exporter_command(), "--config.check",
                            f"--config.file={bomb}"], capture_output=True, timeout=120)
    rows.append(["yaml", f"--config.check of a {len(BOMB)}-byte alias bomb: exit "
                 f"{check.returncode}, {len(check.stderr)} bytes of output", 1, "",
                 common.fmt((time.monotonic() - started) * 1000), ""])
    srv = start(s, [])
    config = Path(srv.dir) / "modules.yaml"
    good = config.read_text()
    config.write_text(BOMB)
    results: list[dict[str, Any]] = []
    t = threading.Thread(target=lambda: results.append(timed(srv.base + "/-/healthy", n)))
    t.start()
    started = time.monotonic()
    request = urllib.request.Request(srv.base + "/-/reload", method="POST")
    try:
        urllib.request.urlopen(request, timeout=120).close()
        status = 200
    except urllib.error.HTTPError as exc:
        status = exc.code
    reload_ms = (time.monotonic() - started) * 1000
    t.join(timeout=120)
    config.write_text(good)
    rows.append(["yaml", f"POST /-/reload of the bomb: {status}", 1, "",
                 common.fmt(reload_ms), ""])
    if results:
        rows.append(row("yaml", "/-/healthy during that reload", results[0]))
    s.stop(srv.proc)




def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer timed requests")
    parser.add_argument("--only", default="idle,bcrypt,dns,yaml")
    args = parser.parse_args()
    n = 5 if args.quick else 20
    chosen = set(args.only.split(","))
    rows: list[list[object]] = []
    with common.started() as s:
        chronyd = common.start_chronyd(s)
        if "idle" in chosen:
            idle_attack(s, chronyd.port, n, rows)
        if "bcrypt" in chosen:
            bcrypt_attack(s, chronyd.port, n, rows)
        if "dns" in chosen:
            dns_attack(s, chronyd.port, n, rows)
        if "yaml" in chosen:
            yaml_attack(s, n, rows)
    table = common.md_table(["scenario", "measured", "n", "failed", "p50 ms", "max ms"], rows)
    print(table)
    common.write_result("attacks", {"rows": rows, "machine": common.machine()}, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
