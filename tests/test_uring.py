"""
hmacd.uring: fsyncs handed to the kernel together, and the way back to one at a time.
"""

from __future__ import annotations

import errno
import os
import threading

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from hmacd import uring
from hmacd.uring import Ring, Rings


def _rings() -> Rings:
    rings, why = Rings.open()
    if rings is None:
        raise SkipTest(f"no io_uring here: {why}")
    return rings


class RingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.rings = _rings()
        self.rings.ring()  # its descriptors made before any test closes one
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.fds: list[int] = []

    def tearDown(self) -> None:
        for fd in self.fds:
            os.close(fd)

    def files(self, count: int) -> list[int]:
        for i in range(count):
            fd = os.open(os.path.join(self.dir, f"{i}"), os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"x" * 100)
            self.fds.append(fd)
        return self.fds[-count:]

    def test_fsync_all(self) -> None:
        """Every descriptor is fsynced: 0 for each, in the order given."""
        fds = self.files(5)
        self.assertEqual(self.rings.fsync_all(fds), [0] * 5)

    def test_failure_is_its_own(self) -> None:
        """A descriptor that cannot be fsynced gets its errno, negated; the others 0."""
        fds = self.files(3)
        closed = os.dup(fds[0])
        os.close(closed)
        self.assertEqual(self.rings.fsync_all([fds[0], closed, fds[2]]), [0, -errno.EBADF, 0])

    def test_more_than_the_ring_holds(self) -> None:
        """More descriptors than the ring's entries go in rounds; every result in its place."""
        fds = self.files(3)
        closed = os.dup(fds[0])
        os.close(closed)
        many = [*(fds * Ring.ENTRIES)[: 2 * Ring.ENTRIES + 1], closed]
        results = self.rings.fsync_all(many)
        self.assertEqual(results, [0] * (2 * Ring.ENTRIES + 1) + [-errno.EBADF])

    def test_nothing(self) -> None:
        self.assertEqual(self.rings.fsync_all([]), [])

    def test_a_ring_per_thread(self) -> None:
        """Each thread has a ring of its own, made once."""
        mine = self.rings.ring()
        self.assertIs(self.rings.ring(), mine)
        theirs: list[Ring] = []
        thread = threading.Thread(target=lambda: theirs.append(self.rings.ring()))
        thread.start()
        thread.join()
        self.assertIsNot(theirs[0], mine)

    def test_failed_ring_replaced(self) -> None:
        """A ring that fails is closed and forgotten: the error is raised, the next call works."""
        broken = self.rings.ring()

        def fail(fds):
            raise OSError(errno.EBUSY, "busy")

        broken.fsync_all = fail  # type: ignore[method-assign]
        self.assertRaises(OSError, self.rings.fsync_all, self.files(1))
        self.assertTrue(broken._closed)
        self.assertIsNot(self.rings.ring(), broken)
        self.assertEqual(self.rings.fsync_all(self.files(1)), [0])


class OpenTests(SynchronousTestCase):
    """Where there is no io_uring to be had, L{Rings.open} says why."""

    def test_no_binding(self) -> None:
        self.patch(uring, "liburing", None)
        self.assertEqual(Rings.open(), (None, "liburing is not installed"))

    def test_refused(self) -> None:
        """A kernel that refuses (io_uring_disabled, seccomp) is named in the reason."""

        class Refusing:
            def __init__(self) -> None:
                raise PermissionError(errno.EPERM, "Operation not permitted")

        self.patch(uring, "Ring", Refusing)
        rings, why = Rings.open()
        self.assertIsNone(rings)
        self.assertEqual(why, "io_uring refused: Operation not permitted")
