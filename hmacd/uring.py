"""
Many fsyncs at once, for one hand-off of the GIL: io_uring.

A commit lane (L{hmacd.sink.GroupCommit}) makes a batch of small uploads durable: an fsync
of every file, of every directory they went into, and of the parents of the directories
made for them.  Made one at a time from Python, every call lets the GIL go and takes it
back, and while the reactor thread is busy each taking back is a futex wait and two
context switches: in the slot layout (a new directory per upload) the hand-offs cost the
server more CPU than the calls, and the calls ran one after another.  Through io_uring
the lane gives the kernel the whole set, which runs them side by side, and waits on an
eventfd (the GIL let go once) until every one has completed.

L{Rings} keeps one ring per thread that uses it (a ring is not shared between threads),
made on first use.  L{Rings.open} says why not where there is none to be had: no
C{liburing} (PyPI's binding, wheels for Linux on x86_64), a kernel without io_uring, or
one that refuses it (C{kernel.io_uring_disabled}, a seccomp profile such as Docker's
default).  The caller then fsyncs one at a time, as before.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Sequence
from typing import Any, cast

__all__ = ["Ring", "RingFailed", "Rings"]


class RingFailed(Exception):
    """
    A ring failed part way through L{Ring.fsync_all}.  A writeback error is reported once:
    an fsync the kernel has run, whether or not its result came back, must not be made
    again and taken for a success.

    @ivar results: for each descriptor, its result if it came back (0 or C{-errno}); None
        if it never reached the kernel (it may be fsynced again).
    @ivar lost: the indexes of those that reached the kernel and whose result did not come
        back: to be taken as failed.
    """

    def __init__(self, why: BaseException, results: list[int | None], lost: set[int]) -> None:
        super().__init__(f"io_uring failed: {why}")
        self.results = results
        self.lost = lost


try:
    import liburing  # type: ignore[import-untyped]
except ImportError:  # not Linux on x86_64, or not installed
    liburing = None


class Ring:
    """
    One io_uring and the eventfd it signals completions on.  One thread at a time.

    @raise OSError: the kernel has no io_uring, or refuses it.
    @raise RuntimeError: no binding (L{liburing} cannot be imported).
    """

    # Submissions in flight at most: larger sets go in rounds of this many.
    ENTRIES = 128

    def __init__(self) -> None:
        if liburing is None:
            raise RuntimeError("liburing is not installed")
        self._ring = liburing.Ring()
        liburing.io_uring_queue_init(self.ENTRIES, self._ring)
        try:
            self._event = os.eventfd(0, os.EFD_CLOEXEC)
            try:
                liburing.io_uring_register_eventfd(self._ring, self._event)
            except BaseException:
                os.close(self._event)
                raise
        except BaseException:
            liburing.io_uring_queue_exit(self._ring)
            raise
        self._cqe = liburing.Cqe()
        self._closed = False

    def fsync_all(self, fds: Sequence[int]) -> list[int]:
        """
        Blocking: fsync every descriptor of C{fds}, side by side; for each, 0 or the
        negated errno of its failure (C{-errno.EIO}, say), in the order given.
        """
        results: list[int | None] = [None] * len(fds)
        # Handed to the kernel, result not back yet.
        pending: set[int] = set()
        try:
            for start in range(0, len(fds), self.ENTRIES):
                chunk = fds[start : start + self.ENTRIES]
                for i, fd in enumerate(chunk):
                    sqe = liburing.io_uring_get_sqe(self._ring)
                    liburing.io_uring_prep_fsync(sqe, fd, 0)
                    sqe.user_data = start + i
                self._complete(start, len(chunk), results, pending)
        except BaseException as e:
            raise RingFailed(e, results, pending) from e
        return cast(list[int], results)

    def _complete(
        self, start: int, count: int, results: list[int | None], pending: set[int]
    ) -> None:
        """
        Submit the C{count} entries queued (C{start} on); wait until their results are in
        C{results}.  C{pending} holds those in the kernel meanwhile.
        """
        submitted = liburing.io_uring_submit(self._ring)
        # The first ones were taken (the kernel takes them in order), whatever comes next.
        pending.update(range(start, start + max(submitted, 0)))
        if submitted != count:
            raise OSError(errno.EAGAIN, "io_uring took fewer submissions than it was given")
        while pending:
            # The GIL goes while we wait.  A signal left from an earlier round only makes
            # us look once more.
            os.eventfd_read(self._event)
            while pending:
                try:
                    liburing.io_uring_peek_cqe(self._ring, self._cqe)
                except BlockingIOError:
                    break
                entry = self._cqe[0]
                index = entry.user_data
                try:
                    results[index] = entry.res
                except OSError as e:  # the binding raises a failure's errno
                    results[index] = -(e.errno or errno.EIO)
                liburing.io_uring_cqe_seen(self._ring, entry)
                pending.discard(index)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        liburing.io_uring_queue_exit(self._ring)
        os.close(self._event)

    def __del__(self) -> None:
        # A thread's ring goes with the thread (threading.local drops it).
        if not getattr(self, "_closed", True):
            self.close()


class Rings:
    """
    A L{Ring} for each thread that asks (L{fsync_all}), made on its first use there.

    Make one with L{open}: None (and why) where io_uring cannot be had.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    @classmethod
    def open(cls) -> tuple[Rings | None, str | None]:
        """Rings if this process can have them (tried now), else None and why not."""
        try:
            Ring().close()
        except RuntimeError as e:
            return None, str(e)
        except OSError as e:
            return None, f"io_uring refused: {os.strerror(e.errno or errno.ENOSYS)}"
        return cls(), None

    def ring(self) -> Ring:
        """This thread's ring."""
        ring: Any = getattr(self._local, "ring", None)
        if ring is None:
            ring = self._local.ring = Ring()
        return ring

    def fsync_all(self, fds: Sequence[int]) -> list[int]:
        """
        L{Ring.fsync_all} on this thread's ring.  A ring that fails part way is closed (the
        next call makes another) and L{RingFailed} raised.

        @raise OSError: no ring could be made in this thread (RuntimeError: no binding).
        """
        ring = self.ring()
        try:
            return ring.fsync_all(fds)
        except BaseException:
            self._local.ring = None
            ring.close()
            raise
