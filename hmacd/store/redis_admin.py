"""
What the admin commands need of Redis (L{hmacd.store.redis.RedisStore}): a walk over
every record in pages, and the takedowns, under the store's prefix:

 - C{<prefix>takedowns}: a hash, path -> the takedown as JSON (L{Takedown.to_json});
 - C{<prefix>denied}: a hash, SHA-256 -> the path of its takedown.

Neither expires.  The walk is SSCAN over C{<prefix>files}: a record present for the
whole walk comes at least once, and (Redis's promise for SCAN) may come twice when the
set is resized meanwhile.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed

from hmacd.metadata import FileRecord
from hmacd.takedown import Takedown

__all__ = ["AdminRedis"]

# KEYS: files set.  ARGV: file key prefix, cursor, count.  Returns the next cursor, then
# path, fields (a JSON array), path, fields...  Read-only.
_SCAN = """
local page = redis.call('SSCAN', KEYS[1], ARGV[2], 'COUNT', ARGV[3])
local found = {page[1]}
for _, path in ipairs(page[2]) do
  local fields = redis.call('HGETALL', ARGV[1] .. path)
  if #fields > 0 then
    found[#found + 1] = path
    found[#found + 1] = cjson.encode(fields)
  end
end
return found
"""

# KEYS: takedowns hash, denied hash.  ARGV: path.  The path's earlier takedown, if any,
# stops denying its content (unless another path's takedown denies it now).
_WITHDRAW_DENIAL = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local sha = cjson.decode(old)['sha256']
  if sha and sha ~= '' and redis.call('HGET', KEYS[2], sha) == ARGV[1] then
    redis.call('HDEL', KEYS[2], sha)
  end
end
"""

# KEYS: takedowns hash, denied hash.  ARGV: path, takedown JSON, sha256 or "".
_PUT_TAKEDOWN = (
    _WITHDRAW_DENIAL
    + """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[2], ARGV[3], ARGV[1])
end
return 1
"""
)

# KEYS: takedowns hash, denied hash.  ARGV: path.
_LIFT_TAKEDOWN = (
    _WITHDRAW_DENIAL
    + """
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""
)

# KEYS: takedowns hash, denied hash.  ARGV: sha256.  Returns path, JSON or nothing.
_DENIED = """
local path = redis.call('HGET', KEYS[2], ARGV[1])
if not path then
  return {}
end
local found = redis.call('HGET', KEYS[1], path)
if not found then
  return {}
end
return {path, found}
"""


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class AdminRedis:
    """
    The walk and the takedowns for L{RedisStore}, which provides C{_call}, C{prefix},
    C{_filePrefix} and C{_filesKey}.
    """

    prefix: str
    _filePrefix: bytes
    _filesKey: bytes

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Deferred[Any]:
        raise NotImplementedError

    def _takedownKeys(self) -> list[bytes]:
        raw = self.prefix.encode("utf-8")
        return [raw + b"takedowns", raw + b"denied"]

    def scan(self, cursor: str, limit: int) -> Deferred[tuple[list[FileRecord], str | None]]:
        """
        About C{limit} records after C{cursor} ("" to begin), and the cursor to go on from
        (None at the end).  A record may come twice if the set is resized meanwhile.
        """
        if limit < 1:
            return fail(ValueError(f"limit must be at least 1, got {limit!r}"))
        args = [self._filePrefix, (cursor or "0").encode("ascii"), str(int(limit)).encode()]
        d = self._call("scan", "eval", _SCAN, [self._filesKey], args)

        def page(reply: list[Any]) -> tuple[list[FileRecord], str | None]:
            after = _text(reply[0])
            records = []
            for path, packed in zip(reply[1::2], reply[2::2], strict=True):
                flat = json.loads(packed)
                fields = dict(zip(flat[::2], flat[1::2], strict=True))
                records.append(FileRecord.from_fields(_text(path), fields))
            return records, (None if after == "0" else after)

        return d.addCallback(page)

    def put_takedown(self, takedown: Takedown) -> Deferred[None]:
        """Keep C{takedown} for good, replacing any for its path."""
        args = [
            takedown.path.encode("utf-8"),
            takedown.to_json().encode("utf-8"),
            takedown.sha256.encode("ascii"),
        ]
        d = self._call("put_takedown", "eval", _PUT_TAKEDOWN, self._takedownKeys(), args)
        return d.addCallback(lambda _: None)

    def takedown(self, path: str) -> Deferred[Takedown | None]:
        """The takedown of C{path}, or None."""
        key = self._takedownKeys()[0]
        d = self._call("takedown", "execute_command", "HGET", key, path.encode("utf-8"))
        return d.addCallback(
            lambda found: None if found is None else Takedown.from_json(path, found)
        )

    def denied(self, sha256: str) -> Deferred[Takedown | None]:
        """The takedown of content C{sha256} (the last one made), or None."""
        if not sha256:
            return succeed(None)  # an unknown digest denies nothing
        d = self._call("denied", "eval", _DENIED, self._takedownKeys(), [sha256.encode("ascii")])

        def found(reply: list[Any]) -> Takedown | None:
            if not reply:
                return None
            return Takedown.from_json(_text(reply[0]), reply[1])

        return d.addCallback(found)

    def takedowns(self) -> Deferred[list[Takedown]]:
        """Every takedown."""
        key = self._takedownKeys()[0]
        d = self._call("takedowns", "execute_command", "HGETALL", key)

        def found(flat: list[Any]) -> list[Takedown]:
            return [
                Takedown.from_json(_text(path), text)
                for path, text in zip(flat[::2], flat[1::2], strict=True)
            ]

        return d.addCallback(found)

    def lift_takedown(self, path: str) -> Deferred[None]:
        """Forget the takedown of C{path}."""
        d = self._call(
            "lift_takedown", "eval", _LIFT_TAKEDOWN, self._takedownKeys(), [path.encode("utf-8")]
        )
        return d.addCallback(lambda _: None)
