"""
Deduplication in an object store (C{Deduplication = true} with C{StorageBackend = "s3"}).

An object store has no hard links: sharing is spelled out in the bucket, so that the
bucket alone says what it holds (reindex, the census, the sweep need nothing else).

- The bytes of a content live once, at C{.hmacfs/cas/<sha256>} (a dot name: never
  listed or served as a file).
- Each uploaded path is a I{reference}: an empty object at its own name, with the signed
  Content-Type and its own facts (C{x-amz-meta-hmacfs}, uploader, expiry...) like any
  file, and C{x-amz-meta-hmacfs-content} naming the content.  Reading the path reads the
  content (L{hmacd.storage.s3.S3Storage.open}); a redirect presigns the content's key.
- Each reference has a I{marker} at C{.hmacfs/refs/<sha256>/<sha256 of its key>} (its body
  is the key): the references of a content are one listing, and the content goes when the
  last marker has gone.

Linking a path to a content writes the marker first: from then on no unlink removes the
content, since one removes it only after listing no marker.  Then the content is stored
if it is not there yet (outside any lock: it may take long), and under a lock on the
content (L{ContentLocks}: a claim in the shared metadata store, the one that decides
uploads' paths) the content is looked for again (an unlink that listed no marker just
before ours may have removed it: it is stored again) and the reference is written.
Unlinking deletes the reference (no content is endangered by that), then under the lock
the marker, and the content if no marker is left.  So a reference never names a content
that is gone, on any node.  A process that dies, or a store that fails, between the steps
leaves a marker or a content too many: the partial sweep removes contents without a
marker, and markers without their reference once they are older than ResumableTTL.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import re
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from twisted.internet.threads import blockingCallFromThread

from hmacd.node_claims import NodeClaim, NodeClaims
from hmacd.storage import StorageUnavailable

__all__ = [
    "CAS",
    "CONTENT_META",
    "REFS",
    "ContentLocks",
    "content_key",
    "content_of",
    "marker_key",
    "markers_of",
]

CAS = ".hmacfs/cas/"
REFS = ".hmacfs/refs/"
# The metadata of a reference: the SHA-256 of the content it reads.
CONTENT_META = "hmacfs-content"
# How long a link or unlink waits for another one of the same content.
LOCK_WAIT = 30.0
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def content_of(metadata: Mapping[str, str]) -> str | None:
    """
    The content an object's metadata names, when it is a reference; None for a file of
    its own.  Only a SHA-256 names one: a value that is not (written by a hand other than
    ours) makes no key that a read or a delete would then touch.
    """
    value = metadata.get(CONTENT_META)
    return value if value is not None and _SHA256_HEX.fullmatch(value) else None


def content_key(sha256: str) -> str:
    """Where the bytes of the content C{sha256} live."""
    return CAS + sha256


def markers_of(sha256: str) -> str:
    """The prefix of the markers of the content C{sha256}'s references."""
    return REFS + sha256 + "/"


def marker_key(sha256: str, key: str) -> str:
    """The marker of the reference at C{key} to the content C{sha256}."""
    return markers_of(sha256) + hashlib.sha256(key.encode("utf-8")).hexdigest()


class ContentLocks:
    """
    Locks on contents, for the worker threads that link and unlink them: claims in the
    shared metadata store (L{NodeClaims}, renewed while held), so they hold across every
    node and process sharing it.  Built in the reactor thread.
    """

    def __init__(self, store: Any, node: str, reactor: Any, wait: float = LOCK_WAIT) -> None:
        self.reactor = reactor
        self.claims = NodeClaims(store, f"{node}/content", reactor)
        self.wait = wait
        # The threads of this process wanting one content queue on a lock of their own
        # first: one claim asked of the store at a time, handed on at once when released
        # (polling the store, many uploads of one body waited up to 50 ms each).
        self._local: dict[str, tuple[threading.Lock, int]] = {}
        self._guard = threading.Lock()

    def _enter(self, sha256: str) -> threading.Lock:
        with self._guard:
            lock, users = self._local.get(sha256, (threading.Lock(), 0))
            self._local[sha256] = (lock, users + 1)
        return lock

    def _leave(self, sha256: str) -> None:
        with self._guard:
            lock, users = self._local[sha256]
            if users == 1:
                del self._local[sha256]
            else:
                self._local[sha256] = (lock, users - 1)

    @contextlib.contextmanager
    def held(self, sha256: str) -> Iterator[NodeClaim]:
        """
        Blocking: hold the lock of C{sha256} for the block, which gets the claim (whose
        C{kept} turns False if a renewal found it lapsed: a slow store).

        @raise StorageUnavailable: another holder kept it longer than C{wait}, or the
            metadata store cannot be asked.
        """
        deadline = time.monotonic() + self.wait
        local = self._enter(sha256)
        try:
            if not local.acquire(timeout=self.wait):
                raise StorageUnavailable(errno.EBUSY, f"content {sha256[:16]} stays locked")
            try:
                with self._claimed(sha256, deadline) as claim:
                    yield claim
            finally:
                local.release()
        finally:
            self._leave(sha256)

    @contextlib.contextmanager
    def _claimed(self, sha256: str, deadline: float) -> Iterator[NodeClaim]:
        pause = 0.01
        while True:
            try:
                claim: NodeClaim | None = blockingCallFromThread(
                    self.reactor,
                    self.claims.take,  # type: ignore[arg-type]
                    CAS + sha256,
                )
            except Exception as e:
                raise StorageUnavailable(errno.EIO, f"cannot lock a content: {e}") from e
            if claim is not None:
                break
            if time.monotonic() >= deadline:
                raise StorageUnavailable(errno.EBUSY, f"content {sha256[:16]} stays locked")
            time.sleep(pause)
            pause = min(pause * 2, 0.05)  # a popular content: links queue here
        try:
            yield claim
        finally:
            claim.release()
