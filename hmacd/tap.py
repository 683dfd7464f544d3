"""
twistd plugin: options, and the one place where services are composed.

    twistd -n hmacfs --config etc/config.toml
"""

from __future__ import annotations

import dataclasses
import os
import pwd

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from hmacd import facts, logs
from hmacd.claims import claims_file
from hmacd.component import ComponentService, SlotComponent, SlotIssuer
from hmacd.config import Config, ConfigError, load_config
from hmacd.core import FileServer
from hmacd.housekeeping import (
    ExpirySweep,
    GarbageCollector,
    PartialSweep,
    SystemMonitor,
    drain_uploads,
)
from hmacd.metrics import Metrics, metrics_site, share_between_processes
from hmacd.secret import SecretError, resolve_secret, secret_file
from hmacd.store.failover import FailoverStore
from hmacd.throttle import Bandwidth, RateLimiter, parse_networks
from hmacd.web import HmacfsSite
from hmacd.workers import WorkerPool, metrics_directory

__all__ = ["Options", "build_service", "makeService"]

log = Logger()


class Options(usage.Options):
    synopsis = "[--config FILE] [--secret SECRET]"
    longdesc = (
        "Serve XEP-0363 HTTP File Upload slots signed by an XMPP server (v, v2, "
        "token and JWT bearer tokens). Without --config, the embedded defaults: "
        "127.0.0.1:8080, files under ./uploads, a generated secret."
    )
    optParameters = [
        ["config", "c", None, "TOML config file (keys as in the Go HMAC File Server)."],
        [
            "secret",
            None,
            None,
            "Shared secret; overrides HMACFS_SECRET and Secret. Visible in ps: "
            "prefer HMACFS_SECRET.",
        ],
    ]

    def postOptions(self) -> None:
        # Everything a user can get wrong is checked here, before twistd
        # daemonizes or anything listens, and reported as one line.
        path = self["config"]
        try:
            config = load_config(path) if path else Config()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        where = path or "defaults"
        from twisted.internet import reactor

        try:
            serverFromString(reactor, config.listen_endpoint)
        except (ValueError, TypeError, OSError) as e:
            raise usage.UsageError(f"{where}: ListenPort: {e}") from None
        if config.metrics_enabled:
            try:
                serverFromString(reactor, config.metrics_endpoint)
            except (ValueError, TypeError, OSError) as e:
                raise usage.UsageError(f"{where}: MetricsPort: {e}") from None
        config = dataclasses.replace(config, store_dir=os.path.abspath(config.store_dir))
        parent = getattr(self, "parent", None)
        runAs = _runAs(parent)
        # What we create here as root must belong to the --uid twistd
        # switches to before serving, or every upload fails.
        created = []
        state = os.path.join(config.store_dir, ".hmacfs")
        hadState = os.path.isdir(state)
        try:
            if not os.path.isdir(config.store_dir):
                os.makedirs(config.store_dir)
                created.append(config.store_dir)
        except OSError as e:
            raise usage.UsageError(
                f"{where}: StoreDir: cannot create {config.store_dir}: {e.strerror}"
            ) from None
        try:
            self.secret, self.secretOrigin = resolve_secret(
                config.store_dir, config.secret, self["secret"]
            )
        except SecretError as e:
            raise usage.UsageError(str(e)) from None
        if not hadState and os.path.isdir(state):
            created += [state, secret_file(config.store_dir)]
        self.metricsDir = None
        if config.workers > 1:
            # Made here so that it can be handed to --uid with the rest: workers run as that
            # user and write their metrics into it.
            self.metricsDir = metrics_directory(config.store_dir)
            created.append(self.metricsDir)
        if config.log_file:
            created += _checkLogFile(where, config.log_file)
        elif parent is not None and parent.get("logfile") == "-" and not parent.get("nodaemon"):
            raise usage.UsageError("a daemon cannot log to stdout: use -n or another --logfile")
        if runAs is not None:
            created += _makeClaimsFile(where, config.store_dir)
            _handOver(where, created, config.store_dir, runAs)
        self.config = config
        self._takeOverLogging()

    def _takeOverLogging(self) -> None:
        """
        Give twistd a log observer that honours LogLevel and LogFile.

        twistd reads its `logger` option before it calls makeService, so
        this is the place; an explicit --logger or --syslog wins.
        """
        parent = getattr(self, "parent", None)
        if parent is None or parent.get("logger") or parent.get("syslog"):
            return
        default = logs.twistd_sink(parent.get("logfile"), bool(parent.get("nodaemon")))
        config = self.config
        parent["logger"] = logs.for_twistd(config.log_level, config.log_file, default)


def _runAs(parent) -> tuple[int, int] | None:
    """The uid and gid twistd will switch to (--uid/--gid), if any."""
    if parent is None or (parent.get("uid") is None and parent.get("gid") is None):
        return None
    uid = os.getuid() if parent.get("uid") is None else parent["uid"]
    gid = parent.get("gid")
    if gid is None:
        gid = pwd.getpwuid(uid).pw_gid
    return uid, gid


def _checkLogFile(where: str, logFile: str) -> list[str]:
    """Open LogFile once now, so that a bad one is a usage error, not a traceback."""
    existed = os.path.exists(logFile)
    try:
        with open(logFile, "a"):
            pass
    except OSError as e:
        raise usage.UsageError(f"{where}: LogFile: cannot open {logFile}: {e.strerror}") from None
    return [] if existed else [logFile]


def _handOver(where: str, created: list[str], storeDir: str, runAs: tuple[int, int]) -> None:
    uid, gid = runAs
    if os.geteuid() == 0:
        for path in created:
            os.chown(path, uid, gid)
    state = os.path.join(storeDir, ".hmacfs")
    # The files every upload writes, too: left by an earlier run as another user (root
    # without --uid), they would fail each upload with a 500 instead of start-up once.
    for path in (storeDir, state, claims_file(storeDir), os.path.join(state, "meta.sqlite3")):
        if os.path.exists(path) and not _writableBy(path, uid, gid):
            raise usage.UsageError(
                f"{where}: StoreDir: {path} is not writable by uid {uid} (--uid)"
            )


def _makeClaimsFile(where: str, storeDir: str) -> list[str]:
    """Create the claims file of uploads in progress now, so that --uid gets it with the rest."""
    path = claims_file(storeDir)
    if os.path.exists(path):
        return []
    made = []
    try:
        if not os.path.isdir(os.path.dirname(path)):
            os.mkdir(os.path.dirname(path), 0o700)
            made.append(os.path.dirname(path))
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600))
    except OSError as e:
        raise usage.UsageError(f"{where}: StoreDir: cannot create {path}: {e.strerror}") from None
    return [*made, path]


def _writableBy(path: str, uid: int, gid: int) -> bool:
    st = os.stat(path)
    if uid == 0 or (st.st_uid == uid and st.st_mode & 0o200):
        return True
    try:
        groups = os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
    except KeyError:
        groups = [gid]
    return bool(st.st_gid in groups and st.st_mode & 0o020) or bool(st.st_mode & 0o002)


class _Announce(Service):
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
        if os.path.isdir(c.store_dir) and not facts.probe(c.store_dir):
            log.warn(
                "{store} has no user extended attributes: each file's facts (type, hash, "
                "expiry) are kept in the metadata store only, and downloads need it",
                store=c.store_dir,
            )


def build_metadata(config: Config, reactor) -> FailoverStore:
    """
    The metadata stores C{config} asks for: Redis (with the SQL database as
    its fallback when FallbackEnabled), the SQL database alone, or, with
    neither configured, the embedded SQLite under StoreDir/.hmacfs/.
    """
    from hmacd.store.redis import RedisStore
    from hmacd.store.sql import SQLStore

    fallback = None
    if config.redis_addr:
        primary = RedisStore.from_config(config, reactor=reactor)
        if config.fallback_enabled:
            fallback = SQLStore.from_config(config, reactor=reactor)
    elif config.fallback_enabled:
        primary = SQLStore.from_config(config, reactor=reactor)
    else:
        path = os.path.join(config.store_dir, ".hmacfs", "meta.sqlite3")
        primary = SQLStore.sqlite(path, reactor=reactor)
    return FailoverStore(primary, fallback, clock=reactor)


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

    def stopService(self):
        super().stopService()
        d = Deferred.fromCoroutine(drain_uploads(self.fs, self.grace))
        d.addErrback(lambda f: log.failure("draining uploads failed", f))
        return d.addCallback(lambda _: self.store.stop())


def build_service(
    config: Config,
    secret: bytes,
    reactor,
    secretOrigin: str = "the caller",
    metadata: FailoverStore | None = None,
    listen: bool = True,
    worker: tuple[int, int] | None = None,
    metricsDir: str | None = None,
) -> IService:
    """
    The hmacfs services for C{config}, as one MultiService.

    Its C{fileServer} attribute is the L{FileServer}; with C{listen=False}
    there is no listener of its own (a host Site serves it, see
    L{hmacd.mount}).

    With C{Workers} above 1 (and C{listen}), the listener is a
    L{WorkerPool}, and prometheus_client is switched, for this whole process,
    to its multiprocess files in C{metricsDir} (made under StoreDir when not
    given).  C{worker}, a listening descriptor and its address family, makes
    the services of a worker process: it serves that socket and runs no
    sweep, metrics listener or component (L{hmacd.workers}).
    """
    if metadata is None:
        metadata = build_metadata(config, reactor)
    pool = listen and worker is None and config.workers > 1
    if pool:
        metricsDir = metricsDir or metrics_directory(config.store_dir)
        share_between_processes(metricsDir)
    fs = FileServer(
        secret=secret,
        store_dir=config.store_dir,
        reactor=reactor,
        metadata=metadata,
        prefix=config.upload_subdir,
        upload_max_size=config.upload_max_size,
        min_free_space=config.min_free_space,
        chunk_size=config.chunk_size,
        file_ttl=config.file_ttl,
        limiter=(
            RateLimiter(config.rate_limit_per_minute, config.rate_limit_burst, reactor)
            if config.rate_limit_per_minute
            else None
        ),
        trusted_proxies=parse_networks(config.trusted_proxies),
        max_bytes_per_second=config.max_bytes_per_second,
        total_bandwidth=(
            Bandwidth(config.max_total_bytes_per_second, reactor)
            if config.max_total_bytes_per_second
            else None
        ),
        metrics=Metrics(shared=metricsDir if pool else None),
        header_timeout=config.header_timeout,
        max_connections_per_client=config.max_connections_per_client,
        min_upload_bytes_per_second=config.min_upload_bytes_per_second,
        min_upload_rate_window=config.min_upload_rate_window,
    )
    fs.metrics.watch_stores(metadata)
    top = MultiService()
    top.fileServer = fs
    if worker is None:
        _Announce(config, secretOrigin, len(secret)).setServiceParent(top)
    StoreService(metadata, fs, config.shutdown_grace).setServiceParent(top)
    site = HmacfsSite(fs)
    if worker is not None:
        _Adopted(reactor, *worker, site).setServiceParent(top)
        _background(config, fs, site, reactor, top)
        return top
    if listen:
        endpoint = serverFromString(reactor, with_backlog(config.listen_endpoint))
        if pool:
            listener = WorkerPool(endpoint, site, config, secret, reactor, metricsDir)
        else:
            listener = StreamServerEndpointService(endpoint, site)
            # A port that cannot be bound stops start-up (twistd exits non-zero)
            # instead of leaving a process that serves nothing.
            listener._raiseSynchronously = True
            listener.setName("http")
        listener.setServiceParent(top)
    PartialSweep(fs, resumableTTL=config.resumable_ttl).setServiceParent(top)
    ExpirySweep(fs, interval=config.expiry_interval, batch=config.expiry_batch).setServiceParent(
        top
    )
    if config.metrics_enabled:
        metrics = StreamServerEndpointService(
            serverFromString(reactor, config.metrics_endpoint), metrics_site(fs.metrics, reactor)
        )
        metrics._raiseSynchronously = True
        metrics.setName("metrics")
        metrics.setServiceParent(top)
    if config.component_jid:
        component_service(config, secret, fs, reactor).setServiceParent(top)
    _background(config, fs, site, reactor, top)
    return top


def _background(config: Config, fs: FileServer, site, reactor, top: MultiService) -> None:
    """The timers every serving process runs for itself."""
    if config.gc_interval:
        GarbageCollector(config.gc_interval, reactor).setServiceParent(top)
    if config.monitor_interval:
        SystemMonitor(fs, site, config.monitor_interval).setServiceParent(top)


class _Adopted(Service):
    """A worker's listener: the main process's listening socket, adopted."""

    name = "http"
    port = None

    def __init__(self, reactor, fd: int, family: int, site) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family
        self.site = site

    def startService(self) -> None:
        super().startService()
        self.port = self.reactor.adoptStreamPort(self.fd, self.family, self.site)
        os.close(self.fd)  # the port has a duplicate of it

    def stopService(self):
        super().stopService()
        return self.port.stopListening()


# Twisted listens with a backlog of 50: 500 clients connecting at once overflowed it, and the
# kernel reset some of them after their handshake (bench/run's slow uploads).  The kernel
# caps this at net.core.somaxconn.
LISTEN_BACKLOG = 1024


def with_backlog(description: str) -> str:
    """A listening endpoint description with LISTEN_BACKLOG, unless it names a backlog."""
    kind = description.partition(":")[0]
    if kind in ("tcp", "tcp6", "unix") and "backlog=" not in description:
        return f"{description}:backlog={LISTEN_BACKLOG}"
    return description


def component_service(config: Config, secret: bytes, fs: FileServer, reactor, **options):
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
    slots = SlotComponent(issuer, counted=lambda result: fs.metrics.slots.labels(result).inc())
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


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return build_service(
        options.config,
        options.secret,
        reactor,
        options.secretOrigin,
        metricsDir=options.metricsDir,
    )
