"""
Logs that are safe and true: every client-supplied value escaped so that each
entry is one printable line, no MAC or bearer token in any line, no body
rendered for HEAD, and the access log's byte count the bytes that were sent.
"""

from __future__ import annotations

import os
import socket
import time
from urllib.parse import quote

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import http
from twisted.web.client import readBody

from hmacd import auth, logs
from hmacd.logs import censor, escape
from hmacd.throttle import RateLimiter
from hmacd.upload import UploadRequest
from hmacd.web import censoring_formatter
from tests.memory_http import exchange
from tests.support import SECRET, LoopbackServer, MemoryServer, v2_query

# Hostile bytes a client can put in a header: ESC (a terminal's CSI), BEL,
# the 8-bit CSI and NEL of C1, DEL, a backslash and a double quote.
HOSTILE = b'curl\x1b[31m\x07\x9b2J\x85next\x7f\\"x'


def unescape(logged: str) -> str:
    """Undo L{escape} (quoting on): what a reader of the log can recover."""
    return logged.encode("ascii", "backslashreplace").decode("unicode_escape")


class Captured:
    """The formatted text of every log event emitted while a test runs."""

    def __init__(self, testCase) -> None:
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self.events.append)
        testCase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def lines(self, namespace: str | None = None) -> list[str]:
        return [
            formatEvent(event)
            for event in self.events
            if namespace is None or event.get("log_namespace") == namespace
        ]

    def access(self) -> list[str]:
        return self.lines("hmacfs.access")


class EscapeTests(SynchronousTestCase):
    """escape: one printable line out of any value, readable back without ambiguity."""

    TABLE = [
        (None, "-"),
        (b"plain text/1.0", "plain text/1.0"),
        (b"\x1b[31m\x07", "\\x1b[31m\\x07"),
        (b"\x9b\x85\x80\x9f\x7f\x00\r\n\t", "\\x9b\\x85\\x80\\x9f\\x7f\\x00\\x0d\\x0a\\x09"),
        (b"\xc3\xa9", "\\xc3\\xa9"),
        (b'a\\b"c', 'a\\\\b\\"c'),
        ("h\u00e9llo w\u00f6rld", "h\u00e9llo w\u00f6rld"),
        ("\x1b\x07\x7f", "\\x1b\\x07\\x7f"),
        ("\x85\x9b\xa0", "\\x85\\x9b\\xa0"),
        ("a\u2028b\u2029c\u200bd\ufeff", "a\\u2028b\\u2029c\\u200bd\\ufeff"),
        ("\U000e0041\U0001f600", "\\U000e0041\U0001f600"),
        ('a\\b"c', 'a\\\\b\\"c'),
    ]

    def test_table(self) -> None:
        """Controls (C0, DEL, C1), separators and format characters are escaped, text kept."""
        for value, expected in self.TABLE:
            self.assertEqual(escape(value), expected, value)

    def test_unquoted(self) -> None:
        """quote=False leaves backslash and double quote alone, still escapes controls."""
        self.assertEqual(escape('"a\\b"\x1b\u2028', quote=False), '"a\\b"\\x1b\\u2028')

    @given(st.binary(max_size=200))
    def test_bytes_one_printable_line(self, value: bytes) -> None:
        """Any bytes give printable ASCII on one line, and the bytes can be read back."""
        logged = escape(value)
        self.assertTrue(logged.isprintable() and logged.isascii(), logged)
        self.assertEqual(unescape(logged).encode("latin-1"), value)

    @given(st.text(max_size=200))
    def test_text_one_printable_line(self, value: str) -> None:
        """Any text gives one line of printable characters, and the text can be read back."""
        logged = escape(value)
        self.assertTrue(logged.isprintable(), logged)
        self.assertEqual(unescape(logged), value)

    def test_censor_escapes(self) -> None:
        """censor escapes what it keeps, and a quote cannot end the logged URI early."""
        self.assertEqual(
            censor(b'/upload/a\x1b"b?v=abc&x=\x9b'), '/upload/a\\x1b\\"b?v=<redacted>&x=\\x9b'
        )


def a_request(server: MemoryServer, uri: bytes, headers: dict[bytes, bytes]) -> UploadRequest:
    """A finished-looking request on a real channel, as the Site's log() is given it."""
    channel = http.HTTPChannel()
    channel.site = channel.factory = server.site
    channel.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 4711)))
    request = UploadRequest(channel)
    request.method, request.uri, request.clientproto = b"GET", uri, b"HTTP/1.1"
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name, [value])
    request.code, request.sentLength = 200, 1234
    return request


def naive_formatter(timestamp, request) -> str:
    """A host formatter that takes no care at all: raw URI, raw headers, raw args."""
    return " ".join(
        [
            timestamp,
            request.uri.decode("latin-1"),
            repr(request.args),
            (request.getHeader(b"user-agent") or b"").decode("latin-1"),
            (request.getHeader(b"x-forwarded-for") or b"").decode("latin-1"),
            (request.getHeader(b"authorization") or b"-").decode("latin-1"),
        ]
    )


class AccessLineTests(SynchronousTestCase):
    """The access-log line, of HmacfsSite and of a host formatter wrapped for mount()."""

    def setUp(self) -> None:
        self.server = MemoryServer(self.mktemp())

    def hmacfs_line(self, request) -> str:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        try:
            self.server.site.log(request)
        finally:
            globalLogPublisher.removeObserver(events.append)
        [line] = [formatEvent(e) for e in events if e.get("log_namespace") == "hmacfs.access"]
        return line

    def formatted_lines(self, request) -> list[str]:
        return [
            self.hmacfs_line(request),
            censoring_formatter(http.combinedLogFormatter)("[ts]", request),
            censoring_formatter(http.proxiedLogFormatter)("[ts]", request),
            censoring_formatter(naive_formatter)("[ts]", request),
        ]

    @settings(max_examples=60, deadline=None)
    @given(
        uri=st.binary(max_size=60),
        referrer=st.binary(max_size=60),
        agent=st.binary(max_size=60),
        forwarded=st.binary(max_size=60),
    )
    def test_any_header_bytes_one_printable_line(self, uri, referrer, agent, forwarded) -> None:
        """Whatever bytes the request line and headers hold, each formatter gives one line."""
        request = a_request(
            self.server,
            b"/upload/" + uri,
            {b"referer": referrer, b"user-agent": agent, b"x-forwarded-for": forwarded},
        )
        for line in self.formatted_lines(request):
            self.assertTrue(line.isprintable(), repr(line))

    def test_hostile_agent(self) -> None:
        """ESC, BEL, 8-bit CSI and NEL in a User-Agent are logged escaped by HmacfsSite."""
        line = self.hmacfs_line(a_request(self.server, b"/upload/x", {b"user-agent": HOSTILE}))
        self.assertIn('"curl\\x1b[31m\\x07\\x9b2J\\x85next\\x7f\\\\\\"x"', line)
        self.assertTrue(line.isprintable(), line)

    def test_no_mac_no_token(self) -> None:
        """No formatter sees a MAC in the URI, args or Referer, nor the bearer token."""
        mac, token = "a1" * 32, "eyJhbGciOiJIUzI1NiJ9.e30.c2lnbmF0dXJl"
        request = a_request(
            self.server,
            b"/upload/x.txt?v2=" + mac.encode() + b"&%76=" + mac.encode(),
            {
                b"referer": b"https://h/upload/y?token=" + mac.encode(),
                b"authorization": b"Bearer " + token.encode(),
                b"user-agent": b"ua",
            },
        )
        request.args = {b"v2": [mac.encode()], b"%76": [mac.encode()], b"n": [b"1"]}
        for line in self.formatted_lines(request):
            self.assertNotIn(mac, line)
            self.assertNotIn(token, line)
            self.assertIn("<redacted>", line)
        self.assertIn("b'n': [b'1']", self.formatted_lines(request)[-1])

    def test_wrapping_twice_is_once(self) -> None:
        """A formatter already censoring is not wrapped again."""
        once = censoring_formatter(http.combinedLogFormatter)
        self.assertIs(censoring_formatter(once), once)

    def test_twisted_line_unchanged(self) -> None:
        """Twisted's combined formatter, wrapped, writes its very own line for a plain request."""
        request = a_request(self.server, b"/upload/x.txt?n=1", {b"user-agent": b"ua/1"})
        self.assertEqual(
            censoring_formatter(http.combinedLogFormatter)("[ts]", request),
            http.combinedLogFormatter("[ts]", request),
        )


class OwnMessagesTests(SynchronousTestCase):
    """hmacfs's own log lines escape the paths clients chose."""

    def test_stored_path_escaped(self):
        """A name holding NEL, CSI and a line separator is logged escaped on "stored"."""
        server = MemoryServer(self.mktemp())
        captured = Captured(self)
        name = "s/a\u0085b\u009b31m\u2028c.txt"
        response = exchange(
            server,
            "PUT",
            "/upload/" + quote(name) + "?" + v2_query(name, 2, "text/plain"),
            b"hi",
            {"Content-Type": "text/plain"},
        )
        self.assertEqual(response.code, 201)
        [stored] = [line for line in captured.lines() if line.startswith("stored ")]
        self.assertIn("s/a\\x85b\\x9b31m\\u2028c.txt", stored)
        self.assertTrue(stored.isprintable(), stored)

    def test_refused_path_escaped(self):
        """Raw C1 bytes and a quote in a refused PUT's path reach the debug line escaped."""
        server = MemoryServer(self.mktemp())
        captured = Captured(self)
        channel, transport = server.connect()
        channel.dataReceived(
            b'PUT /upload/a\x9b2Jb\x85"c.txt?v=00 HTTP/1.1\r\nHost: x\r\n'
            b"User-Agent: " + HOSTILE + b"\r\nContent-Length: 0\r\n\r\n"
        )
        # (Twisted's parser itself answers 400 to C0 controls in the request line.)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "), transport.value())
        [refused] = [line for line in captured.lines() if line.startswith("refused ")]
        self.assertIn('refused PUT /upload/a\\x9b2Jb\\x85\\"c.txt: 400', refused)
        for line in [refused, *captured.access()]:
            self.assertTrue(line.isprintable(), line)


class HeadTests(SynchronousTestCase):
    """A HEAD never renders a body: twisted.web's "I think I'll eat it" never appears."""

    def setUp(self) -> None:
        self.server = MemoryServer(self.mktemp())
        self.captured = Captured(self)

    def exchange(self, method: bytes, target: bytes, channel=None) -> bytes:
        if channel is None:
            channel, transport = self.server.connect()
        else:
            transport = channel.transport
        transport.clear()
        channel.dataReceived(method + b" " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        return transport.value()

    def assertNoEating(self) -> None:
        for line in self.captured.lines():
            self.assertNotIn("eat it", line)

    def test_missing_file(self) -> None:
        """HEAD of a missing file: 404 with the GET's Content-Length, no body, no warning."""
        get = self.exchange(b"GET", b"/upload/missing.txt")
        head = self.exchange(b"HEAD", b"/upload/missing.txt")
        self.assertTrue(head.startswith(b"HTTP/1.1 404 "), head)
        _, _, getBody = get.partition(b"\r\n\r\n")
        headHead, _, headBody = head.partition(b"\r\n\r\n")
        self.assertEqual(headBody, b"")
        self.assertIn(b"Content-Length: %d\r\n" % len(getBody), headHead + b"\r\n")
        self.assertNoEating()

    def test_every_not_found(self) -> None:
        """Outside the upload space, a dot file, a directory, a refused path: no body either."""
        os.makedirs(os.path.join(self.server.fs.store_dir, "dir"))
        for target in (b"/elsewhere", b"/upload/.hmacfs/secret", b"/upload/dir", b"/upload/../x"):
            head = self.exchange(b"HEAD", target)
            self.assertTrue(head.startswith(b"HTTP/1.1 404 "), (target, head))
            self.assertEqual(head.partition(b"\r\n\r\n")[2], b"", target)
        self.assertNoEating()

    def test_refused_head(self) -> None:
        """A HEAD refused before any resource (rate limit) has no body and no warning."""
        self.server.fs.limiter = RateLimiter(1, 1, self.server.clock)
        self.assertTrue(self.exchange(b"GET", b"/upload/a").startswith(b"HTTP/1.1 404 "))
        head = self.exchange(b"HEAD", b"/upload/a")
        self.assertTrue(head.startswith(b"HTTP/1.1 429 "), head)
        self.assertEqual(head.partition(b"\r\n\r\n")[2], b"")
        self.assertNoEating()

    def test_existing_file(self) -> None:
        """HEAD of a file still answers 200 with its length and no body."""
        with open(os.path.join(self.server.fs.store_dir, "f.txt"), "wb") as f:
            f.write(b"12345")
        head = self.exchange(b"HEAD", b"/upload/f.txt")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)
        self.assertIn(b"Content-Length: 5\r\n", head)
        self.assertEqual(head.partition(b"\r\n\r\n")[2], b"")
        self.assertNoEating()


def logged_length(line: str) -> int:
    """The byte count of a combined-format access line ("-" is 0)."""
    field = line.split('" ', 1)[1].split()[1]
    return 0 if field == "-" else int(field)


class SentLengthTests(TestCase):
    """The access log's byte count is what was sent, also when sendfile sent it."""

    def setUp(self) -> None:
        self.server = LoopbackServer(self)
        self.captured = Captured(self)
        self.sendfiles: list[int] = []
        real = os.sendfile

        def counting(*args):
            n = real(*args)
            self.sendfiles.append(n)
            return n

        self.patch(os, "sendfile", counting)

    def store(self, name: str, size: int) -> bytes:
        data = os.urandom(size)
        with open(os.path.join(self.server.root, name), "wb") as f:
            f.write(data)
        return data

    def line_for(self, method: str, name: str) -> str:
        lines = [line for line in self.captured.access() if f'"{method} /upload/{name} ' in line]
        self.assertEqual(len(lines), 1, lines)
        return lines[0]

    @inlineCallbacks
    def test_full_downloads(self):
        """A 307,678-byte image and a 1 MiB file are logged with their sizes, not 262144."""
        for name, size in (("image.jpg", 307_678), ("file.bin", 1024 * 1024)):
            data = self.store(name, size)
            response = yield self.server.http.get(self.server.url(name))
            self.assertEqual((yield readBody(response)), data)
            line = self.line_for("GET", name)
            self.assertIn(" 200 ", line)
            self.assertEqual(logged_length(line), size, line)
        self.assertGreater(sum(self.sendfiles), 0)  # else the test proves nothing

    @inlineCallbacks
    def test_range(self):
        """A 206 is logged with the length of its range."""
        data = self.store("range.bin", 2 * 1024 * 1024)
        response = yield self.server.http.get(
            self.server.url("range.bin"), headers={"Range": "bytes=100-1500099"}
        )
        self.assertEqual(response.code, 206)
        self.assertEqual((yield readBody(response)), data[100:1500100])
        self.assertEqual(logged_length(self.line_for("GET", "range.bin")), 1_500_000)
        self.assertGreater(sum(self.sendfiles), 0)

    @inlineCallbacks
    def test_aborted_download(self):
        """A client that hangs up mid-way is logged, with no more than was sent to it."""
        size = 64 * 1024 * 1024
        self.store("big.bin", size)
        sent_before = self.server.fs.metrics.download_bytes._value.get()

        def read_some_and_hang_up() -> int:
            s = socket.create_connection((self.server.host, self.server.portNumber))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(b"GET /upload/big.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            received = 0
            while received < 2 * 1024 * 1024:
                chunk = s.recv(65536)
                if not chunk:
                    break
                received += len(chunk)
            s.close()
            return received

        received = yield deferToThread(read_some_and_hang_up)
        deadline = time.monotonic() + 10
        while not [line for line in self.captured.access() if "big.bin" in line]:
            self.assertLess(time.monotonic(), deadline, "no access-log line for the download")
            yield deferLater(0.05)
        line = self.line_for("GET", "big.bin")
        sent = self.server.fs.metrics.download_bytes._value.get() - sent_before
        logged = logged_length(line)
        self.assertGreater(logged, received - 1024)  # the client read that much body
        self.assertLessEqual(logged, sent)
        self.assertLess(logged, size)

    @inlineCallbacks
    def test_stalled_client_hangs_up(self):
        """Bytes still in Twisted's buffer when the client goes are not counted as sent."""
        self.store("stall.bin", 64 * 1024 * 1024)
        sent_before = self.server.fs.metrics.download_bytes._value.get()

        def stall_and_hang_up() -> None:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect((self.server.host, self.server.portNumber))
            s.sendall(b"GET /upload/stall.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(0.5)
            s.close()

        yield deferToThread(stall_and_hang_up)
        deadline = time.monotonic() + 10
        while not [line for line in self.captured.access() if "stall.bin" in line]:
            self.assertLess(time.monotonic(), deadline, "no access-log line for the download")
            yield deferLater(0.05)
        sent = self.server.fs.metrics.download_bytes._value.get() - sent_before
        # The file sender's last write (up to 256 KiB) waits in Twisted's buffer.
        self.assertLess(logged_length(self.line_for("GET", "stall.bin")), sent)


def deferLater(seconds: float):
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds, lambda: None)


class HostileClientTests(TestCase):
    """The wire: raw bytes a client sends reach the access log escaped."""

    @inlineCallbacks
    def test_user_agent_over_socket(self):
        """A User-Agent with ESC, BEL, 0x9b and 0x85 is logged escaped, as one line."""
        server = LoopbackServer(self)
        captured = Captured(self)
        mac = auth.sign_v(SECRET, "w/a.txt", 1)

        def send() -> bytes:
            s = socket.create_connection((server.host, server.portNumber))
            with s:
                s.sendall(
                    b"PUT /upload/w/a.txt?v=" + mac.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                    b"User-Agent: " + HOSTILE + b"\r\nReferer: http://r/\x1b]0;x\x07\r\n"
                    b"Content-Length: 1\r\nConnection: close\r\n\r\nz"
                )
                return s.recv(65536)

        answer = yield deferToThread(send)
        self.assertTrue(answer.startswith(b"HTTP/1.1 201 "), answer)
        [line] = captured.access()
        self.assertTrue(line.isprintable(), line)
        self.assertNotIn(mac, line)
        self.assertIn("\\x1b[31m\\x07\\x9b2J\\x85next", line)
        self.assertIn('"http://r/\\x1b]0;x\\x07"', line)
        self.assertIn(quote("w/a.txt"), line)


class MethodLabelTests(SynchronousTestCase):
    """requests_total labels only the methods hmacfs knows; made-up ones share one series."""

    def test_made_up_methods_share_one_label(self):
        """A thousand invented methods add one series, method="other", not a thousand."""
        server = MemoryServer(self.mktemp())
        for i in range(1000):
            channel, transport = server.connect()
            channel.dataReceived(b"M%04dX /upload/a HTTP/1.1\r\nHost: x\r\n\r\n" % i)
            self.assertIn(b" 405 ", transport.value().split(b"\r\n", 1)[0] + b" ")
        families = {
            tuple(sorted(sample.labels.items()))
            for metric in server.fs.metrics.registry.collect()
            if metric.name.endswith("requests")
            for sample in metric.samples
            if sample.name.endswith("requests_total")
        }
        self.assertEqual(families, {(("method", "other"), ("status", "405"))})


class EmitsTests(SynchronousTestCase):
    """emits: the access line is skipped only where twistd's own LogLevel would drop it."""

    def setUp(self) -> None:
        self.patch(logs, "_for_twistd", None)
        self.patch(logs, "_process_filter", None)
        self.patch(logs, "_emits", {})

    def twistd_log(self, level: str) -> list[dict]:
        """Make the twistd observer at level, as twistd does; the events that pass it."""
        written: list[dict] = []
        logs.for_twistd(level, "", lambda: written.append)
        logs.twistd_observer()
        return written

    def test_without_twistd_everything_emits(self) -> None:
        """Embedded or in tests, the host's observers may want any level: nothing is skipped."""
        self.assertTrue(logs.emits(LogLevel.debug, "hmacfs.access"))
        self.assertTrue(logs.emits(LogLevel.info, "hmacfs.access"))

    def test_twistd_level_decides(self) -> None:
        """Under twistd, a level below LogLevel does not emit; LogLevel and above do."""
        self.twistd_log("warn")
        self.assertFalse(logs.emits(LogLevel.info, "hmacfs.access"))
        self.assertFalse(logs.emits(LogLevel.debug, "hmacd.web"))
        self.assertTrue(logs.emits(LogLevel.warn, "hmacfs.access"))
        self.assertTrue(logs.emits(LogLevel.error, "hmacfs.access"))

    def test_twistd_info_keeps_access_log(self) -> None:
        """LogLevel info: the access line is built and reaches the observer twistd made."""
        written = self.twistd_log("info")
        self.assertTrue(logs.emits(LogLevel.info, "hmacfs.access"))
        observer = logs.make_observer("info", "", lambda: written.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        server = MemoryServer(self.mktemp())
        server.site.log(a_request(server, b"/upload/x", {b"user-agent": b"ua"}))
        [line] = [formatEvent(e) for e in written if e.get("log_namespace") == "hmacfs.access"]
        self.assertIn('"GET /upload/x HTTP/1.1" 200 1234', line)

    def stored_lines(self, name: str) -> list[str]:
        """Upload name through a MemoryServer; the "stored" lines that reached any observer."""
        server = MemoryServer(self.mktemp())
        captured = Captured(self)
        channel, transport = server.connect()
        channel.dataReceived(
            b"PUT /upload/%s?%s HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 2\r\n\r\nhi"
            % (name.encode(), v2_query(name, 2, "text/plain").encode())
        )
        self.assertIn(b" 201 ", transport.value().split(b"\r\n", 1)[0] + b" ")
        return [line for line in captured.lines("hmacd.landing") if line.startswith("stored ")]

    def test_stored_line_follows_level(self) -> None:
        """The per-upload "stored" line is built under twistd's info, and skipped under warn."""
        self.assertEqual(len(self.stored_lines("a.txt")), 1)  # no twistd: always
        self.twistd_log("info")
        self.assertEqual(len(self.stored_lines("b.txt")), 1)
        self.twistd_log("warn")
        self.assertEqual(self.stored_lines("c.txt"), [])

    def test_site_skips_access_line_but_counts(self) -> None:
        """LogLevel warn: no access event is built, and requests_total still counts it."""
        self.twistd_log("warn")
        server = MemoryServer(self.mktemp())
        captured = Captured(self)
        server.site.log(a_request(server, b"/upload/x", {b"user-agent": HOSTILE}))
        self.assertEqual(captured.access(), [])
        value = server.fs.metrics.registry.get_sample_value(
            "hmac_file_server_requests_total", {"method": "GET", "status": "200"}
        )
        self.assertEqual(value, 1)


class PrintableLineTests(SynchronousTestCase):
    """Whatever a log call passed unescaped, the written entry is one printable line."""

    def test_unescaped_client_text_is_escaped_where_written(self):
        """NEL, CSI, ESC, U+2028 and a bidi override in an unescaped value come out escaped."""
        from hmacd.logs import make_observer

        path = self.mktemp()
        observer = make_observer("info", path, lambda: None)
        hostile = "a\x85b\x9b31mc\x1b[2Jd\u2028e\u202ef\x7f"
        event = {
            "log_format": "refused {path}",
            "path": hostile,
            "log_level": LogLevel.warn,
            "log_namespace": "hmacd.admission",
            "log_time": 0.0,
        }
        observer(event)
        with open(path, encoding="utf-8") as f:
            written = f.read()
        self.assertEqual(written.count("\n"), 1, written)
        self.assertTrue(written.endswith("\n"))
        line = written[:-1]
        self.assertTrue(line.isprintable(), line)
        for escaped in ("\\x85", "\\x9b", "\\x1b", "\\u2028", "\\u202e", "\\x7f"):
            self.assertIn(escaped, line)

    def test_tracebacks_keep_their_lines(self):
        """A failure's traceback keeps its newlines: only control characters are escaped."""
        from twisted.python.failure import Failure

        from hmacd.logs import printable_line

        try:
            raise ValueError("boom\x1b")
        except ValueError:
            failure = Failure()
        text = printable_line(
            {
                "log_format": "cannot store {path}",
                "path": "x",
                "log_failure": failure,
                "log_level": LogLevel.error,
                "log_namespace": "hmacd",
                "log_time": 0.0,
            }
        )
        self.assertGreater(text.count("\n"), 2)
        self.assertIn("boom\\x1b", text)
