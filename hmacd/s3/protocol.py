"""
The S3 protocol's pieces: limits, errors, the shapes of its answers, XML and header
parsing, and the signer.
"""

from __future__ import annotations

import datetime
import hashlib
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from urllib.parse import unquote_plus

from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from twisted.web.http_headers import Headers

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
