"""
File records in Redis, through txredisapi.

Layout, every key under one prefix (C{hmacfs:} by default):

 - C{<prefix>file:<path>}: a hash per file with string fields C{size},
   C{content_type}, C{sha256}, C{created}, C{protocol}, and C{uploader} and
   C{expires} only when set; floats are stored as C{repr()} so they come
   back bit for bit;
 - C{<prefix>expiry}: a sorted set of the paths that expire, scored by
   C{expires}, for the sweep;
 - C{<prefix>files}: a set of every path, for L{RedisStore.records}.

Every write is one Lua script, so the three never disagree, and a deadline
cannot strand a half-sent MULTI on a pooled connection.  The scripts that
read several files build the hash keys from the prefix, which is fine on one
server and would not be on a Redis Cluster (not supported).

txredisapi with reconnect=True never fails a command while it has no
connection: the command waits, for ever if the server is dead or hung.  So
every call here has a deadline, and an outage is always L{StoreUnavailable}
with a one-line reason.  Its pool also gives up reconnecting for good when
AUTH or SELECT fails on a new connection, even for a transient reason such as
the connection dropping mid-handshake (txredisapi issue #146): we therefore
give it neither a password nor a database and do both ourselves in
L{_StoreProtocol.connectionMade}, where a failure drops that one connection
and the pool tries again with its usual backoff.

txredisapi imports the global reactor (for its reconnect timers); that import
stays behind this module.

The Lua scripts are in L{hmacd.store.redis_scripts}, the connection pool in
L{hmacd.store.redis_connection}; what nodes share
(claims, leases, state) in L{hmacd.store.redis_shared}.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import txredisapi
from twisted.internet import defer
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from hmacd.address import HostPort
from hmacd.batch import Batcher
from hmacd.store import FileRecord, IMetadataStore, StoreUnavailable
from hmacd.store.redis_admin import AdminRedis
from hmacd.store.redis_connection import (
    _connect_failure,
    _one_line,
    _ReportingEndpoint,
    _StoreFactory,
)
from hmacd.store.redis_quota import DELETE_COUNTED, PUT_COUNTED, QuotaRedis
from hmacd.store.redis_scripts import _DELETE, _DELETE_MANY, _EXPIRED, _PUT, _RECORDS
from hmacd.store.redis_shared import SharedRedis

__all__ = ["RedisStore", "parse_redis_addr"]

log = Logger()


def parse_redis_addr(addr: str) -> HostPort:
    """C{"host:port"} or C{"[::1]:port"} (the RedisAddr forms) as (host, port)."""
    try:
        return HostPort.parse(addr)
    except ValueError:
        raise ValueError(
            f'not a Redis address like "host:6379" or "[::1]:6379": {addr!r}'
        ) from None


def _record(path: bytes, flat: list[bytes]) -> FileRecord:
    fields = {
        name.decode("utf-8"): value.decode("utf-8")
        for name, value in zip(flat[::2], flat[1::2], strict=True)
    }
    return FileRecord.from_fields(path.decode("utf-8"), fields)


def _packed_records(reply: list[Any]) -> list[FileRecord]:
    """Records from path, JSON array of fields, path, JSON array of fields..."""
    return [
        _record(path, [field.encode("utf-8") for field in json.loads(packed)])
        for path, packed in zip(reply[::2], reply[1::2], strict=True)
    ]


def _records(reply: list[Any]) -> list[FileRecord]:
    return [_record(path, flat) for path, flat in zip(reply[::2], reply[1::2], strict=True)]


@implementer(IMetadataStore)
class RedisStore(SharedRedis, AdminRedis, QuotaRedis):
    """
    File records in Redis (see the module docstring for the keys).

    Every call fails with L{StoreUnavailable} after C{timeout} seconds without
    an answer, or at once on a lost connection or an error reply.  A store
    whose start() failed keeps trying to connect in the background: calling
    start() again (or ping()) tells when the server is back; stop() ends it.
    """

    name = "redis"

    def __init__(
        self,
        host: str,
        port: int,
        password: str | None = None,
        dbid: int = 0,
        reactor: Any = None,
        prefix: str = "hmacfs:",
        timeout: float = 2.0,
        connect_timeout: float = 5.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        self.host = host
        self.port = port
        self.password = password or None
        self.dbid = dbid or 0
        self.reactor = reactor
        self.prefix = prefix
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.where = str(HostPort(host, port))
        raw = prefix.encode("utf-8")
        self._filePrefix = raw + b"file:"
        self._expiryKey = raw + b"expiry"
        self._filesKey = raw + b"files"
        self._factory: _StoreFactory | None = None
        # Deletes made while one is in flight wait for it and go together (see delete).
        self._deletes: Batcher[str, None] = Batcher(self._deleteMany)
        self._persistenceChecked = False
        self._waiting: list[Deferred[None]] = []
        self._lastError: str | None = None
        self._up = False

    @classmethod
    def from_config(cls, config: Any, reactor: Any = None) -> RedisStore:
        """The store for C{RedisAddr}, C{RedisPassword} and C{RedisDB}."""
        address = config.redis_address
        if address is None:
            raise ValueError("RedisAddr is not set")
        return cls(
            address.host,
            address.port,
            password=config.redis_password or None,
            dbid=config.redis_db,
            reactor=reactor,
        )

    def __repr__(self) -> str:
        return f"<RedisStore {self.where} db {self.dbid} prefix {self.prefix!r}>"

    # -- connection --------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        Connect and PING, within C{connect_timeout + timeout} seconds; a
        refused connection or a rejected password fails at once.
        """
        if self._factory is None:
            factory = self._factory = _StoreFactory(self)
            endpoint = HostnameEndpoint(
                self.reactor, self.host, self.port, timeout=self.connect_timeout
            )
            factory.startConnecting(
                _ReportingEndpoint(
                    endpoint,
                    lambda f: self._connectionFailed(
                        factory, _connect_failure(f.value, self.connect_timeout)
                    ),
                )
            )
        d = self._whenConnected()
        d.addCallback(lambda _: self.ping())
        d.addTimeout(self.connect_timeout + self.timeout, self.reactor)
        d.addCallback(lambda _: self._checkPersistence())

        def failed(failure: Failure) -> Failure:
            if failure.check(defer.TimeoutError):
                raise StoreUnavailable(
                    self._scrub(
                        f"redis {self.where}: no connection within "
                        f"{self.connect_timeout + self.timeout:g} s{self._why()}"
                    )
                )
            return failure

        return d.addErrback(failed)

    def _checkPersistence(self) -> Deferred[None]:
        """
        Warn once if the server keeps nothing on disk: restarted, it would
        come back empty, and every record with it (the files stay, served
        with a guessed type and never expired).  Servers that refuse CONFIG
        are left alone.
        """
        if self._persistenceChecked:
            return succeed(None)
        self._persistenceChecked = True
        d = self._call("CONFIG GET", "execute_command", "CONFIG", "GET", "*")

        def judge(reply) -> None:
            items = reply if isinstance(reply, list) else []
            config = {
                (k.decode() if isinstance(k, bytes) else str(k)): (
                    v.decode() if isinstance(v, bytes) else str(v)
                )
                for k, v in zip(items[::2], items[1::2], strict=False)
            }
            if config.get("appendonly") == "no" and not config.get("save", "x").strip():
                log.warn(
                    'redis {where} keeps nothing on disk (appendonly no, save ""): '
                    "a restart of it loses every file record",
                    where=self.where,
                )

        return d.addCallbacks(judge, lambda _: None)

    def stop(self) -> Deferred[None]:
        """Close the connections and stop reconnecting; fine if never started."""
        factory, self._factory = self._factory, None
        self._up = False
        self._fireWaiting(StoreUnavailable(f"redis {self.where}: stopped"))
        if factory is None:
            return succeed(None)
        d = factory.disconnect()
        d.addTimeout(self.timeout, self.reactor)

        def abandon(failure: Failure) -> None:
            # A connection that will not close politely is cut.
            for conn in list(factory.pool):
                conn.transport.abortConnection()
            log.warn(
                "redis {where}: connections did not close: {why}",
                where=self.where,
                why=failure.getErrorMessage(),
            )

        return d.addCallbacks(lambda _: None, abandon)

    def _whenConnected(self) -> Deferred[None]:
        """Fires once a connection is ready, fails at the next failed attempt."""
        factory = self._factory
        if factory is not None and factory.size > 0:
            return succeed(None)

        def cancel(d: Deferred[None]) -> None:
            if d in self._waiting:
                self._waiting.remove(d)

        d: Deferred[None] = Deferred(cancel)
        self._waiting.append(d)
        return d

    def _fireWaiting(self, result: Exception | None) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            if result is None:
                d.callback(None)
            else:
                d.errback(result)

    def _connectionReady(self, factory: _StoreFactory) -> None:
        if factory is not self._factory:
            return
        self._lastError = None
        if not self._up:
            self._up = True
            log.info("redis {where}: connected (db {db})", where=self.where, db=self.dbid)
        # txredisapi adds the connection to its pool one reactor turn later;
        # a command sent now waits for it.
        self._fireWaiting(None)

    def _connectionFailed(self, factory: _StoreFactory, reason: str) -> None:
        if factory is not self._factory:
            return
        reason = self._scrub(reason)
        if reason != self._lastError:
            log.warn("redis {where}: {reason}", where=self.where, reason=reason)
        self._lastError = reason
        self._fireWaiting(StoreUnavailable(f"redis {self.where}: {reason}"))

    def _connectionLost(self, factory: _StoreFactory) -> None:
        if factory is self._factory and self._up and factory.size == 0:
            self._up = False
            log.warn("redis {where}: connection lost; reconnecting", where=self.where)

    def _scrub(self, text: str) -> str:
        # Belt and braces: no message of ours quotes the password, and no
        # server reply should either.
        if self.password and len(self.password) >= 4:
            text = text.replace(self.password, "***")
        return text

    def _why(self) -> str:
        factory = self._factory
        if factory is not None and factory.size > 0:
            return ""
        if self._lastError:
            return f" (not connected: {self._lastError})"
        return " (not connected)"

    # -- calls -------------------------------------------------------------------------------

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Deferred[Any]:
        """C{method(*args)} on the pool, within the deadline; outages are StoreUnavailable."""
        factory = self._factory
        if factory is None:
            return fail(StoreUnavailable(f"redis {self.where}: not started"))
        try:
            d = getattr(factory.handler, method)(*args, **kwargs)
        except Exception:
            return fail()
        d.addTimeout(self.timeout, self.reactor)

        def failed(failure: Failure) -> Failure:
            if failure.check(defer.TimeoutError):
                reason = f"no answer to {what} within {self.timeout:g} s{self._why()}"
            elif failure.check(txredisapi.ConnectionError, txredisapi.ResponseError):
                reason = f"{what}: {_one_line(failure.getErrorMessage())}"
            else:
                return failure
            raise StoreUnavailable(self._scrub(f"redis {self.where}: {reason}"))

        return d.addErrback(failed)

    def _fileKey(self, path: str) -> bytes:
        return self._filePrefix + path.encode("utf-8")

    def ping(self) -> Deferred[None]:
        """PING, within the deadline."""
        return self._call("PING", "execute_command", "PING").addCallback(lambda _: None)

    def put(self, record: FileRecord) -> Deferred[None]:
        """Replace the record for its path, and its expiry entry, atomically."""
        fields = record.to_strings()
        expires = fields.get("expires", "")
        keys = [self._fileKey(record.path), self._expiryKey, self._filesKey]
        args = [
            record.path.encode("utf-8"),
            expires,
            *(text.encode("utf-8") for pair in fields.items() for text in pair),
        ]
        if self.quota_accounting:
            # The same, and the quota figures in the same script (hmacd.store.redis_quota).
            keys += self._quotaKeys()
            figures = self._putArgs(record.uploader, record.size, record.created)
            d = self._call("put", "eval", PUT_COUNTED, keys, [*args[:2], *figures, *args[2:]])
        else:
            d = self._call("put", "eval", _PUT, keys, args)
        return d.addCallback(lambda _: None)

    def get(self, path: str) -> Deferred[FileRecord | None]:
        """The record for C{path}, or None."""
        d = self._call("get", "execute_command", "HGETALL", self._fileKey(path))

        def found(flat: list[bytes]) -> FileRecord | None:
            return _record(path.encode("utf-8"), flat) if flat else None

        return d.addCallback(found)

    def delete(self, path: str) -> Deferred[None]:
        """
        Forget C{path} and its expiry entry; no error if unknown.

        Deletes made while others are in flight wait and go together, in one script: the
        expiry sweep deletes hundreds at once, and a round trip each cost the reactor
        thread about half a millisecond apiece in txredisapi.
        """
        return self._deletes.submit(path)

    def _deleteMany(self, batch: list[str]) -> Deferred[Sequence[Failure | None]]:
        """The deletes a L{Batcher} gathered, in one script; they succeed or fail together."""
        if self.quota_accounting:
            args = [self._filePrefix, *(path.encode("utf-8") for path in batch)]
            keys = [self._expiryKey, self._filesKey, *self._quotaKeys()]
            done = self._call("delete", "eval", DELETE_COUNTED, keys, args)
        elif len(batch) == 1:
            keys = [self._fileKey(batch[0]), self._expiryKey, self._filesKey]
            done = self._call("delete", "eval", _DELETE, keys, [batch[0].encode("utf-8")])
        else:
            args = [self._filePrefix, *(path.encode("utf-8") for path in batch)]
            keys = [self._expiryKey, self._filesKey]
            done = self._call("delete", "eval", _DELETE_MANY, keys, args)
        return done.addCallback(lambda _: [None] * len(batch))

    def expired(self, now: float, limit: int) -> Deferred[list[FileRecord]]:
        """Up to C{limit} records with C{expires <= now}, soonest first."""
        if limit <= 0:
            return succeed([])
        keys = [self._expiryKey, self._filesKey]
        args = [self._filePrefix, repr(float(now)), str(int(limit))]
        return self._call("expired", "eval", _EXPIRED, keys, args).addCallback(_packed_records)

    def count_expired(self, now: float) -> Deferred[int]:
        """How many paths expire at or before C{now}: ZCOUNT, O(log n)."""
        d = self._call(
            "count_expired", "execute_command", "ZCOUNT", self._expiryKey, "-inf", repr(float(now))
        )
        return d.addCallback(int)

    def records(self, limit: int) -> Deferred[list[FileRecord]]:
        """Up to C{limit} records, picked at random."""
        if limit <= 0:
            return succeed([])
        args = [self._filePrefix, str(int(limit))]
        return self._call("records", "eval", _RECORDS, [self._filesKey], args).addCallback(_records)
