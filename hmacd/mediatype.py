"""
Content-Type values: exactly one media type, or a refusal.

Browsers read a Content-Type such as C{image/png, text/html} as its last type, so a header
that is a list, or anything else that is not one media type, would let an upload choose a
type other than the one our inline rule judged.  Every type that is stored or served goes
through L{parse_media_type} first; the inline rule looks at the parsed type alone.

The grammar is RFC 9110 8.3.1, ASCII only::

    media-type = type "/" subtype parameters
    parameters = *( OWS ";" OWS [ parameter ] )
    parameter  = token "=" ( token / quoted-string )

The normal form lowercases the type, the subtype and the parameter names (they are
case-insensitive), keeps parameter values as sent (some are case-sensitive), drops empty
parameters and separates the rest with C{"; "}: C{Text/Plain;Charset=UTF-8} becomes
C{text/plain; charset=UTF-8}.
"""

from __future__ import annotations

import functools
import mimetypes
import re

__all__ = [
    "OCTET_STREAM",
    "BadMediaType",
    "essence",
    "guess_type",
    "is_inline_type",
    "parse_media_type",
]

OCTET_STREAM = "application/octet-stream"

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
# A quoted-string of printable ASCII; no obs-text: what we store goes back out as a header.
_QUOTED = r'"(?:[\t !#-\[\]-~]|\\[\t -~])*"'
_PARAMETER = re.compile(rf"({_TOKEN})=({_TOKEN}|{_QUOTED})")
_MEDIA_TYPE = re.compile(
    rf"({_TOKEN})/({_TOKEN})((?:[ \t]*;[ \t]*(?:{_TOKEN}=(?:{_TOKEN}|{_QUOTED}))?)*)"
)
_SEPARATOR = re.compile(r"[ \t]*;[ \t]*")


class BadMediaType(ValueError):
    """Not exactly one media type: a list, a bare word, a stray character."""


# Every GET of a file parses its stored type again, and a server sees few distinct types:
# remembered, the answer is a dict look-up.  A refusal raises each time (not cached).
@functools.lru_cache(maxsize=512)
def parse_media_type(value: str) -> str:
    """
    The normal form of the one media type C{value} is (surrounding spaces and tabs allowed).

    @raise BadMediaType: C{value} is anything else.
    """
    match = _MEDIA_TYPE.fullmatch(value.strip(" \t"))
    if match is None:
        raise BadMediaType("not exactly one media type")
    kind, subtype, rest = match.groups()
    parts = [f"{kind.lower()}/{subtype.lower()}"]
    # The whole value matched, so every non-empty piece between separators is one
    # parameter: a quoted value cannot hold a ";" that matters here, because the pieces are
    # found with the parameter pattern itself, left to right.
    position = 0
    while position < len(rest):
        separator = _SEPARATOR.match(rest, position)
        if separator is None:  # pragma: no cover - the full match rules this out
            raise BadMediaType("not exactly one media type")
        position = separator.end()
        parameter = _PARAMETER.match(rest, position)
        if parameter is not None:
            name, parameterValue = parameter.groups()
            parts.append(f"{name.lower()}={parameterValue}")
            position = parameter.end()
    return "; ".join(parts)


def essence(value: str) -> str:
    """C{type/subtype} of a type L{parse_media_type} returned."""
    return value.split(";", 1)[0]


# Built-in table only: the same answer on every machine, whatever
# /etc/mime.types says.
_TYPES = mimetypes.MimeTypes()


def guess_type(name: str) -> str:
    """The content type for a file name, by its extension."""
    guessed, _ = _TYPES.guess_type(name, strict=False)
    return guessed or OCTET_STREAM


def is_inline_type(content_type: str) -> bool:
    """
    Whether a browser may show this type inline.

    XEP-0363 deployments show pictures, video, audio and plain text in the
    page; everything else is served as an attachment so that an uploaded
    HTML or PDF file never runs in the server's origin.  Judged on the parsed
    type alone: a value that is not exactly one media type (a list such as
    C{image/png, text/html}, whose last type a browser would use) is never
    inline.
    """
    try:
        main = essence(parse_media_type(content_type))
    except BadMediaType:
        return False
    return main == "text/plain" or main.split("/", 1)[0] in ("image", "video", "audio")
