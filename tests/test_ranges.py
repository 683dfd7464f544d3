"""
Tests for the pure HTTP helpers of downloads and the log: Range (RFC 9110 14.1.2), If-None-Match
(weak comparison, 13.1.2), HTTP dates (5.6.7), and the censoring of MACs in logged URIs.
"""

from __future__ import annotations

import os
import time
from urllib.parse import parse_qs

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from hmacd.auth import PROTOCOLS, pick_protocol
from hmacd.download import Unsatisfiable, _etagMatches, _httpDate, parse_range
from hmacd.logs import censor

# A range the server must answer with 416.
UNSATISFIABLE = Unsatisfiable

# (Range header, file size, (first, last) | None to send the whole file | UNSATISFIABLE)
RANGES: list[tuple[str, int, tuple[int, int] | type[Unsatisfiable] | None]] = [
    ("bytes=0-4", 10, (0, 4)),
    ("bytes=0-0", 10, (0, 0)),
    ("bytes=0-9", 10, (0, 9)),
    ("bytes=9-9", 10, (9, 9)),
    ("bytes=5-", 10, (5, 9)),
    ("bytes=0-", 10, (0, 9)),
    ("bytes=9-", 10, (9, 9)),
    ("bytes=-3", 10, (7, 9)),
    ("bytes=-1", 10, (9, 9)),
    ("bytes=-10", 10, (0, 9)),
    ("bytes=-100", 10, (0, 9)),
    ("bytes=3-100", 10, (3, 9)),
    ("bytes=0-18446744073709551615", 10, (0, 9)),
    ("bytes=-18446744073709551615", 10, (0, 9)),
    ("bytes=00-04", 10, (0, 4)),
    ("bytes=0-0", 1, (0, 0)),
    ("bytes=-1", 1, (0, 0)),
    # Tolerated: whitespace around the parts, any case of the unit.
    ("bytes= 0-4", 10, (0, 4)),
    ("bytes=0 - 4", 10, (0, 4)),
    ("bytes=\t5-", 10, (5, 9)),
    (" bytes =0-4 ", 10, (0, 4)),
    ("Bytes=0-1", 10, (0, 1)),
    ("BYTES=-2", 10, (8, 9)),
    # Well-formed but naming no byte of the file.
    ("bytes=10-", 10, UNSATISFIABLE),
    ("bytes=10-20", 10, UNSATISFIABLE),
    ("bytes=100-", 10, UNSATISFIABLE),
    ("bytes=-0", 10, UNSATISFIABLE),
    ("bytes=-00", 10, UNSATISFIABLE),
    ("bytes=1-", 1, UNSATISFIABLE),
    # An empty file has no byte to send, whatever the range.
    ("bytes=0-", 0, UNSATISFIABLE),
    ("bytes=0-0", 0, UNSATISFIABLE),
    ("bytes=0-4", 0, UNSATISFIABLE),
    ("bytes=5-", 0, UNSATISFIABLE),
    ("bytes=-1", 0, UNSATISFIABLE),
    ("bytes=-0", 0, UNSATISFIABLE),
    # Ignored, so the whole file goes out with 200: several ranges (allowed by 14.2), invalid
    # ranges (last < first), other units, and anything that is not the grammar.
    ("bytes=0-1,3-4", 10, None),
    ("bytes=0-1, 3-4", 10, None),
    ("bytes=0-1,", 10, None),
    ("bytes=0-1,0-1", 10, None),
    ("bytes=5-2", 10, None),
    ("bytes=5-2", 0, None),
    ("items=0-1", 10, None),
    ("none", 10, None),
    ("bytes=a-b", 10, None),
    ("bytes=0-b", 10, None),
    ("bytes=a-", 10, None),
    ("bytes=", 10, None),
    ("bytes=-", 10, None),
    ("bytes", 10, None),
    ("bytes 0-1", 10, None),
    ("bytes=0", 10, None),
    ("bytes=1-2-3", 10, None),
    ("bytes=+1-2", 10, None),
    ("bytes=-+1", 10, None),
    ("bytes=--1", 10, None),
    ("bytes=1.5-2", 10, None),
    ("bytes=0x1-2", 10, None),
    ("bytes=1_0-", 100, None),
    ("", 10, None),
    ("=0-1", 10, None),
    # Not ASCII digits: superscripts (str.isdigit() says yes, int() says no; the header is read
    # as latin-1, so "\xb2" is one byte on the wire), and Arabic-Indic digits (int() reads them).
    ("bytes=\u00b2-", 10, None),
    ("bytes=0-\u00b9", 10, None),
    ("bytes=-\u00b3", 10, None),
    ("bytes=\u0661-\u0663", 10, None),
    # More digits than int() will convert: a server may ignore any Range (14.2).
    ("bytes=0-" + "9" * 5000, 10, None),
    ("bytes=-" + "9" * 5000, 10, None),
    ("bytes=" + "0" * 5000 + "1-", 10, None),
]

ETAG = b'"0123456789abcdef0123456789abcdef"'

# (If-None-Match, our ETag, whether it matches)
ETAG_MATCHES: list[tuple[str, bytes, bool]] = [
    ('"abc"', b'"abc"', True),
    ('W/"abc"', b'"abc"', True),
    ('"abc"', b'W/"abc"', True),
    ('W/"abc"', b'W/"abc"', True),
    ("*", b'"abc"', True),
    (" * ", b'"abc"', True),
    ('"x", "abc"', b'"abc"', True),
    ('"x","abc"', b'"abc"', True),
    ('"abc", "x"', b'"abc"', True),
    ('"x", W/"abc"', b'"abc"', True),
    (' "abc" ', b'"abc"', True),
    ('"0123456789abcdef0123456789abcdef"', ETAG, True),
    ('W/"a-1"', b'W/"a-1"', True),
    ('"abd"', b'"abc"', False),
    ('"ABC"', b'"abc"', False),
    ('"x", "y"', b'"abc"', False),
    ("abc", b'"abc"', False),
    ('"abc', b'"abc"', False),
    ("", b'"abc"', False),
    ('W/"x"', b'"abc"', False),
    ('"*"', b'"abc"', False),
]

# 1994-11-06T08:49:37Z, the RFC's example, in the three formats a recipient must accept.
EXAMPLE_TIME = 784111777.0
HTTP_DATES: list[tuple[str, float | None]] = [
    ("Sun, 06 Nov 1994 08:49:37 GMT", EXAMPLE_TIME),
    ("Sunday, 06-Nov-94 08:49:37 GMT", EXAMPLE_TIME),
    ("Sun Nov  6 08:49:37 1994", EXAMPLE_TIME),
    ("Sun, 06 Nov 1994 09:49:37 +0100", EXAMPLE_TIME),
    ("Sun, 06 Nov 1994 08:49:37 -0000", EXAMPLE_TIME),
    ("", None),
    ("garbage", None),
    ("Sun, 06 Nov 1994", None),
    ("Sun, 99 Nov 1994 08:49:37 GMT", None),
    ("Sun, 06 Nov 1994 25:49:37 GMT", None),
    ('"0123456789abcdef"', None),
]

# (logged URI, as it must appear in the log)
CENSORED: list[tuple[bytes, str]] = [
    (b"/upload/a?v=abc", "/upload/a?v=<redacted>"),
    (b"/upload/a?x=1&v2=abc&y=2", "/upload/a?x=1&v2=<redacted>&y=2"),
    (b"/upload/a?token=abc#frag", "/upload/a?token=<redacted>#frag"),
    (b"?x=1&v2=abc&y=2", "?x=1&v2=<redacted>&y=2"),
    (b"?token=abc#frag", "?token=<redacted>#frag"),
    (b"/upload/a?V=abc", "/upload/a?V=<redacted>"),
    (b"/upload/a?V2=abc", "/upload/a?V2=<redacted>"),
    (b"/upload/a?Token=abc", "/upload/a?Token=<redacted>"),
    (b"/upload/a?v=1&v2=2&token=3", "/upload/a?v=<redacted>&v2=<redacted>&token=<redacted>"),
    (b"/upload/a?v=", "/upload/a?v=<redacted>"),
    (b"/upload/a?x=1;v=abc", "/upload/a?x=1;v=<redacted>"),
    (b"https://xmpp.example/upload/a?v=abc", "https://xmpp.example/upload/a?v=<redacted>"),
    # A name that parse_qs decodes to v, v2 or token is a MAC the server reads: censor it too.
    (b"/upload/a?%76=abc", "/upload/a?%76=<redacted>"),
    (b"/upload/a?v%32=abc", "/upload/a?v%32=<redacted>"),
    (b"/upload/a?%74%6F%6b%65%6e=abc", "/upload/a?%74%6F%6b%65%6e=<redacted>"),
    # parse_qs reads past a "#" in the request target; so does the censor.
    (b"/upload/a?x=1#&v=abc", "/upload/a?x=1#&v=<redacted>"),
    # Other params, and values that merely look like ours, are left alone.
    (b"/upload/a?vv=1&xv=2&v2x=3&tokens=4&v3=5", "/upload/a?vv=1&xv=2&v2x=3&tokens=4&v3=5"),
    (b"/upload/a?x=v=1", "/upload/a?x=v=1"),
    (b"/upload/a?x=token", "/upload/a?x=token"),
    (b"/upload/a?v", "/upload/a?v"),
    # The path is never touched, even where it looks like a query (mod_http_file_share sends
    # "&" and "=" raw in file names).
    (b"/upload/a.txt", "/upload/a.txt"),
    (b"/upload/v=1/a.txt", "/upload/v=1/a.txt"),
    (b"/upload/x/a&v=b.txt", "/upload/x/a&v=b.txt"),
    (b"/upload/x/a;token=b.txt?v=abc", "/upload/x/a;token=b.txt?v=<redacted>"),
    (b"/upload/x/a+b=c&d%25e.bin", "/upload/x/a+b=c&d%25e.bin"),
]


# Text for a range position: things that look like a number to someone (ASCII digits, and the
# superscripts and other digits that str.isdigit() or int() also take), or anything at all.
positions = st.one_of(
    st.text(st.sampled_from("0123456789\u00b2\u00b3\u00b9\u0661\uff11 "), max_size=6),
    st.text(st.characters(max_codepoint=0xFF), max_size=8),
    st.text(max_size=8),
)


def parse(header: str, size: int) -> tuple[int, int] | type[Unsatisfiable] | None:
    """parse_range's answer, with a 416 as the UNSATISFIABLE marker."""
    try:
        return parse_range(header, size)
    except Unsatisfiable:
        return UNSATISFIABLE


def range_header(first: int | None, last: int | None) -> str:
    """A single byte-range header; None leaves that position out."""
    return f"bytes={'' if first is None else first}-{'' if last is None else last}"


class ParseRangeTests(SynchronousTestCase):
    """parse_range against RFC 9110 14.1.2."""

    def test_table(self) -> None:
        """Each header gives the expected span, 416, or None (whole file)."""
        for header, size, expected in RANGES:
            self.assertEqual(parse(header, size), expected, (header[:40], size))

    def test_unsatisfiable_is_not_none(self) -> None:
        """A 416 is raised, never returned: a caller ignoring it would serve the whole file."""
        self.assertRaises(Unsatisfiable, parse_range, "bytes=10-", 10)
        self.assertRaises(Unsatisfiable, parse_range, "bytes=0-", 0)

    @given(
        size=st.integers(0, 10**6),
        first=st.none() | st.integers(0, 2 * 10**6),
        last=st.none() | st.integers(0, 2 * 10**6),
    )
    def test_numeric_ranges(self, size: int, first: int | None, last: int | None) -> None:
        """Any numeric range gives None, 416, or a span inside the file, as 14.1.2 says."""
        result = parse(range_header(first, last), size)
        if isinstance(result, tuple):
            a, b = result
            self.assertTrue(0 <= a <= b < size, (first, last, size, result))

        if first is None and last is None:
            self.assertIsNone(result)
        elif first is None:
            # A suffix: the last `last` bytes; none at all is unsatisfiable.
            assert last is not None
            if last == 0 or size == 0:
                self.assertIs(result, UNSATISFIABLE)
            else:
                self.assertEqual(result, (size - min(last, size), size - 1))
        elif last is not None and last < first:
            self.assertIsNone(result)
        elif first >= size:
            self.assertIs(result, UNSATISFIABLE)
        else:
            self.assertEqual(result, (first, size - 1 if last is None else min(last, size - 1)))

    @given(size=st.integers(0, 10**6), first=positions, last=positions)
    def test_arbitrary_ranges(self, size: int, first: str, last: str) -> None:
        """Any text in the positions gives None, 416, or a span inside the file; nothing else."""
        result = parse(f"bytes={first}-{last}", size)
        if isinstance(result, tuple):
            a, b = result
            self.assertTrue(0 <= a <= b < size, (first, last, size, result))

    @given(header=st.text(st.characters(max_codepoint=0xFF)), size=st.integers(0, 10**6))
    def test_arbitrary_headers(self, header: str, size: int) -> None:
        """Any latin-1 header (how the server decodes it) parses without an unexpected error."""
        result = parse(header, size)
        if isinstance(result, tuple):
            self.assertTrue(0 <= result[0] <= result[1] < size, (header, size, result))


class ETagTests(SynchronousTestCase):
    """_etagMatches: If-None-Match with the weak comparison of RFC 9110 13.1.2."""

    def test_table(self) -> None:
        """Each If-None-Match value matches our ETag or not, as expected."""
        for header, etag, expected in ETAG_MATCHES:
            self.assertEqual(_etagMatches(header, etag), expected, (header, etag))


class HTTPDateTests(SynchronousTestCase):
    """_httpDate: the three HTTP-date formats, or None."""

    def test_table(self) -> None:
        """Each date string gives the expected POSIX time, or None when it is not a date."""
        for header, expected in HTTP_DATES:
            self.assertEqual(_httpDate(header), expected, header)

    def test_local_time_zone_irrelevant(self) -> None:
        """Every HTTP date is GMT, also the zone-less asctime one, whatever the server's TZ."""
        if not hasattr(time, "tzset"):
            raise self.skipTest("time.tzset is not available here")
        old = os.environ.get("TZ")

        def restore() -> None:
            if old is None:
                os.environ.pop("TZ", None)
            else:
                os.environ["TZ"] = old
            time.tzset()

        self.addCleanup(restore)
        for zone in ("America/New_York", "Asia/Kolkata", "UTC"):
            os.environ["TZ"] = zone
            time.tzset()
            for header, expected in HTTP_DATES:
                self.assertEqual(_httpDate(header), expected, (zone, header))


class CensorTests(SynchronousTestCase):
    """censor: no MAC reaches the access log, and nothing else is changed."""

    def test_table(self) -> None:
        """Each URI is logged with exactly the MAC values replaced."""
        for uri, expected in CENSORED:
            self.assertEqual(censor(uri), expected, uri)

    def test_nothing(self) -> None:
        """No URI (or an empty one, or no Referer) is logged as "-"."""
        self.assertEqual(censor(None), "-")
        self.assertEqual(censor(b""), "-")

    def test_non_ascii(self) -> None:
        """Raw non-ASCII bytes are escaped, not an error, and MACs among them still go."""
        result = censor(b"/upload/h\xc3\xa4llo?v=\xff\xfe&x=\xe9")
        self.assertEqual(result, "/upload/h\\xc3\\xa4llo?v=<redacted>&x=\\xe9")

    @given(
        protocol=st.sampled_from(PROTOCOLS),
        spelling=st.lists(st.sampled_from(["raw", "lower", "upper"]), min_size=5, max_size=5),
        mac=st.text("0123456789abcdef", min_size=64, max_size=64),
        others=st.lists(
            st.tuples(st.text("ghijk", min_size=1), st.text("ghijk%+=")),
            max_size=4,
        ),
        position=st.integers(0, 4),
        path=st.text("abxv2=&;%+", max_size=20),
    )
    def test_mac_never_logged(
        self,
        protocol: str,
        spelling: list[str],
        mac: str,
        others: list[tuple[str, str]],
        position: int,
        path: str,
    ) -> None:
        """Whatever spelling of the param name the server accepts, its MAC is not in the log."""
        name = "".join(
            char if how == "raw" else f"%{ord(char):02{'x' if how == 'lower' else 'X'}}"
            for char, how in zip(protocol, spelling, strict=False)
        )
        params = [f"{key}={value}" for key, value in others]
        params.insert(min(position, len(params)), f"{name}={mac}")
        query = "&".join(params)
        # The server reads this MAC (otherwise the test proves nothing).
        args = {k: v[0] for k, v in parse_qs(query, keep_blank_values=True).items()}
        self.assertEqual(pick_protocol(args), (protocol, mac))

        uri = ("/upload/" + path + "?" + query).encode("ascii")
        logged = censor(uri)
        self.assertNotIn(mac, logged)
        self.assertTrue(logged.startswith("/upload/" + path + "?"), logged)
        for param in params:
            if not param.startswith(name + "="):
                self.assertIn(param, logged)
