"""
hmacfs reindex: a store that lost its records gets them back from the files (issue 14,
item 8), on the embedded SQLite and on the real Redis.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.trial.unittest import TestCase

from hmacd.facts import write_facts
from hmacd.reindex import GUESSED_PROTOCOL, reindex, stored_files, worker_threads
from hmacd.store import StoreUnavailable
from hmacd.store.redis import RedisStore
from hmacd.store.sql import SQLStore
from tests.servers import delete_prefix, free_port
from tests.store_contract import record, require_service
from tests.test_store_redis import SHARED_PORT, prefix

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TTL = 3600


def write(root: str, relpath: str, body: bytes, facts=None) -> str:
    path = os.path.join(root, relpath)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(body)
        if facts is not None:
            write_facts(f.fileno(), facts)
    os.utime(path, (1_800_000_000, 1_800_000_000))
    return path


def lost_store(root: str) -> dict:
    """
    A StoreDir as a store that came back empty finds it: uploads with facts, an older
    upload without, our own dot entries, a symlink.  Returns the records it should get.
    """
    signed = record("slot/picture.dat", size=5, content_type="image/jpeg", sha256="cd" * 32,
                    uploader="alice@example.org", expires=1_800_003_600.0)  # fmt: skip
    write(root, signed.path, b"jpeg!", signed)
    forever = record("slot/ü nicode.txt", size=2, content_type="text/plain", protocol="jwt")
    write(root, forever.path, b"ok", forever)
    write(root, "old/report.pdf", b"%PDF-1.4")
    write(root, "old/.hmacfs-0123456789abcdef.part", b"half an upload")
    write(root, ".hmacfs/partial/x.part", b"a resumable upload")
    os.symlink("/etc/passwd", os.path.join(root, "old", "link.txt"))
    return {
        signed.path: signed,
        forever.path: forever,
        "old/report.pdf": record(
            "old/report.pdf",
            size=8,
            content_type="application/pdf",
            sha256=hashlib.sha256(b"%PDF-1.4").hexdigest(),
            created=1_800_000_000.0,
            protocol=GUESSED_PROTOCOL,
            expires=1_800_000_000.0 + TTL,
        ),
    }


class ReindexChecks:
    """The same story on each store: lost records come back, existing ones stay."""

    def makeStore(self) -> Deferred:
        raise NotImplementedError

    @inlineCallbacks
    def test_rebuilds_missing_records(self):
        """Every served file gets its record: from its facts, or from the file itself."""
        root = os.path.abspath(self.mktemp())
        expected = lost_store(root)
        store = yield self.makeStore()
        kept = record("slot/picture.dat", content_type="image/png", size=5)
        yield store.put(kept)  # a record that survived is not touched
        counts = yield Deferred.fromCoroutine(reindex(store, root, TTL))
        self.assertEqual(
            (counts.files, counts.recorded, counts.from_facts, counts.guessed), (3, 1, 1, 1)
        )
        self.assertEqual((yield store.get("slot/picture.dat")), kept)
        for path in ("slot/ü nicode.txt", "old/report.pdf"):
            self.assertEqual((yield store.get(path)), expected[path], path)
        for path in ("old/link.txt", "old/.hmacfs-0123456789abcdef.part", ".hmacfs/partial/x.part"):
            self.assertIsNone((yield store.get(path)), path)
        self.assertEqual((yield store.count_expired(1_800_000_000.0 + TTL)), 1)
        again = yield Deferred.fromCoroutine(reindex(store, root, TTL))
        self.assertEqual((again.files, again.recorded), (3, 3))


class SQLiteReindexTests(ReindexChecks, TestCase):
    def makeStore(self):
        store = SQLStore.sqlite(os.path.abspath(self.mktemp()) + ".sqlite3", reactor=reactor)
        self.addCleanup(store.stop)
        return store.start().addCallback(lambda _: store)


class RedisReindexTests(ReindexChecks, TestCase):
    """On the shared Redis, under a prefix of the test's own."""

    def makeStore(self):
        keys = prefix()
        store = RedisStore("127.0.0.1", SHARED_PORT, reactor=reactor, prefix=keys)
        self.addCleanup(store.stop)

        def started(_):
            self.addCleanup(delete_prefix, SHARED_PORT, keys)
            return store

        def unreachable(failure):
            failure.trap(StoreUnavailable)
            require_service("redis", failure.getErrorMessage())

        return store.start().addCallbacks(started, unreachable)

    @inlineCallbacks
    def test_store_stops_answering(self):
        """A store that fails mid-way is the command's error, not a partial success."""
        root = os.path.abspath(self.mktemp())
        lost_store(root)
        store = yield self.makeStore()
        yield store.stop()
        with self.assertRaises(StoreUnavailable):
            yield Deferred.fromCoroutine(reindex(store, root, TTL))


class WalkTests(TestCase):
    def test_stored_files(self):
        """Only regular files that could be served: no dot entries, no symlinks."""
        root = os.path.abspath(self.mktemp())
        lost_store(root)
        self.assertEqual(
            list(stored_files(root)), ["old/report.pdf", "slot/picture.dat", "slot/ü nicode.txt"]
        )


def run_command(*args: str) -> subprocess.CompletedProcess:
    """hmacfs from this checkout, as an operator runs it."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    code = "import sys, hmacd.cli; sys.exit(hmacd.cli.main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60
    )


# A worker waits on the reactor (as an object store's blocking call does) when the reactor
# stops: the process must exit all the same.
_STOPPED_WHILE_WAITING = """
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import blockingCallFromThread
from hmacd.reindex import worker_threads

blocking, stop = worker_threads(reactor)

def stop():
    reactor.stop()
    return Deferred()  # never fires

def wait():
    print("waiting", flush=True)
    blockingCallFromThread(reactor, stop)

reactor.callWhenRunning(blocking, wait)
reactor.run()
print("stopped", flush=True)
"""


class WorkerThreadTests(TestCase):
    def test_exit_while_a_worker_waits_on_the_reactor(self):
        """A signal that stops the reactor ends the command, even with a worker waiting."""
        # In the reactor's own pool, the worker was joined at shutdown: the process hung.
        done = subprocess.run(
            [sys.executable, "-c", _STOPPED_WHILE_WAITING],
            env=dict(os.environ, PYTHONPATH=ROOT),
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual((done.returncode, done.stdout), (0, "waiting\nstopped\n"), done.stderr)

    def test_runs_work(self):
        """The pool runs what it is given, in a thread other than the reactor's."""
        blocking, stop = worker_threads(reactor)
        self.addCleanup(stop)
        main = threading.current_thread()
        return blocking(threading.current_thread).addCallback(self.assertIsNot, main)


class CommandTests(TestCase):
    def test_reindex_embedded_sqlite(self):
        """hmacfs reindex --config FILE fills the embedded store and reports counts."""
        root = os.path.abspath(self.mktemp())
        lost_store(root)
        config = self.mktemp()
        with open(config, "w") as f:
            f.write(f'StoreDir = "{root}"\nFileTTL = "1h"\n')
        done = run_command("reindex", "--config", config)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(
            done.stdout,
            "hmacfs reindex: sqlite: 3 files: 0 had a record, 2 recorded from their facts, "
            "1 recorded with a guessed type (no facts)\n",
        )
        self.assertTrue(os.path.exists(os.path.join(root, ".hmacfs", "meta.sqlite3")))
        done = run_command("reindex", "--config", config)
        self.assertIn("3 files: 3 had a record", done.stdout)

    def test_unreachable_store(self):
        """A store that cannot be reached is one clear line and exit status 1."""
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        config = self.mktemp()
        port = free_port()
        with open(config, "w") as f:
            f.write(f'StoreDir = "{root}"\nRedisAddr = "127.0.0.1:{port}"\n')
        done = run_command("reindex", "--config", config)
        self.assertEqual(done.returncode, 1)
        self.assertEqual(done.stdout, "")
        self.assertEqual(
            done.stderr,
            f"hmacfs reindex: no metadata store is reachable: redis 127.0.0.1:{port}: "
            "connection refused\n",
        )

    def test_no_store_dir(self):
        """A StoreDir that does not exist is a user error, not a traceback."""
        config = self.mktemp()
        with open(config, "w") as f:
            f.write('StoreDir = "/nonexistent/hmacfs"\n')
        done = run_command("reindex", "--config", config)
        self.assertEqual(done.returncode, 1)
        self.assertEqual(
            done.stderr, "hmacfs reindex: StoreDir /nonexistent/hmacfs: no such directory\n"
        )
