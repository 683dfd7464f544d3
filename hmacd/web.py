"""
The HTTP face of hmacfs, and the one home of its HTTP policy.

What every response carries (CORS, nosniff), the methods there are, the
security headers of a served file, and an access log in which MACs never
appear: all here.  L{HmacfsSite} is the ready-made Site that applies them;
L{install_policy} applies them to a host's own Site (L{hmacd.mount}).

The request and resource classes (L{hmacd.upload}, L{hmacd.download}) read
the policy from this module, so this module imports them only where a Site
is built: at the top it would be an import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast
from urllib.parse import quote

from twisted.internet.interfaces import ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel
from twisted.web import http, server
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from hmacd import internals, logs
from hmacd.core import FileServer, is_inline_type
from hmacd.guard import GuardedChannel, address_key
from hmacd.logs import censor, censored_uri, escape, is_secret_name
from hmacd.numbers import NotADecimal, parse_decimal
from hmacd.throttle import is_trusted

__all__ = [
    "ALLOWED_METHODS",
    "CONTENT_SECURITY_POLICY",
    "POLICY_HEADERS",
    "HmacfsChannel",
    "HmacfsSite",
    "attachment_disposition",
    "censor_access_log",
    "censoring_formatter",
    "install_policy",
]

ALLOWED_METHODS = (b"OPTIONS", b"HEAD", b"GET", b"PUT")

# Sent on every response so that browser clients (Converse.js) can upload
# after a preflight and read any answer, error pages included.
POLICY_HEADERS = (
    (b"Access-Control-Allow-Origin", b"*"),
    (b"Access-Control-Allow-Methods", b", ".join(ALLOWED_METHODS)),
    (b"Access-Control-Allow-Headers", b"Authorization, Content-Type"),
    (b"Access-Control-Max-Age", b"7200"),
    (b"X-Content-Type-Options", b"nosniff"),
)

# On every served file: whatever a file holds, a browser runs none of it and
# no page frames it.
CONTENT_SECURITY_POLICY = b"default-src 'none'; frame-ancestors 'none'"


def attachment_disposition(content_type: str, name: str) -> bytes | None:
    """
    The Content-Disposition a file named C{name} of C{content_type} is served
    with: L{None} for the types a browser may show inline (images, video,
    audio, plain text), else C{attachment}, so that nothing else is rendered
    on our origin.
    """
    if is_inline_type(content_type):
        return None
    return b"attachment; filename*=UTF-8''" + quote(name, safe="").encode("ascii")


# Module level: a Logger class attribute would take the class's name as its
# namespace, and access-log filters want a stable one.
_ACCESS_NAMESPACE = "hmacfs.access"
_access = Logger(namespace=_ACCESS_NAMESPACE)
log = Logger()


class _Refused(Protocol):
    """
    A connection over MaxConnectionsPerClient: dropped as soon as it is made.

    A protocol rather than None from buildProtocol, which a TLS listener
    (an ssl: endpoint wraps the Site) cannot take.
    """

    def connectionMade(self) -> None:
        # A TCP, Unix or TLS transport: each of them can abort.
        cast(ITCPTransport, self.transport).abortConnection()


class HmacfsChannel(internals.ContentLengthCheck, GuardedChannel):
    """
    The HTTP/1.1 channel of every hmacfs connection: a L{GuardedChannel} (HeaderTimeout),
    which reads Content-Length by hmacfs's own rule.

    Twisted converts Content-Length with C{int()} as the header arrives, before any request
    hook runs: past Python's 4,300-digit limit that raises out of the parser, drops the
    connection and logs a traceback per request.  The header is judged here first, by the
    same rule as every other number (L{hmacd.numbers}), and a bad one ends the request with
    Twisted's own 400, as a non-numeric one already does.
    """

    def badContentLength(self, value: bytes) -> bool:
        try:
            parse_decimal(value)
        except NotADecimal as e:
            log.debug("refused a request: Content-Length is {why}", why=str(e))
            return True
        return False


class HmacfsSite(server.Site):
    """
    The upload/download site of one L{FileServer}.

    A host application that mounts the upload space in a Site of its own
    gets the same policy from L{install_policy}; this class is the
    ready-made case.
    """

    # HTTP/1.1 only (see acceptableProtocols): the channel itself, not Twisted's wrapper that
    # can switch a TLS connection to HTTP/2.
    protocol = HmacfsChannel  # type: ignore[assignment]  # Factory calls it with no arguments
    displayTracebacks = False
    # log() below writes a censored, escaped line of its own.
    censorsAccessLog = True

    def __init__(self, fileServer: FileServer, reactor=None, timeout: float | None = None) -> None:
        # Here, not at the top: both read their policy from this module.
        from hmacd.download import StoreResource
        from hmacd.upload import UploadRequest

        kwargs = {} if timeout is None else {"timeout": timeout}
        super().__init__(StoreResource(fileServer), reactor=reactor or fileServer.reactor, **kwargs)
        self.requestFactory = UploadRequest
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
        if fs.trusted_proxies and is_trusted(host, fs.trusted_proxies):
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
        if not logs.emits(LogLevel.info, _ACCESS_NAMESPACE):
            return  # LogLevel above info: the line would be built, escaped, and dropped
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

    twisted.web writes the access log with the formatter given as the
    C{logFormatter} argument of the Site's constructor, and has no public way
    to reach it afterwards (L{internals.log_formatter}).  The host's formatter
    stays, wrapped by L{censoring_formatter}.  A Site whose class writes its
    log with a C{log()} of its own cannot be made safe from here, and is
    refused.

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
    formatter = internals.log_formatter(site)
    if formatter is None:
        raise ValueError(
            "this version of Twisted keeps the access-log formatter of its Site where "
            "hmacfs cannot find it: hmacfs cannot censor its access log"
        )
    internals.set_log_formatter(site, censoring_formatter(formatter))


def install_policy(site: server.Site, root: Resource, fileServer: FileServer) -> None:
    """
    Serve C{fileServer}'s upload space at C{/<UploadSubDir>/} of the host's
    C{site}, whose root resource is C{root}, with hmacfs's HTTP policy.

    What the host Site gets: L{hmacd.upload.UploadRequest} as its request
    factory (uploads are judged and streamed before any resource is looked
    up; every other request is an ordinary twisted.web request, which now
    also carries the CORS and nosniff headers), a C{fileServer} attribute,
    and an access log with no MAC or bearer token in it whose every line is
    one printable line (L{censor_access_log}).  UploadSubDir must be one
    non-empty path segment.

    @raise ValueError: UploadSubDir is not one segment, or C{site} logs
        requests in a way hmacfs cannot censor; C{site} and C{root} are then
        left as they were.
    """
    from hmacd.download import StoreResource
    from hmacd.upload import UploadRequest

    prefix = fileServer.prefix
    if not prefix or "/" in prefix:
        raise ValueError(f"mount needs UploadSubDir to be one path segment, got {prefix!r}")
    censor_access_log(site)
    root.putChild(prefix.encode("utf-8"), StoreResource(fileServer))
    site.requestFactory = UploadRequest
    site.fileServer = fileServer  # type: ignore[attr-defined]


class _CensoredRequest:
    """
    What a host Site's own access-log formatter sees of a request: the request,
    except that the MACs in its URI, query arguments and Referer are replaced
    and its Authorization header (a bearer token) is gone.
    """

    def __init__(self, request) -> None:
        self._request = request

    def __getattr__(self, name: str):
        return getattr(self._request, name)

    @property
    def uri(self) -> bytes:
        uri = self._request.uri
        return censored_uri(uri) if uri else uri

    @property
    def args(self) -> dict[bytes, list[bytes]]:
        args = getattr(self._request, "args", None) or {}
        return {
            name: [b"<redacted>"] * len(values) if is_secret_name(name) else values
            for name, values in args.items()
        }

    @property
    def requestHeaders(self) -> Headers:
        headers = Headers()
        for name, values in self._request.requestHeaders.getAllRawHeaders():
            lower = name.lower()
            if lower == b"authorization":
                continue
            if lower == b"referer":
                values = [censored_uri(value) for value in values]
            headers.setRawHeaders(name, values)
        return headers

    def getHeader(self, name: bytes | str) -> bytes | None:
        if isinstance(name, str):
            name = name.encode("latin-1")
        values = self.requestHeaders.getRawHeaders(name)
        return None if values is None else values[-1]

    def getAllHeaders(self) -> dict[bytes, bytes]:
        return {name.lower(): values[-1] for name, values in self.requestHeaders.getAllRawHeaders()}


def censoring_formatter(formatter: Callable[[str, object], str]) -> Callable[[str, object], str]:
    """
    An access-log formatter (C{(timestamp, request) -> str}) that gives
    C{formatter} the request with its MACs and bearer token hidden, and makes
    its line one line of printable characters.

    The line's own quoting stays C{formatter}'s: only characters that are not
    printable are escaped in it (twisted.web's own formatters escape the rest).
    """
    if getattr(formatter, "censorsMACs", False):
        return formatter

    def censoring(timestamp: str, request) -> str:
        return escape(formatter(timestamp, _CensoredRequest(request)), quote=False)

    censoring.censorsMACs = True  # type: ignore[attr-defined]
    censoring.wrapped = formatter  # type: ignore[attr-defined]
    return censoring
