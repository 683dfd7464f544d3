"""
twistd plugin: options, and the one place where services are composed.

    twistd -n hmacfs --config etc/config.toml
"""

from __future__ import annotations

import dataclasses
import os

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.python import usage

from hmacd import logs
from hmacd.config import Config, ConfigError, load_config
from hmacd.core import FileServer
from hmacd.secret import SecretError, resolve_secret
from hmacd.web import HmacfsSite

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
        config = dataclasses.replace(config, store_dir=os.path.abspath(config.store_dir))
        try:
            os.makedirs(config.store_dir, exist_ok=True)
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


def build_service(
    config: Config, secret: bytes, reactor, secretOrigin: str = "the caller"
) -> IService:
    """The hmacfs services for C{config}, as one MultiService."""
    fs = FileServer(
        secret=secret,
        store_dir=config.store_dir,
        reactor=reactor,
        prefix=config.upload_subdir,
        upload_max_size=config.upload_max_size,
        chunk_size=config.chunk_size,
    )
    top = MultiService()
    _Announce(config, secretOrigin, len(secret)).setServiceParent(top)
    listener = StreamServerEndpointService(
        serverFromString(reactor, config.listen_endpoint), HmacfsSite(fs)
    )
    listener.setName("http")
    listener.setServiceParent(top)
    return top


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return build_service(options.config, options.secret, reactor, options.secretOrigin)
