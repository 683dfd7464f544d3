"""
The bytes of one new file on their way into the object store (L{S3Writer}).

The body is spooled and hashed in a local temp file as it arrives (the local directory's
writer, with its back-pressure), because an object's metadata (the facts, the SHA-256)
must be sent before its first byte.  A small body goes up at publish as one PutObject to
its name.  A large one goes after its last byte as a multipart upload to its name (the
default), or with C{S3StreamUploads} as it arrives: once more than the multipart threshold
is on disk, each full part is sent from the spool to a multipart upload of the object's
own name, begun with the facts known before the body (the draft: no SHA-256 yet); at
publish the last part follows and the upload is completed with C{If-None-Match: *} (a
name taken meanwhile is a L{Conflict}, never overwritten; nothing is visible before).
The SHA-256 then joins the facts by a copy of the object onto itself that replaces its
metadata (metadata only in SeaweedFS and MinIO; up to 5 GiB).  Until it has, or if it
cannot, the object's facts have no SHA-256 and are not used (L{S3Readable.facts}): the
record is what serves it.  A streamed upload that failed on the way goes up from the
spool at publish instead: streaming only saves time.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python import threadable
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer
from zope.interface import implementer

from hmacd.facts import encode
from hmacd.metadata import FileRecord
from hmacd.s3 import NoSuchUpload, PreconditionFailed, S3Error
from hmacd.storage import Conflict, IWriter
from hmacd.storage.local import LocalWriter

if TYPE_CHECKING:
    from hmacd.storage.s3 import S3Storage

__all__ = ["FACTS_META", "MAX_COPY", "SHA256_META", "STAGING", "UPLOAD_META", "S3Writer"]

log = Logger()

FACTS_META = "hmacfs"
SHA256_META = "sha256"
# A value of each write's own: whether the object at a name is ours, when the store's
# answer to writing it was lost.
UPLOAD_META = "hmacfs-upload"
# Where resumable uploads grow (hmacd.storage.s3_pieces): a dot name, never a file.
STAGING = ".hmacfs/staging/"
# The parts of a body that go to the store at once (streamed, or after the last byte).
PARTS_IN_FLIGHT = 4
# What a part's producer reads from the spool at each step: one step is one pread, one
# write to the connection and one turn of the cooperator; 64 KiB steps (Twisted's default)
# cost hmacfs about 0.4 s more CPU per GiB than 1 MiB steps.
READ_SIZE = 1024 * 1024
# The largest object CopyObject takes.
MAX_COPY = 5 * 1024**3


def _metadata(record: FileRecord) -> dict[str, str]:
    # Header values are ASCII: the facts as JSON with escapes (a JID may be UTF-8).  A
    # draft (facts before the body) has no SHA-256 yet.
    facts = json.dumps(json.loads(encode(record)), separators=(",", ":"), ensure_ascii=True)
    metadata = {FACTS_META: facts}
    if record.sha256:
        metadata[SHA256_META] = record.sha256
    return metadata


class _Segments:
    """Bytes C{offset}..C{offset+length} of files laid end to end, as a file (one part)."""

    def __init__(self, segments: list[tuple[int, int]], offset: int, length: int) -> None:
        self._segments = segments  # (fd, size), in order
        self._start = offset
        self._length = length
        self._at = 0

    def read(self, size: int = -1) -> bytes:
        left = self._length - self._at
        size = left if size < 0 else min(size, left)
        chunks = []
        where = self._start + self._at
        for fd, length in self._segments:
            if size <= 0:
                break
            if where >= length:
                where -= length
                continue
            data = os.pread(fd, min(size, length - where), where)
            if not data:
                break
            chunks.append(data)
            size -= len(data)
            where = 0
        data = b"".join(chunks)
        self._at += len(data)
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._at, os.SEEK_END: self._length}[whence]
        self._at = max(0, min(self._length, base + offset))
        return self._at

    def tell(self) -> int:
        return self._at

    def close(self) -> None:
        pass


def part_body(
    segments: list[tuple[int, int]], offset: int, length: int, cooperator: Cooperator
) -> FileBodyProducer:
    """The body of one part: bytes C{offset}..C{offset+length} of C{segments} (L{_Segments})."""
    return FileBodyProducer(_Segments(segments, offset, length), cooperator, readSize=READ_SIZE)


@implementer(IWriter)
class S3Writer:
    """A body spooled locally as it arrives; large ones may be streamed on to its name."""

    def __init__(self, storage: S3Storage, key: str, draft: FileRecord | None = None) -> None:
        self.storage = storage
        self.key = key
        # The facts known before the body, which a streamed multipart upload begins with.
        self._draft = draft
        self._nonce = secrets.token_hex(8)  # UPLOAD_META of the streamed upload
        # A name of its own in the spool: two uploads of one URL never share a temp.
        self._local: LocalWriter = storage.spool.writer(secrets.token_hex(16))
        self._sealed = False
        self._closed = False
        # The streaming of a large body: the multipart upload to its name, its parts, the
        # bytes sent or on their way, the part being sent, what went wrong.
        self._streaming = False
        self._upload_id: str | None = None
        self._parts: list[tuple[int, str]] = []
        self._numbered = 0  # the parts begun
        self._begun: Deferred[Any] = succeed(None)  # the CreateMultipartUpload
        self._sent = 0
        # The parts on their way (PARTS_IN_FLIGHT at most): the store's per-part latency
        # overlaps with the next part's bytes instead of stalling the stream.
        self._inflight: list[Deferred[None]] = []
        self._failed: Failure | None = None
        self._fd: int | None = None

    @property
    def received(self) -> int:
        return self._local.received

    @property
    def onRelief(self) -> Callable[[], None] | None:
        return self._local.onRelief

    @onRelief.setter
    def onRelief(self, value: Callable[[], None] | None) -> None:
        self._local.onRelief = value

    def write(self, data: bytes) -> bool:
        behind = self._local.write(data)
        self._pump()
        return behind

    def drained(self) -> Deferred[None]:
        return self._local.drained()

    # Streaming (reactor thread).

    def _on_disk(self) -> int:
        # Written and hashed by the spool's thread: what may be read back.  (_backlog is
        # our own LocalWriter's count of the bytes it has not written yet.)
        return self._local.received - self._local._backlog

    def _pump(self) -> None:
        if (
            self._failed is not None
            or self._closed
            or self._sealed
            or not self.storage.stream
            or not threadable.isInIOThread()
        ):
            return
        size = self.storage.part_size
        while len(self._inflight) < PARTS_IN_FLIGHT:
            on_disk = self._on_disk()
            if on_disk <= self.storage.threshold or on_disk - self._sent < size:
                return
            self._send(size)

    def _send(self, length: int) -> None:
        """Reactor thread: the next C{length} bytes of the spool on their way, as a part."""
        client = self.storage.client
        if not self._streaming:
            assert self._local.temp is not None
            self._streaming = True
            self._fd = os.open(self._local.temp, os.O_RDONLY | os.O_CLOEXEC)
            # Without a draft the copy at the end brings the type and every fact.
            draft = self._draft
            metadata = {} if draft is None else _metadata(draft)
            self._begun = client.create_multipart_upload(
                self.key,
                None if draft is None else draft.content_type,
                {**metadata, UPLOAD_META: self._nonce},
            )
            self._begun.addCallbacks(self._began, self._broke)
        fd = self._fd
        assert fd is not None
        self._numbered += 1
        number, offset = self._numbered, self._sent
        self._sent += length
        d: Deferred[Any] = Deferred()
        self._begun.addCallback(lambda _: d.callback(None))

        def send(_: object) -> Deferred[str] | None:
            if self._failed is not None or self._upload_id is None:
                return None  # given up: the parts still waiting go not
            body = part_body([(fd, offset + length)], offset, length, self.storage._cooperator)
            return client.upload_part(self.key, self._upload_id, number, body, length)

        def sent(etag: str | None) -> None:
            if etag is not None:
                self._parts.append((number, etag))

        def next_part(_: object) -> None:
            self._inflight.remove(d)
            self._pump()

        d.addCallback(send)
        d.addCallbacks(sent, self._broke)
        d.addCallback(next_part)
        self._inflight.append(d)

    def _began(self, upload_id: str) -> None:
        self._upload_id = upload_id

    def _broke(self, failure: Failure) -> None:
        """The first failure of the stream is kept; publish goes from the spool then."""
        if self._failed is None:
            self._failed = failure

    def _settled(self) -> Deferred[Any]:
        """Fires once no part is on its way any more."""
        return DeferredList(list(self._inflight), consumeErrors=True)

    def _one_settled(self) -> Deferred[Any]:
        """Fires once one of the parts on their way has ended."""
        return DeferredList(list(self._inflight), fireOnOneCallback=True, consumeErrors=True)

    # Publishing (a worker thread).

    def seal(self) -> str:
        digest = self._local.seal()
        self._sealed = True
        return digest

    def publish(self, record: FileRecord) -> None:
        assert self._sealed and self._local.temp is not None
        size = self._local.received
        try:
            # The spool's temp is open write-only: the bytes are read back from its name.
            with open(self._local.temp, "rb") as f:
                if self._streaming:
                    try:
                        self.storage._call(self._finish, f.fileno(), size, record)
                        return
                    except PreconditionFailed:
                        raise Conflict() from None
                    except (OSError, NoSuchUpload):
                        pass  # the streaming broke off: all of it from the spool instead
                    self._abort()  # before the spool's upload: one at a time per name
                self.storage.put_file(f.fileno(), size, self.key, record)
        finally:
            self._cleanup()
            self._local.discard()

    @inlineCallbacks
    def _finish(self, fd: int, size: int, record: FileRecord) -> Any:
        """Reactor thread: the last parts, complete the upload at its name, then the hash."""
        while self._sent < size and self._failed is None:
            if len(self._inflight) >= PARTS_IN_FLIGHT:
                yield self._one_settled()
                continue
            self._send(min(self.storage.part_size, size - self._sent))
        while self._inflight:
            yield self._settled()
        if self._failed is not None:
            self._failed.raiseException()
        upload_id = self._upload_id
        assert upload_id is not None
        client = self.storage.client
        try:
            etag = yield client.complete_multipart_upload(self.key, upload_id, self._parts, True)
        except PreconditionFailed:
            raise
        except S3Error as e:
            # Completed, with its answer lost?  Then the object at the name is ours.
            try:
                there = yield client.head_object(self.key)
            except S3Error:
                raise e from None
            if there.metadata.get(UPLOAD_META) != self._nonce:
                raise
            etag = there.etag
        self._upload_id = None  # the file now: nothing of it is to be cleaned up
        if size > MAX_COPY:
            return  # no copy takes it: the record alone has the SHA-256
        try:
            # Only onto the object we completed (If-Match): never another's facts on it.
            yield client.copy_object(
                self.key, self.key, record.content_type, _metadata(record), source_if_match=etag
            )
        except S3Error as e:
            # The file is whole and stored: the record (written next) serves it.
            log.warn("{key}: the SHA-256 is in the record only: {error}", key=self.key, error=e)

    def _abort(self) -> None:
        """A worker thread: the multipart upload goes, if one is left."""
        if self._upload_id is not None:
            with contextlib.suppress(S3Error, OSError):
                self.storage._call(
                    self.storage.client.abort_multipart_upload, self.key, self._upload_id
                )
            self._upload_id = None

    def _cleanup(self) -> None:
        """A worker thread: an unfinished multipart upload goes, whatever came."""
        if not self._streaming:
            return
        self._abort()
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Reactor thread: nothing of it is left (what the store holds, the sweep takes)."""
        self._closed = True
        self._local.discard()
        if not self._streaming:
            return
        client = self.storage.client

        def abort(_: object) -> Deferred[None] | None:
            # After the part in flight: its producer reads our fd until then.
            self._close_fd()
            if self._upload_id is None:
                return None
            return client.abort_multipart_upload(self.key, self._upload_id)

        d: Deferred[Any] = self._settled()
        d.addBoth(abort)
        d.addErrback(lambda _: None)  # the sweep aborts what is left after ResumableTTL
