"""
Request-rate limiting: token buckets on a Clock, X-Forwarded-For trust,
and 429 over the wire.
"""

from __future__ import annotations

import time

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hmacd.throttle import Bandwidth, RateLimiter, client_address, parse_networks
from tests.support import LoopbackServer, MemoryServer, store_files, v_query
from tests.test_http import raw_request
from tests.test_upload import put_head, request_head, status


class RateLimiterTests(SynchronousTestCase):
    def test_burst_then_rate(self):
        """A full bucket allows the burst; then one request per 60/perMinute seconds."""
        clock = Clock()
        limiter = RateLimiter(perMinute=60, burst=3, clock=clock)
        self.assertEqual([limiter.check("a") for _ in range(3)], [0, 0, 0])
        self.assertAlmostEqual(limiter.check("a"), 1.0)
        clock.advance(0.5)
        # A refused request takes no token: half a token has grown back.
        self.assertAlmostEqual(limiter.check("a"), 0.5)
        clock.advance(2.0)
        self.assertEqual(limiter.check("a"), 0)

    def test_addresses_are_independent(self):
        """One client's bucket does not drain another's."""
        limiter = RateLimiter(perMinute=60, burst=1, clock=Clock())
        self.assertEqual(limiter.check("a"), 0)
        self.assertGreater(limiter.check("a"), 0)
        self.assertEqual(limiter.check("b"), 0)

    def test_burst_defaults_to_rate(self):
        """Without a burst, a client may spend a minute's worth at once."""
        limiter = RateLimiter(perMinute=5, burst=0, clock=Clock())
        self.assertEqual([limiter.check("a") == 0 for _ in range(6)], [True] * 5 + [False])

    def test_client_table_is_bounded(self):
        """At most maxClients buckets are kept; the least recently used goes."""
        limiter = RateLimiter(perMinute=60, burst=1, clock=Clock(), maxClients=2)
        for address in ("a", "b", "c"):
            limiter.check(address)
        self.assertEqual(list(limiter._buckets), ["b", "c"])
        self.assertEqual(limiter.check("a"), 0)  # forgotten: a full bucket again

    def test_retry_after(self):
        """Retry-After is whole seconds, rounded up, at least 1."""
        self.assertEqual(
            [RateLimiter.retry_after(w) for w in (0.01, 1.0, 1.2, 59.5)],
            [b"1", b"1", b"2", b"60"],
        )


class ClientAddressTests(SynchronousTestCase):
    def test_table(self):
        """X-Forwarded-For counts only from trusted proxies, read right to left."""
        trusted = parse_networks(["127.0.0.1", "10.0.0.0/8"])
        cases = [
            ("203.0.113.5", [b"198.51.100.7"], (), "203.0.113.5"),
            ("203.0.113.5", [b"198.51.100.7"], trusted, "203.0.113.5"),
            ("127.0.0.1", None, trusted, "127.0.0.1"),
            ("127.0.0.1", [b"198.51.100.7"], trusted, "198.51.100.7"),
            ("127.0.0.1", [b"1.1.1.1, 198.51.100.7, 10.1.2.3"], trusted, "198.51.100.7"),
            ("127.0.0.1", [b"1.1.1.1", b"198.51.100.7"], trusted, "198.51.100.7"),
            ("127.0.0.1", [b"10.0.0.1, 10.0.0.2"], trusted, "127.0.0.1"),
            ("127.0.0.1", [b"not-an-ip"], trusted, "127.0.0.1"),
            ("::ffff:127.0.0.1", [b"2001:db8::1"], trusted, "2001:db8::1"),
        ]
        for peer, header, networks, expected in cases:
            self.assertEqual(client_address(peer, header, networks), expected, (peer, header))


class LimitedServerTests(SynchronousTestCase):
    """The limit at the protocol level: the verdict comes before anything else."""

    def setUp(self):
        self.server = MemoryServer(self.mktemp())
        self.server.fs.limiter = RateLimiter(perMinute=60, burst=2, clock=self.server.clock)

    def sample(self, name, labels=None):
        return self.server.fs.metrics.registry.get_sample_value(name, labels or {})

    def test_429_with_retry_after(self):
        """Past the burst, any request gets 429 and Retry-After; the counter counts it."""
        codes = []
        for _ in range(3):
            channel, transport = self.server.connect()
            channel.dataReceived(request_head("GET", "/upload/nothing", 0))
            codes.append(status(transport))
        self.assertEqual(codes, [404, 404, 429])
        self.assertIn(b"Retry-After: 1", transport.value())
        self.assertEqual(self.sample("hmac_file_server_rate_limited_total"), 1)

    def test_limited_upload_writes_nothing(self):
        """A rate-limited PUT is refused before its body and counted as an upload error."""
        for n in range(3):
            channel, transport = self.server.connect()
            channel.dataReceived(put_head(f"f{n}.bin", 1, v_query(f"f{n}.bin", 1)) + b"x")
        self.assertEqual(status(transport), 429)
        self.assertEqual(
            self.sample("hmac_file_server_upload_errors_total", {"reason": "rate_limited"}), 1
        )

    def test_forwarded_clients_counted_apart(self):
        """Behind a trusted proxy, each forwarded client has its own bucket."""
        self.server.fs.trusted_proxies = parse_networks(["127.0.0.1"])
        codes = []
        for client in ("198.51.100.1", "198.51.100.1", "198.51.100.2", "198.51.100.1"):
            channel, transport = self.server.connect()
            channel.dataReceived(
                request_head("GET", "/upload/x", 0, (f"X-Forwarded-For: {client}",))
            )
            codes.append(status(transport))
        self.assertEqual(codes, [404, 404, 404, 429])


class LoopbackLimitTests(TestCase):
    @inlineCallbacks
    def test_loopback_not_exempt(self):
        """Over a real socket from 127.0.0.1, the limit applies like anywhere else."""
        server = LoopbackServer(self)
        from twisted.internet import reactor

        server.fs.limiter = RateLimiter(perMinute=60, burst=1, clock=reactor)
        first = yield deferToThread(raw_request, server, "GET", "/upload/a")
        second = yield deferToThread(raw_request, server, "GET", "/upload/a")
        self.assertEqual((first.code, second.code), (404, 429))
        self.assertEqual(second.headers["retry-after"], "1")


class BandwidthTests(SynchronousTestCase):
    def test_budget_and_debt(self):
        """Spending past the budget gives the pause that brings it back to zero."""
        clock = Clock()
        bucket = Bandwidth(rate=1000, clock=clock, burst=500)
        self.assertEqual(bucket.take(500), 0)
        self.assertAlmostEqual(bucket.take(1000), 1.0)
        clock.advance(1.0)
        self.assertAlmostEqual(bucket.take(250), 0.25)
        clock.advance(10)
        self.assertEqual(bucket.take(500), 0)  # refilled, but never past the burst
        self.assertAlmostEqual(bucket.take(1), 0.001)

    def test_default_burst(self):
        """The burst is a tenth of a second's worth, at least one 64 KiB read."""
        self.assertEqual(Bandwidth(10 * 2**20, Clock()).burst, 2**20)
        self.assertEqual(Bandwidth(1000, Clock()).burst, 65536)


class ThrottledUploadTests(SynchronousTestCase):
    """MaxBytesPerSecond pauses the transport, on a Clock, and nothing else changes."""

    def test_pause_and_resume(self):
        """Ahead of the rate the transport is paused for just the deficit, then resumed."""
        server = MemoryServer(self.mktemp())
        server.fs.max_bytes_per_second = 100_000
        channel, transport = server.connect()
        body = b"x" * 200_000
        channel.dataReceived(put_head("slow.bin", len(body), v_query("slow.bin", len(body))))
        channel.dataReceived(body[:60_000])
        self.assertEqual(transport.producerState, "producing")
        channel.dataReceived(body[60_000:100_000])
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(channel.timeOut, None, "no idle timeout during a deliberate pause")
        server.clock.advance(0.34)  # 100,000 - 65,536 bytes of debt at 100,000/s
        self.assertEqual(transport.producerState, "paused")
        server.clock.advance(0.01)
        self.assertEqual(transport.producerState, "producing")
        self.assertIsNotNone(channel.timeOut)
        channel.dataReceived(body[100_000:])
        server.clock.advance(2)
        self.assertEqual(status(transport), 201)

    def test_total_cap_shared(self):
        """MaxTotalBytesPerSecond: one upload's bytes delay another's."""
        server = MemoryServer(self.mktemp())
        server.fs.total_bandwidth = Bandwidth(100_000, server.clock, burst=65_536)
        first, firstTransport = server.connect()
        second, secondTransport = server.connect()
        first.dataReceived(put_head("a.bin", 100_000, v_query("a.bin", 100_000)))
        second.dataReceived(put_head("b.bin", 100_000, v_query("b.bin", 100_000)))
        first.dataReceived(b"a" * 60_000)
        second.dataReceived(b"b" * 10_000)
        self.assertEqual(
            (firstTransport.producerState, secondTransport.producerState), ("producing", "paused")
        )

    def test_disconnect_while_paused(self):
        """A client lost during a pause leaves no file and no pending resume."""
        server = MemoryServer(self.mktemp())
        server.fs.max_bytes_per_second = 1000
        channel, transport = server.connect()
        channel.dataReceived(put_head("p.bin", 100_000, v_query("p.bin", 100_000)) + b"x" * 70_000)
        self.assertEqual(transport.producerState, "paused")
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(server.clock.getDelayedCalls(), [])
        self.assertEqual(store_files(server.fs.store_dir), [])


class RealRateTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_one_mib_per_second(self):
        """Over a real socket, a 1 MiB/s limit gives 1 MiB/s within 10%."""
        server = LoopbackServer(self)
        server.fs.max_bytes_per_second = 2**20
        size = 3 * 2**20
        body = b"r" * size

        def upload():
            started = time.monotonic()
            response = raw_request(server, "PUT", "/upload/r.bin?" + v_query("r.bin", size), body)
            return response.code, time.monotonic() - started

        code, elapsed = yield deferToThread(upload)
        self.assertEqual(code, 201)
        rate = size / elapsed / 2**20
        self.assertTrue(0.9 <= rate <= 1.1, f"{rate:.3f} MiB/s")
