"""
Every parser of client or operator input refuses what it cannot read, and none crashes.

Two halves: protocol-level tests of the headers that used to reach Python's own limits before
any MAC was checked (raw bytes into the channel, a log observer counting what was logged), and
hypothesis property tests over each parser, asserting that only its documented refusal
escapes, plus the invariants that matter (paths stay in the store, ranges stay in the file,
every mutated MAC is refused).  Example counts are bounded so the suite stays fast.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http

from hmacd import auth
from hmacd.config import KEYS, ConfigError, listen_endpoint, load_config
from hmacd.core import is_inline_type
from hmacd.download import Unsatisfiable, _etagMatches, _httpDate, parse_range
from hmacd.mediatype import BadMediaType, essence, parse_media_type
from hmacd.numbers import MAX_DIGITS, NotADecimal, parse_decimal
from hmacd.paths import PathRefused, relative_path
from hmacd.throttle import client_address, parse_networks
from hmacd.units import parse_duration, parse_size
from hmacd.verdict import parse_content_range
from hmacd.web import HmacfsChannel, HmacfsSite
from tests.support import SECRET, MemoryServer, store_files, v_query
from tests.test_upload import chunked, put_head, request_head, status


class LogLines:
    """Collects every event logged while it is attached (the test detaches it)."""

    def __init__(self, testCase: SynchronousTestCase) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        testCase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self) -> int:
        """How many lines the events make in a log at the default level, info (a traceback
        is many); the access log's line counts."""
        count = 0
        for event in self.events:
            if event.get("log_level", LogLevel.info) < LogLevel.info:
                continue
            failure = event.get("log_failure")
            count += 1 + (len(failure.getTraceback().splitlines()) if failure else 0)
        return count


class HugeNumberHeaderTests(SynchronousTestCase):
    """A header number past Python's int() digit limit is a refusal, never a crash."""

    def setUp(self):
        self.root = self.mktemp()
        self.server = MemoryServer(self.root)
        self.log = LogLines(self)

    def send(self, data: bytes):
        del self.log.events[:]
        channel, transport = self.server.connect()
        channel.dataReceived(data)
        self.server.clock.advance(0)
        self.assertTrue(transport.disconnecting or transport.disconnected)
        self.assertEqual(store_files(self.root), [])
        self.assertLessEqual(self.log.lines(), 1, self.log.events)
        return status(transport)

    def test_channel_is_ours(self):
        """The site builds HmacfsChannel, and Twisted still has the hook it overrides."""
        channel, _ = self.server.connect()
        self.assertIsInstance(channel, HmacfsChannel)
        # If Twisted renames these, the override silently stops working: fail here instead.
        self.assertTrue(callable(getattr(http.HTTPChannel, "_maybeChooseTransferDecoder", None)))
        self.assertTrue(callable(getattr(http.HTTPChannel, "_failChooseTransferDecoder", None)))
        self.assertIs(HmacfsSite.protocol, HmacfsChannel)

    def test_content_length_of_5000_digits(self):
        """A 5,000-digit Content-Length gets 400 and at most one log line."""
        head = request_head("PUT", "/upload/a.bin?v=x", None, ("Content-Length: " + "9" * 5000,))
        self.assertEqual(self.send(head), http.BAD_REQUEST)

    def test_content_length_of_5000_digits_on_get(self):
        """The same on a GET: the channel refuses it before any resource is involved."""
        head = request_head("GET", "/upload/a.bin", None, ("Content-Length: " + "1" * 5000,))
        self.assertEqual(self.send(head), http.BAD_REQUEST)

    def test_content_length_past_the_digit_cap(self):
        """One digit more than MAX_DIGITS is refused; MAX_DIGITS digits are read as a number."""
        head = put_head("a.bin", int("1" * (MAX_DIGITS + 1)), "v=x")
        self.assertEqual(self.send(head), http.BAD_REQUEST)
        head = put_head("a.bin", int("1" * MAX_DIGITS), "v=x")
        self.assertEqual(self.send(head), http.FORBIDDEN)  # read, then the MAC is wrong

    def test_content_range_total_of_4301_digits(self):
        """Content-Range with a 4,301-digit total, no valid MAC: 400 before the body."""
        for value in ("bytes 0-1/" + "9" * 4301, "bytes */" + "9" * 4301):
            head = put_head("a.bin", 2, "v=x", (f"Content-Range: {value}",))
            self.assertEqual(self.send(head + b"ab"), http.BAD_REQUEST, value[:20])

    def test_upload_length_of_4301_digits(self):
        """A chunked PUT declaring 4,301 digits of X-Upload-Length is refused, not a 500."""
        head = request_head(
            "PUT",
            "/upload/a.bin?v=x",
            None,
            ("Transfer-Encoding: chunked", "X-Upload-Length: " + "9" * 4301),
        )
        self.assertEqual(self.send(head + chunked(b"ab")), http.LENGTH_REQUIRED)

    def test_upload_length_at_the_cap_still_verifies(self):
        """A declared length of MAX_DIGITS digits is read and checked against the MAC."""
        size = int("9" * MAX_DIGITS)
        head = request_head(
            "PUT",
            "/upload/a.bin?" + v_query("a.bin", size),
            None,
            ("Transfer-Encoding: chunked", f"X-Upload-Length: {size}"),
        )
        channel, transport = self.server.connect()
        channel.dataReceived(head)
        # Verified: the body is being received (the disk-space check is off in this server).
        self.assertFalse(transport.disconnecting)
        channel.connectionLost(None)


class DecimalTests(SynchronousTestCase):
    """parse_decimal: the one reader of numbers from clients and operators."""

    def test_table(self):
        """ASCII digits up to the cap are numbers; everything else is NotADecimal."""
        for text, expected in [
            ("0", 0),
            ("007", 7),
            ("18446744073709551615", 2**64 - 1),
            (b"123", 123),
        ]:
            self.assertEqual(parse_decimal(text), expected)
        for text in ["", " 1", "1 ", "+1", "-1", "1_0", "1.0", "\u0661", "\u00b2", "1\n", "0x1"]:
            self.assertRaises(NotADecimal, parse_decimal, text)
        self.assertRaises(NotADecimal, parse_decimal, "1" * (MAX_DIGITS + 1))
        self.assertRaises(NotADecimal, parse_decimal, "9" * 5000)
        self.assertEqual(parse_decimal("9" * 30, max_digits=30), 10**30 - 1)


class WhitespaceTests(SynchronousTestCase):
    """Header grammars allow spaces and tabs around values, not what str.strip() takes."""

    def test_only_spaces_and_tabs(self):
        """\x1f or a Unicode space after a number makes the header malformed."""
        for junk in ("\x1f", "\x1c", "\u2003", "\x85"):
            self.assertIsNone(parse_content_range(f"bytes */5{junk}"), repr(junk))
            self.assertIsNone(parse_content_range(f"bytes 0-1/5{junk}"), repr(junk))
            self.assertIsNone(parse_range(f"bytes=0-5{junk}", 10), repr(junk))
            self.assertIsNone(parse_range(f"bytes=0{junk}-5", 10), repr(junk))
        self.assertEqual(parse_content_range(" bytes 0-1/5\t"), (0, 1, 5))
        self.assertEqual(parse_range("bytes = 0-5 ", 10), (0, 5))


class ConfigRefusalTests(SynchronousTestCase):
    """Operator input past Python's limits is one ConfigError line, never a traceback."""

    def load(self, text: str) -> ConfigError:
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        with self.assertRaises(ConfigError) as caught:
            load_config(path)
        message = str(caught.exception)
        self.assertTrue(message.startswith(path + ": "), message)
        self.assertNotIn("\n", message)
        return caught.exception

    def test_unicode_folding_in_durations(self):
        """'5\u017f' (long s) and Arabic-Indic digits are not durations, and name the key."""
        for value in ("5\u017f", "\u0661\u0662", "\u0661\u0662s", "12\u2003h", "1h\u20035m"):
            self.assertEqual(self.load(f'FileTTL = "{value}"\n').key, "FileTTL", value)
            self.assertRaises(ValueError, parse_duration, value)

    def test_unicode_digits_in_sizes(self):
        """Sizes and durations agree: non-ASCII digits are refused by both."""
        for value in ("\u0661\u0662", "\u0661\u0662MB", "1.\u0665GB"):
            self.assertEqual(self.load(f'UploadMaxSize = "{value}"\n').key, "UploadMaxSize")
            self.assertRaises(ValueError, parse_size, value)

    def test_digit_cap(self):
        """Strings of more than MAX_DIGITS digits and integers of more are refused."""
        self.assertEqual(parse_duration("9" * MAX_DIGITS), int("9" * MAX_DIGITS))
        self.assertEqual(parse_size("9" * MAX_DIGITS), int("9" * MAX_DIGITS))
        for key in ("FileTTL", "UploadMaxSize", "RedisDB"):
            self.load(f'{key} = "{"9" * 4301}"\n')
            self.assertEqual(self.load(f"{key} = {'9' * (MAX_DIGITS + 1)}\n").key, key)

    def test_public_url_brackets(self):
        """A PublicURL that urlsplit itself refuses is a ConfigError naming the key."""
        for value in ("http://[", "https://[x]/", "http://[::1/"):
            self.assertEqual(self.load(f'PublicURL = "{value}"\n').key, "PublicURL", value)

    def test_toml_past_python_limits(self):
        """A 5,000-digit integer or arrays nested 5,000 deep: one line, naming the file."""
        error = self.load("\n\nUploadMaxSize = " + "9" * 5000 + "\n")
        self.assertIn("line 3", str(error))
        self.load("TrustedProxies = " + "[" * 5000 + "]" * 5000 + "\n")
        self.load("x = " + "{a = " * 3000 + "1" + "}" * 3000 + "\n")


# --- Property tests: only the documented refusal escapes ------------------------------------

# 200 examples each in the suite; HMACFS_PROPERTY_EXAMPLES=20000 for a deep run by hand.
EXAMPLES = int(os.environ.get("HMACFS_PROPERTY_EXAMPLES", "200"))
FAST = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Text an attacker would try on a number: ASCII and other digits, signs, spaces, separators,
# long runs (past int()'s 4,300-digit limit too), or anything at all.
number_texts = st.one_of(
    st.text(st.sampled_from("0123456789\u0661\u06f1\uff11\u00b2+- _.\t"), max_size=24),
    st.integers(0, 10**25).map(str),
    st.integers(4290, 4310).map(lambda n: "9" * n),
    st.text(max_size=30),
)
# Header values are latin-1 text (Twisted hands us bytes; we decode them so).
header_texts = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=60),
    st.text(st.sampled_from('abcxyz/;=," \t*+-.0123456789\\'), max_size=40),
)
tokens = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789+-.!#$&^_`|~"),
    min_size=1,
    max_size=12,
)
media_types = st.builds(
    lambda t, s, params: f"{t}/{s}" + "".join(f";{n}={v}" for n, v in params),
    tokens,
    tokens,
    st.lists(st.tuples(tokens, tokens | tokens.map(lambda v: f'"{v}, x"')), max_size=3),
)

# TOML spellings of values of every shape a key might be given.
toml_scalars = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.integers(4290, 4310).map(lambda n: "9" * n),
    st.text(max_size=20).map(lambda t: json.dumps(t, ensure_ascii=False)),
    number_texts.map(lambda t: json.dumps(t, ensure_ascii=False)),
    st.sampled_from(["true", "false", "1.5", "-0.0", "inf", "nan", "1e400", "1979-05-27",
                     "07:32:00", "1979-05-27T07:32:00Z", '"5\u017f"', '"\u0661\u0662"',
                     '"http://["', '"https://[x]/"', '"tcp:0"', '"[::1]:80"', "{a = 1}"]),
)  # fmt: skip
toml_values = st.one_of(
    toml_scalars,
    st.lists(toml_scalars, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
    st.integers(1, 3000).map(lambda n: "[" * n + "]" * n),
)


class NumberProperties(SynchronousTestCase):
    """parse_decimal and the header numbers built on it."""

    @FAST
    @given(number_texts, st.integers(1, 30))
    def test_decimal(self, text, cap):
        """A number comes out only for 1..cap ASCII digits, and it is their value."""
        try:
            value = parse_decimal(text, cap)
        except NotADecimal:
            self.assertFalse(text.isascii() and text.isdigit() and 0 < len(text) <= cap)
            return
        self.assertTrue(text.isascii() and text.isdigit() and len(text) <= cap)
        self.assertEqual(value, int(text))

    @FAST
    @given(number_texts, number_texts, number_texts, st.booleans())
    def test_content_range(self, first, last, total, star):
        """parse_content_range: None, or a span inside its total; nothing else."""
        value = f"bytes */{total}" if star else f"bytes {first}-{last}/{total}"
        span = parse_content_range(value)
        if span is None:
            return
        if star:
            self.assertEqual(span, (int(total),))
        else:
            self.assertTrue(0 <= span[0] <= span[1] < span[2])
            self.assertEqual(span, (int(first), int(last), int(total)))

    @FAST
    @given(header_texts)
    def test_content_range_any_text(self, value):
        """Any header text: None or a well-formed span."""
        span = parse_content_range(value)
        self.assertTrue(span is None or len(span) == 1 or span[0] <= span[1] < span[2])

    @FAST
    @given(
        st.one_of(header_texts, number_texts.map(lambda n: f"bytes={n}-")), st.integers(0, 10**6)
    )
    def test_range(self, header, size):
        """parse_range: None (whole file), 416, or a span inside the file."""
        try:
            span = parse_range(header, size)
        except Unsatisfiable:
            return
        if span is not None:
            self.assertTrue(0 <= span[0] <= span[1] < size)


class ConditionalHeaderProperties(SynchronousTestCase):
    """If-None-Match, If-Modified-Since and If-Range values never raise."""

    @FAST
    @given(header_texts | st.text(max_size=40))
    def test_conditionals(self, value):
        """_etagMatches gives a bool, _httpDate a time or None, whatever the client sent."""
        self.assertIn(_etagMatches(value, b'"abc"'), (True, False))
        self.assertIn(_etagMatches(value, b'W/"1-2"'), (True, False))
        when = _httpDate(value)
        self.assertTrue(when is None or isinstance(when, float))


class MediaTypeProperties(SynchronousTestCase):
    """parse_media_type: one media type, normalised, or BadMediaType."""

    @FAST
    @given(header_texts | st.text(max_size=40) | media_types)
    def test_any_text(self, value):
        """Only BadMediaType escapes; the result is ASCII, a fixed point, and no list."""
        try:
            parsed = parse_media_type(value)
        except BadMediaType:
            self.assertFalse(is_inline_type(value))
            return
        self.assertTrue(parsed.isascii() and parsed.isprintable())
        self.assertEqual(parse_media_type(parsed), parsed)
        self.assertEqual(essence(parsed).count("/"), 1)
        self.assertNotIn(",", re.sub(r'"(?:[^"\\]|\\.)*"', "", parsed))
        self.assertIn(is_inline_type(value), (True, False))

    @FAST
    @given(media_types, media_types, st.sampled_from([",", ", ", " ,", ",,"]))
    def test_lists_refused(self, one, other, comma):
        """Two media types joined as a list are never one."""
        self.assertRaises(BadMediaType, parse_media_type, one + comma + other)

    @FAST
    @given(media_types)
    def test_valid_types_kept(self, value):
        """Every generated single media type parses, and its essence is lowercased."""
        parsed = parse_media_type(value)
        self.assertEqual(essence(parsed), value.split(";", 1)[0].lower())

    def test_remembered_answers_stay_answers(self):
        """Asked again, a type gets the same answer, and a refusal is a refusal every time."""
        self.assertEqual(parse_media_type("Text/Plain ;Charset=UTF-8"), "text/plain; charset=UTF-8")
        self.assertEqual(parse_media_type("Text/Plain ;Charset=UTF-8"), "text/plain; charset=UTF-8")
        for _ in range(2):
            self.assertRaises(BadMediaType, parse_media_type, "text/plain, image/png")


class PathProperties(SynchronousTestCase):
    """Request paths: PathRefused or None escapes; what is accepted stays in the store."""

    @FAST
    @given(st.binary(max_size=80) | st.text(max_size=60).map(lambda t: t.encode("utf-8")))
    def test_relative_path(self, rest):
        """Any bytes after the prefix: a path whose every segment is ordinary, in the store."""
        root = os.path.abspath("store-root")
        try:
            relpath = relative_path(b"/upload/" + rest, "upload")
        except PathRefused:
            return
        if relpath is None:
            return
        for segment in relpath.split("/"):
            self.assertTrue(segment and not segment.startswith("."))
            self.assertNotIn("\\", segment)
            self.assertNotIn("\0", segment)
        target = os.path.normpath(os.path.join(root, *relpath.split("/")))
        self.assertTrue(target.startswith(root + os.sep))


class AuthProperties(SynchronousTestCase):
    """MACs, query and bearer parsing: a bool, None, or an AuthError; never a crash."""

    @FAST
    @given(st.dictionaries(st.text(max_size=6), st.text(max_size=10), max_size=4))
    def test_pick_protocol(self, args):
        """The pick is one of ours and its value is the client's, or None."""
        picked = auth.pick_protocol(args)
        if picked is None:
            self.assertFalse(set(args) & set(auth.PROTOCOLS))
        else:
            self.assertIn(picked[0], auth.PROTOCOLS)
            self.assertEqual(args[picked[0]], picked[1])

    @FAST
    @given(
        st.sampled_from(auth.PROTOCOLS),
        st.text(max_size=20),
        st.integers(0, 10**20),
        st.none() | st.text(max_size=20),
        st.integers(0, 63),
        st.characters(),
    )
    def test_mutated_mac_refused(self, protocol, path, size, content_type, where, char):
        """The genuine MAC verifies (any case); every other string does not."""
        try:
            mac = {"v": lambda: auth.sign_v(SECRET, path, size)}.get(
                protocol, lambda: auth.sign_v2(SECRET, path, size, content_type)
            )()
        except UnicodeEncodeError:
            return  # a path no server could have signed
        self.assertTrue(auth.verify_hmac(protocol, SECRET, path, size, content_type, mac.upper()))
        mutated = mac[:where] + char + mac[where + 1 :]
        if mutated.lower() != mac:
            self.assertFalse(auth.verify_hmac(protocol, SECRET, path, size, content_type, mutated))

    @FAST
    @given(st.none() | header_texts | st.text(max_size=40))
    def test_bearer_token(self, header):
        """bearer_token: None or a token without surrounding whitespace."""
        token = auth.bearer_token(header)
        self.assertTrue(token is None or (token and token == token.strip()))

    @FAST
    @given(
        st.text(max_size=200)
        | st.from_regex(
            r"[A-Za-z0-9_\-]{0,40}\.[A-Za-z0-9_\-]{0,80}\.[A-Za-z0-9_\-]{0,43}", fullmatch=True
        )
    )
    def test_jwt_any_text(self, token):
        """Any token text: only AuthError escapes verify_jwt."""
        try:
            auth.verify_jwt(SECRET, token, now=1_800_000_000)
        except auth.AuthError:
            pass

    @FAST
    @given(st.integers(0, 200), st.characters(min_codepoint=0x21, max_codepoint=0x7E))
    def test_mutated_jwt_refused(self, where, char):
        """A genuine token with one character of its header or claims changed is refused."""
        token = auth.sign_jwt(
            SECRET, slot="s", filename="f.png", filesize=5, filetype="image/png",
            exp=1_800_000_300,
        )  # fmt: skip
        signed = token.rsplit(".", 1)[0]
        where %= len(signed)
        mutated = signed[:where] + char + signed[where + 1 :] + token[len(signed) :]
        if mutated == token:
            return
        self.assertRaises(auth.AuthError, auth.verify_jwt, SECRET, mutated, now=1_800_000_000)


class ForwardedForProperties(SynchronousTestCase):
    """X-Forwarded-For: the client is the peer or a real IP address, whatever the header."""

    @FAST
    @given(
        st.sampled_from(["127.0.0.1", "10.0.0.1", "::1", "192.0.2.7"]),
        st.none()
        | st.lists(
            st.binary(max_size=40) | header_texts.map(lambda t: t.encode("latin-1")), max_size=3
        ),
    )
    def test_client_address(self, peer, header):
        """Never raises; the answer is the peer or a parseable address."""
        trusted = parse_networks(["127.0.0.0/8", "::1", "10.0.0.0/8"])
        address = client_address(peer, header, trusted)
        if address != peer:
            ipaddress.ip_address(address)


class ConfigProperties(SynchronousTestCase):
    """Sizes, durations, endpoints and the whole loader refuse with their documented error."""

    @FAST
    @given(
        number_texts
        | st.text(max_size=20)
        | st.integers(-(10**25), 10**25)
        | number_texts.map(lambda n: n + "MB")
    )
    def test_size_and_duration(self, value):
        """parse_size and parse_duration: a count >= 0, or ValueError."""
        for parse in (parse_size, parse_duration):
            try:
                result = parse(value)
            except ValueError:
                continue
            self.assertIsInstance(result, int)
            self.assertGreaterEqual(result, 0)

    @FAST
    @given(st.text(max_size=30) | st.integers(-5, 70000) | number_texts, st.booleans())
    def test_listen_endpoint(self, value, unix):
        """listen_endpoint: an endpoint string or ValueError."""
        try:
            self.assertIsInstance(listen_endpoint(value, unix), str)
        except ValueError:
            pass

    @FAST
    @given(st.lists(header_texts | st.text(max_size=20), max_size=3))
    def test_networks(self, entries):
        """parse_networks: networks or ValueError."""
        try:
            parse_networks(entries)
        except ValueError:
            pass

    @FAST
    @given(st.binary(max_size=200))
    def test_loader_any_bytes(self, data):
        """Any file: a Config or one ConfigError line naming the file."""
        self.assertLoads(data)

    @FAST
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(sorted(KEYS)).map(lambda k: k.lower() if len(k) % 2 else k),
                toml_values,
            ),
            max_size=4,
        )
    )
    def test_loader_known_keys(self, pairs):
        """Known keys with values of every shape: a Config or one ConfigError line."""
        text = "".join(f"{key} = {value}\n" for key, value in pairs)
        self.assertLoads(text.encode("utf-8"))

    def assertLoads(self, data: bytes) -> None:
        path = os.path.join(self.configDir, "c.toml")
        with open(path, "wb") as f:
            f.write(data)
        try:
            load_config(path)
        except ConfigError as e:
            self.assertTrue(str(e).startswith(path + ": "), str(e))
            self.assertNotIn("\n", str(e))

    def setUp(self):
        self.configDir = self.mktemp()
        os.makedirs(self.configDir)


anything = st.one_of(header_texts, st.binary(max_size=30).map(lambda b: b.decode("latin-1")))
# For each header the server parses, the values that reach deepest into its parser.
WIRE_VALUES = {
    "Content-Length": number_texts,
    "Content-Range": st.one_of(
        st.tuples(number_texts, number_texts, number_texts).map(
            lambda t: "bytes {}-{}/{}".format(*t)
        ),
        number_texts.map(lambda n: f"bytes */{n}"),
    ),
    "X-Upload-Length": number_texts,
    "Transfer-Encoding": st.sampled_from(["chunked", "identity", "gzip"]),
    "Content-Type": media_types | st.tuples(media_types, media_types).map(", ".join),
    "Range": st.tuples(number_texts, number_texts).map(lambda t: "bytes={}-{}".format(*t)),
    "If-Range": st.sampled_from(['"x"', 'W/"x"', "Sun, 06 Nov 1994 08:49:37 GMT"]),
    "If-None-Match": st.sampled_from(["*", '"a", W/"b"', "W/"]),
    "If-Modified-Since": st.sampled_from(["Sun, 06 Nov 1994 08:49:37 GMT", "Sun, 99 Nov 99999"]),
    "X-Forwarded-For": st.sampled_from(["1.2.3.4", "::1, 10.0.0.1", "x, , 300.1.1.1"]),
    "Authorization": st.sampled_from(["Bearer x.y.z", "Bearer", "Basic abc", "bearer  a.b.c "]),
    "Expect": st.just("100-continue"),
}


class RequestProperties(SynchronousTestCase):
    """Any value of any parsed header, over the wire: a documented answer, no traceback."""

    # 100 Continue is an interim answer, before any of the others.
    ANSWERS = {
        100,
        200,
        201,
        206,
        304,
        308,
        400,
        401,
        403,
        404,
        405,
        409,
        411,
        413,
        416,
        429,
        503,
        507,
    }

    def setUp(self):
        self.root = self.mktemp()
        self.server = MemoryServer(self.root)
        self.server.clock.advance(1_800_000_000)
        os.makedirs(os.path.join(self.root, "there"))
        with open(os.path.join(self.root, "there", "f.txt"), "wb") as f:
            f.write(b"0123456789")
        self.log = LogLines(self)

    @settings(max_examples=EXAMPLES + 100, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.sampled_from(["PUT", "PUT", "GET", "HEAD"]),
        st.sampled_from(["there/f.txt", "new.txt", "s/new.txt"]),
        st.sampled_from(["", "v=x", v_query("new.txt", 3), "v2=" + "0" * 64, "token=x"])
        | st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=20),
        st.lists(
            st.sampled_from(sorted(WIRE_VALUES)).flatmap(
                lambda name: st.tuples(st.just(name), WIRE_VALUES[name] | anything)
            ),
            min_size=1,
            max_size=3,
        ),
    )
    def test_any_header(self, method, path, query, headers):
        """A documented answer, no error logged, no temp file left, whatever the headers."""
        lines = [f"{name}: {value}" for name, value in headers]
        lines = [line.replace("\r", "").replace("\n", "") for line in lines]
        head = request_head(method, f"/upload/{path}" + (f"?{query}" if query else ""), None)
        # UTF-8 on the wire: the server reads header bytes as latin-1, so any bytes go.
        head = head[:-2] + "".join(f"{line}\r\n" for line in lines).encode("utf-8") + b"\r\n"
        del self.log.events[:]
        channel, transport = self.server.connect()
        channel.dataReceived(head + b"abc")
        self.server.clock.advance(0)
        channel.connectionLost(Failure(ConnectionDone()))
        self.server.clock.advance(0)
        for code in re.findall(rb"^HTTP/1\.1 (\d{3})", transport.value(), re.MULTILINE):
            self.assertIn(int(code), self.ANSWERS, transport.value()[:300])
        errors = [e for e in self.log.events if e.get("log_failure") or e.get("isError")]
        self.assertEqual(errors, [])
        self.assertEqual(
            [f for f in store_files(self.root) if ".hmacfs-" in f or f.endswith(".part")], []
        )


class AddressProperties(SynchronousTestCase):
    """The store addresses and the client's Range reading use the same number rule."""

    @FAST
    @given(
        st.text(st.sampled_from("abc.-_1 \u0661"), max_size=8),
        number_texts.filter(lambda t: ":" not in t),  # the last ":" is where the port starts
    )
    def test_store_addresses(self, host, port):
        """Only ValueError escapes, and a port is read only from 1 to 5 ASCII digits."""
        from hmacd.store.redis import parse_redis_addr
        from hmacd.store.sql import parse_db_host

        for parse in (parse_redis_addr, lambda text: parse_db_host(text, 5432)):
            try:
                _, number = parse(f"{host}:{port}")
            except ValueError:
                continue
            self.assertEqual(number, parse_decimal(port, 5))

    def test_non_ascii_port_refused(self):
        """Arabic-Indic digits are not the port 6379 (int() would read them so)."""
        from hmacd.store.redis import parse_redis_addr
        from hmacd.store.sql import parse_db_host

        self.assertRaises(ValueError, parse_redis_addr, "h:\u0666\u0663\u0667\u0669")
        self.assertRaises(ValueError, parse_db_host, "h:\u0665\u0664\u0663\u0662", 5432)

    def test_client_reads_range(self):
        """The bundled client reads the server's Range by the same rule; garbage is UploadFailed."""
        from twisted.web.http_headers import Headers

        from hmacd.client import UploadFailed, _held

        self.assertEqual(_held(Headers({"range": ["bytes=0-99"]})), 100)
        for value in ("bytes=0-" + "9" * 5000, "bytes=0-\u0661", "bytes=0-x"):
            self.assertRaises(UploadFailed, _held, Headers({"range": [value]}))
