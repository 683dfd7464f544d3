"""
Slow and greedy clients (hmacd.guard): HeaderTimeout, MaxConnectionsPerClient and
MinUploadBytesPerSecond, at the protocol level on a Clock, and over real sockets.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import time
import tomllib

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hmacd import tap
from hmacd.config import KEYS, Config, ConfigError, parse_config
from hmacd.guard import BodyRateFloor, ClientCounts, GuardedChannel, counted_client
from hmacd.store.failover import FailoverStore
from hmacd.store.memory import MemoryStore
from hmacd.throttle import parse_networks
from tests.support import LoopbackServer, MemoryServer, store_files, v_query
from tests.test_tap import TwistdHarness, _free_port, _read
from tests.test_upload import put_head, request_head, status

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.rst")
DRIBBLE = b"GET /upload/x HTTP/1.1\r\nHost: x\r\nX-A: "


def connect(server: MemoryServer, address=None):
    """A channel of server's Site from address (default 127.0.0.1), made as a listener would."""
    address = address or IPv4Address("TCP", "127.0.0.1", 4711)
    protocol = server.site.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport


def sample(server: MemoryServer, name: str, **labels: str) -> float:
    return server.fs.metrics.registry.get_sample_value(name, labels) or 0


def responses(transport: StringTransport) -> list[int]:
    """Every status code written to the transport, in order (100 Continue left out)."""
    codes = [int(code) for code in re.findall(rb"HTTP/1\.1 ([0-9]{3}) ", transport.value())]
    return [code for code in codes if code != 100]


class HeadDeadlineTests(SynchronousTestCase):
    """HeaderTimeout: a head must be complete in time, however steadily it dribbles."""

    def setUp(self):
        self.root = self.mktemp()
        self.server = MemoryServer(self.root, header_timeout=20)
        self.clock = self.server.clock

    def dribble(self, channel, transport, seconds: float, every: float = 5) -> None:
        """One header byte every `every` seconds, for `seconds`, while the connection is open."""
        waited = 0.0
        while waited < seconds and not transport.disconnecting:
            self.clock.advance(every)
            waited += every
            channel.dataReceived(b"a")

    def test_site_uses_guarded_channel(self):
        """The Site's connections are GuardedChannels (HTTP/1.1 only: no HTTP/2 wrapper)."""
        protocol, _ = connect(self.server)
        self.assertIsInstance(protocol, GuardedChannel)

    def test_dribbled_head_gets_408(self):
        """The issue's client (a byte every few seconds) gets 408 and is closed at 20 s."""
        channel, transport = connect(self.server)
        channel.dataReceived(DRIBBLE)
        for _ in range(3):
            self.clock.advance(5)
            channel.dataReceived(b"a")
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(responses(transport), [408])
        self.assertIn(b"Connection: close", transport.value())
        self.assertEqual(
            sample(self.server, "hmac_file_server_connections_cut_total", reason="header_timeout"),
            1,
        )

    def test_idle_timeout_alone_never_fires(self):
        """Without HeaderTimeout the same client keeps its connection: each byte resets 60 s."""
        self.server.fs.header_timeout = 0
        channel, transport = connect(self.server)
        channel.dataReceived(DRIBBLE)
        self.dribble(channel, transport, 300, every=25)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_deadline_starts_at_first_byte(self):
        """A silent connection is the idle timeout's; the head's 20 s start with its first byte."""
        channel, transport = connect(self.server)
        self.clock.advance(50)
        channel.dataReceived(b"G")
        self.clock.advance(19.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertEqual(responses(transport), [408])

    def test_complete_head_cancels_deadline(self):
        """A head that completes in time leaves no deadline behind: the next 30 s are quiet."""
        channel, transport = connect(self.server)
        channel.dataReceived(b"GET /upload/missing HTTP/1.1\r\n")
        self.clock.advance(15)
        channel.dataReceived(b"Host: x\r\n\r\n")
        self.assertEqual(responses(transport), [404])
        self.clock.advance(30)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(responses(transport), [404])
        self.assertEqual(
            sample(self.server, "hmac_file_server_connections_cut_total", reason="header_timeout"),
            0,
        )

    def test_every_head_of_a_kept_alive_connection(self):
        """The second (and third) request on a connection has its own deadline."""
        channel, transport = connect(self.server)
        for _ in range(2):
            channel.dataReceived(b"GET /upload/missing HTTP/1.1\r\n")
            self.clock.advance(19)
            channel.dataReceived(b"Host: x\r\n\r\n")
        self.assertEqual(responses(transport), [404, 404])
        self.clock.advance(30)  # idle between requests: the idle timeout's business
        channel.dataReceived(DRIBBLE)
        self.dribble(channel, transport, 25)
        self.assertEqual(responses(transport), [404, 404, 408])
        self.assertTrue(transport.disconnecting)

    def head_deadlines(self) -> list:
        """The pending head deadlines on the clock (the idle timeout's call left out)."""
        return [
            call
            for call in self.clock.getDelayedCalls()
            if getattr(call.func, "__name__", "") == "_headTooSlow"
        ]

    def test_whole_head_arms_no_deadline(self):
        """A head that arrives in one read is answered without a head DelayedCall ever made."""
        channel, transport = connect(self.server)
        made = []
        real = channel.callLater
        channel.callLater = lambda *a, **kw: made.append(a[1]) or real(*a, **kw)
        for _ in range(3):
            channel.dataReceived(b"GET /upload/missing HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertEqual(responses(transport), [404, 404, 404])
        self.assertNotIn(channel._headTooSlow, made)
        self.assertEqual(self.head_deadlines(), [])

    def test_dribbled_head_after_whole_ones(self):
        """After heads that came whole, a kept-alive head split across reads still gets 408."""
        channel, transport = connect(self.server)
        channel.dataReceived(b"GET /upload/missing HTTP/1.1\r\nHost: x\r\n\r\n")
        self.clock.advance(5)
        channel.dataReceived(DRIBBLE)
        self.assertEqual(len(self.head_deadlines()), 1)
        self.dribble(channel, transport, 15)
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertEqual(responses(transport), [404, 408])
        self.assertTrue(transport.disconnecting)

    def test_bytes_after_408_ignored(self):
        """Once the 408 is out, further bytes are not parsed into a request."""
        channel, transport = connect(self.server)
        channel.dataReceived(DRIBBLE)
        self.clock.advance(20)
        channel.dataReceived(b"a\r\n\r\n")
        self.assertEqual(responses(transport), [408])

    def test_slow_body_not_cut(self):
        """A valid upload whose body takes 60 s (a byte every 5 s) is stored: only heads count."""
        body = b"0123456789AB"
        channel, transport = connect(self.server)
        channel.dataReceived(put_head("slow.bin", len(body), v_query("slow.bin", len(body))))
        for byte in body:
            self.clock.advance(5)
            channel.dataReceived(bytes([byte]))
        self.assertEqual(responses(transport), [201])
        with open(os.path.join(self.root, "slow.bin"), "rb") as f:
            self.assertEqual(f.read(), body)

    def test_pipelined_head_timed_from_response_end(self):
        """A head that arrived during the previous request starts its time when that ends."""
        slow = _SlowPutStore(self.clock, delay=30)
        store = FailoverStore(slow, clock=self.clock, healthInterval=0, timeout=60)
        store.start()
        self.server.fs.metadata = store
        channel, transport = connect(self.server)
        # The whole upload, then the start of the next head, in one packet.
        channel.dataReceived(put_head("p.bin", 1, v_query("p.bin", 1)) + b"x" + DRIBBLE)
        self.clock.advance(29)
        self.assertEqual(responses(transport), [])
        self.clock.advance(1)  # the record is written: 201, and the next head's time starts
        self.assertEqual(responses(transport), [201])
        self.clock.advance(19.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertEqual(responses(transport), [201, 408])

    def test_deadline_cancelled_on_disconnect(self):
        """A client that goes away mid-head leaves no timer behind."""
        channel, _ = connect(self.server)
        channel.dataReceived(DRIBBLE)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class _SlowPutStore(MemoryStore):
    """A MemoryStore whose writes take `delay` seconds on a Clock."""

    def __init__(self, clock, delay: float) -> None:
        super().__init__()
        self.clock, self.delay = clock, delay

    def put(self, record):
        d = Deferred()
        self.clock.callLater(self.delay, lambda: d.callback(None))
        return d.addCallback(lambda _: super(_SlowPutStore, self).put(record))


class LocalAddressTests(SynchronousTestCase):
    """The connection's own address, which twisted.web asks for every request."""

    def test_asked_of_the_transport_once(self):
        """Three requests on one connection ask the transport for its address once."""
        server = MemoryServer(self.mktemp())
        channel, transport = server.connect()
        asked = []
        realGetHost = transport.getHost
        transport.getHost = lambda: (asked.append(1), realGetHost())[1]
        for _ in range(3):
            channel.dataReceived(b"GET /upload/missing HTTP/1.1\r\nHost: x\r\n\r\n")
            server.clock.advance(0)
        self.assertEqual(transport.value().count(b"HTTP/1.1 404 "), 3)
        self.assertEqual(len(asked), 1)
        self.assertIs(channel.getHost(), channel.getHost())


class ClientCountsTests(SynchronousTestCase):
    def test_acquire_release(self):
        """Counts go up to the limit, come back down, and empty addresses leave the table."""
        counts = ClientCounts()
        self.assertEqual([counts.acquire("a", 2) for _ in range(3)], [True, True, False])
        self.assertTrue(counts.acquire("b", 2))
        counts.release("a")
        self.assertEqual(counts.held("a"), 1)
        self.assertTrue(counts.acquire("a", 2))
        for _ in range(2):
            counts.release("a")
        counts.release("b")
        self.assertEqual(counts._counts, {})
        self.assertTrue(all(counts.acquire("c", 0) for _ in range(1000)), "0 is no limit")

    def test_counted_client(self):
        """Only requests through a trusted proxy for an untrusted client are counted."""
        trusted = parse_networks(["10.0.0.0/8"])
        table = [
            ("192.0.2.1", [b"198.51.100.7"], trusted, None),  # direct: counted at accept
            ("10.0.0.1", [b"198.51.100.7"], trusted, "198.51.100.7"),
            ("10.0.0.1", [b"198.51.100.7, 10.0.0.2"], trusted, "198.51.100.7"),
            ("10.0.0.1", None, trusted, None),  # the proxy's own request
            ("10.0.0.1", [b"10.0.0.3"], trusted, None),  # only proxies on the way
            ("10.0.0.1", [b"garbage"], trusted, None),  # no client named: not the proxy's fault
            ("10.0.0.1", [b"::ffff:198.51.100.7"], trusted, "198.51.100.7"),
            ("10.0.0.1", [b"198.51.100.7"], (), None),
        ]
        for peer, forwarded, networks, expected in table:
            self.assertEqual(counted_client(peer, forwarded, networks), expected, (peer, forwarded))


class AcceptCapTests(SynchronousTestCase):
    """MaxConnectionsPerClient at accept, for peers that are not trusted proxies."""

    def setUp(self):
        self.server = MemoryServer(self.mktemp(), max_connections_per_client=2)

    def refusals(self) -> float:
        return sample(
            self.server, "hmac_file_server_connections_refused_total", reason="per_client"
        )

    def test_past_cap_closed_at_once(self):
        """The third connection of an address is aborted on accept; other addresses go on."""
        a = IPv4Address("TCP", "192.0.2.1", 1000)
        kept = [connect(self.server, a) for _ in range(2)]
        self.assertFalse(any(t.disconnecting for _, t in kept))
        _, refused = connect(self.server, a)
        self.assertTrue(refused.disconnected, "aborted")
        self.assertEqual(refused.value(), b"")
        self.assertEqual(self.refusals(), 1)
        self.assertEqual(self.server.site.openConnections, 2)
        _, other = connect(self.server, IPv4Address("TCP", "192.0.2.2", 1000))
        self.assertFalse(other.disconnecting)

    def test_closed_connection_frees_its_place(self):
        """When one of the connections ends, the address may connect again."""
        a = IPv4Address("TCP", "192.0.2.1", 1000)
        (first, _), _ = connect(self.server, a), connect(self.server, a)
        first.connectionLost(Failure(ConnectionDone()))
        _, again = connect(self.server, a)
        self.assertFalse(again.disconnecting)
        self.assertEqual(self.refusals(), 0)

    def test_mapped_ipv4_is_the_same_client(self):
        """::ffff:192.0.2.1 on a dual-stack listener counts with 192.0.2.1."""
        connect(self.server, IPv4Address("TCP", "192.0.2.1", 1000))
        connect(self.server, IPv6Address("TCP", "::ffff:192.0.2.1", 1001))
        _, refused = connect(self.server, IPv6Address("TCP", "::ffff:192.0.2.1", 1002))
        self.assertTrue(refused.disconnected)

    def test_unix_socket_not_capped(self):
        """A Unix socket peer has no address to count: never refused."""
        for _ in range(5):
            protocol = self.server.site.buildProtocol(UNIXAddress(None))
            self.assertIsInstance(protocol, GuardedChannel)

    def test_zero_is_no_cap(self):
        """MaxConnectionsPerClient = 0: any number of connections from one address."""
        self.server.fs.max_connections_per_client = 0
        transports = [connect(self.server)[1] for _ in range(20)]
        self.assertFalse(any(t.disconnecting for t in transports))

    def test_trusted_proxy_not_capped_at_accept(self):
        """The proxy's own address carries everybody: it is never refused at accept."""
        self.server.fs.trusted_proxies = parse_networks(["127.0.0.1"])
        transports = [connect(self.server)[1] for _ in range(10)]
        self.assertFalse(any(t.disconnecting for t in transports))
        self.assertEqual(self.refusals(), 0)


class ForwardedCapTests(SynchronousTestCase):
    """Through a trusted proxy, requests in progress are counted per forwarded client."""

    def setUp(self):
        self.root = self.mktemp()
        self.server = MemoryServer(
            self.root,
            max_connections_per_client=2,
            trusted_proxies=parse_networks(["127.0.0.1"]),
        )

    def start_upload(self, name: str, client: str | None, size: int = 10):
        channel, transport = connect(self.server)
        forwarded = (f"X-Forwarded-For: {client}",) if client else ()
        channel.dataReceived(put_head(name, size, v_query(name, size), forwarded))
        return channel, transport

    def test_third_upload_of_a_client_refused(self):
        """Two uploads in progress for one client: its third gets 429 and Connection: close."""
        first = self.start_upload("a.bin", "198.51.100.1")
        self.start_upload("b.bin", "198.51.100.1")
        refused, transport = self.start_upload("c.bin", "198.51.100.1")
        self.assertEqual(status(transport), 429)
        self.assertIn(b"Connection: close", transport.value())
        refused.dataReceived(b"x" * 10)  # a small body is read and dropped, then the close
        self.assertTrue(transport.disconnecting)
        self.assertEqual(
            sample(self.server, "hmac_file_server_connections_refused_total", reason="per_client"),
            1,
        )
        self.assertEqual(
            sample(self.server, "hmac_file_server_upload_errors_total", reason="per_client"), 1
        )
        self.assertNotIn("c.bin", store_files(self.root))
        # Another client through the same proxy, and the proxy's own requests, go on.
        _, other = self.start_upload("d.bin", "198.51.100.2")
        _, own = self.start_upload("e.bin", None)
        self.assertEqual((other.value(), own.value()), (b"", b""))
        # Once the first upload is done, the client may start another.
        first[0].dataReceived(b"x" * 10)
        self.assertEqual(status(first[1]), 201)
        _, again = self.start_upload("f.bin", "198.51.100.1")
        self.assertEqual(again.value(), b"")

    def test_lost_request_frees_its_place(self):
        """A forwarded upload whose connection breaks no longer counts."""
        first, _ = self.start_upload("a.bin", "198.51.100.1")
        self.start_upload("b.bin", "198.51.100.1")
        first.connectionLost(Failure(ConnectionDone()))
        _, transport = self.start_upload("c.bin", "198.51.100.1")
        self.assertEqual(transport.value(), b"")

    def test_get_counted_too(self):
        """Downloads count while they last; a finished one frees its place at once."""
        for _ in range(5):
            channel, transport = connect(self.server)
            channel.dataReceived(
                request_head("GET", "/upload/missing", 0, ("X-Forwarded-For: 198.51.100.1",))
            )
            self.assertEqual(status(transport), 404)
        self.assertEqual(self.server.fs.clients.held("198.51.100.1"), 0)


class BodyRateFloorTests(SynchronousTestCase):
    """The floor's arithmetic on a Clock."""

    def setUp(self):
        self.clock = Clock()
        self.received = 0
        self.cuts: list[tuple[int, float]] = []
        self.floor = BodyRateFloor(
            100, 30, self.clock, lambda: self.received, lambda n, s: self.cuts.append((n, s))
        )

    def test_each_window_judged(self):
        """Enough in the first window, too little in the second: cut at 60 s, with the figures."""
        self.received = 3000
        self.clock.advance(30)
        self.assertEqual(self.cuts, [])
        self.received += 2999
        self.clock.advance(30)
        self.assertEqual(self.cuts, [(2999, 30.0)])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_server_pauses_not_counted(self):
        """25 s of a window paused by the server: 5 s of the client's at 100 B/s suffice."""
        self.clock.advance(2)
        self.floor.pause()
        self.clock.advance(25)
        self.floor.resume()
        self.received = 500
        self.clock.advance(3)
        self.assertEqual(self.cuts, [])
        # A pause that spans the window's end counts in both windows.
        self.floor.pause()
        self.clock.advance(30)
        self.clock.advance(20)
        self.floor.resume()
        self.received += 1000
        self.clock.advance(10)
        self.assertEqual(self.cuts, [])
        self.clock.advance(30)
        self.assertEqual(self.cuts, [(0, 30.0)])

    def test_stop(self):
        """A stopped floor judges nothing and leaves no timer."""
        self.floor.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class SlowBodyTests(SynchronousTestCase):
    """MinUploadBytesPerSecond on real uploads at the protocol level."""

    def setUp(self):
        self.root = self.mktemp()
        self.server = MemoryServer(
            self.root, min_upload_bytes_per_second=100, min_upload_rate_window=30
        )
        self.clock = self.server.clock

    def test_slow_body_cut_and_counted_aborted(self):
        """10 B every 5 s against a 100 B/s floor: cut at 30 s, temp file gone, 'aborted'."""
        channel, transport = connect(self.server)
        # Larger than the write buffer: its temp (and directory) are made at the headers.
        channel.dataReceived(put_head("s/slow.bin", 100_000, v_query("s/slow.bin", 100_000)))
        self.assertEqual(store_files(self.root), ["s"])  # the temp has no name, or a dot one
        for _ in range(5):
            self.clock.advance(5)
            channel.dataReceived(b"x" * 10)
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnected)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnected, "aborted")
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(store_files(self.root), [])
        self.assertEqual(
            sample(self.server, "hmac_file_server_upload_errors_total", reason="aborted"), 1
        )
        self.assertEqual(
            sample(self.server, "hmac_file_server_connections_cut_total", reason="slow_upload"), 1
        )
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_steady_body_kept(self):
        """A body above the floor's rate, over several windows, is stored."""
        size = 120 * 95
        channel, transport = connect(self.server)
        channel.dataReceived(put_head("ok.bin", size, v_query("ok.bin", size)))
        for _ in range(95):
            self.clock.advance(1)
            channel.dataReceived(b"y" * 120)
        self.assertEqual(responses(transport), [201])
        floors = [c for c in self.clock.getDelayedCalls() if c.func.__name__ == "_judge"]
        self.assertEqual(floors, [], "the floor stops with the body")

    def test_throttled_body_not_cut(self):
        """MaxBytesPerSecond far below the floor: our own pauses are not held against the client."""
        self.server.fs.min_upload_bytes_per_second = 100_000
        self.server.fs.max_bytes_per_second = 2000
        size = 200_000
        body = b"z" * size
        channel, transport = connect(self.server)
        channel.dataReceived(put_head("t.bin", size, v_query("t.bin", size)))
        sent = 0
        while sent < size and not transport.disconnecting and self.clock.seconds() < 1000:
            # A client that sends whenever it is let: the throttle alone sets the pace.
            if transport.producerState == "producing":
                channel.dataReceived(body[sent : sent + 16384])
                sent += 16384
            else:
                self.clock.advance(1)
        self.assertGreater(self.clock.seconds(), 60)
        self.assertEqual(responses(transport), [201])
        self.assertEqual(
            sample(self.server, "hmac_file_server_connections_cut_total", reason="slow_upload"), 0
        )

    def test_disk_pause_not_cut(self):
        """Reading paused while a slow disk catches up is not held against the client."""
        self.server.fs.min_upload_bytes_per_second = 200_000  # 6 MB a window

        def slow_disk(work):
            # Every batch of writes (and the commit) takes 25 s.
            d = Deferred()
            self.clock.callLater(25, lambda: d.callback(work()))
            return d

        self.server.fs.blocking = slow_disk
        size = 12 * 2**20
        channel, transport = connect(self.server)
        channel.dataReceived(put_head("disk.bin", size, v_query("disk.bin", size)))
        sent, chunk = 0, 64 * 1024
        paused = 0
        while sent < size and not transport.disconnecting and paused < 1000:
            if transport.producerState == "producing":
                channel.dataReceived(b"d" * min(chunk, size - sent))
                sent += chunk
            else:
                paused += 1
                self.clock.advance(1)
        for _ in range(100):
            if responses(transport):
                break
            self.clock.advance(1)
        self.assertGreater(paused, 60, "reading was held back for more than two windows")
        self.assertEqual(responses(transport), [201])
        self.assertEqual(
            sample(self.server, "hmac_file_server_connections_cut_total", reason="slow_upload"), 0
        )

    def test_off_by_default(self):
        """Without MinUploadBytesPerSecond, a trickle is only the idle timeout's business."""
        self.server.fs.min_upload_bytes_per_second = 0
        channel, transport = connect(self.server)
        channel.dataReceived(put_head("t.bin", 100, v_query("t.bin", 100)))
        for _ in range(50):
            self.clock.advance(30)
            channel.dataReceived(b"t")
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"t" * 50)
        self.assertEqual(responses(transport), [201])


class ConfigTests(SynchronousTestCase):
    def parse(self, text: str) -> Config:
        return parse_config(tomllib.loads(text), "t.toml")

    def test_defaults(self):
        """HeaderTimeout 20 s, 100 connections a client, no rate floor, 30 s window."""
        config = Config()
        self.assertEqual(
            (
                config.header_timeout,
                config.max_connections_per_client,
                config.min_upload_bytes_per_second,
                config.min_upload_rate_window,
            ),
            (20, 100, 0, 30),
        )

    def test_keys(self):
        """The four keys parse: durations, an integer, a size."""
        config = self.parse(
            'HeaderTimeout = "1m"\nMaxConnectionsPerClient = 0\n'
            'MinUploadBytesPerSecond = "1KB"\nMinUploadRateWindow = 10\n'
        )
        self.assertEqual(
            (
                config.header_timeout,
                config.max_connections_per_client,
                config.min_upload_bytes_per_second,
                config.min_upload_rate_window,
            ),
            (60, 0, 1024, 10),
        )

    def test_errors(self):
        """Negative or mistyped values, and a floor over no window, name their key."""
        for text, key in (
            ("HeaderTimeout = -1", "HeaderTimeout"),
            ('MaxConnectionsPerClient = "many"', "MaxConnectionsPerClient"),
            ("MaxConnectionsPerClient = -5", "MaxConnectionsPerClient"),
            ("MinUploadBytesPerSecond = -1", "MinUploadBytesPerSecond"),
            ("MinUploadBytesPerSecond = 100\nMinUploadRateWindow = 0", "MinUploadRateWindow"),
        ):
            with self.assertRaises(ConfigError) as caught:
                self.parse(text)
            self.assertTrue(str(caught.exception).startswith(f"t.toml: {key}:"), text)
        self.assertEqual(self.parse("MinUploadRateWindow = 0").min_upload_rate_window, 0)

    def test_readme_table_lists_every_key(self):
        """README.rst's configuration table has a row for every key."""
        with open(README, encoding="utf-8") as f:
            rows = {line.split("``")[1] for line in f if line.startswith("``") and "``" in line[2:]}
        self.assertEqual(sorted(set(KEYS) - rows), [])

    def test_build_service_passes_them_on(self):
        """build_service gives the FileServer the four values."""
        from tests.support import memory_metadata
        from tests.test_tap import _MemoryReactorWithThreads

        reactor = _MemoryReactorWithThreads()
        store = os.path.abspath(self.mktemp())
        os.makedirs(store)
        config = Config(
            store_dir=store,
            header_timeout=7,
            max_connections_per_client=3,
            min_upload_bytes_per_second=50,
            min_upload_rate_window=12,
        )
        top = tap.build_service(config, b"s" * 32, reactor, metadata=memory_metadata(reactor))
        fs = top.fileServer
        self.assertEqual(
            (
                fs.header_timeout,
                fs.max_connections_per_client,
                fs.min_upload_bytes_per_second,
                fs.min_upload_rate_window,
            ),
            (7, 3, 50, 12),
        )


class RealSocketTests(TestCase):
    """Over 127.0.0.1: the dribbler is dropped, and connections past the cap are closed."""

    timeout = 30

    def test_dribbling_connection_dropped(self):
        """A head dribbled a byte every 0.3 s is answered 408 and closed after HeaderTimeout."""
        from twisted.internet.threads import deferToThread

        server = LoopbackServer(self, header_timeout=1)

        def dribble():
            sock = socket.create_connection((server.host, server.portNumber), timeout=0.3)
            started, data = time.monotonic(), b""
            try:
                sock.sendall(DRIBBLE)
                while time.monotonic() - started < 10:
                    try:
                        chunk = sock.recv(4096)
                    except TimeoutError:
                        try:
                            sock.sendall(b"a")  # a byte every 0.3 s
                        except OSError:
                            break
                        continue
                    except ConnectionResetError:
                        break
                    if not chunk:
                        break
                    data += chunk
                return data, time.monotonic() - started
            finally:
                sock.close()

        def check(result):
            data, elapsed = result
            self.assertTrue(data.startswith(b"HTTP/1.1 408 "), data)
            self.assertTrue(0.9 <= elapsed < 3, elapsed)

        return deferToThread(dribble).addCallback(check)

    @inlineCallbacks
    def test_connections_past_cap_closed(self):
        """With a cap of 3, of 6 sockets from 127.0.0.1 three are closed at once, unanswered."""
        from twisted.internet.threads import deferToThread

        server = LoopbackServer(self, max_connections_per_client=3)

        def open_six():
            socks, closed = [], 0
            try:
                for _ in range(6):
                    try:
                        socks.append(
                            socket.create_connection((server.host, server.portNumber), timeout=2)
                        )
                    except ConnectionResetError:
                        closed += 1  # aborted before connect() even returned
                for sock in socks:
                    sock.settimeout(0.5)
                    try:
                        closed += sock.recv(1) == b""
                    except TimeoutError:
                        pass  # still open, waiting for a request
                    except ConnectionResetError:
                        closed += 1
                return closed
            finally:
                for sock in socks:
                    sock.close()

        closed = yield deferToThread(open_six)
        self.assertEqual(closed, 3)
        self.assertEqual(
            server.fs.metrics.registry.get_sample_value(
                "hmac_file_server_connections_refused_total", {"reason": "per_client"}
            ),
            3,
        )


class TwistdGuardTests(TwistdHarness):
    """The limits as configured, in `twistd -n hmacfs`, over real sockets."""

    def test_config_limits_over_real_sockets(self):
        """With HeaderTimeout = 1, MaxConnectionsPerClient = 2: a 3rd socket closed, 408 at ~1 s."""
        port = _free_port()
        cfg = self.config(port, HeaderTimeout=1, MaxConnectionsPerClient=2, LogFile="hmacfs.log")
        proc = self.spawn("-n", "hmacfs", "--config", cfg)
        self.waitListening(port, proc)
        socks = []
        self.addCleanup(lambda: [s.close() for s in socks])
        for _ in range(2):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        try:
            third = socket.create_connection(("127.0.0.1", port), timeout=5)
        except ConnectionResetError:
            pass  # aborted before connect() returned: closed at once too
        else:
            socks.append(third)
            self.assertEqual(_eof(third), b"", "the third connection is closed at once")
        dribbler = socks[0]
        dribbler.settimeout(0.3)
        started, data = time.monotonic(), b""
        dribbler.sendall(DRIBBLE)
        while time.monotonic() - started < 10:
            try:
                chunk = dribbler.recv(4096)
            except TimeoutError:
                with contextlib.suppress(OSError):
                    dribbler.sendall(b"a")
                continue
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
        elapsed = time.monotonic() - started
        self.assertTrue(data.startswith(b"HTTP/1.1 408 "), data)
        self.assertTrue(0.9 <= elapsed < 4, elapsed)
        self.assertIn("MaxConnectionsPerClient", _read(os.path.join(self.cwd, "hmacfs.log")))


def _eof(sock: socket.socket) -> bytes | None:
    """b"" once the server has closed sock (EOF or reset), None if still open after 2 s."""
    sock.settimeout(2)
    try:
        return sock.recv(1)
    except ConnectionResetError:
        return b""
    except TimeoutError:
        return None
