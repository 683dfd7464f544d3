"""
The end of an upload whose body is in: drain the sink, commit it, record the file, and
decide the answer.

L{land} is everything between the last body byte and the response, without the request:
it returns the L{Answer}, and the request (L{hmacd.upload.UploadRequest}) gives it.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web import http

from hmacd.logs import emits, escape
from hmacd.sink import Conflict, Outcome, Partial, Sink
from hmacd.storage import StorageUnavailable
from hmacd.store import StoreUnavailable
from hmacd.takedown import Denied, gone_body
from hmacd.verdict import INSUFFICIENT_STORAGE, RESUME_INCOMPLETE, received_range

if TYPE_CHECKING:
    from hmacd.core import FileServer

__all__ = ["RETRY_AFTER", "STORAGE_FULL", "Answer", "land"]

log = Logger()

STORAGE_FULL = (errno.ENOSPC, errno.EDQUOT)

# A store outage is noticed and routed around within seconds (see
# hmacd.store.failover); a client retrying after this finds it settled.
RETRY_AFTER = b"30"


@dataclass(frozen=True)
class Answer:
    """
    What to tell the client.

    @ivar failed: the C{upload_errors_total} reason, when the upload failed.
    """

    status: int
    message: str
    headers: Sequence[tuple[bytes, bytes]] = ()
    failed: str | None = None


class _Withdrawn(Exception):
    """The file was taken back: no store could record it."""


def land(fs: FileServer, sink: Sink, acceptedAt: float) -> Deferred[Answer]:
    """
    Commit C{sink} (a body received in full) and record what it stored; never fails.

    @param fs: the L{hmacd.core.FileServer}.
    @param acceptedAt: when the upload was accepted (C{upload_duration_seconds}).
    """

    def commit(_: None) -> Deferred[Outcome]:
        return fs.uploads.committer.submit(sink)

    def unwritten(failure: Failure) -> Failure:
        sink.abort()
        return failure

    # The errback first: it sees a failure of drained() only, never one of the commit.
    d = sink.drained().addErrback(unwritten).addCallback(commit)
    answered = d.addCallback(_record, fs, sink, acceptedAt)
    return answered.addErrback(_failed, sink)


def _record(outcome: Outcome, fs: FileServer, sink: Sink, acceptedAt: float) -> Any:
    if isinstance(outcome, Partial):
        # A resumable piece is in; the upload is not complete yet.
        return Answer(
            RESUME_INCOMPLETE, f"{outcome.offset} bytes received", received_range(outcome.offset)
        )
    record = outcome.record

    def published(_: object) -> Answer:
        metrics = fs.metrics
        metrics.uploads.inc()
        metrics.upload_bytes.inc(record.size)
        metrics.upload_duration.observe(fs.reactor.seconds() - acceptedAt)
        if emits(LogLevel.info, log.namespace):  # not escaped per upload only to be dropped
            log.info(
                "stored {path} ({size} bytes, {type}, {protocol})",
                path=escape(record.path),
                size=record.size,
                type=record.content_type,
                protocol=record.protocol,
            )
        if fs.audit is not None:
            fs.audit.write("upload", record.path, record, protocol=record.protocol)
        return Answer(http.CREATED, "created")

    def unrecorded(failure: Failure) -> None:
        if failure.check(StoreUnavailable):
            log.warn(
                "cannot record {path} ({why}); upload withdrawn",
                path=escape(record.path),
                why=failure.value,
            )
        else:
            log.failure("cannot record {path}; upload withdrawn", failure, path=escape(record.path))
        sink.unpublish()
        # The write may still land later (a timed-out query cannot be recalled): try to
        # take it back too, so no record outlives its file.
        fs.metadata.delete(record.path).addErrback(lambda _: None)
        raise _Withdrawn()

    return fs.metadata.put(record).addCallbacks(published, unrecorded)


def _failed(failure: Failure, sink: Sink) -> Answer:
    if failure.check(Conflict):
        return Answer(http.CONFLICT, "file exists", failed="conflict")
    if isinstance(failure.value, Denied):
        # Its content was taken down: withdrawn before it was ever visible, nothing stays.
        status = failure.value.status
        sink.abort()
        log.info("refused {path}: its content was taken down", path=escape(sink.relpath))
        return Answer(status, gone_body(status).decode().strip(), failed="denied")
    if failure.check(_Withdrawn, StoreUnavailable, TimeoutError):
        # Withdrawn, or the shared store failed a commit that needs it (a resumable
        # upload's state in an object store): the client may try again soon.
        return Answer(
            http.SERVICE_UNAVAILABLE,
            "metadata store unavailable",
            [(b"Retry-After", RETRY_AFTER)],
            failed="store",
        )
    if failure.check(StorageUnavailable):
        # The object store failed us mid-upload; it logs the outage once itself.
        return Answer(
            http.SERVICE_UNAVAILABLE,
            "object store unavailable",
            [(b"Retry-After", RETRY_AFTER)],
            failed="storage",
        )
    if isinstance(failure.value, OSError) and failure.value.errno in STORAGE_FULL:
        log.error("cannot store {path}: {error}", path=escape(sink.relpath), error=failure.value)
        return Answer(INSUFFICIENT_STORAGE, "insufficient storage", failed="disk")
    log.failure("cannot store {path}", failure, path=escape(sink.relpath))
    return Answer(http.INTERNAL_SERVER_ERROR, "cannot store the file", failed="internal")
