"""
The audit log: JSON lines, appended by several processes at once, reopened on SIGHUP,
never a reason for an upload to fail; and the entries the server writes (uploads,
expiries).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from twisted.internet.defer import Deferred
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from hmacd.audit import AuditLog, audit_entry, reopen_on_sighup
from hmacd.housekeeping import ExpirySweep
from tests.store_contract import record
from tests.support import MemoryServer, v2_query
from tests.test_upload import request_head, status

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lines(path: str) -> list[dict]:
    with open(path, "rb") as f:
        return [json.loads(line) for line in f.read().splitlines()]


class EntryTests(SynchronousTestCase):
    def test_fields(self):
        """An entry is one ASCII JSON line with time, action, path, uploader, size, sha256, who."""
        r = record("a/é\nb.txt", uploader="alice@example.org")
        line = audit_entry("upload", r.path, when=1_800_000_000.25, who="node-1", record=r)
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(line.count(b"\n"), 1)
        line.decode("ascii")
        self.assertEqual(
            json.loads(line),
            {
                "time": "2027-01-15T08:00:00.250Z",
                "action": "upload",
                "path": "a/é\nb.txt",
                "uploader": "alice@example.org",
                "size": r.size,
                "sha256": r.sha256,
                "who": "node-1",
            },
        )

    def test_without_record(self):
        """An action on a path alone (a lifted takedown) has nulls for the file's fields."""
        entry = json.loads(audit_entry("lift", "a/b", when=0, who="root", note="x"))
        self.assertEqual((entry["size"], entry["sha256"], entry["note"]), (None, None, "x"))

    def test_unknown_action(self):
        """Only the documented actions are written."""
        self.assertRaises(ValueError, audit_entry, "rename", "a", when=0, who="x")


_WRITER = """
import sys
from hmacd.audit import AuditLog
from tests.store_contract import record
log = AuditLog(sys.argv[1], sys.argv[2])
for n in range(300):
    path = sys.argv[2] + "/" + str(n) + "/" + "x" * 3000
    log.write("upload", path, record(path))
"""


class AuditLogTests(SynchronousTestCase):
    def setUp(self):
        self.path = self.mktemp()

    def test_processes_append_whole_lines(self):
        """Lines of 3 kB from three processes at once never interleave; none is lost."""
        env = dict(os.environ, PYTHONPATH=ROOT)
        writers = [
            subprocess.Popen([sys.executable, "-c", _WRITER, self.path, f"p{n}"], env=env)
            for n in range(3)
        ]
        for w in writers:
            self.assertEqual(w.wait(timeout=60), 0)
        found = lines(self.path)
        self.assertEqual(len(found), 900)
        for n in range(3):
            mine = [e["path"].split("/")[1] for e in found if e["who"] == f"p{n}"]
            self.assertEqual(mine, [str(i) for i in range(300)])
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o640)

    def test_reopen(self):
        """After the file is moved away, reopen starts a new one there."""
        log = AuditLog(self.path, "n")
        self.addCleanup(log.close)
        log.checkInterval = 3600  # the signal's reopen alone
        log.write("upload", "one", record("one"))
        os.rename(self.path, self.path + ".1")
        log.write("upload", "two", record("two"))
        log.reopen()
        log.write("upload", "three", record("three"))
        self.assertEqual([e["path"] for e in lines(self.path + ".1")], ["one", "two"])
        self.assertEqual([e["path"] for e in lines(self.path)], ["three"])

    def complaints(self) -> list[str]:
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events  # type: ignore[return-value]

    def test_follows_a_moved_file(self):
        """A writer that gets no SIGHUP (a worker) reopens by itself once the file was moved."""
        log = AuditLog(self.path, "n")
        self.addCleanup(log.close)
        log.checkInterval = 0
        log.write("upload", "one", record("one"))
        os.rename(self.path, self.path + ".1")
        log.write("upload", "two", record("two"))
        self.assertEqual([e["path"] for e in lines(self.path + ".1")], ["one"])
        self.assertEqual([e["path"] for e in lines(self.path)], ["two"])

    def test_full_disk(self):
        """A write that fails is logged once (not per entry) and raises nothing."""
        events = self.complaints()
        log = AuditLog("/dev/full", "n")
        self.addCleanup(log.close)
        log.write("upload", "a", record("a"))
        log.write("upload", "b", record("b"))
        said = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.error]
        self.assertEqual(len(said), 1)
        self.assertIn("audit log /dev/full: ", said[0])
        self.assertIn("No space left on device", said[0])

    def test_unwritable_at_reopen(self):
        """A reopen that fails (the directory is gone) is logged; writes are dropped, not raised."""
        directory = self.mktemp()
        os.makedirs(directory)
        log = AuditLog(os.path.join(directory, "audit.log"), "n")
        self.addCleanup(log.close)
        os.unlink(os.path.join(directory, "audit.log"))
        os.rmdir(directory)
        events = self.complaints()
        log.reopen()
        log.write("upload", "a", record("a"))
        self.assertFalse(os.path.exists(directory))
        said = [formatEvent(e) for e in events if e.get("log_level") == LogLevel.error]
        self.assertEqual(len(said), 1)
        self.assertIn("No such file or directory", said[0])


class SighupTests(TestCase):
    def test_reopens_after_the_other_handler(self):
        """SIGHUP runs the reopen in the reactor thread and the handler that was there too."""
        original = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, original)
        earlier: list[int] = []
        signal.signal(signal.SIGHUP, lambda signum, frame: earlier.append(signum))
        done: Deferred[None] = Deferred()
        reopen_on_sighup(lambda: done.callback(None))
        os.kill(os.getpid(), signal.SIGHUP)
        return done.addCallback(lambda _: self.assertEqual(earlier, [signal.SIGHUP]))


class ServerEntryTests(SynchronousTestCase):
    def setUp(self):
        self.root = self.mktemp()
        self.server = MemoryServer(self.root)
        self.path = self.mktemp()
        self.server.fs.audit = AuditLog(self.path, "node-a", self.server.clock)
        self.addCleanup(self.server.fs.audit.close)

    def test_upload(self):
        """A stored upload is one entry, after its record is written."""
        body = b"hello audit"
        head = request_head(
            "PUT",
            "/upload/s/a.txt?" + v2_query("s/a.txt", len(body), "text/plain"),
            len(body),
            ("Content-Type: text/plain",),
        )
        channel, transport = self.server.connect()
        channel.dataReceived(head + body)
        self.assertEqual(status(transport), 201)
        [entry] = lines(self.path)
        stored = self.successResultOf(self.server.fs.metadata.get("s/a.txt"))
        self.assertEqual(
            {k: entry[k] for k in ("action", "path", "size", "sha256", "who", "protocol")},
            dict(action="upload", path="s/a.txt", size=len(body), sha256=stored.sha256,
                 who="node-a", protocol="v2"),
        )  # fmt: skip

    def test_refused_upload_is_not_logged(self):
        """A refused upload writes no entry."""
        channel, transport = self.server.connect()
        channel.dataReceived(request_head("PUT", "/upload/s/a.txt?v=bad", 3) + b"abc")
        self.assertEqual(status(transport), 403)
        self.assertFalse(os.path.exists(self.path) and lines(self.path))

    def test_expiry(self):
        """Each file the expiry sweep deletes is one entry."""
        fs = self.server.fs
        os.makedirs(os.path.join(fs.store_dir, "old"))
        for name in ("a", "b"):
            with open(os.path.join(fs.store_dir, "old", name), "wb") as f:
                f.write(b"x")
            fs.metadata.put(record(f"old/{name}", size=1, expires=1.0, created=0.5))
        self.server.clock.advance(10)
        sweep = ExpirySweep(fs, interval=60)
        sweep.sweep()
        self.assertEqual(
            sorted((e["action"], e["path"], e["size"]) for e in lines(self.path)),
            [("expire", "old/a", 1), ("expire", "old/b", 1)],
        )
