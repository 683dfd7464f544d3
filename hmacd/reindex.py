"""
C{hmacfs reindex}: rebuild the metadata store's missing records from the files.

A store that lost its data (a Redis that came back empty, a database restored from an old
backup) no longer knows which files expire.  Every file carries its own facts
(L{hmacd.facts}; an object's C{x-amz-meta-hmacfs} in an object store), so its record can
be made again exactly; a file without facts (uploaded by an older version, on a file
system without user attributes, or put in the bucket by another tool) gets a record from
what the file itself says: its size, its SHA-256 (the one an object carries in
C{x-amz-meta-sha256}, else hashed from its bytes as they stream by), its modification
time, a type guessed from its name, and FileTTL counted from its modification time.

Records that exist are left as they are; dot names (C{.hmacfs/}: staging objects, upload
temp files) and anything but regular files are skipped.

The walk and the reading are blocking work (an object store's blocking methods wait on
the reactor): they run through the C{blocking} callable given to L{reindex}, threads of
their own in the command (L{worker_threads}), and the metadata store is talked to from the
reactor thread.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from itertools import islice
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IConsumer, IProducer
from twisted.internet.threads import blockingCallFromThread
from zope.interface import implementer

from hmacd.config import Config
from hmacd.mediatype import guess_type
from hmacd.metadata import FileRecord
from hmacd.storage import IReadable, IStorage
from hmacd.storage.local import Blocking, LocalFile, LocalStorage
from hmacd.threads import own_threads

if TYPE_CHECKING:
    from hmacd.storage.s3 import S3Readable, S3Storage

__all__ = [
    "GUESSED_PROTOCOL",
    "ReindexCounts",
    "open_storage",
    "record_of",
    "reindex",
    "stored_files",
    "worker_threads",
]

# The protocol field of a record made without facts: no slot is known.
GUESSED_PROTOCOL = "reindex"
# Files looked up (and recorded) together: enough to keep a remote store busy.
BATCH = 64
# Threads of the walk's own (worker_threads): HEADs and GETs wait on the store, not a CPU.
WORKERS = 16
# A SHA-256 as an object's metadata may state it.
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass
class ReindexCounts:
    files: int = 0  # files in the storage (regular files under StoreDir, or objects)
    recorded: int = 0  # that had a record already
    from_facts: int = 0  # recorded again from their facts
    guessed: int = 0  # recorded from size, hash, mtime and name (no facts)

    def summary(self) -> str:
        return (
            f"{self.files} files: {self.recorded} had a record, {self.from_facts} recorded "
            f"from their facts, {self.guessed} recorded with a guessed type (no facts)"
        )


def _storage(where: IStorage | str) -> IStorage:
    """The storage itself, or a directory's (the CLI names one: C{StoreDir})."""
    if isinstance(where, str):
        # Only read here: no writer, so nothing runs in a thread.
        return LocalStorage(where, maybeDeferred)
    return where


def stored_files(where: IStorage | str) -> Iterator[str]:
    """The store paths of every served file: no dot entries, no links."""
    return _storage(where).files()


def open_storage(
    config: Config, reactor: Any, environ: Mapping[str, str]
) -> tuple[IStorage, Callable[[], Deferred[None]]]:
    """
    The storage C{config}'s StorageBackend names, to be read (the files of StoreDir, or
    the objects of S3Bucket under S3Prefix), and what lets go of it when done (an object
    store's probes and pooled connections).

    @raise ValueError: the object store's address cannot be used (the message says why).
    """
    if config.storage_backend != "s3":
        return LocalStorage(config.store_dir, maybeDeferred), lambda: succeed(None)
    # Here, not at the top: botocore is imported only where S3 is used.
    from hmacd.storage.s3 import SPOOL_DIR, S3Storage, client_for

    client = client_for(config, reactor, environ)
    # Nothing is written: the spool (the server's, under StoreDir) is only made, not used.
    storage = S3Storage(client, reactor, os.path.join(config.store_dir, SPOOL_DIR), maybeDeferred)

    def close() -> Deferred[None]:
        storage.stop()
        return client.close()

    return storage, close


def worker_threads(reactor: Any, size: int = WORKERS) -> tuple[Blocking, Callable[[], None]]:
    """
    A pool of C{size} threads of the walk's own (for L{reindex}'s C{blocking}), started,
    and what stops it once the walk is over: not the reactor's (L{hmacd.threads}).
    """
    return own_threads(reactor, size, "hmacfs-reindex")


class _Replaced(Exception):
    """The object was replaced between its HEAD and its GET: what HEAD said is stale."""


def record_of(storage: IStorage, relpath: str, file_ttl: float) -> tuple[FileRecord, bool] | None:
    """
    Blocking.  The record of the file at C{relpath}, and whether it came from the file's
    facts; None when the file went away meanwhile.
    """
    for _ in range(2):
        try:
            return _record_of(storage, relpath, file_ttl)
        except _Replaced:
            continue  # look again, at what is there now
    return None  # replaced again: the next run will find it settled


def _record_of(storage: IStorage, relpath: str, file_ttl: float) -> tuple[FileRecord, bool] | None:
    stored = storage.open(relpath)
    if stored is None:
        return None
    created = stored.modified
    try:
        facts = stored.facts()
        if facts is not None and facts.size == stored.size:
            return facts, True
        digest = None
        if isinstance(stored, LocalFile) and stored.shared:
            # Bytes shared with other paths (Deduplication): the facts on them are another
            # path's, but their digest is these bytes', and the inode's mtime is the first
            # upload's.  This path was linked in later: its directory changed then.
            digest = stored.content_sha256()
            created = max(created, _directory_mtime(storage, relpath))
        if digest is None:
            digest = _sha256(storage, stored)
        draft = _draft(stored)
    finally:
        stored.close()
    if digest is None:
        return None
    if draft is not None and draft.size == stored.size:
        # A streamed object whose SHA-256 never joined its facts: the rest of them hold.
        return dataclasses.replace(draft, sha256=digest), True
    return (
        FileRecord(
            path=relpath,
            size=stored.size,
            content_type=guess_type(relpath),
            sha256=digest,
            created=created,
            protocol=GUESSED_PROTOCOL,
            expires=created + file_ttl if file_ttl else None,
        ),
        False,
    )


def _draft(stored: IReadable) -> FileRecord | None:
    """The facts without a SHA-256 that a streamed object began with; None for others."""
    if isinstance(stored, LocalFile):
        return None
    from hmacd.storage.s3 import S3Readable

    return stored.draft() if isinstance(stored, S3Readable) else None


def _directory_mtime(storage: IStorage, relpath: str) -> float:
    """When the directory of a local file last changed (a name linked or removed); 0 if unknown."""
    assert isinstance(storage, LocalStorage)
    try:
        return os.stat(os.path.dirname(os.path.join(storage.root, relpath))).st_mtime
    except OSError:
        return 0.0


def _sha256(storage: IStorage, stored: IReadable) -> str | None:
    """Blocking.  The SHA-256 (hex) of a file without facts; None when it went away."""
    if not isinstance(storage, LocalStorage):
        # Imported here: botocore only where an object store is used.
        from hmacd.storage.s3 import S3Readable, S3Storage

        if isinstance(storage, S3Storage) and isinstance(stored, S3Readable):
            return _object_sha256(storage, stored)
    digest = hashlib.sha256()
    offset = 0
    while block := stored.read(offset, 1 << 20):
        digest.update(block)
        offset += len(block)
    return digest.hexdigest()


@implementer(IConsumer)
class _Digest:
    """A consumer that hashes what it is given and keeps nothing."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.hash.update(data)


def _object_sha256(storage: S3Storage, stored: S3Readable) -> str | None:
    """
    Blocking (worker thread).  The SHA-256 an object carries (C{x-amz-meta-sha256}: hmacfs
    writes it, and so may the tool that put the object), else its bytes hashed as one GET
    streams them by, never whole in memory.
    """
    from hmacd.s3 import NoSuchKey, S3Error
    from hmacd.storage.s3 import SHA256_META, StoreFailed

    stated = stored.metadata.get(SHA256_META, "").strip().lower()
    if _SHA256_HEX.fullmatch(stated):
        return stated
    digest = _Digest()

    def stream() -> Deferred[Any]:
        # stored.deliver: the storage's own read path, which keeps its health up to date.
        d = stored.deliver(digest, 0, stored.size - 1)
        return d.addCallback(lambda answer: answer.deliver(digest))

    try:
        received = cast(int, blockingCallFromThread(storage.reactor, stream))
    except NoSuchKey:
        return None
    except S3Error as e:
        raise StoreFailed(e) from e
    if received != stored.size:
        raise _Replaced(stored.key)
    return digest.hash.hexdigest()


async def reindex(
    store, where: IStorage | str, file_ttl: float = 0, blocking: Blocking = maybeDeferred
) -> ReindexCounts:
    """
    Put a record for every file of C{where} (a storage, or a local directory) that C{store}
    has none for.

    @param blocking: runs the walk and the reading of files (blocking calls); an object
        store needs a worker thread (its methods refuse the reactor's): see
        L{worker_threads}.  The default runs them in the calling thread, which a local
        directory allows.
    @raise hmacd.store.StoreUnavailable: the store stopped answering (the counts so far
        are lost with it; running again picks up where it stood).
    @raise hmacd.storage.StorageUnavailable: the object store cannot be reached or
        refuses us.
    """
    storage = _storage(where)
    counts = ReindexCounts()
    names = storage.files()
    while batch := await blocking(partial(_next, names)):
        counts.files += len(batch)
        await _reindexBatch(store, storage, file_ttl, batch, counts, blocking)
    return counts


def _next(names: Iterator[str]) -> list[str]:
    """Blocking (an object store lists a page at a time).  The next batch of names."""
    return list(islice(names, BATCH))


async def _reindexBatch(
    store,
    storage: IStorage,
    file_ttl: float,
    paths: list[str],
    counts: ReindexCounts,
    blocking: Blocking,
) -> None:
    found = await _together([store.get(path) for path in paths])
    missing = [path for path, existing in zip(paths, found, strict=True) if existing is None]
    counts.recorded += len(paths) - len(missing)
    # Several at once: each waits on the storage (a HEAD, a GET), not on a CPU.
    made = await _together(
        [blocking(partial(record_of, storage, path, file_ttl)) for path in missing]
    )
    puts: list[Deferred] = []
    for found_record in made:
        if found_record is None:
            counts.files -= 1  # deleted while we walked
            continue
        record, fromFacts = found_record
        if fromFacts:
            counts.from_facts += 1
        else:
            counts.guessed += 1
        puts.append(store.put(record))
    await _together(puts)


async def _together(calls: list[Deferred]) -> list:
    """The results of C{calls}, or the first one's failure (after all have settled)."""
    d = gatherResults(calls, consumeErrors=True)
    try:
        return await d
    except Exception as e:
        # FirstError: what the caller wants is the store's own error.
        raise getattr(getattr(e, "subFailure", None), "value", e) from None
