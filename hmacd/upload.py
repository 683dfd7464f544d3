"""
The streaming PUT.

twisted.web buffers a request body and only then looks for a resource.  An
upload server cannot work that way: the verdict (bad MAC, too large, file
exists) must be given before the first body byte is read, and an accepted
body must go to disk as it arrives.  L{UploadRequest} does both by taking
over the two hooks L{twisted.web.http.HTTPChannel} calls for every request:

 - C{gotLength}, called once all headers are parsed and before any body byte
   (and before C{100 Continue} is sent), judges the upload and opens a temp
   file beside the destination;
 - C{handleContentChunk} writes each piece of the body into that file.

When the last byte has arrived, C{requestReceived} fsyncs the file and links
it into place without ever overwriting, writes the record, and answers 201.
A broken connection removes the temp file; nothing partial is ever visible.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
from io import BytesIO
from urllib.parse import parse_qs

from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server

from hmacd import auth
from hmacd.claims import Claim, PathBusy, claim
from hmacd.core import FileServer, guess_type
from hmacd.facts import write_facts
from hmacd.guard import counted_client, watch_body_rate
from hmacd.logs import censor, escape
from hmacd.mediatype import BadMediaType, parse_media_type
from hmacd.metadata import FileRecord
from hmacd.numbers import NotADecimal, parse_decimal
from hmacd.paths import PathRefused, relative_path, store_path
from hmacd.store import StoreUnavailable
from hmacd.throttle import Bandwidth, client_address
from hmacd.web import ALLOWED_METHODS, POLICY_HEADERS  # HTTP policy lives in hmacd.web

__all__ = ["ALLOWED_METHODS", "POLICY_HEADERS", "UploadRequest"]


# Bodies of requests that are not uploads are never needed: a GET with a
# body larger than this is refused rather than spooled to a temp file.
MAX_OTHER_BODY = 64 * 1024

# A refused upload whose client did not ask for 100-continue is already
# sending its body.  Up to this size we read and drop it, so that closing the
# connection does not turn into a TCP reset that hides our answer.
DRAIN_LIMIT = 1 << 20

_STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT)
# Temp files of uploads in progress: dot files (never served), recognisable
# for the sweep of abandoned ones (hmacd.housekeeping).
PART_PREFIX, PART_SUFFIX = ".hmacfs-", ".part"

INSUFFICIENT_STORAGE = 507
TOO_MANY_REQUESTS = 429  # RFC 6585; not in twisted.web.http either

# "Resume Incomplete": a resumable piece is stored, more are expected.
RESUME_INCOMPLETE = 308

# upload_errors_total{reason} for each refusal status of a PUT.
_REASONS = {
    400: "bad_request",
    401: "auth",
    403: "auth",
    404: "not_found",
    409: "conflict",
    411: "length_required",
    413: "too_large",
    416: "range",
    500: "internal",
    429: "rate_limited",
    503: "store",
    INSUFFICIENT_STORAGE: "disk",
}
# A store outage is noticed and routed around within seconds (see
# hmacd.store.failover); a client retrying after this finds it settled.
RETRY_AFTER = b"30"  # RFC 4918; twisted.web.http has no name for it

log = Logger()


class Conflict(Exception):
    """The destination exists already (or a parent of it is a file)."""


# A large body's bytes not yet written by the worker thread: above SPOOL_HIGH the request
# stops reading from the client, at SPOOL_LOW it reads on.  Bounds what one fast upload holds.
SPOOL_HIGH = 4 * 1024 * 1024
SPOOL_LOW = 1024 * 1024
# What a large upload's connection reads at a time (Twisted's default is 64 KiB).
READ_SIZE = 1024 * 1024

# Each upload in progress holds its write buffer: 500 slow uploads with ChunkSize's default
# 1 MiB each held ~370 MiB of half-filled buffers.  Socket reads are at most 64 KiB anyway.
MAX_WRITE_BUFFER = 64 * 1024


def write_buffer(fs: FileServer) -> int:
    """Bytes an upload buffers before writing to disk: ChunkSize, at most 64 KiB."""
    return min(fs.chunk_size, MAX_WRITE_BUFFER)


class _Upload:
    """
    One accepted body on its way to disk.

    The temp file is a dot file in the destination's own directory, so the
    final link is atomic and the temp file can never be served.

    The bytes are written and hashed in a worker thread, in batches of at
    least the write buffer, while the reactor reads on; what is left at the
    end (all of a small body) is written by L{commit}, in the thread it runs
    in anyway.
    """

    committing = False
    temp: str | None = None
    _file = None
    _hold: Claim | None = None  # this upload's claim on its path (hmacd.claims)
    # Bytes given to write() and not yet written, waiting (_pending) or in the thread.
    _pending: list[bytes] | None = None
    _backlog = 0
    _busy = False  # a batch is in the thread
    _failure: OSError | None = None
    _closeAfterBatch = False
    _draining = False
    # Called (in the reactor thread) when the backlog has fallen to SPOOL_LOW after write()
    # said it was over SPOOL_HIGH; the request resumes reading.
    onRelief = None

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
        self._claim(fs, relpath, size)
        self.content_type = content_type
        self.protocol = protocol
        self.uploader = uploader
        self.expires = expires
        self._sha256 = hashlib.sha256()
        try:
            self.temp = self._open()
        except BaseException:
            self._pruneDirectories()  # a refused upload leaves the store as it was
            self.releaseClaim()
            raise
        self._pending = []
        self._waiters: list[Deferred] = []

    def _claim(self, fs: FileServer, relpath: str, size: int) -> None:
        """
        Where the file will go, claimed for this upload until L{releaseClaim}.

        @raise PathBusy: another upload of the path is in progress.
        @raise Conflict: something is there already.
        """
        self.fs = fs
        self.relpath = relpath
        self.size = size
        self.received = 0
        self._created: list[str] = []
        self.dest = store_path(fs.store_dir, relpath)
        self._hold = claim(fs.store_dir, relpath)
        # After the claim: an upload that held it has linked its file by the time it let go.
        if os.path.lexists(self.dest):
            self.releaseClaim()
            raise Conflict()

    def releaseClaim(self) -> None:
        """Let the next upload of this path in (idempotent)."""
        if self._hold is not None:
            self._hold.release()

    def _open(self) -> str:
        for attempt in (1, 2):
            try:
                created = len(self._created)
                self._makeParents(os.path.dirname(self.dest))
                if len(self._created) != created:
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

    def _makeParents(self, directory: str) -> None:
        missing = []
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
                self._created.append(d)

    def write(self, data: bytes) -> bool:
        """
        Take the next bytes of the body.  True when the bytes not yet on disk exceed
        SPOOL_HIGH: the caller should stop reading until L{onRelief}.

        @raise OSError: writing what came before failed.
        """
        self.received += len(data)
        if self._failure is not None:
            raise self._failure
        self._pending.append(data)
        self._backlog += len(data)
        if not self._busy and self._backlog >= write_buffer(self.fs):
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
        view = memoryview(data)
        while view:
            view = view[self._file.write(view) :]

    def _spooled(self, result, count: int) -> None:
        self._busy = False
        self._backlog -= count
        if isinstance(result, Failure):
            if not result.check(OSError):
                log.failure("writing {path} failed", result, path=escape(self.relpath))
                self._failure = OSError(errno.EIO, "write failed")
            else:
                self._failure = result.value
        if self._closeAfterBatch:
            self._closeFile()
            return
        if self._failure is None and self._backlog >= write_buffer(self.fs):
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

    def drained(self) -> Deferred:
        """
        Fires once no batch is in the thread (L{commit} writes the rest), or fails with the
        error writing met.
        """
        if self._pending is None:
            return succeed(None)
        self._draining = True
        if self._failure is not None:
            return fail(self._failure)
        if not self._busy:
            return succeed(None)
        d = Deferred()
        self._waiters.append(d)
        return d

    def _closeFile(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass

    def discard(self) -> None:
        """Remove every trace of this upload: temp file and new directories."""
        self.onRelief = None
        if self._busy:
            # The thread is writing to it: closed when its batch is done.
            self._closeAfterBatch = True
        else:
            self._closeFile()
        if self.temp is not None:
            try:
                os.unlink(self.temp)
            except FileNotFoundError:
                pass
        self._pruneDirectories()
        self.releaseClaim()  # after the cleanup: a retry finds the store as it was

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

    def commit(self) -> FileRecord:
        """
        Make the file durable and visible.  Runs in a worker thread, through L{GroupCommit},
        which then fsyncs the directory (once for every upload committed into it).

        @raise Conflict: the name appeared while we were receiving.
        """
        try:
            self._spool(self._pending)
            self._pending = []
            self._file.flush()
            record = FileRecord(
                path=self.relpath,
                size=self.received,
                content_type=self.content_type,
                sha256=self._sha256.hexdigest(),
                created=self.fs.now(),
                protocol=self.protocol,
                uploader=self.uploader,
                expires=self.expires,
            )
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
            self.discard()
            raise
        os.unlink(self.temp)
        self.releaseClaim()  # the name is taken now: a later upload of it meets the file
        return record

    def unpublish(self) -> None:
        """Take a committed file back when its record could not be written."""
        try:
            os.unlink(self.dest)
        except FileNotFoundError:
            pass
        self._pruneDirectories()


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

    A commit is a handful of system calls and two fsyncs; under load the
    thread hand-offs around it (a wake-up each way, the GIL taken again after
    every call) cost the server as much CPU as the calls themselves.  Uploads
    that finish while every lane is busy wait, and the next free lane takes
    them all: one hand-off for the lot, and one fsync for each directory they
    share instead of one each.  A lone upload is committed at once, as before.
    """

    lanes = 4

    def __init__(self, fs: FileServer) -> None:
        self.fs = fs
        self._queue: list[tuple[_Upload, Deferred]] = []
        self._busy = 0

    def submit(self, upload: _Upload) -> Deferred:
        """Commit C{upload}; fires with what its C{commit} returns, or fails with its error."""
        d = Deferred()
        self._queue.append((upload, d))
        self._next()
        return d

    def _next(self) -> None:
        while self._queue and self._busy < self.lanes:
            batch, self._queue = self._queue, []
            self._busy += 1
            uploads = [upload for upload, _ in batch]
            done = self.fs.blocking(lambda uploads=uploads: _commitAll(uploads))
            done.addBoth(self._committed, [d for _, d in batch])

    def _committed(self, results: list | Failure, waiters: list[Deferred]) -> None:
        self._busy -= 1
        if isinstance(results, Failure):  # not a commit's error: those are in the list
            results = [results] * len(waiters)
        for d, result in zip(waiters, results, strict=True):
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
        self._next()


def _commitAll(uploads: list[_Upload]) -> list:
    """In a pool thread: commit each upload, then fsync each directory they went to once."""
    results: list = []
    directories = set()
    for upload in uploads:
        try:
            result = upload.commit()
        except BaseException:
            results.append(Failure())
            continue
        results.append(result)
        if isinstance(result, FileRecord):
            directories.add(os.path.dirname(upload.dest))
    # After every commit, before any answer: no 201 goes out for a name not yet durable.
    for directory in directories:
        fsync_directory(directory)
    return results


def committer(fs: FileServer) -> GroupCommit:
    """The L{GroupCommit} of C{fs}."""
    if fs.committer is None:
        fs.committer = GroupCommit(fs)
    return fs.committer


class OffsetMismatch(Exception):
    """A resumable chunk does not start where the upload stands."""

    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


class ChunkInProgress(Exception):
    """Another chunk of the same resumable upload is being received."""


def received_range(offset: int) -> list[tuple[bytes, bytes]]:
    """The Range header that tells a client how much of its upload we hold."""
    return [(b"Range", b"bytes=0-%d" % (offset - 1))] if offset else []


class _ResumableChunk(_Upload):
    """
    One C{Content-Range} piece of a resumable upload.

    The upload's bytes so far live in C{StoreDir/.hmacfs/partial/<hash>.part}
    (never served: a dot path), its facts in C{<hash>.json}; the offset is
    the data file's size.  A chunk appends at exactly that offset; one that
    breaks off keeps what arrived (the client asks for the offset and goes
    on from there).  When the last byte lands the data file is hashed and
    linked into place, like a whole upload.
    """

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
        self._claim(fs, relpath, length)
        try:
            self._begin(total, start, content_type, protocol, uploader, expires)
        except BaseException:
            self.releaseClaim()
            raise

    def _begin(self, total, start, content_type, protocol, uploader, expires) -> None:
        fs, relpath = self.fs, self.relpath
        self.total = total
        self.start = start
        if relpath in fs.resumable:
            raise ChunkInProgress()
        os.makedirs(partial_dir(fs.store_dir), mode=0o700, exist_ok=True)
        self.data, self.state = partial_files(fs.store_dir, relpath)
        facts = dict(
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
            # fs.resumable is this process's; with Workers another process may be receiving a
            # chunk of the same upload: the lock goes with the descriptor, at commit or discard.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ChunkInProgress() from None
        offset = os.fstat(fd).st_size  # what that other process left
        if start != offset:
            os.close(fd)
            raise OffsetMismatch(offset)
        os.lseek(fd, start, os.SEEK_SET)
        self._file = open(fd, "wb", buffering=write_buffer(fs))
        fs.resumable.add(relpath)

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.received += len(data)

    def discard(self) -> None:
        """A broken chunk keeps the bytes that arrived: they are the next offset."""
        with contextlib.suppress(OSError):
            self._file.close()
        self.releaseClaim()

    def release(self) -> None:
        self.fs.resumable.discard(self.relpath)

    def commit(self) -> FileRecord | int:
        """
        Make the chunk durable.  Runs in a worker thread, as L{_Upload.commit} does.

        @return: the new offset while the upload is incomplete; the record
            once the last byte is in and the file is in place.
        @raise Conflict: the name appeared meanwhile (the partial goes).
        """
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        offset = self.start + self.received
        if offset < self.total:
            return offset
        digest = hashlib.sha256()
        with open(self.data, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
            record = FileRecord(
                path=self.relpath,
                size=self.total,
                content_type=self.content_type,
                sha256=digest.hexdigest(),
                created=self.fs.now(),
                protocol=self.protocol,
                uploader=self.uploader,
                expires=self.expires,
            )
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
        return record

    def _forget(self) -> None:
        for path in (self.data, self.state):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


_CONTENT_RANGE = re.compile(r"bytes +(?:([0-9]+)-([0-9]+)|\*)/([0-9]+)")


def _parse_content_range(value: str) -> tuple[int, int, int] | tuple[int] | None:
    """(first, last, total) of a piece, (total,) of an offset query, or None if malformed."""
    # OWS is spaces and tabs; str.strip() would also take \x1c-\x1f and Unicode spaces.
    match = _CONTENT_RANGE.fullmatch(value.strip(" \t"))
    if match is None:
        return None
    try:
        numbers = [parse_decimal(n) for n in match.groups() if n is not None]
    except NotADecimal:
        return None
    if len(numbers) == 1:
        return (numbers[0],)
    first, last, total = numbers
    if not first <= last < total:
        return None
    return first, last, total


def partial_dir(store_dir: str) -> str:
    """Where resumable uploads keep their bytes so far: a dot path, never served."""
    return os.path.join(store_dir, ".hmacfs", "partial")


def partial_files(store_dir: str, relpath: str) -> tuple[str, str]:
    """The data file and the facts file of a resumable upload of C{relpath}."""
    key = hashlib.sha256(relpath.encode("utf-8")).hexdigest()
    base = os.path.join(partial_dir(store_dir), key)
    return base + ".part", base + ".json"


def partial_offset(fs: FileServer, relpath: str) -> int:
    """How many bytes of a resumable upload of C{relpath} we hold."""
    try:
        return os.path.getsize(partial_files(fs.store_dir, relpath)[0])
    except FileNotFoundError:
        return 0


def _header(request: http.Request, name: bytes) -> str | None:
    value = request.requestHeaders.getRawHeaders(name)
    return value[0].decode("latin-1") if value else None


class UploadRequest(server.Request):
    """
    A request that judges and streams PUT bodies itself; every other method
    goes through the resource tree as usual.
    """

    __upload: _Upload | None = None

    @property
    def _upload(self) -> _Upload | None:
        """The accepted body being received, or None; kept in C{fs.uploads}."""
        return self.__upload

    @_upload.setter
    def _upload(self, upload: _Upload | None) -> None:
        previous, self.__upload = self.__upload, upload
        if previous is not None:
            # Done with, however it ended: its path is free (a no-op after commit or discard).
            previous.releaseClaim()
            previous.fs.uploads.discard(self)
            previous.fs.metrics.uploads_in_progress.set(len(previous.fs.uploads))
            if isinstance(previous, _ResumableChunk):
                previous.release()
        if upload is not None:
            upload.fs.uploads.add(self)
            # Set, not a function read at scrape time: with Workers the scrape is in another
            # process.
            upload.fs.metrics.uploads_in_progress.set(len(upload.fs.uploads))

    _refused = False
    _pausedFor: frozenset[str] = frozenset()  # why reading is paused: "disk", "rate"
    _acceptedAt = 0.0
    _bandwidth: Bandwidth | None = None  # MaxBytesPerSecond of this upload
    _resume = None  # the pending end of a throttling pause
    _savedTimeout = None
    _finishOnBody = False
    _drainBudget: int | None = None  # bytes of a refused body still read and dropped
    _floor = None  # the hmacd.guard.BodyRateFloor of this upload (MinUploadBytesPerSecond)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for name, value in POLICY_HEADERS:
            self.responseHeaders.setRawHeaders(name, [value])

    def __repr__(self) -> str:
        # The default repr shows the URI, and with it the MAC.
        return f"<{type(self).__name__} {self.method!r} {censor(self.uri)}>"

    # HTTPChannel hooks ---------------------------------------------------

    def gotLength(self, length: int | None) -> None:
        # The request line is parsed but not yet stored on the request.
        channel = self.channel
        self.method, self.uri = channel._command, channel._path
        self.clientproto = channel._version
        self.path = self.uri.split(b"?", 1)[0]
        if self._rateLimited(length) or self._overClientCap(length):
            return
        if self.method == b"PUT":
            self.content = BytesIO()  # never used; Twisted closes it
            try:
                self._judgeUpload(length)
            except Exception:
                # A bug must cost one request, not the channel's parser state.
                log.failure("judging {request!r} failed", request=self)
                if not self._refused:
                    self._refuse(http.INTERNAL_SERVER_ERROR, "internal error", length)
        elif self.method not in ALLOWED_METHODS:
            self._refuse(
                http.NOT_ALLOWED,
                "method not allowed",
                length,
                [(b"Allow", b", ".join(ALLOWED_METHODS))],
            )
        elif length is None or length > MAX_OTHER_BODY:
            self._refuse(http.REQUEST_ENTITY_TOO_LARGE, "request body not allowed", length)
        else:
            super().gotLength(length)

    def _rateLimited(self, length: int | None) -> bool:
        fs: FileServer = self.channel.site.fileServer
        peer = getattr(self.getClientAddress(), "host", None)
        if fs.limiter is None or peer is None:
            return False
        address = client_address(
            peer, self.requestHeaders.getRawHeaders(b"x-forwarded-for"), fs.trusted_proxies
        )
        wait = fs.limiter.check(address)
        if not wait:
            return False
        fs.metrics.rate_limited.inc()
        self._refuse(
            TOO_MANY_REQUESTS,
            "too many requests",
            length,
            [(b"Retry-After", fs.limiter.retry_after(wait))],
        )
        return True

    def _overClientCap(self, length: int | None) -> bool:
        """
        Through a trusted proxy, count this request against the client it forwards for
        (MaxConnectionsPerClient; other peers were counted at accept), or refuse it.
        """
        fs: FileServer = self.channel.site.fileServer
        peer = getattr(self.getClientAddress(), "host", None)
        if not fs.max_connections_per_client or peer is None:
            return False
        client = counted_client(
            peer, self.requestHeaders.getRawHeaders(b"x-forwarded-for"), fs.trusted_proxies
        )
        if client is None:
            return False
        if fs.clients.acquire(client, fs.max_connections_per_client):
            self.notifyFinish().addBoth(lambda _: fs.clients.release(client))
            return False
        fs.metrics.connections_refused.labels("per_client").inc()
        if self.method == b"PUT":
            self._failed("per_client")
        # Closed after the answer whatever the body: what the proxy sends next on this
        # connection may be for the same client.
        self.channel.persistent = False
        self._refuse(
            TOO_MANY_REQUESTS,
            "too many connections from this client",
            length,
            [(b"Connection", b"close")],
            error=False,
        )
        return True

    def handleContentChunk(self, data: bytes) -> None:
        upload = self._upload
        if upload is None:
            if not self._refused:
                super().handleContentChunk(data)
            elif self._drainBudget is not None:
                self._drainBudget -= len(data)
                if self._drainBudget < 0:
                    self._drainBudget = None
                    self._cutOffDuringBody()
            return
        if upload.received + len(data) > upload.size:
            # Only possible with chunked transfer: more than was signed.
            log.info(
                "upload of {path} exceeds its signed size; aborting", path=escape(upload.relpath)
            )
            self._upload = None
            self._refused = True  # the rest of the body, if any, is dropped
            upload.discard()
            self._failed("too_large")
            self._logUnanswered(http.REQUEST_ENTITY_TOO_LARGE)
            self.channel.transport.abortConnection()
            return
        try:
            behind = upload.write(data)
        except OSError as e:
            self._upload = None
            upload.discard()
            self._refuse(*self._storageError(e), None, duringBody=True)
            return
        if behind:
            # The disk is behind the client: stop reading until the backlog is written.
            self._pause("disk")
        self._throttle(len(data))

    def _pause(self, reason: str) -> None:
        """Stop reading from the client, for C{reason}, until L{_unpause} of it."""
        if not self._pausedFor:
            self.channel.transport.pauseProducing()
            if self._floor is not None:
                self._floor.pause()  # our own pause is not the client's slowness
        self._pausedFor |= {reason}

    def _unpause(self, reason: str) -> None:
        """Read on, unless another reason still holds reading back."""
        if reason not in self._pausedFor:
            return
        self._pausedFor -= {reason}
        channel = getattr(self, "channel", None)  # gone once the request has finished
        if not self._pausedFor and channel is not None and not self._disconnected:
            channel.transport.resumeProducing()
            if self._floor is not None:
                self._floor.resume()

    def _diskCaughtUp(self) -> None:
        self._unpause("disk")

    def _throttle(self, count: int) -> None:
        """Pause reading while this upload (or all of them) is ahead of its rate."""
        fs = self.channel.site.fileServer
        waits = [b.take(count) for b in (self._bandwidth, fs.total_bandwidth) if b is not None]
        wait = max(waits, default=0.0)
        if wait <= 0 or self._resume is not None:
            return
        self._pause("rate")
        # A deliberate pause is not an idle client: no timeout while it lasts.
        self._savedTimeout = self.channel.setTimeout(None)
        self._resume = fs.reactor.callLater(wait, self._unthrottle)

    def _unthrottle(self) -> None:
        self._resume = None
        channel = getattr(self, "channel", None)  # gone once the request has finished
        if channel is not None and not self._disconnected:
            channel.setTimeout(self._savedTimeout)
        self._unpause("rate")

    def _endThrottle(self) -> None:
        """The body is complete (or lost): no more pauses; undo a pending one now."""
        self._bandwidth = None
        if self._resume is not None:
            self._resume.cancel()
            self._unthrottle()

    def _tooSlow(self, received: int, seconds: float) -> None:
        """Below MinUploadBytesPerSecond: cut; connectionLost removes the temp file."""
        self._floor = None
        upload = self._upload
        if upload is None or upload.committing or self._disconnected:
            return
        fs = self.channel.site.fileServer
        fs.metrics.connections_cut.labels("slow_upload").inc()
        log.info(
            "upload of {path} too slow ({received} bytes in {seconds:.0f} s, the floor is"
            " {floor} B/s); cut",
            path=upload.relpath,
            received=received,
            seconds=seconds,
            floor=fs.min_upload_bytes_per_second,
        )
        self.channel.transport.abortConnection()

    def _stopFloor(self) -> None:
        if self._floor is not None:
            self._floor.stop()
            self._floor = None

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._stopFloor()
        if self._refused:
            if self._finishOnBody:
                self._finishRefusal()
            return
        upload = self._upload
        if upload is None:
            super().requestReceived(command, path, version)
            return
        self._endThrottle()
        self.site = self.channel.site
        self.setHeader(b"Server", server.version)
        self.setHeader(b"Date", http.datetimeToString())
        if upload.received != upload.size:
            self._upload = None
            upload.discard()
            self._failed("bad_request")
            self._respond(
                http.BAD_REQUEST,
                f"body has {upload.received} bytes, the slot is for {upload.size}",
            )
            return
        self._diskCaughtUp()  # the body is complete: nothing more to hold back
        upload.onRelief = None
        upload.committing = True
        fs = self.site.fileServer

        def unwritten(failure: Failure) -> Failure:
            upload.discard()
            return failure

        d = upload.drained()
        d.addCallbacks(lambda _: committer(fs).submit(upload), unwritten)
        d.addCallback(self._recordUpload, upload)
        d.addErrback(self._commitFailed, upload)

    def connectionLost(self, reason: Failure) -> None:
        self._stopFloor()
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        upload = self._upload
        if upload is not None and not upload.committing:
            self._upload = None
            upload.discard()
            self._failed("aborted")
            log.info(
                "upload of {path} broken off after {received} of {size} bytes",
                path=escape(upload.relpath),
                received=upload.received,
                size=upload.size,
            )
        super().connectionLost(reason)

    # The verdict ---------------------------------------------------------

    def _judgeUpload(self, length: int | None) -> None:
        fs: FileServer = self.channel.site.fileServer
        try:
            relpath = relative_path(self.path, fs.prefix)
        except PathRefused as e:
            return self._refuse(http.BAD_REQUEST, str(e), length)
        if relpath is None:
            return self._refuse(http.NOT_FOUND, "not an upload path", length)

        # The MAC (v2, token) is over the header as sent; what is stored and served is its
        # parsed, normal form, so the inline rule and the browser see the same one type.
        content_type = media_type = None
        sent = self.requestHeaders.getRawHeaders(b"content-type") or []
        if len(sent) > 1:
            return self._refuse(http.BAD_REQUEST, "more than one Content-Type", length)
        if sent:
            content_type = sent[0].decode("latin-1").strip() or None
        if content_type is not None:
            try:
                media_type = parse_media_type(content_type)
            except BadMediaType:
                return self._refuse(
                    http.BAD_REQUEST, "bad Content-Type: not exactly one media type", length
                )

        query = self.uri.split(b"?", 1)[1] if b"?" in self.uri else b""
        args = {
            k: v[0] for k, v in parse_qs(query.decode("latin-1"), keep_blank_values=True).items()
        }
        picked = auth.pick_protocol(args)
        uploader = expires = None
        span = None
        if _header(self, b"content-range") is not None:
            # A resumable piece: the signed size is the total, not this
            # request's Content-Length.
            span = _parse_content_range(_header(self, b"content-range"))
            if span is None:
                return self._refuse(http.BAD_REQUEST, "bad Content-Range", length)
        if picked is not None:
            protocol, mac = picked
            if span is not None:
                size = span[-1]
            elif length is None:
                # A chunked body: the signed size must be declared up front,
                # and the final byte count must match it.
                try:
                    size = parse_decimal((_header(self, b"x-upload-length") or "").strip(" \t"))
                except NotADecimal:
                    # Absent, or no length we could use (not ASCII digits, too many of them).
                    return self._refuse(
                        http.LENGTH_REQUIRED,
                        "Content-Length or X-Upload-Length (1 to 20 digits) required",
                        length,
                    )
            else:
                size = length
            if not auth.verify_hmac(protocol, fs.secret, relpath, size, content_type, mac):
                return self._refuse(http.FORBIDDEN, "invalid MAC", length)
            if media_type is None:
                media_type = guess_type(relpath) if protocol == "v" else auth.DEFAULT_CONTENT_TYPE
        else:
            token = auth.bearer_token(_header(self, b"authorization"))
            if token is None:
                return self._refuse(
                    http.UNAUTHORIZED,
                    "no MAC (v, v2, token) and no bearer token",
                    length,
                    [(b"WWW-Authenticate", b"Bearer")],
                )
            try:
                slot = auth.verify_jwt(fs.secret, token, now=fs.now())
                auth.check_bearer_path(slot, relpath)
            except auth.AuthError as e:
                return self._refuse(http.FORBIDDEN, str(e), length)
            if span is not None and span[-1] != slot.filesize:
                return self._refuse(
                    http.BAD_REQUEST, f"total differs from the slot's {slot.filesize}", length
                )
            if span is None and length is not None and length != slot.filesize:
                code = http.REQUEST_ENTITY_TOO_LARGE if length > slot.filesize else http.BAD_REQUEST
                return self._refuse(
                    code, f"Content-Length {length} differs from the slot's {slot.filesize}", length
                )
            protocol, size = "jwt", slot.filesize
            # As Prosody's own mod_http_file_share: the type the slot was
            # issued for is the one served.
            if slot.filetype:
                try:
                    media_type = parse_media_type(slot.filetype)
                except BadMediaType:
                    return self._refuse(http.BAD_REQUEST, "bad filetype in token", length)
            elif media_type is None:
                media_type = guess_type(relpath)
            uploader, expires = slot.sub, slot.expires

        if fs.upload_max_size and size > fs.upload_max_size:
            return self._refuse(
                http.REQUEST_ENTITY_TOO_LARGE, f"larger than {fs.upload_max_size} bytes", length
            )
        # What this request will write: any upload its whole declared size, a resumable
        # piece its own range, an offset query nothing.
        if span is None:
            needed = size
        elif len(span) == 3:
            needed = span[1] - span[0] + 1
        else:
            needed = 0
        if needed and fs.room_for(needed) is False:
            log.warn(
                "refused {path} ({size} bytes): less free space than that plus MinFreeSpace",
                path=relpath,
                size=needed,
            )
            return self._refuse(INSUFFICIENT_STORAGE, "insufficient storage", length)
        if not fs.accepting:
            return self._refuse(
                http.SERVICE_UNAVAILABLE,
                "shutting down",
                length,
                [(b"Retry-After", RETRY_AFTER)],
            )
        if not fs.metadata.writable():
            # No store could record the file: say so before the client
            # spends its bandwidth on a body we would have to throw away.
            return self._refuse(
                http.SERVICE_UNAVAILABLE,
                "metadata store unavailable",
                length,
                [(b"Retry-After", RETRY_AFTER)],
            )
        try:
            if span is not None:
                chunk = self._resumableChunk(
                    fs, relpath, span, length, media_type, protocol, uploader, expires
                )
                if chunk is None:
                    return None  # answered already
                self._upload = chunk
            else:
                self._upload = _Upload(
                    fs, relpath, size, media_type, protocol, uploader, fs.expiry(expires)
                )
            self._acceptedAt = fs.reactor.seconds()
            self._upload.onRelief = self._diskCaughtUp
            upload = self._upload
            self._floor = watch_body_rate(fs, lambda: upload.received, self._tooSlow)
            if fs.max_bytes_per_second:
                self._bandwidth = Bandwidth(fs.max_bytes_per_second, fs.reactor)
            if size > READ_SIZE:
                # Fewer, larger reads: a sixteenth of the calls through the HTTP parser.  A
                # bandwidth limit reads at most a sixteenth of a second's worth, or the
                # last read, which nothing pauses after, would carry it past its rate.
                limits = [b.rate for b in (self._bandwidth, fs.total_bandwidth) if b is not None]
                read = min([READ_SIZE] + [int(rate) // 16 for rate in limits])
                self.channel.transport.bufferSize = max(read, FileDescriptor.bufferSize)
        except Conflict:
            return self._refuse(http.CONFLICT, "file exists", length)
        except PathBusy:
            return self._refuse(http.CONFLICT, "an upload of this path is in progress", length)
        except PathRefused as e:
            return self._refuse(http.BAD_REQUEST, str(e), length)
        except OSError as e:
            return self._refuse(*self._storageError(e), length)

    def _resumableChunk(
        self, fs, relpath, span, length, content_type, protocol, uploader, expires
    ) -> _ResumableChunk | None:
        """The chunk to receive, or None when the request has been answered."""
        if len(span) == 1:
            # "bytes */total": where does the upload stand?
            if length not in (0, None):
                self._refuse(http.BAD_REQUEST, "an offset query has no body", length)
                return None
            if os.path.lexists(store_path(fs.store_dir, relpath)):
                self._refuse(http.CONFLICT, "file exists", length)
                return None
            offset = partial_offset(fs, relpath)
            self._refuse(
                RESUME_INCOMPLETE, f"{offset} bytes received", length, received_range(offset), False
            )
            return None
        start, end, total = span
        # A chunked piece (no Content-Length) is held to its range's length
        # as it streams.
        if length is not None and length != end - start + 1:
            self._refuse(http.BAD_REQUEST, "Content-Length must match Content-Range", length)
            return None
        try:
            return _ResumableChunk(
                fs, relpath, total, start, end - start + 1, content_type, protocol, uploader,
                fs.expiry(expires),
            )  # fmt: skip
        except ChunkInProgress:
            self._refuse(http.CONFLICT, "another chunk of this upload is in progress", length)
        except OffsetMismatch as e:
            self._refuse(
                http.REQUESTED_RANGE_NOT_SATISFIABLE,
                f"the upload stands at {e.offset} bytes",
                length,
                received_range(e.offset),
            )
        return None

    # Answers -------------------------------------------------------------

    def _writeAnswer(self, code: int, message: str, headers=()) -> None:
        body = message.encode("utf-8") + b"\n"
        self.setResponseCode(code, b"Resume Incomplete" if code == RESUME_INCOMPLETE else None)
        for name, value in headers:
            self.setHeader(name, value)
        self.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        self.setHeader(b"Content-Length", b"%d" % len(body))
        self.write(body)

    def _respond(self, code: int, message: str, headers=()) -> None:
        """Answer a request whose body has been read in full."""
        if self._disconnected:
            # Nobody to tell, but the outcome still belongs in the access log.
            self._logUnanswered(code)
            return
        self._writeAnswer(code, message, headers)
        self.finish()

    def _refuse(
        self,
        code: int,
        message: str,
        length: int | None,
        headers=(),
        error: bool = True,
        duringBody: bool = False,
    ) -> None:
        """
        Answer now, before the body, and make sure the body is never stored.

        The connection is closed afterwards: its remaining bytes are a body
        nobody wants.  Small bodies are drained first (see L{DRAIN_LIMIT});
        others, and clients waiting for 100 Continue, are cut off at once.
        """
        self._refused = True
        if self.method == b"PUT" and error:
            self._failed(_REASONS.get(code, "other"))
        expect = _header(self, b"expect")
        self.requestHeaders.removeHeader(b"expect")
        if length != 0:
            # The connection closes after the answer: what is left of it is a
            # body nobody wants.  Say so, or a client's pool reuses it.
            self.channel.persistent = False
            headers = [*headers, (b"Connection", b"close")]
        self.setHeader(b"Server", server.version)
        self.setHeader(b"Date", http.datetimeToString())
        self._writeAnswer(code, message, headers)
        log.debug(
            "refused {method} {path}: {code} {message}",
            method=escape(self.method),
            path=escape(self.path),
            code=code,
            message=message,
        )
        if duringBody:
            self._cutOffDuringBody()
        elif length == 0 or (expect is None and (length is None or length <= DRAIN_LIMIT)):
            # HTTPChannel calls requestReceived once the body is in
            # (immediately, for an empty one); finishing before that would
            # leave the channel without a request to deliver it to.  A
            # chunked body that turns out larger than the limit is cut off.
            self._finishOnBody = True
            self._drainBudget = DRAIN_LIMIT
        else:
            # In gotLength: the channel checks `transport.disconnecting`
            # after the header block and reads no further.
            self.finish()

    def abortUpload(self) -> None:
        """Drop the connection of an upload in progress (shutdown); the temp file goes."""
        if self.channel is not None:
            self.channel.transport.abortConnection()

    def _failed(self, reason: str) -> None:
        self._site().fileServer.metrics.upload_errors.labels(reason).inc()

    def _site(self):
        # `site` is set by process(), which uploads never reach.
        return self.site if self.site is not None else self.channel.site

    def _logUnanswered(self, code: int) -> None:
        """Write the access-log line of a request that gets no response."""
        self.setResponseCode(code)
        self._site().log(self)

    def _storageError(self, error: OSError) -> tuple[int, str]:
        log.error("cannot store {path}: {error}", path=escape(self.path), error=error)
        if error.errno in _STORAGE_FULL:
            return INSUFFICIENT_STORAGE, "insufficient storage"
        return http.INTERNAL_SERVER_ERROR, "cannot store the file"

    def _cutOffDuringBody(self) -> None:
        # The channel's transfer decoder is still working through the
        # current input and would hand the end of the body to a channel that
        # no longer has this request: stop reading, finish after.
        self._finishOnBody = True
        self.channel.transport.pauseProducing()
        self.channel.site.fileServer.reactor.callLater(0, self._finishRefusal)

    def _finishRefusal(self) -> None:
        if not self.finished and not self._disconnected:
            self.finish()

    def _recordUpload(self, record: FileRecord | int, upload: _Upload):
        if isinstance(record, int):
            # A resumable piece is in; the upload is not complete yet.
            self._upload = None
            self._respond(RESUME_INCOMPLETE, f"{record} bytes received", received_range(record))
            return None
        d = self.site.fileServer.metadata.put(record)

        def published(_):
            self._upload = None
            metrics = self.site.fileServer.metrics
            metrics.uploads.inc()
            metrics.upload_bytes.inc(record.size)
            metrics.upload_duration.observe(
                self.site.fileServer.reactor.seconds() - self._acceptedAt
            )
            log.info(
                "stored {path} ({size} bytes, {type}, {protocol})",
                path=escape(record.path),
                size=record.size,
                type=record.content_type,
                protocol=record.protocol,
            )
            self._respond(http.CREATED, "created")

        def unrecorded(failure: Failure):
            if failure.check(StoreUnavailable):
                log.warn(
                    "cannot record {path} ({why}); upload withdrawn",
                    path=escape(record.path),
                    why=failure.value,
                )
            else:
                log.failure(
                    "cannot record {path}; upload withdrawn", failure, path=escape(record.path)
                )
            upload.unpublish()
            # The write may still land later (a timed-out query cannot be
            # recalled): try to take it back too, so no record outlives its file.
            self.site.fileServer.metadata.delete(record.path).addErrback(lambda _: None)
            raise _Answered(
                http.SERVICE_UNAVAILABLE,
                "metadata store unavailable",
                [(b"Retry-After", RETRY_AFTER)],
            )

        return d.addCallbacks(published, unrecorded)

    def _commitFailed(self, failure: Failure, upload: _Upload) -> None:
        self._upload = None
        if failure.check(Conflict):
            self._failed("conflict")
            self._respond(http.CONFLICT, "file exists")
        elif failure.check(_Answered):
            self._failed("store")
            self._respond(*failure.value.args)
        elif failure.check(OSError) and failure.value.errno in _STORAGE_FULL:
            self._failed("disk")
            log.error(
                "cannot store {path}: {error}", path=escape(upload.relpath), error=failure.value
            )
            self._respond(INSUFFICIENT_STORAGE, "insufficient storage")
        else:
            self._failed("internal")
            log.failure("cannot store {path}", failure, path=escape(upload.relpath))
            self._respond(http.INTERNAL_SERVER_ERROR, "cannot store the file")


class _Answered(Exception):
    """Carries an already decided (code, message, headers) down an errback chain."""
