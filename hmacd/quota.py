"""
Quotas, decided before an upload's body: C{UserQuota} (bytes stored per uploader),
C{UserDailyQuota} (bytes uploaded per uploader in the last 24 hours) and C{GlobalQuota}
(bytes stored in all).

The figures live in the metadata store, which keeps them itself: a store whose
C{quota_accounting} is set adds a record's size to its uploader's and the global usage
when it puts a record for a new path, and takes it away when it deletes one, in the same
transaction (SQL) or script (Redis).  Expiry, takedown and every other deletion release
quota with no caller to remember it.

Before a body is read the upload takes a I{hold}: one atomic check-and-add of its size
against what is stored plus what other uploads hold (L{Quotas.reserve}).  Holds are in the
store, so uploads in other processes (C{Workers}) and on other nodes count; each lapses
after L{HOLD_LIFETIME} seconds, so that a process that dies holding one blocks nobody for
long, and is dropped when its upload ends, either way.

Daily usage is counted in per-hour buckets: "the last 24 hours" are the current hour and
the 23 before it.  Only uploads count towards it; deleting a file does not give it back.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from hmacd.metadata import FileRecord
from hmacd.verdict import Refusal

__all__ = [
    "DAY_HOURS",
    "HOLD_LIFETIME",
    "QUOTA_NAMES",
    "SLOT_UPLOADER_TTL",
    "Limits",
    "QuotaBook",
    "QuotaRefusal",
    "Quotas",
    "Reservation",
    "Usage",
    "describe",
    "describe_limit",
    "exceeded",
    "hour_of",
    "quota_limit",
    "slot_uploader_key",
]

log = Logger()

# The quota names as the configuration spells them: what a 413 and a slot refusal name.
QUOTA_NAMES = ("UserQuota", "UserDailyQuota", "GlobalQuota")

# How many hourly buckets make "a day".
DAY_HOURS = 24

# Seconds the uploader of a slot the component issued (v, v2, token: nothing in the slot
# names it) is kept in the shared store, under slot_uploader_key(path), for the PUT to find.
SLOT_UPLOADER_TTL = 86400.0


def slot_uploader_key(path: str) -> str:
    """The shared-store key of the uploader of the slot for C{path}."""
    return f"uploader:{path}"


# Seconds a hold lasts: longer than most uploads take.  A longer upload still lands (and is
# counted then); only its hold on the quota has lapsed meanwhile.
HOLD_LIFETIME = 3600.0


def hour_of(now: float) -> int:
    """The hourly bucket of the time C{now} (seconds since the epoch)."""
    return math.floor(now / 3600)


@dataclass(frozen=True)
class Limits:
    """The configured quotas, in bytes; 0 is no limit."""

    user: int = 0
    daily: int = 0
    total: int = 0

    def __bool__(self) -> bool:
        return bool(self.user or self.daily or self.total)

    @classmethod
    def from_config(cls, config: Any) -> Limits:
        """The quotas of a L{hmacd.config.Config}."""
        return cls(config.user_quota, config.user_daily_quota, config.global_quota)

    def as_tuple(self) -> tuple[int, int, int]:
        return (self.user, self.daily, self.total)


@dataclass(frozen=True)
class Usage:
    """
    What one uploader (and everyone) uses, in bytes, as a store sees it now.

    @ivar stored: the uploader's stored files.
    @ivar daily: what the uploader uploaded in the last L{DAY_HOURS} hours.
    @ivar total: every stored file.
    @ivar held: the uploader's holds (uploads in progress).
    @ivar held_total: everyone's holds.
    """

    stored: int = 0
    daily: int = 0
    total: int = 0
    held: int = 0
    held_total: int = 0


def exceeded(limits: Limits, usage: Usage, uploader: str | None, size: int) -> str | None:
    """
    The name of the first quota an upload of C{size} bytes by C{uploader} would exceed,
    or None.  An unknown uploader is held to L{Limits.total} only.
    """
    if uploader is not None:
        if limits.user and usage.stored + usage.held + size > limits.user:
            return "UserQuota"
        if limits.daily and usage.daily + usage.held + size > limits.daily:
            return "UserDailyQuota"
    if limits.total and usage.total + usage.held_total + size > limits.total:
        return "GlobalQuota"
    return None


def describe(name: str, limits: Limits, usage: Usage, size: int) -> str:
    """The reason given to the client: the quota, its limit, what is used, the upload."""
    limit, used = {
        "UserQuota": (limits.user, usage.stored + usage.held),
        "UserDailyQuota": (limits.daily, usage.daily + usage.held),
        "GlobalQuota": (limits.total, usage.total + usage.held_total),
    }[name]
    return f"{name} exceeded: {used} of {limit} bytes used, this upload is {size} bytes"


def quota_limit(name: str, limits: Limits) -> int:
    """The limit of the quota called C{name}."""
    return {"UserQuota": limits.user, "UserDailyQuota": limits.daily, "GlobalQuota": limits.total}[
        name
    ]


def describe_limit(name: str, limits: Limits) -> str:
    """The limit of the quota called C{name}, as text: C{"1500 bytes"} or C{"no limit"}."""
    limit = quota_limit(name, limits)
    return f"{limit} bytes" if limit else "no limit"


@dataclass(frozen=True)
class QuotaRefusal(Refusal):
    """A 413 for a quota: counts as C{reason="quota"}, not C{"too_large"}."""

    quota: str = ""


class QuotaBook:
    """
    The quota figures of a store that keeps them in memory (L{hmacd.store.memory}), and the
    reference the others are tested against: the same rules, in plain Python.
    """

    def __init__(self) -> None:
        self.stored: dict[str, int] = {}
        self.total = 0
        # (uploader, hour) -> bytes uploaded
        self.days: dict[tuple[str, int], int] = {}
        # token -> (uploader, size, expiry)
        self.holds: dict[str, tuple[str | None, int, float]] = {}

    def added(self, old: FileRecord | None, new: FileRecord) -> None:
        """C{new} was put where C{old} (or nothing) was."""
        if old is not None:
            self.removed(old)
        self._add(new.uploader, new.size)
        if old is None and new.uploader is not None:
            key = (new.uploader, hour_of(new.created))
            self.days[key] = self.days.get(key, 0) + new.size

    def removed(self, old: FileRecord) -> None:
        """C{old} was deleted."""
        self._add(old.uploader, -old.size)

    def _add(self, uploader: str | None, size: int) -> None:
        self.total += size
        if uploader is not None:
            self.stored[uploader] = self.stored.get(uploader, 0) + size

    def usage(self, uploader: str | None, now: float) -> Usage:
        """The figures an upload by C{uploader} at C{now} is judged on."""
        live = [(who, size) for who, size, expiry in self.holds.values() if expiry > now]
        first = hour_of(now) - DAY_HOURS + 1
        return Usage(
            stored=self.stored.get(uploader, 0) if uploader is not None else 0,
            daily=sum(b for (who, h), b in self.days.items() if who == uploader and h >= first),
            total=self.total,
            held=sum(size for who, size in live if uploader is not None and who == uploader),
            held_total=sum(size for _, size in live),
        )

    def reserve(
        self, token: str, uploader: str | None, size: int, limits: Limits, now: float, ttl: float
    ) -> tuple[bool, Usage]:
        """Hold C{size} bytes for C{uploader} unless a quota would be exceeded."""
        self.holds = {k: v for k, v in self.holds.items() if v[2] > now}
        usage = self.usage(uploader, now)
        if exceeded(limits, usage, uploader, size) is not None:
            return False, usage
        self.holds[token] = (uploader, size, now + ttl)
        return True, usage

    def reset(self, uploader: str, stored: int) -> None:
        """Forget C{uploader}'s daily usage; its stored bytes are C{stored}."""
        self.days = {k: v for k, v in self.days.items() if k[0] != uploader}
        self.stored[uploader] = stored

    def rebuild(self, records: Iterable[FileRecord], now: float) -> None:
        """Every figure again, from C{records}; holds stay."""
        self.stored, self.total, self.days = {}, 0, {}
        first = hour_of(now) - DAY_HOURS + 1
        for record in records:
            self._add(record.uploader, record.size)
            hour = hour_of(record.created)
            if record.uploader is not None and hour >= first:
                key = (record.uploader, hour)
                self.days[key] = self.days.get(key, 0) + record.size

    def uploaders(self, now: float) -> list[tuple[str, int, int]]:
        """(uploader, stored, daily) of every uploader with something stored or uploaded."""
        names = set(self.stored) | {who for who, _ in self.days}
        return sorted(
            (who, self.stored.get(who, 0), self.usage(who, now).daily)
            for who in names
            if self.stored.get(who, 0) or self.usage(who, now).daily
        )


class Reservation:
    """One upload's hold on the quotas, until L{release}."""

    def __init__(self, quotas: Quotas, token: str, uploader: str | None) -> None:
        self._quotas = quotas
        self.token = token
        self.uploader = uploader
        self.held = True

    def release(self) -> None:
        """Drop the hold (idempotent; from any thread: the store is asked from the reactor)."""
        if not self.held:
            return
        self.held = False
        if threading.get_ident() == self._quotas.thread:
            self._quotas._drop(self)
        else:
            self._quotas.reactor.callFromThread(self._quotas._drop, self)


@dataclass
class Quotas:
    """
    The quotas of one server, asked of its metadata C{store} (a FailoverStore).

    Built in the reactor thread: a hold released in another thread is dropped from there.
    """

    limits: Limits
    store: Any
    reactor: Any
    lifetime: float = HOLD_LIFETIME
    thread: int = field(default_factory=threading.get_ident)

    def reserve(self, uploader: str | None, size: int) -> Deferred[Reservation | QuotaRefusal]:
        """
        Hold C{size} bytes for C{uploader}: fires the L{Reservation}, or the 413 naming the
        quota that would be exceeded; fails as the store does.
        """
        token = secrets.token_hex(12)
        now = self.reactor.seconds()

        def answered(result: tuple[bool, Usage]) -> Reservation | QuotaRefusal:
            reserved, usage = result
            if reserved:
                return Reservation(self, token, uploader)
            return self.refusal(uploader, usage, size)

        d: Deferred[tuple[bool, Usage]] = self.store.quota_reserve(
            token, uploader, size, self.limits, now, self.lifetime
        )
        return d.addCallback(answered)

    def check(self, uploader: str | None, size: int) -> Deferred[str | None]:
        """
        Fires the name of the quota an upload of C{size} bytes by C{uploader} would exceed
        now, or None; nothing is held (the slot component asks this).
        """
        d: Deferred[Usage] = self.store.quota_usage(uploader, self.reactor.seconds())
        return d.addCallback(lambda usage: exceeded(self.limits, usage, uploader, size))

    def refusal(self, uploader: str | None, usage: Usage, size: int) -> QuotaRefusal:
        """The 413 for an upload of C{size} bytes that C{usage} leaves no room for."""
        name = exceeded(self.limits, usage, uploader, size) or "GlobalQuota"
        return QuotaRefusal(413, describe(name, self.limits, usage, size), quota=name)

    def _drop(self, reservation: Reservation) -> None:
        d = self.store.quota_release(reservation.token, reservation.uploader)
        # It lapses by itself: a failure costs the uploader some room for an hour at most.
        d.addErrback(lambda f: log.warn("dropping a quota hold failed: {why}", why=f.value))
