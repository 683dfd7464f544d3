"""
A primary store and an optional fallback, each behind a timeout and a
circuit breaker.

Stores can fail slowly (txredisapi with reconnect simply waits on a dead
server; adbapi queries cannot be cancelled), so every call has a deadline,
and the first failure opens the breaker: calls then go straight to the
fallback without waiting, and a probe pings the broken store until it
answers.  What was written to the fallback during the outage is copied to
the primary when it is back, and removed from the fallback: the fallback
holds exactly the records the primary still lacks, so a read that misses in
the primary looks there.

The upload path asks L{FailoverStore.writable} before it reads a body: when
no store can take a record, the upload is refused with 503 up front.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    TimeoutError,
    fail,
    inlineCallbacks,
    succeed,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hmacd.store import FileRecord, IMetadataStore, StoreUnavailable
from hmacd.takedown import Takedown

__all__ = ["Backend", "FailoverStore"]

log = Logger()

# Failures that mean "this store is not answering", as opposed to bugs.
_OUTAGES = (StoreUnavailable, TimeoutError, CancelledError, ConnectionError)


class Backend:
    """
    One store behind a deadline and a circuit breaker.

    @ivar up: whether calls are passed to the store; False from the first
        failed call until a probe succeeds.
    """

    def __init__(
        self,
        store: IMetadataStore,
        role: str,
        clock,
        timeout: float,
        probeInterval: float,
        onUp: Callable[[], Any] = lambda: None,
        startTimeout: float = 10.0,
    ) -> None:
        self.store = store
        self.startTimeout = startTimeout
        self.role = role
        self.clock = clock
        self.timeout = timeout
        self.probeInterval = probeInterval
        self.onUp = onUp
        self.up = False
        self.transitions = 0
        self.downs = 0  # up -> down transitions: the failovers metric
        self.backoff = 1  # probe interval multiplier while the store flaps
        self._lastUp: float | None = None
        self._probe: LoopingCall | None = None
        self._waiters: list[Deferred] | None = None
        self._started = False
        self._stopped = False

    @property
    def name(self) -> str:
        return self.store.name

    @property
    def starting(self) -> bool:
        return self._waiters is not None

    def start(self) -> Deferred[None]:
        """
        Start the store; a failure leaves it down (and probing), never raises.

        Until it has started or failed, calls wait for it (within the start
        deadline) instead of failing: the listener opens before the stores
        have connected, and the first uploads should not get 503 for that.
        """
        self._waiters = []
        d = self.store.start().addTimeout(self.startTimeout, self.clock)

        def started(_):
            self._started = True
            self._markUp(initial=True)

        def failed(failure: Failure):
            log.error(
                "{role} metadata store {name} unavailable at start: {why}; "
                "running degraded until it answers",
                role=self.role,
                name=self.name,
                why=_reason(failure),
            )
            self._markDown(failure, announce=False)

        def release(_: object) -> None:
            waiters, self._waiters = self._waiters or [], None
            for waiter in waiters:
                waiter.callback(None)

        return d.addCallbacks(started, failed).addCallback(release)

    def stop(self) -> Deferred[None]:
        self._stopped = True
        self._stopProbe()
        return self.store.stop()

    def call(self, method: str, *args) -> Deferred:
        """C{store.method(*args)}, failing fast with StoreUnavailable while down."""
        if self._waiters is not None:
            waiter: Deferred[None] = Deferred()
            self._waiters.append(waiter)
            return waiter.addCallback(lambda _: self.call(method, *args))
        if not self.up:
            return fail(StoreUnavailable(f"{self.role} store {self.name} is down"))
        try:
            d = getattr(self.store, method)(*args)
        except Exception:
            d = fail()
        d = self._deadline(d)

        def failed(failure: Failure):
            if failure.check(*_OUTAGES):
                self._markDown(failure)
                raise StoreUnavailable(f"{self.name}: {_reason(failure)}")
            return failure

        return d.addErrback(failed)

    def _deadline(self, d: Deferred) -> Deferred:
        return d.addTimeout(self.timeout, self.clock)

    # A store that fails again within this many seconds of coming back is
    # flapping (say, answering PING but timing out on writes): each time,
    # its probes wait twice as long, up to MAX_BACKOFF times the interval.
    FLAP_WINDOW = 60.0
    MAX_BACKOFF = 16

    def _markDown(self, failure: Failure, announce: bool = True) -> None:
        if self.up:
            self.up = False
            self.transitions += 1
            self.downs += 1
            recent = (
                self._lastUp is not None and self.clock.seconds() - self._lastUp < self.FLAP_WINDOW
            )
            self.backoff = min(self.backoff * 2, self.MAX_BACKOFF) if recent else 1
            if announce:
                log.warn(
                    "{role} metadata store {name} is down: {why}",
                    role=self.role,
                    name=self.name,
                    why=_reason(failure),
                )
        if self._probe is None and not self._stopped:
            self._probe = LoopingCall(self._ping)
            self._probe.clock = self.clock
            self._probe.start(self.probeInterval * self.backoff, now=False)

    def _markUp(self, initial: bool = False) -> None:
        self._stopProbe()
        if self._stopped:
            return
        if not initial:
            self._lastUp = self.clock.seconds()  # a recovery: flapping is judged from here
        if not self.up:
            self.up = True
            if not initial:
                self.transitions += 1
                log.warn("{role} metadata store {name} is back", role=self.role, name=self.name)
            self.onUp()

    def _stopProbe(self) -> None:
        if self._probe is not None:
            if self._probe.running:
                self._probe.stop()
            self._probe = None

    def _ping(self) -> Deferred:
        # LoopingCall waits for the returned Deferred, so probes never pile
        # up on a hung server; the deadline below bounds each one.
        # A store that failed at start has no connection or schema yet:
        # start() it again (idempotent) rather than ping.
        try:
            attempt = self.store.ping() if self._started else self.store.start()
        except Exception:
            attempt = fail()
        # A start may take its connect timeout and more: cutting it short
        # would only make every probe fail.
        d = attempt.addTimeout(self.timeout if self._started else self.startTimeout, self.clock)

        def answered(_):
            self._started = True
            self._markUp()

        d.addCallbacks(answered, lambda f: None)
        return d


def _stopBackend(_: object, backend: Backend) -> Deferred[None]:
    return backend.stop()


def _reason(failure: Failure) -> str:
    if failure.check(TimeoutError, CancelledError):
        return "no answer in time"
    return str(failure.value) or type(failure.value).__name__


@implementer(IMetadataStore)
class FailoverStore:
    """
    The store the server talks to: a primary, and optionally a fallback
    that takes over while the primary is down.
    """

    def __init__(
        self,
        primary: IMetadataStore,
        fallback: IMetadataStore | None = None,
        clock=None,
        timeout: float = 2.0,
        probeInterval: float = 2.0,
        copyBatch: int = 100,
        healthInterval: float = 10.0,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.primary = Backend(primary, "primary", clock, timeout, probeInterval, self._copyBack)
        self.fallback = (
            Backend(fallback, "fallback", clock, timeout, probeInterval, self._copyBack)
            if fallback is not None
            else None
        )
        self.copyBatch = copyBatch
        self.copiedBack = 0
        self._copying = False
        # Backends that are up get a ping now and then, so that a fallback
        # nobody is using is known (and logged, and reported) to be down
        # before the primary fails too.
        self.healthInterval = healthInterval
        self._watch = LoopingCall(self._checkHealth)
        self._watch.clock = clock

    @property
    def copying(self) -> bool:
        """Whether outage records are being copied back to the primary right now."""
        return self._copying

    @property
    def name(self) -> str:
        if self.fallback is None:
            return self.primary.name
        return f"{self.primary.name}+{self.fallback.name}"

    def backends(self) -> list[Backend]:
        return [b for b in (self.primary, self.fallback) if b is not None]

    def writable(self) -> bool:
        """Whether some store would take a record now (no I/O: breaker state)."""
        return any(b.up or b.starting for b in self.backends())

    def start(self) -> Deferred[None]:
        """Start every store; one that fails is logged and left down, never fatal."""
        return Deferred.fromCoroutine(self._startAll())

    async def _startAll(self) -> None:
        for started in [backend.start() for backend in self.backends()]:
            await started
        if self.healthInterval and not self._watch.running:
            self._watch.start(self.healthInterval, now=False)
        if not self.writable():
            log.error("no metadata store is available: uploads are refused with 503")

    def _checkHealth(self) -> Deferred:
        pings = [b.call("ping") for b in self.backends() if b.up]
        # Failures mark their backend down (logged once there); the loop goes on.
        return Deferred.fromCoroutine(_settle(pings))

    def stop(self) -> Deferred[None]:
        if self._watch.running:
            self._watch.stop()
        d: Deferred[None] = succeed(None)
        for backend in self.backends():
            d.addCallback(_stopBackend, backend)
        return d

    def _routes(self) -> list[Backend]:
        return [b for b in self.backends() if b.up or b.starting]

    def _first(self, method: str, *args) -> Deferred:
        """Call the first store that is up; on an outage, the next one."""
        routes = self._routes()
        if not routes:
            return fail(StoreUnavailable("no metadata store is available"))

        def attempt(index: int) -> Deferred:
            d = routes[index].call(method, *args)
            if index + 1 < len(routes):

                def tryNext(failure: Failure) -> Deferred:
                    failure.trap(StoreUnavailable)
                    return attempt(index + 1)

                d.addErrback(tryNext)
            return d

        return attempt(0)

    def put(self, record: FileRecord) -> Deferred[None]:
        return self._first("put", record)

    def get(self, path: str) -> Deferred[FileRecord | None]:
        d = self._first("get", path)
        fallback = self.fallback
        if fallback is not None and self.primary.up:
            # Not copied back yet: the record may still be in the fallback.
            def missing(found):
                if found is None and fallback.up:
                    return fallback.call("get", path)
                return found

            d.addCallback(missing)
        return d

    def delete(self, path: str) -> Deferred[None]:
        """Delete from every store that is up; fails only if none took it."""
        routes = self._routes()
        if not routes:
            return fail(StoreUnavailable("no metadata store is available"))
        return Deferred.fromCoroutine(_anySucceeded([b.call("delete", path) for b in routes]))

    def expired(self, now: float, limit: int) -> Deferred[list[FileRecord]]:
        return self._first("expired", now, limit)

    def count_expired(self, now: float) -> Deferred[int]:
        return self._first("count_expired", now)

    def records(self, limit: int) -> Deferred[list[FileRecord]]:
        return self._first("records", limit)

    def ping(self) -> Deferred[None]:
        return self._first("ping")

    # What nodes share goes to the primary, and to the fallback only while the primary is
    # down: during an outage each node asks the store its own breaker points at, so a claim
    # or lease is exclusive among the nodes on the same side only (see README, "Several
    # nodes").  None of it is copied back: claims and leases are short-lived, and state
    # written to one side is not seen from the other.

    def claim(self, path: str, owner: str, lease: float) -> Deferred[bool]:
        return self._first("claim", path, owner, lease)

    def renew(self, path: str, owner: str, lease: float) -> Deferred[bool]:
        return self._first("renew", path, owner, lease)

    def release(self, path: str, owner: str) -> Deferred[None]:
        return self._first("release", path, owner)

    def put_state(self, key: str, value: str, ttl: float) -> Deferred[None]:
        return self._first("put_state", key, value, ttl)

    def get_state(self, key: str) -> Deferred[str | None]:
        return self._first("get_state", key)

    def delete_state(self, key: str) -> Deferred[None]:
        return self._first("delete_state", key)

    def lease(self, name: str, owner: str, ttl: float) -> Deferred[bool]:
        return self._first("lease", name, owner, ttl)

    # Quotas (hmacd.quota): each store keeps the figures of the records it holds.  While
    # the primary is down the fallback's count only what was uploaded during the outage, so
    # the quotas are looser then; the copy-back's puts and deletes move the figures along
    # with the records (see README, "Quotas").

    @property
    def quota_accounting(self) -> bool:
        """Whether the stores keep the quota figures on put and delete."""
        return all(b.store.quota_accounting for b in self.backends())

    @quota_accounting.setter
    def quota_accounting(self, on: bool) -> None:
        for backend in self.backends():
            backend.store.quota_accounting = on

    def quota_reserve(
        self, token: str, uploader: str | None, size: int, limits: Any, now: float, ttl: float
    ) -> Deferred[tuple[bool, Any]]:
        return self._first("quota_reserve", token, uploader, size, limits, now, ttl)

    def quota_release(self, token: str, uploader: str | None) -> Deferred[None]:
        # Every store that is up: the hold may have been taken on either side of an outage.
        routes = self._routes()
        if not routes:
            return fail(StoreUnavailable("no metadata store is available"))
        calls = [b.call("quota_release", token, uploader) for b in routes]
        return Deferred.fromCoroutine(_anySucceeded(calls))

    def quota_usage(self, uploader: str | None, now: float) -> Deferred[Any]:
        return self._first("quota_usage", uploader, now)

    def quota_uploaders(self, now: float) -> Deferred[list[tuple[str, int, int]]]:
        return self._first("quota_uploaders", now)

    def quota_reset(self, uploader: str, now: float) -> Deferred[None]:
        return self._first("quota_reset", uploader, now)

    def quota_rebuild(self, now: float) -> Deferred[None]:
        return self._first("quota_rebuild", now)

    # The admin commands' (hmacd.admin).  A takedown goes to every store that is up, so
    # that the fallback knows it too should the primary go down; reads take the first.

    def scan(self, cursor: str, limit: int) -> Deferred[tuple[list[FileRecord], str | None]]:
        """
        The primary's records, then the fallback's (those written during an outage and not
        yet copied back); the cursor names the store it belongs to.
        """
        backends = self.backends()
        roles = [b.role for b in backends]
        if cursor:
            role, _, inner = cursor.partition(":")
        else:
            role, inner = roles[0], ""
        if role not in roles:
            return fail(ValueError(f"not a cursor of this store: {cursor!r}"))
        at = roles.index(role)
        backend = backends[at]
        if not backend.up and not backend.starting:
            return fail(StoreUnavailable(f"the {role} store is down"))

        def page(result: tuple[list[FileRecord], str | None]) -> Any:
            found, after = result
            if after is not None:
                return found, f"{role}:{after}"
            if at + 1 < len(backends):
                return found, f"{backends[at + 1].role}:"
            return found, None

        return backend.call("scan", inner, limit).addCallback(page)

    def put_takedown(self, takedown: Takedown) -> Deferred[None]:
        routes = self._routes()
        if not routes:
            return fail(StoreUnavailable("no metadata store is available"))
        return Deferred.fromCoroutine(
            _anySucceeded([b.call("put_takedown", takedown) for b in routes])
        )

    def takedown(self, path: str) -> Deferred[Takedown | None]:
        return self._first("takedown", path)

    def denied(self, sha256: str) -> Deferred[Takedown | None]:
        return self._first("denied", sha256)

    def takedowns(self) -> Deferred[list[Takedown]]:
        return self._first("takedowns")

    def lift_takedown(self, path: str) -> Deferred[None]:
        routes = self._routes()
        if not routes:
            return fail(StoreUnavailable("no metadata store is available"))
        return Deferred.fromCoroutine(
            _anySucceeded([b.call("lift_takedown", path) for b in routes])
        )

    def _copyBack(self) -> None:
        """When both stores answer, move what the fallback holds into the primary."""
        if self._copying or self.fallback is None:
            return
        if not (self.primary.up and self.fallback.up):
            return
        self._copying = True
        d = self._copyAll()
        d.addErrback(
            lambda f: log.warn("copy-back to the primary interrupted: {why}", why=_reason(f))
        )
        d.addBoth(lambda _: setattr(self, "_copying", False))

    @inlineCallbacks
    def _copyAll(self):
        copied = 0
        fallback = self.fallback
        while fallback is not None and self.primary.up and fallback.up:
            batch = yield fallback.call("records", self.copyBatch)
            if not batch:
                break
            for record in batch:
                yield self.primary.call("put", record)
                yield fallback.call("delete", record.path)
                copied += 1
        self.copiedBack += copied
        if copied:
            log.info(
                "copied {count} records written during the outage back to {name}",
                count=copied,
                name=self.primary.name,
            )


async def _anySucceeded(results: list[Deferred]) -> None:
    errors = []
    for d in results:
        try:
            await d
        except StoreUnavailable as e:
            errors.append(e)
    if len(errors) == len(results):
        raise errors[0]


async def _settle(results: list[Deferred]) -> None:
    for d in results:
        try:
            await d
        except StoreUnavailable:
            pass
