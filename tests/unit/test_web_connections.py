"""web.connections: how malformed requests are logged."""

from __future__ import annotations

import logging
import sys

from aiohttp.http_exceptions import BadHttpMessage

from ntp_probe.web.connections import BadRequestFilter


def test_a_malformed_request_is_logged_in_one_line_without_credentials() -> None:
    raw = ("b'GET / HTTP/1.1\\nHost: x\\nAuthorization: Basic YWxpY2U6czNjcmV0cHc=\\n"
           "Cookie: session=abc\\n\\n'")
    try:
        raise BadHttpMessage(f"Expected CRLF after version: {raw}")
    except BadHttpMessage:
        record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1,
                                   "Error handling request", None, sys.exc_info())
    assert BadRequestFilter().filter(record)
    text = record.getMessage()
    assert record.levelno == logging.INFO and record.exc_info is None
    assert "Authorization: <redacted>" in text and "Cookie: <redacted>" in text
    assert "YWxpY2U6" not in text and "session=abc" not in text
