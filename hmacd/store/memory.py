"""
Records in a dict: for tests, and for embedding code that keeps metadata
elsewhere.  Nothing survives a restart.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from hmacd.store import FileRecord, IMetadataStore

__all__ = ["MemoryStore"]


@implementer(IMetadataStore)
class MemoryStore:
    name = "memory"

    def __init__(self) -> None:
        self._records: dict[str, FileRecord] = {}

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def put(self, record: FileRecord) -> Deferred[None]:
        self._records[record.path] = record
        return succeed(None)

    def get(self, path: str) -> Deferred[FileRecord | None]:
        return succeed(self._records.get(path))

    def delete(self, path: str) -> Deferred[None]:
        self._records.pop(path, None)
        return succeed(None)

    def expired(self, now: float, limit: int) -> Deferred[list[FileRecord]]:
        due = sorted(
            (r.expires, i, r)
            for i, r in enumerate(self._records.values())
            if r.expires is not None and r.expires <= now
        )
        return succeed([r for _, _, r in due[:limit]])

    def count_expired(self, now: float) -> Deferred[int]:
        return succeed(
            sum(1 for r in self._records.values() if r.expires is not None and r.expires <= now)
        )

    def records(self, limit: int) -> Deferred[list[FileRecord]]:
        return succeed(list(self._records.values())[:limit])

    def ping(self) -> Deferred[None]:
        return succeed(None)
