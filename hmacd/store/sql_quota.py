"""
The quota figures of an SQL store (L{hmacd.store.sql.SQLStore}; see L{hmacd.quota}), rows
of one table C{<table>_usage}:

 - C{total}: the bytes of every stored file (one row);
 - C{stored}: the bytes of one uploader's stored files;
 - C{day}: what one uploader uploaded in one hour (C{slot}: the hour), until it is a day old;
 - C{hold}: one upload in progress, until its upload ends or C{expires}.

A put or a delete changes the figures in its own transaction (L{QuotaSQL._putCounted},
L{QuotaSQL._deleteCounted}).  A hold is taken in one transaction that first writes the
C{total} row (and the uploader's C{stored} row): the database locks them, so that holds are
taken one at a time across every process and node, and what they read is what is committed.
Every writer takes the C{total} row first, so they never wait for each other in a circle.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from hmacd.batch import Batcher
from hmacd.quota import DAY_HOURS, Limits, Usage, exceeded, hour_of

__all__ = ["QuotaSQL", "usage_schema", "usage_statements"]

_COLUMNS = "key_hash, kind, owner_hash, uploader, slot, bytes, expires"


def usage_schema(dialect: str) -> tuple[str, ...]:
    """The DDL of C{<table>_usage} (C{{table}} left to fill in)."""
    if dialect == "mysql":
        return (
            "CREATE TABLE IF NOT EXISTS {table}_usage (\n"
            "    key_hash CHAR(64) CHARACTER SET ascii NOT NULL PRIMARY KEY,\n"
            "    kind VARCHAR(8) NOT NULL,\n"
            "    owner_hash CHAR(64) CHARACTER SET ascii NOT NULL,\n"
            "    uploader TEXT NOT NULL,\n"
            "    slot BIGINT NOT NULL,\n"
            "    bytes BIGINT NOT NULL,\n"
            "    expires DOUBLE NULL,\n"
            "    INDEX {table}_usage_owner (owner_hash),\n"
            "    INDEX {table}_usage_expires (expires)\n"
            ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
        )
    return (
        "CREATE TABLE IF NOT EXISTS {table}_usage (\n"
        "    key_hash CHAR(64) PRIMARY KEY,\n"
        "    kind VARCHAR(8) NOT NULL,\n"
        "    owner_hash CHAR(64) NOT NULL,\n"
        "    uploader TEXT NOT NULL,\n"
        "    slot BIGINT NOT NULL,\n"
        "    bytes BIGINT NOT NULL,\n"
        "    expires DOUBLE PRECISION NULL\n"
        ")",
        "CREATE INDEX IF NOT EXISTS {table}_usage_owner ON {table}_usage (owner_hash)",
        "CREATE INDEX IF NOT EXISTS {table}_usage_expires ON {table}_usage (expires)",
    )


def usage_statements(dialect: str, table: str, p: str) -> dict[str, str]:
    """The statements of the quota figures, named C{quota_<name>}."""
    marks = ", ".join([p] * 7)
    insert = f"INSERT INTO {table}_usage ({_COLUMNS}) VALUES ({marks})"
    if dialect == "mysql":
        add = f"{insert} ON DUPLICATE KEY UPDATE bytes = bytes + VALUES(bytes)"
    else:
        add = (
            f"{insert} ON CONFLICT (key_hash) DO UPDATE"
            f" SET bytes = {table}_usage.bytes + excluded.bytes"
        )
    usage = f"{table}_usage"
    return {
        "quota_add": add,
        "quota_insert": insert,
        "quota_bytes": f"SELECT bytes FROM {usage} WHERE key_hash = {p}",
        "quota_daily": (
            f"SELECT COALESCE(SUM(bytes), 0) FROM {usage}"
            f" WHERE owner_hash = {p} AND kind = 'day' AND slot >= {p}"
        ),
        "quota_held": (
            f"SELECT COALESCE(SUM(bytes), 0) FROM {usage}"
            f" WHERE owner_hash = {p} AND kind = 'hold' AND expires > {p}"
        ),
        "quota_held_total": (
            f"SELECT COALESCE(SUM(bytes), 0) FROM {usage} WHERE kind = 'hold' AND expires > {p}"
        ),
        "quota_purge": f"DELETE FROM {usage} WHERE expires <= {p}",
        "quota_delete": f"DELETE FROM {usage} WHERE key_hash = {p}",
        "quota_forget_days": f"DELETE FROM {usage} WHERE owner_hash = {p} AND kind = 'day'",
        "quota_forget_all": f"DELETE FROM {usage} WHERE kind <> 'hold'",
        "quota_uploaders": (
            f"SELECT uploader, kind, SUM(bytes) FROM {usage}"
            f" WHERE kind = 'stored' OR (kind = 'day' AND slot >= {p}) GROUP BY uploader, kind"
        ),
        "quota_old": f"SELECT size, uploader FROM {table} WHERE path_hash = {p}",
        "quota_sum_uploader": f"SELECT COALESCE(SUM(size), 0) FROM {table} WHERE uploader = {p}",
        "quota_sum_by_uploader": (
            f"SELECT uploader, SUM(size) FROM {table} WHERE uploader IS NOT NULL GROUP BY uploader"
        ),
        "quota_sum_all": f"SELECT COALESCE(SUM(size), 0) FROM {table}",
        "quota_recent": (
            f"SELECT uploader, created, size FROM {table}"
            f" WHERE uploader IS NOT NULL AND created >= {p}"
        ),
    }


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _key(kind: str, uploader: str, slot: int = 0) -> str:
    return _hash(f"usage\0{kind}\0{uploader}\0{slot}")


# A figure's identity: (kind, uploader, slot); the total's uploader is "".
_Figure = tuple[str, str, int]
_TOTAL: _Figure = ("total", "", 0)

# A hold taken ("reserve", (token, uploader, size, limits, now, ttl)) or dropped
# ("release", (token,)).
_Hold = tuple[str, tuple[Any, ...]]


def _row(figure: _Figure, delta: int, expires: float | None = None) -> tuple[Any, ...]:
    kind, uploader, slot = figure
    return (_key(kind, uploader, slot), kind, _hash(uploader), uploader, slot, delta, expires)


def _day_expiry(hour: int) -> float:
    # A bucket counts while it is among the last DAY_HOURS hours.
    return float((hour + DAY_HOURS) * 3600)


class QuotaSQL:
    """
    The quota methods of L{hmacd.store.IMetadataStore} for L{SQLStore}; the store provides
    C{_run}, C{_statements} and C{quota_accounting}.
    """

    quota_accounting = False
    _statements: dict[str, str]
    _quotaHolds: Batcher[_Hold, tuple[bool, Usage] | None] | None = None

    def _run(self, execute: Callable[..., Any], *args: Any) -> Deferred[Any]:
        raise NotImplementedError

    @staticmethod
    def _executeMany(connection: Any, statement: str, rows: Sequence[Sequence[Any]]) -> None:
        raise NotImplementedError

    # -- what puts and deletes do to the figures (in their own transaction) ---------------------

    def _writer(self, which: str) -> Callable[..., None]:
        """How a batch of C{which} ("put" or "delete") statements runs on a connection."""
        if not self.quota_accounting:
            return self._executeMany
        return self._putCounted if which == "put" else self._deleteCounted

    def _putCounted(self, connection: Any, statement: str, rows: Sequence[Sequence[Any]]) -> None:
        cursor = connection.cursor()
        try:
            deltas: dict[_Figure, int] = {}
            days: dict[_Figure, int] = {}
            for row in rows:
                # path_hash, path, size, content_type, sha256, created, protocol, uploader, ...
                cursor.execute(self._statements["quota_old"], (row[0],))
                old = cursor.fetchall()
                if old:
                    _count(deltas, old[0][1], -int(old[0][0] or 0))
                _count(deltas, row[7], int(row[2]))
                if not old and row[7] is not None:
                    day = ("day", row[7], hour_of(float(row[5])))
                    days[day] = days.get(day, 0) + int(row[2])
            cursor.executemany(statement, rows)
            self._apply(cursor, deltas, days)
        finally:
            cursor.close()

    def _deleteCounted(
        self, connection: Any, statement: str, rows: Sequence[Sequence[Any]]
    ) -> None:
        cursor = connection.cursor()
        try:
            deltas: dict[_Figure, int] = {}
            for row in rows:
                cursor.execute(self._statements["quota_old"], (row[0],))
                old = cursor.fetchall()
                if old:
                    _count(deltas, old[0][1], -int(old[0][0] or 0))
            cursor.executemany(statement, rows)
            self._apply(cursor, deltas, {})
        finally:
            cursor.close()

    def _apply(self, cursor: Any, deltas: dict[_Figure, int], days: dict[_Figure, int]) -> None:
        # The total first, as every writer of the figures does (see the module's docstring).
        rows = [_row(f, d) for f, d in deltas.items() if d and f == _TOTAL]
        others = [_row(f, d) for f, d in deltas.items() if d and f != _TOTAL]
        others += [_row(f, d, _day_expiry(f[2])) for f, d in days.items() if d]
        rows += sorted(others)
        if rows:
            cursor.executemany(self._statements["quota_add"], rows)

    # -- holds ------------------------------------------------------------------------------------

    def quota_reserve(
        self, token: str, uploader: str | None, size: int, limits: Limits, now: float, ttl: float
    ) -> Deferred[tuple[bool, Usage]]:
        """Hold C{size} bytes for C{uploader} unless it would exceed one of C{limits}."""
        hold: _Hold = ("reserve", (token, uploader, size, limits, now, ttl))
        return self._holdBatcher().submit(hold)  # type: ignore[return-value]

    def quota_release(self, token: str, uploader: str | None) -> Deferred[None]:
        """Drop the hold C{token}; no error if it is gone."""
        d = self._holdBatcher().submit(("release", (token,)))
        return d.addCallback(lambda _: None)

    def _holdBatcher(self) -> Batcher[_Hold, tuple[bool, Usage] | None]:
        # Holds taken and dropped while others are in flight wait, then go together in one
        # transaction: each upload takes one and drops one, and SQLite has one writer.
        if self._quotaHolds is None:
            self._quotaHolds = Batcher(self._holdMany)
        return self._quotaHolds

    def _holdMany(
        self, batch: list[_Hold]
    ) -> Deferred[Sequence[tuple[bool, Usage] | Failure | None]]:
        return self._run(self._holdAll, batch)

    def _holdAll(self, connection: Any, batch: list[_Hold]) -> list[tuple[bool, Usage] | None]:
        """The holds of C{batch}, taken and dropped in order, in one transaction."""
        s = self._statements
        cursor = connection.cursor()
        try:
            results: list[tuple[bool, Usage] | None] = []
            locked: set[str | None] = set()
            purged = False
            for kind, args in batch:
                if kind == "release":
                    cursor.execute(s["quota_delete"], (_hash(f"hold\0{args[0]}"),))
                    results.append(None)
                    continue
                token, uploader, size, limits, now, ttl = args
                # Writing the rows locks them (the total first, as every writer does): holds
                # are taken one at a time from here on, across processes and nodes.
                for who in (None, uploader):
                    if who not in locked:
                        locked.add(who)
                        figure = _TOTAL if who is None else ("stored", who, 0)
                        cursor.execute(s["quota_add"], _row(figure, 0))
                if not purged:
                    purged = True
                    cursor.execute(s["quota_purge"], (now,))
                usage = self._usage(cursor, uploader, now)
                if exceeded(limits, usage, uploader, size) is not None:
                    results.append((False, usage))
                    continue
                hold = (_hash(f"hold\0{token}"), "hold", _hash(uploader or ""), uploader or "")
                cursor.execute(s["quota_insert"], (*hold, 0, size, now + ttl))
                results.append((True, usage))
            return results
        finally:
            cursor.close()

    # -- reading, and the admin's commands -------------------------------------------------------

    def quota_usage(self, uploader: str | None, now: float) -> Deferred[Usage]:
        """What C{uploader} (and everyone) uses now."""
        return self._run(self._usageOn, uploader, now)

    def _usageOn(self, connection: Any, uploader: str | None, now: float) -> Usage:
        cursor = connection.cursor()
        try:
            return self._usage(cursor, uploader, now)
        finally:
            cursor.close()

    def _usage(self, cursor: Any, uploader: str | None, now: float) -> Usage:
        s = self._statements

        def one(statement: str, params: tuple[Any, ...]) -> int:
            cursor.execute(statement, params)
            rows = cursor.fetchall()
            return int(rows[0][0] or 0) if rows else 0

        total = one(s["quota_bytes"], (_key(*_TOTAL),))
        held_total = one(s["quota_held_total"], (now,))
        if uploader is None:
            return Usage(total=total, held_total=held_total)
        owner = _hash(uploader)
        return Usage(
            stored=one(s["quota_bytes"], (_key("stored", uploader),)),
            daily=one(s["quota_daily"], (owner, hour_of(now) - DAY_HOURS + 1)),
            total=total,
            held=one(s["quota_held"], (owner, now)),
            held_total=held_total,
        )

    def quota_uploaders(self, now: float) -> Deferred[list[tuple[str, int, int]]]:
        """(uploader, stored, daily) of every uploader with something stored or uploaded."""
        d = self._run(
            _execute, self._statements["quota_uploaders"], (hour_of(now) - DAY_HOURS + 1,), True
        )

        def table(rows: list[tuple[Any, ...]]) -> list[tuple[str, int, int]]:
            found: dict[str, list[int]] = {}
            for uploader, kind, total in rows:
                if uploader == "":
                    continue
                found.setdefault(uploader, [0, 0])[0 if kind == "stored" else 1] += int(total)
            return sorted((u, s, d) for u, (s, d) in found.items() if s or d)

        return d.addCallback(table)

    def quota_reset(self, uploader: str, now: float) -> Deferred[None]:
        """Forget C{uploader}'s daily usage, and count its stored bytes again from the records."""
        return self._run(self._reset, uploader)

    def _reset(self, connection: Any, uploader: str) -> None:
        s = self._statements
        cursor = connection.cursor()
        try:
            cursor.execute(s["quota_add"], _row(_TOTAL, 0))  # the lock, as for every writer
            cursor.execute(s["quota_forget_days"], (_hash(uploader),))
            cursor.execute(s["quota_sum_uploader"], (uploader,))
            stored = int(cursor.fetchall()[0][0] or 0)
            cursor.execute(s["quota_delete"], (_key("stored", uploader),))
            cursor.execute(s["quota_insert"], _row(("stored", uploader, 0), stored))
        finally:
            cursor.close()

    def quota_rebuild(self, now: float) -> Deferred[None]:
        """Every figure again from the records, in one transaction; holds stay."""
        return self._run(self._rebuild, now)

    def _rebuild(self, connection: Any, now: float) -> None:
        s = self._statements
        cursor = connection.cursor()
        try:
            cursor.execute(s["quota_add"], _row(_TOTAL, 0))
            cursor.execute(s["quota_forget_all"])
            cursor.execute(s["quota_sum_all"])
            rows = [_row(_TOTAL, int(cursor.fetchall()[0][0] or 0))]
            cursor.execute(s["quota_sum_by_uploader"])
            rows += [_row(("stored", u, 0), int(total)) for u, total in cursor.fetchall()]
            first = hour_of(now) - DAY_HOURS + 1
            cursor.execute(s["quota_recent"], (float(first * 3600),))
            days: dict[_Figure, int] = {}
            for uploader, created, size in cursor.fetchall():
                day = ("day", uploader, hour_of(float(created)))
                days[day] = days.get(day, 0) + int(size)
            rows += [_row(f, d, _day_expiry(f[2])) for f, d in days.items()]
            cursor.executemany(s["quota_insert"], rows)
        finally:
            cursor.close()


def _count(deltas: dict[_Figure, int], uploader: str | None, size: int) -> None:
    deltas[_TOTAL] = deltas.get(_TOTAL, 0) + size
    if uploader is not None:
        figure = ("stored", uploader, 0)
        deltas[figure] = deltas.get(figure, 0) + size


def _execute(
    connection: Any, statement: str, params: Sequence[Any] = (), fetch: bool = False
) -> Any:
    cursor = connection.cursor()
    try:
        cursor.execute(statement, params)
        return cursor.fetchall() if fetch else None
    finally:
        cursor.close()
