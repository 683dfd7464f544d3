"""
The streaming PUT at the protocol level: raw bytes into an HTTPChannel over
StringTransport, time from a Clock.  These also guard the twisted.web
internals the upload relies on (see DESIGN.md, "Twisted facts").
"""

from __future__ import annotations

import errno
import hashlib
import os
from urllib.parse import quote

from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase
from twisted.web import http

from hmacd import auth
from hmacd.sink import Partial, Sink, WholeUpload
from hmacd.storage import local as local_storage
from hmacd.storage.local import MAX_WRITE_BUFFER, SPOOL_HIGH, LocalWriter
from hmacd.store.failover import FailoverStore
from hmacd.upload import DRAIN_LIMIT, INSUFFICIENT_STORAGE, READ_SIZE, UploadRequest
from hmacd.uring import Rings
from tests.support import SECRET, MemoryServer, store_files, v2_query, v_query
from tests.test_store_failover import FlakyStore


def request_head(
    method: str, target: str, length: int | None = None, headers: tuple[str, ...] = ()
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: files.example"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    lines.extend(headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def put_head(path: str, length: int, query: str, headers: tuple[str, ...] = ()) -> bytes:
    return request_head("PUT", f"/upload/{quote(path)}?{query}", length, headers)


def status(transport) -> int:
    """The status code of the last response written to the transport."""
    lines = [line for line in transport.value().split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]
    return int(lines[-1].split()[1])


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


class VerdictTests(SynchronousTestCase):
    """The verdict comes after the headers, before any body byte is read."""

    def setUp(self):
        self.root = self.mktemp()
        self.server = MemoryServer(self.root)

    def refused(self, head: bytes, code: int) -> bytes:
        channel, transport = self.server.connect()
        channel.dataReceived(head)
        self.assertEqual(status(transport), code)
        self.assertNotIn(b"100 Continue", transport.value())
        self.assertTrue(transport.disconnecting)
        self.server.clock.advance(0)
        self.assertEqual(store_files(self.root), [])
        return transport.value()

    def test_bad_mac_refused_without_continue(self):
        """A wrong MAC gets 403 at once; no 100 Continue, nothing on disk."""
        head = put_head("a/b.txt", 10, v_query("a/b.txt", 11), ("Expect: 100-continue",))
        self.refused(head, http.FORBIDDEN)

    def test_no_credentials_401(self):
        """No MAC and no bearer token: 401 with a Bearer challenge."""
        value = self.refused(put_head("a/b.txt", 10, "", ("Expect: 100-continue",)), 401)
        self.assertIn(b"WWW-Authenticate: Bearer", value)

    def test_too_large_refused(self):
        """UploadMaxSize is enforced from Content-Length, before the body."""
        self.server.fs.upload_max_size = 5
        head = put_head("a/b.txt", 10, v_query("a/b.txt", 10), ("Expect: 100-continue",))
        self.refused(head, http.REQUEST_ENTITY_TOO_LARGE)

    def test_existing_file_conflict(self):
        """A PUT to an existing name is 409 and leaves the file alone."""
        os.makedirs(os.path.join(self.root, "a"))
        with open(os.path.join(self.root, "a", "b.txt"), "wb") as f:
            f.write(b"original")
        channel, transport = self.server.connect()
        channel.dataReceived(
            put_head("a/b.txt", 10, v_query("a/b.txt", 10), ("Expect: 100-continue",))
        )
        self.assertEqual(status(transport), http.CONFLICT)
        self.assertNotIn(b"100 Continue", transport.value())
        with open(os.path.join(self.root, "a", "b.txt"), "rb") as f:
            self.assertEqual(f.read(), b"original")

    def test_no_store_503_before_body(self):
        """With no metadata store up, a valid upload gets 503 + Retry-After before its body."""
        down = FlakyStore("redis")
        down.mode = "down"
        store = FailoverStore(down, clock=self.server.clock)
        store.start()
        self.flushLoggedErrors()
        self.server.fs.metadata = store
        head = put_head("a/b.txt", 10, v_query("a/b.txt", 10), ("Expect: 100-continue",))
        value = self.refused(head, http.SERVICE_UNAVAILABLE)
        self.assertIn(b"Retry-After: 30", value)

    def test_bad_path_refused(self):
        """A dot segment is refused with 400 even when correctly signed."""
        raw = "/upload/a/%2e%2e/b.txt"
        head = request_head(
            "PUT", raw + "?" + v_query("a/../b.txt", 3), 3, ("Expect: 100-continue",)
        )
        self.refused(head, http.BAD_REQUEST)

    def test_not_under_prefix(self):
        """A PUT outside the upload prefix is 404."""
        head = request_head("PUT", "/elsewhere/b.txt?" + v_query("b.txt", 3), 3)
        channel, transport = self.server.connect()
        channel.dataReceived(head + b"abc")
        self.assertEqual(status(transport), http.NOT_FOUND)
        self.assertEqual(store_files(self.root), [])

    def test_chunked_hmac_needs_length(self):
        """A v/v2/token PUT without Content-Length is 411."""
        head = request_head(
            "PUT",
            "/upload/a.txt?" + v_query("a.txt", 3),
            None,
            ("Transfer-Encoding: chunked", "Expect: 100-continue"),
        )
        self.refused(head, http.LENGTH_REQUIRED)

    def test_unknown_method(self):
        """Unknown methods get 405 with Allow, before any body is read."""
        channel, transport = self.server.connect()
        channel.dataReceived(request_head("DELETE", "/upload/a.txt", 0))
        self.assertEqual(status(transport), http.NOT_ALLOWED)
        self.assertIn(b"Allow: OPTIONS, HEAD, GET, PUT", transport.value())

    def test_large_body_on_get_refused(self):
        """Non-upload requests may not make us spool a large body."""
        channel, transport = self.server.connect()
        channel.dataReceived(request_head("GET", "/upload/a.txt", 10**9))
        self.assertEqual(status(transport), http.REQUEST_ENTITY_TOO_LARGE)
        self.assertTrue(transport.disconnecting)

    def test_refusal_with_body_in_same_packet(self):
        """A refused small body that arrives with its headers is drained, answered once."""
        channel, transport = self.server.connect()
        channel.dataReceived(put_head("a.txt", 3, v_query("a.txt", 4)) + b"abc")
        self.assertEqual(status(transport), http.FORBIDDEN)
        self.assertEqual(transport.value().count(b"HTTP/1.1 "), 1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(store_files(self.root), [])

    def test_refusal_drains_small_body(self):
        """Without Expect, a small refused body is read and dropped, then the connection closes."""
        channel, transport = self.server.connect()
        channel.dataReceived(put_head("a.txt", 3000, v_query("a.txt", 1)))
        self.assertEqual(status(transport), http.FORBIDDEN)
        self.assertFalse(transport.disconnecting)
        channel.dataReceived(b"x" * 3000)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(store_files(self.root), [])

    def test_refusal_cuts_off_large_body(self):
        """A refused body larger than the drain limit is not read at all."""
        size = DRAIN_LIMIT + 1
        channel, transport = self.server.connect()
        channel.dataReceived(put_head("a.txt", size, v_query("a.txt", 1)) + b"x" * 100)
        self.assertEqual(status(transport), http.FORBIDDEN)
        self.assertTrue(transport.disconnecting)
        self.server.clock.advance(0)
        self.assertEqual(transport.value().count(b"HTTP/1.1 "), 1)

    def test_refused_chunked_body_cut_off_past_limit(self):
        """A refused chunked body is read and dropped up to the drain limit, then cut off."""
        channel, transport = self.server.connect()
        channel.dataReceived(
            request_head(
                "PUT",
                "/upload/a.txt?" + v_query("a.txt", 3),
                None,
                ("Transfer-Encoding: chunked",),
            )
        )
        self.assertEqual(status(transport), http.LENGTH_REQUIRED)
        self.assertFalse(transport.disconnecting)
        piece = b"x" * 65536
        for _ in range(DRAIN_LIMIT // len(piece) + 1):
            channel.dataReceived(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.server.clock.advance(0)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value().count(b"HTTP/1.1 "), 1)

    def test_zero_length_refused(self):
        """An empty PUT with a bad MAC is refused (the channel delivers it at once)."""
        channel, transport = self.server.connect()
        channel.dataReceived(put_head("empty.txt", 0, v_query("empty.txt", 1)))
        self.assertEqual(status(transport), http.FORBIDDEN)
        self.assertEqual(store_files(self.root), [])


class StreamingTests(SynchronousTestCase):
    """Accepted bodies go to a temp file as they arrive and into place at the end."""

    def setUp(self):
        self.root = self.mktemp()
        self.server = MemoryServer(self.root, chunk_size=4)

    def test_body_streams_to_temp_file(self):
        """
        After the headers of a body larger than the write buffer its temp exists, with no
        name a reader could ask for; bytes land in it before the body ends.
        """
        channel, transport = self.server.connect()
        body = b"0123456789" * 10
        channel.dataReceived(
            put_head(
                "d/e/f.bin", len(body), v_query("d/e/f.bin", len(body)), ("Expect: 100-continue",)
            )
        )
        self.assertIn(b"HTTP/1.1 100 Continue", transport.value())
        names = os.listdir(os.path.join(self.root, "d", "e"))
        self.assertEqual([name for name in names if not name.startswith(".")], [])
        (request,) = self.server.fs.uploads
        temp = request._upload._writer._file
        channel.dataReceived(body[:50])
        self.assertGreaterEqual(os.fstat(temp.fileno()).st_size, 48)
        channel.dataReceived(body[50:])
        self.assertEqual(status(transport), http.CREATED)
        self.assertEqual(store_files(self.root), ["d", "d/e", "d/e/f.bin"])
        with open(os.path.join(self.root, "d", "e", "f.bin"), "rb") as f:
            self.assertEqual(f.read(), body)

    def test_record_written(self):
        """The record (type, size, hash, protocol) exists when the 201 goes out."""
        channel, transport = self.server.connect()
        body = b"hello"
        channel.dataReceived(
            put_head("r.jpg", 5, v2_query("r.jpg", 5, "image/jpeg"), ("Content-Type: image/jpeg",))
            + body
        )
        self.assertEqual(status(transport), http.CREATED)
        record = self.successResultOf(self.server.fs.metadata.get("r.jpg"))
        self.assertEqual(
            (record.size, record.content_type, record.protocol, record.sha256),
            (
                5,
                "image/jpeg",
                "v2",
                "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824",
            ),
        )

    def test_record_carries_file_ttl(self):
        """With FileTTL set, the record expires TTL seconds after the upload."""
        self.server.clock.advance(1000)
        self.server.fs.file_ttl = 3600
        channel, transport = self.server.connect()
        channel.dataReceived(put_head("t.bin", 1, v_query("t.bin", 1)) + b"x")
        self.assertEqual(status(transport), http.CREATED)
        record = self.successResultOf(self.server.fs.metadata.get("t.bin"))
        self.assertEqual(record.expires, 1000 + 3600)

    def test_disconnect_leaves_nothing(self):
        """A client lost mid-body leaves no file and no new directory behind."""
        channel, _ = self.server.connect()
        channel.dataReceived(put_head("x/y.bin", 100, v_query("x/y.bin", 100)) + b"a" * 40)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(store_files(self.root), [])

    def test_retry_after_disconnect(self):
        """The same signed URL works again after a broken upload."""
        head = put_head("x/y.bin", 10, v_query("x/y.bin", 10))
        channel, transport = self.server.connect()
        channel.dataReceived(head + b"a" * 5)
        channel.connectionLost(Failure(ConnectionDone()))
        channel, transport = self.server.connect()
        channel.dataReceived(head + b"b" * 10)
        self.assertEqual(status(transport), http.CREATED)
        with open(os.path.join(self.root, "x", "y.bin"), "rb") as f:
            self.assertEqual(f.read(), b"b" * 10)

    def test_zero_length_upload(self):
        """An empty file can be uploaded."""
        channel, transport = self.server.connect()
        channel.dataReceived(put_head("empty.txt", 0, v_query("empty.txt", 0)))
        self.assertEqual(status(transport), http.CREATED)
        self.assertEqual(os.path.getsize(os.path.join(self.root, "empty.txt")), 0)

    def test_race_for_one_name(self):
        """A second upload of a name in progress is 409 before its body; the first wins."""
        head = put_head("same.txt", 5, v_query("same.txt", 5))
        first, firstTransport = self.server.connect()
        second, secondTransport = self.server.connect()
        first.dataReceived(head)
        second.dataReceived(head)
        self.assertEqual(status(secondTransport), http.CONFLICT)
        second.dataReceived(b"22222")
        first.dataReceived(b"11111")
        self.assertEqual(status(firstTransport), http.CREATED)
        self.assertEqual(store_files(self.root), ["same.txt"])
        with open(os.path.join(self.root, "same.txt"), "rb") as f:
            self.assertEqual(f.read(), b"11111")

    def test_race_for_one_file_under_two_names(self):
        """Two names of one file (a link in the store): the first to finish wins, then 409."""
        os.makedirs(os.path.join(self.root, "d"))
        os.symlink("d", os.path.join(self.root, "alias"))
        first, firstTransport = self.server.connect()
        second, secondTransport = self.server.connect()
        first.dataReceived(put_head("d/same.txt", 5, v_query("d/same.txt", 5)))
        second.dataReceived(put_head("alias/same.txt", 5, v_query("alias/same.txt", 5)))
        second.dataReceived(b"22222")
        first.dataReceived(b"11111")
        self.assertEqual(status(secondTransport), http.CREATED)
        self.assertEqual(status(firstTransport), http.CONFLICT)
        self.assertEqual(store_files(self.root), ["alias", "d", "d/same.txt"])
        with open(os.path.join(self.root, "d", "same.txt"), "rb") as f:
            self.assertEqual(f.read(), b"22222")

    def test_disk_full_mid_body(self):
        """A write error mid-body answers 507, removes the temp file, closes."""

        def full(upload, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        channel, transport = self.server.connect()
        channel.dataReceived(put_head("full.bin", 10, v_query("full.bin", 10)))
        self.patch(WholeUpload, "write", full)
        channel.dataReceived(b"0123456789")
        self.server.clock.advance(0)
        self.assertEqual(status(transport), INSUFFICIENT_STORAGE)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(store_files(self.root), [])

    def test_temp_open_failure_leaves_no_directories(self):
        """If the temp file cannot be opened, the directories made for it are removed again."""
        realOpen = os.open

        def noDescriptors(path, flags, *args):
            if flags & os.O_EXCL or flags & os.O_TMPFILE == os.O_TMPFILE:
                raise OSError(errno.EMFILE, "Too many open files")
            return realOpen(path, flags, *args)

        self.patch(os, "open", noDescriptors)
        channel, transport = self.server.connect()
        # A body this small is put on disk only at commit, after its last byte.
        channel.dataReceived(put_head("n/e/w.bin", 3, v_query("n/e/w.bin", 3)) + b"new")
        self.assertEqual(status(transport), http.INTERNAL_SERVER_ERROR)
        self.assertEqual(store_files(self.root), [])
        self.flushLoggedErrors()

    def test_record_failure_withdraws_file(self):
        """If the record cannot be written, the file is taken back and the client told 503."""
        deleted = []
        self.patch(self.server.fs.metadata, "put", lambda record: fail(OSError("db down")))
        self.patch(
            self.server.fs.metadata, "delete", lambda path: deleted.append(path) or fail(OSError())
        )
        channel, transport = self.server.connect()
        channel.dataReceived(put_head("m/n.txt", 3, v_query("m/n.txt", 3)) + b"abc")
        self.assertEqual(status(transport), http.SERVICE_UNAVAILABLE)
        self.assertIn(b"Retry-After: 30", transport.value())
        self.assertEqual(store_files(self.root), [])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual(deleted, ["m/n.txt"], "a late write of the record is taken back")


class BearerTests(SynchronousTestCase):
    """JWT slots, including chunked bodies whose size only the token knows."""

    def setUp(self):
        self.root = self.mktemp()
        self.server = MemoryServer(self.root)
        self.server.clock.advance(1_800_000_000)

    def token(self, filesize: int, **kw) -> str:
        claims = dict(
            slot="slot1",
            filename="pic.png",
            filesize=filesize,
            filetype="image/png",
            exp=1_800_000_300,
            iat=1_800_000_000,
            sub="alice@example.org",
            expires=1_800_600_000,
        )
        claims.update(kw)
        return auth.sign_jwt(SECRET, **claims)

    def head(self, token: str, length: int | None, *headers: str) -> bytes:
        return request_head(
            "PUT", "/upload/slot1/pic.png", length, (f"Authorization: Bearer {token}", *headers)
        )

    def test_chunked_upload(self):
        """A chunked body whose final count equals filesize is stored with the token's facts."""
        channel, transport = self.server.connect()
        channel.dataReceived(self.head(self.token(6), None, "Transfer-Encoding: chunked"))
        channel.dataReceived(chunked(b"abc", b"def"))
        self.assertEqual(status(transport), http.CREATED)
        record = self.successResultOf(self.server.fs.metadata.get("slot1/pic.png"))
        self.assertEqual(
            (record.uploader, record.expires, record.content_type, record.protocol),
            ("alice@example.org", 1_800_600_000, "image/png", "jwt"),
        )

    def test_chunked_overflow_aborts(self):
        """More chunked bytes than the token's filesize: connection aborted, nothing kept."""
        channel, transport = self.server.connect()
        channel.dataReceived(self.head(self.token(4), None, "Transfer-Encoding: chunked"))
        channel.dataReceived(chunked(b"abc", b"def"))
        self.assertTrue(transport.disconnected)
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(store_files(self.root), [])

    def test_chunked_short_body(self):
        """Fewer chunked bytes than filesize: 400 and nothing kept."""
        channel, transport = self.server.connect()
        channel.dataReceived(self.head(self.token(10), None, "Transfer-Encoding: chunked"))
        channel.dataReceived(chunked(b"abc"))
        self.assertEqual(status(transport), http.BAD_REQUEST)
        self.assertEqual(store_files(self.root), [])

    def test_length_mismatch(self):
        """Content-Length above the token's filesize is 413, below it 400."""
        for length, code in ((7, http.REQUEST_ENTITY_TOO_LARGE), (5, http.BAD_REQUEST)):
            channel, transport = self.server.connect()
            channel.dataReceived(self.head(self.token(6), length, "Expect: 100-continue"))
            self.assertEqual(status(transport), code)
        self.assertEqual(store_files(self.root), [])

    def test_expired(self):
        """An expired token is 403."""
        channel, transport = self.server.connect()
        channel.dataReceived(self.head(self.token(6, exp=1_800_000_000), 6))
        self.assertEqual(status(transport), http.FORBIDDEN)

    def test_other_name(self):
        """A token for one file name cannot upload another."""
        channel, transport = self.server.connect()
        channel.dataReceived(self.head(self.token(6, filename="other.png"), 6))
        self.assertEqual(status(transport), http.FORBIDDEN)


class DeclaredLengthTests(SynchronousTestCase):
    """Chunked v/v2/token bodies with the signed size in X-Upload-Length."""

    def setUp(self):
        self.root = self.mktemp()
        self.server = MemoryServer(self.root)

    def head(self, size: int, declared: str, signed: int | None = None) -> bytes:
        signed = size if signed is None else signed
        return request_head(
            "PUT",
            "/upload/c.bin?" + v_query("c.bin", signed),
            None,
            ("Transfer-Encoding: chunked", f"X-Upload-Length: {declared}"),
        )

    def test_chunked_with_declared_length(self):
        """The MAC is checked against X-Upload-Length and the final count must match."""
        channel, transport = self.server.connect()
        channel.dataReceived(self.head(6, "6") + chunked(b"abc", b"def"))
        self.assertEqual(status(transport), http.CREATED)
        with open(os.path.join(self.root, "c.bin"), "rb") as f:
            self.assertEqual(f.read(), b"abcdef")

    def test_declared_length_signed_differently(self):
        """A declared length the MAC was not made for is 403, before the body."""
        channel, transport = self.server.connect()
        channel.dataReceived(self.head(6, "7"))
        self.assertEqual(status(transport), http.FORBIDDEN)

    def test_body_shorter_or_longer_than_declared(self):
        """Fewer bytes than declared: 400; more: the connection is cut; nothing kept."""
        channel, transport = self.server.connect()
        channel.dataReceived(self.head(6, "6") + chunked(b"abc"))
        self.assertEqual(status(transport), http.BAD_REQUEST)
        channel, transport = self.server.connect()
        channel.dataReceived(self.head(6, "6") + chunked(b"abcdefg"))
        self.assertTrue(transport.disconnected)
        self.assertEqual(store_files(self.root), [])

    def test_bad_declared_length(self):
        """A declared length that is not a number is 411."""
        for declared in ("", "-1", "6.0", "٦"):
            channel, transport = self.server.connect()
            channel.dataReceived(self.head(6, declared))
            self.assertEqual(status(transport), http.LENGTH_REQUIRED, declared)


class TwistedInternalsTests(SynchronousTestCase):
    """Regression guards for the HTTPChannel behaviour the upload depends on."""

    def test_gotLength_sees_request_line_before_body(self):
        """gotLength runs after the headers, before the body, with the request line known."""
        seen = []

        class Recording(UploadRequest):
            def gotLength(self, length):
                seen.append(
                    (self.channel._command, self.channel._path, self.channel._version, length)
                )
                super().gotLength(length)

        server = MemoryServer(self.mktemp())
        server.site.requestFactory = Recording
        channel, _ = server.connect()
        channel.dataReceived(put_head("a.txt", 3, v_query("a.txt", 3)))
        self.assertEqual(
            seen, [(b"PUT", b"/upload/a.txt?" + v_query("a.txt", 3).encode(), b"HTTP/1.1", 3)]
        )


class SyncUploadsTests(SynchronousTestCase):
    """SyncUploads = false: the Go server's trade-off, uploads answered without an fsync."""

    def test_no_fsync(self):
        """An upload is stored with no fsync on the way; with the default, four."""
        synced = []
        realFsync = os.fsync
        self.patch(os, "fsync", lambda fd: (synced.append(fd), realFsync(fd)))
        server = MemoryServer(self.mktemp(), sync_uploads=False)
        channel, transport = server.connect()
        channel.dataReceived(put_head("n/e/w.bin", 3, v_query("n/e/w.bin", 3)) + b"new")
        self.assertEqual(status(transport), http.CREATED)
        self.assertEqual(synced, [])
        with_sync = MemoryServer(self.mktemp(), io_uring=False)
        channel, transport = with_sync.connect()
        channel.dataReceived(put_head("n/e/w.bin", 3, v_query("n/e/w.bin", 3)) + b"new")
        self.assertEqual(status(transport), http.CREATED)
        self.assertEqual(len(synced), 4)  # the file, n/e, n and the root

    def test_through_the_ring(self):
        """
        With io_uring the same four fsyncs are made: the file's alone (nothing to go with
        it), then its directory and the parents of the directories made for it, together.
        """
        rings, why = Rings.open()
        if rings is None:
            raise SkipTest(f"no io_uring here: {why}")
        sets = []
        realFsyncAll = Rings.fsync_all
        realFsync = os.fsync
        self.patch(os, "fsync", lambda fd: (sets.append("alone"), realFsync(fd)))
        self.patch(
            Rings,
            "fsync_all",
            lambda self, fds: (sets.append(len(fds)), realFsyncAll(self, fds))[1],
        )
        server = MemoryServer(self.mktemp())
        channel, transport = server.connect()
        channel.dataReceived(put_head("n/e/w.bin", 3, v_query("n/e/w.bin", 3)) + b"new")
        self.assertEqual(status(transport), http.CREATED)
        self.assertEqual(sets, ["alone", 3])


class _HeldThreads:
    """A FileServer.blocking whose calls wait until the test runs them, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, Deferred]] = []

    def __call__(self, f) -> Deferred:
        d = Deferred()
        self.calls.append((f, d))
        return d

    def runOne(self) -> None:
        f, d = self.calls.pop(0)
        try:
            result = f()
        except BaseException:
            d.errback()
        else:
            d.callback(result)

    def runAll(self) -> None:
        while self.calls:
            self.runOne()


class GroupCommitTests(SynchronousTestCase):
    """Uploads finishing while every commit lane is busy are committed together."""

    def setUp(self):
        self.root = self.mktemp()
        self.threads = _HeldThreads()
        # One fsync at a time: RingGroupCommitTests has the batches of io_uring.
        self.server = MemoryServer(self.root, io_uring=False)
        self.server.fs.blocking = self.threads
        self.server.fs.uploads.committer.lanes = 1
        self.synced: list[str] = []
        fsync_directory = local_storage.fsync_directory

        def counting(directory):
            self.synced.append(directory)
            fsync_directory(directory)

        self.patch(local_storage, "fsync_directory", counting)

    def put(self, name: str, body: bytes):
        channel, transport = self.server.connect()
        channel.dataReceived(put_head(name, len(body), v_query(name, len(body))) + body)
        return transport

    def test_batch(self):
        """
        The first upload takes the lane; the two finishing meanwhile go to it together, in one
        hand-off, with one fsync of the directory they share; every one gets its 201.  The
        first also made that directory: the store's root is fsynced once, after it.
        """
        first = self.put("d/a.txt", b"aaa")
        self.assertEqual(len(self.threads.calls), 1)
        second, third = self.put("d/b.txt", b"bb"), self.put("d/c.txt", b"c")
        self.assertEqual(len(self.threads.calls), 1)  # they wait for the lane
        self.threads.runOne()
        self.assertEqual(len(self.threads.calls), 1)  # b and c, together
        root = self.server.fs.store_dir
        self.assertEqual(self.synced, [os.path.join(root, "d"), root])
        self.threads.runOne()
        self.server.clock.advance(0)
        self.assertEqual(self.synced, [os.path.join(root, "d"), root, os.path.join(root, "d")])
        self.assertEqual([status(t) for t in (first, second, third)], [http.CREATED] * 3)
        self.assertEqual(store_files(self.root), ["d", "d/a.txt", "d/b.txt", "d/c.txt"])
        record = self.successResultOf(self.server.fs.metadata.get("d/c.txt"))
        self.assertEqual(record.sha256, hashlib.sha256(b"c").hexdigest())

    def test_conflict_in_batch(self):
        """One upload of a batch meeting an existing name gets its 409; the others are stored."""
        first = self.put("a.txt", b"aaa")
        second, third = self.put("b.txt", b"bb"), self.put("c.txt", b"c")
        with open(os.path.join(self.root, "b.txt"), "wb") as f:
            f.write(b"already")
        self.threads.runAll()
        self.server.clock.advance(0)
        self.assertEqual(
            [status(t) for t in (first, second, third)], [http.CREATED, http.CONFLICT, http.CREATED]
        )
        with open(os.path.join(self.root, "b.txt"), "rb") as f:
            self.assertEqual(f.read(), b"already")
        self.assertEqual(store_files(self.root), ["a.txt", "b.txt", "c.txt"])

    def test_lanes(self):
        """With lanes free, each upload is committed at once, in a hand-off of its own."""
        self.server.fs.uploads.committer.lanes = 2
        self.put("a.txt", b"a")
        self.put("b.txt", b"b")
        self.assertEqual(len(self.threads.calls), 2)
        self.put("c.txt", b"c")
        self.assertEqual(len(self.threads.calls), 2)
        self.threads.runAll()
        self.assertEqual(store_files(self.root), ["a.txt", "b.txt", "c.txt"])


class RingGroupCommitTests(SynchronousTestCase):
    """
    With io_uring, small bodies are committed in a lane of their own, one batch at a time
    (the largest batches), and never behind a large body's commit.
    """

    def setUp(self):
        rings, why = Rings.open()
        if rings is None:
            raise SkipTest(f"no io_uring here: {why}")
        self.root = self.mktemp()
        self.threads = _HeldThreads()
        self.server = MemoryServer(self.root)
        self.server.fs.blocking = self.threads
        self.committer = self.server.fs.uploads.committer

    def put(self, name: str, body: bytes):
        channel, transport = self.server.connect()
        channel.dataReceived(put_head(name, len(body), v_query(name, len(body))) + body)
        return transport

    def test_one_small_lane(self):
        """However many lanes the others have, small bodies wait for the one of theirs."""
        self.committer.lanes = 4
        first = self.put("a/1.bin", b"1")
        second, third = self.put("b/2.bin", b"2"), self.put("c/3.bin", b"3")
        self.assertEqual(len(self.threads.calls), 1)
        self.threads.runOne()
        self.assertEqual(len(self.threads.calls), 1)  # 2 and 3 together
        self.threads.runOne()
        self.server.clock.advance(0)
        self.assertEqual([status(t) for t in (first, second, third)], [http.CREATED] * 3)
        self.assertEqual(store_files(self.root), ["a", "a/1.bin", "b", "b/2.bin", "c", "c/3.bin"])

    def test_pieces_not_in_the_small_lane(self):
        """
        A resumable upload's piece commits on its own, however small (the last one hashes
        and adopts the whole file): it goes to the other lanes, and small bodies pass it.
        """

        class Piece(Sink):
            def commit(self):
                return Partial(self.size)

        piece = self.committer.submit(Piece(self.server.fs, "p.bin", 10))
        self.assertEqual((self.committer._batcher.busy, self.committer._small.busy), (1, 0))
        small = self.put("small.bin", b"s")
        self.assertEqual((self.committer._batcher.busy, self.committer._small.busy), (1, 1))
        f, d = self.threads.calls.pop(1)
        d.callback(f())
        self.server.clock.advance(0)
        self.assertEqual(status(small), http.CREATED)
        self.assertNoResult(piece)
        self.threads.runAll()
        self.assertEqual(self.successResultOf(piece), Partial(10))

    def test_not_behind_a_large_body(self):
        """A small body finishing while a large one's commit runs is committed meanwhile."""
        size = MAX_WRITE_BUFFER + 1
        big = self.put("big.bin", b"b" * size)
        while not self.committer._batcher.busy:
            self.threads.runOne()  # its spooling, up to its commit
        self.assertEqual(len(self.threads.calls), 1)
        small = self.put("small.bin", b"s")
        self.assertEqual(len(self.threads.calls), 2)
        f, d = self.threads.calls.pop(1)
        d.callback(f())
        self.server.clock.advance(0)
        self.assertEqual(status(small), http.CREATED)
        self.assertEqual(big.value(), b"")  # no answer yet
        self.threads.runAll()
        self.server.clock.advance(0)
        self.assertEqual(status(big), http.CREATED)
        self.assertEqual(store_files(self.root), ["big.bin", "small.bin"])


class SpoolTests(SynchronousTestCase):
    """A large body is written and hashed in a worker thread while the reactor reads on."""

    def setUp(self):
        self.root = self.mktemp()
        self.threads = _HeldThreads()
        self.server = MemoryServer(self.root)
        self.server.fs.blocking = self.threads
        self.size = SPOOL_HIGH + 3 * MAX_WRITE_BUFFER
        self.body = os.urandom(self.size)
        self.channel, self.transport = self.server.connect()
        self.channel.dataReceived(put_head("big.bin", self.size, v_query("big.bin", self.size)))

    def test_backlog_pauses_reading(self):
        """
        Past SPOOL_HIGH bytes not yet written, reading pauses; once the thread has written
        down to SPOOL_LOW it goes on, and the file is whole, hashed from the thread.
        """
        self.assertEqual(self.transport.bufferSize, READ_SIZE)
        step = MAX_WRITE_BUFFER
        sent = 0
        while self.transport.producerState == "producing":
            self.channel.dataReceived(self.body[sent : sent + step])
            sent += step
        self.assertEqual(sent, SPOOL_HIGH + step)
        self.threads.runOne()  # the first 64 KiB batch: still far behind
        self.assertEqual(self.transport.producerState, "paused")
        self.threads.runAll()
        self.assertEqual(self.transport.producerState, "producing")
        self.channel.dataReceived(self.body[sent:])
        self.threads.runAll()
        self.server.clock.advance(0)
        self.assertEqual(status(self.transport), http.CREATED)
        with open(os.path.join(self.root, "big.bin"), "rb") as f:
            self.assertEqual(f.read(), self.body)
        record = self.successResultOf(self.server.fs.metadata.get("big.bin"))
        self.assertEqual(record.sha256, hashlib.sha256(self.body).hexdigest())

    def test_write_error_in_thread(self):
        """A disk full met by the thread is 507 at the next bytes, and nothing is left."""

        def full(self, batch):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(LocalWriter, "_spool", full)
        self.channel.dataReceived(self.body[:MAX_WRITE_BUFFER])
        self.threads.runAll()
        self.channel.dataReceived(self.body[MAX_WRITE_BUFFER : 2 * MAX_WRITE_BUFFER])
        self.server.clock.advance(0)
        self.assertEqual(status(self.transport), INSUFFICIENT_STORAGE)
        self.assertEqual(store_files(self.root), [])

    def test_write_error_on_last_batch(self):
        """A write failing after the last byte came is 507 too, and nothing is left."""
        self.channel.dataReceived(self.body[:-1])
        self.threads.runAll()

        def full(self, batch):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(LocalWriter, "_spool", full)
        self.channel.dataReceived(self.body[-1:])
        self.threads.runAll()
        self.server.clock.advance(0)
        self.assertEqual(status(self.transport), INSUFFICIENT_STORAGE)
        self.assertEqual(store_files(self.root), [])

    def test_client_gone_while_thread_writes(self):
        """
        A client lost while a batch is in the thread: the temp file goes at once, its
        descriptor only once the thread is done with it.
        """
        self.channel.dataReceived(self.body[: 2 * MAX_WRITE_BUFFER])
        self.assertEqual(len(self.threads.calls), 1)
        (request,) = self.server.fs.uploads
        writer = request._upload._writer
        self.channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(store_files(self.root), [])
        self.assertFalse(writer._file.closed)
        self.threads.runAll()
        self.assertTrue(writer._file.closed)
        self.assertEqual(store_files(self.root), [])

    def test_read_size_restored_on_a_kept_alive_connection(self):
        """After a large upload's 201 the connection reads as any other again: 64 KiB."""
        self.assertEqual(self.transport.bufferSize, READ_SIZE)
        for start in range(0, self.size, MAX_WRITE_BUFFER):
            self.channel.dataReceived(self.body[start : start + MAX_WRITE_BUFFER])
            self.threads.runAll()
        self.threads.runAll()
        self.server.clock.advance(0)
        self.assertEqual(status(self.transport), http.CREATED)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.transport.bufferSize, 64 * 1024)

    def test_read_size_under_a_bandwidth_limit(self):
        """Under MaxBytesPerSecond a large upload reads a sixteenth of a second's worth."""
        self.server.fs.max_bytes_per_second = 4 * READ_SIZE
        channel, transport = self.server.connect()
        channel.dataReceived(put_head("b.bin", self.size, v_query("b.bin", self.size)))
        self.assertEqual(transport.bufferSize, READ_SIZE // 4)
        self.server.fs.max_bytes_per_second = 1000
        channel, transport = self.server.connect()
        channel.dataReceived(put_head("c.bin", self.size, v_query("c.bin", self.size)))
        self.assertEqual(transport.bufferSize, 64 * 1024)

    def test_write_error_while_paused_for_the_disk(self):
        """
        A write failing while reading is paused for the disk resumes reading, so that the
        next bytes meet the error and get 507, not a connection left paused until it idles
        out.
        """
        sent = 0
        while self.transport.producerState == "producing":
            self.channel.dataReceived(self.body[sent : sent + MAX_WRITE_BUFFER])
            sent += MAX_WRITE_BUFFER
        _, d = self.threads.calls.pop(0)
        d.errback(Failure(OSError(errno.ENOSPC, "No space left on device")))
        self.assertEqual(self.transport.producerState, "producing")
        self.channel.dataReceived(self.body[sent : sent + MAX_WRITE_BUFFER])
        self.server.clock.advance(0)
        self.assertEqual(status(self.transport), INSUFFICIENT_STORAGE)
        self.assertEqual(store_files(self.root), [])

    def test_disk_and_rate_pauses_together(self):
        """
        Reading held back for the disk and for MaxBytesPerSecond at once goes on only when
        neither holds it any more, whichever ends first.
        """
        self.server.fs.max_bytes_per_second = 1_000_000
        channel, transport = self.server.connect()
        channel.dataReceived(put_head("both.bin", self.size, v_query("both.bin", self.size)))
        for start in range(0, SPOOL_HIGH + MAX_WRITE_BUFFER, MAX_WRITE_BUFFER):
            # StringTransport delivers what the test sends, paused or not.
            channel.dataReceived(self.body[start : start + MAX_WRITE_BUFFER])
        self.assertEqual(transport.producerState, "paused")
        self.threads.runAll()  # the disk has caught up; the rate has not
        self.assertEqual(transport.producerState, "paused")
        self.server.clock.advance(60)
        self.assertEqual(transport.producerState, "producing")
