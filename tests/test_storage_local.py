"""
The local directory behind hmacd.storage.IStorage: the contract, and what only a local
directory has (temp dot files beside their destination, the zero-copy file, the sweep).
"""

from __future__ import annotations

import os
import time

from twisted.trial.unittest import SynchronousTestCase

from hmacd.paths import PathRefused
from hmacd.storage import Conflict
from hmacd.storage.local import PART_PREFIX, LocalStorage
from tests.storage_contract import StorageContractMixin, record_for
from tests.support import store_files, synchronous


class LocalStorageContractTests(StorageContractMixin, SynchronousTestCase):
    """The IStorage contract on a local directory."""

    def makeStorage(self) -> LocalStorage:
        root = self.mktemp()
        os.makedirs(root)
        return LocalStorage(root, synchronous)


class LocalStorageTests(SynchronousTestCase):
    """What only the local directory does."""

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.storage = LocalStorage(self.root, synchronous)

    def test_temp_is_a_dot_file_beside_its_destination(self) -> None:
        """The bytes in progress are a dot file in the destination's directory."""
        writer = self.storage.writer("a/b.txt")
        (name,) = os.listdir(os.path.join(self.root, "a"))
        self.assertTrue(name.startswith(PART_PREFIX))
        writer.discard()
        self.assertEqual(store_files(self.root), [])

    def test_local_file_is_the_zero_copy_path(self) -> None:
        """An open local file gives its bytes as a real file, for sendfile."""
        writer = self.storage.writer("z.txt")
        writer.write(b"zero copy")
        writer.seal()
        writer.publish(record_for("z.txt", b"zero copy"))
        stored = self.storage.open("z.txt")
        assert stored is not None
        f = stored.local_file()
        self.assertEqual(os.pread(f.fileno(), 100, 0), b"zero copy")
        stored.close()
        self.assertTrue(f.closed)

    def test_parent_is_a_file(self) -> None:
        """A name under a file is a Conflict, and nothing is made."""
        with open(os.path.join(self.root, "f"), "wb"):
            pass
        self.assertRaises(Conflict, self.storage.writer, "f/g.txt")
        self.assertEqual(store_files(self.root), ["f"])

    def test_link_out_of_the_store(self) -> None:
        """A symbolic link leading out of the store is refused for writing and reading."""
        outside = os.path.abspath(self.mktemp())
        os.makedirs(outside)
        os.symlink(outside, os.path.join(self.root, "out"))
        self.assertRaises(PathRefused, self.storage.writer, "out/x.txt")
        self.assertIsNone(self.storage.open("out/x.txt"))
        self.assertEqual(os.listdir(outside), [])

    def test_sweep_removes_old_temps(self) -> None:
        """A temp untouched since before the cut-off is removed and named."""
        writer = self.storage.writer("old/t.txt")
        (name,) = os.listdir(os.path.join(self.root, "old"))
        self.assertEqual(self.storage.sweep_temps(time.time() + 60), [os.path.join("old", name)])
        writer.discard()
        self.assertEqual(store_files(self.root), [])

    def test_delete_prunes_empty_directories(self) -> None:
        """Deleting the last file of a directory removes the directory, never the root."""
        writer = self.storage.writer("p/q/r.txt")
        writer.seal()
        writer.publish(record_for("p/q/r.txt", b""))
        self.assertTrue(self.storage.delete("p/q/r.txt"))
        self.assertEqual(store_files(self.root), [])
        self.assertTrue(os.path.isdir(self.root))

    def test_link_inside_the_store_is_followed(self) -> None:
        """A link to a file inside the store reads as that file, as downloads always did."""
        with open(os.path.join(self.root, "target.txt"), "wb") as f:
            f.write(b"target")
        os.symlink("target.txt", os.path.join(self.root, "alias.txt"))
        stored = self.storage.open("alias.txt")
        assert stored is not None
        self.assertEqual(stored.read(0, 10), b"target")
        stored.close()
        self.assertEqual(self.storage.stat("alias.txt").size, 6)

    def test_fifo_is_no_file(self) -> None:
        """A FIFO in the store is neither opened (which would hang) nor stat'ed as a file."""
        os.mkfifo(os.path.join(self.root, "pipe"))
        self.assertIsNone(self.storage.open("pipe"))
        self.assertIsNone(self.storage.stat("pipe"))
