"""Operating the exporter over HTTP: reload, /config, history pages, min_probe_interval,
coalescing of identical probes, and a client hang-up cancelling its probe.

Every probe goes to the in-process fake NTP server on 127.0.0.1; the app runs in
aiohttp's TestServer (which, like ``ntp-probe serve``, cancels a handler whose client
went away).
"""

from __future__ import annotations

import asyncio
import gc
import html
import os
import re
import time
from collections.abc import Awaitable, Callable
from html.parser import HTMLParser
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, make_mocked_request
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from ntp_probe.config.load import config_to_yaml, load_config, parse_config
from ntp_probe.config.schema import Config
from ntp_probe.engine.context import ProbeLog
from ntp_probe.engine.coordinator import _latest_end
from ntp_probe.engine.result import Measurement, Reason
from ntp_probe.engine.targets import parse_target
from ntp_probe.exposition.internals import Internals
from ntp_probe.web import app as app_module
from ntp_probe.web import pages
from ntp_probe.web.app import State, create_app, probe_handler
from ntp_probe.web.history import MAX_METRICS, History
from tests.behaviour import fake_server
from tests.behaviour.fake_server import FakeNTPServer, Request, Send, answer, reply, silent
from tests.conftest import make_module

fake_ntp = fake_server.fake_ntp

Client = TestClient[web.Request, web.Application]

DEADLINE = 5.0  # seconds any polled condition here may take at most


# --- helpers ---------------------------------------------------------------------------


def module_yaml(name: str, *, timeout: str = "2s", samples: int = 1,
                reply_timeout: str = "500ms", extra: str = "") -> str:
    """One module block (indented under ``modules:``)."""
    return (
        f"  {name}:\n"
        f"    prober: ntp\n"
        f"    timeout: {timeout}\n"
        f"{extra}"
        f"    ntp:\n"
        f"      samples: {samples}\n"
        f"      sample_interval: 10ms\n"
        f"      reply_timeout: {reply_timeout}\n"
        f"      preferred_ip_protocol: ip4\n"
    )


def config_text(*blocks: str) -> str:
    return "modules:\n" + "".join(blocks)


def make_state(path: Path, history_limit: int = 100, text: str | None = None) -> State:
    """State as ``ntp-probe serve --config.file=path`` builds it (writing ``text`` first)."""
    if text is not None:
        path.write_text(text)
    config = load_config(str(path))
    internals = Internals()
    internals.config_loaded(tuple(config.modules))
    return State(config=config, internals=internals, config_path=str(path),
                 history=History(history_limit))


async def start(aiohttp_client: AiohttpClient, path: Path, text: str,
                history_limit: int = 100) -> tuple[Client, State]:
    state = make_state(path, history_limit, text)
    return await aiohttp_client(create_app(state)), state


def metric(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return None


async def metrics(client: Client) -> str:
    resp = await client.get("/metrics")
    assert resp.status == 200
    return await resp.text()


async def probe(client: Client, target: str, module: str) -> tuple[int, str]:
    resp = await client.get("/probe", params={"target": target, "module": module})
    return resp.status, await resp.text()


def assert_one_line(body: str) -> None:
    assert body.endswith("\n") and body.count("\n") == 1 and body.strip(), repr(body)


async def poll(condition: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    """Wait (yielding to the loop) until ``condition()``; fail after ``deadline`` seconds."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > deadline:
            pytest.fail(f"{what}: not reached within {deadline} s")
        await asyncio.sleep(0.005)  # yield to the loop; bounded by the deadline


class HistoryTable(HTMLParser):
    """The rows of ``<table id='history'>``'s body: cell texts and the row's link."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[list[str], list[str]]] = []  # (cells, hrefs)
        self.modules: list[str] = []
        self._in_table = False
        self._in_body = False
        self._cell: list[str] | None = None
        self._in_li = False
        self._li: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table" and a.get("id") == "history":
            self._in_table = True
        elif self._in_table and tag == "tbody":
            self._in_body = True
        elif self._in_body and tag == "tr":
            self.rows.append(([], []))
        elif self._in_body and tag == "td":
            self._cell = []
        elif self._in_body and tag == "a" and self.rows:
            self.rows[-1][1].append(a.get("href") or "")
        elif tag == "li":
            self._in_li, self._li = True, []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[-1][0].append("".join(self._cell))
            self._cell = None
        elif tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._in_table = False
        elif tag == "li" and self._in_li:
            self.modules.append("".join(self._li))
            self._in_li = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._in_li:
            self._li.append(data)


def parse_page(page: str) -> HistoryTable:
    parser = HistoryTable()
    parser.feed(page)
    parser.close()
    return parser


async def landing(client: Client) -> tuple[str, HistoryTable]:
    resp = await client.get("/")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/html")
    page = await resp.text()
    return page, parse_page(page)


def log_id(href: str) -> int:
    m = re.fullmatch(r"logs\?id=(\d+)", href)
    assert m, href
    return int(m.group(1))


# --- reload ----------------------------------------------------------------------------


async def test_reload_with_a_changed_file_swaps_the_modules(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    path = tmp_path / "modules.yaml"
    client, state = await start(aiohttp_client, path, config_text(module_yaml("old")))
    status, body = await probe(client, fake_ntp.target, "old")
    assert status == 200 and metric(body, "probe_success") == 1, body
    before = await metrics(client)
    assert metric(before, "ntp_probe_modules_configured") == 1
    stamp_before = metric(before, "ntp_probe_config_last_reload_success_timestamp_seconds")
    assert stamp_before is not None

    path.write_text(config_text(module_yaml("new"), module_yaml("other", samples=2)))
    told: list[set[str]] = []  # the server's hook (it fits the open-files limit to it)
    state.on_config = lambda config: told.append(set(config.modules))
    resp = await client.post("/-/reload")
    assert resp.status == 200, await resp.text()
    assert told == [{"new", "other"}]

    status, body = await probe(client, fake_ntp.target, "new")
    assert status == 200 and metric(body, "probe_success") == 1, body
    status, body = await probe(client, fake_ntp.target, "other")
    assert status == 200 and metric(body, "probe_ntp_samples_sent") == 2, body
    status, body = await probe(client, fake_ntp.target, "old")
    assert status == 400 and "old" in body
    after = await metrics(client)
    assert metric(after, "ntp_probe_config_last_reload_successful") == 1
    assert metric(after, "ntp_probe_modules_configured") == 2
    stamp_after = metric(after, "ntp_probe_config_last_reload_success_timestamp_seconds")
    assert stamp_after is not None and stamp_after >= stamp_before
    assert set(state.config.modules) == {"new", "other"}
    # The old module's series went with it; the new ones' are there from the reload.
    assert metric(before, "ntp_probe_probes_total", module="old", result="success") == 1
    assert metric(after, "ntp_probe_probes_total", module="old") is None
    assert metric(after, "ntp_probe_probe_duration_seconds_count", module="old") is None
    assert metric(after, "ntp_probe_probes_total", module="new", result="failure") == 0


async def test_a_probe_running_through_a_reload_that_removes_its_module_brings_none_back(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    # The removed module's series went with the reload; its probe, still waiting for a
    # reply then, must not bring them back when it ends. Its packet still counts.
    fake_ntp.behaviour = silent
    path = tmp_path / "modules.yaml"
    client, _ = await start(aiohttp_client, path,
                            config_text(module_yaml("slow", reply_timeout="1s"),
                                        module_yaml("kept")))
    running = asyncio.ensure_future(probe(client, fake_ntp.target, "slow"))
    await fake_ntp.wait_for_requests(1)
    path.write_text(config_text(module_yaml("kept")))
    assert (await client.post("/-/reload")).status == 200
    status, body = await running
    assert status == 200 and metric(body, "probe_success") == 0, body
    after = await metrics(client)
    assert metric(after, "ntp_probe_probes_total", module="slow") is None, after
    assert metric(after, "ntp_probe_probe_duration_seconds_count", module="slow") is None
    assert metric(after, "ntp_probe_probes_total", module="kept", result="failure") == 0
    assert metric(after, "ntp_probe_ntp_packets_sent_total") == 1


async def test_a_reload_whose_caller_goes_away_still_finishes(tmp_path: Path) -> None:
    # curl -m 1 -X POST /-/reload against a big file: the handler is cancelled while the
    # file is read in its thread; the reload must still be applied and reported.
    path = tmp_path / "modules.yaml"
    state = make_state(path, text=config_text(module_yaml("old")))
    path.write_text(config_text(module_yaml("new")))
    caller = asyncio.create_task(state.reload())
    await asyncio.sleep(0)  # the reload has started: its thread is reading the file
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await poll(lambda: set(state.config.modules) == {"new"}, "the reload to be applied")


async def test_a_reload_that_changes_a_modules_policy_applies_it_to_the_next_probe(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    """The coordinator keeps each module's guard (its policies) between probes: a reload
    that keeps the module's name but denies the target must still be obeyed at once."""
    path = tmp_path / "modules.yaml"
    client, _ = await start(aiohttp_client, path, config_text(module_yaml("m")))
    status, body = await probe(client, fake_ntp.target, "m")
    assert status == 200 and metric(body, "probe_success") == 1, body

    path.write_text(config_text(module_yaml("m", extra="    denied_targets: [127.0.0.0/8]\n")))
    assert (await client.post("/-/reload")).status == 200
    sent = len(fake_ntp.requests)
    status, body = await probe(client, fake_ntp.target, "m")
    assert status == 200 and metric(body, "probe_success") == 0, body
    assert 'reason="target_forbidden"' in body
    assert len(fake_ntp.requests) == sent  # nothing sent to a denied target

    path.write_text(config_text(module_yaml("m")))
    assert (await client.post("/-/reload")).status == 200
    status, body = await probe(client, fake_ntp.target, "m")
    assert status == 200 and metric(body, "probe_success") == 1, body


@pytest.mark.parametrize(
    ("broken", "named"),
    [
        # unknown key: the error names its full path
        (config_text(module_yaml("new").replace("samples: 1", "sampels: 1")),
         "modules.new.ntp.sampels"),
        (config_text(module_yaml("new", extra="    timout: 5s\n")), "modules.new.timout"),
        # a duration without a unit
        (config_text(module_yaml("new", timeout="5")), "modules.new.timeout"),
        # bad YAML: no key to name, the file and the kind of problem instead
        ("modules:\n  new: [\n", "invalid YAML"),
        # 500 bytes that expand to gigabytes: refused before expanding
        ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n"
            for p, c in zip("abcdefgh", "bcdefghi", strict=True)), "YAML aliases"),
        # deeper than the parser's recursion could go: a config error, not a 500 with the
        # gauge left at 1
        ("modules: " + "[" * 3000 + "]" * 3000 + "\n", "nested more than"),
    ],
    ids=["unknown-ntp-key", "unknown-module-key", "bad-duration", "bad-yaml", "alias-bomb",
         "deep-nesting"],
)
async def test_broken_reload_keeps_the_old_config(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer,
    broken: str, named: str,
) -> None:
    path = tmp_path / "modules.yaml"
    client, _ = await start(aiohttp_client, path, config_text(module_yaml("old")))
    config_before = await (await client.get("/config")).text()

    path.write_text(broken)
    resp = await client.post("/-/reload")
    assert resp.status == 500
    body = await resp.text()
    assert_one_line(body)
    assert named in body, body
    if named == "invalid YAML":
        assert str(path) in body

    # The old configuration still serves probes, and /config still shows it.
    status, probe_body = await probe(client, fake_ntp.target, "old")
    assert status == 200 and metric(probe_body, "probe_success") == 1, probe_body
    status, _ = await probe(client, fake_ntp.target, "new")
    assert status == 400
    assert await (await client.get("/config")).text() == config_before
    text = await metrics(client)
    assert metric(text, "ntp_probe_config_last_reload_successful") == 0
    assert metric(text, "ntp_probe_modules_configured") == 1
    # The landing page says so too: the modules it lists are not the file on disk's.
    page = await (await client.get("/")).text()
    assert "The last reload, at " in page and "failed: " in page, page
    assert html.escape(named) in page, page

    # A later good reload clears the failure.
    path.write_text(config_text(module_yaml("new")))
    resp = await client.post("/-/reload")
    assert resp.status == 200, await resp.text()
    text = await metrics(client)
    assert metric(text, "ntp_probe_config_last_reload_successful") == 1
    assert "The last reload" not in await (await client.get("/")).text()
    status, probe_body = await probe(client, fake_ntp.target, "new")
    assert status == 200 and metric(probe_body, "probe_success") == 1, probe_body


async def test_reload_of_a_deleted_file_keeps_the_old_config(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    path = tmp_path / "modules.yaml"
    client, _ = await start(aiohttp_client, path, config_text(module_yaml("old")))
    path.unlink()
    resp = await client.post("/-/reload")
    assert resp.status == 500
    body = await resp.text()
    assert_one_line(body)
    assert str(path) in body
    status, probe_body = await probe(client, fake_ntp.target, "old")
    assert status == 200 and metric(probe_body, "probe_success") == 1
    assert metric(await metrics(client), "ntp_probe_config_last_reload_successful") == 0


# Regression: load_config used to let UnicodeDecodeError (a file that is not UTF-8) and
# ValueError (PyYAML's timestamp constructor) out of State.reload: a 500 "internal error"
# with ntp_probe_config_last_reload_successful still 1.
@pytest.mark.parametrize(
    "broken",
    [
        "modules:\n  caf\xe9:\n    timeout: 2s\n".encode("latin-1"),
        config_text(module_yaml("new").replace(
            "      samples: 1\n", "      samples: 1\n      min_plausible_time: 2024-13-01\n"
        )).encode(),
        b"\x00" * 64,  # what a crash in the middle of a rewrite leaves
        config_text(module_yaml("new")).replace("samples: 1", "samples: 1 # \x1b[1m").encode(),
    ],
    ids=["latin-1-file", "impossible-date", "zero-filled", "escape-code"],
)
async def test_unreadable_config_is_a_failed_reload(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer, broken: bytes
) -> None:
    path = tmp_path / "modules.yaml"
    client, _ = await start(aiohttp_client, path, config_text(module_yaml("old")))
    path.write_bytes(broken)
    resp = await client.post("/-/reload")
    body = await resp.text()
    # The old configuration must keep serving whatever happens.
    status, probe_body = await probe(client, fake_ntp.target, "old")
    assert status == 200 and metric(probe_body, "probe_success") == 1
    assert resp.status == 500
    assert_one_line(body)
    assert metric(await metrics(client), "ntp_probe_config_last_reload_successful") == 0
    assert body.startswith("failed to reload config:") and str(path) in body, body


async def test_a_loader_bug_is_a_failed_reload_too(
    aiohttp_client: AiohttpClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No loader raises anything but ConfigError on purpose; the bug is stood in for.
    path = tmp_path / "modules.yaml"
    client, state = await start(aiohttp_client, path, config_text(module_yaml("old")))

    def buggy(path: str | None) -> None:
        raise RuntimeError("a loader bug")

    monkeypatch.setattr(app_module, "load_config", buggy)
    resp = await client.post("/-/reload")
    body = await resp.text()
    assert resp.status == 500 and body.startswith("failed to reload config:"), body
    assert_one_line(body)
    assert metric(await metrics(client), "ntp_probe_config_last_reload_successful") == 0
    assert set(state.config.modules) == {"old"}


async def test_a_flood_of_reloads_is_a_reload_or_two(
    aiohttp_client: AiohttpClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # POST /-/reload is open to anyone (as in blackbox): each one must not read and parse
    # the file again. Those that come while one waits share it.
    path = tmp_path / "modules.yaml"
    client, state = await start(aiohttp_client, path, config_text(module_yaml("old")))
    loads: list[str | None] = []

    def counted(config_path: str | None) -> Config:
        loads.append(config_path)
        return load_config(config_path)

    monkeypatch.setattr(app_module, "load_config", counted)
    path.write_text(config_text(module_yaml("new")))
    answers = await asyncio.gather(*(client.post("/-/reload") for _ in range(30)))
    assert all(r.status == 200 for r in answers)
    assert 1 <= len(loads) <= 2, loads
    assert set(state.config.modules) == {"new"}
    # A reload asked after they are done reads the file again.
    before = len(loads)
    assert (await client.post("/-/reload")).status == 200
    assert len(loads) == before + 1


async def test_reload_needs_post(aiohttp_client: AiohttpClient, tmp_path: Path) -> None:
    path = tmp_path / "modules.yaml"
    client, _ = await start(aiohttp_client, path, config_text(module_yaml("old")))
    path.write_text(config_text(module_yaml("new")))
    resp = await client.get("/-/reload")
    assert resp.status == 405
    # ... and a GET did not reload anything.
    status, _ = await probe(client, "127.0.0.1:1", "new")
    assert status == 400


# --- /config ---------------------------------------------------------------------------


async def test_config_endpoint_reflects_the_loaded_modules(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    path = tmp_path / "modules.yaml"
    text = config_text(
        module_yaml("alpha", timeout="3s", samples=2),
        module_yaml("beta", extra="    min_probe_interval: 10s\n"
                                  "    denied_targets: [192.0.2.0/24]\n"),
    )
    client, state = await start(aiohttp_client, path, text)
    resp = await client.get("/config")
    assert resp.status == 200
    data = yaml.safe_load(await resp.text())
    assert list(data["modules"]) == ["alpha", "beta"]
    alpha, beta = data["modules"]["alpha"], data["modules"]["beta"]
    assert alpha["timeout"] == "3s" and alpha["ntp"]["samples"] == 2
    assert alpha["ntp"]["sample_interval"] == "10ms"
    assert alpha["ntp"]["reply_timeout"] == "500ms"
    assert alpha["ntp"]["preferred_ip_protocol"] == "ip4"
    assert alpha["min_probe_interval"] == "0s"  # every default filled in
    assert beta["min_probe_interval"] == "10s"
    assert beta["denied_targets"] == ["192.0.2.0/24"]
    # The dump is itself a valid configuration describing the same modules.
    again = parse_config(await resp.text(), "roundtrip")
    assert dict(again.modules) == dict(state.config.modules)

    path.write_text(config_text(module_yaml("gamma")))
    assert (await client.post("/-/reload")).status == 200
    data = yaml.safe_load(await (await client.get("/config")).text())
    assert list(data["modules"]) == ["gamma"]


async def test_config_is_rendered_once_per_configuration(
    aiohttp_client: AiohttpClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Thousands of modules take PyYAML seconds: GET /config, open to anyone, must not
    # make the exporter do that again for every request.
    path = tmp_path / "modules.yaml"
    client, _ = await start(aiohttp_client, path, config_text(module_yaml("alpha")))
    rendered: list[str] = []

    def counted(config: Config) -> str:
        rendered.append(config.source)
        return config_to_yaml(config)

    monkeypatch.setattr(app_module, "config_to_yaml", counted)
    texts = await asyncio.gather(*(client.get("/config") for _ in range(5)))
    assert len({await r.text() for r in texts}) == 1
    assert len(rendered) == 1
    assert (await client.post("/-/reload")).status == 200
    await (await client.get("/config")).text()
    assert len(rendered) == 2


# --- history: landing page and /logs --------------------------------------------------


async def test_landing_page_lists_probes_newest_first(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    path = tmp_path / "modules.yaml"
    client, _ = await start(aiohttp_client, path,
                            config_text(module_yaml("one"), module_yaml("two")))
    other = await FakeNTPServer.start(answer(leap=3))  # an unsynchronised server
    try:
        status, _ = await probe(client, fake_ntp.target, "one")  # success
        assert status == 200
        status, _ = await probe(client, other.target, "two")  # leap_unsynchronized
        assert status == 200
        fake_ntp.behaviour = silent
        status, _ = await probe(client, fake_ntp.target, "one")  # timeout
        assert status == 200
    finally:
        other.close()
    fake_ntp.behaviour = answer()
    status, _ = await probe(client, fake_ntp.target, "two")  # success
    assert status == 200

    _, table = await landing(client)
    assert len(table.rows) == 4, table.rows
    expected = [
        ("two", fake_ntp.target, "success", ""),
        ("one", fake_ntp.target, "failure", "timeout"),
        ("two", other.target, "failure", "leap_unsynchronized"),
        ("one", fake_ntp.target, "success", ""),
    ]
    got = [tuple(cells[1:5]) for cells, _ in table.rows]
    assert got == expected
    for cells, hrefs in table.rows:
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", cells[0]), cells
        assert re.fullmatch(r"\d+\.\d ms", cells[5]), cells
        assert len(hrefs) == 1
    ids = [log_id(hrefs[0]) for _, hrefs in table.rows]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == 4
    assert table.modules == ["one", "two"]


async def test_logs_show_each_probes_log_and_metrics(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    path = tmp_path / "modules.yaml"
    client, _ = await start(aiohttp_client, path, config_text(module_yaml("one", samples=2)))
    await probe(client, fake_ntp.target, "one")
    fake_ntp.behaviour = answer(leap=3)
    await probe(client, fake_ntp.target, "one")
    _, table = await landing(client)
    failure_id, success_id = (log_id(hrefs[0]) for _, hrefs in table.rows)

    resp = await client.get("/logs", params={"id": str(success_id)})
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    t_lines = [line for line in text.splitlines()
               if all(f"T{i}=" in line for i in (1, 2, 3, 4))]
    assert len(t_lines) == 2, text  # one per sample of the burst
    assert "probe_success 1" in text
    assert "probe_ntp_samples_received 2" in text
    assert "probe_ntp_failure_info" not in text
    assert "Module configuration:" in text and "samples: 2" in text
    # A reload that changes the module does not rewrite what the probe ran with.
    path.write_text(config_text(module_yaml("one", samples=5)))
    assert (await client.post("/-/reload")).status == 200
    text = await (await client.get("/logs", params={"id": str(success_id)})).text()
    assert "samples: 2" in text and "samples: 5" not in text, text

    resp = await client.get("/logs", params={"id": str(failure_id)})
    assert resp.status == 200
    text = await resp.text()
    assert "probe_success 0" in text
    assert 'probe_ntp_failure_info{reason="leap_unsynchronized"} 1' in text
    assert "leap=3" in text  # the packet line shows why


async def test_logs_of_the_newest_probe_of_a_target_and_module(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    # blackbox_exporter 0.25's /logs?target=...&module=...: the newest kept probe of the
    # target (and module, when given), without looking its id up first.
    path = tmp_path / "modules.yaml"
    text = config_text(module_yaml("one") + module_yaml("two"))
    client, _ = await start(aiohttp_client, path, text)
    fake_ntp.behaviour = answer(leap=3)
    await probe(client, fake_ntp.target, "one")  # leap_unsynchronized
    fake_ntp.behaviour = answer()
    await probe(client, fake_ntp.target, "one")
    fake_ntp.behaviour = answer(leap=3)
    await probe(client, fake_ntp.target, "two")

    async def logs(**params: str) -> tuple[int, str]:
        resp = await client.get("/logs", params=params)
        return resp.status, await resp.text()

    status, body = await logs(target=fake_ntp.target, module="one")
    assert status == 200 and "probe_success 1" in body and "module=one" in body, body
    status, body = await logs(target=fake_ntp.target)  # any module: the newest
    assert status == 200 and "probe_success 0" in body and "module=two" in body, body
    status, body = await logs(target=fake_ntp.target, module="three")
    assert status == 404
    assert_one_line(body)
    # The target as the request named it, spelled another way than the history keeps it.
    for spelling in (f"127.0.0.1:000{fake_ntp.port}", f"[::ffff:127.0.0.1]:{fake_ntp.port}"):
        status, body = await logs(target=spelling, module="one")
        assert status == 200 and "probe_success 1" in body, (spelling, body)
        status, body = await logs(target=spelling)
        assert status == 200 and "module=two" in body, (spelling, body)
    status, body = await logs(target="192.0.2.1:123")
    assert status == 404 and "192.0.2.1:123" in body
    status, body = await logs(module="one")  # neither id nor target
    assert status == 400
    assert_one_line(body)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        ("999", 404), ("abc", 400), ("", 400), ("-1", 400), ("1.5", 400),
        # str.isdigit() is true for these, int() rejects the first (regression: was a 500)
        pytest.param("\u00b2", 400, id="superscript-two"),
        pytest.param("\u0663", 400, id="arabic-indic-three"),
        # past Python's int() digit limit (regression: was a 500)
        pytest.param("9" * 5000, 400, id="5000-digits"),
    ],
)
async def test_logs_rejects_unknown_and_bad_ids(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer,
    raw: str, status: int,
) -> None:
    path = tmp_path / "modules.yaml"
    client, _ = await start(aiohttp_client, path, config_text(module_yaml("one")))
    await probe(client, fake_ntp.target, "one")
    resp = await client.get("/logs", params={"id": raw})
    assert resp.status == status
    assert_one_line(await resp.text())


async def test_failures_outlive_the_ring(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    path = tmp_path / "modules.yaml"
    client, _ = await start(aiohttp_client, path, config_text(module_yaml("one")),
                            history_limit=2)
    fake_ntp.behaviour = answer(leap=3)
    await probe(client, fake_ntp.target, "one")  # failure
    fake_ntp.behaviour = answer()
    for _ in range(3):
        await probe(client, fake_ntp.target, "one")  # successes
    _, table = await landing(client)
    results = [(cells[3], cells[4]) for cells, _ in table.rows]
    assert results == [("success", ""), ("success", ""), ("failure", "leap_unsynchronized")]
    ids = [log_id(hrefs[0]) for _, hrefs in table.rows]
    failure_id = ids[2]
    oldest_success = failure_id + 1
    assert oldest_success not in ids
    assert ids[:2] == [failure_id + 3, failure_id + 2]

    resp = await client.get("/logs", params={"id": str(failure_id)})
    assert resp.status == 200
    assert 'probe_ntp_failure_info{reason="leap_unsynchronized"} 1' in await resp.text()
    resp = await client.get("/logs", params={"id": str(oldest_success)})
    assert resp.status == 404


async def test_history_limit_zero_keeps_nothing(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    path = tmp_path / "modules.yaml"
    client, _ = await start(aiohttp_client, path, config_text(module_yaml("one")),
                            history_limit=0)
    status, body = await probe(client, fake_ntp.target, "one")
    assert status == 200 and metric(body, "probe_success") == 1
    _, table = await landing(client)
    assert table.rows == []
    assert (await client.get("/logs", params={"id": "0"})).status == 404


async def test_landing_page_escapes_module_names(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    name = "<b>&"
    path = tmp_path / "modules.yaml"
    block = module_yaml("PLACEHOLDER").replace("PLACEHOLDER", "'<b>&'")
    client, state = await start(aiohttp_client, path, config_text(block))
    assert list(state.config.modules) == [name]
    status, body = await probe(client, fake_ntp.target, name)
    assert status == 200 and metric(body, "probe_success") == 1, body

    page, table = await landing(client)
    assert "<b>" not in page
    assert "&lt;b&gt;&amp;" in page
    assert [cells[1] for cells, _ in table.rows] == [name]  # decoded back by the parser
    assert table.modules == [name]
    data = yaml.safe_load(await (await client.get("/config")).text())
    assert list(data["modules"]) == [name]


# --- min_probe_interval ----------------------------------------------------------------


async def test_min_probe_interval_serves_the_last_result(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    path = tmp_path / "modules.yaml"
    block = module_yaml("cached", samples=2, extra="    min_probe_interval: 10s\n")
    client, _ = await start(aiohttp_client, path, config_text(block))
    status, first = await probe(client, fake_ntp.target, "cached")
    assert status == 200 and metric(first, "probe_success") == 1, first
    assert metric(first, "probe_ntp_result_age_seconds") is None
    await fake_ntp.drain()
    assert len(fake_ntp.requests) == 2

    status, second = await probe(client, fake_ntp.target, "cached")
    assert status == 200
    assert metric(second, "probe_success") == 1
    age = metric(second, "probe_ntp_result_age_seconds")
    assert age is not None and 0 <= age < 10
    assert metric(second, "probe_ntp_offset_seconds") == metric(first, "probe_ntp_offset_seconds")
    await fake_ntp.drain()
    assert len(fake_ntp.requests) == 2  # no second burst
    text = await metrics(client)
    assert metric(text, "ntp_probe_ntp_packets_sent_total") == 2
    # With debug=true the answer says the log is the earlier probe's.
    resp = await client.get("/probe", params={"target": fake_ntp.target, "module": "cached",
                                              "debug": "true"})
    debug = await resp.text()
    assert debug.startswith("Served from the min_probe_interval cache: result age ")
    assert "nothing sent" in debug.splitlines()[0]
    # So do the pages of the history: the landing page's row and the probe's /logs, for a
    # browser and for curl (the log there is the first probe's).
    landing = await (await client.get("/")).text()
    assert landing.count("(not sent: cached)") == 2, landing
    served = await client.get("/logs", params={"id": "1"}, headers={"Accept": "text/html"})
    assert "Served from the min_probe_interval cache" in await served.text()
    text = await (await client.get("/logs", params={"id": "1"})).text()
    assert text.startswith("Served from the min_probe_interval cache: result age ")
    first_log = await (await client.get("/logs", params={"id": "0"})).text()
    assert first_log.startswith("Logs for the probe:")


def test_the_landing_page_shows_at_most_its_row_limit() -> None:
    # A large --history.limit must not make GET / take the event loop for long.
    history = History(limit=pages.MAX_ROWS + 50)
    for i in range(pages.MAX_ROWS + 50):
        history.add("m", f"192.0.2.{i % 250}:123", Measurement(), ProbeLog(), "")
    page = pages.landing(load_config(None), history, "ntp")
    assert page.count("<tr class='success'>") == pages.MAX_ROWS
    assert "50 of them not listed here" in page
    assert f"logs?id={pages.MAX_ROWS + 49}'" in page and "logs?id=0'" not in page


def test_failures_kept_longer_stay_listed_beyond_the_row_limit() -> None:
    # A failure, then more successes than the page lists: the failure is still on it.
    history = History(limit=pages.MAX_ROWS + 500)
    failed = Measurement()
    failed.fail(Reason.UNREACHABLE)
    history.add("m", "192.0.2.9:123", failed, ProbeLog(), "")
    for _ in range(pages.MAX_ROWS + 100):
        history.add("m", "192.0.2.1:123", Measurement(), ProbeLog(), "")
    page = pages.landing(load_config(None), history, "ntp")
    assert page.count("<tr class='failure'>") == 1 and "logs?id=0'" in page
    assert page.count("<tr class='success'>") == pages.MAX_ROWS


# --- coalescing ------------------------------------------------------------------------


def delayed(seconds: float) -> Callable[[Request], list[Send]]:
    def behaviour(req: Request) -> list[Send]:
        return [Send(reply(req), delay=seconds)]

    return behaviour


async def test_identical_concurrent_probes_share_one_burst(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    path = tmp_path / "modules.yaml"
    client, _ = await start(aiohttp_client, path, config_text(module_yaml("one", samples=2)))
    fake_ntp.behaviour = delayed(0.1)
    (s1, b1), (s2, b2) = await asyncio.gather(
        probe(client, fake_ntp.target, "one"), probe(client, fake_ntp.target, "one")
    )
    assert (s1, s2) == (200, 200)
    assert metric(b1, "probe_success") == 1, b1
    assert metric(b2, "probe_success") == 1, b2
    await fake_ntp.drain()
    assert len(fake_ntp.requests) == 2  # one burst of two samples, not two bursts
    assert metric(await metrics(client), "ntp_probe_ntp_packets_sent_total") == 2


async def scrape_beside_a_burst(client: Client, fake_ntp: FakeNTPServer, module: str,
                                scrape_timeout: str) -> tuple[str, str]:
    """A scrape with ``scrape_timeout`` while an identical one without it is in flight:
    both bodies, the later scrape's first."""
    first = asyncio.create_task(probe(client, fake_ntp.target, module))
    await fake_ntp.wait_for_requests(1)
    resp = await client.get("/probe", params={"target": fake_ntp.target, "module": module},
                            headers={"X-Prometheus-Scrape-Timeout-Seconds": scrape_timeout})
    later = await resp.text()
    assert resp.status == 200, later
    status, earlier = await first
    assert status == 200, earlier
    return later, earlier


@pytest.mark.parametrize(("scrape_timeout", "shared"), [
    # 2 samples, each waiting at most its 500 ms reply timeout: over within 1 s.
    ("2", True),  # 1.5 s of budget: the later scrape shares the burst
    ("0.8", False),  # 0.3 s: too little to be sure; it runs its own (shorter) burst
])
async def test_a_scrape_shares_a_burst_only_if_sure_to_be_over_in_its_budget(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer,
    scrape_timeout: str, shared: bool,
) -> None:
    path = tmp_path / "modules.yaml"
    client, _ = await start(aiohttp_client, path,
                            config_text(module_yaml("two", timeout="5s", samples=2)))
    fake_ntp.behaviour = delayed(0.1)
    later, earlier = await scrape_beside_a_burst(client, fake_ntp, "two", scrape_timeout)
    assert metric(later, "probe_success") == 1, later
    assert metric(earlier, "probe_success") == 1, earlier
    sent_later = metric(later, "probe_ntp_samples_sent") or 0
    assert metric(earlier, "probe_ntp_samples_sent") == 2
    await fake_ntp.drain()
    # Shared: one burst of 2, reported to both. Not: the later one's own packets too.
    assert len(fake_ntp.requests) == (2 if shared else 2 + sent_later)
    assert shared == (sent_later == 2 and len(fake_ntp.requests) == 2)


async def test_a_scrape_sharing_a_burst_reports_its_own_wait_as_its_duration(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer,
) -> None:
    # Joined when the burst was half over: its duration is its own wait, which its own
    # budget bounds, not the burst's (a 10 s burst reported to a 4 s scrape as 4.0066 s).
    path = tmp_path / "modules.yaml"
    client, _ = await start(aiohttp_client, path,
                            config_text(module_yaml("three", timeout="5s", samples=3)))
    fake_ntp.behaviour = delayed(0.1)
    first = asyncio.create_task(probe(client, fake_ntp.target, "three"))
    await fake_ntp.wait_for_requests(2)
    resp = await client.get("/probe", params={"target": fake_ntp.target, "module": "three"},
                            headers={"X-Prometheus-Scrape-Timeout-Seconds": "3"})
    later = await resp.text()
    _, earlier = await first
    await fake_ntp.drain()
    assert len(fake_ntp.requests) == 3  # one burst, shared
    later_took, burst_took = (metric(later, "probe_duration_seconds"),
                              metric(earlier, "probe_duration_seconds"))
    assert later_took is not None and burst_took is not None
    assert later_took < burst_took - 0.05, (later_took, burst_took)
    assert metric(later, "probe_ntp_samples_sent") == 3


def test_the_latest_end_of_a_burst_allows_for_late_sends() -> None:
    # 2 samples 1 s apart, 500 ms reply timeout: 1.5 s of waits, and each send may come a
    # little late (the loop's turn) and the verdict take its moment: a joiner with exactly
    # 1.5 s left could be cut off by a burst that then succeeds (a re-audit saw 1.506 s).
    module = make_module(samples=2, interval=1.0, reply_timeout=0.5, timeout=10.0)
    end = _latest_end(module, 100.0, 10.0)
    assert 101.55 <= end <= 101.6
    assert _latest_end(module, 100.0, 1.0) == 101.0  # never past the deadline


async def test_a_burst_of_slow_replies_is_not_joined_by_a_request_it_would_outlast(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    # Replies take 200 ms, longer than the 50 ms spacing: the next request waits for the
    # reply, so 3 samples take about 0.6 s, up to 0.9 s with reply_timeout 300 ms.
    path = tmp_path / "modules.yaml"
    block = module_yaml("slow", timeout="5s", samples=3, reply_timeout="300ms").replace(
        "sample_interval: 10ms", "sample_interval: 50ms")
    client, _ = await start(aiohttp_client, path, config_text(block))
    fake_ntp.behaviour = delayed(0.2)
    # 0.5 s of budget: more than 3 x 50 ms + 300 ms, less than the burst can last.
    later, earlier = await scrape_beside_a_burst(client, fake_ntp, "slow", "1")
    assert metric(later, "probe_success") == 1, later
    assert metric(earlier, "probe_success") == 1, earlier


# --- client hang-up ----------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def ntp_probe_tasks() -> list[asyncio.Task[object]]:
    """Tasks running code from the ntp_probe package."""
    out = []
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        if code is not None and f"{os.sep}ntp_probe{os.sep}" in code.co_filename:
            out.append(task)
    return out


async def test_client_disconnect_cancels_the_probe(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    path = tmp_path / "modules.yaml"
    # 30 s budget against a server that never answers: only the hang-up can end it soon.
    block = module_yaml("hang", timeout="30s", reply_timeout="20s")
    client, state = await start(aiohttp_client, path, config_text(block))
    # A first probe: the event loop's one readiness set for probe sockets (an epoll
    # descriptor kept for the process's life) exists before the count below.
    fake_ntp.behaviour = answer()
    status, _ = await probe(client, fake_ntp.target, "hang")
    assert status == 200
    fake_ntp.behaviour = silent
    assert (await client.get("/-/healthy")).status == 200
    gc.collect()  # an earlier test's garbage must not close its sockets during the count
    fds_before = open_fds()

    session = aiohttp.ClientSession()
    try:
        url = client.make_url("/probe").with_query(target=fake_ntp.target, module="hang")
        request: asyncio.Task[aiohttp.ClientResponse] = asyncio.create_task(session.get(url))
        await poll(lambda: state.in_flight == 1, "probe in flight")
        await fake_ntp.wait_for_requests(1)
        assert state.coordinator.bursts_in_flight == 1
        running = ntp_probe_tasks()
        assert running, "the burst should run as an ntp_probe task"
        assert open_fds() > fds_before  # the HTTP connection and the probe's UDP socket

        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await poll(
            lambda: state.in_flight == 0 and state.coordinator.bursts_in_flight == 0,
            "probe cancelled after the client hung up",
        )
    finally:
        await session.close()
    await poll(lambda: open_fds() == fds_before, f"fds back to {fds_before}")
    await poll(lambda: not ntp_probe_tasks(), "no ntp_probe task left")
    assert all(t.cancelled() for t in running), running
    assert state.in_flight == 0
    # Listed as a failure, as blackbox lists it, with why: a scrape Prometheus gave up on
    # can still be looked into.
    page = await (await client.get("/")).text()
    assert ">cancelled<" in page, page
    # It started the burst: packets went out, nothing says otherwise.
    assert "(client hung up)" in page and "not sent" not in page, page
    logs = await (await client.get("/logs", params={"id": "1"})).text()
    assert "The client hung up after" in logs and "the burst's: it was stopped." in logs, logs
    # The burst's own lines, as far as it got.
    assert f"probing 127.0.0.1 port {fake_ntp.port}, 1 sample\n" in logs, logs
    internals = await metrics(client)
    assert metric(internals, "ntp_probe_ntp_packets_sent_total") == 2, internals
    assert metric(internals, "ntp_probe_probes_total", module="hang", result="success") == 1
    fake_ntp.behaviour = answer()
    status, body = await probe(client, fake_ntp.target, "hang")
    assert status == 200 and metric(body, "probe_success") == 1, body


async def test_a_scrape_joining_a_burst_that_is_being_cancelled_is_answered(
    tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    """Regression: Coordinator.probe cancelled the burst when its last waiter went away
    but left it in _flights until the task had unwound, so an identical request arriving
    in that loop iteration joined the doomed burst and got CancelledError: its handler
    raised instead of answering although its own client was still there."""
    state = make_state(tmp_path / "modules.yaml", text=config_text(module_yaml("one")))
    app = create_app(state)
    fake_ntp.behaviour = silent
    query = f"/probe?target={fake_ntp.target}&module=one"

    leaver = asyncio.create_task(probe_handler(make_mocked_request("GET", query, app=app)))
    await fake_ntp.wait_for_requests(1)
    # The leaver's client hangs up (aiohttp cancels its handler) and, in the same loop
    # iteration, an identical scrape from another client comes in.
    leaver.cancel()
    scrape = asyncio.create_task(probe_handler(make_mocked_request("GET", query, app=app)))
    with pytest.raises(asyncio.CancelledError):
        await leaver
    await asyncio.wait({scrape}, timeout=DEADLINE)
    assert scrape.done(), "the scrape never finished"
    assert not scrape.cancelled(), "the scrape's handler was cancelled by the other client"
    resp = scrape.result()
    assert resp.status == 200
    assert resp.text is not None and "probe_success" in resp.text


async def test_one_of_two_sharing_clients_hanging_up_does_not_cancel_the_burst(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    path = tmp_path / "modules.yaml"
    client, state = await start(aiohttp_client, path, config_text(module_yaml("one")))
    fake_ntp.behaviour = silent
    session = aiohttp.ClientSession()
    try:
        url = client.make_url("/probe").with_query(target=fake_ntp.target, module="one")
        leaver: asyncio.Task[aiohttp.ClientResponse] = asyncio.create_task(session.get(url))
        await poll(lambda: state.in_flight == 1, "first probe in flight")
        stayer: Awaitable[tuple[int, str]] = asyncio.ensure_future(
            probe(client, fake_ntp.target, "one")
        )
        await poll(lambda: state.in_flight == 2, "second probe in flight")
        assert state.coordinator.bursts_in_flight == 1
        leaver.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaver
        await poll(lambda: state.in_flight == 1, "the leaver's handler ended")
        assert state.coordinator.bursts_in_flight == 1  # still running for the other one
        fake_ntp.behaviour = answer()  # too late for the one request already sent
        status, body = await stayer
    finally:
        await session.close()
    assert status == 200
    # The burst ran to its end for the remaining client: one request, no answer.
    assert metric(body, "probe_ntp_samples_sent") == 1
    assert 'probe_ntp_failure_info{reason="timeout"} 1' in body
    assert len(fake_ntp.requests) == 1
    # The burst is counted once, by the request that stayed (the one that started it left).
    text = await metrics(client)
    assert metric(text, "ntp_probe_probes_total", module="one", result="failure") == 1
    assert metric(text, "ntp_probe_ntp_packets_sent_total") == 1


async def test_clients_hanging_up_cannot_make_every_request_a_burst(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    # With min_probe_interval, a burst whose client left runs on and fills the cache:
    # otherwise each request that hangs up at once sends the server a packet.
    path = tmp_path / "modules.yaml"
    block = module_yaml("polite", extra="    min_probe_interval: 1h\n")
    client, state = await start(aiohttp_client, path, config_text(block))
    fake_ntp.behaviour = lambda req: [Send(reply(req), delay=0.2)]
    url = client.make_url("/probe").with_query(target=fake_ntp.target, module="polite")
    session = aiohttp.ClientSession()
    try:
        for _ in range(5):
            leaver = asyncio.ensure_future(session.get(url))
            await poll(lambda: state.in_flight == 1, "the probe in flight")
            leaver.cancel()
            with pytest.raises(asyncio.CancelledError):
                await leaver
            await poll(lambda: state.in_flight == 0, "the handler ended")
    finally:
        await session.close()
    await poll(lambda: state.coordinator.bursts_in_flight == 0, "the orphaned burst ended")
    # Each later request joined the orphan and left too: it is still one orphan, ended.
    assert state.coordinator.orphaned_bursts == 0
    await fake_ntp.drain()
    assert len(fake_ntp.requests) == 1
    status, body = await probe(client, fake_ntp.target, "polite")
    assert status == 200 and metric(body, "probe_success") == 1, body
    assert metric(body, "probe_ntp_result_age_seconds") is not None  # the orphan's result
    # It ran to its end: a probe, counted once (the served copy is not another).
    internals = await metrics(client)
    assert metric(internals, "ntp_probe_ntp_packets_sent_total") == 1
    assert metric(internals, "ntp_probe_probes_total", module="polite", result="success") == 1
    assert metric(internals, "ntp_probe_probe_duration_seconds_count", module="polite") == 1


async def test_a_prober_bug_in_a_shared_burst_is_a_one_line_500_for_every_sharer(
    aiohttp_client: AiohttpClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No prober raises on purpose, so the bug is stood in for: both requests sharing the
    burst get the one-line 500, nothing stays in flight, and the next probe runs."""
    started = asyncio.Event()
    release = asyncio.Event()

    async def buggy(*args: object, **kwargs: object) -> None:
        started.set()
        await release.wait()
        raise RuntimeError("a prober bug")

    monkeypatch.setattr("ntp_probe.engine.coordinator.run_probe", buggy)
    client, state = await start(aiohttp_client, tmp_path / "modules.yaml",
                                config_text(module_yaml("one")))
    first = asyncio.ensure_future(client.get("/probe", params={"target": "192.0.2.1",
                                                              "module": "one"}))
    await asyncio.wait_for(started.wait(), DEADLINE)
    second = asyncio.ensure_future(client.get("/probe", params={"target": "192.0.2.1",
                                                               "module": "one"}))
    await poll(lambda: state.in_flight == 2, "both requests in flight")
    assert state.coordinator.bursts_in_flight == 1
    release.set()
    for response in await asyncio.gather(first, second):
        assert response.status == 500
        assert await response.text() == "internal error: RuntimeError\n"
    assert state.coordinator.bursts_in_flight == 0
    assert state.in_flight == 0


async def test_a_burst_cancelled_under_its_waiters_cancels_them(
    tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    """At shutdown the event loop cancels the burst's task itself: the requests waiting on
    it must end with it, not wait for a result that will never come."""
    state = make_state(tmp_path / "modules.yaml", text=config_text(module_yaml("one")))
    fake_ntp.behaviour = silent
    module = state.config.modules["one"]
    target = parse_target(fake_ntp.target)
    waiting = [asyncio.create_task(state.coordinator.probe(state.config, module, target, 5.0))
               for _ in range(2)]
    await fake_ntp.wait_for_requests(1)
    burst = next(t for t in asyncio.all_tasks() if "Coordinator._run" in repr(t.get_coro()))
    burst.cancel()
    done, _ = await asyncio.wait(waiting, timeout=DEADLINE)
    assert done == set(waiting), "a request still waits on the cancelled burst"
    assert all(t.cancelled() for t in waiting)
    assert state.coordinator.bursts_in_flight == 0


def test_history_entries_are_found_by_id_recent_and_kept_failures_alike() -> None:
    history = History(limit=50)
    failed = Measurement()
    failed.fail(Reason.TIMEOUT)
    for i in range(400):  # every seventh a failure, all but the last 50 out of the ring
        history.add("m", f"t{i}", failed if i % 7 == 0 else Measurement(), ProbeLog(), "")
    history.add_cancelled("m", "t400", 1.0, ProbeLog())
    kept = {e.id for e in history.listed(1000)[0]}
    listed, left_out = history.listed(10)  # 10 of the ring, 10 older failures
    assert len(listed) == 20 and left_out == len(kept) - 20 == 72
    assert kept == set(range(351, 401)) | {i for i in range(0, 351, 7)}.intersection(
        range(400 - 7 * 49, 351))
    for i in range(-1, 402):
        entry = history.get(i)
        if i in kept:
            assert entry is not None and entry.id == i and entry.target == f"t{i}"
        else:
            assert entry is None, i


def test_the_history_does_not_keep_a_huge_exposition() -> None:
    # A hostile daemon can make one probe's metrics megabytes; 200 of them were kept.
    history = History(2)
    entry = history.add("m", "t", Measurement(), ProbeLog("t", "m"), "x" * (MAX_METRICS + 1))
    assert len(entry.metrics) < 200 and "not kept" in entry.metrics
    assert history.add("m", "t", Measurement(), ProbeLog("t", "m"), "ok\n").metrics == "ok\n"
