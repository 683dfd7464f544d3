"""
MinFreeSpace: an upload that cannot fit is refused with 507 before its body (issue 14 item 7).
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http

from hmacd import auth
from hmacd.config import parse_config
from hmacd.upload import INSUFFICIENT_STORAGE, RESUME_INCOMPLETE
from tests.support import SECRET, MemoryServer, store_files, v_query
from tests.test_upload import chunked, put_head, request_head, status

KiB, MiB = 1024, 1024 * 1024


class FakeFileSystem:
    """statvfs of a file system with C{free} bytes available; records what was asked."""

    def __init__(self, free: int, block: int = 4096) -> None:
        self.free, self.block, self.asked = free, block, []

    def __call__(self, path: str):
        self.asked.append(path)
        return SimpleNamespace(f_bavail=self.free // self.block, f_frsize=self.block)


class FreeSpaceTests(SynchronousTestCase):
    """The declared size is checked against the free space less MinFreeSpace."""

    def setUp(self):
        self.root = self.mktemp()
        self.disk = FakeFileSystem(964 * KiB)
        self.server = MemoryServer(self.root, statvfs=self.disk, min_free_space=0)
        self.server.clock.advance(1_800_000_000)

    def refusedBeforeBody(self, head: bytes, body: bytes = b"") -> None:
        channel, transport = self.server.connect()
        channel.dataReceived(head)
        # The answer is out with no body byte sent: 0 bytes of the body were read.
        self.assertEqual(status(transport), INSUFFICIENT_STORAGE)
        self.assertNotIn(b"100 Continue", transport.value())
        # A chunked body is drained (up to DRAIN_LIMIT) so the client sees the answer.
        channel.dataReceived(body)
        self.assertTrue(transport.disconnecting)
        self.assertIsNone(channel.requests[0]._upload if channel.requests else None)
        self.server.clock.advance(0)
        self.assertEqual(store_files(self.root), [])
        self.assertEqual(self.disk.asked[-1], self.server.fs.store_dir)

    def test_content_length_past_free_space(self):
        """5 MiB with 964 KiB free: 507 before the body, with or without Expect."""
        self.refusedBeforeBody(put_head("big.bin", 5 * MiB, v_query("big.bin", 5 * MiB)))
        self.refusedBeforeBody(
            put_head("big.bin", 5 * MiB, v_query("big.bin", 5 * MiB), ("Expect: 100-continue",))
        )

    def test_declared_upload_length(self):
        """A chunked PUT is judged by its X-Upload-Length."""
        head = request_head(
            "PUT",
            "/upload/big.bin?" + v_query("big.bin", 5 * MiB),
            None,
            ("Transfer-Encoding: chunked", f"X-Upload-Length: {5 * MiB}"),
        )
        self.refusedBeforeBody(head, chunked(b"abc"))

    def test_token_filesize(self):
        """A chunked JWT upload is judged by the token's filesize."""
        token = auth.sign_jwt(
            SECRET, slot="s", filename="big.bin", filesize=5 * MiB, filetype=None,
            exp=1_800_000_300,
        )  # fmt: skip
        head = request_head(
            "PUT",
            "/upload/s/big.bin",
            None,
            ("Transfer-Encoding: chunked", f"Authorization: Bearer {token}"),
        )
        self.refusedBeforeBody(head, chunked(b"abc"))

    def test_resumable_piece_by_its_own_length(self):
        """A resumable piece needs room for itself, not for the whole upload."""
        total = 5 * MiB
        piece = b"x" * (100 * KiB)
        head = put_head(
            "big.bin",
            len(piece),
            v_query("big.bin", total),
            (f"Content-Range: bytes 0-{len(piece) - 1}/{total}",),
        )
        channel, transport = self.server.connect()
        channel.dataReceived(head + piece)
        self.assertEqual(status(transport), RESUME_INCOMPLETE)
        big = 2 * MiB
        head = put_head(
            "big.bin",
            big,
            v_query("big.bin", total),
            (f"Content-Range: bytes {len(piece)}-{len(piece) + big - 1}/{total}",),
        )
        self.refusedBeforeBody(head)

    def test_upload_that_fits_is_taken(self):
        """What fits is received and stored as ever."""
        channel, transport = self.server.connect()
        channel.dataReceived(put_head("small.bin", 10, v_query("small.bin", 10)) + b"0123456789")
        self.assertEqual(status(transport), http.CREATED)
        self.assertEqual(store_files(self.root), ["small.bin"])

    def test_recent_look(self):
        """
        Small uploads close together share one look at the free space, while they (with
        those let in since) take at most half of what it saw; near that, or once the look
        is FREE_SPACE_FRESH old, each looks again, and sees the disk as it is now.
        """

        def put(name: str, size: int) -> int:
            channel, transport = self.server.connect()
            channel.dataReceived(put_head(name, size, v_query(name, size)) + b"x" * size)
            return status(transport)

        self.assertEqual(put("a.bin", 100 * KiB), http.CREATED)
        self.assertEqual(put("b.bin", 100 * KiB), http.CREATED)
        self.assertEqual(len(self.disk.asked), 1)
        self.assertEqual(put("c.bin", 300 * KiB), http.CREATED)  # 500 KiB > 964 / 2
        self.assertEqual(len(self.disk.asked), 2)
        self.disk.free = 50 * KiB
        self.server.clock.advance(2 * self.server.fs.FREE_SPACE_FRESH)
        self.assertEqual(put("d.bin", 100 * KiB), INSUFFICIENT_STORAGE)
        self.assertEqual(len(self.disk.asked), 3)
        self.assertEqual(put("e.bin", 20 * KiB), http.CREATED)  # 2 x 20 KiB within 48 KiB
        self.assertEqual(len(self.disk.asked), 3)
        self.disk.free = 5 * KiB
        self.assertEqual(put("f.bin", 10 * KiB), INSUFFICIENT_STORAGE)  # 2 x 30 KiB: looks
        self.assertEqual(len(self.disk.asked), 4)

    def test_clock_back(self):
        """A look taken "after" now (the clock went back) is not recent: it looks again."""
        fs = self.server.fs
        self.assertTrue(fs.room_for(10))
        self.assertTrue(fs.room_for(10))
        self.assertEqual(len(self.disk.asked), 1)
        fs._freeSeenAt += 600  # as if the wall clock had been stepped back ten minutes
        self.assertTrue(fs.room_for(10))
        self.assertEqual(len(self.disk.asked), 2)

    def test_reserve(self):
        """MinFreeSpace is kept: with 100 MiB free and 64 MiB kept, 40 MiB is 507, 30 MiB not."""
        self.server.fs.min_free_space = 64 * MiB
        self.disk.free = 100 * MiB
        self.refusedBeforeBody(put_head("a.bin", 40 * MiB, v_query("a.bin", 40 * MiB)))
        channel, transport = self.server.connect()
        channel.dataReceived(put_head("b.bin", 30 * MiB, v_query("b.bin", 30 * MiB)))
        self.assertFalse(transport.disconnecting)  # receiving the body
        channel.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(store_files(self.root), [])

    def test_unknown_free_space(self):
        """A file system that cannot say how full it is does not block uploads."""

        def broken(path):
            raise OSError(38, "Function not implemented")

        self.server.fs.statvfs = broken
        channel, transport = self.server.connect()
        channel.dataReceived(put_head("a.bin", 3, v_query("a.bin", 3)) + b"abc")
        self.assertEqual(status(transport), http.CREATED)

    def test_bad_mac_is_still_403(self):
        """The space check comes after authorisation: strangers learn nothing of the disk."""
        channel, transport = self.server.connect()
        channel.dataReceived(put_head("big.bin", 5 * MiB, v_query("big.bin", 1)))
        self.assertEqual(status(transport), http.FORBIDDEN)

    def test_mid_body_disk_full_still_leaves_nothing(self):
        """A chunked upload that runs out of disk mid-way still gets 507 and leaves nothing."""
        import errno

        from hmacd.sink import WholeUpload

        self.disk.free = 10 * MiB
        head = request_head(
            "PUT",
            "/upload/c.bin?" + v_query("c.bin", 6),
            None,
            ("Transfer-Encoding: chunked", "X-Upload-Length: 6"),
        )
        channel, transport = self.server.connect()
        channel.dataReceived(head)

        def full(upload, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(WholeUpload, "write", full)
        channel.dataReceived(chunked(b"abc", b"def"))
        self.server.clock.advance(0)
        self.assertEqual(status(transport), INSUFFICIENT_STORAGE)
        self.assertEqual(store_files(self.root), [])


class MinFreeSpaceConfigTests(SynchronousTestCase):
    """The MinFreeSpace key."""

    def test_default_and_sizes(self):
        """Default 64 MiB; a size string or 0 is taken; a negative one is not."""
        self.assertEqual(parse_config({}, "t.toml").min_free_space, 64 * MiB)
        self.assertEqual(parse_config({"MinFreeSpace": "1GB"}, "t.toml").min_free_space, 1 << 30)
        self.assertEqual(parse_config({"minfreespace": 0}, "t.toml").min_free_space, 0)
        from hmacd.config import ConfigError

        self.assertRaises(ConfigError, parse_config, {"MinFreeSpace": -1}, "t.toml")

    def test_file_server_gets_it(self):
        """build_service hands the configured reserve to the FileServer."""
        from tests.test_tap import BuildServiceTests

        composition = BuildServiceTests("test_children")
        composition.setUp()
        composition.config = replace(composition.config, min_free_space=12345)
        site = composition.build().getServiceNamed("http").factory
        self.assertEqual(site.fileServer.min_free_space, 12345)
