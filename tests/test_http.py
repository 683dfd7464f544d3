"""
Black-box tests of the HTTP face.  Statuses, headers and small bodies are checked on the
in-memory transport (raw bytes in, as sent: no client normalises the target); streaming,
sendfile, real time and what a real client does over loopback sockets (treq streams bodies
with FileBodyProducer, raw http.client sends what treq would normalise away) on real ones.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import time
import tracemalloc
from io import BytesIO
from urllib.parse import unquote

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import server
from twisted.web.client import FileBodyProducer, readBody
from twisted.web.resource import Resource
from twisted.web.static import Data

from hmacd import auth, internals
from hmacd.core import guess_type
from hmacd.web import ALLOWED_METHODS, POLICY_HEADERS, install_policy
from tests.memory_http import exchange
from tests.support import (
    SECRET,
    LoopbackServer,
    MemoryServer,
    load_vectors,
    store_files,
    strip_facts,
    v2_query,
    v_query,
)


def body_of(size: int, seed: str = "") -> bytes:
    """Deterministic, non-repeating bytes."""
    blocks = (hashlib.sha256(f"{seed}:{n}".encode()).digest() for n in range(size // 32 + 1))
    return b"".join(blocks)[:size]


def header(response, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


class RawResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.code, self.headers, self.body = status, headers, body


def raw_request(
    server: LoopbackServer, method: str, target: str, body: bytes = b"", headers=None
) -> RawResponse:
    """One request exactly as given (no client-side path normalisation); blocking."""
    conn = http.client.HTTPConnection(server.host, server.portNumber, timeout=10)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if method == "PUT" or body:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return RawResponse(
            response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        )
    finally:
        conn.close()


@inlineCallbacks
def upload_vectors(testCase, server: LoopbackServer, clock: Clock):
    """
    PUT every real XMPP slot to server and GET it back: 201, then the same
    bytes, type and length.  Fires the list of (store path, bytes, type).
    """
    vectors = load_vectors()
    testCase.assertEqual(len(vectors["vectors"]), 28)
    stored = []
    for n, vector in enumerate(vectors["vectors"]):
        clock.advance(vector["issued_at"] + 1 - clock.seconds())
        put_url = vector["put_url"].replace(vectors["base_url"], server.base + "/upload/")
        get_url = vector["get_url"].replace(vectors["base_url"], server.base + "/upload/")
        data = body_of(vector["size"], str(n))
        headers = dict(vector["put_headers"])
        if vector["content_type"] is not None:
            headers["Content-Type"] = vector["content_type"]
        response = yield server.http.put(
            put_url, data=FileBodyProducer(BytesIO(data)), headers=headers
        )
        yield readBody(response)
        testCase.assertEqual(response.code, 201, (vector["issuer"], vector["filename"]))

        response = yield server.http.get(get_url)
        got = yield readBody(response)
        testCase.assertEqual(got, data)
        if vector["content_type"] is not None:
            expected = vector["content_type"]
        elif vector["issuer"] in ("v1", "ejabberd"):
            expected = guess_type(vector["filename"])
        else:
            expected = auth.DEFAULT_CONTENT_TYPE
        testCase.assertEqual(header(response, "Content-Type"), expected, vector["filename"])
        testCase.assertEqual(response.length, vector["size"])
        testCase.assertEqual(header(response, "ETag"), f'"{hashlib.sha256(data).hexdigest()[:32]}"')
        path = unquote(get_url.split("/upload/", 1)[1])
        stored.append((path, data, expected))
    return stored


class VectorTests(TestCase):
    """Every slot issued by real Prosody and ejabberd servers uploads and downloads."""

    def test_all_vectors(self):
        """Each vector's PUT is 201; GET returns the bytes, type and length it was given."""
        vectors = load_vectors()
        clock = Clock()
        server = LoopbackServer(self, secret=vectors["secret"].encode("utf-8"), clock=clock)
        return upload_vectors(self, server, clock)

    @inlineCallbacks
    def test_tampered_vectors_refused(self):
        """A changed path, size or type in a real slot is refused and stores nothing."""
        vectors = load_vectors()
        clock = Clock()
        server = LoopbackServer(self, secret=vectors["secret"].encode("utf-8"), clock=clock)
        for vector in vectors["vectors"]:
            if vector["filename"] != "photo.jpg":
                continue
            clock.advance(vector["issued_at"] + 1 - clock.seconds())
            put_url = vector["put_url"].replace(vectors["base_url"], server.base + "/upload/")
            headers = dict(vector["put_headers"], **{"Content-Type": "image/jpeg"})
            attempts = [
                (put_url.replace("photo.jpg", "photo.jpeg"), vector["size"], headers),
                (put_url, vector["size"] + 1, headers),
            ]
            if vector["issuer"] == "v2":
                attempts.append(
                    (put_url, vector["size"], dict(headers, **{"Content-Type": "image/png"}))
                )
            for url, size, hdrs in attempts:
                response = yield server.http.put(
                    url, data=FileBodyProducer(BytesIO(b"x" * size)), headers=hdrs
                )
                yield readBody(response)
                self.assertIn(response.code, (403, 413), (vector["issuer"], url, size))
        self.assertEqual(store_files(server.root), [])


class StatusTests(SynchronousTestCase):
    """Every verdict, on the in-memory transport; refused requests leave the store untouched."""

    def setUp(self):
        self.root = self.mktemp()
        self.server = MemoryServer(self.root, upload_max_size=1000)

    def raw(self, method, target, body=b"", headers=None):
        return exchange(self.server, method, target, body, headers)

    def test_refusals(self):
        """Each bad PUT gets its status and writes nothing."""
        ok = v_query("a/b.txt", 3)
        cases = [
            ("/upload/a/b.txt?" + v_query("a/b.txt", 4), b"abc", {}, 403),
            ("/upload/a/b.txt?v=" + "0" * 64, b"abc", {}, 403),
            ("/upload/a/b.txt?v=zz", b"abc", {}, 403),
            ("/upload/a/b.txt", b"abc", {}, 401),
            ("/upload/a/b.txt", b"abc", {"Authorization": "Bearer not.a.jwt"}, 403),
            ("/upload/a/b.txt", b"abc", {"Authorization": "Basic dXNlcjpwdw=="}, 401),
            ("/upload/big.bin?" + v_query("big.bin", 1001), b"x" * 1001, {}, 413),
            ("/upload/a/../b.txt?" + v_query("a/../b.txt", 3), b"abc", {}, 400),
            ("/upload/a/%2e%2e/b.txt?" + v_query("a/../b.txt", 3), b"abc", {}, 400),
            ("/upload/.hmacfs/secret?" + v_query(".hmacfs/secret", 3), b"abc", {}, 400),
            ("/upload/a//b.txt?" + v_query("a//b.txt", 3), b"abc", {}, 400),
            ("/upload/a%00b?" + v_query("a\x00b", 3), b"abc", {}, 400),
            ("/upload/a%5cb?" + v_query("a\\b", 3), b"abc", {}, 400),
            ("/upload/%ff?" + ok, b"abc", {}, 400),
            ("/other/a/b.txt?" + ok, b"abc", {}, 404),
        ]
        for target, body, headers, code in cases:
            response = self.raw("PUT", target, body, headers)
            self.assertEqual(response.code, code, target)
            self.assertEqual(response.headers.get("access-control-allow-origin"), "*", target)
        self.assertEqual(store_files(self.root), [])

    def test_chunked_hmac_upload_length_required(self):
        """A chunked v PUT (no Content-Length) is 411 and stores nothing."""
        response = exchange(
            self.server, "PUT", "/upload/c.bin?" + v_query("c.bin", 6), chunks=[b"abc", b"def"]
        )
        self.assertEqual(response.code, 411)
        self.assertEqual(store_files(self.root), [])

    def test_conflict_keeps_original(self):
        """A second PUT of the same name is 409 and the first file stays intact."""
        target = "/upload/c.txt?" + v_query("c.txt", 3)
        first = self.raw("PUT", target, b"one")
        second = self.raw("PUT", target, b"two")
        self.assertEqual((first.code, second.code), (201, 409))
        with open(os.path.join(self.root, "c.txt"), "rb") as f:
            self.assertEqual(f.read(), b"one")

    def test_method_not_allowed(self):
        """DELETE and POST get 405 with Allow."""
        for method in ("DELETE", "POST", "PATCH"):
            response = self.raw(method, "/upload/a.txt")
            self.assertEqual(response.code, 405)
            self.assertEqual(response.headers["allow"], "OPTIONS, HEAD, GET, PUT")

    def test_preflight(self):
        """A CORS preflight is 200 with the allowed methods, headers and max-age."""
        response = self.raw(
            "OPTIONS",
            "/upload/x/y.png",
            headers={
                "Origin": "https://chat.example",
                "Access-Control-Request-Method": "PUT",
                "Access-Control-Request-Headers": "content-type",
            },
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(
            {k: v for k, v in response.headers.items() if k.startswith("access-control-")},
            {
                "access-control-allow-origin": "*",
                "access-control-allow-methods": "OPTIONS, HEAD, GET, PUT",
                "access-control-allow-headers": "Authorization, Content-Type",
                "access-control-max-age": "7200",
            },
        )

    def test_nothing_internal_served(self):
        """Dot paths, directories, temp files and paths outside the prefix are 404."""
        self.raw("PUT", "/upload/d/f.txt?" + v_query("d/f.txt", 3), b"abc")
        os.makedirs(os.path.join(self.root, ".hmacfs"), exist_ok=True)
        with open(os.path.join(self.root, ".hmacfs", "secret"), "w") as f:
            f.write("s3cret")
        with open(os.path.join(self.root, "d", ".hmacfs-0123.part"), "w") as f:
            f.write("partial")
        for target in (
            "/upload/.hmacfs/secret",
            "/upload/%2ehmacfs/secret",
            "/upload/d/.hmacfs-0123.part",
            "/upload/d",
            "/upload/d/",
            "/upload/",
            "/upload",
            "/",
            "/upload/d/../.hmacfs/secret",
            "/upload/missing.txt",
        ):
            for method in ("GET", "HEAD"):
                response = self.raw(method, target)
                self.assertEqual(response.code, 404, (method, target))
                self.assertNotIn(b"s3cret", response.body)
                self.assertNotIn(b"partial", response.body)

    def test_symlink_out_of_store_not_served(self):
        """A symlink inside the store that leads outside it is never followed."""
        outside = os.path.abspath(self.mktemp())
        os.makedirs(outside)
        with open(os.path.join(outside, "passwd"), "w") as f:
            f.write("root:x:0:0")
        os.symlink(outside, os.path.join(self.root, "link"))
        response = self.raw("GET", "/upload/link/passwd")
        self.assertEqual(response.code, 404)
        put = self.raw("PUT", "/upload/link/new?" + v_query("link/new", 3), b"abc")
        self.assertEqual(put.code, 400)
        self.assertEqual(os.listdir(outside), ["passwd"])


class DownloadTests(SynchronousTestCase):
    """GET/HEAD/Range/conditional matrix on a stored file, on the in-memory transport."""

    def setUp(self):
        self.root = self.mktemp()
        self.server = MemoryServer(self.root)
        self.data = body_of(1000, "dl")
        response = exchange(
            self.server,
            "PUT",
            "/upload/f/pic.png?" + v2_query("f/pic.png", 1000, "image/png"),
            self.data,
            {"Content-Type": "image/png"},
        )
        self.assertEqual(response.code, 201)
        full = self.get()
        self.etag = full.headers["etag"]
        self.lastModified = full.headers["last-modified"]

    def get(self, headers=None, method="GET", target="/upload/f/pic.png"):
        return exchange(self.server, method, target, b"", headers)

    def test_full_get(self):
        """A plain GET has the bytes, the signed type, validators and the security headers."""
        response = self.get()
        self.assertEqual(response.code, 200)
        self.assertEqual(response.body, self.data)
        h = response.headers
        self.assertEqual(h["content-type"], "image/png")
        self.assertEqual(h["content-length"], "1000")
        self.assertEqual(h["accept-ranges"], "bytes")
        self.assertEqual(h["x-content-type-options"], "nosniff")
        self.assertEqual(h["content-security-policy"], "default-src 'none'; frame-ancestors 'none'")
        self.assertEqual(h["access-control-allow-origin"], "*")
        self.assertNotIn("content-disposition", h)
        self.assertEqual(self.etag, f'"{hashlib.sha256(self.data).hexdigest()[:32]}"')

    def test_head(self):
        """HEAD gives GET's headers and no body."""
        response = self.get(method="HEAD")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.body, b"")
        self.assertEqual(response.headers["content-length"], "1000")
        self.assertEqual(response.headers["etag"], self.etag)

    def test_ranges(self):
        """Single ranges give 206 with Content-Range; past the end 416; several ranges 200."""
        cases = [
            ("bytes=0-9", 206, (0, 10), "bytes 0-9/1000"),
            ("bytes=990-", 206, (990, 1000), "bytes 990-999/1000"),
            ("bytes=-5", 206, (995, 1000), "bytes 995-999/1000"),
            ("bytes=500-5000", 206, (500, 1000), "bytes 500-999/1000"),
            ("bytes=1000-", 416, None, "bytes */1000"),
            ("bytes=0-1,5-6", 200, (0, 1000), None),
            ("bytes=oops", 200, (0, 1000), None),
        ]
        for value, code, span, contentRange in cases:
            response = self.get({"Range": value})
            self.assertEqual(response.code, code, value)
            self.assertEqual(response.headers.get("content-range"), contentRange, value)
            if span is not None:
                self.assertEqual(response.body, self.data[span[0] : span[1]], value)
                self.assertEqual(response.headers["content-length"], str(span[1] - span[0]))

    def test_if_range(self):
        """If-Range with our ETag or date honours the Range; anything else gets the whole file."""
        for value, code in (
            (self.etag, 206),
            (self.lastModified, 206),
            ('"other"', 200),
            ("W/" + self.etag, 200),
            ("Thu, 01 Jan 1970 00:00:00 GMT", 200),
        ):
            response = self.get({"Range": "bytes=0-9", "If-Range": value})
            self.assertEqual(response.code, code, value)

    def test_conditional(self):
        """If-None-Match and If-Modified-Since give 304 without a body."""
        for headers, code in (
            ({"If-None-Match": self.etag}, 304),
            ({"If-None-Match": '"a", ' + self.etag}, 304),
            ({"If-None-Match": "*"}, 304),
            ({"If-None-Match": '"other"'}, 200),
            ({"If-Modified-Since": self.lastModified}, 304),
            ({"If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"}, 200),
            ({"If-None-Match": '"other"', "If-Modified-Since": self.lastModified}, 200),
        ):
            for method in ("GET", "HEAD"):
                response = self.get(headers, method=method)
                self.assertEqual(response.code, code, (method, headers))
                if code == 304:
                    self.assertEqual(response.body, b"")
                    self.assertEqual(response.headers["etag"], self.etag)

    def test_attachment_types(self):
        """Types a browser could run are served as attachments; media and text/plain inline."""
        for name, ctype, attachment in (
            ("page.html", "text/html", True),
            ("doc.pdf", "application/pdf", True),
            ("clip.mp4", "video/mp4", False),
            ("note.txt", "text/plain; charset=utf-8", False),
        ):
            put = exchange(
                self.server,
                "PUT",
                "/upload/t/" + name + "?" + v2_query("t/" + name, 4, ctype),
                b"<b/>",
                {"Content-Type": ctype},
            )
            self.assertEqual(put.code, 201)
            response = self.get(target="/upload/t/" + name)
            self.assertEqual(response.headers["content-type"], ctype)
            if attachment:
                self.assertEqual(
                    response.headers["content-disposition"], "attachment; filename*=UTF-8''" + name
                )
            else:
                self.assertNotIn("content-disposition", response.headers)

    def test_file_without_record(self):
        """A file placed in the store by hand is served with a guessed type and a weak ETag."""
        with open(os.path.join(self.root, "f", "manual.pdf"), "wb") as f:
            f.write(b"%PDF-")
        response = self.get(target="/upload/f/manual.pdf")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.body, b"%PDF-")
        self.assertEqual(response.headers["content-type"], "application/pdf")
        self.assertTrue(response.headers["etag"].startswith('W/"'))
        self.assertEqual(
            response.headers["content-disposition"], "attachment; filename*=UTF-8''manual.pdf"
        )


class _HostSite:
    """A host application's own Site on the in-memory transport, its root holding a page."""

    def __init__(self, backend: MemoryServer) -> None:
        self.clock = backend.clock
        self.root = Resource()
        self.root.putChild(b"", Data(b"host page", "text/plain"))
        self.site = server.Site(self.root, reactor=self.clock)

    def connect(self):
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 4711))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 4711))
        channel.makeConnection(transport)
        return channel, transport


class InstallPolicyTests(SynchronousTestCase):
    """install_policy gives a host's own Site the policy of HmacfsSite, in one call."""

    def setUp(self):
        self.root = self.mktemp()
        self.backend = MemoryServer(self.root)
        self.host = _HostSite(self.backend)
        install_policy(self.host.site, self.host.root, self.backend.fs)

    def test_every_answer_carries_the_policy(self):
        """Uploads, downloads, refusals and the host's own page all carry CORS and nosniff."""
        put = exchange(self.host, "PUT", "/upload/p.txt?" + v_query("p.txt", 2), b"hi")
        self.assertEqual(put.code, 201)
        get = exchange(self.host, "GET", "/upload/p.txt")
        self.assertEqual((get.code, get.body), (200, b"hi"))
        self.assertEqual(
            get.headers["content-security-policy"], "default-src 'none'; frame-ancestors 'none'"
        )
        refused = exchange(self.host, "DELETE", "/upload/p.txt")
        self.assertEqual(refused.code, 405)
        self.assertEqual(refused.headers["allow"], "OPTIONS, HEAD, GET, PUT")
        page = exchange(self.host, "GET", "/")
        self.assertEqual((page.code, page.body), (200, b"host page"))
        for response in (put, get, refused, page):
            self.assertEqual(response.headers["access-control-allow-origin"], "*")
            self.assertEqual(response.headers["x-content-type-options"], "nosniff")

    def test_access_log_censored(self):
        """The host's access-log formatter is wrapped by the censoring one."""
        formatter = internals.log_formatter(self.host.site)
        self.assertTrue(getattr(formatter, "censorsMACs", False))

    def test_bad_prefix_changes_nothing(self):
        """UploadSubDir of two segments is refused, the host Site and root left as they were."""
        fs = MemoryServer(self.mktemp(), prefix="a/b").fs
        host = _HostSite(self.backend)
        factory, formatter = host.site.requestFactory, internals.log_formatter(host.site)
        self.assertRaises(ValueError, install_policy, host.site, host.root, fs)
        self.assertEqual(host.root.children.keys(), {b""})
        self.assertIs(host.site.requestFactory, factory)
        self.assertIs(internals.log_formatter(host.site), formatter)
        self.assertFalse(hasattr(host.site, "fileServer"))

    def test_upload_module_reexports_the_policy(self):
        """Until upload.py imports it from web.py itself, its names are web.py's objects."""
        from hmacd import upload

        self.assertIs(upload.ALLOWED_METHODS, ALLOWED_METHODS)
        self.assertIs(upload.POLICY_HEADERS, POLICY_HEADERS)


class UnicodeNameTests(TestCase):
    """A name treq encodes itself, over a real socket: the client's quoting is the point."""

    def setUp(self):
        self.server = LoopbackServer(self)

    @inlineCallbacks
    def test_unicode_name_roundtrip(self):
        """A name with spaces and non-ASCII is served under its encoded URL."""
        name = "dir/hällo wörld 日本.png"
        response = yield self.server.http.put(
            self.server.url(name, v_query(name, 4)),
            data=FileBodyProducer(BytesIO(b"\x89PNG")),
            headers={"Content-Type": "image/png"},
        )
        yield readBody(response)
        self.assertEqual(response.code, 201)
        response = yield self.server.http.get(self.server.url(name))
        self.assertEqual((yield readBody(response)), b"\x89PNG")


class StreamingTests(TestCase):
    """Large bodies, broken connections and races over real sockets."""

    timeout = 300

    @inlineCallbacks
    def test_many_slow_uploads_memory_flat(self):
        """
        200 uploads half-way through their bodies hold no more than a small write buffer
        each (with a 1 MiB ChunkSize each held its half-filled 1 MiB buffer).
        """
        server = LoopbackServer(self, chunk_size=1 << 20)
        count, size, sent = 200, 1 << 20, 512 * 1024
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        before, _ = tracemalloc.get_traced_memory()
        sockets = []

        def send_halves():
            for i in range(count):
                s = socket.create_connection((server.host, server.portNumber))
                sockets.append(s)
                target = server.url(f"slow/{i}.bin", v_query(f"slow/{i}.bin", size))
                path = target[len(server.base) :]
                s.sendall(
                    f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode()
                )
                s.sendall(b"s" * sent)

        yield deferToThread(send_halves)
        self.addCleanup(lambda: [s.close() for s in sockets])

        def received():
            return sum(r._upload.received for r in server.fs.uploads if r._upload is not None)

        for _ in range(100):  # until the server has read what was sent
            if received() >= count * sent:
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(received(), count * sent)
        now, _ = tracemalloc.get_traced_memory()
        growth = now - before
        self.assertLess(growth, 32 * 1024 * 1024, f"{growth / 2**20:.1f} MiB for {count} uploads")

    @inlineCallbacks
    def test_200mib_upload_memory_flat(self):
        """A 200 MiB upload streams through with Python memory far below the file size."""
        server = LoopbackServer(self)
        size = 200 * 1024 * 1024
        source = self.mktemp()
        block = body_of(1 << 20, "big")
        digest = hashlib.sha256()
        with open(source, "wb") as f:
            for n in range(200):
                chunk = block[n:] + block[:n]
                f.write(chunk)
                digest.update(chunk)
        tracemalloc.start()
        self.addCleanup(tracemalloc.stop)
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()
        with open(source, "rb") as f:
            response = yield server.http.put(
                server.url("big.bin", v_query("big.bin", size)), data=FileBodyProducer(f)
            )
            yield readBody(response)
        _, peak = tracemalloc.get_traced_memory()
        self.assertEqual(response.code, 201)
        growth = peak - before
        self.assertLess(growth, 16 * 1024 * 1024, f"peak grew {growth / 2**20:.1f} MiB")
        with open(os.path.join(server.root, "big.bin"), "rb") as f:
            stored = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                stored.update(chunk)
        self.assertEqual(stored.hexdigest(), digest.hexdigest())

    @inlineCallbacks
    def test_disconnect_mid_upload(self):
        """A client that vanishes mid-body leaves nothing; the same URL then works."""
        server = LoopbackServer(self)
        target = "/upload/m/v.bin?" + v_query("m/v.bin", 100_000)

        def sendHalf():
            with socket.create_connection((server.host, server.portNumber)) as s:
                s.sendall(
                    f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n".encode()
                    + b"x" * 50_000
                )
                time.sleep(0.2)

        yield deferToThread(sendHalf)
        for _ in range(100):
            if store_files(server.root) == []:
                break
            yield deferLater(reactor, 0.02, lambda: None)
        self.assertEqual(store_files(server.root), [])
        response = yield deferToThread(raw_request, server, "PUT", target, b"y" * 100_000)
        self.assertEqual(response.code, 201)
        self.assertEqual(store_files(server.root), ["m", "m/v.bin"])

    @inlineCallbacks
    def test_concurrent_puts_one_winner(self):
        """Concurrent PUTs of one name: exactly one 201, the rest 409, the file intact."""
        server = LoopbackServer(self)
        size = 256 * 1024
        bodies = [body_of(size, str(n)) for n in range(6)]
        url = server.url("race.bin", v_query("race.bin", size))

        def put(body):
            d = server.http.put(url, data=FileBodyProducer(BytesIO(body)))
            d.addCallback(lambda r: readBody(r).addCallback(lambda _: r.code))
            return d

        codes = yield gatherResults([put(b) for b in bodies])
        self.assertEqual(sorted(codes), [201] + [409] * 5)
        with open(os.path.join(server.root, "race.bin"), "rb") as f:
            self.assertEqual(f.read(), bodies[codes.index(201)])
        self.assertEqual(store_files(server.root), ["race.bin"])


class RootPrefixTests(SynchronousTestCase):
    """UploadSubDir = "" serves the upload space from /."""

    def test_upload_and_get_at_root(self):
        """With an empty prefix, /<path> is the upload and download URL."""
        server = MemoryServer(self.mktemp(), prefix="")
        put = exchange(server, "PUT", "/a/b.txt?" + v_query("a/b.txt", 2), b"hi")
        self.assertEqual(put.code, 201)
        get = exchange(server, "GET", "/a/b.txt")
        self.assertEqual((get.code, get.body), (200, b"hi"))
        root = exchange(server, "GET", "/")
        self.assertEqual(root.code, 404)


class ProtocolRoundTripTests(TestCase):
    """A URL signed by each protocol's sign_* function uploads and downloads byte-identical."""

    @inlineCallbacks
    def test_each_protocol(self):
        """v, v2, token and a JWT bearer token each store and serve the same bytes."""
        clock = Clock()
        clock.advance(1_800_000_000)
        server = LoopbackServer(self, clock=clock)
        data = body_of(5000, "rt")
        jwt = auth.sign_jwt(
            SECRET,
            slot="s1",
            filename="j.ogg",
            filesize=len(data),
            filetype="audio/ogg",
            exp=1_800_000_300,
        )
        cases = [
            ("p/v.ogg", "v=" + auth.sign_v(SECRET, "p/v.ogg", 5000), {}),
            ("p/v2.ogg", "v2=" + auth.sign_v2(SECRET, "p/v2.ogg", 5000, "audio/ogg"), {}),
            ("p/t.ogg", "token=" + auth.sign_token(SECRET, "p/t.ogg", 5000, "audio/ogg"), {}),
            ("s1/j.ogg", "", {"Authorization": f"Bearer {jwt}"}),
        ]
        for path, query, headers in cases:
            response = yield server.http.put(
                server.url(path, query),
                data=FileBodyProducer(BytesIO(data)),
                headers=dict(headers, **{"Content-Type": "audio/ogg"}),
            )
            yield readBody(response)
            self.assertEqual(response.code, 201, path)
            response = yield server.http.get(server.url(path))
            self.assertEqual((yield readBody(response)), data, path)
            self.assertEqual(header(response, "Content-Type"), "audio/ogg", path)


class StalledDownloadTests(TestCase):
    """A client that stops reading a download is dropped after the idle timeout."""

    @inlineCallbacks
    def test_stalled_reader_dropped(self):
        """The server aborts a GET whose client reads nothing, instead of holding it forever."""
        server = LoopbackServer(self)
        server.site.timeOut = 1
        size = 16 * 1024 * 1024
        with open(os.path.join(server.root, "large.bin"), "wb") as f:
            f.write(b"\0" * size)

        def stall():
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect((server.host, server.portNumber))
            s.sendall(b"GET /upload/large.bin HTTP/1.1\r\nHost: x\r\n\r\n")
            time.sleep(3)
            received = 0
            s.settimeout(5)
            try:
                while chunk := s.recv(65536):
                    received += len(chunk)
            except (ConnectionResetError, TimeoutError):
                pass
            finally:
                s.close()
            return received

        received = yield deferToThread(stall)
        self.assertLess(received, size)


class H2Tests(TestCase):
    def test_only_http11_offered(self):
        """ALPN never offers h2: the streaming upload needs HTTP/1.1 semantics."""
        server = LoopbackServer(self)
        self.assertEqual(server.site.acceptableProtocols(), [b"http/1.1"])


class DownloadPathTests(TestCase):
    """How bytes leave: sendfile for large files, one write for small ones, a record cache."""

    def setUp(self) -> None:
        self.server = LoopbackServer(self)
        self.sent: list[int] = []
        real = os.sendfile

        def spy(out_fd, in_fd, offset, count):
            n = real(out_fd, in_fd, offset, count)
            self.sent.append(n)
            return n

        self.patch(os, "sendfile", spy)

    @inlineCallbacks
    def put(self, name: str, data: bytes, content_type: str = "application/octet-stream"):
        response = yield self.server.http.put(
            self.server.url(name, v2_query(name, len(data), content_type)),
            data,
            headers={"Content-Type": content_type},
        )
        self.assertEqual(response.code, 201)
        yield readBody(response)

    @inlineCallbacks
    def test_large_by_sendfile(self):
        """A large GET arrives intact, most of it by sendfile; so does a Range from its middle."""
        data = body_of(24 * 1024 * 1024, "large")
        yield self.put("large.bin", data)
        response = yield self.server.http.get(self.server.url("large.bin"))
        self.assertEqual((yield readBody(response)), data)
        self.assertGreater(sum(self.sent), len(data) // 2)
        self.sent.clear()
        response = yield self.server.http.get(
            self.server.url("large.bin"), headers={"Range": "bytes=1000001-5000000"}
        )
        self.assertEqual(response.code, 206)
        self.assertEqual((yield readBody(response)), data[1000001:5000001])

    @inlineCallbacks
    def test_slow_reader_gets_every_byte(self):
        """Flow control holds with sendfile: a reader that lags gets the bytes, in order."""
        data = body_of(6 * 1024 * 1024, "slow")
        yield self.put("slow.bin", data)

        def read_slowly():
            s = socket.create_connection((self.server.host, self.server.portNumber))
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            s.sendall(b"GET /upload/slow.bin HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            received = []
            with s:
                while chunk := s.recv(65536):
                    received.append(chunk)
                    if len(received) % 16 == 0:
                        time.sleep(0.01)
            return b"".join(received)

        raw = yield deferToThread(read_slowly)
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200 "), head[:100])
        self.assertEqual(body, data)

    @inlineCallbacks
    def test_small_in_one_write(self):
        """A small file is one write: no sendfile, no producer."""
        yield self.put("small.txt", b"hello there", "text/plain")
        response = yield self.server.http.get(self.server.url("small.txt"))
        self.assertEqual((yield readBody(response)), b"hello there")
        self.assertEqual(self.sent, [])

    @inlineCallbacks
    def test_record_cache(self):
        """
        The record is looked up once per file; a name deleted and uploaded again (a new
        inode) is looked up afresh, so its new type is served.
        """
        lookups = []
        store = self.server.fs.metadata
        real_get = store.get
        self.patch(store, "get", lambda path: (lookups.append(path), real_get(path))[1])
        yield self.put("doc.txt", b"first", "text/plain")
        strip_facts(os.path.join(self.server.root, "doc.txt"))  # as uploaded by 0.x
        for _ in range(3):
            response = yield self.server.http.get(self.server.url("doc.txt"))
            yield readBody(response)
            self.assertEqual(header(response, "Content-Type"), "text/plain")
        self.assertEqual(lookups, ["doc.txt"])
        os.unlink(os.path.join(self.server.root, "doc.txt"))
        yield store.delete("doc.txt")
        yield self.put("doc.txt", b"second", "image/png")
        strip_facts(os.path.join(self.server.root, "doc.txt"))
        response = yield self.server.http.get(self.server.url("doc.txt"))
        self.assertEqual((yield readBody(response)), b"second")
        self.assertEqual(header(response, "Content-Type"), "image/png")
        self.assertEqual(lookups, ["doc.txt", "doc.txt"])


class ClientGoneTests(SynchronousTestCase):
    """A download whose client leaves early, on the in-memory transport: no real time."""

    def test_client_gone_during_lookup(self):
        """A client that leaves while the record is looked up costs nothing but the lookup."""
        root = self.mktemp()
        server = MemoryServer(root)
        octets = "application/octet-stream"
        put = exchange(
            server,
            "PUT",
            "/upload/wait.bin?" + v2_query("wait.bin", 10, octets),
            b"x" * 10,
            {"Content-Type": octets},
        )
        self.assertEqual(put.code, 201)
        strip_facts(os.path.join(root, "wait.bin"))
        pending: Deferred = Deferred()
        store = server.fs.metadata
        self.patch(store, "get", lambda path: pending)
        channel, transport = server.connect()
        channel.dataReceived(b"GET /upload/wait.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        channel.connectionLost(Failure(ConnectionDone()))
        record = self.successResultOf(store.__class__.get(store, "wait.bin"))
        pending.callback(record)
        self.assertEqual(self.flushLoggedErrors(), [])
        self.assertEqual(transport.value(), b"")
