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

from collections.abc import Callable
from typing import Any

from twisted.internet.abstract import FileDescriptor
from twisted.web import http
from twisted.web.http import HTTPChannel

# --- HTTP: channels, requests and transports (twisted.web.http, twisted.internet) --------

# The upload request (hmacd.upload) ........................................................


def request_line(channel: HTTPChannel) -> tuple[bytes, bytes, bytes]:
    """
    (method, target, version) of the request whose headers C{channel} has just parsed.

    In C{Request.gotLength} the request line is parsed but not yet given to the request
    (C{requestReceived} does that, after the body): C{HTTPChannel} keeps it in C{_command},
    C{_path} and C{_version}.
    """
    return channel._command, channel._path, channel._version


def set_read_size(transport: object, size: int) -> int:
    """
    Make C{transport} read up to C{size} bytes at a time; returns what it read before.

    C{FileDescriptor.bufferSize} is documented but not meant to be set; a TCP transport
    reads C{bufferSize} bytes per C{doRead}.  Whoever sets it restores it.
    """
    previous: int = getattr(transport, "bufferSize", FileDescriptor.bufferSize)
    transport.bufferSize = size  # type: ignore[attr-defined]
    return previous


# ... HTTP, the read side and the policy (hmacd.download, hmacd.guard, hmacd.web) ...........

# The FileDescriptor attributes that hold what a transport was given and has not yet sent.
_WRITE_BUFFER = ("dataBuffer", "offset", "_tempDataLen")


def request_disconnected(request: http.Request) -> bool:
    """
    Whether the client of C{request} has gone (C{Request._disconnected}, set by
    C{Request.connectionLost}).  The public way, C{notifyFinish()}, costs a Deferred per
    request; this is asked once or twice per GET.
    """
    return request._disconnected


def keeps_write_buffer(transport: object) -> bool:
    """
    Whether C{transport} keeps its unsent bytes where L{unsent_bytes} reads them (a
    C{twisted.internet.abstract.FileDescriptor}: TCP and Unix sockets).
    """
    return all(hasattr(transport, name) for name in _WRITE_BUFFER)


def unsent_bytes(transport: Any) -> int:
    """
    How many bytes C{transport} was given and has not handed to the kernel yet
    (C{FileDescriptor.dataBuffer} past C{offset}, and C{_tempDataLen} not yet joined to
    it).  Only for a transport that L{keeps_write_buffer}.
    """
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def log_formatter(site: http.HTTPFactory) -> Callable[[str, Any], str] | None:
    """
    The access-log formatter C{site} writes its lines with (C{HTTPFactory._logFormatter}:
    public only as the C{logFormatter} argument of the constructor), or L{None} when this
    Twisted keeps none there.
    """
    formatter = getattr(site, "_logFormatter", None)
    return formatter if callable(formatter) else None


def set_log_formatter(site: http.HTTPFactory, formatter: Callable[[str, Any], str]) -> None:
    """Make C{formatter} the one C{site} writes its access-log lines with."""
    site._logFormatter = formatter


def abort_after(channel: http.HTTPChannel, seconds: float) -> None:
    """
    Abort C{channel}'s connection in C{seconds} unless it closes first, as
    C{HTTPChannel.timeoutConnection} does: in C{_abortingCall}, which the channel's
    C{connectionLost} cancels.
    """
    channel._abortingCall = channel.callLater(seconds, channel.forceAbortClient)


class ContentLengthCheck(http.HTTPChannel):
    """
    An HTTPChannel that lets a subclass judge the raw Content-Length header
    (L{badContentLength}) before Twisted converts it with C{int()}.

    Twisted has no public hook between the header line and that conversion: this
    overrides C{_maybeChooseTransferDecoder}, and answers a refused value as Twisted
    answers a non-numeric one, with C{_failChooseTransferDecoder} (its 400).
    """

    def badContentLength(self, value: bytes) -> bool:
        """Whether C{value}, as sent, is to be refused with 400."""
        return False

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        if header == b"Content-Length" and self.badContentLength(data):
            return self._failChooseTransferDecoder()
        return super()._maybeChooseTransferDecoder(header, data)


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
