"""Host names in the form that goes on the wire and into certificate matching."""

from __future__ import annotations

import idna


def a_label(name: str) -> str:
    """``name`` in its ASCII (A-label) form, by IDNA 2008 with UTS 46 mapping, as
    service_identity matches it against certificates: SNI must ask for the same name
    (Python's "idna" codec is IDNA 2003, which makes faß.test fass.test). Raises
    UnicodeError for a name IDNA refuses."""
    if name.isascii():
        return name.lower()
    return str(idna.encode(name, uts46=True).decode("ascii"))
