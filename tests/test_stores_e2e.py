"""
The same upload/download suite on every store arrangement, against the real
servers; and the outage scenario with private Redis and PostgreSQL servers
that are killed and restarted under a running hmacfs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from io import BytesIO

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import FileBodyProducer, readBody

from hmacd.config import Config
from hmacd.store import StoreUnavailable
from hmacd.store.failover import FailoverStore
from hmacd.store.redis import RedisStore
from hmacd.store.sql import SQLStore
from hmacd.tap import build_metadata
from tests.servers import PrivatePostgres, RedisServer, delete_prefix
from tests.store_contract import record, require_service
from tests.support import LoopbackServer, load_vectors, store_files, v_query
from tests.test_http import body_of, raw_request, upload_vectors
from tests.test_store_sql import MYSQL, POSTGRES


def unique(prefix: str) -> str:
    return prefix + uuid.uuid4().hex[:12]


class StoreSuite:
    """Mixed into a TestCase with makeMetadata(root) -> Deferred[started FailoverStore]."""

    @inlineCallbacks
    def test_vectors_and_records(self):
        """All 28 real slots upload and download; each record is in the store, right."""
        clock = Clock()
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        metadata = yield self.makeMetadata(root)
        self.addCleanup(metadata.stop)
        if not metadata.writable():
            require_service(metadata.name, "not answering")
        vectors = load_vectors()
        server = LoopbackServer(
            self,
            root=root,
            secret=vectors["secret"].encode("utf-8"),
            clock=clock,
            metadata=metadata,
        )
        stored = yield upload_vectors(self, server, clock)
        for path, data, content_type in stored:
            found = yield metadata.get(path)
            self.assertIsNotNone(found, path)
            self.assertEqual(
                (found.size, found.content_type, found.path), (len(data), content_type, path)
            )
        # A name is taken once stored, whatever the store.
        secret = vectors["secret"].encode("utf-8")
        target = "/upload/x?" + v_query("x", 1, secret)
        again = yield deferToThread(raw_request, server, "PUT", target, b"x")
        self.assertEqual(again.code, 201)
        conflict = yield deferToThread(raw_request, server, "PUT", target, b"y")
        self.assertEqual(conflict.code, 409)


class SQLiteDefaultTests(StoreSuite, TestCase):
    """Nothing configured: the embedded SQLite under StoreDir/.hmacfs/."""

    @inlineCallbacks
    def makeMetadata(self, root):
        metadata = build_metadata(Config(store_dir=root), reactor)
        self.assertEqual(metadata.name, "sqlite")
        yield metadata.start()
        self.assertTrue(os.path.exists(os.path.join(root, ".hmacfs", "meta.sqlite3")))
        return metadata


def redisStore(testCase, port=6379, password=None, timeout=2.0) -> RedisStore:
    prefix = unique("hmacfs-e2e-") + ":"
    store = RedisStore("127.0.0.1", port, password=password, prefix=prefix, timeout=timeout)
    testCase.addCleanup(lambda: deferToThread(delete_prefix, port, prefix, password))
    return store


def sqlStore(testCase, dialect: str, **params) -> SQLStore:
    """A PostgreSQL or MariaDB store on a table of its own, dropped at cleanup."""
    table = unique("hmacfs_e2e_")
    defaults = POSTGRES if dialect == "postgres" else MYSQL
    store = getattr(SQLStore, dialect)(table=table, **dict(defaults, **params))

    def drop():
        if store.pool is not None:
            return store.pool.runOperation(f"DROP TABLE IF EXISTS {table}")

    testCase.addCleanup(drop)
    return store


class RedisOnlyTests(StoreSuite, TestCase):
    """RedisAddr alone."""

    @inlineCallbacks
    def makeMetadata(self, root):
        metadata = FailoverStore(redisStore(self), clock=reactor)
        yield metadata.start()
        return metadata


class PostgresOnlyTests(StoreSuite, TestCase):
    """FallbackEnabled with PostgreSQL, no Redis."""

    @inlineCallbacks
    def makeMetadata(self, root):
        metadata = FailoverStore(sqlStore(self, "postgres"), clock=reactor)
        yield metadata.start()
        return metadata


class MariaDBOnlyTests(StoreSuite, TestCase):
    """FallbackEnabled with MariaDB, no Redis."""

    @inlineCallbacks
    def makeMetadata(self, root):
        metadata = FailoverStore(sqlStore(self, "mysql"), clock=reactor)
        yield metadata.start()
        return metadata


class RedisPostgresTests(StoreSuite, TestCase):
    """Redis with PostgreSQL as its fallback, both up."""

    @inlineCallbacks
    def makeMetadata(self, root):
        metadata = FailoverStore(redisStore(self), sqlStore(self, "postgres"), clock=reactor)
        yield metadata.start()
        if not metadata.fallback.up:
            require_service("PostgreSQL", "not answering")
        return metadata


class ArrangementTests(TestCase):
    def test_build_metadata_from_config(self):
        """Which stores a config gives, as data."""
        cases = [
            (Config(store_dir="/s"), ("sqlite", None)),
            (Config(store_dir="/s", redis_addr="127.0.0.1:6379"), ("redis", None)),
            (
                Config(store_dir="/s", fallback_enabled=True, fallback_db_name="hmacfs"),
                ("postgres", None),
            ),
            (
                Config(
                    store_dir="/s",
                    redis_addr="127.0.0.1:6379",
                    fallback_enabled=True,
                    fallback_db_type="mysql",
                    fallback_db_name="hmacfs",
                ),
                ("redis", "mysql"),
            ),
        ]
        for config, (primary, fallback) in cases:
            metadata = build_metadata(config, reactor)
            self.assertEqual(metadata.primary.name, primary)
            self.assertEqual(metadata.fallback and metadata.fallback.name, fallback)
        sqlite = build_metadata(Config(store_dir="/s"), reactor).primary.store
        self.assertEqual(sqlite.path, "/s/.hmacfs/meta.sqlite3")


def eventually(condition, what: str, within: float = 15.0):
    """Poll condition() on the reactor until true; fail after `within` seconds."""

    @inlineCallbacks
    def poll():
        for _ in range(int(within / 0.05)):
            if condition():
                return
            yield deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"not {what} after {within}s")

    return poll()


class OutageTests(TestCase):
    """
    A running hmacfs with Redis primary and PostgreSQL fallback, both private
    servers killed and restarted under it.  Every 201 ever sent must have
    its file and its record at the end.
    """

    timeout = 120

    @inlineCallbacks
    def test_outages(self):
        """Redis down: uploads go on via PostgreSQL; back: copied; both down: 503, GET works."""
        redis = RedisServer(self, persist=True)
        postgres = PrivatePostgres(self)
        primary = redisStore(self, port=redis.port, timeout=0.5)
        primary.connect_timeout = 1.0
        fallback = sqlStore(self, "postgres", port=postgres.port)
        metadata = FailoverStore(primary, fallback, clock=reactor, timeout=1.0, probeInterval=0.2)
        yield metadata.start()
        self.addCleanup(metadata.stop)
        self.assertTrue(metadata.primary.up and metadata.fallback.up)
        server = LoopbackServer(self, metadata=metadata)
        created: dict[str, bytes] = {}

        @inlineCallbacks
        def upload(name: str, expect: int = 201):
            data = body_of(3000, name)
            response = yield server.http.put(
                server.url(name, v_query(name, len(data))),
                data=FileBodyProducer(BytesIO(data)),
                headers={"Content-Type": "image/png"},
            )
            yield readBody(response)
            self.assertEqual(response.code, expect, name)
            if response.code == 201:
                created[name] = data
            return response

        @inlineCallbacks
        def download(name: str):
            response = yield server.http.get(server.url(name))
            body = yield readBody(response)
            self.assertEqual((response.code, body), (200, created[name]), name)
            return response.headers.getRawHeaders("Content-Type")[0]

        for n in range(3):
            yield upload(f"before/{n}.png")

        # Redis dies: the first call notices (one timeout), the rest go
        # straight to PostgreSQL.
        redis.kill()
        for n in range(5):
            yield upload(f"during/{n}.png")
        self.assertFalse(metadata.primary.up)
        self.assertEqual((yield download("during/0.png")), "image/png")
        # Records only Redis has are out of reach, but their bytes are not.
        yield download("before/0.png")

        # Redis returns with its data (AOF): the outage records move over.
        redis.start()
        yield eventually(lambda: metadata.primary.up and metadata.copiedBack == 5, "copied")
        left = yield fallback.records(100)
        self.assertEqual(left, [])
        for n in range(5):
            found = yield primary.get(f"during/{n}.png")
            self.assertEqual(found.content_type, "image/png")

        # Both die: uploads are refused before their body, downloads go on.
        redis.kill()
        postgres.kill()
        # The first upload finds out only when its record fails: withdrawn.
        yield upload("withdrawn.png", expect=503)
        self.assertFalse(metadata.writable())
        yield upload("refused.png", expect=503)
        self.assertNotIn("withdrawn.png", store_files(server.root))
        self.assertNotIn("refused.png", store_files(server.root))
        for name in list(created):
            yield download(name)

        # Both return: no restart of hmacfs needed.
        redis.start()
        postgres.start()
        yield eventually(lambda: metadata.primary.up and metadata.fallback.up, "both up")
        yield upload("after.png")

        # Nothing lost: every 201 has its file and its record.
        for name, data in created.items():
            with open(os.path.join(server.root, name), "rb") as f:
                self.assertEqual(f.read(), data, name)
            found = yield metadata.get(name)
            self.assertIsNotNone(found, name)
            self.assertEqual(found.size, len(data))

    @inlineCallbacks
    def test_unreachable_at_start(self):
        """Stores that are down at start: degraded and logged, no hang; they are found later."""
        redis = RedisServer(self, persist=True)
        redis.kill()
        primary = redisStore(self, port=redis.port, timeout=0.5)
        primary.connect_timeout = 0.5
        metadata = FailoverStore(primary, clock=reactor, timeout=1.0, probeInterval=0.2)
        yield metadata.start()
        self.addCleanup(metadata.stop)
        self.assertFalse(metadata.writable())
        redis.start()
        yield eventually(metadata.writable, "writable")
        self.flushLoggedErrors(StoreUnavailable)


class HungServerTests(TestCase):
    """A PostgreSQL that stops answering (SIGSTOP) never stalls the reactor."""

    timeout = 60

    def freeze(self, postgres: PrivatePostgres) -> None:
        with open(os.path.join(postgres.data, "postmaster.pid")) as f:
            pid = int(f.readline())
        pids = [pid] + [
            int(p)
            for p in subprocess.run(
                ["pgrep", "-P", str(pid)], capture_output=True, text=True
            ).stdout.split()
        ]
        for p in pids:
            os.kill(p, signal.SIGSTOP)

        def thaw():
            for p in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p, signal.SIGCONT)

        self.addCleanup(thaw)

    def watchReactor(self) -> list[float]:
        """Gaps longer than 0.3 s between ticks of a 50 ms LoopingCall."""
        stalls: list[float] = []
        last = [time.monotonic()]

        def tick():
            now = time.monotonic()
            if now - last[0] > 0.3:
                stalls.append(now - last[0])
            last[0] = now

        loop = LoopingCall(tick)
        loop.start(0.05)
        self.addCleanup(loop.stop)
        return stalls

    @inlineCallbacks
    def test_hung_sql_server(self):
        """Calls fail within the deadline, probes and stop() never block the reactor."""
        postgres = PrivatePostgres(self)
        store = sqlStore(self, "postgres", port=postgres.port)
        metadata = FailoverStore(store, clock=reactor, timeout=1.0, probeInterval=0.3)
        yield metadata.start()
        self.assertTrue(metadata.writable())
        stalls = self.watchReactor()
        self.freeze(postgres)
        started = time.monotonic()
        yield self.assertFailure(metadata.put(record()), StoreUnavailable)
        self.assertLess(time.monotonic() - started, 2.0)
        yield deferLater(reactor, 2.0, lambda: None)  # several probes against the hung server
        started = time.monotonic()
        yield metadata.stop()
        self.assertLess(time.monotonic() - started, 6.0)
        self.assertEqual(stalls, [])
        self.flushLoggedErrors()
