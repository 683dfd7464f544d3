"""
L{IStorage} on a local directory (C{StoreDir}).

A new file is a temp dot file in its destination's own directory, so that publishing it
is one atomic C{link} that never overwrites, and the temp can never be served.  Its bytes
are written and hashed in a worker thread, in batches of at least the write buffer, while
the reactor reads on; its facts are an extended attribute, durable with the bytes before
the name appears.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Callable, Iterator
from typing import IO, Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hmacd.facts import read_facts, write_facts
from hmacd.logs import escape
from hmacd.metadata import FileRecord
from hmacd.paths import PathRefused, store_path
from hmacd.storage import Conflict, IReadable, IStorage, IWriter, Stat

__all__ = [
    "MAX_WRITE_BUFFER",
    "PART_PREFIX",
    "PART_SUFFIX",
    "SPOOL_HIGH",
    "SPOOL_LOW",
    "LocalStorage",
    "fsync_directory",
]

log = Logger()

# Temp files of uploads in progress: dot files (never served), recognisable
# for the sweep of abandoned ones.
PART_PREFIX, PART_SUFFIX = ".hmacfs-", ".part"

# A large body's bytes not yet written by the worker thread: above SPOOL_HIGH the writer
# says it is behind, at SPOOL_LOW it has caught up.  Bounds what one fast upload holds.
SPOOL_HIGH = 4 * 1024 * 1024
SPOOL_LOW = 1024 * 1024

# Each upload in progress holds its write buffer: 500 slow uploads with ChunkSize's default
# 1 MiB each held ~370 MiB of half-filled buffers.  Socket reads are at most 64 KiB anyway.
MAX_WRITE_BUFFER = 64 * 1024

Blocking = Callable[[Callable[[], Any]], Deferred[Any]]


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


@implementer(IStorage)
class LocalStorage:
    """
    The files of C{root}, a local directory.

    @param blocking: runs a blocking callable in a worker thread (the writers' spooling).
    @param chunk_size: C{ChunkSize}; a writer buffers at most 64 KiB of it.
    """

    def __init__(self, root: str, blocking: Blocking, chunk_size: int = 1 << 20) -> None:
        self.root = os.path.abspath(root)
        self.blocking = blocking
        self.write_buffer = min(chunk_size, MAX_WRITE_BUFFER)

    def writer(self, relpath: str) -> LocalWriter:
        return LocalWriter(self, relpath)

    def adopt(self, source: str, relpath: str, record: FileRecord) -> None:
        with open(source, "rb") as f:
            # As for a new file: the facts are on it, durably, before it is linked.
            if write_facts(f.fileno(), record):
                os.fsync(f.fileno())
        dest = store_path(self.root, relpath)
        self.make_parents(os.path.dirname(dest))
        store_path(self.root, relpath)
        try:
            os.link(source, dest)
        except FileExistsError:
            self.prune(relpath)
            raise Conflict() from None

    def settle(self, relpaths: list[str]) -> None:
        # Each directory once, however many files went into it.
        for directory in {os.path.dirname(os.path.join(self.root, p)) for p in relpaths}:
            fsync_directory(directory)

    def exists(self, relpath: str) -> bool:
        return os.path.lexists(store_path(self.root, relpath))

    def stat(self, relpath: str) -> Stat | None:
        try:
            st = os.stat(store_path(self.root, relpath))
        except (OSError, PathRefused):
            return None
        if not stat.S_ISREG(st.st_mode):
            return None  # a directory: not a stored file
        return Stat(st.st_size, st.st_mtime)

    def open(self, relpath: str) -> LocalFile | None:
        try:
            # Non-blocking: a FIFO placed in the store must not hang us (a regular file
            # reads the same either way).  A link is followed: store_path has judged it.
            fd = os.open(store_path(self.root, relpath), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except (OSError, PathRefused):
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None  # a directory (or a FIFO): not a stored file
        return LocalFile(open(fd, "rb", buffering=0), relpath, st)

    def delete(self, relpath: str) -> bool:
        try:
            path = store_path(self.root, relpath)
        except PathRefused:
            return False
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        directory = os.path.dirname(path)
        root = os.path.realpath(self.root)
        while directory != root and directory.startswith(root + os.sep):
            try:
                os.rmdir(directory)
            except OSError:
                break  # not empty
            directory = os.path.dirname(directory)
        return True

    def files(self) -> Iterator[str]:
        """Every served file: no dot entries, no links, in a stable order."""
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    if not stat.S_ISREG(os.lstat(path).st_mode):
                        continue
                except FileNotFoundError:
                    continue
                yield os.path.relpath(path, self.root).replace(os.sep, "/")

    def sweep_temps(self, older_than: float) -> list[str]:
        # A broken connection removes its own temp file; only a crash or a kill leaves one
        # behind.  Newer ones may belong to an upload in progress.
        removed = []
        for dirpath, dirnames, filenames in os.walk(self.root):
            if dirpath == self.root and ".hmacfs" in dirnames:
                dirnames.remove(".hmacfs")
            for name in filenames:
                if not (name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX)):
                    continue
                path = os.path.join(dirpath, name)
                try:
                    if os.lstat(path).st_mtime < older_than:
                        os.unlink(path)
                        removed.append(os.path.relpath(path, self.root))
                except FileNotFoundError:
                    pass  # finished or swept meanwhile
        return removed

    def make_parents(self, directory: str) -> list[str]:
        """Create the missing directories down to C{directory}; those it made."""
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

    def prune(self, relpath: str) -> None:
        """
        Remove the directories of C{relpath} that are empty, innermost first.

        Not only those an upload created: of two uploads into a new directory that both
        break off, the one that created it may go first, while the other's temp file is
        still in it.  The root is never removed: only the path's own parents are tried.
        """
        directory = os.path.dirname(os.path.join(self.root, relpath))
        for _ in range(relpath.count("/")):
            try:
                os.rmdir(directory)
            except OSError:
                break  # not empty: another upload uses it now
            directory = os.path.dirname(directory)


@implementer(IReadable)
class LocalFile:
    """A stored file open for reading; the open file is the zero-copy path."""

    def __init__(self, f: IO[bytes], relpath: str, st: os.stat_result) -> None:
        self._file = f
        self._relpath = relpath
        self.size = st.st_size
        self.modified = st.st_mtime
        self.modified_ns = st.st_mtime_ns
        self.version = (st.st_ino, st.st_mtime_ns, st.st_size)

    def facts(self) -> FileRecord | None:
        return read_facts(self._file.fileno(), self._relpath)

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._file.fileno(), length, offset)

    def local_file(self) -> IO[bytes]:
        return self._file

    def close(self) -> None:
        self._file.close()


@implementer(IWriter)
class LocalWriter:
    """A temp dot file beside the destination, spooled to from a worker thread."""

    onRelief: Callable[[], None] | None = None
    temp: str | None = None
    _busy = False  # a batch is in the thread
    _failure: OSError | None = None
    _closeAfterBatch = False
    _draining = False

    def __init__(self, storage: LocalStorage, relpath: str) -> None:
        self.storage = storage
        self.relpath = relpath
        self.dest = store_path(storage.root, relpath)
        self.received = 0
        self._sha256 = hashlib.sha256()
        # Bytes given to write() and not yet written, waiting (_pending) or in the thread.
        self._pending: list[bytes] = []
        self._backlog = 0
        self._waiters: list[Deferred[None]] = []
        if os.path.lexists(self.dest):
            raise Conflict()
        try:
            self.temp, self._file = self._open()
        except BaseException:
            storage.prune(relpath)  # a refused upload leaves the store as it was
            raise

    def _open(self) -> tuple[str, IO[bytes]]:
        for attempt in (1, 2):
            try:
                if self.storage.make_parents(os.path.dirname(self.dest)):
                    # Re-check now that the directories exist: a symlink placed
                    # on the way must not lead the temp file out of the store.
                    store_path(self.storage.root, self.relpath)
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
            # (or the rest, at seal), and 500 slow uploads held 32 MiB of idle
            # BufferedWriters.
            return temp, open(fd, "wb", buffering=0)
        raise AssertionError("unreachable")

    def write(self, data: bytes) -> bool:
        self.received += len(data)
        if self._failure is not None:
            raise self._failure
        self._pending.append(data)
        self._backlog += len(data)
        if not self._busy and self._backlog >= self.storage.write_buffer:
            self._dispatch()
        return self._backlog > SPOOL_HIGH

    def _dispatch(self) -> None:
        batch, self._pending = self._pending, []
        self._busy = True
        d = self.storage.blocking(lambda: self._spool(batch))
        d.addBoth(self._spooled, sum(map(len, batch)))

    def _spool(self, batch: list[bytes]) -> None:
        # In a worker thread: file writes and hashlib release the GIL.
        for data in batch:
            view = memoryview(data)
            while view:
                view = view[self._file.write(view) or 0 :]
            self._sha256.update(data)

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
        if self._failure is None and self._backlog >= self.storage.write_buffer:
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
        self._draining = True
        if self._failure is not None:
            return fail(self._failure)
        if not self._busy:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def seal(self) -> str:
        try:
            self._spool(self._pending)
        except BaseException:
            self.discard()
            raise
        self._pending = []
        return self._sha256.hexdigest()

    def publish(self, record: FileRecord) -> None:
        assert self.temp is not None
        try:
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

    def _closeFile(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()

    def discard(self) -> None:
        self.onRelief = None
        if self._busy:
            # The thread is writing to it: closed when its batch is done.
            self._closeAfterBatch = True
        else:
            self._closeFile()
        if self.temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp)
        self.storage.prune(self.relpath)
