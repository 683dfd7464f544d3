"""
StorageBackend = "s3" composed: the file server gets an S3Storage, the start-up check
names the credential key the store refused, and an outage is logged once per change.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from hmacd.config import parse_config
from hmacd.leases import node_name
from hmacd.services import (
    ObjectStoreService,
    build_file_server,
    storage_builder,
    sweeps,
    timers,
)
from hmacd.storage.local import LocalStorage
from hmacd.storage.s3 import SPOOL_DIR, S3Storage
from hmacd.web import HmacfsSite
from tests.seaweed import shared_mini
from tests.support import memory_metadata


class WiringTests(TestCase):
    """The backend chosen once, at construction, from the config."""

    timeout = 60

    def config(self, **keys: object):
        store = shared_mini()
        root = os.path.abspath(self.mktemp())
        data = {
            "StoreDir": root,
            "StorageBackend": "s3",
            "S3Endpoint": store.endpoint,
            "S3Bucket": store.bucket,
            "S3Prefix": "wiring/",
            **keys,
        }
        return parse_config(data, "t.toml")

    def logged(self) -> list[str]:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events  # type: ignore[return-value]

    def test_local_by_default(self) -> None:
        """Without StorageBackend the file server keeps its local directory, no S3 service."""
        config = parse_config({"StoreDir": os.path.abspath(self.mktemp())}, "t")
        self.assertIsNone(storage_builder(config, reactor, {}))
        fs = build_file_server(config, b"s" * 16, reactor, memory_metadata(reactor))
        self.assertIsInstance(fs.storage, LocalStorage)
        self.assertIsNone(fs.node_claims)  # one host: the claims are StoreDir's record locks
        children = timers(config, fs, HmacfsSite(fs), reactor)
        self.assertFalse([c for c in children if isinstance(c, ObjectStoreService)])

    def test_deduplication_wired(self) -> None:
        """
        Deduplication with S3: the storage shares contents (after the last byte), locks
        them in the file server's metadata store, counts shared bytes and is gauged.
        """
        from hmacd.housekeeping import DedupGauge

        os.environ["HMACFS_S3_ACCESS_KEY"] = "k"
        os.environ["HMACFS_S3_SECRET_KEY"] = "s"
        self.addCleanup(os.environ.pop, "HMACFS_S3_ACCESS_KEY")
        self.addCleanup(os.environ.pop, "HMACFS_S3_SECRET_KEY")
        config = self.config(Deduplication=True)
        fs = build_file_server(config, b"s" * 16, reactor, memory_metadata(reactor))
        storage = fs.storage
        assert isinstance(storage, S3Storage)
        self.assertEqual((storage.dedup, storage.stream), (True, False))
        assert storage.content_locks is not None
        self.assertIs(storage.content_locks.claims.store, fs.metadata)
        self.assertEqual(storage.on_shared, fs.metrics.dedup_bytes.inc)
        self.assertTrue([c for c in sweeps(config, fs) if isinstance(c, DedupGauge)])
        # Off: no gauge, but references made earlier are still unlinked under the locks.
        fs = build_file_server(self.config(), b"s" * 16, reactor, memory_metadata(reactor))
        assert isinstance(fs.storage, S3Storage)
        self.assertEqual((fs.storage.dedup, fs.storage.stream), (False, True))
        self.assertIsNotNone(fs.storage.content_locks)
        self.assertFalse([c for c in sweeps(self.config(), fs) if isinstance(c, DedupGauge)])

    @inlineCallbacks
    def test_s3_backend_built(self):
        """StorageBackend = "s3": an S3Storage with the config's bucket, prefix and sizes."""
        store = shared_mini()
        os.environ["HMACFS_S3_ACCESS_KEY"] = store.access_key
        os.environ["HMACFS_S3_SECRET_KEY"] = store.secret_key
        self.addCleanup(os.environ.pop, "HMACFS_S3_ACCESS_KEY")
        self.addCleanup(os.environ.pop, "HMACFS_S3_SECRET_KEY")
        config = self.config(S3PartSize="6MB")
        fs = build_file_server(config, b"s" * 16, reactor, memory_metadata(reactor))
        storage = fs.storage
        self.assertIsInstance(storage, S3Storage)
        assert isinstance(storage, S3Storage)
        # Nodes sharing the bucket claim paths in the shared metadata store, as this node.
        assert fs.node_claims is not None
        self.assertIs(fs.node_claims.store, fs.metadata)
        self.assertEqual(fs.node_claims.node, node_name(config))
        self.assertEqual(
            (storage.client.bucket, storage.client.prefix, storage.part_size),
            (store.bucket, "wiring/", 6 * 1024 * 1024),
        )
        self.assertEqual(storage.spool.root, os.path.join(config.store_dir, SPOOL_DIR))
        (service,) = [
            c
            for c in timers(config, fs, HmacfsSite(fs), reactor)
            if isinstance(c, ObjectStoreService)
        ]
        service.startService()
        ok = yield storage.check()
        self.assertTrue(ok)
        self.assertEqual((yield deferToThread(storage.exists, "none.txt")), False)
        # The storage's blocking work runs in threads of its own, not the reactor's, whose
        # threads resolve the store's host name for new connections.
        import threading

        name = yield fs.blocking(lambda: threading.current_thread().name)
        self.assertIn("hmacfs-storage", name)
        self.assertEqual((yield fs.blocking(lambda: storage.exists("none.txt"))), False)
        yield service.stopService()

    @inlineCallbacks
    def test_bad_credentials_named(self):
        """Refused credentials at start: one line naming S3AccessKey/S3SecretKey, no secret."""
        events = self.logged()
        config = self.config(S3AccessKey="AKIDWRONG", S3SecretKey="not-the-secret-value")
        fs = build_file_server(config, b"s" * 16, reactor, memory_metadata(reactor))
        storage = fs.storage
        assert isinstance(storage, S3Storage)
        self.addCleanup(storage.client.close)
        self.addCleanup(storage.stop)
        ok = yield storage.check()
        self.assertFalse(ok)
        lines = [formatEvent(e) for e in events if e.get("log_level") is not None]
        named = [line for line in lines if line.startswith("S3AccessKey/S3SecretKey: ")]
        self.assertEqual(len(named), 1, lines)
        self.assertNotIn("\n", named[0])
        self.assertIn("AKIDWRONG", named[0])
        for line in lines:
            self.assertNotIn("not-the-secret-value", line)

    @inlineCallbacks
    def test_outage_logged_once(self):
        """A store that does not answer is logged once however many requests fail."""
        events = self.logged()
        config = self.config(S3Endpoint="http://127.0.0.1:9", S3AccessKey="a", S3SecretKey="b")
        fs = build_file_server(config, b"s" * 16, reactor, memory_metadata(reactor))
        storage = fs.storage
        assert isinstance(storage, S3Storage)
        self.addCleanup(storage.client.close)
        self.addCleanup(storage.stop)
        for _ in range(3):
            yield storage.check()
        down = [e for e in events if "object store unavailable" in formatEvent(e)]
        self.assertEqual(len(down), 1)
        self.assertFalse(storage.available)
