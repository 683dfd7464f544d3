"""
The connection machinery of L{hmacd.store.redis.RedisStore}: txredisapi's
lazy pool, with a protocol that authenticates and selects its database
itself (txredisapi issue #146) and an endpoint that reports why a
connection attempt failed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import txredisapi
from twisted.internet import defer, error
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

if TYPE_CHECKING:
    from hmacd.store.redis import RedisStore

# Non-blocking commands all run on whichever pooled connection is up; a
# second one is a spare for when the first drops.
_POOL_SIZE = 2


def _one_line(text: str) -> str:
    return " ".join(str(text).split()) or "no reason given"


def _connect_failure(exc: BaseException | None, connect_timeout: float) -> str:
    """Why a TCP connection attempt failed, for people."""
    if exc is None:  # a Failure always has its exception; the type allows None
        return "cannot connect"
    if isinstance(exc, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, error.TimeoutError):
        return f"no connection within {connect_timeout:g} s"
    if isinstance(exc, error.DNSLookupError):
        return "cannot resolve the host name"
    return "cannot connect: " + _one_line(exc.args[0] if exc.args else type(exc).__name__)


def _handshake_failure(store: RedisStore, step: str, e: Exception) -> str:
    """Why AUTH or SELECT failed on a new connection, for people."""
    if isinstance(e, defer.TimeoutError):
        return f"no answer to {step} within {store.connect_timeout:g} s"
    if isinstance(e, txredisapi.ConnectionError):
        return f"connection lost during {step}"
    message = _one_line(e.args[0] if e.args else type(e).__name__)
    if step == "AUTH":
        return f"authentication failed: {message}"
    return f"cannot use database {store.dbid}: {message}"


@implementer(IStreamClientEndpoint)
class _ReportingEndpoint:
    """An endpoint that tells the store why a connection attempt failed."""

    def __init__(self, endpoint: IStreamClientEndpoint, report: Callable[[Failure], None]):
        self._endpoint = endpoint
        self._report = report

    def connect(self, protocolFactory):
        def failed(failure: Failure) -> Failure:
            if not failure.check(defer.CancelledError):
                self._report(failure)
            return failure

        return self._endpoint.connect(protocolFactory).addErrback(failed)


class _StoreProtocol(txredisapi.RedisProtocol):
    """
    A connection that authenticates and selects its database itself.

    The factory gives txredisapi no password and no dbid, so the base class
    only marks the connection ready; a failed handshake drops this connection
    instead of stopping the whole pool (txredisapi #146).
    """

    factory: _StoreFactory

    def connectionMade(self) -> Deferred[None]:
        return self._handshake()

    @inlineCallbacks
    def _handshake(self):
        store = self.factory.store
        step = "AUTH"
        try:
            if store.password is not None:
                yield self._deadline(self.auth(store.password), store)
            if store.dbid:
                step = "SELECT"
                yield self._deadline(self.select(store.dbid), store)
        except Exception as e:
            self.factory.handshakeFailed(_handshake_failure(store, step, e))
            self.transport.abortConnection()
            return
        # With no password and no dbid, this only marks the connection ready.
        yield super().connectionMade()
        self.factory.handshakeDone()

    @staticmethod
    def _deadline(d: Deferred, store: RedisStore) -> Deferred:
        # A hung server accepts connections (the kernel does) but never
        # answers: drop such a connection and let the pool try again.
        return d.addTimeout(store.connect_timeout, store.reactor)

    def connectionLost(self, why=None):
        super().connectionLost(why)
        self.factory.lost()


class _StoreFactory(txredisapi.RedisFactory):
    """txredisapi's lazy pool, with our protocol and our reports to the store."""

    protocol = _StoreProtocol

    def __init__(self, store: RedisStore) -> None:
        # charset=None and convertNumbers=False: replies stay bytes, so a
        # content type or uploader that looks like a number stays a string.
        super().__init__(
            store.where,
            None,
            _POOL_SIZE,
            isLazy=True,
            charset=None,
            password=None,
            convertNumbers=False,
        )
        self.store = store

    def handshakeFailed(self, reason: str) -> None:
        self.store._connectionFailed(self, reason)

    def handshakeDone(self) -> None:
        self.store._connectionReady(self)

    def lost(self) -> None:
        self.store._connectionLost(self)
