"""
What the admin commands need of an SQL store (L{hmacd.store.sql.SQLStore}): a walk
over every record in pages, and the takedowns.

The walk goes in C{path_hash} order, the primary key's: each page is one range read on
the index however large the table, and the cursor is the last key read.

Takedowns live in C{<table>_takedowns}, one row per path (keyed, like the records, by
the SHA-256 of the path) with the content's digest, indexed: L{hmacd.takedown}.  They
never expire.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from hmacd.metadata import RECORD_FIELDS, FileRecord
from hmacd.takedown import Takedown

__all__ = ["AdminSQL", "admin_schema", "admin_statements"]

_TAKEDOWN_COLUMNS = ("path", "status", "sha256", "reason", "created", "who")

_TAKEDOWN_DDL = """CREATE TABLE IF NOT EXISTS {{table}}_takedowns (
    path_hash CHAR(64){ascii} NOT NULL PRIMARY KEY,
    path TEXT NOT NULL,
    status INTEGER NOT NULL,
    sha256 VARCHAR(64){ascii} NOT NULL,
    reason TEXT NOT NULL,
    created {double} NOT NULL,
    who TEXT NOT NULL{index}
){engine}"""

_TAKEDOWN_INDEX = (
    "CREATE INDEX IF NOT EXISTS {table}_takedowns_sha256 ON {table}_takedowns (sha256)"
)


def admin_schema(dialect: str) -> tuple[str, ...]:
    """The DDL of the takedown table for C{dialect} (C{{table}} left to fill in)."""
    if dialect == "mysql":
        # MySQL has no CREATE INDEX IF NOT EXISTS: the index goes in the table.
        return (
            _TAKEDOWN_DDL.format(
                ascii=" CHARACTER SET ascii",
                double="DOUBLE",
                index=",\n    INDEX {table}_takedowns_sha256 (sha256)",
                engine=" ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
            ),
        )
    return (
        _TAKEDOWN_DDL.format(ascii="", double="DOUBLE PRECISION", index="", engine=""),
        _TAKEDOWN_INDEX,
    )


def admin_statements(dialect: str, table: str, p: str) -> dict[str, str]:
    """The walk's and the takedowns' statements, table and placeholder filled in."""
    marks = ", ".join([p] * (len(_TAKEDOWN_COLUMNS) + 1))
    insert = (
        f"INTO {{table}}_takedowns (path_hash, {', '.join(_TAKEDOWN_COLUMNS)}) VALUES ({marks})"
    )
    if dialect == "sqlite":
        upsert = "INSERT OR REPLACE " + insert
    elif dialect == "postgres":
        upsert = (
            "INSERT "
            + insert
            + " ON CONFLICT (path_hash) DO UPDATE SET "
            + ", ".join(f"{c} = EXCLUDED.{c}" for c in _TAKEDOWN_COLUMNS)
        )
    else:
        upsert = (
            "INSERT "
            + insert
            + " ON DUPLICATE KEY UPDATE "
            + ", ".join(f"{c} = VALUES({c})" for c in _TAKEDOWN_COLUMNS)
        )
    columns = ", ".join(_TAKEDOWN_COLUMNS)
    statements = {
        "scan": f"SELECT path_hash, {', '.join(RECORD_FIELDS)} FROM {{table}}"
        f" WHERE path_hash > {p} ORDER BY path_hash LIMIT {p}",
        "takedown_put": upsert,
        "takedown_get": f"SELECT {columns} FROM {{table}}_takedowns WHERE path_hash = {p}",
        "takedown_denied": f"SELECT {columns} FROM {{table}}_takedowns WHERE sha256 = {p}"
        " ORDER BY status DESC LIMIT 1",
        "takedown_all": f"SELECT {columns} FROM {{table}}_takedowns",
        "takedown_lift": f"DELETE FROM {{table}}_takedowns WHERE path_hash = {p}",
    }
    return {key: sql.format(table=table) for key, sql in statements.items()}


def _path_hash(path: str) -> str:
    return hashlib.sha256(path.encode("utf-8")).hexdigest()


def _takedown(row: Sequence[Any]) -> Takedown:
    path, status, sha256, reason, created, who = row
    return Takedown(path, int(status), sha256, reason, float(created), who)


class AdminSQL:
    """The walk and the takedowns for L{SQLStore}, which provides C{_call} and C{_statements}."""

    _statements: dict[str, str]

    def _call(self, statement: str, params: Sequence[Any], *, fetch: bool = False) -> Deferred[Any]:
        raise NotImplementedError

    def scan(self, cursor: str, limit: int) -> Deferred[tuple[list[FileRecord], str | None]]:
        """
        Up to C{limit} records after C{cursor} ("" to begin), and the cursor to go on
        from (None at the end).  Each record present for the whole walk comes once.
        """
        if limit < 1:
            return fail(ValueError(f"limit must be at least 1, got {limit!r}"))
        d = self._call(self._statements["scan"], (cursor, int(limit)), fetch=True)

        def page(rows: Sequence[Sequence[Any]]) -> tuple[list[FileRecord], str | None]:
            found = [FileRecord.from_row(row[1:]) for row in rows]
            after = str(rows[-1][0]) if len(rows) == limit else None
            return found, after

        return d.addCallback(page)

    def put_takedown(self, takedown: Takedown) -> Deferred[None]:
        """Keep C{takedown} for good, replacing any for its path."""
        t = takedown
        params = (_path_hash(t.path), t.path, t.status, t.sha256, t.reason, t.created, t.who)
        return self._call(self._statements["takedown_put"], params).addCallback(lambda _: None)

    def _one(self, statement: str, key: str) -> Deferred[Takedown | None]:
        d = self._call(self._statements[statement], (key,), fetch=True)
        return d.addCallback(lambda rows: _takedown(rows[0]) if rows else None)

    def takedown(self, path: str) -> Deferred[Takedown | None]:
        """The takedown of C{path}, or None."""
        return self._one("takedown_get", _path_hash(path))

    def denied(self, sha256: str) -> Deferred[Takedown | None]:
        """A takedown of content C{sha256} (the strictest), or None."""
        if not sha256:
            return succeed(None)  # an unknown digest denies nothing
        return self._one("takedown_denied", sha256)

    def takedowns(self) -> Deferred[list[Takedown]]:
        """Every takedown."""
        d = self._call(self._statements["takedown_all"], (), fetch=True)
        return d.addCallback(lambda rows: [_takedown(row) for row in rows])

    def lift_takedown(self, path: str) -> Deferred[None]:
        """Forget the takedown of C{path} (its URL answers 404, its content may come back)."""
        d = self._call(self._statements["takedown_lift"], (_path_hash(path),))
        return d.addCallback(lambda _: None)
