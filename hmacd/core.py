"""
The state one running file server shares between its requests.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from hmacd.guard import ClientCounts
from hmacd.mediatype import guess_type, is_inline_type
from hmacd.metrics import Metrics
from hmacd.node_claims import NodeClaims
from hmacd.quota import Quotas
from hmacd.secret import PreviousSecretUses
from hmacd.sink import GroupCommit, Uploads
from hmacd.storage import IStorage
from hmacd.storage.local import LocalStorage
from hmacd.store.failover import FailoverStore
from hmacd.takedown import DenyList
from hmacd.throttle import Bandwidth, RateLimiter, SharedRateLimiter
from hmacd.uring import Rings

__all__ = ["Blocking", "FileServer", "guess_type", "is_inline_type"]

log = Logger()

# Runs a blocking callable off the reactor thread; a Deferred of its result.
Blocking = Callable[[Callable[[], Any]], Deferred[Any]]


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
    # IReactorTime and IReactorThreads: Python has no type for "both".
    reactor: Any
    metadata: FailoverStore
    prefix: str = "upload"
    upload_max_size: int = 0
    chunk_size: int = 1 << 20
    # None (the default) is replaced in __post_init__, as documented above.
    blocking: Blocking = None  # type: ignore[assignment]
    clock: IReactorTime = None  # type: ignore[assignment]
    file_ttl: float = 0
    metrics: Metrics = field(default_factory=Metrics)
    # RateLimitPerMinute (a hmacd.throttle.RateLimiter), and the networks
    # whose X-Forwarded-For names the client.
    limiter: RateLimiter | SharedRateLimiter | None = None
    trusted_proxies: tuple = ()
    # MaxBytesPerSecond per upload, and a hmacd.throttle.Bandwidth shared by
    # all uploads (MaxTotalBytesPerSecond).
    max_bytes_per_second: int = 0
    total_bandwidth: Bandwidth | None = None
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
    # What the upload code shares between its requests: those receiving a body, the
    # resumable uploads receiving a piece, the committer, whether uploads are accepted.
    uploads: Uploads = field(init=False)
    # Builds the storage of another backend than the local directory, given the server.
    make_storage: Callable[[FileServer], IStorage] | None = None
    # Deduplication: uploads of identical bytes share them (the local directory only).
    dedup: bool = False
    # SyncUploads: a 201 waits for the fsyncs of the file, its directory and the directories
    # made for it (the local directory; resumable pieces too).  False leaves them to the
    # kernel, as the Go server does.
    sync_uploads: bool = True
    # IoUring: the fsyncs of a batch of commits go to the kernel together (hmacd.uring),
    # where this process can have io_uring.
    io_uring: bool = True
    # Stops the thread pool of `blocking` when it is the server's own (an object store's).
    stop_threads: Callable[[], None] | None = None
    # ResumableTTL: how long the state of an unfinished resumable upload is kept.
    resumable_ttl: float = 86400
    # Claims across nodes (hmacd.node_claims) in the shared metadata store, taken before an
    # upload's body where nodes share the storage (an object store); None on one host.
    node_claims: NodeClaims | None = None
    # UserQuota, UserDailyQuota, GlobalQuota (a hmacd.quota.Quotas), asked before an upload's
    # body; None when no quota is set.  UploaderFromPath: the first path segment of a slot
    # that names no uploader (v, v2, token) is its uploader (ejabberd's per-user hash).
    quotas: Quotas | None = None
    uploader_from_path: bool = False
    # The slot component issues v, v2 or token slots: the PUT looks up the uploader it
    # recorded in the shared store (hmacd.quota.slot_uploader_key).
    slot_uploaders: bool = False
    # PreviousSecrets: they verify slots as the secret does (never sign any), in their order.
    previous_secrets: tuple[bytes, ...] = ()
    # This process's copy of the takedowns (hmacd.takedown), refreshed by a timer; and the
    # audit log (hmacd.audit.AuditLog, AuditLog), None when off.
    denials: DenyList = field(default_factory=DenyList)
    audit: Any = None

    def __post_init__(self) -> None:
        self.store_dir = os.path.abspath(self.store_dir)
        # room_for's last look at the free space: when, what it saw, what it let in since.
        self._freeSeenAt: float | None = None
        self._roomSeen = 0
        self._letInSince = 0
        if self.clock is None:
            self.clock = self.reactor
        if self.blocking is None:
            # fsync of a large file takes long enough to stall every other
            # connection if done in the reactor thread.
            self.blocking = lambda f: deferToThreadPool(
                self.reactor, self.reactor.getThreadPool(), f
            )
        rings = None
        if self.io_uring and self.sync_uploads and self.make_storage is None:
            rings, why = Rings.open()
            if rings is None:
                log.info("IoUring: none here ({why}); fsyncs go one at a time", why=why)
        # Through self: tests swap `blocking` after construction.
        # Where the bytes of finished files live.
        self.storage: IStorage = LocalStorage(
            self.store_dir,
            lambda work: self.blocking(work),
            self.chunk_size,
            dedup=self.dedup,
            on_shared=self.metrics.dedup_bytes.inc,
            sync=self.sync_uploads,
            rings=rings,
        )
        if self.make_storage is not None:
            self.storage = self.make_storage(self)  # StorageBackend = "s3"
        self.previous_secret_uses = PreviousSecretUses(
            self.now, self.metrics.previous_secret_uses, log
        )
        self.uploads = Uploads(
            GroupCommit(
                lambda work: self.blocking(work),
                self.storage,
                # Batches of small bodies in one lane where their fsyncs go together.
                small_lanes=1 if rings is not None and not self.dedup else None,
            ),
            lambda count: self.metrics.uploads_in_progress.set(count),
        )

    def expiry(self, claimed: float | None) -> float | None:
        """When a file uploaded now may go: FileTTL or the slot's own claim, the sooner."""
        limits = [t for t in (claimed, self.now() + self.file_ttl if self.file_ttl else None) if t]
        return min(limits) if limits else None

    # room_for answers from a look at the free space this many seconds old, at most, for
    # sizes that (with the bytes it let in since) take at most half of what it saw.
    FREE_SPACE_FRESH = 0.1

    def room_for(self, size: int) -> bool | None:
        """
        Whether C{size} more bytes fit in the store with C{min_free_space} left over; None
        when the file system cannot say (the write itself will tell).

        Under a stream of small uploads a statvfs each (a system call in the reactor
        thread, which lets the GIL go) cost more than the answer is worth: while the last
        look is recent and the uploads let in since fit twice over in what it saw, the
        answer is yes without looking.  Near the limit every upload looks again.
        """
        now = self.clock.seconds()
        if (
            self._freeSeenAt is not None
            and 0 <= now - self._freeSeenAt < self.FREE_SPACE_FRESH  # not if the clock went back
            and 2 * (self._letInSince + size) <= self._roomSeen
        ):
            self._letInSince += size
            return True
        try:
            st = self.statvfs(self.store_dir)
        except OSError:
            self._freeSeenAt = None
            return None
        self._freeSeenAt, self._roomSeen = now, st.f_bavail * st.f_frsize - self.min_free_space
        fits = size <= self._roomSeen
        self._letInSince = size if fits else 0
        return fits

    def now(self) -> float:
        """Wall-clock time for token expiry and records (a Clock in tests)."""
        return self.clock.seconds()
