"""
Upload authorisation: the signed messages of every XMPP upload protocol, and their checks.

The XMPP server and hmacfs share one secret and never talk to each other: the server signs a
slot, the client carries the signature in the PUT, and these functions decide whether that PUT
is the one that was signed.  Everything here is pure (no Twisted, no clock of its own) so that it
can be tested exhaustively against the slots real servers hand out.

Paths are the decoded form (``urllib.parse.unquote``, never ``unquote_plus``) because the servers
sign the raw file name and each of them percent-encodes it differently on the wire.
"""

from __future__ import annotations

import hashlib
import hmac
import urllib.parse
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeGuard

import jwt

__all__ = [
    "DEFAULT_CONTENT_TYPE",
    "PROTOCOLS",
    "AuthError",
    "BadSignature",
    "BearerSlot",
    "TokenExpired",
    "TokenInvalid",
    "bearer_token",
    "check_bearer_path",
    "message_token",
    "message_v",
    "message_v2",
    "pick_protocol",
    "sign_jwt",
    "sign_token",
    "sign_v",
    "sign_v2",
    "slot_put",
    "verify_hmac",
    "verify_hmac_any",
    "verify_jwt",
    "verify_jwt_any",
    "verify_token",
    "verify_v",
    "verify_v2",
]

# What Prosody signs when the client asked for a slot without a type, and what such a client
# then PUTs without a Content-Type header: both sides must agree on it byte for byte.
DEFAULT_CONTENT_TYPE = "application/octet-stream"


class AuthError(Exception):
    """
    An upload that is not authorised.

    ``str(e)`` is a short fixed message that may be sent to the client as is: it never contains
    the secret, a MAC or the token, so no caller has to scrub it.
    """


class BadSignature(AuthError):
    """The MAC or the JWT signature does not match: someone other than the XMPP server made it."""


class TokenExpired(AuthError):
    """The JWT was genuine but its ``exp`` has passed; the client must ask for a new slot."""


class TokenInvalid(AuthError):
    """
    The JWT cannot authorise this upload: malformed, not HS256, a missing or ill-typed claim,
    or a signed slot that is not the one being uploaded to.
    """


# --- HMAC query parameters: v, v2, token ---------------------------------------------------


def message_v(path: str, size: int) -> bytes:
    """
    The message behind ``?v=``.

    Prosody mod_http_upload_external v1 and ejabberd ``external_secret`` do not sign the type,
    so a ``v`` URL authorises any Content-Type.
    """
    return (path + " " + str(size)).encode("utf-8")


def message_v2(path: str, size: int, content_type: str | None) -> bytes:
    """
    The message behind ``?v2=`` (and Metronome's ``?token=``).

    A missing or empty Content-Type is signed as ``DEFAULT_CONTENT_TYPE``: the server signed that
    type for a slot requested without one, and the client then PUTs with no header at all.
    """
    return (path + "\0" + str(size) + "\0" + (content_type or DEFAULT_CONTENT_TYPE)).encode("utf-8")


# Metronome signs exactly what Prosody v2 signs; the alias keeps call sites self-describing.
message_token = message_v2


def _hmac_hex(secret: bytes, message: bytes) -> str:
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def _mac_matches(expected: str, given: str) -> bool:
    # The MAC comes straight from the URL: anything that cannot be a MAC is a mismatch, never
    # an exception (an exception would turn a forged URL into a 500).  ASCII is checked before
    # lower() because some non-ASCII letters lower-case to ASCII ones (U+212A KELVIN SIGN -> k).
    if not isinstance(given, str) or not given.isascii():
        return False
    return hmac.compare_digest(expected.encode("ascii"), given.lower().encode("ascii"))


def sign_v(secret: bytes, path: str, size: int) -> str:
    """Lowercase hex HMAC-SHA256 for ``?v=``, as the XMPP server computes it."""
    return _hmac_hex(secret, message_v(path, size))


def sign_v2(secret: bytes, path: str, size: int, content_type: str | None = None) -> str:
    """Lowercase hex HMAC-SHA256 for ``?v2=``, as the XMPP server computes it."""
    return _hmac_hex(secret, message_v2(path, size, content_type))


def sign_token(secret: bytes, path: str, size: int, content_type: str | None = None) -> str:
    """Lowercase hex HMAC-SHA256 for Metronome's ``?token=`` (the same message as v2)."""
    return _hmac_hex(secret, message_token(path, size, content_type))


def verify_v(secret: bytes, path: str, size: int, mac: str) -> bool:
    """
    Whether ``mac`` (hex, any case) is the ``?v=`` MAC of this path and size.

    Never raises on what the client sent: a path that cannot be UTF-8 (lone surrogates) was
    never signed by anyone, so it simply does not verify.
    """
    try:
        expected = sign_v(secret, path, size)
    except UnicodeEncodeError:
        return False
    return _mac_matches(expected, mac)


def verify_v2(secret: bytes, path: str, size: int, content_type: str | None, mac: str) -> bool:
    """
    Whether ``mac`` (hex, any case) is the ``?v2=`` MAC of this path, size and Content-Type.

    ``content_type`` is the PUT's header as received; None or empty means no header.
    """
    try:
        expected = sign_v2(secret, path, size, content_type)
    except UnicodeEncodeError:
        return False
    return _mac_matches(expected, mac)


def verify_token(secret: bytes, path: str, size: int, content_type: str | None, mac: str) -> bool:
    """Whether ``mac`` (hex, any case) is Metronome's ``?token=`` MAC (checked exactly as v2)."""
    try:
        expected = sign_token(secret, path, size, content_type)
    except UnicodeEncodeError:
        return False
    return _mac_matches(expected, mac)


# Precedence when a URL carries several MACs: the newest protocol signs the most (v2 and token
# cover the Content-Type, v does not), so it is the one that must hold.
PROTOCOLS: tuple[str, ...] = ("v2", "token", "v")


def pick_protocol(args: Mapping[str, str]) -> tuple[str, str] | None:
    """
    The highest-precedence MAC param present in the (already decoded) query args and its value,
    or None.

    A present but empty param still wins, and then fails verification: falling through to a
    weaker protocol would let a client choose which parts of the upload are checked.
    """
    for protocol in PROTOCOLS:
        if protocol in args:
            return protocol, args[protocol]
    return None


def verify_hmac(
    protocol: str, secret: bytes, path: str, size: int, content_type: str | None, mac: str
) -> bool:
    """
    Verify ``mac`` under the protocol ``pick_protocol`` chose.

    An unknown protocol is a programming error, not a bad upload, hence ValueError.
    """
    if protocol == "v2":
        return verify_v2(secret, path, size, content_type, mac)
    if protocol == "token":
        return verify_token(secret, path, size, content_type, mac)
    if protocol == "v":
        return verify_v(secret, path, size, mac)
    raise ValueError(f"unknown upload MAC protocol {protocol!r}")


def verify_hmac_any(
    protocol: str,
    secrets: Sequence[bytes],
    path: str,
    size: int,
    content_type: str | None,
    mac: str,
) -> int | None:
    """
    The position in C{secrets} of the first one under which C{mac} verifies (as
    L{verify_hmac}), or None if none does.

    Every secret is tried, and each comparison is constant-time, whichever matched: the time
    a request takes says how many secrets there are, never which of them signed it.  This is
    how slots signed with a previous secret keep working after the secret is changed.
    """
    matched: int | None = None
    for position, secret in enumerate(secrets):
        ok = verify_hmac(protocol, secret, path, size, content_type, mac)
        # No early exit: the loop's work does not depend on which secret matched.
        if ok and matched is None:
            matched = position
    return matched


# --- Authorization: Bearer <JWT> (Prosody mod_http_file_share) ------------------------------


@dataclass(frozen=True)
class BearerSlot:
    """
    The claims of a verified mod_http_file_share token.

    Kept whole because the upload needs more than a yes/no: ``filesize`` is checked against the
    body, and ``sub`` (the uploader) and ``expires`` (when the file may be deleted) go into the
    file's metadata.
    """

    slot: str
    filename: str
    filesize: int
    filetype: str | None
    exp: int
    iat: int | None = None
    sub: str | None = None
    expires: int | None = None


def bearer_token(authorization: str | None) -> str | None:
    """
    Token from an Authorization header value "Bearer <token>" (scheme case-insensitive,
    surrounding whitespace ignored); None if absent or another scheme or empty.

    None means "no credentials" (401 with a challenge), as opposed to a token that fails (403).
    """
    if authorization is None:
        return None
    parts = authorization.strip().split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    token = parts[1].strip()
    return token or None


_JWT_ALGORITHM = "HS256"
_REQUIRED_CLAIMS = ("exp", "slot", "filename", "filesize")


# Only PyJWT releases that warn about short keys have the class; older ones need no silencing.
_InsecureKeyLengthWarning: type[Warning] | None = getattr(jwt, "InsecureKeyLengthWarning", None)


@contextmanager
def _short_secrets_allowed() -> Iterator[None]:
    # PyJWT warns on every call whose HMAC key is shorter than the digest.  The secret is shared
    # with the XMPP server and not ours to lengthen, and a per-request warning helps nobody:
    # judging the secret is the configuration's job, once, at start-up.
    with warnings.catch_warnings():
        if _InsecureKeyLengthWarning is not None:
            warnings.simplefilter("ignore", _InsecureKeyLengthWarning)
        yield


def sign_jwt(
    secret: bytes,
    *,
    slot: str,
    filename: str,
    filesize: int,
    filetype: str | None,
    exp: int,
    iat: int | None = None,
    sub: str | None = None,
    expires: int | None = None,
) -> str:
    """
    HS256 JWT with the claims Prosody 0.12 mod_http_file_share puts in its tokens (slot,
    filename, filesize, filetype, exp, iat, sub, expires; omit None ones).

    hmacfs never issues slots itself; this exists so that tests and the bundled client can
    act as the XMPP server.
    """
    claims: dict[str, Any] = {
        "slot": slot,
        "filename": filename,
        "filesize": filesize,
        "filetype": filetype,
        "exp": exp,
        "iat": iat,
        "sub": sub,
        "expires": expires,
    }
    payload = {name: value for name, value in claims.items() if value is not None}
    with _short_secrets_allowed():
        return jwt.encode(payload, secret, algorithm=_JWT_ALGORITHM)


def slot_put(
    secret: bytes,
    base_url: str,
    path: str,
    size: int,
    content_type: str | None,
    protocol: str,
    now: float,
    lifetime: int = 300,
    sub: str | None = None,
) -> tuple[str, dict[str, str]]:
    """
    The PUT URL of an upload slot and the headers to send with it, signed as an XMPP server
    signs them: C{?v=}, C{?v2=} or C{?token=} on the URL, or (C{jwt}) an C{Authorization:
    Bearer} header valid for C{lifetime} seconds, with C{sub} as the uploader's JID.

    C{path} is the decoded store path (C{slot/name}); the URL carries it percent-encoded, so
    that spaces, C{+}, C{%} and non-ASCII names arrive as signed.

    @raise ValueError: a protocol we do not know, or a JWT path without a slot segment.
    """
    url = base_url.rstrip("/") + "/" + urllib.parse.quote(path)
    if protocol == "jwt":
        slot, _, filename = path.partition("/")
        if not filename:
            raise ValueError("a JWT slot's PATH is SLOT/FILENAME")
        token = sign_jwt(
            secret,
            slot=slot,
            filename=filename,
            filesize=size,
            filetype=content_type,
            exp=int(now) + lifetime,
            iat=int(now),
            sub=sub,
        )
        return url, {"Authorization": f"Bearer {token}"}
    if protocol == "v":
        mac = sign_v(secret, path, size)
    elif protocol == "v2":
        mac = sign_v2(secret, path, size, content_type)
    elif protocol == "token":
        mac = sign_token(secret, path, size, content_type)
    else:
        raise ValueError(f"unknown protocol {protocol!r}")
    return f"{url}?{protocol}={mac}", {}


def _is_int(value: object) -> TypeGuard[int]:
    # JSON true/false decode to bool, which Python counts as int: a filesize of `true` is
    # malformed, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _required_int(claims: Mapping[str, Any], name: str) -> int:
    value = claims.get(name)
    if not _is_int(value):
        raise TokenInvalid(f"token claim {name!r} must be an integer")
    return int(value)


def _optional_int(claims: Mapping[str, Any], name: str) -> int | None:
    return None if claims.get(name) is None else _required_int(claims, name)


def _required_str(claims: Mapping[str, Any], name: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str) or not value:
        raise TokenInvalid(f"token claim {name!r} must be a non-empty string")
    return value


def _optional_str(claims: Mapping[str, Any], name: str) -> str | None:
    value = claims.get(name)
    if value is not None and not isinstance(value, str):
        raise TokenInvalid(f"token claim {name!r} must be a string")
    return value


def verify_jwt(secret: bytes, token: str, *, now: float) -> BearerSlot:
    """
    The slot a mod_http_file_share token authorises, or an AuthError saying why it does not.

    PyJWT does all the parsing and the signature check (only HS256 is accepted, so "none" and
    algorithm-confusion tokens are refused before any claim is read).  Its own time checks are
    off because they read the wall clock: the caller injects ``now``, and expiry (``exp <=
    now``) and ``nbf`` are checked against it here.  ``iat`` is deliberately not compared with
    ``now``: a few seconds of clock skew between the XMPP server and hmacfs must not refuse a
    fresh slot.

    A bad signature raises BadSignature, a passed ``exp`` TokenExpired, anything else wrong
    with the token TokenInvalid.  A secret PyJWT refuses to use (empty, or shaped like a
    public key) raises its InvalidKeyError unchanged: that is the operator's mistake, not the
    client's, and must not look like a refused upload.
    """
    try:
        with _short_secrets_allowed():
            claims = jwt.decode(
                token,
                secret,
                algorithms=[_JWT_ALGORITHM],
                options={
                    "require": list(_REQUIRED_CLAIMS),
                    "verify_signature": True,
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
    except jwt.InvalidSignatureError as e:
        raise BadSignature("bad token signature") from e
    except jwt.InvalidAlgorithmError as e:
        raise TokenInvalid("token algorithm must be HS256") from e
    except jwt.MissingRequiredClaimError as e:
        # e.claim is one of our own _REQUIRED_CLAIMS names, never client text.
        raise TokenInvalid(f"token lacks claim {e.claim!r}") from e
    except jwt.InvalidTokenError as e:
        raise TokenInvalid("malformed token") from e

    exp = _required_int(claims, "exp")
    if exp <= now:
        raise TokenExpired("token expired")
    nbf = _optional_int(claims, "nbf")
    if nbf is not None and nbf > now:
        raise TokenInvalid("token not valid yet")

    filesize = _required_int(claims, "filesize")
    if filesize < 0:
        raise TokenInvalid("token claim 'filesize' must be a non-negative integer")

    return BearerSlot(
        slot=_required_str(claims, "slot"),
        filename=_required_str(claims, "filename"),
        filesize=filesize,
        filetype=_optional_str(claims, "filetype"),
        exp=exp,
        iat=_optional_int(claims, "iat"),
        sub=_optional_str(claims, "sub"),
        expires=_optional_int(claims, "expires"),
    )


def verify_jwt_any(secrets: Sequence[bytes], token: str, *, now: float) -> tuple[BearerSlot, int]:
    """
    The slot a token authorises and the position in C{secrets} of the one that signed it, or
    an AuthError saying why it does not authorise anything.

    Each secret is tried in turn, all of them whichever matches (the signature check of each
    is PyJWT's constant-time one).  A token no secret signed raises BadSignature.  A token one
    of them signed but which is wrong in another way (expired, a claim missing) raises what
    L{verify_jwt} says about it under that secret: the client holds a genuine slot and should
    hear what is wrong with it.  A token that is malformed or not HS256 is refused the same
    under every secret.

    @raise ValueError: C{secrets} is empty.
    """
    if not secrets:
        raise ValueError("no secret to verify with")
    verified: tuple[BearerSlot, int] | None = None
    refusal: AuthError | None = None
    for position, secret in enumerate(secrets):
        try:
            slot = verify_jwt(secret, token, now=now)
        except BadSignature as e:
            if refusal is None:
                refusal = e
            continue
        except AuthError as e:
            # A genuine token's own fault outweighs another secret's "bad signature".
            if not isinstance(refusal, (TokenExpired, TokenInvalid)):
                refusal = e
            continue
        if verified is None:
            verified = slot, position
    if verified is not None:
        return verified
    assert refusal is not None
    raise refusal


def check_bearer_path(slot: BearerSlot, path: str) -> None:
    """
    path is the decoded upload path (after the upload prefix), e.g. "VX-3N.../photo.jpg". Its
    first segment must equal slot.slot and the rest must equal slot.filename; otherwise raise
    TokenInvalid.

    The token does not sign the URL, only these claims: without this check one genuine token
    would authorise an upload to any path.
    """
    first, sep, rest = path.partition("/")
    if not sep or first != slot.slot or rest != slot.filename:
        raise TokenInvalid("upload path does not match the token's slot")
