"""
Resumable uploads: Content-Range pieces on the same signed URL, across
connections, with broken connections in between.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time

from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hmacd import auth
from hmacd.housekeeping import sweep_resumable
from tests.support import SECRET, LoopbackServer, MemoryServer, store_files, v2_query, v_query
from tests.test_http import body_of, raw_request
from tests.test_upload import request_head, status

DATA = bytes(range(256)) * 40  # 10,240 bytes
TOTAL = len(DATA)


def piece(path: str, first: int, last: int, total: int, query: str | None = None) -> bytes:
    head = request_head(
        "PUT",
        f"/upload/{path}?{query or v_query(path, total)}",
        last - first + 1,
        (f"Content-Range: bytes {first}-{last}/{total}",),
    )
    return head + DATA[first : last + 1]


def header_value(transport, name: bytes) -> bytes | None:
    response = transport.value().rsplit(b"HTTP/1.1 ", 1)[-1]
    for line in response.split(b"\r\n"):
        if line.lower().startswith(name.lower() + b":"):
            return line.split(b":", 1)[1].strip()
    return None


class ResumableTests(SynchronousTestCase):
    def setUp(self):
        self.root = self.mktemp()
        self.server = MemoryServer(self.root)

    def send(self, data: bytes):
        channel, transport = self.server.connect()
        channel.dataReceived(data)
        return channel, transport

    def query(self, path="f.bin", total=TOTAL):
        return self.send(
            request_head(
                "PUT",
                f"/upload/{path}?{v_query(path, total)}",
                0,
                (f"Content-Range: bytes */{total}",),
            )
        )[1]

    def test_pieces_on_separate_connections(self):
        """Three pieces, each on its own connection: 308, 308, then 201 and the whole file."""
        total = len(DATA)
        _, t1 = self.send(piece("f.bin", 0, 4095, total))
        self.assertEqual(status(t1), 308)
        self.assertIn(b"308 Resume Incomplete", t1.value())
        self.assertEqual(header_value(t1, b"Range"), b"bytes=0-4095")
        _, t2 = self.send(piece("f.bin", 4096, 8191, total))
        self.assertEqual(header_value(t2, b"Range"), b"bytes=0-8191")
        self.assertEqual(store_files(self.root), [])  # nothing visible yet
        _, t3 = self.send(piece("f.bin", 8192, total - 1, total))
        self.assertEqual(status(t3), 201)
        with open(os.path.join(self.root, "f.bin"), "rb") as f:
            self.assertEqual(f.read(), DATA)
        record = self.successResultOf(self.server.fs.metadata.get("f.bin"))
        self.assertEqual((record.size, record.sha256), (total, hashlib.sha256(DATA).hexdigest()))
        self.assertEqual(os.listdir(os.path.join(self.root, ".hmacfs", "partial")), [])

    def test_offset_query(self):
        """PUT with "bytes */total" tells the offset: none yet, then what arrived."""
        t = self.query()
        self.assertEqual((status(t), header_value(t, b"Range")), (308, None))
        self.send(piece("f.bin", 0, 999, len(DATA)))
        t = self.query()
        self.assertEqual((status(t), header_value(t, b"Range")), (308, b"bytes=0-999"))

    def test_gap_and_overlap(self):
        """A piece that does not start at the offset is 416 with the offset in Range."""
        self.send(piece("f.bin", 0, 999, len(DATA)))
        for first, last in ((2000, 2999), (500, 1499), (0, 999)):
            _, t = self.send(piece("f.bin", first, last, len(DATA)))
            self.assertEqual(status(t), 416, (first, last))
            self.assertEqual(header_value(t, b"Range"), b"bytes=0-999")
        t = self.query()
        self.assertEqual(header_value(t, b"Range"), b"bytes=0-999")

    def test_total_is_what_is_signed(self):
        """The MAC covers the total: a different total, or a piece's own length, is 403."""
        total = len(DATA)
        _, t = self.send(piece("f.bin", 0, 999, total, query=v_query("f.bin", total + 1)))
        self.assertEqual(status(t), 403)
        _, t = self.send(piece("f.bin", 0, 999, total, query=v_query("f.bin", 1000)))
        self.assertEqual(status(t), 403)
        _, t = self.send(
            piece("f.bin", 0, 999, total, query=v2_query("f.bin", total, None))
        )  # v2 signs the total too
        self.assertEqual(status(t), 308)

    def test_bad_content_range(self):
        """Malformed or inconsistent Content-Range, or a length that does not match: 400."""
        for value in ("bytes 5-4/10", "bytes 0-10/10", "items 0-1/2", "bytes 0-1", "bytes a-b/c"):
            head = request_head(
                "PUT", f"/upload/f.bin?{v_query('f.bin', 10)}", 2, (f"Content-Range: {value}",)
            )
            _, t = self.send(head + b"xx")
            self.assertEqual(status(t), 400, value)
        _, t = self.send(
            request_head(
                "PUT",
                f"/upload/f.bin?{v_query('f.bin', 10)}",
                3,
                ("Content-Range: bytes 0-1/10",),
            )
            + b"xxx"
        )
        self.assertEqual(status(t), 400)

    def test_broken_piece_keeps_what_arrived(self):
        """A piece cut off mid-body keeps its bytes; the client resumes from there."""
        total = len(DATA)
        channel, _ = self.server.connect()
        channel.dataReceived(piece("f.bin", 0, total - 1, total)[: -(total - 3000)])
        channel.connectionLost(Failure(ConnectionDone()))
        t = self.query()
        offset = int(header_value(t, b"Range").split(b"-")[1]) + 1
        self.assertGreater(offset, 0)
        self.assertLessEqual(offset, 3000)
        _, t = self.send(piece("f.bin", offset, total - 1, total))
        self.assertEqual(status(t), 201)
        with open(os.path.join(self.root, "f.bin"), "rb") as f:
            self.assertEqual(f.read(), DATA)

    def test_one_piece_at_a_time(self):
        """While one piece of a file is arriving, another for the same file is 409."""
        total = len(DATA)
        first, t1 = self.server.connect()
        first.dataReceived(piece("f.bin", 0, 4095, total)[:-100])
        _, t2 = self.send(piece("f.bin", 0, 4095, total))
        self.assertEqual(status(t2), 409)
        first.dataReceived(piece("f.bin", 0, 4095, total)[-100:])
        self.assertEqual(status(t1), 308)

    def test_one_piece_at_a_time_across_processes(self):
        """
        Another server on the same StoreDir (a worker process: its own record of pieces in
        progress) gets 409 while a piece is arriving here, then takes up from its offset.
        """
        total = len(DATA)
        other = MemoryServer(self.root)
        first, t1 = self.server.connect()
        first.dataReceived(piece("f.bin", 0, 4095, total)[:-100])
        channel, t2 = other.connect()
        channel.dataReceived(piece("f.bin", 0, 4095, total))
        self.assertEqual(status(t2), 409)
        first.dataReceived(piece("f.bin", 0, 4095, total)[-100:])
        self.assertEqual(status(t1), 308)
        channel, t3 = other.connect()
        channel.dataReceived(piece("f.bin", 4096, total - 1, total))
        self.assertEqual(status(t3), 201)
        with open(os.path.join(self.root, "f.bin"), "rb") as f:
            self.assertEqual(f.read(), DATA)

    def test_existing_file(self):
        """Pieces for a name that exists are 409, and an offset query too."""
        with open(os.path.join(self.root, "f.bin"), "wb") as f:
            f.write(b"there")
        _, t = self.send(piece("f.bin", 0, 999, len(DATA)))
        self.assertEqual(status(t), 409)
        self.assertEqual(status(self.query()), 409)

    def test_chunked_body_with_content_range(self):
        """A chunked body whose size is its Content-Range's: the MAC covers the total."""
        from tests.test_upload import chunked

        head = request_head(
            "PUT",
            f"/upload/c.bin?{v_query('c.bin', TOTAL)}",
            None,
            ("Transfer-Encoding: chunked", f"Content-Range: bytes 0-{TOTAL - 1}/{TOTAL}"),
        )
        _, t = self.send(head + chunked(DATA[:5000], DATA[5000:]))
        self.assertEqual(status(t), 201)
        with open(os.path.join(self.root, "c.bin"), "rb") as f:
            self.assertEqual(f.read(), DATA)
        channel, t = self.server.connect()
        head = head.replace(b"c.bin", b"d.bin").replace(
            v_query("c.bin", TOTAL).encode(), v_query("d.bin", TOTAL).encode()
        )
        channel.dataReceived(head + chunked(DATA, b"extra"))
        self.assertTrue(t.disconnected, "more than the range: cut off")

    def test_jwt_pieces(self):
        """A JWT slot's filesize is the total; pieces of it complete the upload."""
        self.server.clock.advance(1_800_000_000)
        token = auth.sign_jwt(
            SECRET, slot="s", filename="v.mp4", filesize=len(DATA), filetype="video/mp4",
            exp=1_800_000_300,
        )  # fmt: skip
        bearer = (f"Authorization: Bearer {token}",)
        for first, last, code in ((0, 5119, 308), (5120, len(DATA) - 1, 201)):
            head = request_head(
                "PUT",
                "/upload/s/v.mp4",
                last - first + 1,
                (f"Content-Range: bytes {first}-{last}/{len(DATA)}", *bearer),
            )
            _, t = self.send(head + DATA[first : last + 1])
            self.assertEqual(status(t), code)
        record = self.successResultOf(self.server.fs.metadata.get("s/v.mp4"))
        self.assertEqual((record.content_type, record.protocol), ("video/mp4", "jwt"))

    def test_abandoned_uploads_swept(self):
        """Pieces left untouched for ResumableTTL are removed; fresher ones stay."""
        self.send(piece("old.bin", 0, 999, len(DATA)))
        self.send(piece("new.bin", 0, 999, len(DATA)))
        partial = os.path.join(self.root, ".hmacfs", "partial")
        old = hashlib.sha256(b"old.bin").hexdigest()
        for suffix in (".part", ".json"):
            os.utime(os.path.join(partial, old + suffix), (1000, 1000))
        # State files a crash left half-written: the old one goes, a fresh one may be in use.
        for name, when in ((old + ".json.0123.tmp", 1000), ("fresh.json.4567.tmp", 3000)):
            with open(os.path.join(partial, name), "w") as f:
                f.write("{")
            os.utime(os.path.join(partial, name), (when, when))
        removed = sweep_resumable(os.path.abspath(self.root), older_than=2000)
        self.assertEqual(removed, [old])
        self.assertEqual(len(os.listdir(partial)), 3)
        self.assertIn("fresh.json.4567.tmp", os.listdir(partial))
        self.assertEqual(status(self.query("new.bin")), 308)


class ResumableOverSocketsTests(TestCase):
    """Pieces over real sockets, with connections dropped at several offsets."""

    timeout = 120

    @inlineCallbacks
    def test_resume_after_disconnects(self):
        """A 24 MiB upload in 4 MiB pieces, two of them cut off, arrives byte-identical."""
        server = LoopbackServer(self)
        size, step = 24 * 2**20, 4 * 2**20
        data = body_of(size, "resume")
        query = v_query("big/video.mp4", size)
        target = "/upload/big/video.mp4?" + query

        def offset() -> int:
            response = raw_request(server, "PUT", target, b"", {"Content-Range": f"bytes */{size}"})
            assert response.code == 308, response.code
            held = response.headers.get("range")
            return int(held.split("-")[1]) + 1 if held else 0

        def cutOff(first: int, keep: int) -> None:
            last = min(first + step, size) - 1
            with socket.create_connection((server.host, server.portNumber)) as s:
                s.sendall(
                    f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {last - first + 1}\r\n"
                    f"Content-Range: bytes {first}-{last}/{size}\r\n\r\n".encode()
                    + data[first : first + keep]
                )
                time.sleep(0.2)

        def run() -> int:
            at, cuts = 0, [1_000_000, 3_000_001]
            while at < size:
                if cuts and at >= step:
                    cutOff(at, cuts.pop(0))
                    time.sleep(0.1)
                    at = offset()
                    continue
                last = min(at + step, size) - 1
                response = raw_request(
                    server,
                    "PUT",
                    target,
                    data[at : last + 1],
                    {"Content-Range": f"bytes {at}-{last}/{size}"},
                )
                if last + 1 == size:
                    return response.code
                assert response.code == 308, response.code
                at = offset()
            return 0

        code = yield deferToThread(run)
        self.assertEqual(code, 201)
        with open(os.path.join(server.root, "big", "video.mp4"), "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).digest(), hashlib.sha256(data).digest())
        self.assertEqual(store_files(server.root), ["big", "big/video.mp4"])
