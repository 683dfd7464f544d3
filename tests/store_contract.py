"""
The contract every IMetadataStore passes, as a mixin.  A test case mixes it
in with TestCase and provides makeStore(fresh=True) -> Deferred[store]: a
started store; with fresh=True one with no records (it gets its own table or
key prefix, removed at cleanup); with fresh=False a second store on the same
table/prefix as the test's first one.  The mixin stops the stores.
"""

from __future__ import annotations

import os

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SkipTest
from zope.interface.verify import verifyObject

from hmacd.store import FileRecord, IMetadataStore


def record(path: str = "a/b.txt", **changes) -> FileRecord:
    fields = dict(
        path=path,
        size=1234,
        content_type="image/jpeg",
        sha256="ab" * 32,
        created=1_800_000_000.5,
        protocol="v2",
        uploader=None,
        expires=None,
    )
    fields.update(changes)
    return FileRecord(**fields)


def require_service(name: str, reason: str):
    """Skip for want of a service, except where CI demands every service."""
    if os.environ.get("HMACFS_REQUIRE_SERVICES"):
        raise AssertionError(f"{name} is required here but {reason}")
    raise SkipTest(f"{name}: {reason}")


class StoreContract:
    def makeStore(self):
        raise NotImplementedError

    @inlineCallbacks
    def setUp(self):
        self.store = yield self.makeStore()
        self.addCleanup(self.store.stop)

    def test_interface(self):
        """The store provides IMetadataStore."""
        self.assertTrue(verifyObject(IMetadataStore, self.store))

    @inlineCallbacks
    def test_put_get(self):
        """A record comes back equal, every field included."""
        r = record(uploader="alice@example.org", expires=1_800_600_000.25, size=2**40)
        yield self.store.put(r)
        self.assertEqual((yield self.store.get(r.path)), r)

    @inlineCallbacks
    def test_awkward_paths(self):
        """Unicode, spaces, +, %, quotes and a 2048-byte path are keys like any other."""
        paths = [
            "x/hällo wörld 日本.png",
            "x/a+b=c&d%e.bin",
            'x/it\'s "quoted"; DROP TABLE files; --.txt',
            "/".join(["é" * 100] * 10)[:1000],
            "x/" + "a" * 2046,
        ]
        for n, path in enumerate(paths):
            yield self.store.put(record(path, size=n))
        for n, path in enumerate(paths):
            got = yield self.store.get(path)
            self.assertEqual(got, record(path, size=n), path)

    @inlineCallbacks
    def test_missing(self):
        """An unknown path is None, not an error."""
        self.assertIsNone((yield self.store.get("no/such/file")))

    @inlineCallbacks
    def test_put_replaces(self):
        """A second put for a path replaces the first."""
        yield self.store.put(record(size=1, expires=5.0))
        yield self.store.put(record(size=2))
        self.assertEqual((yield self.store.get("a/b.txt")), record(size=2))
        self.assertEqual((yield self.store.expired(10.0, 10)), [])

    @inlineCallbacks
    def test_delete(self):
        """Delete forgets the record and its expiry; deleting twice is fine."""
        yield self.store.put(record(expires=5.0))
        yield self.store.delete("a/b.txt")
        yield self.store.delete("a/b.txt")
        self.assertIsNone((yield self.store.get("a/b.txt")))
        self.assertEqual((yield self.store.expired(10.0, 10)), [])

    @inlineCallbacks
    def test_expired(self):
        """Records due by `now`, soonest first, at most `limit`; no expiry never expires."""
        yield self.store.put(record("late", expires=30.0))
        yield self.store.put(record("early", expires=10.0))
        yield self.store.put(record("middle", expires=20.0))
        yield self.store.put(record("never"))
        yield self.store.put(record("future", expires=1000.0))
        due = yield self.store.expired(30.0, 10)
        self.assertEqual([r.path for r in due], ["early", "middle", "late"])
        due = yield self.store.expired(30.0, 2)
        self.assertEqual([r.path for r in due], ["early", "middle"])
        self.assertEqual((yield self.store.expired(5.0, 10)), [])

    @inlineCallbacks
    def test_expired_records_whole(self):
        """Records come back from expired() equal to what was put, awkward text included."""
        odd = record(
            'x/hällo "wörld" 日本\\.png',
            content_type='text/plain; charset="utf-8"; name=\\x/\ty',
            uploader="ålice@exämple.org/\u2028res",
            expires=1.5,
            size=2**40,
        )
        yield self.store.put(odd)
        self.assertEqual((yield self.store.expired(2.0, 10)), [odd])

    @inlineCallbacks
    def test_count_expired(self):
        """count_expired(now) counts the records due by now, whatever their number."""
        self.assertEqual((yield self.store.count_expired(10.0)), 0)
        for n in range(5):
            yield self.store.put(record(f"c/{n}", expires=float(n)))
        yield self.store.put(record("c/never"))
        self.assertEqual((yield self.store.count_expired(2.0)), 3)
        self.assertEqual((yield self.store.count_expired(100.0)), 5)
        yield self.store.delete("c/0")
        self.assertEqual((yield self.store.count_expired(100.0)), 4)

    @inlineCallbacks
    def test_expired_file_not_served(self):
        """Through this store, a file whose record has expired is 410, sweep or not."""
        from twisted.internet import reactor
        from twisted.internet.task import deferLater

        from hmacd.store.failover import FailoverStore
        from tests.support import MemoryServer

        now = 1_800_000_000.0
        metadata = FailoverStore(self.store, clock=reactor, healthInterval=0)
        yield metadata.start()
        root = self.mktemp()
        server = MemoryServer(root, metadata=metadata)
        server.clock.advance(now)
        answers = {}
        for name, expires in (("due.txt", now), ("kept.txt", now + 60)):
            # No facts on these files (as uploaded by an older version): the record rules.
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"text")
            yield self.store.put(record(name, size=4, content_type="text/plain", expires=expires))
            channel, transport = server.connect()
            channel.dataReceived(b"GET /upload/%s HTTP/1.1\r\nHost: x\r\n\r\n" % name.encode())
            for _ in range(500):
                if b"\r\n\r\n" in transport.value():
                    break
                yield deferLater(reactor, 0.01, lambda: None)
            answers[name] = transport.value().split(b"\r\n", 1)[0]
        self.assertEqual(answers, {"due.txt": b"HTTP/1.1 410 Gone", "kept.txt": b"HTTP/1.1 200 OK"})

    @inlineCallbacks
    def test_records(self):
        """records(limit) walks what is stored, at most limit at a time."""
        paths = {f"r/{n}" for n in range(7)}
        for path in paths:
            yield self.store.put(record(path))
        some = yield self.store.records(3)
        self.assertEqual(len(some), 3)
        self.assertTrue({r.path for r in some} <= paths)
        everything = yield self.store.records(100)
        self.assertEqual({r.path for r in everything}, paths)

    @inlineCallbacks
    def test_ping(self):
        """ping() answers while the server is up."""
        self.assertIsNone((yield self.store.ping()))

    @inlineCallbacks
    def test_start_is_idempotent(self):
        """Starting a second store on the same database keeps the records."""
        yield self.store.put(record())
        other = yield self.makeStore(fresh=False)
        self.addCleanup(other.stop)
        self.assertEqual((yield other.get("a/b.txt")), record())
