"""
Periodic housekeeping, driven by a Clock.
"""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from hmacd.core import FileServer
from hmacd.housekeeping import PartialSweep, sweep_partials
from tests.support import SECRET, store_files, synchronous

NOW = 1_800_000_000


def touch(root: str, relpath: str, mtime: float) -> None:
    path = os.path.join(root, relpath)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"x")
    os.utime(path, (mtime, mtime))


class SweepTests(SynchronousTestCase):
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        touch(self.root, "a/.hmacfs-0000000000000000.part", NOW - 7200)
        touch(self.root, "a/b/.hmacfs-1111111111111111.part", NOW - 7200)
        touch(self.root, "a/.hmacfs-2222222222222222.part", NOW - 10)
        touch(self.root, "a/kept.txt", NOW - 7200)
        touch(self.root, "a/.hmacfs-not-a-temp", NOW - 7200)
        touch(self.root, ".hmacfs/.hmacfs-3333333333333333.part", NOW - 7200)

    def test_sweep_removes_only_old_temp_files(self):
        """Old temp files go; fresh ones, ordinary files and .hmacfs/ stay."""
        removed = sweep_partials(self.root, NOW - 600)
        self.assertEqual(
            sorted(removed),
            ["a/.hmacfs-0000000000000000.part", "a/b/.hmacfs-1111111111111111.part"],
        )
        self.assertEqual(
            store_files(self.root),
            ["a", "a/.hmacfs-2222222222222222.part", "a/.hmacfs-not-a-temp", "a/b", "a/kept.txt"],
        )
        self.assertTrue(
            os.path.exists(os.path.join(self.root, ".hmacfs", ".hmacfs-3333333333333333.part"))
        )

    def test_service_sweeps_at_start_and_periodically(self):
        """The service sweeps when started and again after each interval."""
        clock = Clock()
        clock.advance(NOW)
        fs = FileServer(secret=SECRET, store_dir=self.root, reactor=clock, blocking=synchronous)
        service = PartialSweep(fs, interval=3600, maxAge=600)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertNotIn("a/.hmacfs-0000000000000000.part", store_files(self.root))
        self.assertIn("a/.hmacfs-2222222222222222.part", store_files(self.root))
        clock.advance(3600)
        self.assertNotIn("a/.hmacfs-2222222222222222.part", store_files(self.root))

    def test_failed_sweep_keeps_the_loop(self):
        """A sweep that fails is logged and the next one still runs."""
        clock = Clock()
        clock.advance(NOW)
        fs = FileServer(secret=SECRET, store_dir=self.root, reactor=clock, blocking=synchronous)
        calls = []

        def failing(store_dir, older_than):
            calls.append(older_than)
            raise OSError("disk gone")

        self.patch(__import__("hmacd.housekeeping").housekeeping, "sweep_partials", failing)
        service = PartialSweep(fs, interval=3600, maxAge=600)
        service.startService()
        self.addCleanup(service.stopService)
        clock.advance(3600)
        self.assertEqual(calls, [NOW - 600, NOW + 3600 - 600])
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 2)
