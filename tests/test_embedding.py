"""
The public API, and the two example programs: each starts, serves one
upload and its download, and stops.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

import hmacd
from tests.support import SECRET
from tests.test_tap import _accepts, _free_port, _http

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", os.path.join(REPO, "examples", name + ".py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PublicAPITests(SynchronousTestCase):
    def test_all_is_the_public_surface(self):
        """hmacd's public names are exactly __all__, and each of them exists."""
        public = {name for name in vars(hmacd) if not name.startswith("_")}
        modules = {name for name in public if type(getattr(hmacd, name)).__name__ == "module"}
        self.assertEqual(
            public - modules - {"annotations", "dataclasses", "os"}, set(hmacd.__all__)
        )
        for name in hmacd.__all__:
            self.assertTrue(hasattr(hmacd, name), name)

    def test_make_service_without_listener(self):
        """listen=False gives the services and the FileServer, no port of its own."""
        from twisted.application.internet import StreamServerEndpointService

        service = hmacd.make_service(
            hmacd.Config(store_dir=self.mktemp()), reactor, secret=SECRET, listen=False
        )
        self.assertIsInstance(service.fileServer, hmacd.FileServer)
        self.assertEqual([s for s in service if isinstance(s, StreamServerEndpointService)], [])

    def test_mount_needs_one_segment(self):
        """mount refuses an upload space at the root or several segments deep."""
        from twisted.web import resource, server

        for prefix in ("", "a/b"):
            fs = hmacd.FileServer(
                secret=SECRET,
                store_dir=self.mktemp(),
                reactor=reactor,
                metadata=None,
                prefix=prefix,
            )
            root = resource.Resource()
            self.assertRaises(ValueError, hmacd.mount, server.Site(root), root, fs)


def _signed_put(site, path: str, mac: str) -> bytes:
    """One signed v2 PUT through the host Site's own protocol; the raw answer."""
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4711))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 4711))
    channel.makeConnection(transport)
    channel.dataReceived(
        f"PUT /upload/{path}?v2={mac} HTTP/1.1\r\nHost: x\r\n".encode()
        + b"User-Agent: ua\x1b[2J\x9b\r\nContent-Type: text/plain\r\n"
        + b"Content-Length: 5\r\n\r\nhello"
    )
    return transport.value()


class HostSiteLogTests(SynchronousTestCase):
    """mount() keeps MACs and raw control bytes out of the host Site's access log."""

    def setUp(self) -> None:
        from twisted.internet.task import Clock
        from twisted.web import resource

        from tests.support import memory_metadata, synchronous

        self.clock = Clock()
        self.root = resource.Resource()
        self.fs = hmacd.FileServer(
            secret=SECRET,
            store_dir=self.mktemp(),
            reactor=self.clock,
            metadata=memory_metadata(self.clock),
            blocking=synchronous,
            prefix="upload",
        )
        os.makedirs(self.fs.store_dir)
        self.logPath = os.path.abspath(self.mktemp())

    def logged_put(self, site) -> str:
        """Mount into site, make one signed PUT, and give back its access log."""
        hmacd.mount(site, self.root, self.fs)
        site.startFactory()
        self.addCleanup(site.stopFactory)
        self.mac = hmacd.sign_v2(SECRET, "u/hello.txt", 5, "text/plain")
        answer = _signed_put(site, "u/hello.txt", self.mac)
        self.assertTrue(answer.startswith(b"HTTP/1.1 201 "), answer)
        site.stopFactory()
        with open(self.logPath, encoding="utf-8") as f:
            return f.read()

    def test_host_site_log_censored(self):
        """A plain host Site logs the signed PUT with <redacted>, never the MAC, one line."""
        from twisted.web import server

        log = self.logged_put(server.Site(self.root, logPath=self.logPath, reactor=self.clock))
        self.assertNotIn(self.mac, log)
        self.assertIn("PUT /upload/u/hello.txt?v2=<redacted> HTTP/1.1", log)
        [line] = log.splitlines()
        self.assertTrue(line.isprintable(), line)

    def test_host_formatter_kept_and_censored(self):
        """The host's own formatter still writes the line, given the censored request."""
        from twisted.web import server

        def formatter(timestamp, request):
            agent = request.getHeader(b"user-agent").decode("latin-1")
            return "host-format " + request.uri.decode("latin-1") + " " + agent

        site = server.Site(
            self.root, logPath=self.logPath, logFormatter=formatter, reactor=self.clock
        )
        log = self.logged_put(site)
        self.assertNotIn(self.mac, log)
        self.assertEqual(log, "host-format /upload/u/hello.txt?v2=<redacted> ua\\x1b[2J\\x9b\n")

    def test_mounting_twice_wraps_once(self):
        """The host's formatter is wrapped once, however often censor_access_log runs."""
        from twisted.web import http, server

        from hmacd.internals import log_formatter
        from hmacd.web import censor_access_log

        site = server.Site(self.root, logFormatter=http.proxiedLogFormatter)
        censor_access_log(site)
        self.assertIs(log_formatter(site).wrapped, http.proxiedLogFormatter)
        censor_access_log(site)
        self.assertIs(log_formatter(site).wrapped, http.proxiedLogFormatter)

    def test_site_with_own_log_refused(self):
        """A Site subclass that writes its log itself is refused, and left unchanged."""
        from twisted.web import server

        class Chatty(server.Site):
            def log(self, request):
                print(request.uri)

        site = Chatty(self.root)
        error = self.assertRaises(ValueError, hmacd.mount, site, self.root, self.fs)
        self.assertIn("log()", str(error))
        self.assertNotIn(b"upload", self.root.children)
        self.assertIsNot(site.requestFactory, __import__("hmacd.upload").upload.UploadRequest)

    def test_hmacfs_site_accepted(self):
        """HmacfsSite writes a censored log of its own: mount leaves it as it is."""
        from hmacd.internals import log_formatter
        from hmacd.web import HmacfsSite

        site = HmacfsSite(self.fs)
        formatter = log_formatter(site)
        hmacd.mount(site, self.root, self.fs)
        self.assertIs(log_formatter(site), formatter)


class WebAppExampleTests(TestCase):
    """examples/webapp.py: the host's page and hmacfs on one port."""

    @inlineCallbacks
    def test_in_process(self):
        """Built in this process: the host page, an upload under /upload/, its download."""
        webapp = load_example("webapp")
        port = _free_port()
        top, _ = webapp.build(reactor, port, self.mktemp(), secret=SECRET)
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        top.startService()
        self.addCleanup(top.stopService)
        status, body = yield deferToThread(_http, port, "GET", "/")
        self.assertEqual(
            (status, body), (200, b"the host application; files live under /upload/\n")
        )
        mac = hmacd.sign_v2(SECRET, "u/hello.txt", 5, "text/plain")
        status, _ = yield deferToThread(
            _http, port, "PUT", f"/upload/u/hello.txt?v2={mac}", b"hello",
            {"Content-Type": "text/plain"},
        )  # fmt: skip
        self.assertEqual(status, 201)
        self.assertEqual(
            (yield deferToThread(_http, port, "GET", "/upload/u/hello.txt")), (200, b"hello")
        )
        # The host Site's own access log (twisted.web's, into the global log).
        logged = [e["log_io"] for e in events if "/upload/u/hello.txt?" in e.get("log_io", "")]
        self.assertEqual(len(logged), 1, logged)
        self.assertNotIn(mac, logged[0])
        self.assertIn('"PUT /upload/u/hello.txt?v2=<redacted> HTTP/1.1" 201', logged[0])

    def test_as_a_program(self):
        """Run as its README says: starts, takes an upload, serves it, stops on SIGINT."""
        port = _free_port()
        store = os.path.abspath(self.mktemp())
        proc = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "examples", "webapp.py"), str(port), store],
            env=dict(os.environ, PYTHONPATH=REPO),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        deadline = time.monotonic() + 15
        while not _accepts(port):
            self.assertIsNone(proc.poll(), proc.stdout.read().decode() if proc.poll() else "")
            self.assertLess(time.monotonic(), deadline, "webapp example did not start")
            time.sleep(0.05)
        with open(os.path.join(store, ".hmacfs", "secret"), "rb") as f:
            secret = f.read().strip()
        mac = hmacd.sign_v(secret, "p/x.bin", 3)
        self.assertEqual(_http(port, "PUT", f"/upload/p/x.bin?v={mac}", b"abc")[0], 201)
        self.assertEqual(_http(port, "GET", "/upload/p/x.bin"), (200, b"abc"))
        proc.send_signal(signal.SIGINT)
        self.assertEqual(proc.wait(timeout=15), 0)


class SlotIssuerExampleTests(TestCase):
    """examples/slot_issuer.py: slots issued inside a Twisted program work on hmacfs."""

    @inlineCallbacks
    def test_issue_upload_fetch(self):
        """v2 and JWT slots from the issuer upload to a running hmacfs and download back."""
        issuer = load_example("slot_issuer")
        hmac_port = _free_port()
        files = hmacd.make_service(
            hmacd.Config(
                store_dir=self.mktemp(), listen_port=f"127.0.0.1:{hmac_port}", monitor_interval=0
            ),
            reactor,
            secret=SECRET,
        )
        files.startService()
        self.addCleanup(files.stopService)
        base = f"http://127.0.0.1:{hmac_port}/upload/"
        issuer_port = reactor.listenTCP(
            0, issuer.issuer_site(SECRET, base, reactor), interface="127.0.0.1"
        )
        self.addCleanup(issuer_port.stopListening)
        for jwt in ("", "&jwt=1"):
            status, body = yield deferToThread(
                _http, issuer_port.getHost().port, "GET",
                f"/slot?name=photo.jpg&size=4&type=image/jpeg{jwt}",
            )  # fmt: skip
            self.assertEqual(status, 200)
            slot = json.loads(body)
            target = slot["put"][len(f"http://127.0.0.1:{hmac_port}") :]
            headers = dict(slot["headers"], **{"Content-Type": "image/jpeg"})
            status, _ = yield deferToThread(
                _http, hmac_port, "PUT", target, b"\xff\xd8\xff\xe0", headers
            )
            self.assertEqual(status, 201, jwt)
            get = slot["get"][len(f"http://127.0.0.1:{hmac_port}") :]
            self.assertEqual(
                (yield deferToThread(_http, hmac_port, "GET", get)), (200, b"\xff\xd8\xff\xe0")
            )
        status, _ = yield deferToThread(
            _http, issuer_port.getHost().port, "GET", "/slot?name=../x&size=1"
        )
        self.assertEqual(status, 400)
