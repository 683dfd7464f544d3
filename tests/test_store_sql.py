"""
SQLStore against embedded SQLite and the real PostgreSQL and MariaDB on
127.0.0.1: the shared store contract, then what only SQL has (start-up
failures, a connection killed by the server, the config's host syntax).
"""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
import uuid
from functools import cache

from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hmacd.config import Config
from hmacd.store import StoreUnavailable
from hmacd.store.sql import SQLStore, parse_db_host
from tests.store_contract import (
    AdminContract,
    QuotaContract,
    SharedContract,
    StoreContract,
    record,
    require_service,
)

POSTGRES = dict(host="127.0.0.1", port=5432, user="postgres", password="", database="test")
MYSQL = dict(host="127.0.0.1", port=3306, user="root", password="", database="test")

# Short enough that the timing tests stay quick; libpq's minimum is 2 s.
TIMEOUT = 2


@cache
def postgres_down() -> str | None:
    """Why PostgreSQL cannot be used here, or None."""
    try:
        import psycopg2
    except ImportError as e:
        return f"psycopg2 is not installed ({e})"
    try:
        psycopg2.connect(
            host=POSTGRES["host"],
            port=POSTGRES["port"],
            user=POSTGRES["user"],
            dbname=POSTGRES["database"],
            connect_timeout=TIMEOUT,
        ).close()
    except psycopg2.Error as e:
        return f"cannot connect to {POSTGRES['host']}:{POSTGRES['port']}: {str(e).strip()}"
    return None


@cache
def mysql_down() -> str | None:
    """Why MariaDB cannot be used here, or None."""
    try:
        import pymysql
    except ImportError as e:
        return f"pymysql is not installed ({e})"
    try:
        mysql_connection().close()
    except pymysql.Error as e:
        return f"cannot connect to {MYSQL['host']}:{MYSQL['port']}: {e}"
    return None


def postgres_connection():
    """A plain psycopg2 connection in autocommit, for setting up and breaking things."""
    import psycopg2

    connection = psycopg2.connect(
        host=POSTGRES["host"],
        port=POSTGRES["port"],
        user=POSTGRES["user"],
        dbname=POSTGRES["database"],
        connect_timeout=TIMEOUT,
    )
    connection.autocommit = True
    return connection


def mysql_connection():
    """A plain pymysql connection in autocommit, for setting up and breaking things."""
    import pymysql

    return pymysql.connect(
        host=MYSQL["host"],
        port=MYSQL["port"],
        user=MYSQL["user"],
        password=MYSQL["password"],
        database=MYSQL["database"],
        connect_timeout=TIMEOUT,
        read_timeout=10,
        autocommit=True,
    )


def drop_table(connect, table: str) -> None:
    connection = connect()
    try:
        cursor = connection.cursor()
        cursor.execute(f"DROP TABLE IF EXISTS {table}")
        cursor.execute(f"DROP TABLE IF EXISTS {table}_shared")
        cursor.execute(f"DROP TABLE IF EXISTS {table}_usage")
        cursor.execute(f"DROP TABLE IF EXISTS {table}_takedowns")
        cursor.close()
    finally:
        connection.close()


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (it was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def silent_server(case: TestCase) -> int:
    """A port whose kernel completes the TCP handshake but where nobody ever answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    case.addCleanup(s.close)
    return s.getsockname()[1]


def unique_table() -> str:
    return "hmacfs_t_" + uuid.uuid4().hex


class SQLChecks:
    """Checks every SQL dialect passes, beyond the store contract."""

    @inlineCallbacks
    def test_expired_shared_rows_purged(self):
        """Expired claims, leases and state rows are deleted by a later claim, live ones kept."""
        from tests.store_contract import pause

        query = f"SELECT COUNT(*) FROM {self.store.table}_shared"

        def count():
            return self.store.pool.runQuery(query).addCallback(lambda rows: int(rows[0][0]))

        yield self.store.claim("p/old", "node-a", 0.1)
        yield self.store.lease("old", "node-a", 0.1)
        yield self.store.put_state("old", "v", 0.1)
        yield self.store.put_state("live", "v", 30.0)
        self.assertEqual((yield count()), 4)
        yield pause(0.3)
        self.store.purgeInterval = 0.0
        yield self.store.claim("p/new", "node-a", 30.0)
        for _ in range(50):  # the purge runs beside the claim
            rows = yield count()
            if rows == 2:
                break
            yield pause(0.05)
        self.assertEqual(rows, 2)
        self.assertEqual((yield self.store.get_state("live")), "v")

    @inlineCallbacks
    def test_two_stores_one_table(self):
        """Two stores on one table see each other's puts and deletes."""
        other = yield self.makeStore(fresh=False)
        self.addCleanup(other.stop)
        yield other.put(record("from/other", expires=7.0))
        yield self.store.put(record("from/first"))
        self.assertEqual((yield self.store.get("from/other")), record("from/other", expires=7.0))
        self.assertEqual((yield other.get("from/first")), record("from/first"))
        self.assertEqual([r.path for r in (yield self.store.expired(10.0, 10))], ["from/other"])
        yield self.store.delete("from/other")
        self.assertIsNone((yield other.get("from/other")))

    def countInteractions(self) -> list:
        calls: list = []
        pool = self.store.pool
        real = pool.runWithConnection

        def counting(*args, **kwargs):
            calls.append(args)
            return real(*args, **kwargs)

        self.patch(pool, "runWithConnection", counting)
        return calls

    @inlineCallbacks
    def test_puts_together(self):
        """
        Puts made while one runs go together in one transaction, and every record lands;
        of two puts of one path in a batch the later wins.
        """
        calls = self.countInteractions()
        records = [record(f"many/{i}", size=i) for i in range(20)] + [record("many/3", size=99)]
        yield gatherResults([self.store.put(r) for r in records])
        self.assertEqual(len(calls), 2)  # the first alone, then the 20 that waited for it
        for i in range(20):
            got = yield self.store.get(f"many/{i}")
            self.assertEqual(got, record(f"many/{i}", size=99 if i == 3 else i))

    @inlineCallbacks
    def test_deletes_together(self):
        """Deletes made while one runs go together in one transaction; each record goes."""
        for i in range(20):
            yield self.store.put(record(f"gone/{i}", expires=float(i)))
        calls = self.countInteractions()
        yield gatherResults([self.store.delete(f"gone/{i}") for i in range(20)])
        self.assertEqual(len(calls), 2)  # the first alone, then the 19 that waited for it
        self.assertEqual((yield self.store.count_expired(100.0)), 0)
        for i in range(20):
            self.assertIsNone((yield self.store.get(f"gone/{i}")))

    @inlineCallbacks
    def test_refused_record_fails_alone(self):
        """A record the database refuses fails its own put, not those batched with it."""
        first = self.store.put(record("first"))
        good = self.store.put(record("good"))
        bad = self.store.put(record("bad", size=2**70))  # more than a BIGINT holds
        other = self.store.put(record("other"))
        yield gatherResults([first, good, other])
        yield self.assertFailure(bad, Exception)
        for path in ("first", "good", "other"):
            self.assertEqual((yield self.store.get(path)), record(path))
        self.assertIsNone((yield self.store.get("bad")))

    @inlineCallbacks
    def test_floats_and_sizes_round_trip(self):
        """Timestamps come back as the very same floats, sizes up to 2**40 as ints."""
        created, expires = 1_712_345_678.123456789, 1 / 3 + 1_800_000_000
        r = record("t", created=created, expires=expires, size=2**40 + 1)
        yield self.store.put(r)
        got = yield self.store.get("t")
        self.assertEqual(got, r)
        self.assertEqual((repr(got.created), repr(got.expires)), (repr(created), repr(expires)))
        self.assertIsInstance(got.size, int)

    @inlineCallbacks
    def test_stopped_store_is_unavailable(self):
        """After stop() every call fails with StoreUnavailable; stopping twice is fine."""
        yield self.store.stop()
        yield self.store.stop()
        yield self.assertFailure(self.store.get("a/b.txt"), StoreUnavailable)
        yield self.assertFailure(self.store.put(record()), StoreUnavailable)
        yield self.assertFailure(self.store.ping(), StoreUnavailable)

    @inlineCallbacks
    def test_restart_after_stop(self):
        """A stopped store can be started again and finds its records."""
        yield self.store.put(record())
        yield self.store.stop()
        yield self.store.start()
        self.assertEqual((yield self.store.get("a/b.txt")), record())

    @inlineCallbacks
    def test_negative_limit(self):
        """A negative limit is a caller's mistake, not an outage."""
        yield self.assertFailure(self.store.records(-1), ValueError)
        yield self.assertFailure(self.store.expired(1.0, -1), ValueError)
        self.assertEqual((yield self.store.records(0)), [])


class SQLiteStoreTests(
    StoreContract, AdminContract, SharedContract, QuotaContract, SQLChecks, TestCase
):
    """The embedded SQLite store."""

    def makeStore(self, fresh=True, **options):
        if fresh:
            self.dbfile = os.path.join(self.mktemp(), ".hmacfs", "meta.sqlite3")
        store = SQLStore.sqlite(self.dbfile, **options)
        return store.start().addCallback(lambda _: store)

    @inlineCallbacks
    def test_private_directory_and_wal(self):
        """
        start() creates the parent directory 0700 and puts the database in WAL mode, with
        synchronous=NORMAL (1) on every connection: no log fsync per commit.
        """
        directory = os.path.dirname(self.dbfile)
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode) & 0o077, 0)
        self.assertEqual((yield self.store.pool.runQuery("PRAGMA journal_mode")), [("wal",)])
        self.assertEqual((yield self.store.pool.runQuery("PRAGMA synchronous")), [(1,)])
        self.assertEqual(self.store.name, "sqlite")

    @inlineCallbacks
    def test_path_under_a_file(self):
        """A database path under a regular file fails start() with StoreUnavailable."""
        blocker = self.mktemp()
        with open(blocker, "w"):
            pass
        store = SQLStore.sqlite(os.path.join(blocker, "sub", "meta.sqlite3"))
        error = yield self.assertFailure(store.start(), StoreUnavailable)
        self.assertTrue(str(error).startswith(f"sqlite at {blocker}"), str(error))
        self.assertNotIn("\n", str(error))
        self.assertIsNone(store.pool)
        yield store.stop()

    @inlineCallbacks
    def test_not_a_database(self):
        """A file that is not an SQLite database fails start() with StoreUnavailable."""
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"this is not a database\n" * 100)
        store = SQLStore.sqlite(path)
        error = yield self.assertFailure(store.start(), StoreUnavailable)
        self.assertIn("sqlite at ", str(error))
        yield store.stop()


class ServerStoreMixin:
    """makeStore for a database server: its own table per test, dropped at cleanup."""

    service: str
    params: dict
    constructor: str

    @staticmethod
    def down() -> str | None:
        raise NotImplementedError

    @staticmethod
    def connect():
        raise NotImplementedError

    def makeStore(self, fresh=True, **options):
        reason = self.down()
        if reason:
            require_service(self.service, reason)
        if fresh:
            self.table = unique_table()
            self.addCleanup(drop_table, self.connect, self.table)
        params = dict(self.params, connect_timeout=TIMEOUT, table=self.table)
        params.update(options)
        store = getattr(SQLStore, self.constructor)(**params)
        return store.start().addCallback(lambda _: store)

    @inlineCallbacks
    def test_nodes_start_together(self):
        """Nodes that start at once on an empty database all create the table, none fails."""
        from twisted.internet.defer import gatherResults

        reason = self.down()
        if reason:
            require_service(self.service, reason)
        self.table = unique_table()
        self.addCleanup(drop_table, self.connect, self.table)
        params = dict(self.params, connect_timeout=TIMEOUT, table=self.table)
        stores = [getattr(SQLStore, self.constructor)(**params) for _ in range(8)]
        try:
            # Each start's outcome, a failure included: every store is stopped after.
            results = yield gatherResults(
                [store.start().addErrback(lambda f: f.value) for store in stores]
            )
        finally:
            for store in stores:
                yield store.stop()
        self.assertEqual(results, [None] * len(stores))

    @inlineCallbacks
    def test_silent_server(self):
        """A server that accepts but never answers fails start() after the connect timeout."""
        port = silent_server(self)
        store = getattr(SQLStore, self.constructor)(
            **dict(self.params, port=port), connect_timeout=TIMEOUT
        )
        started = time.monotonic()
        error = yield self.assertFailure(store.start(), StoreUnavailable)
        self.assertLess(time.monotonic() - started, TIMEOUT + 1)
        self.assertIn(f"{self.constructor} at 127.0.0.1:{port}: ", str(error))


class PostgresStoreTests(
    ServerStoreMixin,
    StoreContract,
    AdminContract,
    SharedContract,
    QuotaContract,
    SQLChecks,
    TestCase,
):
    """PostgreSQL through psycopg2, each test on its own table."""

    service, params, constructor = "PostgreSQL", POSTGRES, "postgres"
    down = staticmethod(postgres_down)
    connect = staticmethod(postgres_connection)

    @inlineCallbacks
    def test_unknown_database(self):
        """A database that does not exist: a one-line StoreUnavailable, no password in it."""
        password = "pw-" + uuid.uuid4().hex
        store = SQLStore.postgres(
            **dict(POSTGRES, password=password, database="hmacfs_no_such_db"),
            connect_timeout=TIMEOUT,
        )
        error = yield self.assertFailure(store.start(), StoreUnavailable)
        message = str(error)
        self.assertTrue(message.startswith("postgres at 127.0.0.1:5432: "), message)
        self.assertIn("hmacfs_no_such_db", message)
        self.assertNotIn(password, message)
        self.assertNotIn(password, repr(store))
        self.assertNotIn("\n", message)
        yield store.stop()

    @inlineCallbacks
    def test_closed_port(self):
        """Nothing listening: StoreUnavailable well within the connect timeout."""
        port = closed_port()
        store = SQLStore.postgres(**dict(POSTGRES, port=port), connect_timeout=TIMEOUT)
        started = time.monotonic()
        error = yield self.assertFailure(store.start(), StoreUnavailable)
        self.assertLess(time.monotonic() - started, TIMEOUT + 1)
        self.assertIn(f"postgres at 127.0.0.1:{port}: ", str(error))
        self.assertIn("refused", str(error))

    @inlineCallbacks
    def test_connection_killed_by_server(self):
        """After the server terminates our connection, the next get() reconnects and succeeds."""
        name = "hmacfs-test-" + uuid.uuid4().hex[:12]
        store = yield self.makeStore(fresh=False, application_name=name, pool_size=1)
        self.addCleanup(store.stop)
        yield store.put(record())
        [(before,)] = yield store.pool.runQuery("SELECT pg_backend_pid()")
        admin = postgres_connection()
        try:
            cursor = admin.cursor()
            cursor.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid() AND application_name = %s",
                (POSTGRES["database"], name),
            )
            self.assertEqual(cursor.fetchall(), [(True,)])
        finally:
            admin.close()
        self.assertEqual((yield store.get("a/b.txt")), record())
        [(after,)] = yield store.pool.runQuery("SELECT pg_backend_pid()")
        self.assertNotEqual(before, after)


class MySQLStoreTests(
    ServerStoreMixin,
    StoreContract,
    AdminContract,
    SharedContract,
    QuotaContract,
    SQLChecks,
    TestCase,
):
    """MariaDB through pymysql, each test on its own table."""

    service, params, constructor = "MariaDB", MYSQL, "mysql"
    down = staticmethod(mysql_down)
    connect = staticmethod(mysql_connection)

    @inlineCallbacks
    def test_wrong_password(self):
        """A wrong password: a one-line StoreUnavailable naming the store, not the password."""
        password = "pw-" + uuid.uuid4().hex
        store = SQLStore.mysql(**dict(MYSQL, password=password), connect_timeout=TIMEOUT)
        error = yield self.assertFailure(store.start(), StoreUnavailable)
        message = str(error)
        self.assertTrue(message.startswith("mysql at 127.0.0.1:3306: "), message)
        self.assertIn("Access denied", message)
        self.assertNotIn(password, message)
        self.assertNotIn(password, repr(store))
        yield store.stop()

    @inlineCallbacks
    def test_unknown_database(self):
        """A database that does not exist: StoreUnavailable with the server's reason."""
        store = SQLStore.mysql(**dict(MYSQL, database="hmacfs_no_such_db"), connect_timeout=TIMEOUT)
        error = yield self.assertFailure(store.start(), StoreUnavailable)
        self.assertIn("mysql at 127.0.0.1:3306: Unknown database", str(error))

    @inlineCallbacks
    def test_closed_port(self):
        """Nothing listening: StoreUnavailable well within the connect timeout."""
        port = closed_port()
        store = SQLStore.mysql(**dict(MYSQL, port=port), connect_timeout=TIMEOUT)
        started = time.monotonic()
        error = yield self.assertFailure(store.start(), StoreUnavailable)
        self.assertLess(time.monotonic() - started, TIMEOUT + 1)
        self.assertIn(f"mysql at 127.0.0.1:{port}: ", str(error))

    @inlineCallbacks
    def test_connection_killed_by_server(self):
        """After the server kills our connection, the next get() reconnects and succeeds."""
        store = yield self.makeStore(fresh=False, pool_size=1)
        self.addCleanup(store.stop)
        yield store.put(record())
        [(before,)] = yield store.pool.runQuery("SELECT CONNECTION_ID()")
        admin = mysql_connection()
        try:
            cursor = admin.cursor()
            cursor.execute("KILL %s", (before,))
            # KILL only flags the thread: wait until the server has really let go of it.
            deadline = time.monotonic() + 10
            while True:
                cursor.execute(
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE ID = %s", (before,)
                )
                if cursor.fetchone()[0] == 0:
                    break
                self.assertLess(time.monotonic(), deadline, "KILL did not take effect")
                time.sleep(0.02)
        finally:
            admin.close()
        self.assertEqual((yield store.get("a/b.txt")), record())
        [(after,)] = yield store.pool.runQuery("SELECT CONNECTION_ID()")
        self.assertNotEqual(before, after)


class ConstructionTests(SynchronousTestCase):
    """Building stores: no threads, no connections, and the config's host syntax."""

    def config(self, **fields) -> Config:
        values = dict(
            fallback_enabled=True,
            fallback_db_user="hmacfs",
            fallback_db_password="s3cret-pw",
            fallback_db_name="files",
        )
        values.update(fields)
        return Config(**values)

    def test_from_config_hosts(self):
        """FallbackDBHost as host, host:port, [v6]:port, [v6] and bare v6, per DB type."""
        cases = [
            ("postgres", "db.example", ("db.example", 5432)),
            ("postgres", "db.example:6543", ("db.example", 6543)),
            ("postgres", "[::1]:5432", ("::1", 5432)),
            ("postgres", "[::1]", ("::1", 5432)),
            ("postgres", "::1", ("::1", 5432)),
            ("mysql", "127.0.0.1", ("127.0.0.1", 3306)),
            ("mysql", "127.0.0.1:3307", ("127.0.0.1", 3307)),
            ("mysql", "[2001:db8::5]:3306", ("2001:db8::5", 3306)),
        ]
        for kind, host, expected in cases:
            store = SQLStore.from_config(self.config(fallback_db_type=kind, fallback_db_host=host))
            self.assertEqual((store.name, store.host, store.port), (kind, *expected), host)
            self.assertEqual(store.table, "hmacfs_files")
            self.assertIsNone(store.pool)

    def test_from_config_keeps_password_out_of_repr(self):
        """The store's repr names where it points, never the password."""
        store = SQLStore.from_config(self.config(fallback_db_host="[::1]:5432"))
        self.assertEqual(repr(store), "<SQLStore postgres at [::1]:5432 table hmacfs_files>")

    def test_parse_db_host_rejects(self):
        """Hosts that cannot be meant are ValueErrors."""
        for text in ["", ":5432", "h:0", "h:65536", "h:x", "[::1", "[]:5", "a b"]:
            self.assertRaises(ValueError, parse_db_host, text, 5432)

    def test_table_names(self):
        """Only plain lower-case identifiers are accepted as table names."""
        for bad in ["", "Files", "1files", "files;drop", "a-b", "x" * 49, 'f"']:
            self.assertRaises(ValueError, SQLStore.sqlite, "x.db", table=bad)
        self.assertEqual(SQLStore.sqlite("x.db", table="_ok_1").table, "_ok_1")

    def test_construction_starts_nothing(self):
        """Building stores starts no thread and creates no file; stop() before start() is fine."""
        before = threading.active_count()
        path = os.path.join(self.mktemp(), "meta.sqlite3")
        stores = [
            SQLStore.sqlite(path),
            SQLStore.postgres(**POSTGRES),
            SQLStore.mysql(**MYSQL),
        ]
        self.assertEqual(threading.active_count(), before)
        self.assertFalse(os.path.exists(os.path.dirname(path)))
        self.assertEqual([s.name for s in stores], ["sqlite", "postgres", "mysql"])
        for store in stores:
            self.assertIsNone(self.successResultOf(store.stop()))
            failure = self.failureResultOf(store.get("a"), StoreUnavailable)
            self.assertIn("not started", str(failure.value))
