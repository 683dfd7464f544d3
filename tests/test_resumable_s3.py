"""
Resumable uploads into an object store (hmacd.sink_s3, hmacd.storage.s3_pieces), over real
HTTP against a real SeaweedFS: pieces of any size, on two nodes sharing one metadata store
and one bucket, a piece broken off, the offset query, the partial never visible, nothing
left behind, and the sweep of what was abandoned.
"""

from __future__ import annotations

import hashlib
import os
from io import BytesIO

from treq import content as readBody
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import FileBodyProducer

from hmacd.config import S3_MIN_PART
from hmacd.node_claims import NodeClaims
from hmacd.sink_s3 import staging_in_use
from hmacd.storage.s3_pieces import STAGING, UploadState, live_key, state_key
from hmacd.storage.s3_writer import _Segments
from tests.seaweed import shared_mini
from tests.support import memory_metadata, v2_query
from tests.test_http import header
from tests.test_http_s3 import s3_server

TYPE = "application/pdf"


def data_of(size: int, seed: bytes) -> bytes:
    block = hashlib.sha256(seed).digest() * 2048  # 64 KiB that are not all alike
    return (block * (size // len(block) + 1))[:size]


class SegmentsTests(SynchronousTestCase):
    """A part read across the end of the tail and the start of the piece."""

    def test_reads_across(self):
        first, second = self.mktemp(), self.mktemp()
        with open(first, "wb") as f:
            f.write(b"abcde")
        with open(second, "wb") as f:
            f.write(b"fghij")
        fds = [os.open(first, os.O_RDONLY), os.open(second, os.O_RDONLY)]
        self.addCleanup(lambda: [os.close(fd) for fd in fds])
        segments = [(fds[0], 5), (fds[1], 5)]
        part = _Segments(segments, 3, 5)
        self.assertEqual(part.read(1), b"d")
        self.assertEqual(part.read(), b"efgh")
        self.assertEqual(part.read(), b"")
        part.seek(0)
        self.assertEqual(part.read(100), b"defgh")
        self.assertEqual(part.seek(0, os.SEEK_END), 5)


class StateTests(SynchronousTestCase):
    """The state in the shared store is checked when read back."""

    def test_round_trip(self):
        state = UploadState(
            "a/b.pdf", 10, TYPE, "v2", "u@example", None, S3_MIN_PART, STAGING + "x", "id",
            [[1, '"e"']], 7, STAGING + "x.tail.1", 7,
        )  # fmt: skip
        self.assertEqual(UploadState.from_json(state.to_json()), state)

    def test_refused(self):
        for text in ("[]", "{}", '{"path": 1}', "not json"):
            self.assertRaises(ValueError, UploadState.from_json, text)
        bad = UploadState("p", 10, TYPE, "v2", None, None, 5, "elsewhere/x", "id", [], 11)
        self.assertRaises(ValueError, UploadState.from_json, bad.to_json())


class TwoNodes(TestCase):
    """Two hmacfs nodes that share a metadata store and a bucket, and a client of both."""

    timeout = 300
    dedup = False  # Deduplication

    def setUp(self) -> None:
        store = shared_mini()
        keys = (store.access_key, store.secret_key)
        self.metadata = memory_metadata(reactor)
        self.nodes = []
        for name in ("a", "b"):
            node = s3_server(
                self,
                store.endpoint,
                store.bucket,
                keys,
                metadata=self.metadata,
                node_claims=NodeClaims(self.metadata, name, reactor),
                dedup=self.dedup,
            )
            node.storage.staging_in_use = staging_in_use(node.fs)
            self.nodes.append(node)
        self.client = self.nodes[0].storage.client

    @inlineCallbacks
    def piece(self, node, name: str, data: bytes, first: int, total: int, **headers):
        last = first + len(data) - 1
        headers = {
            "Content-Type": TYPE,
            "Content-Range": f"bytes {first}-{last}/{total}",
            **headers,
        }
        response = yield node.http.put(
            node.url(name, v2_query(name, total, TYPE)),
            data=FileBodyProducer(BytesIO(data)),
            headers=headers,
            allow_redirects=False,  # 308 is Resume Incomplete here
        )
        body = yield readBody(response)
        return response.code, header(response, "Range"), body

    @inlineCallbacks
    def where(self, node, name: str, total: int):
        response = yield node.http.put(
            node.url(name, v2_query(name, total, TYPE)),
            data=b"",
            headers={"Content-Type": TYPE, "Content-Range": f"bytes */{total}"},
            allow_redirects=False,
        )
        yield readBody(response)
        return response.code, header(response, "Range")

    @inlineCallbacks
    def staged(self):
        """Objects and multipart uploads under the staging prefix."""
        listed = yield self.client.list_objects_v2(STAGING)
        uploads = yield self.client.list_multipart_uploads(STAGING)
        return [o.key for o in listed.objects] + [u.key for u in uploads]


class S3ResumableTests(TwoNodes):
    """Pieces through two nodes."""

    @inlineCallbacks
    def test_pieces_alternate_between_nodes(self):
        """Pieces of odd sizes, alternating nodes: the file arrives whole, nothing left."""
        total = 3 * S3_MIN_PART + 3 * 1024 * 1024 + 123
        data = data_of(total, b"alternate")
        name = "slot/big report.pdf"
        sizes = [1024 * 1024 + 5, 3 * S3_MIN_PART // 2, 7, S3_MIN_PART]
        first = 0
        for i, size in enumerate(sizes):
            code, received, _ = yield self.piece(
                self.nodes[i % 2], name, data[first : first + size], first, total
            )
            first += size
            self.assertEqual((code, received), (308, f"bytes=0-{first - 1}"))
            # Never visible under its name before the last byte.
            response = yield self.nodes[(i + 1) % 2].http.get(self.nodes[0].url(name))
            yield readBody(response)
            self.assertEqual(response.code, 404)
        code, _ = yield self.where(self.nodes[1], name, total)
        self.assertEqual(code, 308)
        code, _, _ = yield self.piece(self.nodes[1], name, data[first:], first, total)
        self.assertEqual(code, 201)
        for node in self.nodes:
            response = yield node.http.get(node.url(name))
            body = yield readBody(response)
            self.assertEqual(body, data)
            self.assertEqual(header(response, "Content-Type"), TYPE)
            self.assertEqual(header(response, "ETag"), f'"{hashlib.sha256(data).hexdigest()[:32]}"')
        record = yield self.metadata.get(name)
        self.assertEqual((record.size, record.sha256), (total, hashlib.sha256(data).hexdigest()))
        self.assertEqual((yield self.staged()), [])
        self.assertIsNone((yield self.metadata.get_state(state_key(name))))
        # The name is taken now: another upload of it is refused before its body.
        code, _, _ = yield self.piece(self.nodes[0], name, b"x", 0, total)
        self.assertEqual(code, 409)

    @inlineCallbacks
    def test_one_piece(self):
        """A first piece that is also the last makes the file at once."""
        data = data_of(1000, b"one")
        code, _, _ = yield self.piece(self.nodes[0], "one.pdf", data, 0, len(data))
        self.assertEqual(code, 201)
        response = yield self.nodes[1].http.get(self.nodes[1].url("one.pdf"))
        self.assertEqual((yield readBody(response)), data)
        self.assertEqual((yield self.staged()), [])

    @inlineCallbacks
    def test_offsets(self):
        """The offset query, a piece at the wrong offset (416), another total (409)."""
        total = 100
        data = data_of(total, b"offsets")
        self.assertEqual((yield self.where(self.nodes[0], "o.pdf", total)), (308, None))
        code, received, _ = yield self.piece(self.nodes[0], "o.pdf", data[10:20], 10, total)
        self.assertEqual((code, received), (416, None))  # nothing received yet
        yield self.piece(self.nodes[0], "o.pdf", data[:40], 0, total)
        self.assertEqual((yield self.where(self.nodes[1], "o.pdf", total)), (308, "bytes=0-39"))
        code, received, _ = yield self.piece(self.nodes[1], "o.pdf", data[30:50], 30, total)
        self.assertEqual((code, received), (416, "bytes=0-39"))
        code, _, _ = yield self.piece(self.nodes[1], "o.pdf", b"z" * 10, 40, total + 1)
        self.assertEqual(code, 409)
        code, _, _ = yield self.piece(self.nodes[1], "o.pdf", data[40:], 40, total)
        self.assertEqual(code, 201)
        response = yield self.nodes[0].http.get(self.nodes[0].url("o.pdf"))
        self.assertEqual((yield readBody(response)), data)

    @inlineCallbacks
    def test_broken_piece(self):
        """A piece that breaks off leaves the upload where the last whole one left it."""
        from twisted.internet.protocol import ClientCreator, Protocol

        total = S3_MIN_PART + 1000
        data = data_of(total, b"broken")
        code, _, _ = yield self.piece(self.nodes[0], "br.pdf", data[:1000], 0, total)
        self.assertEqual(code, 308)
        node = self.nodes[1]
        path = "/upload/br.pdf?" + v2_query("br.pdf", total, TYPE)
        head = (
            f"PUT {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {TYPE}\r\n"
            f"Content-Range: bytes 1000-{total - 1}/{total}\r\n"
            f"Content-Length: {total - 1000}\r\n\r\n"
        ).encode()
        proto = yield ClientCreator(reactor, Protocol).connectTCP("127.0.0.1", node.portNumber)
        proto.transport.write(head + data[1000:300_000])
        yield deferLater_(0.5)
        proto.transport.abortConnection()
        yield deferLater_(0.5)
        self.assertEqual((yield self.where(self.nodes[0], "br.pdf", total)), (308, "bytes=0-999"))
        self.assertEqual(len(node.fs.uploads), 0)
        self.assertEqual(len(node.fs.node_claims), 0)
        code, _, _ = yield self.piece(self.nodes[0], "br.pdf", data[1000:], 1000, total)
        self.assertEqual(code, 201)
        response = yield node.http.get(node.url("br.pdf"))
        self.assertEqual((yield readBody(response)), data)

    @inlineCallbacks
    def test_sweep_spares_live_uploads(self):
        """The partial sweep aborts an abandoned staging upload, never one still going."""
        total = S3_MIN_PART + 10
        data = data_of(total, b"sweep")
        code, _, _ = yield self.piece(self.nodes[0], "live.pdf", data[:20], 0, total)
        self.assertEqual(code, 308)
        code, _, _ = yield self.piece(self.nodes[0], "dead.pdf", data[:30], 0, total)
        self.assertEqual(code, 308)
        dead = UploadState.from_json((yield self.metadata.get_state(state_key("dead.pdf"))))
        # dead.pdf's state lapses (ResumableTTL); live.pdf's is still there.
        yield self.metadata.delete_state(state_key("dead.pdf"))
        yield self.metadata.delete_state(live_key(dead.staging))
        storage = self.nodes[1].storage
        removed = yield deferToThread(storage.sweep_temps, 2**40)  # everything is "old"
        self.assertTrue(removed)
        self.assertTrue(all(dead.staging in r for r in removed), removed)
        left = yield self.staged()
        self.assertTrue(left and not any(dead.staging in k for k in left), left)
        code, _, _ = yield self.piece(self.nodes[1], "live.pdf", data[20:], 20, total)
        self.assertEqual(code, 201)
        self.assertEqual((yield self.staged()), [])


class S3ResumableDedupTests(TwoNodes):
    """Resumable uploads with Deduplication: the finished file is a reference."""

    dedup = True

    @inlineCallbacks
    def test_finished_upload_shares_stored_content(self):
        """A resumable upload of bytes already stored ends as a reference; nothing staged."""
        from hmacd.storage.s3_dedup import CAS, CONTENT_META, content_key

        total = S3_MIN_PART + 1000
        data = data_of(total, b"shared")
        sha = hashlib.sha256(data).hexdigest()
        whole = self.nodes[0]
        response = yield whole.http.put(
            whole.url("first/a.bin", v2_query("first/a.bin", total, TYPE)),
            data=FileBodyProducer(BytesIO(data)),
            headers={"Content-Type": TYPE},
        )
        yield readBody(response)
        self.assertEqual(response.code, 201)
        name = "second/b.bin"
        half = S3_MIN_PART
        code, _, _ = yield self.piece(self.nodes[0], name, data[:half], 0, total)
        self.assertEqual(code, 308)
        code, _, _ = yield self.piece(self.nodes[1], name, data[half:], half, total)
        self.assertEqual(code, 201)
        head = yield self.client.head_object(name)
        self.assertEqual((head.length, head.metadata[CONTENT_META]), (0, sha))
        listed = yield self.client.list_objects_v2(CAS)
        self.assertEqual([o.key for o in listed.objects], [content_key(sha)])
        for node in self.nodes:
            response = yield node.http.get(node.url(name))
            self.assertEqual((yield readBody(response)), data)
        self.assertEqual((yield self.staged()), [])


class S3ResumableFailureTests(TwoNodes):
    """What fails at each step of the last piece, and a client that goes on."""

    def once(self, obj, name: str, error: Exception, when=lambda *a: True) -> list:
        """Make C{obj.name} fail once with C{error} (when C{when} says so)."""
        real = getattr(obj, name)
        failed: list = []

        def failing(*args, **kwargs):
            if not failed and when(*args):
                failed.append(args)
                from twisted.internet.defer import fail

                return fail(error)
            return real(*args, **kwargs)

        setattr(obj, name, failing)
        self.addCleanup(setattr, obj, name, real)
        return failed

    @inlineCallbacks
    def finish_after(self, fail_how) -> None:
        total = S3_MIN_PART + 100
        data = data_of(total, b"last")
        code, _, _ = yield self.piece(self.nodes[0], "l.pdf", data[:100], 0, total)
        self.assertEqual(code, 308)
        failed = fail_how()
        code, _, _ = yield self.piece(self.nodes[1], "l.pdf", data[100:], 100, total)
        self.assertTrue(failed)
        self.assertEqual(code, 503)
        response = yield self.nodes[0].http.get(self.nodes[0].url("l.pdf"))
        yield readBody(response)
        self.assertEqual(response.code, 404)  # nothing visible
        # The client sends the last piece again (it never heard 201), on either node.
        code, _, _ = yield self.piece(self.nodes[0], "l.pdf", data[100:], 100, total)
        self.assertEqual(code, 201)
        response = yield self.nodes[1].http.get(self.nodes[1].url("l.pdf"))
        self.assertEqual((yield readBody(response)), data)
        self.assertEqual((yield self.staged()), [])
        self.assertIsNone((yield self.metadata.get_state(state_key("l.pdf"))))

    def test_copy_fails(self):
        """The copy to its name fails: the staging object is kept for the retry."""
        from hmacd.s3 import S3Unavailable

        return self.finish_after(
            lambda: self.once(
                self.nodes[1].storage.client, "copy_object", S3Unavailable("store gone")
            )
        )

    def test_state_fails_after_completing(self):
        """
        The shared store fails just after the staging object was completed: the upload id
        is gone, and the retry finds the staging object whole.
        """
        from hmacd.store import StoreUnavailable

        return self.finish_after(
            lambda: self.once(
                self.metadata,
                "put_state",
                StoreUnavailable("no store"),
                lambda key, value, ttl: '"completed":true' in value,
            )
        )

    @inlineCallbacks
    def test_lost_upload(self):
        """A staging upload that is gone (swept): the client hears so, and starts again."""
        total = S3_MIN_PART + 100
        data = data_of(total, b"lost")
        yield self.piece(self.nodes[0], "x.pdf", data[:100], 0, total)
        state = UploadState.from_json((yield self.metadata.get_state(state_key("x.pdf"))))
        yield self.client.abort_multipart_upload(state.staging, state.upload_id)
        code, _, _ = yield self.piece(self.nodes[1], "x.pdf", data[100:], 100, total)
        self.assertEqual(code, 500)
        self.flushLoggedErrors()
        self.assertEqual((yield self.where(self.nodes[0], "x.pdf", total)), (308, None))
        code, _, _ = yield self.piece(self.nodes[0], "x.pdf", data, 0, total)
        self.assertEqual(code, 201)
        self.assertEqual((yield self.staged()), [])

    @inlineCallbacks
    def test_where_while_claimed(self):
        """The offset query needs no claim: asked while another node holds the path."""
        yield self.piece(self.nodes[0], "w.pdf", b"abc", 0, 10)
        yield self.metadata.claim("w.pdf", "dead-node/1", 60)
        self.assertEqual((yield self.where(self.nodes[1], "w.pdf", 10)), (308, "bytes=0-2"))
        code, _, _ = yield self.piece(self.nodes[1], "w.pdf", b"defghij", 3, 10)
        self.assertEqual(code, 409)  # the piece itself waits for the claim


def deferLater_(seconds: float):
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)
