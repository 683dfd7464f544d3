"""
Every use of a private attribute of Twisted or of a database driver, in one place.

hmacfs needs a few things that Twisted and the drivers have no public API for (the request
line before C{gotLength} returns, the bytes a transport has not sent yet, ...).  Each one
is reached only through a function here, which names the release it was checked on; and
each has a test in C{tests/test_internals.py} that fails loudly when a new release moves
it, instead of hmacfs misbehaving quietly.  Elsewhere, public API only.

Checked on: Twisted 26.10, pymysql 1.1, psycopg2 2.9, prometheus_client 0.26.
"""

from __future__ import annotations

from typing import Any

# --- HTTP: channels, requests and transports (twisted.web.http, twisted.internet) --------


# --- Stores: twisted.enterprise.adbapi and the database drivers -----------------------------
# Checked on Twisted 26.10 (twisted.enterprise.adbapi) and PyMySQL 1.2.4.  hmacd.store.sql
# drops dead connections quietly, closes pools off the reactor thread and gives MySQL
# queries a longer bound than its handshake: adbapi and PyMySQL have no API for any of it.


def adbapi_raw_connection(connection: Any) -> Any:
    """The DB-API connection an C{adbapi.Connection} wraps (None once dropped)."""
    return connection._connection


def adbapi_set_raw_connection(connection: Any, raw: Any) -> None:
    """Make C{connection} (an C{adbapi.Connection}) wrap the DB-API connection C{raw}."""
    connection._connection = raw


def adbapi_pool_of(connection: Any) -> Any:
    """The C{adbapi.ConnectionPool} an C{adbapi.Connection} belongs to."""
    return connection._pool


def adbapi_forget_connection(pool: Any, raw: Any) -> None:
    """Drop C{raw} from C{pool}'s connection of the calling thread, if it is that one, so
    that the thread's next query connects afresh."""
    connections = pool.connections
    tid = pool.threadID()
    if connections.get(tid) is raw:
        del connections[tid]


def adbapi_remove_shutdown_trigger(pool: Any, reactor: Any) -> None:
    """Remove the reactor shutdown trigger C{pool.start()} added (it joins the pool's
    threads in the reactor thread); C{reactor} is the pool's C{cp_reactor}."""
    if pool.shutdownID is not None:
        reactor.removeSystemEventTrigger(pool.shutdownID)
        pool.shutdownID = None


def adbapi_remove_start_trigger(pool: Any, reactor: Any) -> None:
    """Remove the C{callWhenRunning} start C{pool} registered when it was built, so that a
    pool closed before the reactor runs is not started then."""
    if pool.startID:
        reactor.removeSystemEventTrigger(pool.startID)
        pool.startID = None


def pymysql_set_timeouts(connection: Any, read: float, write: float) -> None:
    """Bound a connected PyMySQL connection's later reads and writes (the C{read_timeout} and
    C{write_timeout} it was built with bound its handshake too)."""
    connection._read_timeout = read
    connection._write_timeout = write


# --- Composition: listening ports, services, processes -------------------------------------
# Public API where it exists: a listener whose port cannot be bound stops start-up through
# twisted.application.strports.service (not StreamServerEndpointService._raiseSynchronously),
# and a worker learns its socket's family from port.getHost() (not port.socket).


def use_multiprocess_values() -> None:
    """
    Make every prometheus_client metric created from now on in this process keep its value
    in the multiprocess files (Workers > 1).

    prometheus_client picks its value class once, at import, from PROMETHEUS_MULTIPROC_DIR:
    hmacfs learns that it has workers later, from its config.  Checked on prometheus_client
    0.26: each metric reads C{prometheus_client.values.ValueClass} when it is created.
    """
    from prometheus_client import values

    values.ValueClass = values.MultiProcessValue()
