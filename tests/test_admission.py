"""
Tests for hmacd.admission: what the server's own state says to an upload the verdict
accepted, one row per refusal, in the order the answers are given.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

from twisted.trial.unittest import SynchronousTestCase

from hmacd.admission import admit
from hmacd.sink import Sink, WholeUpload
from hmacd.verdict import Plan, Refusal
from tests.support import MemoryServer


class AdmitTests(SynchronousTestCase):
    """admit(fs, plan, length): a sink, or the refusal with its status and reason."""

    def setUp(self) -> None:
        self.root = self.mktemp()
        self.free = 1 << 30
        self.server = MemoryServer(
            self.root,
            statvfs=lambda _: SimpleNamespace(f_bavail=self.free, f_frsize=1),
            min_free_space=0,
        )
        self.fs = self.server.fs

    def refusal(self, plan: Plan, length: int | None) -> tuple[int, str, bool]:
        admitted = admit(self.fs, plan, length)
        self.assertIsInstance(admitted, Refusal)
        assert isinstance(admitted, Refusal)
        return admitted.status, admitted.reason, admitted.error

    def test_table(self) -> None:
        """Each refusal, with the state that causes it."""
        whole = Plan("a.txt", "v", 10, "text/plain")
        self.free = 9
        self.assertEqual(self.refusal(whole, 10), (507, "insufficient storage", True))
        self.free = 1 << 30
        self.fs.uploads.accepting = False
        self.assertEqual(self.refusal(whole, 10), (503, "shutting down", True))
        self.fs.uploads.accepting = True
        self.patch(self.fs.metadata, "writable", lambda: False)
        self.assertEqual(self.refusal(whole, 10), (503, "metadata store unavailable", True))
        self.patch(self.fs.metadata, "writable", lambda: True)
        piece = Plan("p.txt", "v", 10, "text/plain", span=(0, 4, 10))
        self.assertEqual(
            self.refusal(piece, 4), (400, "Content-Length must match Content-Range", True)
        )
        with open(os.path.join(self.fs.store_dir, "a.txt"), "wb"):
            pass
        self.assertEqual(self.refusal(whole, 10), (409, "file exists", True))
        held = admit(self.fs, Plan("b.txt", "v", 1, "text/plain"), 1)
        self.assertIsInstance(held, Sink)
        self.assertEqual(
            self.refusal(Plan("b.txt", "v", 1, "text/plain"), 1),
            (409, "an upload of this path is in progress", True),
        )
        assert isinstance(held, Sink)
        held.abort()
        self.assertEqual(
            self.refusal(Plan("p.txt", "v", 10, "text/plain", span=(3, 4, 10)), 2),
            (416, "the upload stands at 0 bytes", True),
        )
        self.assertEqual(
            self.refusal(Plan("p.txt", "v", 10, "text/plain", span=(10,)), 0),
            (308, "0 bytes received", False),
        )

    def test_whole_upload(self) -> None:
        """A whole body that fits goes into a WholeUpload holding its path."""
        sink = admit(self.fs, Plan("c/d.txt", "v", 3, "text/plain"), 3)
        self.assertIsInstance(sink, WholeUpload)
        assert isinstance(sink, WholeUpload)
        self.assertEqual((sink.relpath, sink.size), ("c/d.txt", 3))
        sink.abort()
