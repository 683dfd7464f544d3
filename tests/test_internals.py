"""
Guards for hmacd.internals: each private attribute of Twisted or of a driver that hmacfs
reaches is still where hmacd.internals expects it.  A failure here means a new release
moved it: adapt hmacd.internals (and only it), then the pin in setup.py.
"""

from __future__ import annotations

import inspect
import itertools

from twisted.enterprise import adbapi
from twisted.internet import abstract, tcp, unix
from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import http, server
from twisted.web.resource import Resource

from hmacd import internals

# --- HTTP: channels, requests and transports ----------------------------------------------

# The upload request (hmacd.upload) ........................................................


class RequestLineTests(SynchronousTestCase):
    """internals.request_line: the request line is on the channel when gotLength runs."""

    def test_in_gotLength(self) -> None:
        """The method, target and version of the request being parsed, before its body."""
        seen = []

        class Probe(http.Request):
            def gotLength(self, length):
                seen.append(internals.request_line(self.channel))
                super().gotLength(length)

        channel = http.HTTPChannel()
        channel.requestFactory = Probe
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"PUT /upload/a?v=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n")
        self.assertEqual(seen, [(b"PUT", b"/upload/a?v=1", b"HTTP/1.1")])


class ReadSizeTests(SynchronousTestCase):
    """internals.set_read_size: a TCP transport reads bufferSize bytes at a time."""

    def test_tcp_reads_buffer_size(self) -> None:
        """doRead of a TCP connection reads exactly bufferSize bytes from its socket."""
        self.assertEqual(FileDescriptor.bufferSize, 64 * 1024)
        asked = []

        class Socket:
            def setblocking(self, flag):
                pass

            def fileno(self):
                return -1

            def recv(self, size):
                asked.append(size)
                return b"x"

        connection = tcp.Connection(Socket(), Protocol(), reactor=object())
        connection.connected = True
        self.assertEqual(internals.set_read_size(connection, 1 << 20), 64 * 1024)
        connection.doRead()
        self.assertEqual(asked, [1 << 20])
        self.assertEqual(internals.set_read_size(connection, 64 * 1024), 1 << 20)
        connection.doRead()
        self.assertEqual(asked, [1 << 20, 64 * 1024])


# ... HTTP, the read side and the policy (hmacd.download, hmacd.guard, hmacd.web) ...........


def _connectedChannel() -> http.HTTPChannel:
    """An HTTPChannel on an in-memory transport."""
    channel = http.HTTPChannel()
    channel.makeConnection(StringTransport())
    return channel


class RequestDisconnectedTests(TestCase):
    """internals.request_disconnected: a request knows when its client has gone."""

    def test_flag_follows_connection_lost(self):
        """False while the client is there, True once the request has lost it."""
        request = http.Request(_connectedChannel())
        self.assertFalse(internals.request_disconnected(request))
        request.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(internals.request_disconnected(request))


class _HalfWriter(abstract.FileDescriptor):
    """A FileDescriptor whose kernel takes two bytes per write."""

    def writeSomeData(self, data: bytes) -> int:
        return min(2, len(data))


class WriteBufferTests(TestCase):
    """internals.keeps_write_buffer / unsent_bytes: what a socket transport has not sent."""

    def test_tcp_and_unix_transports_keep_it(self):
        """The transports sendfile is used on are FileDescriptors, which keep the buffer."""
        self.assertTrue(issubclass(tcp.Connection, abstract.FileDescriptor))
        self.assertTrue(issubclass(unix.Server, tcp.Connection))
        self.assertTrue(internals.keeps_write_buffer(_HalfWriter(reactor=MemoryReactor())))
        self.assertFalse(internals.keeps_write_buffer(StringTransport()))

    def test_unsent_counts_what_the_kernel_has_not_taken(self):
        """Bytes written count as unsent until writeSomeData takes them, in either buffer."""
        transport = _HalfWriter(reactor=MemoryReactor())
        transport.connected = True
        self.assertEqual(internals.unsent_bytes(transport), 0)
        transport.write(b"hello")
        self.assertEqual(internals.unsent_bytes(transport), 5)
        transport.doWrite()  # joins the buffers; the kernel takes 2
        self.assertEqual(internals.unsent_bytes(transport), 3)
        transport.write(b"!!")
        self.assertEqual(internals.unsent_bytes(transport), 5)
        while internals.unsent_bytes(transport):
            transport.doWrite()
        self.assertEqual(internals.unsent_bytes(transport), 0)


class LogFormatterTests(TestCase):
    """internals.log_formatter / set_log_formatter: the formatter a Site logs with."""

    def test_site_logs_with_the_formatter_set(self):
        """The formatter given to Site is found, and one set in its place writes the lines."""

        def host(timestamp, request):
            return "host"

        def ours(timestamp, request):
            return "ours " + request.uri.decode("ascii")

        path = self.mktemp()
        site = server.Site(Resource(), logPath=path, logFormatter=host)
        self.assertIs(internals.log_formatter(site), host)
        internals.set_log_formatter(site, ours)
        self.assertIs(internals.log_formatter(site), ours)
        site.startFactory()
        request = http.Request(_connectedChannel())
        request.uri = b"/x"
        site.log(request)
        site.stopFactory()
        with open(path, encoding="ascii") as f:
            self.assertEqual(f.read(), "ours /x\n")


class AbortAfterTests(TestCase):
    """internals.abort_after: the forced close HTTPChannel itself cancels on connectionLost."""

    def _channel(self):
        clock = Clock()
        channel = http.HTTPChannel()
        channel.callLater = clock.callLater  # the channel's injectable clock
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport, clock

    def test_aborts_when_due(self):
        """A connection still open when the time is up is aborted."""
        channel, transport, clock = self._channel()
        internals.abort_after(channel, 5)
        clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        clock.advance(0.1)
        self.assertTrue(transport.disconnecting)

    def test_connection_lost_cancels(self):
        """A connection that closes in time leaves no pending abort behind."""
        channel, _, clock = self._channel()
        internals.abort_after(channel, 5)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(clock.getDelayedCalls(), [])


class ContentLengthCheckTests(TestCase):
    """internals.ContentLengthCheck: the raw Content-Length is judged before int()."""

    def _answer(self, value: bytes) -> tuple[list[bytes], bytes]:
        seen: list[bytes] = []

        class Picky(internals.ContentLengthCheck):
            def badContentLength(self, value: bytes) -> bool:
                seen.append(value)
                return value == b"12"

        channel = Picky()
        channel.requestFactory = _Ok
        transport = StringTransport()
        channel.makeConnection(transport)
        channel.dataReceived(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: " + value + b"\r\n\r\n"
        )
        channel.dataReceived(b"x" * int(value))
        return seen, transport.value()

    def test_refused_value_gets_400(self):
        """A value the hook refuses gets Twisted's 400 before any request sees it."""
        seen, answer = self._answer(b"12")
        self.assertEqual(seen, [b"12"])
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)

    def test_accepted_value_reaches_the_request(self):
        """A value the hook accepts is read by Twisted as always."""
        seen, answer = self._answer(b"3")
        self.assertEqual(seen, [b"3"])
        self.assertTrue(answer.startswith(b"HTTP/1.1 200 "), answer)


class _Ok(http.Request):
    """A request answered 200 with its body's length."""

    def process(self) -> None:
        self.write(b"%d" % len(self.content.read()))
        self.finish()


# --- Stores: twisted.enterprise.adbapi and the database drivers -----------------------------


class _TriggerReactor(MemoryReactor):
    """A MemoryReactor whose system event triggers have ids and can be removed, as adbapi needs."""

    def __init__(self) -> None:
        super().__init__()
        self.added: dict[int, tuple[str, str]] = {}
        self._ids = itertools.count(1)

    def addSystemEventTrigger(self, phase, eventType, callable, *args, **kw):
        tid = next(self._ids)
        self.added[tid] = (phase, eventType)
        return tid

    def removeSystemEventTrigger(self, triggerID):
        del self.added[triggerID]

    def callWhenRunning(self, callable, *args, **kw):
        return self.addSystemEventTrigger("after", "startup", callable, *args, **kw)


def _sqlite_pool(reactor: _TriggerReactor) -> adbapi.ConnectionPool:
    return adbapi.ConnectionPool(
        "sqlite3", ":memory:", check_same_thread=False, cp_min=1, cp_max=1, cp_reactor=reactor
    )


class AdbapiGuards(SynchronousTestCase):
    """twisted.enterprise.adbapi keeps its connections and triggers where internals reaches."""

    def test_connection_wraps_raw_connection(self) -> None:
        """adbapi.Connection keeps its DB-API connection in _connection and its pool in _pool."""
        pool = _sqlite_pool(_TriggerReactor())
        connection = adbapi.Connection(pool)
        raw = internals.adbapi_raw_connection(connection)
        self.assertIs(internals.adbapi_pool_of(connection), pool)
        self.assertIs(raw, pool.connections[pool.threadID()])
        internals.adbapi_set_raw_connection(connection, None)
        # adbapi's own reconnect reads the same attribute: with None it disconnects nothing.
        connection.reconnect()
        self.assertIs(internals.adbapi_raw_connection(connection), raw)
        raw.close()

    def test_forget_connection(self) -> None:
        """A connection dropped from pool.connections is not handed to this thread again."""
        pool = _sqlite_pool(_TriggerReactor())
        raw = pool.connect()
        self.assertIs(pool.connect(), raw)
        internals.adbapi_forget_connection(pool, raw)
        fresh = pool.connect()
        self.assertIsNot(fresh, raw)
        internals.adbapi_forget_connection(pool, raw)  # not this thread's any more: kept
        self.assertIs(pool.connect(), fresh)
        raw.close()
        fresh.close()

    def test_triggers(self) -> None:
        """The pool's start and shutdown triggers are startID and shutdownID, and go away."""
        reactor = _TriggerReactor()
        pool = _sqlite_pool(reactor)
        self.assertEqual(list(reactor.added.values()), [("after", "startup")])
        internals.adbapi_remove_start_trigger(pool, reactor)
        self.assertEqual((reactor.added, pool.startID), ({}, None))
        pool.start()
        try:
            self.assertEqual(list(reactor.added.values()), [("during", "shutdown")])
            internals.adbapi_remove_shutdown_trigger(pool, reactor)
            self.assertEqual((reactor.added, pool.shutdownID), ({}, None))
        finally:
            pool.finalClose()


class PyMySQLGuards(SynchronousTestCase):
    """PyMySQL bounds each read and write by the attributes internals sets."""

    def test_timeouts(self) -> None:
        """read_timeout/write_timeout land in _read_timeout/_write_timeout, which I/O reads."""
        import pymysql.connections

        connection = pymysql.connections.Connection(
            defer_connect=True, read_timeout=7, write_timeout=8
        )
        self.assertEqual((connection._read_timeout, connection._write_timeout), (7, 8))
        internals.pymysql_set_timeouts(connection, 30, 31)
        self.assertEqual((connection._read_timeout, connection._write_timeout), (30, 31))
        Connection = pymysql.connections.Connection
        self.assertIn("self._read_timeout", inspect.getsource(Connection._read_packet))
        self.assertIn("self._write_timeout", inspect.getsource(Connection._write_bytes))


# --- Composition: listening ports, services, processes -------------------------------------


class MultiprocessValuesGuardTests(TestCase):
    """hmacd.internals.use_multiprocess_values: prometheus_client still picks values this way."""

    def test_metric_reads_value_class_when_created(self) -> None:
        """A metric made after ValueClass is swapped keeps its value in the swapped class."""
        from prometheus_client import CollectorRegistry, Counter, values

        made: list[tuple] = []

        class Recording(values.MutexValue):
            def __init__(self, *args, **kwargs) -> None:
                made.append(args)
                super().__init__(*args, **kwargs)

        self.patch(values, "ValueClass", Recording)
        Counter("guard_total", "guard", registry=CollectorRegistry()).inc()
        self.assertTrue(made, "prometheus_client no longer reads values.ValueClass")

    def test_multiprocess_value_is_a_factory(self) -> None:
        """values.MultiProcessValue() still returns the value class use_multiprocess_values sets."""
        from prometheus_client import values

        self.patch(values, "ValueClass", values.ValueClass)
        internals.use_multiprocess_values()
        self.assertTrue(isinstance(values.ValueClass, type), values.ValueClass)
        self.assertIn("MmapedValue", values.ValueClass.__name__)
