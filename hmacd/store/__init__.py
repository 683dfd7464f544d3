"""
File metadata stores: one interface, several databases.

 - L{hmacd.store.sql.SQLStore}: embedded SQLite (the default), PostgreSQL
   (psycopg2) or MySQL/MariaDB (pymysql), through twisted.enterprise.adbapi;
 - L{hmacd.store.redis.RedisStore}: Redis through txredisapi;
 - L{hmacd.store.failover.FailoverStore}: a primary and an optional
   fallback behind timeouts and circuit breakers; what the server uses.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

from hmacd.metadata import FileRecord

__all__ = ["FileRecord", "IMetadataStore", "StoreUnavailable"]


class StoreUnavailable(Exception):
    """The store did not answer (down, timed out, or refusing us)."""


class IMetadataStore(Interface):
    """
    Where file records live.  Every method returns a Deferred; a store that
    cannot answer fails it (any exception; L{StoreUnavailable} for a known
    outage).  Paths are the decoded store paths (UTF-8 text, up to 2048
    bytes); a record's path is its key.
    """

    name = Attribute("Short name for logs and metrics: sqlite, redis, postgres, mysql.")
    quota_accounting = Attribute(
        "Whether put and delete keep the quota figures (hmacd.quota); False unless set."
    )

    def start():
        """Connect and create the schema if needed (idempotent); fires None."""

    def stop():
        """Release connections; fires None."""

    def put(record):
        """Insert C{record}, replacing any record for the same path; fires None."""

    def get(path):
        """Fire the L{FileRecord} for C{path}, or None."""

    def delete(path):
        """Forget C{path} (and its expiry entry); no error if unknown; fires None."""

    def expired(now, limit):
        """Fire up to C{limit} records whose C{expires} is <= C{now}, soonest first."""

    def count_expired(now):
        """Fire how many records have C{expires} <= C{now}: the expiry sweep's backlog."""

    def records(limit):
        """Fire up to C{limit} records, any order (the failover copy-back walks these)."""

    def ping():
        """A cheap round trip to the server; fires None or fails."""

    # What several nodes share.  Expiries are the server's (Redis) or the node's clock (SQL,
    # memory): nodes sharing an SQL store need synchronised clocks.

    def claim(path, owner, lease):
        """
        Fire True if C{owner} now holds C{path} for C{lease} seconds: taken if
        free or expired, re-taken (and extended) if C{owner} already holds it;
        False if someone else does.  Atomic across every node of the store.
        """

    def renew(path, owner, lease):
        """Extend C{owner}'s claim on C{path} to C{lease} seconds; False if it lost it."""

    def release(path, owner):
        """Drop the claim on C{path} if C{owner} holds it (someone else's stays); fires None."""

    def put_state(key, value, ttl):
        """Set the shared text C{value} of C{key} for C{ttl} seconds; fires None."""

    def get_state(key):
        """Fire the text of C{key}, or None if unset or expired."""

    def delete_state(key):
        """Forget C{key}; no error if unknown; fires None."""

    def lease(name, owner, ttl):
        """
        Fire True if C{owner} now holds the lease C{name} for C{ttl} seconds
        (one holder at a time; its holder renews by calling again), else False.
        """

    # Quotas (hmacd.quota): figures the store keeps itself, per uploader and in all.

    def quota_reserve(token, uploader, size, limits, now, ttl):
        """
        Fire C{(True, usage)} once C{size} bytes are held for C{uploader} (None: unknown)
        under C{token} until C{now + ttl}, or C{(False, usage)} if that would exceed one
        of C{limits} (a L{hmacd.quota.Limits}); C{usage}, a L{hmacd.quota.Usage}, is what
        was found before.  Atomic across every user of the store.
        """

    def quota_release(token, uploader):
        """Drop the hold C{token}; no error if it is gone; fires None."""

    def quota_usage(uploader, now):
        """Fire the L{hmacd.quota.Usage} of C{uploader} (None: the totals only) at C{now}."""

    def quota_uploaders(now):
        """Fire (uploader, stored, daily) for each uploader with bytes stored or uploaded."""

    def quota_reset(uploader, now):
        """Forget C{uploader}'s daily usage, and count its stored bytes again; fires None."""

    def quota_rebuild(now):
        """Every figure again from the records (holds stay); fires None."""

    # The admin commands' (hmacd.admin): a walk over every record, and the takedowns
    # (hmacd.takedown.Takedown), which never expire.

    def scan(cursor, limit):
        """
        Fire (records, next cursor): about C{limit} records after C{cursor} (C{""} to
        begin) and the cursor to go on from, None once the walk is done.  A record present
        for the whole walk comes at least once (twice, rarely, from Redis).
        """

    def put_takedown(takedown):
        """Keep the L{hmacd.takedown.Takedown} for good, replacing any for its path; fires None."""

    def takedown(path):
        """Fire the takedown of C{path}, or None."""

    def denied(sha256):
        """Fire a takedown of the content whose hex SHA-256 is C{sha256}, or None."""

    def takedowns():
        """Fire every takedown (a list)."""

    def lift_takedown(path):
        """Forget the takedown of C{path}; no error if there is none; fires None."""
