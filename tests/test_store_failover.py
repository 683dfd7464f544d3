"""
FailoverStore logic with controllable stores and a Clock: timeouts, the
circuit breaker, routing, copy-back, and one log line per transition.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hmacd.store import StoreUnavailable
from hmacd.store.failover import FailoverStore
from hmacd.store.memory import MemoryStore
from tests.store_contract import AdminContract, QuotaContract, SharedContract, StoreContract, record


class FlakyStore(MemoryStore):
    """A MemoryStore that can be switched to failing ("down") or hanging ("hang")."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.mode = "ok"
        self.calls: list[str] = []

    def _guard(self, method, *args):
        self.calls.append(method)
        if self.mode == "down":
            return fail(StoreUnavailable(f"{self.name} refused"))
        if self.mode == "hang":
            return Deferred()
        return getattr(MemoryStore, method)(self, *args)

    def start(self):
        return self._guard("start")

    def put(self, r):
        return self._guard("put", r)

    def get(self, path):
        return self._guard("get", path)

    def delete(self, path):
        return self._guard("delete", path)

    def expired(self, now, limit):
        return self._guard("expired", now, limit)

    def count_expired(self, now):
        return self._guard("count_expired", now)

    def records(self, limit):
        return self._guard("records", limit)

    def ping(self):
        return self._guard("ping")

    def claim(self, path, owner, lease):
        return self._guard("claim", path, owner, lease)

    def renew(self, path, owner, lease):
        return self._guard("renew", path, owner, lease)

    def release(self, path, owner):
        return self._guard("release", path, owner)

    def lease(self, name, owner, ttl):
        return self._guard("lease", name, owner, ttl)

    def put_state(self, key, value, ttl):
        return self._guard("put_state", key, value, ttl)

    def get_state(self, key):
        return self._guard("get_state", key)

    def delete_state(self, key):
        return self._guard("delete_state", key)


class FailoverTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.primary = FlakyStore("redis")
        self.fallback = FlakyStore("postgres")
        self.store = FailoverStore(
            self.primary, self.fallback, clock=self.clock, timeout=2.0, probeInterval=5.0
        )
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)
        self.successResultOf(self.store.start())

    def warnings(self) -> list[str]:
        return [
            e["log_format"].split(" {")[0] + " " + e.get("role", "")
            for e in self.events
            if e.get("log_level") is not None and e["log_level"].name in ("warn", "error")
        ]

    def test_primary_serves_when_up(self):
        """With both up, records go to and come from the primary only."""
        self.successResultOf(self.store.put(record()))
        self.assertEqual(self.successResultOf(self.store.get("a/b.txt")), record())
        self.assertIn("a/b.txt", self.primary._records)
        self.assertEqual(self.fallback._records, {})

    def test_failed_primary_routes_to_fallback(self):
        """A refused write lands in the fallback; the breaker then skips the primary."""
        self.primary.mode = "down"
        self.successResultOf(self.store.put(record()))
        self.assertIn("a/b.txt", self.fallback._records)
        self.assertFalse(self.store.primary.up)
        self.assertTrue(self.store.writable())
        calls = len(self.primary.calls)
        self.successResultOf(self.store.put(record("c")))
        self.assertEqual(len(self.primary.calls), calls, "breaker open: primary not asked")
        self.assertEqual(self.successResultOf(self.store.get("c")), record("c"))

    def test_hung_primary_times_out(self):
        """A primary that never answers costs one timeout, then nothing."""
        self.primary.mode = "hang"
        d = self.store.put(record())
        self.assertNoResult(d)
        self.clock.advance(2.0)
        self.successResultOf(d)
        self.assertIn("a/b.txt", self.fallback._records)
        self.successResultOf(self.store.put(record("fast")))  # no timeout this time

    def test_recovery_copies_back(self):
        """When the primary answers its probe again, outage records move to it."""
        self.primary.mode = "down"
        for n in range(250):
            self.successResultOf(self.store.put(record(f"o/{n}")))
        self.primary.mode = "ok"
        self.clock.advance(5.0)
        self.assertTrue(self.store.primary.up)
        self.assertEqual(len(self.primary._records), 250)
        self.assertEqual(self.fallback._records, {})
        self.assertEqual(self.store.copiedBack, 250)
        self.assertEqual(self.successResultOf(self.store.get("o/7")), record("o/7"))

    def test_read_finds_record_not_yet_copied(self):
        """A record only the fallback has is found while the primary is up."""
        self.fallback._records["late"] = record("late")
        self.assertEqual(self.successResultOf(self.store.get("late")), record("late"))

    def test_both_down(self):
        """With no store up: not writable, and calls fail fast with StoreUnavailable."""
        self.primary.mode = self.fallback.mode = "down"
        self.failureResultOf(self.store.put(record()), StoreUnavailable)
        self.assertFalse(self.store.writable())
        self.failureResultOf(self.store.get("a/b.txt"), StoreUnavailable)
        self.fallback.mode = "ok"
        self.clock.advance(5.0)
        self.assertTrue(self.store.writable())

    def test_transitions_logged_once(self):
        """An outage logs "down" once and "back" once, however many calls fail in between."""
        self.primary.mode = "down"
        for n in range(20):
            self.successResultOf(self.store.put(record(f"x{n}")))
        for _ in range(3):
            self.clock.advance(5.0)
        self.primary.mode = "ok"
        self.clock.advance(5.0)
        self.assertEqual(
            self.warnings(),
            ["{role} metadata store primary", "{role} metadata store primary"],
        )
        self.assertEqual(self.store.primary.transitions, 2)

    def test_delete_reaches_both(self):
        """Delete removes a record from each store that is up."""
        self.primary._records["d"] = record("d")
        self.fallback._records["d"] = record("d")
        self.successResultOf(self.store.delete("d"))
        self.assertEqual((self.primary._records, self.fallback._records), ({}, {}))

    def test_expired_from_fallback_during_outage(self):
        """While the primary is down, expiry is read from the fallback."""
        self.primary.mode = "down"
        self.successResultOf(self.store.put(record("e", expires=1.0)))
        self.assertEqual([r.path for r in self.successResultOf(self.store.expired(2.0, 10))], ["e"])


class StartTests(SynchronousTestCase):
    def test_primary_down_at_start(self):
        """A store that fails at start is logged, left down, and started again by the probe."""
        clock = Clock()
        primary = FlakyStore("redis")
        primary.mode = "down"
        store = FailoverStore(primary, None, clock=clock, probeInterval=5.0)
        self.successResultOf(store.start())
        self.assertFalse(store.writable())
        primary.mode = "ok"
        clock.advance(5.0)
        self.assertTrue(store.writable())
        self.assertEqual(primary.calls.count("start"), 2)
        self.flushLoggedErrors()

    def test_leftovers_copied_at_start(self):
        """Records a previous outage left in the fallback are copied when both start."""
        clock = Clock()
        primary, fallback = FlakyStore("redis"), FlakyStore("postgres")
        fallback._records["old"] = record("old")
        store = FailoverStore(primary, fallback, clock=clock)
        self.successResultOf(store.start())
        self.assertEqual(list(primary._records), ["old"])
        self.assertEqual(fallback._records, {})


class SlowStartTests(SynchronousTestCase):
    def test_calls_wait_for_start(self):
        """While a store is starting, writable() is true and calls wait for it."""
        clock = Clock()
        primary = FlakyStore("sqlite")
        pending = Deferred()
        primary.start = lambda: pending
        store = FailoverStore(primary, clock=clock)
        store.start()
        self.assertTrue(store.writable())
        d = store.put(record())
        self.assertNoResult(d)
        pending.callback(None)
        self.successResultOf(d)
        self.assertIn("a/b.txt", primary._records)

    def test_start_that_never_ends(self):
        """A start that hangs gives up after the start deadline; waiting calls then fail."""
        clock = Clock()
        primary = FlakyStore("redis")
        primary.start = lambda: Deferred()
        store = FailoverStore(primary, clock=clock)
        store.start()
        d = store.put(record())
        clock.advance(10.0)
        self.failureResultOf(d, StoreUnavailable)
        self.assertFalse(store.writable())
        self.flushLoggedErrors()


class StopTests(SynchronousTestCase):
    def test_no_recovery_after_stop(self):
        """A probe that answers after stop() neither marks the store up nor copies back."""
        clock = Clock()
        primary, fallback = FlakyStore("redis"), FlakyStore("postgres")
        store = FailoverStore(primary, fallback, clock=clock, probeInterval=5.0)
        self.successResultOf(store.start())
        primary.mode = "down"
        self.successResultOf(store.put(record()))
        self.successResultOf(store.stop())
        primary.mode = "ok"
        clock.advance(50)
        self.assertFalse(store.primary.up)
        self.assertEqual(primary._records, {})
        self.assertEqual(list(fallback._records), ["a/b.txt"])


class FlappingTests(SynchronousTestCase):
    def test_backoff_while_flapping(self):
        """A store failing again soon after each recovery is probed ever less often."""
        clock = Clock()
        primary, fallback = FlakyStore("redis"), FlakyStore("postgres")
        store = FailoverStore(primary, fallback, clock=clock, probeInterval=5.0)
        self.successResultOf(store.start())
        intervals = []
        for _ in range(4):
            primary.mode = "down"
            self.successResultOf(store.put(record()))  # fails over
            primary.mode = "ok"
            before = clock.seconds()
            while not store.primary.up:
                clock.advance(1)
            intervals.append(clock.seconds() - before)
        self.assertEqual(intervals, [5, 10, 20, 40])
        self.assertEqual(store.primary.backoff, 8)
        clock.advance(61)
        primary.mode = "down"
        self.successResultOf(store.put(record("later")))
        self.assertEqual(store.primary.backoff, 1, "calm for a minute: back to normal")
        self.flushLoggedErrors()


class HealthWatchTests(SynchronousTestCase):
    def test_idle_fallback_outage_noticed(self):
        """A fallback that fails while unused is found down by the health ping, logged once."""
        clock = Clock()
        primary, fallback = FlakyStore("redis"), FlakyStore("postgres")
        store = FailoverStore(primary, fallback, clock=clock, healthInterval=10.0)
        self.successResultOf(store.start())
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        fallback.mode = "down"
        clock.advance(10)
        self.assertFalse(store.fallback.up)
        self.assertTrue(store.primary.up)
        clock.advance(30)
        downs = [e for e in events if "is down" in e.get("log_format", "")]
        self.assertEqual(len(downs), 1)
        self.successResultOf(store.stop())
        self.assertEqual(clock.getDelayedCalls(), [])


class FailoverContractTests(StoreContract, AdminContract, SharedContract, QuotaContract, TestCase):
    """The store contract through a FailoverStore (over memory stores) on the real reactor."""

    def makeStore(self, fresh=True):
        from twisted.internet import reactor

        if fresh:
            self.memory = MemoryStore()
        inner = MemoryStore()
        inner._records = self.memory._records
        inner._shared = self.memory._shared
        inner._quota = self.memory._quota
        store = FailoverStore(inner, clock=reactor, healthInterval=0)
        return store.start().addCallback(lambda _: store)


class SharedRoutingTests(SynchronousTestCase):
    """Claims, leases and state go to the primary, and to the fallback only in an outage."""

    setUp = FailoverTests.setUp

    def test_primary_holds_claims(self):
        """With the primary up, claims, leases and state live there only."""
        self.assertTrue(self.successResultOf(self.store.claim("p", "node-a", 30.0)))
        self.assertTrue(self.successResultOf(self.store.lease("sweep", "node-a", 30.0)))
        self.successResultOf(self.store.put_state("k", "v", 30.0))
        self.assertEqual(self.successResultOf(self.store.get_state("k")), "v")
        self.assertEqual(len(self.primary._shared), 3)
        self.assertEqual(self.fallback._shared, {})
        self.assertNotIn("claim", self.fallback.calls)

    def test_outage_moves_to_fallback(self):
        """
        In an outage the fallback decides alone: a claim held in the primary is
        not seen there, so its owner's renew fails (it stops) and another may take it.
        """
        self.assertTrue(self.successResultOf(self.store.claim("p", "node-a", 30.0)))
        self.primary.mode = "down"
        self.assertFalse(self.successResultOf(self.store.renew("p", "node-a", 30.0)))
        self.assertTrue(self.successResultOf(self.store.claim("p", "node-b", 30.0)))
        self.assertFalse(self.successResultOf(self.store.claim("p", "node-a", 30.0)))
        self.assertIn("claim", self.fallback.calls)
        self.assertIsNone(self.successResultOf(self.store.get_state("k")))
        self.successResultOf(self.store.release("p", "node-b"))
        self.successResultOf(self.store.delete_state("k"))

    def test_no_store_fails(self):
        """With both stores down, a claim fails with StoreUnavailable (the caller answers 503)."""
        self.primary.mode = self.fallback.mode = "down"
        self.failureResultOf(self.store.claim("p", "node-a", 30.0), StoreUnavailable)
        self.failureResultOf(self.store.lease("sweep", "node-a", 30.0), StoreUnavailable)

    def test_hung_primary_claim_times_out(self):
        """A hung primary costs a claim one timeout; then the fallback answers."""
        self.primary.mode = "hang"
        d = self.store.claim("p", "node-a", 30.0)
        self.assertNoResult(d)
        self.clock.advance(2.0)
        self.assertTrue(self.successResultOf(d))
        self.assertIn(("claim", "p"), self.fallback._shared)
