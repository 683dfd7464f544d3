"""
RedisStore against real servers: the store contract on the shared Redis and on
a private password-protected redis-server in database 3, then faults on
private servers (wrong password, nothing listening, killed, restarted, hung).
"""

from __future__ import annotations

import time
import uuid

from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from hmacd.config import Config
from hmacd.store import StoreUnavailable
from hmacd.store.redis import RedisStore, parse_redis_addr
from tests.servers import RawRedis, RedisServer, delete_prefix, free_port
from tests.store_contract import (
    AdminContract,
    QuotaContract,
    SharedContract,
    StoreContract,
    record,
    require_service,
)

SHARED_PORT = 6379
# Short deadlines keep the fault tests fast; SLACK is what a busy machine adds.
TIMEOUT = 0.5
CONNECT_TIMEOUT = 1.0
SLACK = 1.0
# How long a restarted server may take to be used again: txredisapi retries
# after about 1 s, then e s, e**2 s... capped at 10 s.
RECOVERY = 12.0


class Dropper(protocol.Protocol):
    """Accepts a connection and drops it at once, as a restarting server or proxy may."""

    def connectionMade(self) -> None:
        self.factory.dropped += 1
        self.transport.abortConnection()


def prefix() -> str:
    return f"hmacfs-test-{uuid.uuid4().hex}:"


@inlineCallbacks
def assertUnavailable(testCase: TestCase, d: Deferred, within: float):
    """d fails with StoreUnavailable in under `within` seconds; returns the exception."""
    started = time.monotonic()
    # The guard only keeps a hanging store from hanging the test.
    d.addTimeout(within + 5, reactor)
    try:
        yield d
    except StoreUnavailable as e:
        elapsed = time.monotonic() - started
        testCase.assertLess(elapsed, within, f"failed after {elapsed:.2f}s: {e}")
        testCase.assertNotIn("\n", str(e))
        return e
    testCase.fail("the call succeeded")


@inlineCallbacks
def eventually(call, within: float):
    """Retry call() (each attempt bounded by the store's deadline) until it succeeds."""
    deadline = time.monotonic() + within
    while True:
        try:
            result = yield call()
            return result
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            yield deferLater(reactor, 0.2, lambda: None)


class SharedRedisContractTests(
    StoreContract, AdminContract, SharedContract, QuotaContract, TestCase
):
    """The store contract on the shared Redis at 127.0.0.1:6379, under a prefix per test."""

    def makeStore(self, fresh: bool = True):
        if fresh:
            self.prefix = prefix()
        store = RedisStore(
            "127.0.0.1", SHARED_PORT, reactor=reactor, prefix=self.prefix, timeout=2.0,
            connect_timeout=2.0,
        )  # fmt: skip

        def started(_):
            if fresh:
                self.addCleanup(delete_prefix, SHARED_PORT, self.prefix)
            return store

        def unreachable(failure):
            failure.trap(StoreUnavailable)
            d = store.stop()
            d.addCallback(lambda _: require_service("redis", failure.getErrorMessage()))
            return d

        return store.start().addCallbacks(started, unreachable)

    @inlineCallbacks
    def test_deletes_together(self):
        """Deletes made while one is in flight go in one script; every record goes."""
        for i in range(20):
            yield self.store.put(record(f"gone/{i}", expires=float(i)))
        scripts = []
        real = self.store._call
        self.patch(self.store, "_call", lambda what, *a: (scripts.append(what), real(what, *a))[1])
        yield gatherResults([self.store.delete(f"gone/{i}") for i in range(20)])
        self.assertEqual(scripts, ["delete", "delete"])  # one, then the 19 that waited
        self.assertEqual((yield self.store.count_expired(100.0)), 0)
        self.assertEqual((yield self.store.records(100)), [])

    @inlineCallbacks
    def test_keys(self):
        """The documented layout: a hash per file, the expiry zset and the set of paths."""
        yield self.store.put(record("k/é.txt", uploader="u@example.org", expires=7.25))
        raw = RawRedis(SHARED_PORT)
        self.addCleanup(raw.close)
        key = (self.prefix + "file:k/é.txt").encode()
        self.assertEqual(
            dict(zip(*[iter(raw.call("HGETALL", key))] * 2, strict=True)),
            {
                b"size": b"1234",
                b"content_type": b"image/jpeg",
                b"sha256": b"ab" * 32,
                b"created": b"1800000000.5",
                b"protocol": b"v2",
                b"uploader": b"u@example.org",
                b"expires": b"7.25",
            },
        )
        self.assertEqual(
            raw.call("ZRANGE", self.prefix + "expiry", 0, -1, "WITHSCORES"),
            ["k/é.txt".encode(), b"7.25"],
        )
        self.assertEqual(raw.call("SMEMBERS", self.prefix + "files"), ["k/é.txt".encode()])

    @inlineCallbacks
    def test_numbers_stay_strings(self):
        """Fields that look like numbers come back as the strings they were."""
        r = record(content_type="1e5", sha256="0123", uploader="42", protocol="007")
        yield self.store.put(r)
        self.assertEqual((yield self.store.get(r.path)), r)

    @inlineCallbacks
    def test_vanished_hash_is_dropped_from_expiry(self):
        """An expiry entry whose hash is gone is skipped by expired() and removed."""
        yield self.store.put(record("gone", expires=1.0))
        yield self.store.put(record("kept", expires=2.0))
        raw = RawRedis(SHARED_PORT)
        self.addCleanup(raw.close)
        raw.call("DEL", self.prefix + "file:gone")
        self.assertEqual([r.path for r in (yield self.store.expired(10.0, 10))], ["kept"])
        self.assertEqual(raw.call("ZRANGE", self.prefix + "expiry", 0, -1), [b"kept"])


class PrivateRedisContractTests(StoreContract, SharedContract, QuotaContract, TestCase):
    """The store contract on a private redis-server with a password, in database 3."""

    password = "contract-pässword"

    def makeStore(self, fresh: bool = True):
        if fresh:
            self.server = RedisServer(self, password=self.password)
            self.prefix = prefix()
        store = RedisStore(
            "127.0.0.1", self.server.port, password=self.password, dbid=3, reactor=reactor,
            prefix=self.prefix, timeout=2.0, connect_timeout=2.0,
        )  # fmt: skip
        return store.start().addCallback(lambda _: store)

    @inlineCallbacks
    def test_database(self):
        """Records land in database 3, not in database 0."""
        yield self.store.put(record())
        key = self.prefix + "file:a/b.txt"
        for db, expected in ((3, 1), (0, 0)):
            raw = self.server.raw(db)
            self.addCleanup(raw.close)
            self.assertEqual(raw.call("EXISTS", key), expected, f"db {db}")


class RedisFaultTests(TestCase):
    """Outages on private servers: every call fails with StoreUnavailable in time, never hangs."""

    timeout = 40

    def makeStore(self, port: int, **kwargs) -> RedisStore:
        kwargs.setdefault("timeout", TIMEOUT)
        kwargs.setdefault("connect_timeout", CONNECT_TIMEOUT)
        store = RedisStore("127.0.0.1", port, reactor=reactor, prefix=prefix(), **kwargs)
        self.addCleanup(store.stop)
        return store

    @inlineCallbacks
    def test_wrong_password(self):
        """A wrong password fails start() at once, and the message does not quote it."""
        server = RedisServer(self, password="right-horse-battery")
        store = self.makeStore(server.port, password="wrong-staple-secret")
        e = yield assertUnavailable(self, store.start(), within=TIMEOUT)
        self.assertIn("authentication failed", str(e))
        self.assertNotIn("wrong-staple-secret", str(e))
        self.assertNotIn("right-horse-battery", str(e))
        e = yield assertUnavailable(self, store.get("a"), within=TIMEOUT + SLACK)
        self.assertNotIn("wrong-staple-secret", str(e))

    @inlineCallbacks
    def test_no_password(self):
        """A password the server wants but the config lacks is StoreUnavailable too."""
        server = RedisServer(self, password="needed-one")
        store = self.makeStore(server.port)
        e = yield assertUnavailable(self, store.start(), within=TIMEOUT + SLACK)
        self.assertIn("NOAUTH", str(e))

    @inlineCallbacks
    def test_nothing_listening(self):
        """With nothing on the port, start() fails within its deadline and calls do too."""
        store = self.makeStore(free_port())
        e = yield assertUnavailable(self, store.start(), within=CONNECT_TIMEOUT + TIMEOUT + SLACK)
        self.assertIn("connection refused", str(e))
        e = yield assertUnavailable(self, store.put(record()), within=TIMEOUT + SLACK)
        self.assertIn("not connected", str(e))

    @inlineCallbacks
    def test_not_started(self):
        """Calls before start() fail with StoreUnavailable; stop() before start() is fine."""
        store = RedisStore("127.0.0.1", free_port(), reactor=reactor)
        yield assertUnavailable(self, store.get("a"), within=SLACK)
        yield store.stop()
        yield store.stop()

    @inlineCallbacks
    def test_killed(self):
        """After SIGKILL, get, put and ping fail with StoreUnavailable within the deadline."""
        server = RedisServer(self)
        store = self.makeStore(server.port)
        yield store.start()
        yield store.put(record())
        server.kill()
        yield assertUnavailable(self, store.get("a/b.txt"), within=TIMEOUT + SLACK)
        yield assertUnavailable(self, store.put(record()), within=TIMEOUT + SLACK)
        yield assertUnavailable(self, store.ping(), within=TIMEOUT + SLACK)

    @inlineCallbacks
    def test_restart_in_database_3(self):
        """A restarted server (same password, RedisDB 3) is used again, and in database 3."""
        server = RedisServer(self, password="pw-of-restart")
        store = self.makeStore(server.port, password="pw-of-restart", dbid=3)
        yield store.start()
        yield store.put(record("before"))
        server.kill()
        yield assertUnavailable(self, store.get("before"), within=TIMEOUT + SLACK)
        server.start()
        yield eventually(lambda: store.put(record("after")), within=RECOVERY)
        self.assertEqual((yield store.get("after")), record("after"))
        self.assertDatabase3(server, store, "after")

    @inlineCallbacks
    def test_handshake_dropped(self):
        """
        Reconnecting survives a connection dropped during AUTH/SELECT (txredisapi #146).
        """
        server = RedisServer(self, password="pw-of-146")
        store = self.makeStore(server.port, password="pw-of-146", dbid=3)
        yield store.start()
        server.kill()
        dropper = protocol.Factory.forProtocol(Dropper)
        dropper.dropped = 0
        listening = reactor.listenTCP(server.port, dropper, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        deadline = time.monotonic() + RECOVERY
        while not dropper.dropped and time.monotonic() < deadline:
            yield deferLater(reactor, 0.1, lambda: None)
        self.assertTrue(dropper.dropped, "the store never tried to reconnect")
        yield listening.stopListening()
        server.start()
        yield eventually(lambda: store.put(record("after")), within=RECOVERY)
        self.assertDatabase3(server, store, "after")

    def assertDatabase3(self, server: RedisServer, store: RedisStore, path: str) -> None:
        key = store.prefix + "file:" + path
        for db, expected in ((3, 1), (0, 0)):
            raw = server.raw(db)
            self.addCleanup(raw.close)
            self.assertEqual(raw.call("EXISTS", key), expected, f"db {db}")

    @inlineCallbacks
    def test_hung(self):
        """On a SIGSTOPped server calls and start() time out as StoreUnavailable; SIGCONT heals."""
        server = RedisServer(self)
        store = self.makeStore(server.port)
        yield store.start()
        yield store.put(record())
        server.pause()
        self.addCleanup(server.resume)
        for call in (lambda: store.get("a/b.txt"), lambda: store.put(record()), store.ping):
            started = time.monotonic()
            e = yield assertUnavailable(self, call(), within=TIMEOUT + SLACK)
            self.assertGreaterEqual(time.monotonic() - started, TIMEOUT - 0.05)
            self.assertIn(f"within {TIMEOUT:g} s", str(e))
        other = self.makeStore(server.port)
        yield assertUnavailable(self, other.start(), within=CONNECT_TIMEOUT + TIMEOUT + SLACK)
        server.resume()
        self.assertEqual((yield eventually(lambda: store.get("a/b.txt"), RECOVERY)), record())


class ConfigTests(TestCase):
    """RedisAddr, RedisPassword and RedisDB make the store."""

    def test_addresses(self):
        """host:port and [v6]:port parse; anything else is a ValueError."""
        self.assertEqual(parse_redis_addr("localhost:6379"), ("localhost", 6379))
        self.assertEqual(parse_redis_addr("10.0.0.1:7000"), ("10.0.0.1", 7000))
        self.assertEqual(parse_redis_addr("[::1]:6380"), ("::1", 6380))
        for bad in ("", "localhost", ":6379", "host:", "host:0", "host:65536", "host:x"):
            self.assertRaises(ValueError, parse_redis_addr, bad)

    def test_from_config(self):
        """from_config takes the address, the password (empty means none) and the database."""
        store = RedisStore.from_config(
            Config(redis_addr="[::1]:6380", redis_password="pw", redis_db=2), reactor=reactor
        )
        self.assertEqual(
            (store.host, store.port, store.password, store.dbid, store.prefix, store.where),
            ("::1", 6380, "pw", 2, "hmacfs:", "[::1]:6380"),
        )
        store = RedisStore.from_config(Config(redis_addr="127.0.0.1:6379"), reactor=reactor)
        self.assertEqual((store.password, store.dbid), (None, 0))
        self.assertEqual(store.name, "redis")


class PersistenceWarningTests(TestCase):
    """A Redis that keeps nothing on disk is named at start; one with AOF is not."""

    @inlineCallbacks
    def started(self, persist: bool) -> list[str]:
        from twisted.logger import globalLogPublisher

        server = RedisServer(self, persist=persist)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        store = RedisStore("127.0.0.1", server.port, reactor=reactor, timeout=1.0)
        yield store.start()
        yield store.stop()
        return [
            e["log_format"] for e in events if "keeps nothing on disk" in e.get("log_format", "")
        ]

    @inlineCallbacks
    def test_volatile_server_warned(self):
        """appendonly no and no save points: one warning."""
        self.assertEqual(len((yield self.started(persist=False))), 1)

    @inlineCallbacks
    def test_persistent_server_not_warned(self):
        """With AOF on: no warning."""
        self.assertEqual((yield self.started(persist=True)), [])
