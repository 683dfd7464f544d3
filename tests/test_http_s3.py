"""
A file server with its files in an object store (StorageBackend = "s3"), over real HTTP
against a real SeaweedFS: the same answers as from the local directory (the same requests
sent to both, compared), 409, 410, resumable refused without claims across nodes, the
store down and back.
"""

from __future__ import annotations

import os
from io import BytesIO

from treq import content as readBody
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.client import FileBodyProducer

from hmacd.config import S3_MIN_PART
from hmacd.s3 import S3Client
from hmacd.storage.s3 import SPOOL_DIR, S3Storage
from hmacd.storage.s3_dedup import CAS, ContentLocks
from tests.seaweed import SeaweedMini, shared_mini
from tests.support import LoopbackServer, v2_query, v_query
from tests.test_http import body_of, header

# The headers a download's answer is judged by (Date and Last-Modified differ by when).
COMPARED = [
    "Content-Type",
    "Content-Length",
    "Content-Range",
    "Content-Disposition",
    "Content-Security-Policy",
    "X-Content-Type-Options",
    "ETag",
    "Cache-Control",
    "Accept-Ranges",
    "Retry-After",
]


def s3_server(
    testCase: TestCase,
    endpoint: str,
    bucket: str,
    keys: tuple[str, str],
    redirect: bool = False,
    **kw,
):
    """A LoopbackServer whose storage is an S3Storage under a prefix of the test's own."""
    client = S3Client(
        reactor,
        endpoint,
        bucket,
        *keys,
        prefix=".".join(testCase.id().split(".")[-2:]) + "/",
        timeout=kw.pop("timeout", 10.0),
    )
    testCase.addCleanup(client.close)
    made: list[S3Storage] = []
    stream = kw.pop("stream", False)
    dedup = kw.pop("dedup", False)

    def build(fs):
        storage = S3Storage(
            client,
            reactor,
            os.path.join(fs.store_dir, SPOOL_DIR),
            lambda work: fs.blocking(work),
            fs.chunk_size,
            threshold=S3_MIN_PART,
            part_size=S3_MIN_PART,
            probe_interval=0.2,
            redirect_downloads=redirect,
            stream=stream,
            dedup=dedup,
        )
        storage.content_locks = ContentLocks(fs.metadata, "test", reactor)
        storage.on_shared = fs.metrics.dedup_bytes.inc  # as hmacd.services wires it
        made.append(storage)
        testCase.addCleanup(storage.stop)
        return storage

    server = LoopbackServer(testCase, make_storage=build, **kw)
    server.storage = made[0]
    return server


class S3HTTPTests(TestCase):
    """Uploads and downloads through hmacfs with the bytes in SeaweedFS."""

    timeout = 120
    # S3StreamUploads
    stream = False

    def setUp(self) -> None:
        store = shared_mini()
        self.server = s3_server(
            self,
            store.endpoint,
            store.bucket,
            (store.access_key, store.secret_key),
            stream=self.stream,
        )
        self.local = LoopbackServer(self)

    @inlineCallbacks
    def put(self, server, name: str, data: bytes, content_type: str = "image/png"):
        response = yield server.http.put(
            server.url(name, v2_query(name, len(data), content_type)),
            data=FileBodyProducer(BytesIO(data)),
            headers={"Content-Type": content_type},
        )
        body = yield readBody(response)
        return response.code, body, response

    @inlineCallbacks
    def answer(self, server, method: str, name: str, headers: dict[str, str]):
        response = yield server.http.request(method, server.url(name), headers=headers)
        body = yield readBody(response)
        return (
            response.code,
            body,
            {h: header(response, h) for h in COMPARED},
            header(response, "Last-Modified"),
        )

    @inlineCallbacks
    def test_same_answers_as_the_local_directory(self):
        """GET/HEAD, ranges and conditional requests: the same answers from S3 as from disk."""
        cases = [
            ("small.png", body_of(1000, "s"), "image/png"),
            ("dir/big doc.pdf", body_of(2 * S3_MIN_PART + 77, "b"), "application/pdf"),
            ("page.html", b"<script>alert(1)</script>", "text/html"),
            ("empty.txt", b"", "text/plain"),
        ]
        for name, data, content_type in cases:
            for server in (self.server, self.local):
                code, _, _ = yield self.put(server, name, data, content_type)
                self.assertEqual(code, 201, (name, server))
            etag = None
            requests = [
                ("GET", {}),
                ("HEAD", {}),
                ("GET", {"Range": "bytes=10-19"}),
                ("GET", {"Range": "bytes=-7"}),
                ("GET", {"Range": "bytes=5-"}),
                ("GET", {"Range": f"bytes={len(data) + 5}-"}),
                ("GET", {"Range": "bytes=0-1,4-5"}),
                ("GET", {"If-None-Match": "*"}),
                ("GET", {"If-None-Match": '"nope"'}),
                ("GET", {"Range": "bytes=1-2", "If-Range": '"other"'}),
            ]
            for method, headers in requests:
                s3 = yield self.answer(self.server, method, name, headers)
                disk = yield self.answer(self.local, method, name, headers)
                self.assertEqual(s3[:3], disk[:3], (name, method, headers))
                etag = s3[2]["ETag"]
            # The validators each server gave: If-None-Match, If-Range, If-Modified-Since.
            for server in (self.server, self.local):
                _, _, _, modified = yield self.answer(server, "GET", name, {})
                code, _, _, _ = yield self.answer(server, "GET", name, {"If-None-Match": etag})
                self.assertEqual(code, 304, name)
                code, _, _, _ = yield self.answer(
                    server, "GET", name, {"If-Modified-Since": modified}
                )
                self.assertEqual(code, 304, name)
                if len(data) > 3:
                    code, body, _, _ = yield self.answer(
                        server, "GET", name, {"Range": "bytes=1-2", "If-Range": etag}
                    )
                    self.assertEqual((code, body), (206, data[1:3]), name)
        missing = yield self.answer(self.server, "GET", "nothing.png", {})
        self.assertEqual(missing[:3], (yield self.answer(self.local, "GET", "nothing.png", {}))[:3])

    @inlineCallbacks
    def test_object_carries_the_signed_type_and_hash(self):
        """The object's own type is the signed one, its facts and SHA-256 travel with it."""
        data = body_of(5000, "t")
        code, _, _ = yield self.put(self.server, "t.bin", data, "application/octet-stream")
        self.assertEqual(code, 201)
        head = yield self.server.storage.client.head_object("t.bin")
        import hashlib

        self.assertEqual(head.metadata["sha256"], hashlib.sha256(data).hexdigest())
        code, body, headers, _ = yield self.answer(self.server, "GET", "t.bin", {})
        self.assertEqual((code, body), (200, data))
        self.assertEqual(headers["Content-Type"], "application/octet-stream")
        self.assertEqual(os.listdir(os.path.join(self.server.root, SPOOL_DIR)), [])

    @inlineCallbacks
    def test_large_object_carries_the_signed_type_and_hash(self):
        """So does one sent as a multipart upload (streamed or after the last byte)."""
        import hashlib

        data = body_of(2 * S3_MIN_PART + 5, "L")
        code, _, _ = yield self.put(self.server, "L.pdf", data, "application/pdf")
        self.assertEqual(code, 201)
        head = yield self.server.storage.client.head_object("L.pdf")
        self.assertEqual(head.content_type, "application/pdf")
        self.assertEqual(head.metadata["sha256"], hashlib.sha256(data).hexdigest())
        record = yield self.server.fs.metadata.get("L.pdf")
        stored = yield deferToThread(self.server.storage.open, "L.pdf")
        self.assertEqual(stored.facts(), record)
        code, body, headers, _ = yield self.answer(self.server, "GET", "L.pdf", {})
        self.assertEqual((code, body), (200, data))
        self.assertEqual(headers["ETag"], record.etag.decode("ascii"))
        self.assertEqual((yield self.server.storage.client.list_multipart_uploads()), [])

    @inlineCallbacks
    def test_facts_without_hash_serve_by_the_record(self):
        """
        An object whose facts never got their SHA-256 (a streamed upload whose last copy
        failed) is served by its record: the strong ETag, the signed type.
        """
        data = body_of(S3_MIN_PART + 3, "d")
        code, _, _ = yield self.put(self.server, "d.png", data, "image/png")
        self.assertEqual(code, 201)
        record = yield self.server.fs.metadata.get("d.png")
        client = self.server.storage.client
        from dataclasses import replace

        from hmacd.storage.s3_writer import _metadata

        # The object again as the stream left it: the draft's facts, no SHA-256.
        yield client.copy_object(
            "d.png", "d.png", "image/png", _metadata(replace(record, sha256=""))
        )
        stored = yield deferToThread(self.server.storage.open, "d.png")
        self.assertIsNone(stored.facts())
        code, body, headers, _ = yield self.answer(self.server, "GET", "d.png", {})
        self.assertEqual((code, body), (200, data))
        self.assertEqual(headers["ETag"], record.etag.decode("ascii"))
        self.assertEqual(headers["Content-Type"], "image/png")

    @inlineCallbacks
    def test_never_overwrites(self):
        """A second PUT of one URL is 409 and the first file stands."""
        code, _, _ = yield self.put(self.server, "once.png", b"first")
        self.assertEqual(code, 201)
        code, _, _ = yield self.put(self.server, "once.png", b"other")
        self.assertEqual(code, 409)
        code, body, _, _ = yield self.answer(self.server, "GET", "once.png", {})
        self.assertEqual((code, body), (200, b"first"))

    @inlineCallbacks
    def test_expired_is_gone(self):
        """Past its expiry a file is 410, from the facts on the object."""
        self.server.fs.file_ttl = 1
        code, _, _ = yield self.put(self.server, "short.png", b"short")
        self.assertEqual(code, 201)
        yield deferLater(reactor, 1.2, lambda: None)
        code, _, _, _ = yield self.answer(self.server, "GET", "short.png", {})
        self.assertEqual(code, 410)

    @inlineCallbacks
    def test_expiry_sweep_deletes_object_and_record(self):
        """The expiry sweep deletes an expired object and its record, and no other object."""
        from twisted.internet.defer import Deferred

        from hmacd.housekeeping import ExpirySweep

        self.server.fs.file_ttl = 1
        code, _, _ = yield self.put(self.server, "old.png", b"old")
        self.assertEqual(code, 201)
        self.server.fs.file_ttl = 0
        code, _, _ = yield self.put(self.server, "new.png", b"new")
        self.assertEqual(code, 201)
        # An object without a record: the sweep never deletes it.
        yield self.server.storage.client.put_object("stray.png", b"stray")
        yield deferLater(reactor, 1.2, lambda: None)
        sweep = ExpirySweep(self.server.fs, interval=60, batch=10)
        yield Deferred.fromCoroutine(sweep._sweep())
        listed = yield self.server.storage.client.list_objects_v2()
        self.assertEqual(sorted(o.key for o in listed.objects), ["new.png", "stray.png"])
        self.assertIsNone((yield self.server.fs.metadata.get("old.png")))
        code, _, _, _ = yield self.answer(self.server, "GET", "old.png", {})
        self.assertEqual(code, 404)

    @inlineCallbacks
    def test_resumable_refused_without_claims(self):
        """
        Without claims across nodes (a FileServer built by hand: hmacd.services always
        gives them with S3) a resumable piece is refused (501) before its body: pieces
        reaching two nodes at once could overlap.
        """
        data = b"0123456789"
        response = yield self.server.http.put(
            self.server.url("r.bin", v_query("r.bin", len(data))),
            data=FileBodyProducer(BytesIO(data[:4])),
            headers={"Content-Range": "bytes 0-3/10"},
        )
        yield readBody(response)
        self.assertEqual(response.code, 501)


class S3StreamedHTTPTests(S3HTTPTests):
    """The same with S3StreamUploads = true: large bodies go to their name as they arrive."""

    stream = True


class S3DedupHTTPTests(TestCase):
    """Deduplication = true with the bytes in SeaweedFS, over HTTP."""

    timeout = 120
    put = S3HTTPTests.put
    answer = S3HTTPTests.answer

    def setUp(self) -> None:
        store = shared_mini()
        keys = (store.access_key, store.secret_key)
        self.server = s3_server(self, store.endpoint, store.bucket, keys, dedup=True)
        self.local = LoopbackServer(self)

    @inlineCallbacks
    def test_same_answers_as_the_local_directory(self):
        """A reference answers GET/HEAD, ranges and conditionals as a file on disk does."""
        yield S3HTTPTests.test_same_answers_as_the_local_directory(self)

    @inlineCallbacks
    def test_one_content_two_types(self):
        """Two slots of one body: stored once, each served with its own signed type."""
        data = body_of(2 * S3_MIN_PART + 3, "D")
        for name, kind in (("one/a.png", "image/png"), ("two/a.pdf", "application/pdf")):
            code, _, _ = yield self.put(self.server, name, data, kind)
            self.assertEqual(code, 201)
        client = self.server.storage.client
        listed = yield client.list_objects_v2(CAS)
        self.assertEqual([o.size for o in listed.objects], [len(data)])
        for name, kind in (("one/a.png", "image/png"), ("two/a.pdf", "application/pdf")):
            code, body, headers, _ = yield self.answer(self.server, "GET", name, {})
            self.assertEqual((code, body, headers["Content-Type"]), (200, data, kind))
            code, body, _, _ = yield self.answer(self.server, "GET", name, {"Range": "bytes=1-3"})
            self.assertEqual((code, body), (206, data[1:4]))
        # The second upload stored nothing: counted as shared.
        shared = self.server.fs.metrics.dedup_bytes._value.get()
        self.assertEqual(shared, len(data))
        yield self.server.fs.blocking(lambda: self.server.storage.delete("one/a.png"))
        code, body, _, _ = yield self.answer(self.server, "GET", "two/a.pdf", {})
        self.assertEqual((code, body), (200, data))
        yield self.server.fs.blocking(lambda: self.server.storage.delete("two/a.pdf"))
        listed = yield client.list_objects_v2()
        self.assertEqual(listed.objects, [])


class S3OutageTests(TestCase):
    """The object store stops answering, and comes back, while hmacfs runs on."""

    timeout = 120

    @inlineCallbacks
    def test_down_then_back(self):
        """Down: PUT 503 (before the body once known), GET 503; back: 201 without a restart."""
        store = SeaweedMini(self)
        server = s3_server(
            self, store.endpoint, store.bucket, (store.access_key, store.secret_key), timeout=1.0
        )
        code, _, _ = yield S3HTTPTests.put(self, server, "a.png", b"a")
        self.assertEqual(code, 201)
        store.pause()
        self.addCleanup(store.resume)
        response = yield server.http.put(
            server.url("b.png", v_query("b.png", 1)), data=FileBodyProducer(BytesIO(b"b"))
        )
        yield readBody(response)
        self.assertEqual((response.code, header(response, "Retry-After")), (503, "30"))
        self.assertFalse(server.storage.available)
        # Known down: refused at the head, before any body.
        response = yield server.http.put(
            server.url("c.png", v_query("c.png", 1)), data=FileBodyProducer(BytesIO(b"c"))
        )
        body = yield readBody(response)
        self.assertEqual((response.code, body.strip()), (503, b"object store unavailable"))
        response = yield server.http.get(server.url("a.png"))
        yield readBody(response)
        self.assertEqual(response.code, 503)
        store.resume()
        for _ in range(100):
            if server.storage.available:
                break
            yield deferLater(reactor, 0.1, lambda: None)
        # (Not b.png again: the paused store may still complete that timed-out write.)
        code, _, _ = yield S3HTTPTests.put(self, server, "d.png", b"d")
        self.assertEqual(code, 201)
        response = yield server.http.get(server.url("a.png"))
        self.assertEqual((yield readBody(response)), b"a")


class S3RedirectTests(TestCase):
    """S3RedirectDownloads: a 302 to a presigned URL that serves the signed type."""

    timeout = 60

    @inlineCallbacks
    def test_redirect(self):
        """GET is a 302 to the store; the URL gives the bytes, the type and the disposition."""
        store = shared_mini()
        server = s3_server(
            self, store.endpoint, store.bucket, (store.access_key, store.secret_key), True
        )
        data = body_of(3000, "r")
        code, _, _ = yield S3HTTPTests.put(self, server, "r/doc.pdf", data, "application/pdf")
        self.assertEqual(code, 201)
        response = yield server.http.get(server.url("r/doc.pdf"), allow_redirects=False)
        yield readBody(response)
        self.assertEqual(response.code, 302)
        location = header(response, "Location")
        self.assertTrue(location.startswith(store.endpoint + "/"), location)
        self.assertIn("X-Amz-Signature=", location)
        followed = yield server.http.get(location)
        self.assertEqual((yield readBody(followed)), data)
        self.assertEqual(header(followed, "Content-Type"), "application/pdf")
        self.assertEqual(
            header(followed, "Content-Disposition"), "attachment; filename*=UTF-8''doc.pdf"
        )
        # Ours still: a missing name is 404, an expired one 410, not a redirect.
        response = yield server.http.get(server.url("r/none.pdf"), allow_redirects=False)
        yield readBody(response)
        self.assertEqual(response.code, 404)
