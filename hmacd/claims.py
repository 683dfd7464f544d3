"""
One upload of a store path at a time, across every process on the StoreDir.

Without this, ten PUTs of one signed URL each streamed their whole body to a temp file
of its own and only learned at the final link that one of them had won: ten times the
slot's size on disk.  An upload now holds a claim on its path from its verdict to its end,
and a second upload of the path is refused before its body is read.

A claim is an exclusive C{flock} on a lock file under C{StoreDir/.hmacfs/claims/}, named
by the hash of the path.  The lock belongs to the open file, so it is shared by nothing
(two opens in one process exclude each other as two processes do, so C{Workers} need
nothing more) and dies with its holder: a killed process never leaves a path claimed.
Releasing removes the lock file, so the directory holds only the claims in progress.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os

__all__ = ["Claim", "PathBusy", "claim", "claims_dir", "sweep_claims"]

# A claim that was released between our open and our lock is a removed file, which
# excludes nobody: open again.  Only a path claimed and released this many times while we
# try could make us give up, and then an upload of it was in progress.
_ATTEMPTS = 16


class PathBusy(Exception):
    """Another upload of the same path is in progress, in this process or another."""


def claims_dir(store_dir: str) -> str:
    """Where the lock files of uploads in progress are: a dot path, never served."""
    return os.path.join(store_dir, ".hmacfs", "claims")


def _lock_file(store_dir: str, relpath: str) -> str:
    return os.path.join(claims_dir(store_dir), hashlib.sha256(relpath.encode("utf-8")).hexdigest())


class Claim:
    """The exclusive right to upload one path, until L{release}."""

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @property
    def held(self) -> bool:
        """Whether this claim has not been released yet."""
        return self._fd is not None

    def release(self) -> None:
        """Give the path free; a second call does nothing."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        # Remove while still locked: whoever opened the file meanwhile finds, once it has
        # the lock, that its file is no longer the one at the name, and opens again.
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)


def claim(store_dir: str, relpath: str) -> Claim:
    """
    Claim C{relpath} for an upload.

    @raise PathBusy: another upload holds it.
    @raise OSError: the lock file cannot be made.
    """
    path = _lock_file(store_dir, relpath)
    for _ in range(_ATTEMPTS):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(fd, path):
                return Claim(path, fd)
        except BlockingIOError:
            os.close(fd)
            raise PathBusy() from None
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    raise PathBusy()


def _same_file(fd: int, path: str) -> bool:
    """Whether C{fd} is still the file at C{path} (a released claim's file is removed)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def sweep_claims(store_dir: str, older_than: float) -> int:
    """
    Remove the lock files of claims that nobody holds: a process that was killed left them.

    They claim nothing (the lock died with the process) and the next upload of the path
    would reuse and remove its file; this keeps paths never tried again from leaving theirs.
    Files modified at or after C{older_than} are left alone: taking the lock of one that a
    claimant has just made, before it locks it, would refuse that upload.

    @return: how many were removed.
    """
    directory = claims_dir(store_dir)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    removed = 0
    for name in names:
        path = os.path.join(directory, name)
        try:
            if os.lstat(path).st_mtime >= older_than:
                continue
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue  # released meanwhile, or not ours to touch
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if _same_file(fd, path):
                os.unlink(path)
                removed += 1
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.ENOENT):
                raise
        finally:
            os.close(fd)
    return removed
