"""
A stored file's own facts, kept on the file: its signed Content-Type, SHA-256, size,
uploader, protocol, created time and expiry, as one extended attribute (C{user.hmacfs},
compact JSON).

The facts are written on the temp file before it is fsynced and linked into place, so a
file is never visible without them, and serving it needs nothing but the file: not the
metadata store, which stays the index for expiry, listing and accounting, and can be
rebuilt from the files (C{hmacfs reindex}).

One attribute rather than one per fact: a setxattr costs about 2 us on ext4 here against
70 us for four, and the small-PUT path is benchmarked.  Where the file system has no user
extended attributes (ENOTSUP: some FUSE and network mounts), the facts live only in the
store record, as before, and L{probe} tells the operator at start.

With C{Deduplication}, one inode is the bytes of every path that uploaded the same content
(hard links), and so carries one attribute for all of them: those facts then name the path
they belong to (C{"path"}), and are nobody else's.  Facts naming another path, or none
(C{""}: the path they named is gone), are read as no facts: that path is served and
reindexed from its own record, never from another upload's type, uploader or expiry.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections import OrderedDict

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from hmacd.metadata import FileRecord

__all__ = [
    "ATTRIBUTE",
    "UnrecordedFiles",
    "content_sha256",
    "disown_facts",
    "is_expired",
    "named_path",
    "probe",
    "read_facts",
    "write_facts",
]

ATTRIBUTE = "user.hmacfs"
VERSION = 1

log = Logger()

# The file system cannot keep the facts: serve and sweep by the store record alone.
_UNSUPPORTED = (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM)
# The value does not fit (ext4 keeps at most a block of attributes per inode): a huge
# signed Content-Type or uploader.  That file's facts stay in the store only.
_TOO_LARGE = (errno.E2BIG, errno.ERANGE, errno.ENOSPC)


def encode(record: FileRecord, named: bool = False) -> bytes:
    """
    The attribute value for C{record}: everything but the path, which is the file's name;
    with C{named} the path too (an inode that several paths may share: L{decode}).
    """
    facts: dict[str, object] = {"v": VERSION, **record.to_fields()}
    if named:
        facts["path"] = record.path
    return json.dumps(facts, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def decode(relpath: str, value: bytes) -> FileRecord | None:
    """
    The record C{value} describes, or None when it is not one of ours: not our format, or
    facts that name another path than C{relpath} (a shared inode's, see the module).
    """
    try:
        facts = json.loads(value)
        if facts.get("v") != VERSION:
            return None
        if facts.get("path", relpath) != relpath:
            return None
        return FileRecord.from_fields(relpath, facts)
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def _raw(fd: int) -> dict | None:
    """The attribute of C{fd} as JSON, whoever's facts it holds; None without one."""
    try:
        facts = json.loads(os.getxattr(fd, ATTRIBUTE))
    except (OSError, ValueError):
        return None
    return facts if isinstance(facts, dict) and facts.get("v") == VERSION else None


def named_path(fd: int) -> str | None:
    """The path the facts of C{fd} name (C{""} once disowned); None when they name none."""
    facts = _raw(fd)
    path = None if facts is None else facts.get("path")
    return path if isinstance(path, str) else None


def content_sha256(fd: int) -> str | None:
    """
    The SHA-256 the facts of C{fd} state, whichever path they name: a fact of the bytes,
    true for every path sharing them.  None without facts.
    """
    facts = _raw(fd)
    digest = None if facts is None else facts.get("sha256")
    return digest if isinstance(digest, str) else None


def disown_facts(fd: int) -> None:
    """
    Make the facts of C{fd} nobody's (C{"path": ""}), keeping its SHA-256 readable: the
    path they named is going, and the bytes stay for other paths (or for that same path
    uploaded again, which must not inherit the old upload's facts).
    """
    facts = _raw(fd)
    if facts is None:
        return
    facts["path"] = ""
    value = json.dumps(facts, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    try:
        os.setxattr(fd, ATTRIBUTE, value)
    except OSError:
        # Cannot rewrite them: remove them, so that they are nobody's all the same.
        with contextlib.suppress(OSError):
            os.removexattr(fd, ATTRIBUTE)


def write_facts(fd: int, record: FileRecord, named: bool = False) -> bool:
    """
    Put C{record}'s facts on the open file C{fd} (before its fsync, which makes them
    durable with it); with C{named}, naming C{record.path} (see L{encode}).

    @return: whether they are on the file; False where the file system cannot keep them
        (the store record is then the only copy, as it was before facts existed).
    @raise OSError: any other failure of the file system.
    """
    try:
        os.setxattr(fd, ATTRIBUTE, encode(record, named))
    except OSError as e:
        if e.errno in _UNSUPPORTED or e.errno in _TOO_LARGE:
            return False
        raise
    return True


def read_facts(fd: int, relpath: str) -> FileRecord | None:
    """The facts of the open file C{fd}, stored at C{relpath}; None if it has none."""
    try:
        value = os.getxattr(fd, ATTRIBUTE)
    except OSError:
        # ENODATA (no facts: uploaded by an older version, or too large), ENOTSUP.
        return None
    return decode(relpath, value)


def read_facts_at(path: str, relpath: str) -> FileRecord | None:
    """The facts of the file at C{path} (not following a symlink), or None."""
    try:
        value = os.getxattr(path, ATTRIBUTE, follow_symlinks=False)
    except OSError:
        return None
    return decode(relpath, value)


def is_expired(record: FileRecord, now: float) -> bool:
    """Whether C{record}'s file is past its expiry at C{now}: not to be served any more."""
    return record.expires is not None and record.expires <= now


def probe(directory: str) -> bool:
    """Whether files in C{directory} can carry user extended attributes."""
    name = os.path.join(directory, f".hmacfs-probe-{os.getpid()}")
    try:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError:
        return True  # cannot tell; uploads will find out file by file
    try:
        os.setxattr(fd, ATTRIBUTE, b"{}")
        return True
    except OSError as e:
        return e.errno not in _UNSUPPORTED
    finally:
        os.close(fd)
        os.unlink(name)


class UnrecordedFiles:
    """
    Notices files that are served without a record in the metadata store (a store that
    came back empty, files copied in by hand) and says so, pointing at C{hmacfs reindex}.

    A file without facts is looked up in the store anyway (for its type), so its lookup
    comes for free.  A file with facts is served without the store; whether it has a
    record is asked after the response, once per path, at most C{checksPerSecond} a
    second: never a store round trip on the way to the bytes.  A warning names each file
    once, and at most one line goes out every C{warnEvery} seconds (the others are
    counted into the next line).
    """

    remember = 100_000

    def __init__(
        self, store, clock, checksPerSecond: float = 20.0, warnEvery: float = 60.0
    ) -> None:
        self.store = store
        self.clock = clock
        self.checkInterval = 1.0 / checksPerSecond
        self.warnEvery = warnEvery
        self._checked: OrderedDict[str, None] = OrderedDict()
        self._warned: OrderedDict[str, None] = OrderedDict()
        self._nextCheck = 0.0
        self._nextWarning = 0.0
        self._unsaid = 0  # files found since the last warning, not named in it
        self.found = 0  # distinct files seen without a record

    def check(self, relpath: str) -> Deferred | None:
        """Ask the store, some time after a file with facts was served, whether it has a
        record; None when this path is known or the budget is spent."""
        if relpath in self._checked:
            return None
        now = self.clock.seconds()
        if now < self._nextCheck:
            return None  # a later download of it will ask
        self._nextCheck = now + self.checkInterval
        self._remember(self._checked, relpath)
        d = self.store.get(relpath)

        def answered(record) -> None:
            if record is None:
                self.missing(relpath)

        # An outage says nothing about the record: ask again on a later download.
        d.addCallbacks(answered, lambda _: self._checked.pop(relpath, None))
        return d

    def missing(self, relpath: str) -> None:
        """C{relpath} was served and the store has no record of it."""
        self._checked.pop(relpath, None)
        if relpath in self._warned:
            return
        self._remember(self._warned, relpath)
        self.found += 1
        now = self.clock.seconds()
        if now < self._nextWarning:
            self._unsaid += 1
            return
        self._nextWarning = now + self.warnEvery
        unsaid, self._unsaid = self._unsaid, 0
        log.warn(
            "served {path} but the metadata store has no record of it{more}: it is not "
            "indexed for expiry; run `hmacfs reindex --config FILE` to rebuild the missing "
            "records from the files",
            path=relpath,
            more=f" (nor of {unsaid} other files since the last warning)" if unsaid else "",
        )

    def _remember(self, seen: OrderedDict[str, None], relpath: str) -> None:
        seen[relpath] = None
        if len(seen) > self.remember:
            seen.popitem(last=False)
