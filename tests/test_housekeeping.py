"""
Periodic housekeeping, driven by a Clock; and the shutdown drain, on a real socket.
"""

from __future__ import annotations

import os
import socket

from twisted.internet import main
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hmacd.core import FileServer
from hmacd.facts import write_facts
from hmacd.housekeeping import ExpirySweep, PartialSweep, drain_uploads, sweep_partials
from hmacd.storage.local import LocalStorage
from tests.store_contract import record
from tests.support import (
    SECRET,
    LoopbackServer,
    memory_metadata,
    store_files,
    synchronous,
    v_query,
)

NOW = 1_800_000_000


def touch(root: str, relpath: str, mtime: float) -> None:
    path = os.path.join(root, relpath)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x")
    os.utime(path, (mtime, mtime))


def clocked_server(root: str) -> tuple[Clock, FileServer]:
    """A FileServer over root on a Clock at NOW, with a memory store and no threads."""
    clock = Clock()
    clock.advance(NOW)
    fs = FileServer(
        secret=SECRET,
        store_dir=root,
        reactor=clock,
        metadata=memory_metadata(clock),
        blocking=synchronous,
    )
    return clock, fs


class SweepTests(SynchronousTestCase):
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        touch(self.root, "a/.hmacfs-0000000000000000.part", NOW - 7200)
        touch(self.root, "a/b/.hmacfs-1111111111111111.part", NOW - 7200)
        touch(self.root, "a/.hmacfs-2222222222222222.part", NOW - 10)
        touch(self.root, "a/kept.txt", NOW - 7200)
        touch(self.root, "a/.hmacfs-not-a-temp", NOW - 7200)
        touch(self.root, ".hmacfs/.hmacfs-3333333333333333.part", NOW - 7200)

    def test_sweep_removes_only_old_temp_files(self):
        """Old temp files go; fresh ones, ordinary files and .hmacfs/ stay."""
        removed = sweep_partials(LocalStorage(self.root, synchronous), NOW - 600)
        self.assertEqual(
            sorted(removed),
            ["a/.hmacfs-0000000000000000.part", "a/b/.hmacfs-1111111111111111.part"],
        )
        self.assertEqual(
            store_files(self.root),
            ["a", "a/.hmacfs-2222222222222222.part", "a/.hmacfs-not-a-temp", "a/b", "a/kept.txt"],
        )
        self.assertTrue(
            os.path.exists(os.path.join(self.root, ".hmacfs", ".hmacfs-3333333333333333.part"))
        )

    def test_service_sweeps_at_start_and_periodically(self):
        """The service sweeps when started and again after each interval."""
        clock, fs = clocked_server(self.root)
        service = PartialSweep(fs, interval=3600, maxAge=600)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertNotIn("a/.hmacfs-0000000000000000.part", store_files(self.root))
        self.assertIn("a/.hmacfs-2222222222222222.part", store_files(self.root))
        clock.advance(3600)
        self.assertNotIn("a/.hmacfs-2222222222222222.part", store_files(self.root))

    def test_failed_sweep_keeps_the_loop(self):
        """A sweep that fails is logged and the next one still runs."""
        clock, fs = clocked_server(self.root)
        calls = []

        def failing(storage, older_than):
            calls.append(older_than)
            raise OSError("disk gone")

        self.patch(__import__("hmacd.housekeeping").housekeeping, "sweep_partials", failing)
        service = PartialSweep(fs, interval=3600, maxAge=600)
        service.startService()
        self.addCleanup(service.stopService)
        clock.advance(3600)
        self.assertEqual(calls, [NOW - 600, NOW + 3600 - 600])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 2)


class ExpiryTests(SynchronousTestCase):
    """Expired files and records go; nothing without an expired record is touched."""

    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.clock, self.fs = clocked_server(self.root)

    def stored(self, relpath: str, expires: float | None) -> None:
        touch(self.root, relpath, NOW)
        self.successResultOf(self.fs.metadata.put(record(relpath, expires=expires)))

    def test_sweep(self):
        """Due files and their records are deleted, empty directories pruned, the rest kept."""
        self.stored("slot1/old.jpg", NOW - 1)
        self.stored("slot2/new.jpg", NOW + 3600)
        self.stored("slot3/forever.jpg", None)
        touch(self.root, "manual/no-record.txt", NOW - 10**6)
        self.successResultOf(self.fs.metadata.put(record("gone/missing.jpg", expires=NOW - 5)))
        sweep = ExpirySweep(self.fs)
        sweep.startService()
        self.addCleanup(sweep.stopService)
        self.assertEqual(
            store_files(self.root),
            [
                "manual",
                "manual/no-record.txt",
                "slot2",
                "slot2/new.jpg",
                "slot3",
                "slot3/forever.jpg",
            ],
        )
        self.assertIsNone(self.successResultOf(self.fs.metadata.get("slot1/old.jpg")))
        self.assertIsNone(self.successResultOf(self.fs.metadata.get("gone/missing.jpg")))
        self.assertEqual(sweep.removed, 2)
        self.clock.advance(3600)
        self.clock.advance(300)
        self.assertNotIn("slot2/new.jpg", store_files(self.root))

    def test_sweep_drains_a_soak_backlog(self):
        """
        Issue 21: 5,000 due files (what a soak leaves behind), batches of 500: one sweep
        deletes them all, one batch per reactor turn, and no second sweep starts meanwhile.
        """
        for n in range(5000):
            self.stored(f"soak/{n % 50}/{n}.bin", NOW - 5000 + n)
        self.stored("soak/later.bin", NOW + 3600)
        sweep = ExpirySweep(self.fs, interval=60, batch=500)
        metrics = self.fs.metrics
        sweep.startService()
        self.addCleanup(sweep.stopService)
        self.assertEqual(sweep.removed, 0)  # counted after the sweep
        self.assertEqual(metrics.expired_files._value.get(), 500)  # one batch, then a yield
        self.assertEqual(metrics.expiry_backlog._value.get(), 4500)
        running = sweep.current
        sweep.sweep()  # as a timer firing mid-sweep would: no second sweep
        self.assertIs(sweep.current, running)
        self.assertEqual(metrics.expired_files._value.get(), 500)
        # A Clock runs every call that falls due within one advance, the yields included.
        self.clock.advance(0)
        self.assertIsNone(sweep.current)
        self.assertEqual(sweep.removed, 5000)
        self.assertEqual(metrics.expired_files._value.get(), 5000)
        self.assertEqual(metrics.expiry_backlog._value.get(), 0)
        self.assertEqual(store_files(self.root), ["soak", "soak/later.bin"])
        self.assertEqual(self.successResultOf(self.fs.metadata.count_expired(NOW)), 0)

    def test_store_without_count(self):
        """A store that cannot count what is due (an embedder's, older) is still swept."""
        self.stored("n/old.bin", NOW - 1)
        self.patch(
            self.fs.metadata, "count_expired", lambda now: fail(AttributeError("count_expired"))
        )
        sweep = ExpirySweep(self.fs)
        sweep.startService()
        self.addCleanup(sweep.stopService)
        self.assertEqual(store_files(self.root), [])
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_store_that_does_not_delete(self):
        """A store whose deletes do not take ends the sweep instead of spinning on one batch."""
        for n in range(4):
            self.stored(f"k/{n}.bin", NOW - 1)
        self.patch(self.fs.metadata, "delete", lambda path: succeed(None))
        sweep = ExpirySweep(self.fs, batch=2)
        sweep.startService()
        self.addCleanup(sweep.stopService)
        self.clock.advance(0)
        self.assertIsNone(sweep.current)
        self.assertEqual(sweep.removed, 2)

    def test_stale_record_keeps_a_newer_file(self):
        """
        A record older than its file (a store restored from a backup) does not delete it:
        the file's facts name another upload that has not expired, and replace the record.
        """
        touch(self.root, "r/photo.jpg", NOW)
        newer = record("r/photo.jpg", created=NOW - 60, expires=NOW + 3600, size=1)
        with open(os.path.join(self.root, "r", "photo.jpg"), "rb") as f:
            write_facts(f.fileno(), newer)
        stale = record("r/photo.jpg", created=NOW - 86400, expires=NOW - 10, size=1)
        self.successResultOf(self.fs.metadata.put(stale))
        self.stored("r/old.jpg", NOW - 5)  # an ordinary expired file beside it
        sweep = ExpirySweep(self.fs)
        sweep.startService()
        self.addCleanup(sweep.stopService)
        self.assertEqual(store_files(self.root), ["r", "r/photo.jpg"])
        self.assertEqual(self.successResultOf(self.fs.metadata.get("r/photo.jpg")), newer)
        self.assertIsNone(self.successResultOf(self.fs.metadata.get("r/old.jpg")))

    def test_records_due_during_a_sweep(self):
        """Files that fall due while a sweep runs are taken by that same sweep."""
        for n in range(10):
            self.stored(f"d/{n}.bin", NOW + n)
        sweep = ExpirySweep(self.fs, interval=60, batch=5)
        self.clock.advance(4)  # d/0 .. d/4 are due: a full batch
        sweep.startService()
        self.addCleanup(sweep.stopService)
        self.clock.advance(5)  # the yield between batches took five seconds
        self.assertEqual(store_files(self.root), [])
        self.assertEqual(sweep.removed, 10)

    def test_store_down_keeps_the_loop(self):
        """A sweep that meets a store outage logs it and the next one runs."""
        self.stored("x/y.bin", NOW - 1)
        self.patch(self.fs.metadata, "expired", lambda now, limit: fail(OSError("store gone")))
        sweep = ExpirySweep(self.fs)
        sweep.startService()
        self.addCleanup(sweep.stopService)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        del self.fs.metadata.expired
        self.clock.advance(300)
        self.assertEqual(store_files(self.root), [])

    def test_no_sweep_during_copy_back(self):
        """While outage records are being copied back, expiry waits for the next sweep."""
        self.stored("c/old.jpg", NOW - 1)
        self.fs.metadata._copying = True
        sweep = ExpirySweep(self.fs)
        sweep.startService()
        self.addCleanup(sweep.stopService)
        self.assertIn("c/old.jpg", store_files(self.root))
        self.fs.metadata._copying = False
        self.clock.advance(300)
        self.assertNotIn("c/old.jpg", store_files(self.root))

    def test_upload_gets_file_ttl(self):
        """FileTTL gives a record now + TTL; a sooner JWT expiry claim wins."""
        self.fs.file_ttl = 7 * 86400
        self.assertEqual(self.fs.expiry(None), NOW + 7 * 86400)
        self.assertEqual(self.fs.expiry(NOW + 60), NOW + 60)
        self.assertEqual(self.fs.expiry(NOW + 10**9), NOW + 7 * 86400)
        self.fs.file_ttl = 0
        self.assertIsNone(self.fs.expiry(None))
        self.assertEqual(self.fs.expiry(NOW + 60), NOW + 60)


class DrainTests(TestCase):
    """The shutdown drain waits for uploads in progress, and for their answers to leave."""

    @inlineCallbacks
    def test_answer_leaves_before_the_drain_returns(self):
        """
        What follows the drain (shutdown's disconnectAll drops every connection, sent or
        not) does not take the last upload's 201 with it.
        """
        server = LoopbackServer(self)
        protocols = []
        build = server.site.buildProtocol

        def recording(addr):
            protocol = build(addr)
            protocols.append(protocol)
            return protocol

        self.patch(server.site, "buildProtocol", recording)
        accepted: Deferred[None] = Deferred()
        add = server.fs.uploads.add

        def adding(request):
            add(request)
            accepted.callback(None)

        self.patch(server.fs.uploads, "add", adding)
        s = socket.create_connection((server.host, server.portNumber))
        self.addCleanup(s.close)
        s.sendall(
            f"PUT /upload/last.bin?{v_query('last.bin', 2000)} HTTP/1.1\r\nHost: x\r\n"
            "Content-Length: 2000\r\n\r\n".encode()
            + b"a" * 1000
        )
        yield accepted
        drained = Deferred.fromCoroutine(drain_uploads(server.fs, grace=10))

        def disconnectAll(_):
            # What the reactor does during shutdown, once the services have stopped.
            for protocol in protocols:
                protocol.transport.connectionLost(Failure(main.CONNECTION_LOST))

        drained.addCallback(disconnectAll)
        yield deferToThread(s.sendall, b"a" * 1000)
        yield drained

        def answer() -> bytes:
            s.settimeout(10)
            return s.recv(4096)

        received = yield deferToThread(answer)
        self.assertIn(b"201 Created", received)


class SweepLeaseTests(SynchronousTestCase):
    """Two nodes' sweeps on one shared store, on a Clock: one sweeps, the other waits."""

    def setUp(self):
        from hmacd.store.failover import FailoverStore
        from hmacd.store.memory import MemoryStore

        self.clock = Clock()
        self.clock.advance(NOW)
        self.shared = MemoryStore(self.clock)
        self.nodes = []
        for name in ("node-a", "node-b"):
            root = os.path.abspath(self.mktemp())
            os.makedirs(root)
            metadata = FailoverStore(self.shared, clock=self.clock, healthInterval=0)
            metadata.start()
            fs = FileServer(
                secret=SECRET, store_dir=root, reactor=self.clock, metadata=metadata,
                blocking=synchronous,
            )  # fmt: skip
            self.nodes.append((name, root, fs))

    def sweeps(self, **kwargs) -> list[ExpirySweep]:
        from hmacd.leases import SweepLease

        made = []
        for name, _, fs in self.nodes:
            sweep = ExpirySweep(fs, interval=60, **kwargs)
            sweep.lease = SweepLease(fs.metadata, name, ttl=180)
            made.append(sweep)
        return made

    def due(self, relpath: str) -> None:
        # Every node's StoreDir holds a copy: whichever node sweeps deletes its own.
        for _, root, _ in self.nodes:
            touch(root, relpath, NOW)
        self.successResultOf(self.shared.put(record(relpath, expires=NOW - 1)))

    def test_one_sweeper(self):
        """Only the lease holder deletes; the other node's files and sweep stay untouched."""
        self.due("x/old.bin")
        a, b = self.sweeps()
        a.startService()
        self.addCleanup(a.stopService)
        b.startService()
        self.addCleanup(b.stopService)
        self.assertEqual((a.removed, b.removed), (1, 0))
        self.assertTrue(a.lease.held)
        self.assertFalse(b.lease.held)
        self.assertNotIn("x/old.bin", store_files(self.nodes[0][1]))
        self.assertIn("x/old.bin", store_files(self.nodes[1][1]))
        # The holder keeps it sweep after sweep.
        self.due("x/later.bin")
        self.clock.advance(60)
        self.assertEqual((a.removed, b.removed), (2, 0))

    def test_takeover(self):
        """A holder that stops sweeping (dies) is replaced once its lease lapses."""
        self.due("x/1.bin")
        a, b = self.sweeps()
        a.startService()
        a.stopService()  # node A is gone, its lease runs for 180 s
        b.startService()
        self.addCleanup(b.stopService)
        self.due("x/2.bin")
        self.clock.advance(120)
        self.assertEqual(b.removed, 0)
        self.clock.advance(60)
        self.assertEqual(b.removed, 1)
        self.assertTrue(b.lease.held)

    def test_loser_stops_mid_sweep(self):
        """A node whose lease goes to another between two batches stops after its batch."""
        for n in range(5):
            self.due(f"x/{n}.bin")
        a, _ = self.sweeps(batch=2)
        real = a.lease.take
        taken = []

        async def losing() -> bool:
            taken.append(1)
            if len(taken) == 2:
                # Another node took the lease (A's lapsed while it was stalled).
                self.shared._shared[("lease", "sweep")] = ("node-b", NOW + 1000)
            return await real()

        a.lease.take = losing
        a.startService()
        self.addCleanup(a.stopService)
        self.clock.advance(0)  # the sweep yields to the reactor between batches
        self.clock.advance(0)
        self.assertEqual(a.removed, 2)
        self.assertEqual(len(taken), 2)
        self.assertFalse(a.lease.held)

    def test_store_down_no_sweep(self):
        """When the lease cannot be asked for, the node does not sweep."""
        from hmacd.store import StoreUnavailable

        self.due("x/old.bin")
        (a, _) = self.sweeps()
        self.patch(self.shared, "lease", lambda *a: fail(StoreUnavailable("down")))
        a.startService()
        self.addCleanup(a.stopService)
        self.assertEqual(a.removed, 0)
        self.assertFalse(a.lease.held)

    def test_partial_sweep_lease(self):
        """A partial sweep with a lease runs on its holder only."""
        from hmacd.leases import SweepLease

        ran = []
        self.patch(
            __import__("hmacd.housekeeping").housekeeping,
            "sweep_partials",
            lambda storage, older: ran.append(storage) or [],
        )
        services = []
        for name, _, fs in self.nodes:
            service = PartialSweep(fs, lease=SweepLease(fs.metadata, name, 7200, "partial-sweep"))
            service.startService()
            self.addCleanup(service.stopService)
            services.append(service)
        self.assertEqual(len(ran), 1)
        self.assertEqual([s.lease.held for s in services], [True, False])


class SweepLeaseConfigTests(SynchronousTestCase):
    """Which configurations share their store, and the lease they sweep under."""

    def test_local_store_no_lease(self):
        """SQLite alone is this node's own: no lease, sweeps as before."""
        from hmacd.config import Config
        from hmacd.leases import sweep_lease

        self.assertIsNone(sweep_lease(Config(), object(), 60))

    def test_shared_store_lease(self):
        """With Redis (or an SQL fallback) the sweep takes a lease named for this node."""
        from hmacd.config import Config
        from hmacd.leases import default_node_name, sweep_lease

        store = object()
        lease = sweep_lease(Config(redis_addr="127.0.0.1:6379"), store, 60)
        self.assertEqual(
            (lease.store, lease.node, lease.ttl, lease.name),
            (store, default_node_name(), 180, "sweep"),
        )
        lease = sweep_lease(
            Config(fallback_enabled=True, node_name="n1"), store, 5, "partial-sweep"
        )
        self.assertEqual((lease.node, lease.ttl, lease.name), ("n1", 30.0, "partial-sweep"))
