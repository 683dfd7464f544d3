"""
Request-rate limiting per client address.

A token bucket per address: C{burst} requests at once, refilled at
C{perMinute / 60} per second.  The address is the connection's peer, or,
when that peer is one of C{TrustedProxies}, the nearest untrusted address in
X-Forwarded-For.  Loopback gets no exemption unless it is configured as a
trusted proxy.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict
from collections.abc import Iterable

__all__ = [
    "Bandwidth",
    "Network",
    "RateLimiter",
    "client_address",
    "is_trusted",
    "parse_networks",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """IP addresses and CIDR blocks; ValueError names the first bad one."""
    return tuple(ipaddress.ip_network(entry.strip(), strict=False) for entry in entries)


def is_trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    """
    Whether C{address} is in one of the C{trusted} networks (an IPv4-mapped IPv6
    address as its IPv4 one); text that is no IP address is never trusted.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in trusted)


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
