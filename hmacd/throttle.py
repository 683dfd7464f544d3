"""
Request-rate limiting per client address.

A token bucket per address: C{burst} requests at once, refilled at
C{perMinute / 60} per second.  The address is the connection's peer, or,
when that peer is one of C{TrustedProxies}, the nearest untrusted address in
X-Forwarded-For.  Loopback gets no exemption unless it is configured as a
trusted proxy.

With C{RateLimitShared}, L{SharedRateLimiter} keeps the buckets in Redis,
shared by every node and every Workers process.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from hmacd.store import StoreUnavailable

__all__ = [
    "Bandwidth",
    "Network",
    "RateLimiter",
    "SharedRateLimiter",
    "client_address",
    "is_trusted",
    "parse_networks",
    "rate_limiter",
]

log = Logger()

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """IP addresses and CIDR blocks; ValueError names the first bad one."""
    return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in entries)


def client_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """
    The IP address C{address} names, an IPv4-mapped IPv6 one (a dual-stack listener's
    view of an IPv4 client) as its IPv4 address; None for text that is no IP address.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    """
    Whether C{address} is in one of the C{trusted} networks (an IPv4-mapped IPv6
    address as its IPv4 one); text that is no IP address is never trusted.
    """
    ip = client_ip(address)
    return ip is not None and any(ip in network for network in trusted)


def client_address(
    peer: str, forwardedFor: list[bytes] | None, trusted: tuple[Network, ...]
) -> str:
    """
    The address a request is counted against.

    X-Forwarded-For is read right to left, each proxy having appended the
    address it got the request from; the first address that is not a
    trusted proxy is the client.  Headers from untrusted peers are ignored:
    anybody can send one.
    """
    if not trusted or not is_trusted(peer, trusted) or not forwardedFor:
        return peer
    hops = [h.strip() for value in forwardedFor for h in value.decode("latin-1").split(",")]
    for hop in reversed([h for h in hops if h]):
        if not is_trusted(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # garbage in the header: count the proxy itself
    return peer


class RateLimiter:
    """
    Token buckets by address, on an injected clock.

    At most C{maxClients} buckets are kept; the least recently used goes
    first (a client that comes back starts with a full bucket, which is the
    state it would have reached by then anyway unless it was hammering).
    """

    def __init__(self, perMinute: int, burst: int, clock, maxClients: int = 65536) -> None:
        self.rate = perMinute / 60.0
        self.burst = float(burst or perMinute)
        self.clock = clock
        self.maxClients = maxClients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def check(self, address: str) -> float:
        """
        Take one token for C{address}.

        @return: 0 if the request may go on, else the seconds until it may.
        """
        now = self.clock.seconds()
        tokens, last = self._buckets.pop(address, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1:
            wait, tokens = 0.0, tokens - 1
        else:
            wait = (1 - tokens) / self.rate
        self._buckets[address] = (tokens, now)
        if len(self._buckets) > self.maxClients:
            self._buckets.popitem(last=False)
        return wait

    @staticmethod
    def retry_after(wait: float) -> bytes:
        return b"%d" % max(1, math.ceil(wait))


class Bandwidth:
    """
    A byte budget refilled at C{rate} per second, allowed to go into debt:
    C{take(n)} spends n bytes and says how long to pause until the budget is
    back at zero.  The upload reads what TCP delivers (one read, at most
    64 KiB, past the budget) and then pauses the transport for that long:
    back-pressure through TCP, no sleeping, no buffering.
    """

    def __init__(self, rate: int, clock, burst: int | None = None) -> None:
        self.rate = float(rate)
        # A tenth of a second's worth (at least one read): small enough that
        # a short upload is held to the rate too.
        self.burst = float(burst if burst is not None else max(65536, rate // 10))
        self.clock = clock
        self.tokens = self.burst
        self.last = clock.seconds()

    def take(self, count: int) -> float:
        now = self.clock.seconds()
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= count
        return -self.tokens / self.rate if self.tokens < 0 else 0.0


class SharedRateLimiter:
    """
    Token buckets by address in Redis, one per client for every node and
    process (C{RateLimitShared}), with the L{RateLimiter} interface.

    C{check} must answer at once (the verdict is given after the headers,
    without waiting), so it answers from what this process knows: its own
    bucket (the same limits; it bounds a burst that arrives between two
    Redis answers) and the last wait Redis gave for this address.  Every
    request it lets through takes its token from the shared bucket in the
    background; when Redis answers that the bucket is empty, the address is
    refused here until the wait it gave.  So the shared limit is exact to
    within one request per process per Redis round trip.

    While Redis does not answer, each process counts alone (its own bucket),
    and asks Redis again after C{retry} seconds; each transition is logged once.
    """

    def __init__(
        self,
        perMinute: int,
        burst: int,
        clock: Any,
        store: Any,
        retry: float = 5.0,
        maxClients: int = 65536,
    ) -> None:
        self.local = RateLimiter(perMinute, burst, clock, maxClients)
        self.rate = self.local.rate
        self.burst = self.local.burst
        self.clock = clock
        self.store = store
        self.retry = retry
        self.maxClients = maxClients
        self.shared = True  # whether Redis answered last
        self._blocked: OrderedDict[str, float] = OrderedDict()
        self._downUntil = float("-inf")
        # Answers still on their way (tests wait for them).
        self.pending: set[Deferred[None]] = set()

    def check(self, address: str) -> float:
        """0 if the request may go on, else the seconds until it may (see the class)."""
        wait = self.local.check(address)
        now = self.clock.seconds()
        if now < self._downUntil:
            return wait
        until = self._blocked.get(address)
        if until is not None:
            if now < until:
                return max(wait, until - now)
            del self._blocked[address]
        if not wait:
            self._take(address)
        return wait

    retry_after = staticmethod(RateLimiter.retry_after)

    def _take(self, address: str) -> None:
        d: Deferred[None] = self.store.take_token(address, self.rate, self.burst)
        d.addCallbacks(lambda wait: self._answered(address, wait), self._failed)
        # Not d.called: a txredisapi Deferred may be "called" with another one still to fire.
        self.pending.add(d)

        def settled(result: object) -> object:
            self.pending.discard(d)
            return result

        d.addBoth(settled)

    def _answered(self, address: str, wait: float) -> None:
        if not self.shared:
            self.shared = True
            log.warn("shared rate limit: Redis answers again; buckets shared by every node")
        if wait > 0:
            self._blocked[address] = self.clock.seconds() + wait
            self._blocked.move_to_end(address)
            if len(self._blocked) > self.maxClients:
                self._blocked.popitem(last=False)

    def _failed(self, failure: Failure) -> None:
        failure.trap(StoreUnavailable)
        self._downUntil = self.clock.seconds() + self.retry
        if self.shared:
            self.shared = False
            log.warn(
                "shared rate limit: Redis does not answer ({why}); "
                "counting per process until it does",
                why=failure.getErrorMessage(),
            )


def rate_limiter(config: Any, clock: Any, metadata: Any) -> RateLimiter | SharedRateLimiter | None:
    """
    The request-rate limiter C{config} asks for: none, per-process buckets, or
    (C{RateLimitShared}) buckets in the Redis that is C{metadata}'s primary store
    (the config refuses RateLimitShared without RedisAddr, so Redis is the primary).
    """
    if not config.rate_limit_per_minute:
        return None
    if config.rate_limit_shared:
        redis = metadata.primary.store
        return SharedRateLimiter(
            config.rate_limit_per_minute, config.rate_limit_burst, clock, redis
        )
    return RateLimiter(config.rate_limit_per_minute, config.rate_limit_burst, clock)
