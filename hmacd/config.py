"""hmacfs configuration: a TOML file read into a frozen :class:`Config`.

The key names are the Go HMAC File Server's, so its config files work unchanged, and they match
case-insensitively because prosody-filer configs spell the same keys ``listenport`` or
``storeDir``.  Everything a user can get wrong becomes a :class:`ConfigError` whose text is one
line naming the file and the key, so the service can print it and exit before anything listens.

Nothing here imports Twisted: the endpoint strings are only built here and are checked against
``serverFromString`` in the tests.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

from hmacd import config_values as cv
from hmacd.address import DEFAULT_DB_PORTS, HostPort
from hmacd.endpoints import listen_endpoint
from hmacd.units import parse_size, show, show_key, toml_type

__all__ = [
    "KEYS",
    "KEY_DOCS",
    "SECRET_FIELDS",
    "Config",
    "ConfigError",
    "listen_endpoint",
    "load_config",
    "parse_config",
    "parse_size",
]


class ConfigError(Exception):
    """A configuration the user has to fix; ``str(e)`` is one line meant for them.

    The line names the file and, when there is one, the key, e.g.
    ``etc/config.toml: UploadMaxSize: must be a size >= 0 (bytes, or a string like "10GB"),
    got -5``;
    a TOML syntax error carries TOML's own message with line and column, an unreadable file the
    OS reason.  ``source`` and ``key`` are kept apart too, for callers that want them.
    """

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None) -> None:
        super().__init__(message)
        self.source = source
        self.key = key


# S3's smallest multipart part (all but the last): S3PartSize and S3MultipartThreshold.
S3_MIN_PART = 5 * 1024 * 1024

# ---------------------------------------------------------------------------------------------
# The table

# A key is one line here: its Go-style name, default, converter and a one-line meaning, kept
# in the field's metadata.  KEYS, the converters parse_config runs, SECRET_FIELDS, the key list
# of etc/config.toml and README's table (both checked by tests/test_config.py) all come from it.


def _key(
    name: str,
    default: Any,
    convert: Callable[[object], object],
    doc: str,
    *,
    secret: bool = False,
) -> Any:
    """A Config field read from the TOML key C{name} through C{convert}."""
    metadata = {"key": name, "convert": convert, "doc": doc, "secret": secret}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True, repr=False)
class Config:
    """Every setting hmacfs reads, already validated and normalised by :func:`parse_config`.

    Frozen so that one object can be handed to every service without anyone changing it under
    the others; the defaults are what an empty file means.
    """

    listen_port: str = _key(
        "ListenPort",
        "127.0.0.1:8080",
        cv.address,
        '``":8080"``, ``"127.0.0.1:8080"``, ``"[::]:5050"``, or a Twisted endpoint'
        " (``tcp:8080``, ``ssl:8443:...``, ``unix:/run/hmacfs.sock``)",
    )
    unix_socket: bool = _key(
        "UnixSocket", False, cv.boolean, "``ListenPort`` is a Unix socket path"
    )
    secret: str | None = _key(
        "Secret", None, cv.secret, "shared secret (see Quick start)", secret=True
    )
    previous_secrets: tuple[str, ...] = _key(
        "PreviousSecrets",
        (),
        cv.previous_secrets,
        "still verify slots after a change of ``Secret``",
        secret=True,
    )
    store_dir: str = _key("StoreDir", "./uploads", cv.store_dir, "where files are kept")
    upload_subdir: str = _key(
        "UploadSubDir", "upload", cv.upload_subdir, "URL prefix of the upload space"
    )
    log_level: str = _key(
        "LogLevel", "info", cv.log_level, "``debug``, ``info``, ``warn``, ``error``"
    )
    log_file: str = _key("LogFile", "", cv.string, "file to log to")
    audit_log: str = _key(
        "AuditLog", "", cv.string, "append-only JSON-lines audit log (see Audit log); off if empty"
    )
    redis_addr: str = _key("RedisAddr", "", cv.redis_addr, "metadata in Redis (``host:port``)")
    redis_password: str = _key("RedisPassword", "", cv.string, "Redis password", secret=True)
    redis_db: int = _key("RedisDB", 0, cv.nonnegative_int, "Redis database number")
    fallback_enabled: bool = _key(
        "FallbackEnabled", False, cv.boolean, "SQL store (fallback of Redis, or the store)"
    )
    fallback_db_type: str = _key(
        "FallbackDBType", "postgres", cv.db_type, "``postgres`` or ``mysql``"
    )
    fallback_db_host: str = _key(
        "FallbackDBHost", "localhost", cv.db_host, "``host`` or ``host:port``"
    )
    fallback_db_user: str = _key("FallbackDBUser", "", cv.string, "SQL user name")
    fallback_db_password: str = _key(
        "FallbackDBPassword", "", cv.string, "SQL password", secret=True
    )
    fallback_db_name: str = _key(
        "FallbackDBName", "", cv.string, "required with ``FallbackEnabled``"
    )
    metrics_enabled: bool = _key(
        "MetricsEnabled", False, cv.boolean, "Prometheus metrics at ``/metrics``"
    )
    metrics_port: str = _key(
        "MetricsPort", "127.0.0.1:9090", cv.address, "same forms as ``ListenPort``"
    )
    chunk_size: int = _key(
        "ChunkSize", 1048576, cv.size(1), "write buffer of each upload, at most 64 KiB used"
    )
    upload_max_size: int = _key("UploadMaxSize", 0, cv.size(0), "413 above this")
    user_quota: int = _key(
        "UserQuota", 0, cv.size(0), "bytes stored per uploader (0: no limit); see Quotas"
    )
    user_daily_quota: int = _key(
        "UserDailyQuota", 0, cv.size(0), "bytes uploaded per uploader in 24 h (0: no limit)"
    )
    global_quota: int = _key("GlobalQuota", 0, cv.size(0), "bytes stored in all (0: no limit)")
    uploader_from_path: bool = _key(
        "UploaderFromPath",
        False,
        cv.boolean,
        "the first path segment names the uploader (ejabberd's per-user hash)",
    )
    min_free_space: int = _key(
        "MinFreeSpace",
        67108864,
        cv.size(0),
        "space kept free: 507, before the body, for an upload whose declared size does not"
        " fit in the rest",
    )
    max_bytes_per_second: int = _key(
        "MaxBytesPerSecond",
        0,
        cv.size(0),
        "bandwidth cap of each upload (the transport is paused)",
    )
    max_total_bytes_per_second: int = _key(
        "MaxTotalBytesPerSecond", 0, cv.size(0), "bandwidth cap shared by all uploads"
    )
    file_ttl: int = _key("FileTTL", 0, cv.duration, "how long uploads are kept")
    resumable_ttl: int = _key(
        "ResumableTTL", 86400, cv.duration, "seconds an unfinished resumable upload is kept"
    )
    expiry_interval: int = _key(
        "ExpiryInterval",
        60,
        cv.positive_duration,
        "seconds between expiry sweeps (at least 1)",
    )
    expiry_batch: int = _key(
        "ExpiryBatch", 200, cv.positive_int, "records an expiry sweep deletes per batch"
    )
    gc_interval: int = _key(
        "GCInterval", 30, cv.duration, "seconds between ``gc.collect()`` (0: off)"
    )
    monitor_interval: int = _key(
        "MonitorInterval", 10, cv.duration, "seconds between status lines (0: off)"
    )
    shutdown_grace: int = _key(
        "ShutdownGrace", 30, cv.duration, "seconds uploads may finish in at shutdown"
    )
    workers: int = _key("Workers", 1, cv.workers, "processes serving the upload port (see below)")
    rate_limit_per_minute: int = _key(
        "RateLimitPerMinute",
        0,
        cv.nonnegative_int,
        "requests per minute per client address (429 past it)",
    )
    rate_limit_burst: int = _key(
        "RateLimitBurst", 0, cv.nonnegative_int, "requests a client may make at once"
    )
    rate_limit_shared: bool = _key(
        "RateLimitShared", False, cv.boolean, "rate-limit buckets in Redis, shared by all nodes"
    )
    node_name: str = _key("NodeName", "", cv.string, "this node among nodes sharing a store")
    trusted_proxies: tuple[str, ...] = _key(
        "TrustedProxies",
        (),
        cv.networks,
        "proxies whose ``X-Forwarded-For`` names the client",
    )
    header_timeout: int = _key(
        "HeaderTimeout",
        20,
        cv.duration,
        "seconds a request head may take (408 past it; 0: off)",
    )
    max_connections_per_client: int = _key(
        "MaxConnectionsPerClient",
        100,
        cv.nonnegative_int,
        "connections per client address (0: no cap)",
    )
    min_upload_bytes_per_second: int = _key(
        "MinUploadBytesPerSecond",
        0,
        cv.size(0),
        "slowest upload body kept, averaged over the window",
    )
    min_upload_rate_window: int = _key(
        "MinUploadRateWindow",
        30,
        cv.duration,
        "seconds ``MinUploadBytesPerSecond`` is averaged over",
    )
    # The XEP-0363 slot component (XEP-0114), on when ComponentJID is set.
    component_jid: str = _key(
        "ComponentJID",
        "",
        cv.domain_or_empty,
        "the XMPP slot component's JID (turns it on)",
    )
    component_secret: str = _key(
        "ComponentSecret",
        "",
        cv.component_secret,
        "its component password on the XMPP server",
        secret=True,
    )
    component_server: str = _key(
        "ComponentServer",
        "",
        cv.component_server,
        "``host:port`` of the server's component listener",
    )
    component_allowed_domains: tuple[str, ...] = _key(
        "ComponentAllowedDomains",
        (),  # () = the domain ComponentJID is under
        cv.domains,
        "domains whose users may ask for slots",
    )
    component_protocol: str = _key(
        "ComponentProtocol",
        "v2",
        cv.component_protocol,
        "how its slots are signed: ``v``, ``v2``, ``token``, ``jwt``",
    )
    # A link that stops answering is noticed within interval + timeout seconds (README says 30).
    component_ping_interval: int = _key(
        "ComponentPingInterval",
        15,
        cv.duration,
        "seconds between its keepalive pings (0: none)",
    )
    component_ping_timeout: int = _key(
        "ComponentPingTimeout",
        15,
        cv.ping_timeout,
        "seconds a ping may go unanswered before it reconnects",
    )
    public_url: str = _key(
        "PublicURL",
        "",
        cv.public_url,
        "the upload space as clients reach it, for its slots",
    )
    storage_backend: str = _key(
        "StorageBackend",
        "local",
        cv.choice({"local": "local", "s3": "s3"}, 'must be "local" or "s3"'),
        "where file bytes live: ``local`` (StoreDir) or ``s3``",
    )
    deduplication: bool = _key(
        "Deduplication",
        False,
        cv.boolean,
        "identical uploads share their bytes",
    )
    sync_uploads: bool = _key(
        "SyncUploads",
        True,
        cv.boolean,
        "a 201 waits for the disk (fsync); ``false``: the Go server's trade-off",
    )
    io_uring: bool = _key(
        "IoUring",
        True,
        cv.boolean,
        "a batch of small uploads' fsyncs go to the kernel together (io_uring, where Linux"
        " allows it); ``false``: one at a time",
    )
    s3_endpoint: str = _key("S3Endpoint", "", cv.string, "S3 URL, ``http://host:port``")
    s3_region: str = _key("S3Region", "us-east-1", cv.string, "S3 region (signing)")
    s3_bucket: str = _key("S3Bucket", "", cv.string, "S3 bucket of the files")
    s3_prefix: str = _key("S3Prefix", "", cv.string, "key prefix inside ``S3Bucket``")
    s3_access_key: str = _key(
        "S3AccessKey", "", cv.string, "or ``HMACFS_S3_ACCESS_KEY``", secret=True
    )
    s3_secret_key: str = _key(
        "S3SecretKey", "", cv.string, "or ``HMACFS_S3_SECRET_KEY``", secret=True
    )
    s3_addressing_style: str = _key(
        "S3AddressingStyle",
        "path",
        cv.choice({"path": "path", "virtual": "virtual"}, 'must be "path" or "virtual"'),
        "``path`` or ``virtual`` (bucket in the host name)",
    )
    s3_redirect_downloads: bool = _key(
        "S3RedirectDownloads", False, cv.boolean, "GET: 302 to a presigned URL of the store"
    )
    s3_stream_uploads: bool = _key(
        "S3StreamUploads",
        True,
        cv.boolean,
        "large bodies sent to their name as they arrive",
    )
    # S3 refuses parts under 5 MiB (but the last): so do these two.
    s3_multipart_threshold: int = _key(
        "S3MultipartThreshold",
        16 * 1024 * 1024,
        cv.size(S3_MIN_PART),
        "multipart above this (at least 5MB)",
    )
    s3_part_size: int = _key(
        "S3PartSize",
        8 * 1024 * 1024,
        cv.size(S3_MIN_PART),
        "bytes per multipart part (at least 5MB)",
    )
    source: str | None = None

    def s3_credentials(self, environ: Mapping[str, str]) -> tuple[str, str]:
        """S3AccessKey and S3SecretKey, each from the file or else from the environment
        (``HMACFS_S3_ACCESS_KEY``, ``HMACFS_S3_SECRET_KEY``), so that no secret need be in
        the file."""
        return (
            self.s3_access_key or environ.get("HMACFS_S3_ACCESS_KEY", ""),
            self.s3_secret_key or environ.get("HMACFS_S3_SECRET_KEY", ""),
        )

    # The listeners too are read once: parse_config checks them by reading them.

    @cached_property
    def listen_endpoint(self) -> str:
        """The upload listener as a ``serverFromString`` description, so tap.py need not know
        the Go server's address syntax."""
        return listen_endpoint(self.listen_port, self.unix_socket)

    @cached_property
    def metrics_endpoint(self) -> str:
        """The Prometheus listener; ``UnixSocket`` only ever applies to the upload listener."""
        return listen_endpoint(self.metrics_port)

    @property
    def upload_domains(self) -> tuple[str, ...]:
        """Whose users the slot component serves: ComponentAllowedDomains, or else the domain
        the component is under (``upload.example.org`` serves ``example.org``)."""
        if self.component_allowed_domains:
            return self.component_allowed_domains
        return (self.component_jid.partition(".")[2],) if self.component_jid else ()

    # The host:port keys, parsed by the one parser that checked them.  Cached: a Config is
    # frozen, so each is parsed at most once, and not at all when nothing connects there.

    @cached_property
    def redis_address(self) -> HostPort | None:
        """RedisAddr as a HostPort, or None when there is no Redis."""
        return HostPort.parse(self.redis_addr) if self.redis_addr else None

    @cached_property
    def fallback_db_address(self) -> HostPort:
        """FallbackDBHost as a HostPort, with FallbackDBType's usual port when it names none."""
        return HostPort.parse(self.fallback_db_host, DEFAULT_DB_PORTS[self.fallback_db_type])

    @cached_property
    def component_address(self) -> HostPort:
        """ComponentServer as a HostPort (a (host, port) tuple; IPv6 without brackets)."""
        return HostPort.parse(self.component_server.strip())

    @property
    def secret_bytes(self) -> bytes | None:
        """The HMAC key: Prosody and ejabberd key their MACs with the UTF-8 bytes of the secret."""
        return None if self.secret is None else self.secret.encode("utf-8")

    def __repr__(self) -> str:
        # A Config gets logged at startup: show that a secret is set, never what it is.
        parts = []
        for f in fields(self):
            value = getattr(self, f.name)
            shown = "'***'" if f.name in SECRET_FIELDS and value else repr(value)
            parts.append(f"{f.name}={shown}")
        return f"{type(self).__name__}({', '.join(parts)})"


# What the rest of this module (and hmacfs) reads off the table.
_TABLE = tuple(f for f in fields(Config) if "key" in f.metadata)
KEYS: dict[str, str] = {f.metadata["key"]: f.name for f in _TABLE}
KEY_DOCS: dict[str, str] = {f.metadata["key"]: f.metadata["doc"] for f in _TABLE}
_CONVERTERS: dict[str, Callable[[object], object]] = {
    f.metadata["key"]: f.metadata["convert"] for f in _TABLE
}
# Fields whose values must never reach a log line, a traceback or an error message.
SECRET_FIELDS = frozenset(f.name for f in _TABLE if f.metadata["secret"])
_CANONICAL = {key.lower(): key for key in KEYS}


def _error(source: str, key: str | None, reason: str) -> ConfigError:
    if key is None:
        return ConfigError(f"{source}: {reason}", source=source)
    return ConfigError(f"{source}: {show_key(key)}: {reason}", source=source, key=key)


def _invalid(source: str, key: str, canonical: str, problem: cv.Invalid) -> ConfigError:
    reason = problem.reason
    if problem.got is not cv.NOTHING:
        if KEYS[canonical] in SECRET_FIELDS:
            # Even a mistyped secret is a secret: name the type only.
            reason += f", got {toml_type(problem.got)}"
        elif problem.wrong_type and isinstance(problem.got, (list, Mapping)):
            reason += f", got {toml_type(problem.got)}"
        elif problem.wrong_type:
            reason += f", got {toml_type(problem.got)} {show(problem.got)}"
        else:
            reason += f", got {show(problem.got)}"
    return _error(source, key, reason)


def _unknown(source: str, key: str, value: object) -> ConfigError:
    if isinstance(value, Mapping):
        return _error(
            source,
            key,
            f"unknown table [{show_key(key)}]: hmacfs reads only top-level keys"
            ' (like "ListenPort" and "StoreDir")',
        )
    close = difflib.get_close_matches(key.lower(), list(_CANONICAL), n=1, cutoff=0.6)
    hint = f'; did you mean "{_CANONICAL[close[0]]}"?' if close else ""
    return _error(source, key, f"unknown key{hint}")


def parse_config(data: Mapping[str, object], source: str) -> Config:
    """A validated Config from an already-parsed TOML mapping; ConfigError on the first problem.

    Unknown keys are errors rather than ignored because a misspelt ``UploadMaxSize`` would
    otherwise silently mean "unlimited".
    """
    values: dict[str, object] = {}
    spelled: dict[str, str] = {}
    for key, raw in data.items():
        key = str(key)
        canonical = _CANONICAL.get(key.lower())
        if canonical is None:
            raise _unknown(source, key, raw)
        if canonical in spelled:
            raise _error(
                source,
                key,
                f'same key as "{spelled[canonical]}" (key names are case-insensitive);'
                " keep one of them",
            )
        spelled[canonical] = key
        try:
            values[KEYS[canonical]] = _CONVERTERS[canonical](raw)
        except cv.Invalid as problem:
            raise _invalid(source, key, canonical, problem) from None

    config = Config(**values, source=source)  # type: ignore[arg-type]

    def name(canonical: str) -> str:
        return spelled.get(canonical, canonical)

    if config.unix_socket and "ListenPort" not in spelled:
        raise _error(
            source,
            "ListenPort",
            "must be set to the socket path when UnixSocket is true",
        )
    checks: tuple[tuple[str, Callable[[], str]], ...] = (
        ("ListenPort", lambda: config.listen_endpoint),
        ("MetricsPort", lambda: config.metrics_endpoint),
    )
    for canonical, endpoint in checks:
        try:
            endpoint()
        except ValueError as e:
            raise _error(source, name(canonical), str(e)) from None
    component = ("ComponentJID", "ComponentSecret", "ComponentServer", "PublicURL")
    if any(getattr(config, KEYS[key]) for key in (*component, "ComponentAllowedDomains")):
        for canonical in component:
            if not getattr(config, KEYS[canonical]):
                raise _error(
                    source,
                    name(canonical),
                    "must be set for the XMPP component (" + ", ".join(component) + " go together)",
                )
        if not config.component_allowed_domains and "." not in config.component_jid:
            raise _error(
                source,
                name("ComponentAllowedDomains"),
                f"must list the domains whose users may upload: ComponentJID"
                f" {config.component_jid!r} is not under one",
            )
    if config.workers > 1:
        if config.listen_endpoint.partition(":")[0] not in ("tcp", "tcp6"):
            # A worker adopts the bare socket: TLS would reach it as plain HTTP, and a
            # worker stopping would unlink a unix socket's path from under the others.
            raise _error(
                source,
                name("ListenPort"),
                "Workers above 1 need a plain TCP listener (no UnixSocket, ssl: or systemd:)",
            )
        # Their counters live in each process: N workers would let N times the limit through.
        for canonical in ("RateLimitPerMinute", "MaxTotalBytesPerSecond"):
            if canonical == "RateLimitPerMinute" and config.rate_limit_shared:
                continue  # its buckets are in Redis, shared by every process
            if getattr(config, KEYS[canonical]):
                raise _error(
                    source,
                    name(canonical),
                    "cannot be enforced across processes: use it with Workers = 1",
                )
    if config.rate_limit_shared and not config.redis_addr:
        raise _error(source, name("RateLimitShared"), "needs RedisAddr: the buckets live in Redis")
    if config.min_upload_bytes_per_second and not config.min_upload_rate_window:
        # A floor judged over no time at all would cut every upload at its first byte.
        raise _error(
            source,
            name("MinUploadRateWindow"),
            "must be at least 1 second when MinUploadBytesPerSecond is set",
        )
    if config.fallback_enabled and not config.fallback_db_name:
        raise _error(source, name("FallbackDBName"), "must be set when FallbackEnabled is true")
    if config.storage_backend == "s3":
        for canonical in ("S3Endpoint", "S3Bucket"):
            if not getattr(config, KEYS[canonical]):
                raise _error(source, name(canonical), 'must be set when StorageBackend is "s3"')
        parts = urlsplit(config.s3_endpoint)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise _error(source, name("S3Endpoint"), 'must be a URL like "http://host:port"')
    return config


def _long_number_at(text: str) -> str:
    """Where the first run of digits too long for int() is, as " (line N)", or ""."""
    match = re.search(r"[0-9_]{4301,}", text)
    return f" (line {text.count(chr(10), 0, match.start()) + 1})" if match else ""


def load_config(path: str) -> Config:
    """Read and validate the TOML file at ``path``; every failure is a one-line ConfigError."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise _error(path, None, f"cannot read: {e.strerror or e}") from None
    try:
        # utf-8-sig: editors on Windows like to start the file with a BOM.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _error(path, None, f"not valid UTF-8 (byte {e.start})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _error(path, None, f"TOML syntax error: {e}") from None
    except ValueError:
        # tomllib converts integers with int(), which raises past 4,300 digits.
        raise _error(path, None, f"TOML integer too long to read{_long_number_at(text)}") from None
    except RecursionError:
        raise _error(path, None, "TOML arrays or tables nested too deeply") from None
    return parse_config(data, path)
