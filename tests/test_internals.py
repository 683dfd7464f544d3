"""
Guards for hmacd.internals: each private attribute of Twisted or of a driver that hmacfs
reaches is still where hmacd.internals expects it.  A failure here means a new release
moved it: adapt hmacd.internals (and only it), then the pin in setup.py.
"""

from __future__ import annotations

import inspect
import itertools

from twisted.enterprise import adbapi
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hmacd import internals

# --- HTTP: channels, requests and transports ----------------------------------------------


# --- Stores: twisted.enterprise.adbapi and the database drivers -----------------------------


class _TriggerReactor(MemoryReactor):
    """A MemoryReactor whose system event triggers have ids and can be removed, as adbapi needs."""

    def __init__(self) -> None:
        super().__init__()
        self.added: dict[int, tuple[str, str]] = {}
        self._ids = itertools.count(1)

    def addSystemEventTrigger(self, phase, eventType, callable, *args, **kw):
        tid = next(self._ids)
        self.added[tid] = (phase, eventType)
        return tid

    def removeSystemEventTrigger(self, triggerID):
        del self.added[triggerID]

    def callWhenRunning(self, callable, *args, **kw):
        return self.addSystemEventTrigger("after", "startup", callable, *args, **kw)


def _sqlite_pool(reactor: _TriggerReactor) -> adbapi.ConnectionPool:
    return adbapi.ConnectionPool(
        "sqlite3", ":memory:", check_same_thread=False, cp_min=1, cp_max=1, cp_reactor=reactor
    )


class AdbapiGuards(SynchronousTestCase):
    """twisted.enterprise.adbapi keeps its connections and triggers where internals reaches."""

    def test_connection_wraps_raw_connection(self) -> None:
        """adbapi.Connection keeps its DB-API connection in _connection and its pool in _pool."""
        pool = _sqlite_pool(_TriggerReactor())
        connection = adbapi.Connection(pool)
        raw = internals.adbapi_raw_connection(connection)
        self.assertIs(internals.adbapi_pool_of(connection), pool)
        self.assertIs(raw, pool.connections[pool.threadID()])
        internals.adbapi_set_raw_connection(connection, None)
        # adbapi's own reconnect reads the same attribute: with None it disconnects nothing.
        connection.reconnect()
        self.assertIs(internals.adbapi_raw_connection(connection), raw)
        raw.close()

    def test_forget_connection(self) -> None:
        """A connection dropped from pool.connections is not handed to this thread again."""
        pool = _sqlite_pool(_TriggerReactor())
        raw = pool.connect()
        self.assertIs(pool.connect(), raw)
        internals.adbapi_forget_connection(pool, raw)
        fresh = pool.connect()
        self.assertIsNot(fresh, raw)
        internals.adbapi_forget_connection(pool, raw)  # not this thread's any more: kept
        self.assertIs(pool.connect(), fresh)
        raw.close()
        fresh.close()

    def test_triggers(self) -> None:
        """The pool's start and shutdown triggers are startID and shutdownID, and go away."""
        reactor = _TriggerReactor()
        pool = _sqlite_pool(reactor)
        self.assertEqual(list(reactor.added.values()), [("after", "startup")])
        internals.adbapi_remove_start_trigger(pool, reactor)
        self.assertEqual((reactor.added, pool.startID), ({}, None))
        pool.start()
        try:
            self.assertEqual(list(reactor.added.values()), [("during", "shutdown")])
            internals.adbapi_remove_shutdown_trigger(pool, reactor)
            self.assertEqual((reactor.added, pool.shutdownID), ({}, None))
        finally:
            pool.finalClose()


class PyMySQLGuards(SynchronousTestCase):
    """PyMySQL bounds each read and write by the attributes internals sets."""

    def test_timeouts(self) -> None:
        """read_timeout/write_timeout land in _read_timeout/_write_timeout, which I/O reads."""
        import pymysql.connections

        connection = pymysql.connections.Connection(
            defer_connect=True, read_timeout=7, write_timeout=8
        )
        self.assertEqual((connection._read_timeout, connection._write_timeout), (7, 8))
        internals.pymysql_set_timeouts(connection, 30, 31)
        self.assertEqual((connection._read_timeout, connection._write_timeout), (30, 31))
        Connection = pymysql.connections.Connection
        self.assertIn("self._read_timeout", inspect.getsource(Connection._read_packet))
        self.assertIn("self._write_timeout", inspect.getsource(Connection._write_bytes))


# --- Composition: listening ports, services, processes -------------------------------------


class MultiprocessValuesGuardTests(TestCase):
    """hmacd.internals.use_multiprocess_values: prometheus_client still picks values this way."""

    def test_metric_reads_value_class_when_created(self) -> None:
        """A metric made after ValueClass is swapped keeps its value in the swapped class."""
        from prometheus_client import CollectorRegistry, Counter, values

        made: list[tuple] = []

        class Recording(values.MutexValue):
            def __init__(self, *args, **kwargs) -> None:
                made.append(args)
                super().__init__(*args, **kwargs)

        self.patch(values, "ValueClass", Recording)
        Counter("guard_total", "guard", registry=CollectorRegistry()).inc()
        self.assertTrue(made, "prometheus_client no longer reads values.ValueClass")

    def test_multiprocess_value_is_a_factory(self) -> None:
        """values.MultiProcessValue() still returns the value class use_multiprocess_values sets."""
        from prometheus_client import values

        self.patch(values, "ValueClass", values.ValueClass)
        internals.use_multiprocess_values()
        self.assertTrue(isinstance(values.ValueClass, type), values.ValueClass)
        self.assertIn("MmapedValue", values.ValueClass.__name__)
