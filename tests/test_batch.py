"""
hmacd.batch.Batcher: items that arrive while a batch runs go together in the next one.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from hmacd.batch import Batcher


class Recorder:
    """A run function whose batches the test finishes by hand."""

    def __init__(self) -> None:
        self.calls: list[tuple[list, Deferred]] = []

    def __call__(self, items: list) -> Deferred:
        d: Deferred = Deferred()
        self.calls.append((list(items), d))
        return d


class BatcherTests(SynchronousTestCase):
    def test_lone_item_runs_at_once(self):
        """An item submitted to an idle batcher runs at once, alone."""
        run = Recorder()
        batcher: Batcher = Batcher(run)
        d = batcher.submit("a")
        self.assertEqual([items for items, _ in run.calls], [["a"]])
        run.calls[0][1].callback(["A"])
        self.assertEqual(self.successResultOf(d), "A")

    def test_items_waiting_go_together(self):
        """Items submitted while the lane is busy go in one batch, each gets its own result."""
        run = Recorder()
        batcher: Batcher = Batcher(run)
        first = batcher.submit(1)
        later = [batcher.submit(n) for n in (2, 3, 4)]
        self.assertEqual(len(run.calls), 1)
        run.calls[0][1].callback([10])
        self.assertEqual(self.successResultOf(first), 10)
        self.assertEqual(run.calls[1][0], [2, 3, 4])
        run.calls[1][1].callback([20, 30, 40])
        self.assertEqual([self.successResultOf(d) for d in later], [20, 30, 40])

    def test_most(self):
        """With C{most}, a batch takes that many of the items waiting; the rest go next."""
        run = Recorder()
        batcher: Batcher = Batcher(run, most=2)
        results = [batcher.submit(i) for i in range(5)]
        self.assertEqual([items for items, _ in run.calls], [[0]])
        run.calls[0][1].callback(["r0"])
        self.assertEqual([items for items, _ in run.calls], [[0], [1, 2]])
        run.calls[1][1].callback(["r1", "r2"])
        self.assertEqual([items for items, _ in run.calls], [[0], [1, 2], [3, 4]])
        run.calls[2][1].callback(["r3", "r4"])
        self.assertEqual([self.successResultOf(d) for d in results], [f"r{i}" for i in range(5)])
        self.assertRaises(ValueError, Batcher, run, most=0)

    def test_lanes(self):
        """With two lanes, two batches run at once and a third waits for either."""
        run = Recorder()
        batcher: Batcher = Batcher(run, lanes=2)
        batcher.submit("a")
        batcher.submit("b")
        batcher.submit("c")
        batcher.submit("d")
        self.assertEqual([items for items, _ in run.calls], [["a"], ["b"]])
        self.assertEqual(batcher.busy, 2)
        run.calls[1][1].callback(["B"])
        self.assertEqual(run.calls[2][0], ["c", "d"])

    def test_item_failure_is_its_own(self):
        """A Failure among the results fails that item; the others succeed."""
        batcher: Batcher = Batcher(lambda items: succeed([Failure(KeyError(items[0])), 2][:1]))
        d = batcher.submit("x")
        self.failureResultOf(d, KeyError)
        run = Recorder()
        batcher = Batcher(run)
        batcher.submit(0)
        a, b = batcher.submit(1), batcher.submit(2)
        run.calls[0][1].callback([0])
        run.calls[1][1].callback([Failure(ValueError("one")), "two"])
        self.failureResultOf(a, ValueError)
        self.assertEqual(self.successResultOf(b), "two")

    def test_batch_failure_fails_all(self):
        """A failed batch, or a run that raises, fails every item of it; the lane is free."""
        run = Recorder()
        batcher: Batcher = Batcher(run)
        first = batcher.submit(0)
        a, b = batcher.submit(1), batcher.submit(2)
        run.calls[0][1].errback(RuntimeError("down"))
        self.failureResultOf(first, RuntimeError)
        run.calls[1][1].errback(RuntimeError("down"))
        self.failureResultOf(a, RuntimeError)
        self.failureResultOf(b, RuntimeError)

        def boom(items):
            raise OSError("no")

        raising: Batcher = Batcher(boom)
        self.failureResultOf(raising.submit(1), OSError)
        self.failureResultOf(raising.submit(2), OSError)
        self.assertEqual(raising.busy, 0)

    def test_wrong_result_count(self):
        """A run that returns the wrong number of results fails the batch, loudly."""
        batcher: Batcher = Batcher(lambda items: succeed([]))
        self.failureResultOf(batcher.submit(1), AssertionError)

    def test_resubmit_from_callback(self):
        """A waiter that submits again from its callback is served, never lost."""
        run = Recorder()
        batcher: Batcher = Batcher(run)
        again: list[Deferred] = []
        batcher.submit(1).addCallback(lambda _: again.append(batcher.submit(2)))
        run.calls[0][1].callback(["one"])
        self.assertEqual(run.calls[1][0], [2])
        run.calls[1][1].callback(["two"])
        self.assertEqual(self.successResultOf(again[0]), "two")
