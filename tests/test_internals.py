"""
Guards for hmacd.internals: each private attribute of Twisted or of a driver that hmacfs
reaches is still where hmacd.internals expects it.  A failure here means a new release
moved it: adapt hmacd.internals (and only it), then the pin in setup.py.
"""

from __future__ import annotations

from twisted.internet import tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http

from hmacd import internals

# --- HTTP: channels, requests and transports ----------------------------------------------

# The upload request (hmacd.upload) ........................................................


class RequestLineTests(SynchronousTestCase):
    """internals.request_line: the request line is on the channel when gotLength runs."""

    def test_in_gotLength(self) -> None:
        """The method, target and version of the request being parsed, before its body."""
        seen = []

        class Probe(http.Request):
            def gotLength(self, length):
                seen.append(internals.request_line(self.channel))
                super().gotLength(length)

        channel = http.HTTPChannel()
        channel.requestFactory = Probe
        channel.makeConnection(StringTransport())
        channel.dataReceived(b"PUT /upload/a?v=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n")
        self.assertEqual(seen, [(b"PUT", b"/upload/a?v=1", b"HTTP/1.1")])


class ReadSizeTests(SynchronousTestCase):
    """internals.set_read_size: a TCP transport reads bufferSize bytes at a time."""

    def test_tcp_reads_buffer_size(self) -> None:
        """doRead of a TCP connection reads exactly bufferSize bytes from its socket."""
        self.assertEqual(FileDescriptor.bufferSize, 64 * 1024)
        asked = []

        class Socket:
            def setblocking(self, flag):
                pass

            def fileno(self):
                return -1

            def recv(self, size):
                asked.append(size)
                return b"x"

        connection = tcp.Connection(Socket(), Protocol(), reactor=object())
        connection.connected = True
        self.assertEqual(internals.set_read_size(connection, 1 << 20), 64 * 1024)
        connection.doRead()
        self.assertEqual(asked, [1 << 20])
        self.assertEqual(internals.set_read_size(connection, 64 * 1024), 1 << 20)
        connection.doRead()
        self.assertEqual(asked, [1 << 20, 64 * 1024])


# --- Stores: twisted.enterprise.adbapi and the database drivers -----------------------------


# --- Composition: listening ports, services, processes -------------------------------------
