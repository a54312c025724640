"""The landing page's history table as a real browser sees it (headless Chromium).

The exporter process probes the session's chronyd (a success) and a closed loopback
port (a failure); Chromium loads ``/`` and dumps the DOM it built, which is parsed with
the standard library's HTML parser. Chromium and the exporter are stopped by their PIDs.
Chromium comes from Debian: ``apt-get install --no-install-recommends chromium``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import urllib.parse
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import Chronyd, free_udp_port, require_binary, stop_process
from tests.integration.test_exporter import http_get, one, parse_exposition, start_exporter

pytestmark = pytest.mark.integration

CHROMIUM_TIMEOUT = 60.0


class HistoryRows(HTMLParser):
    """Rows of ``table#history > tbody``: (cell texts, link hrefs)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[list[str], list[str]]] = []
        self.headers: list[str] = []
        self._table = False
        self._body = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "table" and a.get("id") == "history":
            self._table = True
        elif self._table and tag == "tbody":
            self._body = True
        elif self._table and tag in ("td", "th"):
            self._cell = []
        elif self._body and tag == "tr":
            self.rows.append(([], []))
        elif self._body and tag == "a" and self.rows:
            self.rows[-1][1].append(a.get("href") or "")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            text = "".join(self._cell).strip()
            if tag == "th":
                self.headers.append(text)
            elif self._body and self.rows:
                self.rows[-1][0].append(text)
            self._cell = None
        elif tag == "tbody":
            self._body = False
        elif tag == "table":
            self._table = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def group_members(pgid: int) -> list[int]:
    """PIDs of the live processes in process group ``pgid``."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid:  # state, ppid, pgrp
            members.append(int(entry.name))
    return members


def dump_dom(chromium: str, url: str, profile: Path) -> str:
    """``chromium --headless --dump-dom URL``; the browser's process group is ours and is
    killed by its id if it outlives the timeout or leaves helpers behind."""
    argv = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--dump-dom", url,
    ]
    env = dict(os.environ, HOME=str(profile))
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=CHROMIUM_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"chromium did not finish within {CHROMIUM_TIMEOUT} s")
    finally:
        if group_members(proc.pid):  # helpers left behind in the browser's own group
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err.decode(errors="replace")
    return out.decode()


def test_history_table_in_chromium(tmp_path: Path, chronyd: Chronyd) -> None:
    chromium = require_binary("chromium")
    closed = f"127.0.0.1:{free_udp_port()}"
    e = start_exporter(tmp_path)
    try:
        status, _, body = e.get(f"/probe?target={chronyd.target}&module=ntp_fast")
        assert status == 200 and one(parse_exposition(body), "probe_success") == 1, body
        status, _, body = e.get(f"/probe?target={closed}&module=ntp_fast")
        assert status == 200 and one(parse_exposition(body), "probe_success") == 0, body

        base = e.base + "/"
        profile = tmp_path / "chromium-profile"
        profile.mkdir()
        dom = dump_dom(chromium, base, profile)
        table = HistoryRows()
        table.feed(dom)
        table.close()

        assert table.headers == ["Time (UTC)", "Module", "Target", "Result", "Reason",
                                 "Duration", "Debug"], dom
        assert len(table.rows) == 2, dom
        (fail_cells, fail_links), (ok_cells, ok_links) = table.rows  # newest first
        assert fail_cells[1:5] == ["ntp_fast", closed, "failure", "unreachable"]
        assert ok_cells[1:5] == ["ntp_fast", chronyd.target, "success", ""]
        for cells in (fail_cells, ok_cells):
            assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", cells[0]), cells
            assert re.fullmatch(r"\d+\.\d ms", cells[5]), cells
            assert cells[6] == "log"
        assert len(fail_links) == 1 and len(ok_links) == 1

        # The links resolve, relative to the page, to each probe's own log.
        status, ctype, text = http_get(urllib.parse.urljoin(base, fail_links[0]))
        assert status == 200 and ctype.startswith("text/plain")
        assert f"probe {closed} module=ntp_fast" in text
        assert "probe_success 0" in text
        assert 'probe_ntp_failure_info{reason="unreachable"} 1' in text
        status, _, text = http_get(urllib.parse.urljoin(base, ok_links[0]))
        assert status == 200
        assert f"probe {chronyd.target} module=ntp_fast" in text
        assert "probe_success 1" in text
        assert re.search(r"T1=[0-9a-f]{16} T2=[0-9a-f]{16} T3=[0-9a-f]{16} T4=[0-9a-f]{16}",
                         text), text
        assert "refid=127.127.1.1" in text
    finally:
        stop_process(e.proc)
