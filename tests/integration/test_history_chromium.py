"""The landing page and the /logs pages as a real browser sees them (headless Chromium).

The exporter process probes the session's chronyd (successes), a closed loopback port
(unreachable) and a long name its target policy forbids (nothing is sent, no DNS asked);
Chromium loads the pages and dumps the DOM it built, which is parsed with the standard
library's HTML parser, and takes screenshots at a desktop and a phone width for a person
to look at (their paths are printed; pytest -s shows them). Chromium and the exporter are
stopped by their PIDs. Chromium comes from Debian:
``apt-get install --no-install-recommends chromium``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import struct
import subprocess
import urllib.parse
from dataclasses import dataclass, field
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import pytest
import yaml

from tests.conftest import Chronyd, free_udp_port, require_binary, stop_process
from tests.integration.test_exporter import http_get, one, parse_exposition, start_exporter

pytestmark = pytest.mark.integration

CHROMIUM_TIMEOUT = 60.0
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
        "track", "wbr"}
# Hostile text in a module description: it must arrive as text, never as markup.
HOSTILE = "<script>alert(1)</script> & \"quoted\" 'single'"
LONG_TARGET = "a-rather-long-host-name-for-the-landing-page.ntp-servers.example.invalid:123"
WIDTHS = {"desktop": (1280, 1000), "phone": (390, 1700)}


@dataclass
class Node:
    """One element of the dumped DOM."""

    tag: str
    attrs: dict[str, str]
    children: list[Node | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def all(self, tag: str, **attrs: str) -> list[Node]:
        found = []
        for c in self.children:
            if isinstance(c, Node):
                if c.tag == tag and all(c.attrs.get(k.rstrip("_")) == v
                                        for k, v in attrs.items()):
                    found.append(c)
                found.extend(c.all(tag, **attrs))
        return found

    def only(self, tag: str, **attrs: str) -> Node:
        found = self.all(tag, **attrs)
        assert len(found) == 1, (tag, attrs, len(found))
        return found[0]


class Tree(HTMLParser):
    """Chromium's --dump-dom output (every non-void element closed) as a tree of Nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.root = Node("#document", {})
        self._stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self._stack[-1].children.append(node)
        if tag not in VOID:
            self._stack.append(node)

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        assert self._stack[-1].tag == tag, (tag, [n.tag for n in self._stack])
        self._stack.pop()

    def handle_data(self, data: str) -> None:
        self._stack[-1].children.append(data)


def parse(dom: str) -> Node:
    tree = Tree()
    tree.feed(dom)
    tree.close()
    return tree.root


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


def run_chromium(chromium: str, profile: Path, *args: str) -> str:
    """Headless Chromium with ``args``; its process group is ours and is killed by its id if
    it outlives the timeout or leaves helpers behind. Returns stdout."""
    argv = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}", *args,
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


def dump_dom(chromium: str, profile: Path, url: str) -> Node:
    return parse(run_chromium(chromium, profile, "--dump-dom", url))


def screenshot(chromium: str, profile: Path, url: str, path: Path, size: tuple[int, int]) -> None:
    """A PNG of ``url`` in a window of ``size``; checks it is one, of that width."""
    run_chromium(chromium, profile, f"--screenshot={path}", f"--window-size={size[0]},{size[1]}",
                 url)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert (width, height) == size, (path, width, height)
    print(f"screenshot: {path}")


def config_file(tmp: Path) -> Path:
    """The packaged modules, one with a hostile description, and a policy forbidding
    ``*.example.invalid`` so the long target is refused before any lookup."""
    packaged = resources.files("ntp_probe").joinpath("modules.yaml").read_text("utf-8")
    data = yaml.safe_load(packaged)
    data["denied_targets"] = ["*.example.invalid"]
    data["modules"]["ntp_fast"]["description"] = HOSTILE
    path = tmp / "modules.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


HEADERS = ["Time (UTC)", "Module", "Target", "Result", "Reason", "Duration", "Offset", "RTT",
           "Stratum", "Log"]
FIGURE = r"[+-]?\d+\.\d+ (µs|ms|s)"


def test_pages_in_chromium(tmp_path: Path, chronyd: Chronyd) -> None:
    chromium = require_binary("chromium")
    closed = f"127.0.0.1:{free_udp_port()}"
    e = start_exporter(tmp_path, (f"--config.file={config_file(tmp_path)}",
                                  "--history.limit=3"))
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        expected = [(chronyd.target, 1), (chronyd.target, 1), (closed, 0), (LONG_TARGET, 0)]
        for target, success in expected:  # ids 0..3; with --history.limit=3, 0 ages out
            query = urllib.parse.urlencode({"target": target, "module": "ntp_fast"})
            status, _, body = e.get(f"/probe?{query}")
            assert status == 200, body
            assert one(parse_exposition(body), "probe_success") == success, body

        base = e.base + "/"
        page = dump_dom(chromium, profile, base)
        assert not page.all("script"), "no script element, the description included"
        assert page.only("meta", name="viewport").attrs["content"].startswith("width=")
        history = page.only("table", id="history")
        assert [th.text() for th in history.only("thead").all("th")] == HEADERS
        rows = history.only("tbody").all("tr")
        cells = [[td.text() for td in tr.all("td")] for tr in rows]
        assert [c[1:5] for c in cells] == [  # newest first; probe 0 aged out
            ["ntp_fast", LONG_TARGET, "failure", "target_forbidden"],
            ["ntp_fast", closed, "failure", "unreachable"],
            ["ntp_fast", chronyd.target, "success", ""],
        ], cells
        for c in cells:
            assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", c[0]), c
            assert re.fullmatch(r"\d+\.\d ms", c[5]), c
            assert c[9] == "log"
        ok = cells[2]
        assert re.fullmatch(FIGURE, ok[6]) and ok[6][0] in "+-", ok  # offset, signed
        assert re.fullmatch(FIGURE, ok[7]) and ok[7][0] not in "+-", ok  # rtt
        assert ok[8].isdigit() and 1 <= int(ok[8]) <= 15, ok
        assert cells[0][6:9] == ["", "", ""] and cells[1][6:9] == ["", "", ""]
        # The long target is shortened on screen (CSS ellipsis) and whole on hover.
        spans = [tr.only("span", class_="target") for tr in rows]
        assert [s.attrs["title"] for s in spans] == [LONG_TARGET, closed, chronyd.target]
        for tr in rows:  # the labels the phone layout shows beside each value
            assert [td.attrs["data-label"] for td in tr.all("td")] == HEADERS

        modules = page.only("table", id="modules").only("tbody").all("tr")
        described = {tr.only("code").text(): tr.all("td")[-1].text() for tr in modules}
        assert described["ntp_fast"] == HOSTILE
        assert described["ntp"].startswith("Polite probe")

        # Each row's link: a page for the browser, the plain debug text for curl.
        links = [urllib.parse.urljoin(base, tr.only("a").attrs["href"]) for tr in rows]
        status, ctype, text = http_get(links[1])
        assert status == 200 and ctype.startswith("text/plain")
        assert 'probe_ntp_failure_info{reason="unreachable"} 1' in text
        log_page = dump_dom(chromium, profile, links[2])
        summary = log_page.only("dl", class_="summary")
        facts = dict(zip((dt.text() for dt in summary.all("dt")),
                         (dd.text() for dd in summary.all("dd")), strict=True))
        assert facts["Target"] == chronyd.target and facts["Module"] == "ntp_fast"
        assert facts["Result"] == "success" and re.fullmatch(FIGURE, facts["Offset"])
        log_text = log_page.only("pre", id="log").text()
        stamp = r"=[0-9a-f]{16} \(\S+Z\)"
        assert re.search(f"T1{stamp} T2{stamp} T3{stamp} T4{stamp}", log_text), log_text
        assert "refid=127.127.1.1" in log_text
        assert "probe_success 1" in log_page.only("pre", id="metrics").text()
        assert HOSTILE in log_page.only("pre", id="module").text()
        assert not log_page.all("script")
        backs = [a.attrs["href"] for a in log_page.all("a")]
        assert backs and all(urllib.parse.urljoin(links[2], h) == base for h in backs)
        failed = dump_dom(chromium, profile, links[0])
        assert failed.only("dl", class_="summary").all("dd")[3].text() == \
            "failure: target_forbidden"
        for name, size in WIDTHS.items():
            screenshot(chromium, profile, base, shots / f"landing-{name}.png", size)
            screenshot(chromium, profile, links[2], shots / f"log-{name}.png", size)

        # The form asks /probe what a scrape would, with the debug log when ticked (probe 4).
        form = page.only("form")
        assert (form.attrs["action"], form.attrs["method"]) == ("probe", "get")
        assert {i.attrs["name"] for i in form.all("input")} == {"target", "debug"}
        options = form.only("select", name="module").all("option")
        assert [o.attrs["value"] for o in options] == list(described)
        assert [o.attrs["value"] for o in options if "selected" in o.attrs] == ["ntp"]
        debug = form.only("input", name="debug")
        assert "checked" in debug.attrs
        query = urllib.parse.urlencode({"target": chronyd.target, "module": "ntp_fast",
                                        debug.attrs["name"]: debug.attrs["value"]})
        status, ctype, text = http_get(urllib.parse.urljoin(base, form.attrs["action"])
                                       + "?" + query)
        assert status == 200 and ctype.startswith("text/plain"), text
        assert "Logs for the probe:" in text and "probe_success 1" in text

        # An id that aged out and one never issued: both 404, each saying which.
        aged = dump_dom(chromium, profile, base + "logs?id=0").only("body").text()
        assert "probe 0 is no longer in the history" in aged, aged
        never = dump_dom(chromium, profile, base + "logs?id=99").only("body").text()
        assert "probe 99 never ran" in never and "0 to 4" in never, never
        assert e.get("/logs?id=0")[0] == 404 and e.get("/logs?id=99")[0] == 404
        html_404 = e.get("/logs?id=99", {"Accept": "text/html"})
        assert html_404[0] == 404 and html_404[1].startswith("text/html")
    finally:
        stop_process(e.proc)
