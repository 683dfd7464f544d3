"""
An S3 client that talks from the reactor: Twisted's L{Agent} on a pool of
persistent connections carries the bytes, botocore only signs the requests
(SigV4 headers, and query-string SigV4 for presigned URLs).

Bodies stream both ways and are never held whole: a PUT's body comes from an
L{IBodyProducer} (L{BodyWriter} for bytes that arrive from an HTTP request
being received, with back-pressure), a GET's body goes to an L{IConsumer}
(a twisted.web request, say) through L{S3Object.deliver}, which pauses the
store's connection while the consumer is full.

Streamed payloads are signed as C{UNSIGNED-PAYLOAD}, which S3 accepts for
SigV4 header auth (the caller hashes every byte itself and can pass the
SHA-256 when it knows it beforehand); small XML bodies we build are signed
with their real hash.

Every call has a deadline on the injected clock.  It counts only while we
wait on the store (connecting, sending while the connection is full,
waiting for the answer, waiting for body bytes), never while a body waits on
its own source or a GET waits on its consumer, so a slow client does not
make the store look dead, and a dead store is always L{S3Unavailable} within
the deadline.

Errors: L{S3Unavailable} (cannot connect, timed out, connection lost, 5xx),
L{S3Refused} (403 and credential errors; the message names the access key,
never the secret), L{NoSuchKey}, L{NoSuchUpload}, L{PreconditionFailed}
(412, an C{If-None-Match: *} write that found an object), L{InvalidRange},
and L{S3Error} for the rest.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote_plus, urlsplit

from botocore.auth import UNSIGNED_PAYLOAD, S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

__all__ = [
    "BodyWriter",
    "InvalidRange",
    "ListedObject",
    "ListedPart",
    "ListedUpload",
    "NoSuchKey",
    "NoSuchUpload",
    "ObjectList",
    "PreconditionFailed",
    "S3Client",
    "S3Error",
    "S3Object",
    "S3Refused",
    "S3Unavailable",
]

_DONE = Failure(ResponseDone())

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

# S3's own limits: a key is at most 1024 bytes of UTF-8; DeleteObjects takes
# at most 1000 keys; a multipart upload has parts 1..10000.
MAX_KEY_BYTES = 1024
MAX_DELETE_BATCH = 1000
MAX_PART_NUMBER = 10000

# Error bodies and listings are read whole, so they are capped: S3's are a
# few KiB, a 1000-key listing about 300 KiB.
MAX_XML_BYTES = 8 * 1024 * 1024

_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_META = "x-amz-meta-"
_META_NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
_REFUSED_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AuthorizationHeaderMalformed",
        "InvalidToken",
        "ExpiredToken",
        "RequestTimeTooSkewed",
    }
)


class S3Error(Exception):
    """The store answered with an error we have no narrower name for."""

    def __init__(
        self, message: str, status: int | None = None, code: str | None = None, key: str = ""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.key = key


class S3Unavailable(S3Error):
    """The store cannot be reached, timed out, dropped us, or answered 5xx."""


class S3Refused(S3Error):
    """The store refuses our credentials or our rights (403 and kin)."""


class NoSuchKey(S3Error):
    """No object under that key."""


class NoSuchUpload(S3Error):
    """No multipart upload with that id (completed, aborted, or never begun)."""


class PreconditionFailed(S3Error):
    """A conditional request found its condition false (412), e.g. the key exists."""


class InvalidRange(S3Error):
    """The requested range starts past the end of the object (416)."""


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


@dataclass(frozen=True)
class ObjectHead:
    """What HEAD says about an object."""

    key: str
    length: int
    content_type: str | None
    etag: str | None
    last_modified: str | None
    metadata: dict[str, str]


@dataclass(frozen=True)
class ListedObject:
    key: str
    size: int
    etag: str
    last_modified: str


@dataclass(frozen=True)
class ObjectList:
    objects: list[ListedObject]
    next_token: str | None


@dataclass(frozen=True)
class ListedUpload:
    key: str
    upload_id: str
    initiated: datetime.datetime | None


@dataclass(frozen=True)
class ListedPart:
    number: int
    etag: str
    size: int


class _Signer(S3SigV4Auth):
    """SigV4 headers, with the payload hash we decide (see the module docstring)."""

    def payload(self, request: AWSRequest) -> str:
        return request.context["payload_sha256"]


def _metadata(headers: Headers) -> dict[str, str]:
    found = {}
    for name, values in headers.getAllRawHeaders():
        lower = name.decode("latin-1").lower()
        if lower.startswith(_META):
            found[lower[len(_META) :]] = values[-1].decode("latin-1")
    return found


def _header(headers: Headers, name: str) -> str | None:
    value = headers.getRawHeaders(name.encode("ascii"))
    return value[-1].decode("latin-1") if value else None


def _text(element: ET.Element, name: str) -> str:
    found = element.find(_NS + name)
    if found is None:
        found = element.find(name)
    return found.text or "" if found is not None else ""


def _key(element: ET.Element, encoded: bool) -> str:
    """A key from a listing; encoding-type=url keeps odd characters out of the XML."""
    text = _text(element, "Key")
    return unquote_plus(text) if encoded else text


def _parse_xml(body: bytes) -> ET.Element:
    try:
        return ET.fromstring(body)
    except ET.ParseError as e:
        raise S3Error(f"the store's answer is not XML: {e}") from None


def _iso(text: str) -> datetime.datetime | None:
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


class S3Client:
    """
    One bucket of an S3-compatible store, with optional key prefix.

    Keys are the caller's (UTF-8 text); the prefix is added on the way out
    and removed from listings.  The client owns its connection pool: call
    L{close} when done.
    """

    def __init__(
        self,
        reactor: Any,
        endpoint: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        region: str = "us-east-1",
        prefix: str = "",
        addressing_style: str = "path",
        timeout: float = 30.0,
        max_connections: int = 32,
        idle_timeout: float = 4.0,
        clock: IReactorTime | None = None,
    ) -> None:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f'S3Endpoint is not like "http://host:port": {endpoint!r}')
        if addressing_style not in ("path", "virtual"):
            raise ValueError(f'S3AddressingStyle is "path" or "virtual", not {addressing_style!r}')
        if not bucket:
            raise ValueError("S3Bucket is empty")
        self.endpoint = endpoint.rstrip("/")
        self.bucket = bucket
        self.region = region
        self.prefix = prefix
        self.addressing_style = addressing_style
        self.access_key = access_key
        self.timeout = timeout
        self.clock: IReactorTime = clock if clock is not None else reactor
        self._credentials = Credentials(access_key, secret_key)
        # Whether a secret key was given (for a start-up check; never the key itself).
        self.has_secret_key = bool(secret_key)
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = max_connections
        # Twisted retries no PUT or POST that meets a pooled connection the
        # store has just closed, so idle ones are closed before any common
        # server idle timeout (AWS about 20 s, nginx 75 s) can close them.
        self.pool.cachedConnectionTimeout = idle_timeout  # type: ignore[assignment]
        self.agent = Agent(reactor, pool=self.pool, connectTimeout=timeout)

    def __repr__(self) -> str:
        return (
            f"<S3Client {self.endpoint} bucket={self.bucket!r} prefix={self.prefix!r} "
            f"access_key={self.access_key!r}>"
        )

    def close(self) -> Deferred[None]:
        """Close the pooled connections."""
        return self.pool.closeCachedConnections()

    # Addressing.

    def _full_key(self, key: str) -> str:
        if not isinstance(key, str) or not key:
            raise ValueError("an object key is non-empty text")
        full = self.prefix + key
        if len(full.encode("utf-8")) > MAX_KEY_BYTES:
            raise ValueError(f"object key over {MAX_KEY_BYTES} bytes: {key!r}")
        return full

    def url(self, key: str | None = None, query: Mapping[str, str] | None = None) -> str:
        """The URL of the bucket, or of key in it, with query parameters."""
        parts = urlsplit(self.endpoint)
        base_path = parts.path.rstrip("/")
        if self.addressing_style == "virtual":
            netloc = f"{self.bucket}.{parts.netloc}"
            path = base_path + "/"
        else:
            netloc = parts.netloc
            path = f"{base_path}/{quote(self.bucket, safe='')}"
            if key is not None:
                path += "/"
        if key is not None:
            # "/" stays as is (S3 keys are not normalized); everything else
            # that is not unreserved is percent-encoded, as SigV4 wants.
            path += quote(self._full_key(key), safe="/-_.~")
        url = f"{parts.scheme}://{netloc}{path}"
        if query:
            url += "?" + "&".join(
                quote(k, safe="-_.~") + ("=" + quote(v, safe="-_.~") if v is not None else "=")
                for k, v in sorted(query.items())
            )
        return url

    def sign(
        self,
        method: str,
        key: str | None = None,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        payload_sha256: str = UNSIGNED_PAYLOAD,
    ) -> tuple[str, dict[str, str]]:
        """
        The URL and the headers (with SigV4 C{Authorization}) of a request
        valid for the next few minutes, for any HTTP client.
        """
        url = self.url(key, query)
        request = AWSRequest(method=method, url=url, headers=dict(headers or {}))
        request.context["payload_sha256"] = payload_sha256
        _Signer(self._credentials, "s3", self.region).add_auth(request)
        return url, {name: str(value) for name, value in request.headers.items()}

    # The one request path.

    def _request(
        self,
        method: str,
        key: str | None = None,
        query: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        body: bytes | IBodyProducer | None = None,
        payload_sha256: str | None = None,
        stream: bool = False,
    ) -> Deferred[tuple[IResponse, bytes | None, _Deadline]]:
        """
        Sign and send; fire with (response, body, deadline): the whole
        (small) body, or None with stream=True for a 2xx, whose body the
        caller then reads.  An error status fails with its exception.
        """
        producer: IBodyProducer | None
        if body is None:
            producer = None
            sha = EMPTY_SHA256
        elif isinstance(body, bytes):
            producer = _BytesProducer(body)
            sha = hashlib.sha256(body).hexdigest()
        else:
            producer = body
            sha = payload_sha256 or UNSIGNED_PAYLOAD
        url, signed = self.sign(method, key, query, headers, sha)
        wire = Headers()
        for name, value in signed.items():
            wire.addRawHeader(name, value)

        result: Deferred[tuple[IResponse, bytes | None, _Deadline]] = Deferred()
        sent: list[Deferred[IResponse]] = []

        def expire() -> None:
            # Until the response arrives this cancels the request (a fired
            # Deferred that waits on another passes the cancel on); once a
            # body is being read, the reader replaces this with its own.
            for d in sent:
                d.cancel()

        deadline = _Deadline(self.clock, self.timeout, expire)
        if isinstance(producer, BodyWriter):
            producer._deadline = deadline
        deadline.arm()
        d = self.agent.request(method.encode("ascii"), url.encode("ascii"), wire, producer)
        sent.append(d)

        def got(response: IResponse) -> None:
            deadline.disarm()
            if isinstance(producer, BodyWriter):
                producer._answered()
            if 200 <= response.code < 300 and stream:
                result.callback((response, None, deadline))
                return
            if method == "HEAD" or response.code == 304:
                result.callback((response, b"", deadline))
                return
            collected: Deferred[bytes] = Deferred()
            response.deliverBody(_Collector(collected, MAX_XML_BYTES, deadline))
            collected.addCallbacks(
                lambda data: result.callback((response, data, deadline)), result.errback
            )

        def failed(reason: Failure) -> None:
            deadline.disarm()
            if isinstance(producer, BodyWriter) and producer.aborted is not None:
                # The body's own source gave up: say that, not "store down".
                result.errback(producer.aborted)
                return
            inner = getattr(reason.value, "reasons", None) or []
            for why in inner:
                if isinstance(why, Failure) and why.check(S3Error):
                    result.errback(why)
                    return
            result.errback(_unavailable(reason, deadline))

        d.addCallbacks(got, failed)

        def check(answer: tuple[IResponse, bytes | None, _Deadline]):
            response, data, _ = answer
            if response.code >= 300 and response.code != 304:
                raise self._error(response.code, data or b"", key)
            return answer

        return result.addCallback(check)

    def _error(self, status: int, body: bytes, key: str | None) -> S3Error:
        """The exception for an error answer."""
        code = message = ""
        if body:
            try:
                root = ET.fromstring(body)
                code, message = _text(root, "Code"), _text(root, "Message")
            except ET.ParseError:
                message = body[:200].decode("utf-8", "replace")
        what = f"{code or status}" + (f": {message}" if message else "")
        where = f" (key {key!r})" if key else ""
        if status == 403 or code in _REFUSED_CODES:
            return S3Refused(
                f"the store at {self.endpoint} refused access key {self.access_key!r} "
                f"for bucket {self.bucket!r}: {what} (check S3AccessKey and S3SecretKey)",
                status,
                code,
                key or "",
            )
        if status == 412 or code == "PreconditionFailed":
            return PreconditionFailed(f"precondition failed{where}: {what}", status, code)
        if code == "NoSuchUpload":
            return NoSuchUpload(f"no such multipart upload{where}", status, code, key or "")
        if code == "NoSuchBucket":
            return S3Error(f"no bucket {self.bucket!r} at {self.endpoint}", status, code)
        if status == 404:
            return NoSuchKey(f"no such key{where}", status, code or "NoSuchKey", key or "")
        if status == 416:
            return InvalidRange(f"range not satisfiable{where}", status, code, key or "")
        if status >= 500:
            return S3Unavailable(f"the store answered {status} {what}", status, code)
        return S3Error(f"the store answered {status} {what}{where}", status, code, key or "")

    @staticmethod
    def _object_headers(
        content_type: str | None,
        metadata: Mapping[str, str] | None,
        if_none_match: bool,
    ) -> dict[str, str]:
        # Without a type the store would pick one (SeaweedFS: text/plain).
        headers = {"Content-Type": content_type or "application/octet-stream"}
        for name, value in (metadata or {}).items():
            lower = name.lower()
            if not _META_NAME.match(lower):
                raise ValueError(f"metadata name is not [a-z0-9-]: {name!r}")
            if not value.isascii() or not value.isprintable():
                # HTTP headers carry no UTF-8 reliably (JSON with ensure_ascii does).
                raise ValueError(f"metadata {name!r} is not printable ASCII")
            headers[_META + lower] = value
        if if_none_match:
            headers["If-None-Match"] = "*"
        return headers

    # The bucket.

    def create_bucket(self) -> Deferred[None]:
        """Create the bucket; one that is already ours is not an error."""

        def created(answer: tuple[IResponse, bytes | None, _Deadline]) -> None:
            return None

        def exists(failure: Failure) -> None:
            failure.trap(S3Error)
            assert isinstance(failure.value, S3Error)
            if failure.value.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return failure  # type: ignore[return-value]
            return None

        return self._request("PUT").addCallbacks(created, exists)

    # Objects.

    def put_object(
        self,
        key: str,
        body: bytes | IBodyProducer,
        length: int | None = None,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        if_none_match: bool = False,
        payload_sha256: str | None = None,
    ) -> Deferred[str]:
        """
        Store one object from bytes or a producer (a L{BodyWriter}); fires
        with its ETag.  With if_none_match, an existing key fails it with
        L{PreconditionFailed} and is left alone.
        """
        self._check_length(body, length)
        headers = self._object_headers(content_type, metadata, if_none_match)
        d = self._request("PUT", key, headers=headers, body=body, payload_sha256=payload_sha256)
        return d.addCallback(lambda a: _header(a[0].headers, "etag") or "")

    @staticmethod
    def _check_length(body: bytes | IBodyProducer, length: int | None) -> None:
        known = len(body) if isinstance(body, bytes) else body.length
        if not isinstance(known, int):
            raise ValueError("an S3 body needs a known length")
        if length is not None and length != known:
            raise ValueError(f"length {length} but the body has {known} bytes")

    def get_object(
        self, key: str, range: tuple[int, int | None] | str | None = None
    ) -> Deferred[S3Object]:
        """
        Fire once the headers are in with an L{S3Object}, whose body is
        then delivered.  range is (first, last) inclusive, (first, None), or
        a raw C{bytes=} header value.
        """
        headers = {}
        if range is not None:
            if isinstance(range, str):
                headers["Range"] = range
            else:
                first, last = range
                headers["Range"] = f"bytes={first}-{'' if last is None else last}"
        d = self._request("GET", key, headers=headers, stream=True)

        def ready(answer: tuple[IResponse, bytes | None, _Deadline]) -> S3Object:
            response, _, deadline = answer
            h = response.headers
            return S3Object(
                key=key,
                status=response.code,
                length=response.length if isinstance(response.length, int) else -1,
                content_type=_header(h, "content-type"),
                etag=_header(h, "etag"),
                last_modified=_header(h, "last-modified"),
                content_range=_header(h, "content-range"),
                metadata=_metadata(h),
                headers=h,
                _response=response,
                _deadline=deadline,
            )

        return d.addCallback(ready)

    def head_object(self, key: str) -> Deferred[ObjectHead]:
        """The object's facts without its body; L{NoSuchKey} when absent."""

        def ready(answer: tuple[IResponse, bytes | None, _Deadline]) -> ObjectHead:
            h = answer[0].headers
            length = _header(h, "content-length")
            return ObjectHead(
                key=key,
                length=int(length) if length and length.isdigit() else -1,
                content_type=_header(h, "content-type"),
                etag=_header(h, "etag"),
                last_modified=_header(h, "last-modified"),
                metadata=_metadata(h),
            )

        return self._request("HEAD", key).addCallback(ready)

    def delete_object(self, key: str) -> Deferred[None]:
        """Delete one object (S3 answers the same whether it existed or not)."""
        return self._request("DELETE", key).addCallback(lambda _: None)

    def delete_objects(self, keys: Iterable[str]) -> Deferred[dict[str, str]]:
        """
        Delete many in batches of 1000; fires with the keys the store could
        not delete, each with its error code (empty when all went).
        """
        keys = list(keys)
        failed: dict[str, str] = {}

        def batch(_: object, start: int) -> Deferred[None] | None:
            chunk = keys[start : start + MAX_DELETE_BATCH]
            if not chunk:
                return None
            root = ET.Element("Delete")
            ET.SubElement(root, "Quiet").text = "true"
            for k in chunk:
                ET.SubElement(ET.SubElement(root, "Object"), "Key").text = self._full_key(k)
            xml = ET.tostring(root, encoding="utf-8", xml_declaration=True)
            md5 = base64.b64encode(hashlib.md5(xml).digest()).decode()
            d = self._request(
                "POST",
                query={"delete": ""},
                headers={"Content-MD5": md5, "Content-Type": "application/xml"},
                body=xml,
            )

            def parse(answer: tuple[IResponse, bytes | None, _Deadline]) -> Deferred[None] | None:
                body = answer[1] or b""
                if body.strip():
                    for error in _parse_xml(body).iter(_NS + "Error"):
                        failed[self._strip(_text(error, "Key"))] = _text(error, "Code")
                return batch(None, start + MAX_DELETE_BATCH)

            return d.addCallback(parse)

        d: Deferred[None] = succeed(None)
        d.addCallback(batch, 0)
        return d.addCallback(lambda _: failed)

    def _strip(self, full: str) -> str:
        return full[len(self.prefix) :] if full.startswith(self.prefix) else full

    def list_objects_v2(
        self, prefix: str = "", continuation: str | None = None, max_keys: int = 1000
    ) -> Deferred[ObjectList]:
        """One page of keys under prefix (within the client's own prefix)."""
        query = {
            "list-type": "2",
            "prefix": self.prefix + prefix,
            "max-keys": str(max_keys),
            "encoding-type": "url",
        }
        if continuation:
            query["continuation-token"] = continuation

        def parse(answer: tuple[IResponse, bytes | None, _Deadline]) -> ObjectList:
            root = _parse_xml(answer[1] or b"")
            encoded = _text(root, "EncodingType") == "url"
            objects = [
                ListedObject(
                    key=self._strip(_key(c, encoded)),
                    size=int(_text(c, "Size") or 0),
                    etag=_text(c, "ETag"),
                    last_modified=_text(c, "LastModified"),
                )
                for c in root.iter(_NS + "Contents")
            ]
            truncated = _text(root, "IsTruncated") == "true"
            token = _text(root, "NextContinuationToken") if truncated else ""
            return ObjectList(objects, token or None)

        return self._request("GET", query=query).addCallback(parse)

    def presign_get(
        self,
        key: str,
        expires: int,
        response_content_type: str | None = None,
        response_content_disposition: str | None = None,
    ) -> str:
        """A URL that GETs key without credentials for expires seconds."""
        query = {}
        if response_content_type is not None:
            query["response-content-type"] = response_content_type
        if response_content_disposition is not None:
            query["response-content-disposition"] = response_content_disposition
        request = AWSRequest(method="GET", url=self.url(key, query or None))
        S3SigV4QueryAuth(self._credentials, "s3", self.region, expires=expires).add_auth(request)
        return request.url

    # Multipart.

    def create_multipart_upload(
        self,
        key: str,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Deferred[str]:
        """Begin a multipart upload; fires with its upload id."""
        headers = self._object_headers(content_type, metadata, False)

        def parse(answer: tuple[IResponse, bytes | None, _Deadline]) -> str:
            upload_id = _text(_parse_xml(answer[1] or b""), "UploadId")
            if not upload_id:
                raise S3Error("the store began a multipart upload without an UploadId")
            return upload_id

        d = self._request("POST", key, query={"uploads": ""}, headers=headers, body=b"")
        return d.addCallback(parse)

    def upload_part(
        self,
        key: str,
        upload_id: str,
        part_number: int,
        body: bytes | IBodyProducer,
        length: int | None = None,
        payload_sha256: str | None = None,
    ) -> Deferred[str]:
        """Send one part (1..10000, each but the last at least 5 MiB); fires with its ETag."""
        if not 1 <= part_number <= MAX_PART_NUMBER:
            raise ValueError(f"part number {part_number} outside 1..{MAX_PART_NUMBER}")
        self._check_length(body, length)
        query = {"partNumber": str(part_number), "uploadId": upload_id}
        d = self._request("PUT", key, query=query, body=body, payload_sha256=payload_sha256)

        def etag(answer: tuple[IResponse, bytes | None, _Deadline]) -> str:
            value = _header(answer[0].headers, "etag")
            if not value:
                raise S3Error(f"the store took part {part_number} without an ETag")
            return value

        return d.addCallback(etag)

    def complete_multipart_upload(
        self,
        key: str,
        upload_id: str,
        parts: Iterable[tuple[int, str]],
        if_none_match: bool = False,
    ) -> Deferred[str]:
        """
        Join the parts (number, ETag) into the object; fires with its ETag.
        S3 may answer 200 and still fail (the error is in the body): that
        is an error here too.
        """
        root = ET.Element("CompleteMultipartUpload", xmlns=_NS[1:-1])
        for number, etag in sorted(parts):
            part = ET.SubElement(root, "Part")
            ET.SubElement(part, "PartNumber").text = str(number)
            ET.SubElement(part, "ETag").text = etag
        xml = ET.tostring(root, encoding="utf-8", xml_declaration=True)
        headers = {"Content-Type": "application/xml"}
        if if_none_match:
            headers["If-None-Match"] = "*"
        d = self._request("POST", key, query={"uploadId": upload_id}, headers=headers, body=xml)

        def parse(answer: tuple[IResponse, bytes | None, _Deadline]) -> str:
            body = answer[1]
            root = _parse_xml(body or b"")
            if root.tag in ("Error", _NS + "Error"):
                status = 500 if "Internal" in _text(root, "Code") else 400
                raise self._error(status, body or b"", key)
            return _text(root, "ETag")

        return d.addCallback(parse)

    def abort_multipart_upload(self, key: str, upload_id: str) -> Deferred[None]:
        """Throw the parts away; L{NoSuchUpload} if it is already gone."""
        d = self._request("DELETE", key, query={"uploadId": upload_id})
        return d.addCallback(lambda _: None)

    def list_multipart_uploads(self, prefix: str = "") -> Deferred[list[ListedUpload]]:
        """Every multipart upload in progress under prefix, with when it began."""
        found: list[ListedUpload] = []

        def page(_: object, key_marker: str, id_marker: str) -> Deferred[list[ListedUpload]]:
            query = {"uploads": "", "prefix": self.prefix + prefix, "encoding-type": "url"}
            if key_marker:
                query["key-marker"] = key_marker
                query["upload-id-marker"] = id_marker

            def parse(answer: tuple[IResponse, bytes | None, _Deadline]):
                root = _parse_xml(answer[1] or b"")
                encoded = _text(root, "EncodingType") == "url"
                for u in root.iter(_NS + "Upload"):
                    found.append(
                        ListedUpload(
                            key=self._strip(_key(u, encoded)),
                            upload_id=_text(u, "UploadId"),
                            initiated=_iso(_text(u, "Initiated")),
                        )
                    )
                next_key = _text(root, "NextKeyMarker")
                if encoded:
                    next_key = unquote_plus(next_key)
                if _text(root, "IsTruncated") == "true" and next_key:
                    return page(None, next_key, _text(root, "NextUploadIdMarker"))
                return found

            return self._request("GET", query=query).addCallback(parse)

        return page(None, "", "")

    def list_parts(self, key: str, upload_id: str) -> Deferred[list[ListedPart]]:
        """The parts the store holds for a multipart upload, in order."""
        found: list[ListedPart] = []

        def page(marker: str) -> Deferred[list[ListedPart]]:
            query = {"uploadId": upload_id}
            if marker:
                query["part-number-marker"] = marker

            def parse(answer: tuple[IResponse, bytes | None, _Deadline]):
                root = _parse_xml(answer[1] or b"")
                for p in root.iter(_NS + "Part"):
                    found.append(
                        ListedPart(
                            number=int(_text(p, "PartNumber")),
                            etag=_text(p, "ETag"),
                            size=int(_text(p, "Size") or 0),
                        )
                    )
                following = _text(root, "NextPartNumberMarker")
                if _text(root, "IsTruncated") == "true" and following:
                    return page(following)
                return found

            return self._request("GET", key, query=query).addCallback(parse)

        return page("")
