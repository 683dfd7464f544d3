"""
The disk side of an upload: where an accepted body goes, and how it becomes a stored file.

A request that has been accepted holds one L{Sink}.  There are two, with one contract:

 - L{WholeUpload}: a body that is the whole file.  It goes into a temp dot file beside its
   destination, written and hashed in a worker thread while the reactor reads on; at the
   end it is fsynced and linked into place, never overwriting.  L{Sink.abort} removes every
   trace of it.
 - L{ResumablePiece}: one C{Content-Range} piece of a resumable upload, appended to the
   upload's bytes so far under C{.hmacfs/partial/}.  L{Sink.abort} keeps the bytes that
   arrived: that is the resumable protocol (the client asks for the offset and goes on).

Both commit, in a pool thread, through the one L{GroupCommit} of the server, to one result
type: L{Stored} (the file is in place, here is its record) or L{Partial} (a piece is
durable, the upload stands at this offset).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from hmacd.batch import Batcher
from hmacd.claims import Claim, claim
from hmacd.facts import write_facts
from hmacd.logs import escape
from hmacd.metadata import FileRecord
from hmacd.paths import store_path

__all__ = [
    "MAX_WRITE_BUFFER",
    "PART_PREFIX",
    "PART_SUFFIX",
    "SPOOL_HIGH",
    "SPOOL_LOW",
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
    "fsync_directory",
    "partial_dir",
    "partial_files",
    "partial_offset",
]

log = Logger()

# Temp files of uploads in progress: dot files (never served), recognisable
# for the sweep of abandoned ones (hmacd.housekeeping).
PART_PREFIX, PART_SUFFIX = ".hmacfs-", ".part"

# A large body's bytes not yet written by the worker thread: above SPOOL_HIGH the request
# stops reading from the client, at SPOOL_LOW it reads on.  Bounds what one fast upload holds.
SPOOL_HIGH = 4 * 1024 * 1024
SPOOL_LOW = 1024 * 1024

# Each upload in progress holds its write buffer: 500 slow uploads with ChunkSize's default
# 1 MiB each held ~370 MiB of half-filled buffers.  Socket reads are at most 64 KiB anyway.
MAX_WRITE_BUFFER = 64 * 1024


def write_buffer(chunk_size: int) -> int:
    """Bytes an upload buffers before writing to disk: ChunkSize, at most 64 KiB."""
    return min(chunk_size, MAX_WRITE_BUFFER)


class Conflict(Exception):
    """The destination exists already (or a parent of it is a file)."""


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
    One accepted body on its way to disk, holding the claim on its path (hmacd.claims) from
    construction until L{release}.

    @ivar size: the bytes this request's body must carry.
    @ivar received: the bytes given to L{write} so far.
    @ivar onRelief: called (in the reactor thread) when L{write} said it was behind and the
        disk has caught up; the request reads on.
    """

    committing = False
    onRelief: Callable[[], None] | None = None

    def __init__(self, fs: Any, relpath: str, size: int) -> None:
        """
        Claim the path for this body.

        @raise PathBusy: another upload of the path is in progress.
        @raise Conflict: something is there already.
        """
        self.fs = fs
        self.relpath = relpath
        self.size = size
        self.received = 0
        self.dest = store_path(fs.store_dir, relpath)
        self._hold: Claim | None = claim(fs.store_dir, relpath)
        # After the claim: an upload that held it has linked its file by the time it let go.
        if os.path.lexists(self.dest):
            self.release()
            raise Conflict()

    def write(self, data: bytes) -> bool:
        """
        Take the next bytes of the body.  True when the bytes not yet on disk are too many:
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
        thread, through L{GroupCommit}, which then fsyncs the directory of a L{Stored} file.

        @raise Conflict: the name appeared while we were receiving.
        """
        raise NotImplementedError

    def abort(self) -> None:
        """The body will not be completed: clean up, as each kind documents."""
        raise NotImplementedError

    def unpublish(self) -> None:
        """Take a committed file back when its record could not be written."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dest)
        self._pruneDirectories()

    def release(self) -> None:
        """Done with, however it ended: let the next upload of this path in (idempotent)."""
        if self._hold is not None:
            self._hold.release()

    def _makeParents(self, directory: str) -> list[str]:
        """Create the missing directories down to C{directory}; returns those it made."""
        missing = []
        created = []
        while not os.path.isdir(directory):
            if os.path.lexists(directory):
                raise Conflict()
            missing.append(directory)
            directory = os.path.dirname(directory)
        for d in reversed(missing):
            try:
                os.mkdir(d)
            except FileExistsError:
                if not os.path.isdir(d):
                    raise Conflict() from None
            else:
                created.append(d)
        return created

    def _pruneDirectories(self) -> None:
        """
        Remove the directories of this upload's path that it leaves empty, innermost first.

        Not only those it created: of two uploads into a new directory that both break off,
        the one that created it may go first, while the other's temp file is still in it.
        The store root is never removed: only the path's own parents are tried.
        """
        directory = os.path.dirname(self.dest)
        for _ in range(self.relpath.count("/")):
            try:
                os.rmdir(directory)
            except OSError:
                break  # not empty: another upload uses it now
            directory = os.path.dirname(directory)

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

    content_type: str
    protocol: str
    uploader: str | None
    expires: float | None


class WholeUpload(Sink):
    """
    A body that is the whole file.

    The temp file is a dot file in the destination's own directory, so the final link is
    atomic and the temp file can never be served.  The bytes are written and hashed in a
    worker thread, in batches of at least the write buffer, while the reactor reads on; what
    is left at the end (all of a small body) is written by L{commit}, in the thread it runs
    in anyway.  L{abort} removes the temp file and the directories it leaves empty.
    """

    temp: str | None = None
    _file: IO[bytes] | None = None
    _busy = False  # a batch is in the thread
    _failure: OSError | None = None
    _closeAfterBatch = False
    _draining = False

    def __init__(
        self,
        fs: Any,
        relpath: str,
        size: int,
        content_type: str,
        protocol: str,
        uploader: str | None = None,
        expires: float | None = None,
    ) -> None:
        super().__init__(fs, relpath, size)
        self.content_type = content_type
        self.protocol = protocol
        self.uploader = uploader
        self.expires = expires
        self._sha256 = hashlib.sha256()
        # Bytes given to write() and not yet written, waiting (_pending) or in the thread.
        self._pending: list[bytes] = []
        self._backlog = 0
        self._waiters: list[Deferred[None]] = []
        try:
            self.temp = self._open()
        except BaseException:
            self._pruneDirectories()  # a refused upload leaves the store as it was
            self.release()
            raise

    def _open(self) -> str:
        for attempt in (1, 2):
            try:
                if self._makeParents(os.path.dirname(self.dest)):
                    # Re-check now that the directories exist: a symlink placed
                    # on the way must not lead the temp file out of the store.
                    store_path(self.fs.store_dir, self.relpath)
                temp = os.path.join(
                    os.path.dirname(self.dest), PART_PREFIX + secrets.token_hex(8) + PART_SUFFIX
                )
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
                fd = os.open(temp, flags, 0o644)
            except FileNotFoundError:
                # A concurrent aborted upload pruned a directory we found.
                if attempt == 2:
                    raise
                continue
            except (FileExistsError, NotADirectoryError):
                raise Conflict() from None
            # Unbuffered: what reaches the file comes in batches of at least the write buffer
            # (or the rest, at commit), and 500 slow uploads held 32 MiB of idle
            # BufferedWriters.
            self._file = open(fd, "wb", buffering=0)
            return temp
        raise AssertionError("unreachable")

    def write(self, data: bytes) -> bool:
        """
        Take the next bytes.  True when the bytes not yet on disk exceed SPOOL_HIGH.

        @raise OSError: writing what came before failed.
        """
        self.received += len(data)
        if self._failure is not None:
            raise self._failure
        self._pending.append(data)
        self._backlog += len(data)
        if not self._busy and self._backlog >= write_buffer(self.fs.chunk_size):
            self._dispatch()
        return self._backlog > SPOOL_HIGH

    def _dispatch(self) -> None:
        batch, self._pending = self._pending, []
        self._busy = True
        d = self.fs.blocking(lambda: self._spool(batch))
        d.addBoth(self._spooled, sum(map(len, batch)))

    def _spool(self, batch: list[bytes]) -> None:
        # In a worker thread: file writes and hashlib release the GIL.
        for data in batch:
            self._writeAll(data)
            self._sha256.update(data)

    def _writeAll(self, data: bytes) -> None:
        assert self._file is not None
        view = memoryview(data)
        while view:
            written = self._file.write(view)
            view = view[written or 0 :]

    def _spooled(self, result: object, count: int) -> None:
        self._busy = False
        self._backlog -= count
        if isinstance(result, Failure):
            if not isinstance(result.value, OSError):
                log.failure("writing {path} failed", result, path=escape(self.relpath))
                self._failure = OSError(errno.EIO, "write failed")
            else:
                self._failure = result.value
        if self._closeAfterBatch:
            self._closeFile()
            return
        if self._failure is None and self._backlog >= write_buffer(self.fs.chunk_size):
            self._dispatch()
        elif self._draining:
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                if self._failure is not None:
                    d.errback(self._failure)
                else:
                    d.callback(None)
        if self.onRelief is not None and (self._backlog <= SPOOL_LOW or self._failure):
            # After a failure too: the request reads on, and its next bytes meet the error.
            self.onRelief()

    def drained(self) -> Deferred[None]:
        """
        Fires once no batch is in the thread (L{commit} writes the rest), or fails with the
        error writing met.
        """
        self._draining = True
        if self._failure is not None:
            return fail(self._failure)
        if not self._busy:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def _closeFile(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()

    def abort(self) -> None:
        """Remove every trace of this upload: temp file and new directories."""
        self.onRelief = None
        if self._busy:
            # The thread is writing to it: closed when its batch is done.
            self._closeAfterBatch = True
        else:
            self._closeFile()
        if self.temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp)
        self._pruneDirectories()
        self.release()  # after the cleanup: a retry finds the store as it was

    def commit(self) -> Outcome:
        """Write the rest, fsync, link into place: L{Stored}."""
        assert self._file is not None and self.temp is not None
        try:
            self._spool(self._pending)
            self._pending = []
            record = self._record(self.received, self._sha256.hexdigest())
            # Before the fsync and the link: the facts are durable with the file, and the
            # file is never visible without them.
            write_facts(self._file.fileno(), record)
            os.fsync(self._file.fileno())
            self._file.close()
            try:
                os.link(self.temp, self.dest)
            except FileExistsError:
                raise Conflict() from None
        except BaseException:
            self.abort()
            raise
        os.unlink(self.temp)
        self.release()  # the name is taken now: a later upload of it meets the file
        return Stored(record)


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
        fs: Any,
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
        self._file = open(fd, "wb", buffering=write_buffer(fs.chunk_size))
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
            # As for a whole upload: the facts are on the file, durably, before it is linked.
            if write_facts(f.fileno(), record):
                os.fsync(f.fileno())
        try:
            self._makeParents(os.path.dirname(self.dest))
            store_path(self.fs.store_dir, self.relpath)
            os.link(self.data, self.dest)
        except FileExistsError:
            self._forget()
            self._pruneDirectories()
            raise Conflict() from None
        self._forget()
        return Stored(record)

    def _forget(self) -> None:
        for path in (self.data, self.state):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def fsync_directory(directory: str) -> None:
    """fsync C{directory}: a new name in it is durable after this."""
    try:
        dirfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
    except OSError:
        pass


class GroupCommit:
    """
    The commits of finished uploads, in at most L{lanes} pool threads at once.

    A commit is a handful of system calls and two fsyncs; under load the thread hand-offs
    around it (a wake-up each way, the GIL taken again after every call) cost the server as
    much CPU as the calls themselves.  Uploads that finish while every lane is busy wait,
    and the next free lane takes them all (L{hmacd.batch.Batcher}): one hand-off for the
    lot, and one fsync for each directory they share instead of one each.  A lone upload is
    committed at once.
    """

    def __init__(
        self, blocking: Callable[[Callable[[], Any]], Deferred[Any]], lanes: int = 4
    ) -> None:
        self._batcher: Batcher[Sink, Outcome] = Batcher(
            lambda sinks: blocking(lambda: _commitAll(sinks)), lanes
        )

    @property
    def lanes(self) -> int:
        """How many batches may be in the thread pool at once."""
        return self._batcher.lanes

    @lanes.setter
    def lanes(self, lanes: int) -> None:
        self._batcher.lanes = lanes

    def submit(self, sink: Sink) -> Deferred[Outcome]:
        """Commit C{sink}; fires with what its C{commit} returns, or fails with its error."""
        return self._batcher.submit(sink)


def _commitAll(sinks: list[Sink]) -> list[Outcome | Failure]:
    """In a pool thread: commit each sink, then fsync each directory they went to once."""
    results: list[Outcome | Failure] = []
    directories = set()
    for sink in sinks:
        try:
            result = sink.commit()
        except BaseException:
            results.append(Failure())
            continue
        results.append(result)
        if isinstance(result, Stored):
            directories.add(os.path.dirname(sink.dest))
    # After every commit, before any answer: no 201 goes out for a name not yet durable.
    for directory in directories:
        fsync_directory(directory)
    return results


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
