"""Shared helpers for the benchmarks: installs, processes we start and stop by PID, /proc
readings, statistics, markdown tables and the JSON results.

Everything here talks to loopback only (127.0.0.0/8). chronyd always runs with ``-x``
(never touches the system clock), in a private 0700 temp dir, on a port picked at run
time, with no ``bindaddress`` line so that it answers on every 127.x address, and with
``allow 127.0.0.0/8`` so that it answers nobody else.
"""

from __future__ import annotations

import collections
import contextlib
import importlib
import json
import math
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import raw_ntp_query

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "tests" / "bench" / "results"
LOOPBACK = "127.0.0.1"
N_ADDRESSES = 50
START_DEADLINE = 10.0

# What this run installed (printed by each script and by run_all).
INSTALLED: list[str] = []


def say(message: str) -> None:
    """Progress line (stderr, so that stdout keeps the tables)."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def addresses(n: int = N_ADDRESSES) -> list[str]:
    """127.0.0.1 ... 127.0.0.n: distinct targets, so coalescing cannot stand in for work."""
    return [f"127.0.0.{i}" for i in range(1, n + 1)]


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise our soft RLIMIT_NOFILE (children inherit it); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


# --- installs ------------------------------------------------------------------------------


def is_root() -> bool:
    return os.geteuid() == 0


def find_binary(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        p = Path(d) / name
        if p.exists() and os.access(p, os.X_OK):
            return str(p)
    return None


def _ensure_policy_rc_d() -> None:
    # No package postinst may start a daemon here (a packaged chronyd would discipline the clock).
    p = Path("/usr/sbin/policy-rc.d")
    if not p.exists():
        p.write_text("#!/bin/sh\nexit 101\n")
        p.chmod(0o755)


def apt_install(packages: Sequence[str]) -> bool:
    """apt-get install (only as root, never starting a daemon); True when it worked."""
    if not is_root():
        say(f"not root: cannot install {' '.join(packages)}")
        return False
    _ensure_policy_rc_d()
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    for attempt in range(2):
        if attempt == 1:
            subprocess.run(["apt-get", "update", "-q"], env=env, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300,
                           check=False)
        r = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=600, check=False)
        if r.returncode == 0:
            for p in packages:
                INSTALLED.append(f"apt: {p}")
            print(f"installed (apt): {' '.join(packages)}", flush=True)
            return True
    say(f"apt-get install {' '.join(packages)} failed:\n{r.stderr[-2000:]}")
    return False


def ensure_binary(name: str, package: str) -> str | None:
    """Path of ``name``; installs the Debian ``package`` first when missing and root."""
    found = find_binary(name)
    if found is None and apt_install([package]):
        found = find_binary(name)
    return found


def pip_install(package: str) -> bool:
    """pip-install ``package`` into this interpreter; True when it worked."""
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--root-user-action=ignore", package],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600, check=False,
    )
    if r.returncode != 0:
        say(f"pip install {package} failed:\n{r.stderr[-2000:]}")
        return False
    INSTALLED.append(f"pip: {package}")
    print(f"installed (pip): {package}", flush=True)
    importlib.invalidate_caches()
    return True


def ensure_module(module: str, package: str) -> Any | None:
    """Import ``module``; pip-installs ``package`` first when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        pass
    if not pip_install(package):
        return None
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


# --- ports and processes -----------------------------------------------------------------


def free_port(kind: int = socket.SOCK_STREAM, host: str = LOOPBACK) -> int:
    """A port that was free a moment ago on ``host`` ("" = every address)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGTERM one process we started (by its PID); SIGKILL it if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)
    return proc.returncode


def private_dir(prefix: str) -> Path:
    d = Path(tempfile.mkdtemp(prefix=prefix))
    d.chmod(0o700)
    return d


@dataclass
class Started:
    """Everything a script started: processes (stopped by PID) and temp dirs."""

    procs: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop one process started earlier (by its PID) and forget it."""
        for entry in list(self.procs):
            if entry[1] is proc:
                rc = stop_process(proc)
                say(f"stopped {entry[0]} pid {proc.pid} (rc {rc})")
                self.procs.remove(entry)

    def stop_all(self) -> None:
        for name, proc in reversed(self.procs):
            rc = stop_process(proc)
            say(f"stopped {name} pid {proc.pid} (rc {rc})")
        self.procs.clear()
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.dirs.clear()


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def started() -> Iterator[Started]:
    """``with started() as s:``: whatever is registered in ``s`` is stopped on the way out
    (SIGTERM to the script, as run_all sends on its time bound, counts as a way out)."""
    signal.signal(signal.SIGTERM, _sigterm)
    s = Started()
    try:
        yield s
    finally:
        s.stop_all()


@dataclass
class Chronyd:
    port: int
    dir: Path
    proc: subprocess.Popen[bytes]

    def log(self) -> str:
        try:
            return (self.dir / "chronyd.log").read_text(errors="replace")
        except OSError:
            return ""


def chrony_conf(directory: Path, port: int) -> str:
    """A chronyd -x server as in the tests, but with no bindaddress: it answers on every
    127.x address (``allow`` keeps it answering loopback clients only)."""
    lines = [
        f"port {port}",
        "allow 127.0.0.0/8",
        "local stratum 8",
        "cmdport 0",
        f"bindcmdaddress {directory}/chronyd.sock",
        f"pidfile {directory}/chronyd.pid",
        f"driftfile {directory}/drift",
    ]
    if is_root():
        lines.append("user root")
    return "\n".join(lines) + "\n"


def start_chronyd(s: Started) -> Chronyd:
    """chronyd -x on a free port, answering 127.0.0.1 ... 127.0.0.50; waits until it does."""
    binary = ensure_binary("chronyd", "chrony")
    if binary is None:
        raise SystemExit("chronyd is not installed (apt-get install chrony)")
    problems = []
    for _ in range(5):
        d = private_dir("ntpp-bench-chronyd-")
        s.dirs.append(d)
        port = free_port(socket.SOCK_DGRAM, "")
        conf = d / "chrony.conf"
        conf.write_text(chrony_conf(d, port))
        argv = [binary, "-4", "-x", "-d", "-f", str(conf)]
        if not is_root():
            argv.insert(1, "-U")
        with open(d / "chronyd.log", "wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=d)
        s.procs.append(("chronyd", proc))
        c = Chronyd(port, d, proc)
        deadline = time.monotonic() + START_DEADLINE
        ready = False
        while time.monotonic() < deadline and proc.poll() is None:
            if "Could not open NTP socket" in c.log():
                break
            if (raw_ntp_query(LOOPBACK, port) is not None
                    and raw_ntp_query(f"127.0.0.{N_ADDRESSES}", port) is not None):
                ready = True
                break
            time.sleep(0.02)
        if ready:
            if "Disabled control of system clock" not in c.log():
                raise SystemExit(f"chronyd did not confirm -x:\n{c.log()}")
            say(f"chronyd -x pid {proc.pid} on port {port} (127.0.0.1..127.0.0.{N_ADDRESSES})")
            return c
        problems.append(c.log())
        stop_process(proc)
        s.procs.remove(("chronyd", proc))
    raise SystemExit("could not start chronyd:\n" + "\n".join(problems))


def exporter_command() -> list[str]:
    script = Path(sys.executable).parent / "ntp-probe"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "ntp_probe"]


def http_get(url: str, timeout: float = 10.0,
             headers: dict[str, str] | None = None) -> tuple[int, str]:
    """GET -> (status, body); HTTP errors are returned, connection errors give (0, why)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                    timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)


def _wait_http(proc: subprocess.Popen[bytes], url: str, deadline: float,
               headers: dict[str, str] | None = None) -> bool:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if http_get(url, timeout=1.0, headers=headers)[0] == 200:
            return True
        time.sleep(0.05)
    return False


@dataclass
class Server:
    name: str
    port: int
    dir: Path
    proc: subprocess.Popen[bytes]

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        try:
            return (self.dir / f"{self.name}.log").read_text(errors="replace")
        except OSError:
            return ""


def _start_server(s: Started, name: str, argv_for_port: Any, d: Path,
                  health: str = "/-/healthy", env_extra: dict[str, str] | None = None,
                  health_headers: dict[str, str] | None = None) -> Server:
    problems = []
    for _ in range(5):
        port = free_port()
        argv = argv_for_port(port)
        env = {k: v for k, v in os.environ.items() if not k.startswith("NTP_PROBE_")}
        env.update(env_extra or {})
        with open(d / f"{name}.log", "wb") as out:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, cwd=d, env=env)
        s.procs.append((name, proc))
        srv = Server(name, port, d, proc)
        if _wait_http(proc, srv.base + health, time.monotonic() + START_DEADLINE,
                      health_headers):
            say(f"{name} pid {proc.pid} on {LOOPBACK}:{port}")
            return srv
        problems.append(srv.log())
        stop_process(proc)
        s.procs.remove((name, proc))
    raise SystemExit(f"could not start {name}:\n" + "\n".join(problems))


def write_modules(d: Path, modules: dict[str, Any]) -> Path:
    path = d / "modules.yaml"
    path.write_text(yaml.safe_dump({"modules": modules}, sort_keys=False))
    return path


def one_sample_module(timeout: str = "5s", reply_timeout: str = "1s") -> dict[str, Any]:
    """A 1-sample ip4 module (the ``ntp_fast`` shape)."""
    return {"prober": "ntp", "timeout": timeout,
            "ntp": {"samples": 1, "reply_timeout": reply_timeout,
                    "preferred_ip_protocol": "ip4"}}


# Runs the exporter's own entry point with tracemalloc on; SIGUSR1 dumps a snapshot to
# $BENCH_TRACEMALLOC_OUT.<n>. Attribution only: tracemalloc itself costs memory and CPU.
TRACEMALLOC_WRAPPER = """
import os, signal, sys, tracemalloc
_n = [0]
def _dump(signum, frame):
    _n[0] += 1
    tracemalloc.take_snapshot().dump(os.environ["BENCH_TRACEMALLOC_OUT"] + "." + str(_n[0]))
signal.signal(signal.SIGUSR1, _dump)
from ntp_probe.cli.main import main
sys.exit(main(sys.argv[1:]))
"""


def start_exporter(s: Started, modules: dict[str, Any], max_concurrent: int = 100,
                   extra: Sequence[str] = (), tracemalloc_out: Path | None = None) -> Server:
    """The real ``ntp-probe`` process on 127.0.0.1 and a free port, with ``modules``."""
    d = private_dir("ntpp-bench-exporter-")
    s.dirs.append(d)
    config = write_modules(d, modules)
    command = exporter_command()
    env_extra = None
    if tracemalloc_out is not None:
        command = [sys.executable, "-X", "tracemalloc=10", "-c", TRACEMALLOC_WRAPPER]
        env_extra = {"BENCH_TRACEMALLOC_OUT": str(tracemalloc_out)}

    def argv(port: int) -> list[str]:
        # Room for a connection per probe in flight: the default cap (512 connections)
        # would refuse the in-flight phases' clients before any probe starts.
        return [*command, f"--config.file={config}",
                f"--web.listen-address={LOOPBACK}:{port}",
                f"--probe.max-concurrent={max_concurrent}",
                f"--web.max-connections={max(512, max_concurrent + 64)}", "--log.level=warn",
                *extra]

    return _start_server(s, "ntp-probe", argv, d, env_extra=env_extra)


BLACKBOX_CONFIG = {
    "modules": {
        "icmp": {"prober": "icmp", "timeout": "2s",
                 "icmp": {"preferred_ip_protocol": "ip4", "ip_protocol_fallback": False}},
        "tcp_connect": {"prober": "tcp", "timeout": "2s",
                        "tcp": {"preferred_ip_protocol": "ip4"}},
    }
}


def start_blackbox(s: Started, binary: str) -> Server:
    """Debian's prometheus-blackbox-exporter on 127.0.0.1 and a free port (icmp + tcp)."""
    d = private_dir("ntpp-bench-blackbox-")
    s.dirs.append(d)
    conf = d / "blackbox.yml"
    conf.write_text(yaml.safe_dump(BLACKBOX_CONFIG, sort_keys=False))

    def argv(port: int) -> list[str]:
        return [binary, f"--config.file={conf}", f"--web.listen-address={LOOPBACK}:{port}",
                "--log.level=warn"]

    return _start_server(s, "blackbox_exporter", argv, d)


# --- /proc -------------------------------------------------------------------------------


def proc_stats(pid: int) -> dict[str, int]:
    """VmRSS (kB), VmHWM (kB), Threads from /proc/PID/status; fds from /proc/PID/fd."""
    out = {"rss_kb": 0, "hwm_kb": 0, "threads": 0, "fds": 0}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "VmRSS":
                out["rss_kb"] = int(value.split()[0])
            elif key == "VmHWM":
                out["hwm_kb"] = int(value.split()[0])
            elif key == "Threads":
                out["threads"] = int(value.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def metric_values(body: str, name: str) -> dict[str, float]:
    """Samples of one metric in an exposition: labels text -> value."""
    out = {}
    for line in body.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            if head == name or head.startswith(name + "{"):
                out[head[len(name):]] = float(value)
    return out


# --- statistics and output ---------------------------------------------------------------


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of already sorted values (nan when empty)."""
    if not sorted_values:
        return math.nan
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return float(sorted_values[k])


def summary(values: Sequence[float]) -> dict[str, float]:
    v = sorted(values)
    return {"n": len(v), "p50": percentile(v, 50), "p90": percentile(v, 90),
            "p99": percentile(v, 99), "max": v[-1] if v else math.nan,
            "mean": sum(v) / len(v) if v else math.nan}


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def interpreter() -> str:
    """The Python that runs this script, and so the exporter (``exporter_command``).

    Builds differ by about 20% in CPU per probe here: Debian's python3 links libpython in
    (and is built with PGO and LTO); a build with a shared libpython3.x.so, as pyenv's
    default, calls every interpreter function through the PLT.
    """
    try:
        with open("/proc/self/maps") as maps:
            shared = any("libpython" in line for line in maps)
    except OSError:
        shared = False
    kind = "shared libpython" if shared else "libpython linked in"
    return f"CPython {sys.version.split()[0]} at {sys.executable} ({kind})"


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "loadavg_at_end": [round(x, 2) for x in load],
            "python": sys.version.split()[0], "interpreter": interpreter(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def source_state() -> dict[str, Any]:
    """The commit measured, and whether ntp_probe/ differed from it."""
    def git(*args: str) -> str:
        try:
            r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                               timeout=30, check=False)
        except OSError:
            return ""
        return r.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"),
            "ntp_probe_modified": bool(git("status", "--porcelain", "--", "ntp_probe"))}


def write_result(name: str, data: dict[str, Any], markdown: str) -> Path:
    """tests/bench/results/<name>.json (gitignored), with the markdown beside the data."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"name": name, "machine": machine(), "source": source_state(),
               "installed": list(INSTALLED),
               "markdown": markdown, **data}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


# --- profiling (py-spy) ------------------------------------------------------------------


def _py_spy_binary() -> str | None:
    for candidate in (find_binary("py-spy"), str(Path(sys.executable).parent / "py-spy")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def start_py_spy(pid: int, seconds: float, out: Path) -> subprocess.Popen[bytes] | None:
    """``py-spy record --format raw`` (collapsed stacks) on ``pid`` for ``seconds``
    (pip-installs py-spy when missing)."""
    binary = _py_spy_binary()
    if binary is None and pip_install("py-spy"):
        binary = _py_spy_binary()
    if binary is None:
        say("py-spy not available: no profile")
        return None
    argv = [binary, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
            "--rate", "500", "--format", "raw", "--output", str(out)]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def top_frames(collapsed: Path, n: int = 15) -> dict[str, list[tuple[str, float]]]:
    """From collapsed stacks: the top functions by self and by inclusive share (%)."""
    self_counts: collections.Counter[str] = collections.Counter()
    total_counts: collections.Counter[str] = collections.Counter()
    total = 0
    try:
        text = collapsed.read_text(errors="replace")
    except OSError:
        return {"self": [], "inclusive": []}
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        self_counts[_short(frames[-1])] += count
        for f in {_short(f) for f in frames}:
            total_counts[f] += count
    if not total:
        return {"self": [], "inclusive": []}
    return {
        "self": [(f, 100 * c / total) for f, c in self_counts.most_common(n)],
        "inclusive": [(f, 100 * c / total) for f, c in total_counts.most_common(n * 2)],
        "samples": [("total", float(total))],
    }


def _short(frame: str) -> str:
    # py-spy frames: "function (path/to/file.py:line)"; keep function and file:line tail.
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    parts = where.split("/")
    tail = "/".join(parts[-2:]) if len(parts) > 1 else where
    file_part, _, _line = tail.rpartition(":")
    return f"{name} ({file_part or tail})"


# --- wrk ---------------------------------------------------------------------------------

WRK_LUA_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"connect_errors":%d,"read_errors":%d,"write_errors":%d,"status_errors":%d,' ..
    '"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,"max_us":%d,' ..
    '"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9), latency.max, latency.mean))
end
"""

# The target rotates per request over 127.0.0.1..127.0.0.N. Each wrk thread uses its own
# module (PREFIX0, PREFIX1, ...: identical settings, distinct coalescing keys), so two
# threads never ask for the same (module, target) at once.
WRK_LUA_ROTATE = r"""
local threads = 0
setup = function(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
local i = 0
request = function()
  i = i % __N__ + 1
  return wrk.format("GET", "/probe?module=__PREFIX__" .. tid .. "&target=127.0.0." .. i ..
                    ":__PORT__")
end
"""


def wrk_done_script(d: Path) -> Path:
    path = d / "done.lua"
    path.write_text(WRK_LUA_DONE)
    return path


def wrk_rotate_script(d: Path, port: int, module_prefix: str,
                      n: int = N_ADDRESSES) -> Path:
    path = d / f"rotate-{module_prefix}.lua"
    path.write_text(WRK_LUA_ROTATE.replace("__N__", str(n)).replace("__PORT__", str(port))
                    .replace("__PREFIX__", module_prefix) + WRK_LUA_DONE)
    return path


def run_wrk(wrk: str, url: str, script: Path, seconds: int, threads: int = 2,
            connections: int = 50, headers: Sequence[str] = ()) -> dict[str, Any]:
    """One bounded wrk run (each of ``headers`` sent as ``Name: value``); returns the
    figures its Lua ``done`` printed."""
    cmd = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s", "--timeout", "5s",
           *(arg for header in headers for arg in ("-H", header)), "-s", str(script), url]
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=seconds + 60, check=False)
    for line in r.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            d: dict[str, Any] = json.loads(line[len("BENCHJSON "):])
            d["rps"] = d["requests"] / (d["duration_us"] / 1e6)
            d["errors"] = sum(d[k] for k in ("connect_errors", "read_errors", "write_errors",
                                             "status_errors", "timeouts"))
            return d
    raise SystemExit(f"wrk printed no result (rc {r.returncode}):\n{r.stdout}\n{r.stderr}")


# --- other load on the machine -----------------------------------------------------------


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class ForeignCpu:
    """Busy CPU seconds on the machine not spent by the given PIDs, this process or its
    waited-for children (wrk): other work sharing the cores during a measurement."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._start = self._read()

    def _read(self) -> tuple[float, float]:
        ours = sum(cpu_seconds(p) for p in self.pids)
        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        ours += me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
        return machine_busy_seconds(), ours

    def seconds(self) -> float:
        busy, ours = self._read()
        return max(0.0, (busy - self._start[0]) - (ours - self._start[1]))
