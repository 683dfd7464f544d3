"""
What several nodes share through Redis (L{hmacd.store.redis.RedisStore}),
under the store's prefix:

 - C{<prefix>claim:<path>}: the owner of a claim on a path;
 - C{<prefix>lease:<name>}: the holder of a named lease (one sweeper);
 - C{<prefix>state:<key>}: a shared value (resumable upload state);
 - C{<prefix>rate:<address>}: a client's request-rate bucket (RateLimitShared).

Each is a string key with a PX expiry kept by the server, so nothing is
left behind by a node that dies.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet.defer import Deferred

from hmacd.store.redis_scripts import _RELEASE, _RENEW, _TAKE, _TAKE_TOKEN

__all__ = ["SharedRedis"]


def _ms(seconds: float) -> str:
    # PX takes whole milliseconds, at least one.
    return str(max(1, math.ceil(seconds * 1000)))


class SharedRedis:
    """The cross-node part of IMetadataStore; the store provides C{_call} and C{prefix}."""

    prefix: str

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Deferred[Any]:
        raise NotImplementedError

    def _key(self, kind: str, name: str) -> bytes:
        return f"{self.prefix}{kind}:{name}".encode()

    def _script(self, what: str, script: str, key: bytes, *args: str) -> Deferred[bool]:
        d = self._call(what, "eval", script, [key], [a.encode("utf-8") for a in args])
        return d.addCallback(lambda reply: int(reply) == 1)

    def claim(self, path: str, owner: str, lease: float) -> Deferred[bool]:
        """True if C{owner} now holds C{path} for C{lease} seconds (taken or re-taken)."""
        return self._script("claim", _TAKE, self._key("claim", path), owner, _ms(lease))

    def renew(self, path: str, owner: str, lease: float) -> Deferred[bool]:
        """Extend C{owner}'s claim on C{path}; False if it expired or is someone else's."""
        return self._script("renew", _RENEW, self._key("claim", path), owner, _ms(lease))

    def release(self, path: str, owner: str) -> Deferred[None]:
        """Drop C{owner}'s claim on C{path}; someone else's stays."""
        d = self._script("release", _RELEASE, self._key("claim", path), owner)
        return d.addCallback(lambda _: None)

    def lease(self, name: str, owner: str, ttl: float) -> Deferred[bool]:
        """True if C{owner} now holds the lease C{name} for C{ttl} seconds."""
        return self._script("lease", _TAKE, self._key("lease", name), owner, _ms(ttl))

    def put_state(self, key: str, value: str, ttl: float) -> Deferred[None]:
        """Set C{key} to C{value} for C{ttl} seconds."""
        d = self._call(
            "put_state", "execute_command", "SET", self._key("state", key),
            value.encode("utf-8"), "PX", _ms(ttl),
        )  # fmt: skip
        return d.addCallback(lambda _: None)

    def get_state(self, key: str) -> Deferred[str | None]:
        """The value of C{key}, or None if unset or expired."""
        d = self._call("get_state", "execute_command", "GET", self._key("state", key))
        return d.addCallback(lambda value: None if value is None else value.decode("utf-8"))

    def delete_state(self, key: str) -> Deferred[None]:
        """Forget C{key}; no error if unknown."""
        d = self._call("delete_state", "execute_command", "DEL", self._key("state", key))
        return d.addCallback(lambda _: None)

    def take_token(self, address: str, rate: float, burst: float) -> Deferred[float]:
        """
        Take one token from C{address}'s shared bucket (C{rate} per second, C{burst}
        at most): 0 if taken, else the seconds until one is there.
        """
        d = self._call(
            "rate limit", "eval", _TAKE_TOKEN, [self._key("rate", address)],
            [repr(float(rate)), repr(float(burst))],
        )  # fmt: skip
        return d.addCallback(float)
