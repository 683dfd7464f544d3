"""
The state one running file server shares between its requests.
"""

from __future__ import annotations

import mimetypes
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool

from hmacd.auth import DEFAULT_CONTENT_TYPE
from hmacd.guard import ClientCounts
from hmacd.mediatype import BadMediaType, essence, parse_media_type
from hmacd.metrics import Metrics

__all__ = ["FileServer", "guess_type", "is_inline_type"]

# Built-in table only: the same answer on every machine, whatever
# /etc/mime.types says.
_TYPES = mimetypes.MimeTypes()


def guess_type(name: str) -> str:
    """The content type for a file name, by its extension."""
    guessed, _ = _TYPES.guess_type(name, strict=False)
    return guessed or DEFAULT_CONTENT_TYPE


def is_inline_type(content_type: str) -> bool:
    """
    Whether a browser may show this type inline.

    XEP-0363 deployments show pictures, video, audio and plain text in the
    page; everything else is served as an attachment so that an uploaded
    HTML or PDF file never runs in the server's origin.  Judged on the parsed
    type alone: a value that is not exactly one media type (a list such as
    C{image/png, text/html}, whose last type a browser would use) is never
    inline.
    """
    try:
        main = essence(parse_media_type(content_type))
    except BadMediaType:
        return False
    return main == "text/plain" or main.split("/", 1)[0] in ("image", "video", "audio")


@dataclass
class FileServer:
    """
    Configuration, secret, store and clock of one hmacfs instance.

    @ivar store_dir: absolute path of C{StoreDir}.
    @ivar metadata: the record store (a FailoverStore: its C{writable()} is
        asked before an upload body is read).
    @ivar prefix: C{UploadSubDir} without slashes; C{""} serves from C{/}.
    @ivar file_ttl: seconds an upload is kept (C{FileTTL}); 0 is forever.
    @ivar reactor: provides IReactorTime and IReactorThreads: timers and
        the thread pool that the request code uses.
    @ivar blocking: runs a blocking callable off the reactor thread and
        returns a Deferred of its result; the reactor's thread pool unless
        given (tests pass a synchronous one).
    @ivar clock: where "now" comes from (JWT expiry, record times); the
        reactor unless given.
    """

    secret: bytes
    store_dir: str
    reactor: Any
    metadata: Any  # a hmacd.store.failover.FailoverStore
    prefix: str = "upload"
    upload_max_size: int = 0
    chunk_size: int = 1 << 20
    blocking: Callable[[Callable[[], Any]], Deferred] | None = None
    clock: Any = None
    file_ttl: float = 0
    metrics: Metrics = field(default_factory=Metrics)
    # The UploadRequests whose bodies are being received (graceful shutdown
    # waits for them; a gauge counts them).
    uploads: set = field(default_factory=set)
    # False once shutdown has begun: new uploads are refused with 503.
    accepting: bool = True
    # RateLimitPerMinute (a hmacd.throttle.RateLimiter), and the networks
    # whose X-Forwarded-For names the client.
    limiter: Any = None
    trusted_proxies: tuple = ()
    # MaxBytesPerSecond per upload, and a hmacd.throttle.Bandwidth shared by
    # all uploads (MaxTotalBytesPerSecond).
    max_bytes_per_second: int = 0
    total_bandwidth: Any = None
    # Paths whose resumable upload is receiving a chunk right now (one at a time).
    resumable: set = field(default_factory=set)
    # The hmacd.upload.GroupCommit that finished uploads are committed through.
    committer: Any = None
    # HeaderTimeout, MaxConnectionsPerClient, MinUploadBytesPerSecond and MinUploadRateWindow
    # (hmacd.guard); off unless given, so that a FileServer built by hand behaves as before.
    header_timeout: float = 0
    max_connections_per_client: int = 0
    min_upload_bytes_per_second: int = 0
    min_upload_rate_window: float = 30
    # Connections (and forwarded requests) held per client address: a hmacd.guard.ClientCounts.
    clients: ClientCounts = field(default_factory=ClientCounts)
    # MinFreeSpace: an upload whose declared size does not fit in the store's free space less
    # this many bytes is refused (507) before its body; 0 only refuses what cannot fit at all.
    min_free_space: int = 64 * 1024 * 1024
    # Where free space is asked (tests pass a fake file system).
    statvfs: Callable[[str], Any] = os.statvfs

    def __post_init__(self) -> None:
        self.store_dir = os.path.abspath(self.store_dir)
        if self.clock is None:
            self.clock = self.reactor
        if self.blocking is None:
            # fsync of a large file takes long enough to stall every other
            # connection if done in the reactor thread.
            self.blocking = lambda f: deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), f
            )

    def expiry(self, claimed: float | None) -> float | None:
        """When a file uploaded now may go: FileTTL or the slot's own claim, the sooner."""
        limits = [t for t in (claimed, self.now() + self.file_ttl if self.file_ttl else None) if t]
        return min(limits) if limits else None

    def room_for(self, size: int) -> bool | None:
        """
        Whether C{size} more bytes fit in the store with C{min_free_space} left over; None
        when the file system cannot say (the write itself will tell).
        """
        try:
            st = self.statvfs(self.store_dir)
        except OSError:
            return None
        return size <= st.f_bavail * st.f_frsize - self.min_free_space

    def now(self) -> float:
        """Wall-clock time for token expiry and records (a Clock in tests)."""
        return self.clock.seconds()
