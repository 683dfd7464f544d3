"""
Periodic work, as TimerServices whose steps catch and log their own errors
(a step that raised would stop its loop for good).
"""

from __future__ import annotations

import gc
import os
import time
from contextlib import suppress
from functools import partial

import psutil
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from hmacd.core import FileServer
from hmacd.facts import is_expired
from hmacd.leases import SweepLease
from hmacd.logs import escape
from hmacd.metadata import FileRecord
from hmacd.sink import partial_dir
from hmacd.storage import IStorage
from hmacd.store import StoreUnavailable

__all__ = [
    "DedupGauge",
    "ExpirySweep",
    "GarbageCollector",
    "PartialSweep",
    "SystemMonitor",
    "drain_uploads",
    "remove_all",
    "remove_expired",
    "sweep_partials",
    "sweep_resumable",
]

log = Logger()


def sweep_partials(storage: IStorage, older_than: float) -> list[str]:
    """
    Remove the temps of uploads that can no longer finish, untouched since C{older_than}
    (newer ones may belong to an upload in progress); the removed ones' names.
    """
    return storage.sweep_temps(older_than)


def sweep_resumable(store_dir: str, older_than: float) -> list[str]:
    """
    Remove resumable uploads (C{.hmacfs/partial/}) untouched since
    C{older_than}: their clients gave up.

    @return: the removed data files' names.
    """
    partial = partial_dir(store_dir)
    removed: list[str] = []
    try:
        names = os.listdir(partial)
    except FileNotFoundError:
        return removed
    for name in names:
        if name.endswith(".tmp"):
            # A state file a crash left half-written.
            path = os.path.join(partial, name)
            with suppress(OSError):
                if os.stat(path).st_mtime < older_than:
                    os.unlink(path)
            continue
        if not name.endswith(".json"):
            continue
        key = name[: -len(".json")]
        data = os.path.join(partial, key + ".part")
        try:
            newest = max(
                os.stat(p).st_mtime
                for p in (data, os.path.join(partial, name))
                if os.path.exists(p)
            )
        except (OSError, ValueError):
            continue
        if newest < older_than:
            for path in (data, os.path.join(partial, name)):
                with suppress(FileNotFoundError):
                    os.unlink(path)
            removed.append(key)
    return removed


class PartialSweep(TimerService):
    """
    Sweep abandoned temp files at start and every C{interval} seconds.

    A live upload writes at least once per idle timeout of the site (or is
    dropped), so a temp file untouched for C{maxAge} seconds, a multiple of
    that timeout, is abandoned whichever process it came from.
    """

    def __init__(
        self,
        fs: FileServer,
        interval: float = 3600,
        maxAge: float = 600,
        resumableTTL: float = 86400,
        lease: SweepLease | None = None,
    ) -> None:
        super().__init__(interval, self.sweep)
        self.fs = fs
        self.maxAge = maxAge
        self.resumableTTL = resumableTTL
        self.clock = fs.reactor
        # Given when the temps are shared (an object store's uploads): one node sweeps them.
        self.lease = lease

    _sweeping = False

    def sweep(self) -> None:
        # Not returning the Deferred: TimerService would make stopService
        # wait for a walk of a large store.  A sweep still running when the
        # next is due is left to finish instead.
        if self._sweeping:
            return
        self._sweeping = True
        if self.lease is None:
            self._sweepNow()
            return
        d = Deferred.fromCoroutine(self.lease.take())

        def decided(held: bool) -> None:
            if held:
                self._sweepNow()
            else:
                self._sweeping = False

        def failed(failure: Failure) -> None:
            self._sweeping = False
            log.failure("sweeping abandoned uploads failed", failure)

        d.addCallback(decided)
        d.addErrback(failed)

    def _sweepNow(self) -> None:
        now = self.fs.now()
        root = self.fs.store_dir
        storage = self.fs.storage

        def both() -> tuple[list[str], list[str]]:
            return (
                sweep_partials(storage, now - self.maxAge),
                sweep_resumable(root, now - self.resumableTTL),
            )

        d = self.fs.blocking(both)

        def report(result: tuple[list[str], list[str]]) -> None:
            temps, resumable = result
            if temps:
                log.info(
                    "removed {count} abandoned upload temp files: {files}",
                    count=len(temps),
                    files=", ".join(temps[:10]),
                )
            if resumable:
                log.info("removed {count} abandoned resumable uploads", count=len(resumable))

        def done(result):
            self._sweeping = False
            return result

        d.addBoth(done)
        d.addCallback(report)
        d.addErrback(lambda f: log.failure("sweeping abandoned uploads failed", f))


class DedupGauge(TimerService):
    """
    Count what deduplication saves (L{hmacd.storage.local.LocalStorage.dedup_census}) at
    start and every C{interval} seconds, into the C{dedup_saved_bytes} gauge: a walk of the
    content entries (one lstat each) in a worker thread, in the main process only.
    """

    def __init__(self, fs: FileServer, interval: float = 300) -> None:
        super().__init__(interval, self.count)
        self.fs = fs
        self._counting = False

    def count(self) -> None:
        if self._counting:
            return  # the last walk is still going: a large store
        census = getattr(self.fs.storage, "dedup_census", None)
        if census is None:
            return  # a storage that shares nothing
        self._counting = True
        d = self.fs.blocking(census)

        def counted(result) -> None:
            self.fs.metrics.dedup_saved_bytes.set(result.saved_bytes)

        def done(result):
            self._counting = False
            return result

        d.addBoth(done)
        d.addCallback(counted)
        d.addErrback(lambda f: log.failure("counting deduplicated bytes failed", f))


# Threads the expiry sweep removes files in at once.
REMOVE_LANES = 4


def remove_all(storage: IStorage, relpaths: list[str]) -> int:
    """Delete each of C{relpaths}, in one trip to a thread; how many were there."""
    return sum(storage.delete(relpath) for relpath in relpaths)


def remove_expired(storage: IStorage, records: list[FileRecord], now: float) -> list[FileRecord]:
    """
    Delete the files of expired C{records}, except those that are another upload than
    their record says (a store restored from an old backup): a file whose facts name
    another creation time and have not expired is kept.

    @return: the facts of the files kept, to replace their stale records.
    """
    kept = []
    for record in records:
        stored = storage.open(record.path)
        if stored is not None:
            try:
                facts = stored.facts()
            finally:
                stored.close()
            if facts is not None and facts.created != record.created and not is_expired(facts, now):
                kept.append(facts)
                continue
        storage.delete(record.path)
    return kept


class ExpirySweep(TimerService):
    """
    Delete files whose record says they have expired (FileTTL, or a JWT
    slot's C{expires}), C{batch} at a time, every C{interval} seconds.

    A sweep goes on while full batches come back, so it keeps up with any
    upload rate; between batches it yields to the reactor (the work of one
    reactor turn is one batch's bookkeeping), and a sweep still running when
    the next is due is left to finish instead of being doubled.

    Only files named by an expired record are touched: a file without a
    record is never deleted here.  The file goes first, then its record, so
    an interrupted sweep leaves a record whose file is gone (found again by
    the next sweep) rather than a file nothing will ever delete.  (Downloads
    do not wait for the sweep: an expired file is answered 410 from its
    expiry on, see L{hmacd.download}.)
    """

    def __init__(
        self,
        fs: FileServer,
        interval: float = 60,
        batch: int = 200,
        lease: SweepLease | None = None,
    ) -> None:
        super().__init__(interval, self.sweep)
        self.fs = fs
        self.batch = batch
        # With a store other nodes share: sweep only while holding this lease.
        self.lease = lease
        self.clock = fs.reactor
        self.removed = 0
        self._sweeping = False
        # The sweep in progress, if any (fires when it is done).
        self.current: Deferred[None] | None = None

    def sweep(self) -> None:
        # Fire and forget, as PartialSweep: a slow store must not hold up
        # stopService, and an overdue sweep is skipped rather than doubled.
        if self._sweeping:
            return
        self._sweeping = True
        d = self.current = Deferred.fromCoroutine(self._sweep())
        d.addErrback(self._failed)
        d.addBoth(self._done)

    def _done(self, _) -> None:
        self._sweeping = False
        self.current = None

    @staticmethod
    def _failed(failure) -> None:
        if failure.check(StoreUnavailable):
            # The store outage is logged by the store; this sweep just waits.
            log.info("expiry sweep postponed: {why}", why=failure.value)
        else:
            log.failure("expiry sweep failed", failure)

    async def _sweep(self) -> None:
        store = self.fs.metadata
        if not store.writable():
            return  # starting, or every store down: the next sweep will do
        if getattr(store, "copying", False):
            # Until the fallback's records are back in the primary, the
            # primary may hold an older record for a path that was uploaded
            # again during the outage: deleting by that record could take
            # the newer file.
            return
        metrics = self.fs.metrics
        started = self.fs.reactor.seconds()
        backlog = await self._countDue()
        removed = 0
        previous: set[str] = set()
        try:
            while True:
                if self.lease is not None and not await self.lease.take():
                    break  # another node sweeps (or took over mid-sweep): stop here
                due = await store.expired(self.fs.now(), self.batch)
                if not due:
                    break
                paths = [record.path for record in due]
                if previous.intersection(paths):
                    # Deleted records came back: a store that does not delete would keep
                    # this loop going for ever.  The next sweep tries again.
                    log.warn("expiry sweep stopped: the store still lists deleted records")
                    break
                previous = set(paths)
                # An unlink waits on the disk (400 us each here once the file is written
                # back): a few threads at once remove four to five times as many.
                now = self.fs.now()
                lanes = [due[n::REMOVE_LANES] for n in range(REMOVE_LANES)]
                kept = await _gather(
                    self.fs.blocking(partial(remove_expired, self.fs.storage, lane, now))
                    for lane in lanes
                    if lane
                )
                if kept:
                    log.warn(
                        "expiry sweep: {count} records were older than their files "
                        "(e.g. {path}); the files are kept and their records replaced",
                        count=len(kept),
                        path=kept[0].path,
                    )
                keptPaths = {facts.path for facts in kept}
                await _all(
                    [store.put(facts) for facts in kept]
                    + [store.delete(path) for path in paths if path not in keptPaths]
                )
                audit = self.fs.audit
                if audit is not None:
                    for record in due:
                        if record.path not in keptPaths:
                            audit.write("expire", record.path, record)
                removed += len(due)
                metrics.expired_files.inc(len(due))
                if backlog is not None:
                    metrics.expiry_backlog.set(max(0, backlog - removed))
                if len(due) < self.batch:
                    break
                # Let requests in before the next batch.
                await deferLater(self.fs.reactor, 0, lambda: None)
        finally:
            if removed:
                self.removed += removed
                elapsed = self.fs.reactor.seconds() - started
                log.info(
                    "deleted {count} expired files in {seconds:.1f} s",
                    count=removed,
                    seconds=elapsed,
                )
        await self._countDue()

    async def _countDue(self) -> int | None:
        """Set the backlog gauge to the records due now; None if the store cannot say."""
        try:
            due = await self.fs.metadata.count_expired(self.fs.now())
        except Exception as e:
            # A store of an embedding program may predate count_expired: the sweep matters
            # more than its gauge.
            log.debug("expiry backlog not counted: {why}", why=e)
            return None
        self.fs.metrics.expiry_backlog.set(due)
        return due


async def _gather(calls) -> list:
    """The lists the Deferreds of C{calls} fire with, joined; failures as in L{_all}."""
    joined: list = []
    first: BaseException | None = None
    for d in list(calls):
        try:
            joined.extend(await d)
        except Exception as e:
            first = first or e
    if first is not None:
        raise first
    return joined


async def _all(calls) -> None:
    """Wait for every Deferred of C{calls}; the first failure (after all have settled) is raised."""
    first: BaseException | None = None
    for d in list(calls):
        try:
            await d
        except Exception as e:
            first = first or e
    if first is not None:
        raise first


class GarbageCollector(TimerService):
    """C{gc.collect()} every C{interval} seconds, its yield logged at debug level."""

    def __init__(self, interval: float, clock) -> None:
        super().__init__(interval, self.collect)
        self.clock = clock

    def collect(self) -> None:
        try:
            started = time.perf_counter()
            collected = gc.collect()
            log.debug(
                "gc: {collected} objects collected in {ms:.1f} ms",
                collected=collected,
                ms=(time.perf_counter() - started) * 1000,
            )
        except Exception:
            log.failure("garbage collection failed")


class SystemMonitor(TimerService):
    """
    Every C{interval} seconds: threads, memory, CPU, descriptors, open
    connections, uploads in progress and reactor lag, logged at info level
    and set on the process gauges.

    CPU percent comes from psutil without an interval (nothing blocks the
    reactor): the share of CPU time since the previous sample.
    """

    def __init__(self, fs: FileServer, site, interval: float) -> None:
        super().__init__(interval, self.sample)
        self.fs = fs
        self.site = site
        self.clock = fs.reactor
        self.process = psutil.Process()
        self.process.cpu_percent(None)  # the first reading is always 0.0: prime it
        self.lag = 0.0

    def sample(self) -> None:
        try:
            metrics = self.fs.metrics
            with self.process.oneshot():
                memory = self.process.memory_info()
                threads = self.process.num_threads()
                fds = self.process.num_fds()
                cpu = self.process.cpu_percent(None)
            metrics.threads.set(threads)
            metrics.rss.set(memory.rss)
            metrics.vms.set(memory.vms)
            metrics.cpu.set(cpu)
            metrics.fds.set(fds)
            log.info(
                "status: {threads} threads, RSS {rss:.1f} MiB, VMS {vms:.1f} MiB, "
                "CPU {cpu:.1f}%, {fds} fds, {connections} connections, "
                "{uploads} uploads in progress, reactor lag {lag:.1f} ms",
                threads=threads,
                rss=memory.rss / 2**20,
                vms=memory.vms / 2**20,
                cpu=cpu,
                fds=fds,
                connections=self.site.openConnections,
                uploads=len(self.fs.uploads),
                lag=self.lag * 1000,
            )
            # The next lag figure: how late a call scheduled for "now" runs.
            self.fs.reactor.callLater(0, self._lag, self.fs.reactor.seconds())
        except Exception:
            log.failure("system monitor sample failed")

    def _lag(self, scheduled: float) -> None:
        self.lag = max(0.0, self.fs.reactor.seconds() - scheduled)
        self.fs.metrics.reactor_lag.set(self.lag)


async def drain_uploads(fs: FileServer, grace: float) -> None:
    """
    Shutdown: refuse new uploads, give those in progress C{grace} seconds,
    then abort the rest (their temp files go with their connections).
    """
    uploads = fs.uploads
    uploads.accepting = False
    if not uploads:
        return
    log.info(
        "shutting down: waiting up to {grace}s for {count} uploads",
        grace=grace,
        count=len(uploads),
    )
    idle = uploads.idle()
    idle.addTimeout(grace, fs.reactor)
    with suppress(TimeoutError, DeferTimeoutError):
        await idle
        # The last upload let go just before its answer was written, and what follows the
        # drain (the stores' close, then the reactor's disconnectAll) must not overtake that
        # answer: one reactor turn with I/O in it sends it.  A call made from a call that was
        # due runs only after the next poll for I/O.
        await deferLater(fs.reactor, 0, lambda: None)
        await deferLater(fs.reactor, 0, lambda: None)
    for request in uploads:
        log.warn("shutting down: aborting the upload of {path}", path=escape(request.path))
        request.abortUpload()
    if uploads:
        await deferLater(fs.reactor, 0, lambda: None)  # let connectionLost run
