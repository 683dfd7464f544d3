"""
Several nodes: the shared request-rate limit (RateLimitShared) on a Clock and
against the real Redis, and its configuration.
"""

from __future__ import annotations

import os
import tomllib
import uuid

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, gatherResults, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hmacd.config import Config, ConfigError, parse_config
from hmacd.store import StoreUnavailable
from hmacd.store.redis import RedisStore
from hmacd.throttle import RateLimiter, SharedRateLimiter
from tests.servers import delete_prefix
from tests.store_contract import require_service


class FakeRedis:
    """take_token answered by a RateLimiter of its own, or refused, or left hanging."""

    def __init__(self, clock: Clock, perMinute: int, burst: int) -> None:
        self.buckets = RateLimiter(perMinute, burst, clock)
        self.mode = "ok"
        self.calls = 0
        self.hanging: list[Deferred] = []

    def take_token(self, address: str, rate: float, burst: float):
        self.calls += 1
        if self.mode == "down":
            return fail(StoreUnavailable("redis 127.0.0.1:6379: connection refused"))
        if self.mode == "hang":
            d: Deferred = Deferred()
            self.hanging.append(d)
            return d
        return succeed(self.buckets.check(address))


class SharedLimiterTests(SynchronousTestCase):
    """The shared limiter's verdicts and fallback, with a fake Redis on a Clock."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)
        self.redis = FakeRedis(self.clock, 60, 3)
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def limiter(self) -> SharedRateLimiter:
        return SharedRateLimiter(60, 3, self.clock, self.redis, retry=5.0)

    def warnings(self) -> list[str]:
        return [
            e["log_format"]
            for e in self.events
            if e.get("log_level") and e["log_level"].name == "warn"
        ]

    def test_two_processes_one_bucket(self):
        """Two processes share a burst of 3: each lets one more through, then both refuse."""
        a, b = self.limiter(), self.limiter()
        verdicts = [(a if n % 2 == 0 else b).check("192.0.2.1") for n in range(8)]
        # 3 tokens, then one request past them in each process (the answer comes after it).
        self.assertEqual([v == 0 for v in verdicts], [True] * 5 + [False] * 3)
        self.assertEqual(self.redis.calls, 5)
        # Refill: a token a second.
        self.clock.advance(1.0)
        self.assertEqual(a.check("192.0.2.1"), 0)
        self.assertEqual(b.check("192.0.2.2"), 0, "another address has its own bucket")

    def test_redis_down_falls_back_once(self):
        """While Redis fails, each process counts alone; logged once down, once back."""
        a = self.limiter()
        self.redis.mode = "down"
        verdicts = [a.check("192.0.2.1") for _ in range(4)]
        self.assertEqual([v == 0 for v in verdicts], [True, True, True, False])
        self.assertFalse(a.shared)
        self.assertEqual(self.redis.calls, 1, "not asked again before the retry interval")
        self.assertEqual(len(self.warnings()), 1)
        self.redis.mode = "ok"
        self.clock.advance(5.0)
        self.assertEqual(a.check("192.0.2.9"), 0)
        self.assertTrue(a.shared)
        self.assertEqual(len(self.warnings()), 2)
        self.assertIn("answers again", self.warnings()[1])

    def test_hung_redis_never_delays(self):
        """A Redis that does not answer never holds up a verdict."""
        a = self.limiter()
        self.redis.mode = "hang"
        self.assertEqual(a.check("192.0.2.1"), 0)
        self.assertEqual(len(a.pending), 1)
        self.redis.hanging[0].errback(StoreUnavailable("no answer to rate limit within 2 s"))
        self.assertEqual(a.pending, set())
        self.assertFalse(a.shared)

    def test_retry_after(self):
        """Retry-After is whole seconds, at least 1, as for per-process buckets."""
        self.assertEqual(SharedRateLimiter.retry_after(0.2), b"1")
        self.assertEqual(SharedRateLimiter.retry_after(2.1), b"3")


class RealRedisLimiterTests(TestCase):
    """Two limiters on two connections to the real Redis share one bucket."""

    @inlineCallbacks
    def setUp(self):
        self.prefix = f"hmacfs-test-{uuid.uuid4().hex}:"
        self.stores = []
        for _ in range(2):
            store = RedisStore("127.0.0.1", 6379, reactor=reactor, prefix=self.prefix)
            try:
                yield store.start()
            except StoreUnavailable as e:
                yield store.stop()
                require_service("redis", str(e))
            self.addCleanup(store.stop)
            self.stores.append(store)
        self.addCleanup(delete_prefix, 6379, self.prefix)

    @inlineCallbacks
    def test_one_bucket(self):
        """Burst 5 at 6/min over two limiters: 5 tokens plus one answer's lag in each, then 429."""
        a, b = (SharedRateLimiter(6, 5, reactor, store) for store in self.stores)
        verdicts = []
        for n in range(10):
            limiter = a if n % 2 == 0 else b
            verdicts.append(limiter.check("198.51.100.7"))
            yield gatherResults(list(limiter.pending))
        self.assertEqual([v == 0 for v in verdicts], [True] * 7 + [False] * 3, verdicts)
        self.assertTrue(all(5 < v <= 10 for v in verdicts[7:]), verdicts)
        self.assertTrue(a.shared and b.shared)

    @inlineCallbacks
    def test_take_token(self):
        """The script takes tokens down to zero, then gives the wait until the next."""
        store = self.stores[0]
        waits = []
        for _ in range(3):
            waits.append((yield store.take_token("203.0.113.1", 0.5, 2.0)))
        self.assertEqual(waits[:2], [0.0, 0.0])
        self.assertTrue(1.9 < waits[2] <= 2.0, waits)
        self.assertEqual((yield self.stores[1].take_token("203.0.113.2", 0.5, 2.0)), 0.0)


class SharedLimitConfigTests(SynchronousTestCase):
    """RateLimitShared in the configuration."""

    def parse(self, text: str) -> Config:
        return parse_config(tomllib.loads(text), "t.toml")

    def test_needs_redis(self):
        """RateLimitShared without RedisAddr is refused, naming the key."""
        with self.assertRaises(ConfigError) as caught:
            self.parse("RateLimitShared = true\nRateLimitPerMinute = 60\n")
        self.assertIn("RateLimitShared", str(caught.exception))
        self.assertIn("needs RedisAddr", str(caught.exception))

    def test_workers_allowed_when_shared(self):
        """With shared buckets, RateLimitPerMinute goes with Workers > 1; without, it does not."""
        text = 'Workers = 2\nRateLimitPerMinute = 60\nRedisAddr = "127.0.0.1:6379"\n'
        config = self.parse(text + "RateLimitShared = true\n")
        self.assertEqual((config.workers, config.rate_limit_shared), (2, True))
        with self.assertRaises(ConfigError):
            self.parse(text)
        with self.assertRaises(ConfigError):
            self.parse(text + 'RateLimitShared = true\nMaxTotalBytesPerSecond = "1MB"\n')

    def test_node_name(self):
        """NodeName is read as given; empty by default (host:pid is used then)."""
        self.assertEqual(self.parse('NodeName = "up-1"\n').node_name, "up-1")
        self.assertEqual(self.parse("").node_name, "")


class HealthCheckTests(SynchronousTestCase):
    """The load balancer's health check in README: a cheap OPTIONS that answers 200."""

    def test_options_answers_200(self):
        """OPTIONS on the upload space answers 200 with no body, touching no store or file."""
        from tests.support import MemoryServer

        server = MemoryServer(self.mktemp())
        channel, transport = server.connect()
        channel.dataReceived(b"OPTIONS /upload/ HTTP/1.1\r\nHost: up\r\n\r\n")
        head = transport.value().split(b"\r\n\r\n", 1)[0]
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head)


class RateLimiterChoiceTests(SynchronousTestCase):
    """rate_limiter(config, clock, metadata): which limiter a configuration gets."""

    def test_choice(self):
        """None without a rate, per-process buckets by default, Redis's with RateLimitShared."""
        from hmacd.store.failover import FailoverStore
        from hmacd.throttle import rate_limiter

        clock = Clock()
        redis = RedisStore("127.0.0.1", 6379, reactor=clock)
        metadata = FailoverStore(redis, clock=clock, healthInterval=0)
        self.assertIsNone(rate_limiter(Config(), clock, metadata))
        local = rate_limiter(Config(rate_limit_per_minute=60), clock, metadata)
        self.assertIsInstance(local, RateLimiter)
        shared = rate_limiter(
            Config(rate_limit_per_minute=60, rate_limit_shared=True, redis_addr="127.0.0.1:6379"),
            clock,
            metadata,
        )
        self.assertIsInstance(shared, SharedRateLimiter)
        self.assertIs(shared.store, redis)
        self.assertEqual((shared.rate, shared.burst), (1.0, 60.0))


class ClusterExampleTests(SynchronousTestCase):
    """examples/cluster: two node configs that load, and share what nodes must share."""

    # What may differ between nodes (README "Several nodes").
    OWN = {
        "ListenPort",
        "MetricsPort",
        "MetricsEnabled",
        "NodeName",
        "StoreDir",
        "Workers",
        "LogFile",
    }

    def test_nodes_share_what_they_must(self):
        from hmacd.config import load_config

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        configs, tables = [], []
        for name in ("node-a.toml", "node-b.toml"):
            path = os.path.join(here, "examples", "cluster", name)
            configs.append(load_config(path))
            with open(path, "rb") as f:
                tables.append(tomllib.load(f))
        a, b = tables
        self.assertEqual(set(a), set(b))
        differ = {key for key in a if a[key] != b[key]}
        self.assertLessEqual(differ, self.OWN)
        self.assertIn("NodeName", differ)
        for config in configs:
            self.assertEqual(config.storage_backend, "s3")
            self.assertTrue(config.redis_addr and config.rate_limit_shared)
        self.assertNotIn("Secret", a)  # from the environment, never in a shared file
