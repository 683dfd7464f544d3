"""
Deduplication (issue 17): identical uploads share their bytes (hard links into
C{.hmacfs/cas/}), each path keeping its own facts, and the bytes go with the last path.
"""

from __future__ import annotations

import hashlib
import os
import threading
from email.utils import formatdate

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hmacd.config import Config, parse_config
from hmacd.facts import decode, encode
from hmacd.housekeeping import DedupGauge
from hmacd.metadata import FileRecord
from hmacd.reindex import reindex
from hmacd.storage import Conflict
from hmacd.storage.local import CAS_DIR, DedupCensus, LocalStorage
from hmacd.tap import build_metadata
from tests.store_contract import record, require_service
from tests.support import LoopbackServer, MemoryServer, memory_metadata, synchronous, v2_query
from tests.test_http import raw_request
from tests.test_stores_e2e import redisStore, sqlStore
from tests.test_upload import put_head, request_head, status

NOW = 1_800_000_000.0


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def store(storage: LocalStorage, relpath: str, data: bytes, **changes) -> FileRecord:
    """Upload C{data} at C{relpath} through a writer, as an upload does; its record."""
    writer = storage.writer(relpath)
    writer.write(data)
    sha = writer.seal()
    fields = dict(
        path=relpath,
        size=len(data),
        content_type="application/octet-stream",
        sha256=sha,
        created=NOW,
        protocol="v2",
    )
    fields.update(changes)
    r = FileRecord(**fields)  # type: ignore[arg-type]
    writer.publish(r)
    return r


def entries(root: str) -> list[str]:
    """The content entries under root, as shard/name."""
    cas = os.path.join(root, CAS_DIR)
    if not os.path.isdir(cas):
        return []
    return sorted(
        f"{shard}/{name}"
        for shard in os.listdir(cas)
        for name in os.listdir(os.path.join(cas, shard))
    )


class FactsTests(SynchronousTestCase):
    """Facts on a shared inode name the path they are of; any other path reads none."""

    def test_named_facts_are_their_paths_only(self) -> None:
        """Named facts decode for their own path, and as no facts for any other."""
        r = record("a/one.png", content_type="image/png")
        value = encode(r, named=True)
        self.assertEqual(decode("a/one.png", value), r)
        self.assertIsNone(decode("b/two.txt", value))

    def test_unnamed_facts_unchanged(self) -> None:
        """Without named, the value is what it always was: no path in it."""
        r = record("a/one.png")
        self.assertNotIn(b'"path"', encode(r))
        self.assertEqual(decode("anything", encode(r)), record("anything"))


class LocalDedupTests(SynchronousTestCase):
    """The local directory with Deduplication on."""

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.shared: list[int] = []
        self.storage = LocalStorage(
            self.root, synchronous, dedup=True, on_shared=self.shared.append
        )

    def path(self, relpath: str) -> str:
        return os.path.join(self.root, relpath)

    def test_identical_bytes_stored_once(self) -> None:
        """A second upload of the same bytes is a link to the first's inode; no temp stays."""
        data = b"the same bytes" * 100
        store(self.storage, "a/x.png", data)
        store(self.storage, "b/y.txt", data)
        a, b = os.stat(self.path("a/x.png")), os.stat(self.path("b/y.txt"))
        self.assertEqual(a.st_ino, b.st_ino)
        self.assertEqual(a.st_nlink, 3)  # two paths and the entry
        self.assertEqual(entries(self.root), [f"{digest(data)[:2]}/{digest(data)}"])
        self.assertEqual(sorted(os.listdir(self.path("b"))), ["y.txt"])
        self.assertEqual(self.shared, [len(data)])
        with open(self.path("b/y.txt"), "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertEqual(self.storage.dedup_census(), DedupCensus(1, 2, len(data), len(data), 0))

    def test_different_bytes_apart(self) -> None:
        """Different bytes are different inodes and entries, nothing saved."""
        store(self.storage, "a", b"one")
        store(self.storage, "b", b"two")
        self.assertNotEqual(os.stat(self.path("a")).st_ino, os.stat(self.path("b")).st_ino)
        self.assertEqual(self.storage.dedup_census(), DedupCensus(2, 2, 6, 0, 0))
        self.assertEqual(self.shared, [])

    def test_second_path_reads_no_facts_of_the_first(self) -> None:
        """The first path's facts are its own; the second path has none (its record has)."""
        first = store(self.storage, "a/x.png", b"shared", content_type="image/png")
        store(self.storage, "b/y.txt", b"shared", content_type="text/plain")
        for relpath, expected in (("a/x.png", first), ("b/y.txt", None)):
            stored = self.storage.open(relpath)
            assert stored is not None
            self.assertEqual(stored.facts(), expected)
            self.assertTrue(stored.shared)
            stored.close()

    def test_bytes_go_with_the_last_path(self) -> None:
        """Deleting one path keeps the bytes for the other; deleting both frees the entry."""
        store(self.storage, "a/x", b"kept while referred to")
        store(self.storage, "b/y", b"kept while referred to")
        self.assertTrue(self.storage.delete("a/x"))
        self.assertEqual(len(entries(self.root)), 1)
        self.assertEqual(os.stat(self.path("b/y")).st_nlink, 2)
        with open(self.path("b/y"), "rb") as f:
            self.assertEqual(f.read(), b"kept while referred to")
        self.assertTrue(self.storage.delete("b/y"))
        self.assertEqual(entries(self.root), [])
        self.assertEqual(self.storage.dedup_census(), DedupCensus())
        self.assertFalse(os.path.exists(self.path("a")))

    def test_path_uploaded_again_has_its_new_facts(self) -> None:
        """A path deleted and uploaded again with the same bytes does not get the old facts."""
        store(self.storage, "a/x", b"again", content_type="image/png", created=NOW)
        store(self.storage, "b/y", b"again")
        self.storage.delete("a/x")
        store(self.storage, "a/x", b"again", content_type="text/plain", created=NOW + 50)
        stored = self.storage.open("a/x")
        assert stored is not None
        # The old upload's facts (image/png, NOW) are nobody's now: its record serves it.
        self.assertIsNone(stored.facts())
        stored.close()

    def test_name_taken(self) -> None:
        """Publishing identical bytes at a taken name is a Conflict; nothing is left."""
        store(self.storage, "a/x", b"first")
        writer = self.storage.writer("b/y")
        writer.write(b"first")
        sha = writer.seal()
        store(self.storage, "b/y", b"other")
        self.assertRaises(
            Conflict, writer.publish, FileRecord("b/y", 5, "text/plain", sha, NOW, "v2")
        )
        self.assertEqual(os.listdir(self.path("b")), ["y"])
        self.assertEqual(os.stat(self.path("a/x")).st_nlink, 2)

    def test_adopt_shares_too(self) -> None:
        """A resumable upload's finished file is shared like any other."""
        store(self.storage, "a/x", b"resumed")
        source = os.path.join(self.root, "source")
        with open(source, "wb") as f:
            f.write(b"resumed")
        r = FileRecord("b/y", 7, "text/plain", digest(b"resumed"), NOW, "v2")
        self.storage.adopt(source, "b/y", r)
        self.assertEqual(os.stat(self.path("a/x")).st_ino, os.stat(self.path("b/y")).st_ino)
        self.assertEqual(os.stat(source).st_nlink, 1)  # the source stays its own

    def test_adopt_new_content_entered(self) -> None:
        """A resumable upload of new bytes becomes their entry, with facts naming it."""
        source = os.path.join(self.root, "source")
        with open(source, "wb") as f:
            f.write(b"new")
        r = FileRecord("b/y", 3, "text/plain", digest(b"new"), NOW, "v2")
        self.storage.adopt(source, "b/y", r)
        os.unlink(source)
        self.assertEqual(os.stat(self.path("b/y")).st_nlink, 2)
        stored = self.storage.open("b/y")
        assert stored is not None
        self.assertEqual(stored.facts(), r)
        stored.close()

    def test_release_rechecks_under_the_lock(self) -> None:
        """
        An upload linking to the entry between a deletion's first look and its lock keeps
        the entry: the count is judged again under the exclusive lock.
        """
        store(self.storage, "a/x", b"contended")
        os.unlink(self.path("a/x"))  # the entry alone now: a deletion would remove it
        sha = digest(b"contended")
        entry = self.storage.content_path(sha)
        real_flock = __import__("fcntl").flock
        linked = []

        def flock(fd, operation):
            if not linked:
                # The upload that was waiting for the entry links now.
                os.link(entry, self.path("late"))
                linked.append(True)
            return real_flock(fd, operation)

        from hmacd.storage import local

        self.patch(local.fcntl, "flock", flock)
        self.assertFalse(self.storage.release_content(sha))
        self.assertTrue(os.path.exists(entry))
        with open(self.path("late"), "rb") as f:
            self.assertEqual(f.read(), b"contended")

    def test_link_waits_for_a_release(self) -> None:
        """An upload meeting an entry that a deletion holds waits, then stores its own."""
        import fcntl

        store(self.storage, "a/x", b"released")
        os.unlink(self.path("a/x"))
        sha = digest(b"released")
        fd = os.open(self.storage.content_path(sha), os.O_RDONLY)
        fcntl.flock(fd, fcntl.LOCK_EX)  # a deletion judging the count
        result: list[bool] = []
        thread = threading.Thread(
            target=lambda: result.append(
                self.storage.link_content(sha, len(b"released"), self.path("b"))
            )
        )
        thread.start()
        thread.join(0.2)
        self.assertEqual(result, [])  # it waits on the lock
        os.unlink(self.storage.content_path(sha))  # the deletion removes the entry
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        thread.join()
        self.assertEqual(result, [False])  # nothing to link to: it keeps its own bytes
        self.assertFalse(os.path.exists(self.path("b")))

    def test_concurrent_uploads_and_deletions(self) -> None:
        """
        Threads uploading and deleting the same bytes under many names lose no byte, and
        once every name is gone no entry is left.
        """
        data = os.urandom(10_000)
        errors: list[BaseException] = []

        def work(n: int) -> None:
            try:
                for i in range(40):
                    name = f"t{n}/{i}"
                    store(self.storage, name, data)
                    with open(self.path(name), "rb") as f:
                        if f.read() != data:
                            raise AssertionError(f"{name}: wrong bytes")
                    if i % 2:
                        self.storage.delete(name)
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        kept = list(self.storage.files())
        self.assertEqual(len(kept), 80)
        for name in kept:
            with open(self.path(name), "rb") as f:
                self.assertEqual(f.read(), data)
        for name in kept:
            self.storage.delete(name)
        self.assertEqual(entries(self.root), [])

    def test_processes_share_the_entry(self) -> None:
        """
        Two processes (as with Workers) uploading and deleting the same bytes lose no byte,
        and once every name is gone no entry is left.
        """
        data = os.urandom(10_000)
        children = []
        for n in range(2):
            pid = os.fork()
            if pid == 0:  # the child: no reactor, no trial, only the storage
                code = 1
                try:
                    for i in range(60):
                        name = f"p{n}/{i}"
                        store(self.storage, name, data)
                        with open(self.path(name), "rb") as f:
                            if f.read() != data:
                                break
                        if i % 2:
                            self.storage.delete(name)
                    else:
                        code = 0
                finally:
                    os._exit(code)
            children.append(pid)
        for pid in children:
            _, code = os.waitpid(pid, 0)
            self.assertEqual(os.waitstatus_to_exitcode(code), 0)
        kept = list(self.storage.files())
        self.assertEqual(len(kept), 60)
        inodes = {os.stat(self.path(name)).st_ino for name in kept}
        for name in kept:
            with open(self.path(name), "rb") as f:
                self.assertEqual(f.read(), data)
        # Shared, but for the copies two uploads finishing at once may keep.
        self.assertLess(len(inodes), len(kept))
        for name in kept:
            self.storage.delete(name)
        self.assertEqual(entries(self.root), [])

    def test_orphan_entry_swept(self) -> None:
        """An entry left without paths (a crash after a deletion) goes at the temp sweep."""
        store(self.storage, "a/x", b"orphan")
        os.unlink(self.path("a/x"))  # as if the process died before releasing
        self.assertEqual(self.storage.dedup_census().orphans, 1)
        removed = self.storage.sweep_temps(NOW)
        self.assertEqual(len(removed), 1)
        self.assertEqual(entries(self.root), [])

    def test_take_down_removes_every_path(self) -> None:
        """take_down removes every path with those bytes, shared or not, and the entry."""
        plain = LocalStorage(self.root, synchronous)  # uploaded before Deduplication
        store(plain, "old/copy", b"unwanted")
        store(self.storage, "a/x", b"unwanted")
        store(self.storage, "b/y", b"unwanted")
        store(self.storage, "c/z", b"wanted")
        gone = self.storage.take_down(digest(b"unwanted"))
        self.assertEqual(sorted(gone), ["a/x", "b/y", "old/copy"])
        self.assertEqual(list(self.storage.files()), ["c/z"])
        self.assertEqual(entries(self.root), [f"{digest(b'wanted')[:2]}/{digest(b'wanted')}"])
        self.assertRaises(ValueError, self.storage.take_down, "../../etc")

    def test_turned_off_still_releases(self) -> None:
        """With Deduplication turned off later, deleting shared paths still frees the entry."""
        store(self.storage, "a/x", b"from before")
        store(self.storage, "b/y", b"from before")
        later = LocalStorage(self.root, synchronous)
        self.assertTrue(later.shares)
        store(later, "c/z", b"from before")
        self.assertEqual(os.stat(self.path("c/z")).st_nlink, 1)  # not shared any more
        later.delete("a/x")
        later.delete("b/y")
        self.assertEqual(entries(self.root), [])


class ReindexTests(SynchronousTestCase):
    """Records rebuilt from shared files: each path its own."""

    def test_second_path_guessed_from_its_own(self) -> None:
        """
        The first path gets its facts back; the second a record of its own: the digest
        from the shared facts (no hashing), the time from when it was linked in.
        """
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        storage = LocalStorage(root, synchronous, dedup=True)
        first = store(storage, "s1/a.png", b"bytes", content_type="image/png", created=NOW)
        store(storage, "s2/b.png", b"bytes", content_type="text/plain", created=NOW + 10)
        os.utime(os.path.join(root, "s2"), (NOW + 10, NOW + 10))
        os.utime(os.path.join(root, "s1", "a.png"), (NOW, NOW))  # the inode: the first's
        metadata = memory_metadata(Clock())
        from hmacd import reindex as reindex_module

        def no_hashing(*args):
            raise AssertionError("a shared file was hashed")

        self.patch(reindex_module, "_sha256", no_hashing)
        counts = self.successResultOf(Deferred.fromCoroutine(reindex(metadata, root, file_ttl=100)))
        self.assertEqual((counts.from_facts, counts.guessed), (1, 1))
        self.assertEqual(self.successResultOf(metadata.get("s1/a.png")), first)
        second = self.successResultOf(metadata.get("s2/b.png"))
        self.assertEqual(
            (second.sha256, second.created, second.expires, second.protocol),
            (digest(b"bytes"), NOW + 10, NOW + 110, "reindex"),
        )


class DedupOffTests(SynchronousTestCase):
    """Deduplication off (the default): nothing shared, no content area made."""

    def test_nothing_shared(self) -> None:
        """Identical uploads are separate files, and no .hmacfs/cas appears."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        storage = LocalStorage(root, synchronous)
        self.assertFalse(storage.shares)
        store(storage, "a", b"same")
        store(storage, "b", b"same")
        self.assertEqual(os.stat(os.path.join(root, "a")).st_nlink, 1)
        self.assertFalse(os.path.exists(os.path.join(root, CAS_DIR)))


class ConfigTests(SynchronousTestCase):
    def test_key(self) -> None:
        """Deduplication is a boolean, off by default."""
        self.assertFalse(Config().deduplication)
        self.assertTrue(parse_config({"Deduplication": True}, "f").deduplication)

    def test_with_s3(self) -> None:
        """With StorageBackend = "s3" it is accepted (references in the bucket)."""
        config = parse_config(
            {
                "Deduplication": True,
                "StorageBackend": "s3",
                "S3Endpoint": "http://127.0.0.1:1",
                "S3Bucket": "b",
            },
            "f.toml",
        )
        self.assertTrue(config.deduplication)


class MetricsTests(SynchronousTestCase):
    def test_counter_and_gauge(self) -> None:
        """dedup_bytes counts shared uploads' bytes; the gauge is the census's saving."""
        root = os.path.abspath(self.mktemp())
        server = MemoryServer(root, dedup=True)
        fs = server.fs
        store(fs.storage, "a", b"x" * 1000)
        store(fs.storage, "b", b"x" * 1000)
        store(fs.storage, "c", b"x" * 1000)
        gauge = DedupGauge(fs)
        gauge.count()
        text = fs.metrics.render().decode()
        self.assertIn("hmac_file_server_dedup_bytes_total 2000.0", text)
        self.assertIn("hmac_file_server_dedup_saved_bytes 2000.0", text)


class WiringTests(SynchronousTestCase):
    """The config reaches the storage, and the gauge runs where there is sharing."""

    def test_sweeps_count_when_shared(self) -> None:
        """The main process's sweeps include the census exactly when sharing can exist."""
        from twisted.internet.testing import MemoryReactorClock

        from hmacd.services import build_file_server, sweeps

        for dedup in (False, True):
            root = os.path.abspath(self.mktemp())
            os.makedirs(root)
            clock = MemoryReactorClock()
            config = Config(store_dir=root, deduplication=dedup)
            fs = build_file_server(config, b"s" * 16, clock, memory_metadata(clock))
            found = [s for s in sweeps(config, fs) if isinstance(s, DedupGauge)]
            self.assertEqual((fs.storage.dedup, len(found)), (dedup, int(dedup)))


class HTTPTests(SynchronousTestCase):
    """Each path of shared bytes is served with its own type, time and expiry."""

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        self.server = MemoryServer(self.root, dedup=True, file_ttl=100)
        self.server.clock.advance(NOW)

    def put(self, path: str, data: bytes, content_type: str) -> int:
        channel, transport = self.server.connect()
        query = v2_query(path, len(data), content_type)
        channel.dataReceived(
            put_head(path, len(data), query, (f"Content-Type: {content_type}",)) + data
        )
        return status(transport)

    def get(self, path: str) -> bytes:
        channel, transport = self.server.connect()
        channel.dataReceived(request_head("GET", f"/upload/{path}"))
        return transport.value()

    def test_each_path_its_own(self) -> None:
        """Type, Last-Modified and expiry are each path's own; the ETag is the content's."""
        data = b"\x89PNG shared bytes"
        self.assertEqual(self.put("a/x.png", data, "image/png"), 201)
        self.server.clock.advance(50)
        self.assertEqual(self.put("b/y.txt", data, "text/plain"), 201)
        first, second = self.get("a/x.png"), self.get("b/y.txt")
        self.assertIn(b"Content-Type: image/png", first)
        self.assertIn(b"Content-Type: text/plain", second)
        self.assertIn(formatdate(NOW, usegmt=True).encode(), first)
        self.assertIn(formatdate(NOW + 50, usegmt=True).encode(), second)
        etag = b'"' + digest(data)[:32].encode() + b'"'
        self.assertIn(b"ETag: " + etag, first)
        self.assertIn(b"ETag: " + etag, second)
        self.assertTrue(first.endswith(data) and second.endswith(data))
        # The first path's expiry is not the second's.
        self.server.clock.advance(60)
        self.assertTrue(self.get("a/x.png").startswith(b"HTTP/1.1 410 "))
        self.assertTrue(self.get("b/y.txt").startswith(b"HTTP/1.1 200 "))


class StoreDedupSuite:
    """Mixed into a TestCase with makeMetadata(root): the GET of a second path on a store."""

    @inlineCallbacks
    def test_second_path_served_from_its_record(self):
        """Shared bytes under two slots: each GET has its own type, expiry and time."""
        clock = Clock()
        clock.advance(NOW)
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        metadata = yield self.makeMetadata(root)
        self.addCleanup(metadata.stop)
        if not metadata.writable():
            require_service(metadata.name, "not answering")
        server = LoopbackServer(
            self, root=root, clock=clock, metadata=metadata, dedup=True, file_ttl=100
        )
        data = b"GIF89a the same picture"
        paths = (("s1/cat.gif", "image/gif"), ("s2/cat.bin", "application/octet-stream"))
        for path, content_type in paths:
            target = f"/upload/{path}?" + v2_query(path, len(data), content_type)
            put = yield deferToThread(
                raw_request, server, "PUT", target, data, {"Content-Type": content_type}
            )
            self.assertEqual(put.code, 201)
            clock.advance(30)
        a, b = (os.stat(os.path.join(root, p)) for p, _ in paths)
        self.assertEqual(a.st_ino, b.st_ino)
        for (path, content_type), created in zip(paths, (NOW, NOW + 30), strict=True):
            got = yield deferToThread(raw_request, server, "GET", f"/upload/{path}")
            self.assertEqual(
                (got.code, got.body, got.headers["content-type"], got.headers["last-modified"]),
                (200, data, content_type, formatdate(created, usegmt=True)),
            )
        clock.advance(45)  # the first is past its expiry, the second not
        gone = yield deferToThread(raw_request, server, "GET", "/upload/s1/cat.gif")
        kept = yield deferToThread(raw_request, server, "GET", "/upload/s2/cat.bin")
        self.assertEqual((gone.code, kept.code), (410, 200))
        # Reindex of a store that lost both records: the second path is not given the
        # first one's facts.
        for path, _ in paths:
            yield metadata.delete(path)
        yield reindex(metadata, root)
        first = yield metadata.get("s1/cat.gif")
        second = yield metadata.get("s2/cat.bin")
        self.assertEqual(first.content_type, "image/gif")
        self.assertEqual((second.protocol, second.sha256), ("reindex", digest(data)))


class SQLiteDedupTests(StoreDedupSuite, TestCase):
    """The embedded SQLite."""

    @inlineCallbacks
    def makeMetadata(self, root):
        metadata = build_metadata(Config(store_dir=root), reactor)
        yield metadata.start()
        return metadata


class RedisDedupTests(StoreDedupSuite, TestCase):
    """Redis."""

    @inlineCallbacks
    def makeMetadata(self, root):
        from hmacd.store.failover import FailoverStore

        metadata = FailoverStore(redisStore(self), clock=reactor)
        yield metadata.start()
        return metadata


class PostgresDedupTests(StoreDedupSuite, TestCase):
    """PostgreSQL."""

    @inlineCallbacks
    def makeMetadata(self, root):
        from hmacd.store.failover import FailoverStore

        metadata = FailoverStore(sqlStore(self, "postgres"), clock=reactor)
        yield metadata.start()
        return metadata
