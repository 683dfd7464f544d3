"""
hmacd.uring: fsyncs handed to the kernel together, and the way back to one at a time.
"""

from __future__ import annotations

import errno
import os
import threading

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from hmacd import uring
from hmacd.uring import Ring, RingFailed, Rings


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

    def failingSubmit(self, failing: int, taken: int | None = None) -> None:
        """
        The C{failing}th submission (from 1) of this ring fails: it raises, or with
        C{taken}, the kernel takes only that many of its entries.
        """
        real = uring.liburing.io_uring_submit
        calls = []

        def submit(ring):
            calls.append(ring)
            if len(calls) != failing:
                return real(ring)
            if taken is None:
                raise OSError(errno.EINTR, "interrupted")
            return taken  # the rest stay unsubmitted: closing the ring drops them

        self.patch(uring.liburing, "io_uring_submit", submit)

    def test_failure_part_way(self):
        """
        A ring failing part way says which results came back and which fsyncs never
        reached the kernel (None: safe to make again); it is closed and replaced.
        """
        self.patch(Ring, "ENTRIES", 2)
        fds = self.files(5)
        ring = self.rings.ring()
        self.failingSubmit(2)
        failed = self.assertRaises(RingFailed, self.rings.fsync_all, fds)
        self.assertEqual(failed.results, [0, 0, None, None, None])
        self.assertEqual(failed.lost, set())
        self.assertTrue(ring._closed)
        self.assertEqual(self.rings.fsync_all(fds[:2]), [0, 0])

    def test_taken_in_part(self):
        """Entries the kernel took whose results never came back are lost, not unsent."""
        self.patch(Ring, "ENTRIES", 2)
        fds = self.files(5)
        self.failingSubmit(2, taken=1)
        failed = self.assertRaises(RingFailed, self.rings.fsync_all, fds)
        self.assertEqual(failed.results[:2], [0, 0])
        self.assertEqual(failed.results[2:], [None, None, None])
        self.assertEqual(failed.lost, {2})  # taken, as far as we were told: never retried


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
