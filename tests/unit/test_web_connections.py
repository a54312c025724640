"""web.connections: how malformed requests are logged."""

from __future__ import annotations

import logging
import sys

import pytest
from aiohttp.http_exceptions import BadHttpMessage, InvalidURLError

from ntp_probe.web.connections import BadRequestFilter


def filtered(exc: Exception) -> logging.LogRecord:
    """aiohttp's log record for ``exc``, as BadRequestFilter leaves it."""
    try:
        raise exc
    except Exception:
        record = logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1,
                                   "Error handling request", None, sys.exc_info())
    assert BadRequestFilter().filter(record)
    return record


@pytest.mark.parametrize("message", [
    # As aiohttp words them: the reason, then the request's bytes quoted.
    "Expected CRLF after version: b'GET / HTTP/1.1\\nAuthorization: Basic YWxpY2U6czNj\\n'",
    "Invalid header value char:\n\n  b'Authorization: Basic YWxpY2U6czNj\\x01'\n       ^",
    "Invalid header value char: b' Basic YWxpY2U6czNj' ^",  # a folded header: no name
    "Got more than 8190 bytes when reading: bytearray(b'Basic YWxpY2U6czNjBBBB')",
    "Bad status line: b'Cookie: a=\"q\"; sid=YWxpY2U6czNj\\x01'",
])
def test_a_malformed_request_is_logged_in_one_line_without_its_bytes(message: str) -> None:
    record = filtered(BadHttpMessage(message))
    text = record.getMessage()
    assert record.levelno == logging.INFO and record.exc_info is None
    assert text.startswith("bad HTTP request answered 400: ") and "\n" not in text
    assert "YWxpY2U6czNj" not in text, text
    assert len(text) > len("bad HTTP request answered 400: ") + 5  # the reason stays


def test_an_invalid_url_is_not_logged() -> None:
    # aiohttp's InvalidURLError carries the URL, credentials included.
    record = filtered(InvalidURLError("https://admin:YWxpY2U6czNj@host:99999/probe?password=x"))
    text = record.getMessage()
    assert "YWxpY2U6czNj" not in text and "password" not in text, text
    assert text == "bad HTTP request answered 400: InvalidURLError"


@pytest.mark.parametrize("message", [
    "Bad status line 'GET /probe?password=YWxpY2U6czNj HTTP/1.1 extra'",  # pure-Python parser
    "YWxpY2U6czNj",  # a chunk size line, as the pure-Python parser reports it
])
def test_a_message_in_another_shape_is_logged_by_its_kind_only(message: str) -> None:
    record = filtered(BadHttpMessage(message))
    assert record.getMessage() == "bad HTTP request answered 400: BadHttpMessage"
