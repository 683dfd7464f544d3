"""
The streaming PUT: the Twisted hooks of a request, and its answers.

twisted.web buffers a request body and only then looks for a resource.  An
upload server cannot work that way: the verdict (bad MAC, too large, file
exists) must be given before the first body byte is read, and an accepted
body must go to disk as it arrives.  L{UploadRequest} does both by taking
over the two hooks L{twisted.web.http.HTTPChannel} calls for every request:

 - C{gotLength}, called once all headers are parsed and before any body byte
   (and before C{100 Continue} is sent), asks L{hmacd.verdict.judge} for the
   verdict, checks what needs the server's state, and opens a
   L{hmacd.sink.Sink};
 - C{handleContentChunk} gives each piece of the body to that sink.

When the last byte has arrived, C{requestReceived} has the sink committed
(L{hmacd.sink.GroupCommit}), writes the record, and answers 201 (or 308 for a
resumable piece).  A broken connection aborts the sink.
"""

from __future__ import annotations

from collections.abc import Sequence
from io import BytesIO
from typing import Any, Protocol, cast

from twisted.internet.abstract import FileDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server

from hmacd import internals
from hmacd.admission import admit, admit_across_nodes, asks_the_store
from hmacd.core import FileServer
from hmacd.guard import counted_client, watch_body_rate
from hmacd.landing import STORAGE_FULL, Answer, land
from hmacd.logs import censor, escape
from hmacd.pacing import Pacer
from hmacd.quota import QuotaRefusal
from hmacd.sink import (
    Sink,
)
from hmacd.throttle import Bandwidth, client_address
from hmacd.verdict import (
    INSUFFICIENT_STORAGE,
    RESUME_INCOMPLETE,
    TOO_MANY_REQUESTS,
    Plan,
    Refusal,
    judge,
)
from hmacd.web import ALLOWED_METHODS, POLICY_HEADERS  # HTTP policy lives in hmacd.web

__all__ = [
    "ALLOWED_METHODS",
    "DRAIN_LIMIT",
    "INSUFFICIENT_STORAGE",
    "POLICY_HEADERS",
    "READ_SIZE",
    "RESUME_INCOMPLETE",
    "UploadRequest",
]


# Bodies of requests that are not uploads are never needed: a GET with a
# body larger than this is refused rather than spooled to a temp file.
MAX_OTHER_BODY = 64 * 1024

# A refused upload whose client did not ask for 100-continue is already
# sending its body.  Up to this size we read and drop it, so that closing the
# connection does not turn into a TCP reset that hides our answer.
DRAIN_LIMIT = 1 << 20

# What a large upload's connection reads at a time (Twisted's default is 64 KiB).
READ_SIZE = 1024 * 1024

# While a PUT waits for its claim across nodes its connection is paused: what arrives is
# one read or two.  A client that gets more in (it would take a bug) is cut off.
MAX_WAIT_BUFFER = 4 * READ_SIZE


# upload_errors_total{reason} for each refusal status of a PUT.
_REASONS = {
    400: "bad_request",
    401: "auth",
    403: "auth",
    404: "not_found",
    409: "conflict",
    410: "taken_down",
    451: "taken_down",
    411: "length_required",
    413: "too_large",
    416: "range",
    500: "internal",
    TOO_MANY_REQUESTS: "rate_limited",
    503: "store",
    INSUFFICIENT_STORAGE: "disk",
}

Headers = Sequence[tuple[bytes, bytes]]


class _Connection(Protocol):
    """What an upload does to its connection: a TCP (or TLS) transport does all of it."""

    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def abortConnection(self) -> None: ...
    def write(self, data: bytes) -> None: ...


# The request headers the verdict reads (hmacd.verdict.judge).
_JUDGED = (b"content-type", b"content-range", b"x-upload-length", b"authorization")

log = Logger()


def _forwardedFor(request: http.Request) -> list[bytes] | None:
    # Headers keeps its values in a list; its stubs promise a Sequence only.
    return cast("list[bytes] | None", request.requestHeaders.getRawHeaders(b"x-forwarded-for"))


def _header(request: http.Request, name: bytes) -> str | None:
    value = request.requestHeaders.getRawHeaders(name)
    return value[0].decode("latin-1") if value else None


class _Wait:
    """A PUT waiting for its claim in the shared store, and what arrived meanwhile."""

    def __init__(self, expect: str | None) -> None:
        self.expect = expect  # the request's Expect header, withheld from the channel
        self.judging = False  # still in gotLength
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.done: tuple[bytes, bytes, bytes] | None = None  # requestReceived's arguments


class UploadRequest(server.Request):
    """
    A request that judges and streams PUT bodies itself; every other method
    goes through the resource tree as usual.
    """

    _upload: Sink | None = None  # the accepted body being received; see _letGo
    _refused = False
    _gone = False  # the connection is lost
    _pacer: Pacer | None = None  # the pauses of an accepted upload's reading
    _acceptedAt = 0.0
    _savedReadSize: int | None = None  # the transport's read size before this upload's
    _finishOnBody = False
    _drainBudget: int | None = None  # bytes of a refused body still read and dropped
    _wait: _Wait | None = None  # waiting for the claim in the shared store

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, **kwargs)
        # The Site this request came in through, and its file server: `self.site` is set by
        # process(), which uploads never reach.
        self._host = channel.site
        self._fs: FileServer = self._host.fileServer
        for name, value in POLICY_HEADERS:
            self.responseHeaders.setRawHeaders(name, [value])

    def __repr__(self) -> str:
        # The default repr shows the URI, and with it the MAC.
        return f"<{type(self).__name__} {self.method!r} {censor(self.uri)}>"

    # HTTPChannel hooks ---------------------------------------------------

    def gotLength(self, length: int | None) -> None:
        # The request line is parsed but not yet stored on the request.
        self.method, self.uri, self.clientproto = internals.request_line(self.channel)
        self.path = self.uri.split(b"?", 1)[0]
        if self._rateLimited(length) or self._overClientCap(length):
            return
        if self.method == b"PUT":
            self.content = BytesIO()  # never used; Twisted closes it
            try:
                self._judgeUpload(length)
            except Exception:
                # A bug must cost one request, not the channel's parser state.
                log.failure("judging {request!r} failed", request=self)
                if not self._refused:
                    self._refuse(http.INTERNAL_SERVER_ERROR, "internal error", length)
        elif self.method not in ALLOWED_METHODS:
            self._refuse(
                http.NOT_ALLOWED,
                "method not allowed",
                length,
                [(b"Allow", b", ".join(ALLOWED_METHODS))],
            )
        elif length is None or length > MAX_OTHER_BODY:
            self._refuse(http.REQUEST_ENTITY_TOO_LARGE, "request body not allowed", length)
        else:
            super().gotLength(length)

    def _rateLimited(self, length: int | None) -> bool:
        fs = self._fs
        peer = getattr(self.getClientAddress(), "host", None)
        if fs.limiter is None or peer is None:
            return False
        address = client_address(peer, _forwardedFor(self), fs.trusted_proxies)
        wait = fs.limiter.check(address)
        if not wait:
            return False
        fs.metrics.rate_limited.inc()
        self._refuse(
            TOO_MANY_REQUESTS,
            "too many requests",
            length,
            [(b"Retry-After", fs.limiter.retry_after(wait))],
        )
        return True

    def _overClientCap(self, length: int | None) -> bool:
        """
        Through a trusted proxy, count this request against the client it forwards for
        (MaxConnectionsPerClient; other peers were counted at accept), or refuse it.
        """
        fs = self._fs
        peer = getattr(self.getClientAddress(), "host", None)
        if not fs.max_connections_per_client or peer is None:
            return False
        client = counted_client(peer, _forwardedFor(self), fs.trusted_proxies)
        if client is None:
            return False
        if fs.clients.acquire(client, fs.max_connections_per_client):
            self.notifyFinish().addBoth(lambda _: fs.clients.release(client))
            return False
        fs.metrics.connections_refused.labels("per_client").inc()
        if self.method == b"PUT":
            self._failed("per_client")
        # Closed after the answer whatever the body: what the proxy sends next on this
        # connection may be for the same client.
        self.channel.persistent = False
        self._refuse(
            TOO_MANY_REQUESTS,
            "too many connections from this client",
            length,
            [(b"Connection", b"close")],
            error=False,
        )
        return True

    def handleContentChunk(self, data: bytes) -> None:
        wait = self._wait
        if wait is not None:
            # What came with the headers, before the claim was ours.  The channel resumes
            # its transport when a response to an earlier request has drained: pause again.
            wait.chunks.append(data)
            wait.buffered += len(data)
            connection = self._connection()
            if wait.buffered > MAX_WAIT_BUFFER:
                connection.abortConnection()
            else:
                connection.pauseProducing()
            return
        upload = self._upload
        if upload is None:
            if not self._refused:
                super().handleContentChunk(data)
            elif self._drainBudget is not None:
                self._drainBudget -= len(data)
                if self._drainBudget < 0:
                    self._drainBudget = None
                    self._cutOffDuringBody()
            return
        if upload.received + len(data) > upload.size:
            # Only possible with chunked transfer: more than was signed.
            log.info(
                "upload of {path} exceeds its signed size; aborting", path=escape(upload.relpath)
            )
            self._refused = True  # the rest of the body, if any, is dropped
            upload.abort()
            self._letGo()
            self._failed("too_large")
            self._logUnanswered(http.REQUEST_ENTITY_TOO_LARGE)
            self._connection().abortConnection()
            return
        try:
            behind = upload.write(data)
        except OSError as e:
            upload.abort()
            self._letGo()
            self._refuse(*self._storageError(e), None, duringBody=True)
            return
        pacer = self._pacer
        assert pacer is not None  # set with _upload
        if behind:
            # The disk is behind the client: stop reading until the backlog is written.
            pacer.pause("disk")
        pacer.took(len(data))

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._wait is not None:
            self._wait.done = (command, path, version)  # the whole body came with the headers
            return
        pacer = self._pacer
        if pacer is not None:
            pacer.stopFloor()
        if self._refused:
            if self._finishOnBody:
                self._finishRefusal()
            return
        upload = self._upload
        if upload is None:
            super().requestReceived(command, path, version)
            return
        assert pacer is not None  # set with _upload
        pacer.endThrottle()
        self.site = self._host
        self.setHeader(b"Server", server.version)
        self.setHeader(b"Date", http.datetimeToString())
        if upload.received != upload.size:
            upload.abort()
            self._letGo()
            self._failed("bad_request")
            self._respond(
                http.BAD_REQUEST,
                f"body has {upload.received} bytes, the slot is for {upload.size}",
            )
            return
        pacer.diskCaughtUp()  # the body is complete: nothing more to hold back
        upload.onRelief = None
        upload.committing = True

        land(self._fs, upload, self._acceptedAt).addCallback(self._landed)

    def connectionLost(self, reason: Failure) -> None:
        self._gone = True
        if self._pacer is not None:
            self._pacer.lost()
        upload = self._upload
        if upload is not None and not upload.committing:
            upload.abort()
            self._letGo()
            self._failed("aborted")
            log.info(
                "upload of {path} broken off after {received} of {size} bytes",
                path=escape(upload.relpath),
                received=upload.received,
                size=upload.size,
            )
        super().connectionLost(reason)

    # The verdict and the sink --------------------------------------------

    def _judgeUpload(self, length: int | None) -> None:
        fs = self._fs
        headers = {}
        for name in _JUDGED:
            values = self.requestHeaders.getRawHeaders(name)
            if values:
                headers[name.decode("ascii")] = [v.decode("latin-1") for v in values]
        query = self.uri.split(b"?", 1)[1] if b"?" in self.uri else b""
        verdict = judge(self.path, query, length, headers, fs, fs.now())
        if isinstance(verdict, Refusal):
            return self._refuse(verdict.status, verdict.reason, length, verdict.headers)
        if verdict.previous:
            fs.previous_secret_uses.used(verdict.previous)
        if asks_the_store(fs):
            return self._admitAcrossNodes(verdict, length)
        try:
            admitted: Sink | Refusal | Failure = admit(fs, verdict, length)
        except OSError:
            admitted = Failure()
        self._admitted(admitted, verdict.size, length)
        return None

    def _admitted(
        self,
        admitted: Sink | Refusal | Failure,
        size: int,
        length: int | None,
        waited: _Wait | None = None,
    ) -> None:
        """Receive the body into the sink admitted, or refuse as it says."""
        if isinstance(admitted, Failure):
            error = admitted.value
            if not isinstance(error, OSError):
                log.failure("admitting {request!r} failed", admitted, request=self)
                return self._refuse(
                    http.INTERNAL_SERVER_ERROR, "internal error", length, waited=waited
                )
            return self._refuse(*self._storageError(error), length, waited=waited)
        if isinstance(admitted, Refusal):
            return self._refuse(
                admitted.status,
                admitted.reason,
                length,
                admitted.headers,
                admitted.error,
                waited=waited,
                # A quota's 413 is no "too_large": the file would fit, its owner is full.
                metric="quota" if isinstance(admitted, QuotaRefusal) else None,
            )
        self._accept(admitted, size)
        return None

    def _admitAcrossNodes(self, plan: Plan, length: int | None) -> None:
        """
        Admit once the claim in the shared store is ours: until then nothing of the body is
        read (what came with the headers waits in memory: one read at most), and a client
        that expects 100 Continue gets it only then.
        """
        self._wait = wait = _Wait(_header(self, b"expect"))
        self.requestHeaders.removeHeader(b"expect")  # else the channel says 100 Continue now
        connection = self._connection()
        connection.pauseProducing()
        wait.judging = True
        d = admit_across_nodes(self._fs, plan, length)
        d.addBoth(self._claimAnswered, plan.size, length, wait)
        wait.judging = False

    def _claimAnswered(
        self, admitted: Sink | Refusal | Failure, size: int, length: int | None, wait: _Wait
    ) -> None:
        try:
            self._claimAnsweredNow(admitted, size, length, wait)
        except Exception:
            # A bug must cost one request, never a paused connection or a claim held on.
            log.failure("admitting {request!r} failed", request=self)
            if self._upload is not None:
                self._upload.abort()
                self._letGo()
            elif isinstance(admitted, Sink):
                admitted.abort()
            if not self._gone and not self._refused and not self.finished:
                self._refuse(http.INTERNAL_SERVER_ERROR, "internal error", length, waited=wait)

    def _claimAnsweredNow(
        self, admitted: Sink | Refusal | Failure, size: int, length: int | None, wait: _Wait
    ) -> None:
        self._wait = None
        if self._gone:
            if isinstance(admitted, Sink):
                admitted.abort()
                self._failed("aborted")
            return None
        connection = self._connection()
        if wait.judging:
            # Answered at once (a store in this process): as if there had been no wait.
            if wait.expect is not None:
                self.requestHeaders.setRawHeaders(b"expect", [wait.expect])
            connection.resumeProducing()
            return self._admitted(admitted, size, length)
        if not isinstance(admitted, Sink):
            return self._admitted(admitted, size, length, wait)
        self._accept(admitted, size)
        if wait.expect is not None and not wait.chunks and wait.done is None:
            if wait.expect.lower() == "100-continue" and self.clientproto == b"HTTP/1.1":
                connection.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        connection.resumeProducing()
        for data in wait.chunks:
            if self._upload is None:
                break  # refused on the way (more than was signed, a write error)
            self.handleContentChunk(data)
        if wait.done is not None and not self._refused:
            self.requestReceived(*wait.done)
        return None

    def _accept(self, sink: Sink, size: int) -> None:
        """Receive the body into C{sink}: it counts among the uploads in progress."""
        fs = self._fs
        self._upload = sink
        fs.uploads.add(self)
        self._acceptedAt = fs.reactor.seconds()
        bandwidth = (
            Bandwidth(fs.max_bytes_per_second, fs.reactor) if fs.max_bytes_per_second else None
        )
        self._pacer = pacer = Pacer(self, fs, bandwidth)
        sink.onRelief = pacer.diskCaughtUp
        pacer.floor = watch_body_rate(fs, lambda: sink.received, self._tooSlow)
        if size > READ_SIZE:
            # Fewer, larger reads: a sixteenth of the calls through the HTTP parser.  A
            # bandwidth limit reads at most a sixteenth of a second's worth, or the
            # last read, which nothing pauses after, would carry it past its rate.
            limits = [b.rate for b in (bandwidth, fs.total_bandwidth) if b is not None]
            read = min([READ_SIZE] + [int(rate) // 16 for rate in limits])
            self._savedReadSize = internals.set_read_size(
                self.channel.transport, max(read, FileDescriptor.bufferSize)
            )

    def _letGo(self) -> None:
        """
        Done with the body, however it ended: its path is free (a no-op after commit or
        abort), it no longer counts as in progress, and the connection reads as before.
        """
        sink, self._upload = self._upload, None
        if sink is None:
            return
        sink.release()
        self._fs.uploads.remove(self)
        if self._savedReadSize is not None:
            # A kept-alive connection's next request reads as any other would.
            channel = getattr(self, "channel", None)  # gone once the request has finished
            if channel is not None and not self._gone:
                internals.set_read_size(channel.transport, self._savedReadSize)
            self._savedReadSize = None

    def liveChannel(self) -> Any | None:
        """The channel, or None once this request has finished or its connection is lost."""
        channel = getattr(self, "channel", None)  # gone once the request has finished
        return None if channel is None or self._gone else channel

    def _connection(self) -> _Connection:
        return cast(_Connection, self.channel.transport)

    def abortUpload(self) -> None:
        """Drop the connection of an upload in progress (shutdown); the temp file goes."""
        if self.channel is not None:
            self._connection().abortConnection()

    def _tooSlow(self, received: int, seconds: float) -> None:
        """Below MinUploadBytesPerSecond: cut; connectionLost removes the temp file."""
        if self._pacer is not None:
            self._pacer.floor = None
        upload = self._upload
        if upload is None or upload.committing or self._gone:
            return
        fs = self._fs
        fs.metrics.connections_cut.labels("slow_upload").inc()
        log.info(
            "upload of {path} too slow ({received} bytes in {seconds:.0f} s, the floor is"
            " {floor} B/s); cut",
            path=upload.relpath,
            received=received,
            seconds=seconds,
            floor=fs.min_upload_bytes_per_second,
        )
        self._connection().abortConnection()

    # Answers -------------------------------------------------------------

    def _writeAnswer(self, code: int, message: str, headers: Headers = ()) -> None:
        body = message.encode("utf-8") + b"\n"
        self.setResponseCode(code, b"Resume Incomplete" if code == RESUME_INCOMPLETE else None)
        for name, value in headers:
            self.setHeader(name, value)
        self.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        self.setHeader(b"Content-Length", b"%d" % len(body))
        self.write(body)

    def _respond(self, code: int, message: str, headers: Headers = ()) -> None:
        """Answer a request whose body has been read in full."""
        if self._gone:
            # Nobody to tell, but the outcome still belongs in the access log.
            self._logUnanswered(code)
            return
        self._writeAnswer(code, message, headers)
        self.finish()

    def _refuse(
        self,
        code: int,
        message: str,
        length: int | None,
        headers: Headers = (),
        error: bool = True,
        duringBody: bool = False,
        waited: _Wait | None = None,
        metric: str | None = None,
    ) -> None:
        """
        Answer now, before the body, and make sure the body is never stored.

        The connection is closed afterwards: its remaining bytes are a body
        nobody wants.  Small bodies are drained first (see L{DRAIN_LIMIT});
        others, and clients waiting for 100 Continue, are cut off at once.

        @param waited: the answer comes after a wait for the shared store (the
            connection is paused, what arrived meanwhile is in it).
        @param metric: the C{reason} it counts as in upload_errors_total, when not the
            one of its status.
        """
        self._refused = True
        if self.method == b"PUT" and error:
            self._failed(metric or _REASONS.get(code, "other"))
        expect = _header(self, b"expect") if waited is None else waited.expect
        self.requestHeaders.removeHeader(b"expect")
        if length != 0:
            # The connection closes after the answer: what is left of it is a
            # body nobody wants.  Say so, or a client's pool reuses it.
            self.channel.persistent = False
            headers = [*headers, (b"Connection", b"close")]
        self.setHeader(b"Server", server.version)
        self.setHeader(b"Date", http.datetimeToString())
        self._writeAnswer(code, message, headers)
        log.debug(
            "refused {method} {path}: {code} {message}",
            method=escape(self.method),
            path=escape(self.path),
            code=code,
            message=message,
        )
        if duringBody:
            self._cutOffDuringBody()
        elif waited is not None and waited.done is not None:
            self.finish()  # the whole request is in: nothing left to drain
        elif length == 0 or (expect is None and (length is None or length <= DRAIN_LIMIT)):
            # HTTPChannel calls requestReceived once the body is in
            # (immediately, for an empty one); finishing before that would
            # leave the channel without a request to deliver it to.  A
            # chunked body that turns out larger than the limit is cut off.
            self._finishOnBody = True
            self._drainBudget = DRAIN_LIMIT
            if waited is not None:
                self._drainBudget -= sum(len(data) for data in waited.chunks)
                self._connection().resumeProducing()
        else:
            # In gotLength: the channel checks `transport.disconnecting`
            # after the header block and reads no further.
            self.finish()

    def _failed(self, reason: str) -> None:
        self._fs.metrics.upload_errors.labels(reason).inc()

    def _logUnanswered(self, code: int) -> None:
        """Write the access-log line of a request that gets no response."""
        self.setResponseCode(code)
        self._host.log(self)

    def _storageError(self, error: OSError) -> tuple[int, str]:
        log.error("cannot store {path}: {error}", path=escape(self.path), error=error)
        if error.errno in STORAGE_FULL:
            return INSUFFICIENT_STORAGE, "insufficient storage"
        return http.INTERNAL_SERVER_ERROR, "cannot store the file"

    def _cutOffDuringBody(self) -> None:
        # The channel's transfer decoder is still working through the
        # current input and would hand the end of the body to a channel that
        # no longer has this request: stop reading, finish after.
        self._finishOnBody = True
        self._connection().pauseProducing()
        self._fs.reactor.callLater(0, self._finishRefusal)

    def _finishRefusal(self) -> None:
        if not self.finished and not self._gone:
            self.finish()

    def _landed(self, answer: Answer) -> None:
        """The upload has ended as C{answer} says: let go of it and say so."""
        self._letGo()
        if answer.failed is not None:
            self._failed(answer.failed)
        self._respond(answer.status, answer.message, answer.headers)
