"""
Takedowns over real HTTP: a taken-down URL answers 410 (or 451), a PUT to it is refused
before its body, and the same content under another slot is refused at commit with nothing
left behind; the server and C{hmacfs admin} share the embedded SQLite of one StoreDir.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
from io import BytesIO

from treq import content
from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import FileBodyProducer

from hmacd.admin import register, run_admin
from hmacd.storage.s3_pieces import state_key
from hmacd.store import StoreUnavailable
from hmacd.store.failover import FailoverStore
from hmacd.store.memory import MemoryStore
from hmacd.store.sql import SQLStore
from hmacd.takedown import DenyList, DenyListRefresh, Takedown, gone_body
from tests.support import LoopbackServer, MemoryServer, store_files, v2_query
from tests.test_resumable_s3 import TwoNodes, data_of

CAT = b"\xff\xd8\xff\xe0 a cat, allegedly" * 100


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="hmacfs")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["admin", *argv])


class TakedownOverHTTPTests(TestCase):
    """A server on 127.0.0.1 and the admin commands on the same StoreDir and SQLite."""

    async def asyncSetUp(self) -> None:
        root = self.root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        self.config = os.path.abspath(self.mktemp())
        with open(self.config, "w") as f:
            f.write(f'StoreDir = "{root}"\n')
        sqlite = SQLStore.sqlite(os.path.join(root, ".hmacfs", "meta.sqlite3"), reactor)
        self.store = FailoverStore(sqlite, clock=reactor, healthInterval=0)
        await self.store.start()
        self.addCleanup(self.store.stop)
        self.server = LoopbackServer(self, root=root, metadata=self.store)

    def setUp(self) -> Deferred[None]:
        return ensureDeferred(self.asyncSetUp())

    async def admin(self, *argv: str) -> int:
        out, err = io.StringIO(), io.StringIO()
        args = parse(argv[0], "--config", self.config, *argv[1:])
        code = await run_admin(reactor, args, out, err)
        self.assertEqual(err.getvalue(), "")
        return code

    async def reload(self) -> None:
        """What the server's DenyListRefresh does every few seconds, now."""
        self.server.fs.denials.load(await self.store.takedowns())

    async def put(self, path: str, body: bytes, content_type: str = "image/jpeg"):
        url = self.server.url(path, v2_query(path, len(body), content_type))
        response = await self.server.http.put(
            url, data=FileBodyProducer(BytesIO(body)), headers={"Content-Type": content_type}
        )
        return response.code, await content(response)

    async def get(self, path: str, method: str = "GET"):
        response = await self.server.http.request(method, self.server.url(path))
        return response.code, await content(response), response.headers

    def denied(self) -> float:
        registry = self.server.fs.metrics.registry
        value = registry.get_sample_value(
            "hmac_file_server_upload_errors_total", {"reason": "denied"}
        )
        return value or 0

    async def test_removed_answers_410(self):
        """After rm, GET and HEAD answer 410 with a short text, not 404; others stay 404."""
        self.assertEqual((await self.put("s1/cat.jpg", CAT))[0], 201)
        self.assertEqual((await self.get("s1/cat.jpg"))[:2], (200, CAT))
        self.assertEqual(await self.admin("rm", "s1/cat.jpg"), 0)
        code, body, headers = await self.get("s1/cat.jpg")
        self.assertEqual((code, body), (410, gone_body(410)))
        self.assertEqual(headers.getRawHeaders("content-type"), ["text/plain; charset=utf-8"])
        code, body, headers = await self.get("s1/cat.jpg", "HEAD")
        self.assertEqual((code, body), (410, b""))
        self.assertEqual(headers.getRawHeaders("content-length"), [str(len(gone_body(410)))])
        self.assertEqual((await self.get("s1/never.jpg"))[0], 404)
        self.assertEqual(store_files(self.root), [])

    async def test_legal_answers_451(self):
        """rm --legal: the URL answers 451."""
        await self.put("s1/doc.pdf", b"%PDF-1.4 leaked", "application/pdf")
        self.assertEqual(await self.admin("rm", "--legal", "s1/doc.pdf"), 0)
        self.assertEqual((await self.get("s1/doc.pdf"))[:2], (451, gone_body(451)))

    async def test_put_to_taken_down_path(self):
        """A PUT to a taken-down path is refused with its status, and nothing is written."""
        await self.put("s1/cat.jpg", CAT)
        await self.admin("rm", "--legal", "s1/cat.jpg")
        await self.reload()
        code, _ = await self.put("s1/cat.jpg", b"other bytes, same slot")
        self.assertEqual(code, 451)
        self.assertEqual(store_files(self.root), [])
        registry = self.server.fs.metrics.registry
        refused = registry.get_sample_value(
            "hmac_file_server_upload_errors_total", {"reason": "taken_down"}
        )
        self.assertEqual(refused, 1)

    async def test_same_content_elsewhere_refused(self):
        """The taken-down content under another slot is refused, and leaves nothing behind."""
        await self.put("s1/cat.jpg", CAT)
        await self.admin("rm", "s1/cat.jpg")
        await self.reload()
        code, _ = await self.put("s2/same-cat.jpg", CAT)
        self.assertEqual(code, 410)
        self.assertEqual(self.denied(), 1)
        self.assertEqual((await self.get("s2/same-cat.jpg"))[0], 404)
        self.assertIsNone(await self.store.get("s2/same-cat.jpg"))
        # No temp file, no directory made for it.
        self.assertEqual(store_files(self.root), [])
        # Other content goes in as ever.
        self.assertEqual((await self.put("s2/dog.jpg", b"a dog"))[0], 201)

    async def test_lift(self):
        """Lifted, the URL answers 404 and the content may be uploaded again."""
        await self.put("s1/cat.jpg", CAT)
        await self.admin("rm", "s1/cat.jpg")
        await self.admin("lift", "s1/cat.jpg")
        await self.reload()
        self.assertEqual((await self.get("s1/cat.jpg"))[0], 404)
        self.assertEqual((await self.put("s1/cat.jpg", CAT))[0], 201)
        self.assertEqual(self.denied(), 0)

    async def test_store_down_on_404(self):
        """A store that cannot say answers the plain 404: no error, no hang."""
        self.patch(self.store, "takedown", lambda path: Deferred.fromCoroutine(_down()))
        self.assertEqual((await self.get("s1/none.jpg"))[:2], (404, b"not found\n"))


async def _down():
    raise StoreUnavailable("down for the test")


class DenyListTests(SynchronousTestCase):
    """The process's copy of the deny list, and its refresh."""

    def test_lookups(self):
        """Paths and digests answer their status; the strictest wins for one digest."""
        deny = DenyList()
        self.assertIsNone(deny.path("a"))
        deny.load(
            [Takedown("a", 410, "11" * 32), Takedown("b", 451, "11" * 32), Takedown("c", 410)]
        )
        self.assertEqual((deny.path("a"), deny.path("b"), deny.path("c")), (410, 451, 410))
        self.assertEqual(deny.digest("11" * 32), 451)
        self.assertIsNone(deny.digest(""))
        self.assertIsNone(deny.path("d"))
        self.assertEqual(len(deny), 3)
        deny.load([])
        self.assertEqual((deny.path("a"), deny.digest("11" * 32), len(deny)), (None, None, 0))

    def test_bad_status(self):
        """A takedown answers 410 or 451, nothing else."""
        self.assertRaises(ValueError, Takedown, "a", 404)

    def test_refresh(self):
        """The timer reloads from the store every interval; a failure keeps the last copy."""
        clock = Clock()
        store = MemoryStore()
        deny = DenyList()
        service = DenyListRefresh(store, deny, interval=10, clock=clock)
        store.put_takedown(Takedown("a", 410, "11" * 32))
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual(deny.path("a"), 410)
        store.put_takedown(Takedown("b", 451))
        clock.advance(9)
        self.assertIsNone(deny.path("b"))
        clock.advance(1)
        self.assertEqual(deny.path("b"), 451)
        failing = []
        self.patch(store, "takedowns", lambda: failing.append(1) or _failed())
        clock.advance(10)
        self.assertEqual(failing, [1])
        self.assertEqual((deny.path("a"), deny.path("b")), (410, 451))
        self.flushLoggedErrors()


def _failed():
    from twisted.internet.defer import fail

    return fail(StoreUnavailable("down"))


class ResumableDeniedTests(SynchronousTestCase):
    """A resumable upload whose whole content is denied is refused at its last piece."""

    def test_last_piece_refused(self):
        """308 for the first piece, 410 for the last; no file, no record, no partial left."""
        from tests.test_resumable import DATA, TOTAL, piece
        from tests.test_upload import status

        root = self.mktemp()
        server = MemoryServer(root)
        server.fs.denials.load([Takedown("old/cat.bin", 410, hashlib.sha256(DATA).hexdigest())])

        def send(data: bytes):
            channel, transport = server.connect()
            channel.dataReceived(data)
            return transport

        self.assertEqual(status(send(piece("f.bin", 0, 4095, TOTAL))), 308)
        self.assertEqual(status(send(piece("f.bin", 4096, TOTAL - 1, TOTAL))), 410)
        self.assertEqual(store_files(root), [])
        self.assertIsNone(self.successResultOf(server.fs.metadata.get("f.bin")))
        self.assertEqual(os.listdir(os.path.join(root, ".hmacfs", "partial")), [])
        self.assertEqual(
            server.fs.metrics.registry.get_sample_value(
                "hmac_file_server_upload_errors_total", {"reason": "denied"}
            ),
            1,
        )


class S3TakedownTests(TestCase):
    """The same answers with the bytes in SeaweedFS (a prefix of the test's own)."""

    timeout = 120

    async def asyncSetUp(self) -> None:
        from tests.seaweed import shared_mini
        from tests.test_http_s3 import s3_server

        mini = shared_mini()
        self.server = s3_server(
            self, mini.endpoint, mini.bucket, (mini.access_key, mini.secret_key)
        )

    def setUp(self) -> Deferred[None]:
        return ensureDeferred(self.asyncSetUp())

    async def put(self, path: str, body: bytes):
        url = self.server.url(path, v2_query(path, len(body), "image/jpeg"))
        response = await self.server.http.put(
            url, data=FileBodyProducer(BytesIO(body)), headers={"Content-Type": "image/jpeg"}
        )
        return response.code, await content(response)

    async def test_taken_down_object(self):
        """Taken down as rm does it: 410 on GET, 451 after --legal; the content is denied."""
        from twisted.internet.threads import deferToThread

        fs = self.server.fs
        self.assertEqual((await self.put("s/cat.jpg", CAT))[0], 201)
        stored = await fs.metadata.get("s/cat.jpg")
        await fs.metadata.put_takedown(Takedown("s/cat.jpg", 410, stored.sha256))
        self.assertTrue(await deferToThread(fs.storage.delete, "s/cat.jpg"))
        await fs.metadata.delete("s/cat.jpg")
        response = await self.server.http.get(self.server.url("s/cat.jpg"))
        self.assertEqual((response.code, await content(response)), (410, gone_body(410)))
        response = await self.server.http.head(self.server.url("s/cat.jpg"))
        self.assertEqual(response.code, 410)
        await fs.metadata.put_takedown(Takedown("s/cat.jpg", 451, stored.sha256))
        response = await self.server.http.get(self.server.url("s/cat.jpg"))
        self.assertEqual((response.code, await content(response)), (451, gone_body(451)))
        fs.denials.load(await fs.metadata.takedowns())
        self.assertEqual((await self.put("s/again.jpg", CAT))[0], 451)
        response = await self.server.http.get(self.server.url("s/again.jpg"))
        self.assertEqual(response.code, 404)
        self.assertFalse(await deferToThread(fs.storage.exists, "s/again.jpg"))


class S3ResumableDeniedTests(TwoNodes):
    """A resumable upload into the object store whose content is denied: nothing stays."""

    async def test_last_piece_refused(self):
        """308, then 410 at the last piece: no object, no staging, no state, no record."""
        from tests.test_http_s3 import header  # noqa: F401  (the harness's own helper)

        total = 3 * 1024 * 1024 + 17
        data = data_of(total, b"denied")
        for node in self.nodes:
            node.fs.denials.load([Takedown("old/x", 410, hashlib.sha256(data).hexdigest())])
        name = "slot/again.bin"
        code, received, _ = await self.piece(self.nodes[0], name, data[: 1024 * 1024], 0, total)
        self.assertEqual((code, received), (308, f"bytes=0-{1024 * 1024 - 1}"))
        code, _, _ = await self.piece(self.nodes[1], name, data[1024 * 1024 :], 1024 * 1024, total)
        self.assertEqual(code, 410)
        response = await self.nodes[0].http.get(self.nodes[0].url(name))
        await content(response)
        self.assertEqual(response.code, 404)
        self.assertIsNone(await self.metadata.get(name))
        self.assertEqual(await self.staged(), [])
        self.assertIsNone(await self.metadata.get_state(state_key(name)))
