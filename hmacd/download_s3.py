"""
GET and HEAD of files in an object store (L{hmacd.storage.s3.S3Storage}): the same answers
as from the local directory (L{hmacd.download}: validators, conditional requests, one Range,
410 past expiry, every safe-serving header), with the bytes streamed from the store.

A HEAD request to the store finds the object and its facts (its metadata); the bytes come
by a GET of just the range asked for, pushed into the response with the response's
back-pressure passed on to the store's connection, so memory stays flat however large the
file.  The store unreachable or refusing us is a 503 with Retry-After; another error of
the store a 502; either after the headers have gone cuts the response short.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IDelayedCall, IProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from hmacd import internals
from hmacd.core import FileServer
from hmacd.download import StoreResource, chooseRange, describe, setDisposition
from hmacd.facts import is_expired
from hmacd.landing import RETRY_AFTER
from hmacd.logs import escape
from hmacd.metadata import FileRecord
from hmacd.paths import PathRefused, relative_path
from hmacd.s3 import S3Refused, S3Unavailable
from hmacd.storage.s3 import S3Readable, S3Storage

__all__ = ["REDIRECT_SECONDS", "S3Reads"]

log = Logger()

# How long a presigned download URL of S3RedirectDownloads is valid.
REDIRECT_SECONDS = 300


@implementer(IConsumer)
class _ToResponse:
    """
    The store's bytes into a response: counted, and stopped when the client leaves.

    While the client does not read, the store's connection is paused (and its own deadline
    with it), so a client that stops reading would hold both forever: as for a file from
    disk, a deadline renewed whenever bytes move cuts it off.
    """

    def __init__(self, request: Any, fs: FileServer, stallTimeout: float) -> None:
        self.request = request
        self.fs = fs
        self.stallTimeout = stallTimeout
        self.producer: IProducer | None = None
        self._deadline: IDelayedCall | None = None

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        self.producer = producer
        self.request.registerProducer(producer, streaming)
        self._renew()

    def unregisterProducer(self) -> None:
        self.producer = None
        self._disarm()
        if self.request.producer is not None:
            self.request.unregisterProducer()

    def write(self, data: bytes) -> None:
        self.fs.metrics.download_bytes.inc(len(data))
        self._renew()
        self.request.write(data)

    def left(self) -> None:
        """The client went away: stop the store's connection too."""
        self._disarm()
        if self.producer is not None:
            self.producer.stopProducing()

    def _renew(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.reset(self.stallTimeout)
        else:
            self._deadline = self.fs.reactor.callLater(self.stallTimeout, self._stalled)

    def _disarm(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _stalled(self) -> None:
        self._deadline = None
        log.info("client stopped reading {path}; dropping it", path=escape(self.request.path))
        self.request.transport.abortConnection()


class S3Reads:
    """The GET/HEAD of a L{StoreResource} whose storage is an object store."""

    def __init__(self, fs: FileServer, resource: StoreResource) -> None:
        assert isinstance(fs.storage, S3Storage)
        self.fs = fs
        self.storage: S3Storage = fs.storage
        self.resource = resource

    def render_GET(self, request: Any) -> bytes | int:
        try:
            relpath = relative_path(request.path, self.fs.prefix)
        except PathRefused:
            relpath = None
        if relpath is None:
            return self.resource._notFound(request)
        d = self.storage.open_async(relpath)
        d.addCallback(self._found, request, relpath)
        d.addErrback(self._storeFailed, request, relpath)
        d.addErrback(lambda failure: request.processingFailed(failure))
        return NOT_DONE_YET

    def _found(self, st: S3Readable | None, request: Any, relpath: str) -> Any:
        if st is None:
            return self.resource._missing(request, relpath)
        facts = st.facts()
        if facts is not None and facts.size == st.size:
            return self._serve(request, st, relpath, facts)

        # No facts on the object (not ours, or from a tool): the record decides.
        def lookupFailed(failure: Failure) -> None:
            return None

        d: Deferred[Any] = self.fs.metadata.get(relpath)
        d.addErrback(lookupFailed)
        return d.addCallback(lambda record: self._serve(request, st, relpath, record))

    def _answer(self, request: Any, body: bytes) -> None:
        if internals.request_disconnected(request):
            return
        if request.method == b"HEAD":
            request.setHeader(b"Content-Length", b"%d" % len(body))
        else:
            request.write(body)
        request.finish()

    def _storeFailed(self, failure: Failure, request: Any, relpath: str) -> None:
        error = failure.value
        if isinstance(error, (S3Unavailable, S3Refused)):
            # The outage itself is logged once, by the storage.
            code, body = http.SERVICE_UNAVAILABLE, b"object store unavailable\n"
            request.setHeader(b"Retry-After", RETRY_AFTER)
        else:
            log.error("cannot read {path}: {error}", path=escape(relpath), error=error)
            code, body = http.BAD_GATEWAY, b"object store error\n"
        if internals.request_disconnected(request):
            return
        if request.startedWriting:
            request.transport.loseConnection()  # mid-body: end it short, never pad it
            return
        request.setResponseCode(code)
        for name in (b"ETag", b"Last-Modified", b"Cache-Control", b"Content-Disposition"):
            request.responseHeaders.removeHeader(name)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Content-Length", b"%d" % len(body))
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def _redirect(
        self, request: Any, st: S3Readable, content_type: str, disposition: bytes | None
    ) -> None:
        """
        S3RedirectDownloads: a 302 to a presigned URL, which makes the store serve the
        signed type and our Content-Disposition.  The store then answers Range and the
        conditionals itself, and sends no CSP or nosniff of ours.
        """
        url = self.storage.client.presign_get(
            st.key,
            REDIRECT_SECONDS,
            response_content_type=content_type,
            response_content_disposition=(disposition or b"inline").decode("ascii"),
        )
        request.setResponseCode(http.FOUND)
        # The URL expires: neither it nor the redirect may be cached for long.
        request.setHeader(b"Cache-Control", b"private, max-age=60")
        request.setHeader(b"Location", url.encode("ascii"))
        for name in (b"Content-Type", b"Accept-Ranges", b"ETag", b"Last-Modified"):
            request.responseHeaders.removeHeader(name)
        request.setHeader(b"Content-Length", b"0")
        request.finish()
        self.fs.metrics.downloads.inc()

    def _serve(
        self, request: Any, st: S3Readable, relpath: str, record: FileRecord | None
    ) -> Deferred[None] | None:
        if internals.request_disconnected(request):
            return None
        if record is not None and is_expired(record, self.fs.now()):
            self._answer(request, self.resource._gone(request))
            return None
        size = st.size
        headed = describe(request, relpath, record, size, st.modified, st.modified_ns)
        if headed is None:  # 304: the headers are the answer
            request.finish()
            return None
        if self.storage.redirect_downloads:
            self._redirect(request, st, headed.content_type, headed.disposition)
            return None
        setDisposition(request, headed)
        span = chooseRange(request, headed, size)
        if isinstance(span, bytes):  # 416
            request.write(span)
            request.finish()
            return None
        first, length = span
        last = first + length - 1
        if request.method == b"HEAD" or length == 0:
            request.finish()
            if request.method == b"GET":
                self.fs.metrics.downloads.inc()
            return None

        stallTimeout = getattr(request.channel.site, "timeOut", None) or 60
        consumer = _ToResponse(request, self.fs, stallTimeout)
        request.notifyFinish().addErrback(lambda _: consumer.left())

        def streaming(answer: Any) -> Deferred[int]:
            return answer.deliver(consumer)

        def done(count: int) -> None:
            if not internals.request_disconnected(request):
                request.finish()
                self.fs.metrics.downloads.inc()

        d = st.deliver(consumer, first, last)
        d.addCallback(streaming)
        d.addCallback(done)
        return d
