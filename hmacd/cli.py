"""
The C{hmacfs} command: sign slots, upload files, check configs, rebuild records.

    hmacfs sign [--config F] [--protocol v|v2|token|jwt] [--base-url URL] PATH SIZE [TYPE]
    hmacfs upload FILE URL [--header 'Authorization: Bearer ...'] [--chunk-size N]
    hmacfs check-config FILE
    hmacfs reindex --config FILE
    hmacfs admin quota show|reset|rebuild --config FILE ...
    hmacfs admin ls|rm|lift|takedowns|purge|stats --config FILE ...  (see hmacd.admin)

User mistakes are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time

from hmacd import admin_quota, auth
from hmacd.config import SECRET_FIELDS, Config, ConfigError, load_config, parse_size
from hmacd.secret import ENV_VAR, SecretError, resolve_previous_secrets, secret_file

__all__ = ["main", "run", "upload_file"]


class UserError(Exception):
    """A mistake the user can fix; the message is the whole story."""


def _config(path: str | None) -> Config:
    try:
        return load_config(path) if path else Config()
    except ConfigError as e:
        raise UserError(str(e)) from None


def _secret(config: Config, given: str | None) -> bytes:
    """The server's secret: --secret, HMACFS_SECRET, Secret, or the generated file."""
    for value in (given, os.environ.get(ENV_VAR), config.secret):
        if value:
            return value.encode("utf-8")
    path = secret_file(os.path.abspath(config.store_dir))
    try:
        with open(path, "rb") as f:
            return f.read().strip()
    except OSError as e:
        raise UserError(
            f"no secret: give --secret, set {ENV_VAR}, set Secret in the config, "
            f"or run where {path} is readable ({e.strerror})"
        ) from None


_TCP_ENDPOINT = re.compile(r"(tcp6?):([0-9]+)(?::interface=(.+))?")


def _default_base_url(config: Config) -> str:
    """http://host:port/<UploadSubDir>/ of a TCP ListenPort, by the server's own parser."""
    match = _TCP_ENDPOINT.fullmatch(config.listen_endpoint)
    if match is None:
        raise UserError(
            f"cannot tell a URL from ListenPort {config.listen_port!r}: give --base-url"
        )
    kind, port, interface = match.groups()
    host = (interface or "").replace("\\:", ":")
    if host in ("", "0.0.0.0", "::"):  # every interface: loopback is one of them
        host = "::1" if kind == "tcp6" else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    prefix = f"{config.upload_subdir}/" if config.upload_subdir else ""
    return f"http://{host}:{port}/{prefix}"


def _sign(args) -> int:
    config = _config(args.config)
    secret = _secret(config, args.secret)
    base = args.base_url or _default_base_url(config)
    try:
        url, headers = auth.slot_put(
            secret, base, args.path, args.size, args.type, args.protocol, time.time(), args.lifetime
        )
    except ValueError as e:
        raise UserError(str(e)) from None
    print(url)
    for name, value in headers.items():
        print(f"{name}: {value}")
    return 0


def _check_config(args) -> int:
    config = _config(args.file)
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if field.name in SECRET_FIELDS and value:
            value = "***"
        print(f"{field.name} = {value!r}")
    print(f"listen endpoint = {config.listen_endpoint}")
    for warning in _secret_warnings(config, os.environ):
        print(f"hmacfs check-config: warning: {warning}", file=sys.stderr)
    return 0


def _secret_warnings(config: Config, environ) -> list[str]:
    """
    What check-config says about the previous secrets: one equal to the current secret (it
    verifies nothing the current one does not: the rotation was not done), or twice in the
    list.  Positions only, never a secret.
    """
    try:
        previous, origin = resolve_previous_secrets(config.previous_secrets, environ)
    except SecretError as e:
        raise UserError(str(e)) from None
    where = "PreviousSecrets" if origin == "the config file" else origin
    current = environ.get(ENV_VAR) or config.secret
    currentName = ENV_VAR if environ.get(ENV_VAR) else "Secret"
    warnings = []
    seen: dict[str, int] = {}
    for position, value in enumerate(previous, 1):
        if current is not None and value == current:
            warnings.append(
                f"{where}: previous secret #{position} equals the current secret"
                f" ({currentName}); change {currentName} to the new secret, or drop #{position}"
            )
        elif value in seen:
            warnings.append(f"{where}: previous secret #{position} repeats #{seen[value]}")
        seen.setdefault(value, position)
    return warnings


def _reindex(args) -> int:
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    config = _config(args.config)
    store_dir = os.path.abspath(config.store_dir)
    if not os.path.isdir(store_dir):
        raise UserError(f"StoreDir {store_dir}: no such directory")
    config = dataclasses.replace(config, store_dir=store_dir)
    result: list[int] = []

    def go(reactor):
        return Deferred.fromCoroutine(_reindexWith(reactor, config, result))

    try:
        react(go)
    except SystemExit as e:
        if e.code not in (0, None):
            return 1
    return result[0] if result else 1


async def _reindexWith(reactor, config: Config, result: list[int]) -> None:
    from hmacd.reindex import open_storage, reindex, worker_threads
    from hmacd.services import build_metadata, start_for_command
    from hmacd.storage import StorageUnavailable
    from hmacd.store import StoreUnavailable

    if config.storage_backend == "s3" and not all(config.s3_credentials(os.environ)):
        # Nothing is sent unsigned: without both keys the store can only refuse.
        print(
            "hmacfs reindex: S3AccessKey/S3SecretKey: not set (nor HMACFS_S3_ACCESS_KEY/"
            "HMACFS_S3_SECRET_KEY in the environment)",
            file=sys.stderr,
        )
        result.append(1)
        return
    try:
        storage, release = open_storage(config, reactor, os.environ)
    except ValueError as e:  # a Config made without load_config's checks
        print(f"hmacfs reindex: {e}", file=sys.stderr)
        result.append(1)
        return
    # The walk and the reads (an object store's blocking calls wait on this reactor).
    blocking, stop_workers = worker_threads(reactor)
    store = build_metadata(config, reactor)
    try:
        why = await start_for_command(store)
        if why is not None:
            print(f"hmacfs reindex: no metadata store is reachable: {why}", file=sys.stderr)
            result.append(1)
            return
        try:
            counts = await reindex(store, storage, config.file_ttl, blocking)
        except StoreUnavailable as e:
            print(f"hmacfs reindex: the metadata store stopped answering: {e}", file=sys.stderr)
            result.append(1)
            return
        except StorageUnavailable as e:
            print(f"hmacfs reindex: {_object_store_trouble(config, e)}", file=sys.stderr)
            result.append(1)
            return
        print(f"hmacfs reindex: {store.name}: {counts.summary()}")
        result.append(0)
    finally:
        stop_workers()  # idle by now: every call they ran has returned
        await store.stop()
        await release()


def _object_store_trouble(config: Config, error: Exception) -> str:
    """
    One line on an object store that cannot be read: it names the store, and the
    credential keys when it refused them (the access key, never the secret).
    """
    from hmacd.s3 import S3Refused

    cause = getattr(error, "error", error)  # StoreFailed: the client's own error
    text = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    if isinstance(cause, S3Refused):
        return f"S3AccessKey/S3SecretKey: {text}"
    return f"object store {config.s3_endpoint} (bucket {config.s3_bucket!r}): {text}"


def _upload(args) -> int:
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    headers = {}
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            raise UserError(f"--header {header!r}: expected 'Name: value'")
        headers[name.strip()] = value.strip()
    if not os.path.isfile(args.file):
        raise UserError(f"{args.file}: no such file")
    chunk = parse_size(args.chunk_size) if args.chunk_size else Config().chunk_size * 8
    progress = sys.stderr.isatty() and not args.quiet
    result: list[int] = []

    async def run(reactor):
        result.append(
            await upload_file(reactor, args.file, args.url, headers, chunk, progress, args.type)
        )

    def go(reactor):
        return Deferred.fromCoroutine(run(reactor))

    try:
        react(go)  # always ends in SystemExit
    except SystemExit as e:
        if e.code not in (0, None):
            return 1
    return result[0] if result else 1


async def upload_file(
    reactor,
    path: str,
    url: str,
    headers: dict[str, str],
    chunk_size: int,
    progress: bool = False,
    content_type: str | None = None,
    retries: int = 5,
) -> int:
    """
    Upload C{path} to C{url}, streamed from disk; files larger than one
    chunk go in resumable C{Content-Range} pieces, and a dropped connection
    is resumed from the offset the server reports.  Returns 0, or 1 after
    printing the HTTP status and reason.
    """
    from hmacd.client import Uploader, UploadFailed

    uploader = Uploader(reactor, url, headers, content_type)
    try:
        await uploader.send(path, chunk_size, progress, retries)
    except UploadFailed as e:
        print(f"hmacfs upload: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hmacfs",
        description="Sign slots for, upload to, check configs of, and reindex hmacfs.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    sign = commands.add_parser("sign", help="print a signed PUT URL for a slot")
    sign.add_argument("--config", help="the server's TOML config (for Secret, ListenPort)")
    sign.add_argument("--secret", help=f"the shared secret (default: {ENV_VAR}, the config)")
    sign.add_argument("--protocol", choices=["v", "v2", "token", "jwt"], default="v2")
    sign.add_argument("--base-url", help="upload base URL, e.g. https://host/upload/")
    sign.add_argument("--lifetime", type=int, default=300, help="JWT lifetime, seconds")
    sign.add_argument("path", help="slot path, e.g. 3f2a.../photo.jpg (JWT: SLOT/FILENAME)")
    sign.add_argument("size", type=int, help="file size in bytes")
    sign.add_argument("type", nargs="?", help="content type (signed by v2, token, jwt)")
    sign.set_defaults(run=_sign)

    upload = commands.add_parser("upload", help="upload a file to a signed URL")
    upload.add_argument("file")
    upload.add_argument("url")
    upload.add_argument("--header", action="append", default=[], help="extra header, repeatable")
    upload.add_argument("--chunk-size", help="resumable piece size, e.g. 8MB")
    upload.add_argument("--type", help="Content-Type to send")
    upload.add_argument("--quiet", action="store_true", help="no progress bar")
    upload.set_defaults(run=_upload)

    check = commands.add_parser("check-config", help="validate a config and show it")
    check.add_argument("file")
    check.set_defaults(run=_check_config)

    rebuild = commands.add_parser(
        "reindex", help="rebuild missing metadata records from the stored files"
    )
    rebuild.add_argument("--config", required=True, help="the server's TOML config")
    rebuild.set_defaults(run=_reindex)

    from hmacd.admin import register as register_admin

    admin_quota.register(register_admin(commands))

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except UserError as e:
        print(f"hmacfs {args.command}: {e}", file=sys.stderr)
        return 1


def run() -> None:
    """The console script."""
    sys.exit(main())
