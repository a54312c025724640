"""Text that came from the network, made safe to show on a terminal or in a log line."""

from __future__ import annotations


def _escape(char: str) -> str:
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else (
        f"\\U{code:08x}")


def visible(text: str) -> str:
    """``text`` with every character that is not printable (control characters, line and
    direction marks, newline and tab included) written as a ``\\xNN`` escape: a daemon's
    version string or a server's refid must not clear a terminal or split a log line.
    Printable text, nearly all of it, comes back as it is."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)
