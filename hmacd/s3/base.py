"""The S3 client's core: addressing, signing, the one request path, objects and listings."""

from __future__ import annotations

import base64
import hashlib
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from botocore.auth import UNSIGNED_PAYLOAD, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse

from hmacd.s3.protocol import (
    _META,
    _META_NAME,
    _NS,
    _REFUSED_CODES,
    EMPTY_SHA256,
    MAX_DELETE_BATCH,
    MAX_KEY_BYTES,
    MAX_XML_BYTES,
    InvalidRange,
    ListedObject,
    NoSuchKey,
    NoSuchUpload,
    ObjectHead,
    ObjectList,
    PreconditionFailed,
    S3Error,
    S3Refused,
    S3Unavailable,
    _header,
    _key,
    _metadata,
    _parse_xml,
    _Signer,
    _text,
)
from hmacd.s3.transfer import (
    BodyWriter,
    S3Object,
    _BytesProducer,
    _Collector,
    _Deadline,
    _unavailable,
)


class S3Base:
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
