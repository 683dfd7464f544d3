"""
Whether the server can take an upload the verdict accepted, and the sink it goes into.

L{hmacd.verdict.judge} decides from what the request says; L{admit} then asks the server's
own state, in this order: free space, shutdown, the metadata store's health, a resumable
request's body against its range (L{hmacd.verdict.check_piece}), and, opening the sink,
the claim on the path and whether something is there already.

Nodes that share an object store claim the path in the shared metadata store first
(L{admit_across_nodes}): the answer comes later than the headers, and the request waits
for it without reading the body (L{hmacd.upload.UploadRequest}).  So does an upload when a
quota is set: it first takes its hold on the quotas (L{hmacd.quota}) in the store.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.web import http

from hmacd.claims import PathBusy
from hmacd.landing import RETRY_AFTER
from hmacd.logs import escape
from hmacd.paths import PathRefused
from hmacd.quota import QuotaRefusal, Reservation, slot_uploader_key
from hmacd.sink import (
    ChunkInProgress,
    Conflict,
    OffsetMismatch,
    ResumablePiece,
    Sink,
    WholeUpload,
    partial_offset,
)
from hmacd.storage import StorageUnavailable
from hmacd.store import StoreUnavailable
from hmacd.takedown import gone_body
from hmacd.verdict import (
    INSUFFICIENT_STORAGE,
    RESUME_INCOMPLETE,
    Plan,
    Refusal,
    check_piece,
    received_range,
)

if TYPE_CHECKING:
    from hmacd.core import FileServer
    from hmacd.storage.s3_pieces import UploadState

__all__ = ["admit", "admit_across_nodes", "asks_the_store"]

log = Logger()


def asks_the_store(fs: FileServer) -> bool:
    """
    Whether an upload is admitted only once the metadata store has answered
    (L{admit_across_nodes}): claims across nodes, or quotas.  Else L{admit} answers at once.
    """
    return fs.node_claims is not None or fs.quotas is not None or fs.slot_uploaders


def admit_across_nodes(fs: FileServer, plan: Plan, length: int | None) -> Deferred[Sink | Refusal]:
    """
    L{admit}, once the upload holds its room in the quotas (C{fs.quotas}), and this node
    holds the claim on the path in the shared metadata store (C{fs.node_claims}) and the
    store has no record of a file there: fires the sink, which holds the claim and the
    quota until it is released, or the refusal (413 naming a quota it would exceed, 409
    while another node's upload holds the path or once a file is there, 503 when the store
    cannot say).  Fires at once when the store answers at once.

    @raise OSError: (as a failure) the storage cannot take the file.
    """
    return Deferred.fromCoroutine(_within_quotas(fs, plan, length))


async def _within_quotas(fs: FileServer, plan: Plan, length: int | None) -> Sink | Refusal:
    if plan.uploader is None and fs.slot_uploaders:
        # A slot our component issued, which names nobody: who asked for it is on record.
        try:
            uploader = await fs.metadata.get_state(slot_uploader_key(plan.relpath))
        except Exception as e:
            return _store_failed(plan, e)
        plan = replace(plan, uploader=uploader)
    quotas = fs.quotas
    if quotas is None or (plan.span is not None and len(plan.span) == 1):
        # No quota, or a question (where a resumable upload stands) that brings no bytes.
        return await _claimed(fs, plan, length)
    try:
        answer = await quotas.reserve(plan.uploader, plan.size)
    except Exception as e:
        return _store_failed(plan, e)
    if isinstance(answer, QuotaRefusal):
        log.info("refused {path}: {reason}", path=escape(plan.relpath), reason=answer.reason)
        return answer
    hold: Reservation = answer
    try:
        admitted = await _claimed(fs, plan, length)
    except BaseException:
        hold.release()
        raise
    if isinstance(admitted, Refusal):
        hold.release()
    else:
        admitted.holdQuota(hold)
    return admitted


async def _claimed(fs: FileServer, plan: Plan, length: int | None) -> Sink | Refusal:
    if fs.node_claims is None:
        return admit(fs, plan, length)
    return await _across_nodes(fs, plan, length)


async def _across_nodes(fs: FileServer, plan: Plan, length: int | None) -> Sink | Refusal:
    claims = fs.node_claims
    assert claims is not None
    if plan.span is not None and len(plan.span) == 1 and not _local_pieces(fs):
        # Where does a resumable upload stand: read, never claimed, so that a client asks
        # while a piece is on its way (or its node died holding the claim).  A piece
        # takes the claim and checks the offset again.
        return await _where(fs, plan, length)
    try:
        claim = await claims.take(plan.relpath)
    except Exception as e:
        return _store_failed(plan, e)
    if claim is None:
        return Refusal(http.CONFLICT, "an upload of this path is in progress")
    admitted: Sink | Refusal
    try:
        try:
            record = await fs.metadata.get(plan.relpath)
        except Exception as e:
            admitted = _store_failed(plan, e)
        else:
            if record is not None:
                # A file is there (or was, and waits for the expiry sweep): no body for it.
                admitted = Refusal(http.CONFLICT, "file exists")
            elif plan.span is not None and not _local_pieces(fs):
                admitted = await _shared_piece(fs, plan, length)
            else:
                admitted = admit(fs, plan, length)
    except BaseException:
        claim.release()
        raise
    if isinstance(admitted, Refusal):
        claim.release()
    else:
        admitted.hold(claim)
    return admitted


async def _where(fs: FileServer, plan: Plan, length: int | None) -> Sink | Refusal:
    try:
        record = await fs.metadata.get(plan.relpath)
    except Exception as e:
        return _store_failed(plan, e)
    if record is not None:
        return Refusal(http.CONFLICT, "file exists")
    return await _shared_piece(fs, plan, length)


def _local_pieces(fs: FileServer) -> bool:
    """Whether resumable uploads keep their bytes under StoreDir (not in an object store)."""
    return getattr(fs.storage, "resumable", True)


async def _shared_piece(fs: FileServer, plan: Plan, length: int | None) -> Sink | Refusal:
    """L{admit} for a piece of a resumable upload whose state is in the shared store."""
    # Here, not at the top: the S3 modules (and botocore) are imported only where S3 is used.
    from hmacd.storage.s3_pieces import MAX_COPY, UploadState, state_key, too_large

    if too_large(plan.size):
        return Refusal(
            http.REQUEST_ENTITY_TOO_LARGE,
            f"a resumable upload to the object store takes at most {MAX_COPY} bytes",
        )
    try:
        text = await fs.metadata.get_state(state_key(plan.relpath))
    except Exception as e:
        return _store_failed(plan, e)
    try:
        state = None if text is None else UploadState.from_json(text)
    except ValueError as e:
        log.error("resumable upload of {path}: {error}", path=escape(plan.relpath), error=e)
        state = None  # the upload starts again
    return admit(fs, plan, length, state)


def _store_failed(plan: Plan, error: Exception) -> Refusal:
    if not isinstance(error, (StoreUnavailable, TimeoutError, CancelledError)):
        log.error("claiming {path} failed: {error!r}", path=escape(plan.relpath), error=error)
    return Refusal(
        http.SERVICE_UNAVAILABLE, "metadata store unavailable", [(b"Retry-After", RETRY_AFTER)]
    )


def admit(
    fs: FileServer, plan: Plan, length: int | None, state: UploadState | None = None
) -> Sink | Refusal:
    """
    The sink for the body of C{plan}, or the refusal (an offset query's answer, 308, too).

    @param fs: the L{hmacd.core.FileServer}.
    @param length: the request's Content-Length; None for a chunked body.
    @param state: a resumable upload's state in the shared store (an object store's).
    @raise OSError: the storage cannot take the file (the caller says why, and logs it).
    """
    if plan.needed and fs.room_for(plan.needed) is False:
        log.warn(
            "refused {path} ({size} bytes): less free space than that plus MinFreeSpace",
            path=plan.relpath,
            size=plan.needed,
        )
        return Refusal(INSUFFICIENT_STORAGE, "insufficient storage")
    if not fs.uploads.accepting:
        return Refusal(http.SERVICE_UNAVAILABLE, "shutting down", [(b"Retry-After", RETRY_AFTER)])
    if not fs.metadata.writable():
        # No store could record the file: say so before the client spends its bandwidth on
        # a body we would have to throw away.
        return Refusal(
            http.SERVICE_UNAVAILABLE, "metadata store unavailable", [(b"Retry-After", RETRY_AFTER)]
        )
    taken = fs.denials.path(plan.relpath)
    if taken is not None:
        # Taken down (hmacd.takedown): said before the body, as the GET would say it.
        return Refusal(taken, gone_body(taken).decode().strip())
    piece = check_piece(plan, length)
    if piece is not None:
        return piece
    try:
        return _open(fs, plan, state)
    except Conflict:
        return Refusal(http.CONFLICT, "file exists")
    except StorageUnavailable:
        # An object store known to be down: before the body, as for the metadata store.
        return Refusal(
            http.SERVICE_UNAVAILABLE, "object store unavailable", [(b"Retry-After", RETRY_AFTER)]
        )
    except PathBusy:
        return Refusal(http.CONFLICT, "an upload of this path is in progress")
    except ChunkInProgress:
        return Refusal(http.CONFLICT, "another chunk of this upload is in progress")
    except OffsetMismatch as e:
        return Refusal(
            http.REQUESTED_RANGE_NOT_SATISFIABLE,
            f"the upload stands at {e.offset} bytes",
            received_range(e.offset),
        )
    except PathRefused as e:
        return Refusal(http.BAD_REQUEST, str(e))


def _open(fs: FileServer, plan: Plan, state: UploadState | None) -> Sink | Refusal:
    expires = fs.expiry(plan.expires)
    if plan.span is None:
        return WholeUpload(
            fs, plan.relpath, plan.size, plan.media_type, plan.protocol, plan.uploader, expires
        )
    if not _local_pieces(fs):
        return _open_shared(fs, plan, state, expires)
    if len(plan.span) == 1:
        # "bytes */total": where does the upload stand?
        if fs.storage.exists(plan.relpath):
            raise Conflict()
        offset = partial_offset(fs.store_dir, plan.relpath)
        return Refusal(
            RESUME_INCOMPLETE, f"{offset} bytes received", received_range(offset), error=False
        )
    start, _, total = plan.span
    return ResumablePiece(
        fs, plan.relpath, total, start, plan.needed, plan.media_type, plan.protocol,
        plan.uploader, expires,
    )  # fmt: skip


def _open_shared(
    fs: FileServer, plan: Plan, state: UploadState | None, expires: float | None
) -> Sink | Refusal:
    """A piece (or an offset query) of a resumable upload into an object store."""
    from hmacd.sink_s3 import S3ResumablePiece, check_state, offset_of

    if fs.node_claims is None:
        # Its pieces may reach any node: without claims in a shared store they could
        # overlap.  (hmacd.services always sets them with an object store.)
        return Refusal(http.NOT_IMPLEMENTED, "resumable uploads need claims across nodes")
    assert plan.span is not None
    check_state(state, plan.relpath, plan.size)
    if len(plan.span) == 1:
        offset = offset_of(state)
        return Refusal(
            RESUME_INCOMPLETE, f"{offset} bytes received", received_range(offset), error=False
        )
    start, _, total = plan.span
    return S3ResumablePiece(
        fs, plan.relpath, state, total, start, plan.needed, plan.media_type, plan.protocol,
        plan.uploader, expires,
    )  # fmt: skip
