"""
File records in SQL: embedded SQLite (the default store), PostgreSQL through
psycopg2, or MySQL/MariaDB through pymysql, all over
L{twisted.enterprise.adbapi}.

One table, keyed by the SHA-256 (hex) of the UTF-8 path: MySQL cannot index a
2048-byte utf8mb4 column, and a fixed-width key is as good everywhere else.
A second one, C{<table>_shared}, holds what nodes share (claims, leases,
state: L{hmacd.store.sql_shared}).  The statements are in
L{hmacd.store.sql_statements}, the adbapi machinery in L{hmacd.store.sql_pool}.

adbapi keeps one connection per pool thread and does not notice a connection
the server has dropped until a query on it fails.  Every call here is
idempotent (put is an upsert), so a call that fails on a lost connection
reconnects that thread and runs once more; anything that still fails with a
driver error becomes L{StoreUnavailable}, whose text says which store and why
in one line, and never the password.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import suppress
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hmacd.address import DEFAULT_DB_PORTS, HostPort
from hmacd.batch import Batcher
from hmacd.store import FileRecord, IMetadataStore, StoreUnavailable
from hmacd.store.sql_admin import AdminSQL, admin_schema, admin_statements
from hmacd.store.sql_pool import MYSQL_QUERY_TIMEOUT, _ConnectionPool, _mysql_open, _sqlite_open
from hmacd.store.sql_quota import QuotaSQL, usage_schema, usage_statements
from hmacd.store.sql_shared import SharedSQL
from hmacd.store.sql_statements import _COLUMNS, _DIALECTS, _IDENTIFIER

log = Logger()

__all__ = ["DEFAULT_PORTS", "DEFAULT_TABLE", "MYSQL_QUERY_TIMEOUT", "SQLStore", "parse_db_host"]

DEFAULT_TABLE = "hmacfs_files"
DEFAULT_PORTS = DEFAULT_DB_PORTS
DEFAULT_CONNECT_TIMEOUT = 5.0


def parse_db_host(text: str, default_port: int) -> HostPort:
    """
    C{FallbackDBHost} as (host, port): C{"host"}, C{"host:port"}, C{"[v6]"},
    C{"[v6]:port"} or a bare IPv6 address; ValueError otherwise.
    """
    return HostPort.parse(text, default_port)


def _reason(error: BaseException | None) -> str:
    """The driver's own words for C{error}, on one line, without our prefixes doubled."""
    if error is None:  # a Failure always has its exception; the type allows None
        return "unknown error"
    if isinstance(error, ImportError):
        return f"database driver not installed ({error})"
    if isinstance(error, adbapi.ConnectionLost):
        return "connection lost"
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    args = error.args
    if len(args) == 2 and isinstance(args[0], int) and isinstance(args[1], str):
        # pymysql: (error number, message)
        code, text = args
        return f"{text} ({code})" if text else f"{type(error).__name__} ({code})"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    # libpq: 'connection to server at "h" (addr), port 5432 failed: FATAL:  database ...'
    text = re.sub(r"^connection to server .*? failed:\s*", "", text)
    text = re.sub(r"^(?:FATAL|ERROR):\s*", "", text)
    return text or type(error).__name__


def _path_hash(path: str) -> str:
    return hashlib.sha256(path.encode("utf-8")).hexdigest()


@implementer(IMetadataStore)
class SQLStore(SharedSQL, AdminSQL, QuotaSQL):
    """
    File records in one SQL table.  Build one with L{sqlite}, L{postgres},
    L{mysql} or L{from_config}; nothing connects (and adbapi starts no
    threads) until L{start}.

    @ivar name: C{"sqlite"}, C{"postgres"} or C{"mysql"}.
    @ivar table: the table the records live in.
    @ivar host: server host name or address (None for sqlite).
    @ivar port: server port (None for sqlite).
    @ivar path: the database file (None for a server).
    @ivar pool: the L{adbapi.ConnectionPool} while started, else None.
    """

    pool: _ConnectionPool | None = None

    def __init__(
        self,
        name: str,
        connect_kwargs: Mapping[str, Any],
        *,
        table: str = DEFAULT_TABLE,
        reactor: Any = None,
        pool_size: int = 5,
        host: str | None = None,
        port: int | None = None,
        path: str | None = None,
        password: str = "",
        openfun: Callable[[Any], None] | None = None,
    ) -> None:
        if name not in _DIALECTS:
            raise ValueError(f"unknown SQL store {name!r}; use sqlite, postgres or mysql")
        if not _IDENTIFIER.fullmatch(table):
            raise ValueError(
                f"table name must match [a-z_][a-z0-9_]* (at most 48 characters), got {table!r}"
            )
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, got {pool_size!r}")
        self.name = name
        self.table = table
        self.host = host
        self.port = port
        self.path = path
        self._dialect = _DIALECTS[name]
        self._connect_kwargs = dict(connect_kwargs)
        self._reactor = reactor
        self._pool_size = pool_size
        self._password = password
        self._openfun = openfun
        self._where = path if path is not None else str(HostPort(host or "", port or 0))
        # Import the driver now, not in start(): under twistd --uid, start() runs after the
        # privilege switch, when the interpreter's own library may no longer be readable.  A
        # missing driver is reported by start(), like any other reason the store cannot run.
        self._driver: Any = None
        self._missing: ImportError | None = None
        try:
            self._driver = importlib.import_module(self._dialect.module)
        except ImportError as e:
            self._missing = e
        self._down: tuple[type[BaseException], ...] = (adbapi.ConnectionLost,)
        # Puts, and deletes, made while one runs wait for it and then go together.
        self._puts: Batcher[tuple[Any, ...], None] = Batcher(self._batch("put"))
        self._deletes: Batcher[tuple[Any, ...], None] = Batcher(self._batch("delete"))
        self._statements = self._prepare()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def sqlite(
        cls,
        path: str,
        reactor: Any = None,
        *,
        table: str = DEFAULT_TABLE,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> SQLStore:
        """An embedded SQLite database at C{path}; its directory is created (mode 0700)."""
        return cls(
            "sqlite",
            # timeout: how long to wait for a lock another process holds.
            dict(database=path, timeout=connect_timeout, check_same_thread=False),
            table=table,
            reactor=reactor,
            # One connection: SQLite has one writer anyway, and this keeps it in one thread.
            pool_size=1,
            path=path,
            openfun=_sqlite_open,
        )

    @classmethod
    def postgres(
        cls,
        host: str,
        port: int,
        user: str,
        password: str,
        database: str,
        reactor: Any = None,
        table: str = DEFAULT_TABLE,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        pool_size: int = 5,
        application_name: str = "hmacfs",
    ) -> SQLStore:
        """
        A PostgreSQL database through psycopg2.  libpq counts C{connect_timeout}
        in whole seconds, at least 2.
        """
        kwargs: dict[str, Any] = dict(
            host=host,
            port=port,
            dbname=database,
            connect_timeout=max(2, math.ceil(connect_timeout)),
            application_name=application_name,
        )
        if user:
            kwargs["user"] = user
        if password:
            kwargs["password"] = password
        return cls(
            "postgres",
            kwargs,
            table=table,
            reactor=reactor,
            pool_size=pool_size,
            host=host,
            port=port,
            password=password,
        )

    @classmethod
    def mysql(
        cls,
        host: str,
        port: int,
        user: str,
        password: str,
        database: str,
        reactor: Any = None,
        table: str = DEFAULT_TABLE,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        pool_size: int = 5,
    ) -> SQLStore:
        """A MySQL or MariaDB database through pymysql, in utf8mb4."""
        kwargs: dict[str, Any] = dict(
            host=host,
            port=port,
            database=database,
            charset="utf8mb4",
            connect_timeout=connect_timeout,
            read_timeout=connect_timeout,
            write_timeout=connect_timeout,
            autocommit=False,
        )
        if user:
            kwargs["user"] = user
        if password:
            kwargs["password"] = password
        return cls(
            "mysql",
            kwargs,
            table=table,
            reactor=reactor,
            pool_size=pool_size,
            host=host,
            port=port,
            password=password,
            openfun=_mysql_open,
        )

    @classmethod
    def from_config(
        cls,
        config: Any,
        reactor: Any = None,
        *,
        table: str = DEFAULT_TABLE,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> SQLStore:
        """The fallback database of a L{hmacd.config.Config} (its C{fallback_db_*} fields)."""
        kind = config.fallback_db_type
        if kind not in DEFAULT_PORTS:
            raise ValueError(f'FallbackDBType must be "postgres" or "mysql", got {kind!r}')
        address: HostPort = config.fallback_db_address
        make = cls.postgres if kind == "postgres" else cls.mysql
        return make(
            address.host,
            address.port,
            config.fallback_db_user,
            config.fallback_db_password,
            config.fallback_db_name,
            reactor,
            table,
            connect_timeout=connect_timeout,
        )

    def __repr__(self) -> str:
        return f"<SQLStore {self.name} at {self._where} table {self.table}>"

    # -- IMetadataStore -----------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Connect and create the table and its index if missing; StoreUnavailable if we cannot."""
        if self.pool is not None:
            return succeed(None)
        if self._missing is not None:
            return fail(StoreUnavailable(self._describe(self._missing)))
        try:
            if self.path is not None and self.path != ":memory:":
                os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
        except OSError as e:
            return fail(StoreUnavailable(self._describe(e)))
        pool = self._makePool()
        dbapi = self._driver
        self._down = (
            dbapi.OperationalError,
            dbapi.InterfaceError,
            dbapi.InternalError,
            adbapi.ConnectionLost,
        )
        self.pool = pool
        d: Deferred[None] = pool.runWithConnection(self._createSchema)

        def failed(failure: Failure) -> Failure:
            if self.pool is pool:
                self.pool = None
                pool.closeInBackground()
            if failure.check(dbapi.Error, adbapi.ConnectionLost):
                raise StoreUnavailable(self._describe(failure.value)) from failure.value
            return failure

        d.addErrback(failed)
        return d

    def stop(self) -> Deferred[None]:
        """Close the pool's connections and stop its threads, never blocking the reactor."""
        pool, self.pool = self.pool, None
        if pool is None:
            return succeed(None)
        return pool.closeInBackground()

    def put(self, record: FileRecord) -> Deferred[None]:
        """
        Insert C{record}, replacing any record for its path.

        Puts made while another is running wait for it and then go together, in one
        transaction: under load one pool hand-off and one commit serve many uploads.
        """
        params = (_path_hash(record.path), *record.to_row())
        return self._puts.submit(params)

    def get(self, path: str) -> Deferred[FileRecord | None]:
        """The record for C{path}, or None."""
        d = self._call(self._statements["get"], (_path_hash(path),), fetch=True)
        return d.addCallback(lambda rows: FileRecord.from_row(rows[0]) if rows else None)

    def delete(self, path: str) -> Deferred[None]:
        """
        Forget C{path}; no error if it is unknown.

        As with puts, deletes made while others run wait and then go together in one
        transaction: the expiry sweep deletes hundreds at a time, and one commit each made
        SQLite the sweep's bound (about 1,100 a second here).
        """
        return self._deletes.submit((_path_hash(path),))

    def expired(self, now: float, limit: int) -> Deferred[list[FileRecord]]:
        """Up to C{limit} records whose expiry is at or before C{now}, soonest first."""
        if limit < 0:
            return fail(ValueError(f"limit must be >= 0, got {limit!r}"))
        d = self._call(self._statements["expired"], (float(now), int(limit)), fetch=True)
        return d.addCallback(lambda rows: [FileRecord.from_row(row) for row in rows])

    def count_expired(self, now: float) -> Deferred[int]:
        """How many records expire at or before C{now} (a range count on the expiry index)."""
        d = self._call(self._statements["count_expired"], (float(now),), fetch=True)
        return d.addCallback(lambda rows: int(rows[0][0]))

    def records(self, limit: int) -> Deferred[list[FileRecord]]:
        """Up to C{limit} records, in no particular order."""
        if limit < 0:
            return fail(ValueError(f"limit must be >= 0, got {limit!r}"))
        d = self._call(self._statements["records"], (int(limit),), fetch=True)
        return d.addCallback(lambda rows: [FileRecord.from_row(row) for row in rows])

    def ping(self) -> Deferred[None]:
        """One C{SELECT 1} round trip."""
        return self._call("SELECT 1", (), fetch=True).addCallback(lambda _: None)

    # -- machinery ----------------------------------------------------------------------------

    def _batch(
        self, which: str
    ) -> Callable[[list[tuple[Any, ...]]], Deferred[Sequence[Failure | None]]]:
        """The run function of a L{Batcher} of C{which} statements: all in one transaction."""

        def run(batch: list[tuple[Any, ...]]) -> Deferred[Sequence[Failure | None]]:
            statement = self._statements[which]
            # Asked per batch: quota accounting may be switched on after construction.
            write = self._writer(which)
            done: Deferred[Any] = self._run(write, statement, batch)

            def alone(failure: Failure) -> Failure | Deferred[Sequence[Failure | None]]:
                if len(batch) == 1 or failure.check(StoreUnavailable):
                    return failure
                # One record the database refuses must not take the others down with it:
                # each goes again on its own, and fails alone.
                each = [self._run(write, statement, [params]) for params in batch]
                return DeferredList(each, consumeErrors=True).addCallback(
                    lambda results: [None if ok else result for ok, result in results]
                )

            return done.addCallbacks(lambda _: [None] * len(batch), alone)

        return run

    def _prepare(self) -> dict[str, str]:
        p = self._dialect.placeholder
        select = f"SELECT {', '.join(_COLUMNS)} FROM {{table}}"
        statements = {
            "put": self._dialect.upsert,
            "get": f"{select} WHERE path_hash = {p}",
            "delete": f"DELETE FROM {{table}} WHERE path_hash = {p}",
            "expired": f"{select} WHERE expires <= {p} ORDER BY expires, path_hash LIMIT {p}",
            "count_expired": f"SELECT COUNT(*) FROM {{table}} WHERE expires <= {p}",
            "records": f"{select} LIMIT {p}",
        }
        prepared = {key: sql.format(table=self.table) for key, sql in statements.items()}
        prepared.update(self._dialect.shared.format(self.table, p))
        prepared.update(usage_statements(self.name, self.table, p))
        prepared.update(admin_statements(self.name, self.table, p))
        return prepared

    def _now(self) -> float:
        # The reactor's clock when one was given (tests drive it), else the wall clock.
        return self._reactor.seconds() if self._reactor is not None else time.time()

    def _makePool(self) -> _ConnectionPool:
        reactor = self._reactor
        if reactor is None:
            # What adbapi would take without cp_reactor; the pool needs it named.
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        options: dict[str, Any] = dict(
            cp_min=1,
            cp_max=self._pool_size,
            cp_reconnect=True,
            cp_name=f"hmacfs-{self.name}",
            cp_reactor=reactor,
        )
        if self._openfun is not None:
            options["cp_openfun"] = self._openfun
        pool = _ConnectionPool(self._dialect.module, **self._connect_kwargs, **options)
        # Start now, not at reactor start-up: start() may run before the reactor does.
        pool.start()
        return pool

    def _createSchema(self, connection: Any) -> None:
        # Not retried: a retry would double the wait for an unreachable server.
        schema = (
            *self._dialect.schema,
            *self._dialect.shared.schema,
            *admin_schema(self.name),
            *usage_schema(self.name),
        )
        for statement in schema:
            self._execute(connection, statement.format(table=self.table), (), False)

    @staticmethod
    def _execute(connection: Any, statement: str, params: Sequence[Any], fetch: bool) -> Any:
        cursor = connection.cursor()
        try:
            cursor.execute(statement, params)
            return cursor.fetchall() if fetch else None
        finally:
            with suppress(Exception):
                cursor.close()

    @staticmethod
    def _executeMany(connection: Any, statement: str, rows: Sequence[Sequence[Any]]) -> None:
        cursor = connection.cursor()
        try:
            cursor.executemany(statement, rows)
        finally:
            with suppress(Exception):
                cursor.close()

    def _attempt(self, connection: Any, execute: Callable[..., Any], *args: Any) -> Any:
        try:
            return execute(connection, *args)
        except self._down:
            # The first query after the server dropped us fails even with cp_reconnect; the
            # statements are idempotent, so reconnect this thread and run it once more.
            connection.reconnect()
            return execute(connection, *args)

    def _run(self, execute: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """C{execute(connection, *args)} in the pool, retried once on a lost connection."""
        pool = self.pool
        if pool is None:
            return fail(StoreUnavailable(f"{self.name} at {self._where}: not started"))
        d: Deferred[Any] = pool.runWithConnection(self._attempt, execute, *args)
        return d.addErrback(self._unavailable)

    def _call(self, statement: str, params: Sequence[Any], *, fetch: bool = False) -> Deferred[Any]:
        return self._run(self._execute, statement, params, fetch)

    def _unavailable(self, failure: Failure) -> Failure:
        if failure.check(*self._down):
            raise StoreUnavailable(self._describe(failure.value)) from failure.value
        return failure

    def _describe(self, error: BaseException | None) -> str:
        text = " ".join(f"{self.name} at {self._where}: {_reason(error)}".split())
        if self._password:
            text = text.replace(self._password, "***")
        return text
