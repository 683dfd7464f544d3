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

from hmacd.s3.client import S3Client
from hmacd.s3.protocol import (
    EMPTY_SHA256,
    MAX_DELETE_BATCH,
    MAX_KEY_BYTES,
    MAX_PART_NUMBER,
    MAX_XML_BYTES,
    InvalidRange,
    ListedObject,
    ListedPart,
    ListedUpload,
    NoSuchKey,
    NoSuchUpload,
    ObjectHead,
    ObjectList,
    PreconditionFailed,
    S3Error,
    S3Refused,
    S3Unavailable,
)
from hmacd.s3.transfer import BodyWriter, S3Object, _Deadline

__all__ = [
    "EMPTY_SHA256",
    "MAX_DELETE_BATCH",
    "MAX_KEY_BYTES",
    "MAX_PART_NUMBER",
    "MAX_XML_BYTES",
    "BodyWriter",
    "InvalidRange",
    "ListedObject",
    "ListedPart",
    "ListedUpload",
    "NoSuchKey",
    "NoSuchUpload",
    "ObjectHead",
    "ObjectList",
    "PreconditionFailed",
    "S3Client",
    "S3Error",
    "S3Object",
    "S3Refused",
    "S3Unavailable",
    "_Deadline",
]
