"""
L{IStorage} on a local directory (C{StoreDir}).

A new file is a temp in its destination's own directory, so that publishing it is one
atomic C{link} that never overwrites, and the temp can never be served: an C{O_TMPFILE},
which has no name at all until that link (a crash leaves nothing of it), or where the file
system has none a dot file.  Its bytes are written and hashed in a worker thread, in
batches of at least the write buffer, while the reactor reads on; its facts are an
extended attribute, durable with the bytes before the name appears.  A body that fits the
write buffer touches the file system only then, in the worker thread (its directories,
its temp, its bytes, its link): the reactor thread makes no directory and no file.

Before anyone is told of a file (L{LocalStorage.settle}), its directory is fsynced, and so
is the parent of every directory made for it, up to the first that was there: the name
and the directories leading to it survive a power cut.  Uploads committed together share
those fsyncs, and where io_uring can be had (L{hmacd.uring}) a batch's fsyncs (its files',
then its directories') are handed to the kernel at once, to run side by side.
C{SyncUploads = false} skips every fsync of an upload (the Go server's trade-off: a power
cut may lose files already answered 201).

With C{Deduplication}, bytes are stored once per content: C{.hmacfs/cas/ab/<sha256>} is a
hard link to the one inode, and every path uploaded with those bytes is another.  An
upload whose content is there already links its name to it and drops its temp (no fsync,
no facts: its record holds them, L{hmacd.facts}); a new content is published as without
deduplication and then entered.  A path's deletion unlinks it, and the content's entry
goes with the last path (its link count says so).  An upload linking to an entry holds a
shared C{flock} on it, and a deletion takes it exclusively before it judges the count: an
entry is never removed while an upload is linking to it, in any thread or process.  Hard
links make every other outcome safe too: a name unlinked never takes bytes that another
name still refers to, so a race can cost sharing (two copies of one content), never bytes
of a file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hmacd.facts import content_sha256, disown_facts, named_path, read_facts, write_facts
from hmacd.logs import escape
from hmacd.metadata import FileRecord
from hmacd.paths import PathRefused, locate, resolved_root, store_path
from hmacd.storage import (
    Conflict,
    IReadable,
    IStorage,
    IWriter,
    Stat,
    outcomes,
    publish_each,
)
from hmacd.uring import RingFailed, Rings

__all__ = [
    "CAS_DIR",
    "MAX_WRITE_BUFFER",
    "PART_PREFIX",
    "PART_SUFFIX",
    "SPOOL_HIGH",
    "SPOOL_LOW",
    "DedupCensus",
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

# Temps without a name: linked into place through /proc/self/fd (the one way to link one
# without CAP_DAC_READ_SEARCH).  The errors of a file system that has none.
_TMPFILE = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EISDIR, errno.EINVAL)

# hashlib hashes without the GIL from this many bytes on.
_HASHLIB_GIL_MINSIZE = 2048

# Deduplication's content-addressed area: one hard link per stored content, by SHA-256.
CAS_DIR = os.path.join(".hmacfs", "cas")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class DedupCensus:
    """
    What deduplication holds (L{LocalStorage.dedup_census}).

    @ivar contents: distinct contents with at least one path.
    @ivar references: paths referring to them.
    @ivar stored_bytes: bytes those contents take once each.
    @ivar saved_bytes: bytes not on the disk thanks to sharing: each content's size times
        its paths beyond the first (what the paths would take as separate files, less
        C{stored_bytes}).
    @ivar orphans: entries no path refers to any more (a crash between a path's deletion
        and its entry's); the sweep of abandoned temps removes them.
    """

    contents: int = 0
    references: int = 0
    stored_bytes: int = 0
    saved_bytes: int = 0
    orphans: int = 0

    @classmethod
    def of(cls, entries: Iterable[tuple[int, int]]) -> DedupCensus:
        """The census of contents given as (size, paths referring to it)."""
        contents = references = stored = saved = orphans = 0
        for size, paths in entries:
            if paths < 1:
                orphans += 1
                continue
            contents += 1
            references += paths
            stored += size
            saved += size * (paths - 1)
        return cls(contents, references, stored, saved, orphans)


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


def fsync_each(fds: list[int]) -> list[OSError | None]:
    """fsync each of C{fds} in turn: for each, None or its error."""
    return outcomes(os.fsync, fds, OSError)


def link_open(fd: int, dest: str) -> None:
    """
    Link the open file C{fd} (an O_TMPFILE) to the name C{dest}, never overwriting.

    @raise FileExistsError: C{dest} is taken.
    """
    # An absolute source ignores src_dir_fd; giving one makes os.link call linkat() with
    # AT_SYMLINK_FOLLOW, which the /proc link needs (plain link() would link the magic
    # link itself, across devices).
    os.link(f"/proc/self/fd/{fd}", dest, src_dir_fd=fd, follow_symlinks=True)


def _hash_holding_the_gil(sha256: Any, data: bytes) -> None:
    """
    C{sha256.update(data)} without letting the GIL go: hashlib lets it go from 2 KiB on
    (and, once it has, for every later piece of that hash), and for a body of a few KiB
    taking it back costs a worker thread more than the hashing, while the reactor thread
    holds it.
    """
    view = memoryview(data)
    for start in range(0, len(view), _HASHLIB_GIL_MINSIZE - 1):
        sha256.update(view[start : start + _HASHLIB_GIL_MINSIZE - 1])


@implementer(IStorage)
class LocalStorage:
    """
    The files of C{root}, a local directory.

    @param blocking: runs a blocking callable in a worker thread (the writers' spooling).
    @param chunk_size: C{ChunkSize}; a writer buffers at most 64 KiB of it.
    @param dedup: C{Deduplication}: new files share the bytes of an identical one.
    @param on_shared: called (in a worker thread) with the size of each file stored as a
        reference to bytes already there.
    @param sync: C{SyncUploads}: fsync each new file, its directory and the parents of the
        directories made for it before it is answered.  False leaves it to the kernel.
    @param rings: where the fsyncs of a batch go to the kernel together (C{IoUring}); None:
        one at a time.
    @ivar tmpfile: whether temps are C{O_TMPFILE}s (linked through C{/proc/self/fd}); set
        False for good the first time the file system refuses one.
    """

    def __init__(
        self,
        root: str,
        blocking: Blocking,
        chunk_size: int = 1 << 20,
        dedup: bool = False,
        on_shared: Callable[[int], None] | None = None,
        sync: bool = True,
        rings: Rings | None = None,
    ) -> None:
        self.root = os.path.abspath(root)
        self.blocking = blocking
        self.write_buffer = min(chunk_size, MAX_WRITE_BUFFER)
        self.dedup = dedup
        self.on_shared = on_shared
        self.sync = sync
        self.rings = rings
        self.tmpfile = _TMPFILE
        self.cas_root = os.path.join(self.root, CAS_DIR)
        # Files shared while Deduplication was on stay shared after it is turned off: their
        # deletions must still let their contents' entries go.  Without either, deletion is
        # what it always was.
        self.shares = dedup or os.path.isdir(self.cas_root)
        # Directories this process made whose entries in their parents may not be durable
        # yet: settle() fsyncs those parents before a file in them is answered.  Pool threads
        # add and settle; the lock keeps the set whole.
        self._unsettled: set[str] = set()
        self._unsettledLock = threading.Lock()

    def writer(self, relpath: str, draft: FileRecord | None = None) -> LocalWriter:
        return LocalWriter(self, relpath, None if draft is None else draft.size)

    def adopt(self, source: str, relpath: str, record: FileRecord) -> None:
        if self.dedup:
            self._adoptShared(source, relpath, record)
            return
        with open(source, "rb") as f:
            # As for a new file: the facts are on it, durably, before it is linked.
            if write_facts(f.fileno(), record) and self.sync:
                os.fsync(f.fileno())
        dest = store_path(self.root, relpath)
        self.make_parents(os.path.dirname(dest))
        store_path(self.root, relpath)
        try:
            os.link(source, dest)
        except FileExistsError:
            self.prune(relpath)
            raise Conflict() from None

    def _adoptShared(self, source: str, relpath: str, record: FileRecord) -> None:
        dest = store_path(self.root, relpath)
        self.make_parents(os.path.dirname(dest))
        store_path(self.root, relpath)
        try:
            if self.link_content(record.sha256, record.size, dest):
                return
            with open(source, "rb") as f:
                if write_facts(f.fileno(), record, named=True) and self.sync:
                    os.fsync(f.fileno())
            os.link(source, dest)
        except FileExistsError:
            self.prune(relpath)
            raise Conflict() from None
        self.enter_content(source, record.sha256)

    # -- Deduplication -------------------------------------------------------------------

    def content_path(self, sha256: str) -> str:
        """The entry of the content whose SHA-256 (lowercase hex) is C{sha256}."""
        if not _SHA256_HEX.fullmatch(sha256):
            raise ValueError(f"not a SHA-256: {sha256!r}")
        return os.path.join(self.cas_root, sha256[:2], sha256)

    def link_content(self, sha256: str, size: int, dest: str) -> bool:
        """
        Blocking.  Link C{dest} to the stored content C{sha256} of C{size} bytes; False
        when there is none to link to (the caller stores its own bytes).

        @raise FileExistsError: C{dest} is taken.
        """
        try:
            fd = os.open(self.content_path(sha256), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return False  # no such content yet (or its directory), or not ours to share
        try:
            # Shared: the entry cannot be judged unreferenced and removed while we link.
            fcntl.flock(fd, fcntl.LOCK_SH)
            st = os.fstat(fd)
            if st.st_nlink == 0 or st.st_size != size or not stat.S_ISREG(st.st_mode):
                return False  # removed while we waited for the lock, or not that content
            relpath = os.path.relpath(dest, self.root).replace(os.sep, "/")
            if named_path(fd) == relpath:
                # An earlier upload of this very path, deleted behind our back (by hand):
                # its facts must not become this upload's.
                disown_facts(fd)
            try:
                os.link(self.content_path(sha256), dest)
            except OSError as e:
                if e.errno in (errno.EMLINK, errno.ENOENT, errno.EXDEV, errno.EPERM):
                    return False  # too many links: this file gets bytes of its own
                raise
        finally:
            os.close(fd)
        if self.on_shared is not None:
            self.on_shared(size)
        return True

    def enter_content(self, path: str | None, sha256: str, fd: int | None = None) -> bool:
        """
        Blocking.  Make the published file at C{path} (or its temp, another link to it; or
        the open O_TMPFILE C{fd}) the entry of its content, for later uploads of the same
        bytes to share; whether it is.  Best effort: a content entered meanwhile by another
        upload keeps its entry, and this file its own bytes.
        """
        entry = self.content_path(sha256)
        for _ in range(2):
            try:
                if fd is not None:
                    link_open(fd, entry)
                else:
                    assert path is not None
                    os.link(path, entry)
                return True
            except FileNotFoundError:
                os.makedirs(os.path.dirname(entry), exist_ok=True)
            except OSError:
                return False  # entered meanwhile (EEXIST), or the area cannot take links
        return False

    def release_content(self, sha256: str, inode: tuple[int, int] | None = None) -> bool:
        """
        Blocking.  Remove the entry of C{sha256} if no path refers to it any more (and, given
        C{inode}, if it is still that (device, inode)); whether it went.
        """
        try:
            entry = self.content_path(sha256)
            fd = os.open(entry, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except (OSError, ValueError):
            return False
        try:
            st = os.fstat(fd)
            if inode is not None and (st.st_dev, st.st_ino) != inode:
                return False  # another entry of the same content: not the one we shared
            # Exclusive: an upload linking to it holds it shared until its link is made,
            # which raises the count we judge by.
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink != 1:
                return False
            os.unlink(entry)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(fd)

    def release_if_last(self, sha256: str) -> None:
        """
        Blocking.  After a new content's temp is gone: if its path was deleted meanwhile
        (while the temp held the count up), the entry is the last link and goes now, not at
        the next sweep.  One lstat when it is not.
        """
        try:
            if os.lstat(self.content_path(sha256)).st_nlink != 1:
                return
        except FileNotFoundError:
            return
        self.release_content(sha256)

    def _deleteShared(self, path: str) -> bool:
        """Unlink a path that may share its bytes; release its content's entry after it."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode) or st.st_nlink == 1:
            os.unlink(path)
            return True
        digest = None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            fd = None
        if fd is not None:
            try:
                digest = content_sha256(fd)
                relpath = os.path.relpath(path, self.root).replace(os.sep, "/")
                if named_path(fd) == relpath:
                    # The facts are this path's: not to be served for any other, nor for
                    # this path uploaded again with the same bytes.
                    disown_facts(fd)
            finally:
                os.close(fd)
        os.unlink(path)
        if digest is not None:
            self.release_content(digest, (st.st_dev, st.st_ino))
        # Without facts the entry cannot be found by name: the sweep finds it alone.
        return True

    def references(self, sha256: str) -> Iterator[str]:
        """
        Blocking (a walk of every file).  The paths whose bytes have the SHA-256 C{sha256}:
        those sharing its entry's inode, and any stored with bytes of their own whose facts
        state that digest (uploaded without Deduplication, or past a link limit).  Files
        with no facts at all are not hashed: their records say what they are.
        """
        try:
            st = os.stat(self.content_path(sha256))
            inode: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except (OSError, ValueError):
            inode = None
        for relpath in self.files():
            path = os.path.join(self.root, relpath)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if inode is not None and (st.st_dev, st.st_ino) == inode:
                yield relpath
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                if content_sha256(fd) == sha256:
                    yield relpath
            finally:
                os.close(fd)

    def take_down(self, sha256: str) -> list[str]:
        """
        Blocking.  Delete every path whose bytes have the SHA-256 C{sha256}, and the
        content's entry; the paths deleted (their records are the caller's to delete).

        An upload of the same bytes finishing during the walk may escape it: a deny list
        checked by the upload (the admin's takedown) closes that door.

        @raise ValueError: C{sha256} is not 64 lowercase hex digits.
        """
        self.content_path(sha256)  # judge it before the walk
        gone = [relpath for relpath in list(self.references(sha256)) if self.delete(relpath)]
        self.release_content(sha256)
        return gone

    def dedup_census(self) -> DedupCensus:
        """Blocking (a walk of the entries, one lstat each).  What sharing holds now."""
        return DedupCensus.of(
            # Every link of an entry but its own is a path.
            (st.st_size, st.st_nlink - 1)
            for _, _, st in self._entries()
            if stat.S_ISREG(st.st_mode)
        )

    def _entries(self) -> Iterator[tuple[str, str, os.stat_result]]:
        """Blocking.  Each entry of the content area: its name, its path, its lstat."""
        try:
            shards = sorted(os.listdir(self.cas_root))
        except FileNotFoundError:
            return
        for shard in shards:
            try:
                names = os.listdir(os.path.join(self.cas_root, shard))
            except (NotADirectoryError, FileNotFoundError):
                continue
            for name in names:
                path = os.path.join(self.cas_root, shard, name)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                yield name, path, st

    def _sweepOrphans(self) -> list[str]:
        """Entries no path refers to any more; removed, under the same lock as a deletion."""
        removed: list[str] = []
        for name, path, st in self._entries():
            if st.st_nlink != 1:
                continue
            if _SHA256_HEX.fullmatch(name) and self.release_content(name):
                removed.append(os.path.relpath(path, self.root))
        return removed

    def fsync_all(self, fds: list[int]) -> list[OSError | None]:
        """
        Blocking.  fsync every one of C{fds}: together through io_uring where there is one
        (C{rings}) and more than one to make, else one at a time; for each, None or its error.
        """
        if self.rings is None or len(fds) < 2:
            return fsync_each(fds)  # a lone fsync (a large body's, say) gains nothing there
        try:
            results: list[int | None] = list(self.rings.fsync_all(fds))
        except RingFailed as e:
            log.warn("{why}; this batch's other fsyncs go one at a time", why=e)
            results = e.results
            for i in e.lost:
                results[i] = -errno.EIO  # run, result lost: never taken for a success
        except (OSError, RuntimeError) as e:
            # No ring to be had in this thread (a memlock limit, say): not asked again.
            log.warn("io_uring unavailable ({why}); fsyncs one at a time from now on", why=e)
            self.rings = None
            return fsync_each(fds)
        again = [i for i, r in enumerate(results) if r is None]
        for i, error in zip(again, fsync_each([fds[i] for i in again]), strict=True):
            results[i] = 0 if error is None else -(error.errno or errno.EIO)
        return [None if not r else OSError(-r, os.strerror(-r)) for r in results]

    def publish_all(self, items: list[tuple[IWriter, FileRecord]]) -> list[Exception | None]:
        if self.dedup:
            return publish_each(items)  # each shares a content, or enters its own
        return self._publishTogether([(cast(LocalWriter, w), record) for w, record in items])

    def _publishTogether(
        self, items: list[tuple[LocalWriter, FileRecord]]
    ) -> list[Exception | None]:
        """
        Blocking.  L{LocalWriter.publish} of each (no Deduplication), a step at a time for
        the whole batch: the facts on every file, their fsyncs together, then the names.
        """
        writers = [writer for writer, _ in items]
        found: list[Exception | None] = []
        for writer, record in items:
            try:
                found.append(writer.stamp(record))
            except Exception as e:  # its cleanup failed too: its own outcome still
                found.append(e)
        stamped = [i for i, outcome in enumerate(found) if outcome is None]
        fds = [writers[i].fileno() for i in stamped]
        errors = self.fsync_all(fds) if self.sync else [None] * len(fds)
        for i, error in zip(stamped, errors, strict=True):
            try:
                found[i] = writers[i].fail(error) if error else writers[i].name()
            except Exception as e:  # letting the temp go, once named: as publish would raise
                found[i] = e
        return found

    def settle(self, relpaths: list[str]) -> None:
        if not self.sync:
            return
        # Each directory once, however many files went into it.  Spelled from the resolved
        # root, as the writers made them (store_path).
        root = resolved_root(self.root)
        directories = {os.path.dirname(os.path.join(root, p)) for p in relpaths}
        # And the entries of the directories made for them, each parent once: in the slot
        # layout every upload makes one, and a batch of them shares the parent's fsync.
        made = []
        with self._unsettledLock:
            for directory in directories:
                while directory in self._unsettled:
                    made.append(directory)
                    directory = os.path.dirname(directory)
        parents = dict.fromkeys(os.path.dirname(d) for d in made)
        if self.rings is None:
            for directory in [*directories, *parents]:
                fsync_directory(directory)
        else:
            self._fsyncDirectories([*directories, *parents.keys() - directories])
        # Only once they are durable: a file another batch answers meanwhile in one of
        # these directories finds it still unsettled, and fsyncs its parent itself.
        with self._unsettledLock:
            self._unsettled.difference_update(made)

    def _fsyncDirectories(self, directories: list[str]) -> None:
        """L{fsync_directory} of each, the fsyncs together (L{fsync_all})."""
        fds = []
        try:
            for directory in directories:
                with contextlib.suppress(OSError):
                    fds.append(os.open(directory, os.O_RDONLY | os.O_DIRECTORY))
            self.fsync_all(fds)  # errors ignored, as fsync_directory's
        finally:
            for fd in fds:
                os.close(fd)

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
            if self.shares:
                if not self._deleteShared(path):
                    return False
            else:
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
            self._forget(directory)
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
        if self.shares:
            removed.extend(self._sweepOrphans())
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
        if created and self.sync:
            with self._unsettledLock:
                self._unsettled.update(created)
        return created

    def make_directories(self, directory: str, found: int | None) -> list[str]:
        """
        Blocking.  L{make_parents}, told by L{locate} how many of the directories leading
        to C{directory} (from the resolved root down) existed: only the missing ones are
        made, with no question asked of those that were there.  Anything unexpected (a
        directory pruned meanwhile, C{found} None) is left to L{make_parents}.
        """
        root = resolved_root(self.root)
        if found is None or not (directory == root or directory.startswith(root + os.sep)):
            return self.make_parents(directory)
        parts = directory[len(root) + 1 :].split(os.sep) if directory != root else []
        made: list[str] = []
        current = os.path.join(root, *parts[:found])
        for part in parts[found:]:
            current = os.path.join(current, part)
            try:
                os.mkdir(current)
            except FileExistsError:
                if not os.path.isdir(current):
                    raise Conflict() from None
                continue  # made meanwhile by another upload
            except FileNotFoundError:
                # A directory that was there has been pruned meanwhile.
                made.extend(self.make_parents(directory))
                return made
            made.append(current)
            if self.sync:
                with self._unsettledLock:
                    self._unsettled.add(current)
        return made

    def _forget(self, directory: str) -> None:
        """C{directory} is removed: nothing in it will need its entry settled."""
        if self._unsettled:
            with self._unsettledLock:
                self._unsettled.discard(directory)

    def new_temp(self, directory: str) -> tuple[int, str | None]:
        """
        Blocking.  A temp file open for writing in C{directory}: its descriptor, and its
        name (None for an C{O_TMPFILE}, which has none).

        @raise OSError: as C{open}; FileNotFoundError when C{directory} is gone.
        """
        if self.tmpfile:
            # No O_NOFOLLOW: that would refuse a directory reached through a link inside
            # the store, which store_path has judged (as for a named temp's directory).
            flags = os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC
            try:
                return os.open(directory, flags, 0o644), None
            except OSError as e:
                if e.errno not in _NO_TMPFILE:
                    raise
                # The file system has no O_TMPFILE (some FUSE and network mounts, old
                # kernels): dot files from now on.
                self.tmpfile = False
                log.info("{root}: no O_TMPFILE here; temps are dot files", root=self.root)
        temp = os.path.join(directory, PART_PREFIX + secrets.token_hex(8) + PART_SUFFIX)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        return os.open(temp, flags, 0o644), temp

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
            self._forget(directory)
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
        # Bytes shared by several paths (Deduplication): their inode's mtime is that of
        # the content's first upload, not this path's.
        self.shared = st.st_nlink > 1
        # The ctime moves when a path is linked to the inode or unlinked: a path deleted
        # and uploaded again with the same bytes (the same inode) is a new version.
        self.version = (st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns)

    def facts(self) -> FileRecord | None:
        return read_facts(self._file.fileno(), self._relpath)

    def content_sha256(self) -> str | None:
        """
        The SHA-256 its inode's facts state, whichever path they name (a shared inode's
        facts are one path's; the digest is true of them all); None without facts.
        """
        return content_sha256(self._file.fileno())

    def read(self, offset: int, length: int) -> bytes:
        return os.pread(self._file.fileno(), length, offset)

    def local_file(self) -> IO[bytes]:
        return self._file

    def close(self) -> None:
        self._file.close()


@implementer(IWriter)
class LocalWriter:
    """
    A temp beside the destination (L{LocalStorage.new_temp}), spooled to from a worker
    thread.

    A body of at most the write buffer (C{size}) is made in the worker thread when it is
    sealed: its directories, its temp and its bytes all at once, in the commit's thread
    hand-off.  A larger one, or one of unknown size, gets its temp now, so that a storage
    that cannot take it says so before the body.
    """

    onRelief: Callable[[], None] | None = None
    _name: str | None = None  # the temp's name: None for an O_TMPFILE, or before it exists
    _file: IO[bytes] | None = None
    _touched = False  # it has been at the file system: a discarded upload prunes
    # How many directories leading to it existed before the body (hmacd.paths.locate); None
    # once that may no longer hold.
    _found: int | None = None
    _busy = False  # a batch is in the thread
    _failure: OSError | None = None
    _closeAfterBatch = False
    _draining = False

    def __init__(self, storage: LocalStorage, relpath: str, size: int | None = None) -> None:
        """
        @raise Conflict: something is at C{relpath} (or a file on the way to it).
        @raise PathRefused: C{relpath} leads out of the store.
        """
        self.storage = storage
        self.relpath = relpath
        self.dest, taken, self._found = locate(storage.root, relpath)
        if taken:
            raise Conflict()
        self.received = 0
        self._sha256 = hashlib.sha256()
        # Bytes given to write() and not yet written, waiting (_pending) or in the thread.
        self._pending: list[bytes] = []
        self._backlog = 0
        self._waiters: list[Deferred[None]] = []
        self._small = size is not None and size <= storage.write_buffer
        # The temp is made later than the walk above (at the seal): whatever that walk
        # found may have been replaced since.
        self._late = self._small
        if not self._small:
            try:
                self._open()
            except BaseException:
                self._cleanUp()  # a refused upload leaves the store as it was
                raise

    @property
    def temp(self) -> str | None:
        """
        A name the temp can be opened by, in this process, while the writer holds it (to read
        its bytes back, as an object store's spool does): its own for a dot file, its
        descriptor's under /proc/self/fd for an O_TMPFILE; None before it exists.
        """
        if self._name is not None:
            return self._name
        if self._file is None or self._file.closed:
            return None
        return f"/proc/self/fd/{self._file.fileno()}"

    def _open(self) -> IO[bytes]:
        """Blocking.  The temp, made now if it is not there yet (with its directories)."""
        if self._file is not None:
            return self._file
        storage = self.storage
        directory = os.path.dirname(self.dest)
        self._touched = True
        for attempt in (1, 2):
            try:
                found = self._found
                made = storage.make_directories(directory, found)
                ours = found == 0 and len(made) == self.relpath.count("/")
                if not ours and (made or self._late):
                    # Re-check now that the directories exist: a symlink placed on the way
                    # since the verdict's walk must not lead the temp file out of the store.
                    # Only when every directory below the root is one just made here was
                    # there nothing to replace.
                    store_path(storage.root, self.relpath)
                fd, self._name = storage.new_temp(directory)
            except FileNotFoundError:
                # A concurrent aborted upload pruned a directory we found.
                self._found = None
                self._late = True
                if attempt == 2:
                    raise
                continue
            except (FileExistsError, NotADirectoryError):
                raise Conflict() from None
            # Unbuffered: what reaches the file comes in batches of at least the write buffer
            # (or the rest, at seal), and 500 slow uploads held 32 MiB of idle
            # BufferedWriters.
            self._file = open(fd, "wb", buffering=0)
            return self._file
        raise AssertionError("unreachable")

    def _link(self) -> None:
        """Blocking.  Give the temp its name, never overwriting (FileExistsError)."""
        assert self._file is not None
        if self._name is not None:
            os.link(self._name, self.dest)
            return
        for attempt in (1, 2):
            try:
                link_open(self._file.fileno(), self.dest)
                return
            except FileNotFoundError:
                # No name kept the directory from being empty: an upload that broke off
                # may have pruned it meanwhile.  Made again, as a first upload would.
                if attempt == 2:
                    raise
                self.storage.make_parents(os.path.dirname(self.dest))
                store_path(self.storage.root, self.relpath)  # made by whom, since when?

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
        f = self._open()
        for data in batch:
            view = memoryview(data)
            while view:
                view = view[f.write(view) or 0 :]
            if self._small:
                _hash_holding_the_gil(self._sha256, data)
            else:
                self._sha256.update(data)  # without the GIL: the reactor reads on meanwhile

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
            self._cleanUp()
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
            self._spool(self._pending)  # makes the temp of a small body, even an empty one
        except BaseException:
            self.discard()
            raise
        self._pending = []
        return self._sha256.hexdigest()

    def publish(self, record: FileRecord) -> None:
        f = self._file
        assert f is not None
        if self.storage.dedup:
            self._publishShared(f, record)
            return
        # A batch of one (its fsync made directly: LocalStorage.fsync_all).
        (error,) = self.storage._publishTogether([(self, record)])
        if error is not None:
            raise error

    def fileno(self) -> int:
        """The temp's descriptor (after L{seal})."""
        assert self._file is not None
        return self._file.fileno()

    def stamp(self, record: FileRecord) -> Exception | None:
        """
        Blocking, the first step of L{publish}: C{record}'s facts on the temp.  Before its
        fsync and its link: the facts are durable with the file, and the file is never
        visible without them.  None, or the error (the writer then discarded).
        """
        try:
            write_facts(self.fileno(), record)
        except Exception as e:
            return self.fail(e)
        return None

    def name(self) -> Exception | None:
        """
        Blocking, the last step of L{publish}, after the temp's fsync: its name, never
        overwriting.  None, or the error (L{Conflict}: the name was taken; the writer then
        discarded).
        """
        try:
            self._link()
        except FileExistsError:
            return self.fail(Conflict())
        except Exception as e:
            return self.fail(e)
        self._letGo()
        return None

    def fail(self, error: Exception) -> Exception:
        """A step of L{publish} failed with C{error}: nothing of the file stays."""
        self.discard()
        return error

    def _publishShared(self, f: IO[bytes], record: FileRecord) -> None:
        try:
            if self.storage.link_content(record.sha256, record.size, self.dest):
                # The bytes were durable already: ours go unsynced, and the facts of this
                # path are its record's (the inode's are the first upload's).
                self._letGo()
                return
            # Facts naming their path: later paths sharing the inode will not take them.
            write_facts(f.fileno(), record, named=True)
            if self.storage.sync:
                os.fsync(f.fileno())
            self._link()
        except FileExistsError:
            self.discard()
            raise Conflict() from None
        except BaseException:
            self.discard()
            raise
        # After the publish: a content is entered only once a path refers to it.  The temp
        # (named, or open) still holds the inode, whoever deletes the path meanwhile.
        if self._name is not None:
            entered = self.storage.enter_content(self._name, record.sha256)
        else:
            entered = self.storage.enter_content(None, record.sha256, f.fileno())
        self._letGo()
        if entered:
            self.storage.release_if_last(record.sha256)

    def _letGo(self) -> None:
        """After the publish: the temp's name (if it has one) and descriptor go."""
        self._closeFile()
        if self._name is not None:
            os.unlink(self._name)

    def _closeFile(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()

    def _cleanUp(self) -> None:
        """Nothing of the file stays: its temp, and the directories made for it if empty."""
        self._closeFile()
        if self._name is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._name)
        if self._touched:
            # Not only directories it made: of two uploads into a new directory that both
            # break off, the one that made it may go first (see LocalStorage.prune).
            self.storage.prune(self.relpath)

    def discard(self) -> None:
        self.onRelief = None
        if self._busy:
            # The thread is writing to it (or making it): cleaned up when its batch is done.
            # A name it has already goes now.
            self._closeAfterBatch = True
            if self._name is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self._name)
            return
        self._cleanUp()
