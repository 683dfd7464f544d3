"""
Interop with a real XMPP server and a real XMPP client.

Prosody 0.12 (Debian's prosody and prosody-modules) issues the slots: mod_http_upload_external
with ``v1`` (``?v=``) and ``v2`` (``?v2=``), its own mod_http_file_share with JWT bearer tokens,
and hmacfs's own XEP-0114 component.  slixmpp's XEP-0363 plugin, in a subprocess
(tests/xmpp_client.py), asks for the slots and uploads with the URLs and headers it was given;
the test then downloads over HTTP and compares bytes, Content-Type and Content-Length.

Without Prosody these tests skip; CI installs it, and there a skip fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
from urllib.parse import unquote, urlsplit

from twisted.internet import defer, reactor, task, utils
from twisted.logger import Logger, formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from hmacd import tap
from hmacd.config import Config
from tests.servers import ProsodyServer, lua_string
from tests.support import SECRET, LoopbackServer, store_files

CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "xmpp_client.py")
COMPONENT_SECRET = "component-secret-0123"
MAX_SIZE = 4 * 1024 * 1024

# Name, size, type (None: the client guesses, and sends application/octet-stream if it can't).
FILES = [
    ("hello world.txt", 12, "text/plain"),
    ("naïve café ☕ 日本.jpg", 200_000, "image/jpeg"),
    ("a+b=c 100% sure;#?.pdf", 3_000_000, "application/pdf"),
    ("x" * 200 + ".ogg", 4096, "audio/ogg"),
    ("README", 1, None),
    ("empty.bin", 0, "application/octet-stream"),
]

# The services under test: (protocol, JID of the service that hands out its slots).
SERVICES = {
    "v": "v1.localhost",
    "v2": "v2.localhost",
    "jwt": "share.localhost",
    "component": "hmacfs.localhost",
}


log = Logger()


def content(name: str, size: int) -> bytes:
    seed = name.encode("utf-8")
    return (seed * (size // max(len(seed), 1) + 1))[:size]


class ProsodyInteropTests(TestCase):
    """One Prosody, one hmacfs (file server and component) and slixmpp per test."""

    timeout = 120

    @defer.inlineCallbacks
    def setUp(self):
        self.server = LoopbackServer(self, upload_max_size=MAX_SIZE)
        base = self.server.base + "/upload/"
        self.prosody = ProsodyServer(
            self,
            hosts={"localhost": {"alice": "alice-pw"}, "other.localhost": {"bob": "bob-pw"}},
            components=self.components(base),
        )
        self.config = config = Config(
            upload_max_size=MAX_SIZE,
            component_jid="hmacfs.localhost",
            component_secret=COMPONENT_SECRET,
            component_server=f"127.0.0.1:{self.prosody.component_port}",
            public_url=base,
        )
        self.component = tap.component_service(config, SECRET, self.server.fs, reactor)
        self.component.startService()
        self.addCleanup(self.component.stopService)
        yield self.connected()

    def components(self, base: str) -> str:
        secret = lua_string(SECRET)
        sections = []
        for protocol in ("v1", "v2"):
            sections.append(
                f'Component "{protocol}.localhost" "http_upload_external"\n'
                f"  http_upload_external_base_url = {lua_string(base)}\n"
                f"  http_upload_external_secret = {secret}\n"
                f'  http_upload_external_protocol = "{protocol}"\n'
                f"  http_upload_external_file_size_limit = {MAX_SIZE}\n"
            )
        sections.append(
            'Component "share.localhost" "http_file_share"\n'
            f"  http_file_share_base_url = {lua_string(base)}\n"
            f"  http_file_share_secret = {secret}\n"
            f"  http_file_share_size_limit = {MAX_SIZE}\n"
        )
        sections.append(
            f'Component "hmacfs.localhost"\n  component_secret = {lua_string(COMPONENT_SECRET)}\n'
        )
        return "".join(sections)

    def connected(self, seconds: float = 30):
        d = self.component.whenConnected()
        d.addTimeout(seconds, reactor)
        return d

    @defer.inlineCallbacks
    def xmpp(self, steps: list[dict], jid: str = "alice@localhost", password: str = "alice-pw"):
        """Run the slixmpp client on steps; its results, one per step."""
        plan = {
            "jid": jid,
            "password": password,
            "host": "127.0.0.1",
            "port": self.prosody.c2s_port,
            "steps": steps,
        }
        path = self.mktemp()
        with open(path, "w") as f:
            json.dump(plan, f)
        out, err, code = yield utils.getProcessOutputAndValue(
            sys.executable, [CLIENT, path], env=dict(os.environ)
        )
        if code != 0:
            self.fail(
                f"xmpp client exited {code}: {err.decode()[-3000:]}\n{self.prosody.log_tail()}"
            )
        defer.returnValue(json.loads(out))

    @defer.inlineCallbacks
    def upload_all(self, service: str):
        """Upload FILES through service with slixmpp's upload_file, then download each."""
        tmp = os.path.abspath(self.mktemp())
        os.makedirs(tmp)
        steps = []
        for i, (name, size, kind) in enumerate(FILES):
            path = os.path.join(tmp, str(i))
            with open(path, "wb") as f:
                f.write(content(name, size))
            steps.append(
                {
                    "op": "upload",
                    "service": service,
                    "path": path,
                    "filename": name,
                    "content_type": kind,
                }
            )
        results = yield self.xmpp(steps)
        for (name, size, kind), result in zip(FILES, results, strict=True):
            self.assertIn("get", result, f"{service} {name!r}: {result}")
            url = result["get"]
            self.assertEqual(unquote(urlsplit(url).path).rpartition("/")[2], name)
            response = yield self.server.http.get(url)
            body = yield response.content()
            self.assertEqual(response.code, 200, url)
            self.assertEqual(body, content(name, size), name)
            self.assertEqual(
                response.headers.getRawHeaders("content-type"),
                [kind or "application/octet-stream"],
                name,
            )
            # The client parses Content-Length into length (and drops the header).
            self.assertEqual(response.length, size, name)
        defer.returnValue(results)

    def test_v_slots(self):
        return self.upload_all(SERVICES["v"])

    def test_v2_slots(self):
        return self.upload_all(SERVICES["v2"])

    def test_jwt_slots(self):
        return self.upload_all(SERVICES["jwt"])

    def test_component_slots(self):
        return self.upload_all(SERVICES["component"])

    @defer.inlineCallbacks
    def test_refusals(self):
        """
        For every service: a slot for more bytes than are sent, a replayed PUT (409) and a
        tampered URL (403) leave nothing behind but the one good upload.
        """
        steps = []
        for service in SERVICES.values():
            for name, size in (("short.bin", 100), ("twice.bin", 10), ("tamper.bin", 10)):
                steps.append(
                    {
                        "op": "slot",
                        "service": service,
                        "filename": name,
                        "size": size,
                        "content_type": "application/octet-stream",
                    }
                )
        slots = yield self.xmpp(steps)
        http = self.server.http
        for i, protocol in enumerate(SERVICES):
            short, twice, tamper = slots[3 * i : 3 * i + 3]
            for slot in (short, twice, tamper):
                self.assertIn("put", slot, f"{protocol}: {slot}")

            def put(slot, body, url=None):
                headers = {"Content-Type": "application/octet-stream", **slot["headers"]}
                return http.put(url or slot["put"], body, headers=headers)

            # A slot for 100 bytes, 90 sent: the MAC does not cover that size (403); a token
            # names its filesize, so the body is simply the wrong one (400).
            response = yield put(short, b"s" * 90)
            self.assertEqual(response.code, 400 if protocol == "jwt" else 403, protocol)
            yield response.content()

            # A replay of a PUT that succeeded.
            response = yield put(twice, b"0123456789")
            self.assertEqual(response.code, 201, protocol)
            response = yield put(twice, b"9876543210")
            self.assertEqual(response.code, 409, protocol)
            yield response.content()
            body = yield (yield http.get(twice["get"])).content()
            self.assertEqual(body, b"0123456789", protocol)

            # The slot's URL with its file name changed: signed for another path.
            tampered = tamper["put"].replace("tamper.bin", "tamper.exe")
            response = yield put(tamper, b"0123456789", url=tampered)
            self.assertEqual(response.code, 403, protocol)
            yield response.content()
            if "?" in tamper["put"]:
                # ... and with one digit of the MAC changed.
                url, _, mac = tamper["put"].rpartition("=")
                flipped = f"{url}={'0' if mac[0] != '0' else '1'}{mac[1:]}"
                response = yield put(tamper, b"0123456789", url=flipped)
                self.assertEqual(response.code, 403, protocol)
                yield response.content()
        stored = [p for p in store_files(self.server.root) if p.endswith(".bin")]
        self.assertEqual(len(stored), len(SERVICES), stored)
        self.assertTrue(all(p.endswith("/twice.bin") for p in stored), stored)

    @defer.inlineCallbacks
    def test_component_discovery_and_refusals(self):
        """
        The component shows up in slixmpp's discovery with its limit; it refuses files over
        UploadMaxSize with file-too-large, bad names, and users of domains it does not serve.
        """
        results = yield self.xmpp(
            [
                {"op": "disco", "service": "hmacfs.localhost"},
                {
                    "op": "slot",
                    "service": "hmacfs.localhost",
                    "filename": "big",
                    "size": MAX_SIZE + 1,
                },
                {"op": "slot", "service": "hmacfs.localhost", "filename": ".htaccess", "size": 1},
                {
                    "op": "slot",
                    "service": "hmacfs.localhost",
                    "filename": "ok.txt",
                    "size": MAX_SIZE,
                },
            ]
        )
        disco, big, dotted, ok = results
        self.assertIn(["store", "file", "HTTP File Upload"], disco["identities"])
        self.assertIn("urn:xmpp:http:upload:0", disco["features"])
        self.assertEqual(disco["forms"]["urn:xmpp:http:upload:0"], {"max-file-size": str(MAX_SIZE)})
        self.assertEqual((big["error"], big["type"]), ("not-acceptable", "modify"))
        self.assertEqual(big["file-too-large"]["max-file-size"], str(MAX_SIZE))
        self.assertEqual(dotted["error"], "bad-request")
        self.assertTrue(ok["put"].startswith(self.server.base + "/upload/"), ok)

        (bob,) = yield self.xmpp(
            [{"op": "slot", "service": "hmacfs.localhost", "filename": "a", "size": 1}],
            jid="bob@other.localhost",
            password="bob-pw",
        )
        self.assertEqual((bob["error"], bob["type"]), ("forbidden", "auth"))

    @defer.inlineCallbacks
    def test_component_keepalive(self):
        """Prosody answers the component's keepalive pings, and the link stays up."""
        yield self.component.stopService()
        self.component = tap.component_service(
            self.config, SECRET, self.server.fs, reactor, pingInterval=0.1, pingTimeout=2
        )
        self.component.startService()
        self.addCleanup(self.component.stopService)
        yield self.connected()
        yield task.deferLater(reactor, 1, lambda: None)
        self.assertGreaterEqual(self.component.pongs, 5)
        self.assertTrue(self.component.connected)

    @defer.inlineCallbacks
    def test_component_notices_frozen_server(self):
        """Prosody frozen after a ping's answer: dropped within interval + timeout, back after."""
        # 1 s + 1 s here; HMACFS_FROZEN_PING="15,15" measures the defaults README quotes.
        interval, timeout = (int(n) for n in os.environ.get("HMACFS_FROZEN_PING", "1,1").split(","))
        yield self.component.stopService()
        config = dataclasses.replace(
            self.config, component_ping_interval=interval, component_ping_timeout=timeout
        )
        self.component = tap.component_service(config, SECRET, self.server.fs, reactor)
        self.component.startService()
        self.addCleanup(self.component.stopService)
        yield self.connected()
        pongs = self.component.pongs
        while self.component.pongs == pongs:
            yield task.deferLater(reactor, 0.005, lambda: None)
        pid = self.prosody.process.pid
        frozen = reactor.seconds()
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(lambda: self.prosody.process and os.kill(pid, signal.SIGCONT))
        while self.component.connected:
            yield task.deferLater(reactor, 0.01, lambda: None)
        silent = reactor.seconds() - frozen
        os.kill(pid, signal.SIGCONT)
        log.info(
            "Frozen Prosody noticed after {silent:.2f} s (ComponentPingInterval {interval},"
            " ComponentPingTimeout {timeout})",
            silent=silent,
            interval=interval,
            timeout=timeout,
        )
        self.assertGreater(silent, timeout)
        # The bound, plus what a busy test machine may add to the reactor's timers.
        self.assertLess(silent, interval + timeout + 1.0)
        yield self.connected(max(30, 2 * (interval + timeout)))
        self.assertTrue(self.component.connected)

    @defer.inlineCallbacks
    def test_component_unknown_jid(self):
        """Prosody's host-unknown for an unknown JID is logged with what to list, not the secret."""
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        config = dataclasses.replace(self.config, component_jid="unknown.localhost")
        refused = tap.component_service(config, SECRET, self.server.fs, reactor)
        refused.startService()
        self.addCleanup(refused.stopService)
        for _ in range(600):
            refusals = [
                e for e in events if e.get("condition") and e.get("jid") == config.component_jid
            ]
            if refusals:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(refused.connected)
        text = formatEvent(refusals[0])
        self.assertIn("refused component unknown.localhost: host-unknown", text)
        self.assertIn("check ComponentJID", text)
        self.assertIn('Prosody: Component "unknown.localhost" with component_secret', text)
        for event in events:
            self.assertNotIn(COMPONENT_SECRET, formatEvent(event))

    @defer.inlineCallbacks
    def test_component_reconnects(self):
        """Prosody restarts; the component comes back by itself and hands out slots again."""
        self.prosody.stop()
        for _ in range(100):
            if not self.component.connected:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(self.component.connected)
        self.prosody.start()
        yield self.connected()
        yield self.upload_all(SERVICES["component"])
