"""
The SQL each database speaks, for L{hmacd.store.sql.SQLStore}: the schema,
the record upsert, and the statements of the shared table (claims, leases
and the small key/value store that nodes share).

Values are always bound parameters; the table name, checked against
L{_IDENTIFIER} by the store, is the only thing ever formatted in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hmacd.metadata import RECORD_FIELDS

# Short enough that "<table>_expires" stays within PostgreSQL's 63-byte names.
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,47}")

_COLUMNS = RECORD_FIELDS


@dataclass(frozen=True)
class _Dialect:
    """What differs between the three databases: driver, placeholder, DDL, upsert."""

    name: str
    module: str
    placeholder: str
    schema: tuple[str, ...]
    upsert: str
    shared: SharedStatements


@dataclass(frozen=True)
class SharedStatements:
    """
    The shared table C{<table>_shared}: one row per claim, lease or state
    entry, keyed by the SHA-256 of its kind and name, with an absolute expiry.

    C{take} inserts a row, or takes over one that has expired or that the same
    owner already holds, in one statement; what it did is read back by
    C{holder} in the same transaction (C{lock} makes that a locking read where
    the database has one).  Parameters: take (key, owner, expires, now),
    holder (key, now), renew (expires, key, owner, now), release (key, owner),
    put (key, value, expires), delete (key), purge (now).
    """

    schema: tuple[str, ...]
    take: str
    put: str
    lock: str = ""
    holder: str = "SELECT content FROM {table}_shared WHERE key_hash = {p} AND expires > {p}"
    renew: str = (
        "UPDATE {table}_shared SET expires = {p}"
        " WHERE key_hash = {p} AND content = {p} AND expires > {p}"
    )
    release: str = "DELETE FROM {table}_shared WHERE key_hash = {p} AND content = {p}"
    delete: str = "DELETE FROM {table}_shared WHERE key_hash = {p}"
    purge: str = "DELETE FROM {table}_shared WHERE expires <= {p}"

    def format(self, table: str, placeholder: str) -> dict[str, str]:
        """Every statement, named C{shared_<name>}, with the table and placeholder filled in."""
        names = ("take", "put", "holder", "renew", "release", "delete", "purge")
        statements = {
            f"shared_{n}": getattr(self, n).format(table=table, p=placeholder) for n in names
        }
        statements["shared_holder_locked"] = statements["shared_holder"] + self.lock
        return statements


_SHARED_DDL = """CREATE TABLE IF NOT EXISTS {{table}}_shared (
    key_hash CHAR(64) PRIMARY KEY,
    content TEXT NOT NULL,
    expires {double} NOT NULL
)"""

_SHARED_INDEX = "CREATE INDEX IF NOT EXISTS {table}_shared_expires ON {table}_shared (expires)"

_SHARED_INSERT = "INSERT INTO {{table}}_shared (key_hash, content, expires) VALUES ({p}, {p}, {p})"

# An upsert whose update only happens when the row has expired or is the same owner's:
# the conflict target locks the row, so two nodes racing for it serialise here.
_TAKE_UPSERT = (
    _SHARED_INSERT + " ON CONFLICT (key_hash) DO UPDATE SET content = excluded.content,"
    " expires = excluded.expires"
    " WHERE {{table}}_shared.expires <= {p} OR {{table}}_shared.content = excluded.content"
)

_SHARED_SQLITE = SharedStatements(
    schema=(_SHARED_DDL.format(double="DOUBLE PRECISION"), _SHARED_INDEX),
    take=_TAKE_UPSERT.format(p="{p}"),
    put=_SHARED_INSERT.format(p="{p}").replace("INSERT INTO", "INSERT OR REPLACE INTO"),
)

_SHARED_POSTGRES = SharedStatements(
    schema=(_SHARED_DDL.format(double="DOUBLE PRECISION"), _SHARED_INDEX),
    take=_TAKE_UPSERT.format(p="{p}"),
    put=_SHARED_INSERT.format(p="{p}")
    + " ON CONFLICT (key_hash) DO UPDATE SET content = EXCLUDED.content,"
    " expires = EXCLUDED.expires",
    lock=" FOR UPDATE",
)

_SHARED_MYSQL = SharedStatements(
    schema=(
        "CREATE TABLE IF NOT EXISTS {table}_shared (\n"
        "    key_hash CHAR(64) CHARACTER SET ascii NOT NULL PRIMARY KEY,\n"
        "    content MEDIUMTEXT NOT NULL,\n"
        "    expires DOUBLE NOT NULL,\n"
        "    INDEX {table}_shared_expires (expires)\n"
        ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
    ),
    # MEDIUMTEXT: MySQL's TEXT stops at 64 KiB, short of a resumable upload's list of parts.
    # MySQL assigns left to right with the new values: content first, so that
    # expires moves exactly when the row is (now) the owner's.
    take=_SHARED_INSERT.format(p="{p}") + " ON DUPLICATE KEY UPDATE"
    " content = IF(expires <= {p} OR content = VALUES(content), VALUES(content), content),"
    " expires = IF(content = VALUES(content), VALUES(expires), expires)",
    put=_SHARED_INSERT.format(p="{p}")
    + " ON DUPLICATE KEY UPDATE content = VALUES(content), expires = VALUES(expires)",
    lock=" FOR UPDATE",
)


# content_type is TEXT rather than VARCHAR(255): nothing upstream bounds the signed
# Content-Type, and a put must not fail on a long one.  sha256 is VARCHAR(64), not CHAR(64):
# PostgreSQL pads CHAR values with spaces and MySQL strips them, so only VARCHAR gives back
# exactly what was put.
_COLUMN_DDL = """
    path TEXT NOT NULL,
    size BIGINT NULL,
    content_type TEXT NULL,
    sha256 VARCHAR(64) NULL,
    created {double} NULL,
    protocol VARCHAR(16) NULL,
    uploader TEXT NULL,
    expires {double} NULL"""

_INSERT = "INSERT {verb} {{table}} (path_hash, " + ", ".join(_COLUMNS) + ") VALUES ({marks})"


def _insert(verb: str, placeholder: str) -> str:
    return _INSERT.format(verb=verb, marks=", ".join([placeholder] * (len(_COLUMNS) + 1)))


_DIALECTS = {
    "sqlite": _Dialect(
        name="sqlite",
        module="sqlite3",
        placeholder="?",
        schema=(
            "CREATE TABLE IF NOT EXISTS {table} (\n    path_hash CHAR(64) PRIMARY KEY,"
            + _COLUMN_DDL.format(double="DOUBLE PRECISION")
            + "\n)",
            "CREATE INDEX IF NOT EXISTS {table}_expires ON {table} (expires)",
        ),
        upsert=_insert("OR REPLACE INTO", "?"),
        shared=_SHARED_SQLITE,
    ),
    "postgres": _Dialect(
        name="postgres",
        module="psycopg2",
        placeholder="%s",
        schema=(
            # Nodes starting together on an empty database: PostgreSQL's CREATE ... IF NOT
            # EXISTS is not safe against a concurrent one (a unique violation in pg_type),
            # so they take turns, until the schema's transaction commits.
            "SELECT pg_advisory_xact_lock(hashtext('hmacfs schema {table}'))",
            "CREATE TABLE IF NOT EXISTS {table} (\n    path_hash CHAR(64) PRIMARY KEY,"
            + _COLUMN_DDL.format(double="DOUBLE PRECISION")
            + "\n)",
            "CREATE INDEX IF NOT EXISTS {table}_expires ON {table} (expires)",
        ),
        upsert=_insert("INTO", "%s")
        + " ON CONFLICT (path_hash) DO UPDATE SET "
        + ", ".join(f"{c} = EXCLUDED.{c}" for c in _COLUMNS),
        shared=_SHARED_POSTGRES,
    ),
    "mysql": _Dialect(
        name="mysql",
        module="pymysql",
        placeholder="%s",
        # MySQL has no CREATE INDEX IF NOT EXISTS (MariaDB does): the index goes in the table.
        schema=(
            "CREATE TABLE IF NOT EXISTS {table} (\n"
            "    path_hash CHAR(64) CHARACTER SET ascii NOT NULL PRIMARY KEY,"
            + _COLUMN_DDL.format(double="DOUBLE")
            + ",\n    INDEX {table}_expires (expires)\n"
            ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
        ),
        # VALUES(col), not the MySQL 8 "AS new" alias, which MariaDB does not have.
        upsert=_insert("INTO", "%s")
        + " ON DUPLICATE KEY UPDATE "
        + ", ".join(f"{c} = VALUES({c})" for c in _COLUMNS),
        shared=_SHARED_MYSQL,
    ),
}
