"""
The disk side of an upload: where an accepted body goes, and how it becomes a stored file.

A request that has been accepted holds one L{Sink}.  There are two, with one contract:

 - L{WholeUpload}: a body that is the whole file.  It streams into a writer of the
   storage (L{hmacd.storage.IWriter}; for the local directory a temp dot file beside its
   destination, written and hashed in a worker thread while the reactor reads on) and is
   published at the end, never overwriting.  L{Sink.abort} removes every trace of it.
 - L{ResumablePiece}: one C{Content-Range} piece of a resumable upload, appended to the
   upload's bytes so far under C{.hmacfs/partial/} (one piece at a time: a set in this
   process, a lock across Workers); the last one hands the whole file to the storage
   (L{hmacd.storage.IStorage.adopt}).  L{Sink.abort} keeps the bytes that arrived: that
   is the resumable protocol (the client asks for the offset and goes on).

Both commit, in a pool thread, through the one L{GroupCommit} of the server, to one result
type: L{Stored} (the file is in place, here is its record) or L{Partial} (a piece is
durable, the upload stands at this offset).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from hmacd.batch import Batcher
from hmacd.claims import Claim, claim
from hmacd.metadata import FileRecord
from hmacd.storage import Conflict, IStorage, IWriter
from hmacd.takedown import Denied

if TYPE_CHECKING:
    from hmacd.core import FileServer
    from hmacd.node_claims import NodeClaim
    from hmacd.quota import Reservation

__all__ = [
    "ChunkInProgress",
    "Conflict",
    "GroupCommit",
    "OffsetMismatch",
    "Outcome",
    "Partial",
    "ResumablePiece",
    "Sink",
    "Stored",
    "Uploads",
    "WholeUpload",
    "WriterSink",
    "partial_dir",
    "partial_files",
    "partial_offset",
]

# Each upload in progress holds its write buffer: ChunkSize, at most this (see
# hmacd.storage.local); a resumable piece buffers its appends as much.
MAX_WRITE_BUFFER = 64 * 1024


class OffsetMismatch(Exception):
    """A resumable chunk does not start where the upload stands."""

    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


class ChunkInProgress(Exception):
    """Another chunk of the same resumable upload is being received."""


@dataclass(frozen=True)
class Stored:
    """The file is durable and in place; C{record} is what the metadata store gets."""

    record: FileRecord


@dataclass(frozen=True)
class Partial:
    """A resumable piece is durable; the upload stands at C{offset} bytes."""

    offset: int


Outcome = Stored | Partial


class Uploads:
    """
    What the upload code shares between the requests of one server: the requests receiving
    a body now (graceful shutdown waits for them; a gauge counts them), the paths whose
    resumable upload is receiving a piece, the committer, and whether uploads are accepted.
    """

    def __init__(self, committer: GroupCommit, gauge: Callable[[int], None]) -> None:
        self.committer = committer
        # False once shutdown has begun: new uploads are refused with 503.
        self.accepting = True
        # Paths whose resumable upload is receiving a piece right now (one at a time).
        self.resumable: set[str] = set()
        self._active: set[Any] = set()
        self._idle: list[Deferred[None]] = []
        self._gauge = gauge

    def add(self, request: Any) -> None:
        """C{request} is receiving a body."""
        self._active.add(request)
        # Set, not read at scrape time: with Workers the scrape is in another process.
        self._gauge(len(self._active))

    def remove(self, request: Any) -> None:
        """C{request} is done with its body, however it ended (idempotent)."""
        self._active.discard(request)
        self._gauge(len(self._active))
        if not self._active:
            waiters, self._idle = self._idle, []
            for d in waiters:
                d.callback(None)

    def idle(self) -> Deferred[None]:
        """Fires once no request is receiving a body."""
        if not self._active:
            return succeed(None)
        d: Deferred[None] = Deferred(lambda d: self._idle.remove(d))
        self._idle.append(d)
        return d

    def __len__(self) -> int:
        return len(self._active)

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._active))


class Sink:
    """
    One accepted body on its way to the storage (C{fs.storage}), holding the claim on its
    path (hmacd.claims) from construction until L{release}.

    @ivar size: the bytes this request's body must carry.
    @ivar received: the bytes given to L{write} so far.
    @ivar onRelief: called (in the reactor thread) when L{write} said it was behind and the
        storage has caught up; the request reads on.
    """

    committing = False
    onRelief: Callable[[], None] | None = None
    received = 0
    content_type: str
    protocol: str
    uploader: str | None
    expires: float | None

    def __init__(self, fs: FileServer, relpath: str, size: int) -> None:
        """
        Claim the path for this body.

        @raise PathBusy: another upload of the path is in progress.
        """
        self.fs = fs
        self.relpath = relpath
        self.size = size
        self._hold: Claim | None = claim(fs.store_dir, relpath)
        # The claim across nodes (hmacd.node_claims), when the storage is shared.
        self._shared: NodeClaim | None = None
        # The upload's hold on the quotas (hmacd.quota), when any quota is set.
        self._quota: Reservation | None = None

    def hold(self, shared: NodeClaim) -> None:
        """Hold C{shared}, this node's claim on the path in the shared store, until L{release}."""
        self._shared = shared

    def holdQuota(self, reservation: Reservation) -> None:
        """Hold C{reservation}, this upload's room in the quotas, until L{release}."""
        self._quota = reservation

    def write(self, data: bytes) -> bool:
        """
        Take the next bytes of the body.  True when the bytes not yet stored are too many:
        the caller should stop reading until L{onRelief}.

        @raise OSError: writing what came before failed.
        """
        raise NotImplementedError

    def drained(self) -> Deferred[None]:
        """Fires once L{commit} may run, or fails with the error writing met."""
        raise NotImplementedError

    def commit(self) -> Outcome:
        """
        Make the bytes durable (and the file visible, once complete).  Runs in a worker
        thread, through L{GroupCommit}, which then settles the names of L{Stored} files.

        @raise Conflict: the name appeared while we were receiving.
        """
        raise NotImplementedError

    # Whether L{stage} stages (a whole upload): L{GroupCommit} gives small ones their lane.
    stages = False

    def stage(self) -> tuple[IWriter, FileRecord] | None:
        """
        Blocking, instead of L{commit} where a sink can: everything of it up to the publish,
        which L{GroupCommit} then makes with the others of its batch
        (L{hmacd.storage.IStorage.publish_all}): the writer and its record.  None: this
        kind of sink commits on its own (L{commit}).
        """
        return None

    def staged(self) -> None:
        """Any thread: the publish of what L{stage} gave has been made, or has failed."""

    def abort(self) -> None:
        """The body will not be completed: clean up, as each kind documents."""
        raise NotImplementedError

    def unpublish(self) -> None:
        """Take a committed file back when its record could not be written."""
        self.fs.storage.delete(self.relpath)

    def release(self) -> None:
        """Done with, however it ended: let the next upload of this path in (idempotent)."""
        self._let_path_go()
        if self._shared is not None:
            # After the record is written (the request lets go in the reactor thread): a
            # later upload's claim then finds the record and is refused before its body.
            self._shared.release()
        if self._quota is not None:
            # After the record is written too: the store counts the file from then on.
            self._quota.release()

    def _let_path_go(self) -> None:
        """The claim on this host only (any thread): the file is in place, or never will be."""
        if self._hold is not None:
            self._hold.release()

    def _record(self, size: int, sha256: str) -> FileRecord:
        return FileRecord(
            path=self.relpath,
            size=size,
            content_type=self.content_type,
            sha256=sha256,
            created=self.fs.now(),
            protocol=self.protocol,
            uploader=self.uploader,
            expires=self.expires,
        )


def refuse_denied(fs: FileServer, sha256: str) -> None:
    """
    Any thread.  Refuse content on the deny list (L{hmacd.takedown}), before it is
    published: the caller withdraws the upload.

    @raise Denied: C{sha256} was taken down.
    """
    status = fs.denials.digest(sha256)
    if status is not None:
        raise Denied(status)


class WriterSink(Sink):
    """
    A sink whose body goes into a writer (L{hmacd.storage.IWriter}, or a spool's), set as
    C{_writer} by the subclass: the writer's back-pressure is the sink's, and L{abort}
    discards what the writer holds.
    """

    _writer: IWriter

    def _relieved(self) -> None:
        if self.onRelief is not None:
            self.onRelief()

    def write(self, data: bytes) -> bool:
        """Into the writer; True while it is behind (it calls L{onRelief} when it is not)."""
        self.received += len(data)
        return self._writer.write(data)

    def drained(self) -> Deferred[None]:
        """Once the writer has no batch in a thread."""
        return self._writer.drained()

    def abort(self) -> None:
        """The writer's bytes go (as the subclass says), then the claims."""
        self.onRelief = None
        self._writer.discard()
        self.release()  # after the cleanup: a retry finds the store as it was


class WholeUpload(WriterSink):
    """
    A body that is the whole file, streamed into a writer of the storage (for the local
    directory: a temp dot file beside the destination, spooled to from a worker thread).
    L{abort} leaves nothing: no temp, no directory made for it.
    """

    stages = True

    def __init__(
        self,
        fs: FileServer,
        relpath: str,
        size: int,
        content_type: str,
        protocol: str,
        uploader: str | None = None,
        expires: float | None = None,
    ) -> None:
        """
        @raise PathBusy: another upload of the path is in progress.
        @raise Conflict: something is there already.
        """
        super().__init__(fs, relpath, size)
        self.content_type = content_type
        self.protocol = protocol
        self.uploader = uploader
        self.expires = expires
        try:
            # After the claim: an upload that held it has published by the time it let go.
            self._writer = fs.storage.writer(relpath, self._record(size, ""))
        except BaseException:
            self.release()
            raise
        self._writer.onRelief = self._relieved

    def commit(self) -> Outcome:
        """Write the rest, then publish with the record as the file's facts: L{Stored}."""
        writer, record = self.stage()
        try:
            writer.publish(record)
        finally:
            self.staged()
        return Stored(record)

    def stage(self) -> tuple[IWriter, FileRecord]:
        """Write the rest and hash it, and refuse denied content: the writer and its record."""
        try:
            record = self._record(self.received, self._writer.seal())
            refuse_denied(self.fs, record.sha256)
        except BaseException:
            self.staged()
            raise
        return self._writer, record

    def staged(self) -> None:
        # The name is taken now (or never will be): a later upload of it meets the file.
        self._let_path_go()


class ResumablePiece(Sink):
    """
    One C{Content-Range} piece of a resumable upload.

    The upload's bytes so far live in C{StoreDir/.hmacfs/partial/<hash>.part} (never served:
    a dot path), its facts in C{<hash>.json}; the offset is the data file's size.  A piece
    appends at exactly that offset.  L{abort} keeps what arrived: the client asks for the
    offset and goes on from there.  When the last byte lands the data file is hashed and
    linked into place, like a whole upload.
    """

    _registered = False  # in fs.uploads.resumable: this piece is the one being received
    _file: IO[bytes]

    def __init__(
        self,
        fs: FileServer,
        relpath: str,
        total: int,
        start: int,
        length: int,
        content_type: str,
        protocol: str,
        uploader: str | None = None,
        expires: float | None = None,
    ) -> None:
        super().__init__(fs, relpath, length)
        try:
            # After the claim: an upload that held it has published by the time it let go.
            if fs.storage.exists(relpath):
                raise Conflict()
            self._begin(total, start, content_type, protocol, uploader, expires)
        except BaseException:
            self.release()
            raise

    def _begin(
        self,
        total: int,
        start: int,
        content_type: str,
        protocol: str,
        uploader: str | None,
        expires: float | None,
    ) -> None:
        fs, relpath = self.fs, self.relpath
        self.total = total
        self.start = start
        if relpath in fs.uploads.resumable:
            raise ChunkInProgress()
        os.makedirs(partial_dir(fs.store_dir), mode=0o700, exist_ok=True)
        self.data, self.state = partial_files(fs.store_dir, relpath)
        facts: dict[str, Any] = dict(
            path=relpath,
            total=total,
            content_type=content_type,
            protocol=protocol,
            uploader=uploader,
            expires=expires,
        )
        try:
            with open(self.state, encoding="utf-8") as f:
                known = json.load(f)
        except FileNotFoundError:
            known = None
        if known is not None and (known["path"], known["total"]) != (relpath, total):
            raise Conflict()
        if known is not None:
            facts = known  # the facts of the first chunk stand
        offset = os.path.getsize(self.data) if os.path.exists(self.data) else 0
        if start != offset:
            raise OffsetMismatch(offset)
        if known is None:
            # A name of its own: with Workers, a retried first piece may be here twice at once.
            temp = f"{self.state}.{secrets.token_hex(8)}.tmp"
            with open(temp, "w", encoding="utf-8") as f:
                json.dump(facts, f)
            os.replace(temp, self.state)
        self.content_type = facts["content_type"]
        self.protocol = facts["protocol"]
        self.uploader = facts["uploader"]
        self.expires = facts["expires"]
        fd = os.open(self.data, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            # fs.uploads.resumable is this process's; with Workers another process may be
            # receiving a chunk of the same upload: the lock goes with the descriptor, at
            # commit or abort.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ChunkInProgress() from None
        offset = os.fstat(fd).st_size  # what that other process left
        if start != offset:
            os.close(fd)
            raise OffsetMismatch(offset)
        os.lseek(fd, start, os.SEEK_SET)
        self._file = open(fd, "wb", buffering=min(fs.chunk_size, MAX_WRITE_BUFFER))
        fs.uploads.resumable.add(relpath)
        self._registered = True

    def write(self, data: bytes) -> bool:
        """Append, buffered, in the reactor thread: never behind the client, so always False."""
        self._file.write(data)
        self.received += len(data)
        return False

    def drained(self) -> Deferred[None]:
        """Nothing runs in a thread before the commit: at once."""
        return succeed(None)

    def abort(self) -> None:
        """A broken piece keeps the bytes that arrived: they are the next offset."""
        with contextlib.suppress(OSError):
            self._file.close()
        Sink.release(self)

    def release(self) -> None:
        """Let the path go, and the next piece of this upload in."""
        super().release()
        if self._registered:
            self._registered = False
            self.fs.uploads.resumable.discard(self.relpath)

    def commit(self) -> Outcome:
        """
        Make the piece durable: L{Partial} while the upload is incomplete; L{Stored} once
        the last byte is in and the file is in place.

        @raise Conflict: the name appeared meanwhile (the partial goes).
        """
        self._file.flush()
        if self.fs.sync_uploads:
            os.fsync(self._file.fileno())
        self._file.close()
        offset = self.start + self.received
        if offset < self.total:
            return Partial(offset)
        digest = hashlib.sha256()
        with open(self.data, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        record = self._record(self.total, digest.hexdigest())
        try:
            refuse_denied(self.fs, record.sha256)
            self.fs.storage.adopt(self.data, self.relpath, record)
        except Denied:
            self._forget()  # the content may never come in: nothing of it stays
            raise
        except Conflict:
            self._forget()  # the name is taken: this upload can never complete
            raise
        self._forget()
        return Stored(record)

    def _forget(self) -> None:
        for path in (self.data, self.state):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class GroupCommit:
    """
    The commits of finished uploads, in at most L{lanes} pool threads at once.

    A commit is a handful of system calls and two fsyncs; under load the thread hand-offs
    around it (a wake-up each way, the GIL taken again after every call) cost the server as
    much CPU as the calls themselves.  Uploads that finish while every lane is busy wait,
    and the next free lane takes them all (L{hmacd.batch.Batcher}): one hand-off for the
    lot, and one settling of the names they published (for the local directory, one fsync
    of each directory they share) instead of one each.  A lone upload is committed at once.

    Where the storage makes a batch durable at once (the local directory through io_uring,
    L{hmacd.uring}), small whole bodies get C{small_lanes} of their own: one lane makes
    the batches largest and the hand-offs fewest, and a large body's fsync (seconds for a
    gigabyte) never holds them up; nor does a resumable upload's last piece, however small,
    which hashes and adopts the whole file.  A batch of them takes at most L{SMALL_BATCH}:
    each holds its temp and its directory open until the batch is published.

    @param blocking: runs a callable in a pool thread.
    @param storage: publishes a batch (L{IStorage.publish_all}) and makes the names of
        files just published durable (L{IStorage.settle}).
    @param small_lanes: lanes for whole bodies of at most L{MAX_WRITE_BUFFER} bytes;
        None: they share the C{lanes} of the others.
    """

    SMALL_BATCH = 64

    def __init__(
        self,
        blocking: Callable[[Callable[[], Any]], Deferred[Any]],
        storage: IStorage,
        lanes: int = 4,
        small_lanes: int | None = None,
    ) -> None:
        self._storage = storage

        def run(sinks: list[Sink]) -> Deferred[Any]:
            return blocking(lambda: self._commitAll(sinks))

        self._batcher: Batcher[Sink, Outcome] = Batcher(run, lanes)
        self._small = self._batcher
        if small_lanes is not None:
            self._small = Batcher(run, small_lanes, most=self.SMALL_BATCH)

    @property
    def lanes(self) -> int:
        """How many batches may be in the thread pool at once."""
        return self._batcher.lanes

    @lanes.setter
    def lanes(self, lanes: int) -> None:
        self._batcher.lanes = lanes

    def submit(self, sink: Sink) -> Deferred[Outcome]:
        """Commit C{sink}; fires with what its C{commit} returns, or fails with its error."""
        if sink.stages and sink.size <= MAX_WRITE_BUFFER:
            return self._small.submit(sink)
        return self._batcher.submit(sink)

    def _commitAll(self, sinks: list[Sink]) -> list[Outcome | Failure]:
        """
        In a pool thread: stage each sink (or commit it, if it commits on its own), publish
        the staged ones together, then settle the names published, once.
        """
        results: list[Outcome | Failure | None] = []
        batch: list[tuple[int, Sink, tuple[IWriter, FileRecord]]] = []
        for sink in sinks:
            try:
                staged = sink.stage()
                result = sink.commit() if staged is None else None
            except BaseException:
                results.append(Failure())
                continue
            if staged is not None:
                batch.append((len(results), sink, staged))
            results.append(result)
        if batch:
            try:
                errors = self._storage.publish_all([staged for _, _, staged in batch])
            finally:
                for _, sink, _ in batch:
                    sink.staged()
            for (i, _, (_, record)), error in zip(batch, errors, strict=True):
                results[i] = Stored(record) if error is None else Failure(error)
        published = [
            sink.relpath
            for sink, result in zip(sinks, results, strict=True)
            if isinstance(result, Stored)
        ]
        # After every commit, before any answer: no 201 goes out for a name not yet durable.
        if published:
            self._storage.settle(published)
        return cast(list[Outcome | Failure], results)


def partial_dir(store_dir: str) -> str:
    """Where resumable uploads keep their bytes so far: a dot path, never served."""
    return os.path.join(store_dir, ".hmacfs", "partial")


def partial_files(store_dir: str, relpath: str) -> tuple[str, str]:
    """The data file and the facts file of a resumable upload of C{relpath}."""
    key = hashlib.sha256(relpath.encode("utf-8")).hexdigest()
    base = os.path.join(partial_dir(store_dir), key)
    return base + ".part", base + ".json"


def partial_offset(store_dir: str, relpath: str) -> int:
    """How many bytes of a resumable upload of C{relpath} we hold."""
    try:
        return os.path.getsize(partial_files(store_dir, relpath)[0])
    except FileNotFoundError:
        return 0
