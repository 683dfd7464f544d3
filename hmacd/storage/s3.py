"""
L{IStorage} in a bucket of an S3-compatible object store (C{StorageBackend = "s3"}).

The seam's blocking methods run in a worker thread (C{FileServer.blocking}); each hands its
requests to the reactor thread, where L{hmacd.s3.S3Client} talks to the store, and waits
for the answer.  Called from the reactor thread they would wait on themselves: they refuse
instead (L{ReactorThreadCall}).

Writing: the body of an upload is spooled and hashed in a local temp file under
C{StoreDir/.hmacfs/s3-spool} (the local directory's own writer, with its back-pressure),
and sent to the store at L{S3Writer.publish}, once its SHA-256 is known: the facts travel
as the object's metadata, which S3 takes only before the body.  Up to the multipart
threshold that is one PutObject, above it a multipart upload of parts streamed from the
file; the final write (PutObject or CompleteMultipartUpload) carries C{If-None-Match: *},
so a taken name is a L{Conflict} and is never overwritten, and nothing is visible before
the object is whole.  A failed publish aborts its multipart upload; a crash leaves one
that L{S3Storage.sweep_temps} aborts later.

Each object carries the signed Content-Type as its type and its facts
(L{hmacd.facts.encode}, as ASCII JSON) in C{x-amz-meta-hmacfs}, with the SHA-256 also in
C{x-amz-meta-sha256} for tools.  Keys are the relative paths; names with a dot segment
(C{.hmacfs/}) are never listed as files.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import datetime
import errno
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

from twisted.internet.defer import (
    Deferred,
    DeferredList,
    DeferredSemaphore,
    inlineCallbacks,
    succeed,
)
from twisted.internet.interfaces import IConsumer, IProducer
from twisted.internet.task import Cooperator
from twisted.internet.threads import blockingCallFromThread
from twisted.logger import Logger
from twisted.python import threadable
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer
from zope.interface import implementer

from hmacd.facts import decode
from hmacd.metadata import FileRecord
from hmacd.paths import PathRefused, store_path
from hmacd.s3 import (
    NoSuchKey,
    NoSuchUpload,
    PreconditionFailed,
    S3Client,
    S3Error,
    S3Refused,
    S3Unavailable,
)
from hmacd.storage import (
    Conflict,
    IReadable,
    IStorage,
    IWriter,
    Stat,
    StorageUnavailable,
    publish_each,
)
from hmacd.storage.local import Blocking, DedupCensus, LocalStorage
from hmacd.storage.s3_dedup import (
    CAS,
    CONTENT_META,
    REFS,
    ContentLocks,
    content_key,
    content_of,
    marker_key,
    markers_of,
)
from hmacd.storage.s3_pieces import staging_of
from hmacd.storage.s3_writer import (
    FACTS_META,
    PARTS_IN_FLIGHT,
    SHA256_META,
    STAGING,
    UPLOAD_META,
    S3Writer,
    _metadata,
    part_body,
)

__all__ = [
    "FACTS_META",
    "SHA256_META",
    "SPOOL_DIR",
    "ReactorThreadCall",
    "S3Readable",
    "S3Storage",
    "S3Writer",
    "StoreFailed",
    "client_for",
]

# Where bodies wait for their hash before they go to the store (under StoreDir).
SPOOL_DIR = os.path.join(".hmacfs", "s3-spool")
# A body read from a file can be sent again: the store may close a pooled connection just
# as a PUT starts on it, which Twisted does not retry.
_ATTEMPTS = 2
# A dummy root against which names are judged (no path outside the store: no "..").
_JUDGE_ROOT = os.path.join(os.sep, "hmacfs-s3")
# How long a multipart upload may go on (ResumableTTL's default) before the sweep aborts it.
MULTIPART_TTL = 86400.0
# The markers older than that a sweep checks for their reference, at most.
MARKERS_PER_SWEEP = 1000
MAX_MARKER = 4096
# While the store is down, how often it is asked whether it is back.
PROBE_INTERVAL = 5.0

T = TypeVar("T")

log = Logger()


def client_for(config: Any, reactor: Any, environ: Mapping[str, str]) -> S3Client:
    """
    The client of the bucket C{config}'s S3* keys name (a L{hmacd.config.Config}), with
    S3AccessKey/S3SecretKey from the file, else from C{environ}.

    @raise ValueError: the endpoint, addressing style or bucket cannot be used.
    """
    access_key, secret_key = config.s3_credentials(environ)
    return S3Client(
        reactor,
        config.s3_endpoint,
        config.s3_bucket,
        access_key,
        secret_key,
        region=config.s3_region,
        prefix=config.s3_prefix,
        addressing_style=config.s3_addressing_style,
    )


class ReactorThreadCall(RuntimeError):
    """A blocking S3Storage method was called in the reactor thread, which it would block."""


class StoreFailed(StorageUnavailable):
    """The object store could not do it (unreachable, refusing, or an error of its own)."""

    def __init__(self, error: S3Error) -> None:
        super().__init__(errno.EIO, f"object store: {error}")
        self.error = error


def _judge(relpath: str) -> str:
    """The key of C{relpath}, or PathRefused for a name that leads out of the store."""
    path = store_path(_JUDGE_ROOT, relpath)
    return os.path.relpath(path, _JUDGE_ROOT).replace(os.sep, "/")


def _hidden(key: str) -> bool:
    return key.endswith("/") or any(part.startswith(".") for part in key.split("/"))


def _seconds_iso(text: str) -> float:
    """A listing's LastModified (ISO 8601) in seconds; 0 when unreadable (swept)."""
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _seconds(last_modified: str | None) -> float:
    if not last_modified:
        return 0.0
    try:
        return parsedate_to_datetime(last_modified).timestamp()
    except (TypeError, ValueError):
        return 0.0


def _resolved(reference: Any, content: Any) -> Any:
    """
    The head a reader of a reference sees: the content's bytes (key, length, ETag) with
    the reference's own type, facts and time; None when its content is missing (logged).
    """
    if content is None:
        log.error(
            "{key}: its content {sha256} is missing",
            key=reference.key,
            sha256=content_of(reference.metadata),
        )
        return None
    return dataclasses.replace(
        content,
        content_type=reference.content_type,
        last_modified=reference.last_modified,
        metadata=reference.metadata,
    )


@inlineCallbacks
def _read_object(client: S3Client, key: str, range: tuple[int, int] | None) -> Any:
    """Reactor thread: the bytes of an object (a range of it), bounded by the caller."""
    answer = yield client.get_object(key, range)
    sink = _Collect()
    yield answer.deliver(sink)
    return b"".join(sink.chunks)


@implementer(IConsumer)
class _Collect:
    """A consumer that keeps what it is given (one ranged read, bounded by the caller)."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.chunks.append(data)


@implementer(IStorage)
class S3Storage:
    """
    The files of one bucket (and prefix) of an object store.

    @param client: the store, on the reactor C{reactor}.
    @param spool_root: the local directory where bodies wait for publish.
    @param blocking: runs a blocking callable in a worker thread (the spool's writes).
    @param threshold: bodies above this go up as multipart uploads of C{part_size} parts.
    """

    # No partial files under StoreDir: a resumable upload is a staging object whose state
    # is in the shared metadata store (hmacd.storage.s3_pieces, hmacd.sink_s3).
    resumable = False
    # The locks of deduplicated contents (hmacd.storage.s3_dedup.ContentLocks), set where
    # the metadata store is known; None: this process alone links and unlinks them.
    content_locks: ContentLocks | None = None
    # Called with the size of each upload that shared stored bytes (a metric).
    on_shared: Callable[[int], None] | None = None
    # Blocking: whether the staging object given is still in use by a resumable upload
    # (its state is alive in the shared store); the sweep leaves those alone.  Set where
    # the metadata store is known (hmacd.services); None: none is.
    staging_in_use: Callable[[str], bool] | None = None

    def __init__(
        self,
        client: S3Client,
        reactor: Any,
        spool_root: str,
        blocking: Blocking,
        chunk_size: int = 1 << 20,
        threshold: int = 16 * 1024 * 1024,
        part_size: int = 8 * 1024 * 1024,
        probe_interval: float = PROBE_INTERVAL,
        redirect_downloads: bool = False,
        stream: bool = False,
        dedup: bool = False,
    ) -> None:
        self.client = client
        self.reactor = reactor
        self._blocking = blocking
        os.makedirs(spool_root, exist_ok=True)
        self.spool = LocalStorage(spool_root, blocking, chunk_size)
        self.threshold = threshold
        self.part_size = part_size
        self._cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))
        # Whether the store answered the last request; logged once per change.
        self.available = True
        self.probe_interval = probe_interval
        # S3RedirectDownloads: a GET is a 302 to a presigned URL (hmacd.download_s3).
        self.redirect_downloads = redirect_downloads
        # S3StreamUploads: whether large bodies go to the store as they arrive (to their
        # name, hmacd.storage.s3_writer), or after their last byte, from the spool.
        # Deduplication (hmacd.storage.s3_dedup): a body is stored under its SHA-256, so it
        # goes after its last byte, never streamed.
        self.dedup = dedup
        self.stream = stream and not dedup
        self.shares = dedup  # the deduplication gauge counts it (hmacd.housekeeping)
        # Multipart uploads begun longer ago are abandoned (ResumableTTL; hmacd.services).
        self.multipart_ttl = MULTIPART_TTL
        self._markers_seen = ""  # the last marker the sweep looked at
        self._probe: Any = None

    # Health: like the metadata stores, a transition is logged once, and while the store is
    # down uploads are refused before their body (503) until a probe finds it back.

    def _went_down(self, error: S3Error) -> None:
        if self.available:
            self.available = False
            log.error("object store unavailable: {error}", error=error)
        if self._probe is None:
            self._probe = self.reactor.callLater(self.probe_interval, self._ask)

    def _came_back(self, result: T) -> T:
        """A callback (result passed on): the store answered."""
        if not self.available:
            self.available = True
            log.info("object store {endpoint} available again", endpoint=self.client.endpoint)
        return result

    def _ask(self) -> None:
        self._probe = None
        d = self.client.list_objects_v2("", None, 1)
        d.addCallbacks(self._came_back, self._judged)
        d.addErrback(lambda _: None)

    def _judged(self, failure: Failure) -> Failure:
        """An errback that keeps the health up to date; the failure goes on."""
        error = failure.value
        if isinstance(error, (S3Unavailable, S3Refused)):
            self._went_down(error)
        elif isinstance(error, S3Error):
            self._came_back(None)  # it answered: an error of its own is no outage
        return failure

    def stop(self) -> None:
        """No more probes (the service stops)."""
        if self._probe is not None and self._probe.active():
            self._probe.cancel()
        self._probe = None

    def check(self) -> Deferred[bool]:
        """
        Reactor thread, at start: whether the bucket answers to our credentials.  A refusal
        is logged in one line naming S3AccessKey/S3SecretKey; a store that does not answer
        is logged and probed until it does.
        """

        def refused(failure: Failure) -> bool:
            if failure.check(S3Refused):
                log.error(
                    "S3AccessKey/S3SecretKey: {error}", error=str(failure.value).splitlines()[0]
                )
            elif not failure.check(S3Error):
                return failure  # type: ignore[return-value]
            return False

        d: Deferred[Any] = self.client.list_objects_v2("", None, 1)
        d.addCallback(self._came_back)
        d.addCallback(lambda _: True)
        d.addErrback(self._judged)
        return d.addErrback(refused)

    def _call(self, f: Callable[..., Deferred[Any]], *args: Any) -> Any:
        """Run C{f} in the reactor thread and wait for its Deferred's result."""
        if threadable.isInIOThread():
            raise ReactorThreadCall(f"{f.__name__} would block the reactor thread")

        def watched() -> Deferred[Any]:
            d = f(*args)
            d.addCallback(self._came_back)
            return d.addErrback(self._judged)

        try:
            return blockingCallFromThread(self.reactor, watched)
        except (NoSuchKey, NoSuchUpload, PreconditionFailed):
            raise
        except S3Error as e:
            raise StoreFailed(e) from e

    def _head(self, relpath: str) -> Any:
        try:
            key = _judge(relpath)
        except PathRefused:
            return None
        if _hidden(key):
            return None
        return self._head_key(key)

    # Writing.

    def key_of(self, relpath: str) -> str:
        """The object key of C{relpath}; PathRefused for a name that leads out of the store."""
        return _judge(relpath)

    def writer(self, relpath: str, draft: FileRecord | None = None) -> S3Writer:
        key = _judge(relpath)
        if _hidden(key):
            raise PathRefused("a name with a dot segment is not served")
        # In the reactor thread (an upload's head) there is no asking the store: the claim
        # in the metadata store decides before the body, If-None-Match at publish after it.
        if threadable.isInIOThread():
            if not self.available:
                raise StorageUnavailable(errno.EIO, "object store unavailable")
        elif self._head(relpath) is not None:
            raise Conflict()
        return S3Writer(self, key, draft)

    def adopt(self, source: str, relpath: str, record: FileRecord) -> None:
        key = _judge(relpath)
        with open(source, "rb") as f:
            self.put_file(f.fileno(), os.fstat(f.fileno()).st_size, key, record)

    def put_file(self, fd: int, size: int, key: str, record: FileRecord) -> None:
        """
        Blocking.  Send C{size} bytes of the open file C{fd} as the object C{key} with
        C{record}'s facts, never overwriting (L{Conflict}); nothing is left on failure.
        With deduplication the bytes go to their content, C{key} is a reference to it.
        """
        if self.dedup:

            def store_content(content: str) -> None:
                self._put_bytes(fd, size, content, None, {SHA256_META: record.sha256})

            self.link(key, record, store_content)
            return
        try:
            self._put_bytes(fd, size, key, record.content_type, _metadata(record))
        except PreconditionFailed:
            raise Conflict() from None

    def _put_bytes(
        self, fd: int, size: int, key: str, content_type: str | None, metadata: dict[str, str]
    ) -> None:
        """
        Blocking.  The bytes of C{fd} as the new object C{key} (L{PreconditionFailed}).
        Each carries a value of its own: when the store's answer was lost (or a second
        attempt meets the first's object), the object at the name says whether it is ours.
        """
        nonce = secrets.token_hex(8)
        try:
            self._put_once(fd, size, key, content_type, {**metadata, UPLOAD_META: nonce})
        except (PreconditionFailed, StoreFailed):
            try:
                there = self._head_key(key)
            except (S3Error, OSError):
                there = None
            if there is None or there.metadata.get(UPLOAD_META) != nonce:
                raise

    def _put_once(
        self, fd: int, size: int, key: str, content_type: str | None, metadata: dict[str, str]
    ) -> None:
        if size <= self.threshold:
            for attempt in range(1, _ATTEMPTS + 1):
                try:
                    self._call(
                        self.client.put_object,
                        key,
                        self._producer(fd, 0, size),
                        size,
                        content_type,
                        metadata,
                        True,
                    )
                    return
                except StoreFailed:
                    if attempt == _ATTEMPTS:
                        raise
        else:
            self._call(self._put_multipart, fd, size, key, content_type, metadata)

    def _producer(self, fd: int, offset: int, length: int) -> FileBodyProducer:
        return part_body([(fd, offset + length)], offset, length, self._cooperator)

    @inlineCallbacks
    def _put_multipart(
        self, fd: int, size: int, key: str, content_type: str | None, metadata: dict[str, str]
    ) -> Any:
        upload_id = yield self.client.create_multipart_upload(key, content_type, metadata)
        try:
            # The whole body is on disk: PARTS_IN_FLIGHT parts go at once, as S3 clients do,
            # so the store's per-part latency overlaps instead of adding up.
            # Every part has ended before this returns, failed or not: their producers read
            # the caller's file descriptor.  After a failure the parts still waiting go not.
            slots = DeferredSemaphore(PARTS_IN_FLIGHT)
            failed: list[Failure] = []
            ended = yield DeferredList(
                [
                    slots.run(self._send_part, fd, key, upload_id, number, offset, size, failed)
                    for number, offset in enumerate(range(0, size, self.part_size), start=1)
                ],
                consumeErrors=True,
            )
            failed += [result for ok, result in ended if not ok]  # not an S3Error: a bug
            if failed:
                failed[0].raiseException()
            sent = [result for _, result in ended]
            yield self.client.complete_multipart_upload(key, upload_id, sent, if_none_match=True)
        except BaseException:
            # A refused or broken upload leaves no parts behind (nor a visible object).
            try:
                yield self.client.abort_multipart_upload(key, upload_id)
            except S3Error:
                pass  # the sweep aborts it after ResumableTTL
            raise

    # Deduplication (hmacd.storage.s3_dedup).

    def _locked(self, sha256: str) -> contextlib.AbstractContextManager[Any]:
        locks = self.content_locks
        return contextlib.nullcontext() if locks is None else locks.held(sha256)

    def link(self, key: str, record: FileRecord, store_content: Callable[[str], None]) -> None:
        """
        Blocking.  Make C{key} a reference to the content C{record.sha256}, stored first by
        C{store_content(its key)} unless it is there already; never overwriting.

        @raise Conflict: the name is taken (nothing of this upload is left).
        """
        sha256 = record.sha256
        content, marker = content_key(sha256), marker_key(sha256, key)
        nonce = secrets.token_hex(8)
        sent = False
        # The marker first: from now on no unlink removes the content.
        self._call(self.client.put_object, marker, key.encode("utf-8"))
        try:
            # Under the lock only the look for the content: an unlink lists the markers and
            # removes the content under it, so one that listed before our marker was
            # written has removed it by the time we look (we store it again), and one
            # after it sees our marker.  Once seen, the content stays while the marker does.
            with self._locked(sha256):
                stored = self._head_key(content)
            if stored is None or stored.length != record.size:
                sent = self._store_content(content, store_content)  # long: not locked
                with self._locked(sha256):
                    if self._head_key(content) is None:
                        sent = self._store_content(content, store_content)
            metadata = {**_metadata(record), CONTENT_META: sha256, UPLOAD_META: nonce}
            self._call(self.client.put_object, key, b"", 0, record.content_type, metadata, True)
        except BaseException as e:
            try:
                there = self._head_key(key)
            except (S3Error, OSError):
                raise e from None  # unknown: the marker stays (a content too many at worst)
            if there is None or there.metadata.get(UPLOAD_META) != nonce:
                if there is None or content_of(there.metadata) != sha256:
                    # Not this content's reference at the name: the marker goes (and the
                    # content, if it was only ours).  The same content's reference already
                    # there has this very marker: it stays.
                    with contextlib.suppress(S3Error, OSError):
                        self._forget_marker(sha256, marker)
                if isinstance(e, PreconditionFailed):
                    raise Conflict() from None
                raise
            # It is ours: the store wrote it and the answer was lost.
        if not sent and self.on_shared is not None:
            self.on_shared(record.size)

    def _store_content(self, content: str, store_content: Callable[[str], None]) -> bool:
        """Blocking.  Store the content; whether we sent it (not: another upload did)."""
        try:
            store_content(content)
            return True
        except PreconditionFailed:
            return False  # stored meanwhile by another upload of the same bytes

    def _unlink(self, key: str, sha256: str) -> None:
        """
        Blocking.  Delete the reference C{key}, then its marker and its content if no
        other marker is left.  The reference goes first and without the lock (deleting it
        endangers no content): a withdrawn upload is gone even while the metadata store,
        which keeps the locks, is down.
        """
        self._call(self.client.delete_object, key)
        self._forget_marker(sha256, marker_key(sha256, key))

    def _forget_marker(self, sha256: str, marker: str) -> None:
        """Blocking.  Delete a marker, and its content if no other marker is left."""
        with self._locked(sha256) as lock:
            self._call(self.client.delete_object, marker)
            self._drop_unreferenced(sha256, lock)

    def _drop_unreferenced(self, sha256: str, lock: Any) -> bool:
        """
        Blocking, under the content's lock: remove it if no marker names it; whether it went.
        A lock found lapsed (its claim was not renewed in time) removes nothing: another
        node may hold it now.
        """
        page = self._call(self.client.list_objects_v2, markers_of(sha256), None, 1)
        if page.objects or (lock is not None and not lock.kept):
            return False
        self._call(self.client.delete_object, content_key(sha256))
        return True

    def _head_key(self, key: str) -> Any:
        try:
            return self._call(self.client.head_object, key)
        except NoSuchKey:
            return None

    def _list(self, prefix: str) -> Iterator[Any]:
        """Blocking.  Every object under C{prefix}, as the store lists them."""
        token: str | None = None
        while True:
            page = self._call(self.client.list_objects_v2, prefix, token)
            yield from page.objects
            token = page.next_token
            if token is None:
                return

    def _markers(self) -> dict[str, list[Any]]:
        """Blocking (one listing).  The markers of every content, by its SHA-256."""
        found: dict[str, list[Any]] = {}
        for listed in self._list(REFS):
            found.setdefault(listed.key[len(REFS) :].split("/", 1)[0], []).append(listed)
        return found

    def dedup_census(self) -> DedupCensus:
        """Blocking (two listings: the markers and the contents).  What sharing holds now."""
        markers = self._markers()
        return DedupCensus.of(
            (listed.size, len(markers.get(listed.key[len(CAS) :], ())))
            for listed in self._list(CAS)
        )

    def _sweep_contents(self, older_than: float, markers_before: float) -> list[str]:
        """
        Blocking.  Contents no marker names that were stored before C{older_than}, and
        markers older than C{markers_before} whose reference is gone (at most
        L{MARKERS_PER_SWEEP} of those looked at per sweep, on from where the last stopped).
        """
        removed = []
        markers = self._markers()
        for listed in list(self._list(CAS)):
            sha256 = listed.key[len(CAS) :]
            if sha256 in markers or _seconds_iso(listed.last_modified) >= older_than:
                continue
            with self._locked(sha256) as lock:
                if self._drop_unreferenced(sha256, lock):
                    removed.append(listed.key)
        old = sorted(
            (m.key, sha256)
            for sha256, listed in markers.items()
            for m in listed
            # A marker is a key's bytes: anything larger is not one of ours.
            if _seconds_iso(m.last_modified) < markers_before and m.size <= MAX_MARKER
        )
        start = bisect.bisect_right(old, (self._markers_seen, ""))
        for marker, sha256 in (old[start:] + old[:start])[:MARKERS_PER_SWEEP]:
            self._markers_seen = marker
            if self._reference_of(marker) == sha256:
                continue
            with self._locked(sha256) as lock:
                if self._reference_of(marker) == sha256:
                    continue  # linked again meanwhile
                self._call(self.client.delete_object, marker)
                removed.append(marker)
                if self._drop_unreferenced(sha256, lock):
                    removed.append(content_key(sha256))
        return removed

    def _reference_of(self, marker: str) -> str | None:
        """Blocking.  The content the reference a marker stands for names; None if gone."""
        try:
            key = self._call(_read_object, self.client, marker, None).decode("utf-8")
        except (NoSuchKey, UnicodeDecodeError):
            return None
        head = self._head_key(key)
        sha256 = None if head is None else content_of(head.metadata)
        if sha256 is None or marker_key(sha256, key) != marker:
            return None  # gone, or no more the reference this marker stands for
        return sha256

    @inlineCallbacks
    def _send_part(
        self,
        fd: int,
        key: str,
        upload_id: str,
        number: int,
        offset: int,
        size: int,
        failed: list[Failure],
    ) -> Any:
        length = min(self.part_size, size - offset)
        for attempt in range(1, _ATTEMPTS + 1):
            if failed:
                return None  # another part failed: the upload is given up
            try:
                etag = yield self.client.upload_part(
                    key, upload_id, number, self._producer(fd, offset, length), length
                )
                return (number, etag)
            except S3Error:
                if attempt == _ATTEMPTS:
                    failed.append(Failure())
                    return None
        return None

    def publish_all(self, items: list[tuple[IWriter, FileRecord]]) -> list[Exception | None]:
        return publish_each(items)  # each its own requests: nothing to share

    def settle(self, relpaths: list[str]) -> None:
        pass  # a completed PutObject is durable: the store answered after storing it

    # Reading.

    def exists(self, relpath: str) -> bool:
        _judge(relpath)
        return self._head(relpath) is not None

    def stat(self, relpath: str) -> Stat | None:
        head = self._read_head(relpath)
        if head is None:
            return None
        return Stat(head.length, _seconds(head.last_modified))

    def open(self, relpath: str) -> S3Readable | None:
        head = self._read_head(relpath)
        if head is None:
            return None
        return S3Readable(self, relpath, head)

    def _read_head(self, relpath: str) -> Any:
        """Blocking.  The head of what reading C{relpath} reads (a reference's content)."""
        head = self._head(relpath)
        sha256 = None if head is None else content_of(head.metadata)
        if sha256 is None:
            return head
        return _resolved(head, self._head_key(content_key(sha256)))

    def open_async(self, relpath: str) -> Deferred[S3Readable | None]:
        """Reactor thread: L{open} for a GET; fails with L{S3Error} when the store does."""
        try:
            key = _judge(relpath)
        except PathRefused:
            return succeed(None)
        if _hidden(key):
            return succeed(None)

        def found(head: Any) -> Any:
            self._came_back(head)
            sha256 = content_of(head.metadata)
            if sha256 is None:
                return S3Readable(self, relpath, head)
            # A reference: the bytes are its content's.
            d = self.client.head_object(content_key(sha256))
            d.addErrback(lambda failure: failure.trap(NoSuchKey) and None)
            d.addCallback(lambda content: _resolved(head, content))
            d.addCallback(lambda both: None if both is None else S3Readable(self, relpath, both))
            return d

        def missing(failure: Failure) -> None:
            failure.trap(NoSuchKey)
            return self._came_back(None)

        d: Deferred[Any] = self.client.head_object(key)
        d.addCallbacks(found, self._judged)
        return d.addErrback(missing)

    def delete(self, relpath: str) -> bool:
        if threadable.isInIOThread():
            # An upload taken back in the reactor thread (its record could not be written):
            # the delete goes at once, before its path is let go.  A reference's marker
            # stays, and with it the content, until the sweep finds the marker alone.
            d = self.client.delete_object(_judge(relpath))
            d.addErrback(
                lambda f: log.error("cannot delete {key}: {error}", key=relpath, error=f.value)
            )
            return True
        head = self._head(relpath)
        if head is None:
            return False
        sha256 = content_of(head.metadata)
        if sha256 is not None:
            self._unlink(_judge(relpath), sha256)
        else:
            self._call(self.client.delete_object, _judge(relpath))
        return True

    def files(self) -> Iterator[str]:
        """Every stored object but hidden (dot) names, in the store's (byte) order."""
        for listed in self._list(""):
            if not _hidden(listed.key):
                yield listed.key

    def sweep_temps(self, older_than: float) -> list[str]:
        # Spooled bodies of a process that died, and multipart uploads it never finished
        # or aborted; never an object (a finished file always has its record).
        removed = self.spool.sweep_temps(older_than)
        # Staging objects of streamed bodies whose process died between completing and
        # copying them: internal temps (a dot name), never files.
        # Resumable uploads still going (their state alive in the shared store) are left
        # alone, however old their staging object: its tails too.
        in_use: dict[str, bool] = {}

        def used(key: str) -> bool:
            staging = staging_of(key)
            if staging not in in_use:
                check = self.staging_in_use
                in_use[staging] = check is not None and check(staging)
            return in_use[staging]

        for listed in list(self._list(STAGING)):
            if _seconds_iso(listed.last_modified) < older_than and not used(listed.key):
                self._call(self.client.delete_object, listed.key)
                removed.append(listed.key)
        # Multipart uploads and markers live as long as a resumable upload may (a large
        # body streamed slowly is one multipart upload from its first part to its last).
        uploads_before = min(older_than, time.time() - self.multipart_ttl)
        removed += self._sweep_contents(older_than, uploads_before)
        for upload in self._call(self.client.list_multipart_uploads, ""):
            # A resumable upload's is alive while its state is (which lapses after
            # ResumableTTL); a whole body's, until ResumableTTL after it began.
            staging = upload.key.startswith(STAGING)
            cutoff = older_than if staging else uploads_before
            if upload.initiated is None or upload.initiated.timestamp() >= cutoff:
                continue
            if staging and used(upload.key):
                continue
            try:
                self._call(self.client.abort_multipart_upload, upload.key, upload.upload_id)
            except NoSuchUpload:
                continue  # finished or aborted meanwhile
            removed.append(f"{upload.key} (multipart {upload.upload_id})")
        return removed


@implementer(IReadable)
class S3Readable:
    """An object, as HEAD found it; reads are ranged GETs."""

    def __init__(self, storage: S3Storage, relpath: str, head: Any) -> None:
        self._storage = storage
        self._relpath = relpath
        self.key = head.key
        self.size: int = head.length
        self.content_type: str | None = head.content_type
        self.metadata: dict[str, str] = head.metadata
        self.modified = _seconds(head.last_modified)
        self.modified_ns = int(self.modified) * 10**9
        self.version = (head.etag, head.last_modified, head.length)

    def facts(self) -> FileRecord | None:
        # Facts without a SHA-256 are a streamed upload's draft (hmacd.storage.s3_writer):
        # not enough to serve by; the record is.
        facts = self._decoded()
        return facts if facts is not None and facts.sha256 else None

    def draft(self) -> FileRecord | None:
        """The facts a streamed upload began with, when its SHA-256 never joined them."""
        facts = self._decoded()
        return facts if facts is not None and not facts.sha256 else None

    def _decoded(self) -> FileRecord | None:
        value = self.metadata.get(FACTS_META)
        return None if value is None else decode(self._relpath, value.encode("ascii", "replace"))

    def read(self, offset: int, length: int) -> bytes:
        if length <= 0 or offset >= self.size:
            return b""
        last = min(self.size, offset + length) - 1
        return self._storage._call(_read_object, self._storage.client, self.key, (offset, last))

    def deliver(self, consumer: IConsumer, first: int, last: int) -> Deferred[Any]:
        """
        Reactor thread: stream bytes C{first}..C{last} (inclusive) into C{consumer}, with
        its back-pressure; fires with an L{hmacd.s3.S3Object} once the store's answer
        begins, whose C{deliver} then moves the bytes.
        """
        whole = first == 0 and last == self.size - 1
        d = self._storage.client.get_object(self.key, None if whole else (first, last))
        return d.addErrback(self._storage._judged)

    def local_file(self) -> None:
        return None

    def close(self) -> None:
        pass  # nothing held between reads
