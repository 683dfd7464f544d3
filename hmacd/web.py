"""
The HTTP face of hmacfs: one Site subclass owns the policy.

L{HmacfsSite} picks the request factory that streams uploads, serves the
upload space, keeps tracebacks from clients, and writes an access log in
which MACs never appear.
"""

from __future__ import annotations

from twisted.logger import Logger
from twisted.web import http, server

from hmacd.core import FileServer
from hmacd.download import StoreResource
from hmacd.logs import censor
from hmacd.numbers import NotADecimal, parse_decimal
from hmacd.upload import UploadRequest

__all__ = ["HmacfsChannel", "HmacfsSite"]

# Module level: a Logger class attribute would take the class's name as its
# namespace, and access-log filters want a stable one.
_access = Logger(namespace="hmacfs.access")
log = Logger()


class HmacfsChannel(http.HTTPChannel):
    """
    The HTTP/1.1 channel of every hmacfs connection.

    Twisted converts Content-Length with C{int()} as the header arrives, before any request
    hook runs: past Python's 4,300-digit limit that raises out of the parser, drops the
    connection and logs a traceback per request.  The header is judged here first, by the
    same rule as every other number (L{hmacd.numbers}), and a bad one ends the request with
    Twisted's own 400, as a non-numeric one already does.
    """

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        # A private hook (checked on Twisted 26.10; tests/test_parsers.py fails if it goes):
        # the one place between the raw header line and Twisted's int().
        if header == b"Content-Length":
            try:
                parse_decimal(data)
            except NotADecimal as e:
                log.debug("refused a request: Content-Length is {why}", why=str(e))
                return self._failChooseTransferDecoder()
        return super()._maybeChooseTransferDecoder(header, data)


class HmacfsSite(server.Site):
    """
    The upload/download site of one L{FileServer}.

    A host application that mounts the upload space in a Site of its own
    must give that Site L{UploadRequest} as its C{requestFactory} and a
    C{fileServer} attribute; this class is the ready-made case.
    """

    requestFactory = UploadRequest
    # HTTP/1.1 only (see acceptableProtocols): the channel itself, not Twisted's wrapper that
    # can switch a TLS connection to HTTP/2.
    protocol = HmacfsChannel  # type: ignore[assignment]  # Factory calls it with no arguments
    displayTracebacks = False

    def __init__(self, fileServer: FileServer, reactor=None, timeout: float | None = None) -> None:
        kwargs = {} if timeout is None else {"timeout": timeout}
        super().__init__(StoreResource(fileServer), reactor=reactor or fileServer.reactor, **kwargs)
        self.fileServer = fileServer
        self.openConnections = 0
        self._connections = fileServer.metrics.connections

    def buildProtocol(self, addr):
        protocol = super().buildProtocol(addr)
        self.openConnections += 1
        self._connections.inc()
        connectionLost = protocol.connectionLost

        def lost(reason):
            self.openConnections -= 1
            self._connections.dec()
            return connectionLost(reason)

        protocol.connectionLost = lost
        return protocol

    def acceptableProtocols(self) -> list[bytes]:
        """
        HTTP/1.1 only, even where the h2 package would offer HTTP/2 over TLS:
        the streaming upload needs all headers before gotLength, which the
        HTTP/2 stream does not give.
        """
        return [b"http/1.1"]

    def log(self, request) -> None:
        """Combined log format, censored; bearer tokens are in no logged field."""
        self.fileServer.metrics.requests.labels(
            (request.method or b"-").decode("ascii", "replace"), str(request.code)
        ).inc()
        referrer = request.getHeader(b"referer")
        agent = request.getHeader(b"user-agent")
        peer = request.getClientAddress()
        _access.info(
            '{client} - - "{method} {uri} {proto}" {code} {length} "{referrer}" "{agent}"',
            client=getattr(peer, "host", "-"),
            method=(request.method or b"-").decode("ascii", "replace"),
            uri=censor(request.uri),
            proto=(request.clientproto or b"-").decode("ascii", "replace"),
            code=request.code,
            length=request.sentLength or "-",
            referrer=censor(referrer),
            agent=(agent or b"-").decode("latin-1"),
        )
