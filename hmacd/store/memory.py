"""
Records in a dict: for tests, and for embedding code that keeps metadata
elsewhere.  Nothing survives a restart.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from hmacd.quota import Limits, QuotaBook, Usage
from hmacd.store import FileRecord, IMetadataStore
from hmacd.takedown import Takedown

__all__ = ["MemoryStore"]


@implementer(IMetadataStore)
class MemoryStore:
    name = "memory"
    # Whether puts and deletes keep the quota figures (hmacd.quota).
    quota_accounting = False

    def __init__(self, clock: Any = None) -> None:
        """C{clock}: an IReactorTime for the expiry of claims, leases and state (else wall time)."""
        self._records: dict[str, FileRecord] = {}
        self._clock = clock
        # (kind, name) -> (owner or value, absolute expiry)
        self._shared: dict[tuple[str, str], tuple[str, float]] = {}
        self._quota = QuotaBook()
        self._takedowns: dict[str, Takedown] = {}

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        return succeed(None)

    def put(self, record: FileRecord) -> Deferred[None]:
        old = self._records.get(record.path)
        self._records[record.path] = record
        if self.quota_accounting:
            self._quota.added(old, record)
        return succeed(None)

    def get(self, path: str) -> Deferred[FileRecord | None]:
        return succeed(self._records.get(path))

    def delete(self, path: str) -> Deferred[None]:
        old = self._records.pop(path, None)
        if old is not None and self.quota_accounting:
            self._quota.removed(old)
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

    # -- shared between nodes (here: between the users of this one object) ---------------------

    def _now(self) -> float:
        return self._clock.seconds() if self._clock is not None else time.time()

    def _live(self, kind: str, name: str) -> str | None:
        entry = self._shared.get((kind, name))
        if entry is None:
            return None
        if entry[1] <= self._now():
            del self._shared[(kind, name)]
            return None
        return entry[0]

    def _take(self, kind: str, name: str, owner: str, ttl: float) -> bool:
        holder = self._live(kind, name)
        if holder is not None and holder != owner:
            return False
        self._shared[(kind, name)] = (owner, self._now() + ttl)
        return True

    def claim(self, path: str, owner: str, lease: float) -> Deferred[bool]:
        return succeed(self._take("claim", path, owner, lease))

    def renew(self, path: str, owner: str, lease: float) -> Deferred[bool]:
        if self._live("claim", path) != owner:
            return succeed(False)
        self._shared[("claim", path)] = (owner, self._now() + lease)
        return succeed(True)

    def release(self, path: str, owner: str) -> Deferred[None]:
        if self._live("claim", path) == owner:
            del self._shared[("claim", path)]
        return succeed(None)

    def put_state(self, key: str, value: str, ttl: float) -> Deferred[None]:
        self._shared[("state", key)] = (value, self._now() + ttl)
        return succeed(None)

    def get_state(self, key: str) -> Deferred[str | None]:
        return succeed(self._live("state", key))

    def delete_state(self, key: str) -> Deferred[None]:
        self._shared.pop(("state", key), None)
        return succeed(None)

    def lease(self, name: str, owner: str, ttl: float) -> Deferred[bool]:
        return succeed(self._take("lease", name, owner, ttl))

    # -- quotas (hmacd.quota) ---------------------------------------------------------------------

    def quota_reserve(
        self, token: str, uploader: str | None, size: int, limits: Limits, now: float, ttl: float
    ) -> Deferred[tuple[bool, Usage]]:
        return succeed(self._quota.reserve(token, uploader, size, limits, now, ttl))

    def quota_release(self, token: str, uploader: str | None) -> Deferred[None]:
        self._quota.holds.pop(token, None)
        return succeed(None)

    def quota_usage(self, uploader: str | None, now: float) -> Deferred[Usage]:
        return succeed(self._quota.usage(uploader, now))

    def quota_uploaders(self, now: float) -> Deferred[list[tuple[str, int, int]]]:
        return succeed(self._quota.uploaders(now))

    def quota_reset(self, uploader: str, now: float) -> Deferred[None]:
        stored = sum(r.size for r in self._records.values() if r.uploader == uploader)
        self._quota.reset(uploader, stored)
        return succeed(None)

    def quota_rebuild(self, now: float) -> Deferred[None]:
        self._quota.rebuild(self._records.values(), now)
        return succeed(None)

    # -- the admin commands' (hmacd.admin) ------------------------------------------------------

    def scan(self, cursor: str, limit: int) -> Deferred[tuple[list[FileRecord], str | None]]:
        """Up to C{limit} records after path C{cursor}, in path order; the next cursor or None."""
        if limit < 1:
            return fail(ValueError(f"limit must be at least 1, got {limit!r}"))
        paths = sorted(p for p in self._records if p > cursor)[:limit]
        after = paths[-1] if len(paths) == limit else None
        return succeed(([self._records[p] for p in paths], after))

    def put_takedown(self, takedown: Takedown) -> Deferred[None]:
        self._takedowns[takedown.path] = takedown
        return succeed(None)

    def takedown(self, path: str) -> Deferred[Takedown | None]:
        return succeed(self._takedowns.get(path))

    def denied(self, sha256: str) -> Deferred[Takedown | None]:
        if not sha256:
            return succeed(None)
        found = [t for t in self._takedowns.values() if t.sha256 == sha256]
        return succeed(max(found, key=lambda t: t.status) if found else None)

    def takedowns(self) -> Deferred[list[Takedown]]:
        return succeed(list(self._takedowns.values()))

    def lift_takedown(self, path: str) -> Deferred[None]:
        self._takedowns.pop(path, None)
        return succeed(None)
