"""
The bytes of one new file on their way into the object store (L{S3Writer}).

The body is spooled and hashed in a local temp file as it arrives (the local directory's
writer, with its back-pressure), because an object's metadata (the facts, the SHA-256)
must be sent before its first byte.  A small body goes up at publish as one PutObject to
its name.  A large one goes to the store as it arrives: once more than the multipart
threshold is on disk, each full part is sent from the spool to a multipart upload of a
staging object (C{.hmacfs/staging/...}, never listed as a file); at publish the last part
follows, the staging object is completed and copied server-side to its name with the
facts and C{If-None-Match: *} (a name taken meanwhile is a L{Conflict}, never overwritten),
then removed.  A streamed upload that failed on the way, or a body above the 5 GiB a copy
may take, goes up from the spool at publish instead: streaming only saves time.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.python import threadable
from twisted.python.failure import Failure
from twisted.web.client import FileBodyProducer
from zope.interface import implementer

from hmacd.facts import encode
from hmacd.metadata import FileRecord
from hmacd.s3 import PreconditionFailed, S3Error
from hmacd.storage import Conflict, IWriter
from hmacd.storage.local import LocalWriter

if TYPE_CHECKING:
    from hmacd.storage.s3 import S3Storage

__all__ = ["FACTS_META", "MAX_COPY", "SHA256_META", "STAGING", "S3Writer"]

FACTS_META = "hmacfs"
SHA256_META = "sha256"
# Where streamed bodies wait for their facts (a dot name: never a file, never listed).
STAGING = ".hmacfs/staging/"
# The largest object CopyObject takes.
MAX_COPY = 5 * 1024**3


def _metadata(record: FileRecord) -> dict[str, str]:
    # Header values are ASCII: the facts as JSON with escapes (a JID may be UTF-8).
    facts = json.dumps(json.loads(encode(record)), separators=(",", ":"), ensure_ascii=True)
    return {FACTS_META: facts, SHA256_META: record.sha256}


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


def _Slice(fd: int, offset: int, length: int) -> _Segments:
    """C{length} bytes of a file from C{offset}, as a file for FileBodyProducer (a part)."""
    return _Segments([(fd, offset + length)], offset, length)


@implementer(IWriter)
class S3Writer:
    """A body spooled locally as it arrives; large ones streamed on to a staging object."""

    def __init__(self, storage: S3Storage, key: str) -> None:
        self.storage = storage
        self.key = key
        # A name of its own in the spool: two uploads of one URL never share a temp.
        self._local: LocalWriter = storage.spool.writer(secrets.token_hex(16))
        self._sealed = False
        self._closed = False
        # The streaming of a large body: the staging object's multipart upload, its parts,
        # the bytes sent or on their way, the part being sent, what went wrong.
        self._staging = STAGING + secrets.token_hex(16)
        self._streaming = False
        self._upload_id: str | None = None
        self._parts: list[tuple[int, str]] = []
        self._sent = 0
        self._inflight: Deferred[None] | None = None
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
        size = self.storage.part_size
        if (
            self._inflight is not None
            or self._failed is not None
            or self._closed
            or self._sealed
            or not self.storage.stream
            or not threadable.isInIOThread()
        ):
            return
        on_disk = self._on_disk()
        if on_disk <= self.storage.threshold or on_disk - self._sent < size:
            return
        client = self.storage.client
        number, offset = len(self._parts) + 1, self._sent
        self._sent += size
        if not self._streaming:
            assert self._local.temp is not None
            self._streaming = True
            self._fd = os.open(self._local.temp, os.O_RDONLY | os.O_CLOEXEC)
            d: Deferred[Any] = client.create_multipart_upload(self._staging)
        else:
            d = succeed(self._upload_id)
        fd = self._fd
        assert fd is not None

        def send(upload_id: str) -> Deferred[str]:
            self._upload_id = upload_id
            body = FileBodyProducer(_Slice(fd, offset, size), self.storage._cooperator)
            return client.upload_part(self._staging, upload_id, number, body, size)

        def sent(etag: str) -> None:
            self._parts.append((number, etag))

        def failed(failure: Failure) -> None:
            self._failed = failure

        def next_part(_: object) -> None:
            self._inflight = None
            self._pump()

        d.addCallback(send)
        d.addCallbacks(sent, failed)
        d.addCallback(next_part)
        self._inflight = d

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
                if self._streaming and size <= MAX_COPY:
                    try:
                        self.storage._call(self._finish, f.fileno(), size, record)
                        return
                    except PreconditionFailed:
                        raise Conflict() from None
                    except OSError:
                        pass  # the streaming broke off: all of it from the spool instead
                self.storage.put_file(f.fileno(), size, self.key, record)
        finally:
            self._cleanup()
            self._local.discard()

    @inlineCallbacks
    def _finish(self, fd: int, size: int, record: FileRecord) -> Any:
        """Reactor thread: the last parts, complete the staging object, copy it to its name."""
        if self._inflight is not None:
            yield self._inflight
        if self._failed is not None:
            self._failed.raiseException()
        upload_id = self._upload_id
        assert upload_id is not None
        client = self.storage.client
        while self._sent < size:
            number, offset = len(self._parts) + 1, self._sent
            length = min(self.storage.part_size, size - offset)
            body = FileBodyProducer(_Slice(fd, offset, length), self.storage._cooperator)
            etag = yield client.upload_part(self._staging, upload_id, number, body, length)
            self._parts.append((number, etag))
            self._sent += length
        yield client.complete_multipart_upload(self._staging, upload_id, self._parts)
        self._upload_id = None  # completed: an object now, removed by _cleanup
        yield client.copy_object(
            self._staging, self.key, record.content_type, _metadata(record), if_none_match=True
        )

    def _cleanup(self) -> None:
        """A worker thread: the staging object or its multipart upload goes, whatever came."""
        if not self._streaming:
            return
        client = self.storage.client
        with contextlib.suppress(S3Error, OSError):
            if self._upload_id is not None:
                self.storage._call(client.abort_multipart_upload, self._staging, self._upload_id)
            else:
                self.storage._call(client.delete_object, self._staging)
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
            return client.abort_multipart_upload(self._staging, self._upload_id)

        d: Deferred[Any] = self._inflight if self._inflight is not None else succeed(None)
        d.addBoth(abort)
        d.addErrback(lambda _: None)  # the sweep aborts what is left after ResumableTTL
