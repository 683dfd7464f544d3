"""
One upload of a store path at a time, across every process on the StoreDir.

Without this, ten PUTs of one signed URL each streamed their whole body to a temp file
of its own and only learned at the final link that one of them had won: ten times the
slot's size on disk.  An upload now holds a claim on its path from its verdict to its end,
and a second upload of the path is refused before its body is read.

A claim is a lock on one byte of C{StoreDir/.hmacfs/claims}, at an offset given by the
hash of the path: a record lock (C{fcntl}) belongs to its process, so other processes
(C{Workers}) are excluded and a killed process never leaves a path claimed; within the
process, a set of the offsets held excludes the other uploads, since a process may always
lock again what it holds.  The file stays empty and is never rewritten: claiming and
releasing are one system call each, with no file created or removed per upload (that cost
the small-PUT benchmark a tenth of its rate).  Two paths whose hashes share their 62 bits
would refuse each other while both are in progress; nothing worse.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import os

__all__ = ["Claim", "PathBusy", "claim", "claims_file"]

_OFFSET_BITS = 62  # lock offsets stay clear of the end of a signed 64-bit off_t

# Descriptors of claims files, one per StoreDir this process has uploaded to.  Closing any
# descriptor of a file drops every record lock the process holds on it, so a file's
# descriptor is only closed while it holds none, and only to keep a process that serves
# many stores (a test run) from gathering descriptors.
_MAX_OPEN = 16


class PathBusy(Exception):
    """Another upload of the same path is in progress, in this process or another."""


def claims_file(store_dir: str) -> str:
    """The file whose bytes are locked by uploads in progress: a dot path, never served."""
    return os.path.join(store_dir, ".hmacfs", "claims")


class _ClaimsFile:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.held: set[int] = set()


_open: dict[str, _ClaimsFile] = {}


@functools.lru_cache(maxsize=64)
def _real(store_dir: str) -> str:
    # One entry per directory, however it is spelled: two descriptors of one claims file
    # would not exclude each other's uploads, and closing one would drop the other's locks.
    return os.path.realpath(store_dir)


def _claims(store_dir: str) -> _ClaimsFile:
    store_dir = _real(store_dir)
    found = _open.get(store_dir)
    if found is not None:
        return found
    path = claims_file(store_dir)
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = os.open(path, flags, 0o600)
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(path, flags, 0o600)
    if len(_open) >= _MAX_OPEN:
        for name, idle in list(_open.items()):
            if not idle.held:
                del _open[name]
                os.close(idle.fd)
    found = _open[store_dir] = _ClaimsFile(fd)
    return found


class Claim:
    """The exclusive right to upload one path, until L{release}."""

    def __init__(self, claims: _ClaimsFile, offset: int) -> None:
        self._claims: _ClaimsFile | None = claims
        self.offset = offset

    @property
    def held(self) -> bool:
        """Whether this claim has not been released yet."""
        return self._claims is not None

    def release(self) -> None:
        """Give the path free; a second call does nothing.  Safe from a pool thread."""
        claims, self._claims = self._claims, None
        if claims is None:
            return
        try:
            fcntl.lockf(claims.fd, fcntl.LOCK_UN, 1, self.offset)
        finally:
            # Only now: an upload of the path in this process that came in between would
            # otherwise take a lock the process still holds, and lose it to this unlock.
            claims.held.discard(self.offset)


def claim(store_dir: str, relpath: str) -> Claim:
    """
    Claim C{relpath} for an upload.  Call it in the reactor thread.

    @raise PathBusy: another upload holds it.
    @raise OSError: the claims file cannot be opened.
    """
    claims = _claims(store_dir)
    digest = hashlib.sha256(relpath.encode("utf-8")).digest()
    offset = int.from_bytes(digest[:8], "big") >> (64 - _OFFSET_BITS)
    if offset in claims.held:
        raise PathBusy()
    try:
        fcntl.lockf(claims.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, offset)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise PathBusy() from None
        raise
    claims.held.add(offset)
    return Claim(claims, offset)
