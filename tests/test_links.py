"""
Symbolic links in the store never lead a request to our internals (issue 14, item 5):
the dot rule holds for where a link leads, for GET, HEAD and PUT, over a real socket and
with the real embedded SQLite store whose files are what a stray link would expose.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from hmacd.store.failover import FailoverStore
from hmacd.store.sql import SQLStore
from tests.support import LoopbackServer, v_query
from tests.test_http import raw_request


class LinksToInternalsTests(TestCase):
    """An operator's stray link to .hmacfs/ (or to any dot name) serves and takes nothing."""

    @inlineCallbacks
    def setUp(self):
        root = os.path.abspath(self.mktemp())
        self.internals = os.path.join(root, ".hmacfs")
        sqlite = SQLStore.sqlite(os.path.join(self.internals, "meta.sqlite3"), reactor)
        metadata = FailoverStore(sqlite, clock=reactor, healthInterval=0)
        yield metadata.start()
        self.addCleanup(metadata.stop)
        self.server = LoopbackServer(self, root=root, metadata=metadata)
        stored = yield self.raw("PUT", "/upload/d/f.txt?" + v_query("d/f.txt", 3), b"abc")
        self.assertEqual(stored.code, 201)
        self.assertIn("meta.sqlite3-wal", os.listdir(self.internals))

    def raw(self, method: str, target: str, body: bytes = b""):
        return deferToThread(raw_request, self.server, method, target, body)

    def internalNames(self) -> set[str]:
        """Every name under .hmacfs/, and any temp file at the root."""
        found = {n for n in os.listdir(self.server.root) if n.startswith(".hmacfs-")}
        for dirpath, dirnames, filenames in os.walk(self.internals):
            rel = os.path.relpath(dirpath, self.internals)
            found |= {os.path.normpath(os.path.join(rel, n)) for n in dirnames + filenames}
        return found

    @inlineCallbacks
    def test_link_to_internals_not_served(self):
        """GET/HEAD through a link to .hmacfs/ (absolute or relative) are 404, no bytes."""
        os.symlink(self.internals, os.path.join(self.server.root, "l"))
        os.symlink(".hmacfs", os.path.join(self.server.root, "rel"))
        os.symlink(
            os.path.join("..", ".hmacfs", "meta.sqlite3"),
            os.path.join(self.server.root, "d", "db"),
        )
        for target in (
            "/upload/l/meta.sqlite3-wal",
            "/upload/l/meta.sqlite3",
            "/upload/rel/meta.sqlite3-wal",
            "/upload/d/db",
        ):
            for method in ("GET", "HEAD"):
                response = yield self.raw(method, target)
                self.assertEqual(response.code, 404, (method, target))
                self.assertNotIn(b"SQLite", response.body)

    @inlineCallbacks
    def test_link_to_temp_file_not_served(self):
        """A link to an upload's temp file (a dot name beside it) is not served either."""
        with open(os.path.join(self.server.root, "d", ".hmacfs-0123.part"), "w") as f:
            f.write("partial")
        os.symlink(".hmacfs-0123.part", os.path.join(self.server.root, "d", "t"))
        response = yield self.raw("GET", "/upload/d/t")
        self.assertEqual(response.code, 404)
        self.assertNotIn(b"partial", response.body)

    @inlineCallbacks
    def test_put_through_link_refused(self):
        """A PUT through a link to .hmacfs/ is 400 and leaves nothing in .hmacfs/."""
        os.symlink(self.internals, os.path.join(self.server.root, "l"))
        os.makedirs(os.path.join(self.internals, "partial"), exist_ok=True)
        before = self.internalNames()
        for relpath in ("l/x.txt", "l/new/x.txt", "l/partial/x.txt"):
            put = yield self.raw("PUT", f"/upload/{relpath}?" + v_query(relpath, 3), b"abc")
            self.assertEqual(put.code, 400, relpath)
        self.assertEqual(self.internalNames() - before, set())

    @inlineCallbacks
    def test_link_within_store_still_followed(self):
        """A link to an ordinary directory of the store keeps working for GET and PUT."""
        os.symlink("d", os.path.join(self.server.root, "alias"))
        response = yield self.raw("GET", "/upload/alias/f.txt")
        self.assertEqual((response.code, response.body), (200, b"abc"))
        put = yield self.raw("PUT", "/upload/alias/g.txt?" + v_query("alias/g.txt", 3), b"xyz")
        self.assertEqual(put.code, 201)
        with open(os.path.join(self.server.root, "d", "g.txt"), "rb") as f:
            self.assertEqual(f.read(), b"xyz")
