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
