"""The landing page and /logs in-process: what they show, how they escape, and how /logs
tells an aged-out probe from one that never ran. Probes go to the in-process fake NTP
server on 127.0.0.1 (the browser's view is tests/integration/test_history_chromium.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pytest_aiohttp import AiohttpClient

from ntp_probe.web.pages import _seconds
from tests.behaviour import fake_server
from tests.behaviour.fake_server import FakeNTPServer, answer
from tests.behaviour.test_operate_web import (
    Client,
    config_text,
    module_yaml,
    parse_page,
    probe,
    start,
)

fake_ntp = fake_server.fake_ntp

HTML = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}  # what a browser sends
HOSTILE = "<img src=x onerror=alert(1)> & 'q' \"qq\""


async def page(client: Client, path: str, **params: str) -> tuple[int, str, str]:
    resp = await client.get(path, params=params, headers=HTML)
    return resp.status, resp.headers["Content-Type"], await resp.text()


@pytest.mark.parametrize(("seconds", "signed", "text"), [
    (0.0000123, True, "+12.3 µs"), (-0.0000004, True, "-0.4 µs"), (0.0123456, False, "12.346 ms"),
    (-0.5, True, "-500.000 ms"), (2.5, False, "2.500 s"), (0.001, False, "1.000 ms"),
])
def test_time_figures_use_a_readable_unit(seconds: float, signed: bool, text: str) -> None:
    assert _seconds(seconds, signed) == text


async def test_landing_page_shows_the_time_figures_and_the_form(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    text = config_text(module_yaml("one"), module_yaml("ntp"))
    client, _ = await start(aiohttp_client, tmp_path / "m.yaml", text)
    fake_ntp.behaviour = answer(stratum=3)
    await probe(client, fake_ntp.target, "one")
    status, ctype, body = await page(client, "/")
    assert status == 200 and ctype.startswith("text/html")
    assert "<meta name='viewport' content='width=device-width, initial-scale=1'>" in body
    (cells, _), = parse_page(body).rows
    assert re.fullmatch(r"[+-]\d+\.\d+ (µs|ms)", cells[6]), cells
    assert re.fullmatch(r"\d+\.\d+ (µs|ms)", cells[7]), cells
    assert cells[8] == "3"
    assert "<form class='probe' action='probe' method='get'>" in body
    # The default module is preselected, not merely the first one listed.
    assert "<option value='ntp' selected" in body and "<option value='one' selected" not in body


async def test_landing_page_without_history_says_none_is_kept(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    client, _ = await start(aiohttp_client, tmp_path / "m.yaml",
                            config_text(module_yaml("one")), history_limit=0)
    await probe(client, fake_ntp.target, "one")
    _, _, body = await page(client, "/")
    assert "1 probe since the start; none is kept (--history.limit=0)." in body
    assert "No probes yet" not in body


async def test_landing_page_escapes_descriptions_and_targets(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    # A JSON string is a YAML double-quoted scalar: the description arrives verbatim.
    block = module_yaml("one", extra=f"    description: {json.dumps(HOSTILE)}\n")
    client, state = await start(aiohttp_client, tmp_path / "m.yaml", config_text(block))
    assert state.config.modules["one"].description == HOSTILE
    await probe(client, fake_ntp.target, "one")
    _, _, body = await page(client, "/")
    assert "<img" not in body and "onerror=alert(1)>" not in body
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; &#x27;q&#x27; &quot;qq&quot;" in body
    assert f"title='{fake_ntp.target}'" in body  # the full target on hover


async def test_logs_page_for_a_browser_text_for_curl(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    client, _ = await start(aiohttp_client, tmp_path / "m.yaml", config_text(module_yaml("one")))
    await probe(client, fake_ntp.target, "one")
    (_, hrefs), = parse_page((await page(client, "/"))[2]).rows
    entry_id = hrefs[0].removeprefix("logs?id=")

    status, ctype, body = await page(client, "/logs", id=entry_id)
    assert status == 200 and ctype.startswith("text/html")
    assert f"<dt>Target</dt><dd>{fake_ntp.target}</dd>" in body
    assert "<dt>Module</dt><dd>one</dd>" in body and "<dt>Result</dt><dd>success</dd>" in body
    assert re.search(r"<pre id='log'>[^<]*T1=[0-9a-f]{16}", body)
    assert re.search(r"<pre id='metrics'>[^<]*probe_success 1", body)
    assert body.count("<a href='./'>") == 2  # back to the list, above and below

    resp = await client.get("/logs", params={"id": entry_id}, headers={"Accept": "*/*"})
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert resp.headers["Vary"] == "Accept"
    assert "Logs for the probe:" in await resp.text()


async def test_logs_tells_aged_out_from_never_issued(
    aiohttp_client: AiohttpClient, tmp_path: Path, fake_ntp: FakeNTPServer
) -> None:
    client, _ = await start(aiohttp_client, tmp_path / "m.yaml", config_text(module_yaml("one")),
                            history_limit=1)
    none_yet = await client.get("/logs", params={"id": "0"})
    assert none_yet.status == 404
    assert await none_yet.text() == (
        "probe 0 never ran: no probe has run since the exporter started\n")
    for _ in range(2):
        await probe(client, fake_ntp.target, "one")  # ids 0 and 1; 0 ages out

    aged = await client.get("/logs", params={"id": "0"})
    assert aged.status == 404
    assert (await aged.text()).startswith("probe 0 is no longer in the history")
    never = await client.get("/logs", params={"id": "2"})
    assert never.status == 404
    assert await never.text() == (
        "probe 2 never ran: the probes since the exporter started are 0 to 1\n")
    huge = await client.get("/logs", params={"id": "9" * 40})  # still a number: 404
    assert huge.status == 404 and (await huge.text()).startswith("probe 999")
    too_long = await client.get("/logs", params={"id": "9" * 65})
    assert too_long.status == 400

    status, ctype, body = await page(client, "/logs", id="2")
    assert (status, ctype.split(";")[0]) == (404, "text/html")
    assert "<h1>No such probe</h1>" in body and "<a href='./'>" in body
    status, _, body = await page(client, "/logs", id="x<b>")
    assert status == 400 and "<b>" not in body
