"""
Where the bytes of stored files live: one interface, L{IStorage}, and its backends.

The local directory (L{hmacd.storage.local.LocalStorage}) is the first.  The contract is
written so that an object store fits behind it too: no file descriptor, no path and no
C{os.link} in it; a file's facts (L{hmacd.metadata.FileRecord}) travel with its bytes, as
extended attributes on disk or as an object's metadata.  The metadata stores stay the
index (claims, expiry, listing); the storage is where a GET finds the bytes.

The upload code, the housekeeping and the reindexer talk to an L{IStorage} only.
Blocking methods are marked: they run in a worker thread, never in the reactor's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, TypeVar

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from hmacd.metadata import FileRecord

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

__all__ = [
    "Conflict",
    "IReadable",
    "IStorage",
    "IWriter",
    "Stat",
    "StorageUnavailable",
    "outcomes",
    "publish_each",
]


class Conflict(Exception):
    """The name is taken already (or a parent of it is a file): nothing is overwritten."""


class StorageUnavailable(OSError):
    """
    A remote storage (an object store) cannot be reached or refuses us: a 503 with
    Retry-After, since it may well answer again soon.  The local directory never raises it.
    """


@dataclass(frozen=True)
class Stat:
    """What the storage knows of a stored file without reading it."""

    size: int
    modified: float  # seconds since the epoch


class IWriter(Interface):
    """
    The bytes of one new file on their way in: a temp no reader can see, until
    L{publish} makes it the file at its name.
    """

    received = Attribute("The bytes given to write() so far.")
    onRelief = Attribute(
        "Called (in the reactor thread) once the writer has caught up after write() said"
        " it was behind; None for nobody."
    )

    def write(data: bytes) -> bool:
        """
        Take the next bytes (reactor thread).  True when the writer is behind: the caller
        should stop reading until C{onRelief}.

        @raise OSError: writing what came before failed.
        """

    def drained() -> Deferred[None]:
        """
        A Deferred that fires once L{seal} may run, or fails with the error writing met.
        """

    def seal() -> str:
        """
        Blocking.  Write what is left; the SHA-256 (hex) of every byte written.
        """

    def publish(record: FileRecord) -> None:
        """
        Blocking, after L{seal}.  Make the bytes durable with C{record} as their facts, and
        visible at their name, never overwriting.  On any error nothing is left behind.

        @raise Conflict: the name was taken meanwhile.
        """

    def discard() -> None:
        """Reactor thread: the file will not be completed; nothing of it is left."""


class IReadable(Interface):
    """A stored file, open for reading."""

    size = Attribute("Its size in bytes.")
    modified = Attribute("When it was stored, in seconds since the epoch.")
    modified_ns = Attribute("The same, in integer nanoseconds (weak ETags are made of it).")
    version = Attribute(
        "A hashable value that changes whenever the bytes at this name are replaced"
        " (caches of its record key on it)."
    )

    def facts() -> FileRecord | None:
        """Blocking.  The facts stored with the bytes; None when they have none."""

    def read(offset: int, length: int) -> bytes:
        """Blocking.  Up to C{length} bytes from C{offset} (a range; fewer only at the end)."""

    def local_file() -> IO[bytes] | None:
        """
        The bytes as an open local file, for a zero-copy path such as C{sendfile}; None
        where the backend has none (an object store).  Closed with L{close}.
        """

    def close() -> None:
        """Let go of it."""


class IStorage(Interface):
    """Where finished files live."""

    def writer(relpath: str, draft: FileRecord | None = None) -> IWriter:
        """
        A writer for a new file at C{relpath}.  C{draft} is what is known of its facts
        before the body (no SHA-256 yet), for a storage that must send them ahead of the
        bytes (an object store streaming the body to its name); others ignore it.

        @raise Conflict: something is at that name (or a parent of it is a file).
        @raise hmacd.paths.PathRefused: the name leads out of the store.
        @raise OSError: the storage cannot take it.
        """

    def adopt(source: str, relpath: str, record: FileRecord) -> None:
        """
        Blocking.  Publish the finished local file C{source} (a resumable upload's bytes)
        at C{relpath} with C{record} as its facts, never overwriting; C{source} may go
        afterwards.

        @raise Conflict: the name is taken.
        """

    def publish_all(items: list[tuple[IWriter, FileRecord]]) -> list[Exception | None]:
        """
        Blocking.  L{IWriter.publish} each writer with its record, as one batch (the
        writers this storage made, sealed): for each, None when it is published, or the
        exception its publish raised (its writer then left nothing behind, as
        L{IWriter.publish} says).  One item's failure leaves the others alone.  A storage
        that can make a batch durable at once does so here (L{publish_each} otherwise).
        """

    def settle(relpaths: list[str]) -> None:
        """
        Blocking.  Make the names of files just published durable (after a batch of
        L{IWriter.publish} or L{adopt}, before anyone is told).
        """

    def exists(relpath: str) -> bool:
        """
        Blocking (a cheap check).  Whether something is at C{relpath}.

        @raise hmacd.paths.PathRefused: the name leads out of the store.
        """

    def stat(relpath: str) -> Stat | None:
        """Blocking.  Size and time of the file at C{relpath}; None when there is none."""

    def open(relpath: str) -> IReadable | None:
        """Blocking.  The file at C{relpath}, open for reading; None when there is none."""

    def delete(relpath: str) -> bool:
        """Blocking.  Remove the file at C{relpath}; whether one was there."""

    def files() -> Iterator[str]:
        """Blocking.  An iterator of the names of every stored file (reindex, sweeps)."""

    def sweep_temps(older_than: float) -> list[str]:
        """
        Blocking.  Remove the temps of writers that can no longer finish (a crash, a kill)
        untouched since C{older_than}; their names, for the log.
        """


def outcomes(call: Callable[[T], object], items: Iterable[T], caught: type[E]) -> list[E | None]:
    """C{call} on each of C{items} in turn: for each, None, or what it raised of C{caught}."""
    found: list[E | None] = []
    for item in items:
        try:
            call(item)
        except caught as e:
            found.append(e)
        else:
            found.append(None)
    return found


def publish_each(items: list[tuple[IWriter, FileRecord]]) -> list[Exception | None]:
    """L{IStorage.publish_all} one writer at a time."""
    return outcomes(lambda item: item[0].publish(item[1]), items, Exception)
