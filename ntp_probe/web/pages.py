"""The HTML and text pages: the landing page with recent probes, and one probe's debug log."""

from __future__ import annotations

import html
import time

import yaml

from ntp_probe import __version__
from ntp_probe.config.schema import Config
from ntp_probe.web.history import Entry, History


def debug_text(entry: Entry, module: dict[str, object]) -> str:
    """The debug=true answer and /logs page: the log, the metrics, the module."""
    return (
        "Logs for the probe:\n" + entry.log.text()
        + "\n\nMetrics that would have been returned:\n" + entry.metrics
        + "\n\nModule configuration:\n"
        + yaml.safe_dump({entry.module: module}, sort_keys=False)
    )


def _row(e: Entry) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(e.timestamp))
    result = "success" if e.success else "failure"
    return (
        f"<tr class='{result}'><td>{when}</td><td>{html.escape(e.module)}</td>"
        f"<td>{html.escape(e.target)}</td><td>{result}</td>"
        f"<td>{html.escape(e.reason or '')}</td><td>{e.duration * 1000:.1f} ms</td>"
        f"<td><a href='logs?id={e.id}'>log</a></td></tr>"
    )


def landing(config: Config, history: History) -> str:
    """GET /: the landing page."""
    modules = "".join(
        f"<li><code>{html.escape(name)}</code></li>" for name in config.modules
    )
    rows = "".join(_row(e) for e in history)
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>ntp_probe</title>"
        "<style>body{font-family:sans-serif}td,th{padding:2px 8px;text-align:left}"
        "tr.failure td{color:#a00}</style></head><body>"
        f"<h1>ntp_probe {html.escape(__version__)}</h1>"
        "<p><a href='metrics'>Metrics</a> &middot; <a href='config'>Configuration</a> &middot; "
        "Probe: <code>probe?target=HOST[:PORT]&amp;module=NAME[&amp;debug=true]</code></p>"
        "<h2>Recent probes</h2>"
        "<table id='history'><thead><tr><th>Time (UTC)</th><th>Module</th><th>Target</th>"
        "<th>Result</th><th>Reason</th><th>Duration</th><th>Debug</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
        f"<h2>Modules</h2><ul>{modules}</ul></body></html>"
    )
    return page
