"""
What several nodes share through an SQL store (L{hmacd.store.sql.SQLStore}):
claims on paths, named leases and a small key/value store with expiry, all
rows of one table C{<table>_shared} (see L{hmacd.store.sql_statements}).

Expiries are absolute times from this node's clock: nodes sharing a
database need synchronised clocks (NTP), and a lease is only as exact as
they are.  Expired rows are ignored by every read and removed now and then
by a claim (L{SharedSQL.purgeInterval}), so they never accumulate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

__all__ = ["SharedSQL", "shared_key"]

log = Logger()


def shared_key(kind: str, name: str) -> str:
    """The row key of a claim, lease or state entry: kinds never collide with each other."""
    return hashlib.sha256(f"{kind}\0{name}".encode()).hexdigest()


class SharedSQL:
    """
    The cross-node part of L{hmacd.store.IMetadataStore} for L{SQLStore}; the
    store provides C{_run}, C{_call}, C{_now} and C{_statements}.
    """

    # How often (seconds) a claim also deletes the shared rows that have expired.
    purgeInterval = 60.0
    _lastPurge = float("-inf")
    _statements: dict[str, str]

    def _run(self, execute: Callable[..., Any], *args: Any) -> Deferred[Any]:
        raise NotImplementedError

    def _call(self, statement: str, params: Sequence[Any], *, fetch: bool = False) -> Deferred[Any]:
        raise NotImplementedError

    def _now(self) -> float:
        raise NotImplementedError

    def claim(self, path: str, owner: str, lease: float) -> Deferred[bool]:
        """True if C{owner} now holds C{path} for C{lease} seconds (taken or re-taken)."""
        return self._take(shared_key("claim", path), owner, lease)

    def lease(self, name: str, owner: str, ttl: float) -> Deferred[bool]:
        """True if C{owner} now holds the lease C{name} for C{ttl} seconds."""
        return self._take(shared_key("lease", name), owner, ttl)

    def renew(self, path: str, owner: str, lease: float) -> Deferred[bool]:
        """Extend C{owner}'s claim on C{path}; False if it has expired or is someone else's."""
        now = self._now()
        key = shared_key("claim", path)
        renew = (self._statements["shared_renew"], (now + lease, key, owner, now))
        return self._run(self._holds, renew, key, owner, now)

    def release(self, path: str, owner: str) -> Deferred[None]:
        """Drop C{owner}'s claim on C{path}; someone else's stays."""
        d = self._call(self._statements["shared_release"], (shared_key("claim", path), owner))
        return d.addCallback(lambda _: None)

    def put_state(self, key: str, value: str, ttl: float) -> Deferred[None]:
        """Set C{key} to C{value} for C{ttl} seconds."""
        params = (shared_key("state", key), value, self._now() + ttl)
        return self._call(self._statements["shared_put"], params).addCallback(lambda _: None)

    def get_state(self, key: str) -> Deferred[str | None]:
        """The value of C{key}, or None if unset or expired."""
        d = self._call(
            self._statements["shared_holder"], (shared_key("state", key), self._now()), fetch=True
        )
        return d.addCallback(lambda rows: rows[0][0] if rows else None)

    def delete_state(self, key: str) -> Deferred[None]:
        """Forget C{key}; no error if unknown."""
        d = self._call(self._statements["shared_delete"], (shared_key("state", key),))
        return d.addCallback(lambda _: None)

    def _take(self, key: str, owner: str, lease: float) -> Deferred[bool]:
        now = self._now()
        if now - self._lastPurge >= self.purgeInterval:
            self._lastPurge = now
            self._purge(now)
        take = (self._statements["shared_take"], (key, owner, now + lease, now))
        return self._run(self._holds, take, key, owner, now)

    def _holds(
        self, connection: Any, change: tuple[str, Sequence[Any]], key: str, owner: str, now: float
    ) -> bool:
        """
        C{change}, then who holds C{key}, in one transaction: adbapi commits
        when this returns.  The change has locked the row (or found it another
        owner's), so the read is what every node now sees.
        """
        cursor = connection.cursor()
        try:
            cursor.execute(*change)
            cursor.execute(self._statements["shared_holder_locked"], (key, now))
            rows = cursor.fetchall()
        finally:
            cursor.close()
        return bool(rows) and rows[0][0] == owner

    def _purge(self, now: float) -> None:
        d = self._call(self._statements["shared_purge"], (now,))
        # Best effort: a failed purge is retried at the next interval.
        d.addErrback(lambda f: log.debug("shared rows purge failed: {why}", why=f.value))
