"""
StoreDir on a shared file system: what the local backend relies on (record locks for
claims, flock for resumable pieces, link() for no-overwrite), checked across two
processes on two mounts of one directory (a bind mount, so root only).  This is the
same kernel, not NFS or CephFS: it shows that nothing depends on the path a node
mounted the directory under, not what a network file system's lock manager does.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from hmacd.claims import PathBusy, claim
from hmacd.storage import Conflict
from hmacd.storage.local import LocalStorage
from tests.store_contract import record

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A second "node": takes a claim or an flock through its own mount, says so, and holds
# it until its stdin closes.
HOLDER = """
import fcntl, os, sys
mode, root, name = sys.argv[1:]
if mode == "claim":
    from hmacd.claims import claim
    held = claim(root, name)
else:
    fd = os.open(os.path.join(root, name), os.O_WRONLY | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
print("held", flush=True)
sys.stdin.read()
"""


class TwoMountsTests(SynchronousTestCase):
    """Two nodes' views of one StoreDir: a bind mount of it under another path."""

    def setUp(self):
        if os.geteuid() != 0:
            raise SkipTest("a bind mount needs root")
        self.a = os.path.abspath(self.mktemp())
        self.b = os.path.abspath(self.mktemp())
        os.makedirs(self.a)
        os.makedirs(self.b)
        done = subprocess.run(["mount", "--bind", self.a, self.b], capture_output=True)
        if done.returncode != 0:
            raise SkipTest(f"cannot bind-mount here: {done.stderr.decode().strip()}")
        self.addCleanup(subprocess.run, ["umount", self.b], check=True)

    def holder(self, mode: str, root: str, name: str) -> subprocess.Popen:
        env = dict(os.environ, PYTHONPATH=CHECKOUT)
        child = subprocess.Popen(
            [sys.executable, "-c", HOLDER, mode, root, name],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
        )  # fmt: skip
        self.addCleanup(child.wait, 10)
        self.addCleanup(child.stdin.close)
        self.assertEqual(child.stdout.readline(), b"held\n")
        return child

    def test_claim_across_mounts(self):
        """A claim taken by another process through the other mount refuses ours, until it dies."""
        child = self.holder("claim", self.b, "slot/photo.jpg")
        self.assertRaises(PathBusy, claim, self.a, "slot/photo.jpg")
        ours = claim(self.a, "slot/other.jpg")
        ours.release()
        child.stdin.close()
        child.wait(10)
        claim(self.a, "slot/photo.jpg").release()

    def test_flock_across_mounts(self):
        """A resumable upload's flock held through one mount excludes the other."""
        child = self.holder("flock", self.b, "piece.part")
        fd = os.open(os.path.join(self.a, "piece.part"), os.O_WRONLY)
        self.addCleanup(os.close, fd)
        self.assertRaises(BlockingIOError, fcntl.flock, fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        child.stdin.close()
        child.wait(10)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def test_link_never_overwrites_across_mounts(self):
        """The second node's link() of a taken name is a Conflict; the first file stays."""
        first = LocalStorage(self.a, blocking=lambda f, *a: f(*a))
        second = LocalStorage(self.b, blocking=lambda f, *a: f(*a))
        for storage, body in ((first, b"first"), (second, b"second")):
            temp = os.path.join(storage.root, f"temp-{body.decode()}")
            with open(temp, "wb") as f:
                f.write(body)
            if storage is first:
                storage.adopt(temp, "slot/file.bin", record("slot/file.bin", size=5))
            else:
                self.assertRaises(
                    Conflict, storage.adopt, temp, "slot/file.bin", record("slot/file.bin")
                )
        with open(os.path.join(self.b, "slot", "file.bin"), "rb") as f:
            self.assertEqual(f.read(), b"first")
