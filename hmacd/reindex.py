"""
C{hmacfs reindex}: rebuild the metadata store's missing records from the files.

A store that lost its data (a Redis that came back empty, a database restored from an old
backup) no longer knows which files expire.  Every file carries its own facts
(L{hmacd.facts}), so its record can be made again exactly; a file without facts (uploaded
by an older version, or on a file system without user attributes) gets a record from what
the file itself says: its size, its SHA-256, its modification time, a type guessed from
its name, and FileTTL counted from its modification time.

Records that exist are left as they are; dot files and directories (C{.hmacfs/}, upload
temp files) and anything but regular files are skipped.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from twisted.internet.defer import Deferred, gatherResults, maybeDeferred

from hmacd.mediatype import guess_type
from hmacd.metadata import FileRecord
from hmacd.storage import IStorage
from hmacd.storage.local import LocalStorage

__all__ = ["GUESSED_PROTOCOL", "ReindexCounts", "reindex", "stored_files"]

# The protocol field of a record made without facts: no slot is known.
GUESSED_PROTOCOL = "reindex"
# Files looked up (and recorded) together: enough to keep a remote store busy.
BATCH = 64


@dataclass
class ReindexCounts:
    files: int = 0  # regular files under StoreDir
    recorded: int = 0  # that had a record already
    from_facts: int = 0  # recorded again from their facts
    guessed: int = 0  # recorded from size, hash, mtime and name (no facts)

    def summary(self) -> str:
        return (
            f"{self.files} files: {self.recorded} had a record, {self.from_facts} recorded "
            f"from their facts, {self.guessed} recorded with a guessed type (no facts)"
        )


def _storage(where: IStorage | str) -> IStorage:
    """The storage itself, or a directory's (the CLI names one: C{StoreDir})."""
    if isinstance(where, str):
        # Only read here: no writer, so nothing runs in a thread.
        return LocalStorage(where, maybeDeferred)
    return where


def stored_files(where: IStorage | str) -> Iterator[str]:
    """The store paths of every served file: no dot entries, no links."""
    return _storage(where).files()


def record_of(storage: IStorage, relpath: str, file_ttl: float) -> tuple[FileRecord, bool] | None:
    """
    The record of the file at C{relpath}, and whether it came from the file's facts; None
    when the file went away meanwhile.
    """
    stored = storage.open(relpath)
    if stored is None:
        return None
    try:
        facts = stored.facts()
        if facts is not None and facts.size == stored.size:
            return facts, True
        digest = hashlib.sha256()
        offset = 0
        while block := stored.read(offset, 1 << 20):
            digest.update(block)
            offset += len(block)
    finally:
        stored.close()
    return (
        FileRecord(
            path=relpath,
            size=stored.size,
            content_type=guess_type(relpath),
            sha256=digest.hexdigest(),
            created=stored.modified,
            protocol=GUESSED_PROTOCOL,
            expires=stored.modified + file_ttl if file_ttl else None,
        ),
        False,
    )


async def reindex(store, where: IStorage | str, file_ttl: float = 0) -> ReindexCounts:
    """
    Put a record for every file of C{where} (a storage, or a local directory) that C{store}
    has none for.

    @raise hmacd.store.StoreUnavailable: the store stopped answering (the counts so far
        are lost with it; running again picks up where it stood).
    """
    storage = _storage(where)
    counts = ReindexCounts()
    batch: list[str] = []
    for relpath in storage.files():
        counts.files += 1
        batch.append(relpath)
        if len(batch) == BATCH:
            await _reindexBatch(store, storage, file_ttl, batch, counts)
            batch = []
    if batch:
        await _reindexBatch(store, storage, file_ttl, batch, counts)
    return counts


async def _reindexBatch(
    store, storage: IStorage, file_ttl: float, paths: list[str], counts: ReindexCounts
) -> None:
    found = await _together([store.get(path) for path in paths])
    puts: list[Deferred] = []
    for path, existing in zip(paths, found, strict=True):
        if existing is not None:
            counts.recorded += 1
            continue
        made = record_of(storage, path, file_ttl)
        if made is None:
            counts.files -= 1  # deleted while we walked
            continue
        record, fromFacts = made
        if fromFacts:
            counts.from_facts += 1
        else:
            counts.guessed += 1
        puts.append(store.put(record))
    await _together(puts)


async def _together(calls: list[Deferred]) -> list:
    """The results of C{calls}, or the first one's failure (after all have settled)."""
    d = gatherResults(calls, consumeErrors=True)
    try:
        return await d
    except Exception as e:
        # FirstError: what the caller wants is the store's own error.
        raise getattr(getattr(e, "subFailure", None), "value", e) from None
