"""
twistd plugin: options, and the one place where services are composed.

    twistd -n hmacfs --config etc/config.toml

C{Options.postOptions} only validates.  C{makeService} prepares StoreDir and the secret
(L{hmacd.prepare}; twistd calls it before it drops privileges and before anything listens)
and composes the builders of L{hmacd.services} into one L{HmacfsService}.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
from typing import Any

from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from hmacd import logs
from hmacd.config import Config, ConfigError, load_config
from hmacd.metrics import share_between_processes
from hmacd.prepare import Prepared, PrepareError, prepare_store
from hmacd.secret import ENV_VAR
from hmacd.services import (
    LISTEN_BACKLOG,
    Announce,
    HmacfsService,
    StoreService,
    build_file_server,
    build_metadata,
    component_service,
    http_listener,
    metrics_listener,
    sweeps,
    timers,
    with_backlog,
)
from hmacd.store.failover import FailoverStore
from hmacd.web import HmacfsSite
from hmacd.workers import WorkerPool

__all__ = [
    "LISTEN_BACKLOG",
    "HmacfsService",
    "Options",
    "StoreService",
    "build_metadata",
    "build_service",
    "component_service",
    "makeService",
    "prepare",
    "with_backlog",
]


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

    config: Config

    def postOptions(self) -> None:
        # Everything a user can get wrong in the options is checked here, before twistd
        # daemonizes or anything listens, and reported as one line; nothing is created.
        path = self["config"]
        try:
            config = load_config(path) if path else Config()
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        where = path or "defaults"
        _checkEndpoint(where, "ListenPort", config.listen_endpoint)
        if config.metrics_enabled:
            _checkEndpoint(where, "MetricsPort", config.metrics_endpoint)
        # The secret itself is read when StoreDir is prepared; an empty one is refused now.
        for value, origin in ((self["secret"], "--secret"), (os.environ.get(ENV_VAR), ENV_VAR)):
            if value is not None:
                if not value:
                    raise usage.UsageError(f"{origin}: the secret must not be empty")
                break
        parent = getattr(self, "parent", None)
        if config.log_file:
            _checkLogFile(where, config.log_file)
        elif parent is not None and parent.get("logfile") == "-" and not parent.get("nodaemon"):
            raise usage.UsageError("a daemon cannot log to stdout: use -n or another --logfile")
        self.config = dataclasses.replace(config, store_dir=os.path.abspath(config.store_dir))
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


def _checkEndpoint(where: str, key: str, description: str) -> None:
    """An endpoint string Twisted cannot build is a usage error naming its key."""
    try:
        # Parsed only, never listened on: no reactor is needed for that (ssl: reads the
        # certificate and key now, which is the point).
        serverFromString(None, description)
    except (ValueError, TypeError, OSError) as e:
        raise usage.UsageError(f"{where}: {key}: {e}") from None


def _checkLogFile(where: str, logFile: str) -> None:
    """A LogFile that could not be opened for appending is a usage error, not a traceback."""
    directory = os.path.dirname(os.path.abspath(logFile))
    if os.path.exists(logFile):
        problem = None if os.access(logFile, os.W_OK) else "Permission denied"
    elif not os.path.isdir(directory):
        problem = "No such file or directory"
    else:
        problem = None if os.access(directory, os.W_OK | os.X_OK) else "Permission denied"
    if problem is not None:
        raise usage.UsageError(f"{where}: LogFile: cannot open {logFile}: {problem}")


def _runAs(parent: Any) -> tuple[int, int] | None:
    """The uid and gid twistd will switch to (--uid/--gid), if any."""
    if parent is None or (parent.get("uid") is None and parent.get("gid") is None):
        return None
    uid = os.getuid() if parent.get("uid") is None else parent["uid"]
    gid = parent.get("gid")
    if gid is None:
        gid = pwd.getpwuid(uid).pw_gid
    return uid, gid


def prepare(options: Options) -> Prepared:
    """
    StoreDir, the secret, and what --uid must own, ready for C{options} (validated by
    twistd already).

    @raise SystemExit: with one line for the admin; twistd has started nothing yet.
    """
    config = options.config
    try:
        return prepare_store(
            config,
            cli_secret=options["secret"],
            run_as=_runAs(getattr(options, "parent", None)),
            shared_metrics=config.workers > 1,
        )
    except PrepareError as e:
        raise SystemExit(str(e)) from None


def build_service(
    config: Config,
    secret: bytes,
    reactor: Any,
    secretOrigin: str = "the caller",
    metadata: FailoverStore | None = None,
    listen: bool = True,
    metricsDir: str | None = None,
) -> HmacfsService:
    """
    The hmacfs services of a server's main process for C{config}: announce, the metadata
    stores, the listener, the sweeps, the metrics listener, the component and the timers.

    With C{listen=False} there is no listener of its own (a host Site serves
    C{fileServer}, see L{hmacd.mount}).  With C{Workers} above 1 (and C{listen}), the
    listener is a L{WorkerPool} sharing metrics in C{metricsDir}, which the caller has
    prepared (L{hmacd.prepare.prepare_store}) and switched this process to
    (L{hmacd.metrics.share_between_processes}).
    """
    if metadata is None:
        metadata = build_metadata(config, reactor)
    pool = listen and config.workers > 1
    if pool and metricsDir is None:
        raise ValueError("Workers > 1 needs the metrics directory that prepare_store made")
    fs = build_file_server(config, secret, reactor, metadata, metricsDir if pool else None)
    site = HmacfsSite(fs)
    top = HmacfsService(fs)
    children: list[IService] = [
        Announce(config, secretOrigin, len(secret)),
        StoreService(metadata, fs, config.shutdown_grace),
    ]
    if pool:
        endpoint = serverFromString(reactor, with_backlog(config.listen_endpoint))
        children.append(WorkerPool(endpoint, site, config, secret, reactor, metricsDir))
    elif listen:
        children.append(http_listener(config, site, reactor))
    children += sweeps(config, fs)
    if config.metrics_enabled:
        children.append(metrics_listener(config, fs, reactor))
    if config.component_jid:
        children.append(component_service(config, secret, fs, reactor))
    children += timers(config, fs, site, reactor)
    for child in children:
        child.setServiceParent(top)
    return top


def build_prepared(prepared: Prepared, reactor: Any, listen: bool = True) -> HmacfsService:
    """
    The services of a prepared store (L{hmacd.prepare.prepare_store}), for twistd and for
    L{hmacd.make_service} alike.  With Workers, prometheus_client is switched to values
    shared between processes, for this whole process: it asked for processes of hmacfs's own.
    """
    if prepared.metrics_dir is not None:
        share_between_processes(prepared.metrics_dir)
    return build_service(
        prepared.config,
        prepared.secret,
        reactor,
        prepared.origin,
        listen=listen,
        metricsDir=prepared.metrics_dir,
    )


def makeService(options: Options) -> HmacfsService:
    from twisted.internet import reactor

    return build_prepared(prepare(options), reactor)
