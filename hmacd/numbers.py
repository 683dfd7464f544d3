"""
The one reader of decimal numbers that clients and operators send.

Every number hmacfs takes from outside (Content-Length, X-Upload-Length,
Content-Range, Range, the sizes and durations of the config, the size in a
slot request) goes through L{parse_decimal}, so that all of them agree on
what a number is: ASCII digits only (C{str.isdigit} and C{int} also take
U+0661 ARABIC-INDIC DIGIT ONE and friends, which no client means as a
length), no sign, no spaces, no underscores, and a bounded number of digits
(C{int} raises past C{sys.get_int_max_str_digits()}, 4,300, and a length of
thousands of digits is an attack, not a file).
"""

from __future__ import annotations

import re

__all__ = ["MAX_DIGITS", "NotADecimal", "parse_decimal"]

# 20 digits hold 2**64 - 1, the largest value clients send (as a Range's last byte,
# meaning "to the end"), and more than any file size or offset the kernel represents.
# Anything longer is refused rather than read.
MAX_DIGITS = 20

_DIGITS = re.compile(r"[0-9]+")
_DIGITS_BYTES = re.compile(rb"[0-9]+")


class NotADecimal(ValueError):
    """The text is not 1*DIGIT of at most the allowed length; C{str()} says which."""


def parse_decimal(text: str | bytes, max_digits: int = MAX_DIGITS) -> int:
    """
    The value of C{text}, which must be 1 to C{max_digits} ASCII digits and nothing else.

    Leading zeros are allowed (HTTP's C{1*DIGIT} allows them) and count as digits.
    The caller strips surrounding whitespace where its grammar permits any.

    @raise NotADecimal: anything else, including C{""}, C{"+1"}, C{" 1"}, C{"1_000"}
        and non-ASCII digits.
    """
    pattern = _DIGITS_BYTES if isinstance(text, bytes) else _DIGITS
    if pattern.fullmatch(text) is None:  # type: ignore[arg-type]
        raise NotADecimal("not a decimal number")
    if len(text) > max_digits:
        raise NotADecimal(f"more than {max_digits} digits")
    return int(text)
