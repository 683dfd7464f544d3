"""
The HTTP face of hmacfs: one Site subclass owns the policy.

L{HmacfsSite} picks the request factory that streams uploads, serves the
upload space, keeps tracebacks from clients, and writes an access log in
which MACs never appear.
"""

from __future__ import annotations

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web import server

from hmacd.core import FileServer
from hmacd.download import StoreResource
from hmacd.guard import address_key, guarded_channel
from hmacd.logs import censor
from hmacd.throttle import _trusted
from hmacd.upload import UploadRequest

__all__ = ["HmacfsSite"]

# Module level: a Logger class attribute would take the class's name as its
# namespace, and access-log filters want a stable one.
_access = Logger(namespace="hmacfs.access")
log = Logger()


class _Refused(Protocol):
    """
    A connection over MaxConnectionsPerClient: dropped as soon as it is made.

    A protocol rather than None from buildProtocol, which a TLS listener
    (an ssl: endpoint wraps the Site) cannot take.
    """

    def connectionMade(self) -> None:
        self.transport.abortConnection()


class HmacfsSite(server.Site):
    """
    The upload/download site of one L{FileServer}.

    A host application that mounts the upload space in a Site of its own
    must give that Site L{UploadRequest} as its C{requestFactory} and a
    C{fileServer} attribute; this class is the ready-made case.
    """

    requestFactory = UploadRequest
    displayTracebacks = False
    protocol = guarded_channel  # HeaderTimeout

    def __init__(self, fileServer: FileServer, reactor=None, timeout: float | None = None) -> None:
        kwargs = {} if timeout is None else {"timeout": timeout}
        super().__init__(StoreResource(fileServer), reactor=reactor or fileServer.reactor, **kwargs)
        self.fileServer = fileServer
        self.openConnections = 0
        self._quietUntil = 0.0  # no warning about refused connections before this time
        self._connections = fileServer.metrics.connections

    def buildProtocol(self, addr):
        client = self._countedPeer(addr)
        if client is not None and not self._admit(client):
            return _Refused()
        protocol = super().buildProtocol(addr)
        self.openConnections += 1
        self._connections.inc()
        connectionLost = protocol.connectionLost

        def lost(reason):
            self.openConnections -= 1
            self._connections.dec()
            if client is not None:
                self.fileServer.clients.release(client)
            return connectionLost(reason)

        protocol.connectionLost = lost
        return protocol

    def _countedPeer(self, addr) -> str | None:
        """
        The address a new connection counts against at accept, or None: no cap, no IP
        address (a Unix socket), or a trusted proxy, whose requests are counted per
        forwarded client instead (L{hmacd.upload.UploadRequest}).
        """
        fs = self.fileServer
        host = getattr(addr, "host", None)
        if not fs.max_connections_per_client or not isinstance(host, str):
            return None
        if fs.trusted_proxies and _trusted(host, fs.trusted_proxies):
            return None
        return address_key(host)

    def _admit(self, client: str) -> bool:
        fs = self.fileServer
        limit = fs.max_connections_per_client
        if fs.clients.acquire(client, limit):
            return True
        fs.metrics.connections_refused.labels("per_client").inc()
        now = self.reactor.seconds()
        if now >= self._quietUntil:
            # At most a line a minute: a flood would otherwise write one per connection.
            self._quietUntil = now + 60
            log.warn(
                "{client} holds MaxConnectionsPerClient ({limit}) connections: more are"
                " refused (a reverse proxy in front of hmacfs belongs in TrustedProxies)",
                client=client,
                limit=limit,
            )
        return False

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
