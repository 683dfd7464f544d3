"""
The contract every IMetadataStore passes, as a mixin.  A test case mixes it
in with TestCase and provides makeStore(fresh=True) -> Deferred[store]: a
started store; with fresh=True one with no records (it gets its own table or
key prefix, removed at cleanup); with fresh=False a second store on the same
table/prefix as the test's first one.  The mixin stops the stores.
L{SharedContract} is the cross-node part (claims, leases, state), mixed in
beside it.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SkipTest
from zope.interface.verify import verifyObject

from hmacd.quota import Limits, Usage, exceeded
from hmacd.store import FileRecord, IMetadataStore
from hmacd.takedown import Takedown


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


class AdminContract:
    """The walk over every record and the takedowns (hmacd.admin, hmacd.takedown)."""

    store: Any

    @inlineCallbacks
    def walk(self, limit: int):
        pages, found, cursor = 0, [], ""
        while True:
            page, cursor = yield self.store.scan(cursor, limit)
            found.extend(page)
            pages += 1
            if cursor is None:
                return found, pages
            self.assertLess(pages, 1000, "the walk does not end")

    @inlineCallbacks
    def test_scan_empty(self):
        """An empty store's walk ends at once with nothing."""
        found, _ = yield self.walk(10)
        self.assertEqual(found, [])

    @inlineCallbacks
    def test_scan_every_record_once(self):
        """A walk in small pages gives every record, whole, exactly once."""
        records = [
            record(f"w/{n:03d}/é {n}.bin", size=n, uploader=f"u{n % 3}@example.org")
            for n in range(23)
        ]
        for r in records:
            yield self.store.put(r)
        found, pages = yield self.walk(5)
        self.assertGreater(pages, 1)
        key = lambda r: r.path  # noqa: E731
        self.assertEqual(sorted(found, key=key), sorted(records, key=key))

    @inlineCallbacks
    def test_scan_after_delete(self):
        """Records deleted during a walk do not stop it; the others still come."""
        for n in range(12):
            yield self.store.put(record(f"d/{n:02d}", size=n))
        page, cursor = yield self.store.scan("", 4)
        for r in page:
            yield self.store.delete(r.path)
        seen = {r.path for r in page}
        while cursor is not None:
            more, cursor = yield self.store.scan(cursor, 4)
            seen.update(r.path for r in more)
        self.assertEqual(seen, {f"d/{n:02d}" for n in range(12)})

    def test_scan_bad_limit(self):
        """A page of no records is a ValueError, not an endless walk."""
        return self.assertFailure(self.store.scan("", 0), ValueError)

    @inlineCallbacks
    def test_takedown_roundtrip(self):
        """A takedown comes back whole, by path and by digest, and in the list."""
        t = Takedown("t/é x.png", 451, "cd" * 32, "court order 12", 1_800_000_000.5, "root")
        self.assertIsNone((yield self.store.takedown(t.path)))
        self.assertIsNone((yield self.store.denied(t.sha256)))
        yield self.store.put_takedown(t)
        self.assertEqual((yield self.store.takedown(t.path)), t)
        self.assertEqual((yield self.store.denied(t.sha256)), t)
        self.assertEqual((yield self.store.takedowns()), [t])
        self.assertIsNone((yield self.store.takedown("t/other")))
        self.assertIsNone((yield self.store.denied("ef" * 32)))

    @inlineCallbacks
    def test_takedown_without_digest(self):
        """A takedown whose content was unknown denies no digest."""
        t = Takedown("t/unknown", 410, "", "", 1.0, "ops")
        yield self.store.put_takedown(t)
        self.assertEqual((yield self.store.takedown(t.path)), t)
        self.assertIsNone((yield self.store.denied("")))

    @inlineCallbacks
    def test_takedown_replaced_and_lifted(self):
        """A second takedown of a path replaces the first; lifting it forgets both."""
        first = Takedown("t/p", 410, "aa" * 32, "spam", 1.0, "a")
        second = Takedown("t/p", 451, "bb" * 32, "legal", 2.0, "b")
        yield self.store.put_takedown(first)
        yield self.store.put_takedown(second)
        self.assertEqual((yield self.store.takedown("t/p")), second)
        self.assertIsNone((yield self.store.denied("aa" * 32)))
        self.assertEqual((yield self.store.denied("bb" * 32)), second)
        yield self.store.lift_takedown("t/p")
        yield self.store.lift_takedown("t/never")
        self.assertIsNone((yield self.store.takedown("t/p")))
        self.assertIsNone((yield self.store.denied("bb" * 32)))
        self.assertEqual((yield self.store.takedowns()), [])

    @inlineCallbacks
    def test_takedown_apart_from_records(self):
        """Takedowns are neither records nor walked, and deleting a record keeps them."""
        yield self.store.put(record("t/kept"))
        yield self.store.put_takedown(Takedown("t/kept", 410, "ab" * 32))
        yield self.store.delete("t/kept")
        found, _ = yield self.walk(10)
        self.assertEqual(found, [])
        self.assertEqual((yield self.store.takedown("t/kept")), Takedown("t/kept", 410, "ab" * 32))


def pause(seconds: float):
    """A Deferred that fires after C{seconds} of real time (leases expire on real clocks)."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)


class SharedContract:
    """
    What several nodes share through a store: claims, leases and state.  Other
    nodes are other store objects on the same database (makeStore(fresh=False)).
    """

    @inlineCallbacks
    def otherStore(self):
        other = yield self.makeStore(fresh=False)
        self.addCleanup(other.stop)
        return other

    @inlineCallbacks
    def test_claim_is_exclusive(self):
        """One owner holds a path; another is refused; the holder may claim again."""
        other = yield self.otherStore()
        self.assertTrue((yield self.store.claim("c/x.bin", "node-a", 30.0)))
        self.assertFalse((yield other.claim("c/x.bin", "node-b", 30.0)))
        self.assertTrue((yield other.claim("c/x.bin", "node-a", 30.0)))
        self.assertTrue((yield other.claim("c/other.bin", "node-b", 30.0)))

    @inlineCallbacks
    def test_claim_race(self):
        """Twenty owners on twenty store objects racing for one path: exactly one wins."""
        from twisted.internet.defer import gatherResults

        stores = [self.store]
        for _ in range(19):
            stores.append((yield self.otherStore()))
        won = yield gatherResults(
            [s.claim("race/one.bin", f"node-{n}", 30.0) for n, s in enumerate(stores)]
        )
        self.assertEqual(won.count(True), 1, won)
        # ... and the winner is the one every store now sees as the holder.
        winner = f"node-{won.index(True)}"
        for n, s in enumerate(stores):
            self.assertEqual(
                (yield s.claim("race/one.bin", f"node-{n}", 30.0)), n == won.index(True)
            )
        self.assertTrue((yield self.store.renew("race/one.bin", winner, 30.0)))

    @inlineCallbacks
    def test_claim_expires(self):
        """An expired claim goes to the next owner, and its old owner cannot renew it."""
        other = yield self.otherStore()
        self.assertTrue((yield self.store.claim("c/lapse", "node-a", 0.2)))
        yield pause(0.4)
        self.assertTrue((yield other.claim("c/lapse", "node-b", 30.0)))
        self.assertFalse((yield self.store.renew("c/lapse", "node-a", 30.0)))
        self.assertFalse((yield self.store.claim("c/lapse", "node-a", 30.0)))

    @inlineCallbacks
    def test_renew_keeps(self):
        """A renewed claim outlives its first lease; only its owner may renew it."""
        other = yield self.otherStore()
        # Leases of seconds, not tenths: on a loaded machine (CI beside other runs) the next
        # call may come a few tenths later.
        self.assertTrue((yield self.store.claim("c/kept", "node-a", 1.5)))
        self.assertTrue((yield self.store.renew("c/kept", "node-a", 30.0)))
        self.assertFalse((yield other.renew("c/kept", "node-b", 30.0)))
        yield pause(2.0)
        self.assertFalse((yield other.claim("c/kept", "node-b", 30.0)))
        self.assertFalse((yield self.store.renew("c/never-claimed", "node-a", 30.0)))

    @inlineCallbacks
    def test_release(self):
        """A release by someone else does nothing; the owner's frees the path at once."""
        other = yield self.otherStore()
        self.assertTrue((yield self.store.claim("c/r", "node-a", 30.0)))
        self.assertIsNone((yield other.release("c/r", "node-b")))
        self.assertFalse((yield other.claim("c/r", "node-b", 30.0)))
        yield self.store.release("c/r", "node-a")
        self.assertTrue((yield other.claim("c/r", "node-b", 30.0)))
        yield self.store.release("c/unknown", "node-a")

    @inlineCallbacks
    def test_lease(self):
        """A lease has one holder at a time, who renews it by taking it again, until it lapses."""
        other = yield self.otherStore()
        self.assertTrue((yield self.store.lease("sweep", "node-a", 1.5)))
        self.assertFalse((yield other.lease("sweep", "node-b", 1.5)))
        self.assertTrue((yield self.store.lease("sweep", "node-a", 1.5)))
        yield pause(2.0)
        self.assertTrue((yield other.lease("sweep", "node-b", 30.0)))
        self.assertFalse((yield self.store.lease("sweep", "node-a", 30.0)))

    @inlineCallbacks
    def test_kinds_apart(self):
        """A claim, a lease and a state entry of the same name are different things."""
        yield self.store.put_state("same", "value", 30.0)
        self.assertTrue((yield self.store.claim("same", "node-a", 30.0)))
        self.assertTrue((yield self.store.lease("same", "node-b", 30.0)))
        self.assertEqual((yield self.store.get_state("same")), "value")
        self.assertIsNone((yield self.store.get("same")))

    @inlineCallbacks
    def test_state(self):
        """State is shared, replaced by a later put, forgotten by delete, text kept exactly."""
        other = yield self.otherStore()
        value = '{"upload": "ïd/日本", "parts": [[1, "\\"etag\\""]], "offset": 5242880}'
        self.assertIsNone((yield self.store.get_state("up/1")))
        yield self.store.put_state("up/1", value, 30.0)
        self.assertEqual((yield other.get_state("up/1")), value)
        yield other.put_state("up/1", "second", 30.0)
        self.assertEqual((yield self.store.get_state("up/1")), "second")
        yield self.store.delete_state("up/1")
        yield self.store.delete_state("up/1")
        self.assertIsNone((yield other.get_state("up/1")))
        big = "x" * 200_000
        yield self.store.put_state("up/big", big, 30.0)
        self.assertEqual((yield other.get_state("up/big")), big)

    @inlineCallbacks
    def test_state_ttl(self):
        """State lapses after its TTL; a put starts a new TTL."""
        yield self.store.put_state("up/ttl", "short", 0.2)
        yield self.store.put_state("up/long", "long", 30.0)
        yield pause(0.4)
        self.assertIsNone((yield self.store.get_state("up/ttl")))
        self.assertEqual((yield self.store.get_state("up/long")), "long")


class QuotaContract:
    """
    The quota figures (L{hmacd.quota}) a store keeps: its puts and deletes count, holds are
    taken atomically across store objects on one database (other processes, other nodes),
    and the figures can be rebuilt from the records.
    """

    NOW = 1_800_000_000.0

    def counting(self, store=None):
        store = store or self.store
        store.quota_accounting = True
        return store

    def mine(self, path, size, uploader="alice@example.org", created=None):
        return record(path, size=size, uploader=uploader, created=created or self.NOW)

    @inlineCallbacks
    def test_quota_put_and_delete_count(self):
        """A put adds to its uploader's, the day's and the total; a delete all but the day."""
        self.counting()
        yield self.store.put(self.mine("q/a", 2**40))
        yield self.store.put(self.mine("q/b", 5, uploader="bob@example.org"))
        yield self.store.put(record("q/c", size=7))
        usage = yield self.store.quota_usage("alice@example.org", self.NOW)
        self.assertEqual((usage.stored, usage.daily, usage.total), (2**40, 2**40, 2**40 + 12))
        yield self.store.delete("q/a")
        yield self.store.delete("q/unknown")
        usage = yield self.store.quota_usage("alice@example.org", self.NOW)
        self.assertEqual((usage.stored, usage.daily, usage.total), (0, 2**40, 12))

    @inlineCallbacks
    def test_quota_replace_counts_once(self):
        """A record put again for the same path replaces its size; the day counts it once."""
        self.counting()
        yield self.store.put(self.mine("q/a", 100))
        yield self.store.put(self.mine("q/a", 30))
        usage = yield self.store.quota_usage("alice@example.org", self.NOW)
        self.assertEqual((usage.stored, usage.daily, usage.total), (30, 100, 30))

    @inlineCallbacks
    def test_quota_batched_deletes(self):
        """Deletes that go together (the expiry sweep's) each give their bytes back."""
        from twisted.internet.defer import gatherResults

        self.counting()
        for n in range(20):
            yield self.store.put(self.mine(f"q/{n}", n + 1))
        yield gatherResults([self.store.delete(f"q/{n}") for n in range(15)])
        usage = yield self.store.quota_usage("alice@example.org", self.NOW)
        self.assertEqual((usage.stored, usage.total), (16 + 17 + 18 + 19 + 20,) * 2)

    @inlineCallbacks
    def test_quota_not_counted_when_off(self):
        """A store that does not keep the figures leaves them alone."""
        yield self.store.put(self.mine("q/a", 100))
        usage = yield self.store.quota_usage("alice@example.org", self.NOW)
        self.assertEqual(usage, Usage())

    @inlineCallbacks
    def test_quota_reserve_refuses_beyond(self):
        """A hold that would pass a limit is refused with the figures; one that fits is taken."""
        self.counting()
        yield self.store.put(self.mine("q/a", 60))
        limits = Limits(user=100)
        ok, usage = yield self.store.quota_reserve(
            "t1", "alice@example.org", 41, limits, self.NOW, 60
        )
        self.assertFalse(ok)
        self.assertEqual(exceeded(limits, usage, "alice@example.org", 41), "UserQuota")
        ok, _ = yield self.store.quota_reserve("t2", "alice@example.org", 40, limits, self.NOW, 60)
        self.assertTrue(ok)
        # The hold counts: nothing more fits until it goes.
        ok, usage = yield self.store.quota_reserve(
            "t3", "alice@example.org", 1, limits, self.NOW, 60
        )
        self.assertEqual((ok, usage.held), (False, 40))
        ok, _ = yield self.store.quota_reserve("t4", "bob@example.org", 99, limits, self.NOW, 60)
        self.assertTrue(ok)
        yield self.store.quota_release("t2", "alice@example.org")
        ok, _ = yield self.store.quota_reserve("t5", "alice@example.org", 1, limits, self.NOW, 60)
        self.assertTrue(ok)

    @inlineCallbacks
    def test_quota_daily_and_global(self):
        """The day counts the last 24 hours only; the global limit counts everyone and the holds."""
        self.counting()
        yield self.store.put(self.mine("q/old", 500, created=self.NOW - 25 * 3600))
        yield self.store.put(self.mine("q/new", 50))
        yield self.store.delete("q/new")
        daily = Limits(daily=100)
        ok, usage = yield self.store.quota_reserve(
            "d1", "alice@example.org", 51, daily, self.NOW, 60
        )
        self.assertEqual((ok, usage.daily), (False, 50))
        ok, _ = yield self.store.quota_reserve("d2", "alice@example.org", 50, daily, self.NOW, 60)
        self.assertTrue(ok)
        total = Limits(total=1000)
        ok, usage = yield self.store.quota_reserve("g1", None, 451, total, self.NOW, 60)
        self.assertEqual((ok, usage.total, usage.held_total), (False, 500, 50))
        ok, _ = yield self.store.quota_reserve("g2", None, 450, total, self.NOW, 60)
        self.assertTrue(ok)

    @inlineCallbacks
    def test_quota_hold_lapses(self):
        """A hold nobody releases (its process died) stops counting once it expires."""
        self.counting()
        limits = Limits(user=100)
        ok, _ = yield self.store.quota_reserve("h1", "alice@example.org", 100, limits, self.NOW, 60)
        self.assertTrue(ok)
        ok, _ = yield self.store.quota_reserve(
            "h2", "alice@example.org", 1, limits, self.NOW + 30, 60
        )
        self.assertFalse(ok)
        ok, _ = yield self.store.quota_reserve(
            "h3", "alice@example.org", 100, limits, self.NOW + 61, 60
        )
        self.assertTrue(ok)

    @inlineCallbacks
    def test_quota_holds_race(self):
        """Twenty store objects on one database race for holds: exactly the five that fit win."""
        from twisted.internet.defer import gatherResults

        stores = [self.counting()]
        for _ in range(19):
            other = yield self.makeStore(fresh=False)
            self.addCleanup(other.stop)
            stores.append(self.counting(other))
        limits = Limits(user=50)
        results = yield gatherResults(
            [
                s.quota_reserve(f"r{n}", "alice@example.org", 10, limits, self.NOW, 60)
                for n, s in enumerate(stores)
            ]
        )
        self.assertEqual(sum(ok for ok, _ in results), 5)
        usage = yield self.store.quota_usage("alice@example.org", self.NOW)
        self.assertEqual(usage.held, 50)

    @inlineCallbacks
    def test_quota_rebuild(self):
        """Figures that drifted (puts made while nothing counted) are rebuilt from the records."""
        yield self.store.put(self.mine("q/a", 100))
        yield self.store.put(self.mine("q/b", 7, uploader="bob@example.org"))
        yield self.store.put(self.mine("q/old", 1000, created=self.NOW - 30 * 3600))
        yield self.store.put(record("q/anon", size=3))
        self.counting()
        yield self.store.quota_rebuild(self.NOW)
        usage = yield self.store.quota_usage("alice@example.org", self.NOW)
        self.assertEqual((usage.stored, usage.daily, usage.total), (1100, 100, 1110))
        self.assertEqual(
            (yield self.store.quota_uploaders(self.NOW)),
            [("alice@example.org", 1100, 100), ("bob@example.org", 7, 7)],
        )

    @inlineCallbacks
    def test_quota_reset(self):
        """A reset forgets the uploader's day and counts its stored bytes again, no one else's."""
        self.counting()
        yield self.store.put(self.mine("q/a", 100))
        yield self.store.put(self.mine("q/b", 7, uploader="bob@example.org"))
        yield self.store.delete("q/a")
        yield self.store.put(self.mine("q/c", 5))
        yield self.store.quota_reset("alice@example.org", self.NOW)
        alice = yield self.store.quota_usage("alice@example.org", self.NOW)
        bob = yield self.store.quota_usage("bob@example.org", self.NOW)
        self.assertEqual((alice.stored, alice.daily, bob.stored, bob.daily), (5, 0, 7, 7))

    @inlineCallbacks
    def test_quota_awkward_uploader(self):
        """An uploader with quotes, spaces and non-ASCII text is a key like any other."""
        self.counting()
        who = 'd\'Artagnan "x" 日本@example.org/res'
        yield self.store.put(self.mine("q/a", 9, uploader=who))
        usage = yield self.store.quota_usage(who, self.NOW)
        self.assertEqual((usage.stored, usage.daily), (9, 9))
        self.assertEqual((yield self.store.quota_uploaders(self.NOW)), [(who, 9, 9)])

    @inlineCallbacks
    def test_quota_holds_at_once(self):
        """Holds asked of one store object at once (they may go together): what fits wins."""
        from twisted.internet.defer import gatherResults

        self.counting()
        limits = Limits(user=50)
        results = yield gatherResults(
            [
                self.store.quota_reserve(f"b{n}", "alice@example.org", 10, limits, self.NOW, 60)
                for n in range(10)
            ]
        )
        self.assertEqual(sum(ok for ok, _ in results), 5)
        # Releases at once too (a store with several connections may run them in any order).
        yield gatherResults(
            [self.store.quota_release(f"b{n}", "alice@example.org") for n in range(10)]
        )
        ok, usage = yield self.store.quota_reserve(
            "c", "alice@example.org", 50, limits, self.NOW, 60
        )
        self.assertEqual((ok, usage.held), (True, 0))
