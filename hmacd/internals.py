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

from twisted.internet.abstract import FileDescriptor
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


# --- Stores: twisted.enterprise.adbapi and the database drivers -----------------------------


# --- Composition: listening ports, services, processes -------------------------------------
