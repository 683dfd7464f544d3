"""
Resumable uploads in an object store: the pieces of one upload, received by any node.

A resumable upload is a multipart upload of a staging object (C{.hmacfs/staging/...}, a dot
name: never listed, never served).  Its state (L{UploadState}: the upload id, the parts
sent and their ETags, the offset, the facts of the first piece) lives in the shared metadata
store, so that piece N may arrive at node A and piece N+1 at node B.

S3 takes parts of at least 5 MiB (but the last), and a client's pieces may be any size.  So
each piece sends as many whole parts as the bytes so far make, and keeps the rest (less than
a part) as a I{tail} object beside the staging object, which the next piece, on whichever
node, fetches and sends first.  The part numbers follow from the state: a piece sent again
(after a node died before the state was written) sends the same parts again, and S3 keeps
the last of each number.

After the last piece the staging object is completed, read back once to hash it (a hash
state cannot travel between nodes), and copied to its name with the facts and
C{If-None-Match: *}, then removed: the partial is never visible under its name.  Objects
above the 5 GiB a copy takes are refused for resumable uploads before their first piece.

Everything here blocks: it runs in a worker thread, like the storage's other writes.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IConsumer, IProducer
from zope.interface import implementer

from hmacd.metadata import FileRecord
from hmacd.s3 import NoSuchKey, NoSuchUpload, PreconditionFailed, S3Error
from hmacd.storage import Conflict
from hmacd.storage.s3_writer import MAX_COPY, SHA256_META, STAGING, _metadata, part_body

if TYPE_CHECKING:
    from hmacd.storage.s3 import S3Storage

__all__ = ["MAX_COPY", "Pieces", "UploadState", "live_key", "state_key"]

# Sent once again when the store drops a pooled connection as the part starts.
_ATTEMPTS = 2
# The tail objects of a staging object: <staging>.tail.<token>.
TAIL = ".tail."


def state_key(relpath: str) -> str:
    """The shared-store key of the resumable upload of C{relpath}."""
    return "s3-resumable:" + relpath


def live_key(staging: str) -> str:
    """The shared-store key that says the staging object C{staging} is still in use."""
    return "s3-staging:" + staging


def staging_of(key: str) -> str:
    """The staging object a key under C{.hmacfs/staging/} belongs to (itself or its tail's)."""
    return key.split(TAIL, 1)[0]


@dataclass(frozen=True)
class UploadState:
    """Where one resumable upload stands; kept as JSON in the shared metadata store."""

    path: str
    total: int
    content_type: str
    protocol: str
    uploader: str | None
    expires: float | None
    part_size: int
    staging: str
    upload_id: str
    parts: list[list[Any]] = field(default_factory=list)  # [number, etag], in order
    offset: int = 0  # bytes received: in the parts, and in the tail
    tail: str | None = None
    tail_size: int = 0
    # The staging object is complete (every byte is in it): what is left is to hash it
    # and copy it to its name, when the last piece (from C{offset}) is sent again.
    completed: bool = False

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> UploadState:
        """
        @raise ValueError: not the state of an upload (a store written by something else).
        """
        try:
            data = json.loads(text)
            state = cls(**data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"not a resumable upload's state: {e}") from None
        if not (
            isinstance(state.offset, int)
            and isinstance(state.total, int)
            and 0 <= state.tail_size <= state.offset <= state.total
            and state.staging.startswith(STAGING)
        ):
            raise ValueError("not a resumable upload's state: inconsistent")
        return state


@implementer(IConsumer)
class _Hash:
    """A consumer that hashes what it is given."""

    def __init__(self) -> None:
        import hashlib

        self.sha256 = hashlib.sha256()

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.sha256.update(data)


@implementer(IConsumer)
class _ToFile:
    """A consumer that writes what it is given to a file (a tail: less than one part)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]


class Pieces:
    """The object-store side of resumable uploads, for C{storage}."""

    def __init__(self, storage: S3Storage) -> None:
        self.storage = storage
        self.client = storage.client

    def begin(
        self,
        relpath: str,
        total: int,
        content_type: str,
        protocol: str,
        uploader: str | None,
        expires: float | None,
    ) -> UploadState:
        """Start the staging object of a new upload of C{total} bytes at C{relpath}."""
        staging = STAGING + secrets.token_hex(16)
        upload_id = self.storage._call(self.client.create_multipart_upload, staging)
        return UploadState(
            path=relpath,
            total=total,
            content_type=content_type,
            protocol=protocol,
            uploader=uploader,
            expires=expires,
            part_size=self.storage.part_size,
            staging=staging,
            upload_id=upload_id,
        )

    def append(self, state: UploadState, fd: int, size: int) -> UploadState:
        """
        Send the C{size} bytes of the open file C{fd} (a piece, spooled) after what C{state}
        holds: whole parts, the rest as a new tail; after the last piece, every byte, and
        the staging object is completed.  The old tail is left for L{forget_tail}, once the
        new state is in the shared store.
        """
        last = state.offset + size == state.total
        spool = self.storage.spool.root
        tail_fd = None
        try:
            segments = [(fd, size)]
            if state.tail is not None:
                tail_fd = self._fetch(state.tail, state.tail_size, spool)
                segments.insert(0, (tail_fd, state.tail_size))
            available = state.tail_size + size
            part = state.part_size
            sendable = available if last else available - available % part
            parts = [list(p) for p in state.parts]
            at = 0
            while at < sendable:
                length = min(part, sendable - at)
                number = len(parts) + 1
                etag = self._send_part(state, number, segments, at, length)
                parts.append([number, etag])
                at += length
            tail, tail_size = None, 0
            if available > sendable:
                tail = f"{state.staging}{TAIL}{secrets.token_hex(8)}"
                tail_size = available - sendable
                self._put(tail, segments, sendable, tail_size)
            if last:
                self.storage._call(
                    self.client.complete_multipart_upload,
                    state.staging,
                    state.upload_id,
                    [(n, etag) for n, etag in parts],
                )
            if last:
                # The offset stays where the last piece began: should the file fail to
                # appear, the client sends that piece again, and it finishes the file.
                return replace(state, parts=parts, tail=None, tail_size=0, completed=True)
            return replace(
                state, parts=parts, offset=state.offset + size, tail=tail, tail_size=tail_size
            )
        finally:
            if tail_fd is not None:
                os.close(tail_fd)

    def _send_part(
        self, state: UploadState, number: int, segments: list[tuple[int, int]], at: int, length: int
    ) -> str:
        for attempt in range(1, _ATTEMPTS + 1):
            body = part_body(segments, at, length, self.storage._cooperator)
            try:
                return self.storage._call(
                    self.client.upload_part, state.staging, state.upload_id, number, body, length
                )
            except (OSError, S3Error):
                if attempt == _ATTEMPTS:
                    raise
        raise AssertionError("unreachable")

    def _put(self, key: str, segments: list[tuple[int, int]], at: int, length: int) -> None:
        for attempt in range(1, _ATTEMPTS + 1):
            body = part_body(segments, at, length, self.storage._cooperator)
            try:
                self.storage._call(self.client.put_object, key, body, length)
                return
            except (OSError, S3Error):
                if attempt == _ATTEMPTS:
                    raise

    def _fetch(self, key: str, size: int, spool: str) -> int:
        """The object C{key} in an unnamed local file, open for reading and writing."""
        fd = os.open(spool, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        try:
            self.storage._call(self._download, key, fd)
            if os.fstat(fd).st_size != size:
                raise OSError(f"the tail {key} has {os.fstat(fd).st_size} bytes, not {size}")
        except BaseException:
            os.close(fd)
            raise
        return fd

    @inlineCallbacks
    def _download(self, key: str, fd: int) -> Any:
        answer = yield self.client.get_object(key)
        yield answer.deliver(_ToFile(fd))

    def completed(self, state: UploadState) -> UploadState | None:
        """
        The state after the last piece if the staging object is whole already (its
        multipart upload was completed by a commit that failed after it); else None.
        """
        try:
            head = self.storage._call(self.client.head_object, state.staging)
        except NoSuchKey:
            return None
        if head.length != state.total:
            return None
        return replace(state, tail=None, tail_size=0, completed=True)

    def digest(self, state: UploadState) -> str:
        """The SHA-256 of the completed staging object, read back once."""
        return self.storage._call(self._hash, state.staging)

    @inlineCallbacks
    def _hash(self, key: str) -> Any:
        answer = yield self.client.get_object(key)
        consumer = _Hash()
        yield answer.deliver(consumer)
        return consumer.sha256.hexdigest()

    def publish(self, state: UploadState, record: FileRecord) -> None:
        """
        Copy the completed staging object to its name with C{record}'s facts, never
        overwriting; the staging object goes once copied, or once the name is taken.

        @raise Conflict: the name was taken meanwhile.
        """
        key = self.storage.key_of(state.path)
        try:
            if self.storage.dedup:
                # The bytes become the content (unless it is there), the name a reference.
                def store_content(content: str) -> None:
                    self.storage._call(
                        self.client.copy_object,
                        state.staging,
                        content,
                        None,
                        {SHA256_META: record.sha256},
                        True,
                    )

                self.storage.link(key, record, store_content)
            else:
                self.storage._call(
                    self.client.copy_object,
                    state.staging,
                    key,
                    record.content_type,
                    _metadata(record),
                    True,
                )
        except (PreconditionFailed, Conflict):
            self._quietly(self.client.delete_object, state.staging)
            raise Conflict() from None
        # Kept after any other failure: the last piece sent again copies it then.
        self._quietly(self.client.delete_object, state.staging)

    def forget_tail(self, key: str | None) -> None:
        """Remove a tail a newer state no longer names (the sweep takes it on failure)."""
        if key is not None:
            self._quietly(self.client.delete_object, key)

    def discard(self, state: UploadState) -> None:
        """Nothing of the upload is left: its multipart upload (or staging object), its tail."""
        self._quietly(self.client.abort_multipart_upload, state.staging, state.upload_id)
        self._quietly(self.client.delete_object, state.staging)
        self.forget_tail(state.tail)

    def _quietly(self, f: Any, *args: Any) -> None:
        try:
            self.storage._call(f, *args)
        except (NoSuchKey, NoSuchUpload, S3Error, OSError):
            pass  # the partial sweep removes what is left after ResumableTTL


def too_large(total: int) -> bool:
    """Whether a resumable upload of C{total} bytes is more than an object store's copy takes."""
    return total > MAX_COPY
