"""
C{hmacfs admin}: what an operator does to the files of a running server, on the stores and
the storage its config names.

    hmacfs admin ls --config F [--uploader JID] [--older-than 30d] [--larger-than 10MB]
                    [--type image/*] [--json]
    hmacfs admin rm --config F [--legal] [--reason TEXT] PATH|URL...
    hmacfs admin lift --config F PATH|URL...
    hmacfs admin takedowns --config F [--json]
    hmacfs admin purge --config F --uploader JID [--dry-run]
    hmacfs admin stats --config F [--top N] [--json]

C{rm} takes a file down (L{hmacd.takedown}): the takedown is written first (its URL then
answers 410, or 451 with C{--legal}, and its content is denied), then the file goes,
then its record, so that a command broken off half-way is simply run again.  C{purge}
deletes everything one uploader stored (account deletion): each file, then its record,
as the expiry sweep does.  Records are deleted through the store's C{delete}, so
whatever the store keeps beside them (quotas) follows.  With C{AuditLog} set, every
takedown, purged file and lifted takedown is appended to it, with the OS user running the
command as C{who}.

The walk over the records is the store's C{scan}, a page at a time: memory stays flat
however many files there are.  The storage's blocking calls run in threads of the
command's own (L{hmacd.reindex.worker_threads}), never the reactor's.

Every command is L{run_admin}(reactor, args, out, err) -> exit status, which the tests
call in their reactor; L{register} adds the parsers to C{hmacfs}'s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import IO, Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred, FirstError, gatherResults

from hmacd.audit import AuditLog, os_user
from hmacd.config import Config, ConfigError, load_config
from hmacd.logs import escape
from hmacd.metadata import FileRecord
from hmacd.paths import PathRefused, check_relative, relative_path
from hmacd.takedown import GONE, LEGAL, Takedown
from hmacd.units import parse_duration, parse_size

__all__ = ["RecordFilter", "register", "run_admin"]

# Records per page of the walk.
PAGE = 500


class AdminError(Exception):
    """A mistake the user can fix, or a store that cannot be reached: one line, exit 1."""


@dataclass(frozen=True)
class RecordFilter:
    """What C{ls} (and C{purge}) keep: every condition given must hold."""

    uploader: str | None = None
    older_than: float | None = None  # seconds before now
    larger_than: int | None = None  # bytes
    type: str | None = None  # "image/png", "image/*" or "image/"
    now: float = field(default_factory=time.time)

    def __call__(self, record: FileRecord) -> bool:
        if self.uploader is not None and not same_uploader(record.uploader, self.uploader):
            return False
        if self.older_than is not None and record.created > self.now - self.older_than:
            return False
        if self.larger_than is not None and record.size <= self.larger_than:
            return False
        return self.type is None or type_matches(record.content_type, self.type)


def _bare(jid: str) -> str:
    # A full JID's resource goes; node and domain compare without case (as XMPP's do, near
    # enough for ASCII addresses).
    return jid.partition("/")[0].strip().lower()


def same_uploader(uploader: str | None, wanted: str) -> bool:
    """Whether a record's C{uploader} is the bare JID C{wanted} (any resource)."""
    return uploader is not None and _bare(uploader) == _bare(wanted)


def type_matches(content_type: str, wanted: str) -> bool:
    """C{wanted}: a media type (parameters ignored), or a top level C{image/*} / C{image/}."""
    mine = content_type.partition(";")[0].strip().lower()
    wanted = wanted.strip().lower()
    if wanted.endswith("/*") or wanted.endswith("/"):
        return mine.startswith(wanted.rstrip("*"))
    return mine == wanted


def store_path(given: str, prefix: str) -> str:
    """
    The store path an operator means: a download URL, a URL path (C{/upload/...}) or the
    store path itself (C{3f2a/photo.jpg}).

    @raise AdminError: it names nothing the server could serve.
    """
    if given.startswith(("http://", "https://")) or given.startswith("/"):
        raw = urlsplit(given).path if not given.startswith("/") else given.partition("?")[0]
        try:
            found = relative_path(raw.encode("utf-8"), prefix)
        except PathRefused as e:
            raise AdminError(f"{given}: {e}") from None
        if found is None:
            raise AdminError(f"{given}: not under /{prefix}/" if prefix else f"{given}: no path")
        return found
    try:
        check_relative(given)
    except PathRefused as e:
        raise AdminError(f"{given}: {e}") from None
    return given


def _iso(when: float | None) -> str:
    if when is None:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _row(record: FileRecord) -> str:
    return "  ".join(
        [
            _iso(record.created),
            f"{record.size:>12}",
            f"{escape(record.content_type, quote=False):<24}",
            f"{escape(record.uploader or '-', quote=False):<28}",
            escape(record.path, quote=False),
        ]
    )


_HEADER = "  ".join(
    ["created             ", f"{'size':>12}", f"{'type':<24}", f"{'uploader':<28}", "path"]
)


def _json(record: FileRecord) -> str:
    return json.dumps(asdict(record), ensure_ascii=True, sort_keys=True)


# -- the session: config, stores, storage ----------------------------------------------------


@dataclass
class Session:
    """What a command works on: the config's stores, and (for deletions) its storage."""

    config: Config
    store: Any
    out: IO[str]
    err: IO[str]
    reactor: Any
    audit: AuditLog | None = None
    storage: Any = None
    blocking: Callable[[Callable[[], Any]], Deferred[Any]] | None = None

    async def walk(self) -> AsyncIterator[list[FileRecord]]:
        """Every record, a page at a time."""
        cursor: str | None = ""
        while cursor is not None:
            page, cursor = await self.store.scan(cursor, PAGE)
            yield page

    async def delete_file(self, path: str) -> bool:
        """Blocking, in the command's threads: the file at C{path}; whether it was there."""
        assert self.blocking is not None and self.storage is not None
        return bool(await self.blocking(partial(self.storage.delete, path)))

    async def digest_of(self, path: str) -> tuple[FileRecord | None, str]:
        """The record of C{path} if any, and the content's SHA-256 ("" when unknown)."""
        record = await self.store.get(path)
        if record is not None:
            return record, record.sha256
        assert self.blocking is not None
        return None, await self.blocking(partial(_file_digest, self.storage, path))


def _file_digest(storage: Any, path: str) -> str:
    """Blocking.  The SHA-256 of the file at C{path}: from its facts, else its bytes."""
    stored = storage.open(path)
    if stored is None:
        return ""
    try:
        facts = stored.facts()
        if facts is not None and facts.size == stored.size and facts.sha256:
            return str(facts.sha256)
        digest = hashlib.sha256()
        offset = 0
        while offset < stored.size:
            block = stored.read(offset, min(1 << 20, stored.size - offset))
            if not block:
                break
            digest.update(block)
            offset += len(block)
        return digest.hexdigest()
    finally:
        stored.close()


# -- the commands -----------------------------------------------------------------------------


async def _ls(s: Session, args: argparse.Namespace) -> int:
    keep = _filter(args)
    if not args.json:
        s.out.write(_HEADER + "\n")
    count = size = 0
    async for page in s.walk():
        for record in page:
            if keep(record):
                count += 1
                size += record.size
                s.out.write((_json(record) if args.json else _row(record)) + "\n")
    if not args.json:
        s.out.write(f"{count} files, {size} bytes\n")
    return 0


def _filter(args: argparse.Namespace) -> RecordFilter:
    older, larger = args.older_than, args.larger_than
    try:
        return RecordFilter(
            uploader=args.uploader,
            older_than=parse_duration(older) if older else None,
            larger_than=parse_size(larger) if larger else None,
            type=args.type,
        )
    except ValueError as e:
        raise AdminError(str(e)) from None


async def _rm(s: Session, args: argparse.Namespace) -> int:
    status = LEGAL if args.legal else GONE
    paths = [store_path(given, s.config.upload_subdir) for given in args.paths]
    failed = 0
    digests: dict[str, str] = {}  # content taken down -> the path named for it
    for path in paths:
        record, sha256 = await s.digest_of(path)
        if record is None and not sha256:
            earlier = await s.store.takedown(path)
            if earlier is None:
                s.err.write(f"hmacfs admin rm: {escape(path)}: no such file\n")
                failed += 1
                continue
            sha256 = earlier.sha256  # taken down again (say, for legal reasons now)
        await _take_down(s, path, record, sha256, status, args.reason or "", "")
        if sha256:
            digests.setdefault(sha256, path)
    if digests and not args.this_path_only:
        # The same content under other slots (uploaded before the takedown, or sharing its
        # bytes with Deduplication): every copy goes, each with a takedown of its own.
        copies = []
        async for page in s.walk():
            copies += [r for r in page if r.sha256 in digests and r.path not in paths]
        for record in copies:
            named = digests[record.sha256]
            await _take_down(
                s, record.path, record, record.sha256, status, args.reason or "", named
            )
    return 1 if failed else 0


async def _take_down(
    s: Session,
    path: str,
    record: FileRecord | None,
    sha256: str,
    status: int,
    reason: str,
    copy_of: str,
) -> None:
    takedown = Takedown(path, status, sha256, reason, time.time(), os_user())
    # First the takedown: from now on the URL says why, and the content is denied, even
    # if what follows is broken off (run the command again to finish).
    await s.store.put_takedown(takedown)
    removed = await s.delete_file(path)
    await s.store.delete(path)
    if s.audit is not None:
        s.audit.write("takedown", path, record, status=status, reason=reason, file=removed)
    if removed:
        what = "file and record removed" if record else "file removed"
    else:
        what = "record removed" if record else "already removed"
    if copy_of:
        what += f", the same content as {escape(copy_of)}"
    s.out.write(f"taken down ({status}): {escape(path)} [{what}]\n")


async def _lift(s: Session, args: argparse.Namespace) -> int:
    failed = 0
    for given in args.paths:
        path = store_path(given, s.config.upload_subdir)
        if (await s.store.takedown(path)) is None:
            s.err.write(f"hmacfs admin lift: {escape(path)}: not taken down\n")
            failed += 1
            continue
        await s.store.lift_takedown(path)
        if s.audit is not None:
            s.audit.write("lift", path)
        s.out.write(f"lifted: {escape(path)}\n")
    return 1 if failed else 0


async def _takedowns(s: Session, args: argparse.Namespace) -> int:
    found = sorted(await s.store.takedowns(), key=lambda t: (t.created, t.path))
    for t in found:
        if args.json:
            s.out.write(json.dumps(asdict(t), ensure_ascii=True, sort_keys=True) + "\n")
        else:
            s.out.write(
                f"{_iso(t.created)}  {t.status}  {t.sha256[:16] or '-':<16}  "
                f"{escape(t.who or '-', quote=False):<12}  {escape(t.path, quote=False)}"
                f"{'  # ' + escape(t.reason, quote=False) if t.reason else ''}\n"
            )
    if not args.json:
        s.out.write(f"{len(found)} takedowns\n")
    return 0


async def _purge(s: Session, args: argparse.Namespace) -> int:
    keep = RecordFilter(uploader=args.uploader)
    count = size = 0
    async for page in s.walk():
        doomed = [record for record in page if keep(record)]
        if not doomed:
            continue
        if not args.dry_run:
            # The file first, then its record: broken off, a record is left to find again.
            await _together([Deferred.fromCoroutine(s.delete_file(r.path)) for r in doomed])
            await _together([s.store.delete(r.path) for r in doomed])
        for record in doomed:
            count += 1
            size += record.size
            if not args.dry_run and s.audit is not None:
                s.audit.write("purge", record.path, record)
            if args.dry_run or args.verbose:
                s.out.write(f"{escape(record.path, quote=False)}\n")
    verb = "would delete" if args.dry_run else "deleted"
    s.out.write(f"{verb} {count} files, {size} bytes, of {escape(args.uploader)}\n")
    return 0


async def _together(calls: list[Deferred[Any]]) -> list[Any]:
    """The results of C{calls}, or the first one's own error once all have settled."""
    try:
        return await gatherResults(calls, consumeErrors=True)
    except FirstError as e:
        e.subFailure.raiseException()
        raise  # not reached: raiseException raises


@dataclass
class Stats:
    files: int = 0
    bytes: int = 0
    oldest: float | None = None
    newest: float | None = None
    uploaders: Counter[str] = field(default_factory=Counter)
    uploader_files: Counter[str] = field(default_factory=Counter)
    types: Counter[str] = field(default_factory=Counter)
    type_files: Counter[str] = field(default_factory=Counter)

    def add(self, record: FileRecord) -> None:
        self.files += 1
        self.bytes += record.size
        self.oldest = record.created if self.oldest is None else min(self.oldest, record.created)
        self.newest = record.created if self.newest is None else max(self.newest, record.created)
        who = _bare(record.uploader) if record.uploader else "(none)"
        self.uploaders[who] += record.size
        self.uploader_files[who] += 1
        kind = record.content_type.partition(";")[0].strip().lower() or "(none)"
        self.types[kind] += record.size
        self.type_files[kind] += 1

    def summary(self, top: int) -> dict[str, Any]:
        return {
            "files": self.files,
            "bytes": self.bytes,
            "oldest": _iso(self.oldest) if self.oldest is not None else None,
            "newest": _iso(self.newest) if self.newest is not None else None,
            "uploaders": len(self.uploaders),
            "top_uploaders": [
                {"uploader": who, "files": self.uploader_files[who], "bytes": size}
                for who, size in self.uploaders.most_common(top)
            ],
            "types": [
                {"type": kind, "files": self.type_files[kind], "bytes": size}
                for kind, size in self.types.most_common()
            ],
        }


async def _stats(s: Session, args: argparse.Namespace) -> int:
    if args.top < 1:
        raise AdminError(f"--top must be at least 1, got {args.top}")
    stats = Stats()
    async for page in s.walk():
        for record in page:
            stats.add(record)
    summary = stats.summary(args.top)
    census = getattr(s.storage, "dedup_census", None)
    if census is not None and s.blocking is not None and s.config.deduplication:
        shared = await s.blocking(census)
        summary["dedup"] = {
            "contents": shared.contents,
            "references": shared.references,
            "stored_bytes": shared.stored_bytes,
            "saved_bytes": shared.saved_bytes,
            "orphans": shared.orphans,
        }
    if args.json:
        s.out.write(json.dumps(summary, ensure_ascii=True, sort_keys=True) + "\n")
        return 0
    s.out.write(f"files: {summary['files']}, bytes: {summary['bytes']}\n")
    s.out.write(f"oldest: {summary['oldest'] or '-'}, newest: {summary['newest'] or '-'}\n")
    s.out.write(f"uploaders: {summary['uploaders']}; top {args.top} by bytes:\n")
    for row in summary["top_uploaders"]:
        who = escape(row["uploader"], quote=False)
        s.out.write(f"  {row['bytes']:>14}  {row['files']:>8} files  {who}\n")
    s.out.write("by type:\n")
    for row in summary["types"]:
        kind = escape(row["type"], quote=False)
        s.out.write(f"  {row['bytes']:>14}  {row['files']:>8} files  {kind}\n")
    if "dedup" in summary:
        d = summary["dedup"]
        s.out.write(
            f"deduplication: {d['references']} paths share {d['contents']} contents"
            f" ({d['stored_bytes']} bytes stored), {d['saved_bytes']} bytes saved\n"
        )
        if d["orphans"]:
            # A crash between a path's deletion and its content's: the sweep removes them.
            s.out.write(f"  {d['orphans']} contents without a path (the sweep removes them)\n")
    return 0


# -- running one ------------------------------------------------------------------------------

# Which commands delete, and so need the storage.
_STORAGE = {"rm", "purge"}


async def run_admin(
    reactor: Any, args: argparse.Namespace, out: IO[str], err: IO[str], store: Any = None
) -> int:
    """
    Run the admin command C{args} in C{reactor} (running); the exit status.

    @param store: a FailoverStore, not started, instead of the config's (tests: a table or
        prefix of their own); it is started and stopped here.
    """
    from hmacd.reindex import open_storage, worker_threads
    from hmacd.services import build_metadata, start_for_command
    from hmacd.storage import StorageUnavailable
    from hmacd.store import StoreUnavailable

    name = f"hmacfs admin {args.admin}"
    try:
        config = load_config(args.config)
    except ConfigError as e:
        err.write(f"{name}: {e}\n")
        return 1
    config = replace(config, store_dir=os.path.abspath(config.store_dir))
    deletes = args.admin in _STORAGE and not getattr(args, "dry_run", False)
    # stats reads what deduplication saves from the storage itself (a local StoreDir).
    census = args.admin == "stats" and config.deduplication
    if deletes and config.storage_backend == "s3" and not all(config.s3_credentials(os.environ)):
        err.write(f"{name}: S3AccessKey/S3SecretKey: not set\n")
        return 1

    if store is None:
        store = build_metadata(config, reactor)
    session = Session(config, store, out, err, reactor)
    release: Callable[[], Deferred[None]] | None = None
    stop_workers: Callable[[], None] | None = None
    try:
        if deletes or census:
            try:
                session.storage, release = open_storage(config, reactor, os.environ)
            except ValueError as e:
                err.write(f"{name}: {e}\n")
                return 1
            if config.storage_backend == "s3":
                from hmacd.storage.s3_dedup import ContentLocks

                # A deleted reference may free its content: under the servers' own locks.
                session.storage.content_locks = ContentLocks(
                    store, f"admin@{socket.gethostname()}", reactor
                )
            session.blocking, stop_workers = worker_threads(reactor, 4)
        why = await start_for_command(store)
        if why is not None:
            err.write(f"{name}: no metadata store is reachable: {why}\n")
            return 1
        if config.audit_log and args.admin in ("rm", "purge", "lift"):
            try:
                session.audit = AuditLog(config.audit_log, os_user())
            except OSError as e:
                err.write(f"{name}: AuditLog {config.audit_log}: {e.strerror}\n")
                return 1
        try:
            return int(await _COMMANDS[args.admin](session, args))
        except AdminError as e:
            err.write(f"{name}: {e}\n")
            return 1
        except StoreUnavailable as e:
            err.write(f"{name}: the metadata store stopped answering: {e}\n")
            return 1
        except StorageUnavailable as e:
            from hmacd.cli import _object_store_trouble

            err.write(f"{name}: {_object_store_trouble(config, e)}\n")
            return 1
    finally:
        if session.audit is not None:
            session.audit.close()
        if stop_workers is not None:
            stop_workers()
        await store.stop()
        if release is not None:
            await release()


_COMMANDS: dict[str, Callable[[Session, argparse.Namespace], Any]] = {
    "ls": _ls,
    "rm": _rm,
    "lift": _lift,
    "takedowns": _takedowns,
    "purge": _purge,
    "stats": _stats,
}


def _main(args: argparse.Namespace) -> int:
    """The C{hmacfs admin ...} entry: run the command in a reactor of its own."""
    import sys

    from twisted.internet.task import react

    result: list[int] = []

    async def run(reactor: Any) -> None:
        result.append(await run_admin(reactor, args, sys.stdout, sys.stderr))

    try:
        react(lambda reactor: Deferred.fromCoroutine(run(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            return 1
    return result[0] if result else 1


def register(commands: Any) -> Any:
    """
    Add C{admin} and its commands to C{hmacfs}'s subparsers; return the admin subparsers
    (for more commands, e.g. C{hmacd.admin_quota.register}).
    """
    admin = commands.add_parser("admin", help="list, take down, purge and count stored files")
    subs = admin.add_subparsers(dest="admin", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = subs.add_parser(name, help=help)
        parser.add_argument("--config", required=True, help="the server's TOML config")
        parser.set_defaults(run=_main)
        return parser

    ls = command("ls", "list files, filtered")
    ls.add_argument("--uploader", help="bare JID of the uploader")
    ls.add_argument("--older-than", help='uploaded longer ago than this, e.g. "30d"')
    ls.add_argument("--larger-than", help='larger than this, e.g. "10MB"')
    ls.add_argument("--type", help='media type, e.g. "image/png" or "image/*"')
    ls.add_argument("--json", action="store_true", help="JSON lines, one record each")

    rm = command("rm", "take files down: 410 (451 with --legal), their content denied")
    rm.add_argument("--legal", action="store_true", help="answer 451, not 410")
    rm.add_argument("--reason", help="a note kept with the takedown (not shown to clients)")
    rm.add_argument(
        "--this-path-only",
        action="store_true",
        help="leave other paths with the same content (they are taken down too by default)",
    )
    rm.add_argument("paths", nargs="+", metavar="PATH", help="store path, URL path or URL")

    lift = command("lift", "undo a takedown: its URL answers 404, its content may come back")
    lift.add_argument("paths", nargs="+", metavar="PATH")

    takedowns = command("takedowns", "list the takedowns")
    takedowns.add_argument("--json", action="store_true", help="JSON lines")

    purge = command("purge", "delete everything one uploader stored")
    purge.add_argument("--uploader", required=True, help="bare JID of the uploader")
    purge.add_argument("--dry-run", action="store_true", help="list what would go, delete nothing")
    purge.add_argument("--verbose", action="store_true", help="name each file deleted")

    stats = command("stats", "files and bytes: all, per uploader, per type")
    stats.add_argument("--top", type=int, default=10, help="uploaders shown (default 10)")
    stats.add_argument("--json", action="store_true", help="one JSON object")
    return subs
