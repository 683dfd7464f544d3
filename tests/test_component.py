"""
The XEP-0363 slot component: its decisions, its stanzas, and its connection to an XMPP server.

The server here is Twisted's own XEP-0114 router, in process, so that connects, refusals and
reconnects run in milliseconds; tests/test_xmpp.py runs the same component against Prosody.
"""

from __future__ import annotations

import os
import re
from urllib.parse import unquote, urlsplit

from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase
from twisted.words.protocols.jabber import component, xmlstream
from twisted.words.xish import domish, utility

from hmacd import auth, tap
from hmacd.component import (
    NS_DATA,
    NS_DISCO_INFO,
    NS_UPLOAD,
    ComponentService,
    SlotComponent,
    SlotIssuer,
    SlotRefused,
)
from hmacd.config import Config
from tests.servers import free_port
from tests.support import SECRET, LoopbackServer, MemoryServer

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.rst")

NOW = 1_800_000_000
ALICE = "alice@example.org/phone"


def issuer(**changes) -> SlotIssuer:
    fields = dict(
        secret=SECRET,
        public_url="https://files.example.org/upload/",
        protocol="v2",
        max_size=1000,
        domains=frozenset({"example.org"}),
        now=lambda: NOW,
        random_slot=lambda: "SLOT",
    )
    fields.update(changes)
    return SlotIssuer(**fields)


def parse(xml: str) -> domish.Element:
    """One element from its XML text, parsed as a stanza of a component stream."""
    found = []
    stream = domish.elementStream()
    stream.DocumentStartEvent = lambda root: None
    stream.ElementEvent = found.append
    stream.DocumentEndEvent = lambda: None
    stream.parse(f"<stream xmlns='jabber:component:accept'>{xml}</stream>")
    return found[0]


def slot_request(filename="a.txt", size="10", content_type=None, sender=ALICE, kind="get"):
    iq = domish.Element((None, "iq"))
    iq["type"], iq["id"], iq["to"] = kind, "q1", "upload.example.org"
    if sender is not None:
        iq["from"] = sender
    request = iq.addElement((NS_UPLOAD, "request"))
    for name, value in (("filename", filename), ("size", size), ("content-type", content_type)):
        if value is not None:
            request[name] = value
    return iq


def error_of(response: domish.Element) -> tuple[str, str]:
    """(type, condition) of an error response."""
    error = next(response.elements(None, "error"))
    condition = next(e.name for e in error.elements() if e.name != "text")
    return error["type"], condition


class IssuerTests(TestCase):
    """What a slot request is answered with, before any stanza is involved."""

    def test_v2_slot(self) -> None:
        """The PUT URL is the GET URL plus the MAC over slot/name, size and type."""
        slot = issuer().issue(ALICE, "hello world.txt", "10", "text/plain")
        self.assertEqual(slot.get, "https://files.example.org/upload/SLOT/hello%20world.txt")
        mac = auth.sign_v2(SECRET, "SLOT/hello world.txt", 10, "text/plain")
        self.assertEqual(slot.put, f"{slot.get}?v2={mac}")
        self.assertEqual(slot.headers, {})

    def test_default_content_type(self) -> None:
        """No content-type in the request means the one Prosody signs then."""
        slot = issuer().issue(ALICE, "a", "1", None)
        mac = auth.sign_v2(SECRET, "SLOT/a", 1, auth.DEFAULT_CONTENT_TYPE)
        self.assertTrue(slot.put.endswith(f"?v2={mac}"))

    def test_jwt_slot(self) -> None:
        """A JWT slot: the bare URL for both, a Bearer token naming the uploader."""
        slot = issuer(protocol="jwt").issue(ALICE, "a b.png", "10", "image/png")
        self.assertEqual(slot.put, slot.get)
        token = auth.bearer_token(slot.headers["Authorization"])
        claims = auth.verify_jwt(SECRET, token, now=NOW)
        self.assertEqual(
            (claims.slot, claims.filename, claims.filesize, claims.filetype, claims.exp),
            ("SLOT", "a b.png", 10, "image/png", NOW + 300),
        )
        self.assertEqual(claims.sub, "alice@example.org")

    def test_random_slots(self) -> None:
        """By default every slot gets a fresh 24-character random directory."""
        real = issuer(random_slot=SlotIssuer.__dataclass_fields__["random_slot"].default)
        slots = {urlsplit(real.issue(ALICE, "a", "1", None).get).path for _ in range(50)}
        self.assertEqual(len(slots), 50)
        for path in slots:
            segment = path.split("/")[2]
            self.assertEqual(len(segment), 24)
            self.assertFalse(segment.startswith("."))

    def refused(self, condition: str, *args, **changes) -> SlotRefused:
        e = self.assertRaises(SlotRefused, issuer(**changes).issue, *args)
        self.assertEqual(e.condition, condition)
        return e

    def test_other_domain(self) -> None:
        """Users of domains not listed get forbidden, as do requests without a sender."""
        self.refused("forbidden", "mallory@evil.example/x", "a", "1", None)
        self.refused("forbidden", "example.org.evil.example", "a", "1", None)
        self.refused("forbidden", None, "a", "1", None)
        self.refused("forbidden", "@@", "a", "1", None)

    def test_listed_domains(self) -> None:
        """Every listed domain is served; JIDs compare case-insensitively."""
        many = frozenset({"example.org", "chat.example.net"})
        issuer(domains=many).issue("Bob@CHAT.example.NET", "a", "1", None)

    def test_bad_names(self) -> None:
        """Names the file server would refuse get bad-request before a slot exists."""
        for name in ("", None, "a/b", ".hidden", "..", "tab\there", "back\\slash", "x" * 256):
            self.refused("bad-request", ALICE, name, "1", None)

    def test_awkward_names(self) -> None:
        """Spaces, non-ASCII, +, % and 255-byte names are fine, percent-encoded once."""
        for name in ("a b", "naïve+%20.txt", "日本語.pdf", "é" * 127):
            slot = issuer().issue(ALICE, name, "1", None)
            self.assertEqual(unquote(urlsplit(slot.get).path), f"/upload/SLOT/{name}")

    def test_bad_sizes(self) -> None:
        for size in (None, "", "-1", "1.5", "1e3", " 1", "١٢", "1" * 21, "9" * 5000):
            self.refused("bad-request", ALICE, "a", size, None)

    def test_too_large(self) -> None:
        """Over UploadMaxSize: not-acceptable, with the limit under both of its names."""
        e = self.refused("not-acceptable", ALICE, "a", "1001", None)
        self.assertEqual(e.type, "modify")
        self.assertEqual(
            e.app.toXml(),
            f"<file-too-large xmlns='{NS_UPLOAD}'><max-file-size>1000</max-file-size>"
            "<max-size>1000</max-size></file-too-large>",
        )
        issuer().issue(ALICE, "a", "1000", None)
        issuer(max_size=0).issue(ALICE, "a", str(10**15), None)

    def test_bad_content_types(self) -> None:
        for kind in ("text", "text/plain\r\nX: y", "a b/c", "x/" + "y" * 300, "/plain"):
            self.refused("bad-request", ALICE, "a", "1", kind)
        issuer().issue(ALICE, "a", "1", "text/plain; charset=utf-8")


class UploadThroughSlotTests(TestCase):
    """Slots the component signs are uploads the file server takes, in every protocol."""

    def setUp(self) -> None:
        self.server = LoopbackServer(self)

    @defer.inlineCallbacks
    def test_every_protocol(self):
        for protocol in ("v", "v2", "token", "jwt"):
            slots = issuer(
                public_url=self.server.base + "/upload/",
                protocol=protocol,
                random_slot=lambda p=protocol: f"slot-{p}",
                now=reactor.seconds,
            )
            name = "my file+100%é.txt"
            slot = slots.issue(ALICE, name, "5", "text/plain")
            headers = {"Content-Type": "text/plain", **slot.headers}
            response = yield self.server.http.put(slot.put, b"hello", headers=headers)
            self.assertEqual(response.code, 201, protocol)
            yield response.content()
            response = yield self.server.http.get(slot.get)
            self.assertEqual((yield response.content()), b"hello")
            self.assertEqual(
                response.headers.getRawHeaders("content-type"), ["text/plain"], protocol
            )


class StanzaTests(TestCase):
    """The IQs the component answers, as XML."""

    def setUp(self) -> None:
        self.counts: list[str] = []
        self.component = SlotComponent(issuer(), counted=self.counts.append)

    def test_disco_info(self) -> None:
        iq = parse(
            "<iq type='get' id='d1' from='alice@example.org/x' to='upload.example.org'>"
            "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>"
        )
        response = self.component.respond(iq)
        self.assertEqual(
            (response["type"], response["id"], response["to"], response["from"]),
            ("result", "d1", "alice@example.org/x", "upload.example.org"),
        )
        query = next(response.elements())
        identity = next(query.elements(NS_DISCO_INFO, "identity"))
        self.assertEqual(
            (identity["category"], identity["type"], identity["name"]),
            ("store", "file", "HTTP File Upload"),
        )
        features = [f["var"] for f in query.elements(NS_DISCO_INFO, "feature")]
        self.assertIn(NS_UPLOAD, features)
        self.assertIn("http://jabber.org/protocol/disco#info", features)
        form = next(query.elements("jabber:x:data", "x"))
        fields = {f["var"]: str(next(f.elements(NS_DATA, "value"))) for f in form.elements()}
        self.assertEqual(fields, {"FORM_TYPE": NS_UPLOAD, "max-file-size": "1000"})

    def test_disco_info_unlimited(self) -> None:
        """Without a size limit there is no form: XEP-0363 advertises only a real limit."""
        self.component = SlotComponent(issuer(max_size=0))
        iq = parse(
            "<iq type='get' id='d1' from='a@example.org' to='upload.example.org'>"
            "<query xmlns='http://jabber.org/protocol/disco#info'/></iq>"
        )
        query = next(self.component.respond(iq).elements())
        self.assertEqual(list(query.elements("jabber:x:data", "x")), [])

    def test_disco_items_and_ping(self) -> None:
        for xml in (
            "<query xmlns='http://jabber.org/protocol/disco#items'/>",
            "<ping xmlns='urn:xmpp:ping'/>",
        ):
            iq = parse(
                f"<iq type='get' id='p' from='a@example.org' to='upload.example.org'>{xml}</iq>"
            )
            response = self.component.respond(iq)
            self.assertEqual(response["type"], "result")

    def test_slot(self) -> None:
        response = self.component.respond(slot_request("a b.txt", "10", "text/plain"))
        self.assertEqual(response["type"], "result")
        slot = next(response.elements(NS_UPLOAD, "slot"))
        put = next(slot.elements(NS_UPLOAD, "put"))
        get = next(slot.elements(NS_UPLOAD, "get"))
        self.assertEqual(get["url"], "https://files.example.org/upload/SLOT/a%20b.txt")
        mac = auth.sign_v2(SECRET, "SLOT/a b.txt", 10, "text/plain")
        self.assertEqual(put["url"], f"{get['url']}?v2={mac}")
        self.assertEqual(list(put.elements()), [])
        self.assertEqual(self.counts, ["issued"])

    def test_jwt_slot_header(self) -> None:
        self.component = SlotComponent(issuer(protocol="jwt"))
        response = self.component.respond(slot_request("a", "1"))
        put = next(next(response.elements(NS_UPLOAD, "slot")).elements(NS_UPLOAD, "put"))
        header = next(put.elements(NS_UPLOAD, "header"))
        self.assertEqual(header["name"], "Authorization")
        self.assertTrue(str(header).startswith("Bearer "))

    def test_refusals(self) -> None:
        cases = [
            (slot_request(sender="eve@evil.example"), ("auth", "forbidden")),
            (slot_request(filename="../x"), ("modify", "bad-request")),
            (slot_request(size="many"), ("modify", "bad-request")),
            (slot_request(size="5000"), ("modify", "not-acceptable")),
            (slot_request(kind="set"), ("cancel", "service-unavailable")),
        ]
        for iq, expected in cases:
            response = self.component.respond(iq)
            self.assertEqual(response["type"], "error")
            self.assertEqual(error_of(response), expected, iq.toXml())
        self.assertEqual(self.counts, ["forbidden", "bad-request", "bad-request", "not-acceptable"])

    def test_too_large_names_the_limit(self) -> None:
        response = self.component.respond(slot_request(size="5000"))
        error = next(response.elements(None, "error"))
        too_large = next(error.elements(NS_UPLOAD, "file-too-large"))
        self.assertEqual(str(next(too_large.elements(NS_UPLOAD, "max-file-size"))), "1000")

    def ask(self, payload: str) -> tuple[str, str]:
        iq = parse(
            f"<iq type='get' id='u' from='a@example.org' to='upload.example.org'>{payload}</iq>"
        )
        return error_of(self.component.respond(iq))

    def test_unknown(self) -> None:
        """Every get or set we do not serve is service-unavailable, as RFC 6120 asks."""
        for xml in (
            "<query xmlns='jabber:iq:version'/>",
            "<request xmlns='urn:xmpp:http:upload'><filename>a</filename></request>",
            "",
        ):
            self.assertEqual(self.ask(xml), ("cancel", "service-unavailable"), xml)

    def test_disco_nodes(self) -> None:
        """We have no disco nodes: item-not-found, as XEP-0030 asks."""
        for ns in ("info", "items"):
            xml = f"<query xmlns='http://jabber.org/protocol/disco#{ns}' node='x'/>"
            self.assertEqual(self.ask(xml), ("cancel", "item-not-found"))

    def test_two_payloads(self) -> None:
        """An IQ get carries exactly one payload; two is a bad request."""
        xml = "<ping xmlns='urn:xmpp:ping'/><ping xmlns='urn:xmpp:ping'/>"
        self.assertEqual(self.ask(xml), ("modify", "bad-request"))

    def test_results_and_errors_are_not_answered(self) -> None:
        sent = []
        stream = utility.EventDispatcher()
        stream.send = sent.append
        for kind in ("result", "error"):
            self.component.onIq(stream, slot_request(kind=kind))
        self.assertEqual(sent, [])
        self.component.onIq(stream, slot_request())
        self.assertEqual(len(sent), 1)

    def test_crash_is_internal_server_error(self) -> None:
        """A bug while answering still answers, and is logged."""
        sent = []
        stream = utility.EventDispatcher()
        stream.send = sent.append
        self.component.issuer = None  # the bug
        self.component.onIq(stream, slot_request())
        self.assertEqual(error_of(sent[0]), ("cancel", "internal-server-error"))
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)


class FakeXMPPServer:
    """Twisted's XEP-0114 router on a spare port, with one "client" route that records."""

    def __init__(self, testCase, secret: str = "component-secret", port: int = 0) -> None:
        self.router = component.Router()
        self.received: list[domish.Element] = []
        self.footers = 0  # streams the component closed with </stream:stream>
        self.answerPings = True
        self.waiting: list[defer.Deferred] = []
        client = utility.EventDispatcher()
        client.send = self._received
        self.router.addRoute("example.org", client)
        self.factory = component.XMPPComponentServerFactory(self.router, secret)
        self.streams: list[xmlstream.XmlStream] = []
        self.factory.addBootstrap(xmlstream.STREAM_CONNECTED_EVENT, self._connected)
        self.listen(port)
        testCase.addCleanup(self.stop)

    def listen(self, port: int) -> None:
        self.port = reactor.listenTCP(port, self.factory, interface="127.0.0.1")
        self.portNumber = self.port.getHost().port

    def _connected(self, xs: xmlstream.XmlStream) -> None:
        self.streams.append(xs)
        received = []

        def rawIn(data: bytes) -> None:
            received.append(data)
            if b"</stream:stream>" in b"".join(received[-2:]):
                self.footers += 1

        xs.rawDataInFn = rawIn

    def _received(self, stanza) -> None:
        if stanza.firstChildElement() is not None and stanza.firstChildElement().name == "ping":
            self.pings = getattr(self, "pings", 0) + 1
            if self.answerPings:
                self.router.route(xmlstream.toResponse(stanza, "result"))
            return
        self.received.append(stanza)
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(stanza)

    def ask(self, stanza: domish.Element) -> defer.Deferred:
        """Route stanza to the component; fires with its answer."""
        d = defer.Deferred()
        self.waiting.append(d)
        self.router.route(stanza)
        return d

    @defer.inlineCallbacks
    def stop(self):
        """Stop listening and drop every component connection, like a server going down."""
        if self.port is not None:
            yield self.port.stopListening()
            self.port = None
        for xs in self.streams:
            if xs.transport is not None:
                xs.transport.abortConnection()
        self.streams.clear()


class ComponentServiceTests(TestCase):
    """The connection: handshake, refusal, reconnect, clean stop."""

    def service(self, server, password: str = "component-secret", **options):
        self.attempts: list[int] = []

        def policy(attempt: int) -> float:
            self.attempts.append(attempt)
            return 0.05

        port = server if isinstance(server, int) else server.portNumber
        options.setdefault("pingInterval", 0)
        service = ComponentService(
            "upload.example.org",
            password,
            ("127.0.0.1", port),
            SlotComponent(issuer()),
            reactor,
            retryPolicy=policy,
            **options,
        )
        self.states: list[bool] = []
        service._onConnected = self.states.append
        service.startService()
        self.addCleanup(lambda: service.running and service.stopService())
        return service

    def events(self) -> list[dict]:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    @defer.inlineCallbacks
    def test_connects_and_answers(self):
        server = FakeXMPPServer(self)
        service = self.service(server)
        yield service.whenConnected()
        self.assertTrue(service.connected)
        answer = yield server.ask(slot_request("a.txt", "3"))
        self.assertEqual(answer["type"], "result")
        self.assertEqual(answer["to"], ALICE)
        self.assertEqual(self.states, [True])

    @defer.inlineCallbacks
    def test_reconnects_after_server_restart(self):
        server = FakeXMPPServer(self)
        service = self.service(server)
        yield service.whenConnected()
        events = self.events()
        port = server.portNumber
        yield server.stop()
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(service.connected)
        server.listen(port)
        yield service.whenConnected()
        answer = yield server.ask(slot_request("b.txt", "3"))
        self.assertEqual(answer["type"], "result")
        self.assertEqual(self.states, [True, False, True])
        texts = [e.get("log_format", "") for e in events]
        self.assertIn("XMPP component {jid} lost its connection; reconnecting", texts)

    @defer.inlineCallbacks
    def test_wrong_secret(self):
        """A refused handshake is logged with a hint (never the secret), and retried."""
        events = self.events()
        server = FakeXMPPServer(self)
        service = self.service(server, password="wrong-password-123")
        yield task.deferLater(reactor, 0.5, lambda: None)
        self.assertFalse(service.connected)
        refusals = [e for e in events if e.get("condition") == "not-authorized"]
        self.assertGreaterEqual(len(refusals), 2)  # retried
        # ... with the backoff growing, although every TCP connect succeeded.
        self.assertEqual(self.attempts, list(range(1, len(self.attempts) + 1)))
        self.assertIn("check ComponentSecret", refusals[0]["hint"])
        for event in events:
            self.assertNotIn("wrong-password-123", repr(event))
        yield service.stopService()
        self.assertEqual(self.states, [])

    @defer.inlineCallbacks
    def test_stop_closes_the_stream(self):
        server = FakeXMPPServer(self)
        service = self.service(server)
        yield service.whenConnected()
        ended = defer.Deferred()
        server.streams[0].addObserver(xmlstream.STREAM_END_EVENT, lambda _: ended.callback(None))
        yield service.stopService()
        yield ended
        self.assertEqual(server.footers, 1)
        self.assertFalse(service.connected)
        self.assertEqual(self.states, [True, False])

    @defer.inlineCallbacks
    def test_waiters_released_at_stop(self):
        """whenConnected() fails with CancelledError when the service stops before it connects."""
        service = self.service(free_port())  # nothing listens there
        waiting = service.whenConnected()
        yield task.deferLater(reactor, 0.1, lambda: None)
        yield service.stopService()
        yield self.assertFailure(waiting, defer.CancelledError)
        yield self.assertFailure(service.whenConnected(), defer.CancelledError)

    @defer.inlineCallbacks
    def test_silent_server(self):
        """A peer that accepts TCP but never speaks XMPP is dropped and retried."""
        from twisted.internet.protocol import Factory, Protocol

        connections = []

        class Silent(Protocol):
            def connectionMade(self):
                connections.append(self)

        listening = reactor.listenTCP(0, Factory.forProtocol(Silent), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        events = self.events()
        service = self.service(listening.getHost().port, handshakeTimeout=0.1)
        yield task.deferLater(reactor, 0.6, lambda: None)
        yield service.stopService()
        self.assertGreaterEqual(len(connections), 2)
        self.assertFalse(service.connected)
        self.assertTrue(any("no handshake" in e.get("log_format", "") for e in events))

    @defer.inlineCallbacks
    def test_keepalive(self):
        """Answered pings keep the link; an unanswered one drops it, and it reconnects."""
        server = FakeXMPPServer(self)
        service = self.service(server, pingInterval=0.05, pingTimeout=0.1)
        yield service.whenConnected()
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertGreaterEqual(server.pings, 3)
        self.assertEqual(self.states, [True])
        server.answerPings = False
        yield task.deferLater(reactor, 0.4, lambda: None)
        self.assertIn(False, self.states)
        server.answerPings = True
        yield service.whenConnected()
        self.assertEqual(self.states[-1], True)


# What the XMPP server sends a component before and after its handshake (XEP-0114).
STREAM_HEADER = (
    b"<stream:stream xmlns:stream='http://etherx.jabber.org/streams'"
    b" xmlns='jabber:component:accept' from='upload.example.org' id='s1'>"
)
COMPONENT_CONFIG = dict(
    component_jid="upload.example.org",
    component_secret="component-s3cr3t-on-a-clock",
    component_server="xmpp.example.org:5347",
    public_url="https://files.example.org/upload/",
)


class ComponentOnClock:
    """
    The component as tap.py builds it from a Config, on a MemoryReactorClock: each connection
    it opens gets a StringTransport, and the test speaks for the XMPP server.
    """

    RETRY = 1.0  # seconds before each reconnect

    def __init__(self, testCase, **config) -> None:
        self.config = Config(**{**COMPONENT_CONFIG, **config})
        server = MemoryServer(testCase.mktemp())
        self.clock = server.clock
        self.service = tap.component_service(
            self.config, SECRET, server.fs, self.clock, retryPolicy=lambda attempt: self.RETRY
        )
        self.states: list[bool] = []
        self.service._onConnected = self.states.append
        self.pings: list[str] = []  # ids of the pings sent on the current connection
        self.service.startService()
        testCase.addCleanup(lambda: self.service.running and self.service.stopService())

    @property
    def bound(self) -> float:
        """How long a silent link may last: what README promises, from the config."""
        return self.config.component_ping_interval + self.config.component_ping_timeout

    def connect(self, handshake: bytes = b"<handshake/>") -> None:
        """Accept the newest connection attempt and answer the handshake with handshake."""
        self.clock.advance(0)
        _, port, factory, _, _ = self.clock.tcpClients[-1]
        self.protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", port))
        self.transport = StringTransportWithDisconnection()
        self.transport.protocol = self.protocol
        self.protocol.makeConnection(self.transport)
        self.pings = []
        self.protocol.dataReceived(STREAM_HEADER)
        self.protocol.dataReceived(handshake)

    def sent_pings(self) -> list[str]:
        """The ids of every ping sent on this connection so far."""
        text = self.transport.value().decode("utf-8")
        return re.findall(r"<iq [^>]*id='(hmacfs-ping-[0-9a-f]+)'", text)

    def answer(self, ping_id: str) -> None:
        self.protocol.dataReceived(
            f"<iq type='result' id='{ping_id}' from='example.org'"
            f" to='upload.example.org'/>".encode()
        )

    @property
    def dropped(self) -> bool:
        return self.transport.disconnected


class KeepaliveOnClockTests(TestCase):
    """A link that stops answering is dropped within the bound the config sets, never later."""

    STEP = 0.25

    def run_for(self, link: ComponentOnClock, seconds: float, answer_after: float | None) -> None:
        """Advance the clock in steps; answer each new ping answer_after s later (None: never)."""
        due: list[tuple[float, str]] = []
        seen = set()
        for _ in range(round(seconds / self.STEP)):
            link.clock.advance(self.STEP)
            if link.dropped:
                return
            for ping_id in link.sent_pings():
                if ping_id not in seen and answer_after is not None:
                    seen.add(ping_id)
                    due.append((link.clock.seconds() + answer_after, ping_id))
            while due and due[0][0] <= link.clock.seconds():
                link.answer(due.pop(0)[1])
                self.last_answer = link.clock.seconds()

    def test_defaults_are_the_readme_bound(self) -> None:
        """By default a ping every 15 s with 15 s to answer: 30 s, as README says."""
        link = ComponentOnClock(self)
        self.assertEqual(
            (link.config.component_ping_interval, link.config.component_ping_timeout), (15, 15)
        )
        self.assertEqual(link.bound, 30)
        with open(README, encoding="utf-8") as f:
            readme = " ".join(f.read().split())
        for promise in (
            "within ``ComponentPingInterval`` + ``ComponentPingTimeout`` seconds of its last"
            " answer",
            f"That is {link.bound} s by default;",
        ):
            self.assertTrue(promise in readme, f"README does not say {promise!r}")

    def test_silent_link_dropped_at_the_bound(self) -> None:
        """Silent right after an answered ping: dropped interval + timeout later, then redialled."""
        for interval, timeout in ((15, 15), (5, 2), (2, 5), (60, 30)):
            link = ComponentOnClock(
                self, component_ping_interval=interval, component_ping_timeout=timeout
            )
            link.connect()
            self.assertEqual(link.states, [True])
            # Answered at once for a while: the last answer comes the moment its ping went out.
            self.run_for(link, 4 * interval, answer_after=0)
            self.assertFalse(link.dropped, (interval, timeout))
            pings = link.sent_pings()
            self.assertGreaterEqual(len(pings), 3)
            self.assertEqual(link.service.pongs, len(pings))
            # The last ping went out, and was answered, just now; from here on the XMPP
            # server says nothing.
            self.assertEqual(self.last_answer, link.clock.seconds())
            self.run_for(link, link.bound - self.STEP, None)
            self.assertFalse(link.dropped, (interval, timeout))
            self.assertTrue(link.service.connected)
            link.clock.advance(self.STEP)
            self.assertTrue(link.dropped, (interval, timeout))
            self.assertFalse(link.service.connected)
            self.assertEqual(link.states, [True, False])
            self.assertEqual(len(link.clock.tcpClients), 1)
            link.clock.advance(link.RETRY)
            self.assertEqual(len(link.clock.tcpClients), 2, "no reconnect")
            link.connect()
            self.assertEqual(link.states, [True, False, True])
            link.service.stopService()

    def test_answering_link_is_never_dropped(self) -> None:
        """However late within the timeout the answers come, a link that answers stays up."""
        for interval, timeout in ((15, 15), (5, 2), (2, 5)):
            for answer_after in (0, timeout / 2, timeout - self.STEP):
                link = ComponentOnClock(
                    self, component_ping_interval=interval, component_ping_timeout=timeout
                )
                link.connect()
                self.run_for(link, 50 * (interval + timeout), answer_after)
                self.assertFalse(link.dropped, (interval, timeout, answer_after))
                self.assertEqual(link.states, [True])
                self.assertGreaterEqual(link.service.pongs, 25)
                link.service.stopService()

    def test_late_answer_then_silence(self) -> None:
        """Silence after a late answer is still noticed within the bound of that answer."""
        link = ComponentOnClock(self, component_ping_interval=5, component_ping_timeout=8)
        link.connect()
        self.run_for(link, 40, answer_after=7)
        pongs = link.service.pongs
        self.run_for(link, link.bound + self.STEP, answer_after=None)
        self.assertEqual(link.service.pongs, pongs)
        self.assertTrue(link.dropped)
        silent = link.clock.seconds() - self.last_answer
        self.assertGreater(silent, link.config.component_ping_timeout)
        self.assertLessEqual(silent, link.bound)

    def test_no_pings_when_off(self) -> None:
        """ComponentPingInterval = 0 sends no pings and never drops a quiet link."""
        link = ComponentOnClock(self, component_ping_interval=0)
        link.connect()
        self.run_for(link, 3600, answer_after=None)
        self.assertEqual(link.sent_pings(), [])
        self.assertFalse(link.dropped)


class RefusalHintTests(TestCase):
    """A refused handshake is logged with what to check on both sides, never the secret."""

    def refused(self, condition: str) -> str:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        link = ComponentOnClock(self)
        link.connect(
            b"<stream:error><"
            + condition.encode()
            + b" xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>"
            b"</stream:error></stream:stream>"
        )
        self.assertFalse(link.service.connected)
        for event in events:
            self.assertNotIn(link.config.component_secret, repr(event))
            self.assertNotIn(link.config.component_secret, formatEvent(event))
        (refusal,) = [e for e in events if e.get("condition") == condition]
        return " ".join(formatEvent(refusal).split())

    def assertNamesServerConfig(self, text: str) -> None:
        # What the XMPP server's config must list, for both servers the README shows.
        self.assertIn('Prosody: Component "upload.example.org" with component_secret', text)
        self.assertIn(
            'ejabberd: listen: module ejabberd_service, hosts: "upload.example.org" with password',
            text,
        )

    def test_not_authorized(self) -> None:
        """not-authorized (a wrong secret, or at ejabberd an unknown JID) names both keys."""
        text = self.refused("not-authorized")
        self.assertIn("XMPP server refused component upload.example.org: not-authorized", text)
        self.assertIn("check ComponentSecret and ComponentJID", text)
        self.assertNamesServerConfig(text)

    def test_host_unknown(self) -> None:
        """host-unknown (Prosody's answer for an unknown JID) points at ComponentJID."""
        text = self.refused("host-unknown")
        self.assertIn("XMPP server refused component upload.example.org: host-unknown", text)
        self.assertIn("check ComponentJID", text)
        self.assertNamesServerConfig(text)
