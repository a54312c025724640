"""The pages: the landing page (recent probes, a probe form, the modules), one probe's log
as HTML or text, and the small error page. Every value from a probe, a target or the
configuration is escaped; the pages need no JavaScript.
"""

from __future__ import annotations

import html
import time
from datetime import UTC, datetime

from ntp_probe import __version__
from ntp_probe.config.load import dump_yaml
from ntp_probe.config.schema import Config, format_duration
from ntp_probe.engine.text import visible
from ntp_probe.web.history import Entry, History

# One stylesheet for every page. Below 720 px the history table turns into one card per
# probe: ten columns cannot fit a phone, and a sideways-scrolling table hides the offset.
_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1d232a;
 background:#fff;margin:0 auto;max-width:1180px;padding:1em 1.25em 2em}
h1{font-size:1.45em;margin:.3em 0 .2em}h1 small{font-size:.6em;font-weight:400;color:#5b6672}
h2{font-size:1.1em;margin:1.6em 0 .5em}
a{color:#0b5cad}nav{margin:.2em 0 1em}nav a{margin-right:1.2em}
code,pre{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,Consolas,monospace;font-size:.9em}
.hint{color:#5b6672;font-size:.9em;margin:.5em 0 0;overflow-wrap:anywhere}
.stale{color:#a01c1c;font-size:.9em;margin:.5em 0 0;overflow-wrap:anywhere}
table{border-collapse:collapse;width:100%}
th,td{padding:.35em .6em;text-align:left;vertical-align:top;border-bottom:1px solid #e3e6ea}
thead th{color:#4a5562;font-weight:600;border-bottom:2px solid #cfd5db;white-space:nowrap}
.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
.time{white-space:nowrap;font-variant-numeric:tabular-nums}
.target{display:inline-block;max-width:26ch;overflow:hidden;text-overflow:ellipsis;
 white-space:nowrap;vertical-align:bottom}
.result{display:inline-block;padding:0 .55em;border-radius:.7em;font-size:.85em;font-weight:600}
.success .result{background:#e2f4e6;color:#1c6b32}
.failure .result{background:#fbe3e3;color:#a01c1c}
tr.failure .reason{color:#a01c1c}
form.probe{display:flex;flex-wrap:wrap;gap:.7em 1em;align-items:flex-end;padding:.8em 1em;
 background:#f5f7f9;border:1px solid #e3e6ea;border-radius:6px}
form.probe label{display:flex;flex-direction:column;gap:.2em;font-size:.85em;color:#4a5562}
form.probe label.target-field{flex:1 1 16em}
form.probe label.check{flex-direction:row;align-items:center;gap:.4em;font-size:.95em;
 color:inherit;padding-bottom:.4em}
input[type=text],select{font:inherit;color:inherit;padding:.3em .45em;border:1px solid #b9c1c9;
 border-radius:4px;background:#fff;max-width:100%;box-sizing:border-box}
button{font:inherit;padding:.35em 1.2em;border:1px solid #0b5cad;border-radius:4px;
 background:#0b5cad;color:#fff;cursor:pointer}
#modules ul{list-style:none;margin:0;padding:0}
#modules th[scope=row]{font-weight:400;white-space:nowrap}
dl.summary{display:grid;grid-template-columns:max-content 1fr;gap:.25em 1.5em;margin:0}
dl.summary dt{color:#4a5562}dl.summary dd{margin:0;overflow-wrap:anywhere}
pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:0;padding:.7em .9em;
 background:#f5f7f9;border:1px solid #e3e6ea;border-radius:6px}
@media (max-width:720px){
 body{padding:.6em .8em 1.5em}
 #history thead{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0)}
 #history,#history tbody,#history tr,#history td{display:block}
 #history tr{border:1px solid #e3e6ea;border-radius:6px;margin:0 0 .6em;padding:.4em .7em}
 #history td{display:flex;gap:.8em;border:0;padding:.1em 0;text-align:left}
 #history td::before{content:attr(data-label);flex:0 0 6.5em;color:#4a5562}
 #history td:empty{display:none}
 #history td>*{min-width:0}
 #modules td:nth-child(2),#modules td:nth-child(3),
 #modules th:nth-child(2),#modules th:nth-child(3){display:none}
}
"""


def _e(value: object) -> str:
    """Escaped for text and for quoted attributes alike."""
    return html.escape(str(value), quote=True)


def _page(title: str, body: str) -> str:
    """A whole HTML document around ``body``."""
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>{body}</body></html>"
    )


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))


def _seconds(value: float, signed: bool = False) -> str:
    """A duration in the unit that keeps it readable: µs below 1 ms, ms below 1 s."""
    sign = "+" if signed else ""
    magnitude = abs(value)
    if magnitude < 1e-3:
        return f"{value * 1e6:{sign}.1f} µs"
    if magnitude < 1.0:
        return f"{value * 1e3:{sign}.3f} ms"
    return f"{value:{sign}.3f} s"


def _time_figures(entry: Entry) -> tuple[str, str, str]:
    """Offset, RTT and stratum of the NTP report, as text; empty where the probe has none
    (nothing was sent, no reply passed the checks, or a kernel-only module)."""
    for report in entry.reports:
        if report.title != "ntp":
            continue
        data = report.to_json()
        offset, rtt, stratum = (data.get(k) for k in ("offset_seconds", "rtt_seconds", "stratum"))
        return (
            "" if offset is None else _seconds(offset, signed=True),
            "" if rtt is None else _seconds(rtt),
            "" if stratum is None else str(stratum),
        )
    return "", "", ""


_HISTORY_COLUMNS = (
    ("Time (UTC)", ""), ("Module", ""), ("Target", ""), ("Result", ""), ("Reason", ""),
    ("Duration", "num"), ("Offset", "num"), ("RTT", "num"), ("Stratum", "num"), ("Log", ""),
)


def _note_label(e: Entry) -> str:
    """What a row's note says in a word: a client that hung up (its burst may have sent
    packets), or an answer that sent none (served from the cache or a shared burst)."""
    if e.reason == "cancelled":
        return "client hung up"
    return "not sent: cached" if "cache" in e.note else "not sent: shared"


def _history_row(e: Entry) -> str:
    result = "success" if e.success else "failure"
    offset, rtt, stratum = _time_figures(e)
    cells = (
        ("time", _e(_utc(e.timestamp))),
        ("", _e(e.module)),
        ("", f"<span class='target' title='{_e(e.target)}'>{_e(e.target)}</span>"),
        ("", f"<span class='result'>{result}</span>"),
        ("reason", _e(e.reason or "")),
        ("num", f"{e.duration * 1000:.1f} ms"),
        ("num", _e(offset)),
        ("num", _e(rtt)),
        ("num", _e(stratum)),
        ("", f"<a href='logs?id={e.id}'>log</a>"
             + (f" <span class='note' title='{_e(e.note)}'>({_note_label(e)})</span>"
                if e.note else "")),
    )
    tds = "".join(
        f"<td class='{css}' data-label='{_e(label)}'>{content}</td>" if css
        else f"<td data-label='{_e(label)}'>{content}</td>"
        for (label, _), (css, content) in zip(_HISTORY_COLUMNS, cells, strict=True)
    )
    return f"<tr class='{result}'>{tds}</tr>"


# Rows the landing page shows at most: with a large --history.limit the page would take the
# event loop long enough to delay probes; the rest stay at /logs?id=N.
MAX_ROWS = 1000


def _history(history: History) -> str:
    entries, left_out = history.listed(MAX_ROWS)
    rows = "".join(_history_row(e) for e in entries)
    if not rows and history.limit == 0:
        n = history.issued_count
        return (f"<p class='hint'>{n} probe{'' if n == 1 else 's'} since the start; none is "
                "kept (--history.limit=0).</p>")
    if not rows:
        return "<p class='hint'>No probes yet: run one above, or let Prometheus scrape.</p>"
    head = "".join(f"<th class='{css}'>{_e(label)}</th>" if css else f"<th>{_e(label)}</th>"
                   for label, css in _HISTORY_COLUMNS)
    return (
        f"<table id='history'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"
        f"<p class='hint'>The last {history.limit} probes, newest first, then up to as many "
        "older failures"
        + (f"; {left_out} of them not listed here (at most {MAX_ROWS} probes and "
           f"{MAX_ROWS} older failures are), each still at logs?id=N" if left_out else "")
        + ".</p>"
    )


def _form(config: Config, default_module: str) -> str:
    chosen = default_module if default_module in config.modules else next(iter(config.modules), "")
    options = "".join(
        f"<option value='{_e(name)}'{' selected' if name == chosen else ''}"
        f" title='{_e(module.description)}'>{_e(name)}</option>"
        for name, module in config.modules.items()
    )
    return (
        "<form class='probe' action='probe' method='get'>"
        "<label class='target-field'>Target <input type='text' name='target' required "
        "placeholder='ntp.example.net or 192.0.2.1:123' autocomplete='off'></label>"
        f"<label>Module <select name='module'>{options}</select></label>"
        "<label class='check'><input type='checkbox' name='debug' value='true' checked>"
        " with the debug log</label>"
        "<button type='submit'>Probe</button></form>"
        "<p class='hint'>Prometheus scrapes "
        "<code>probe?target=HOST[:PORT]&amp;module=NAME</code>; "
        "<code>&amp;debug=true</code> adds every packet, the metrics and the module.</p>"
    )


def _modules(config: Config, reload_failure: tuple[float, str] | None) -> str:
    # Each name is also a list item, so that the names alone still read as a list (in a
    # text browser, and to the tests that parse the page).
    rows = "".join(
        f"<tr><th scope='row'><ul><li><code>{_e(name)}</code></li></ul></th>"
        f"<td>{_e(module.prober)}</td><td class='num'>{_e(format_duration(module.timeout))}</td>"
        f"<td>{_e(module.description)}</td></tr>"
        for name, module in config.modules.items()
    )
    return (
        "<table id='modules'><thead><tr><th>Module</th><th>Prober</th>"
        "<th class='num'>Timeout</th><th>Description</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>"
        f"<p class='hint'>From {_e(config.source)}; "
        "<a href='config'>the whole configuration</a>.</p>" + _stale(reload_failure)
    )


def _stale(reload_failure: tuple[float, str] | None) -> str:
    """The last reload's failure, when it failed: the file on disk is not what is served."""
    if reload_failure is None:
        return ""
    at, why = reload_failure
    when = datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (f"<p class='stale' role='alert'>The last reload, at {when}, failed: "
            f"{_e(next(iter(why.splitlines()), ''))}. The modules above are those loaded "
            "before it.</p>")


def landing(config: Config, history: History, default_module: str,
            reload_failure: tuple[float, str] | None = None) -> str:
    """GET /: run a probe, the recent probes with their time figures, the modules (and
    the last reload's failure, ``(unix time, why)``, when it failed)."""
    return _page("ntp_probe", (
        f"<h1>ntp_probe <small>{_e(__version__)}</small></h1>"
        "<nav><a href='metrics'>Metrics</a><a href='config'>Configuration</a></nav>"
        f"<h2>Run a probe</h2>{_form(config, default_module)}"
        f"<h2>Recent probes</h2>{_history(history)}"
        f"<h2>Modules</h2>{_modules(config, reload_failure)}"
    ))


def _module_yaml(entry: Entry, module: dict[str, object]) -> str:
    return dump_yaml({entry.module: module})


def _shown(metrics: str) -> str:
    """The exposition for people to read: label values quote servers (a daemon's version
    string), so characters that are not printable are escaped, line by line."""
    return "".join(visible(line) + "\n" for line in metrics.splitlines())


def debug_text(entry: Entry, module: dict[str, object], metrics: str | None = None) -> str:
    """The debug=true answer (with the whole exposition as ``metrics``: the history keeps
    a bounded copy), and /logs for clients that do not ask for HTML."""
    return (
        (f"{entry.note}\n\n" if entry.note else "")
        + "Logs for the probe:\n" + entry.log.text()
        + "\n\nMetrics that would have been returned:\n"
        + _shown(entry.metrics if metrics is None else metrics)
        + "\n\nModule configuration:\n" + _module_yaml(entry, module)
    )


_BACK = "<p><a href='./'>&larr; Recent probes</a></p>"


def log_page(entry: Entry, module: dict[str, object]) -> str:
    """GET /logs?id=N in a browser: what was probed and how it went, then the log, the
    metrics and the module's configuration."""
    result = "success" if entry.success else f"failure: {entry.reason}"
    offset, rtt, stratum = _time_figures(entry)
    facts = [("Time (UTC)", _utc(entry.timestamp)), ("Target", entry.target),
             ("Module", entry.module), ("Result", result),
             ("Duration", f"{entry.duration * 1000:.1f} ms"),
             ("Offset", offset), ("RTT", rtt), ("Stratum", stratum)]
    summary = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts if v)
    state = "success" if entry.success else "failure"
    return _page(f"ntp_probe: probe {entry.id} of {entry.target}", (
        f"{_BACK}<h1>Probe {entry.id} <small class='{state}'>"
        f"<span class='result'>{_e(state)}</span></small></h1>"
        f"<dl class='summary'>{summary}</dl>"
        + (f"<p class='hint' id='note'>{_e(entry.note)}</p>" if entry.note else "")
        + f"<h2>Log</h2><pre id='log'>{_e(entry.log.text())}</pre>"
        f"<h2>Metrics</h2><pre id='metrics'>{_e(_shown(entry.metrics))}</pre>"
        f"<h2>Module configuration</h2><pre id='module'>{_e(_module_yaml(entry, module))}</pre>"
        f"{_BACK}"
    ))


def message_page(title: str, message: str) -> str:
    """A short page for an error answered to a browser, with the way back."""
    return _page(f"ntp_probe: {title}", f"<h1>{_e(title)}</h1><p>{_e(message)}</p>{_BACK}")
