"""
The adbapi machinery under L{hmacd.store.sql.SQLStore}: a connection that
drops a dead link quietly, a pool of daemon threads closed off the reactor
thread, and the per-connection set-up of SQLite and MySQL.
"""

from __future__ import annotations

import threading
from contextlib import suppress
from typing import Any

from twisted.enterprise import adbapi
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from hmacd import internals
from hmacd.threads import DaemonThread

log = Logger()


class _Connection(adbapi.Connection):
    """
    adbapi's connection wrapper, but a dead connection is dropped quietly
    instead of logged as an error (twice) from inside adbapi: the caller gets
    the driver's exception, and the thread's next call connects afresh.
    """

    def rollback(self) -> None:
        try:
            internals.adbapi_raw_connection(self).rollback()
        except Exception:
            self._drop()

    def reconnect(self) -> None:
        self._drop()
        internals.adbapi_set_raw_connection(self, internals.adbapi_pool_of(self).connect())

    def _drop(self) -> None:
        dead = internals.adbapi_raw_connection(self)
        internals.adbapi_set_raw_connection(self, None)
        if dead is None:
            return
        internals.adbapi_forget_connection(internals.adbapi_pool_of(self), dead)
        with suppress(Exception):
            dead.close()


class _ConnectionPool(adbapi.ConnectionPool):
    """
    adbapi's pool with daemon threads, closed off the reactor thread.

    @ivar clock: the reactor given to adbapi as C{cp_reactor}.
    """

    connectionFactory = _Connection

    def __init__(self, *args: Any, cp_reactor: Any, **kwargs: Any) -> None:
        # Before adbapi's __init__: on a running reactor it calls start() at once.
        self.clock = cp_reactor
        super().__init__(*args, cp_reactor=cp_reactor, **kwargs)
        # Daemons: a query stuck on a hung server (SIGSTOPped, or a dead host behind a
        # live TCP connection) never returns, and must not keep the process from exiting.
        self.threadpool.threadFactory = DaemonThread

    def start(self) -> None:
        super().start()
        # adbapi joins its threads in a reactor shutdown trigger, which
        # blocks the reactor for as long as any query is stuck; SQLStore.stop
        # closes the pool off the reactor thread instead.
        internals.adbapi_remove_shutdown_trigger(self, self.clock)

    def closeInBackground(self, patience: float = 5.0) -> Deferred[None]:
        """
        Close the pool from a helper thread: ThreadPool.stop() joins the
        worker threads, which must never happen in the reactor thread.
        Fires when closed, or after C{patience} seconds (threads stuck on a
        hung server are daemon threads and are left behind).
        """
        internals.adbapi_remove_start_trigger(self, self.clock)
        done: Deferred[None] = Deferred()

        def close() -> None:
            try:
                self.finalClose()
            finally:
                self.clock.callFromThread(closed)

        def closed() -> None:
            if not done.called:  # the patience below may have run out first
                done.callback(None)

        threading.Thread(target=close, name=f"{self.name}-close", daemon=True).start()

        def late(failure: Failure) -> None:
            failure.trap(defer.TimeoutError)
            log.warn(
                "{name}: connections to a server that does not answer left behind",
                name=self.name,
            )

        return done.addTimeout(patience, self.clock).addErrback(late)


def _sqlite_open(connection: Any) -> None:
    # WAL: readers never block the writer; the setting lives in the file, asking again is free.
    connection.execute("PRAGMA journal_mode=WAL").fetchall()
    # In WAL mode NORMAL is SQLite's advice: a commit survives the process dying, and only
    # a power cut may lose the last ones, where FULL fsyncs the log on every commit (one
    # more fsync per upload).  The file itself is fsynced; a file without its record is
    # still served (type from its name) and swept by FileTTL.
    connection.execute("PRAGMA synchronous=NORMAL").fetchall()


# Queries are tiny: one taking this long is stuck on a hung server, and its
# pool thread is better freed (the call fails, and is retried once).
MYSQL_QUERY_TIMEOUT = 30


def _mysql_open(connection: Any) -> None:
    # pymysql bounds its handshake only by read_timeout (connect_timeout covers the TCP connect
    # alone), so the handshake ran with read/write timeouts equal to connect_timeout; queries
    # get a longer bound.
    internals.pymysql_set_timeouts(connection, MYSQL_QUERY_TIMEOUT, MYSQL_QUERY_TIMEOUT)
