"""
An S3 bucket behind hmacd.storage.IStorage (hmacd.storage.s3), on a real SeaweedFS: the
contract every backend keeps, and what only the object store does (multipart, metadata,
If-None-Match, the sweep of abandoned multipart uploads, refusing the reactor thread).
"""

from __future__ import annotations

import hashlib
import os
import time

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from hmacd.config import S3_MIN_PART
from hmacd.paths import PathRefused
from hmacd.s3 import PreconditionFailed, S3Client, S3Unavailable
from hmacd.storage import Conflict, StorageUnavailable
from hmacd.storage.s3 import FACTS_META, SHA256_META, ReactorThreadCall, S3Storage, StoreFailed
from hmacd.storage.s3_writer import _metadata
from tests.seaweed import shared_mini
from tests.storage_contract import StorageContractMixin, record_for
from tests.support import synchronous

MiB = 1024 * 1024


def in_a_thread(cls: type) -> type:
    """
    Run each of the contract's tests in a worker thread: the storage's blocking methods
    wait there for the reactor, which runs on in trial's thread.
    """
    for name in dir(StorageContractMixin):
        if not name.startswith("test_"):
            continue

        def run(self, _name: str = name):  # type: ignore[no-untyped-def]
            return deferToThread(getattr(StorageContractMixin, _name), self)

        run.__name__ = name
        run.__doc__ = getattr(StorageContractMixin, name).__doc__
        setattr(cls, name, run)
    return cls


def lose_answers(testCase: TestCase, client: S3Client, method: str, when=None) -> None:
    """
    The client's C{method} does its work, then fails as if its answer were lost: for the
    calls C{when(*args, **kw)} says, or (without C{when}) for the first call only.
    """
    real = getattr(client, method)
    calls: list[bool] = []

    def lossy(*args, **kw):
        d = real(*args, **kw)
        first = not calls
        calls.append(True)
        if (when is None and first) or (when is not None and when(*args, **kw)):

            def lost(_):
                raise S3Unavailable("the connection was lost before the answer")

            d.addCallback(lost)
        return d

    setattr(client, method, lossy)
    testCase.addCleanup(setattr, client, method, real)


class SeaweedStorageCase(TestCase):
    """An S3Storage over the process's SeaweedFS, under a prefix of the test's own."""

    timeout = 120

    def makeClient(self, **kw: object) -> S3Client:
        store = shared_mini()
        options: dict = dict(prefix=".".join(self.id().split(".")[-2:]) + "/", timeout=10.0)
        options.update(kw)
        client = S3Client(
            reactor,
            options.pop("endpoint", store.endpoint),
            store.bucket,
            store.access_key,
            store.secret_key,
            **options,
        )
        self.addCleanup(client.close)
        return client

    # S3StreamUploads: large bodies go to their name as they arrive.
    stream = False

    def makeStorage(self) -> S3Storage:
        self.client = self.makeClient()
        return self.storageOf(self.client, stream=self.stream)

    def storageOf(self, client: S3Client, **options: bool) -> S3Storage:
        """An S3Storage on client with 5 MiB parts, its spool in a temp of the test's own."""
        storage = S3Storage(
            client,
            reactor,
            os.path.abspath(self.mktemp()),
            synchronous,
            threshold=S3_MIN_PART,
            part_size=S3_MIN_PART,
            **options,
        )
        self.addCleanup(storage.stop)
        return storage


@in_a_thread
class S3StorageContractTests(StorageContractMixin, SeaweedStorageCase):
    """The IStorage contract on a SeaweedFS bucket."""

    makeStorage = SeaweedStorageCase.makeStorage


@in_a_thread
class S3StreamedStorageContractTests(S3StorageContractTests):
    """The same contract with S3StreamUploads = true."""

    stream = True


class S3StorageTests(SeaweedStorageCase):
    """What only the object store does (large bodies streamed as they arrive)."""

    stream = True

    def setUp(self) -> None:
        self.storage = self.makeStorage()

    def publish(self, relpath: str, body: bytes, content_type: str = "text/plain") -> None:
        """Blocking: write, seal and publish C{body} as an upload does."""
        writer = self.storage.writer(relpath)
        for i in range(0, len(body), 64 * 1024):
            writer.write(body[i : i + 64 * 1024])
        digest = writer.seal()
        record = record_for(relpath, body)
        self.assertEqual(digest, record.sha256)
        from dataclasses import replace

        writer.publish(replace(record, content_type=content_type))

    @inlineCallbacks
    def test_multipart_round_trip(self):
        """Above the threshold a body goes up in parts; the object has the signed type and facts."""
        body = os.urandom(2 * S3_MIN_PART + 12345)
        yield deferToThread(self.publish, "big/blob.bin", body, "application/octet-stream")
        head = yield self.client.head_object("big/blob.bin")
        self.assertEqual(head.length, len(body))
        self.assertEqual(head.metadata[SHA256_META], hashlib.sha256(body).hexdigest())
        self.assertIn(FACTS_META, head.metadata)
        stored = yield deferToThread(self.storage.open, "big/blob.bin")
        facts = stored.facts()
        self.assertEqual(facts.content_type, "application/octet-stream")
        self.assertEqual(facts.sha256, hashlib.sha256(body).hexdigest())
        middle = yield deferToThread(stored.read, S3_MIN_PART - 10, 20)
        self.assertEqual(middle, body[S3_MIN_PART - 10 : S3_MIN_PART + 10])
        uploads = yield self.client.list_multipart_uploads()
        self.assertEqual(uploads, [])

    @inlineCallbacks
    def waitForUploads(self, predicate, what: str):
        """The multipart uploads in progress, once predicate(them) holds (5 s at most)."""
        for _ in range(100):
            uploads = yield self.client.list_multipart_uploads()
            if predicate(uploads):
                return uploads
            yield deferLater(reactor, 0.05, lambda: None)
        self.fail(f"never: {what} ({uploads})")

    def writeInReactor(self, writer, body: bytes) -> None:
        """Feed a writer as an upload does: 64 KiB at a time, in the reactor thread."""
        for i in range(0, len(body), 64 * 1024):
            writer.write(body[i : i + 64 * 1024])

    @inlineCallbacks
    def test_large_body_streams_before_its_last_byte(self):
        """
        Above the threshold, parts go to a multipart upload of the object's own name as
        they arrive, begun with the draft facts; at the end the SHA-256 joins them.
        """
        from dataclasses import replace

        body = os.urandom(3 * S3_MIN_PART + 100)
        record = replace(record_for("stream/big.bin", body), content_type="image/png")
        draft = replace(record, sha256="")
        writer = self.storage.writer("stream/big.bin", draft)
        self.writeInReactor(writer, body[: 2 * S3_MIN_PART + 10])
        # Before the body is whole, the store has an upload to the name with parts in it.
        (upload,) = yield self.waitForUploads(lambda u: len(u) == 1, "a multipart upload")
        self.assertEqual(upload.key, "stream/big.bin")
        for _ in range(100):
            parts = yield self.client.list_parts(upload.key, upload.upload_id)
            if parts:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(parts)
        self.assertFalse((yield deferToThread(self.storage.exists, "stream/big.bin")))
        self.writeInReactor(writer, body[2 * S3_MIN_PART + 10 :])
        digest = yield deferToThread(writer.seal)
        self.assertEqual(digest, record.sha256)
        yield deferToThread(writer.publish, record)
        stored = yield deferToThread(self.storage.open, "stream/big.bin")
        self.assertEqual(stored.facts(), record)
        self.assertEqual(stored.content_type, "image/png")
        self.assertEqual(stored.metadata[SHA256_META], record.sha256)
        self.assertEqual((yield deferToThread(stored.read, 0, len(body))), body)
        # Nothing else is left, in the store or the spool.
        self.assertEqual((yield self.client.list_multipart_uploads()), [])
        listed = yield self.client.list_objects_v2()
        self.assertEqual([o.key for o in listed.objects], ["stream/big.bin"])
        self.assertEqual(os.listdir(self.storage.spool.root), [])

    @inlineCallbacks
    def test_streamed_hash_never_joined(self):
        """
        A streamed object whose facts never got their SHA-256 (the copy failed, or the
        process died after completing it) is not served by those facts, and reindex
        records it from them with the digest of its bytes.
        """
        from dataclasses import replace

        from hmacd.reindex import _record_of

        body = os.urandom(S3_MIN_PART + 7)
        record = replace(
            record_for("stream/half.bin", body), uploader="a@example.org", content_type="image/png"
        )
        draft = replace(record, sha256="")
        upload_id = yield self.client.create_multipart_upload(
            "stream/half.bin", "image/png", _metadata(draft)
        )
        etag = yield self.client.upload_part("stream/half.bin", upload_id, 1, body)
        yield self.client.complete_multipart_upload("stream/half.bin", upload_id, [(1, etag)])
        stored = yield deferToThread(self.storage.open, "stream/half.bin")
        self.assertIsNone(stored.facts())
        self.assertEqual(stored.draft(), draft)
        found = yield deferToThread(_record_of, self.storage, "stream/half.bin", 0)
        self.assertEqual(found, (record, True))

    @inlineCallbacks
    def test_streamed_body_never_overwrites(self):
        """A streamed body whose name was taken meanwhile is a Conflict; the first stands."""
        body = os.urandom(2 * S3_MIN_PART + 1)
        writer = self.storage.writer("stream/taken.bin")
        self.writeInReactor(writer, body)
        yield self.waitForUploads(lambda u: len(u) == 1, "a multipart upload")
        yield deferToThread(self.publish, "stream/taken.bin", b"first")
        yield deferToThread(writer.seal)
        with self.assertRaises(Conflict):
            yield deferToThread(writer.publish, record_for("stream/taken.bin", body))
        stored = yield deferToThread(self.storage.open, "stream/taken.bin")
        self.assertEqual((yield deferToThread(stored.read, 0, 100)), b"first")
        self.assertEqual((yield self.client.list_multipart_uploads()), [])
        listed = yield self.client.list_objects_v2()
        self.assertEqual([o.key for o in listed.objects], ["stream/taken.bin"])

    @inlineCallbacks
    def test_discarded_stream_leaves_nothing(self):
        """An upload broken off mid-stream aborts its multipart upload and its spool file."""
        writer = self.storage.writer("stream/broken.bin")
        self.writeInReactor(writer, os.urandom(2 * S3_MIN_PART + 1))
        yield self.waitForUploads(lambda u: len(u) == 1, "a multipart upload")
        writer.discard()
        yield self.waitForUploads(lambda u: u == [], "the multipart upload aborted")
        self.assertEqual(os.listdir(self.storage.spool.root), [])
        listed = yield self.client.list_objects_v2()
        self.assertEqual(listed.objects, [])

    @inlineCallbacks
    def test_multipart_never_overwrites(self):
        """A multipart publish at a taken name is a Conflict, and leaves no upload behind."""
        yield deferToThread(self.publish, "taken.bin", b"first")
        body = os.urandom(S3_MIN_PART + 1)
        # Writer first, then the name is taken: only If-None-Match can catch it.
        writer = yield deferToThread(self.storage.writer, "late.bin")
        yield deferToThread(self.publish, "late.bin", b"first")
        writer.write(body)
        yield deferToThread(writer.seal)
        with self.assertRaises(Conflict):
            yield deferToThread(writer.publish, record_for("late.bin", body))
        stored = yield deferToThread(self.storage.open, "late.bin")
        self.assertEqual((yield deferToThread(stored.read, 0, 100)), b"first")
        self.assertEqual((yield self.client.list_multipart_uploads()), [])
        self.assertEqual(os.listdir(self.storage.spool.root), [])

    @inlineCallbacks
    def test_utf8_facts(self):
        """Facts with UTF-8 (a JID, a type parameter) travel as ASCII metadata and come back."""
        from dataclasses import replace

        record = replace(record_for("u.txt", b"u"), uploader="jörg@example.org")

        def go() -> object:
            writer = self.storage.writer("u.txt")
            writer.write(b"u")
            writer.seal()
            writer.publish(record)
            stored = self.storage.open("u.txt")
            return stored.facts()

        self.assertEqual((yield deferToThread(go)), record)

    @inlineCallbacks
    def test_put_answer_lost(self):
        """A PutObject whose answer is lost: the retry meets the object, which is ours."""
        lose_answers(self, self.client, "put_object")
        yield deferToThread(self.publish, "lost/small.txt", b"small")
        stored = yield deferToThread(self.storage.open, "lost/small.txt")
        self.assertEqual((yield deferToThread(stored.read, 0, 10)), b"small")

    @inlineCallbacks
    def test_streamed_complete_answer_lost(self):
        """A streamed upload completed with its answer lost is ours: published, its hash on."""
        from dataclasses import replace

        lose_answers(self, self.client, "complete_multipart_upload")
        body = os.urandom(2 * S3_MIN_PART + 100)
        record = record_for("lost/big.bin", body)
        writer = self.storage.writer("lost/big.bin", replace(record, sha256=""))
        self.writeInReactor(writer, body)
        yield deferToThread(writer.seal)
        yield deferToThread(writer.publish, record)
        stored = yield deferToThread(self.storage.open, "lost/big.bin")
        self.assertEqual(stored.facts(), record)
        self.assertEqual((yield self.client.list_multipart_uploads()), [])

    @inlineCallbacks
    def test_hash_copy_only_onto_the_completed_object(self):
        """The copy that adds the SHA-256 carries If-Match: a different source is refused."""
        etag = yield self.client.put_object("m.txt", b"one", 3, "text/plain")
        with self.assertRaises(PreconditionFailed):
            yield self.client.copy_object("m.txt", "m.txt", "text/plain", {}, False, '"0123"')
        yield self.client.copy_object("m.txt", "m.txt", "image/png", {}, False, etag)
        head = yield self.client.head_object("m.txt")
        self.assertEqual(head.content_type, "image/png")

    @inlineCallbacks
    def test_sweep_spares_multipart_uploads_younger_than_the_ttl(self):
        """A multipart upload goes on as long as ResumableTTL (a large body streamed slowly)."""
        yield self.client.create_multipart_upload("slow.bin")
        self.storage.multipart_ttl = 3600
        removed = yield deferToThread(self.storage.sweep_temps, time.time() + 3600)
        self.assertEqual(removed, [])
        self.assertEqual(len((yield self.client.list_multipart_uploads())), 1)

    @inlineCallbacks
    def test_sweep_aborts_abandoned_multipart(self):
        """The sweep aborts multipart uploads begun before the cut-off, never an object."""
        yield deferToThread(self.publish, "kept.txt", b"kept")
        old = yield self.client.create_multipart_upload("crashed.bin")
        self.storage.multipart_ttl = -3600  # older than ResumableTTL
        removed = yield deferToThread(self.storage.sweep_temps, time.time() - 3600)
        self.assertEqual(removed, [])
        removed = yield deferToThread(self.storage.sweep_temps, time.time() + 3600)
        self.assertEqual(removed, [f"crashed.bin (multipart {old})"])
        self.assertEqual((yield self.client.list_multipart_uploads()), [])
        self.assertEqual(list((yield deferToThread(list, self.storage.files()))), ["kept.txt"])

    def test_reactor_thread_refused(self) -> None:
        """A blocking method called in the reactor thread refuses rather than deadlocks."""
        self.assertRaises(ReactorThreadCall, self.storage.exists, "x.txt")
        # A writer is made there (an upload's head): the store is not asked.
        self.storage.writer("x.txt").discard()

    def test_names_out_of_the_store(self) -> None:
        """A name leading out of the store or into a dot directory gets no writer."""
        self.assertRaises(PathRefused, self.storage.writer, "../x.txt")
        self.assertRaises(PathRefused, self.storage.writer, ".hmacfs/x.txt")

    @inlineCallbacks
    def test_unreachable_store(self):
        """A store that does not answer is an OSError (StoreFailed), not a hang."""
        storage = S3Storage(
            self.makeClient(endpoint="http://127.0.0.1:9", timeout=2.0),
            reactor,
            os.path.abspath(self.mktemp()),
            synchronous,
        )
        self.addCleanup(storage.stop)
        with self.assertRaises(StoreFailed) as caught:
            yield deferToThread(storage.exists, "x.txt")
        self.assertIsInstance(caught.exception, OSError)
        self.assertFalse(storage.available)
        # Known down: an upload's head is refused before its body.
        self.assertRaises(StorageUnavailable, storage.writer, "x.txt")


class S3AfterLastByteTests(SeaweedStorageCase):
    """A large body sent after its last byte (the default): its parts go several at once."""

    def setUp(self) -> None:
        self.storage = self.makeStorage()

    publish = S3StorageTests.publish

    @inlineCallbacks
    def test_parts_in_flight_round_trip(self):
        """More parts than go at once: the object is whole, in order, with its facts."""
        from hmacd.storage.s3 import PARTS_IN_FLIGHT

        body = os.urandom((PARTS_IN_FLIGHT + 2) * S3_MIN_PART + 999)
        yield deferToThread(self.publish, "many/parts.bin", body, "application/pdf")
        head = yield self.client.head_object("many/parts.bin")
        self.assertEqual(head.metadata[SHA256_META], hashlib.sha256(body).hexdigest())
        stored = yield deferToThread(self.storage.open, "many/parts.bin")
        for offset in (0, S3_MIN_PART - 5, 3 * S3_MIN_PART + 7, len(body) - 100):
            got = yield deferToThread(stored.read, offset, 100)
            self.assertEqual(got, body[offset : offset + 100])
        self.assertEqual((yield self.client.list_multipart_uploads()), [])

    @inlineCallbacks
    def test_failed_part_leaves_nothing(self):
        """One part refused (twice): a StoreFailed, no object, no upload, no spool file."""
        from twisted.internet.defer import fail

        from hmacd.s3 import S3Unavailable

        real = self.client.upload_part

        def upload_part(key, upload_id, number, body, length=None, **kw):
            if number == 3:
                return fail(S3Unavailable("part 3 refused"))
            return real(key, upload_id, number, body, length, **kw)

        self.client.upload_part = upload_part
        body = os.urandom(5 * S3_MIN_PART)
        with self.assertRaises(StoreFailed):
            yield deferToThread(self.publish, "failed/parts.bin", body)
        self.client.upload_part = real
        self.assertIsNone((yield deferToThread(self.storage.open, "failed/parts.bin")))
        self.assertEqual((yield self.client.list_multipart_uploads()), [])
        self.assertEqual(os.listdir(self.storage.spool.root), [])
