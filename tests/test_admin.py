"""
C{hmacfs admin}: every command against the embedded SQLite (through the config, as an
operator runs it), real Redis and real PostgreSQL (a prefix and a table of each test's
own), with files in a local StoreDir.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import time
from dataclasses import replace

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hmacd.admin import (
    AdminError,
    RecordFilter,
    register,
    run_admin,
    same_uploader,
    store_path,
    type_matches,
)
from hmacd.config import Config
from hmacd.s3.protocol import NoSuchKey
from hmacd.services import build_metadata
from hmacd.store import StoreUnavailable
from hmacd.store.failover import FailoverStore
from hmacd.store.redis import RedisStore
from hmacd.store.sql import SQLStore
from tests.servers import delete_prefix, free_port
from tests.store_contract import record, require_service
from tests.test_reindex_s3 import BucketCase, run_command
from tests.test_store_redis import SHARED_PORT
from tests.test_store_redis import prefix as redis_prefix
from tests.test_store_sql import (
    POSTGRES,
    drop_table,
    postgres_connection,
    postgres_down,
    unique_table,
)

DAY = 86400.0
# The records' times are counted back from now: --older-than is.
NOW = float(int(time.time()))


def parse(*argv: str) -> argparse.Namespace:
    """The arguments as hmacfs's own parser reads them."""
    parser = argparse.ArgumentParser(prog="hmacfs")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["admin", *argv])


def body_of(path: str) -> bytes:
    return f"the bytes of {path}\n".encode()


class AdminChecks:
    """The commands on one kind of store; C{freshStore()} gives an unstarted FailoverStore."""

    def freshStore(self) -> FailoverStore | None:
        raise NotImplementedError

    def setUp(self) -> None:
        self.root = os.path.abspath(self.mktemp())
        os.makedirs(self.root)
        self.audit = os.path.join(self.root, "..", "audit.log")
        self.config = os.path.abspath(self.mktemp())
        with open(self.config, "w") as f:
            f.write(f'StoreDir = "{self.root}"\nAuditLog = "{self.audit}"\n')

    def store(self) -> FailoverStore:
        given = self.freshStore()
        if given is not None:
            return given
        return build_metadata(Config(store_dir=self.root), reactor)

    async def withStore(self, work):
        store = self.store()
        await store.start()
        try:
            return await work(store)
        finally:
            await store.stop()

    def seed(self, *records) -> Deferred:
        """Put C{records}, and a file of each in StoreDir whose SHA-256 the record gives."""
        made = []
        for r in records:
            path = os.path.join(self.root, r.path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            body = body_of(r.path)
            with open(path, "wb") as f:
                f.write(body)
            made.append(replace(r, sha256=hashlib.sha256(body).hexdigest()))

        async def put(store):
            for r in made:
                await store.put(r)
            return made

        return ensureDeferred(self.withStore(put))

    def admin(self, *argv: str) -> Deferred:
        """Run C{hmacfs admin argv...}: fires (status, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        args = parse(*argv[:1], "--config", self.config, *argv[1:])
        d = ensureDeferred(run_admin(reactor, args, out, err, store=self.freshStore()))
        return d.addCallback(lambda code: (code, out.getvalue(), err.getvalue()))

    def auditLines(self) -> list[dict]:
        if not os.path.exists(self.audit):
            return []
        with open(self.audit) as f:
            return [json.loads(line) for line in f]

    def people(self):
        return [
            record("a/old.png", content_type="image/png", uploader="alice@example.org",
                   created=NOW - 40 * DAY, size=3_000_000),
            record("a/new.txt", content_type="text/plain; charset=utf-8",
                   uploader="Alice@Example.org/phone", created=NOW, size=10),
            record("b/cat.jpg", content_type="image/jpeg", uploader="bob@example.org",
                   created=NOW - 2 * DAY, size=20_000_000),
            record("c/anon.bin", content_type="application/octet-stream", uploader=None,
                   created=NOW - 100 * DAY, size=5),
        ]  # fmt: skip

    async def test_ls(self):
        """ls lists every record as a table, and filters by uploader, age, size and type."""
        await self.seed(*self.people())
        code, out, err = await self.admin("ls")
        self.assertEqual((code, err), (0, ""))
        lines = out.splitlines()
        self.assertIn("path", lines[0])
        self.assertEqual(len(lines), 6)
        self.assertEqual(lines[-1], "4 files, 23000015 bytes")

        async def paths(*argv):
            code, out, err = await self.admin("ls", "--json", *argv)
            self.assertEqual((code, err), (0, ""))
            return sorted(json.loads(line)["path"] for line in out.splitlines())

        self.assertEqual(await paths("--uploader", "alice@example.org"), ["a/new.txt", "a/old.png"])
        self.assertEqual(await paths("--larger-than", "2MB"), ["a/old.png", "b/cat.jpg"])
        self.assertEqual(await paths("--type", "image/*"), ["a/old.png", "b/cat.jpg"])
        self.assertEqual(await paths("--type", "text/plain"), ["a/new.txt"])
        self.assertEqual(await paths("--older-than", "30d"), ["a/old.png", "c/anon.bin"])
        self.assertEqual(
            await paths("--older-than", "1d", "--type", "image/*", "--larger-than", "5MB"),
            ["b/cat.jpg"],
        )
        code, out, _ = await self.admin("ls", "--json", "--uploader", "bob@example.org")
        self.assertEqual(
            json.loads(out)["sha256"], hashlib.sha256(body_of("b/cat.jpg")).hexdigest()
        )

    async def test_ls_bad_filter(self):
        """A filter that does not parse is one line and status 1."""
        code, out, err = await self.admin("ls", "--older-than", "soon")
        self.assertEqual((code, out), (1, ""))
        self.assertTrue(err.startswith("hmacfs admin ls: not a duration: 'soon'"), err)

    async def test_rm(self):
        """rm takes the file and its record away and keeps a takedown with the digest."""
        seeded = await self.seed(*self.people())
        cat = seeded[2]
        code, out, err = await self.admin("rm", "--reason", "spam report 7", "/upload/b/cat.jpg")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, "taken down (410): b/cat.jpg [file and record removed]\n")
        self.assertFalse(os.path.exists(os.path.join(self.root, "b/cat.jpg")))

        async def look(store):
            return (
                await store.get("b/cat.jpg"),
                await store.takedown("b/cat.jpg"),
                await store.denied(cat.sha256),
                await store.get("a/old.png"),
            )

        gone, takedown, denied, kept = await self.withStore(look)
        self.assertIsNone(gone)
        self.assertIsNotNone(kept)
        self.assertEqual((takedown.status, takedown.sha256), (410, cat.sha256))
        self.assertEqual(takedown.reason, "spam report 7")
        self.assertEqual(denied, takedown)
        [line] = self.auditLines()
        self.assertEqual(
            {k: line[k] for k in ("action", "path", "uploader", "size", "sha256", "status")},
            dict(action="takedown", path="b/cat.jpg", uploader="bob@example.org",
                 size=cat.size, sha256=cat.sha256, status=410),
        )  # fmt: skip
        self.assertTrue(line["who"])

        # Again, for legal reasons, by its URL: the takedown is replaced.
        code, out, err = await self.admin("rm", "--legal", "https://f.example/upload/b/cat.jpg")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, "taken down (451): b/cat.jpg [already removed]\n")
        takedown = (await self.withStore(look))[1]
        self.assertEqual((takedown.status, takedown.sha256), (451, cat.sha256))

    async def test_rm_takes_every_copy(self):
        """
        The same content under other paths goes too (each with a takedown of its own),
        unless --this-path-only; other content stays.
        """
        seeded = await self.seed(*self.people())
        cat = seeded[2]
        copies = [replace(cat, path=p) for p in ("d/copy.jpg", "e/again.jpg")]
        for copy in copies:
            path = os.path.join(self.root, copy.path)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(body_of(cat.path))

        async def put(store):
            for copy in copies:
                await store.put(copy)

        await self.withStore(put)
        code, out, err = await self.admin("rm", "--this-path-only", "e/again.jpg")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.count("taken down"), 1)
        self.assertTrue(os.path.exists(os.path.join(self.root, "b/cat.jpg")))
        code, out, err = await self.admin("rm", "b/cat.jpg")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(
            out.splitlines(),
            [
                "taken down (410): b/cat.jpg [file and record removed]",
                "taken down (410): d/copy.jpg [file and record removed,"
                " the same content as b/cat.jpg]",
            ],
        )
        for path in ("b/cat.jpg", "d/copy.jpg"):
            self.assertFalse(os.path.exists(os.path.join(self.root, path)))
        self.assertTrue(os.path.exists(os.path.join(self.root, "a/old.png")))

        async def look(store):
            return [await store.takedown(p) for p in ("b/cat.jpg", "d/copy.jpg", "a/old.png")]

        cat_down, copy_down, other = await self.withStore(look)
        self.assertEqual((cat_down.sha256, copy_down.sha256), (cat.sha256, cat.sha256))
        self.assertIsNone(other)

    async def test_rm_unknown_and_bad_paths(self):
        """A path with neither file nor record, or that is unsafe, is an error; others go on."""
        await self.seed(*self.people())
        code, out, err = await self.admin("rm", "no/such.txt", "a/new.txt")
        self.assertEqual(code, 1)
        self.assertEqual(err, "hmacfs admin rm: no/such.txt: no such file\n")
        self.assertIn("a/new.txt", out)
        code, out, err = await self.admin("rm", "../etc/passwd")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("path segment starts with '.'", err)

    async def test_rm_file_without_record(self):
        """A file the store does not know is taken down with the digest of its bytes."""
        path = os.path.join(self.root, "lone", "file.bin")
        os.makedirs(os.path.dirname(path))
        with open(path, "wb") as f:
            f.write(b"lonely bytes")
        code, _, err = await self.admin("rm", "lone/file.bin")
        self.assertEqual((code, err), (0, ""))
        self.assertFalse(os.path.exists(path))
        takedown = await self.withStore(lambda store: store.takedown("lone/file.bin"))
        self.assertEqual(takedown.sha256, hashlib.sha256(b"lonely bytes").hexdigest())

    async def test_lift_and_takedowns(self):
        """takedowns lists them; lift forgets one and says so; lifting none is an error."""
        await self.seed(*self.people())
        await self.admin("rm", "a/new.txt")
        code, out, err = await self.admin("takedowns", "--json")
        self.assertEqual((code, err), (0, ""))
        [listed] = [json.loads(line) for line in out.splitlines()]
        self.assertEqual((listed["path"], listed["status"]), ("a/new.txt", 410))
        code, out, err = await self.admin("lift", "a/new.txt")
        self.assertEqual((code, out, err), (0, "lifted: a/new.txt\n", ""))
        code, out, err = await self.admin("takedowns")
        self.assertEqual(out, "0 takedowns\n")
        code, out, err = await self.admin("lift", "a/new.txt")
        self.assertEqual((code, err), (1, "hmacfs admin lift: a/new.txt: not taken down\n"))
        self.assertEqual([line["action"] for line in self.auditLines()], ["takedown", "lift"])

    async def test_purge(self):
        """purge --dry-run names what would go and deletes nothing; then it deletes it all."""
        await self.seed(*self.people())
        code, out, err = await self.admin("purge", "--uploader", "alice@example.org", "--dry-run")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(
            sorted(out.splitlines()),
            ["a/new.txt", "a/old.png", "would delete 2 files, 3000010 bytes, of alice@example.org"],
        )
        self.assertTrue(os.path.exists(os.path.join(self.root, "a/old.png")))
        self.assertEqual(self.auditLines(), [])
        code, out, err = await self.admin("purge", "--uploader", "alice@example.org")
        self.assertEqual(
            (code, out, err), (0, "deleted 2 files, 3000010 bytes, of alice@example.org\n", "")
        )
        self.assertFalse(os.path.exists(os.path.join(self.root, "a/old.png")))
        self.assertFalse(os.path.exists(os.path.join(self.root, "a/new.txt")))
        self.assertTrue(os.path.exists(os.path.join(self.root, "b/cat.jpg")))

        async def left(store):
            return [await store.get(r.path) is not None for r in self.people()]

        self.assertEqual(await self.withStore(left), [False, False, True, True])
        self.assertEqual(
            sorted((line["action"], line["path"]) for line in self.auditLines()),
            [("purge", "a/new.txt"), ("purge", "a/old.png")],
        )

    async def test_stats(self):
        """stats counts files and bytes in all, per uploader (top N) and per type."""
        await self.seed(*self.people())
        code, out, err = await self.admin("stats", "--json", "--top", "1")
        self.assertEqual((code, err), (0, ""))
        stats = json.loads(out)
        self.assertEqual((stats["files"], stats["bytes"], stats["uploaders"]), (4, 23000015, 3))
        self.assertEqual(
            stats["top_uploaders"], [{"uploader": "bob@example.org", "files": 1, "bytes": 20000000}]
        )
        iso = "%Y-%m-%dT%H:%M:%SZ"
        self.assertEqual(stats["oldest"], time.strftime(iso, time.gmtime(NOW - 100 * DAY)))
        self.assertEqual(stats["newest"], time.strftime(iso, time.gmtime(NOW)))
        self.assertEqual(
            {t["type"]: (t["files"], t["bytes"]) for t in stats["types"]},
            {"image/jpeg": (1, 20000000), "image/png": (1, 3000000), "text/plain": (1, 10),
             "application/octet-stream": (1, 5)},
        )  # fmt: skip
        code, out, err = await self.admin("stats")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("files: 4, bytes: 23000015", out)
        self.assertIn("alice@example.org", out)
        code, out, err = await self.admin("stats", "--top", "0")
        self.assertEqual((code, err), (1, "hmacfs admin stats: --top must be at least 1, got 0\n"))


class SQLiteAdminTests(AdminChecks, TestCase):
    """The commands on the embedded SQLite the config names."""

    def freshStore(self):
        return None

    async def test_stats_dedup(self):
        """With Deduplication, stats says how many paths share how many contents, and the saving."""
        from hmacd.storage.local import LocalStorage
        from tests.support import synchronous
        from tests.test_dedup import store

        with open(self.config, "a") as f:
            f.write("Deduplication = true\n")
        storage = LocalStorage(self.root, synchronous, dedup=True)
        same = b"s" * 1000
        made = [store(storage, p, same) for p in ("x/1.bin", "y/2.bin", "z/3.bin")]
        made.append(store(storage, "w/other.bin", b"o" * 10))

        async def put(s):
            for r in made:
                await s.put(r)

        await self.withStore(put)
        code, out, err = await self.admin("stats", "--json")
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(
            json.loads(out)["dedup"],
            {
                "contents": 2,
                "references": 4,
                "stored_bytes": 1010,
                "saved_bytes": 2000,
                "orphans": 0,
            },
        )
        code, out, err = await self.admin("stats")
        self.assertIn(
            "deduplication: 4 paths share 2 contents (1010 bytes stored), 2000 bytes saved", out
        )


class RedisAdminTests(AdminChecks, TestCase):
    """The commands on the shared Redis, under a prefix of the test's own."""

    def setUp(self):
        AdminChecks.setUp(self)
        self.prefix = redis_prefix()
        self.addCleanup(delete_prefix, SHARED_PORT, self.prefix)
        probe = RedisStore("127.0.0.1", SHARED_PORT, reactor=reactor, prefix=self.prefix)

        def down(failure):
            failure.trap(StoreUnavailable)
            return probe.stop().addCallback(
                lambda _: require_service("redis", failure.getErrorMessage())
            )

        return probe.start().addCallbacks(lambda _: probe.stop(), down)

    def freshStore(self):
        store = RedisStore("127.0.0.1", SHARED_PORT, reactor=reactor, prefix=self.prefix)
        return FailoverStore(store, clock=reactor, healthInterval=0)


class PostgresAdminTests(AdminChecks, TestCase):
    """The commands on PostgreSQL, in a table of the test's own."""

    def setUp(self):
        AdminChecks.setUp(self)
        reason = postgres_down()
        if reason:
            require_service("postgres", reason)
        self.table = unique_table()
        self.addCleanup(drop_table, postgres_connection, self.table)

    def freshStore(self):
        store = SQLStore.postgres(**POSTGRES, reactor=reactor, table=self.table)
        return FailoverStore(store, clock=reactor, healthInterval=0)


class UnreachableTests(TestCase):
    """Every command says, in one line, which store it cannot reach."""

    async def test_every_command(self):
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        config = self.mktemp()
        port = free_port()
        with open(config, "w") as f:
            f.write(f'StoreDir = "{root}"\nRedisAddr = "127.0.0.1:{port}"\n')
        commands = [
            ["ls"], ["rm", "a/b"], ["lift", "a/b"], ["takedowns"],
            ["purge", "--uploader", "x@example.org"], ["stats"],
        ]  # fmt: skip
        for argv in commands:
            out, err = io.StringIO(), io.StringIO()
            args = parse(argv[0], "--config", config, *argv[1:])
            code = await run_admin(reactor, args, out, err)
            self.assertEqual((code, out.getvalue()), (1, ""), argv)
            self.assertEqual(
                err.getvalue(),
                f"hmacfs admin {argv[0]}: no metadata store is reachable: "
                f"redis 127.0.0.1:{port}: connection refused\n",
            )

    async def test_bad_config(self):
        """A config that cannot be read is one line, naming it."""
        out, err = io.StringIO(), io.StringIO()
        code = await run_admin(reactor, parse("ls", "--config", "/nonexistent.toml"), out, err)
        self.assertEqual(code, 1)
        self.assertTrue(err.getvalue().startswith("hmacfs admin ls: /nonexistent.toml"))


class PieceTests(SynchronousTestCase):
    """The pure parts: paths as operators give them, and the filters."""

    def test_store_path(self):
        """A URL, a URL path or a store path name the same file; unsafe ones are refused."""
        for given in ("https://f.example/upload/a/b%20c.png?v2=x", "/upload/a/b%20c.png",
                      "a/b c.png"):  # fmt: skip
            self.assertEqual(store_path(given, "upload"), "a/b c.png", given)
        for bad in ("/elsewhere/a.png", "../a", "a//b", "https://f.example/upload/.hmacfs/x"):
            self.assertRaises(AdminError, store_path, bad, "upload")

    def test_uploader(self):
        """Uploaders compare as bare JIDs, whatever the case or resource."""
        self.assertTrue(same_uploader("Alice@Example.org/phone", "alice@example.org"))
        self.assertFalse(same_uploader("alice@example.org", "alice@example.com"))
        self.assertFalse(same_uploader(None, "alice@example.org"))

    def test_type(self):
        """A type matches exactly (parameters aside) or by its top level."""
        self.assertTrue(type_matches("text/plain; charset=utf-8", "text/plain"))
        self.assertTrue(type_matches("image/png", "image/*"))
        self.assertTrue(type_matches("image/png", "IMAGE/"))
        self.assertFalse(type_matches("image/png", "image/jpeg"))
        self.assertFalse(type_matches("imagex/png", "image/*"))

    def test_filter(self):
        """Every condition given must hold; none given keeps everything."""
        r = record(size=100, created=NOW - 10, uploader="a@b")
        self.assertTrue(RecordFilter(now=NOW)(r))
        self.assertTrue(RecordFilter(older_than=5, larger_than=99, now=NOW)(r))
        self.assertFalse(RecordFilter(older_than=20, now=NOW)(r))
        self.assertFalse(RecordFilter(larger_than=100, now=NOW)(r))
        self.assertFalse(RecordFilter(uploader="c@d", now=NOW)(r))


class S3AdminTests(BucketCase):
    """rm and purge with StorageBackend = "s3", as an operator runs them (a prefix of its own)."""

    def admin(self, config: str, *argv: str):
        """Run C{hmacfs admin argv[0] --config config argv[1:]} with the bucket's keys."""
        keys = {
            "HMACFS_S3_ACCESS_KEY": self.mini.access_key,
            "HMACFS_S3_SECRET_KEY": self.mini.secret_key,
        }
        return deferToThread(run_command, "admin", argv[0], "--config", config, *argv[1:], env=keys)

    async def test_rm_and_purge(self):
        """rm takes an object down (record gone, takedown kept); purge deletes one uploader's."""
        bodies = {"s/cat.jpg": b"a cat", "s/dog.jpg": b"a dog", "t/keep.txt": b"kept"}
        records = {}
        for path, body in bodies.items():
            uploader = "bob@example.org" if path != "s/cat.jpg" else "eve@example.org"
            facts = record(
                path, size=len(body), sha256=hashlib.sha256(body).hexdigest(), uploader=uploader
            )
            records[path] = facts
            await self.publish(facts, body)
        store = await self.sqlite()
        for facts in records.values():
            await store.put(facts)
        await store.stop()
        config = self.write_config()

        def admin(*argv: str):
            return self.admin(config, *argv)

        done = await admin("rm", "--legal", "s/cat.jpg")
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        self.assertEqual(done.stdout, "taken down (451): s/cat.jpg [file and record removed]\n")
        await self.assertFailure(self.client.head_object("s/cat.jpg"), NoSuchKey)
        done = await admin("purge", "--uploader", "bob@example.org")
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        self.assertEqual(done.stdout, "deleted 2 files, 9 bytes, of bob@example.org\n")
        for path in ("s/dog.jpg", "t/keep.txt"):
            await self.assertFailure(self.client.head_object(path), NoSuchKey)
        store = await self.sqlite()
        self.assertEqual([await store.get(path) for path in bodies], [None, None, None])
        takedown = await store.takedown("s/cat.jpg")
        self.assertEqual((takedown.status, takedown.sha256), (451, records["s/cat.jpg"].sha256))

    async def test_deduplicated_stats_and_rm(self):
        """
        With Deduplication in the bucket: stats counts what sharing saves, and rm of one
        path takes down every path of its content, the content with the last of them.
        """
        body = b"the same picture"
        sha = hashlib.sha256(body).hexdigest()
        self.storage.dedup = True
        store = await self.sqlite()
        for path in ("s/one.jpg", "t/two.jpg"):
            facts = record(path, size=len(body), sha256=sha, uploader="bob@example.org")
            await self.publish(facts, body)
            await store.put(facts)
        await store.stop()
        config = self.write_config()
        with open(config, "a") as f:
            f.write("Deduplication = true\n")

        def admin(*argv: str):
            return self.admin(config, *argv)

        done = await admin("stats")
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        self.assertIn(
            f"deduplication: 2 paths share 1 contents ({len(body)} bytes stored),"
            f" {len(body)} bytes saved\n",
            done.stdout,
        )
        # A content no path refers to (a crash between the steps) is counted apart.
        await self.client.put_object(".hmacfs/cas/" + "ab" * 32, b"orphan")
        done = await admin("stats")
        self.assertIn("  1 contents without a path (the sweep removes them)\n", done.stdout)
        await self.client.delete_object(".hmacfs/cas/" + "ab" * 32)
        done = await admin("rm", "s/one.jpg")
        self.assertEqual((done.returncode, done.stderr), (0, ""))
        self.assertEqual(
            done.stdout,
            "taken down (410): s/one.jpg [file and record removed]\n"
            "taken down (410): t/two.jpg [file and record removed, the same content as"
            " s/one.jpg]\n",
        )
        listed = await self.client.list_objects_v2()
        self.assertEqual(listed.objects, [])

    async def test_no_credentials(self):
        """Deleting from an object store without its keys is one line, before anything."""
        config = self.write_config()
        done = await deferToThread(run_command, "admin", "rm", "--config", config, "s/x")
        self.assertEqual((done.returncode, done.stdout), (1, ""))
        self.assertEqual(done.stderr, "hmacfs admin rm: S3AccessKey/S3SecretKey: not set\n")


class ObjectStoreDownTests(TestCase):
    """An object store that cannot be reached, met while deleting, is one line and status 1."""

    async def test_purge(self):
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        store = build_metadata(Config(store_dir=root), reactor)
        await store.start()
        await store.put(record("s/a.jpg", uploader="bob@example.org"))
        await store.stop()
        port = free_port()
        config = self.mktemp()
        with open(config, "w") as f:
            f.write(
                f'StoreDir = "{root}"\nStorageBackend = "s3"\n'
                f'S3Endpoint = "http://127.0.0.1:{port}"\nS3Bucket = "b"\n'
                'S3AccessKey = "k"\nS3SecretKey = "s"\n'
            )
        out, err = io.StringIO(), io.StringIO()
        args = parse("purge", "--config", config, "--uploader", "bob@example.org")
        code = await run_admin(reactor, args, out, err)
        self.assertEqual((code, out.getvalue()), (1, ""))
        self.assertTrue(
            err.getvalue().startswith(
                f"hmacfs admin purge: object store http://127.0.0.1:{port} (bucket 'b'): "
            ),
            err.getvalue(),
        )
        self.assertEqual(err.getvalue().count("\n"), 1)
