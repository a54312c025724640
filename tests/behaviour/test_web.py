"""Behaviour of the HTTP layer: /probe against the fake NTP server, /metrics, health, limits."""

from __future__ import annotations

import asyncio
import gzip
import threading
import time
from collections.abc import Callable

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from pytest_aiohttp import AiohttpClient

from ntp_probe.config.load import load_config
from ntp_probe.config.schema import Config, Module, NTPSettings
from ntp_probe.exposition.internals import Internals
from ntp_probe.web import history
from ntp_probe.web.app import State, create_app
from tests.behaviour import fake_server
from tests.behaviour.fake_server import (
    Behaviour,
    FakeNTPServer,
    Send,
    answer,
    kod,
    silent,
)
from tests.contract import VALID_SAMPLE_METRICS

# The fixture, made visible to pytest in this module.
fake_ntp = fake_server.fake_ntp

Client = TestClient[web.Request, web.Application]

CONTENT_TYPE_PREFIX = "text/plain; version=0.0.4"


def _module(name: str, *, timeout: float, samples: int, reply_timeout: float) -> Module:
    return Module(
        name=name,
        timeout=timeout,
        ntp=NTPSettings(
            samples=samples, sample_interval=0.01, reply_timeout=reply_timeout,
            preferred_ip_protocol="ip4",
        ),
    )


TEST_MODULES = {
    "ntp": _module("ntp", timeout=2.0, samples=1, reply_timeout=0.5),
    "burst": _module("burst", timeout=2.0, samples=3, reply_timeout=0.5),
    # A long module timeout: only the scrape-timeout header can bound it quickly.
    "slow": _module("slow", timeout=10.0, samples=3, reply_timeout=1.0),
    "busy": _module("busy", timeout=1.0, samples=1, reply_timeout=1.0),
}


def make_state(config: Config | None = None, max_concurrent: int = 100) -> State:
    config = config or Config(modules=TEST_MODULES, source="test")
    internals = Internals()
    internals.config_loaded(tuple(config.modules))
    return State(config=config, internals=internals, max_concurrent=max_concurrent)


@pytest.fixture
def state() -> State:
    return make_state()


@pytest.fixture
async def client(aiohttp_client: AiohttpClient, state: State) -> Client:
    return await aiohttp_client(create_app(state))


def samples_of(text: str) -> list[Sample]:
    """Parse an exposition (this also validates it) into its samples."""
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def series(text: str, name: str) -> list[Sample]:
    return [s for s in samples_of(text) if s.name == name]


def value(text: str, name: str, **labels: str) -> float | None:
    for s in samples_of(text):
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return None


def assert_one_line(body: str) -> None:
    assert body.endswith("\n") and body.count("\n") == 1 and body.strip(), repr(body)


async def get_metrics(client: Client) -> str:
    resp = await client.get("/metrics")
    assert resp.status == 200
    return await resp.text()


# --- bad requests ------------------------------------------------------------------------


@pytest.mark.parametrize("query", ["", "?module=ntp", "?target="])
async def test_missing_target_is_400(client: Client, query: str) -> None:
    resp = await client.get("/probe" + query)
    assert resp.status == 400
    body = await resp.text()
    assert_one_line(body)
    assert "target" in body


async def test_unknown_module_is_400_and_counted(client: Client) -> None:
    assert value(await get_metrics(client), "ntp_probe_module_unknown_total") == 0
    for expected in (1, 2):
        resp = await client.get("/probe", params={"target": "127.0.0.1", "module": "nope"})
        assert resp.status == 400
        body = await resp.text()
        assert_one_line(body)
        assert "nope" in body
        assert value(await get_metrics(client), "ntp_probe_module_unknown_total") == expected
    # Checked before the target, as blackbox does: counted without one too.
    resp = await client.get("/probe", params={"module": "nope"})
    assert resp.status == 400 and "nope" in await resp.text()
    assert value(await get_metrics(client), "ntp_probe_module_unknown_total") == 3


async def test_unknown_module_reason_stays_one_line(client: Client) -> None:
    resp = await client.get("/probe", params={"target": "127.0.0.1", "module": "x\ny"})
    assert resp.status == 400
    assert_one_line(await resp.text())


async def test_unknown_module_with_packaged_config(aiohttp_client: AiohttpClient) -> None:
    client = await aiohttp_client(create_app(make_state(load_config(None))))
    resp = await client.get("/probe", params={"target": "127.0.0.1", "module": "nope"})
    assert resp.status == 400
    body = await resp.text()
    assert_one_line(body)
    assert body == ("unknown module 'nope' (known: ntp, ntp_fast, local, kernel, hybrid, "
                    "group, nts)\n")


@pytest.mark.parametrize(
    "target", ["host:99999", "[::1", "a b", "http://x", "host:0", ":123", "a\nb", "[::1]x"]
)
async def test_unparsable_target_is_400(client: Client, target: str) -> None:
    resp = await client.get("/probe", params={"target": target, "module": "ntp"})
    assert resp.status == 400
    assert_one_line(await resp.text())
    assert value(await get_metrics(client), "ntp_probe_ntp_packets_sent_total") == 0


@pytest.mark.parametrize("header", ["abc", "0", "-1", "nan", "inf", "\u0663"])
async def test_bad_scrape_timeout_header_is_400(
    client: Client, fake_ntp: FakeNTPServer, header: str
) -> None:
    resp = await client.get(
        "/probe",
        params={"target": fake_ntp.target, "module": "ntp"},
        headers={"X-Prometheus-Scrape-Timeout-Seconds": header},
    )
    assert resp.status == 400
    assert_one_line(await resp.text())
    await fake_ntp.drain()
    assert fake_ntp.requests == []


async def test_an_empty_scrape_timeout_header_is_no_header(
    client: Client, fake_ntp: FakeNTPServer
) -> None:
    resp = await client.get("/probe", params={"target": fake_ntp.target, "module": "ntp"},
                            headers={"X-Prometheus-Scrape-Timeout-Seconds": ""})
    assert resp.status == 200, await resp.text()


# --- probes ------------------------------------------------------------------------------


async def test_good_probe(client: Client, fake_ntp: FakeNTPServer) -> None:
    fake_ntp.behaviour = answer(offset=0.25)
    resp = await client.get("/probe", params={"target": fake_ntp.target, "module": "burst"})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith(CONTENT_TYPE_PREFIX)
    body = await resp.text()
    assert value(body, "probe_success") == 1
    present = {s.name for s in samples_of(body)}
    assert present >= set(VALID_SAMPLE_METRICS), sorted(set(VALID_SAMPLE_METRICS) - present)
    assert "probe_ntp_failure_info" not in present
    assert "probe_ntp_kiss_code_info" not in present
    offset = value(body, "probe_ntp_offset_seconds")
    assert offset is not None and abs(offset - 0.25) < 1e-3
    assert value(body, "probe_ntp_samples_sent") == 3
    assert value(body, "probe_ntp_samples_received") == 3
    assert value(body, "probe_ntp_server_info", refid="127.0.0.1", version="4") == 1
    # Every series is a gauge (fresh per probe).
    assert all(f.type == "gauge" for f in text_string_to_metric_families(body))


async def test_module_defaults_to_ntp(client: Client, fake_ntp: FakeNTPServer) -> None:
    resp = await client.get("/probe", params={"target": fake_ntp.target})
    assert resp.status == 200
    assert value(await resp.text(), "probe_success") == 1
    metrics = await get_metrics(client)
    assert value(metrics, "ntp_probe_probes_total", module="ntp", result="success") == 1


async def test_packaged_config_probe(
    aiohttp_client: AiohttpClient, fake_ntp: FakeNTPServer
) -> None:
    client = await aiohttp_client(create_app(make_state(load_config(None))))
    resp = await client.get("/probe", params={"target": fake_ntp.target, "module": "ntp_fast"})
    assert resp.status == 200
    assert value(await resp.text(), "probe_success") == 1


async def test_debug_output(client: Client, fake_ntp: FakeNTPServer) -> None:
    resp = await client.get(
        "/probe", params={"target": fake_ntp.target, "module": "burst", "debug": "true"}
    )
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    text = await resp.text()
    sample_lines = [line for line in text.splitlines() if "T1=" in line]
    assert len(sample_lines) == 3
    for line in sample_lines:
        assert all(f"T{i}=" in line for i in (1, 2, 3, 4)), line
    assert "verdict" in text
    assert "probe_success 1" in text
    # The module configuration.
    assert "burst:" in text
    assert "samples: 3" in text
    assert "sample_interval: 10ms" in text
    assert "reply_timeout: 500ms" in text


@pytest.mark.parametrize("spelling", ["1", "yes", "TRUE", "True", "on"])
async def test_only_debug_true_is_the_debug_page(client: Client, fake_ntp: FakeNTPServer,
                                                spelling: str) -> None:
    # As blackbox reads it: anything else serves the exposition Prometheus parses.
    resp = await client.get(
        "/probe", params={"target": fake_ntp.target, "module": "ntp", "debug": spelling})
    assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert value(await resp.text(), "probe_success") == 1


async def test_debug_output_shows_metrics_too_large_to_keep(
        client: Client, fake_ntp: FakeNTPServer, monkeypatch: pytest.MonkeyPatch) -> None:
    # The history keeps a bounded copy of each exposition (a hostile daemon's may be
    # megabytes); debug=true still shows the whole of what would have been returned.
    monkeypatch.setattr(history, "MAX_METRICS", 200)
    resp = await client.get(
        "/probe", params={"target": fake_ntp.target, "module": "burst", "debug": "true"})
    text = await resp.text()
    assert "probe_success 1" in text and "not kept" not in text, text
    logs = await (await client.get("/logs", params={"id": "0"},
                                   headers={"Accept": "text/plain"})).text()
    assert "characters of metrics, not kept (more than 200)" in logs, logs


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        pytest.param(answer(stratum=16, leap=3, root_dispersion=2.0),
                     "stratum_unsynchronized", id="several-checks"),
        pytest.param(lambda req: [Send(kod(req, b"DENY"))], "kod_deny", id="kod"),
        # A kiss code that needs label escaping must still give a valid exposition.
        pytest.param(lambda req: [Send(kod(req, b'A"\\Z'))], "kod_other", id="kod-escaped"),
        pytest.param(silent, "timeout", id="silent"),
    ],
)
async def test_failing_probe_has_one_failure_series(
    client: Client, fake_ntp: FakeNTPServer, behaviour: Behaviour, reason: str
) -> None:
    fake_ntp.behaviour = behaviour
    resp = await client.get("/probe", params={"target": fake_ntp.target, "module": "ntp"})
    assert resp.status == 200
    body = await resp.text()
    assert value(body, "probe_success") == 0
    failures = series(body, "probe_ntp_failure_info")
    assert len(failures) == 1
    assert failures[0].labels == {"reason": reason}
    assert failures[0].value == 1
    if reason == "kod_deny":
        assert value(body, "probe_ntp_kiss_code_info", code="DENY") == 1
    if reason == "kod_other":
        assert value(body, "probe_ntp_kiss_code_info", code='A"\\Z') == 1


async def test_metrics_are_rendered_off_the_event_loop(client: Client, state: State) -> None:
    # Thousands of modules' series take a second to render: probes in flight must not wait.
    rendered_on: list[int] = []

    class Spy:
        def collect(self) -> list[object]:
            rendered_on.append(threading.get_ident())
            return []

    state.internals.registry.register(Spy())  # type: ignore[arg-type]
    rendered_on.clear()  # registering collects once, to describe it
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert rendered_on and threading.get_ident() not in rendered_on


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_any_method_is_served_but_reloads(client: Client, fake_ntp: FakeNTPServer,
                                                method: str) -> None:
    # As Go's handlers (blackbox registers them with HandleFunc): a POST to /probe probes.
    resp = await client.request(method, "/probe",
                                params={"target": fake_ntp.target, "module": "ntp"})
    assert resp.status == 200
    assert value(await resp.text(), "probe_success") == 1
    assert (await client.request(method, "/metrics")).status == 200
    assert (await client.request(method, "/-/healthy")).status == 200
    assert (await client.get("/-/reload")).status == 405  # only it asks for one method


async def test_metrics_endpoint(client: Client, fake_ntp: FakeNTPServer) -> None:
    resp = await client.get("/probe", params={"target": fake_ntp.target, "module": "burst"})
    assert resp.status == 200
    fake_ntp.behaviour = answer(leap=3)
    resp = await client.get("/probe", params={"target": fake_ntp.target, "module": "ntp"})
    assert resp.status == 200
    resp = await client.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith(CONTENT_TYPE_PREFIX)
    text = await resp.text()
    assert "_created" not in text  # client_python's extra series, which no Go exporter has
    assert value(text, "ntp_probe_probes_total", module="burst", result="success") == 1
    assert value(text, "ntp_probe_probes_total", module="ntp", result="failure") == 1
    # Every configured module's series exist from the start, at 0: rate() sees the first.
    assert value(text, "ntp_probe_probes_total", module="ntp", result="success") == 0
    assert value(text, "ntp_probe_probes_total", module="slow", result="failure") == 0
    assert value(text, "ntp_probe_probe_duration_seconds_count", module="slow") == 0
    assert value(text, "ntp_probe_ntp_packets_sent_total") == 4
    assert value(text, "ntp_probe_build_info") == 1
    assert value(text, "ntp_probe_probes_in_flight") == 0
    assert value(text, "ntp_probe_modules_configured") == len(TEST_MODULES)
    assert value(text, "ntp_probe_probe_duration_seconds_count", module="burst") == 1
    names = {s.name for s in samples_of(text)}
    assert any(n.startswith("process_") for n in names)
    # /metrics holds internals only, never a probe's series.
    assert not any(n.startswith("probe_") for n in names)


@pytest.mark.parametrize(("accept", "encoding"), [
    ("gzip", "gzip"), ("deflate, gzip;q=1.0, *;q=0.5", "gzip"),  # Prometheus sends these
    ("gzip;q=0", None), ("identity", None), (None, None),
])
async def test_expositions_are_gzipped_when_the_scraper_accepts_it(
        client: Client, fake_ntp: FakeNTPServer, accept: str | None,
        encoding: str | None) -> None:
    headers = {} if accept is None else {"Accept-Encoding": accept}
    for path, params in (("/probe", {"target": fake_ntp.target, "module": "burst"}),
                         ("/metrics", {})):
        resp = await client.get(path, params=params, headers=headers, auto_decompress=False,
                                skip_auto_headers=["Accept-Encoding"])
        raw = await resp.read()
        assert resp.headers.get("Content-Encoding") == encoding, path
        text = (gzip.decompress(raw) if encoding else raw).decode()
        assert resp.headers["Content-Type"].startswith(CONTENT_TYPE_PREFIX)
        assert "probe_success 1" in text if path == "/probe" else "ntp_probe_build_info" in text


@pytest.mark.parametrize("path", ["/-/healthy", "/-/ready"])
async def test_health(client: Client, path: str) -> None:
    resp = await client.get(path)
    assert resp.status == 200


async def test_scrape_timeout_header_bounds_the_probe(
    client: Client, fake_ntp: FakeNTPServer
) -> None:
    fake_ntp.behaviour = silent
    started = time.monotonic()
    resp = await client.get(
        "/probe",
        params={"target": fake_ntp.target, "module": "slow"},
        headers={"X-Prometheus-Scrape-Timeout-Seconds": "1"},
    )
    elapsed = time.monotonic() - started
    assert resp.status == 200
    assert elapsed < 0.7  # header 1 s - offset 0.5 s, plus slack (module timeout is 10 s)
    body = await resp.text()
    assert value(body, "probe_success") == 0
    assert value(body, "probe_ntp_failure_info", reason="timeout") == 1
    duration = value(body, "probe_duration_seconds")
    assert duration is not None and duration < 0.5 + 0.05
    await fake_ntp.wait_for_requests(1)


async def wait_until(predicate: Callable[[], bool], deadline: float = 2.0) -> None:
    """Poll ``predicate`` on the event loop until it holds; fail after ``deadline`` s."""
    end = time.monotonic() + deadline
    while not predicate():
        assert time.monotonic() < end, "condition not reached before the deadline"
        await asyncio.sleep(0.002)


async def test_max_concurrent_rejects_at_once(
    aiohttp_client: AiohttpClient, fake_ntp: FakeNTPServer
) -> None:
    fake_ntp.behaviour = silent
    state = make_state(max_concurrent=1)
    client = await aiohttp_client(create_app(state))
    params = {"target": fake_ntp.target, "module": "busy"}
    first = asyncio.create_task(client.get("/probe", params=params))
    await wait_until(lambda: state.in_flight == 1)
    await fake_ntp.wait_for_requests(1)

    resp = await client.get("/probe", params=params)
    assert resp.status == 503
    assert_one_line(await resp.text())
    assert not first.done()  # answered without queueing behind the probe in flight

    metrics = await client.get("/metrics")
    assert metrics.status == 200
    assert value(await metrics.text(), "ntp_probe_probes_in_flight") == 1
    healthy = await client.get("/-/healthy")
    assert healthy.status == 200
    assert not first.done()

    resp1 = await first
    assert resp1.status == 200
    assert value(await resp1.text(), "probe_ntp_failure_info", reason="timeout") == 1
    assert state.in_flight == 0
    # Once the slot is free, probes run again.
    fake_ntp.behaviour = answer()
    resp = await client.get("/probe", params=params)
    assert resp.status == 200
    assert value(await resp.text(), "probe_success") == 1


# --- Kiss-o'-Death memory and shared bursts ---------------------------------------------


@pytest.mark.parametrize(
    ("code", "poll", "reason", "hold"),
    [
        # RATE: max(2**poll, 64 s) for the first KoD.
        (b"RATE", 4, "kod_rate", 64.0),
        (b"RATE", 8, "kod_rate", 256.0),
        # DENY and RSTR: the long default hold (24 h).
        (b"DENY", 4, "kod_deny", 86400.0),
        (b"RSTR", 4, "kod_rstr", 86400.0),
    ],
)
async def test_kod_backs_off_the_target(
    client: Client, fake_ntp: FakeNTPServer, code: bytes, poll: int, reason: str, hold: float
) -> None:
    fake_ntp.behaviour = lambda req: [Send(kod(req, code, poll=poll))]
    params = {"target": fake_ntp.target, "module": "burst"}
    first = await (await client.get("/probe", params=params)).text()
    assert value(first, "probe_ntp_failure_info", reason=reason) == 1

    second = await (await client.get("/probe", params=params)).text()
    await fake_ntp.drain()
    assert len(fake_ntp.requests) == 1, "a packet was sent during the backoff"
    assert value(second, "probe_success") == 0
    assert value(second, "probe_ntp_failure_info", reason="backoff") == 1
    assert len(series(second, "probe_ntp_failure_info")) == 1
    assert value(second, "probe_ntp_kiss_code_info", code=code.decode()) == 1
    remaining = value(second, "probe_ntp_backoff_remaining_seconds")
    assert remaining is not None and hold - 5 < remaining <= hold
    assert value(await get_metrics(client), "ntp_probe_ntp_packets_sent_total") == 1


