"""
Work that arrives while earlier work runs waits, then goes together.

Under load the fixed cost of one unit of work (a thread hand-off and a directory fsync for
a commit, a pool hand-off and a transaction for an SQL statement, a round trip for Redis)
is what bounds the server, not the work itself.  A L{Batcher} runs the first item at once;
items submitted while every lane is busy queue up, and the next free lane takes all of
them in one call.  A lone item is never delayed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

__all__ = ["Batcher"]

T = TypeVar("T")
R = TypeVar("R")


class Batcher(Generic[T, R]):
    """
    Runs C{run(items)} on batches of the items L{submit}ted, at most C{lanes} at once.

    C{run} returns a Deferred that fires with one result per item, in order; a result
    that is a L{Failure} fails that item alone.  If the Deferred fails, every item of
    the batch fails with that failure.  C{run} may also raise: the same.

    @param most: at most this many items to a batch (the rest wait for the next); None:
        all that wait.
    """

    def __init__(
        self,
        run: Callable[[list[T]], Deferred[Sequence[R | Failure]]],
        lanes: int = 1,
        most: int | None = None,
    ) -> None:
        if lanes < 1:
            raise ValueError(f"lanes must be >= 1, got {lanes!r}")
        if most is not None and most < 1:
            raise ValueError(f"most must be >= 1, got {most!r}")
        self._run = run
        self.lanes = lanes
        self.most = most
        self._queue: list[tuple[T, Deferred[R]]] = []
        self._busy = 0

    @property
    def busy(self) -> int:
        """How many batches are running now."""
        return self._busy

    def submit(self, item: T) -> Deferred[R]:
        """Run C{item} with whatever else is waiting; fires with its own result."""
        d: Deferred[R] = Deferred()
        self._queue.append((item, d))
        self._next()
        return d

    def _next(self) -> None:
        while self._queue and self._busy < self.lanes:
            batch = self._queue[: self.most]
            del self._queue[: len(batch)]
            self._busy += 1
            try:
                done = self._run([item for item, _ in batch])
            except BaseException:
                done = Deferred()
                done.errback(Failure())
            done.addBoth(self._finished, [d for _, d in batch])

    def _finished(self, results: Sequence[R | Failure] | Failure, waiters: list[Deferred[R]]):
        self._busy -= 1
        if isinstance(results, Failure):
            outcomes: Sequence[R | Failure] = [results] * len(waiters)
        elif len(results) != len(waiters):
            outcomes = [
                Failure(AssertionError(f"{len(results)} results for {len(waiters)} items"))
            ] * len(waiters)
        else:
            outcomes = results
        for d, outcome in zip(waiters, outcomes, strict=True):
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)
        # A waiter's callback may have submitted again, and started it already.
        self._next()
        return None
