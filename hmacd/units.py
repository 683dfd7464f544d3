"""
Config values as operators write them: sizes (``"10MB"``, ``"1.5GB"``) and durations
(``"7d"``, ``"1h30m"``), and how a value is shown back to them in an error.

Binary multiples and the Go HMAC File Server's duration units; ASCII digits only, through
L{hmacd.numbers}.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Mapping
from fractions import Fraction

from hmacd.numbers import MAX_DIGITS, NotADecimal, parse_decimal

# ---------------------------------------------------------------------------------------------
# Sizes

_BINARY_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1024,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1024**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1024**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1024**4,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"([0-9]+)(?:\.([0-9]+))?[ \t]*([A-Za-z]*)")
# TOML integers are arbitrary-precision to tomllib; one of more digits than hmacd.numbers
# reads anywhere else is a typo, not a size or a duration.
TOO_LARGE = 10**MAX_DIGITS


def _bounded(value: int, what: str) -> int:
    if value < 0:
        raise ValueError(f"{what} cannot be negative, got {value}")
    if value >= TOO_LARGE:
        raise ValueError(f"{what} must have at most {MAX_DIGITS} digits")
    return value


def parse_size(value: int | str) -> int:
    """A byte count from an int or a string like ``"10MB"``, ``"1.5GB"``, ``"2TiB"``.

    Every multiple is binary (KB = KiB = 1024) because that is what the Go HMAC File Server
    means by them, and the seed config's 10737418240 is its "10GB".  A fraction needs a unit
    and is rounded down to whole bytes.  ``bool`` is refused although it is an ``int``:
    ``UploadMaxSize = true`` is a mistake, not one byte.
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        # ValueError, not TypeError: callers catch one exception for any bad user value.
        raise ValueError(f'a size must be an integer or a string like "10MB", got {value!r}')
    if isinstance(value, int):
        return _bounded(value, "a size")
    # Only spaces and tabs around it: str.strip() would also take Unicode spaces.
    match = _SIZE_RE.fullmatch(value.strip(" \t"))
    unit = match.group(3).lower() if match else None
    if match is None or unit not in _BINARY_UNITS:
        raise ValueError(
            f"not a size: {value!r} (use bytes, or a number with K, KB, KiB, M, MB, MiB, G, GB,"
            " GiB, T, TB or TiB)"
        )
    whole, fraction = match.group(1), match.group(2)
    if fraction is not None and _BINARY_UNITS[unit] == 1:
        raise ValueError(f'not a size: {value!r} (a fraction of a byte needs a unit, e.g. "1.5GB")')
    try:
        number = Fraction(parse_decimal(whole))
        if fraction is not None:
            number += Fraction(parse_decimal(fraction), 10 ** len(fraction))
    except NotADecimal as e:
        raise ValueError(f"not a size: {value!r} ({e})") from None
    return int(number * _BINARY_UNITS[unit])


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
# ASCII letters spelt out: with re.IGNORECASE, "s" also matches U+017F LATIN SMALL LETTER
# LONG S, which lower() keeps as it is.
_DURATION_PART = r"([0-9]+)[ \t]*([smhdwySMHDWY])"
_DURATION_RE = re.compile(_DURATION_PART)
_DURATION_WHOLE = re.compile(rf"(?:{_DURATION_PART}[ \t]*)+")


def parse_duration(value: int | str) -> int:
    """Seconds from an int or a string like ``"7d"``, ``"12h"``, ``"1h30m"``, ``"1y"``.

    The units are those of the Go HMAC File Server's FileTTL: s, m, h, d, w and y (365 days).
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f'a duration must be seconds or a string like "7d", got {value!r}')
    if isinstance(value, int):
        return _bounded(value, "a duration")
    text = value.strip(" \t")
    try:
        if _DURATION_WHOLE.fullmatch(text) is None:
            return parse_decimal(text)
        total = sum(
            parse_decimal(n) * _DURATION_UNITS[u.lower()] for n, u in _DURATION_RE.findall(text)
        )
    except NotADecimal:
        raise ValueError(
            f"not a duration: {value!r} (use seconds of at most {MAX_DIGITS} digits, or e.g."
            ' "30m", "12h", "7d", "1y")'
        ) from None
    return total


# How a value is shown back in an error: as TOML would spell it.


def toml_type(value: object) -> str:
    """The TOML name of a parsed value's type: the user wrote TOML, not Python."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, Mapping):
        return "table"
    if isinstance(value, datetime.datetime):
        return "datetime"
    if isinstance(value, datetime.date):
        return "date"
    if isinstance(value, datetime.time):
        return "time"
    return type(value).__name__


def show(value: object) -> str:
    """A value as TOML would spell it, on one short line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        if len(value) > 80:
            return json.dumps(value[:77], ensure_ascii=False)[:-1] + '..."'
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    return toml_type(value)


def show_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key, ensure_ascii=False)
