"""
Quotas (hmacd.quota) and who uploaded a file: the rules as a table, and the PUT that waits
for its hold on the quotas before its body (hmacd.admission, hmacd.upload), driven byte by
byte.  What each store keeps is tested by the quota contract (tests/store_contract.py) on
every store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hmacd import auth
from hmacd.component import NS_UPLOAD
from hmacd.metadata import FileRecord
from hmacd.quota import Limits, Quotas, Usage, describe, exceeded, hour_of
from hmacd.store import StoreUnavailable
from tests.support import SECRET, MemoryServer, v2_query, v_query

BODY = b"x" * 1000
ALICE = "alice@example.org"


def jwt_head(
    path: str, size: int = len(BODY), sub: str | None = ALICE, expect: bool = True
) -> bytes:
    """The head of a PUT with a Prosody (JWT) slot issued to C{sub}."""
    url, headers = auth.slot_put(SECRET, "/upload", path, size, "text/plain", "jwt", 0, sub=sub)
    lines = [f"PUT {url} HTTP/1.1", "Host: up.example", f"Content-Length: {size}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    lines += ["Content-Type: text/plain"] + (["Expect: 100-continue"] if expect else [])
    return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8")


def v2_head(path: str, size: int = len(BODY)) -> bytes:
    """The head of a v2 PUT (no uploader in the slot), with Expect."""
    query = v2_query(path, size, "text/plain")
    lines = [
        f"PUT /upload/{path}?{query} HTTP/1.1",
        "Host: up.example",
        "Content-Type: text/plain",
        f"Content-Length: {size}",
        "Expect: 100-continue",
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


class RulesTests(SynchronousTestCase):
    """Which quota an upload exceeds, as a table."""

    def test_exceeded(self):
        """Each limit is checked against used + held + the upload; 0 is no limit."""
        usage = Usage(stored=50, daily=70, total=500, held=10, held_total=20)
        table = [
            (Limits(), ALICE, 10**12, None),
            (Limits(user=100), ALICE, 40, None),
            (Limits(user=100), ALICE, 41, "UserQuota"),
            (Limits(daily=100), ALICE, 20, None),
            (Limits(daily=100), ALICE, 21, "UserDailyQuota"),
            (Limits(total=600), ALICE, 80, None),
            (Limits(total=600), ALICE, 81, "GlobalQuota"),
            # An unknown uploader is held to the global limit only.
            (Limits(user=1, daily=1), None, 10**6, None),
            (Limits(user=1, total=600), None, 81, "GlobalQuota"),
            # The first one exceeded is named.
            (Limits(user=1, daily=1, total=1), ALICE, 1000, "UserQuota"),
        ]
        for limits, uploader, size, expected in table:
            self.assertEqual(exceeded(limits, usage, uploader, size), expected, (limits, size))

    def test_describe(self):
        """The reason names the quota, its limit, what is used and the upload."""
        usage = Usage(daily=70, held=10)
        self.assertEqual(
            describe("UserDailyQuota", Limits(daily=100), usage, 25),
            "UserDailyQuota exceeded: 80 of 100 bytes used, this upload is 25 bytes",
        )

    def test_limits(self):
        """Limits are off unless one is set; hours are whole hours since the epoch."""
        self.assertFalse(Limits())
        self.assertTrue(Limits(total=1))
        self.assertEqual((hour_of(0), hour_of(3599.9), hour_of(3600)), (0, 0, 1))


class QuotaUploadTests(SynchronousTestCase):
    """A PUT waits for its hold on the quotas; one that would exceed a quota gets 413."""

    def setUp(self) -> None:
        self.server = MemoryServer(self.mktemp())
        fs = self.server.fs
        fs.metadata.quota_accounting = True
        self.store = fs.metadata.primary.store
        fs.quotas = Quotas(Limits(user=1500, total=10_000), fs.metadata, self.server.clock)

    def stored(self, path: str) -> bool:
        return os.path.exists(os.path.join(self.server.fs.store_dir, path))

    def errors(self, reason: str) -> float:
        registry = self.server.fs.metrics.registry
        value = registry.get_sample_value(
            "hmac_file_server_upload_errors_total", {"reason": reason}
        )
        return value or 0

    def usage(self, uploader: str | None = ALICE) -> Usage:
        return self.successResultOf(self.store.quota_usage(uploader, self.server.clock.seconds()))

    def upload(self, head: bytes, body: bytes = BODY) -> bytes:
        channel, transport = self.server.connect()
        channel.dataReceived(head)
        if transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n":
            channel.dataReceived(body)
        return transport.value()

    def test_within_quota(self):
        """An upload that fits is stored, counted for its uploader, and its hold is gone."""
        answer = self.upload(jwt_head("s1/a.txt"))
        self.assertIn(b"HTTP/1.1 201 ", answer)
        usage = self.usage()
        self.assertEqual((usage.stored, usage.daily, usage.held), (1000, 1000, 0))
        record = self.successResultOf(self.server.fs.metadata.get("s1/a.txt"))
        self.assertEqual(record.uploader, ALICE)

    def test_user_quota(self):
        """Past UserQuota: 413 naming it before the body, no 100 Continue, counted as quota."""
        self.upload(jwt_head("s1/a.txt"))
        answer = self.upload(jwt_head("s2/b.txt"))
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertIn(b"UserQuota exceeded: 1000 of 1500 bytes used", answer)
        self.assertNotIn(b"100 Continue", answer)
        self.assertFalse(self.stored("s2/b.txt"))
        self.assertEqual((self.errors("quota"), self.errors("too_large")), (1, 0))
        # Another user still has room.
        self.assertIn(b"201 ", self.upload(jwt_head("s3/c.txt", sub="bob@example.org")))

    def test_deleting_gives_room(self):
        """A file deleted (expired, taken down) gives its bytes back to its uploader."""
        self.upload(jwt_head("s1/a.txt"))
        self.successResultOf(self.server.fs.metadata.delete("s1/a.txt"))
        self.assertIn(b"HTTP/1.1 201 ", self.upload(jwt_head("s2/b.txt")))

    def test_global_quota_without_uploader(self):
        """A slot that names no uploader (v2) is held to GlobalQuota."""
        fs = self.server.fs
        fs.quotas = Quotas(Limits(user=1, total=1500), fs.metadata, self.server.clock)
        self.assertIn(b"HTTP/1.1 201 ", self.upload(v2_head("s1/a.txt")))
        answer = self.upload(v2_head("s2/b.txt"))
        self.assertIn(b"413 ", answer)
        self.assertIn(b"GlobalQuota exceeded", answer)

    def test_concurrent_uploads_hold(self):
        """Two uploads of one user at once: the second sees the first's hold and is refused."""
        first, firstTransport = self.server.connect()
        first.dataReceived(jwt_head("s1/a.txt"))
        self.assertEqual(firstTransport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(self.usage().held, 1000)
        answer = self.upload(jwt_head("s2/b.txt"))
        self.assertIn(b"413 ", answer)
        first.dataReceived(BODY)
        self.assertIn(b"HTTP/1.1 201 ", firstTransport.value())
        self.assertEqual(self.usage().held, 0)

    def test_abort_releases_the_hold(self):
        """A client gone mid-body: its hold goes with the temp file."""
        from twisted.internet.error import ConnectionLost
        from twisted.python.failure import Failure

        channel, _ = self.server.connect()
        channel.dataReceived(jwt_head("s1/a.txt") + BODY[:100])
        self.assertEqual(self.usage().held, 1000)
        channel.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.usage(), Usage())

    def test_refused_later_releases_the_hold(self):
        """A hold taken for an upload refused afterwards (the file exists) is dropped."""
        self.upload(v2_head("s1/a.txt"))
        answer = self.upload(v2_head("s1/a.txt"))
        self.assertIn(b"409 ", answer)
        self.assertEqual(self.usage(None).held_total, 0)

    def test_waits_for_the_store(self):
        """Nothing of the body is read, and no 100 Continue sent, until the store answers."""
        metadata = self.server.fs.metadata
        real, pending = metadata.quota_reserve, []

        def gated(*args):
            d: Deferred = Deferred()
            pending.append((d, args))
            return d

        metadata.quota_reserve = gated
        channel, transport = self.server.connect()
        channel.dataReceived(jwt_head("s1/a.txt"))
        self.assertEqual(transport.value(), b"")
        self.assertEqual(transport.producerState, "paused")
        d, args = pending.pop()
        real(*args).chainDeferred(d)
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        channel.dataReceived(BODY)
        self.assertIn(b"HTTP/1.1 201 ", transport.value())

    def test_store_down(self):
        """No store answers: 503 with Retry-After before the body, as for claims."""
        self.server.fs.metadata.quota_reserve = lambda *a: fail(StoreUnavailable("down"))
        answer = self.upload(jwt_head("s1/a.txt"))
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer)
        self.assertIn(b"Retry-After: ", answer)

    def test_no_quota_no_store_call(self):
        """With no quota set the store is not asked: the channel says 100 Continue at once."""
        fs = self.server.fs
        fs.quotas = None

        def never(*args):
            raise AssertionError("asked the store")

        fs.metadata.quota_reserve = never
        self.assertIn(b"HTTP/1.1 201 ", self.upload(jwt_head("s1/a.txt")))


class UploaderTests(SynchronousTestCase):
    """Who uploaded a file, as each protocol says it."""

    def uploaded(self, head: bytes, path: str, **kwargs) -> str | None:
        server = MemoryServer(self.mktemp(), **kwargs)
        channel, transport = server.connect()
        channel.dataReceived(head + BODY)
        self.assertIn(b"HTTP/1.1 201 ", transport.value())
        return self.successResultOf(server.fs.metadata.get(path)).uploader

    def v_head(self, path: str) -> bytes:
        return (
            f"PUT /upload/{path}?{v_query(path, len(BODY))} HTTP/1.1\r\n"
            f"Host: up.example\r\nContent-Length: {len(BODY)}\r\n\r\n"
        ).encode("ascii")

    def test_jwt_sub(self):
        """Prosody's mod_http_file_share: the JWT's sub."""
        self.assertEqual(self.uploaded(jwt_head("s1/a.txt", expect=False), "s1/a.txt"), ALICE)

    def test_ejabberd_path(self):
        """UploaderFromPath: the first segment of an ejabberd slot names its user."""
        path = "2d7b3ff6e2e3c3ba8de9/Rr7zHL1G/photo.jpg"
        self.assertEqual(
            self.uploaded(self.v_head(path), path, uploader_from_path=True),
            "2d7b3ff6e2e3c3ba8de9",
        )

    def test_no_uploader_by_default(self):
        """Without UploaderFromPath a v slot names no uploader."""
        self.assertIsNone(self.uploaded(self.v_head("slot/a.txt"), "slot/a.txt"))


_RACER = """
import sys
from twisted.internet import defer, task
from hmacd.quota import Limits
from hmacd.store.sql import SQLStore

async def main(reactor):
    store = SQLStore.sqlite(sys.argv[1], reactor=reactor)
    store.quota_accounting = True
    await store.start()
    won = 0
    for n in range(30):
        ok, _ = await store.quota_reserve(
            f"{sys.argv[2]}-{n}", "alice@example.org", 10, Limits(user=100), 1e9, 60
        )
        won += ok
    await store.stop()
    print(won)

task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
"""


class ProcessesTests(TestCase):
    """Quotas across processes (Workers) sharing the embedded SQLite store."""

    def test_two_processes_never_exceed(self):
        """Two processes taking holds for one user at once win exactly what fits, together."""
        path = os.path.join(os.path.abspath(self.mktemp()), "meta.sqlite3")
        os.makedirs(os.path.dirname(path))
        env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(__file__)))
        racers = [
            subprocess.Popen(
                [sys.executable, "-c", textwrap.dedent(_RACER), path, name],
                stdout=subprocess.PIPE,
                env=env,
            )
            for name in ("a", "b")
        ]
        won = [int(r.communicate(timeout=120)[0]) for r in racers]
        self.assertEqual(sum(won), 10, won)


REDIS_PORT = 6379
# A database of the shared Redis of our own (the cluster tests use 12).
REDIS_DB = 14


def admin(*args: str) -> subprocess.CompletedProcess:
    """hmacfs admin quota ..., from this checkout, as an operator runs it."""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = "import sys, hmacd.cli; sys.exit(hmacd.cli.main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, "admin", "quota", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


class AdminTests(TestCase):
    """hmacfs admin quota show|reset|rebuild on the configured store."""

    def config(self, text: str = "") -> str:
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        self.root = root
        path = os.path.join(root, "config.toml")
        with open(path, "w") as f:
            f.write(f'StoreDir = "{root}"\nUserQuota = 5000\n{text}')
        return path

    async def drifted(self, store) -> None:
        """Records put while nothing counted: the figures are wrong until rebuilt."""
        from hmacd.metadata import FileRecord

        await store.start()
        try:
            now = time.time()
            for path, size, who in [("a/1", 100, ALICE), ("a/2", 20, ALICE), ("b/1", 7, "bob")]:
                await store.put(FileRecord(path, size, "text/plain", "0" * 64, now, "jwt", who))
        finally:
            await store.stop()

    def check_commands(self, config: str) -> None:
        done = admin("rebuild", "--config", config)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertRegex(
            done.stdout,
            r": figures rebuilt from the records: 127 bytes stored in all,"
            r" 2 uploaders\n$",
        )
        done = admin("show", "--config", config)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("127 bytes stored in all (no limit)", done.stdout)
        self.assertIn("UserQuota 5000 bytes, UserDailyQuota no limit", done.stdout)
        self.assertRegex(done.stdout, r"alice@example.org +120 +120\n")
        self.assertRegex(done.stdout, r"bob +7 +7\n")
        done = admin("reset", "--config", config, "--uploader", ALICE)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn(f"{ALICE}: the last 24 h forgotten; 120 bytes stored", done.stdout)
        done = admin("show", "--config", config, "--uploader", ALICE, "--json")
        self.assertEqual(done.returncode, 0, done.stderr)
        first = done.stdout.splitlines()[0]
        self.assertEqual(
            json.loads(first),
            {"uploader": ALICE, "stored": 120, "daily": 0, "held": 0},
        )

    async def test_embedded_sqlite(self):
        """rebuild, show and reset on the embedded SQLite store under StoreDir."""
        from hmacd.store.sql import SQLStore

        config = self.config()
        await self.drifted(SQLStore.sqlite(os.path.join(self.root, ".hmacfs", "meta.sqlite3")))
        self.check_commands(config)

    async def test_redis(self):
        """The same on Redis (a database of its own on the shared server)."""
        from twisted.internet import reactor

        from hmacd.store.redis import RedisStore
        from tests.servers import delete_prefix
        from tests.store_contract import require_service

        store = RedisStore("127.0.0.1", REDIS_PORT, dbid=REDIS_DB, reactor=reactor)
        try:
            await store.start()
        except Exception as e:
            await store.stop()
            require_service("Redis", f"127.0.0.1:{REDIS_PORT}: {e}")
        await store.stop()
        delete_prefix(REDIS_PORT, "hmacfs:", db=REDIS_DB)
        self.addCleanup(delete_prefix, REDIS_PORT, "hmacfs:", db=REDIS_DB)
        config = self.config(f'RedisAddr = "127.0.0.1:{REDIS_PORT}"\nRedisDB = {REDIS_DB}\n')
        await self.drifted(RedisStore("127.0.0.1", REDIS_PORT, dbid=REDIS_DB, reactor=reactor))
        self.check_commands(config)

    def test_unreachable_store(self):
        """A store that cannot be reached is one clear line and exit status 1."""
        from tests.servers import free_port

        port = free_port()
        config = self.config(f'RedisAddr = "127.0.0.1:{port}"\n')
        for command in (["show"], ["rebuild"], ["reset", "--uploader", ALICE]):
            done = admin(*command, "--config", config)
            self.assertEqual(done.returncode, 1)
            self.assertEqual(done.stdout, "")
            self.assertEqual(
                done.stderr,
                f"hmacfs admin quota {command[0]}: no metadata store is reachable:"
                f" redis 127.0.0.1:{port}: connection refused\n",
            )

    def test_bad_config(self):
        """A config error names the file and the key; nothing else happens."""
        config = self.config('GlobalQuota = "lots"\n')
        done = admin("show", "--config", config)
        self.assertEqual(done.returncode, 1)
        self.assertIn("GlobalQuota", done.stderr)
        self.assertIn(config, done.stderr)
        self.assertNotIn("Traceback", done.stderr)


class SlotComponentTests(SynchronousTestCase):
    """The slot component asks the quotas before it gives a slot, and records who asked."""

    def setUp(self) -> None:
        from tests.test_component import issuer

        self.server = MemoryServer(self.mktemp())
        fs = self.server.fs
        fs.metadata.quota_accounting = True
        fs.quotas = Quotas(Limits(user=1500), fs.metadata, self.server.clock)
        fs.slot_uploaders = True
        self.counts: list[str] = []
        self.issuer = issuer(public_url="http://up.example/upload/", max_size=0)
        self.component = self.makeComponent()

    def makeComponent(self, protocol: str = "v2"):
        from hmacd.component import SlotComponent

        self.issuer.protocol = protocol
        fs = self.server.fs
        return SlotComponent(
            self.issuer, counted=self.counts.append, quotas=fs.quotas, store=fs.metadata
        )

    def ask(self, size: int, name: str = "a.txt"):
        from tests.test_component import slot_request

        self.issuer.random_slot = lambda: f"S{len(self.counts)}"
        answer = self.component.respond(slot_request(name, str(size), "text/plain"))
        return self.successResultOf(answer)

    def test_refused_when_full(self):
        """No room left now: resource-constraint (wait), naming the quota and its limit."""
        from tests.test_component import error_of

        self.successResultOf(
            self.server.fs.metadata.put(
                FileRecord("x/old", 1000, "text/plain", "0" * 64, 0.0, "v2", "alice@example.org")
            )
        )
        response = self.ask(600)
        self.assertEqual(error_of(response), ("wait", "resource-constraint"))
        self.assertIn("UserQuota reached: the limit is 1500 bytes", response.toXml())
        self.assertEqual(self.counts, ["resource-constraint"])
        self.assertEqual(response.getAttribute("type"), "error")

    def test_larger_than_the_quota(self):
        """A file larger than the quota itself: file-too-large with the limit."""
        from tests.test_component import error_of

        response = self.ask(1501)
        self.assertEqual(error_of(response), ("modify", "not-acceptable"))
        self.assertIn("<max-file-size>1500</max-file-size>", response.toXml())

    def test_uploader_recorded_for_the_put(self):
        """A v2 slot names nobody: the PUT finds the requester on record, and counts for it."""
        response = self.ask(len(BODY), "b.txt")
        self.assertEqual(response.getAttribute("type"), "result")
        put = next(next(response.elements(NS_UPLOAD, "slot")).elements(NS_UPLOAD, "put"))["url"]
        path = put.split("/upload/", 1)[1].split("?")[0]
        query = put.split("?", 1)[1]
        channel, transport = self.server.connect()
        channel.dataReceived(
            (
                f"PUT /upload/{path}?{query} HTTP/1.1\r\nHost: up.example\r\n"
                f"Content-Type: text/plain\r\nContent-Length: {len(BODY)}\r\n\r\n"
            ).encode("ascii")
            + BODY
        )
        self.assertIn(b"HTTP/1.1 201 ", transport.value())
        record = self.successResultOf(self.server.fs.metadata.get(path))
        self.assertEqual(record.uploader, ALICE)
        usage = self.successResultOf(self.server.fs.metadata.quota_usage(ALICE, 0))
        self.assertEqual(usage.stored, len(BODY))

    def test_store_down_still_issues(self):
        """A store that cannot say: the slot is given, and the PUT asks again."""
        self.server.fs.metadata.quota_usage = lambda *a: fail(StoreUnavailable("down"))
        response = self.ask(10)
        self.assertEqual(response.getAttribute("type"), "result")
        self.assertEqual(len(self.flushLoggedErrors()), 0)


class WiringTests(SynchronousTestCase):
    """What the builders make of the quota keys."""

    def load(self, text: str):
        from hmacd.config import load_config

        path = self.mktemp()
        with open(path, "w") as f:
            f.write(f'StoreDir = "{os.path.abspath(self.mktemp())}"\n{text}')
        return load_config(path)

    def test_keys(self):
        """Sizes in any form the other size keys take; each is one limit."""
        config = self.load('UserQuota = "10MB"\nUserDailyQuota = 2048\nGlobalQuota = "1GB"\n')
        self.assertEqual(Limits.from_config(config), Limits(10 * 2**20, 2048, 2**30))

    def test_bad_value(self):
        """A quota that is no size is a config error naming the key."""
        from hmacd.config import ConfigError

        with self.assertRaises(ConfigError) as caught:
            self.load("UserDailyQuota = -1\n")
        self.assertIn("UserDailyQuota", str(caught.exception))

    def test_built(self):
        """A quota set: the server asks the quotas, and the stores keep the figures."""
        from twisted.internet.task import Clock

        from hmacd.services import build_file_server, build_metadata

        clock = Clock()
        for text, on in (("", False), ("GlobalQuota = 1\n", True)):
            config = self.load(text + "UploaderFromPath = true\n")
            metadata = build_metadata(config, clock)
            self.assertEqual(metadata.quota_accounting, on)
            fs = build_file_server(config, SECRET, clock, metadata)
            self.assertEqual(fs.quotas is not None, on)
            self.assertTrue(fs.uploader_from_path)
            self.assertFalse(fs.slot_uploaders)
