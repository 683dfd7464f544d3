"""
One piece of a resumable upload into an object store, on any node (L{S3ResumablePiece}).

The upload's state is in the shared metadata store (L{hmacd.storage.s3_pieces.UploadState},
under L{hmacd.storage.s3_pieces.state_key}); the claim on the path across nodes
(L{hmacd.node_claims}) makes its pieces arrive one at a time, whichever node receives
them.  A piece is spooled under C{StoreDir/.hmacfs/s3-spool} as it arrives (the local
writer, with its back-pressure), then, at commit, sent on to the staging object
(L{hmacd.storage.s3_pieces.Pieces}), and the new state written before the client hears 308.
A piece that breaks off leaves the upload where the last whole piece left it: the client
asks for the offset and goes on from there.
"""

from __future__ import annotations

import errno
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.threads import blockingCallFromThread

from hmacd.s3 import NoSuchUpload
from hmacd.sink import (
    ChunkInProgress,
    Conflict,
    OffsetMismatch,
    Outcome,
    Partial,
    Stored,
    WriterSink,
    refuse_denied,
)
from hmacd.storage.s3_pieces import Pieces, UploadState, live_key, state_key
from hmacd.takedown import Denied

if TYPE_CHECKING:
    from hmacd.core import FileServer
    from hmacd.storage.local import LocalWriter
    from hmacd.storage.s3 import S3Storage

__all__ = ["S3ResumablePiece", "UploadLost", "check_state", "offset_of", "staging_in_use"]


class UploadLost(OSError):
    """The staging upload of a resumable upload is gone (swept): the client starts again."""


def staging_in_use(fs: FileServer) -> Callable[[str], bool]:
    """
    For the partial sweep (a worker thread): whether a staging object belongs to a
    resumable upload whose state is alive in the shared store.  A store that cannot say
    counts as yes: the sweep never removes what an upload may still need.
    """

    def check(staging: str) -> bool:
        try:
            value: str | None = blockingCallFromThread(
                fs.reactor, cast(Any, fs.metadata.get_state), live_key(staging)
            )
        except Exception:
            return True
        return value is not None

    return check


def check_state(state: UploadState | None, relpath: str, total: int) -> None:
    """
    @raise Conflict: the upload under way at C{relpath} is of another total size (another
        slot for the same name: the facts of the first piece stand).
    """
    if state is not None and (state.path, state.total) != (relpath, total):
        raise Conflict()


def offset_of(state: UploadState | None) -> int:
    """Where the upload stands: the bytes a client may resume after."""
    return 0 if state is None else state.offset


class S3ResumablePiece(WriterSink):
    """
    One C{Content-Range} piece of a resumable upload whose bytes go to an object store.

    @param state: the upload's state as the shared store had it when this node claimed the
        path; None before its first piece.
    """

    _writer: LocalWriter  # the piece's spool

    def __init__(
        self,
        fs: FileServer,
        relpath: str,
        state: UploadState | None,
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
            check_state(state, relpath, total)
            if start != offset_of(state):
                raise OffsetMismatch(offset_of(state))
            if state is not None and state.completed and start + length != total:
                # Every byte is in already: only the last piece, sent again, finishes it.
                raise OffsetMismatch(offset_of(state))
            if relpath in fs.uploads.resumable:
                raise ChunkInProgress()
            self.state = state
            self.total = total
            self.start = start
            if state is not None:  # the facts of the first piece stand
                content_type, protocol = state.content_type, state.protocol
                uploader, expires = state.uploader, state.expires
            self.content_type = content_type
            self.protocol = protocol
            self.uploader = uploader
            self.expires = expires
            storage: S3Storage = fs.storage  # type: ignore[assignment]
            self._pieces = Pieces(storage)
            # The piece's spool: aborted, it goes, and the upload stands where it was.
            self._writer = storage.spool.writer("piece-" + secrets.token_hex(16))
        except BaseException:
            self.release()
            raise
        self._writer.onRelief = self._relieved
        fs.uploads.resumable.add(relpath)
        self._registered = True

    def release(self) -> None:
        super().release()
        if getattr(self, "_registered", False):
            self._registered = False
            self.fs.uploads.resumable.discard(self.relpath)

    def _ask_store(self, f: Any, *args: Any) -> Any:
        """Call the shared metadata store from this worker thread, and wait for it."""
        return blockingCallFromThread(self.fs.reactor, f, *args)

    def commit(self) -> Outcome:
        """
        A worker thread: send the piece on; L{Partial} once the new state is in the shared
        store, L{Stored} once the last piece has made the file.

        @raise Conflict: the name was taken meanwhile (the upload is given up).
        """
        self._writer.seal()  # every byte on disk
        temp = self._writer.temp
        assert temp is not None
        fs, pieces = self.fs, self._pieces
        ttl = fs.resumable_ttl
        try:
            state = self.state
            if state is None:
                state = pieces.begin(
                    self.relpath,
                    self.total,
                    self.content_type,
                    self.protocol,
                    self.uploader,
                    self.expires,
                )
                # In use from now on: the sweep leaves it alone while the first piece goes.
                self._put_state(live_key(state.staging), "1", ttl)
            if state.completed:
                # The last piece again, after the file failed to appear: its bytes are all
                # in the staging object already.
                after = state
            else:
                with open(temp, "rb") as f:
                    after = self._append(state, f.fileno())
        finally:
            self._writer.discard()
        if not after.completed:
            self._put_state(live_key(after.staging), "1", ttl)
            self._put_state(state_key(self.relpath), after.to_json(), ttl)
            if state.tail != after.tail:
                pieces.forget_tail(state.tail)
            return Partial(after.offset)
        if after is not state:
            # Completed: should what follows fail, the last piece sent again goes on from
            # here (the upload id is gone now).
            self._put_state(state_key(self.relpath), after.to_json(), ttl)
            pieces.forget_tail(state.tail)  # in the staging object now
        record = self._record(self.total, pieces.digest(after))
        try:
            refuse_denied(fs, record.sha256)
            pieces.publish(after, record)
        except (Conflict, Denied):
            pieces.discard(after)
            self._forget(after)
            raise
        self._forget(after)
        return Stored(record)

    def _append(self, state: UploadState, fd: int) -> UploadState:
        """L{Pieces.append}, knowing what a multipart upload that is gone means."""
        pieces = self._pieces
        try:
            return pieces.append(state, fd, self.received)
        except NoSuchUpload:
            if state.offset + self.received == self.total:
                # Completed by a commit that failed after it (or timed out as S3 did it).
                whole = pieces.completed(state)
                if whole is not None:
                    return whole
            # Aborted (its state had lapsed, and the sweep took it): start again.
            pieces.forget_tail(state.tail)
            self._forget(state)
            raise UploadLost(
                errno.EIO, f"the upload of {self.relpath} was lost; start again"
            ) from None

    def _put_state(self, key: str, value: str, ttl: float) -> None:
        self._ask_store(self.fs.metadata.put_state, key, value, ttl)

    def _forget(self, state: UploadState) -> None:
        metadata = self.fs.metadata
        for key in (state_key(self.relpath), live_key(state.staging)):
            try:
                self._ask_store(metadata.delete_state, key)
            except Exception:
                pass  # it expires after ResumableTTL; a client would find the file there
