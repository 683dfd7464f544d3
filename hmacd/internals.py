"""
Every use of a private attribute of Twisted or of a database driver, in one place.

hmacfs needs a few things that Twisted and the drivers have no public API for (the request
line before C{gotLength} returns, the bytes a transport has not sent yet, ...).  Each one
is reached only through a function here, which names the release it was checked on; and
each has a test in C{tests/test_internals.py} that fails loudly when a new release moves
it, instead of hmacfs misbehaving quietly.  Elsewhere, public API only.

Checked on: Twisted 26.10, pymysql 1.1, psycopg2 2.9.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.web import http

# --- HTTP: channels, requests and transports (twisted.web.http, twisted.internet) --------


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


# --- Composition: listening ports, services, processes -------------------------------------
