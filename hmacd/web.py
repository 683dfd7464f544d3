"""
The HTTP face of hmacfs: one Site subclass owns the policy.

L{HmacfsSite} picks the request factory that streams uploads, serves the
upload space, keeps tracebacks from clients, and writes an access log in
which MACs never appear.
"""

from __future__ import annotations

from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web import http, server

from hmacd.core import FileServer
from hmacd.download import StoreResource
from hmacd.guard import GuardedChannel, address_key
from hmacd.logs import censor, censoring_formatter, escape
from hmacd.numbers import NotADecimal, parse_decimal
from hmacd.throttle import _trusted
from hmacd.upload import ALLOWED_METHODS, UploadRequest

__all__ = ["HmacfsChannel", "HmacfsSite", "censor_access_log"]

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


class HmacfsChannel(GuardedChannel):
    """
    The HTTP/1.1 channel of every hmacfs connection: a L{GuardedChannel} (HeaderTimeout),
    which reads Content-Length by hmacfs's own rule.

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
    # log() below writes a censored, escaped line of its own.
    censorsAccessLog = True

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
        # The method is the client's word: a label per made-up method would be a new series
        # each, kept for the life of the process.
        method = request.method if request.method in ALLOWED_METHODS else b"other"
        self.fileServer.metrics.requests.labels(method.decode("ascii"), str(request.code)).inc()
        referrer = request.getHeader(b"referer")
        agent = request.getHeader(b"user-agent")
        peer = request.getClientAddress()
        _access.info(
            '{client} - - "{method} {uri} {proto}" {code} {length} "{referrer}" "{agent}"',
            client=getattr(peer, "host", "-"),
            method=escape(request.method),
            uri=censor(request.uri),
            proto=escape(request.clientproto),
            code=request.code,
            length=request.sentLength or "-",
            referrer=censor(referrer),
            agent=escape(agent),
        )


def censor_access_log(site: http.HTTPFactory) -> None:
    """
    Keep MACs and bearer tokens out of C{site}'s access log, and make each of
    its lines one printable line, whatever formatter the host gave it.

    twisted.web writes the access log with C{site._logFormatter} (public only
    as the C{logFormatter} argument of the constructor): this is the one
    place that reaches for it.  The host's formatter stays, wrapped by
    L{censoring_formatter}.  A Site whose class writes its log with a
    C{log()} of its own cannot be made safe from here, and is refused.

    @raise ValueError: C{site} logs requests in a way hmacfs cannot censor.
    """
    if getattr(site, "censorsAccessLog", False):
        return
    if type(site).log is not http.HTTPFactory.log:
        raise ValueError(
            f"{type(site).__qualname__} writes its access log with a log() of its own, "
            "which hmacfs cannot keep MACs out of; use the logFormatter argument of "
            "twisted.web.server.Site instead"
        )
    formatter = getattr(site, "_logFormatter", None)
    if not callable(formatter):
        raise ValueError(
            "this version of Twisted keeps no _logFormatter on its Site: "
            "hmacfs cannot censor its access log"
        )
    site._logFormatter = censoring_formatter(formatter)
