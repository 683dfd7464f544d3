"""
The builders the composition is made of: each returns one thing (the metadata stores, the
file server, a listener, the sweeps, the timers, the component), and none switches anything
for the whole process.

L{hmacd.tap} composes them for twistd and L{hmacd.make_service}; L{hmacd.workers} composes
a worker process from the same ones.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from hmacd import facts
from hmacd.audit import AuditLog, reopen_on_sighup
from hmacd.component import ComponentService, SlotComponent, SlotIssuer
from hmacd.config import Config
from hmacd.core import FileServer
from hmacd.housekeeping import (
    DedupGauge,
    ExpirySweep,
    GarbageCollector,
    PartialSweep,
    SystemMonitor,
    drain_uploads,
)
from hmacd.leases import node_name, sweep_lease
from hmacd.metrics import Metrics, metrics_site
from hmacd.node_claims import NodeClaims
from hmacd.quota import Limits, Quotas
from hmacd.storage import IStorage
from hmacd.store.failover import FailoverStore
from hmacd.takedown import DenyListRefresh
from hmacd.threads import own_threads
from hmacd.throttle import Bandwidth, parse_networks, rate_limiter
from hmacd.web import HmacfsSite

__all__ = [
    "LISTEN_BACKLOG",
    "Announce",
    "HmacfsService",
    "StoreService",
    "build_file_server",
    "build_metadata",
    "component_service",
    "http_listener",
    "metrics_listener",
    "sweeps",
    "timers",
    "with_backlog",
]

# The namespace these lines had when tap.py held these services: it is in every log line
# ("[hmacd.tap#info]"), and admins' filters match it.
log = Logger(namespace="hmacd.tap")

# The threads an object store's blocking calls run in (each waits on the store, not a CPU).
STORAGE_THREADS = 16

# Twisted listens with a backlog of 50: 500 clients connecting at once overflowed it, and the
# kernel reset some of them after their handshake (bench/run's slow uploads).  The kernel
# caps this at net.core.somaxconn.
LISTEN_BACKLOG = 1024


class HmacfsService(MultiService):
    """
    The services of one hmacfs server, and the L{FileServer} they share (for
    L{hmacd.mount}, and for tests that look inside).
    """

    def __init__(self, fileServer: FileServer) -> None:
        super().__init__()
        self.fileServer = fileServer


def with_backlog(description: str) -> str:
    """A listening endpoint description with LISTEN_BACKLOG, unless it names a backlog."""
    kind = description.partition(":")[0]
    if kind in ("tcp", "tcp6", "unix") and "backlog=" not in description:
        return f"{description}:backlog={LISTEN_BACKLOG}"
    return description


def build_metadata(config: Config, reactor: Any) -> FailoverStore:
    """
    The metadata stores C{config} asks for: Redis (with the SQL database as
    its fallback when FallbackEnabled), the SQL database alone, or, with
    neither configured, the embedded SQLite under StoreDir/.hmacfs/.
    """
    from hmacd.store.redis import RedisStore
    from hmacd.store.sql import SQLStore

    fallback = None
    primary: Any
    if config.redis_addr:
        primary = RedisStore.from_config(config, reactor=reactor)
        if config.fallback_enabled:
            fallback = SQLStore.from_config(config, reactor=reactor)
    elif config.fallback_enabled:
        primary = SQLStore.from_config(config, reactor=reactor)
    else:
        path = os.path.join(config.store_dir, ".hmacfs", "meta.sqlite3")
        primary = SQLStore.sqlite(path, reactor=reactor)
    store = FailoverStore(primary, fallback, clock=reactor)
    # The stores keep the quota figures while any quota is set (hmacd.quota).
    store.quota_accounting = bool(Limits.from_config(config))
    return store


async def start_for_command(store: FailoverStore) -> str | None:
    """
    Start C{store} for an admin command: None once a store can write, else why not, for
    the user (the first warning the stores logged while starting them).
    """
    from typing import cast

    from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher

    complaints: list[str] = []

    def complain(event: dict) -> None:
        if event.get("log_level", LogLevel.info) >= LogLevel.warn:
            complaints.append(formatEvent(event))

    # A plain callable is an observer to the log publisher; the cast says so to mypy.
    listen = cast(ILogObserver, complain)
    globalLogPublisher.addObserver(listen)
    try:
        await store.start()
    finally:
        globalLogPublisher.removeObserver(listen)
    if store.writable():
        return None
    return complaints[0] if complaints else "no store answers"


def build_file_server(
    config: Config,
    secret: bytes,
    reactor: Any,
    metadata: FailoverStore,
    sharedMetrics: str | None = None,
) -> FileServer:
    """
    The L{FileServer} of C{config}; its metrics are those of every process writing to
    C{sharedMetrics} when given (Workers: the caller has switched prometheus_client to
    it, see L{hmacd.metrics.share_between_processes}).
    """
    blocking, stop_threads = None, None
    if config.storage_backend == "s3":
        # Not the reactor's pool: the store's requests resolve host names there.
        blocking, stop_threads = own_threads(reactor, STORAGE_THREADS, "hmacfs-storage")
    fs = FileServer(
        blocking=blocking,  # type: ignore[arg-type]
        stop_threads=stop_threads,
        secret=secret,
        previous_secrets=tuple(s.encode("utf-8") for s in config.previous_secrets),
        store_dir=config.store_dir,
        reactor=reactor,
        metadata=metadata,
        prefix=config.upload_subdir,
        upload_max_size=config.upload_max_size,
        min_free_space=config.min_free_space,
        chunk_size=config.chunk_size,
        file_ttl=config.file_ttl,
        dedup=config.deduplication,
        sync_uploads=config.sync_uploads,
        io_uring=config.io_uring,
        resumable_ttl=config.resumable_ttl,
        limiter=rate_limiter(config, reactor, metadata),
        trusted_proxies=parse_networks(config.trusted_proxies),
        max_bytes_per_second=config.max_bytes_per_second,
        total_bandwidth=(
            Bandwidth(config.max_total_bytes_per_second, reactor)
            if config.max_total_bytes_per_second
            else None
        ),
        metrics=Metrics(shared=sharedMetrics),
        header_timeout=config.header_timeout,
        max_connections_per_client=config.max_connections_per_client,
        min_upload_bytes_per_second=config.min_upload_bytes_per_second,
        min_upload_rate_window=config.min_upload_rate_window,
        make_storage=storage_builder(config, reactor, os.environ),
        # Nodes that share an object store share no directory to claim paths in.
        node_claims=(
            NodeClaims(metadata, node_name(config), reactor)
            if config.storage_backend == "s3"
            else None
        ),
        quotas=(
            Quotas(Limits.from_config(config), metadata, reactor)
            if Limits.from_config(config)
            else None
        ),
        uploader_from_path=config.uploader_from_path,
        slot_uploaders=bool(config.component_jid) and config.component_protocol != "jwt",
    )
    fs.metrics.watch_stores(metadata)
    if config.audit_log:
        fs.audit = AuditLog(config.audit_log, node_name(config), reactor)
    if config.storage_backend == "s3":
        from hmacd.sink_s3 import staging_in_use
        from hmacd.storage.s3 import S3Storage
        from hmacd.storage.s3_dedup import ContentLocks

        assert isinstance(fs.storage, S3Storage)
        fs.storage.staging_in_use = staging_in_use(fs)
        # Always: references made with Deduplication stay after it is turned off.
        fs.storage.content_locks = ContentLocks(metadata, node_name(config), reactor)
        fs.storage.on_shared = fs.metrics.dedup_bytes.inc
    return fs


def storage_builder(
    config: Config, reactor: Any, environ: Mapping[str, str]
) -> Callable[[FileServer], IStorage] | None:
    """
    How C{config}'s StorageBackend is built for a file server; None for the local
    directory, which the server builds itself.
    """
    if config.storage_backend != "s3":
        return None

    def build(fs: FileServer) -> IStorage:
        # Here, not at the top: botocore is imported only where S3 is used.
        from hmacd.storage.s3 import SPOOL_DIR, S3Storage, client_for

        storage = S3Storage(
            client_for(config, reactor, environ),
            reactor,
            os.path.join(fs.store_dir, SPOOL_DIR),
            lambda work: fs.blocking(work),
            fs.chunk_size,
            threshold=config.s3_multipart_threshold,
            part_size=config.s3_part_size,
            redirect_downloads=config.s3_redirect_downloads,
            stream=config.s3_stream_uploads,
            dedup=config.deduplication,
        )
        storage.multipart_ttl = config.resumable_ttl
        return storage

    return build


class ObjectStoreService(Service):
    """
    At start, asks the object store whether it takes our credentials (a refusal is one
    line naming S3AccessKey/S3SecretKey); at stop, ends its probes and closes its
    connections.
    """

    name = "object-store"

    def __init__(self, storage: Any, stop_threads: Callable[[], None] | None = None) -> None:
        self.storage = storage
        self.stop_threads = stop_threads

    def startService(self) -> None:
        super().startService()
        for key, value in (
            ("S3AccessKey", self.storage.client.access_key),
            ("S3SecretKey", self.storage.client.has_secret_key),
        ):
            if not value:
                log.error(
                    "{key}: not set (nor HMACFS_{env} in the environment)",
                    key=key,
                    env="S3_" + key[2:-3].upper() + "_KEY",
                )
        # Not awaited: a store that is down at start is logged and probed; uploads get
        # 503 until it answers, as for the metadata stores.
        self.storage.check()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.storage.stop()
        if self.stop_threads is not None:
            self.stop_threads()
        return self.storage.client.close()


class AuditService(Service):
    """The audit log's life: SIGHUP reopens it while the server runs, stop closes it."""

    name = "audit"

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    def startService(self) -> None:
        super().startService()
        reopen_on_sighup(self.audit.reopen)

    def stopService(self) -> Any:
        self.audit.close()
        return super().stopService()


class Announce(Service):
    """Says once, at start, what is served where (the secret's origin, never its value)."""

    def __init__(self, config: Config, secretOrigin: str, secretLength: int) -> None:
        self.config = config
        self.secretOrigin = secretOrigin
        self.secretLength = secretLength

    def startService(self) -> None:
        super().startService()
        c = self.config
        log.info(
            "hmacfs: files in {store}, uploads under /{prefix}, listening on {listen}; "
            "secret from {origin}",
            store=c.store_dir,
            prefix=c.upload_subdir + "/" if c.upload_subdir else "",
            listen=c.listen_endpoint,
            origin=self.secretOrigin,
        )
        if self.secretLength < 16:
            log.warn("the secret is shorter than 16 bytes: MACs are only as strong as it")
        if c.previous_secrets:
            # So that the operator sees a rotation took effect; how many, never which.
            log.info(
                "{count} previous secret(s) verify slots too (PreviousSecrets)",
                count=len(c.previous_secrets),
            )
        if os.path.isdir(c.store_dir) and not facts.probe(c.store_dir):
            log.warn(
                "{store} has no user extended attributes: each file's facts (type, hash, "
                "expiry) are kept in the metadata store only, and downloads need it",
                store=c.store_dir,
            )


class StoreService(Service):
    """
    Starts the metadata stores with the server; at shutdown, lets uploads in
    progress finish (up to ShutdownGrace) before it closes the stores, since
    their records still have to be written.
    """

    name = "metadata"

    def __init__(self, store: FailoverStore, fs: FileServer, grace: float) -> None:
        self.store = store
        self.fs = fs
        self.grace = grace

    def startService(self) -> None:
        super().startService()
        # Not awaited: a store that is down at start is logged and probed
        # (uploads get 503 meanwhile), it does not keep the server down.
        self.store.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        d: Deferred[None] = Deferred.fromCoroutine(drain_uploads(self.fs, self.grace))
        d.addErrback(lambda f: log.failure("draining uploads failed", f))
        return d.addCallback(lambda _: self.store.stop())


def http_listener(config: Config, site: HmacfsSite, reactor: Any) -> IService:
    """
    The "http" service listening on ListenPort.  strports.service: a port that cannot be
    bound stops start-up (twistd exits non-zero) instead of leaving a process that serves
    nothing.
    """
    listener = strports.service(with_backlog(config.listen_endpoint), site, reactor=reactor)
    listener.setName("http")
    return listener


def metrics_listener(config: Config, fs: FileServer, reactor: Any) -> IService:
    """The "metrics" service on MetricsPort; like L{http_listener}, binding it is fatal."""
    listener = strports.service(
        config.metrics_endpoint, metrics_site(fs.metrics, reactor), reactor=reactor
    )
    listener.setName("metrics")
    return listener


def sweeps(config: Config, fs: FileServer) -> list[IService]:
    """The sweeps one process runs for the whole StoreDir: stale partials, expired files."""
    return [
        PartialSweep(
            fs,
            resumableTTL=config.resumable_ttl,
            # In a shared object store, one node sweeps abandoned uploads for all; a local
            # StoreDir's temps are its own node's, so each sweeps its own.
            lease=(
                sweep_lease(config, fs.metadata, 3600, "partial-sweep")
                if config.storage_backend == "s3"
                else None
            ),
        ),
        ExpirySweep(
            fs,
            interval=config.expiry_interval,
            batch=config.expiry_batch,
            # One sweeper across the nodes sharing the store (None: the store is ours alone).
            lease=sweep_lease(config, fs.metadata, config.expiry_interval),
        ),
        *([DedupGauge(fs)] if getattr(fs.storage, "shares", False) else []),
    ]


def timers(config: Config, fs: FileServer, site: HmacfsSite, reactor: Any) -> list[IService]:
    """The timers every serving process runs for itself (GC, system monitor)."""
    found: list[IService] = []
    if config.gc_interval:
        found.append(GarbageCollector(config.gc_interval, reactor))
    if config.monitor_interval:
        found.append(SystemMonitor(fs, site, config.monitor_interval))
    if config.storage_backend == "s3":
        found.append(ObjectStoreService(fs.storage, fs.stop_threads))
    # Takedowns made elsewhere (the admin commands, other nodes) reach this process's
    # uploads within hmacd.takedown.REFRESH_INTERVAL.
    found.append(DenyListRefresh(fs.metadata, fs.denials, clock=reactor))
    if fs.audit is not None:
        found.append(AuditService(fs.audit))
    return found


def component_service(
    config: Config, secret: bytes, fs: FileServer, reactor: Any, **options: Any
) -> ComponentService:
    """
    The XMPP slot component of C{config}, signing with C{secret} for C{fs}; C{options} go
    to L{ComponentService} (timeouts, retry policy) and override the config's ping timing.
    """
    options = {
        "pingInterval": config.component_ping_interval,
        "pingTimeout": config.component_ping_timeout,
        **options,
    }
    issuer = SlotIssuer(
        secret=secret,
        public_url=config.public_url,
        protocol=config.component_protocol,
        max_size=config.upload_max_size,
        domains=frozenset(config.upload_domains),
        now=reactor.seconds,
    )
    limits = Limits.from_config(config)
    slots = SlotComponent(
        issuer,
        counted=lambda result: fs.metrics.slots.labels(result).inc(),
        quotas=Quotas(limits, fs.metadata, reactor) if limits else None,
        store=fs.metadata,
    )
    service = ComponentService(
        config.component_jid,
        config.component_secret,
        config.component_address,
        slots,
        reactor,
        onConnected=fs.metrics.component_connected.set,
        **options,
    )
    service.setName("component")
    return service
