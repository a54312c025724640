"""Text from servers and clients is shown escaped: in log lines (logfmt and JSON), probe logs
and the CLI's report."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from ntp_probe.cli.logs import JSONFormatter, LogfmtFormatter
from ntp_probe.engine.context import ProbeLog
from ntp_probe.engine.result import Measurement
from ntp_probe.engine.text import visible
from ntp_probe.web import pages
from ntp_probe.web.history import History

HOSTILE = "v\x1b[2J\x1b]0;title\x07\r\t\u202e\x85end"


def test_printable_text_is_unchanged() -> None:
    for text in ("", "ntpd ntpsec-1.2.2 2023-01-01", "refid GPS", "café ünïcode 時刻"):
        assert visible(text) == text


def test_every_character_that_is_not_printable_is_escaped() -> None:
    shown = visible(HOSTILE)
    assert shown == "v\\x1b[2J\\x1b]0;title\\x07\\x0d\\x09\\u202e\\x85end"
    assert shown.isprintable()


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("ntp_probe.probe", logging.DEBUG, __file__, 1, "%s", (message,),
                             None)


@pytest.mark.parametrize("formatter", [LogfmtFormatter(), JSONFormatter()])
def test_a_log_line_carries_no_control_character(formatter: logging.Formatter) -> None:
    line = formatter.format(record(f"<- READVAR: version={HOSTILE}\nforged=1"))
    assert line.isprintable(), line  # no escape code, no carriage return, one line
    if isinstance(formatter, JSONFormatter):
        assert json.loads(line)["msg"] == f"<- READVAR: version={HOSTILE}\nforged=1"
    else:
        assert 'msg="<- READVAR: version=v\\u001b[2J' in line and "\\nforged=1" in line


@pytest.mark.parametrize("text", [HOSTILE, "tab\there", "a\tb\u202e key",
                                  "emoji \U0001f600 \U000e0001", 'quote " and \\ backslash',
                                  "plain"])
def test_a_logfmt_value_reads_back_with_go_logfmts_escapes(text: str) -> None:
    # go-logfmt (Loki, the Go exporters' tools) reads a quoted value's escapes as JSON
    # does, and drops the whole line on any other (\xNN, \UXXXXXXXX).
    line = LogfmtFormatter().format(record(text))
    quoted = line[line.index(" msg=") + 5:]
    assert line.isprintable(), line
    if quoted.startswith('"'):
        assert json.loads(quoted) == text, quoted
    else:
        assert quoted == text


def test_a_probe_log_shows_server_text_escaped() -> None:
    log = ProbeLog("t", "m")
    log(f"version {HOSTILE}")
    log(lambda: f"refid {HOSTILE}")
    assert all(line.isprintable() for line in log.lines), log.lines
    assert "\x1b" not in log.text()


def test_debug_and_log_pages_show_the_metrics_escaped() -> None:
    # Label values quote servers: fine for Prometheus, but debug=true and /logs are read
    # by people, on terminals and in browsers.
    entry = History().add("ntpd", "t", Measurement(), ProbeLog(),
                          f'probe_ntpd_info{{version="{HOSTILE}"}} 1\n')
    for page in (pages.debug_text(entry, {}), pages.log_page(entry, {})):
        assert "\x1b" not in page and "\x07" not in page
        assert "v\\x1b[2J" in page


@pytest.mark.parametrize("fmt", ["logfmt", "json"])
def test_a_librarys_warning_is_a_log_line_in_the_chosen_format(fmt: str) -> None:
    # cryptography warns about a certificate's odd name: raw text on stderr would be the
    # one line a log pipeline cannot parse.
    code = (f"from ntp_probe.cli import logs; logs.setup('info', {fmt!r}); "
            "import warnings; warnings.warn('odd name')")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stderr
    lines = err.splitlines()
    assert len(lines) == 1, err
    if fmt == "json":
        assert json.loads(lines[0])["msg"].startswith("UserWarning: odd name (")
    else:
        assert lines[0].startswith("ts=") and "level=warn" in lines[0]
        assert 'msg="UserWarning: odd name (' in lines[0], lines[0]
