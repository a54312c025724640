"""web.connections: how malformed requests are logged."""

from __future__ import annotations

import logging
import sys
import zlib

import pytest
from aiohttp.http_exceptions import BadHttpMessage, ContentEncodingError, InvalidURLError
from aiohttp.web_protocol import RequestPayloadError

from ntp_probe.web.connections import BadRequestFilter


def record_of(exc: Exception) -> logging.LogRecord:
    """aiohttp's log record for ``exc``."""
    try:
        raise exc
    except Exception:
        return logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1,
                                 "Error handling request", None, sys.exc_info())


def filtered(exc: Exception) -> logging.LogRecord:
    """aiohttp's log record for ``exc``, as BadRequestFilter leaves it (at debug level)."""
    record = record_of(exc)
    server_log = logging.getLogger("aiohttp.server")
    level = server_log.level
    server_log.setLevel(logging.DEBUG)
    try:
        assert BadRequestFilter().filter(record)
    finally:
        server_log.setLevel(level)
    return record


def test_a_malformed_request_is_not_logged_above_debug() -> None:
    # As Go's server (blackbox) logs none: a scanner must not fill the log.
    server_log = logging.getLogger("aiohttp.server")
    level = server_log.level
    server_log.setLevel(logging.INFO)
    try:
        assert not BadRequestFilter().filter(record_of(BadHttpMessage("Bad status line")))
        assert BadRequestFilter().filter(record_of(RuntimeError("a bug: logged")))
    finally:
        server_log.setLevel(level)


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
    assert record.levelno == logging.DEBUG and record.exc_info is None
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


def wrapped(cause: Exception) -> Exception:
    """``cause`` as aiohttp raises it from a body read after the answer."""
    try:
        raise cause
    except Exception as exc:
        try:
            raise RequestPayloadError(str(exc)) from exc
        except RequestPayloadError as outer:
            return outer


@pytest.mark.parametrize("exc", [
    # curl -H 'Content-Encoding: gzip' --data-binary 'not gzip' (the C parser).
    RequestPayloadError("400, message:\n  Can not decode content-encoding: gzip"),
    # A trailer the pure-Python parser refuses, quoting it plainly, in its wrapper.
    wrapped(BadHttpMessage("Invalid HTTP header: b'Authorization: Basic YWxpY2U6czNj\x01'")),
])
def test_a_body_that_fails_after_the_answer_is_one_line_without_its_bytes(
        exc: Exception) -> None:
    record = filtered(exc)
    text = record.getMessage()
    assert record.levelno == logging.DEBUG and record.exc_info is None, text
    assert text.startswith("bad HTTP request answered 400: ") and "\n" not in text
    assert "YWxpY2U6czNj" not in text, text


def test_an_undecodable_body_names_its_error_by_kind() -> None:
    try:
        zlib.decompress(b"not gzip at all")
    except zlib.error as z:
        try:
            raise ContentEncodingError("Can not decode content-encoding: gzip") from z
        except ContentEncodingError as exc:
            record = filtered(wrapped(exc))
    assert record.getMessage() == "bad HTTP request answered 400: ContentEncodingError"
