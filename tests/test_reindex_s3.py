"""
hmacfs reindex with StorageBackend = "s3" (issue 16): the records come back from the
objects of the bucket (their facts, or their size, time, stated or streamed SHA-256 and
a guessed type), on a real SeaweedFS under a key prefix of each test's own, through the
command as an operator runs it, with the embedded SQLite as the metadata store.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from email.utils import parsedate_to_datetime

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from hmacd.config import S3_MIN_PART, parse_config
from hmacd.facts import encode
from hmacd.metadata import FileRecord
from hmacd.reindex import GUESSED_PROTOCOL, open_storage, record_of, reindex, worker_threads
from hmacd.s3 import S3Client
from hmacd.storage.s3 import FACTS_META, SHA256_META, ReactorThreadCall, S3Storage
from hmacd.storage.s3_writer import STAGING
from hmacd.store.sql import SQLStore
from tests.seaweed import SeaweedMini, shared_mini
from tests.servers import free_port
from tests.store_contract import record
from tests.support import synchronous

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TTL = 3600
MiB = 1024 * 1024
# The credentials' variables are taken out of the command's environment: each test says
# where its keys come from.
_KEY_VARIABLES = ("HMACFS_S3_ACCESS_KEY", "HMACFS_S3_SECRET_KEY")
_MAIN = "import sys, hmacd.cli; sys.exit(hmacd.cli.main(sys.argv[1:]))"


def run_command(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """hmacfs from this checkout, as an operator runs it."""
    environ = {k: v for k, v in os.environ.items() if k not in _KEY_VARIABLES}
    environ.update(env or {}, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-c", _MAIN, *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def modified(head) -> float:
    """An object's time as the storage reads it: its Last-Modified, in seconds."""
    return parsedate_to_datetime(head.last_modified).timestamp()


def guessed(path: str, body: bytes, head, content_type: str, sha256: str = "") -> FileRecord:
    """The record of an object without facts, as reindex should make it."""
    return FileRecord(
        path=path,
        size=len(body),
        content_type=content_type,
        sha256=sha256 or hashlib.sha256(body).hexdigest(),
        created=modified(head),
        protocol=GUESSED_PROTOCOL,
        expires=modified(head) + TTL,
    )


class BucketCase(TestCase):
    """A bucket prefix of the test's own, a client and an S3Storage on it, and a StoreDir."""

    timeout = 180

    def setUp(self) -> None:
        self.mini = shared_mini()
        self.prefix = f"reindex-{self.id().rsplit('.', 1)[-1]}-{os.urandom(4).hex()}/"
        self.client = self.client_for(self.prefix)
        self.storage = S3Storage(
            self.client,
            reactor,
            os.path.abspath(self.mktemp()),
            synchronous,
            threshold=S3_MIN_PART,
            part_size=S3_MIN_PART,
        )
        self.addCleanup(self.storage.stop)
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)

    def client_for(self, prefix: str, mini: SeaweedMini | None = None) -> S3Client:
        mini = mini or self.mini
        client = S3Client(
            reactor,
            mini.endpoint,
            mini.bucket,
            mini.access_key,
            mini.secret_key,
            prefix=prefix,
            timeout=10.0,
        )
        self.addCleanup(client.close)
        return client

    def publish(self, facts: FileRecord, body: bytes) -> Deferred[None]:
        """Upload C{body} through the S3 storage as an upload does, with C{facts}."""

        def go() -> None:
            writer = self.storage.writer(facts.path)
            for i in range(0, len(body), 64 * 1024):
                writer.write(body[i : i + 64 * 1024])
            self.assertEqual(writer.seal(), facts.sha256)
            writer.publish(facts)

        return deferToThread(go)

    def config_keys(self, **keys: str) -> dict[str, str]:
        return {
            "StoreDir": self.root,
            "StorageBackend": "s3",
            "S3Endpoint": self.mini.endpoint,
            "S3Bucket": self.mini.bucket,
            "S3Prefix": self.prefix,
            "FileTTL": "1h",
            **keys,
        }

    def write_config(self, **keys: str) -> str:
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            for name, value in self.config_keys(**keys).items():
                f.write(f'{name} = "{value}"\n')
        return path

    def sqlite(self) -> Deferred[SQLStore]:
        """The embedded store the command uses (StoreDir/.hmacfs/meta.sqlite3), started."""
        store = SQLStore.sqlite(os.path.join(self.root, ".hmacfs", "meta.sqlite3"), reactor)
        self.addCleanup(store.stop)
        return store.start().addCallback(lambda _: store)


class CommandTests(BucketCase):
    """hmacfs reindex --config FILE with StorageBackend = "s3"."""

    @inlineCallbacks
    def test_rebuilds_records_from_the_bucket(self):
        """Every object gets its record again, equal to the one it had; hidden keys get none."""
        originals: dict[str, FileRecord] = {}
        for path, body, changes in [
            ("slot/picture.jpg", b"jpeg!", dict(uploader="alice@example.org")),
            ("slot/ü nicode.txt", b"ok", dict(content_type="text/plain", protocol="jwt")),
            # Above the multipart threshold: streamed through a staging object, then copied.
            ("big/clip.webm", os.urandom(S3_MIN_PART + 1234), dict(content_type="video/webm")),
        ]:
            facts = record(
                path,
                size=len(body),
                sha256=hashlib.sha256(body).hexdigest(),
                expires=1_800_003_600.0 if path.endswith(".jpg") else None,
                **changes,
            )
            yield self.publish(facts, body)
            originals[path] = facts
        # Put by other tools: no facts; one states its SHA-256, one is larger than a read.
        pdf, blob, data = b"%PDF-1.4", os.urandom(3 * MiB + 17), b"some data"
        yield self.client.put_object("old/report.pdf", pdf)
        yield self.client.put_object("old/blob.bin", blob)
        yield self.client.put_object(
            "tool/data.bin", data, metadata={SHA256_META: hashlib.sha256(data).hexdigest()}
        )
        for path, body, type_ in [
            ("old/report.pdf", pdf, "application/pdf"),
            ("old/blob.bin", blob, "application/octet-stream"),
            ("tool/data.bin", data, "application/octet-stream"),
        ]:
            head = yield self.client.head_object(path)
            originals[path] = guessed(path, body, head, type_)
        # Internal objects: a staging object of a streamed upload, a dot name.
        yield self.client.put_object(STAGING + "0123abcd", b"half an upload")
        yield self.client.put_object("slot/.hidden.txt", b"not a file")

        store = yield self.sqlite()
        kept = replace(originals["slot/picture.jpg"], content_type="image/png")
        yield store.put(kept)  # a record that survived is not touched
        yield store.stop()

        config = self.write_config()
        keys = {
            "HMACFS_S3_ACCESS_KEY": self.mini.access_key,
            "HMACFS_S3_SECRET_KEY": self.mini.secret_key,
        }
        done = yield deferToThread(run_command, "reindex", "--config", config, env=keys)
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        self.assertEqual(
            done.stdout,
            "hmacfs reindex: sqlite: 6 files: 1 had a record, 2 recorded from their facts, "
            "3 recorded with a guessed type (no facts)\n",
        )
        store = yield self.sqlite()
        self.assertEqual((yield store.get("slot/picture.jpg")), kept)
        for path, original in originals.items():
            if path != "slot/picture.jpg":
                self.assertEqual((yield store.get(path)), original, path)
        for path in (STAGING + "0123abcd", "slot/.hidden.txt"):
            self.assertIsNone((yield store.get(path)), path)
        yield store.stop()

        done = yield deferToThread(run_command, "reindex", "--config", config, env=keys)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("6 files: 6 had a record", done.stdout)

    @inlineCallbacks
    def test_unreachable_store(self):
        """An endpoint nobody answers at: one line naming it, exit status 1."""
        port = free_port()
        config = self.write_config(
            S3Endpoint=f"http://127.0.0.1:{port}",
            S3AccessKey=self.mini.access_key,
            S3SecretKey=self.mini.secret_key,
        )
        done = yield deferToThread(run_command, "reindex", "--config", config)
        self.assertEqual((done.returncode, done.stdout), (1, ""))
        self.assertEqual(
            done.stderr,
            f"hmacfs reindex: object store http://127.0.0.1:{port} (bucket 'hmacfs'): "
            "the store is unavailable: connection refused\n",
        )

    @inlineCallbacks
    def test_no_such_bucket(self):
        """A bucket the store does not have: one line naming the store and the bucket."""
        config = self.write_config(
            S3Bucket="no-such-bucket",
            S3AccessKey=self.mini.access_key,
            S3SecretKey=self.mini.secret_key,
        )
        done = yield deferToThread(run_command, "reindex", "--config", config)
        self.assertEqual((done.returncode, done.stdout), (1, ""))
        self.assertEqual(
            done.stderr,
            f"hmacfs reindex: object store {self.mini.endpoint} (bucket 'no-such-bucket'): "
            f"no bucket 'no-such-bucket' at {self.mini.endpoint}\n",
        )

    @inlineCallbacks
    def test_refused_credentials(self):
        """A refused key pair: one line naming S3AccessKey/S3SecretKey, never the secret."""
        secret = "not-the-secret-" + os.urandom(8).hex()
        config = self.write_config(S3AccessKey=self.mini.access_key, S3SecretKey=secret)
        done = yield deferToThread(run_command, "reindex", "--config", config)
        self.assertEqual((done.returncode, done.stdout), (1, ""))
        self.assertTrue(
            done.stderr.startswith(
                f"hmacfs reindex: S3AccessKey/S3SecretKey: the store at {self.mini.endpoint} "
                f"refused access key {self.mini.access_key!r} for bucket 'hmacfs': "
            ),
            done.stderr,
        )
        self.assertEqual(done.stderr.count("\n"), 1, done.stderr)
        self.assertNotIn(secret, done.stderr)

    @inlineCallbacks
    def test_no_credentials(self):
        """Keys in neither the config nor the environment: said before the store is asked."""
        config = self.write_config()
        done = yield deferToThread(run_command, "reindex", "--config", config)
        self.assertEqual((done.returncode, done.stdout), (1, ""))
        self.assertEqual(
            done.stderr,
            "hmacfs reindex: S3AccessKey/S3SecretKey: not set (nor HMACFS_S3_ACCESS_KEY/"
            "HMACFS_S3_SECRET_KEY in the environment)\n",
        )


class StoppedTests(BucketCase):
    """A command stopped while it waits on the store."""

    @inlineCallbacks
    def test_signal_while_waiting_on_the_store(self):
        """SIGTERM while a worker waits on a store that hangs: the command exits, status 1."""
        mini = SeaweedMini(self)  # its own: it is paused
        client = self.client_for(self.prefix, mini)
        yield client.put_object("a/one.txt", b"1")
        config = self.write_config(
            S3Endpoint=mini.endpoint,
            S3AccessKey=mini.access_key,
            S3SecretKey=mini.secret_key,
        )
        mini.pause()
        code = yield deferToThread(self.stop_while_walking, config)
        self.assertEqual(code, 1)

    def stop_while_walking(self, config: str) -> int:
        environ = {k: v for k, v in os.environ.items() if k not in _KEY_VARIABLES}
        command = subprocess.Popen(
            [sys.executable, "-c", _MAIN, "reindex", "--config", config],
            env=dict(environ, PYTHONPATH=ROOT),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.addCleanup(command.wait)
        self.addCleanup(command.kill)
        # The metadata store is open (the reactor runs, with its signal handlers): the walk
        # begins at once and waits on the paused store (whose deadline is 30 s).
        sqlite = os.path.join(self.root, ".hmacfs", "meta.sqlite3")
        for _ in range(600):
            if os.path.exists(sqlite) or command.poll() is not None:
                break
            time.sleep(0.1)
        time.sleep(1)
        command.send_signal(signal.SIGTERM)
        return command.wait(timeout=60)


class ObjectRecordTests(BucketCase):
    """What the record of an object is made of, and where the work runs."""

    def blocking(self, work):
        """The command's workers: threads of the walk's own."""
        if not hasattr(self, "_workers"):
            self._workers, stop = worker_threads(reactor, 4)
            self.addCleanup(stop)
        return self._workers(work)

    @inlineCallbacks
    def test_stated_sha256_taken_as_it_is(self):
        """An object's x-amz-meta-sha256 is its hash (its bytes are not read); garbage is not."""
        stated = hashlib.sha256(b"the bytes the tool hashed").hexdigest()
        yield self.client.put_object("a/stated.bin", b"abc", metadata={SHA256_META: stated.upper()})
        yield self.client.put_object("a/garbled.bin", b"abc", metadata={SHA256_META: "abc"})
        made = yield deferToThread(record_of, self.storage, "a/stated.bin", TTL)
        self.assertEqual((made[0].sha256, made[1]), (stated, False))
        made = yield deferToThread(record_of, self.storage, "a/garbled.bin", TTL)
        self.assertEqual(made[0].sha256, hashlib.sha256(b"abc").hexdigest())

    @inlineCallbacks
    def test_gone_meanwhile(self):
        """An object deleted between the listing and its HEAD has no record."""
        made = yield deferToThread(record_of, self.storage, "a/gone.bin", TTL)
        self.assertIsNone(made)

    @inlineCallbacks
    def test_facts_of_another_size(self):
        """Facts whose size is not the object's are not believed: the object is measured."""
        facts = record("a/wrong.txt", size=99, content_type="image/png")
        yield self.client.put_object(
            "a/wrong.txt", b"short", metadata={FACTS_META: encode(facts).decode("ascii")}
        )
        made = yield deferToThread(record_of, self.storage, "a/wrong.txt", TTL)
        record_, fromFacts = made
        self.assertEqual(
            (record_.size, record_.content_type, record_.sha256, fromFacts),
            (5, "text/plain", hashlib.sha256(b"short").hexdigest(), False),
        )

    @inlineCallbacks
    def test_walks_in_a_worker_thread(self):
        """reindex() walks the bucket through its blocking callable; the reactor's refuses."""
        yield self.client.put_object("a/one.txt", b"1")
        store = yield self.sqlite()
        with self.assertRaises(ReactorThreadCall):
            yield Deferred.fromCoroutine(reindex(store, self.storage, TTL))
        counts = yield Deferred.fromCoroutine(reindex(store, self.storage, TTL, self.blocking))
        self.assertEqual((counts.files, counts.guessed), (1, 1))

    @inlineCallbacks
    def test_reactor_pool_left_free(self):
        """
        The walk waits in threads of its own: a new connection's host name is resolved in
        the reactor's pool, which waiting calls would otherwise fill (here: its only thread).
        """
        threads = reactor.getThreadPool()
        self.addCleanup(reactor.suggestThreadPoolSize, threads.max)
        reactor.suggestThreadPoolSize(1)
        for i in range(8):
            yield self.client.put_object(f"a/{i}.txt", b"%d" % i)
        config = parse_config(
            self.config_keys(S3AccessKey=self.mini.access_key, S3SecretKey=self.mini.secret_key),
            "t.toml",
        )
        # A client of its own, so that every request of the walk needs a new connection.
        storage, release = open_storage(config, reactor, {})
        self.addCleanup(release)
        store = yield self.sqlite()
        counts = yield Deferred.fromCoroutine(reindex(store, storage, TTL, self.blocking))
        self.assertEqual((counts.files, counts.guessed), (8, 8))

    @inlineCallbacks
    def test_only_its_prefix(self):
        """The walk keeps to S3Prefix: another prefix's objects in the bucket are not its."""
        neighbour = self.client_for(self.prefix.rstrip("/") + "-other/")
        yield neighbour.put_object("a/theirs.txt", b"x")
        yield self.client.put_object("a/ours.txt", b"y")
        config = parse_config(
            self.config_keys(S3AccessKey=self.mini.access_key, S3SecretKey=self.mini.secret_key),
            "t.toml",
        )
        storage, release = open_storage(config, reactor, {})
        # What the command does at the end: with the pool left open, trial would find the
        # reactor unclean (cached connections and their timeouts).
        self.addCleanup(release)
        store = yield self.sqlite()
        counts = yield Deferred.fromCoroutine(reindex(store, storage, TTL, self.blocking))
        self.assertEqual((counts.files, counts.guessed), (1, 1))
        self.assertIsNotNone((yield store.get("a/ours.txt")))
        self.assertIsNone((yield store.get("a/theirs.txt")))
