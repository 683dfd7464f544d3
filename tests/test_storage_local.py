"""
The local directory behind hmacd.storage.IStorage: the contract, and what only a local
directory has (temp dot files beside their destination, the zero-copy file, the sweep).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from hmacd.metadata import FileRecord
from hmacd.paths import PathRefused
from hmacd.storage import Conflict
from hmacd.storage import local as local_storage
from hmacd.storage.local import PART_PREFIX, LocalStorage, LocalWriter
from hmacd.uring import RingFailed, Rings
from tests.storage_contract import StorageContractMixin, record_for
from tests.support import store_files, synchronous

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LocalStorageContractTests(StorageContractMixin, SynchronousTestCase):
    """The IStorage contract on a local directory."""

    def makeStorage(self) -> LocalStorage:
        root = self.mktemp()
        os.makedirs(root)
        return LocalStorage(root, synchronous)


class RingContractTests(StorageContractMixin, SynchronousTestCase):
    """The IStorage contract on a local directory whose fsyncs go through io_uring."""

    def makeStorage(self) -> LocalStorage:
        root = self.mktemp()
        os.makedirs(root)
        return LocalStorage(root, synchronous, rings=_rings())


def _rings() -> Rings:
    rings, why = Rings.open()
    if rings is None:
        raise SkipTest(f"no io_uring here: {why}")
    return rings


class DotTempContractTests(StorageContractMixin, SynchronousTestCase):
    """The IStorage contract where the file system has no O_TMPFILE: dot temps instead."""

    def makeStorage(self) -> LocalStorage:
        root = self.mktemp()
        os.makedirs(root)
        storage = LocalStorage(root, synchronous)
        storage.tmpfile = False
        return storage


class LocalStorageTests(SynchronousTestCase):
    """What only the local directory does."""

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.storage = LocalStorage(self.root, synchronous)

    def test_temp_is_a_dot_file_beside_its_destination(self) -> None:
        """Without O_TMPFILE the bytes in progress are a dot file in the destination's directory."""
        self.storage.tmpfile = False
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
        self.storage.tmpfile = False  # an O_TMPFILE has no name to sweep
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


def draft(relpath: str, size: int) -> FileRecord:
    """What an upload knows of its file before the body: the size it was signed for."""
    return FileRecord(
        path=relpath, size=size, content_type="text/plain", sha256="", created=0, protocol="v"
    )


class SmallBodyTests(SynchronousTestCase):
    """A body that fits the write buffer is made in one go, in the commit's thread."""

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.storage = LocalStorage(self.root, synchronous)

    def publish(self, relpath: str, body: bytes) -> None:
        writer = self.storage.writer(relpath, draft(relpath, len(body)))
        writer.write(body)
        writer.seal()
        writer.publish(record_for(relpath, body))

    def test_nothing_on_disk_before_the_seal(self) -> None:
        """Accepting the body and receiving it make no directory and no file; sealing does."""
        writer = self.storage.writer("s/x.txt", draft("s/x.txt", 3))
        writer.write(b"abc")
        self.assertEqual(store_files(self.root), [])
        writer.seal()
        writer.publish(record_for("s/x.txt", b"abc"))
        self.assertEqual(store_files(self.root), ["s", "s/x.txt"])
        stored = self.storage.open("s/x.txt")
        assert stored is not None
        self.addCleanup(stored.close)
        self.assertEqual(
            (stored.read(0, 10), stored.facts()), (b"abc", record_for("s/x.txt", b"abc"))
        )

    def test_discarded_before_the_seal_leaves_nothing(self) -> None:
        """A small body broken off never reached the disk: nothing to remove, nothing pruned."""
        os.makedirs(os.path.join(self.root, "kept"))
        writer = self.storage.writer("kept/x.txt", draft("kept/x.txt", 3))
        writer.write(b"ab")
        writer.discard()
        self.assertEqual(store_files(self.root), ["kept"])

    def test_directory_pruned_before_the_seal(self) -> None:
        """A directory found before the body and pruned since is made again at the seal."""
        os.makedirs(os.path.join(self.root, "d"))
        writer = self.storage.writer("d/x.txt", draft("d/x.txt", 1))
        os.rmdir(os.path.join(self.root, "d"))
        writer.write(b"x")
        writer.seal()
        writer.publish(record_for("d/x.txt", b"x"))
        self.assertEqual(store_files(self.root), ["d", "d/x.txt"])

    def test_directory_made_meanwhile(self) -> None:
        """A directory missing before the body and made since by another upload is used."""
        writer = self.storage.writer("d/x.txt", draft("d/x.txt", 1))
        self.publish("d/y.txt", b"y")
        writer.write(b"x")
        writer.seal()
        writer.publish(record_for("d/x.txt", b"x"))
        self.assertEqual(store_files(self.root), ["d", "d/x.txt", "d/y.txt"])

    def test_file_made_meanwhile_in_the_way(self) -> None:
        """A file put where the directory should be since the verdict: Conflict, nothing made."""
        writer = self.storage.writer("d/e/x.txt", draft("d/e/x.txt", 1))
        with open(os.path.join(self.root, "d"), "wb"):
            pass
        writer.write(b"x")
        self.assertRaises(Conflict, writer.seal)
        self.assertEqual(store_files(self.root), ["d"])


class LinkPlantedTests(SynchronousTestCase):
    """
    A symbolic link put on the way between the verdict and the commit of a small body (the
    time its body takes) leads nothing out of the store.
    """

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        self.outside = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        os.makedirs(self.outside)
        self.storage = LocalStorage(self.root, synchronous)

    def assertRefused(self, relpath: str) -> None:
        writer = self.storage.writer(relpath, draft(relpath, 1))
        self.plant()
        writer.write(b"x")
        self.assertRaises(PathRefused, writer.seal)
        self.assertEqual(os.listdir(self.outside), [])

    def test_existing_directory_replaced(self) -> None:
        """A directory that was there is now a link out: refused, nothing written there."""
        os.makedirs(os.path.join(self.root, "d"))

        def plant():
            os.rmdir(os.path.join(self.root, "d"))
            os.symlink(self.outside, os.path.join(self.root, "d"))

        self.plant = plant
        self.assertRefused("d/x.txt")

    def test_missing_directory_appears_as_a_link(self) -> None:
        """A directory that was missing is now a link out: refused too."""
        self.plant = lambda: os.symlink(self.outside, os.path.join(self.root, "n"))
        self.assertRefused("n/x.txt")

    def test_deeper_missing_directory_appears_as_a_link(self) -> None:
        """Below a directory that was there, one that was missing is now a link out."""
        os.makedirs(os.path.join(self.root, "d"))
        self.plant = lambda: os.symlink(self.outside, os.path.join(self.root, "d", "n"))
        self.assertRefused("d/n/x.txt")


class TmpfileTests(SynchronousTestCase):
    """Temps without a name (O_TMPFILE), and the dot files where there are none."""

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.storage = LocalStorage(self.root, synchronous)
        if not self.storage.tmpfile:
            raise SkipTest("no O_TMPFILE here")

    def test_temp_has_no_name(self) -> None:
        """While its bytes come in a file has no name in its directory, then its own."""
        writer = self.storage.writer("a/b.txt")
        writer.write(b"bytes")
        writer.seal()
        self.assertEqual(os.listdir(os.path.join(self.root, "a")), [])
        writer.publish(record_for("a/b.txt", b"bytes"))
        self.assertEqual(os.listdir(os.path.join(self.root, "a")), ["b.txt"])

    def test_read_back_by_its_name(self) -> None:
        """
        An object store's spool reads a temp back by its name before the writer lets go of it:
        an O_TMPFILE's is its descriptor's, and there is none once it is closed.
        """
        writer = self.storage.writer("spool/x")
        writer.write(b"spooled bytes")
        writer.seal()
        assert writer.temp is not None
        with open(writer.temp, "rb") as f:
            self.assertEqual(f.read(), b"spooled bytes")
        self.assertEqual(os.listdir(os.path.join(self.root, "spool")), [])
        writer.discard()
        self.assertIsNone(writer.temp)

    def test_refused_falls_back_to_dot_files(self) -> None:
        """
        A file system that refuses O_TMPFILE is asked once: that temp and every later one
        is a dot file, and the uploads are stored all the same.
        """
        realOpen = os.open
        asked = []

        def noTmpfile(path, flags, *args, **kwargs):
            if flags & os.O_TMPFILE == os.O_TMPFILE:
                asked.append(path)
                raise OSError(errno.EOPNOTSUPP, "Operation not supported")
            return realOpen(path, flags, *args, **kwargs)

        self.patch(os, "open", noTmpfile)
        for name in ("a/b.txt", "a/c.txt"):
            writer = self.storage.writer(name)
            (temp,) = [n for n in os.listdir(os.path.join(self.root, "a")) if n.startswith(".")]
            self.assertTrue(temp.startswith(PART_PREFIX))
            writer.write(name.encode())
            writer.seal()
            writer.publish(record_for(name, name.encode()))
        self.assertEqual(len(asked), 1)
        self.assertFalse(self.storage.tmpfile)
        self.assertEqual(store_files(self.root), ["a", "a/b.txt", "a/c.txt"])

    def test_crash_leaves_nothing_visible(self) -> None:
        """
        A process killed after its temp was written and synced, before the link, leaves no
        file and no dot file: only the directory made for it.
        """
        code = (
            "import os, sys\n"
            "from twisted.internet.defer import maybeDeferred\n"
            "from hmacd.metadata import FileRecord\n"
            "from hmacd.storage.local import LocalStorage\n"
            "storage = LocalStorage(sys.argv[1], maybeDeferred)\n"
            "record = FileRecord('s/x.bin', 4, '', '', 0, 'v')\n"
            "writer = storage.writer('s/x.bin', record)\n"
            "writer.write(b'lost')\n"
            "writer.seal()\n"
            "os.fsync(writer._file.fileno())\n"
            "os._exit(9)\n"
        )
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        result = subprocess.run([sys.executable, "-c", code, self.root], env=env)
        self.assertEqual(result.returncode, 9)
        self.assertEqual(store_files(self.root), ["s"])
        self.assertEqual(os.listdir(os.path.join(self.root, "s")), [])


class DurabilityTests(SynchronousTestCase):
    """What is fsynced, in which order, before an upload is answered."""

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.events: list[str] = []
        realFsync, realLink = os.fsync, os.link
        fsyncDirectory = local_storage.fsync_directory

        inDirectory = []

        def fsync(fd):
            if not inDirectory:
                self.events.append("fsync file")
            realFsync(fd)

        def link(*args, **kwargs):
            self.events.append("link")
            realLink(*args, **kwargs)

        def syncDirectory(directory):
            self.events.append("fsync " + (os.path.relpath(directory, self.root)))
            inDirectory.append(directory)
            try:
                fsyncDirectory(directory)
            finally:
                inDirectory.pop()

        self.patch(os, "fsync", fsync)
        self.patch(os, "link", link)
        self.patch(local_storage, "fsync_directory", syncDirectory)

    def publish(self, storage: LocalStorage, relpath: str, body: bytes) -> None:
        writer = storage.writer(relpath, draft(relpath, len(body)))
        writer.write(body)
        writer.seal()
        writer.publish(record_for(relpath, body))

    def test_order(self) -> None:
        """
        The file (with its facts) is fsynced before its name exists; then its directory,
        then the parent of each directory made for it, innermost first, up to the root.
        """
        storage = LocalStorage(self.root, synchronous)
        self.publish(storage, "n/e/w.txt", b"new")
        storage.settle(["n/e/w.txt"])
        self.assertEqual(self.events, ["fsync file", "link", "fsync n/e", "fsync n", "fsync ."])

    def test_parents_once(self) -> None:
        """
        Files committed together share the fsyncs of their directories' parent; a later
        file in a directory made before fsyncs that directory alone.
        """
        storage = LocalStorage(self.root, synchronous)
        for name in ("a/1.txt", "b/2.txt"):
            self.publish(storage, name, b"x")
        storage.settle(["a/1.txt", "b/2.txt"])
        synced = [e for e in self.events if e.startswith("fsync ") and e != "fsync file"]
        self.assertEqual(sorted(synced), ["fsync .", "fsync a", "fsync b"])
        del self.events[:]
        self.publish(storage, "a/3.txt", b"y")
        storage.settle(["a/3.txt"])
        self.assertEqual(self.events, ["fsync file", "link", "fsync a"])

    def test_sync_off(self) -> None:
        """SyncUploads = false: no fsync at all, and the file is stored all the same."""
        storage = LocalStorage(self.root, synchronous, sync=False)
        self.publish(storage, "n/e/w.txt", b"new")
        storage.settle(["n/e/w.txt"])
        self.assertEqual(self.events, ["link"])
        self.assertEqual(store_files(self.root), ["n", "n/e", "n/e/w.txt"])


class _RecordingRings:
    """Rings that say what they were given (as the events of L{RingDurabilityTests})."""

    def __init__(self, events: list[str], root: str, rings: Rings) -> None:
        self.events = events
        self.root = root
        self.rings = rings
        self.fail: dict[int, int] = {}  # the nth descriptor of a call: its negated errno
        self.broken = False
        self.partWay: RingFailed | None = None  # raised after the fsyncs, as a ring would

    def fsync_all(self, fds: list[int]) -> list[int]:
        names = []
        for fd in fds:
            target = os.readlink(f"/proc/self/fd/{fd}")
            names.append(
                "file" if not os.path.isdir(target) else os.path.relpath(target, self.root)
            )
        self.events.append("fsync together: " + " ".join(sorted(names)))
        if self.broken:
            raise OSError(errno.EBUSY, "ring broken")
        results = self.rings.fsync_all(fds)
        if self.partWay is not None:
            raise self.partWay
        return [self.fail.get(i, r) for i, r in enumerate(results)]


class RingDurabilityTests(SynchronousTestCase):
    """With io_uring, a batch's fsyncs go together, in the order a single publish makes them."""

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.events: list[str] = []
        self.rings = _RecordingRings(self.events, self.root, _rings())
        self.storage = LocalStorage(self.root, synchronous, rings=self.rings)  # type: ignore[arg-type]
        realLink, realSetxattr = os.link, os.setxattr

        def link(*args, **kwargs):
            self.events.append("link")
            realLink(*args, **kwargs)

        def setxattr(*args, **kwargs):
            self.events.append("facts")
            realSetxattr(*args, **kwargs)

        self.patch(os, "link", link)
        self.patch(os, "setxattr", setxattr)

    def sealed(self, relpath: str, body: bytes) -> tuple[LocalWriter, FileRecord]:
        writer = self.storage.writer(relpath, draft(relpath, len(body)))
        writer.write(body)
        writer.seal()
        return writer, record_for(relpath, body)

    def test_order(self) -> None:
        """
        The facts of every file, then the files' fsyncs together, then the names; settling
        fsyncs their directories and the parents of those made for them together.
        """
        batch = [self.sealed(name, b"x") for name in ("a/1.txt", "b/2.txt", "a/3.txt")]
        self.assertEqual(self.storage.publish_all(batch), [None, None, None])  # type: ignore[arg-type]
        self.storage.settle(["a/1.txt", "b/2.txt", "a/3.txt"])
        self.assertEqual(
            self.events,
            ["facts"] * 3
            + ["fsync together: file file file"]
            + ["link"] * 3
            + ["fsync together: . a b"],
        )
        self.assertEqual(store_files(self.root), ["a", "a/1.txt", "a/3.txt", "b", "b/2.txt"])

    def test_fsync_failure_is_its_own(self) -> None:
        """A file whose fsync fails is not published and leaves nothing; the others are."""
        self.rings.fail[1] = -errno.EIO
        batch = [self.sealed(name, b"x") for name in ("a/1.txt", "b/2.txt", "c/3.txt")]
        outcomes = self.storage.publish_all(batch)  # type: ignore[arg-type]
        self.assertIsNone(outcomes[0])
        self.assertIsInstance(outcomes[1], OSError)
        self.assertEqual(outcomes[1].errno, errno.EIO)  # type: ignore[union-attr]
        self.assertIsNone(outcomes[2])
        self.assertEqual(store_files(self.root), ["a", "a/1.txt", "c", "c/3.txt"])

    def test_no_ring(self) -> None:
        """
        Where no ring can be had (made in this thread), the fsyncs are made one at a time,
        from then on: all are stored.
        """
        self.rings.broken = True
        synced = []
        realFsync = os.fsync
        self.patch(os, "fsync", lambda fd: (synced.append(fd), realFsync(fd)))
        batch = [self.sealed(name, b"x") for name in ("a/1.txt", "b/2.txt")]
        self.assertEqual(self.storage.publish_all(batch), [None, None])  # type: ignore[arg-type]
        self.assertEqual(len(synced), 2)
        self.assertEqual(store_files(self.root), ["a", "a/1.txt", "b", "b/2.txt"])
        self.assertIsNone(self.storage.rings)

    def test_ring_failed_part_way(self) -> None:
        """
        A ring failing part way: a result that came back stands; an fsync that never
        reached the kernel is made again, alone; one that did and whose result was lost
        fails its upload (a writeback error is told once: made again, it would succeed).
        """
        self.rings.partWay = RingFailed(OSError(errno.EINTR, "x"), [0, None, None], {2})
        synced = []
        realFsync = os.fsync
        self.patch(os, "fsync", lambda fd: (synced.append(fd), realFsync(fd)))
        batch = [self.sealed(name, b"x") for name in ("a/1.txt", "b/2.txt", "c/3.txt")]
        outcomes = self.storage.publish_all(batch)  # type: ignore[arg-type]
        self.assertEqual(outcomes[:2], [None, None])
        self.assertEqual(outcomes[2].errno, errno.EIO)  # type: ignore[union-attr]
        self.assertEqual(len(synced), 1)
        self.assertEqual(store_files(self.root), ["a", "a/1.txt", "b", "b/2.txt"])
        self.assertIsNotNone(self.storage.rings)  # the next batch tries a ring again

    def test_cleanup_failing_is_its_own(self) -> None:
        """A writer whose facts and then cleanup fail is its own outcome; the rest publish."""
        batch = [self.sealed(name, b"x") for name in ("a/1.txt", "b/2.txt")]

        def broken(record):
            raise OSError(errno.EIO, "cleanup failed")

        batch[0][0].stamp = broken  # type: ignore[method-assign]
        outcomes = self.storage.publish_all(batch)  # type: ignore[arg-type]
        self.assertIsInstance(outcomes[0], OSError)
        self.assertIsNone(outcomes[1])
        self.assertIn("b/2.txt", store_files(self.root))

    def test_sync_off(self) -> None:
        """SyncUploads = false: no fsync, through the ring or not."""
        storage = LocalStorage(self.root, synchronous, sync=False, rings=self.rings)  # type: ignore[arg-type]
        writer = storage.writer("n/e/w.txt", draft("n/e/w.txt", 3))
        writer.write(b"new")
        writer.seal()
        self.assertEqual(storage.publish_all([(writer, record_for("n/e/w.txt", b"new"))]), [None])
        storage.settle(["n/e/w.txt"])
        self.assertEqual(self.events, ["facts", "link"])
