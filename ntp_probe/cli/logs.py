"""Process logging in logfmt or JSON, like the Prometheus exporters' --log.format."""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from typing import TextIO

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
          "error": logging.ERROR}


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + (
        f".{int(record.msecs):03d}Z"
    )


def _level(record: logging.LogRecord) -> str:
    # Prometheus exporters write "warn", which is also what --log.level takes.
    return "warn" if record.levelno == logging.WARNING else record.levelname.lower()


# What go-logfmt's decoder (Loki, the Go exporters' tools) reads inside quotes, as JSON:
# these escapes, and \uXXXX (a surrogate pair past the BMP) for any other character
# that is not printable (a server's text, a client's): one record stays one clean line.
_LOGFMT_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _logfmt_char(c: str) -> str:
    escape = _LOGFMT_ESCAPES.get(c)
    if escape is not None:
        return escape
    if c.isprintable():
        return c
    code = ord(c)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def _logfmt_value(value: str) -> str:
    # Quoted when needed (a space, a quote, '=', a backslash, anything not printable).
    if value and value.isprintable() and not any(c in value for c in ' "=\\'):
        return value
    return '"' + "".join(_logfmt_char(c) for c in value) + '"'


# Fields a record may carry besides its message (ProbeLog's target and module): the
# record's attribute -> the field's name in the output.
FIELDS = {"probe_target": "target", "probe_module": "module"}


def _fields(record: logging.LogRecord) -> dict[str, str]:
    return {name: str(v) for attr, name in FIELDS.items() if (v := getattr(record, attr, None))}


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=info logger=... msg="..."``."""

    def format(self, record: logging.LogRecord) -> str:
        """Format one record as a logfmt line."""
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        extra = "".join(f" {k}={_logfmt_value(v)}" for k, v in _fields(record).items())
        return (
            f"ts={_timestamp(record)} level={_level(record)} "
            f"logger={record.name}{extra} msg={_logfmt_value(msg)}"
        )


class JSONFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        """Format one record as a JSON line."""
        data = {"ts": _timestamp(record), "level": _level(record),
                "logger": record.name, **_fields(record), "msg": record.getMessage()}
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data)


def _log_warning(message: Warning | str, category: type[Warning], filename: str,
                 lineno: int, file: TextIO | None = None, line: str | None = None) -> None:
    logging.getLogger("py.warnings").warning("%s: %s (%s:%d)", category.__name__, message,
                                             filename, lineno)


def setup(level: str, fmt: str) -> None:
    """Configure the root logger to write to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(LEVELS[level])
    # A library's warnings (cryptography's about a certificate's odd name) are log lines
    # in the chosen format too, not raw text on stderr that a log parser chokes on.
    warnings.showwarning = _log_warning
    # aiohttp's access log would log every scrape at INFO.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
