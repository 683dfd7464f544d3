"""
The XEP-0363 slot component: hmacfs handing out its own upload slots over XMPP.

An XMPP server without an upload module of its own (or an admin who wants uploads on another
host) lets hmacfs connect as an external component (XEP-0114, the ``jabber:component:accept``
stream of C{twisted.words}).  Users' clients find it by service discovery, ask it for a slot,
and get GET/PUT URLs under C{PublicURL} signed with hmacfs's own secret, so the file server
below checks them like any slot Prosody or ejabberd signed.

L{SlotIssuer} decides (pure: no stream, clock injected); L{SlotComponent} answers the IQs of one
stream; L{ComponentService} keeps the connection up, reconnecting with backoff when the XMPP
server restarts.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.words.protocols.jabber import component, error, xmlstream
from twisted.words.protocols.jabber.jid import JID, InvalidFormat
from twisted.words.xish import domish
from twisted.words.xish.xmlstream import STREAM_ERROR_EVENT

from hmacd import auth
from hmacd.address import HostPort
from hmacd.mediatype import BadMediaType, parse_media_type
from hmacd.numbers import NotADecimal, parse_decimal
from hmacd.paths import PathRefused, check_relative
from hmacd.quota import SLOT_UPLOADER_TTL, Quotas, quota_limit, slot_uploader_key

__all__ = [
    "NS_UPLOAD",
    "ComponentService",
    "Slot",
    "SlotComponent",
    "SlotIssuer",
    "SlotRefused",
]

NS_UPLOAD = "urn:xmpp:http:upload:0"
NS_DISCO_INFO = "http://jabber.org/protocol/disco#info"
NS_DISCO_ITEMS = "http://jabber.org/protocol/disco#items"
NS_DATA = "jabber:x:data"
NS_PING = "urn:xmpp:ping"

# The type goes into v2/token MACs and JWT claims, and the PUT must send it: a slot is given
# only for exactly one media type (hmacd.mediatype), which is all the upload accepts.
_MAX_CONTENT_TYPE = 255


def _random_slot() -> str:
    # 144 bits, URL-safe, never starting with "." (which the file server refuses).
    return secrets.token_urlsafe(18)


class SlotRefused(Exception):
    """
    A slot request the component says no to, as the XMPP stanza error to answer with.

    C{text} goes to the user's client as is.
    """

    def __init__(
        self,
        condition: str,
        type: str,
        text: str,
        app: domish.Element | None = None,
    ) -> None:
        super().__init__(text)
        self.condition = condition
        self.type = type
        self.text = text
        self.app = app

    def stanzaError(self) -> error.StanzaError:
        return error.StanzaError(self.condition, self.type, self.text, appCondition=self.app)


@dataclass(frozen=True)
class Slot:
    """Where to PUT (with which headers) and where the file will then be fetched from."""

    get: str
    put: str
    headers: dict[str, str]
    # The store path, the signed size, who asked (a bare JID), and how it is signed.
    path: str = ""
    size: int = 0
    uploader: str | None = None
    protocol: str = ""


@dataclass
class SlotIssuer:
    """
    Decides slot requests and signs the slots, the way Prosody's upload modules do.

    @ivar secret: the file server's HMAC key.
    @ivar public_url: the upload space as clients reach it, ending in C{/}.
    @ivar protocol: C{v}, C{v2}, C{token} or C{jwt}.
    @ivar max_size: the largest file a slot is given for; 0 is no limit.
    @ivar domains: the domains whose users may ask.
    @ivar now: the clock, for JWT C{iat} and C{exp}.
    """

    secret: bytes
    public_url: str
    protocol: str
    max_size: int
    domains: frozenset[str]
    now: Callable[[], float]
    random_slot: Callable[[], str] = field(default=_random_slot)
    jwt_lifetime: int = 300

    def ping_target(self) -> str:
        """A domain the XMPP server hosts (one we serve), for keepalive pings."""
        return min(self.domains)

    def issue(
        self,
        requester: str | None,
        filename: str | None,
        size: str | None,
        content_type: str | None,
    ) -> Slot:
        """
        A slot for C{requester} (the request's C{from}) to upload C{filename} of C{size} bytes.

        @raise SlotRefused: the request is not one to give a slot for.
        """
        try:
            user = JID(requester) if requester else None
        except InvalidFormat:
            user = None
        if user is None or user.host not in self.domains:
            raise SlotRefused("forbidden", "auth", "Uploads here are not for your domain")
        if not filename:
            raise SlotRefused("bad-request", "modify", "Missing file name")
        if "/" in filename:
            raise SlotRefused("bad-request", "modify", "Invalid file name: '/' in it")
        try:
            nbytes = parse_decimal(size or "")
        except NotADecimal:
            raise SlotRefused("bad-request", "modify", "File size must be a whole number") from None
        if self.max_size and nbytes > self.max_size:
            raise SlotRefused(
                "not-acceptable",
                "modify",
                f"File too large: the limit is {self.max_size} bytes",
                _file_too_large(self.max_size),
            )
        content_type = content_type or auth.DEFAULT_CONTENT_TYPE
        if len(content_type) > _MAX_CONTENT_TYPE or not _one_media_type(content_type):
            raise SlotRefused("bad-request", "modify", "Invalid content type")
        path = f"{self.random_slot()}/{filename}"
        try:
            check_relative(path)
        except PathRefused as e:
            raise SlotRefused("bad-request", "modify", f"Invalid file name: {e}") from None
        put, headers = auth.slot_put(
            self.secret,
            self.public_url,
            path,
            nbytes,
            content_type,
            self.protocol,
            self.now(),
            self.jwt_lifetime,
            sub=user.userhost(),
        )
        return Slot(
            get=put.partition("?")[0],
            put=put,
            headers=headers,
            path=path,
            size=nbytes,
            uploader=user.userhost(),
            protocol=self.protocol,
        )


def quota_refused(name: str, quotas: Quotas, size: int) -> SlotRefused:
    """
    The refusal of a slot of C{size} bytes that would exceed the quota C{name}: the file
    alone is larger than the quota (C{file-too-large} with the limit, as XEP-0363 says for a
    size limit), or there is no room left now (C{resource-constraint}, to wait).
    """
    limit = quota_limit(name, quotas.limits)
    if size > limit:
        return SlotRefused(
            "not-acceptable",
            "modify",
            f"File too large for {name}: the limit is {limit} bytes",
            _file_too_large(limit),
        )
    return SlotRefused("resource-constraint", "wait", f"{name} reached: the limit is {limit} bytes")


def _one_media_type(content_type: str) -> bool:
    # As sent, not normalised: the client PUTs the type its slot request named, and the MAC
    # is over those bytes.  Surrounding spaces would be stripped from the PUT's header.
    if content_type != content_type.strip():
        return False
    try:
        parse_media_type(content_type)
    except BadMediaType:
        return False
    return True


def _file_too_large(limit: int) -> domish.Element:
    # XEP-0363 names the limit <max-file-size>; Prosody's upload_external module (and the
    # protocol's older namespace) say <max-size>.  Clients read the one they know.
    app = domish.Element((NS_UPLOAD, "file-too-large"))
    app.addElement("max-file-size", content=str(limit))
    app.addElement("max-size", content=str(limit))
    return app


class SlotComponent:
    """
    The component's side of one authenticated stream: answers every IQ addressed to it.

    Service discovery shows a C{store/file} identity, the upload feature and, with a limit,
    the C{max-file-size} form; slot requests get a slot or a stanza error; XEP-0199 pings a
    result; every other get or set C{service-unavailable}, as RFC 6120 asks.
    """

    log = Logger()

    def __init__(
        self,
        issuer: SlotIssuer,
        name: str = "HTTP File Upload",
        counted: Callable[[str], None] = lambda result: None,
        quotas: Quotas | None = None,
        store: Any = None,
    ) -> None:
        """
        @param quotas: a slot that would exceed one is refused (the PUT would be).
        @param store: the shared metadata store, where the requester of a v, v2 or token
            slot (which names nobody) is recorded for the PUT (L{slot_uploader_key}).
        """
        self.issuer = issuer
        self.name = name
        self.counted = counted
        self.quotas = quotas
        self.store = store

    def attach(self, xs: xmlstream.XmlStream) -> None:
        xs.addObserver("/iq", lambda iq: self.onIq(xs, iq))

    def onIq(self, xs: xmlstream.XmlStream, iq: domish.Element) -> None:
        if iq.getAttribute("type") not in ("get", "set"):
            return

        def failed(failure: Any) -> domish.Element:
            self.log.failure("Answering an IQ failed", failure)
            return error.StanzaError("internal-server-error", "cancel").toResponse(iq)

        # A slot request may wait for the store (quotas); everything else answers at once.
        maybeDeferred(self.respond, iq).addErrback(failed).addCallback(xs.send)

    def respond(self, iq: domish.Element) -> domish.Element | Deferred[domish.Element]:
        payload = list(iq.elements())
        if len(payload) > 1:  # RFC 6120 8.2.3: a get or set has exactly one child
            return error.StanzaError("bad-request", "modify").toResponse(iq)
        if not payload:
            return error.StanzaError("service-unavailable").toResponse(iq)
        query = payload[0]
        key = (iq.getAttribute("type"), query.uri, query.name)
        if query.getAttribute("node") and query.uri in (NS_DISCO_INFO, NS_DISCO_ITEMS):
            return error.StanzaError("item-not-found").toResponse(iq)
        if key == ("get", NS_DISCO_INFO, "query"):
            return self._disco_info(iq)
        if key == ("get", NS_DISCO_ITEMS, "query"):
            response = xmlstream.toResponse(iq, "result")
            response.addElement((NS_DISCO_ITEMS, "query"))
            return response
        if key == ("get", NS_PING, "ping"):
            return xmlstream.toResponse(iq, "result")
        if key == ("get", NS_UPLOAD, "request"):
            return self._slot(iq, query)
        return error.StanzaError("service-unavailable").toResponse(iq)

    def _disco_info(self, iq: domish.Element) -> domish.Element:
        response = xmlstream.toResponse(iq, "result")
        query = response.addElement((NS_DISCO_INFO, "query"))
        identity = query.addElement("identity")
        identity["category"], identity["type"], identity["name"] = "store", "file", self.name
        for feature in (NS_DISCO_INFO, NS_DISCO_ITEMS, NS_PING, NS_UPLOAD):
            query.addElement("feature")["var"] = feature
        if self.issuer.max_size:
            form = query.addElement((NS_DATA, "x"))
            form["type"] = "result"
            for var, kind, value in (
                ("FORM_TYPE", "hidden", NS_UPLOAD),
                ("max-file-size", None, str(self.issuer.max_size)),
            ):
                field_ = form.addElement("field")
                field_["var"] = var
                if kind:
                    field_["type"] = kind
                field_.addElement("value", content=value)
        return response

    def _slot(
        self, iq: domish.Element, request: domish.Element
    ) -> domish.Element | Deferred[domish.Element]:
        requester = iq.getAttribute("from")
        try:
            slot = self.issuer.issue(
                requester,
                request.getAttribute("filename"),
                request.getAttribute("size"),
                request.getAttribute("content-type"),
            )
        except SlotRefused as refused:
            return self._refused(iq, requester, refused)
        if self.quotas is None and (self.store is None or slot.protocol == "jwt"):
            return self._issued(iq, requester, slot)
        return Deferred.fromCoroutine(self._askStore(iq, requester, slot))

    async def _askStore(self, iq: domish.Element, requester: str, slot: Slot) -> domish.Element:
        if self.quotas is not None:
            try:
                name = await self.quotas.check(slot.uploader, slot.size)
            except Exception as e:
                # The PUT asks again, and says 503 if the store is still not answering.
                self.log.warn("quota of {requester} unknown: {why}", requester=requester, why=e)
                name = None
            if name is not None:
                return self._refused(iq, requester, quota_refused(name, self.quotas, slot.size))
        if self.store is not None and slot.protocol != "jwt":
            key = slot_uploader_key(slot.path)
            try:
                await self.store.put_state(key, slot.uploader, SLOT_UPLOADER_TTL)
            except Exception as e:
                # The upload then counts for nobody in particular (GlobalQuota only).
                self.log.warn("uploader of {url} not recorded: {why}", url=slot.get, why=e)
        return self._issued(iq, requester, slot)

    def _refused(self, iq: domish.Element, requester: str, refused: SlotRefused) -> domish.Element:
        self.log.debug(
            "Slot refused to {requester}: {reason}", requester=requester, reason=refused.text
        )
        self.counted(refused.condition)
        return refused.stanzaError().toResponse(iq)

    def _issued(self, iq: domish.Element, requester: str, slot: Slot) -> domish.Element:
        # The PUT URL carries the MAC: log the GET URL only.
        self.log.debug("Slot for {requester}: {url}", requester=requester, url=slot.get)
        self.counted("issued")
        response = xmlstream.toResponse(iq, "result")
        element = response.addElement((NS_UPLOAD, "slot"))
        put = element.addElement("put")
        put["url"] = slot.put
        for name, value in slot.headers.items():
            element_ = put.addElement("header", content=value)
            element_["name"] = name
        element.addElement("get")["url"] = slot.get
        return response


def _refusal_hint(condition: str, jid: str) -> str:
    """
    What an operator should check when the XMPP server refuses the handshake with condition.

    Prosody answers an unknown JID with host-unknown, but ejabberd with not-authorized, the
    same as a wrong secret: that answer has to point at both keys.  Never the secret itself.
    """
    listed = (
        f"the XMPP server's config must list {jid} as a component with ComponentSecret as its"
        f' password (Prosody: Component "{jid}" with component_secret;'
        f' ejabberd: listen: module ejabberd_service, hosts: "{jid}" with password)'
    )
    if condition == "not-authorized":
        return f": check ComponentSecret and ComponentJID: {listed}"
    if condition == "host-unknown":
        return f": check ComponentJID, the XMPP server has no component of this name: {listed}"
    if condition == "conflict":
        return ": another component is connected as this JID"
    return ""


def _abort(xs: xmlstream.XmlStream) -> None:
    """Drop a link that stopped answering at once: a polite close would wait on it too."""
    cast(ITCPTransport, xs.transport).abortConnection()


class ComponentService(Service):
    """
    Keeps hmacfs connected to the XMPP server as C{jid}: connects at start, reconnects with
    backoff whenever the connection drops or the server refuses it, and closes the stream
    cleanly at stop.

    A connection that does not complete the handshake within C{handshakeTimeout} seconds is
    dropped and retried.  Once connected, the component pings (XEP-0199) a domain it serves
    every C{pingInterval} seconds (0: never); any answer, even an error, shows the link is
    alive, and none within C{pingTimeout} drops it, so a link a NAT or firewall silently forgot
    does not leave the component deaf.  The next ping goes out at most C{pingInterval} after
    the last answer, so a link that falls silent is dropped (and a reconnect begins) at most
    C{pingInterval + pingTimeout} seconds after it last answered.

    @ivar connected: whether a stream is authenticated right now.
    @ivar pongs: keepalive pings answered so far.
    """

    log = Logger()

    def __init__(
        self,
        jid: str,
        password: str,
        address: HostPort | tuple[str, int],
        slots: SlotComponent,
        reactor,
        retryPolicy: Callable[[int], float] | None = None,
        onConnected: Callable[[bool], None] = lambda connected: None,
        handshakeTimeout: float = 30,
        pingInterval: float = 15,
        pingTimeout: float = 15,
    ) -> None:
        self.jid = jid
        # Config.component_address is already a HostPort; a plain pair is taken too.
        self.address = HostPort(*address)
        self.slots = slots
        self.connected = False
        self._onConnected = onConnected
        self._clock = reactor
        self._stream: xmlstream.XmlStream | None = None
        self._waiting: list[Deferred[xmlstream.XmlStream | None]] = []
        self._handshakeTimeout = handshakeTimeout
        self._pingInterval = pingInterval
        self._pingTimeout = pingTimeout
        self._deadline: IDelayedCall | None = None
        self._pinger: LoopingCall | None = None
        self._pingId: str | None = None
        self.pongs = 0
        # Streams in a row that ended before the handshake succeeded.  ClientService counts
        # failed TCP connects only, and the server accepts TCP before it refuses a wrong
        # secret, so without this a refusal would be retried at the first delay forever.
        self._refusals = 0
        policy = retryPolicy or backoffPolicy(initialDelay=1.0, maxDelay=60.0)
        factory = component.componentFactory(jid, password)
        factory.addBootstrap(xmlstream.STREAM_CONNECTED_EVENT, self._streamConnected)
        factory.addBootstrap(xmlstream.STREAM_AUTHD_EVENT, self._authenticated)
        factory.addBootstrap(STREAM_ERROR_EVENT, self._streamError)
        factory.addBootstrap(xmlstream.STREAM_END_EVENT, self._streamEnded)
        endpoint = HostnameEndpoint(reactor, self.address.host, self.address.port, timeout=10)
        self._client = ClientService(
            endpoint,
            factory,
            retryPolicy=lambda attempt: policy(max(attempt, self._refusals)),
            clock=reactor,
        )

    def startService(self) -> None:
        super().startService()
        self.log.info(
            "XMPP component {jid}: connecting to {host}:{port}",
            jid=self.jid,
            host=self.address.host,
            port=self.address.port,
        )
        self._client.startService()

    def stopService(self):
        super().stopService()
        if self._stream is not None and self.connected:
            self._stream.sendFooter()
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(CancelledError("the XMPP component was stopped"))
        return self._client.stopService()

    def whenConnected(self) -> Deferred[xmlstream.XmlStream | None]:
        """
        A Deferred that fires with the stream once one is authenticated (now or later), or
        fails with L{CancelledError} if the service stops first.
        """
        if self.connected:
            return succeed(self._stream)
        if not self.running:
            return fail(CancelledError("the XMPP component is not running"))
        d: Deferred[xmlstream.XmlStream | None] = Deferred()
        self._waiting.append(d)
        return d

    def _streamConnected(self, xs: xmlstream.XmlStream) -> None:
        self._stream = xs
        self._deadline = self._clock.callLater(self._handshakeTimeout, self._handshakeTooSlow, xs)

    def _handshakeTooSlow(self, xs: xmlstream.XmlStream) -> None:
        self._deadline = None
        self.log.error(
            "XMPP component {jid}: no handshake from {host}:{port} within {seconds} s;"
            " is that the server's component port?",
            jid=self.jid,
            host=self.address.host,
            port=self.address.port,
            seconds=self._handshakeTimeout,
        )
        _abort(xs)

    def _authenticated(self, xs: xmlstream.XmlStream) -> None:
        self._cancelDeadline()
        self._refusals = 0
        self.connected = True
        self._onConnected(True)
        self.slots.attach(xs)
        xs.addObserver("/iq", self._pong)
        if self._pingInterval:
            self._pinger = LoopingCall(self._ping, xs)
            self._pinger.clock = self._clock
            self._pinger.start(self._pingInterval, now=False)
        self.log.info(
            "XMPP component {jid} is connected to {host}:{port}",
            jid=self.jid,
            host=self.address.host,
            port=self.address.port,
        )
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(xs)

    def _ping(self, xs: xmlstream.XmlStream) -> None:
        if self._pingId is not None:
            return  # the previous one is still within its timeout
        iq = domish.Element((None, "iq"))
        self._pingId = iq["id"] = f"hmacfs-ping-{secrets.token_hex(6)}"
        iq["type"], iq["from"] = "get", self.jid
        iq["to"] = self.slots.issuer.ping_target()
        iq.addElement((NS_PING, "ping"))
        xs.send(iq)
        self._deadline = self._clock.callLater(self._pingTimeout, self._pingLost, xs)

    def _pong(self, iq: domish.Element) -> None:
        if iq.getAttribute("type") in ("result", "error") and iq.getAttribute("id") == self._pingId:
            self._pingId = None
            self.pongs += 1
            self._cancelDeadline()

    def _pingLost(self, xs: xmlstream.XmlStream) -> None:
        self._deadline = None
        self.log.warn(
            "XMPP component {jid}: no answer to a ping in {seconds} s; reconnecting",
            jid=self.jid,
            seconds=self._pingTimeout,
        )
        _abort(xs)

    def _cancelDeadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _streamError(self, reason) -> None:
        condition = getattr(reason.value, "condition", str(reason.value))
        if self.connected:
            self.log.warn(
                "XMPP server closed the stream of component {jid}: {condition}",
                jid=self.jid,
                condition=condition,
            )
            return
        hint = _refusal_hint(condition, self.jid)
        self.log.error(
            "XMPP server refused component {jid}: {condition}{hint}",
            jid=self.jid,
            condition=condition,
            hint=hint,
        )

    def _streamEnded(self, reason) -> None:
        self._cancelDeadline()
        if self._pinger is not None and self._pinger.running:
            self._pinger.stop()
        self._pinger = None
        self._pingId = None
        was = self.connected
        self.connected = False
        self._stream = None
        if not was:
            self._refusals += 1
            return
        self._onConnected(False)
        if self.running:
            self.log.warn("XMPP component {jid} lost its connection; reconnecting", jid=self.jid)
