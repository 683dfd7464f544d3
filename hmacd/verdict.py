"""
The verdict on a PUT, before its body: what the request says, against the policy and the
clock, gives an accepted L{Plan} or a L{Refusal}.

Pure: no Twisted and no I/O.  What needs the disk or the stores (free space, shutdown, the
store's health, existence and the claim on the path) is looked at by the request afterwards,
on an accepted plan; so is L{check_piece}, which comes after those in the order of answers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qs

from hmacd import auth
from hmacd.mediatype import BadMediaType, guess_type, parse_media_type
from hmacd.numbers import NotADecimal, parse_decimal
from hmacd.paths import PathRefused, relative_path

__all__ = [
    "INSUFFICIENT_STORAGE",
    "RESUME_INCOMPLETE",
    "TOO_MANY_REQUESTS",
    "Plan",
    "Refusal",
    "UploadPolicy",
    "check_piece",
    "judge",
    "parse_content_range",
    "received_range",
]

# Status codes twisted.web.http has no name for.
INSUFFICIENT_STORAGE = 507  # RFC 4918
TOO_MANY_REQUESTS = 429  # RFC 6585
RESUME_INCOMPLETE = 308  # "Resume Incomplete": a resumable piece is stored, more expected

Headers = Sequence[tuple[bytes, bytes]]


@dataclass(frozen=True)
class Refusal:
    """Answer C{status} with C{reason} (and C{headers}) and store nothing."""

    status: int
    reason: str
    headers: Headers = ()
    # False for an answer that is no error (the offset of a resumable upload).
    error: bool = True


class UploadPolicy(Protocol):
    """
    The configuration the verdict needs (a L{hmacd.core.FileServer} is one).

    @ivar previous_secrets: C{PreviousSecrets}: they verify slots as C{secret} does.
    """

    secret: bytes
    previous_secrets: tuple[bytes, ...]
    prefix: str
    upload_max_size: int


@dataclass(frozen=True)
class Plan:
    """
    An accepted upload.

    @ivar size: the file's signed size (for a resumable upload, its total).
    @ivar span: C{None} for a whole body; C{(first, last, total)} for a resumable piece;
        C{(total,)} for a query of where a resumable upload stands.
    @ivar needed: the bytes this request will write.
    @ivar previous: 0 when the current secret verified the slot; N when previous secret #N
        (C{PreviousSecrets}, counted from 1) did.
    """

    relpath: str
    protocol: str
    size: int
    media_type: str
    uploader: str | None = None
    expires: float | None = None
    span: tuple[int, int, int] | tuple[int] | None = None
    previous: int = 0

    @property
    def needed(self) -> int:
        """The bytes this request will write: a piece its range, an offset query none."""
        if self.span is None:
            return self.size
        if len(self.span) == 3:
            return self.span[1] - self.span[0] + 1
        return 0


def judge(
    path: bytes,
    query: bytes,
    length: int | None,
    headers: Mapping[str, Sequence[str]],
    policy: UploadPolicy,
    now: float,
) -> Plan | Refusal:
    """
    The verdict on a PUT of C{path}.

    @param path: the request path, without the query.
    @param query: what follows C{?} in the request target.
    @param length: the Content-Length; None for a chunked body.
    @param headers: the values (latin-1) of C{content-type}, C{content-range},
        C{x-upload-length} and C{authorization}, by lowercase name; absent when not sent.
    """
    try:
        relpath = relative_path(path, policy.prefix)
    except PathRefused as e:
        return Refusal(400, str(e))
    if relpath is None:
        return Refusal(404, "not an upload path")

    # The MAC (v2, token) is over the header as sent; what is stored and served is its
    # parsed, normal form, so the inline rule and the browser see the same one type.
    content_type = media_type = None
    sent = headers.get("content-type", ())
    if len(sent) > 1:
        return Refusal(400, "more than one Content-Type")
    if sent:
        content_type = sent[0].strip() or None
    if content_type is not None:
        try:
            media_type = parse_media_type(content_type)
        except BadMediaType:
            return Refusal(400, "bad Content-Type: not exactly one media type")

    # The current secret first: its position is 0, a previous one's is its number.
    secrets = (policy.secret, *policy.previous_secrets)
    previous = 0
    args = {k: v[0] for k, v in parse_qs(query.decode("latin-1"), keep_blank_values=True).items()}
    picked = auth.pick_protocol(args)
    uploader = expires = None
    span = None
    content_range = _first(headers, "content-range")
    if content_range is not None:
        # A resumable piece: the signed size is the total, not this request's Content-Length.
        span = parse_content_range(content_range)
        if span is None:
            return Refusal(400, "bad Content-Range")
    if picked is not None:
        protocol, mac = picked
        if span is not None:
            size = span[-1]
        elif length is None:
            # A chunked body: the signed size must be declared up front, and the final byte
            # count must match it.
            try:
                size = parse_decimal((_first(headers, "x-upload-length") or "").strip(" \t"))
            except NotADecimal:
                # Absent, or no length we could use (not ASCII digits, too many of them).
                return Refusal(411, "Content-Length or X-Upload-Length (1 to 20 digits) required")
        else:
            size = length
        matched = auth.verify_hmac_any(protocol, secrets, relpath, size, content_type, mac)
        if matched is None:
            return Refusal(403, "invalid MAC")
        previous = matched
        if media_type is None:
            media_type = guess_type(relpath) if protocol == "v" else auth.DEFAULT_CONTENT_TYPE
    else:
        token = auth.bearer_token(_first(headers, "authorization"))
        if token is None:
            return Refusal(
                401, "no MAC (v, v2, token) and no bearer token", [(b"WWW-Authenticate", b"Bearer")]
            )
        try:
            slot, previous = auth.verify_jwt_any(secrets, token, now=now)
            auth.check_bearer_path(slot, relpath)
        except auth.AuthError as e:
            return Refusal(403, str(e))
        if span is not None and span[-1] != slot.filesize:
            return Refusal(400, f"total differs from the slot's {slot.filesize}")
        if span is None and length is not None and length != slot.filesize:
            return Refusal(
                413 if length > slot.filesize else 400,
                f"Content-Length {length} differs from the slot's {slot.filesize}",
            )
        protocol, size = "jwt", slot.filesize
        # As Prosody's own mod_http_file_share: the type the slot was issued for is the one
        # served.
        if slot.filetype:
            try:
                media_type = parse_media_type(slot.filetype)
            except BadMediaType:
                return Refusal(400, "bad filetype in token")
        elif media_type is None:
            media_type = guess_type(relpath)
        uploader, expires = slot.sub, slot.expires

    if policy.upload_max_size and size > policy.upload_max_size:
        return Refusal(413, f"larger than {policy.upload_max_size} bytes")
    if uploader is None and getattr(policy, "uploader_from_path", False) and "/" in relpath:
        # UploaderFromPath: ejabberd's mod_http_upload puts a hash of the user's JID first.
        uploader = relpath.split("/", 1)[0]
    return Plan(relpath, protocol, size, media_type, uploader, expires, span, previous)


def check_piece(plan: Plan, length: int | None) -> Refusal | None:
    """
    The refusal of a resumable request whose body does not fit its range, or None.

    Judged after the server's own state (free space, shutdown, the store), as it always was.
    """
    if plan.span is None:
        return None
    if len(plan.span) == 1:
        if length not in (0, None):
            return Refusal(400, "an offset query has no body")
        return None
    # A chunked piece (no Content-Length) is held to its range's length as it streams.
    if length is not None and length != plan.needed:
        return Refusal(400, "Content-Length must match Content-Range")
    return None


def received_range(offset: int) -> list[tuple[bytes, bytes]]:
    """The Range header that tells a client how much of its upload we hold."""
    return [(b"Range", b"bytes=0-%d" % (offset - 1))] if offset else []


_CONTENT_RANGE = re.compile(r"bytes +(?:([0-9]+)-([0-9]+)|\*)/([0-9]+)")


def parse_content_range(value: str) -> tuple[int, int, int] | tuple[int] | None:
    """(first, last, total) of a piece, (total,) of an offset query, or None if malformed."""
    # OWS is spaces and tabs; str.strip() would also take \x1c-\x1f and Unicode spaces.
    match = _CONTENT_RANGE.fullmatch(value.strip(" \t"))
    if match is None:
        return None
    try:
        numbers = [parse_decimal(n) for n in match.groups() if n is not None]
    except NotADecimal:
        return None
    if len(numbers) == 1:
        return (numbers[0],)
    first, last, total = numbers
    if not first <= last < total:
        return None
    return first, last, total


def _first(headers: Mapping[str, Sequence[str]], name: str) -> str | None:
    values = headers.get(name)
    return values[0] if values else None
