"""
The Lua scripts of L{hmacd.store.redis.RedisStore}: each write is one
script, so the keys of a record never disagree.
"""

from __future__ import annotations

# KEYS: file hash, expiry zset, files set.  ARGV: path, expires or "",
# then field/value pairs.
_PUT = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
if ARGV[2] == '' then
  redis.call('ZREM', KEYS[2], ARGV[1])
else
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
end
redis.call('SADD', KEYS[3], ARGV[1])
return 1
"""

# KEYS: file hash, expiry zset, files set.  ARGV: path.
_DELETE = """
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""

# KEYS: expiry zset, files set.  ARGV: file key prefix, then paths.  The deletes made
# while one is in flight, in one round trip (see RedisStore.delete).
_DELETE_MANY = """
for i = 2, #ARGV do
  redis.call('DEL', ARGV[1] .. ARGV[i])
  redis.call('ZREM', KEYS[1], ARGV[i])
  redis.call('SREM', KEYS[2], ARGV[i])
end
return 1
"""

# KEYS: expiry zset, files set.  ARGV: file key prefix, now, limit.
# Returns path, fields, path, fields..., each record's fields as one JSON array
# (txredisapi parses a nested reply item by item in Python, which made this call the
# expiry sweep's bound).  An entry whose hash has vanished (evicted, or deleted by
# hand) is dropped on the way.
_EXPIRED = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
local found = {}
for _, path in ipairs(due) do
  local fields = redis.call('HGETALL', ARGV[1] .. path)
  if #fields == 0 then
    redis.call('ZREM', KEYS[1], path)
    redis.call('SREM', KEYS[2], path)
  else
    found[#found + 1] = path
    found[#found + 1] = cjson.encode(fields)
  end
end
return found
"""

# KEYS: files set.  ARGV: file key prefix, limit.  Read-only: SRANDMEMBER is
# not deterministic, and old servers refuse writes after it in a script.
_RECORDS = """
local paths = redis.call('SRANDMEMBER', KEYS[1], ARGV[2])
local found = {}
for _, path in ipairs(paths) do
  local fields = redis.call('HGETALL', ARGV[1] .. path)
  if #fields > 0 then
    found[#found + 1] = path
    found[#found + 1] = fields
  end
end
return found
"""

# Shared between nodes (hmacd.store.redis_shared).  Redis expires these keys itself (PX),
# on the server's clock.

# KEYS: the claim or lease key.  ARGV: owner, lease in ms.  Taken if free, extended if the
# owner's already, refused otherwise: SET NX PX, plus the owner's re-claim.
_TAKE = """
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: the claim key.  ARGV: owner, lease in ms.  Only while the owner holds it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""

# KEYS: the claim key.  ARGV: owner.  Only the owner's claim goes.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 1
"""

# KEYS: the bucket.  ARGV: tokens per second, burst.  One token bucket shared by every node
# (RateLimitShared): refill by the time elapsed on the server's clock, take one if there is
# one.  Returns the seconds to wait as text (0: taken); a Lua number reply would be truncated
# to an integer.  The bucket expires once it would be full again anyway.
_TAKE_TOKEN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'last')
local tokens = tonumber(b[1]) or burst
local last = tonumber(b[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = (1 - tokens) / rate
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
           'last', string.format('%.17g', now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate * 1000) + 1000)
return string.format('%.17g', wait)
"""
