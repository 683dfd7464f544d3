"""
The quota figures of a Redis store (L{hmacd.store.redis.RedisStore}; see L{hmacd.quota}),
under the store's prefix:

 - C{<prefix>quota:total}: the bytes of every stored file;
 - C{<prefix>quota:stored}: a hash, uploader -> the bytes of its stored files;
 - C{<prefix>quota:day:<uploader>}: a hash, hour -> what the uploader uploaded in it
   (the key expires a day after its last upload);
 - C{<prefix>quota:holds}: a sorted set of the holds (tokens) by expiry, with
   C{<prefix>quota:holdsize} and C{<prefix>quota:holdwho}: token -> size, uploader.

Every change is one Lua script, so it is atomic across every process and node: a put and a
delete change the figures in the same script as the record (L{PUT_COUNTED},
L{DELETE_COUNTED}), and a hold is checked and taken in one (L{RESERVE}).  Times are this
node's clock, as for the SQL stores: nodes need synchronised clocks.

Numbers go to Redis through C{string.format('%d')}: Lua would write a large one as
C{1e+14}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from hmacd.quota import DAY_HOURS, Limits, Usage, hour_of

__all__ = ["DELETE_COUNTED", "PUT_COUNTED", "QuotaRedis"]

# How long a day's buckets outlive the last upload in them (ms): a day and an hour.
_DAY_TTL_MS = str((DAY_HOURS + 1) * 3600 * 1000)

# KEYS: file hash, expiry zset, files set, total, stored.  ARGV: path, expires or "", size,
# "1" if there is an uploader else "0", uploader, day key prefix, hour, day ttl (ms), then
# field/value pairs.  _PUT, and the figures: the old record's size out, the new one's in,
# and the uploader's day counts a new path only.
PUT_COUNTED = """
local old = redis.call('HMGET', KEYS[1], 'size', 'uploader')
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
if ARGV[2] == '' then
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
end
redis.call('SADD', KEYS[3], ARGV[1])
if old[1] then
  local gone = string.format('%d', -tonumber(old[1]))
  redis.call('INCRBY', KEYS[4], gone)
  if old[2] then redis.call('HINCRBY', KEYS[5], old[2], gone) end
end
redis.call('INCRBY', KEYS[4], ARGV[3])
if ARGV[4] == '1' then
  redis.call('HINCRBY', KEYS[5], ARGV[5], ARGV[3])
  if not old[1] then
    local day = ARGV[6] .. ARGV[5]
    redis.call('HINCRBY', day, ARGV[7], ARGV[3])
    redis.call('PEXPIRE', day, ARGV[8])
  end
end
return 1
"""

# KEYS: expiry zset, files set, total, stored.  ARGV: file key prefix, then paths.
DELETE_COUNTED = """
for i = 2, #ARGV do
  local key = ARGV[1] .. ARGV[i]
  local old = redis.call('HMGET', key, 'size', 'uploader')
  if old[1] then
    local gone = string.format('%d', -tonumber(old[1]))
    redis.call('INCRBY', KEYS[3], gone)
    if old[2] then redis.call('HINCRBY', KEYS[4], old[2], gone) end
  end
  redis.call('DEL', key)
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('SREM', KEYS[2], ARGV[i])
end
return 1
"""

# KEYS: total, stored, holds, holdsize, holdwho, the uploader's day hash.  ARGV: token,
# "1" if there is an uploader else "0", uploader, size, user limit, daily limit, total
# limit, now, the hold's expiry, first hour of the day, "1" to take the hold else "0".
# Returns ok, stored, daily, total, held, held_total (ok: 1 held or only asked, 0 refused).
RESERVE = """
local now = tonumber(ARGV[8])
local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[8])
for _, t in ipairs(gone) do
  redis.call('HDEL', KEYS[4], t)
  redis.call('HDEL', KEYS[5], t)
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[8])
local mine = ARGV[2] == '1'
local total = tonumber(redis.call('GET', KEYS[1]) or '0')
local held, held_total = 0, 0
for _, t in ipairs(redis.call('ZRANGE', KEYS[3], 0, -1)) do
  local s = tonumber(redis.call('HGET', KEYS[4], t) or '0')
  held_total = held_total + s
  if mine and redis.call('HGET', KEYS[5], t) == ARGV[3] then held = held + s end
end
local stored, daily = 0, 0
if mine then
  stored = tonumber(redis.call('HGET', KEYS[2], ARGV[3]) or '0')
  local hours = redis.call('HGETALL', KEYS[6])
  local first = tonumber(ARGV[10])
  for i = 1, #hours, 2 do
    if tonumber(hours[i]) >= first then daily = daily + tonumber(hours[i + 1]) end
  end
end
local size = tonumber(ARGV[4])
local user, day, all = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local ok = 1
if mine and user > 0 and stored + held + size > user then ok = 0 end
if mine and day > 0 and daily + held + size > day then ok = 0 end
if all > 0 and total + held_total + size > all then ok = 0 end
if ok == 1 and ARGV[11] == '1' then
  redis.call('ZADD', KEYS[3], ARGV[9], ARGV[1])
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[4])
  if mine then redis.call('HSET', KEYS[5], ARGV[1], ARGV[3]) end
end
local f = function(n) return string.format('%d', n) end
return {ok, f(stored), f(daily), f(total), f(held), f(held_total)}
"""

# KEYS: holds, holdsize, holdwho.  ARGV: token.
RELEASE = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""

# KEYS: files, total, stored.  ARGV: file key prefix, day key prefix, first hour of the day,
# day ttl (ms), "*" for every uploader (rebuild) or "=" for one (reset), the uploader.
# Rebuild: every figure again from the records, the days included.  Reset: the uploader's
# stored bytes again from the records, and its day forgotten.
RECOUNT = """
local every = ARGV[5] == '*'
local first = tonumber(ARGV[3])
local total, stored, days = 0, {}, {}
for _, path in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local f = redis.call('HMGET', ARGV[1] .. path, 'size', 'uploader', 'created')
  if f[1] then
    local s = tonumber(f[1])
    total = total + s
    if f[2] and (every or f[2] == ARGV[6]) then
      stored[f[2]] = (stored[f[2]] or 0) + s
      local h = math.floor(tonumber(f[3]) / 3600)
      if every and h >= first then
        days[f[2]] = days[f[2]] or {}
        days[f[2]][h] = (days[f[2]][h] or 0) + s
      end
    end
  end
end
if not every then
  redis.call('HSET', KEYS[3], ARGV[6], string.format('%d', stored[ARGV[6]] or 0))
  redis.call('DEL', ARGV[2] .. ARGV[6])
  return 1
end
local known = redis.call('HKEYS', KEYS[3])
for _, who in ipairs(known) do redis.call('DEL', ARGV[2] .. who) end
redis.call('DEL', KEYS[3])
redis.call('SET', KEYS[2], string.format('%d', total))
for who, s in pairs(stored) do redis.call('HSET', KEYS[3], who, string.format('%d', s)) end
for who, hours in pairs(days) do
  for h, s in pairs(hours) do
    redis.call('HSET', ARGV[2] .. who, string.format('%d', h), string.format('%d', s))
  end
  redis.call('PEXPIRE', ARGV[2] .. who, ARGV[4])
end
return 1
"""

# KEYS: stored.  ARGV: day key prefix, first hour.  Returns uploader, stored, daily, ...
UPLOADERS = """
local found = {}
local first = tonumber(ARGV[2])
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local daily = 0
  local hours = redis.call('HGETALL', ARGV[1] .. all[i])
  for j = 1, #hours, 2 do
    if tonumber(hours[j]) >= first then daily = daily + tonumber(hours[j + 1]) end
  end
  found[#found + 1] = all[i]
  found[#found + 1] = all[i + 1]
  found[#found + 1] = string.format('%d', daily)
end
return found
"""


class QuotaRedis:
    """The quota methods of IMetadataStore for L{RedisStore}: it provides C{_call}, C{prefix}."""

    prefix: str
    quota_accounting = False

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Deferred[Any]:
        raise NotImplementedError

    def _quotaKey(self, name: str) -> bytes:
        return f"{self.prefix}quota:{name}".encode()

    def _quotaKeys(self) -> tuple[bytes, bytes]:
        """The total and the stored hash: what a counted put or delete changes."""
        return self._quotaKey("total"), self._quotaKey("stored")

    def _dayPrefix(self) -> bytes:
        return self._quotaKey("day:")

    def _putArgs(self, uploader: str | None, size: int, created: float) -> list[Any]:
        """The ARGV of L{PUT_COUNTED} after the path and the expiry."""
        return [
            str(int(size)),
            "0" if uploader is None else "1",
            (uploader or "").encode("utf-8"),
            self._dayPrefix(),
            str(hour_of(created)),
            _DAY_TTL_MS,
        ]

    def _ask(
        self,
        token: str,
        uploader: str | None,
        size: int,
        limits: Limits,
        now: float,
        ttl: float,
        take: bool,
    ) -> Deferred[tuple[bool, Usage]]:
        keys = [
            self._quotaKey("total"),
            self._quotaKey("stored"),
            self._quotaKey("holds"),
            self._quotaKey("holdsize"),
            self._quotaKey("holdwho"),
            self._dayPrefix() + (uploader or "").encode("utf-8"),
        ]
        args = [
            token,
            "0" if uploader is None else "1",
            (uploader or "").encode("utf-8"),
            str(int(size)),
            *(str(int(n)) for n in limits.as_tuple()),
            repr(float(now)),
            repr(float(now + ttl)),
            str(hour_of(now) - DAY_HOURS + 1),
            "1" if take else "0",
        ]
        d = self._call("quota", "eval", RESERVE, keys, args)

        def answered(reply: list[Any]) -> tuple[bool, Usage]:
            ok, *figures = (int(x) for x in reply)
            return ok == 1, Usage(*figures)

        return d.addCallback(answered)

    def quota_reserve(
        self, token: str, uploader: str | None, size: int, limits: Limits, now: float, ttl: float
    ) -> Deferred[tuple[bool, Usage]]:
        """Hold C{size} bytes for C{uploader} unless it would exceed one of C{limits}."""
        return self._ask(token, uploader, size, limits, now, ttl, True)

    def quota_release(self, token: str, uploader: str | None) -> Deferred[None]:
        """Drop the hold C{token}; no error if it is gone."""
        keys = [self._quotaKey(n) for n in ("holds", "holdsize", "holdwho")]
        d = self._call("quota release", "eval", RELEASE, keys, [token])
        return d.addCallback(lambda _: None)

    def quota_usage(self, uploader: str | None, now: float) -> Deferred[Usage]:
        """What C{uploader} (and everyone) uses now."""
        d = self._ask("", uploader, 0, Limits(), now, 0, False)
        return d.addCallback(lambda result: result[1])

    def quota_uploaders(self, now: float) -> Deferred[list[tuple[str, int, int]]]:
        """(uploader, stored, daily) of every uploader with something stored or uploaded."""
        args = [self._dayPrefix(), str(hour_of(now) - DAY_HOURS + 1)]
        d = self._call("quota", "eval", UPLOADERS, [self._quotaKey("stored")], args)

        def table(flat: list[Any]) -> list[tuple[str, int, int]]:
            rows = []
            for i in range(0, len(flat), 3):
                who = flat[i].decode("utf-8") if isinstance(flat[i], bytes) else str(flat[i])
                stored, daily = int(flat[i + 1]), int(flat[i + 2])
                if stored or daily:
                    rows.append((who, stored, daily))
            return sorted(rows)

        return d.addCallback(table)

    def _recount(self, every: bool, uploader: str, now: float) -> Deferred[None]:
        keys = [self._filesKey, self._quotaKey("total"), self._quotaKey("stored")]
        args = [
            self._filePrefix,
            self._dayPrefix(),
            str(hour_of(now) - DAY_HOURS + 1),
            _DAY_TTL_MS,
            "*" if every else "=",
            uploader.encode("utf-8"),
        ]
        d = self._call("quota", "eval", RECOUNT, keys, args)
        return d.addCallback(lambda _: None)

    def quota_reset(self, uploader: str, now: float) -> Deferred[None]:
        """Forget C{uploader}'s daily usage, and count its stored bytes again from the records."""
        return self._recount(False, uploader, now)

    def quota_rebuild(self, now: float) -> Deferred[None]:
        """
        Every figure again from the records, in one script: Redis serves nothing else while
        it walks them (about a second per million files).
        """
        return self._recount(True, "", now)

    _filesKey: bytes
    _filePrefix: bytes
