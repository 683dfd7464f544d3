"""
The contract of hmacd.storage.IStorage, as a mixin: every backend runs it (see
tests/test_storage_local.py).  A subclass gives C{makeStorage()}; the rest is the contract
seen from outside: write, publish without overwriting, read back with ranges and facts,
stat, delete, list, sweep.
"""

from __future__ import annotations

import hashlib

from hmacd.metadata import FileRecord
from hmacd.storage import Conflict, IReadable, IStorage, IWriter, Stat


def record_for(relpath: str, body: bytes, created: float = 1_700_000_000.0) -> FileRecord:
    """The facts a finished upload of C{body} would carry."""
    return FileRecord(
        path=relpath,
        size=len(body),
        content_type="text/plain",
        sha256=hashlib.sha256(body).hexdigest(),
        created=created,
        protocol="v",
    )


class StorageContractMixin:
    """What every IStorage does."""

    storage: IStorage

    def makeStorage(self) -> IStorage:
        raise NotImplementedError

    def setUp(self) -> None:
        self.storage = self.makeStorage()

    def store(self, relpath: str, body: bytes) -> FileRecord:
        """Write, seal and publish C{body} at C{relpath}, as an upload does."""
        writer = self.storage.writer(relpath)
        writer.write(body)
        self.successResultOf(writer.drained())
        record = record_for(relpath, body)
        self.assertEqual(writer.seal(), record.sha256)
        writer.publish(record)
        return record

    def test_provides(self) -> None:
        """The backend provides IStorage, its writers IWriter, its open files IReadable."""
        self.assertTrue(IStorage.providedBy(self.storage))
        writer = self.storage.writer("a/p.txt")
        self.assertTrue(IWriter.providedBy(writer))
        writer.discard()
        self.store("a/q.txt", b"q")
        stored = self.storage.open("a/q.txt")
        self.assertTrue(IReadable.providedBy(stored))
        stored.close()

    def test_round_trip(self) -> None:
        """What is published is read back whole and by range, with its facts and size."""
        record = self.store("d/e.txt", b"hello, world")
        self.assertTrue(self.storage.exists("d/e.txt"))
        stat = self.storage.stat("d/e.txt")
        self.assertIsInstance(stat, Stat)
        self.assertEqual(stat.size, 12)
        stored = self.storage.open("d/e.txt")
        try:
            self.assertEqual(stored.size, 12)
            self.assertEqual(stored.read(0, 100), b"hello, world")
            self.assertEqual(stored.read(7, 5), b"world")
            self.assertEqual(stored.read(12, 5), b"")
            self.assertEqual(stored.facts(), record)
            self.assertEqual(int(stored.modified), stored.modified_ns // 10**9)
            version = stored.version
            hash(version)
        finally:
            stored.close()
        self.storage.delete("d/e.txt")
        self.store("d/e.txt", b"hello again, world")
        again = self.storage.open("d/e.txt")
        self.assertNotEqual(again.version, version)
        again.close()
        self.assertEqual(list(self.storage.files()), ["d/e.txt"])

    def test_unpublished_is_invisible(self) -> None:
        """Bytes being written are not a file: not there, not listed, not opened."""
        writer = self.storage.writer("w.txt")
        writer.write(b"partial")
        self.assertFalse(self.storage.exists("w.txt"))
        self.assertIsNone(self.storage.open("w.txt"))
        self.assertEqual(list(self.storage.files()), [])
        writer.discard()
        self.assertEqual(list(self.storage.files()), [])

    def test_never_overwrites(self) -> None:
        """A second publish at a taken name is a Conflict; the first file stands."""
        late = self.storage.writer("n.txt")
        late.write(b"second")
        self.store("n.txt", b"first")
        self.successResultOf(late.drained())
        late.seal()
        self.assertRaises(Conflict, late.publish, record_for("n.txt", b"second"))
        stored = self.storage.open("n.txt")
        self.assertEqual(stored.read(0, 100), b"first")
        stored.close()
        self.assertEqual(list(self.storage.files()), ["n.txt"])

    def test_writer_refused_at_a_taken_name(self) -> None:
        """A writer for a name that is taken is refused at once."""
        self.store("t.txt", b"t")
        self.assertRaises(Conflict, self.storage.writer, "t.txt")

    def test_delete(self) -> None:
        """delete() says whether there was a file; afterwards there is none."""
        self.store("x/y.txt", b"y")
        self.assertTrue(self.storage.delete("x/y.txt"))
        self.assertFalse(self.storage.delete("x/y.txt"))
        self.assertFalse(self.storage.exists("x/y.txt"))
        self.assertIsNone(self.storage.stat("x/y.txt"))
        self.assertEqual(list(self.storage.files()), [])

    def test_publish_all(self) -> None:
        """
        A batch is published together: each writer's outcome in its place, a name taken
        meanwhile a Conflict for that one alone (the file there stands), the others stored.
        """
        writers, records = [], []
        for name, body in (("b/1.txt", b"one"), ("b/2.txt", b"two"), ("b/3.txt", b"three")):
            writer = self.storage.writer(name)
            writer.write(body)
            self.successResultOf(writer.drained())
            writer.seal()
            writers.append(writer)
            records.append(record_for(name, body))
        self.store("b/2.txt", b"first")
        outcomes = self.storage.publish_all(list(zip(writers, records, strict=True)))
        self.assertEqual([type(o) for o in outcomes], [type(None), Conflict, type(None)])
        self.storage.settle(["b/1.txt", "b/3.txt"])
        self.assertEqual(list(self.storage.files()), ["b/1.txt", "b/2.txt", "b/3.txt"])
        for name, body in (("b/1.txt", b"one"), ("b/2.txt", b"first"), ("b/3.txt", b"three")):
            stored = self.storage.open(name)
            self.assertEqual(stored.read(0, 100), body)
            stored.close()

    def test_settle(self) -> None:
        """Settling names just published (once each, or together) leaves them readable."""
        self.store("s/a.txt", b"a")
        self.store("s/b.txt", b"b")
        self.storage.settle(["s/a.txt", "s/b.txt"])
        self.assertEqual(list(self.storage.files()), ["s/a.txt", "s/b.txt"])

    def test_not_a_file(self) -> None:
        """A name that is a directory of files is no file: no stat, no open."""
        self.store("dir/f.txt", b"f")
        self.assertIsNone(self.storage.stat("dir"))
        self.assertIsNone(self.storage.open("dir"))

    def test_adopt(self) -> None:
        """A finished local file is published with its facts, never over another."""
        source = self.mktemp()
        with open(source, "wb") as f:
            f.write(b"resumed")
        record = record_for("r/s.txt", b"resumed")
        self.storage.adopt(source, "r/s.txt", record)
        stored = self.storage.open("r/s.txt")
        self.assertEqual(stored.read(0, 100), b"resumed")
        self.assertEqual(stored.facts(), record)
        stored.close()
        self.assertRaises(Conflict, self.storage.adopt, source, "r/s.txt", record)

    def test_sweep_spares_recent_temps(self) -> None:
        """A temp newer than the cut-off may be an upload in progress: the sweep keeps it."""
        writer = self.storage.writer("k.txt")
        writer.write(b"k")
        self.assertEqual(self.storage.sweep_temps(0), [])
        self.successResultOf(writer.drained())
        writer.seal()
        writer.publish(record_for("k.txt", b"k"))
        self.assertTrue(self.storage.exists("k.txt"))


__all__ = ["StorageContractMixin", "record_for"]
