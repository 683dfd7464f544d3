"""
A file's facts travel with it (issue 14, item 8; issue 21): written on the file at upload,
read from it at download, so that serving never waits on a store and an expired file is
never served.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web import http
from twisted.web.client import readBody

from hmacd import facts as facts_module
from hmacd.facts import UnrecordedFiles, decode, encode, read_facts, write_facts
from hmacd.storage import local as local_storage
from hmacd.store.failover import FailoverStore
from hmacd.web import HmacfsSite
from tests.store_contract import record
from tests.support import (
    LoopbackServer,
    MemoryServer,
    memory_metadata,
    strip_facts,
    v2_query,
    v_query,
)
from tests.test_http import header, raw_request
from tests.test_store_failover import FlakyStore
from tests.test_upload import put_head, request_head, status


def response_headers(transport) -> dict[bytes, bytes]:
    """The headers of the last response written to the transport."""
    head = transport.value().rsplit(b"HTTP/1.1 ", 1)[1].split(b"\r\n\r\n", 1)[0]
    lines = head.split(b"\r\n")[1:]
    return {k.lower(): v.strip() for k, v in (line.split(b":", 1) for line in lines)}


def captured_warnings(testCase) -> list[str]:
    """Warnings logged from now to the end of the test, as formatted text."""
    from twisted.logger import LogLevel, formatEvent

    seen: list[str] = []

    def observer(event):
        if event.get("log_level") == LogLevel.warn:
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    testCase.addCleanup(globalLogPublisher.removeObserver, observer)
    return seen


class EncodingTests(SynchronousTestCase):
    def test_round_trip(self):
        """Every fact comes back equal, unicode and absent fields included."""
        for r in (
            record("x/ü.jpg", uploader="ålice@example.org", expires=1_800_600_000.25),
            record("y/z.bin", content_type='text/plain; charset="utf-8"'),
        ):
            self.assertEqual(decode(r.path, encode(r)), r)

    def test_not_ours(self):
        """Garbage, another version or a missing field is no facts, not an error."""
        good = json.loads(encode(record()))
        for value in (
            b"",
            b"\xff",
            b"[]",
            b"{}",
            json.dumps({**good, "v": 2}).encode(),
            json.dumps({k: v for k, v in good.items() if k != "sha256"}).encode(),
            json.dumps({**good, "size": "many"}).encode(),
        ):
            self.assertIsNone(decode("a", value), value)

    def test_file_round_trip(self):
        """write_facts puts them on an open file, read_facts reads them from one."""
        path = self.mktemp()
        r = record(path="p", expires=5.0)
        with open(path, "wb") as f:
            self.assertTrue(write_facts(f.fileno(), r))
        with open(path, "rb") as f:
            self.assertEqual(read_facts(f.fileno(), "p"), r)
        open(path + "2", "wb").close()
        with open(path + "2", "rb") as f:
            self.assertIsNone(read_facts(f.fileno(), "p"))

    def test_unsupported_file_system(self):
        """Where the file system has no user attributes, or the value is too large, no facts."""
        for code in (errno.ENOTSUP, errno.E2BIG, errno.ENOSPC):

            def refuse(*args, code=code):
                raise OSError(code, os.strerror(code))

            self.patch(facts_module.os, "setxattr", refuse)
            self.assertFalse(write_facts(0, record()))

        def broken(*args):
            raise OSError(errno.EIO, "input/output error")

        self.patch(facts_module.os, "setxattr", broken)
        self.assertRaises(OSError, write_facts, 0, record())

    def test_probe(self):
        """probe() says yes here (ext4 or tmpfs) and no on ENOTSUP; it leaves nothing behind."""
        root = self.mktemp()
        os.makedirs(root)
        self.assertTrue(facts_module.probe(root))

        def refuse(*args):
            raise OSError(errno.ENOTSUP, "not supported")

        self.patch(facts_module.os, "setxattr", refuse)
        self.assertFalse(facts_module.probe(root))
        self.assertEqual(os.listdir(root), [])


class UploadWritesFactsTests(SynchronousTestCase):
    """Every way a file gets into the store leaves its facts on it."""

    def setUp(self):
        self.root = self.mktemp()
        self.server = MemoryServer(self.root)
        self.server.clock.advance(1_800_000_000)

    def facts(self, relpath: str):
        return facts_module.read_facts_at(os.path.join(self.root, relpath), relpath)

    def test_whole_upload(self):
        """A PUT's facts equal its record: signed type, hash, size, protocol, expiry."""
        self.server.fs.file_ttl = 3600
        channel, transport = self.server.connect()
        channel.dataReceived(
            put_head(
                "f/a.dat", 5, v2_query("f/a.dat", 5, "image/png"), ("Content-Type: image/png",)
            )
            + b"hello"
        )
        self.assertEqual(status(transport), http.CREATED)
        stored = self.successResultOf(self.server.fs.metadata.get("f/a.dat"))
        self.assertEqual(self.facts("f/a.dat"), stored)
        self.assertEqual(stored.content_type, "image/png")
        self.assertEqual(stored.expires, 1_800_000_000 + 3600)
        self.assertEqual(stored.sha256, hashlib.sha256(b"hello").hexdigest())

    def test_resumable_upload(self):
        """The file a resumable upload links into place carries the facts of its first piece."""
        total = b"0123456789"
        query = v2_query("r/b.dat", 10, "audio/ogg")
        for first, last in ((0, 3), (4, 9)):
            channel, transport = self.server.connect()
            piece = total[first : last + 1]
            channel.dataReceived(
                put_head(
                    "r/b.dat",
                    len(piece),
                    query,
                    ("Content-Type: audio/ogg", f"Content-Range: bytes {first}-{last}/10"),
                )
                + piece
            )
        self.assertEqual(status(transport), http.CREATED)
        stored = self.successResultOf(self.server.fs.metadata.get("r/b.dat"))
        self.assertEqual(self.facts("r/b.dat"), stored)
        self.assertEqual(
            (stored.content_type, stored.size, stored.sha256),
            ("audio/ogg", 10, hashlib.sha256(total).hexdigest()),
        )

    def test_no_attributes_upload_still_works(self):
        """On a file system without user attributes the upload succeeds on its record alone."""

        def refuse(*args):
            raise OSError(errno.ENOTSUP, "not supported")

        self.patch(facts_module.os, "setxattr", refuse)
        channel, transport = self.server.connect()
        channel.dataReceived(
            put_head(
                "n/c.dat", 2, v2_query("n/c.dat", 2, "image/gif"), ("Content-Type: image/gif",)
            )
            + b"hi"
        )
        self.assertEqual(status(transport), http.CREATED)
        self.assertIsNone(self.facts("n/c.dat"))
        channel, transport = self.server.connect()
        channel.dataReceived(request_head("GET", "/upload/n/c.dat"))
        self.assertEqual(status(transport), http.OK)
        self.assertEqual(response_headers(transport)[b"content-type"], b"image/gif")


class FactsReadOnceTests(SynchronousTestCase):
    """A file's facts are read from it once per version, not once per download."""

    def setUp(self):
        self.root = self.mktemp()
        self.server = MemoryServer(self.root)
        self.reads = []
        realRead = local_storage.read_facts
        self.patch(
            local_storage,
            "read_facts",
            lambda fd, relpath: (self.reads.append(relpath), realRead(fd, relpath))[1],
        )

    def upload(self, relpath: str, body: bytes, content_type: str) -> None:
        channel, transport = self.server.connect()
        query = v2_query(relpath, len(body), content_type)
        headers = (f"Content-Type: {content_type}",)
        channel.dataReceived(put_head(relpath, len(body), query, headers) + body)
        self.assertEqual(status(transport), http.CREATED)

    def download(self, relpath: str) -> dict[bytes, bytes]:
        channel, transport = self.server.connect()
        channel.dataReceived(request_head("GET", f"/upload/{relpath}"))
        self.assertEqual(status(transport), http.OK)
        return response_headers(transport)

    def test_once_per_version(self):
        """Two downloads read the facts once; the name uploaded again reads its new facts."""
        self.upload("v/a.dat", b"first", "image/png")
        self.assertEqual(self.download("v/a.dat")[b"content-type"], b"image/png")
        self.assertEqual(self.download("v/a.dat")[b"content-type"], b"image/png")
        self.assertEqual(self.reads, ["v/a.dat"])
        self.assertTrue(self.server.fs.storage.delete("v/a.dat"))
        self.upload("v/a.dat", b"second", "audio/ogg")
        self.assertEqual(self.download("v/a.dat")[b"content-type"], b"audio/ogg")
        self.assertEqual(self.reads, ["v/a.dat"] * 2)


class HungStoreTests(SynchronousTestCase):
    """
    Issue 14 item 8: Redis primary and SQL fallback, files uploaded while both answer,
    then both hang.  Downloads look as they did, at once.
    """

    def setUp(self):
        self.root = self.mktemp()
        self.primary, self.fallback = FlakyStore("redis"), FlakyStore("postgres")
        self.server = MemoryServer(self.root)
        self.server.clock.advance(1_800_000_000)
        store = FailoverStore(
            self.primary, self.fallback, clock=self.server.clock, healthInterval=0
        )
        store.start()
        self.server.fs.metadata = store
        self.server.site = HmacfsSite(self.server.fs)

    def upload(self, relpath: str, body: bytes, content_type: str) -> None:
        channel, transport = self.server.connect()
        channel.dataReceived(
            put_head(
                relpath,
                len(body),
                v2_query(relpath, len(body), content_type),
                (f"Content-Type: {content_type}",),
            )
            + body
        )
        self.assertEqual(status(transport), http.CREATED)

    def test_hung_store_changes_no_download(self):
        """40 files, then every store hangs: each is served at once with its signed type."""
        for n in range(40):
            self.upload(f"s/{n}.dat", b"picture %d" % n, "image/jpeg")
        self.primary.mode = self.fallback.mode = "hang"
        for n in range(40):
            channel, transport = self.server.connect()
            channel.dataReceived(request_head("GET", f"/upload/s/{n}.dat"))
            # No time passes: the answer cannot have waited for a store deadline.
            self.assertEqual(status(transport), http.OK, n)
            headers = response_headers(transport)
            self.assertEqual(headers[b"content-type"], b"image/jpeg")
            self.assertNotIn(b"content-disposition", headers)
            self.assertEqual(transport.value().rsplit(b"\r\n\r\n", 1)[1], b"picture %d" % n)
            sha = hashlib.sha256(b"picture %d" % n).hexdigest()
            self.assertEqual(headers[b"etag"], b'"' + sha[:32].encode() + b'"')
        # The record checks went out after the answers, and time out harmlessly.
        self.server.clock.advance(10)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_expired_during_hang(self):
        """A file past its expiry is 410 while every store hangs, with no sweep run."""
        self.server.fs.file_ttl = 60
        self.upload("e/1.jpg", b"soon gone", "image/jpeg")
        self.primary.mode = self.fallback.mode = "hang"
        self.server.clock.advance(59)
        channel, transport = self.server.connect()
        channel.dataReceived(request_head("GET", "/upload/e/1.jpg"))
        self.assertEqual(status(transport), http.OK)
        self.server.clock.advance(1)
        for method in ("GET", "HEAD"):
            channel, transport = self.server.connect()
            channel.dataReceived(request_head(method, "/upload/e/1.jpg"))
            self.assertEqual(status(transport), http.GONE, method)
        self.assertTrue(os.path.exists(os.path.join(self.root, "e", "1.jpg")))


class ExpiredRecordTests(SynchronousTestCase):
    """A file without facts (an older upload) is held to its record's expiry."""

    def setUp(self):
        self.root = self.mktemp()
        self.server = MemoryServer(self.root)
        self.server.clock.advance(1_800_000_000)
        self.server.fs.file_ttl = 60
        channel, transport = self.server.connect()
        channel.dataReceived(put_head("o/old.txt", 3, v_query("o/old.txt", 3)) + b"old")
        self.assertEqual(status(transport), http.CREATED)
        strip_facts(os.path.join(self.root, "o", "old.txt"))

    def get(self) -> int:
        channel, transport = self.server.connect()
        channel.dataReceived(request_head("GET", "/upload/o/old.txt"))
        return status(transport)

    def test_record_expiry(self):
        """200 before the record's expiry, 410 from it on, cached record or not."""
        self.assertEqual(self.get(), http.OK)
        self.assertEqual(self.get(), http.OK)  # now from the record cache
        self.server.clock.advance(60)
        self.assertEqual(self.get(), http.GONE)  # cached record
        self.server.site.resource._records.clear()
        self.assertEqual(self.get(), http.GONE)

    def test_fresh_lookup_expired(self):
        """A record looked up afresh that has expired is 410 too."""
        self.server.clock.advance(60)
        self.assertEqual(self.get(), http.GONE)


class UnrecordedFilesTests(SynchronousTestCase):
    """The warning about files served without a record: once per file, rate-limited."""

    def setUp(self):
        self.clock = Clock()
        self.store = memory_metadata(self.clock)
        self.warnings = captured_warnings(self)
        self.unrecorded = UnrecordedFiles(self.store, self.clock, checksPerSecond=2, warnEvery=60)

    def test_warns_once_per_file_and_rate_limited(self):
        """Each file is named once; within a minute further files are only counted."""
        self.unrecorded.missing("a")
        self.unrecorded.missing("a")
        self.unrecorded.missing("b")
        self.unrecorded.missing("c")
        self.assertEqual(len(self.warnings), 1)
        self.assertIn("served a", self.warnings[0])
        self.assertIn("hmacfs reindex --config FILE", self.warnings[0])
        self.clock.advance(60)
        self.unrecorded.missing("b")
        self.unrecorded.missing("d")
        self.assertEqual(len(self.warnings), 2)
        self.assertIn("served d", self.warnings[1])
        self.assertIn("nor of 2 other files", self.warnings[1])
        self.assertEqual(self.unrecorded.found, 4)

    def test_checks_are_sampled(self):
        """A path is asked about once; at most checksPerSecond asks; an outage asks again."""
        asked = []
        real = self.store.get
        self.patch(self.store, "get", lambda path: (asked.append(path), real(path))[1])
        self.successResultOf(self.store.put(record("known")))
        self.unrecorded.check("known")
        self.unrecorded.check("known")
        self.unrecorded.check("other")  # over budget: skipped
        self.assertEqual(asked, ["known"])
        self.clock.advance(0.5)
        self.unrecorded.check("other")
        self.assertEqual(asked, ["known", "other"])
        self.assertEqual(len(self.warnings), 1)
        self.assertIn("served other", self.warnings[0])
        self.clock.advance(0.5)
        self.store.primary.up = False  # an outage: no verdict, asked again later
        self.unrecorded.check("third")
        self.store.primary.up = True
        self.clock.advance(0.5)
        self.unrecorded.check("third")
        self.assertEqual(asked, ["known", "other", "third", "third"])
        self.assertEqual(self.unrecorded.found, 2)  # within the minute: counted, not said

    def test_outage_is_no_missing_record(self):
        """A file without facts served while the store is down is not reported as unrecorded."""
        root = self.mktemp()
        server = MemoryServer(root)
        channel, transport = server.connect()
        channel.dataReceived(put_head("o.txt", 2, v_query("o.txt", 2)) + b"ok")
        strip_facts(os.path.join(root, "o.txt"))
        server.fs.metadata.primary.up = False
        channel, transport = server.connect()
        channel.dataReceived(request_head("GET", "/upload/o.txt"))
        self.assertEqual(status(transport), http.OK)
        self.assertEqual(self.warnings, [])
        self.assertEqual(server.site.resource._unrecorded.found, 0)

    def test_download_without_record_warns(self):
        """Served files the store does not know are reported, with or without facts."""
        root = self.mktemp()
        server = MemoryServer(root)
        warnings = self.warnings
        for name, facts in (("with.txt", True), ("without.txt", False)):
            channel, transport = server.connect()
            channel.dataReceived(put_head(name, 2, v_query(name, 2)) + b"ok")
            self.assertEqual(status(transport), http.CREATED)
            if not facts:
                strip_facts(os.path.join(root, name))
            self.successResultOf(server.fs.metadata.delete(name))
            server.clock.advance(1)
            channel, transport = server.connect()
            channel.dataReceived(request_head("GET", "/upload/" + name))
            self.assertEqual(status(transport), http.OK)
        self.assertEqual(len(warnings), 1)
        self.assertIn("served with.txt", warnings[0])
        server.clock.advance(60)
        channel, transport = server.connect()
        channel.dataReceived(request_head("GET", "/upload/without.txt"))
        self.assertEqual(len(warnings), 1)  # named in no line yet, but counted once
        self.assertEqual(server.site.resource._unrecorded.found, 2)


class ExpiredOverSocketTests(TestCase):
    """Issue 21: a file past its expiry is not served, over a real socket, sweep or not."""

    @inlineCallbacks
    def test_expired_not_served(self):
        """200 before FileTTL has run out, 410 after, and no sweep ran in between."""
        clock = Clock()
        clock.advance(time.time())
        server = LoopbackServer(self, clock=clock, file_ttl=120)
        body = b"for two minutes"
        target = "/upload/t/soon.png?" + v2_query("t/soon.png", len(body), "image/png")
        response = yield deferToThread(
            raw_request, server, "PUT", target, body, {"Content-Type": "image/png"}
        )
        self.assertEqual(response.code, http.CREATED)
        response = yield server.http.get(server.url("t/soon.png"))
        self.assertEqual((yield readBody(response)), body)
        self.assertEqual(header(response, "Content-Type"), "image/png")
        clock.advance(120)
        response = yield server.http.get(server.url("t/soon.png"))
        yield readBody(response)
        self.assertEqual(response.code, http.GONE)
        self.assertTrue(os.path.exists(os.path.join(server.root, "t", "soon.png")))
