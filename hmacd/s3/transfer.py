"""
Bodies on the move: L{BodyWriter} (a PUT's body, with back-pressure), the GET answer
L{S3Object} and its pump into a consumer, and the deadline that counts only while we wait
on the store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from hmacd.s3.protocol import (
    S3Error,
    S3Unavailable,
)

_DONE = Failure(ResponseDone())


class _Deadline:
    """
    A timer that runs only while we wait on the store.  arm() starts it if
    it is not running; reset() restarts it (progress); disarm() stops it.
    """

    def __init__(self, clock: IReactorTime, seconds: float, expire: Callable[[], None]) -> None:
        self.clock = clock
        self.seconds = seconds
        self.expire = expire
        self._call: IDelayedCall | None = None
        self.expired = False

    def arm(self) -> None:
        if self._call is None and not self.expired:
            self._call = self.clock.callLater(self.seconds, self._fire)

    def reset(self) -> None:
        self.disarm()
        self.arm()

    def disarm(self) -> None:
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _fire(self) -> None:
        self._call = None
        self.expired = True
        self.expire()


@implementer(IBodyProducer, IPushProducer)
class BodyWriter:
    """
    A push producer for a body whose bytes arrive from elsewhere (an HTTP
    upload being received): pass it to L{S3Client.put_object} or
    L{S3Client.upload_part}, then call L{write} for each chunk and L{finish}
    after the last, or L{abort} to give up (the store then gets a short body
    on a dropped connection and stores nothing).

    L{write} returns True when the caller may go on writing, or a Deferred
    that fires when it may (the store's connection is full, or not yet open):
    pause the source until then.  At most the one chunk handed over is held
    beyond the transport's own buffer.
    """

    def __init__(self, length: int) -> None:
        if length < 0:
            raise ValueError("a body needs a known length")
        self.length = length
        self.written = 0
        self._consumer: IConsumer | None = None
        self._pending: list[bytes] = []
        self._paused = False
        self._finished = False
        self._stopped: Failure | None = None
        # Why the caller gave up the body, to fail the request with that.
        self.aborted: Failure | None = None
        self._done: Deferred[None] | None = None
        self._waiters: list[Deferred[None]] = []
        # Set by the client: the deadline that counts while we wait on the store.
        self._deadline: _Deadline | None = None

    # The caller's side.

    def write(self, data: bytes) -> Deferred[None] | bool:
        """Hand over one chunk; True to go on, or a Deferred to wait for."""
        if self._stopped is not None:
            # The request is over: the caller learns it here and stops.
            return fail(self._stopped)
        if self._finished:
            raise RuntimeError("write() after finish() or abort()")
        if self.written + len(data) > self.length:
            raise ValueError(f"body longer than its declared length {self.length}")
        self.written += len(data)
        if self._consumer is None or self._paused:
            self._pending.append(data)
            self._waiting_on_store()
            return self._wait()
        self._consumer.write(data)
        if self._paused:
            # Writing filled the transport: it paused us from inside write().
            return self._wait()
        self._waiting_on_source()
        return True

    def finish(self) -> None:
        """The last byte was written."""
        if self._finished:
            return
        if self.written != self.length:
            raise ValueError(f"body ended at {self.written} of {self.length} bytes")
        self._finished = True
        self._flush()

    def abort(self, reason: BaseException | None = None) -> None:
        """Give up the body: the request fails and the store keeps nothing."""
        if self._finished and self._done is None:
            return
        self._finished = True
        failure = Failure(reason if reason is not None else CancelledError("body aborted"))
        self.aborted = failure
        self._pending.clear()
        if self._done is not None and not self._done.called:
            done, self._done = self._done, None
            done.errback(failure)
        elif self._done is None:
            self._stopped = failure
        self._wake(failure)

    # The transport's side (IBodyProducer / IPushProducer).

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        self._done = Deferred()
        done = self._done
        if self._stopped is not None:
            self._done = None
            return fail(self._stopped)
        self._flush()
        return done

    def pauseProducing(self) -> None:
        self._paused = True
        self._waiting_on_store()

    def resumeProducing(self) -> None:
        self._paused = False
        if self._deadline is not None:
            self._deadline.disarm()
        self._flush()

    def stopProducing(self) -> None:
        # The request is gone (connection lost, or an early answer).
        self._finished = True
        failure = Failure(S3Unavailable("the store's connection closed while sending a body"))
        self._stopped = failure
        self._pending.clear()
        self._done = None
        self._wake(failure)

    def _answered(self) -> None:
        """
        The store answered before the whole body went (an early refusal):
        Twisted then closes the connection without telling the producer, so
        a caller waiting to write is told here, and the answer itself is the
        request's result.
        """
        if self._finished and not self._pending:
            return
        self._finished = True
        failure = Failure(S3Error("the store answered before the whole body was sent"))
        self._stopped = failure
        self._pending.clear()
        self._done = None
        self._wake(failure)

    # Inside.

    def _flush(self) -> None:
        if self._consumer is None:
            return
        while self._pending and not self._paused:
            self._consumer.write(self._pending.pop(0))
        if self._paused:
            self._waiting_on_store()
            return
        if self._finished and not self._pending and self._done is not None:
            done, self._done = self._done, None
            # Now we wait for the answer.
            self._waiting_on_store()
            done.callback(None)
            return
        self._waiting_on_source()
        self._wake(None)

    def _waiting_on_store(self) -> None:
        if self._deadline is not None:
            self._deadline.arm()

    def _waiting_on_source(self) -> None:
        if self._deadline is not None and not self._finished:
            self._deadline.disarm()

    def _wait(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiters.append(d)
        return d

    def _wake(self, failure: Failure | None) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if failure is None:
                d.callback(None)
            else:
                d.errback(failure)


@implementer(IBodyProducer)
class _BytesProducer:
    """A small body we hold anyway (XML, or bytes the caller passed)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Collector(Protocol):
    """Reads a whole (small, capped) response body."""

    def __init__(self, done: Deferred[bytes], limit: int, deadline: _Deadline) -> None:
        self.done = done
        self.limit = limit
        self.deadline = deadline
        self.parts: list[bytes] = []
        self.size = 0

    def connectionMade(self) -> None:
        self.deadline.expire = self.transport.stopProducing  # type: ignore[union-attr]
        self.deadline.reset()

    def dataReceived(self, data: bytes) -> None:
        self.deadline.reset()
        self.size += len(data)
        if self.size > self.limit:
            self.transport.stopProducing()  # type: ignore[union-attr]
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.deadline.disarm()
        if self.done.called:
            return
        if self.size > self.limit:
            self.done.errback(S3Error(f"the store's answer is over {self.limit} bytes"))
        elif reason.check(ResponseDone, http.PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(_unavailable(reason, self.deadline))


def _unavailable(reason: Failure, deadline: _Deadline | None, what: str = "") -> S3Unavailable:
    """A transport failure as one line for people."""
    if deadline is not None and deadline.expired:
        return S3Unavailable(f"the store did not answer within {deadline.seconds:g}s{what}")
    exc = reason.value
    inner = getattr(exc, "reasons", None)
    if inner:
        exc = inner[0].value
    if isinstance(exc, ierror.ConnectionRefusedError):
        text = "connection refused"
    elif isinstance(exc, (ierror.TimeoutError, ierror.TCPTimedOutError)):
        text = "connection timed out"
    elif isinstance(exc, ierror.DNSLookupError):
        text = "host name not found"
    elif isinstance(exc, (ierror.ConnectionDone, ierror.ConnectionLost)):
        text = "connection lost"
    else:
        text = " ".join(str(exc).split()) or type(exc).__name__
    return S3Unavailable(f"the store is unavailable: {text}{what}")


@dataclass(frozen=True)
class S3Object:
    """
    The answer to a GET, once its headers are in: look at the facts, then
    L{deliver} the body to a consumer or L{discard} it (one or the other,
    or the connection is held).
    """

    key: str
    status: int
    length: int
    content_type: str | None
    etag: str | None
    last_modified: str | None
    content_range: str | None
    metadata: dict[str, str]
    headers: Headers = field(repr=False)
    _response: IResponse = field(repr=False)
    _deadline: _Deadline = field(repr=False)

    def deliver(self, consumer: IConsumer) -> Deferred[int]:
        """
        Stream the body into consumer (registered as a push producer, so the
        consumer's pause pauses the store's connection).  Fires with the
        number of bytes, or fails with L{S3Unavailable} when the store
        stopped short or went silent.
        """
        done: Deferred[int] = Deferred()
        self._response.deliverBody(_Pump(consumer, done, self.length, self._deadline))
        return done

    def discard(self) -> None:
        """Drop the body unread (and its connection)."""
        self._deadline.disarm()
        self._response.deliverBody(_Discard())


class _Discard(Protocol):
    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


@implementer(IPushProducer)
class _Pump(Protocol):
    """Moves a response body into a consumer, passing its back-pressure on."""

    def __init__(
        self, consumer: IConsumer, done: Deferred[int], length: int, deadline: _Deadline
    ) -> None:
        self.consumer = consumer
        self.done = done
        self.length = length
        self.deadline = deadline
        self.received = 0
        self.paused = False

    def connectionMade(self) -> None:
        self.deadline.expire = self.transport.stopProducing  # type: ignore[union-attr]
        self.consumer.registerProducer(self, True)
        self.deadline.reset()

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.consumer.write(data)
        if not self.paused:
            self.deadline.reset()

    def connectionLost(self, reason: Failure = _DONE) -> None:
        self.deadline.disarm()
        self.consumer.unregisterProducer()
        if reason.check(ResponseDone) and self.length in (self.received, -1):
            self.done.callback(self.received)
        elif reason.check(ResponseDone, http.PotentialDataLoss):
            self.done.errback(
                S3Unavailable(f"the store sent {self.received} of {self.length} bytes")
            )
        else:
            self.done.errback(_unavailable(reason, self.deadline, f" after {self.received} bytes"))

    # IPushProducer, for the consumer.

    def pauseProducing(self) -> None:
        self.paused = True
        self.deadline.disarm()
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        self.paused = False
        self.deadline.reset()
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        # The consumer went away (the downloader hung up).
        self.deadline.disarm()
        self.transport.stopProducing()  # type: ignore[union-attr]
