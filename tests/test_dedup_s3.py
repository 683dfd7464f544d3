"""
Deduplication in an object store (hmacd.storage.s3_dedup) against a real SeaweedFS: one
content object per SHA-256, a reference and a marker per path, the content freed with
its last reference, locks shared through the metadata store, the IStorage contract.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import replace

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from hmacd.config import S3_MIN_PART
from hmacd.storage import Conflict, StorageUnavailable
from hmacd.storage.s3 import S3Storage
from hmacd.storage.s3_dedup import (
    CAS,
    CONTENT_META,
    REFS,
    ContentLocks,
    content_key,
    marker_key,
)
from tests.storage_contract import StorageContractMixin, record_for
from tests.support import memory_metadata
from tests.test_storage_s3 import SeaweedStorageCase, in_a_thread, lose_answers


class DedupCase(SeaweedStorageCase):
    """An S3Storage with Deduplication, its locks in a metadata store of the test's own."""

    def makeStorage(self) -> S3Storage:
        self.client = self.makeClient()
        # stream is refused: a deduplicated body goes after its last byte.
        storage = self.storageOf(self.client, stream=True, dedup=True)
        self.metadata = memory_metadata(reactor)
        storage.content_locks = ContentLocks(self.metadata, "test", reactor, wait=5.0)
        self.shared: list[int] = []
        storage.on_shared = self.shared.append
        return storage


@in_a_thread
class S3DedupStorageContractTests(StorageContractMixin, DedupCase):
    """The IStorage contract, every file a reference to a shared content."""

    makeStorage = DedupCase.makeStorage


class S3DedupTests(DedupCase):
    def setUp(self) -> None:
        self.storage = self.makeStorage()

    def publish(self, relpath: str, body: bytes, **facts: object) -> None:
        """Blocking: write, seal and publish C{body} as an upload does."""
        writer = self.storage.writer(relpath)
        for i in range(0, len(body), 64 * 1024):
            writer.write(body[i : i + 64 * 1024])
        writer.seal()
        writer.publish(replace(record_for(relpath, body), **facts))  # type: ignore[arg-type]

    @inlineCallbacks
    def keys(self):
        listed = yield self.client.list_objects_v2()
        return sorted(o.key for o in listed.objects)

    @inlineCallbacks
    def test_same_content_stored_once(self):
        """Two paths of one content: one content object, two references with their own facts."""
        body = os.urandom(3000)
        sha = hashlib.sha256(body).hexdigest()
        yield deferToThread(self.publish, "a/cat.jpg", body, content_type="image/jpeg")
        yield deferToThread(
            self.publish, "b/cat.png", body, content_type="image/png", uploader="eve@example"
        )
        self.assertEqual(
            (yield self.keys()),
            sorted(
                [
                    "a/cat.jpg",
                    "b/cat.png",
                    content_key(sha),
                    marker_key(sha, "a/cat.jpg"),
                    marker_key(sha, "b/cat.png"),
                ]
            ),
        )
        self.assertEqual(self.shared, [3000])  # the second upload sent no bytes
        reference = yield self.client.head_object("b/cat.png")
        self.assertEqual((reference.length, reference.metadata[CONTENT_META]), (0, sha))
        for path, kind, uploader in (
            ("a/cat.jpg", "image/jpeg", None),
            ("b/cat.png", "image/png", "eve@example"),
        ):
            stored = yield deferToThread(self.storage.open, path)
            facts = stored.facts()
            self.assertEqual((facts.content_type, facts.uploader), (kind, uploader))
            self.assertEqual((stored.size, stored.content_type), (3000, kind))
            self.assertEqual((yield deferToThread(stored.read, 0, 5000)), body)
            opened = yield self.storage.open_async(path)
            self.assertEqual((opened.key, opened.size), (content_key(sha), 3000))
        # Only the paths are files.
        self.assertEqual(
            (yield deferToThread(lambda: sorted(self.storage.files()))), ["a/cat.jpg", "b/cat.png"]
        )
        census = yield deferToThread(self.storage.dedup_census)
        self.assertEqual(
            (census.contents, census.references, census.stored_bytes, census.saved_bytes),
            (1, 2, 3000, 3000),
        )

    @inlineCallbacks
    def test_last_reference_frees_the_content(self):
        """Deleting a path keeps the content while another reads it; the last takes it."""
        body = os.urandom(S3_MIN_PART + 10)  # a multipart content
        sha = hashlib.sha256(body).hexdigest()
        yield deferToThread(self.publish, "one.bin", body)
        yield deferToThread(self.publish, "two.bin", body)
        self.assertTrue((yield deferToThread(self.storage.delete, "one.bin")))
        self.assertEqual(
            (yield self.keys()), sorted(["two.bin", content_key(sha), marker_key(sha, "two.bin")])
        )
        stored = yield deferToThread(self.storage.open, "two.bin")
        self.assertEqual((yield deferToThread(stored.read, 0, len(body))), body)
        self.assertTrue((yield deferToThread(self.storage.delete, "two.bin")))
        self.assertEqual((yield self.keys()), [])
        self.assertFalse((yield deferToThread(self.storage.delete, "two.bin")))

    @inlineCallbacks
    def losesTheName(self, relpath: str, winner: bytes, loser: bytes):
        """A writer for relpath, whose name C{winner} then takes: C{loser} is a Conflict."""
        writer = self.storage.writer(relpath)
        yield deferToThread(self.publish, relpath, winner)
        writer.write(loser)
        yield deferToThread(writer.seal)
        with self.assertRaises(Conflict):
            yield deferToThread(writer.publish, record_for(relpath, loser))

    @inlineCallbacks
    def test_taken_name_leaves_nothing(self):
        """A name taken meanwhile: Conflict, and the new content goes again with its marker."""
        yield deferToThread(self.publish, "x.txt", b"first")
        yield self.losesTheName("y.txt", b"winner", b"loser")
        sha = hashlib.sha256(b"winner").hexdigest()
        first = hashlib.sha256(b"first").hexdigest()
        self.assertEqual(
            (yield self.keys()),
            sorted(
                [
                    "x.txt",
                    "y.txt",
                    content_key(first),
                    content_key(sha),
                    marker_key(first, "x.txt"),
                    marker_key(sha, "y.txt"),
                ]
            ),
        )

    @inlineCallbacks
    def test_taken_name_same_content_keeps_its_marker(self):
        """The same bytes at a taken name: the marker is the one already there, and stays."""
        yield deferToThread(self.publish, "same.txt", b"same")
        yield self.losesTheName("other.txt", b"same", b"same")
        yield deferToThread(self.storage.delete, "same.txt")
        stored = yield deferToThread(self.storage.open, "other.txt")
        self.assertEqual((yield deferToThread(stored.read, 0, 10)), b"same")
        yield deferToThread(self.storage.delete, "other.txt")
        self.assertEqual((yield self.keys()), [])

    @inlineCallbacks
    def test_sweep_takes_unreferenced_contents_only(self):
        """A content no marker names (a process died) goes at the sweep once old enough."""
        yield deferToThread(self.publish, "kept.txt", b"kept")
        orphan = content_key("ab" * 32)
        yield self.client.put_object(orphan, b"nobody reads me")
        removed = yield deferToThread(self.storage.sweep_temps, time.time() - 3600)
        self.assertNotIn(orphan, removed)
        census = yield deferToThread(self.storage.dedup_census)
        self.assertEqual((census.contents, census.orphans), (1, 1))
        removed = yield deferToThread(self.storage.sweep_temps, time.time() + 3600)
        self.assertEqual(removed, [orphan])
        stored = yield deferToThread(self.storage.open, "kept.txt")
        self.assertEqual((yield deferToThread(stored.read, 0, 10)), b"kept")

    @inlineCallbacks
    def test_link_waits_for_the_content_lock(self):
        """Another node holding a content's lock: a link waits for it, then goes on."""
        body = b"locked content"
        sha = hashlib.sha256(body).hexdigest()
        held = yield self.metadata.claim(CAS + sha, "other-node/x", 15.0)
        self.assertTrue(held)
        publishing = deferToThread(self.publish, "waits.txt", body)
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertFalse(publishing.called)
        # The marker and the content may go ahead; the reference waits for the lock.
        self.assertNotIn("waits.txt", (yield self.keys()))
        yield self.metadata.release(CAS + sha, "other-node/x")
        yield publishing
        self.assertIn("waits.txt", (yield self.keys()))

    @inlineCallbacks
    def test_lock_kept_too_long(self):
        """A lock held past the wait: the upload is refused as unavailable, nothing is left."""
        self.storage.content_locks = ContentLocks(self.metadata, "test", reactor, wait=0.3)
        body = b"never"
        sha = hashlib.sha256(body).hexdigest()
        yield self.metadata.claim(CAS + sha, "other/x", 15.0)
        with self.assertRaises(StorageUnavailable):
            yield deferToThread(self.publish, "never.txt", body)
        # No reference, no content; the marker could not be forgotten under the lock
        # either: it stays for the sweep, which removes it once the lock is free.
        self.assertEqual((yield self.keys()), [marker_key(sha, "never.txt")])
        yield self.metadata.release(CAS + sha, "other/x")
        self.storage.multipart_ttl = -3600  # every marker is old enough to be checked
        removed = yield deferToThread(self.storage.sweep_temps, time.time() + 3600)
        self.assertIn(marker_key(sha, "never.txt"), removed)
        self.assertEqual((yield self.keys()), [])
        self.assertEqual((yield self.keys()), [])

    @inlineCallbacks
    def test_reindex_reads_references(self):
        """reindex records a reference from its own facts, with the content's size."""
        from hmacd.reindex import _record_of

        body = os.urandom(100)
        yield deferToThread(self.publish, "r.txt", body, uploader="u@example")
        found = yield deferToThread(_record_of, self.storage, "r.txt", 0)
        self.assertEqual(found, (replace(record_for("r.txt", body), uploader="u@example"), True))

    @inlineCallbacks
    def test_markers_listed_under_refs(self):
        """Every marker's body is the key of its reference (a census can name them)."""
        yield deferToThread(self.publish, "m/ünï.txt", b"m")
        sha = hashlib.sha256(b"m").hexdigest()
        answer = yield self.client.get_object(marker_key(sha, "m/ünï.txt"))
        from tests.test_s3 import Sink

        sink = Sink()
        yield answer.deliver(sink)
        self.assertEqual(b"".join(sink.data), "m/ünï.txt".encode())
        self.assertTrue(marker_key(sha, "m/ünï.txt").startswith(REFS))

    @inlineCallbacks
    def test_unlink_and_link_race_across_nodes(self):
        """
        One node deletes the last path of a content while another links a new path to it,
        the content's removal slowed so that the link comes between the check for markers
        and the removal: the new path always reads its bytes, and nothing is left after.
        """
        client = self.storage.client
        delete_object = client.delete_object

        def slow_delete(key: str):
            if key.startswith(CAS):
                return deferLater(reactor, 0.4, delete_object, key)
            return delete_object(key)

        client.delete_object = slow_delete  # type: ignore[method-assign]
        other = self.storageOf(self.makeClient(), dedup=True)
        other.content_locks = ContentLocks(self.metadata, "other", reactor, wait=5.0)
        body = os.urandom(2000)

        def publish_there(relpath: str) -> None:
            writer = other.writer(relpath)
            writer.write(body)
            writer.seal()
            writer.publish(record_for(relpath, body))

        for i in range(3):
            yield deferToThread(self.publish, f"old/{i}.bin", body)
            deleting = deferToThread(self.storage.delete, f"old/{i}.bin")
            yield deferLater(reactor, 0.15, lambda: None)  # in the window
            linking = deferToThread(publish_there, f"new/{i}.bin")
            yield deleting
            yield linking
            stored = yield deferToThread(self.storage.open, f"new/{i}.bin")
            self.assertIsNotNone(stored, i)
            self.assertEqual((yield deferToThread(stored.read, 0, 5000)), body)
            yield deferToThread(other.delete, f"new/{i}.bin")
            self.assertEqual((yield self.keys()), [], i)

    @inlineCallbacks
    def test_reference_written_answer_lost(self):
        """The reference's PUT lands but its answer is lost: the upload succeeded, whole."""
        lose_answers(
            self,
            self.client,
            "put_object",
            lambda key, body, *a, **kw: len(a) > 2 and CONTENT_META in a[2],
        )
        body = os.urandom(3000)
        sha = hashlib.sha256(body).hexdigest()
        yield deferToThread(self.publish, "lost.bin", body)
        self.assertEqual(
            (yield self.keys()),
            sorted(["lost.bin", content_key(sha), marker_key(sha, "lost.bin")]),
        )
        stored = yield deferToThread(self.storage.open, "lost.bin")
        self.assertEqual((yield deferToThread(stored.read, 0, 5000)), body)

    @inlineCallbacks
    def test_content_written_answer_lost(self):
        """The content's PutObject lands, its answer lost: the retry meets it, ours."""
        lose_answers(self, self.client, "put_object", lambda key, *a, **kw: key.startswith(CAS))
        body = os.urandom(3000)
        yield deferToThread(self.publish, "c.bin", body)
        stored = yield deferToThread(self.storage.open, "c.bin")
        self.assertEqual((yield deferToThread(stored.read, 0, 5000)), body)

    @inlineCallbacks
    def test_withdrawn_while_the_metadata_store_is_down(self):
        """
        Deleting a reference when the locks cannot be had (the metadata store is down, as
        when an upload is withdrawn for want of its record): the reference goes all the
        same; its marker and content stay for the sweep.
        """
        body = b"withdrawn"
        sha = hashlib.sha256(body).hexdigest()
        yield deferToThread(self.publish, "w.bin", body)

        class Down:
            def claim(self, *args):
                from twisted.internet.defer import fail

                return fail(ConnectionRefusedError("metadata store down"))

        locks = self.storage.content_locks
        self.storage.content_locks = ContentLocks(Down(), "test", reactor, wait=0.5)
        with self.assertRaises(StorageUnavailable):
            yield deferToThread(self.storage.delete, "w.bin")
        self.assertIsNone((yield deferToThread(self.storage.open, "w.bin")))
        self.storage.content_locks = locks
        self.storage.multipart_ttl = -3600
        removed = yield deferToThread(self.storage.sweep_temps, time.time() + 3600)
        self.assertEqual(removed, [marker_key(sha, "w.bin"), content_key(sha)])

    @inlineCallbacks
    def test_withdrawn_in_the_reactor_thread(self):
        """From the reactor thread (an upload withdrawn) the reference goes at once."""
        yield deferToThread(self.publish, "r.bin", b"r")
        self.assertTrue(self.storage.delete("r.bin"))
        for _ in range(100):
            if "r.bin" not in (yield self.keys()):
                break
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertNotIn("r.bin", (yield self.keys()))

    @inlineCallbacks
    def test_lapsed_lock_removes_no_content(self):
        """A lock whose claim lapsed removes nothing: another node may hold it now."""
        body = b"lapsed"
        sha = hashlib.sha256(body).hexdigest()
        yield deferToThread(self.publish, "l.bin", body)
        yield self.client.delete_object(marker_key(sha, "l.bin"))

        class Lapsed:
            kept = False

        dropped = yield deferToThread(self.storage._drop_unreferenced, sha, Lapsed())
        self.assertFalse(dropped)
        self.assertIn(content_key(sha), (yield self.keys()))

    @inlineCallbacks
    def test_stale_marker_swept_live_one_kept(self):
        """A marker whose reference is gone goes at the sweep; a marker in use stays."""
        body = b"stale"
        sha = hashlib.sha256(body).hexdigest()
        yield deferToThread(self.publish, "gone.bin", body)
        yield deferToThread(self.publish, "kept.bin", body)
        yield self.client.delete_object("gone.bin")  # a crash after the reference went
        self.storage.multipart_ttl = -3600
        removed = yield deferToThread(self.storage.sweep_temps, time.time() + 3600)
        self.assertEqual(removed, [marker_key(sha, "gone.bin")])
        self.assertEqual(
            (yield self.keys()), sorted(["kept.bin", content_key(sha), marker_key(sha, "kept.bin")])
        )

    @inlineCallbacks
    def test_content_name_must_be_a_sha256(self):
        """A reference naming anything but a SHA-256 is no reference: read and deleted alone."""
        yield deferToThread(self.publish, "victim.bin", b"victim")
        yield self.client.put_object("odd.bin", b"", 0, "text/plain", {CONTENT_META: "../victim"})
        stored = yield deferToThread(self.storage.open, "odd.bin")
        self.assertEqual(stored.size, 0)
        self.assertTrue((yield deferToThread(self.storage.delete, "odd.bin")))
        stored = yield deferToThread(self.storage.open, "victim.bin")
        self.assertEqual((yield deferToThread(stored.read, 0, 10)), b"victim")

    @inlineCallbacks
    def test_many_uploads_of_one_body_at_once(self):
        """
        Eight uploads of one body at once on one node: all stored, one content.  (Eight:
        the reactor's pool keeps threads free for resolving the store's name, as the
        server's storage threads, a pool of their own, always do.)
        """
        from twisted.internet.defer import gatherResults

        body = os.urandom(1000)
        sha = hashlib.sha256(body).hexdigest()
        names = [f"many/{i}.bin" for i in range(8)]
        yield gatherResults([deferToThread(self.publish, name, body) for name in names])
        keys = yield self.keys()
        self.assertEqual(
            keys, sorted([*names, content_key(sha), *(marker_key(sha, n) for n in names)])
        )
        self.assertEqual(self.storage.content_locks._local, {})  # nothing left behind
