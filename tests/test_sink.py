"""
Tests for hmacd.sink: the two sinks keep one contract (write -> bool, drained, commit ->
Stored | Partial, abort, release), each documents what abort leaves, and Uploads tells the
shutdown drain when no body is being received.
"""

from __future__ import annotations

import hashlib
import os

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hmacd.claims import PathBusy
from hmacd.core import FileServer
from hmacd.sink import (
    ChunkInProgress,
    OffsetMismatch,
    Partial,
    ResumablePiece,
    Sink,
    Stored,
    Uploads,
    WholeUpload,
    partial_offset,
)
from tests.support import SECRET, memory_metadata, store_files, synchronous


class SinkContractMixin:
    """What every sink does, whatever it is; subclasses say how to make one of 6 bytes."""

    fs: FileServer

    def make(self, relpath: str) -> Sink:
        raise NotImplementedError

    def setUp(self) -> None:
        clock = Clock()
        root = self.mktemp()
        os.makedirs(root)
        self.fs = FileServer(
            secret=SECRET,
            store_dir=root,
            reactor=clock,
            metadata=memory_metadata(clock),
            blocking=synchronous,
        )

    def test_write_is_back_pressure(self) -> None:
        """write() says, as a bool, whether to stop reading; it counts what it took."""
        sink = self.make("a/b.bin")
        self.assertIs(sink.write(b"abc"), False)
        self.assertEqual(sink.received, 3)
        sink.abort()

    def test_commit_stores(self) -> None:
        """All bytes in, drained, committed: Stored with the file's record, file in place."""
        sink = self.make("a/b.bin")
        sink.write(b"abcdef")
        self.successResultOf(sink.drained())
        outcome = sink.commit()
        self.assertIsInstance(outcome, Stored)
        assert isinstance(outcome, Stored)
        self.assertEqual(outcome.record.size, 6)
        self.assertEqual(outcome.record.sha256, hashlib.sha256(b"abcdef").hexdigest())
        with open(os.path.join(self.fs.store_dir, "a", "b.bin"), "rb") as f:
            self.assertEqual(f.read(), b"abcdef")
        sink.release()

    def test_claim_until_release(self) -> None:
        """A second sink of the same path is refused until the first lets go."""
        sink = self.make("c.bin")
        self.assertRaises(PathBusy, self.make, "c.bin")
        sink.abort()
        sink.release()
        self.make("c.bin").abort()


class WholeUploadTests(SinkContractMixin, SynchronousTestCase):
    """The whole-upload sink."""

    def make(self, relpath: str) -> Sink:
        return WholeUpload(self.fs, relpath, 6, "application/octet-stream", "v")

    def test_abort_leaves_nothing(self) -> None:
        """abort() removes the temp file and the directories the upload made."""
        sink = self.make("x/y/z.bin")
        sink.write(b"abc")
        sink.abort()
        self.assertEqual(store_files(self.fs.store_dir), [])


class ResumablePieceTests(SinkContractMixin, SynchronousTestCase):
    """The resumable-piece sink: a single piece that is the whole upload, here."""

    def make(self, relpath: str) -> Sink:
        return ResumablePiece(self.fs, relpath, 6, 0, 6, "application/octet-stream", "v")

    def test_abort_keeps_what_arrived(self) -> None:
        """abort() keeps the bytes: they are the offset the client resumes from."""
        sink = self.make("p.bin")
        sink.write(b"abc")
        sink.abort()
        sink.release()
        self.assertEqual(partial_offset(self.fs.store_dir, "p.bin"), 3)
        self.assertEqual(store_files(self.fs.store_dir), [])

    def test_partial(self) -> None:
        """A piece short of the total commits to Partial(offset); the next starts there."""
        first = ResumablePiece(self.fs, "q.bin", 6, 0, 2, "text/plain", "v")
        first.write(b"ab")
        self.assertEqual(first.commit(), Partial(2))
        first.release()
        self.assertRaises(OffsetMismatch, ResumablePiece, self.fs, "q.bin", 6, 0, 4, "t", "v")
        second = ResumablePiece(self.fs, "q.bin", 6, 2, 4, "text/plain", "v")
        second.write(b"cdef")
        outcome = second.commit()
        assert isinstance(outcome, Stored)
        self.assertEqual(outcome.record.sha256, hashlib.sha256(b"abcdef").hexdigest())
        self.assertEqual(outcome.record.content_type, "text/plain")
        second.release()

    def test_one_piece_at_a_time(self) -> None:
        """While a piece is received, another of the same upload is refused."""
        sink = self.make("r.bin")
        Sink.release(sink)  # the claim alone goes: this piece is still being received
        self.assertRaises(ChunkInProgress, self.make, "r.bin")
        self.assertEqual(self.fs.uploads.resumable, {"r.bin"})
        sink.abort()
        sink.release()
        self.assertEqual(self.fs.uploads.resumable, set())


class UploadsTests(SynchronousTestCase):
    """The registry of requests receiving a body."""

    def test_idle(self) -> None:
        """idle() fires at once with none in progress, else when the last one is removed."""
        counts: list[int] = []
        uploads = Uploads(committer=None, gauge=counts.append)
        self.successResultOf(uploads.idle())
        uploads.add("a")
        uploads.add("b")
        waiting: Deferred[None] = uploads.idle()
        uploads.remove("a")
        self.assertNoResult(waiting)
        uploads.remove("b")
        self.successResultOf(waiting)
        self.assertEqual(counts, [1, 2, 1, 0])
        self.assertEqual(len(uploads), 0)

    def test_idle_cancelled(self) -> None:
        """A cancelled wait (the grace has run out) is forgotten, not fired later."""
        uploads = Uploads(committer=None, gauge=lambda n: None)
        uploads.add("a")
        waiting = uploads.idle()
        waiting.cancel()
        self.failureResultOf(waiting)
        uploads.remove("a")
        self.assertEqual(list(uploads), [])
