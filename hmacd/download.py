"""
GET and HEAD of stored files: validators, conditional requests, one Range.

Written out rather than built on L{twisted.web.static.File}: that lists
directories, has no ETag, ignores If-Range, and takes the type from the file
name, where ours comes from the record of the upload.
"""

from __future__ import annotations

import functools
import os
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC
from email.utils import formatdate, parsedate_to_datetime
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web import http
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from hmacd import internals
from hmacd.core import FileServer, guess_type
from hmacd.facts import UnrecordedFiles, is_expired
from hmacd.logs import escape
from hmacd.mediatype import OCTET_STREAM, BadMediaType, parse_media_type
from hmacd.metadata import FileRecord
from hmacd.numbers import NotADecimal, parse_decimal
from hmacd.paths import PathRefused, relative_path
from hmacd.storage.local import LocalStorage
from hmacd.store import StoreUnavailable
from hmacd.takedown import Takedown, gone_body
from hmacd.web import ALLOWED_METHODS, CONTENT_SECURITY_POLICY, attachment_disposition

__all__ = ["StoreResource", "Unsatisfiable", "parse_range"]

# Served files never change under their URL: a name is never overwritten.
CACHE_CONTROL = b"max-age=31556952, immutable"
READ_SIZE = 256 * 1024
RECORD_CACHE_SIZE = 10_000

log = Logger()

# A record lookup the store could not answer, unlike a record that is not there.
_NO_ANSWER = object()


class Unsatisfiable(Exception):
    """The Range names no byte of the file: 416."""


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """
    The one byte range C{header} asks for, as (first, last) inclusive.

    @return: L{None} when the header is to be ignored and the whole file
        sent: not a byte range, malformed, or several ranges (RFC 9110
        lets a server answer those with 200).
    @raise Unsatisfiable: a well-formed range that starts past the end.
    """
    unit, _, spec = header.partition("=")
    # OWS is spaces and tabs; str.strip() would also take \x1c-\x1f and Unicode spaces.
    if unit.strip(" \t").lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip(" \t").partition("-")
    if not dash:
        return None
    first, last = first.strip(" \t"), last.strip(" \t")
    try:
        start = parse_decimal(first) if first else None
        end = parse_decimal(last) if last else None
    except NotADecimal:
        # Not ASCII digits, or more of them than any file has bytes: RFC 9110 14.2 lets
        # us ignore an invalid Range.
        return None
    if start is None:
        if end is None:
            return None
        if end == 0 or size == 0:
            raise Unsatisfiable()
        return max(0, size - end), size - 1
    # Judge the range as sent: "bytes=10-" on 10 bytes is unsatisfiable, not invalid.
    if end is not None and end < start:
        return None
    if start >= size:
        raise Unsatisfiable()
    return start, size - 1 if end is None else min(end, size - 1)


def _etagMatches(header: str, etag: bytes) -> bool:
    """If-None-Match uses weak comparison: W/"x" and "x" are the same tag."""
    if header.strip() == "*":
        return True
    ours = etag.decode("ascii").removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == ours for tag in header.split(","))


def _httpDate(header: str) -> float | None:
    try:
        when = parsedate_to_datetime(header)
        if when.tzinfo is None:
            # asctime dates carry no zone, yet every HTTP date is GMT (RFC 9110 5.6.7).
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


@functools.lru_cache(maxsize=1024)
def _httpDateOf(seconds: int) -> bytes:
    """The Last-Modified of a file modified at C{seconds}: formatted once per second seen."""
    return formatdate(seconds, usegmt=True).encode("ascii")


def _sendfile_socket(transport) -> int | None:
    """
    The socket of a plain TCP or Unix transport that os.sendfile may write to directly, or
    None (TLS, or a transport that is not a socket of ours).
    """
    if not isinstance(transport, tcp.Connection) or getattr(transport, "TLS", False):
        return None
    # Twisted's own buffer must be empty when we write behind its back: we must be able
    # to tell.
    if not internals.keeps_write_buffer(transport):
        return None
    return transport.fileno()


@implementer(IPushProducer)
class _FileSender:
    """
    Feeds C{length} bytes of an open file to a request as the transport drains.

    On a plain TCP or Unix socket the bytes go by C{os.sendfile}, from the page cache to the
    socket without passing through Python; the transport's flow control still rules: a
    piece goes by sendfile only when Twisted's own buffer is empty, and when the socket is
    full one ordinary C{write} of the next piece lets the transport pause us until it
    drains.  Elsewhere (TLS) every piece is read and written.

    The channel's idle timeout is off while a response is produced, so a client that stops
    reading would hold its socket and file forever: a deadline, renewed whenever bytes
    move, cuts it off.
    """

    def __init__(
        self, request, f, offset: int, length: int, clock, stallTimeout: float, metrics
    ) -> None:
        self.request = request
        self.metrics = metrics
        self.file = f
        self.offset = offset
        self.remaining = length
        self.clock = clock
        self.stallTimeout = stallTimeout
        self._deadline = None
        self._paused = False
        self._producing = False
        self._wrote = False
        self._abandoned = None
        self._socket = _sendfile_socket(request.transport)

    def start(self) -> None:
        self._renewDeadline()
        self.request.registerProducer(self, True)
        self.resumeProducing()

    def _renewDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.reset(self.stallTimeout)
        else:
            self._deadline = self.clock.callLater(self.stallTimeout, self._stalled)

    def _stalled(self) -> None:
        self._deadline = None
        if self.request is not None:
            log.info("client stopped reading {path}; dropping it", path=escape(self.request.path))
            self.request.transport.abortConnection()

    def _stop(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        self.file.close()
        self.request = None

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        if self._producing:
            return  # a write below paused and resumed us; the loop carries on
        self._producing = True
        try:
            self._produce()
        finally:
            self._producing = False

    def _produce(self) -> None:
        while self.request is not None and not self._paused:
            if not self.remaining:
                request = self.request
                self._stop()
                request.unregisterProducer()
                request.finish()
                self.metrics.downloads.inc()
                return
            sent = 0
            # Not before the first write: that is what sends the response's headers.
            if (
                self._wrote
                and self._socket is not None
                and not internals.unsent_bytes(self.request.transport)
            ):
                try:
                    sent = os.sendfile(
                        self._socket, self.file.fileno(), self.offset, self.remaining
                    )
                except BlockingIOError:
                    sent = 0
                except OSError:
                    # The peer went away; connectionLost will stop us.
                    return
            if sent:
                # Bytes sendfile moved never pass request.write, which is what counts
                # sentLength, the access log's figure.
                self.request.sentLength += sent
                self._moved(sent)
                continue
            # The socket is full (or sendfile is not for this transport): one ordinary
            # write, which the transport buffers and which pauses us until it drains.
            data = os.pread(self.file.fileno(), min(READ_SIZE, self.remaining), self.offset)
            if not data:  # the file shrank under us: end the response short
                self.request.transport.loseConnection()
                self._stop()
                return
            self._moved(len(data))
            self._wrote = True
            self.request.write(data)

    def _moved(self, n: int) -> None:
        self.offset += n
        self.remaining -= n
        self.metrics.download_bytes.inc(n)
        self._renewDeadline()

    def stopProducing(self) -> None:
        if self.request is not None:
            # The transport stops its producer before the request hears of the loss.
            self._abandoned = self.request
            self._stop()

    def connectionLost(self) -> None:
        """
        The client went away before the last byte: log the request, with the bytes
        that left for the client (twisted.web logs only finished requests).
        """
        request, self._abandoned = self.request or self._abandoned, None
        if request is None:
            return
        if self.request is not None:
            self._stop()
        transport = request.transport
        if internals.keeps_write_buffer(transport):
            # What is still in Twisted's buffer was counted when written, never sent.
            unsent = internals.unsent_bytes(transport)
            request.sentLength = max(0, request.sentLength - unsent)
        site = getattr(request, "site", None)
        if site is not None:
            site.log(request)


class StoreResource(Resource):
    """
    The upload space: GET/HEAD serve files, OPTIONS answers preflights.

    PUT never reaches a resource: L{hmacd.upload.UploadRequest} handles it
    before the body is read.
    """

    isLeaf = True
    allowedMethods = ALLOWED_METHODS

    def __init__(self, fs: FileServer) -> None:
        super().__init__()
        self.fs = fs
        # path -> ((inode, mtime, size), record), most recently served last.  A file is
        # never rewritten in place, so while its inode and mtime are the ones the record
        # was fetched for, the record stands (a name deleted and uploaded again is a new
        # inode, also when another process did it).
        self._records: OrderedDict[str, tuple[tuple[int, int, int], FileRecord]] = OrderedDict()
        # path -> (version, facts): a file's own facts, read (an extended attribute, JSON)
        # once per version of it.  Facts are rewritten only by a system call that moves the
        # ctime (a shared inode disowned when a path goes), which the version carries.
        self._facts: OrderedDict[str, tuple[object, FileRecord | None]] = OrderedDict()
        self._unrecorded = UnrecordedFiles(fs.metadata, fs.reactor)
        if not isinstance(fs.storage, LocalStorage):
            # An object store has a read path of its own, chosen once here: the local
            # directory's GET stays as it is.
            from hmacd.download_s3 import S3Reads

            self.render_GET = S3Reads(fs, self).render_GET  # type: ignore[method-assign]

    def render(self, request):
        body = super().render(request)
        if request.method == b"HEAD" and isinstance(body, bytes) and body:
            # Every answer a GET would get with a body (404 and whatever else a
            # render_* returns) is headers only for HEAD, with the GET's length:
            # handed a body, twisted.web drops it but logs a warning each time.
            request.setHeader(b"Content-Length", b"%d" % len(body))
            return b""
        return body

    def render_OPTIONS(self, request) -> bytes:
        request.setHeader(b"Content-Length", b"0")
        return b""

    def render_HEAD(self, request):
        return self.render_GET(request)

    def render_GET(self, request):
        try:
            relpath = relative_path(request.path, self.fs.prefix)
            if relpath is None:
                return self._notFound(request)
            st = self.fs.storage.open(relpath)
        except (PathRefused, OSError):
            return self._notFound(request)
        if st is None:
            return self._missing(request, relpath)
        f = st.local_file()
        assert f is not None  # the local directory's; an object store's reads come next
        facts = self._factsOf(relpath, st)
        if facts is not None and facts.size == st.size:
            # The file's own facts: no store on the way to the bytes, up or not.
            if is_expired(facts, self.fs.now()):
                f.close()
                return self._gone(request)
            self._serve(request, f, relpath, facts, st)
            # Whether the store knows it is asked off the response's path, now and then.
            self._unrecorded.check(relpath)
            return NOT_DONE_YET
        identity = st.version
        cached = self._records.get(relpath)
        if cached is not None and cached[0] == identity:
            # The same file as when its record was looked up: no store round trip.
            self._records.move_to_end(relpath)
            if is_expired(cached[1], self.fs.now()):
                f.close()
                return self._gone(request)
            self._serve(request, f, relpath, cached[1], st)
            return NOT_DONE_YET

        def lookupFailed(failure):
            # Bytes on disk are enough to serve a file: a metadata outage
            # must not turn into failed downloads.  (The outage itself is
            # logged once, by the store.)
            if not failure.check(StoreUnavailable):
                log.failure("metadata lookup for {path} failed", failure, path=escape(relpath))
            return _NO_ANSWER

        def found(record):
            if record is _NO_ANSWER:
                record = None  # the store could not say: no news of a missing record
            elif record is not None:
                self._records[relpath] = (identity, record)
                if len(self._records) > RECORD_CACHE_SIZE:
                    self._records.popitem(last=False)
                if is_expired(record, self.fs.now()):
                    f.close()
                    if not internals.request_disconnected(request):
                        request.write(self._gone(request))
                        request.finish()
                    return
            else:
                self._unrecorded.missing(relpath)
            self._serve(request, f, relpath, record, st)

        d = self.fs.metadata.get(relpath)
        d.addErrback(lookupFailed)
        d.addCallback(found)
        d.addErrback(lambda failure: (f.close(), request.processingFailed(failure)))
        return NOT_DONE_YET

    def _factsOf(self, relpath: str, st: Any) -> FileRecord | None:
        """The facts of the open file C{st}, read from it once per version."""
        cached = self._facts.get(relpath)
        if cached is not None and cached[0] == st.version:
            self._facts.move_to_end(relpath)
            return cached[1]
        facts = st.facts()
        self._facts[relpath] = (st.version, facts)
        if len(self._facts) > RECORD_CACHE_SIZE:
            self._facts.popitem(last=False)
        return facts

    def _gone(self, request) -> bytes:
        # As Prosody's mod_http_file_share: the file was here and is not any more, from
        # the moment of its expiry, whether or not the sweep has deleted it yet.
        request.setResponseCode(http.GONE)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        body = b"expired\n"
        request.setHeader(b"Content-Length", b"%d" % len(body))
        return body

    def _missing(self, request, relpath: str) -> int:
        """
        No file at C{relpath}: 410 or 451 if it was taken down (L{hmacd.takedown}), else
        404.  The store is asked only here, so a GET of a file costs nothing more; a store
        that cannot say gives the 404.
        """

        def answer(takedown: Takedown | None) -> None:
            if internals.request_disconnected(request):
                return
            if takedown is None:
                body = self._notFound(request)
            else:
                body = self._takenDown(request, takedown.status)
            request.setHeader(b"Content-Length", b"%d" % len(body))
            if request.method != b"HEAD":
                request.write(body)
            request.finish()

        d: Deferred[Takedown | None] = self.fs.metadata.takedown(relpath)
        d.addErrback(lambda _: None)
        d.addCallback(answer)
        d.addErrback(request.processingFailed)
        return NOT_DONE_YET

    def _takenDown(self, request, status: int) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        return gone_body(status)

    def _notFound(self, request) -> bytes:
        request.setResponseCode(http.NOT_FOUND)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return b"not found\n"

    def _serve(self, request, f, relpath: str, record: FileRecord | None, st) -> None:
        if internals.request_disconnected(request):
            f.close()  # the client left while the record was looked up
            return
        size = st.size
        modified = st.modified
        if record is not None and getattr(st, "shared", False):
            # Bytes shared with other paths (Deduplication): the inode's mtime is the first
            # upload's; this path's Last-Modified is its own upload's.
            modified = record.created
        headed = describe(request, relpath, record, size, modified, st.modified_ns)
        if headed is None:  # 304: the headers are the answer
            f.close()
            request.finish()
            return
        setDisposition(request, headed)
        span = chooseRange(request, headed, size)
        if isinstance(span, bytes):  # 416
            f.close()
            request.write(span)
            request.finish()
            return
        offset, length = span
        request.setHeader(b"Content-Length", b"%d" % length)

        if request.method == b"HEAD" or length == 0:
            f.close()
            request.finish()
            if request.method == b"GET":
                self.fs.metrics.downloads.inc()
            return
        if length <= READ_SIZE:
            # Small: one read and one write, no producer to set up and tear down.
            data = os.pread(f.fileno(), length, offset)
            f.close()
            if len(data) != length:  # the file shrank under us: end the response short
                request.transport.loseConnection()
                return
            self.fs.metrics.download_bytes.inc(length)
            request.write(data)
            request.finish()
            self.fs.metrics.downloads.inc()
            return
        stallTimeout = getattr(request.channel.site, "timeOut", None) or 60
        sender = _FileSender(
            request, f, offset, length, self.fs.reactor, stallTimeout, self.fs.metrics
        )
        request.notifyFinish().addErrback(lambda _: sender.connectionLost())
        sender.start()

    @staticmethod
    def _notModified(request, etag: bytes, mtime: int) -> bool:
        inm = request.getHeader(b"if-none-match")
        if inm is not None:
            # RFC 9110 13.1.3: If-Modified-Since is ignored when this is sent.
            return _etagMatches(inm.decode("latin-1"), etag)
        ims = request.getHeader(b"if-modified-since")
        if ims is not None:
            since = _httpDate(ims.decode("latin-1"))
            return since is not None and mtime <= since
        return False

    @staticmethod
    def _rangeApplies(request, etag: bytes, mtime: int) -> bool:
        """If-Range: the Range counts only if the client's copy is ours."""
        ifRange = request.getHeader(b"if-range")
        if ifRange is None:
            return True
        value = ifRange.decode("latin-1").strip()
        if value.startswith('"') or value.startswith("W/"):
            # Strong comparison: a weak tag never matches.
            return not etag.startswith(b"W/") and value.encode("latin-1") == etag
        since = _httpDate(value)
        return since is not None and int(since) == mtime


@dataclass(frozen=True)
class Headed:
    """What the validators and the type of a served file came to (L{describe})."""

    etag: bytes
    mtime: int
    content_type: str
    disposition: bytes | None


def describe(
    request: Any,
    relpath: str,
    record: FileRecord | None,
    size: int,
    modified: float,
    modified_ns: int,
) -> Headed | None:
    """
    Set the validators, the safe-serving headers and the Content-Type of a stored file's
    answer, for every backend alike; None when it is a 304 (its headers are set).
    """
    if record is not None and record.size == size:
        etag, content_type = record.etag, record.content_type
    else:
        etag = b'W/"%x-%x"' % (size, modified_ns)
        content_type = guess_type(relpath)
    mtime = int(modified)
    request.setHeader(b"ETag", etag)
    request.setHeader(b"Last-Modified", _httpDateOf(mtime))
    request.setHeader(b"Cache-Control", CACHE_CONTROL)
    request.setHeader(b"Accept-Ranges", b"bytes")
    request.setHeader(b"Content-Security-Policy", CONTENT_SECURITY_POLICY)
    if StoreResource._notModified(request, etag, mtime):
        request.setResponseCode(http.NOT_MODIFIED)
        return None
    try:
        content_type = parse_media_type(content_type)
    except BadMediaType:
        # A record from before types were parsed on upload: never served as it stands.
        content_type = OCTET_STREAM
    request.setHeader(b"Content-Type", content_type.encode("ascii"))
    disposition = attachment_disposition(content_type, relpath.rsplit("/", 1)[-1])
    return Headed(etag, mtime, content_type, disposition)


def setDisposition(request: Any, headed: Headed) -> None:
    """The Content-Disposition of the answer, where the type is not served inline."""
    if headed.disposition is not None:
        request.setHeader(b"Content-Disposition", headed.disposition)


def chooseRange(request: Any, headed: Headed, size: int) -> tuple[int, int] | bytes:
    """
    (offset, length) of the bytes to send, with the status and Content-Range of a 206 and
    the Content-Length set; or, for a 416, the body to send (its headers are set).
    """
    offset, length = 0, size
    rangeHeader = request.getHeader(b"range")
    if (
        rangeHeader
        and request.method == b"GET"
        and StoreResource._rangeApplies(request, headed.etag, headed.mtime)
    ):
        try:
            span = parse_range(rangeHeader.decode("latin-1"), size)
        except Unsatisfiable:
            request.setResponseCode(http.REQUESTED_RANGE_NOT_SATISFIABLE)
            request.setHeader(b"Content-Range", b"bytes */%d" % size)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            request.responseHeaders.removeHeader(b"Content-Disposition")
            body = b"range not satisfiable\n"
            request.setHeader(b"Content-Length", b"%d" % len(body))
            return body
        if span is not None:
            offset, length = span[0], span[1] - span[0] + 1
            request.setResponseCode(http.PARTIAL_CONTENT)
            request.setHeader(b"Content-Range", b"bytes %d-%d/%d" % (span[0], span[1], size))
    request.setHeader(b"Content-Length", b"%d" % length)
    return offset, length
